//! Per-plugin hand-over at restart, request deadlines, stop cancellations,
//! connection-closed fan-out, service start/stop failures and the restart
//! history. Timing-dependent tests run on tokio's paused clock, so their
//! durations are exact and a loaded machine cannot make them flaky.

use crate::common::*;
use gateway_core::{
    ConfigError, ConfigSource, GatewayConfig, HandoverKind, PluginEntry, PluginPhase,
    RESTART_HISTORY_LEN, StaticConfig,
};
use plugin_api::{ConnId, ErrorCode};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

/// A gateway with two probe plugins: `probe` (recording into `h.probe`) and
/// `second` (recording into the returned probe).
async fn pair(cfg: GatewayConfig) -> (Harness, Arc<Probe>) {
    let second = Arc::new(Probe::default());
    let h = harness(cfg, vec![probe_factory("second", second.clone())]).await;
    (h, second)
}

fn entry(config: Value) -> PluginEntry {
    PluginEntry {
        config: Some(config),
        ..PluginEntry::default()
    }
}

fn pair_config(probe: Value, second: Value) -> GatewayConfig {
    config_with(&[("probe", probe), ("second", second)])
}

fn pos(log: &[String], s: &str) -> usize {
    log.iter()
        .position(|l| l == s)
        .unwrap_or_else(|| panic!("{s} in {log:?}"))
}

// Invariant 5: a slow request of plugin X never delays plugin Y's hand-over.
#[tokio::test(start_paused = true)]
async fn a_slow_request_in_one_plugin_does_not_delay_another_plugins_handover() {
    let (h, second) = pair(pair_config(json!({}), json!({}))).await;
    let gw = h.gateway.clone();
    let slow = tokio::spawn({
        let gw = gw.clone();
        // Well within the 2 s drain deadline of `config_with`.
        async move { call(&gw, "probe.slow", json!({"ms": 1500})).await }
    });
    assert!(eventually(Duration::from_secs(1), || gw.stats().in_flight == 1).await);
    let t0 = Instant::now();
    let restart = tokio::spawn({
        let gw = gw.clone();
        async move { gw.restart().await }
    });
    // `second` hands over at once: its new service starts while probe's
    // slow request still runs on generation 1.
    assert!(
        eventually(Duration::from_secs(10), || second.count("start:second:2")
            == 1)
        .await
    );
    let second_ready = t0.elapsed();
    assert!(second_ready < Duration::from_millis(50), "{second_ready:?}");
    assert_eq!(h.probe.count("done:1"), 0, "probe's request still runs");
    assert_eq!(
        h.probe.count("stop:probe:1"),
        0,
        "probe has not handed over"
    );
    let r = call(&gw, "second.ping", json!({})).await.unwrap();
    assert_eq!(r["generation"], 2, "second answers from the new generation");

    let rep = restart.await.unwrap().unwrap();
    assert_eq!(slow.await.unwrap().unwrap()["generation"], 1);
    let by_id = |id: &str| rep.handovers.iter().find(|h| h.id == id).unwrap().clone();
    let (p, s) = (by_id("probe"), by_id("second"));
    assert_eq!(p.kind, HandoverKind::Replaced);
    assert_eq!(p.in_flight, 1);
    assert_eq!(p.cancelled, 0);
    assert!(p.drain >= Duration::from_millis(1400), "{p:?}");
    assert!(p.total >= p.drain, "{p:?}");
    assert_eq!(s.in_flight, 0);
    assert!(s.total < Duration::from_millis(50), "{s:?}");
    assert!(rep.phases.handover >= p.drain);
    assert!(rep.phases.build < Duration::from_millis(50));
    // Probe's own order: its request done, its old service stopped, then its
    // new service started.
    let log = h.probe.log();
    assert!(pos(&log, "done:1") < pos(&log, "stop:probe:1"), "{log:?}");
    assert!(
        pos(&log, "stop:probe:1") < pos(&log, "start:probe:2"),
        "{log:?}"
    );
    assert_eq!(gw.stats().live_scopes, 1);
}

