//! Per-plugin hand-over, request deadlines and pending process settings,
//! against the ws-proxy binary over real sockets and real signals.

use crate::common::*;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::time::Instant;

/// How long the slow request of another plugin runs.
const SLOW_MS: u64 = 6_000;

/// A binary with the bncr plugin (it has a service: its store) and a manifest
/// plugin `slowpoke` whose `slowpoke.nap` sleeps `params.ms`.
async fn bncr_and_slowpoke(extra: &str) -> Proc {
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(
        dir.path(),
        &format!("[restart]\ndrain_timeout_ms = 20000\n{extra}"),
    );
    write_plugin(
        &dir.path().join("plugins"),
        "slowpoke",
        &[("slowpoke.nap", "sleep")],
    );
    Proc::start_in(dir, &["--config".into(), config.display().to_string()]).await
}

/// SIGUSR1, then the time until `bncr.diagnostics` answers from the new
/// generation: the connection is told the generation first, and a request
/// sent after that is admitted by it and waits for bncr's new store.
async fn bncr_handover(p: &Proc, c: &mut Client, generation: u64) -> Duration {
    let t0 = Instant::now();
    p.signal(Signal::SIGUSR1);
    let ev = c.event("gateway.generation").await;
    assert_eq!(ev["payload"]["generation"], generation, "{ev}");
    let r = c.call("bncr.diagnostics", json!({})).await;
    assert_eq!(r["ok"], true, "{r}");
    t0.elapsed()
}

// Invariant 5: a slow request in plugin X (slowpoke) never delays plugin Y's
// (bncr's) hand-over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_elsewhere_does_not_delay_bncr_handover() {
    let p = bncr_and_slowpoke("").await;
    let (mut b, _) = Client::admin(&p.url()).await;
    assert_eq!(b.call("bncr.diagnostics", json!({})).await["ok"], true);

    // Without a slow request.
    let alone = bncr_handover(&p, &mut b, 2).await;

    // With slowpoke's slow request in flight on another connection.
    let (mut a, _) = Client::admin(&p.url()).await;
    let id = a.fresh_id();
    a.send_json(&json!({"type":"req","id":id,"method":"slowpoke.nap","params":{"ms": SLOW_MS}}))
        .await;
    eventually(WAIT, "the slow request in flight", || {
        let url = p.url();
        async move {
            let (mut c, _) = Client::admin(&url).await;
            let st = c.call("status", json!({})).await;
            // The nap and this status call.
            (st["payload"]["inFlight"] == 2).then_some(())
        }
    })
    .await;
    let sent = Instant::now();
    let beside_slow = bncr_handover(&p, &mut b, 3).await;
    // The slow request itself completes on the generation that admitted it.
    let r = a.response(&id).await;
    assert_eq!(r["ok"], true, "{r}");
    let slow_done = sent.elapsed();
    eprintln!(
        "bncr hand-over: alone {alone:?}, beside a {SLOW_MS} ms request {beside_slow:?}; slow request answered after {slow_done:?}"
    );
    assert!(
        beside_slow < Duration::from_millis(SLOW_MS / 3),
        "bncr waited for another plugin's request: {beside_slow:?}"
    );
    assert!(
        slow_done > beside_slow,
        "bncr handed over before the slow request ended"
    );
    // The restart record (written once every plugin handed over) shows the
    // slow plugin's drain in the hand-over phase.
    let st = restarts_done(&mut b, 2).await;
    let last = &st["payload"]["lastRestart"];
    assert_eq!(last["trigger"], "SIGUSR1", "{last}");
    assert!(last["phasesMs"]["handover"].as_u64().unwrap() >= SLOW_MS / 2);
}

/// Read frames until every id in `ids` is answered; responses by id.
async fn responses(c: &mut Client, ids: &[String]) -> Vec<(Value, Duration)> {
    let t0 = Instant::now();
    let mut got: Vec<Option<(Value, Duration)>> = vec![None; ids.len()];
    while got.iter().any(Option::is_none) {
        let f = c.next_frame().await.expect("connection open");
        if f["type"] != "res" {
            continue;
        }
        let i = ids
            .iter()
            .position(|i| f["id"] == *i)
            .unwrap_or_else(|| panic!("unexpected response {f}"));
        assert!(got[i].is_none(), "answered twice: {f}");
        got[i] = Some((f, t0.elapsed()));
    }
    got.into_iter().map(Option::unwrap).collect()
}

