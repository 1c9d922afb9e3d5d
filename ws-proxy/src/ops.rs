//! The `ops` plugin: OpenClaw's generic gateway methods that need what the
//! server process owns (its connections, settings and log ring), plus
//! `gateway.validate`.
//!
//! - `system-presence` (read): the connected clients as OpenClaw presence
//!   entries, the gateway itself first.
//! - `config.get` (read, as in OpenClaw): the effective configuration with
//!   every secret redacted, the config file's path, whether it exists, its
//!   content hash.
//! - `logs.tail` (admin): recent log lines from the in-memory ring, with a
//!   cursor; the answer is bounded by `limit` and `maxBytes`.
//! - `gateway.validate` (admin): build a generation from the current config
//!   and discard it; report what it would serve or why it cannot be built.
//!
//! The factory captures a weak link to the server, set once the server
//! exists: connections and logs belong to the process, not to a
//! generation, so every generation's instance reads the same ones.

use crate::server::{Shared, unix_ms};
use plugin_api::{Params, Plugin, PluginContext, PluginFactory, Registrar, RpcError, scope};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock, Weak};

/// The plugin's id.
pub(crate) const OPS_PLUGIN_ID: &str = "ops";
/// Most presence entries one answer lists.
pub(crate) const MAX_PRESENCE: usize = 1000;
/// Default and largest `limit` of `logs.tail`.
pub(crate) const LOGS_DEFAULT_LIMIT: usize = 200;
/// Largest `limit` of `logs.tail`.
pub(crate) const LOGS_MAX_LIMIT: usize = 1000;
/// Default and largest `maxBytes` of `logs.tail`.
pub(crate) const LOGS_DEFAULT_BYTES: usize = 256 * 1024;
/// Largest `maxBytes` of `logs.tail`.
pub(crate) const LOGS_MAX_BYTES: usize = 1024 * 1024;
/// What replaces a secret in `config.get`.
pub(crate) const REDACTED: &str = "__REDACTED__";

/// Set once the server exists; weak so the plugin never keeps it alive.
pub(crate) type ServerLink = Arc<OnceLock<Weak<Shared>>>;

pub(crate) fn factory(link: ServerLink) -> PluginFactory {
    PluginFactory::new(
        OPS_PLUGIN_ID,
        env!("CARGO_PKG_VERSION"),
        move |_ctx: PluginContext| Ok(Arc::new(Ops { link: link.clone() })),
    )
    .with_name("Gateway operations")
}

#[derive(Clone)]
struct Ops {
    link: ServerLink,
}

impl Ops {
    fn server(&self) -> Result<Arc<Shared>, RpcError> {
        self.link
            .get()
            .and_then(Weak::upgrade)
            .ok_or_else(|| RpcError::unavailable("gateway is stopping"))
    }
}