// Invariant 5: per plugin, the old instance's requests are cancelled at the
// drain deadline; the other plugin's requests are not touched.
#[tokio::test(start_paused = true)]
async fn drain_deadline_is_per_plugin_and_cancels_only_that_plugins_requests() {
    let mut cfg = pair_config(json!({}), json!({}));
    cfg.restart.drain_timeout_ms = 1000;
    let (h, second) = pair(cfg).await;
    let gw = h.gateway.clone();
    let long = tokio::spawn({
        let gw = gw.clone();
        async move { call(&gw, "probe.slow", json!({"ms": 60_000})).await }
    });
    let short = tokio::spawn({
        let gw = gw.clone();
        async move { call(&gw, "second.slow", json!({"ms": 500})).await }
    });
    assert!(eventually(Duration::from_secs(1), || gw.stats().in_flight == 2).await);
    let rep = gw.restart().await.unwrap();
    let err = long.await.unwrap().unwrap_err();
    assert_eq!(err.code, ErrorCode::Unavailable);
    assert_eq!(err.retryable, Some(true));
    assert_eq!(err.details.unwrap()["reason"], "gateway-restarting");
    assert_eq!(short.await.unwrap().unwrap()["generation"], 1);
    assert!(rep.shutdown.drain_timed_out);
    assert_eq!(rep.shutdown.cancelled_requests, 1);
    let p = rep.handovers.iter().find(|x| x.id == "probe").unwrap();
    let s = rep.handovers.iter().find(|x| x.id == "second").unwrap();
    assert_eq!((p.in_flight, p.cancelled), (1, 1));
    assert_eq!((s.in_flight, s.cancelled), (1, 0));
    // Its own request's remaining time, not probe's deadline.
    assert!(
        s.drain >= Duration::from_millis(400) && s.drain < Duration::from_millis(600),
        "{s:?}"
    );
    assert!(p.drain >= Duration::from_millis(1000), "{p:?}");
    assert_eq!(h.probe.abandoned.load(Ordering::SeqCst), 1);
    // Past the long request's end on the paused clock: it never finished.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(h.probe.count("done:1"), 0);
    assert_eq!(second.count("done:1"), 1);
}

// Plugins are matched across generations by id: one only in the new
// generation starts at once, one only in the old drains and stops.
#[tokio::test(start_paused = true)]
async fn added_plugins_start_at_once_and_removed_plugins_drain_and_stop() {
    let mut cfg = config_with(&[("probe", json!({}))]);
    cfg.plugins.entries.insert(
        "second".into(),
        PluginEntry {
            enabled: Some(false),
            ..PluginEntry::default()
        },
    );
    let (h, second) = pair(cfg.clone()).await;
    let gw = h.gateway.clone();
    // Add `second` while probe has a slow request: second starts at once.
    let mut with_second = cfg.clone();
    with_second
        .plugins
        .entries
        .insert("second".into(), entry(json!({})));
    h.config.set(with_second);
    let slow = tokio::spawn({
        let gw = gw.clone();
        async move { call(&gw, "probe.slow", json!({"ms": 2000})).await }
    });
    assert!(eventually(Duration::from_secs(1), || gw.stats().in_flight == 1).await);
    let rep = gw.restart().await.unwrap();
    let s = rep.handovers.iter().find(|x| x.id == "second").unwrap();
    assert_eq!(s.kind, HandoverKind::Added);
    assert!(s.total < Duration::from_millis(50), "{s:?}");
    assert_eq!(second.count("start:second:2"), 1);
    slow.await.unwrap().unwrap();
    // Remove it again while it has a slow request: it drains, then stops;
    // nothing of it starts.
    let second_slow = tokio::spawn({
        let gw = gw.clone();
        async move { call(&gw, "second.slow", json!({"ms": 300})).await }
    });
    assert!(eventually(Duration::from_secs(1), || gw.stats().in_flight == 1).await);
    h.config.set(cfg);
    let rep = gw.restart().await.unwrap();
    let s = rep.handovers.iter().find(|x| x.id == "second").unwrap();
    assert_eq!(s.kind, HandoverKind::Removed);
    assert_eq!(s.in_flight, 1);
    assert_eq!(second_slow.await.unwrap().unwrap()["generation"], 2);
    let log = second.log();
    assert!(pos(&log, "done:2") < pos(&log, "stop:second:2"), "{log:?}");
    assert_eq!(second.count("start:second:3"), 0);
    assert!(
        call(&gw, "second.ping", json!({}))
            .await
            .unwrap_err()
            .message
            .starts_with("unknown method")
    );
}