// Invariant 11: hung handlers are answered at their deadline and free their
// in-flight slots on the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_handlers_are_answered_at_the_deadline_and_free_their_slots() {
    const MAX: usize = 4;
    const DEADLINE_MS: u64 = 1_500;
    let p = bncr_and_slowpoke(&format!(
        "[limits]\nmax_in_flight = {MAX}\n[requests]\ntimeout_ms = {DEADLINE_MS}\n"
    ))
    .await;
    let (mut c, _) = Client::admin(&p.url()).await;
    // N hung requests fill every slot; the N+1st is refused as busy.
    let mut hung = Vec::new();
    for _ in 0..MAX {
        let id = c.fresh_id();
        c.send_json(
            &json!({"type":"req","id":id,"method":"slowpoke.nap","params":{"ms": 3_600_000}}),
        )
        .await;
        hung.push(id);
    }
    let busy = c.fresh_id();
    c.send_json(&json!({"type":"req","id":busy,"method":"health","params":{}}))
        .await;
    let r = c.response(&busy).await;
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["error"]["code"], "UNAVAILABLE", "{r}");
    assert_eq!(r["error"]["retryable"], true, "{r}");
    // Each hung request is answered at its deadline, retryable.
    for (r, after) in responses(&mut c, &hung).await {
        assert_eq!(r["ok"], false, "{r}");
        assert_eq!(r["error"]["code"], "UNAVAILABLE", "{r}");
        assert_eq!(r["error"]["retryable"], true, "{r}");
        let d = &r["error"]["details"];
        assert_eq!(d["reason"], "request-timeout", "{r}");
        assert_eq!(d["method"], "slowpoke.nap", "{r}");
        assert_eq!(d["timeoutMs"], DEADLINE_MS, "{r}");
        assert!(after < Duration::from_millis(DEADLINE_MS * 4), "{after:?}");
    }
    // The deadline trips are counted.
    let (_, _, body) = http(p.addr, "GET", "/metrics").await;
    assert_eq!(
        metric(&body, "gateway_requests_timed_out_total{kind=\"request\"}"),
        Some(MAX as f64),
        "{body}"
    );
    // Every slot is free again: N requests at once on the same connection
    // all succeed (none is refused as busy).
    let quick: Vec<String> = (0..MAX).map(|_| c.fresh_id()).collect();
    for id in &quick {
        c.send_json(&json!({"type":"req","id":id,"method":"slowpoke.nap","params":{"ms": 200}}))
            .await;
    }
    for (r, _) in responses(&mut c, &quick).await {
        assert_eq!(r["ok"], true, "{r}");
    }
    // And no generation is held: a restart drains at once.
    p.signal(Signal::SIGUSR1);
    let ev = c.event("gateway.generation").await;
    assert_eq!(ev["payload"]["generation"], 2);
    let st = c.call("status", json!({})).await;
    assert_eq!(st["payload"]["inFlight"], 1, "only this status call: {st}");
}

// Invariant 7: process-level settings changed on disk are reported at the
// restart (a warning line and status.lastRestart), by name, never by value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_process_settings_are_reported_at_restart() {
    let dir = tempfile::tempdir().unwrap();
    let body = "[auth]\nmode = \"token\"\n[limits]\nmax_in_flight = 64\n";
    let config = config_for(dir.path(), body);
    let p = Proc::start_in(dir, &["--config".into(), config.display().to_string()]).await;
    let (mut c, _) = Client::admin(&p.url()).await;
    // An unchanged file: nothing pending.
    p.signal(Signal::SIGUSR1);
    c.event("gateway.generation").await;
    let st = restarts_done(&mut c, 1).await;
    assert_eq!(
        st["payload"]["lastRestart"]["pendingProcessSettings"],
        json!([]),
        "{st}"
    );
    // auth.mode and a new auth.password on disk.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "mode = \"token\"",
        "mode = \"none\"\npassword = \"do-not-log-me\"",
    );
    std::fs::write(&config, text).unwrap();
    p.signal(Signal::SIGUSR1);
    c.event("gateway.generation").await;
    let st = restarts_done(&mut c, 2).await;
    let last = &st["payload"]["lastRestart"];
    assert_eq!(last["ok"], true, "{st}");
    assert_eq!(last["trigger"], "SIGUSR1", "{st}");
    assert_eq!(
        last["pendingProcessSettings"],
        json!(["auth.mode", "auth.password"]),
        "{st}"
    );
    assert!(last["durationMs"].is_u64(), "{last}");
    let history = st["payload"]["restartHistory"].as_array().unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(&history[0], last);
    assert_eq!(history[1]["pendingProcessSettings"], json!([]));
    // Not applied: a connect without the token is still refused.
    let mut anon = Client::open(&p.url()).await;
    anon.next_frame().await.unwrap();
    let r = anon
        .request_raw("connect", connect_params(4, 4, &["operator.read"]))
        .await;
    assert_eq!(r["ok"], false, "auth.mode = none was not applied: {r}");
    // One warning line naming the settings, never their values.
    let log = wait_log(&p, "auth.password").await;
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("process-level settings changed on disk"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("WARN"), "{}", warnings[0]);
    assert!(
        warnings[0].contains("auth.mode, auth.password"),
        "{}",
        warnings[0]
    );
    assert!(!log.contains("do-not-log-me"), "a value reached the log");
}

/// `status` once `n` restarts have completed (the record is written when
/// every plugin has handed over, after the generation was announced).
async fn restarts_done(c: &mut Client, n: u64) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let st = c.call("status", json!({})).await;
        if st["payload"]["restartCount"] == n {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "restart {n} did not complete: {st}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_log(p: &Proc, needle: &str) -> String {
    eventually(WAIT, "the log line", || async {
        let s = p.stderr();
        s.contains(needle).then_some(s)
    })
    .await
}
