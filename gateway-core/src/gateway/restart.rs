//! Restarts: concurrent triggers coalesce into at most one restart pending
//! behind the running one, and a restart builds the next generation, swaps
//! it in, announces it, hands every plugin over and records the outcome.

use super::handover::hand_over;
use super::history::{diff_methods, plugin_reports};
use super::{Gateway, lock};
use crate::panic;
use crate::report::{
    RestartFailure, RestartOutcome, RestartPhases, RestartRecord, RestartReport, unix_ms,
};
use crate::scope::PluginPhase;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

/// Serializes restarts and holds the one restart pending behind the
/// running one, which later triggers join.
#[derive(Default)]
pub(super) struct Coordinator {
    pub(super) running: tokio::sync::Mutex<()>,
    pending: Mutex<Option<watch::Receiver<Option<RestartOutcome>>>>,
}

impl Gateway {
    /// Restart in-process, triggered by the embedding program (`api`).
    /// See [`Gateway::restart_with`].
    pub async fn restart(&self) -> RestartOutcome {
        self.restart_with("api").await
    }

    /// Restart in-process: build a new generation from config and manifests
    /// read again, swap it in (it serves from that moment), then hand each
    /// plugin over on its own: drain and stop its old instance, start its
    /// new one. `trigger` names what asked for it (`SIGUSR1`,
    /// `gateway.restart`, ...) in the restart history. Concurrent calls
    /// coalesce: a call made while a restart runs joins the one pending
    /// restart behind it (recorded with the first joiner's trigger), which
    /// every such caller then shares.
    pub async fn restart_with(&self, trigger: &str) -> RestartOutcome {
        let mut rx = {
            let mut pending = lock(&self.inner.coordinator.pending);
            match &*pending {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    *pending = Some(rx.clone());
                    let gateway = self.clone();
                    let trigger = trigger.to_string();
                    tokio::spawn(async move {
                        let _running = gateway.inner.coordinator.running.lock().await;
                        // From here on, new triggers queue a further restart.
                        lock(&gateway.inner.coordinator.pending).take();
                        let started = Instant::now();
                        let outcome = match panic::catch_async(
                            gateway.restart_now(started, &trigger),
                        )
                        .await
                        {
                            Ok(o) => o,
                            Err(p) => Err(gateway.record_failure(
                                started,
                                &trigger,
                                format!("restart panicked: {p}"),
                                Vec::new(),
                            )),
                        };
                        tx.send_replace(Some(outcome));
                    });
                    rx
                }
            }
        };
        loop {
            if let Some(outcome) = rx.borrow_and_update().clone() {
                return outcome;
            }
            if rx.changed().await.is_err() {
                return Err(RestartFailure {
                    serving: self.current().generation(),
                    error: "restart task ended without an outcome".into(),
                    duration: Duration::ZERO,
                });
            }
        }
    }

    /// Process-level settings changed on disk (asked once per restart,
    /// off the path to the swap), with one warning line when there are any.
    fn pending_process_settings(&self) -> Vec<String> {
        let pending = self.inner.options.config.pending_process_settings();
        if !pending.is_empty() {
            warn!(
                settings = %pending.join(", "),
                "process-level settings changed on disk; they apply only when the process restarts"
            );
        }
        pending
    }

    async fn restart_now(&self, started: Instant, trigger: &str) -> RestartOutcome {
        if self.inner.closing.load(Ordering::SeqCst) {
            let pending = self.pending_process_settings();
            return Err(self.record_failure(
                started,
                trigger,
                "gateway is stopping".into(),
                pending,
            ));
        }
        let old_gen = self.current().generation();
        // Restarts are serialized, so the next number is free; a failed build
        // never served and leaves no gap.
        let generation = old_gen + 1;
        info!(from = old_gen, to = generation, trigger, "restart started");
        let new = match self.build_next(generation).await {
            Ok(s) => s,
            Err(e) => {
                let pending = self.pending_process_settings();
                return Err(self.record_failure(started, trigger, e.to_string(), pending));
            }
        };
        // The swap: from here on the new generation admits every request and
        // is announced; the old one admits nothing new.
        let old = self.inner.current.swap(new.clone());
        old.close_admission();
        *lock(&self.inner.draining) = Arc::downgrade(&old);
        self.inner.serving.send_replace(generation);
        let swapped_at = Instant::now();
        let build = swapped_at - started;
        info!(
            generation,
            build_ms = build.as_millis() as u64,
            methods = new.features().methods.len(),
            plugins = new.loader().plugins().len(),
            "generation {generation} serving"
        );
        let pending = self.pending_process_settings();
        let (methods_added, methods_removed) = diff_methods(&old, &new);
        let plugins = plugin_reports(&old, &new);
        let (handovers, shutdown) = hand_over(&old, &new).await;
        self.note_drain(&shutdown);
        // Under the lock: a concurrent `stats` has released its upgrade.
        *lock(&self.inner.draining) = Weak::new();
        let old_weak = Arc::downgrade(&old);
        drop(old);
        if old_weak.strong_count() > 0 {
            warn!(
                generation = old_gen,
                refs = old_weak.strong_count(),
                "retired generation is still referenced"
            );
        }
        let phases = RestartPhases {
            build,
            handover: swapped_at.elapsed(),
            stop_old: handovers
                .iter()
                .map(|h| h.drain + h.stop)
                .max()
                .unwrap_or_default(),
            start_new: handovers.iter().map(|h| h.start).max().unwrap_or_default(),
        };
        let failed_plugins: Vec<(String, String)> = new
            .plugin_phases()
            .into_iter()
            .filter_map(|(id, p)| match p {
                PluginPhase::Failed(e) => Some((id.to_string(), e)),
                _ => None,
            })
            .collect();
        let duration = started.elapsed();
        self.inner.restarts_ok.fetch_add(1, Ordering::Relaxed);
        self.inner
            .restart_micros_sum
            .fetch_add(duration.as_micros() as u64, Ordering::Relaxed);
        for (sum, d) in self.inner.phase_micros_sum.iter().zip([
            phases.build,
            phases.stop_old,
            phases.start_new,
            phases.handover,
        ]) {
            sum.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        }
        let plugins_changed: Vec<String> = plugins
            .iter()
            .filter(|p| p.changed)
            .map(|p| p.id.clone())
            .collect();
        info!(
            generation,
            trigger,
            duration_ms = duration.as_millis() as u64,
            build_ms = phases.build.as_millis() as u64,
            handover_ms = phases.handover.as_millis() as u64,
            stop_old_ms = phases.stop_old.as_millis() as u64,
            start_new_ms = phases.start_new.as_millis() as u64,
            added = ?methods_added,
            removed = ?methods_removed,
            changed = ?plugins_changed,
            "restart complete; every plugin handed over to generation {generation}"
        );
        self.push_record(RestartRecord {
            ok: true,
            generation,
            trigger: trigger.to_string(),
            at_ms: unix_ms(),
            duration_ms: duration.as_millis() as u64,
            phases,
            methods_added: methods_added.clone(),
            methods_removed: methods_removed.clone(),
            plugins_changed,
            error: None,
            pending_process_settings: pending.clone(),
        });
        Ok(RestartReport {
            generation,
            previous: old_gen,
            trigger: trigger.to_string(),
            duration,
            phases,
            handovers,
            pending_process_settings: pending,
            plugins,
            methods_added,
            methods_removed,
            shutdown,
            failed_plugins,
        })
    }
}