// Invariant 10 (gateway side): watchers learn the new generation at the
// swap, while an old request is still draining; the old scope admits nothing.
#[tokio::test(start_paused = true)]
async fn the_new_generation_is_announced_at_the_swap_not_after_the_drain() {
    let h = harness(config_with(&[("probe", json!({}))]), vec![]).await;
    let gw = h.gateway.clone();
    let mut rx = gw.subscribe();
    assert_eq!(*rx.borrow_and_update(), 1);
    let slow = tokio::spawn({
        let gw = gw.clone();
        async move { call(&gw, "probe.slow", json!({"ms": 1500})).await }
    });
    assert!(eventually(Duration::from_secs(1), || gw.stats().in_flight == 1).await);
    let old = gw.current();
    let t0 = Instant::now();
    let restart = tokio::spawn({
        let gw = gw.clone();
        async move { gw.restart().await }
    });
    rx.changed().await.unwrap();
    assert_eq!(*rx.borrow_and_update(), 2);
    assert!(
        t0.elapsed() < Duration::from_millis(50),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(
        h.probe.count("done:1"),
        0,
        "announced before the drain ended"
    );
    assert!(!old.is_admitting(), "the old generation admits nothing new");
    assert_eq!(old.plugin_in_flight("probe"), 1);
    drop(old);
    restart.await.unwrap().unwrap();
    slow.await.unwrap().unwrap();
}

// Invariant 11: a handler that hangs is answered at its deadline, frees its
// in-flight count and its generation.
#[tokio::test(start_paused = true)]
async fn a_hung_handler_is_answered_at_its_deadline_and_frees_its_generation() {
    let mut cfg = config_with(&[("probe", json!({}))]);
    cfg.requests.timeout_ms = 250;
    let h = harness(cfg, vec![]).await;
    let gw = h.gateway.clone();
    let weak = Arc::downgrade(&gw.current());
    let t0 = Instant::now();
    let err = call(&gw, "probe.slow", json!({"ms": 3_600_000}))
        .await
        .unwrap_err();
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(260),
        "{took:?}"
    );
    assert_eq!(err.code, ErrorCode::Unavailable);
    assert_eq!(err.retryable, Some(true));
    let d = err.details.unwrap();
    assert_eq!(d["reason"], "request-timeout");
    assert_eq!(d["method"], "probe.slow");
    assert_eq!(d["plugin"], "probe");
    assert_eq!(d["timeoutMs"], 250);
    assert_eq!(gw.stats().in_flight, 0, "the slot is free");
    assert_eq!(h.probe.abandoned.load(Ordering::SeqCst), 1);
    // Nothing holds generation 1 any more: a restart releases it at once.
    let rep = gw.restart().await.unwrap();
    assert!(!rep.shutdown.drain_timed_out);
    assert!(weak.upgrade().is_none());
    // Limits: just under the deadline succeeds, just past it and far beyond
    // it times out. (A handler finishing at the very instant of its deadline
    // is answered with its result: the handler is polled first.)
    assert!(call(&gw, "probe.slow", json!({"ms": 249})).await.is_ok());
    assert!(call(&gw, "probe.slow", json!({"ms": 250})).await.is_ok());
    for ms in [251, 260, 1250] {
        let e = call(&gw, "probe.slow", json!({"ms": ms}))
            .await
            .unwrap_err();
        assert_eq!(e.details.unwrap()["reason"], "request-timeout", "{ms}");
    }
}

