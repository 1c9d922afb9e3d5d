//! For hosts only: the gateway core, plugin runtimes and test harnesses.
//!
//! A plugin is handed capabilities, never the controls behind them: its
//! [`EventSink`] cannot choose which events it may emit (the
//! [`EventDeclarer`] that does stays with the host), and its [`ScopeLife`]
//! cannot retire its generation (the [`crate::LifeController`] stays with
//! the host). Everything here builds new, unconnected pieces: a plugin
//! calling it gets a sink wired to a transport of its own, not to the
//! gateway's connections, and a generation of its own, not the one it runs
//! in.

use crate::{EventDeclarer, EventSink, EventTransport, ScopeLife};
use std::sync::Arc;

/// A sink for `plugin_id` in `life`'s generation, and the declarer that
/// fixes, once, which events it may emit (after the plugin's `register`).
/// Give the plugin the sink; keep the declarer.
pub fn event_sink(
    plugin_id: &str,
    life: ScopeLife,
    transport: Arc<dyn EventTransport>,
) -> (EventSink, EventDeclarer) {
    EventSink::with_declarer(plugin_id, life, transport)
}
