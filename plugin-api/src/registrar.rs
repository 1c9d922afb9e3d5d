//! What a plugin declares: methods, events, services, channels, hooks.

use crate::{ConnId, ConnectionInfo, Params, RequestContext, RpcError, scope};
use serde_json::Value;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a method answers: a JSON payload or an error.
pub type MethodResult = Result<Value, RpcError>;

/// A synchronous handler; runs inline on the dispatching task.
pub type SyncHandler = Arc<dyn Fn(&RequestContext, Params) -> MethodResult + Send + Sync>;

/// An asynchronous handler.
pub type AsyncHandler =
    Arc<dyn Fn(RequestContext, Params) -> BoxFuture<MethodResult> + Send + Sync>;

/// A method's implementation.
#[derive(Clone)]
pub enum Handler {
    /// Answers without awaiting; no future is allocated.
    Sync(SyncHandler),
    /// Answers with a future.
    Async(AsyncHandler),
}

impl fmt::Debug for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Handler::Sync(_) => "Handler::Sync",
            Handler::Async(_) => "Handler::Async",
        })
    }
}

/// The scope a method needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequiredScope {
    /// Any authenticated connection may call it (like `health`).
    None,
    /// The connection must hold this scope (or one implying it).
    Scope(String),
}

impl RequiredScope {
    /// The scope name, if one is needed.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            RequiredScope::None => None,
            RequiredScope::Scope(s) => Some(s),
        }
    }
}

/// One declared method.
#[derive(Debug, Clone)]
pub struct MethodSpec {
    /// Full method name, e.g. `bncr.connect`.
    pub name: String,
    /// Scope needed to call it; `operator.admin` unless declared otherwise.
    pub scope: RequiredScope,
    /// Listed in `features.methods`. Unadvertised methods still dispatch.
    pub advertise: bool,
    /// Callable only by connections with the `node` role.
    pub node_only: bool,
    /// The implementation.
    pub handler: Handler,
}

/// A long-running part of a plugin with an async start and stop.
///
/// The host starts services in declaration order after the previous
/// generation's services have stopped, and stops them in reverse order.
/// `stop` is called exactly once for every service whose `start` was called,
/// whether or not `start` succeeded.
pub trait Service: Send + Sync + 'static {
    /// A name for logs, unique within the plugin.
    fn name(&self) -> &str;
    /// Start; an error marks the plugin failed and its methods unavailable.
    fn start(self: Arc<Self>) -> BoxFuture<Result<(), String>>;
    /// Stop; flush and release what `start` acquired.
    fn stop(self: Arc<Self>) -> BoxFuture<()>;
}

/// An outbound message handed to a channel by the core `send` method.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboundMessage {
    /// Channel-specific address, e.g. `Bncr:qq:0:12345`.
    pub to: String,
    /// The message: text, or a channel-specific object.
    pub message: Value,
    /// The same key again must return the same message id and queue nothing.
    pub idempotency_key: String,
}

/// A channel's answer to `send` once the message is durably queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReceipt {
    /// The channel's id for the message.
    pub message_id: String,
}

/// A chat channel that the core `send` method can route to.
pub trait Channel: Send + Sync + 'static {
    /// Durably queue `message`; answer once it cannot be lost.
    fn send(
        self: Arc<Self>,
        ctx: RequestContext,
        message: OutboundMessage,
    ) -> BoxFuture<Result<SendReceipt, RpcError>>;
}

/// Called by the host when a client connection closes.
pub type ConnectionClosedHook = Arc<dyn Fn(ConnId) + Send + Sync>;

/// Called by the host when an authenticated client connection joins the
/// connection table (after its `hello-ok`).
pub type ConnectionOpenedHook = Arc<dyn Fn(&ConnectionInfo) + Send + Sync>;

/// Asked by the host whenever it reports health or readiness: `Some(reason)`
/// while the plugin is running but cannot do its job (for example its store
/// refuses writes). Must be cheap and must not block.
pub type HealthCheck = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Everything one plugin declared in `register`.
#[derive(Default)]
pub struct Declarations {
    /// Methods, in declaration order.
    pub methods: Vec<MethodSpec>,
    /// Event names the plugin may emit.
    pub events: Vec<String>,
    /// Services, in start order.
    pub services: Vec<Arc<dyn Service>>,
    /// Channels by id.
    pub channels: Vec<(String, Arc<dyn Channel>)>,
    /// Connection-closed hooks.
    pub connection_closed: Vec<ConnectionClosedHook>,
    /// Connection-opened hooks.
    pub connection_opened: Vec<ConnectionOpenedHook>,
    /// Health checks.
    pub health: Vec<HealthCheck>,
}