#[tokio::test(start_paused = true)]
async fn per_method_deadlines_override_the_default_and_take_effect_at_restart() {
    let mut cfg = config_with(&[("probe", json!({}))]);
    cfg.requests.timeout_ms = 100;
    let h = harness(cfg.clone(), vec![]).await;
    let gw = h.gateway.clone();
    assert!(call(&gw, "probe.slow", json!({"ms": 500})).await.is_err());
    cfg.requests
        .method_timeout_ms
        .insert("probe.slow".into(), 1000);
    h.config.set(cfg.clone());
    gw.restart().await.unwrap();
    assert!(call(&gw, "probe.slow", json!({"ms": 500})).await.is_ok());
    let e = call(&gw, "probe.slow", json!({"ms": 1500}))
        .await
        .unwrap_err();
    assert_eq!(e.details.unwrap()["timeoutMs"], 1000);
    // A deadline of zero is a config error; the old generation keeps serving.
    cfg.requests.timeout_ms = 0;
    h.config.set(cfg);
    let f = gw.restart().await.unwrap_err();
    assert!(f.error.contains("requests.timeout_ms"), "{}", f.error);
    assert_eq!(gw.current().generation(), 2);
}

// The deadline covers waiting for a plugin that is still starting.
#[tokio::test(start_paused = true)]
async fn the_deadline_covers_waiting_for_the_plugin_to_start() {
    let mut cfg = config_with(&[("probe", json!({}))]);
    cfg.requests.timeout_ms = 200;
    let h = harness(cfg.clone(), vec![]).await;
    let gw = h.gateway.clone();
    let mut slow_start = config_with(&[("probe", json!({"startDelayMs": 5000}))]);
    slow_start.requests.timeout_ms = 200;
    slow_start.restart.start_wait_ms = 10_000;
    h.config.set(slow_start);
    let restart = tokio::spawn({
        let gw = gw.clone();
        async move { gw.restart().await }
    });
    assert!(eventually(Duration::from_secs(1), || gw.current().generation() == 2).await);
    let e = call(&gw, "probe.ping", json!({})).await.unwrap_err();
    assert_eq!(e.details.unwrap()["reason"], "request-timeout");
    restart.await.unwrap().unwrap();
    assert!(call(&gw, "probe.ping", json!({})).await.is_ok());
}

// Stop: requests cancelled at the drain deadline say `gateway-stopping`.
#[tokio::test(start_paused = true)]
async fn stop_cancellations_say_gateway_stopping() {
    let h = harness(config_with(&[("probe", json!({}))]), vec![]).await;
    let gw = h.gateway.clone();
    let slow = tokio::spawn({
        let gw = gw.clone();
        async move { call(&gw, "probe.slow", json!({"ms": 10_000})).await }
    });
    assert!(eventually(Duration::from_secs(1), || gw.stats().in_flight == 1).await);
    let rep = gw.shutdown(Some(Duration::from_millis(100))).await;
    assert!(rep.drain_timed_out);
    assert_eq!(rep.cancelled_requests, 1);
    let err = slow.await.unwrap().unwrap_err();
    assert_eq!(err.code, ErrorCode::Unavailable);
    assert_eq!(err.retryable, Some(true));
    assert_eq!(err.details.unwrap()["reason"], "gateway-stopping");
}

