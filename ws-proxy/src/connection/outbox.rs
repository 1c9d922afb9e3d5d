//! One connection's outbound queue and the receiving half the writer owns.

use super::GENERATION_EVENT;
use plugin_api::host::OutboundEvent;
use serde_json::value::RawValue;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Approximate framing overhead counted per queued item.
pub(super) const ITEM_OVERHEAD: usize = 64;

/// What the writer task sends.
#[derive(Debug)]
pub(super) enum Outgoing {
    /// An encoded frame not produced by a generation (the challenge, an
    /// answer to a frame that never reached the gateway, `busy`).
    Frame(String),
    /// A response and the generation that produced it (0: none admitted it).
    Response(String, u64),
    /// hello-ok, describing `generation`: the connection now knows it.
    Hello(String, u64),
    /// An event, framed with the connection's next `seq` when written, and
    /// the generation whose plugin emitted it (0: a host event, `tick` or
    /// `shutdown`, of no generation).
    Event(Arc<str>, Arc<RawValue>, u64),
    /// `gateway.generation` for `generation`; written only if the
    /// connection has not been told of it (or a later one) yet.
    Generation(u64, Arc<RawValue>),
    /// A close frame, after everything queued before it.
    Close(u16, String),
}

impl Outgoing {
    fn cost(&self) -> usize {
        ITEM_OVERHEAD
            + match self {
                Outgoing::Frame(s) | Outgoing::Response(s, _) | Outgoing::Hello(s, _) => s.len(),
                Outgoing::Event(n, p, _) => n.len() + p.get().len(),
                Outgoing::Generation(_, p) => GENERATION_EVENT.len() + p.get().len(),
                Outgoing::Close(_, r) => r.len(),
            }
    }
}

/// One connection's outbound queue, bounded by bytes (`maxBufferedBytes`).
#[derive(Debug)]
pub(crate) struct Outbox {
    tx: mpsc::UnboundedSender<Outgoing>,
    /// Bytes queued and not yet taken by the writer.
    pub(super) buffered: AtomicUsize,
    max_buffered: usize,
    /// Cancelled to close at once (slow consumer): queued frames are dropped.
    pub(super) abort: CancellationToken,
    pub(super) abort_reason: Mutex<Option<(u16, String)>>,
    /// Cancelled once the connection is closing or closed.
    pub(super) closed: CancellationToken,
    /// Set when the server asked to close.
    close_requested: AtomicBool,
    /// Bytes the WebSocket layer holds unwritten (pongs included); they
    /// count toward the same budget.
    socket_backlog: std::sync::OnceLock<Arc<AtomicUsize>>,
    /// When the client last sent a frame (unix ms), for `system-presence`.
    last_activity_ms: std::sync::atomic::AtomicU64,
    /// The first close code the server asked for (0: none), for metrics.
    close_code: std::sync::atomic::AtomicU16,
}

/// The receiving half, owned by the writer task. Taking an item off the
/// queue refunds its bytes: the only refund there is (dropping the
/// receiver takes off, and so refunds, whatever is left).
#[derive(Debug)]
pub(crate) struct OutboxReceiver {
    rx: mpsc::UnboundedReceiver<Outgoing>,
    pub(super) outbox: Arc<Outbox>,
}

impl OutboxReceiver {
    fn taken(&self, item: Outgoing) -> Outgoing {
        self.outbox
            .buffered
            .fetch_sub(item.cost(), Ordering::AcqRel);
        item
    }

    pub(super) async fn recv(&mut self) -> Option<Outgoing> {
        let item = self.rx.recv().await?;
        Some(self.taken(item))
    }

    pub(super) fn try_recv(&mut self) -> Option<Outgoing> {
        let item = self.rx.try_recv().ok()?;
        Some(self.taken(item))
    }
}

impl Drop for OutboxReceiver {
    /// The writer ended (the connection closed): refuse further items and
    /// refund what is still queued, so the count ends at zero.
    fn drop(&mut self) {
        self.rx.close();
        while self.try_recv().is_some() {}
    }
}

impl Outbox {
    pub(crate) fn new(max_buffered: usize) -> (Arc<Outbox>, OutboxReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let outbox = Arc::new(Outbox {
            tx,
            buffered: AtomicUsize::new(0),
            max_buffered,
            abort: CancellationToken::new(),
            abort_reason: Mutex::new(None),
            closed: CancellationToken::new(),
            close_requested: AtomicBool::new(false),
            socket_backlog: std::sync::OnceLock::new(),
            last_activity_ms: std::sync::atomic::AtomicU64::new(0),
            close_code: std::sync::atomic::AtomicU16::new(0),
        });
        let rx = OutboxReceiver {
            rx,
            outbox: outbox.clone(),
        };
        (outbox, rx)
    }

