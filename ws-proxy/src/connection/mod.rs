//! Client connections: the outbound queue of each (its [`Outbox`]), the
//! task that writes it to the socket, and the table of authenticated
//! connections that plugins' events go through.
//!
//! The outbound path loses nothing: every item queued is either written or
//! the connection is closed with a reason (a close frame, an abort such as
//! `slow consumer`, or a failed socket). Bytes are charged in one place
//! ([`Outbox::push`]) and refunded in one place (when the writer takes an
//! item off the queue, [`OutboxReceiver::recv`] / `try_recv`), so the
//! buffered count cannot drift.
//!
//! The writer also keeps the per-connection promise of `gateway.generation`:
//! every response and plugin event carries the generation that produced
//! it, and the writer writes the `gateway.generation` event of a generation
//! before the first response or event of that generation on the
//! connection. The table queues no event of a generation that is not
//! serving yet, so no generation is announced before it serves.
//!
//! - `outbox`: the queue and its receiving half, where bytes are charged
//!   and refunded;
//! - `writer`: the task that writes the queue to the socket in batches and
//!   keeps the `gateway.generation` promise;
//! - `notices`: the `gateway.generation` payload of the generation serving
//!   now;
//! - `table`: the authenticated connections and the
//!   [`EventTransport`](plugin_api::host::EventTransport)
//!   plugins send events through.

mod notices;
mod outbox;
mod table;
mod writer;

pub(crate) use notices::GenerationNotices;
pub(crate) use outbox::{Outbox, OutboxReceiver};
pub use table::ConnectionTable;
pub(crate) use writer::run_writer;

/// The event that tells a connection which generation serves it.
const GENERATION_EVENT: &str = "gateway.generation";

/// A JSON payload from text, for tests.
#[cfg(test)]
fn test_raw(s: &str) -> std::sync::Arc<serde_json::value::RawValue> {
    std::sync::Arc::from(serde_json::value::RawValue::from_string(s.into()).unwrap())
}
