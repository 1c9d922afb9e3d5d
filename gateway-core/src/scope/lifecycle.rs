//! A plugin's life in its generation: its services start (in order, each
//! with a timeout), its requests drain until the deadline and are then
//! cancelled, its services stop (reverse start order, exactly once) and its
//! handles, sinks and tasks retire; and the whole generation's shutdown.

use super::{CancelReason, PluginPhase, RestartScope, lock};
use crate::panic;
use crate::registry::PluginIndex;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tracing::{debug, error, warn};

/// What happened when a generation (or some of its plugins) shut down.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// In-flight requests had to be cancelled at the drain deadline.
    pub drain_timed_out: bool,
    /// How many requests were answered as cancelled at the deadline, each
    /// once (a core `send` is in flight in two plugins but answered once).
    pub cancelled_requests: usize,
    /// Services stopped (each exactly once).
    pub services_stopped: usize,
    /// Services whose stop failed, panicked or timed out.
    pub services_failed: Vec<String>,
    /// Background tasks that had to be aborted.
    pub aborted_tasks: usize,
}

impl ShutdownReport {
    pub(crate) fn add(&mut self, other: ShutdownReport) {
        self.drain_timed_out |= other.drain_timed_out;
        self.cancelled_requests += other.cancelled_requests;
        self.services_stopped += other.services_stopped;
        self.services_failed.extend(other.services_failed);
        self.aborted_tasks += other.aborted_tasks;
    }
}

/// How one plugin's requests drained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Drained {
    /// Requests in flight when the drain began.
    pub(crate) in_flight: usize,
    /// Requests cancelled at the deadline.
    pub(crate) cancelled: usize,
}

impl RestartScope {
    /// Start every plugin's services, one plugin after the other, in load
    /// order (the first generation).
    pub(crate) async fn start_services(&self) {
        for index in 0..self.plugins.len() {
            self.start_plugin(index).await;
        }
    }

    /// Start plugin `index`'s services in order, each with a timeout; a
    /// failure marks the plugin failed and its methods answer `UNAVAILABLE`.
    pub(crate) async fn start_plugin(&self, index: PluginIndex) {
        let rt = &self.plugins[index];
        if rt.services.is_empty() {
            return;
        }
        let id = &self.loader.plugins()[index].id;
        let mut failure = None;
        for svc in &rt.services {
            lock(&rt.started).push(svc.clone());
            let started = tokio::time::timeout(
                self.timings.start_timeout(),
                panic::catch_async(svc.clone().start()),
            )
            .await;
            let err = match started {
                Ok(Ok(Ok(()))) => continue,
                Ok(Ok(Err(e))) => e,
                Ok(Err(p)) => format!("start panicked: {p}"),
                Err(_) => format!("start timed out after {:?}", self.timings.start_timeout()),
            };
            error!(generation = self.generation, plugin = %id, service = svc.name(), error = %err, "plugin failed to start");
            failure = Some(format!("service {}: {err}", svc.name()));
            break;
        }
        rt.set(failure.map_or(PluginPhase::Running, PluginPhase::Failed));
    }

    /// Let plugin `index`'s in-flight requests finish until `deadline`, then
    /// cancel what is left (answered retryable `UNAVAILABLE` with `reason`).
    /// Call after [`RestartScope::close_admission`].
    pub(crate) async fn drain_plugin(
        &self,
        index: PluginIndex,
        deadline: Duration,
        reason: CancelReason,
    ) -> Drained {
        let mut drained = Drained {
            in_flight: self.admission.in_flight(index),
            cancelled: 0,
        };
        if tokio::time::timeout(deadline, self.admission.wait_empty(index))
            .await
            .is_ok()
        {
            return drained;
        }
        drained.cancelled = self.admission.in_flight(index);
        let id = &self.loader.plugins()[index].id;
        warn!(
            generation = self.generation,
            plugin = %id,
            in_flight = drained.cancelled,
            deadline_ms = deadline.as_millis() as u64,
            "drain timeout; cancelling in-flight requests"
        );
        self.cancel_reason.store(reason as u8, Ordering::SeqCst);
        self.plugins[index].cancel.cancel();
        if tokio::time::timeout(Duration::from_secs(1), self.admission.wait_empty(index))
            .await
            .is_err()
        {
            warn!(
                generation = self.generation,
                plugin = %id,
                "requests still in flight after cancellation"
            );
        }
        drained
    }

    /// Stop plugin `index`'s services in reverse start order, exactly once,
    /// each with a timeout; then retire its handles, sinks and tasks.
    pub(crate) async fn stop_plugin(&self, index: PluginIndex) -> ShutdownReport {
        let mut report = ShutdownReport::default();
        let rt = &self.plugins[index];
        let id = &self.loader.plugins()[index].id;
        if !rt.stopped.swap(true, Ordering::SeqCst) {
            let started = std::mem::take(&mut *lock(&rt.started));
            for svc in started.into_iter().rev() {
                let stopped = tokio::time::timeout(
                    self.timings.stop_timeout(),
                    panic::catch_async(svc.clone().stop()),
                )
                .await;
                report.services_stopped += 1;
                let failure = match stopped {
                    Ok(Ok(())) => continue,
                    Ok(Err(p)) => format!("stop panicked: {p}"),
                    Err(_) => format!("stop timed out after {:?}", self.timings.stop_timeout()),
                };
                error!(generation = self.generation, plugin = %id, service = svc.name(), error = %failure, "plugin service failed to stop");
                report
                    .services_failed
                    .push(format!("{id}/{}: {failure}", svc.name()));
            }
        }
        rt.set(PluginPhase::Stopped);
        rt.life.retire();
        report.aborted_tasks = rt.life.reap_tasks(Duration::from_millis(250)).await;
        if report.aborted_tasks > 0 {
            warn!(
                generation = self.generation,
                plugin = %id,
                aborted = report.aborted_tasks,
                "aborted background tasks that ignored retirement"
            );
        }
        report
    }

    /// End this generation when the gateway stops: admit nothing new, drain
    /// every plugin's requests concurrently until the deadline (then cancel
    /// them with `gateway-stopping`), then stop the plugins' services in
    /// reverse start order exactly once, and retire handles, sinks and tasks.
    pub(crate) async fn shutdown(&self, drain: Duration) -> ShutdownReport {
        self.close_admission();
        let mut report = ShutdownReport::default();
        let drains =
            (0..self.plugins.len()).map(|p| self.drain_plugin(p, drain, CancelReason::Stopping));
        for d in futures::future::join_all(drains).await {
            report.drain_timed_out |= d.cancelled > 0;
        }
        report.cancelled_requests = self.cancelled_answers();
        for index in (0..self.plugins.len()).rev() {
            report.add(self.stop_plugin(index).await);
        }
        debug!(generation = self.generation, ?report, "generation stopped");
        report
    }
}