// connection_closed reaches a generation still handing over (its plugins
// that have not stopped yet) first, then the current one.
#[tokio::test(start_paused = true)]
async fn connection_closed_reaches_the_draining_generation_then_the_current() {
    let (h, second) = pair(pair_config(json!({}), json!({}))).await;
    let gw = h.gateway.clone();
    gw.connection_closed(ConnId(7));
    assert_eq!(h.probe.count("closed:"), 1);
    assert_eq!(h.probe.log().last().unwrap(), "closed:probe:1:7");
    let slow = tokio::spawn({
        let gw = gw.clone();
        async move { call(&gw, "probe.slow", json!({"ms": 1000})).await }
    });
    assert!(eventually(Duration::from_secs(1), || gw.stats().in_flight == 1).await);
    let restart = tokio::spawn({
        let gw = gw.clone();
        async move { gw.restart().await }
    });
    // Wait until `second` handed over but `probe` still drains generation 1.
    assert!(
        eventually(Duration::from_secs(1), || second.count("start:second:2")
            == 1)
        .await
    );
    gw.connection_closed(ConnId(8));
    let closed: Vec<String> = h
        .probe
        .log()
        .into_iter()
        .filter(|l| l.starts_with("closed:") && l.ends_with(":8"))
        .collect();
    assert_eq!(closed, ["closed:probe:1:8", "closed:probe:2:8"]);
    // second's generation-1 instance had stopped: only generation 2 is told.
    let closed: Vec<String> = second
        .log()
        .into_iter()
        .filter(|l| l.starts_with("closed:") && l.ends_with(":8"))
        .collect();
    assert_eq!(closed, ["closed:second:2:8"]);
    restart.await.unwrap().unwrap();
    slow.await.unwrap().unwrap();
    // Once the hand-over is done, only the current generation is told.
    gw.connection_closed(ConnId(9));
    assert_eq!(h.probe.log().last().unwrap(), "closed:probe:2:9");
    assert_eq!(h.probe.count("closed:probe:1:9"), 0);
}

// Services stop in reverse start order, each exactly once.
#[tokio::test(start_paused = true)]
async fn services_stop_in_reverse_start_order_exactly_once() {
    let h = harness(
        config_with(&[("probe", json!({"extraServices": 2}))]),
        vec![],
    )
    .await;
    h.gateway.restart().await.unwrap();
    h.gateway.shutdown(None).await;
    let log = h.probe.log();
    let of = |g: u64| -> Vec<String> {
        log.iter()
            .filter(|l| l.ends_with(&format!(":{g}")) && !l.starts_with("closed"))
            .cloned()
            .collect()
    };
    for g in [1, 2] {
        assert_eq!(
            of(g),
            [
                format!("start:probe:{g}"),
                format!("start:probe/probe-service-1:{g}"),
                format!("start:probe/probe-service-2:{g}"),
                format!("stop:probe/probe-service-2:{g}"),
                format!("stop:probe/probe-service-1:{g}"),
                format!("stop:probe:{g}"),
            ],
            "generation {g}"
        );
    }
    assert_eq!(h.probe.stops.load(Ordering::SeqCst), 6);
}

// Service start timeouts and panics fail the plugin, not the restart; its
// started services still stop exactly once; the next generation starts.
#[tokio::test(start_paused = true)]
async fn service_start_timeouts_and_panics_fail_the_plugin_only() {
    let h = harness(config_with(&[("probe", json!({}))]), vec![]).await;
    let gw = h.gateway.clone();
    for (cfg, needle) in [
        (json!({"startHang": true}), "start timed out"),
        (json!({"startPanic": true}), "start panicked"),
    ] {
        let mut c = config_with(&[("probe", cfg)]);
        c.restart.service_start_timeout_ms = 500;
        h.config.set(c);
        let t0 = Instant::now();
        let rep = gw.restart().await.unwrap();
        assert_eq!(rep.failed_plugins.len(), 1, "{needle}");
        assert!(rep.failed_plugins[0].1.contains(needle), "{rep:?}");
        if needle == "start timed out" {
            assert!(t0.elapsed() >= Duration::from_millis(500));
            assert!(t0.elapsed() < Duration::from_millis(600));
        }
        let err = call(&gw, "probe.ping", json!({})).await.unwrap_err();
        assert_eq!(err.details.unwrap()["reason"], "plugin-failed");
        assert!(matches!(
            gw.current().plugin_phases()[1].1,
            PluginPhase::Failed(_)
        ));
        // Core methods still answer.
        assert!(call(&gw, "health", json!({})).await.is_ok());
    }
    let g = gw.current().generation();
    h.config.set(config_with(&[("probe", json!({}))]));
    gw.restart().await.unwrap();
    assert!(call(&gw, "probe.ping", json!({})).await.is_ok());
    // The failed generations' services were each stopped exactly once.
    for gen_ in [g - 1, g] {
        assert_eq!(h.probe.count(&format!("stop:probe:{gen_}")), 1, "{gen_}");
    }
}

