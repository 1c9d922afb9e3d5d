//! One test (at least) per invariant 1 to 9 of `docs/restart.md`, under a
//! comment with its number; invariants 10 and 11 are tested in `handover.rs`.

use crate::common::*;
use gateway_core::PluginPhase;
use plugin_api::{ClientInfo, ConnId, ConnectionInfo, ErrorCode, Params, Role, Scopes, scope};
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn methods(gw: &gateway_core::Gateway) -> BTreeSet<String> {
    gw.features().methods.iter().cloned().collect()
}

// 1. One source of truth.
#[tokio::test]
async fn advertised_status_and_dispatch_read_one_registry() {
    let h = harness(
        config_with(&[("probe", json!({"methods": ["probe.a", "probe.b"]}))]),
        vec![],
    )
    .await;
    let gw = &h.gateway;
    let advertised = methods(gw);
    for m in [
        "health",
        "status",
        "send",
        "gateway.restart",
        "probe.a",
        "probe.b",
        "probe.slow",
    ] {
        assert!(advertised.contains(m), "{m} advertised");
    }
    // Every advertised method dispatches on generation 1. `gateway.restart`
    // would restart the gateway (it has its own tests), so it is not called.
    for m in advertised.iter().filter(|m| *m != "gateway.restart") {
        assert!(dispatches(gw, m).await, "{m} dispatches");
    }
    assert_eq!(gw.current().generation(), 1, "still on generation 1");
    assert_eq!(gw.stats().restarts_ok, 0);
    let status = call(gw, "status", json!({})).await.unwrap();
    let listed: BTreeSet<String> = serde_json::from_value(status["methods"].clone()).unwrap();
    assert_eq!(listed, advertised);
    assert_eq!(status["methodCount"], advertised.len());
    // Each advertised method with the scope dispatch enforces.
    let scopes = status["methodScopes"].as_object().unwrap();
    let keys: BTreeSet<String> = scopes.keys().cloned().collect();
    assert_eq!(keys, advertised);
    assert_eq!(scopes["health"], serde_json::Value::Null);
    assert_eq!(scopes["status"], "operator.read");
    assert_eq!(scopes["gateway.restart"], "operator.admin");
    // And the registry object behind all three is the one that dispatches.
    let scope = gw.current();
    for m in scope.features().methods.iter() {
        assert!(scope.registry().get(m).is_some());
    }
    let err = call(gw, "probe.nope", json!({})).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidRequest);
    assert_eq!(err.message, "unknown method: probe.nope");
}

// 2. Build, then swap; a failed build keeps the old scope serving.
#[tokio::test]
async fn failed_builds_keep_the_old_scope_serving_and_are_reported() {
    let h = harness(config_with(&[("probe", json!({}))]), vec![]).await;
    let gw = &h.gateway;
    let before = methods(gw);
    let cases = [
        (
            "constructor error",
            config_with(&[("probe", json!({"failConstruct": true}))]),
            "constructor refused",
        ),
        (
            "constructor panic",
            config_with(&[("probe", json!({"panicConstruct": true}))]),
            "constructor panicked",
        ),
        (
            "bad plugin config",
            config_with(&[("probe", json!({"methods": "nope"}))]),
            "bad probe config",
        ),
        (
            "unknown plugin",
            config_with(&[("nosuch", json!({}))]),
            "no plugin with id `nosuch`",
        ),
        (
            "duplicate method",
            config_with(&[("probe", json!({"methods": ["probe.x", "probe.x"]}))]),
            "duplicate method `probe.x`",
        ),
        (
            "core name",
            config_with(&[("probe", json!({"methods": ["status"]}))]),
            "reserved for the core",
        ),
    ];
    for (i, (what, cfg, needle)) in cases.into_iter().enumerate() {
        h.config.set(cfg);
        let err = gw.restart().await.expect_err(what);
        assert!(err.error.contains(needle), "{what}: {}", err.error);
        assert_eq!(err.serving, 1, "{what}");
        assert_eq!(gw.current().generation(), 1, "{what}");
        assert_eq!(methods(gw), before, "{what}");
        assert!(dispatches(gw, "probe.ping").await, "{what}");
        let status = call(gw, "status", json!({})).await.unwrap();
        assert_eq!(status["lastRestart"]["ok"], false, "{what}");
        assert!(
            status["lastRestart"]["error"]
                .as_str()
                .unwrap()
                .contains(needle)
        );
        assert_eq!(gw.stats().restarts_failed, i as u64 + 1);
        assert_eq!(
            gw.stats().live_scopes,
            1,
            "{what}: discarded build released"
        );
    }
    // The same failure through the admin method: a clear error, old scope serves.
    let err = call(gw, "gateway.restart", json!({})).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Unavailable);
    assert_eq!(err.details.as_ref().unwrap()["code"], "RESTART_FAILED");
    assert!(
        err.message.contains("reserved for the core"),
        "{}",
        err.message
    );
    // Fixing the config makes the next restart succeed: nothing got stuck.
    h.config.set(config_with(&[("probe", json!({}))]));
    let rep = gw.restart().await.unwrap();
    assert_eq!(rep.generation, gw.current().generation());
    assert!(rep.generation > 1);
}

