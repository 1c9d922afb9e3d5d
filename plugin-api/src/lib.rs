//! The contract gateway plugins are written against.
//!
//! A plugin is constructed once per generation (a `RestartScope` in the host)
//! from a [`PluginFactory`], declares what it offers in [`Plugin::register`]
//! (methods, events, services, channels) and keeps its state in
//! [`ScopeHandle`]s bound to that generation. It never touches sockets: it
//! answers requests through handlers and reaches clients through an
//! [`EventSink`]. When its generation retires, handles and sinks refuse work
//! and its background tasks are cancelled, so nothing of it can leak into the
//! next generation.
//!
//! This crate depends on no WebSocket, HTTP or network code.
//!
//! ```
//! use plugin_api::{Plugin, PluginContext, PluginFactory, Registrar, scope};
//! use std::sync::Arc;
//!
//! struct Hello;
//! impl Plugin for Hello {
//!     fn id(&self) -> &str { "hello" }
//!     fn version(&self) -> &str { "1.0.0" }
//!     fn register(&self, r: &mut Registrar) {
//!         r.method("hello.say")
//!             .scope(scope::READ)
//!             .sync(|ctx, _params| Ok(serde_json::json!({ "hello": ctx.conn_id().0 })));
//!     }
//! }
//! let factory = PluginFactory::new("hello", "1.0.0", |_ctx: PluginContext| Ok(Arc::new(Hello)));
//! assert_eq!(factory.id, "hello");
//! ```

mod context;
mod error;
mod events;
pub mod host;
mod life;
mod plugin;
mod registrar;
mod typed;

pub use context::{
    ClientInfo, ConnId, ConnectionInfo, Params, RequestContext, Role, Scopes, scope,
};
pub use error::{ErrorCode, PluginError, RpcError};
pub use events::{EventError, EventSink, RESERVED_EVENTS, is_reserved_event};
pub use life::{HandleError, Retired, ScopeHandle, ScopeLife};
pub use plugin::{CreateFn, Plugin, PluginContext, PluginFactory};
pub use registrar::{
    BoxFuture, Channel, ConnectionClosedHook, ConnectionOpenedHook, HealthCheck, MethodBuilder,
    MethodResult, OutboundMessage, Registrar, RequiredScope, SendReceipt, Service,
};
pub use serde_json::Value;
pub use typed::ServiceFn;
