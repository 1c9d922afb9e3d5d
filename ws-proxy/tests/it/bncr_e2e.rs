//! The Bncr bridge end to end: the real ws-proxy binary, real WebSocket
//! connections (a simulated Bncr client and an operator), real signals.
//! See `docs/bncr.md` for the contract checked here.

use crate::common::*;
use base64::Engine;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use tokio::time::Instant;

/// Quick retries so a lost push comes back within a test's patience; a high
/// limit so nothing is dead-lettered by accident.
const QUICK: &str = "retryBaseMs = 200\nretryCapMs = 400\nretryLimit = 100\n";

/// Write `<dir>/gateway.toml` with `bncr` as `[plugins.entries.bncr.config]`.
fn write_config(dir: &Path, bncr: &str) -> String {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, format!("[plugins.entries.bncr.config]\n{bncr}")).unwrap();
    path.display().to_string()
}

/// The binary with a temp state dir and the given bncr config.
async fn gateway(bncr: &str) -> Proc {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), bncr);
    Proc::start_in(dir, &["--config".into(), config]).await
}

/// A new process on the same state dir and config as the (dead) `old`.
async fn restart_on(old: Proc) -> Proc {
    let Proc { dir, .. } = old;
    let config = dir.path().join("gateway.toml").display().to_string();
    Proc::start_in(dir, &["--config".into(), config]).await
}

/// SIGKILL the child and reap it.
async fn kill_9(p: &mut Proc) {
    p.signal(Signal::SIGKILL);
    let status = p.wait(WAIT).await;
    assert!(!status.success(), "killed process exited with {status}");
}

/// The payload of a successful response.
fn payload(res: &Value) -> Value {
    assert_eq!(res["ok"], true, "expected success: {res}");
    res["payload"].clone()
}

/// An operator with `operator.write`: sees `chat.inbound`, calls `send`.
async fn operator(url: &str) -> Client {
    Client::connect(url, Some(TOKEN), &["operator.write"])
        .await
        .0
}

/// Core `send` to the bncr channel; returns the message id.
async fn send(op: &mut Client, to: &str, message: Value, key: &str) -> String {
    let res = op
        .call(
            "send",
            json!({"channel": "bncr", "to": to, "message": message, "idempotencyKey": key}),
        )
        .await;
    let p = payload(&res);
    assert_eq!(p["channel"], "bncr", "{p}");
    p["messageId"].as_str().expect("messageId").to_string()
}

/// A simulated Bncr client: a protocol connection that called `bncr.connect`.
struct Bncr {
    c: Client,
    conn_id: String,
    account: Option<String>,
    lease_id: Value,
    epoch: Value,
}

impl Bncr {
    /// Handshake with the gateway token, then `bncr.connect`; returns the
    /// client and the connect reply.
    async fn join(url: &str, account: Option<&str>) -> (Bncr, Value) {
        let (c, hello) = Client::connect(url, Some(TOKEN), &["operator.write"]).await;
        // hello-ok says `conn-<n>`; diagnostics list the number.
        let conn_id = hello["server"]["connId"].as_str().unwrap();
        let conn_id = conn_id.trim_start_matches("conn-").to_string();
        let mut b = Bncr {
            c,
            conn_id,
            account: account.map(str::to_string),
            lease_id: Value::Null,
            epoch: Value::Null,
        };
        let reply = b.connect().await;
        (b, reply)
    }

    /// `bncr.connect` again on this connection; keeps the new lease.
    async fn connect(&mut self) -> Value {
        let mut params = json!({"clientId": "bncr-e2e"});
        if let Some(a) = &self.account {
            params["accountId"] = json!(a);
        }
        let reply = payload(&self.c.call("bncr.connect", params).await);
        self.lease_id = reply["leaseId"].clone();
        self.epoch = reply["connectionEpoch"].clone();
        reply
    }

    /// `params` with this client's account and lease fields added.
    fn leased(&self, mut params: Value) -> Value {
        params["leaseId"] = self.lease_id.clone();
        params["connectionEpoch"] = self.epoch.clone();
        if let Some(a) = &self.account {
            params["accountId"] = json!(a);
        }
        params
    }

    /// The next `plugin.bncr.push` payload.
    async fn push(&mut self) -> Value {
        self.c.event("plugin.bncr.push").await["payload"].clone()
    }

    /// `bncr.ack ok` for `message_id`; returns the reply payload.
    async fn ack(&mut self, message_id: &str) -> Value {
        payload(
            &self
                .c
                .call("bncr.ack", json!({"messageId": message_id}))
                .await,
        )
    }

    /// `bncr.inbound` with the lease; returns the reply payload.
    async fn inbound(&mut self, user: &str, msg_id: &str, msg: &str) -> Value {
        let params = self.leased(json!({
            "platform": "qq", "groupId": "0", "userId": user, "msg": msg, "msgId": msg_id,
        }));
        payload(&self.c.call("bncr.inbound", params).await)
    }
}

