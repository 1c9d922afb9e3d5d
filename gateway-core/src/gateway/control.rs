//! The gateway as the core plugin sees it: [`GatewayControl`], implemented
//! for the gateway's inner state (restart, stats, history, connections).

use super::{Gateway, Inner, lock};
use crate::core_plugin::GatewayControl;
use crate::report::{GatewayStats, RestartOutcome, RestartPhases, RestartRecord};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

impl GatewayControl for Inner {
    fn restart(
        self: Arc<Self>,
        trigger: &'static str,
    ) -> futures::future::BoxFuture<'static, RestartOutcome> {
        Box::pin(async move { Gateway { inner: self }.restart_with(trigger).await })
    }

    fn stats(&self) -> GatewayStats {
        let i = self;
        GatewayStats {
            generation: i.current.load().generation(),
            live_scopes: i.live_scopes.load(Ordering::SeqCst),
            restarts_ok: i.restarts_ok.load(Ordering::Relaxed),
            restarts_failed: i.restarts_failed.load(Ordering::Relaxed),
            restart_seconds_sum: i.restart_micros_sum.load(Ordering::Relaxed) as f64 / 1e6,
            in_flight: i.current.load().in_flight()
                + lock(&i.draining).upgrade().map_or(0, |s| s.in_flight()),
            last_restart: lock(&i.history).front().cloned(),
            uptime: i.started_at.elapsed(),
            drain_timeouts: i.drain_timeouts.load(Ordering::Relaxed),
            drain_cancelled_requests: i.drain_cancelled.load(Ordering::Relaxed),
            restart_phases_sum: {
                let us =
                    |k: usize| Duration::from_micros(i.phase_micros_sum[k].load(Ordering::Relaxed));
                RestartPhases {
                    build: us(0),
                    stop_old: us(1),
                    start_new: us(2),
                    handover: us(3),
                }
            },
        }
    }

    fn restart_history(&self) -> Vec<RestartRecord> {
        lock(&self.history).iter().cloned().collect()
    }

    fn connection_count(&self) -> usize {
        self.options.transport.connection_count()
    }
}
