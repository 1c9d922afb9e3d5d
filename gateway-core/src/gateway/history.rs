//! What restarts leave behind: the restart history (newest first,
//! [`RESTART_HISTORY_LEN`] records), the restart and drain counters, and
//! what a restart reports about methods and plugins.

use super::{Gateway, lock};
use crate::core_plugin::GatewayControl;
use crate::loader::PluginSource;
use crate::report::{
    PluginReport, RESTART_HISTORY_LEN, RestartFailure, RestartPhases, RestartRecord, unix_ms,
};
use crate::scope::{RestartScope, ShutdownReport};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use tokio::time::Instant;
use tracing::error;

impl Gateway {
    pub(super) fn record_failure(
        &self,
        started: Instant,
        trigger: &str,
        error: String,
        pending_process_settings: Vec<String>,
    ) -> RestartFailure {
        let serving = self.current().generation();
        let duration = started.elapsed();
        self.inner.restarts_failed.fetch_add(1, Ordering::Relaxed);
        self.push_record(RestartRecord {
            ok: false,
            generation: serving,
            trigger: trigger.to_string(),
            at_ms: unix_ms(),
            duration_ms: duration.as_millis() as u64,
            phases: RestartPhases {
                build: duration,
                ..RestartPhases::default()
            },
            methods_added: Vec::new(),
            methods_removed: Vec::new(),
            plugins_changed: Vec::new(),
            error: Some(error.clone()),
            pending_process_settings,
        });
        error!(generation = serving, trigger, error = %error, "restart failed; generation {serving} keeps serving");
        RestartFailure {
            serving,
            error,
            duration,
        }
    }

    /// Count a drain that reached its deadline, for `stats`.
    pub(super) fn note_drain(&self, report: &ShutdownReport) {
        if report.drain_timed_out {
            self.inner.drain_timeouts.fetch_add(1, Ordering::Relaxed);
            self.inner
                .drain_cancelled
                .fetch_add(report.cancelled_requests as u64, Ordering::Relaxed);
        }
    }

    pub(super) fn push_record(&self, record: RestartRecord) {
        let mut history = lock(&self.inner.history);
        if history.len() == RESTART_HISTORY_LEN {
            history.pop_back();
        }
        history.push_front(record);
    }

    /// The last [`RESTART_HISTORY_LEN`] restarts, newest first, failed
    /// ones included.
    pub fn restart_history(&self) -> Vec<RestartRecord> {
        self.inner.restart_history()
    }
}

pub(super) fn diff_methods(old: &RestartScope, new: &RestartScope) -> (Vec<String>, Vec<String>) {
    let o: BTreeSet<&str> = old.registry().method_names().into_iter().collect();
    let n: BTreeSet<&str> = new.registry().method_names().into_iter().collect();
    (
        n.difference(&o).map(|s| s.to_string()).collect(),
        o.difference(&n).map(|s| s.to_string()).collect(),
    )
}

pub(super) fn plugin_reports(old: &RestartScope, new: &RestartScope) -> Vec<PluginReport> {
    new.loader()
        .plugins()
        .iter()
        .map(|p| PluginReport {
            id: p.id.clone(),
            version: p.version.clone(),
            code_hash: p.code_hash.clone(),
            changed: old
                .loader()
                .by_hash(&p.code_hash)
                .is_none_or(|o| o.id != p.id),
            source: match &p.source {
                PluginSource::Builtin => "builtin".into(),
                PluginSource::Manifest(path) => path.display().to_string(),
            },
        })
        .collect()
}
