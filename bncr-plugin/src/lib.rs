//! The Bncr chat bridge as a gateway plugin.
//!
//! Bncr clients connect over the gateway WebSocket and speak the `bncr.*`
//! methods; operators see accepted inbound messages as `chat.inbound` and
//! answer through the core `send` method, which reaches this plugin's
//! `bncr` channel. Everything that must survive a restart (outbox, dead
//! letters, inbound journal and dedupe keys, leases, idempotency keys) lives
//! in SQLite at `<state_dir>/bncr/bncr.sqlite3`; files live under
//! `<state_dir>/bncr/files/`.
//!
//! All state belongs to one generation: the plugin instance owns a bridge
//! whose store sits in a [`plugin_api::ScopeHandle`], and whose drain loop is
//! spawned with [`plugin_api::ScopeLife::spawn`]. Nothing is process-global.
//!
//! Outbound targets are `Bncr:<platform>:<groupId>:<userId>`; the `Bncr:`
//! prefix is optional (any case) and `userId` keeps further colons. The
//! account is the message object's `accountId`, else the account that last
//! received a message from that route, else `Primary`.

mod bridge;
mod config;
mod files;
mod params;
mod store;

pub use config::{Config, EchoConfig, Policy, schema as config_schema};

use bridge::{Bridge, MESSAGE_TYPES, Route};
use plugin_api::{
    BoxFuture, Channel, OutboundMessage, Params, Plugin, PluginContext, PluginError, PluginFactory,
    Registrar, RequestContext, RpcError, SendReceipt, Service, Value, scope,
};
use serde::Deserialize;
use std::future::Future;
use std::sync::Arc;

/// The plugin id.
pub const PLUGIN_ID: &str = "bncr";

/// Every method the plugin declares, in declaration order.
pub const METHODS: &[&str] = &[
    "bncr.connect",
    "bncr.inbound",
    "bncr.activity",
    "bncr.ack",
    "bncr.diagnostics",
    "bncr.file.init",
    "bncr.file.chunk",
    "bncr.file.complete",
    "bncr.file.abort",
    "bncr.file.ack",
    "bncr.deadLetter.inspect",
    "bncr.deadLetter.prune",
];

/// Every event the plugin declares.
pub const EVENTS: &[&str] = &[
    "plugin.bncr.push",
    "plugin.bncr.file.init",
    "plugin.bncr.file.chunk",
    "plugin.bncr.file.complete",
    "plugin.bncr.file.abort",
    "chat.inbound",
];

/// The factory the host registers: id `bncr`, enabled by default, with the
/// config schema of [`config_schema`].
///
/// The factory outlives generations: it keeps which store files are open,
/// so a generation's store opens only once the previous one closed.
pub fn factory() -> PluginFactory {
    let gate = store::OpenGate::default();
    PluginFactory::new(
        PLUGIN_ID,
        env!("CARGO_PKG_VERSION"),
        move |ctx: PluginContext| {
            let plugin = BncrPlugin::new(ctx, gate.clone())?;
            Ok(Arc::new(plugin) as Arc<dyn Plugin>)
        },
    )
    .with_name("Bncr bridge")
    .with_schema(config::schema())
}

/// One generation's plugin instance.
#[derive(Debug)]
struct BncrPlugin {
    bridge: Arc<Bridge>,
}

impl BncrPlugin {
    fn new(ctx: PluginContext, gate: store::OpenGate) -> Result<Self, PluginError> {
        let cfg = Config::from_value(&ctx.config)
            .map_err(|e| PluginError::new(format!("bncr config: {e}")))?;
        let root = ctx.state_dir.join("bncr");
        Ok(BncrPlugin {
            bridge: Arc::new(Bridge::new(
                cfg,
                root,
                ctx.events,
                ctx.life,
                env!("CARGO_PKG_VERSION"),
                gate,
            )),
        })
    }
}

/// Who calls a method: a Bncr client (its connection is then known as a
/// client, never taken for an operator), an operator reading state, or an
/// admin changing it destructively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Client,
    Operator,
    Admin,
}

impl Caller {
    fn scope(self) -> &'static str {
        match self {
            Caller::Client | Caller::Operator => scope::WRITE,
            Caller::Admin => scope::ADMIN,
        }
    }
}

