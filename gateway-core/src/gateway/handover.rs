//! The hand-over after a swap: one chain per plugin id, all at once, so a
//! slow plugin holds up no other.

use crate::report::{HandoverKind, PluginHandover};
use crate::scope::{CancelReason, RestartScope, ShutdownReport};
use std::time::Duration;
use tokio::time::Instant;
use tracing::debug;

/// Hand every plugin over from `old` to `new`, each on its own and all at
/// once: a plugin in both drains its old requests (cancelled at the drain
/// deadline), stops its old services, then starts its new ones; a plugin
/// only in `new` starts at once; one only in `old` drains and stops.
/// `old` must have closed admission.
pub(super) async fn hand_over(
    old: &RestartScope,
    new: &RestartScope,
) -> (Vec<PluginHandover>, ShutdownReport) {
    let deadline = new.timings().drain_timeout();
    let swapped = Instant::now();
    let chain = |old_index: Option<usize>, new_index: Option<usize>, id: String| async move {
        let mut h = PluginHandover {
            id,
            kind: match (old_index, new_index) {
                (Some(_), Some(_)) => HandoverKind::Replaced,
                (None, _) => HandoverKind::Added,
                (_, None) => HandoverKind::Removed,
            },
            in_flight: 0,
            cancelled: 0,
            drain: Duration::ZERO,
            stop: Duration::ZERO,
            start: Duration::ZERO,
            total: Duration::ZERO,
        };
        let mut report = ShutdownReport::default();
        if let Some(o) = old_index {
            let t = Instant::now();
            let drained = old
                .drain_plugin(o, deadline, CancelReason::Restarting)
                .await;
            h.in_flight = drained.in_flight;
            h.cancelled = drained.cancelled;
            h.drain = t.elapsed();
            let t = Instant::now();
            report = old.stop_plugin(o).await;
            report.drain_timed_out = drained.cancelled > 0;
            h.stop = t.elapsed();
        }
        if let Some(n) = new_index {
            let t = Instant::now();
            new.start_plugin(n).await;
            h.start = t.elapsed();
        }
        h.total = swapped.elapsed();
        debug!(plugin = %h.id, kind = ?h.kind, in_flight = h.in_flight, cancelled = h.cancelled,
            drain_ms = h.drain.as_millis() as u64, stop_ms = h.stop.as_millis() as u64,
            start_ms = h.start.as_millis() as u64, "plugin handed over");
        (h, report)
    };
    let mut chains = Vec::new();
    for (n, p) in new.loader().plugins().iter().enumerate() {
        chains.push(chain(old.plugin_index(&p.id), Some(n), p.id.clone()));
    }
    for (o, p) in old.loader().plugins().iter().enumerate() {
        if new.plugin_index(&p.id).is_none() {
            chains.push(chain(Some(o), None, p.id.clone()));
        }
    }
    let mut total = ShutdownReport::default();
    let mut handovers = Vec::with_capacity(chains.len());
    for (h, report) in futures::future::join_all(chains).await {
        total.add(report);
        handovers.push(h);
    }
    // Counted where requests are answered, so a request in flight in two
    // plugins (a core `send` into a channel) counts once.
    total.cancelled_requests = old.cancelled_answers();
    (handovers, total)
}

#[cfg(test)]
mod tests {
    use crate::config::{GatewayConfig, StaticConfig};
    use crate::gateway::{Gateway, GatewayOptions};
    use crate::loader::Catalog;
    use crate::scope::{CancelReason, Drained};
    use plugin_api::host::NullTransport;
    use plugin_api::{
        BoxFuture, Channel, ConnId, ErrorCode, OutboundMessage, Params, Plugin, PluginFactory,
        Registrar, RequestContext, RpcError, SendReceipt,
    };
    use serde_json::json;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::time::Instant;

    /// A plugin whose channel `hang` never answers.
    struct Hang;

    impl Plugin for Hang {
        fn id(&self) -> &str {
            "hang"
        }
        fn version(&self) -> &str {
            "1.0.0"
        }
        fn register(&self, r: &mut Registrar) {
            r.channel("hang", Arc::new(Hang));
        }
    }

    impl Channel for Hang {
        fn send(
            self: Arc<Self>,
            _: RequestContext,
            _: OutboundMessage,
        ) -> BoxFuture<Result<SendReceipt, RpcError>> {
            Box::pin(std::future::pending())
        }
    }

    // The core `send` into a channel: only the channel's plugin reaches its
    // drain deadline here (the core plugin is not drained at all), and that
    // alone ends the send, answered as the channel's own requests are.
    #[tokio::test(start_paused = true)]
    async fn the_channels_drain_deadline_alone_cancels_a_core_send_into_it() {
        let state = tempfile::tempdir().unwrap();
        let gw = Gateway::start(GatewayOptions {
            catalog: Catalog::new()
                .with(PluginFactory::new("hang", "1.0.0", |_| Ok(Arc::new(Hang)))),
            config: Arc::new(StaticConfig::new(GatewayConfig::default())),
            state_dir: state.path().to_path_buf(),
            transport: Arc::new(NullTransport),
        })
        .await
        .unwrap();
        let scope = gw.current();
        let send = tokio::spawn({
            let gw = gw.clone();
            let params =
                json!({"channel": "hang", "to": "x", "message": "hi", "idempotencyKey": "k"});
            async move {
                gw.dispatch(
                    plugin_api::host::internal_context(ConnId(1)),
                    "send",
                    Params::from_value(&params),
                )
                .await
            }
        });
        while scope.plugin_in_flight("hang") == 0 {
            tokio::task::yield_now().await;
        }
        scope.close_admission();
        let channel = scope.plugin_index("hang").unwrap();
        let t0 = Instant::now();
        let drained = scope
            .drain_plugin(
                channel,
                Duration::from_millis(250),
                CancelReason::Restarting,
            )
            .await;
        let took = t0.elapsed();
        assert_eq!(
            drained,
            Drained {
                in_flight: 1,
                cancelled: 1
            }
        );
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_millis(260),
            "{took:?}"
        );
        tokio::task::yield_now().await;
        assert!(send.is_finished(), "answered at the channel's deadline");
        let err = send.await.unwrap().unwrap_err();
        assert_eq!(err.code, ErrorCode::Unavailable);
        assert_eq!(err.retryable, Some(true));
        assert_eq!(err.details.unwrap()["reason"], "gateway-restarting");
        assert_eq!(scope.in_flight(), 0, "both slots are free");
    }
}
