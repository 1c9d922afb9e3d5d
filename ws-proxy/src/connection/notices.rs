//! The `gateway.generation` payload, built once per generation.

use gateway_core::Gateway;
use serde_json::value::RawValue;
use std::sync::{Arc, Mutex};

/// The `gateway.generation` payload of the generation serving now
/// (`{"generation":N,"features":{..}}`), built once per generation and
/// shared by every connection.
pub(crate) struct GenerationNotices {
    gateway: Gateway,
    latest: Mutex<Option<(u64, Arc<RawValue>)>>,
}

impl std::fmt::Debug for GenerationNotices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerationNotices").finish_non_exhaustive()
    }
}

impl GenerationNotices {
    pub(crate) fn new(gateway: Gateway) -> GenerationNotices {
        GenerationNotices {
            gateway,
            latest: Mutex::new(None),
        }
    }

    /// The current generation and its payload. Never older than a
    /// generation that admitted a request before this call.
    pub(crate) fn current(&self) -> (u64, Arc<RawValue>) {
        let scope = self.gateway.current();
        let generation = scope.generation();
        let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((g, p)) = latest.as_ref()
            && *g == generation
        {
            return (*g, p.clone());
        }
        let payload = serde_json::json!({"generation": generation, "features": scope.features()});
        let payload: Arc<RawValue> = serde_json::value::to_raw_value(&payload)
            .map(Arc::from)
            .unwrap_or_else(|_| Arc::from(RawValue::NULL.to_owned()));
        *latest = Some((generation, payload.clone()));
        (generation, payload)
    }
}
