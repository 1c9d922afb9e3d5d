//! Bncr conveniences on the real test host
//! ([`gateway_core::testing::TestHost`]): the plugin runs through the real
//! registry, admission, scope checks, events, restarts and crashes, with
//! in-memory connections.
//!
//! Who is who, as on a real gateway: a Bncr client connects as an operator
//! holding `operator.write` and becomes known as a client once it calls a
//! client method (`bncr.connect`, `bncr.inbound`, ...); a chat operator
//! holds `operator.write` and never calls those; an admin holds
//! `operator.admin`.

#![allow(dead_code, unreachable_pub)]

use gateway_core::testing::{Opening, TestClient, TestHost};
use plugin_api::{ClientInfo, Role, RpcError, scope};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(10);

/// The channel the core `send` routes to.
pub const CHANNEL: &str = "bncr";

/// A fresh state directory.
pub fn state_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// A gateway with the bncr plugin configured with `config`, keeping its
/// state below `dir` (`<dir>/bncr/...`).
pub async fn start(dir: &Path, config: Value) -> TestHost {
    TestHost::builder(dir)
        .plugin(bncr_plugin::factory())
        .plugin_config("bncr", config)
        .start()
        .await
        .expect("the gateway starts")
}

/// What the real Bncr client says about itself at `connect`.
pub fn bncr_identity() -> ClientInfo {
    ClientInfo {
        id: "bncr".into(),
        version: "1.0.0".into(),
        platform: "node".into(),
        mode: "backend".into(),
        ..ClientInfo::default()
    }
}

/// A Bncr client's connection, identified as the real client identifies
/// itself at `connect`.
pub fn bncr_client(host: &TestHost) -> TestClient {
    host.connect(Role::Operator, &[scope::WRITE], bncr_identity())
}

/// A Bncr client's connection that joined the host's table but whose
/// connection-opened hooks have not run yet (the real host's moment
/// between the two, held open by the test).
pub fn bncr_client_opening(host: &TestHost) -> Opening {
    host.begin_connect(Role::Operator, &[scope::WRITE], bncr_identity())
}

/// A chat operator's connection (`operator.write`).
pub fn operator(host: &TestHost) -> TestClient {
    host.connect_operator(&[scope::WRITE])
}

/// An admin's connection (`operator.admin`).
pub fn admin(host: &TestHost) -> TestClient {
    host.connect_operator(&[scope::ADMIN])
}

/// `method` called by `c`, which must succeed.
pub async fn ok(c: &TestClient, method: &str, params: Value) -> Value {
    match c.call(method, params.clone()).await {
        Ok(v) => v,
        Err(e) => panic!("{method} {params} failed: {e}"),
    }
}

/// The core `send` through the `bncr` channel, called by `c`.
pub async fn send(c: &TestClient, to: &str, message: Value, key: &str) -> Result<String, RpcError> {
    c.send(CHANNEL, to, message, key).await
}

/// `bncr.diagnostics` as `c` reads it.
pub async fn diag(c: &TestClient) -> Value {
    ok(c, "bncr.diagnostics", serde_json::json!({})).await
}

/// Poll diagnostics (through `c`) until `counter` reaches `want`.
pub async fn until_counter(c: &TestClient, counter: &str, want: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let d = diag(c).await;
        if d["counters"][counter].as_u64().unwrap() >= want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{counter}: {d}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Payloads of the `name` events `c` received, in order.
pub fn payloads(c: &TestClient, name: &str) -> Vec<Value> {
    c.events_named(name)
        .into_iter()
        .map(|e| e.payload)
        .collect()
}

/// Message ids pushed to `c`, in push order (repeats included).
pub fn pushes(c: &TestClient) -> Vec<String> {
    payloads(c, "plugin.bncr.push")
        .iter()
        .map(|p| p["messageId"].as_str().unwrap().to_string())
        .collect()
}

/// Payloads of the `name` events delivered to anyone, in order.
pub fn delivered(host: &TestHost, name: &str) -> Vec<Value> {
    host.events_named(name)
        .into_iter()
        .map(|(_, e)| e.payload)
        .collect()
}

/// Wait until `cond` holds (checked after every delivery); panics naming
/// `what`, with every delivery so far, after [`WAIT`].
pub async fn wait_for(host: &TestHost, what: &str, cond: impl FnMut() -> bool) {
    if !host.wait_until(WAIT, cond).await {
        panic!(
            "timed out waiting for {what}; deliveries: {:#?}",
            host.events()
        );
    }
}

/// Ack each id once it was pushed to `c`, in order.
pub async fn ack_in_order(host: &TestHost, c: &TestClient, ids: &[String]) {
    for id in ids {
        wait_for(host, &format!("push of {id}"), || pushes(c).contains(id)).await;
        let r = ok(
            c,
            "bncr.ack",
            serde_json::json!({"messageId": id, "ok": true}),
        )
        .await;
        assert_eq!(r["ok"], true);
    }
}

/// The distinct ids in order of first appearance.
pub fn first_seen(ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for id in ids {
        if !out.contains(id) {
            out.push(id.clone());
        }
    }
    out
}

/// Whether the inbound journal below `dir` marks message `msg_id` handed
/// on (`None`: not journaled).
pub fn journaled_handed_on(dir: &Path, msg_id: &str) -> Option<bool> {
    read_handed_on(dir, msg_id).unwrap_or_else(|e| panic!("reading the journal: {e}"))
}

fn read_handed_on(dir: &Path, msg_id: &str) -> rusqlite::Result<Option<bool>> {
    use rusqlite::OptionalExtension;
    let db = rusqlite::Connection::open(dir.join("bncr/bncr.sqlite3"))?;
    db.busy_timeout(Duration::from_secs(5))?;
    let v = db
        .query_row(
            "SELECT handed_on FROM inbound WHERE msg_id = ?1",
            [msg_id],
            |r| r.get::<_, i64>(0),
        )
        .optional()?;
    Ok(v.map(|v| v == 1))
}

/// Wait until the journal marks each of `msg_ids` handed on. A delivery is
/// seen before the bridge journals it; a generation that stops in between
/// offers the message again, so tests wait for the mark before a restart.
pub async fn until_journaled_handed_on(dir: &Path, msg_ids: &[&str]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    for id in msg_ids {
        loop {
            let marked = read_handed_on(dir, id);
            if matches!(marked, Ok(Some(true))) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} not journaled as handed on: {marked:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