fn declare<P, F, Fut>(r: &mut Registrar, name: &str, caller: Caller, bridge: &Arc<Bridge>, f: F)
where
    P: for<'de> Deserialize<'de> + Send + 'static,
    F: Fn(Arc<Bridge>, RequestContext, P) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, RpcError>> + Send + 'static,
{
    let b = bridge.clone();
    let f = Arc::new(f);
    r.method(name)
        .scope(caller.scope())
        .handler(move |ctx, params: Params| {
            let (b, f) = (b.clone(), f.clone());
            if caller == Caller::Client {
                b.client_seen(ctx.conn_id());
            }
            async move { f(b, ctx, params.parse::<P>()?).await }
        });
}

fn declare_sync<P, F>(r: &mut Registrar, name: &str, caller: Caller, bridge: &Arc<Bridge>, f: F)
where
    P: for<'de> Deserialize<'de> + Send + 'static,
    F: Fn(&Bridge, &RequestContext, P) -> Result<Value, RpcError> + Send + Sync + 'static,
{
    let b = bridge.clone();
    r.method(name)
        .scope(caller.scope())
        .sync(move |ctx, params: Params| {
            if caller == Caller::Client {
                b.client_seen(ctx.conn_id());
            }
            f(&b, ctx, params.parse::<P>()?)
        });
}

impl Plugin for BncrPlugin {
    fn id(&self) -> &str {
        PLUGIN_ID
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn register(&self, r: &mut Registrar) {
        use Caller::{Admin, Client, Operator};
        let b = &self.bridge;
        declare(r, "bncr.connect", Client, b, |b, ctx, p| async move {
            b.connect(&ctx, p).await
        });
        declare(r, "bncr.inbound", Client, b, |b, ctx, p| async move {
            b.inbound(&ctx, p).await
        });
        declare_sync(r, "bncr.activity", Client, b, |b, ctx, p| {
            b.activity(ctx, p)
        });
        declare(r, "bncr.ack", Client, b, |b, _ctx, p| async move {
            b.ack(p).await
        });
        declare_sync(r, "bncr.diagnostics", Operator, b, |b, _ctx, p| {
            b.diagnostics(p)
        });
        declare(r, "bncr.file.init", Client, b, |b, _ctx, p| async move {
            b.file_init(p).await
        });
        declare(r, "bncr.file.chunk", Client, b, |b, _ctx, p| async move {
            b.file_chunk(p).await
        });
        declare(
            r,
            "bncr.file.complete",
            Client,
            b,
            |b, _ctx, p| async move { b.file_complete(p).await },
        );
        declare(r, "bncr.file.abort", Client, b, |b, _ctx, p| async move {
            b.file_abort(p).await
        });
        declare_sync(r, "bncr.file.ack", Client, b, |b, _ctx, p| b.file_ack(p));
        declare(
            r,
            "bncr.deadLetter.inspect",
            Operator,
            b,
            |b, _ctx, p| async move { b.dead_inspect(p).await },
        );
        // Destructive: admins only.
        declare(
            r,
            "bncr.deadLetter.prune",
            Admin,
            b,
            |b, _ctx, p| async move { b.dead_prune(p).await },
        );
        for e in EVENTS {
            r.event(*e);
        }
        r.service(Arc::new(StoreService { bridge: b.clone() }));
        r.channel(PLUGIN_ID, Arc::new(BncrChannel { bridge: b.clone() }));
        let hook = b.clone();
        r.on_connection_closed(move |conn| hook.connection_closed(conn));
        let hook = b.clone();
        r.on_connection_opened(move |info| hook.connection_opened(info));
        let health = b.clone();
        r.health_check(move || health.fault());
    }
}

/// `bncr-store`: opens the store, restores state and runs the drain loop.
#[derive(Debug)]
struct StoreService {
    bridge: Arc<Bridge>,
}

impl Service for StoreService {
    fn name(&self) -> &str {
        "bncr-store"
    }

    fn start(self: Arc<Self>) -> BoxFuture<Result<(), String>> {
        Box::pin(async move { self.bridge.start().await })
    }

