//! The core plugin present in every generation: `health`, `status`,
//! `gateway.restart` and `send`.

use crate::report::{GatewayStats, RestartOutcome, RestartRecord, unix_ms};
use crate::scope::{PluginPhase, RestartScope, ScopeSlot};
use futures::future::BoxFuture;
use plugin_api::{
    OutboundMessage, Params, Plugin, PluginContext, PluginFactory, Registrar, RequestContext,
    RpcError, scope,
};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::{Arc, OnceLock, Weak};

/// The core plugin's id.
pub const CORE_PLUGIN_ID: &str = "core";

/// Events the host emits itself; advertised through the core plugin.
pub const CORE_EVENTS: &[&str] = &[
    "connect.challenge",
    "gateway.generation",
    "shutdown",
    "tick",
];

/// The core method that restarts the gateway. It runs outside admission: the
/// generation that admitted it is drained and stopped while it waits.
pub(crate) const RESTART_METHOD: &str = "gateway.restart";

/// What the core plugin needs of the gateway, and nothing more.
pub(crate) trait GatewayControl: Send + Sync {
    /// Restart the gateway, `trigger` recorded in the restart history.
    fn restart(self: Arc<Self>, trigger: &'static str) -> BoxFuture<'static, RestartOutcome>;
    /// Counters for `status`.
    fn stats(&self) -> GatewayStats;
    /// The recent restarts, newest first.
    fn restart_history(&self) -> Vec<RestartRecord>;
    /// Open client connections.
    fn connection_count(&self) -> usize;
}

/// Lets the core plugin reach the gateway without keeping it alive; set once
/// the gateway exists.
pub(crate) type ControlLink = Arc<OnceLock<Weak<dyn GatewayControl>>>;

pub(crate) fn factory(link: ControlLink, slot: ScopeSlot) -> PluginFactory {
    PluginFactory::new(
        CORE_PLUGIN_ID,
        env!("CARGO_PKG_VERSION"),
        move |_ctx: PluginContext| {
            Ok(Arc::new(CorePlugin {
                link: link.clone(),
                slot: slot.clone(),
            }))
        },
    )
    .with_name("Gateway core")
}

struct CorePlugin {
    link: ControlLink,
    slot: ScopeSlot,
}

impl CorePlugin {
    fn gateway(&self) -> Result<Arc<dyn GatewayControl>, RpcError> {
        self.link
            .get()
            .and_then(Weak::upgrade)
            .ok_or_else(|| RpcError::unavailable("gateway is stopping"))
    }

