//! Acceptance scenarios 1 and 3-7 of `docs/restart.md`, at library
//! level, with config and manifests as real files on disk. (Scenario 2, under
//! load over sockets, lives in ws-proxy's tests.)

use crate::common::*;
use gateway_core::{Catalog, Gateway, GatewayOptions, MANIFEST_FILE, TomlFileConfig};
use plugin_api::host::NullTransport;
use serde_json::json;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

fn write_manifest(dir: &Path, id: &str, methods: &[&str]) {
    let plugin_dir = dir.join(id);
    std::fs::create_dir_all(&plugin_dir).unwrap();
    let methods: Vec<_> = methods
        .iter()
        .map(|m| json!({"name": m, "scope": "operator.read", "reply": {"from": m}}))
        .collect();
    let manifest = json!({"id": id, "version": "1.0.0", "methods": methods,
        "configSchema": {"type": "object", "additionalProperties": false,
            "properties": {"greeting": {"type": "string"}}}});
    std::fs::write(
        plugin_dir.join(MANIFEST_FILE),
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
}

struct DiskGateway {
    gateway: Gateway,
    config_path: std::path::PathBuf,
    plugins: tempfile::TempDir,
    _state: tempfile::TempDir,
}

async fn disk_gateway(config_extra: &str) -> DiskGateway {
    let plugins = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    write_manifest(plugins.path(), "disk", &["disk.alpha"]);
    let config_path = state.path().join("gateway.toml");
    write_config(&config_path, plugins.path(), config_extra);
    let gateway = Gateway::start(GatewayOptions {
        catalog: Catalog::new().with(probe_factory("probe", Arc::new(Probe::default()))),
        config: Arc::new(TomlFileConfig::new(&config_path)),
        state_dir: state.path().to_path_buf(),
        transport: Arc::new(NullTransport),
    })
    .await
    .expect("first build");
    DiskGateway {
        gateway,
        config_path,
        plugins,
        _state: state,
    }
}

fn write_config(path: &Path, plugin_dir: &Path, extra: &str) {
    let text = format!(
        "[server]\nport = 18789 # not ours: ignored by gateway-core\n\n[plugins]\ndirs = [{:?}]\n\n{extra}\n",
        plugin_dir.display().to_string()
    );
    std::fs::write(path, text).unwrap();
}

/// A new connection's `features.methods` equals exactly the set that dispatches.
async fn assert_advertised_equals_dispatchable(gw: &Gateway, candidates: &[&str]) {
    let advertised: BTreeSet<String> = gw.features().methods.iter().cloned().collect();
    for m in &advertised {
        if m != "gateway.restart" {
            assert!(dispatches(gw, m).await, "advertised {m} must dispatch");
        }
    }
    for m in candidates {
        assert_eq!(
            advertised.contains(*m),
            dispatches(gw, m).await,
            "{m}: advertised iff it dispatches"
        );
    }
}

// Scenario 1: restart N >= 50 times; after each, advertised == dispatchable.
#[tokio::test]
async fn scenario_1_fifty_restarts_advertise_exactly_what_dispatches() {
    let d = disk_gateway("").await;
    let gw = &d.gateway;
    for i in 0..50u32 {
        // Alternate the on-disk method set so every restart changes something.
        let set: &[&str] = if i % 2 == 0 {
            &["disk.alpha", "disk.beta"]
        } else {
            &["disk.alpha"]
        };
        write_manifest(d.plugins.path(), "disk", set);
        let rep = gw.restart().await.unwrap();
        assert_eq!(rep.generation, u64::from(i) + 2);
        assert_advertised_equals_dispatchable(gw, &["disk.alpha", "disk.beta", "probe.ping"]).await;
        let health = call(gw, "health", json!({})).await.unwrap();
        assert_eq!(health["generation"], rep.generation);
    }
}

// Scenario 3: a request admitted by generation A completes on A or gets a
// retryable UNAVAILABLE; nothing runs on A after A's services stopped.
// Paused time: exact deadlines, and a handler that kept running after its
// cancellation would finish during the sleep at the end.
#[tokio::test(start_paused = true)]
async fn scenario_3_requests_admitted_by_a_finish_on_a_or_retry() {
    let mut cfg = config_with(&[("probe", json!({}))]);
    cfg.restart.drain_timeout_ms = 400;
    let h = harness(cfg, vec![]).await;
    let gw = h.gateway.clone();
    let mut reqs = Vec::new();
    // Margins of 300 ms or more either side of the deadline.
    for ms in [20u64, 60, 100, 800, 1200] {
        let gw = gw.clone();
        reqs.push((
            ms,
            tokio::spawn(async move { call(&gw, "probe.slow", json!({"ms": ms})).await }),
        ));
    }
    assert!(
        eventually(std::time::Duration::from_secs(2), || gw.stats().in_flight
            == 5)
        .await
    );
    gw.restart().await.unwrap();
    for (ms, r) in reqs {
        match r.await.unwrap() {
            Ok(v) => {
                assert!(ms < 400, "{ms} ms request finished within the drain");
                assert_eq!(v["generation"], 1);
            }
            Err(e) => {
                assert!(ms > 400, "{ms} ms request cancelled at the deadline");
                assert_eq!(e.retryable, Some(true));
                assert_eq!(e.details.unwrap()["reason"], "gateway-restarting");
            }
        }
    }
    // The two cancelled handlers were dropped unfinished, and past the
    // longest request (on the paused clock) neither has finished.
    assert_eq!(h.probe.abandoned.load(Ordering::SeqCst), 2);
    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
    assert_eq!(h.probe.completed_after_stop.load(Ordering::SeqCst), 0);
    assert_eq!(h.probe.count("done:1"), 3, "{:?}", h.probe.log());
}

// Scenario 4: services and tasks belong to their generation; each stop hook
// runs exactly once.
#[tokio::test]
async fn scenario_4_services_and_tasks_belong_to_their_generation() {
    let h = harness(
        config_with(&[("probe", json!({"spawnTask": true}))]),
        vec![],
    )
    .await;
    for _ in 0..10 {
        h.gateway.restart().await.unwrap();
    }
    let current = h.gateway.current().generation();
    assert_eq!(current, 11);
    for g in 1..current {
        let stops = h
            .probe
            .log()
            .iter()
            .filter(|l| **l == format!("stop:probe:{g}"))
            .count();
        assert_eq!(stops, 1, "stop of generation {g} ran once");
    }
    assert!(!h.probe.log().contains(&format!("stop:probe:{current}")));
    assert_eq!(h.probe.starts.load(Ordering::SeqCst), 11);
    assert_eq!(h.probe.stops.load(Ordering::SeqCst), 10);
    // Exactly one generation's task ticks: stop the current one too and the
    // ticking must cease entirely.
    h.gateway.shutdown(None).await;
    let t = h.probe.ticks.load(Ordering::SeqCst);
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    assert_eq!(h.probe.ticks.load(Ordering::SeqCst), t);
    assert_eq!(h.probe.stops.load(Ordering::SeqCst), 11);
}

// Scenario 5: edit a manifest and config on disk; the new set is served and
// advertised, the old is gone.
#[tokio::test]
async fn scenario_5_manifest_and_config_edits_on_disk_take_effect() {
    let d = disk_gateway("").await;
    let gw = &d.gateway;
    assert!(dispatches(gw, "disk.alpha").await);
    assert!(!dispatches(gw, "disk.gamma").await);

    write_manifest(d.plugins.path(), "disk", &["disk.gamma"]);
    let rep = gw.restart().await.unwrap();
    assert_eq!(rep.methods_added, vec!["disk.gamma".to_string()]);
    assert_eq!(rep.methods_removed, vec!["disk.alpha".to_string()]);
    assert!(rep.plugins.iter().any(|p| p.id == "disk" && p.changed));
    assert_advertised_equals_dispatchable(gw, &["disk.alpha", "disk.gamma"]).await;

    // A setting change reaches the plugin: the probe's method list is config.
    write_config(
        &d.config_path,
        d.plugins.path(),
        "[plugins.entries.probe.config]\nmethods = [\"probe.configured\"]\n",
    );
    gw.restart().await.unwrap();
    assert_advertised_equals_dispatchable(gw, &["probe.ping", "probe.configured"]).await;
    assert!(dispatches(gw, "probe.configured").await);

    // Disabling a plugin on disk removes all of its methods.
    write_config(
        &d.config_path,
        d.plugins.path(),
        "[plugins.entries.disk]\nenabled = false\n",
    );
    gw.restart().await.unwrap();
    assert!(!dispatches(gw, "disk.gamma").await);
    let status = call(gw, "status", json!({})).await.unwrap();
    assert_eq!(status["disabledPlugins"], json!(["disk"]));

    // A new plugin directory appears.
    write_manifest(d.plugins.path(), "fresh", &["fresh.hello"]);
    write_config(&d.config_path, d.plugins.path(), "");
    let rep = gw.restart().await.unwrap();
    assert!(rep.methods_added.contains(&"fresh.hello".to_string()));
    assert_eq!(
        call(gw, "fresh.hello", json!({})).await.unwrap(),
        json!({"from": "fresh.hello"})
    );
}

// The core plugin cannot be disabled (the gateway's policy says so): the
// restart fails naming the field and the old generation serves on.
#[tokio::test]
async fn disabling_the_core_plugin_is_refused_and_the_old_scope_serves_on() {
    let d = disk_gateway("").await;
    let gw = &d.gateway;
    write_config(
        &d.config_path,
        d.plugins.path(),
        "[plugins.entries.core]\nenabled = false\n",
    );
    let err = call(gw, "gateway.restart", json!({})).await.unwrap_err();
    assert!(
        err.message.contains("plugins.entries.core.enabled")
            && err.message.contains("the core plugin cannot be disabled"),
        "{}",
        err.message
    );
    assert_eq!(gw.current().generation(), 1);
    assert!(dispatches(gw, "status").await);
    assert!(dispatches(gw, "disk.alpha").await);
}

// Scenario 6: break the config, restart: the old scope keeps serving and the
// error (file, line, field) is visible in status and in gateway.restart.
#[tokio::test]
async fn scenario_6_broken_config_keeps_the_old_scope_and_reports_where() {
    let d = disk_gateway("").await;
    let gw = &d.gateway;
    let cases: &[(&str, &str)] = &[
        (
            "[plugins.entries.probe]\nenabled = \"yes\"\n",
            "plugins.entries.probe.enabled",
        ),
        ("[plugins\n", "gateway.toml:"),
        (
            "[plugins.entries.disk.config]\ngreeting = 5\n",
            "plugins.entries.disk.config.greeting",
        ),
        (
            "[plugins.entries.disk.config]\nvolume = 11\n",
            "plugins.entries.disk.config",
        ),
        ("[restart]\ndrain_timeout = 1\n", "unknown field"),
    ];
    for (extra, needle) in cases {
        write_config(&d.config_path, d.plugins.path(), extra);
        let err = call(gw, "gateway.restart", json!({})).await.unwrap_err();
        assert!(err.message.contains(needle), "{extra:?}: {}", err.message);
        assert!(
            err.message.contains("gateway.toml"),
            "names the file: {}",
            err.message
        );
        assert_eq!(gw.current().generation(), 1);
        assert!(dispatches(gw, "disk.alpha").await);
        let status = call(gw, "status", json!({})).await.unwrap();
        assert_eq!(status["lastRestart"]["ok"], false);
        assert!(
            status["lastRestart"]["error"]
                .as_str()
                .unwrap()
                .contains(needle)
        );
    }
    // The schema error points at the line of the offending key.
    write_config(
        &d.config_path,
        d.plugins.path(),
        "[plugins.entries.disk.config]\ngreeting = 5\n",
    );
    let err = gw.restart().await.unwrap_err();
    assert!(err.error.contains("gateway.toml:8:"), "{}", err.error);
    // A broken manifest is reported with its path.
    std::fs::write(d.plugins.path().join("disk").join(MANIFEST_FILE), "{ nope").unwrap();
    write_config(&d.config_path, d.plugins.path(), "");
    let err = gw.restart().await.unwrap_err();
    assert!(
        err.error.contains(MANIFEST_FILE) && err.error.contains("invalid JSON"),
        "{}",
        err.error
    );
    // Repair: the next restart succeeds.
    write_manifest(d.plugins.path(), "disk", &["disk.alpha"]);
    assert_eq!(gw.restart().await.unwrap().generation, 2);
}

/// A command plugin (the plugin-host test fixture, started by a wrapper
/// that first appends a line to `marker`): the marker tells every time its
/// process started.
fn write_marking_command_plugin(plugins: &Path, marker: &Path) {
    let dir = plugins.join("cmd");
    std::fs::create_dir_all(&dir).unwrap();
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-host/tests/fixtures/test_plugin.py");
    let script = dir.join("plugin.py");
    std::fs::write(
        &script,
        format!(
            "import os, sys\nwith open({:?}, 'a') as f:\n    f.write('started\\n')\n\
             os.execv(sys.executable, [sys.executable, {:?}])\n",
            marker.display().to_string(),
            fixture.display().to_string()
        ),
    )
    .unwrap();
    let manifest =
        json!({"id": "cmd", "runtime": {"command": ["python3", script.display().to_string()]}});
    std::fs::write(dir.join(MANIFEST_FILE), manifest.to_string()).unwrap();
}

/// A setting the config check refuses fails the restart before any plugin
/// process is started with it: the error names the file, line and field
/// (not what a process did with the value), the old generation and its
/// plugin process serve on, and no new process ran its startup code.
#[tokio::test]
async fn a_refused_setting_fails_the_restart_before_any_plugin_process_starts() {
    let plugins = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let marker = state.path().join("started");
    write_marking_command_plugin(plugins.path(), &marker);
    let config_path = state.path().join("gateway.toml");
    write_config(&config_path, plugins.path(), "");
    let gw = Gateway::start(GatewayOptions {
        catalog: Catalog::new(),
        config: Arc::new(TomlFileConfig::new(&config_path)),
        state_dir: state.path().to_path_buf(),
        transport: Arc::new(NullTransport),
    })
    .await
    .expect("first build");
    let started = || {
        std::fs::read_to_string(&marker)
            .unwrap_or_default()
            .lines()
            .count()
    };
    assert_eq!(started(), 1, "generation 1 started the process once");
    // `extra` starts on line 7, inside `[plugins]`.
    let cases: &[(&str, &str, usize)] = &[
        (
            "handshake_timeout_ms = 0\n",
            "plugins.handshake_timeout_ms",
            7,
        ),
        ("call_timeout_ms = 0\n", "plugins.call_timeout_ms", 7),
        (
            "max_calls_in_flight = 0\n",
            "plugins.max_calls_in_flight",
            7,
        ),
        (
            "[plugins.entries.cmd.env]\nOK = \"fine\"\nTOKEN = \"a\\u0000b\"\n",
            "plugins.entries.cmd.env.TOKEN",
            9,
        ),
        ("[requests]\ntimeout_ms = 0\n", "requests.timeout_ms", 8),
    ];
    for (extra, field, line) in cases {
        write_config(&config_path, plugins.path(), extra);
        let err = gw.restart().await.unwrap_err();
        let at = format!("gateway.toml:{line}:");
        assert!(
            err.error.contains(&format!("field `{field}`")) && err.error.contains(&at),
            "{extra:?}: {}",
            err.error
        );
        let refused = gw.validate().unwrap_err().to_string();
        assert!(refused.contains(field), "{refused}");
        assert_eq!(err.serving, 1);
        assert_eq!(gw.current().generation(), 1);
        let sum = call(&gw, "t.add", json!({"a": 2, "b": 3})).await.unwrap();
        assert_eq!(sum["sum"], 5, "generation 1's process serves on");
        assert_eq!(started(), 1, "{extra:?}: no process was started");
    }
    // The marker does see a start: the repaired config starts one.
    write_config(
        &config_path,
        plugins.path(),
        "handshake_timeout_ms = 10000\n",
    );
    assert_eq!(gw.restart().await.unwrap().generation, 2);
    assert_eq!(started(), 2);
    gw.shutdown(None).await;
}

// Scenario 7: 1000 restarts keep exactly one live scope and one live
// instance of each plugin (what the gateway holds does not grow).
#[tokio::test]
async fn scenario_7_a_thousand_restarts_keep_one_live_scope() {
    let h = harness(
        config_with(&[("probe", json!({"spawnTask": true}))]),
        vec![],
    )
    .await;
    let gw = &h.gateway;
    let weak_first = Arc::downgrade(&gw.current());
    for i in 0..1000 {
        gw.restart().await.unwrap();
        assert_eq!(gw.stats().live_scopes, 1, "after restart {i}");
        assert_eq!(h.probe.alive.load(Ordering::SeqCst), 1, "after restart {i}");
    }
    assert!(weak_first.upgrade().is_none());
    assert_eq!(gw.current().generation(), 1001);
    assert_eq!(h.probe.stops.load(Ordering::SeqCst), 1000);
    assert!(dispatches(gw, "probe.ping").await);
}
