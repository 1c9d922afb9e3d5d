//! Each plugin's phase and health in a generation, as `health`, `status`
//! and the next restart read them: the lock-free phase first, a runtime
//! plugin's process state, and the plugins' own health checks.

use super::{PHASE_FAILED, PHASE_RUNNING, PluginPhase, RestartScope};
use std::sync::atomic::Ordering;

impl RestartScope {
    /// Each plugin's id and phase, in load order.
    pub fn plugin_phases(&self) -> Vec<(&str, PluginPhase)> {
        self.loader
            .plugins()
            .iter()
            .zip(&self.plugins)
            .map(|(p, rt)| {
                let phase = rt.phase.borrow().clone();
                // A runtime plugin whose process was given up on (too many
                // crashes) is failed, whatever its services did.
                let process = p.runtime.as_ref().map(|r| r.status().state);
                match (phase, process) {
                    (PluginPhase::Running, Some(plugin_host::ProcessState::Failed(e))) => {
                        (p.id.as_str(), PluginPhase::Failed(e))
                    }
                    (phase, _) => (p.id.as_str(), phase),
                }
            })
            .collect()
    }

    /// Plugins that serve in this generation: loaded, not failed, and (for
    /// runtime plugins) with a process that has not been given up on. A
    /// restart that cannot start one of these fails instead of dropping it.
    pub fn serving_plugin_ids(&self) -> Vec<String> {
        self.loader
            .plugins()
            .iter()
            .zip(&self.plugins)
            .filter(|(p, rt)| {
                rt.fast.load(Ordering::Acquire) != PHASE_FAILED
                    && p.start_error.is_none()
                    && p.runtime.as_ref().is_none_or(|r| {
                        !matches!(r.status().state, plugin_host::ProcessState::Failed(_))
                    })
            })
            .map(|(p, _)| p.id.clone())
            .collect()
    }

    /// Plugins as `health` reports them: running ids, failed `(id, error)`,
    /// and ids not serving (starting or stopped). Reads the lock-free phase
    /// first; only a failed plugin's error text takes the lock.
    pub fn plugin_health(&self) -> (Vec<&str>, Vec<(&str, String)>, Vec<&str>) {
        let (mut loaded, mut failed, mut unavailable) = (Vec::new(), Vec::new(), Vec::new());
        for (p, rt) in self.loader.plugins().iter().zip(&self.plugins) {
            match rt.fast.load(Ordering::Acquire) {
                PHASE_RUNNING => match p.runtime.as_ref().map(|r| r.status().state) {
                    None | Some(plugin_host::ProcessState::Running) => loaded.push(p.id.as_str()),
                    Some(plugin_host::ProcessState::Failed(e)) => failed.push((p.id.as_str(), e)),
                    Some(_) => unavailable.push(p.id.as_str()),
                },
                PHASE_FAILED => match &*rt.phase.borrow() {
                    PluginPhase::Failed(e) => failed.push((p.id.as_str(), e.clone())),
                    // The text lands a moment after the flag.
                    _ => unavailable.push(p.id.as_str()),
                },
                _ => unavailable.push(p.id.as_str()),
            }
        }
        (loaded, failed, unavailable)
    }

    /// Running plugins that report themselves degraded through a health
    /// check, as `(id, reason)`, in load order.
    pub fn plugin_degraded(&self) -> Vec<(&str, String)> {
        let mut out = Vec::new();
        for (owner, check) in self.registry.health_checks() {
            if self.plugins[*owner].fast.load(Ordering::Acquire) != PHASE_RUNNING {
                continue;
            }
            let id = self.loader.plugins()[*owner].id.as_str();
            match crate::panic::catch(|| check()) {
                Ok(None) => {}
                Ok(Some(reason)) => out.push((id, reason)),
                Err(p) => out.push((id, format!("health check panicked: {p}"))),
            }
        }
        out
    }
}