// 3. Duplicate names are errors naming both owners, across plugins.
#[tokio::test]
async fn duplicate_method_across_two_plugins_names_both() {
    let other = Arc::new(Probe::default());
    let h = harness(
        config_with(&[
            ("probe", json!({})),
            ("second", json!({"methods": ["second.ping"]})),
        ]),
        vec![probe_factory("second", other)],
    )
    .await;
    h.config.set(config_with(&[
        ("probe", json!({})),
        ("second", json!({"methods": ["probe.ping"]})),
    ]));
    let err = h.gateway.restart().await.unwrap_err();
    assert!(
        err.error.contains(
            "duplicate method `probe.ping`: declared by plugin `probe` and by plugin `second`"
        ),
        "{}",
        err.error
    );
}

// 4. One atomic swap: every request is answered by exactly one generation and
// an advertised method is never unknown, while restarts run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_during_restarts_are_answered_by_one_generation() {
    let h = harness(config_with(&[("probe", json!({}))]), vec![]).await;
    let gw = h.gateway.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let gw = gw.clone();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let admitted_at_least = gw.current().generation();
                let r = call(&gw, "probe.ping", json!({}))
                    .await
                    .expect("advertised method answered");
                let g = r["generation"].as_u64().unwrap();
                assert!(
                    g >= admitted_at_least,
                    "answered by an older generation than was current"
                );
                seen.push(g);
                // A sync handler completes without yielding; let the
                // restart task have a worker thread too.
                tokio::task::yield_now().await;
            }
            seen
        }));
    }
    for _ in 0..30 {
        gw.restart().await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let mut gens = BTreeSet::new();
    for w in workers {
        let seen = w.await.unwrap();
        assert!(
            seen.windows(2).all(|p| p[0] <= p[1]),
            "generations never go backwards per caller"
        );
        gens.extend(seen);
    }
    assert!(
        gens.len() > 1,
        "requests were served across generations: {gens:?}"
    );
}

// 5. Drain, then stop, then start.
#[tokio::test]
async fn in_flight_requests_finish_before_old_services_stop_and_new_start() {
    let h = harness(config_with(&[("probe", json!({}))]), vec![]).await;
    let gw = h.gateway.clone();
    let slow = tokio::spawn({
        let gw = gw.clone();
        async move { call(&gw, "probe.slow", json!({"ms": 200})).await }
    });
    assert!(eventually(Duration::from_secs(2), || gw.stats().in_flight == 1).await);
    let rep = gw.restart().await.unwrap();
    assert!(!rep.shutdown.drain_timed_out);
    let r = slow.await.unwrap().unwrap();
    assert_eq!(
        r["generation"], 1,
        "completed on the generation that admitted it"
    );
    let log = h.probe.log();
    let pos = |s: &str| {
        log.iter()
            .position(|l| l == s)
            .unwrap_or_else(|| panic!("{s} in {log:?}"))
    };
    assert!(pos("done:1") < pos("stop:probe:1"), "{log:?}");
    assert!(pos("stop:probe:1") < pos("start:probe:2"), "{log:?}");
    assert_eq!(h.probe.completed_after_stop.load(Ordering::SeqCst), 0);
}