impl Plugin for Ops {
    fn id(&self) -> &str {
        OPS_PLUGIN_ID
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn register(&self, r: &mut Registrar) {
        let me = self.clone();
        r.method("system-presence")
            .scope(scope::READ)
            .sync(move |_, _| {
                let s = me.server()?;
                Ok(presence(&s))
            });
        let me = self.clone();
        // Read, as in OpenClaw (every secret is redacted): `openclaw gateway
        // probe` reads it holding only operator.read.
        r.method("config.get").scope(scope::READ).sync(move |_, _| {
            let s = me.server()?;
            Ok(config_get(&s))
        });
        let me = self.clone();
        r.method("logs.tail")
            .scope(scope::ADMIN)
            .sync(move |_, params| {
                let s = me.server()?;
                logs_tail(&s, params)
            });
        let me = self.clone();
        r.method("gateway.validate")
            .scope(scope::ADMIN)
            .handler(move |_, _| {
                let server = me.server();
                async move {
                    let server = server?;
                    tokio::task::spawn_blocking(move || validate(&server))
                        .await
                        .map_err(|e| RpcError::unavailable(format!("validation failed: {e}")))
                }
            });
    }
}

/// `system-presence`: the gateway itself, then every authenticated
/// connection, oldest first.
fn presence(s: &Shared) -> Value {
    let now = unix_ms();
    let host = hostname();
    let mut entries = vec![json!({
        "host": host,
        "version": env!("CARGO_PKG_VERSION"),
        "platform": std::env::consts::OS,
        "mode": "gateway",
        "reason": "self",
        "text": format!("Gateway: {host} · generation {}", s.gateway.current().generation()),
        "ts": now,
    })];
    let mut conns = s.table.presence();
    conns.sort_by_key(|c| (c.connected_at_ms, c.info.conn_id.0));
    for c in conns.into_iter().take(MAX_PRESENCE) {
        let client = &c.info.client;
        let role = match c.info.role {
            plugin_api::Role::Operator => "operator",
            plugin_api::Role::Node => "node",
        };
        let mut e = json!({
            "clientId": client.id,
            "mode": client.mode,
            "version": client.version,
            "platform": client.platform,
            "role": role,
            "roles": [role],
            "scopes": c.info.scopes.as_slice(),
            "connId": c.info.conn_id.to_string(),
            "connectedAtMs": c.connected_at_ms,
            "lastActivityAtMs": c.last_activity_ms,
            "lastInputSeconds": now.saturating_sub(c.last_activity_ms) / 1000,
            "reason": "connect",
            "text": format!("{} {} ({})", client.id, client.version, client.mode),
            "ts": c.last_activity_ms,
        });
        if let Some(name) = &client.display_name {
            e["displayName"] = json!(name);
        }
        if let Some(id) = &client.instance_id {
            e["instanceId"] = json!(id);
        }
        entries.push(e);
    }
    Value::Array(entries)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// `config.get`: the file as written (secrets redacted), the settings in
/// effect, and where they came from.
fn config_get(s: &Shared) -> Value {
    let secret = s.settings.auth.secret.as_deref();
    let path = s.settings.source.file();
    let mut issues = Vec::new();
    let (exists, hash, file) = match path {
        None => (false, None, Value::Null),
        Some(p) => match std::fs::read(p) {
            Err(_) => (false, None, Value::Null),
            Ok(bytes) => {
                use sha2::Digest;
                let hash = hex::encode(sha2::Sha256::digest(&bytes));
                let text = String::from_utf8_lossy(&bytes);
                let parsed = match toml::from_str::<toml::Value>(&text) {
                    Ok(v) => serde_json::to_value(v).unwrap_or(Value::Null),
                    Err(e) => {
                        issues.push(json!({"path": "", "message": e.message()}));
                        Value::Null
                    }
                };
                (
                    true,
                    Some(hash),
                    redact_plugin_entries(redact(parsed, secret)),
                )
            }
        },
    };
    // What the next restart would read for plugins and restart timings.
    let (plugins, restart) = match gateway_core::ConfigSource::load(&s.settings.source) {
        Ok(c) => (plugins_json(&c.plugins, secret), restart_json(&c.restart)),
        Err(e) => {
            issues.push(
                json!({"path": e.field.clone().unwrap_or_default(), "message": e.to_string()}),
            );
            (Value::Null, Value::Null)
        }
    };
    let st = &s.settings;
    let auth_mode = match st.auth.mode {
        crate::AuthMode::Token => "token",
        crate::AuthMode::Password => "password",
        crate::AuthMode::None => "none",
    };
    let l = &st.limits;
    let configured = |m| st.auth.mode == m && st.auth.secret.is_some();
    json!({
        "path": path,
        "exists": exists,
        "valid": issues.is_empty(),
        "hash": hash,
        "issues": issues,
        "legacyIssues": [],
        "file": file,
        "config": {
            "gateway": {
                "mode": "local",
                "bind": if st.bind.is_loopback() { "loopback".to_string() } else { st.bind.to_string() },
                "port": s.local_port,
                "auth": {
                    "mode": auth_mode,
                    "token": configured(crate::AuthMode::Token).then_some(REDACTED),
                    "password": configured(crate::AuthMode::Password).then_some(REDACTED),
                },
                "controlUi": {"enabled": true, "basePath": "/"},
            },
            "server": {
                "bind": st.bind.to_string(),
                "port": s.local_port,
                "stateDir": st.state_dir,
            },
            "auth": {
                "mode": auth_mode,
                "secretConfigured": st.auth.secret.is_some(),
                "tokenOrigin": st.auth.origin.describe(),
                "maxFailuresPerMinute": st.auth.max_failures_per_minute,
            },
            "limits": {
                "maxPayload": l.max_payload,
                "maxBufferedBytes": l.max_buffered_bytes,
                "tickIntervalMs": l.tick_interval_ms,
                "handshakeTimeoutMs": l.handshake_timeout_ms,
                "maxInFlight": l.max_in_flight,
                "pingIntervalMs": l.ping_interval_ms,
                "shutdownDrainMs": l.shutdown_drain_ms,
            },
            "logging": {
                "format": match st.log_format { crate::LogFormat::Text => "text", crate::LogFormat::Json => "json" },
                "level": st.log_level,
            },
            "plugins": plugins,
            "restart": restart,
        },
    })
}

fn plugins_json(p: &gateway_core::PluginsConfig, secret: Option<&str>) -> Value {
    let entries: Map<String, Value> = p
        .entries
        .iter()
        .map(|(id, e)| {
            (
                id.clone(),
                json!({"enabled": e.enabled, "config": redact_strings(redact(e.config.clone().unwrap_or(Value::Null), secret))}),
            )
        })
        .collect();
    json!({"dirs": p.dirs, "entries": entries})
}

fn restart_json(r: &gateway_core::RestartConfig) -> Value {
    json!({
        "drainTimeoutMs": r.drain_timeout_ms,
        "serviceStopTimeoutMs": r.service_stop_timeout_ms,
        "serviceStartTimeoutMs": r.service_start_timeout_ms,
        "startWaitMs": r.start_wait_ms,
        "connections": match r.connections {
            gateway_core::RestartConnections::Keep => "keep",
            gateway_core::RestartConnections::Close => "close",
        },
        "signals": r.signals,
    })
}

/// Whether a key names a secret (`token`, `auth_password`, `apiKey`, ...).
fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase().replace(['_', '-'], "");
    [
        "token",
        "password",
        "passwd",
        "secret",
        "apikey",
        "privatekey",
        "accesskey",
        "credential",
        "cookie",
        "signature",
    ]
    .iter()
    .any(|s| k.contains(s))
}

/// Replace every value under a secret-looking key, and every string equal
/// to the gateway's own secret wherever it appears.
fn redact(v: Value, secret: Option<&str>) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| {
                    let v = if is_secret_key(&k) && !matches!(v, Value::Null | Value::Bool(_)) {
                        match v {
                            Value::Object(_) | Value::Array(_) => redact(v, secret),
                            _ => Value::String(REDACTED.into()),
                        }
                    } else {
                        redact(v, secret)
                    };
                    (k, v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(|v| redact(v, secret)).collect()),
        Value::String(s) if secret.is_some_and(|x| !x.is_empty() && s.contains(x)) => {
            Value::String(REDACTED.into())
        }
        other => other,
    }
}