    fn stop(self: Arc<Self>) -> BoxFuture<()> {
        Box::pin(async move { self.bridge.stop().await })
    }
}

/// The `bncr` channel behind the core `send` method.
#[derive(Debug)]
struct BncrChannel {
    bridge: Arc<Bridge>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OutgoingObject {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    msg: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    base64: Option<String>,
    #[serde(default)]
    file_name: Option<String>,
    #[serde(default)]
    mime_type: Option<String>,
    #[serde(default)]
    account_id: Option<String>,
}

impl Channel for BncrChannel {
    fn send(
        self: Arc<Self>,
        _ctx: RequestContext,
        m: OutboundMessage,
    ) -> BoxFuture<Result<SendReceipt, RpcError>> {
        Box::pin(async move {
            let route = Route::parse_target(&m.to).ok_or_else(|| {
                RpcError::invalid_request("to must be Bncr:<platform>:<groupId>:<userId>")
            })?;
            if m.idempotency_key.trim().is_empty() {
                return Err(RpcError::invalid_request("idempotencyKey required"));
            }
            let obj: OutgoingObject = match &m.message {
                Value::String(s) => OutgoingObject {
                    kind: None,
                    msg: Some(s.clone()),
                    path: None,
                    base64: None,
                    file_name: None,
                    mime_type: None,
                    account_id: None,
                },
                v @ Value::Object(_) => {
                    serde_json::from_value(v.clone()).map_err(RpcError::invalid_params)?
                }
                _ => {
                    return Err(RpcError::invalid_request(
                        "message must be a string or an object",
                    ));
                }
            };
            let kind = obj.kind.unwrap_or_else(|| "text".into());
            if !MESSAGE_TYPES.contains(&kind.as_str()) {
                return Err(RpcError::invalid_request(format!(
                    "message.type must be one of {}",
                    MESSAGE_TYPES.join("|")
                )));
            }
            let empty = |s: &Option<String>| s.as_deref().is_none_or(str::is_empty);
            if empty(&obj.msg) && empty(&obj.path) && empty(&obj.base64) {
                return Err(RpcError::invalid_request(
                    "message needs msg, path or base64",
                ));
            }
            let b = &self.bridge;
            let account = b
                .account_for_target(obj.account_id.as_deref(), &route)
                .await?;
            let mut payload = serde_json::json!({
                "platform": route.platform, "groupId": route.group_id, "userId": route.user_id,
                "type": kind, "msg": obj.msg.unwrap_or_default(),
            });
            for (k, v) in [
                ("path", obj.path),
                ("base64", obj.base64),
                ("fileName", obj.file_name),
                ("mimeType", obj.mime_type),
            ] {
                if let Some(v) = v {
                    payload[k] = Value::String(v);
                }
            }
            let (message_id, _fresh) = b
                .enqueue(&account, &route, payload, &m.idempotency_key)
                .await?;
            Ok(SendReceipt { message_id })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::RequiredScope;
    use plugin_api::host::NullTransport;

    #[test]
    fn factory_declares_the_contract_without_side_effects() {
        let f = factory();
        assert_eq!(
            (f.id.as_str(), f.name.as_str(), f.enabled_by_default),
            ("bncr", "Bncr bridge", true)
        );
        assert!(f.config_schema.is_some());
        let dir = std::env::temp_dir().join("bncr-register-purity-does-not-exist");
        let (life, _ctl) = plugin_api::host::scope_life(1);
        let ctx = PluginContext {
            plugin_id: "bncr".into(),
            config: serde_json::json!({}),
            state_dir: dir.clone(),
            events: plugin_api::host::event_sink("bncr", life.clone(), Arc::new(NullTransport)).0,
            life,
        };
        let plugin = (f.create)(ctx).unwrap();
        let mut r = plugin_api::host::registrar("bncr");
        plugin.register(&mut r);
        let d = plugin_api::host::declarations(r);
        let names: Vec<&str> = d.methods.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, METHODS);
        for m in &d.methods {
            let want = if m.name == "bncr.deadLetter.prune" {
                scope::ADMIN
            } else {
                scope::WRITE
            };
            assert_eq!(m.scope, RequiredScope::Scope(want.into()), "{}", m.name);
        }
        assert_eq!((d.connection_opened.len(), d.health.len()), (1, 1));
        assert_eq!(d.events, EVENTS);
        assert_eq!(d.services.len(), 1);
        assert_eq!(d.channels.len(), 1);
        assert_eq!(d.connection_closed.len(), 1);
        assert!(!dir.exists(), "register did no I/O");
        let bad = PluginContext {
            config: serde_json::json!({"window": 0}),
            ..ctx_clone_for_error()
        };
        assert!((f.create)(bad).is_err());
    }

    fn ctx_clone_for_error() -> PluginContext {
        let (life, _ctl) = plugin_api::host::scope_life(2);
        PluginContext {
            plugin_id: "bncr".into(),
            config: serde_json::json!({}),
            state_dir: std::env::temp_dir(),
            events: plugin_api::host::event_sink("bncr", life.clone(), Arc::new(NullTransport)).0,
            life,
        }
    }
}
