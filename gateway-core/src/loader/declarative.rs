//! The plugin that serves a manifest's methods with built-in handlers
//! (`reply`, `echo`, `sleep`, `error`, `panic`).

use super::{Manifest, ManifestHandler};
use plugin_api::{Params, Plugin, Registrar, RpcError};
use rustc_hash::FxHashMap;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// Serves the methods a manifest declares, with built-in implementations.
pub(super) struct DeclarativePlugin {
    manifest: Arc<Manifest>,
    replies: FxHashMap<String, Value>,
}

impl DeclarativePlugin {
    pub(super) fn new(manifest: Arc<Manifest>, config: &Value) -> Self {
        let replies = config
            .get("replies")
            .and_then(Value::as_object)
            .map(|o| o.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        DeclarativePlugin { manifest, replies }
    }
}

impl Plugin for DeclarativePlugin {
    fn id(&self) -> &str {
        &self.manifest.id
    }

    fn version(&self) -> &str {
        &self.manifest.version
    }

    fn register(&self, r: &mut Registrar) {
        for e in &self.manifest.events {
            r.event(e.clone());
        }
        for m in &self.manifest.methods {
            let b = crate::registry::declare_method(r, &m.name, m.scope.as_deref(), m.advertise);
            let name = m.name.clone();
            let reply = self
                .replies
                .get(&m.name)
                .cloned()
                .or_else(|| m.reply.clone())
                .unwrap_or_else(|| serde_json::json!({ "ok": true, "method": name }));
            match m.handler {
                ManifestHandler::Reply => b.sync(move |_, _| Ok(reply.clone())),
                ManifestHandler::Echo => b.sync(|_, p: Params| Ok(p.to_value())),
                ManifestHandler::Error => {
                    let text = reply
                        .as_str()
                        .map_or_else(|| reply.to_string(), str::to_string);
                    b.sync(move |_, _| Err(RpcError::unavailable(text.clone())))
                }
                ManifestHandler::Panic => b.sync(move |_, _| panic!("{name} panicked on purpose")),
                ManifestHandler::Sleep => {
                    let default_ms = m.ms.unwrap_or(100);
                    b.handler(move |_, p: Params| async move {
                        let ms = p
                            .to_value()
                            .get("ms")
                            .and_then(Value::as_u64)
                            .unwrap_or(default_ms);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        Ok(serde_json::json!({ "slept": ms }))
                    })
                }
            }
        }
    }
}
