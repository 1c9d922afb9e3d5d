//! For hosts: the gateway core, plugin runtimes and test harnesses. A
//! plugin's own code never needs this module; what it uses is at the crate
//! root. A plugin's tests should run it in `gateway_core::testing::TestHost`
//! (the real gateway with in-memory connections); a lower-level unit test of
//! a factory or a `register` without a gateway builds the pieces here
//! ([`scope_life`], [`event_sink`], [`registrar`] and [`declarations`],
//! [`request_context`]).
//!
//! A plugin is handed capabilities, never the controls behind them: its
//! [`EventSink`] cannot choose which events it may emit (the
//! [`EventDeclarer`] that does stays with the host), its [`ScopeLife`]
//! cannot retire its generation (the [`LifeController`] stays with the
//! host), and its [`Registrar`] cannot be turned into [`Declarations`] by
//! the plugin. Everything here builds new, unconnected pieces: a plugin
//! calling it gets a sink wired to a transport of its own, not to the
//! gateway's connections, and a generation of its own, not the one it runs
//! in.

pub use crate::events::{
    EventDeclarer, EventTransport, NullTransport, OutboundEvent, ReceiverFilter,
};
pub use crate::life::LifeController;
pub use crate::registrar::{AsyncHandler, Declarations, Handler, MethodSpec, SyncHandler};
use crate::{ClientInfo, ConnId, ConnectionInfo, EventSink, Registrar, RequestContext, ScopeLife};
use crate::{Role, Scopes, scope};
use std::sync::Arc;

/// The context a request arriving on `conn` runs in, built by the host from
/// the connection it authenticated. Its role and scopes are what the host
/// checks before it calls a handler.
pub fn request_context(conn: Arc<ConnectionInfo>) -> RequestContext {
    RequestContext::new(conn)
}

/// A context for in-process callers of the host (tests, embedding
/// programs): an operator holding `operator.admin` on connection `conn_id`.
pub fn internal_context(conn_id: ConnId) -> RequestContext {
    RequestContext::new(Arc::new(ConnectionInfo {
        conn_id,
        role: Role::Operator,
        scopes: Scopes::new([scope::ADMIN]),
        client: ClientInfo {
            id: "internal".into(),
            mode: "internal".into(),
            ..ClientInfo::default()
        },
    }))
}

/// A new, live generation and the controller that retires it. Call once per
/// generation; hand the plugin the [`ScopeLife`], keep the controller.
pub fn scope_life(generation: u64) -> (ScopeLife, LifeController) {
    ScopeLife::new(generation)
}

/// A registrar to pass to [`crate::Plugin::register`] for `plugin_id`.
pub fn registrar(plugin_id: &str) -> Registrar {
    Registrar::new(plugin_id)
}

/// What the plugin declared on `registrar` in its `register`.
pub fn declarations(registrar: Registrar) -> Declarations {
    registrar.into_declarations()
}

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