#[tokio::test(start_paused = true)]
async fn service_stop_timeouts_and_panics_are_reported_and_never_block_the_next_start() {
    for (cfg, needle) in [
        (json!({"stopHang": true}), "stop timed out"),
        (json!({"stopPanic": true}), "stop panicked"),
    ] {
        let mut c = config_with(&[("probe", cfg)]);
        c.restart.service_stop_timeout_ms = 300;
        let h = harness(c, vec![]).await;
        h.config.set(config_with(&[("probe", json!({}))]));
        let t0 = Instant::now();
        let rep = h.gateway.restart().await.unwrap();
        assert_eq!(rep.shutdown.services_stopped, 1);
        assert_eq!(rep.shutdown.services_failed.len(), 1, "{needle}");
        assert!(
            rep.shutdown.services_failed[0].contains(needle),
            "{:?}",
            rep.shutdown.services_failed
        );
        if needle == "stop timed out" {
            assert!(t0.elapsed() >= Duration::from_millis(300));
            assert!(t0.elapsed() < Duration::from_millis(400));
        }
        assert_eq!(h.probe.count("stop:probe:1"), 1);
        assert_eq!(h.probe.count("start:probe:2"), 1);
        assert!(call(&h.gateway, "probe.ping", json!({})).await.is_ok());
        // The shutdown that follows does not stop generation 1 again.
        h.gateway.shutdown(None).await;
        assert_eq!(h.probe.count("stop:probe:1"), 1);
    }
}

/// A config source that also reports pending process settings.
struct Pending {
    inner: StaticConfig,
    pending: std::sync::Mutex<Vec<String>>,
}