// Paused time: the sleeps below advance the clock at once, so a handler that
// kept running after its cancellation would finish (and record it) here.
#[tokio::test(start_paused = true)]
async fn drain_deadline_cancels_with_retryable_unavailable_and_nothing_runs_after_stop() {
    let mut cfg = config_with(&[("probe", json!({}))]);
    cfg.restart.drain_timeout_ms = 100;
    let h = harness(cfg, vec![]).await;
    let gw = h.gateway.clone();
    let slow = tokio::spawn({
        let gw = gw.clone();
        async move { call(&gw, "probe.slow", json!({"ms": 1500})).await }
    });
    assert!(eventually(Duration::from_secs(2), || gw.stats().in_flight == 1).await);
    let rep = gw.restart().await.unwrap();
    assert!(rep.shutdown.drain_timed_out);
    assert_eq!(rep.shutdown.cancelled_requests, 1);
    let err = slow.await.unwrap().unwrap_err();
    assert_eq!(err.code, ErrorCode::Unavailable);
    assert_eq!(err.retryable, Some(true));
    assert_eq!(err.details.unwrap()["reason"], "gateway-restarting");
    // The cancelled handler's future was dropped, unfinished ...
    assert_eq!(h.probe.abandoned.load(Ordering::SeqCst), 1);
    // ... and nothing of it runs later: past its 1.5 s on the (paused) clock
    // it has not finished.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(h.probe.count("done:1"), 0, "{:?}", h.probe.log());
    assert_eq!(h.probe.completed_after_stop.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn requests_wait_for_their_plugin_to_start_bounded() {
    let h = harness(config_with(&[("probe", json!({}))]), vec![]).await;
    let gw = h.gateway.clone();
    // Generation 2's service takes 300 ms to start; a request in that window waits.
    h.config
        .set(config_with(&[("probe", json!({"startDelayMs": 300}))]));
    let restart = tokio::spawn({
        let gw = gw.clone();
        async move { gw.restart().await }
    });
    assert!(eventually(Duration::from_secs(2), || gw.current().generation() == 2).await);
    let r = call(&gw, "probe.ping", json!({})).await.unwrap();
    assert_eq!(r["generation"], 2);
    assert!(
        h.probe.count("start:probe:2") == 1,
        "answered only after start: {:?}",
        h.probe.log()
    );
    restart.await.unwrap().unwrap();

    // With a short bound the wait ends in a retryable UNAVAILABLE naming the method.
    let mut cfg = config_with(&[("probe", json!({"startDelayMs": 500}))]);
    cfg.restart.start_wait_ms = 50;
    h.config.set(cfg);
    let restart = tokio::spawn({
        let gw = gw.clone();
        async move { gw.restart().await }
    });
    assert!(eventually(Duration::from_secs(2), || gw.current().generation() == 3).await);
    let err = call(&gw, "probe.ping", json!({})).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Unavailable);
    assert_eq!(err.retryable, Some(true));
    assert!(err.retry_after_ms.is_some());
    assert_eq!(err.details.as_ref().unwrap()["method"], "probe.ping");
    // Core methods do not wait on other plugins.
    assert!(call(&gw, "health", json!({})).await.is_ok());
    restart.await.unwrap().unwrap();
    assert!(call(&gw, "probe.ping", json!({})).await.is_ok());
}

#[tokio::test]
async fn a_plugin_that_fails_to_start_is_reported_and_its_methods_unavailable() {
    let h = harness(config_with(&[("probe", json!({}))]), vec![]).await;
    h.config
        .set(config_with(&[("probe", json!({"failStart": true}))]));
    let rep = h.gateway.restart().await.unwrap();
    assert_eq!(rep.failed_plugins.len(), 1);
    let err = call(&h.gateway, "probe.ping", json!({})).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Unavailable);
    assert_eq!(err.details.unwrap()["reason"], "plugin-failed");
    let health = call(&h.gateway, "health", json!({})).await.unwrap();
    assert_eq!(health["ok"], false);
    assert_eq!(health["plugins"]["errors"][0]["id"], "probe");
    // Its stop hook still runs exactly once when the generation ends.
    h.config.set(config_with(&[("probe", json!({}))]));
    h.gateway.restart().await.unwrap();
    assert_eq!(h.probe.count("stop:probe:2"), 1);
}

// 6. Explicit Drop: the old scope is gone after a restart.
#[tokio::test]
async fn old_scope_is_released_and_its_handles_refuse() {
    let h = harness(
        config_with(&[("probe", json!({"spawnTask": true}))]),
        vec![],
    )
    .await;
    let gw = &h.gateway;
    assert_eq!(
        call(gw, "probe.state", json!({})).await.unwrap(),
        json!(100)
    );
    let weak = Arc::downgrade(&gw.current());
    let (old_handle, old_sink, old_life) = h.probe.last.lock().unwrap().clone().unwrap();
    assert!(
        eventually(Duration::from_secs(1), || h
            .probe
            .ticks
            .load(Ordering::SeqCst)
            > 0)
        .await
    );
    gw.restart().await.unwrap();
    assert!(weak.upgrade().is_none(), "Weak to the old scope is dead");
    assert_eq!(gw.stats().live_scopes, 1);
    assert_eq!(
        h.probe.alive.load(Ordering::SeqCst),
        1,
        "old plugin instance dropped"
    );
    assert!(old_handle.get().is_err(), "old handle refuses");
    assert!(
        old_sink
            .send(&[ConnId(1)], "plugin.probe.tick", &1)
            .is_err(),
        "old sink refuses"
    );
    assert!(old_life.spawn(async {}).is_err());
    // The new generation has its own state.
    assert_eq!(
        call(gw, "probe.state", json!({})).await.unwrap(),
        json!(200)
    );
    // Old background task no longer runs: only generation 2's task ticks.
    h.config.set(config_with(&[("probe", json!({}))]));
    gw.restart().await.unwrap();
    let t = h.probe.ticks.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(
        h.probe.ticks.load(Ordering::SeqCst),
        t,
        "no task of a retired generation runs"
    );
}

