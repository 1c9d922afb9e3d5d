//! How a plugin ends: the stop sequence (services, `shutdown`, stdin
//! closed, SIGTERM, SIGKILL to the group), and the kill when it is dropped.

use crate::{ProcessState, RuntimePlugin, lock};
use plugin_protocol::method;
use tracing::{info, warn};

impl RuntimePlugin {
    /// End the plugin for good: stop its services (if started), then
    /// `shutdown`, stdin closed, SIGTERM, SIGKILL to the process group, with
    /// the configured graces. Returns how the process ended.
    pub async fn stop(&self) -> Option<String> {
        let inner = &self.inner;
        inner.stop.cancel();
        let services = std::mem::take(&mut lock(&inner.state).services_started);
        // Under the `current` lock, as `install` checks `stop`: a respawn
        // either installed its process before this (and it is stopped
        // here) or sees the stop and kills it.
        let proc = {
            let cur = lock(&inner.current);
            match cur.clone() {
                Some(p) => p,
                None => {
                    lock(&inner.state).state = ProcessState::Stopped;
                    return None;
                }
            }
        };
        let limits = &inner.spec.limits;
        if services
            && let Err(f) = proc
                .request(method::STOP, &serde_json::json!({}), limits.service_timeout)
                .await
        {
            let e = inner.failure_error("stop", f);
            warn!(plugin = %inner.spec.plugin_id, generation = inner.spec.generation, error = %e.message, "plugin services did not stop cleanly");
        }
        let ended = proc.shutdown(limits.stop_grace, limits.term_grace).await;
        lock(&inner.current).take();
        let mut st = lock(&inner.state);
        st.state = ProcessState::Stopped;
        st.pid = None;
        st.last_exit = Some(ended.describe());
        info!(plugin = %inner.spec.plugin_id, generation = inner.spec.generation, pid = proc.pid(), exit = %ended.describe(), "plugin process stopped");
        Some(ended.describe())
    }
}

impl Drop for RuntimePlugin {
    fn drop(&mut self) {
        self.inner.stop.cancel();
        if let Some(p) = lock(&self.inner.current).take() {
            p.kill_now();
        }
    }
}