impl ConfigSource for Pending {
    fn load(&self) -> Result<GatewayConfig, ConfigError> {
        self.inner.load()
    }
    fn pending_process_settings(&self) -> Vec<String> {
        self.pending.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn restart_history_is_bounded_newest_first_with_triggers_and_pending_settings() {
    let probe = Arc::new(Probe::default());
    let source = Arc::new(Pending {
        inner: StaticConfig::new(config_with(&[("probe", json!({}))])),
        pending: Default::default(),
    });
    let state = tempfile::tempdir().unwrap();
    let gw = gateway_core::Gateway::start(gateway_core::GatewayOptions {
        catalog: gateway_core::Catalog::new().with(probe_factory("probe", probe)),
        config: source.clone(),
        state_dir: state.path().to_path_buf(),
        transport: Arc::new(plugin_api::host::NullTransport),
    })
    .await
    .unwrap();
    assert!(gw.restart_history().is_empty());
    let status = call(&gw, "status", json!({})).await.unwrap();
    assert_eq!(status["lastRestart"], Value::Null);
    assert_eq!(status["restartHistory"], json!([]));

    gw.restart_with("SIGUSR1").await.unwrap();
    *source.pending.lock().unwrap() = vec!["auth.mode".into(), "server.port".into()];
    source
        .inner
        .set(config_with(&[("probe", json!({"methods": ["probe.x"]}))]));
    gw.restart_with("gateway.restart").await.unwrap();
    source.inner.set(config_with(&[("nosuch", json!({}))]));
    gw.restart().await.unwrap_err();
    let h = gw.restart_history();
    assert_eq!(h.len(), 3);
    assert_eq!(
        h.iter().map(|r| r.trigger.as_str()).collect::<Vec<_>>(),
        ["api", "gateway.restart", "SIGUSR1"]
    );
    assert!(!h[0].ok && h[0].error.as_ref().unwrap().contains("nosuch"));
    assert_eq!(h[0].generation, 3, "a failed restart records who serves");
    assert_eq!(h[1].methods_added, ["probe.x"]);
    assert_eq!(h[1].methods_removed, ["probe.ping"]);
    assert_eq!(h[1].plugins_changed, ["probe"]);
    assert_eq!(h[1].pending_process_settings, ["auth.mode", "server.port"]);
    assert!(h[2].pending_process_settings.is_empty());
    assert!(h[2].plugins_changed.is_empty());

    let status = call(&gw, "status", json!({})).await.unwrap();
    let last = &status["lastRestart"];
    assert_eq!(last, &status["restartHistory"][0]);
    assert_eq!(last["ok"], false);
    assert_eq!(last["trigger"], "api");
    assert_eq!(
        last["pendingProcessSettings"],
        json!(["auth.mode", "server.port"])
    );
    let rec = &status["restartHistory"][1];
    for key in ["durationMs", "atMs", "generation"] {
        assert!(rec[key].is_u64(), "{key} is an integer: {rec}");
    }
    for key in ["build", "handover", "stopOld", "startNew"] {
        assert!(rec["phasesMs"][key].is_u64(), "{key}: {rec}");
    }
    assert_eq!(rec["methodsAdded"], json!(["probe.x"]));
    assert_eq!(rec["pluginsChanged"], json!(["probe"]));

    // Bounded: N-1, N, N+1 and 2N records kept as N, newest first.
    source.inner.set(config_with(&[("probe", json!({}))]));
    let mut done = 3;
    for target in [
        RESTART_HISTORY_LEN - 1,
        RESTART_HISTORY_LEN,
        RESTART_HISTORY_LEN + 1,
        2 * RESTART_HISTORY_LEN,
    ] {
        while done < target {
            gw.restart().await.unwrap();
            done += 1;
        }
        let h = gw.restart_history();
        assert_eq!(h.len(), target.min(RESTART_HISTORY_LEN), "after {target}");
        assert!(
            h.windows(2).all(|w| w[0].generation >= w[1].generation),
            "newest first"
        );
        assert_eq!(h[0].generation, gw.current().generation());
    }
}

#[tokio::test]
async fn restart_reports_carry_the_trigger_and_per_plugin_timings() {
    let (h, _second) = pair(pair_config(json!({}), json!({}))).await;
    let rep = h.gateway.restart_with("SIGUSR2").await.unwrap();
    assert_eq!(rep.trigger, "SIGUSR2");
    let ids: Vec<&str> = rep.handovers.iter().map(|x| x.id.as_str()).collect();
    assert_eq!(ids, ["core", "probe", "second"]);
    assert!(
        rep.handovers
            .iter()
            .all(|x| x.kind == HandoverKind::Replaced)
    );
    assert!(rep.duration >= rep.phases.build + rep.phases.handover);
    assert!(rep.phases.handover >= rep.phases.stop_old.max(rep.phases.start_new));
    assert_eq!(h.probe.count("start:probe:2"), 1);
}

/// A plugin with one channel, `hang`: a message `{"hang": true}` is never
/// answered, anything else is queued at once with the generation in its id.
fn hanging_channel_factory() -> plugin_api::PluginFactory {
    struct HangPlugin(u64);
    struct HangChannel(u64);
    impl plugin_api::Plugin for HangPlugin {
        fn id(&self) -> &str {
            "hang"
        }
        fn version(&self) -> &str {
            "1.0.0"
        }
        fn register(&self, r: &mut plugin_api::Registrar) {
            r.channel("hang", Arc::new(HangChannel(self.0)));
        }
    }
    impl plugin_api::Channel for HangChannel {
        fn send(
            self: Arc<Self>,
            _ctx: plugin_api::RequestContext,
            message: plugin_api::OutboundMessage,
        ) -> plugin_api::BoxFuture<Result<plugin_api::SendReceipt, plugin_api::RpcError>> {
            Box::pin(async move {
                if message.message["hang"] == true {
                    std::future::pending::<()>().await;
                }
                Ok(plugin_api::SendReceipt {
                    message_id: format!("gen{}", self.0),
                })
            })
        }
    }
    plugin_api::PluginFactory::new("hang", "1.0.0", |ctx: plugin_api::PluginContext| {
        Ok(Arc::new(HangPlugin(ctx.life.generation())))
    })
}

// Invariant 5 for the core `send`: it is counted in the channel's plugin,
// so that plugin's drain deadline cancels it like one of its own requests,
// while the new generation's channel already serves. (The core plugin's own
// drain shares the deadline here; the unit test in `core_plugin.rs` shows
// that the channel's deadline alone ends the send.)
#[tokio::test(start_paused = true)]
async fn a_core_send_into_a_draining_channel_is_cancelled_at_the_channels_deadline() {
    let mut cfg = config_with(&[("probe", json!({})), ("hang", json!({}))]);
    cfg.restart.drain_timeout_ms = 250;
    let h = harness(cfg, vec![hanging_channel_factory()]).await;
    let gw = h.gateway.clone();
    let send = |message: Value, key: &str| {
        let gw = gw.clone();
        let params =
            json!({"channel": "hang", "to": "x", "message": message, "idempotencyKey": key});
        async move { call(&gw, "send", params).await }
    };
    assert_eq!(send(json!("hi"), "a").await.unwrap()["messageId"], "gen1");
    let hung = tokio::spawn(send(json!({"hang": true}), "b"));
    let old = gw.current();
    assert!(eventually(Duration::from_secs(1), || old.plugin_in_flight("hang") == 1).await);
    drop(old);
    // The build takes no time on the paused clock: the drain starts now.
    let swapped = Instant::now();
    let restart = tokio::spawn({
        let gw = gw.clone();
        async move { gw.restart().await }
    });
    assert!(eventually(Duration::from_secs(1), || gw.current().generation() == 2).await);
    // The new generation's channel serves at once.
    assert_eq!(send(json!("hi"), "c").await.unwrap()["messageId"], "gen2");
    tokio::time::sleep_until(swapped + Duration::from_millis(249)).await;
    assert!(!hung.is_finished(), "pending until the deadline");
    tokio::time::sleep_until(swapped + Duration::from_millis(251)).await;
    assert!(hung.is_finished(), "answered at the deadline");
    let err = hung.await.unwrap().unwrap_err();
    assert_eq!(err.code, ErrorCode::Unavailable);
    assert_eq!(err.retryable, Some(true));
    assert_eq!(err.details.unwrap()["reason"], "gateway-restarting");
    let rep = restart.await.unwrap().unwrap();
    let channel = rep.handovers.iter().find(|x| x.id == "hang").unwrap();
    assert_eq!((channel.in_flight, channel.cancelled), (1, 1));
    // In flight in two plugins (core and channel), answered once: counted once.
    assert!(rep.shutdown.drain_timed_out);
    assert_eq!(rep.shutdown.cancelled_requests, 1);
    assert_eq!(gw.stats().drain_cancelled_requests, 1);
    assert!(
        channel.drain >= Duration::from_millis(250) && channel.drain < Duration::from_millis(260),
        "{channel:?}"
    );
    assert_eq!(gw.stats().in_flight, 0, "the slot is free");
    assert_eq!(gw.stats().live_scopes, 1);
    assert_eq!(send(json!("hi"), "d").await.unwrap()["messageId"], "gen2");
}