// 7. Truthful reloads: code identity and change flags.
#[tokio::test]
async fn reports_code_identity_and_what_changed() {
    let h = harness(config_with(&[("probe", json!({}))]), vec![]).await;
    let rep = h.gateway.restart().await.unwrap();
    let probe = rep.plugins.iter().find(|p| p.id == "probe").unwrap();
    assert!(!probe.changed, "same code and config: unchanged");
    assert_eq!(probe.version, "1.0.0");
    assert_eq!(probe.code_hash.len(), 16);
    h.config
        .set(config_with(&[("probe", json!({"methods": ["probe.new"]}))]));
    let rep2 = h.gateway.restart().await.unwrap();
    let probe2 = rep2.plugins.iter().find(|p| p.id == "probe").unwrap();
    assert!(probe2.changed);
    assert_ne!(probe2.code_hash, probe.code_hash);
    assert_eq!(rep2.methods_added, vec!["probe.new".to_string()]);
    assert_eq!(rep2.methods_removed, vec!["probe.ping".to_string()]);
    assert!(dispatches(&h.gateway, "probe.new").await);
    assert!(!dispatches(&h.gateway, "probe.ping").await);
}

// 8. One restart at a time; concurrent triggers coalesce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_restart_triggers_coalesce() {
    // The first restart's start phase takes 300 ms: a wide window for the
    // ten triggers below to arrive while it runs, even on a loaded machine.
    let h = harness(
        config_with(&[("probe", json!({"startDelayMs": 300}))]),
        vec![],
    )
    .await;
    let gw = h.gateway.clone();
    let first = tokio::spawn({
        let gw = gw.clone();
        async move { gw.restart().await }
    });
    assert!(eventually(Duration::from_secs(2), || gw.current().generation() == 2).await);
    let mut joins = Vec::new();
    for _ in 0..10 {
        let gw = gw.clone();
        joins.push(tokio::spawn(async move { gw.restart().await }));
    }
    let first = first.await.unwrap().unwrap();
    let mut gens = BTreeSet::new();
    for j in joins {
        gens.insert(j.await.unwrap().unwrap().generation);
    }
    assert_eq!(first.generation, 2);
    assert_eq!(
        gens.len(),
        1,
        "ten triggers during a restart share one pending restart: {gens:?}"
    );
    assert_eq!(gw.current().generation(), 3);
    assert_eq!(gw.stats().restarts_ok, 2);
    assert_eq!(h.probe.count("start:probe:"), 3);
}

#[tokio::test]
async fn restart_bookkeeping_survives_failures() {
    let h = harness(config_with(&[("probe", json!({}))]), vec![]).await;
    for _ in 0..5 {
        h.config
            .set(config_with(&[("probe", json!({"failConstruct": true}))]));
        assert!(h.gateway.restart().await.is_err());
        h.config.set(config_with(&[("probe", json!({}))]));
        assert!(h.gateway.restart().await.is_ok());
    }
    assert_eq!(h.gateway.stats().restarts_ok, 5);
    assert_eq!(h.gateway.stats().restarts_failed, 5);
}

// 9. Inspection is side-effect free.
#[tokio::test]
async fn validate_and_status_change_nothing_that_dispatches() {
    let h = harness(config_with(&[("probe", json!({}))]), vec![]).await;
    let gw = &h.gateway;
    let before = methods(gw);
    h.config.set(config_with(&[(
        "probe",
        json!({"methods": ["probe.other"]}),
    )]));
    let would = gw.validate().unwrap();
    assert!(would.contains(&"probe.other".to_string()));
    assert_eq!(gw.current().generation(), 1);
    assert_eq!(methods(gw), before);
    assert!(dispatches(gw, "probe.ping").await);
    assert_eq!(
        h.probe.starts.load(Ordering::SeqCst),
        1,
        "a discarded build starts nothing"
    );
    assert_eq!(gw.stats().live_scopes, 1);
    h.config
        .set(config_with(&[("probe", json!({"failConstruct": true}))]));
    assert!(gw.validate().is_err());
    let _ = call(gw, "status", json!({})).await.unwrap();
    assert_eq!(methods(gw), before);
}