    /// The only place bytes are charged. An item that does not get into
    /// the queue is not charged (or is refunded right here); one that would
    /// exceed the cap closes the connection (`slow consumer`). A close
    /// frame is exempt from the cap (a connection queues at most a few), so
    /// a full queue still ends with the close the server asked for.
    fn push(&self, item: Outgoing) -> bool {
        if self.closed.is_cancelled() {
            return false;
        }
        let cost = item.cost();
        let now = self.buffered.fetch_add(cost, Ordering::AcqRel) + cost;
        let backlog = self
            .socket_backlog
            .get()
            .map_or(0, |b| b.load(Ordering::Acquire));
        if now + backlog > self.max_buffered && !matches!(item, Outgoing::Close(..)) {
            self.buffered.fetch_sub(cost, Ordering::AcqRel);
            self.close_now(1008, "slow consumer");
            return false;
        }
        if self.tx.send(item).is_err() {
            // The writer is gone: nothing will take it off the queue.
            self.buffered.fetch_sub(cost, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Count `backlog` (bytes below the outbox not yet written) in the budget.
    pub(crate) fn count_socket_backlog(&self, backlog: Arc<AtomicUsize>) {
        let _ = self.socket_backlog.set(backlog);
    }

    /// Bytes queued in the outbox now.
    pub(crate) fn buffered(&self) -> usize {
        self.buffered.load(Ordering::Acquire)
    }

    /// Note that the client sent something at `unix_ms`.
    pub(crate) fn mark_activity(&self, unix_ms: u64) {
        self.last_activity_ms.store(unix_ms, Ordering::Relaxed);
    }

    /// When the client last sent something (unix ms).
    pub(crate) fn last_activity_ms(&self) -> u64 {
        self.last_activity_ms.load(Ordering::Relaxed)
    }

    fn note_close_code(&self, code: u16) {
        let _ = self
            .close_code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The close code the server asked for first, if it asked.
    pub(crate) fn close_code(&self) -> Option<u16> {
        match self.close_code.load(Ordering::Acquire) {
            0 => None,
            c => Some(c),
        }
    }

    /// Queue an encoded frame that no generation produced.
    pub(crate) fn frame(&self, text: String) -> bool {
        self.push(Outgoing::Frame(text))
    }

    /// Queue a response produced by `generation` (0: not admitted by any).
    /// The writer tells the connection about the generation first if it has
    /// not yet.
    pub(crate) fn response(&self, text: String, generation: u64) -> bool {
        self.push(Outgoing::Response(text, generation))
    }

    /// Queue hello-ok, which describes `generation`.
    pub(crate) fn hello(&self, text: String, generation: u64) -> bool {
        self.push(Outgoing::Hello(text, generation))
    }

    /// Queue a host event (`tick`, `shutdown`); the writer gives it the
    /// next `seq`.
    pub(crate) fn event(&self, name: Arc<str>, payload: Arc<RawValue>) -> bool {
        self.push(Outgoing::Event(name, payload, 0))
    }

    /// Queue a plugin's event. The writer tells the connection about the
    /// event's generation first if it has not yet, as for a response.
    pub(crate) fn plugin_event(&self, event: &OutboundEvent) -> bool {
        self.push(Outgoing::Event(
            event.name.clone(),
            event.payload.clone(),
            event.generation,
        ))
    }

    /// Queue `gateway.generation` for `generation` (payload: its number and
    /// features). Skipped by the writer when the connection already knows
    /// this generation or a later one.
    pub(crate) fn generation(&self, generation: u64, payload: Arc<RawValue>) -> bool {
        self.push(Outgoing::Generation(generation, payload))
    }

    /// Queue an event only if the client is keeping up (for `tick`): dropped,
    /// not queued, when anything sizeable is already waiting.
    pub(crate) fn event_if_idle(&self, name: Arc<str>, payload: Arc<RawValue>) -> bool {
        let idle_limit = (self.max_buffered / 4).min(256 * 1024);
        if self.buffered.load(Ordering::Acquire) > idle_limit {
            return false;
        }
        self.event(name, payload)
    }

    /// Close after everything already queued has been written.
    pub(crate) fn close(&self, code: u16, reason: &str) {
        self.close_requested.store(true, Ordering::Release);
        self.note_close_code(code);
        let _ = self.push(Outgoing::Close(code, reason.to_string()));
    }

    /// Close at once, dropping what is queued.
    pub(crate) fn close_now(&self, code: u16, reason: &str) {
        self.close_requested.store(true, Ordering::Release);
        self.note_close_code(code);
        {
            let mut r = self.abort_reason.lock().unwrap_or_else(|e| e.into_inner());
            if r.is_none() {
                *r = Some((code, reason.to_string()));
            }
        }
        self.abort.cancel();
    }

    /// Whether the server asked to close this connection.
    pub(crate) fn close_requested(&self) -> bool {
        self.close_requested.load(Ordering::Acquire)
    }

    /// Cancelled once the connection is closing (a close frame went out or
    /// the socket failed) or closed.
    pub(crate) fn closed(&self) -> &CancellationToken {
        &self.closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::test_raw as raw;

    #[test]
    fn a_full_outbox_refuses_and_aborts_the_connection() {
        let (outbox, _rx) = Outbox::new(1000);
        assert!(outbox.frame("x".repeat(500)));
        assert!(!outbox.frame("x".repeat(500)));
        assert!(outbox.abort.is_cancelled());
        assert_eq!(
            outbox.abort_reason.lock().unwrap().clone(),
            Some((1008, "slow consumer".to_string()))
        );
    }

    #[test]
    fn ticks_are_dropped_for_a_client_that_is_behind() {
        let (outbox, _rx) = Outbox::new(4000);
        assert!(outbox.event_if_idle("tick".into(), raw("{}")));
        assert!(outbox.frame("x".repeat(1500)));
        assert!(!outbox.event_if_idle("tick".into(), raw("{}")));
    }
}
