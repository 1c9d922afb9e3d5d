//! The ws-proxy binary restarted by real signals: connections stay, are told
//! the new generation, and everything advertised dispatches; restarts under
//! load lose nothing; a broken config keeps the old generation serving.

use crate::common::*;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tokio::time::Instant;

async fn metric_of(addr: std::net::SocketAddr, key: &str) -> Option<f64> {
    let (_, _, body) = http(addr, "GET", "/metrics").await;
    metric(&body, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_twenty_times_with_a_connection_kept_open() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(dir.path(), "");
    let plugins = dir.path().join("plugins");
    write_plugin(
        &plugins,
        "demo",
        &[("demo.keep", "reply"), ("demo.v0", "reply")],
    );
    let p = Proc::start_in(dir, &["--config".into(), config.display().to_string()]).await;
    let (mut old, hello) = Client::admin(&p.url()).await;
    let mut advertised = methods_of(&hello["features"]);
    assert!(advertised.contains("demo.v0"));
    for round in 1..=20u64 {
        // Edit the manifest: one method removed, one added.
        let added = format!("demo.v{round}");
        let removed = format!("demo.v{}", round - 1);
        write_plugin(
            &plugins,
            "demo",
            &[("demo.keep", "echo"), (added.as_str(), "reply")],
        );
        p.signal(Signal::SIGUSR1);
        let ev = old.event("gateway.generation").await;
        assert_eq!(ev["payload"]["generation"], round + 1, "{ev}");
        advertised = methods_of(&ev["payload"]["features"]);
        assert!(advertised.contains(&added), "round {round}: {advertised:?}");
        assert!(!advertised.contains(&removed), "round {round}");
        // Every advertised method dispatches on the old connection.
        for m in &advertised {
            if m == "gateway.restart" {
                continue;
            }
            let r = old.call(m, json!({})).await;
            let msg = r["error"]["message"].as_str().unwrap_or("");
            assert!(
                !msg.starts_with("unknown method"),
                "round {round}: advertised {m} answered {r}"
            );
        }
        let r = old.call(&removed, json!({})).await;
        assert_eq!(
            r["error"]["message"],
            format!("unknown method: {removed}"),
            "round {round}"
        );
        // A new connection is told exactly what dispatches.
        let (mut fresh, hello) = Client::admin(&p.url()).await;
        assert_eq!(hello["snapshot"]["generation"], round + 1);
        assert_eq!(methods_of(&hello["features"]), advertised, "round {round}");
        let status = fresh.call("status", json!({})).await;
        assert_eq!(status["ok"], true, "{status}");
    }
    assert_eq!(metric_of(p.addr, "gateway_generation").await, Some(21.0));
    let live = eventually(WAIT, "live scopes to settle at 1", || async {
        (metric_of(p.addr, "gateway_live_scopes").await == Some(1.0)).then_some(1)
    })
    .await;
    assert_eq!(live, 1);
    assert_eq!(old.call("health", json!({})).await["ok"], true);
}

/// The next request of the load: mostly sleeps, so requests are really in
/// flight during a swap, and some `health`.
fn next_request(n: &mut u64) -> (String, Value) {
    *n += 1;
    let id = format!("q{n}");
    let (method, params) = if n.is_multiple_of(4) {
        ("health", json!({}))
    } else {
        ("demo.sleep", json!({"ms": 20 + (*n % 5) * 10}))
    };
    (
        id.clone(),
        json!({"type":"req","id":id,"method":method,"params":params}),
    )
}

/// One connection of the load: keeps `depth` requests in flight until `end`.
async fn drive(url: String, depth: usize, end: Instant) -> Result<(u64, u64), String> {
    let (mut c, _) = Client::admin(&url).await;
    let mut outstanding: HashMap<String, ()> = HashMap::new();
    let mut answered: BTreeSet<String> = BTreeSet::new();
    let mut n = 0u64;
    let mut retried = 0u64;
    for _ in 0..depth {
        let (id, frame) = next_request(&mut n);
        c.send_json(&frame).await;
        outstanding.insert(id, ());
    }
    let deadline = end + Duration::from_secs(15);
    while !outstanding.is_empty() {
        if Instant::now() > deadline {
            return Err(format!("{} requests never answered", outstanding.len()));
        }
        let f = c
            .next_frame()
            .await
            .map_err(|closed| format!("connection closed: {closed:?}"))?;
        if f["type"] != "res" {
            continue;
        }
        let id = f["id"].as_str().unwrap().to_string();
        if !answered.insert(id.clone()) || outstanding.remove(&id).is_none() {
            return Err(format!("{id} answered twice or never asked"));
        }
        if f["ok"] != true {
            let e = &f["error"];
            let msg = e["message"].as_str().unwrap_or("");
            if msg.starts_with("unknown method") {
                return Err(format!("advertised method unknown: {f}"));
            }
            if !(e["code"] == "UNAVAILABLE" && e["retryable"] == true) {
                return Err(format!("unexpected error: {f}"));
            }
            retried += 1;
        }
        if Instant::now() < end {
            let (id, frame) = next_request(&mut n);
            c.send_json(&frame).await;
            outstanding.insert(id, ());
        }
    }
    Ok((answered.len() as u64, retried))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_under_load_answers_every_request_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(dir.path(), "");
    write_plugin(
        &dir.path().join("plugins"),
        "demo",
        &[("demo.sleep", "sleep")],
    );
    let p = Proc::start_in(dir, &["--config".into(), config.display().to_string()]).await;
    let end = Instant::now() + Duration::from_secs(10);
    let tasks: Vec<_> = (0..32)
        .map(|_| tokio::spawn(drive(p.url(), 8, end)))
        .collect();
    let mut signals = 0;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(200)).await;
        p.signal(Signal::SIGUSR1);
        signals += 1;
    }
    let mut total = 0;
    let mut retried = 0;
    for t in tasks {
        let (n, r) = t.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
        total += n;
        retried += r;
    }
    assert!(total > 1000, "only {total} requests answered");
    let restarts = eventually(WAIT, "restarts to settle", || async {
        let ok = metric_of(p.addr, r#"gateway_restarts_total{outcome="ok"}"#).await?;
        let live = metric_of(p.addr, "gateway_live_scopes").await?;
        (live == 1.0 && ok >= 5.0).then_some(ok)
    })
    .await;
    assert_eq!(
        metric_of(p.addr, r#"gateway_restarts_total{outcome="failed"}"#).await,
        Some(0.0)
    );
    eprintln!("{total} answered ({retried} retryable), {signals} signals, {restarts} restarts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_config_keeps_the_old_generation() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(dir.path(), "");
    write_plugin(
        &dir.path().join("plugins"),
        "demo",
        &[("demo.one", "reply")],
    );
    let good = std::fs::read_to_string(&config).unwrap();
    let p = Proc::start_in(dir, &["--config".into(), config.display().to_string()]).await;
    let (mut c, _) = Client::admin(&p.url()).await;
    std::fs::write(&config, format!("{good}[restart]\ndrain_timeout = 5\n")).unwrap();
    p.signal(Signal::SIGUSR1);
    eventually(WAIT, "the failed restart", || async {
        (metric_of(p.addr, r#"gateway_restarts_total{outcome="failed"}"#).await == Some(1.0))
            .then_some(())
    })
    .await;
    let status = c.call("status", json!({})).await;
    let last = &status["payload"]["lastRestart"];
    assert_eq!(last["ok"], false, "{status}");
    assert_eq!(last["trigger"], "SIGUSR1", "{status}");
    let err = last["error"].as_str().unwrap();
    assert!(err.contains("gateway.toml"), "{err}");
    assert!(err.contains("drain_timeout"), "{err}");
    assert_eq!(c.call("demo.one", json!({})).await["ok"], true);
    assert_eq!(
        c.call("health", json!({})).await["payload"]["generation"],
        1
    );
    // Fixed again: the next signal restarts.
    std::fs::write(&config, &good).unwrap();
    p.signal(Signal::SIGUSR2);
    let ev = c.event("gateway.generation").await;
    // Generations count successful swaps: the failed build left no gap.
    assert_eq!(ev["payload"]["generation"], 2, "{ev}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_connections_close_restores_openclaw_behaviour() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(dir.path(), "[restart]\nconnections = \"close\"\n");
    let p = Proc::start_in(dir, &["--config".into(), config.display().to_string()]).await;
    let (mut c, _) = Client::admin(&p.url()).await;
    p.signal(Signal::SIGUSR1);
    let (frames, closed) = c.until_closed().await;
    let shutdown = frames
        .iter()
        .find(|f| f["event"] == "shutdown")
        .unwrap_or_else(|| panic!("no shutdown event: {frames:?}"));
    assert_eq!(
        shutdown["payload"],
        json!({"reason":"gateway restarting","restartExpectedMs":1500})
    );
    assert!(frames.iter().all(|f| f["event"] != "gateway.generation"));
    assert_eq!(closed.code, Some(1012));
    assert_eq!(closed.reason, "service restart");
    // The process keeps serving the new generation.
    let (mut again, hello) = Client::admin(&p.url()).await;
    assert_eq!(hello["snapshot"]["generation"], 2);
    assert_eq!(again.call("health", json!({})).await["ok"], true);
}