// Access control travels with the registry entry.
#[tokio::test]
async fn scopes_and_roles_are_enforced() {
    let h = harness(config_with(&[("probe", json!({}))]), vec![]).await;
    let ctx = |role, scopes: &[&str]| {
        plugin_api::host::request_context(Arc::new(ConnectionInfo {
            conn_id: ConnId(9),
            role,
            scopes: Scopes::new(scopes.iter().copied()),
            client: ClientInfo::default(),
        }))
    };
    let gw = &h.gateway;
    let none = ctx(Role::Operator, &[]);
    assert!(
        gw.dispatch(none.clone(), "health", Params::none())
            .await
            .is_ok()
    );
    let err = gw
        .dispatch(none, "status", Params::none())
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Forbidden);
    assert_eq!(err.message, "missing scope: operator.read");
    assert_eq!(
        err.details.unwrap(),
        json!({"code":"MISSING_SCOPE","missingScope":"operator.read","requiredScopes":["operator.read"]})
    );
    let read = ctx(Role::Operator, &[scope::READ]);
    assert!(
        gw.dispatch(read.clone(), "status", Params::none())
            .await
            .is_ok()
    );
    let err = gw
        .dispatch(read, "gateway.restart", Params::none())
        .await
        .unwrap_err();
    assert_eq!(err.message, "missing scope: operator.admin");
    let node = ctx(Role::Node, &[scope::ADMIN]);
    assert!(
        gw.dispatch(node.clone(), "health", Params::none())
            .await
            .is_ok()
    );
    assert_eq!(
        gw.dispatch(node, "status", Params::none())
            .await
            .unwrap_err()
            .code,
        ErrorCode::Forbidden
    );
}

#[tokio::test]
async fn a_panicking_handler_answers_unavailable_and_the_gateway_carries_on() {
    let h = harness(config_with(&[("probe", json!({}))]), vec![]).await;
    let err = call(&h.gateway, "probe.panic", json!({}))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Unavailable);
    assert!(
        err.message.contains("probe handler panicked"),
        "{}",
        err.message
    );
    assert!(call(&h.gateway, "probe.ping", json!({})).await.is_ok());
    assert!(matches!(
        h.gateway.current().plugin_phases()[1].1,
        PluginPhase::Running
    ));
}

#[tokio::test]
async fn shutdown_refuses_new_requests_and_stops_services_once() {
    let h = harness(config_with(&[("probe", json!({}))]), vec![]).await;
    let gw = h.gateway.clone();
    let slow = tokio::spawn({
        let gw = gw.clone();
        async move { call(&gw, "probe.slow", json!({"ms": 100})).await }
    });
    assert!(eventually(Duration::from_secs(2), || gw.stats().in_flight == 1).await);
    let rep = gw.shutdown(Some(Duration::from_secs(2))).await;
    assert!(!rep.drain_timed_out);
    assert!(slow.await.unwrap().is_ok(), "in-flight request drained");
    let err = call(&gw, "health", json!({})).await.unwrap_err();
    assert_eq!(err.details.unwrap()["reason"], "gateway-closing");
    assert_eq!(h.probe.stops.load(Ordering::SeqCst), 1);
    assert!(gw.restart().await.is_err(), "no restart after shutdown");
    assert_eq!(h.probe.stops.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn shutdown_refuses_new_requests_while_it_waits_for_a_running_restart() {
    let h = harness(config_with(&[("probe", json!({}))]), vec![]).await;
    let gw = h.gateway.clone();
    // Generation 2's service takes 800 ms to start, which keeps the restart
    // running while shutdown waits for it.
    h.config
        .set(config_with(&[("probe", json!({"startDelayMs": 800}))]));
    let restart = tokio::spawn({
        let gw = gw.clone();
        async move { gw.restart().await }
    });
    assert!(eventually(Duration::from_secs(2), || gw.current().generation() == 2).await);
    let stop = tokio::spawn({
        let gw = gw.clone();
        async move { gw.shutdown(Some(Duration::from_secs(2))).await }
    });
    assert!(eventually(Duration::from_secs(2), || gw.is_closing()).await);
    assert!(!restart.is_finished(), "the restart is still running");
    let err = call(&gw, "health", json!({})).await.unwrap_err();
    assert_eq!(err.details.unwrap()["reason"], "gateway-closing");
    let Err(err) = gw.admit() else {
        panic!("admit refuses once closing")
    };
    assert_eq!(err.details.unwrap()["reason"], "gateway-closing");
    let _ = restart.await.unwrap();
    stop.await.unwrap();
}