    /// The generation this plugin instance belongs to.
    fn scope(&self) -> Result<Arc<RestartScope>, RpcError> {
        self.slot
            .get()
            .and_then(std::sync::Weak::upgrade)
            .ok_or_else(RpcError::restarting)
    }
}

impl Plugin for CorePlugin {
    fn id(&self) -> &str {
        CORE_PLUGIN_ID
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn register(&self, r: &mut Registrar) {
        for e in CORE_EVENTS {
            r.event(*e);
        }
        let slot = self.slot.clone();
        r.method("health").no_scope().sync(move |_, _| {
            let scope = slot
                .get()
                .and_then(std::sync::Weak::upgrade)
                .ok_or_else(RpcError::restarting)?;
            Ok(health(&scope))
        });
        let me = self.clone_handle();
        r.method("status").scope(scope::READ).sync(move |_, _| {
            let (gw, scope) = (me.gateway()?, me.scope()?);
            Ok(status(&*gw, &scope))
        });
        let me = self.clone_handle();
        r.method(RESTART_METHOD)
            .scope(scope::ADMIN)
            .handler(move |_, _| {
                let gw = me.gateway();
                async move {
                    match gw?.restart(RESTART_METHOD).await {
                        Ok(rep) => Ok(json!({
                            "ok": true,
                            "generation": rep.generation,
                            "previousGeneration": rep.previous,
                            "durationMs": rep.duration.as_millis() as u64,
                            "methodsAdded": rep.methods_added,
                            "methodsRemoved": rep.methods_removed,
                            "failedPlugins": rep.failed_plugins.iter().map(|(id, e)| json!({"id": id, "error": e})).collect::<Vec<_>>(),
                            "pendingProcessSettings": rep.pending_process_settings,
                        })),
                        Err(f) => Err(RpcError::unavailable(f.to_string()).with_details(json!({
                            "code": "RESTART_FAILED",
                            "generation": f.serving,
                            "error": f.error,
                        }))),
                    }
                }
            });
        let me = self.clone_handle();
        r.method("send")
            .scope(scope::WRITE)
            .handler(move |ctx, params| {
                let scope = me.scope();
                async move { send(scope?, ctx, params).await }
            });
    }
}

impl CorePlugin {
    fn clone_handle(&self) -> Arc<CorePlugin> {
        Arc::new(CorePlugin {
            link: self.link.clone(),
            slot: self.slot.clone(),
        })
    }
}

fn health(scope: &RestartScope) -> Value {
    let (loaded, failed, unavailable) = scope.plugin_health();
    let errors: Vec<Value> = failed
        .into_iter()
        .map(|(id, e)| json!({"id": id, "error": e}))
        .collect();
    let degraded: Vec<Value> = scope
        .plugin_degraded()
        .into_iter()
        .map(|(id, reason)| json!({"id": id, "reason": reason}))
        .collect();
    // Runtime plugins only, so a gateway without any pays nothing here.
    let processes: Vec<Value> = scope
        .loader()
        .plugins()
        .iter()
        .filter_map(|p| {
            let rt = p.runtime.as_ref()?;
            let s = rt.status();
            Some(json!({
                "id": p.id, "kind": p.kind.as_str(), "codeHash": p.code_hash,
                "state": s.state.as_str(), "pid": s.pid, "restarts": s.restarts, "lastExit": s.last_exit,
            }))
        })
        .collect();
    json!({
        "ok": errors.is_empty() && degraded.is_empty(),
        "ts": unix_ms(),
        "generation": scope.generation(),
        "plugins": {"loaded": loaded, "errors": errors, "unavailable": unavailable, "degraded": degraded, "processes": processes},
    })
}

fn status(gw: &dyn GatewayControl, scope: &RestartScope) -> Value {
    let stats = gw.stats();
    let phases = scope.plugin_phases();
    let plugins: Vec<Value> = scope
        .loader()
        .plugins()
        .iter()
        .zip(phases)
        .map(|(p, (_, phase))| {
            let process = p.runtime.as_ref().map(|rt| rt.status());
            let (state, error) = match (phase, &process) {
                (PluginPhase::Starting, _) => ("starting", None),
                (PluginPhase::Running, Some(s)) => (s.state.as_str(), None),
                (PluginPhase::Running, None) => ("running", None),
                (PluginPhase::Failed(e), _) => ("failed", Some(e)),
                (PluginPhase::Stopped, _) => ("stopped", None),
            };
            json!({
                "id": p.id, "name": p.name, "version": p.version, "kind": p.kind.as_str(),
                "codeHash": p.code_hash, "source": p.source.to_string(), "state": state, "error": error,
                "pid": process.as_ref().and_then(|s| s.pid),
                "restarts": process.as_ref().map_or(0, |s| s.restarts),
                "lastExit": process.as_ref().and_then(|s| s.last_exit.clone()),
            })
        })
        .collect();
    let history: Vec<Value> = gw.restart_history().iter().map(restart_record).collect();
    let features = scope.features();
    json!({
        "generation": scope.generation(),
        "uptimeMs": stats.uptime.as_millis() as u64,
        "restartCount": stats.restarts_ok,
        "restartsFailed": stats.restarts_failed,
        "lastRestart": history.first(),
        "restartHistory": history,
        "plugins": plugins,
        "disabledPlugins": scope.loader().disabled,
        "methods": &*features.methods,
        "methodCount": features.methods.len(),
        "methodScopes": method_scopes(scope),
        "events": &*features.events,
        "channels": scope.registry().channel_ids(),
        "connections": gw.connection_count(),
        "inFlight": stats.in_flight,
        "liveScopes": stats.live_scopes,
    })
}

/// Every advertised method and the scope it needs (`null`: none).
fn method_scopes(scope: &RestartScope) -> serde_json::Map<String, Value> {
    let registry = scope.registry();
    scope
        .features()
        .methods
        .iter()
        .filter_map(|m| {
            let entry = registry.get(m)?;
            Some((m.clone(), json!(entry.spec.scope.as_str())))
        })
        .collect()
}

/// One restart record as `status` shows it (`lastRestart` and each entry of
/// `restartHistory`).
fn restart_record(r: &RestartRecord) -> Value {
    let ms = |d: std::time::Duration| d.as_millis() as u64;
    json!({
        "ok": r.ok,
        "generation": r.generation,
        "trigger": r.trigger,
        "at": r.at_ms,
        "atMs": r.at_ms,
        "durationMs": r.duration_ms,
        "phasesMs": {
            "build": ms(r.phases.build),
            "handover": ms(r.phases.handover),
            "stopOld": ms(r.phases.stop_old),
            "startNew": ms(r.phases.start_new),
        },
        "methodsAdded": r.methods_added,
        "methodsRemoved": r.methods_removed,
        "pluginsChanged": r.plugins_changed,
        "error": r.error,
        "pendingProcessSettings": r.pending_process_settings,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SendParams {
    channel: String,
    to: String,
    message: Value,
    idempotency_key: String,
}

async fn send(
    scope: Arc<RestartScope>,
    ctx: RequestContext,
    params: Params,
) -> Result<Value, RpcError> {
    let p: SendParams = params.parse()?;
    if p.channel.is_empty() || p.to.is_empty() || p.idempotency_key.is_empty() {
        return Err(RpcError::invalid_params(
            "channel, to and idempotencyKey must be non-empty",
        ));
    }
    let Some(entry) = scope.registry().channel(&p.channel) else {
        return Err(
            RpcError::invalid_request(format!("unknown channel: {}", p.channel)).with_details(
                json!({"code": "UNKNOWN_CHANNEL", "channels": scope.registry().channel_ids()}),
            ),
        );
    };
    // Counted in the channel's plugin too: its hand-over waits for this
    // send, and its drain deadline cancels it like one of its own requests.
    let using = scope
        .use_plugin(entry.owner)
        .ok_or_else(|| scope.cancel_error())?;
    let channel = entry.channel.clone();
    let message = OutboundMessage {
        to: p.to,
        message: p.message,
        idempotency_key: p.idempotency_key,
    };
    let run = async {
        scope.ready(entry.owner, &p.channel).await?;
        channel.send(ctx, message).await
    };
    // The channel first, as `invoke` polls a handler before its
    // cancellation: an answer at the very instant of the deadline stands.
    let receipt = tokio::select! {
        biased;
        r = run => r?,
        () = using.cancelled() => return Err(scope.answer_cancelled()),
    };
    Ok(json!({"ok": true, "channel": p.channel, "messageId": receipt.message_id}))
}