impl fmt::Debug for Declarations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Declarations")
            .field(
                "methods",
                &self.methods.iter().map(|m| &m.name).collect::<Vec<_>>(),
            )
            .field("events", &self.events)
            .field(
                "services",
                &self.services.iter().map(|s| s.name()).collect::<Vec<_>>(),
            )
            .field(
                "channels",
                &self.channels.iter().map(|c| &c.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Collects a plugin's declarations. `register` must only declare: no I/O, no
/// tasks, no side effects, so that building a scope and discarding it changes
/// nothing.
#[derive(Debug)]
pub struct Registrar {
    plugin_id: String,
    decl: Declarations,
}

impl Registrar {
    /// A registrar for `plugin_id` ([`crate::host::registrar`]).
    pub(crate) fn new(plugin_id: &str) -> Self {
        Registrar {
            plugin_id: plugin_id.to_string(),
            decl: Declarations::default(),
        }
    }

    /// The plugin being registered.
    pub fn plugin_id(&self) -> &str {
        &self.plugin_id
    }

    /// Declare a method; finish with [`MethodBuilder::handler`] or
    /// [`MethodBuilder::sync`].
    pub fn method(&mut self, name: impl Into<String>) -> MethodBuilder<'_> {
        MethodBuilder {
            registrar: self,
            name: name.into(),
            scope: RequiredScope::Scope(scope::ADMIN.to_string()),
            advertise: true,
            node_only: false,
        }
    }

    /// Declare an event the plugin may emit. Plugin events are conventionally
    /// named `plugin.<pluginId>.<name>`.
    pub fn event(&mut self, name: impl Into<String>) -> &mut Self {
        let name = name.into();
        if !self.decl.events.contains(&name) {
            self.decl.events.push(name);
        }
        self
    }

    /// Declare a service.
    pub fn service(&mut self, service: Arc<dyn Service>) -> &mut Self {
        self.decl.services.push(service);
        self
    }

    /// Declare an outbound channel for the core `send` method.
    pub fn channel(&mut self, id: impl Into<String>, channel: Arc<dyn Channel>) -> &mut Self {
        self.decl.channels.push((id.into(), channel));
        self
    }

    /// Be told when a client connection closes.
    pub fn on_connection_closed(
        &mut self,
        hook: impl Fn(ConnId) + Send + Sync + 'static,
    ) -> &mut Self {
        self.decl.connection_closed.push(Arc::new(hook));
        self
    }

    /// Be told when an authenticated client connection opens.
    pub fn on_connection_opened(
        &mut self,
        hook: impl Fn(&ConnectionInfo) + Send + Sync + 'static,
    ) -> &mut Self {
        self.decl.connection_opened.push(Arc::new(hook));
        self
    }

    /// Report the plugin degraded while `check` returns `Some(reason)`: the
    /// host's `health` answers `ok: false` and readiness fails, naming the
    /// plugin and the reason.
    pub fn health_check(
        &mut self,
        check: impl Fn() -> Option<String> + Send + Sync + 'static,
    ) -> &mut Self {
        self.decl.health.push(Arc::new(check));
        self
    }

    /// What was declared ([`crate::host::declarations`]).
    pub(crate) fn into_declarations(self) -> Declarations {
        self.decl
    }
}

/// Builder for one method declaration.
#[must_use = "a method is declared only when its handler is given"]
#[derive(Debug)]
pub struct MethodBuilder<'r> {
    registrar: &'r mut Registrar,
    name: String,
    scope: RequiredScope,
    advertise: bool,
    node_only: bool,
}

impl MethodBuilder<'_> {
    /// Require `scope` instead of `operator.admin`.
    pub fn scope(mut self, scope: &str) -> Self {
        self.scope = RequiredScope::Scope(scope.to_string());
        self
    }

    /// Callable without any scope. The host refuses this for names under the
    /// reserved admin prefixes.
    pub fn no_scope(mut self) -> Self {
        self.scope = RequiredScope::None;
        self
    }

    /// Dispatch it but leave it out of `features.methods`.
    pub fn hidden(mut self) -> Self {
        self.advertise = false;
        self
    }

    /// Only `node`-role connections may call it.
    pub fn node_only(mut self) -> Self {
        self.node_only = true;
        self
    }

    fn finish(self, handler: Handler) {
        self.registrar.decl.methods.push(MethodSpec {
            name: self.name,
            scope: self.scope,
            advertise: self.advertise,
            node_only: self.node_only,
            handler,
        });
    }

    /// Declare with an async handler.
    pub fn handler<F, Fut>(self, f: F)
    where
        F: Fn(RequestContext, Params) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = MethodResult> + Send + 'static,
    {
        self.finish(Handler::Async(Arc::new(move |ctx, params| {
            Box::pin(f(ctx, params))
        })));
    }

    /// Declare with a synchronous handler.
    pub fn sync<F>(self, f: F)
    where
        F: Fn(&RequestContext, Params) -> MethodResult + Send + Sync + 'static,
    {
        self.finish(Handler::Sync(Arc::new(f)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_defaults_to_admin_and_advertised() {
        let mut r = Registrar::new("demo");
        r.method("demo.a").sync(|_, _| Ok(Value::Null));
        r.method("demo.b")
            .scope(scope::READ)
            .hidden()
            .node_only()
            .handler(|_, _| async { Ok(Value::Bool(true)) });
        r.event("plugin.demo.e").event("plugin.demo.e");
        let d = r.into_declarations();
        assert_eq!(d.methods.len(), 2);
        assert_eq!(
            d.methods[0].scope,
            RequiredScope::Scope(scope::ADMIN.into())
        );
        assert!(d.methods[0].advertise && !d.methods[0].node_only);
        assert_eq!(d.methods[1].scope.as_str(), Some(scope::READ));
        assert!(!d.methods[1].advertise && d.methods[1].node_only);
        assert_eq!(d.events, vec!["plugin.demo.e".to_string()]);
        assert!(d.health.is_empty() && d.connection_opened.is_empty());
        let mut r = Registrar::new("demo");
        r.health_check(|| Some("down".into()))
            .on_connection_opened(|_| {});
        let d = r.into_declarations();
        assert_eq!((d.health[0])(), Some("down".to_string()));
        assert_eq!(d.connection_opened.len(), 1);
    }
}