/// `outbox.pending` of `account` in `bncr.diagnostics`, as seen by `c`.
async fn pending(c: &mut Client, account: &str) -> u64 {
    let d = payload(
        &c.call("bncr.diagnostics", json!({"accountId": account}))
            .await,
    );
    d["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["accountId"] == account)
        .map_or(0, |a| a["outbox"]["pending"].as_u64().unwrap())
}

/// Poll diagnostics until `account` has nothing pending.
async fn until_drained(c: &mut Client, account: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let n = pending(c, account).await;
        if n == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{account} still has {n} pending");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Ack every push as it arrives until `want` distinct ids were acked.
/// Returns the ids in order of their first delivery.
async fn ack_until(b: &mut Bncr, want: usize) -> Vec<String> {
    let mut order = Vec::new();
    let mut acked = BTreeSet::new();
    while acked.len() < want {
        let p = b.push().await;
        let id = p["messageId"].as_str().unwrap().to_string();
        if !order.contains(&id) {
            order.push(id.clone());
        }
        let r = b.ack(&id).await;
        assert_eq!(r["ok"], true, "{r}");
        acked.insert(id);
    }
    order
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_to_operator_and_send_to_client_then_ack() {
    let p = gateway(QUICK).await;
    let (mut b, reply) = Bncr::join(&p.url(), None).await;
    for (k, want) in [
        ("channel", json!("bncr")),
        ("accountId", json!("Primary")),
        ("pushEvent", json!("plugin.bncr.push")),
        ("online", json!(true)),
        ("isPrimary", json!(true)),
        ("activeConnections", json!(1)),
        ("pending", json!(0)),
        ("deadLetter", json!(0)),
        ("connectionEpoch", json!(1)),
    ] {
        assert_eq!(reply[k], want, "connect reply {k}: {reply}");
    }
    for k in ["bridgeVersion", "leaseId"] {
        assert!(
            reply[k].as_str().is_some_and(|s| !s.is_empty()),
            "{k}: {reply}"
        );
    }
    for k in ["protocolVersion", "acceptedAt", "now"] {
        assert!(reply[k].as_u64().is_some(), "{k}: {reply}");
    }

    let mut op = operator(&p.url()).await;
    let r = b.inbound("u1", "m-1", "hello gateway").await;
    assert_eq!(
        r,
        json!({"accepted": true, "accountId": "Primary", "sessionKey": "bncr:Primary:qq:0:u1", "msgId": "m-1"})
    );
    let ev = op.event("chat.inbound").await["payload"].clone();
    for (k, want) in [
        ("channel", "bncr"),
        ("accountId", "Primary"),
        ("route", "qq:0:u1"),
        ("sessionKey", "bncr:Primary:qq:0:u1"),
        ("msgId", "m-1"),
        ("msg", "hello gateway"),
        ("type", "text"),
    ] {
        assert_eq!(ev[k], want, "chat.inbound {k}: {ev}");
    }
    assert!(ev["ts"].as_i64().is_some_and(|t| t > 0), "{ev}");

    let id = send(&mut op, "Bncr:qq:0:u1", json!("hello client"), "reply-1").await;
    let push = b.push().await;
    assert_eq!(push["type"], "message.outbound", "{push}");
    assert_eq!(push["messageId"], id.as_str());
    assert_eq!(push["idempotencyKey"], id.as_str());
    assert_eq!(push["sessionKey"], "bncr:Primary:qq:0:u1");
    assert!(push["ts"].as_i64().is_some(), "{push}");
    assert_eq!(
        push["message"],
        json!({"platform": "qq", "groupId": "0", "userId": "u1", "type": "text", "msg": "hello client"})
    );
    let before = payload(&b.c.call("bncr.activity", b.leased(json!({}))).await);
    assert_eq!(
        (before["ok"].clone(), before["pending"].clone()),
        (json!(true), json!(1))
    );

    assert_eq!(b.ack(&id).await, json!({"ok": true, "messageId": id}));
    let diag = payload(&b.c.call("bncr.diagnostics", json!({})).await);
    assert_eq!(diag["outbox"], 0, "{diag}");
    assert_eq!(diag["accounts"][0]["outbox"]["pending"], 0, "{diag}");
    assert_eq!(diag["accounts"][0]["online"], true, "{diag}");
    assert_eq!(diag["store"]["open"], true, "{diag}");
    let act = payload(&b.c.call("bncr.activity", b.leased(json!({}))).await);
    assert_eq!(act["ok"], true, "{act}");
    assert_eq!(act["pending"], 0, "{act}");
    assert_eq!(act["deadLetter"], 0, "{act}");
    // Acks are idempotent.
    assert_eq!(b.ack(&id).await["message"], "already-acked-or-missing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_messages_survive_sigusr1_on_the_same_connection() {
    // All 20 in flight at once; retries slow enough that the pushes after the
    // signal come from the restored outbox, not from a retry timer.
    let p = gateway("window = 20\nretryBaseMs = 5000\nretryCapMs = 5000\nretryLimit = 100\n").await;
    let (mut b, _) = Bncr::join(&p.url(), None).await;
    let mut op = operator(&p.url()).await;
    let mut created = Vec::new();
    for i in 0..20 {
        created.push(
            send(
                &mut op,
                "Bncr:qq:0:u1",
                json!(format!("n{i}")),
                &format!("k{i}"),
            )
            .await,
        );
    }
    // Received, not acked.
    let mut first_order: Vec<String> = Vec::new();
    while first_order.len() < 20 {
        let push = b.push().await;
        let id = push["messageId"].as_str().unwrap().to_string();
        assert_eq!(
            push["message"]["msg"],
            format!("n{}", created.iter().position(|c| *c == id).unwrap())
        );
        if !first_order.contains(&id) {
            first_order.push(id);
        }
    }
    assert_eq!(first_order, created, "first deliveries in creation order");
    assert_eq!(pending(&mut op, "Primary").await, 20);

    p.signal(Signal::SIGUSR1);
    let generation = b.c.event("gateway.generation").await;
    assert_eq!(generation["payload"]["generation"], 2, "{generation}");
    // Pushed again by the new generation to the same connection: ack them all.
    let mut again: HashMap<String, u32> = HashMap::new();
    while again.len() < 20 {
        let push = b.push().await;
        let id = push["messageId"].as_str().unwrap().to_string();
        assert!(created.contains(&id), "unknown message {id}");
        assert_eq!(push["idempotencyKey"], id.as_str());
        *again.entry(id.clone()).or_default() += 1;
        let r = b.ack(&id).await;
        assert_eq!(
            r["messageId"],
            id.as_str(),
            "acked by the new generation: {r}"
        );
    }
    until_drained(&mut b.c, "Primary").await;
    let diag = payload(&b.c.call("bncr.diagnostics", json!({})).await);
    assert_eq!(diag["generation"], 2, "{diag}");
    assert_eq!(diag["deadLetter"], 0, "{diag}");
    assert_eq!(
        diag["accounts"][0]["lease"]["connId"].to_string(),
        b.conn_id,
        "the lease still names the same connection: {diag}"
    );
    // The lease from before the restart is still current.
    let act = payload(&b.c.call("bncr.activity", b.leased(json!({}))).await);
    assert_eq!(act["ok"], true, "{act}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_and_idempotency_keys_survive_kill_9() {
    let mut p = gateway(QUICK).await;
    let mut op = operator(&p.url()).await;
    let mut created = Vec::new();
    for i in 0..10 {
        created.push(
            send(
                &mut op,
                "Bncr:qq:0:u1",
                json!(format!("q{i}")),
                &format!("key-{i}"),
            )
            .await,
        );
    }
    assert_eq!(pending(&mut op, "Primary").await, 10);
    kill_9(&mut p).await;

    let p = restart_on(p).await;
    let mut op = operator(&p.url()).await;
    // The same idempotency key after the crash: same id, nothing new queued.
    assert_eq!(
        send(&mut op, "Bncr:qq:0:u1", json!("q3"), "key-3").await,
        created[3]
    );
    let (mut b, reply) = Bncr::join(&p.url(), None).await;
    assert_eq!(reply["pending"], 10, "{reply}");
    let order = ack_until(&mut b, 10).await;
    assert_eq!(order, created, "delivered in creation order");
    until_drained(&mut b.c, "Primary").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_with_a_client_connected_does_not_push_to_a_reused_connection_id() {
    let mut p = gateway(QUICK).await;
    // The Bncr client is this process's first connection.
    let (b, _) = Bncr::join(&p.url(), None).await;
    kill_9(&mut p).await;
    drop(b);

    let p = restart_on(p).await;
    // The operator is the new process's first connection.
    let mut op = operator(&p.url()).await;
    let diag = payload(&op.call("bncr.diagnostics", json!({})).await);
    let id = send(&mut op, "Bncr:qq:0:u1", json!("after crash"), "after-crash").await;
    let (mut b, _) = Bncr::join(&p.url(), None).await;
    let push = b.push().await;
    assert_eq!(push["messageId"], id.as_str(), "{push}");
    b.ack(&id).await;
    until_drained(&mut op, "Primary").await;
    assert!(
        !op.events.iter().any(|e| e["event"] == "plugin.bncr.push"),
        "the operator received a push meant for the Bncr client: {:?}",
        op.events
    );
    // The lease survived the crash, but its connection belonged to the dead
    // process: diagnostics say offline from the start, not after a failed push.
    assert_eq!(diag["accounts"][0]["lease"]["connectionEpoch"], 1, "{diag}");
    assert_eq!(diag["accounts"][0]["online"], false, "{diag}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_msg_id_is_deduped_across_sigusr1() {
    let p = gateway(QUICK).await;
    let (mut b, _) = Bncr::join(&p.url(), None).await;
    let mut op = operator(&p.url()).await;
    let r = b.inbound("u7", "X", "first").await;
    assert_eq!(r["accepted"], true, "{r}");
    assert!(r.get("duplicated").is_none(), "{r}");
    assert_eq!(op.event("chat.inbound").await["payload"]["msgId"], "X");

    p.signal(Signal::SIGUSR1);
    assert_eq!(
        b.c.event("gateway.generation").await["payload"]["generation"],
        2
    );
    assert_eq!(
        op.event("gateway.generation").await["payload"]["generation"],
        2
    );
    let r = b.inbound("u7", "X", "first").await;
    assert_eq!(
        (
            r["accepted"].clone(),
            r["duplicated"].clone(),
            r["msgId"].clone()
        ),
        (json!(true), json!(true), json!("X")),
        "{r}"
    );
    // A fresh message after it: every chat.inbound before it is counted.
    assert_eq!(b.inbound("u7", "Y", "second").await["accepted"], true);
    let mut seen = Vec::new();
    loop {
        let ev = op.event("chat.inbound").await;
        let id = ev["payload"]["msgId"].as_str().unwrap().to_string();
        seen.push(id.clone());
        if id == "Y" {
            break;
        }
    }
    assert_eq!(seen, ["Y"], "X was published once, before the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_per_account_over_two_connections() {
    let p = gateway(QUICK).await;
    let (mut a, ra) = Bncr::join(&p.url(), Some("A")).await;
    let (mut b, rb) = Bncr::join(&p.url(), Some("B")).await;
    assert_eq!(
        (ra["accountId"].clone(), ra["isPrimary"].clone()),
        (json!("A"), json!(false))
    );
    assert_eq!(rb["accountId"], "B");
    assert_eq!(rb["connectionEpoch"], 1, "B's first lease: {rb}");
    // B's connect did not make A stale.
    let r = a.inbound("ua", "a-1", "from A").await;
    assert_eq!(
        (r["accepted"].clone(), r["accountId"].clone()),
        (json!(true), json!("A")),
        "{r}"
    );
    assert!(r.get("stale").is_none(), "{r}");
    let act = payload(&a.c.call("bncr.activity", a.leased(json!({}))).await);
    assert_eq!(act["ok"], true, "{act}");

    // A second client of B takes B's lease: B's first client is stale, A is not.
    let (mut b2, rb2) = Bncr::join(&p.url(), Some("B")).await;
    assert_eq!(rb2["connectionEpoch"], 2, "{rb2}");
    let r = b.inbound("ub", "b-1", "old B").await;
    assert_eq!(
        (r["accepted"].clone(), r["stale"].clone()),
        (json!(false), json!(true)),
        "{r}"
    );
    assert_eq!(a.inbound("ua", "a-2", "A again").await["accepted"], true);
    assert_eq!(b2.inbound("ub", "b-2", "new B").await["accepted"], true);

    // Outbound for each account reaches that account's lease holder.
    let mut op = operator(&p.url()).await;
    let to_a = send(
        &mut op,
        "Bncr:qq:0:ua",
        json!({"msg": "to A", "accountId": "A"}),
        "ka",
    )
    .await;
    let to_b = send(
        &mut op,
        "Bncr:qq:0:ub",
        json!({"msg": "to B", "accountId": "B"}),
        "kb",
    )
    .await;
    let pa = a.push().await;
    assert_eq!(
        (pa["messageId"].as_str(), pa["message"]["msg"].as_str()),
        (Some(to_a.as_str()), Some("to A"))
    );
    let pb = b2.push().await;
    assert_eq!(
        (pb["messageId"].as_str(), pb["message"]["msg"].as_str()),
        (Some(to_b.as_str()), Some("to B"))
    );
    a.ack(&to_a).await;
    b2.ack(&to_b).await;
    until_drained(&mut op, "A").await;
    until_drained(&mut op, "B").await;
    let diag = payload(&op.call("bncr.diagnostics", json!({})).await);
    let lease_conn = |acc: &str| {
        diag["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["accountId"] == acc)
            .map(|x| x["lease"]["connId"].to_string())
            .unwrap()
    };
    assert_eq!(lease_conn("A"), a.conn_id, "{diag}");
    assert_eq!(lease_conn("B"), b2.conn_id, "{diag}");
    assert!(!b.c.events.iter().any(|e| e["event"] == "plugin.bncr.push"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_params_answer_errors_and_keep_the_connection() {
    let p = gateway(QUICK).await;
    let (mut b, _) = Bncr::join(&p.url(), None).await;
    // (method, params, error message prefix); None: the documented success reply.
    let table: Vec<(&str, Value, Option<&str>)> = vec![
        (
            "bncr.inbound",
            json!({"msg": "x"}),
            Some("platform/groupId/userId required"),
        ),
        (
            "bncr.inbound",
            json!({"platform": "qq", "groupId": "0"}),
            Some("platform/groupId/userId required"),
        ),
        (
            "bncr.inbound",
            json!({"platform": "qq", "userId": true}),
            Some("invalid params"),
        ),
        (
            "bncr.inbound",
            json!({"platform": 5, "userId": "u"}),
            Some("invalid params"),
        ),
        (
            "bncr.inbound",
            json!({"platform": "qq", "userId": "u", "type": "sticker"}),
            Some("type must be one of"),
        ),
        ("bncr.inbound", json!([1, 2]), Some("invalid params")),
        (
            "bncr.connect",
            json!({"accountId": 5}),
            Some("invalid params"),
        ),
        (
            "bncr.activity",
            json!({"connectionEpoch": "one"}),
            Some("invalid params"),
        ),
        ("bncr.ack", json!({}), Some("messageId required")),
        (
            "bncr.ack",
            json!({"messageId": "  "}),
            Some("messageId required"),
        ),
        ("bncr.ack", json!({"messageId": 42}), Some("invalid params")),
        ("bncr.ack", json!({"messageId": "never-sent"}), None),
        (
            "bncr.deadLetter.inspect",
            json!({"limit": "ten"}),
            Some("invalid params"),
        ),
        // Every number in range, else INVALID_REQUEST (never a panic, an
        // overflow or an SQL error).
        (
            "bncr.deadLetter.inspect",
            json!({"olderThan": u64::MAX}),
            Some("olderThan must be"),
        ),
        (
            "bncr.deadLetter.inspect",
            json!({"olderThan": i64::MAX}),
            Some("olderThan must be"),
        ),
        (
            "bncr.deadLetter.inspect",
            json!({"offset": u64::MAX}),
            Some("offset must be"),
        ),
        (
            "bncr.deadLetter.inspect",
            json!({"offset": 1_000_000_001u64}),
            Some("offset must be"),
        ),
        (
            "bncr.deadLetter.inspect",
            json!({"offset": 1_000_000_000u64}),
            None,
        ),
        (
            "bncr.deadLetter.inspect",
            json!({"limit": 0}),
            Some("limit must be"),
        ),
        (
            "bncr.deadLetter.inspect",
            json!({"limit": 501}),
            Some("limit must be"),
        ),
        (
            "bncr.deadLetter.inspect",
            json!({"limit": 500, "olderThan": 0}),
            None,
        ),
        (
            "bncr.deadLetter.inspect",
            json!({"olderThan": -1}),
            Some("invalid params"),
        ),
        (
            "bncr.file.init",
            json!({"transferId": "amp", "fileSize": 52428800u64, "chunkSize": 1}),
            Some("chunkSize 1 is below the minimum"),
        ),
        (
            "bncr.file.init",
            json!({"transferId": "../etc", "fileSize": 1}),
            Some("transferId must be"),
        ),
        (
            "bncr.file.init",
            json!({"transferId": "t", "fileSize": "big"}),
            Some("invalid params"),
        ),
        (
            "bncr.file.init",
            json!({"transferId": "t"}),
            Some("fileSize required"),
        ),
        (
            "bncr.file.chunk",
            json!({"transferId": "nope", "chunkIndex": 0, "offset": 0, "base64": "AA=="}),
            Some("transfer not found"),
        ),
        (
            "bncr.file.chunk",
            json!({"transferId": "nope", "offset": 0, "base64": "AA=="}),
            Some("chunkIndex required"),
        ),
        (
            "bncr.file.complete",
            json!({"transferId": "nope"}),
            Some("transfer not found"),
        ),
        ("bncr.file.complete", json!({}), Some("transferId required")),
        (
            "bncr.file.ack",
            json!({"transferId": "t", "stage": "bogus"}),
            Some("stage must be"),
        ),
        (
            "send",
            json!({"channel": "bncr", "to": "Bncr:qq", "message": "x", "idempotencyKey": "s1"}),
            Some("to must be"),
        ),
        (
            "send",
            json!({"channel": "bncr", "to": "Bncr:qq:0:u", "message": 7, "idempotencyKey": "s2"}),
            Some("message must be"),
        ),
        (
            "send",
            json!({"channel": "bncr", "to": "Bncr:qq:0:u", "message": {"type": "sticker", "msg": "x"}, "idempotencyKey": "s3"}),
            Some("message.type must be"),
        ),
        (
            "send",
            json!({"channel": "bncr", "to": "Bncr:qq:0:u", "message": {"type": "text"}, "idempotencyKey": "s4"}),
            Some("message needs"),
        ),
    ];
    for (method, params, want) in &table {
        let res = b.c.call(method, params.clone()).await;
        match want {
            Some(prefix) => {
                assert_eq!(res["ok"], false, "{method} {params}: {res}");
                assert_eq!(
                    res["error"]["code"], "INVALID_REQUEST",
                    "{method} {params}: {res}"
                );
                let msg = res["error"]["message"].as_str().unwrap_or_default();
                assert!(msg.starts_with(prefix), "{method} {params}: {res}");
            }
            None => assert_eq!(res["ok"], true, "{method} {params}: {res}"),
        }
    }
    // Prune is destructive: operator.write is refused, an admin is asked
    // for a filter.
    let res = b.c.call("bncr.deadLetter.prune", json!({})).await;
    assert_eq!(res["error"]["code"], "FORBIDDEN", "{res}");
    let (mut admin, _) = Client::admin(&p.url()).await;
    let res = admin
        .call("bncr.deadLetter.prune", json!({"dryRun": false}))
        .await;
    assert_eq!(
        res["error"]["details"]["code"], "deadLetter-prune-requires-filter",
        "{res}"
    );
    let res = admin
        .call("bncr.deadLetter.prune", json!({"olderThan": u64::MAX}))
        .await;
    assert_eq!(res["error"]["code"], "INVALID_REQUEST", "{res}");
    assert_eq!(
        payload(&admin.call("bncr.deadLetter.prune", json!({})).await)["dryRun"],
        true
    );
    let res =
        b.c.call("bncr.ack", json!({"messageId": "never-sent"}))
            .await;
    assert_eq!(payload(&res)["message"], "already-acked-or-missing");
    // Still open, still the same lease, nothing queued by the refused sends.
    let act = payload(&b.c.call("bncr.activity", b.leased(json!({}))).await);
    assert_eq!(
        (act["ok"].clone(), act["pending"].clone()),
        (json!(true), json!(0)),
        "{act}"
    );
    assert_eq!(payload(&b.c.call("health", json!({})).await)["ok"], true);
}

fn sha_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_transfer_over_the_wire() {
    let p = gateway(QUICK).await;
    let (mut b, _) = Bncr::join(&p.url(), None).await;
    let data: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let chunk = 32 * 1024;
    let total = data.len().div_ceil(chunk);
    let init = json!({
        "transferId": "t-good", "fileName": "photo.png", "mimeType": "image/png",
        "fileSize": data.len(), "chunkSize": chunk, "totalChunks": total,
        "fileSha256": sha_hex(&data), "platform": "qq", "groupId": "0", "userId": "u1",
        "sessionKey": "bncr:Primary:qq:0:u1",
    });
    let r = payload(&b.c.call("bncr.file.init", init.clone()).await);
    assert_eq!(
        (r["ok"].clone(), r["status"].clone()),
        (json!(true), json!("init")),
        "{r}"
    );
    let r = payload(&b.c.call("bncr.file.init", init).await);
    assert_eq!(r["duplicated"], true, "{r}");
    for (i, part) in data.chunks(chunk).enumerate() {
        let r = payload(
            &b.c.call(
                "bncr.file.chunk",
                json!({
                    "transferId": "t-good", "chunkIndex": i, "offset": i * chunk, "size": part.len(),
                    "chunkSha256": sha_hex(part), "base64": b64(part),
                }),
            )
            .await,
        );
        assert_eq!(
            (r["received"].clone(), r["totalChunks"].clone()),
            (json!(i + 1), json!(total)),
            "{r}"
        );
    }
    let done = payload(
        &b.c.call("bncr.file.complete", json!({"transferId": "t-good"}))
            .await,
    );
    assert_eq!(done["size"], data.len(), "{done}");
    assert_eq!(done["fileSha256"], sha_hex(&data), "{done}");
    assert_eq!(done["fileName"], "photo.png", "{done}");
    assert_eq!(done["mimeType"], "image/png", "{done}");
    let path = std::path::PathBuf::from(done["path"].as_str().unwrap());
    let files = std::fs::canonicalize(p.dir.path().join("state/bncr/files")).unwrap();
    assert!(
        std::fs::canonicalize(&path).unwrap().starts_with(&files),
        "{path:?} under {files:?}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        data,
        "the stored file is the sent file"
    );

    // A corrupted chunk is refused and not stored.
    let first = &data[..chunk];
    let mut bad = first.to_vec();
    bad[100] ^= 0xff;
    payload(
        &b.c.call(
            "bncr.file.init",
            json!({"transferId": "t-bad", "fileName": "x.bin", "fileSize": chunk, "chunkSize": chunk,
                   "totalChunks": 1, "fileSha256": sha_hex(first)}),
        )
        .await,
    );
    let r =
        b.c.call(
            "bncr.file.chunk",
            json!({"transferId": "t-bad", "chunkIndex": 0, "offset": 0, "size": chunk,
                   "chunkSha256": sha_hex(first), "base64": b64(&bad)}),
        )
        .await;
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["error"]["code"], "INVALID_REQUEST", "{r}");
    assert_eq!(r["error"]["message"], "chunk sha256 mismatch", "{r}");
    assert_eq!(
        r["error"]["details"]["code"], "chunk-sha256-mismatch",
        "{r}"
    );
    let r =
        b.c.call("bncr.file.complete", json!({"transferId": "t-bad"}))
            .await;
    assert_eq!(
        r["error"]["details"]["missing"],
        json!([0]),
        "the bad chunk was not kept: {r}"
    );
    // A chunk without its own hash but a wrong whole-file hash fails at complete.
    b.c.call(
        "bncr.file.chunk",
        json!({"transferId": "t-bad", "chunkIndex": 0, "offset": 0, "base64": b64(&bad)}),
    )
    .await;
    let r =
        b.c.call("bncr.file.complete", json!({"transferId": "t-bad"}))
            .await;
    assert_eq!(r["error"]["message"], "file sha256 mismatch", "{r}");
    assert!(!p.dir.path().join("state/bncr/files/t-bad").exists());
    let r = payload(
        &b.c.call(
            "bncr.file.abort",
            json!({"transferId": "t-bad", "reason": "test"}),
        )
        .await,
    );
    assert_eq!(r["status"], "aborted", "{r}");
    let act = payload(&b.c.call("bncr.activity", b.leased(json!({}))).await);
    assert_eq!(act["ok"], true, "{act}");
}

/// `inboundPending` in `bncr.diagnostics`, as seen by `c`.
async fn inbound_pending(c: &mut Client) -> u64 {
    payload(&c.call("bncr.diagnostics", json!({})).await)["inboundPending"]
        .as_u64()
        .unwrap()
}

/// No `chat.inbound` among the events `c` has buffered.
fn no_inbound_buffered(c: &Client) -> bool {
    !c.events.iter().any(|e| e["event"] == "chat.inbound")
}

/// Accepted while no operator is connected: the message waits, through an
/// in-process restart and a kill -9, and reaches the first operator that
/// connects exactly once, in order; the Bncr client's own connection (an
/// operator.write connection too) never gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_waits_for_an_operator_and_arrives_once_across_restarts() {
    let cfg = "inboundGraceMs = 200\ninboundRetryMs = 100\n";
    let mut p = gateway(cfg).await;
    let (mut b, _) = Bncr::join(&p.url(), None).await;
    assert_eq!(b.inbound("42", "w-1", "first").await["accepted"], true);
    p.signal(Signal::SIGUSR1);
    b.c.event("gateway.generation").await;
    assert_eq!(inbound_pending(&mut b.c).await, 1, "kept through SIGUSR1");
    assert_eq!(b.inbound("42", "w-2", "second").await["accepted"], true);
    assert_eq!(inbound_pending(&mut b.c).await, 2);
    kill_9(&mut p).await;

    let p = restart_on(p).await;
    let (mut b, _) = Bncr::join(&p.url(), None).await;
    assert_eq!(inbound_pending(&mut b.c).await, 2, "kept through kill -9");
    let mut op = operator(&p.url()).await;
    for (id, msg) in [("w-1", "first"), ("w-2", "second")] {
        let ev = op.event("chat.inbound").await["payload"].clone();
        assert_eq!(
            (ev["msgId"].as_str(), ev["msg"].as_str()),
            (Some(id), Some(msg)),
            "{ev}"
        );
    }
    assert_eq!(inbound_pending(&mut b.c).await, 0);
    // The next inbound event is the next message: nothing was repeated.
    b.inbound("42", "w-3", "third").await;
    assert_eq!(op.event("chat.inbound").await["payload"]["msgId"], "w-3");
    assert!(no_inbound_buffered(&op), "{:?}", op.events);
    // Another restart: nothing is offered again.
    p.signal(Signal::SIGUSR1);
    op.event("gateway.generation").await;
    b.inbound("42", "w-4", "fourth").await;
    assert_eq!(op.event("chat.inbound").await["payload"]["msgId"], "w-4");
    assert!(no_inbound_buffered(&op), "{:?}", op.events);
    assert!(
        no_inbound_buffered(&b.c),
        "the Bncr client got its own inbound"
    );
}

/// A Bncr client that connected shortly before a SIGUSR1 and has not
/// called `bncr.connect` yet is still in its `inboundGraceMs` in the new
/// generation, which never saw it open: its own pending message is not
/// offered to it, however often the bridge offers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bncr_client_in_its_grace_across_sigusr1_is_not_handed_pending_inbound() {
    let cfg = "inboundGraceMs = 60000\ninboundRetryMs = 20\n";
    let p = gateway(cfg).await;
    let (mut a, _) = Bncr::join(&p.url(), None).await;
    assert_eq!(a.inbound("42", "g-1", "hello").await["accepted"], true);
    // Handshaken, holding operator.write, not identified yet.
    let mut b = operator(&p.url()).await;
    p.signal(Signal::SIGUSR1);
    b.event("gateway.generation").await;
    // The new generation offers the message again and again (every 20 ms);
    // each offer reaches nobody. Read through `b`: diagnostics is not a
    // client method, so it does not identify `b`.
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let d = loop {
        let res = b.call("bncr.diagnostics", json!({})).await;
        if res["ok"] == true {
            let d = res["payload"].clone();
            if d["generation"] == 2 && d["counters"]["inboundUnreceivedOffers"].as_u64() >= Some(3)
                || d["inboundPending"] == 0
            {
                break d;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no offers in generation 2: {res}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(d["inboundPending"], 1, "handed on to someone: {d}");
    assert!(no_inbound_buffered(&b), "{:?}", b.events);
    assert!(no_inbound_buffered(&a.c), "{:?}", a.c.events);
}

/// Store writes failing (here: the database refuses inserts into the
/// outbox, as a full or read-only disk would): `health` and `/readyz` say
/// so with the reason instead of claiming health while every `send` fails,
/// and recover once a write succeeds again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_store_writes_fail_health_and_readiness_with_the_reason() {
    let p = gateway(QUICK).await;
    let (mut admin, _) = Client::admin(&p.url()).await;
    let send = |key: &str| json!({"channel": "bncr", "to": "Bncr:qq:0:1", "message": "x", "idempotencyKey": key});
    assert_eq!(admin.call("send", send("w-0")).await["ok"], true);
    let (status, _, body) = http(p.addr, "GET", "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let db = rusqlite::Connection::open(p.dir.path().join("state/bncr/bncr.sqlite3")).unwrap();
    db.execute_batch(
        "CREATE TRIGGER refuse BEFORE INSERT ON outbox BEGIN SELECT RAISE(ABORT, 'disk refuses writes'); END;",
    )
    .unwrap();
    let res = admin.call("send", send("w-1")).await;
    assert_eq!(res["error"]["code"], "UNAVAILABLE", "{res}");
    assert!(
        res["error"]["message"]
            .as_str()
            .unwrap()
            .contains("disk refuses writes"),
        "{res}"
    );
    let health = payload(&admin.call("health", json!({})).await);
    assert_eq!(health["ok"], false, "{health}");
    let degraded = &health["plugins"]["degraded"][0];
    assert_eq!(degraded["id"], "bncr", "{health}");
    assert!(
        degraded["reason"]
            .as_str()
            .unwrap()
            .contains("disk refuses writes"),
        "{health}"
    );
    let (status, _, body) = http(p.addr, "GET", "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("degradedPlugins") && body.contains("disk refuses writes"),
        "{body}"
    );
    let diag = payload(&admin.call("bncr.diagnostics", json!({})).await);
    assert!(diag["store"]["failures"].as_u64().unwrap() >= 1, "{diag}");
    db.execute_batch("DROP TRIGGER refuse;").unwrap();
    let res = admin.call("send", send("w-2")).await;
    assert_eq!(res["ok"], true, "{res}");
    let health = payload(&admin.call("health", json!({})).await);
    assert_eq!(health["ok"], true, "{health}");
    let (status, _, body) = http(p.addr, "GET", "/readyz").await;
    assert_eq!(status, 200, "{body}");
}

/// A database SQLite can only open read-only is reported degraded from the
/// start. File modes do not bind root and CI runs as root, so as root the
/// gateway runs as `nobody` (see `Proc::start_unprivileged_in`).
/// `failing_store_writes_fail_health_and_readiness_with_the_reason` covers
/// the write-failure path with a trigger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_store_is_reported_degraded() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), QUICK);
    let p = Proc::start_unprivileged_in(dir, &["--config".into(), config]).await;
    let (mut admin, _) = Client::admin(&p.url()).await;
    let health = payload(&admin.call("health", json!({})).await);
    assert_eq!(health["ok"], true, "{health}");
    let dir = p.dir.path().join("state/bncr");
    let set_mode = |mode: u32| {
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            if f.is_file() {
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            }
        }
    };
    set_mode(0o444);
    if !nix::unistd::geteuid().is_root() {
        let db = dir.join("bncr.sqlite3");
        assert!(std::fs::OpenOptions::new().write(true).open(&db).is_err());
    }
    p.signal(Signal::SIGUSR1);
    admin.event("gateway.generation").await;
    // The new generation is announced at the swap; bncr's hand-over (stop
    // the old store, open the new one) runs after it. A bncr request waits
    // for that, and then reports what the new store found.
    let diag = payload(&admin.call("bncr.diagnostics", json!({})).await);
    assert_eq!(diag["store"]["readOnly"], true, "{diag}");
    let health = payload(&admin.call("health", json!({})).await);
    assert_eq!(health["ok"], false, "{health}");
    assert_eq!(health["plugins"]["degraded"][0]["id"], "bncr", "{health}");
    let (status, _, body) = http(p.addr, "GET", "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("read-only"), "{body}");
    set_mode(0o644);
}

/// The example config documents every key of the bridge's config schema.
#[test]
fn the_example_config_documents_every_bncr_key() {
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("ws-proxy.example.toml"),
    )
    .unwrap();
    let schema = bncr_plugin::config_schema();
    let keys: Vec<&String> = schema["properties"].as_object().unwrap().keys().collect();
    assert!(keys.len() >= 23, "{keys:?}");
    for key in keys {
        assert!(
            example.contains(&format!("# {key} =")),
            "ws-proxy.example.toml does not document bncr's `{key}`"
        );
    }
}

/// Bridge limits that trip show on `/metrics`, by limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tripped_bridge_limits_are_counted_in_metrics() {
    let p = gateway("maxTransfers = 1\n").await;
    let (mut b, _) = Bncr::join(&p.url(), None).await;
    let init = |id: &str, size: u64, chunk: u64| json!({"transferId": id, "fileSize": size, "chunkSize": chunk});
    assert_eq!(
        b.c.call("bncr.file.init", init("t1", 4, 4)).await["ok"],
        true
    );
    for id in ["t2", "t3"] {
        let res = b.c.call("bncr.file.init", init(id, 4, 4)).await;
        assert_eq!(res["error"]["details"]["code"], "transfer-limit", "{res}");
    }
    let res = b.c.call("bncr.file.init", init("amp", 52428800, 1)).await;
    assert_eq!(res["error"]["details"]["code"], "chunk-too-small", "{res}");
    b.inbound("42", "m-1", "nobody listens").await;
    let (status, _, body) = http(p.addr, "GET", "/metrics").await;
    assert_eq!(status, 200);
    for (key, want) in [
        (
            "gateway_bncr_limit_trips_total{limit=\"maxTransfers\"}",
            2.0,
        ),
        (
            "gateway_bncr_limit_trips_total{limit=\"fileChunking\"}",
            1.0,
        ),
        ("gateway_bncr_limit_trips_total{limit=\"maxAccounts\"}", 0.0),
        ("gateway_bncr_inbound_pending", 1.0),
        ("gateway_bncr_store_failures_total", 0.0),
    ] {
        assert_eq!(metric(&body, key), Some(want), "{key}");
    }
}