/// Replace every string, at any depth, with the redaction marker (keys,
/// numbers and booleans are kept).
fn redact_strings(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            Value::Object(m.into_iter().map(|(k, v)| (k, redact_strings(v))).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(redact_strings).collect()),
        Value::String(_) => Value::String(REDACTED.into()),
        other => other,
    }
}

/// Replace every value, at any depth, with the redaction marker (keys kept).
fn redact_values(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            Value::Object(m.into_iter().map(|(k, v)| (k, redact_values(v))).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(redact_values).collect()),
        Value::Null => Value::Null,
        _ => Value::String(REDACTED.into()),
    }
}

/// A plugin entry's `env` passes credentials to the plugin's process and its
/// `config` may hold them under any name: every value under
/// `plugins.entries.*.env` and every string under `plugins.entries.*.config`
/// is redacted, whatever its key is called.
fn redact_plugin_entries(mut file: Value) -> Value {
    if let Some(entries) = file
        .get_mut("plugins")
        .and_then(|p| p.get_mut("entries"))
        .and_then(Value::as_object_mut)
    {
        for entry in entries.values_mut() {
            let Some(entry) = entry.as_object_mut() else {
                continue;
            };
            if let Some(env) = entry.get_mut("env") {
                *env = redact_values(env.take());
            }
            if let Some(config) = entry.get_mut("config") {
                *config = redact_strings(config.take());
            }
        }
    }
    file
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TailParams {
    cursor: Option<u64>,
    limit: Option<usize>,
    max_bytes: Option<usize>,
}

/// `logs.tail`: lines after `cursor`, newest kept when the limits bite.
fn logs_tail(_s: &Shared, params: Params) -> Result<Value, RpcError> {
    let p: TailParams = params.parse()?;
    let limit = p
        .limit
        .unwrap_or(LOGS_DEFAULT_LIMIT)
        .clamp(1, LOGS_MAX_LIMIT);
    let max_bytes = p
        .max_bytes
        .unwrap_or(LOGS_DEFAULT_BYTES)
        .clamp(1, LOGS_MAX_BYTES);
    let tail = crate::logs::ring().tail(p.cursor, limit, max_bytes);
    let lines: Vec<String> = tail
        .lines
        .iter()
        .map(|l| format!("{} {} {}: {}", l.ts, l.level, l.target, l.message))
        .collect();
    Ok(json!({
        "file": null,
        "cursor": tail.cursor,
        "size": tail.cursor,
        "lines": lines,
        "entries": tail.lines,
        "truncated": tail.truncated,
        "reset": tail.reset,
        "limit": limit,
        "maxBytes": max_bytes,
    }))
}

/// `gateway.validate`: build from the current config and discard.
fn validate(s: &Shared) -> Value {
    let serving: BTreeSet<String> = s
        .gateway
        .current()
        .registry()
        .method_names()
        .into_iter()
        .map(str::to_string)
        .collect();
    match s.gateway.validate() {
        Ok(methods) => {
            let would: BTreeSet<String> = methods.into_iter().collect();
            json!({
                "ok": true,
                "generation": s.gateway.current().generation(),
                "methodCount": would.len(),
                "methods": would,
                "methodsAdded": would.difference(&serving).collect::<Vec<_>>(),
                "methodsRemoved": serving.difference(&would).collect::<Vec<_>>(),
            })
        }
        Err(e) => json!({
            "ok": false,
            "generation": s.gateway.current().generation(),
            "error": e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_by_key_and_by_value() {
        let v = json!({
            "auth": {"token": "abc", "mode": "token", "allow_remote_none": false},
            "plugins": {"entries": {"x": {"config": {"apiKey": 5, "nested": ["the-secret-x"], "url": "u"}}}},
            "server": {"port": 1},
        });
        let r = redact(v, Some("the-secret"));
        assert_eq!(r["auth"]["token"], REDACTED);
        assert_eq!(r["auth"]["mode"], "token");
        assert_eq!(r["auth"]["allow_remote_none"], false);
        let cfg = &r["plugins"]["entries"]["x"]["config"];
        assert_eq!(cfg["apiKey"], REDACTED);
        assert_eq!(cfg["nested"][0], REDACTED);
        assert_eq!(cfg["url"], "u");
        assert_eq!(r["server"]["port"], 1);
        assert!(!r.to_string().contains("abc"));
    }
}
