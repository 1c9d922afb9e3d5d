//! The `bncr.*` methods within one generation: the happy path, leases,
//! malformed params, retries, dead letters and acks.

use crate::common::Host;
use plugin_api::ErrorCode;
use serde_json::{Value, json};
use std::time::Duration;

const TO: &str = "Bncr:qq:0:10001";
/// A connection the test host does not know: it calls as an internal admin.
const ADMIN: u64 = 0;
/// A chat operator: an operator connection with `operator.write` that is not
/// a Bncr client.
const OP: u64 = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_inbound_send_push_ack() {
    let host = Host::new(json!({}));
    host.transport.connect(1);
    host.transport.connect(OP);
    let g = host.start(1).await;
    let c = g
        .ok(
            1,
            "bncr.connect",
            json!({"accountId": "default", "clientId": "bncr-1"}),
        )
        .await;
    for f in [
        "bridgeVersion",
        "leaseId",
        "connectionEpoch",
        "protocolVersion",
        "acceptedAt",
        "now",
        "activeConnections",
        "pending",
        "deadLetter",
    ] {
        assert!(c.get(f).is_some(), "connect reply lacks {f}: {c}");
    }
    assert_eq!(c["channel"], "bncr");
    assert_eq!(c["accountId"], "Primary");
    assert_eq!(c["isPrimary"], true);
    assert_eq!(c["online"], true);
    assert_eq!(c["pushEvent"], "plugin.bncr.push");
    let lease = json!({"leaseId": c["leaseId"], "connectionEpoch": c["connectionEpoch"]});

    let mut inbound = json!({"platform": "qq", "userId": 10001, "msg": "hello", "msgId": "in-1"});
    inbound
        .as_object_mut()
        .unwrap()
        .extend(lease.as_object().unwrap().clone());
    let r = g.ok(1, "bncr.inbound", inbound).await;
    assert_eq!(r["accepted"], true);
    assert_eq!(r["msgId"], "in-1");
    // Hand-on to operators runs in the bridge's inbound loop, after the
    // journaled `accepted: true`.
    host.transport
        .wait_for("chat.inbound", Duration::from_secs(5), |t| {
            !t.named("chat.inbound").is_empty()
        })
        .await;
    let ev = host.transport.named("chat.inbound");
    assert_eq!(ev.len(), 1, "the operator, not the Bncr client: {ev:?}");
    assert_eq!(ev[0].conn, Some(OP));
    let p = &ev[0].payload;
    assert_eq!(
        (
            p["channel"].as_str(),
            p["route"].as_str(),
            p["msg"].as_str()
        ),
        (Some("bncr"), Some("qq:0:10001"), Some("hello"))
    );
    assert_eq!(p["type"], "text");
    assert_eq!(p["sessionKey"], r["sessionKey"]);

    let id = g.send(TO, json!("reply"), "op-1").await.unwrap();
    host.transport
        .wait_for("push", Duration::from_secs(5), |t| t.pushes(1).len() == 1)
        .await;
    let push = host.transport.named("plugin.bncr.push").remove(0).payload;
    assert_eq!(push["type"], "message.outbound");
    assert_eq!(push["messageId"], id.as_str());
    assert_eq!(push["idempotencyKey"], id.as_str());
    assert_eq!(
        push["message"],
        json!({"platform": "qq", "groupId": "0", "userId": "10001", "type": "text", "msg": "reply"})
    );
    let a = g.ok(1, "bncr.ack", json!({"messageId": id})).await;
    assert_eq!(a["ok"], true);
    let a = g.ok(1, "bncr.ack", json!({"messageId": id})).await;
    assert_eq!(
        a["message"], "already-acked-or-missing",
        "acks are idempotent"
    );
    let act = g.ok(1, "bncr.activity", lease.clone()).await;
    assert_eq!(
        (
            act["ok"].as_bool(),
            act["pending"].as_u64(),
            act["activeConnections"].as_u64()
        ),
        (Some(true), Some(0), Some(1))
    );
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_per_account() {
    let host = Host::new(json!({}));
    let g = host.start(1).await;
    let a = g.ok(1, "bncr.connect", json!({"accountId": "A"})).await;
    let b1 = g.ok(2, "bncr.connect", json!({"accountId": "B"})).await;
    let b2 = g.ok(3, "bncr.connect", json!({"accountId": "B"})).await;
    assert_eq!(b2["connectionEpoch"], 2);
    let msg = |acc: &str, lease: &Value, id: &str| json!({"accountId": acc, "leaseId": lease["leaseId"], "platform": "tg", "userId": "u", "msgId": id});
    let r = g.ok(1, "bncr.inbound", msg("A", &a, "1")).await;
    assert_eq!(
        r["accepted"], true,
        "B's second client must not make A's lease stale"
    );
    let r = g.ok(2, "bncr.inbound", msg("B", &b1, "2")).await;
    assert_eq!(
        r,
        json!({"accepted": false, "stale": true, "accountId": "B"})
    );
    let r = g.ok(3, "bncr.inbound", msg("B", &b2, "3")).await;
    assert_eq!(r["accepted"], true);
    let r = g
        .ok(
            2,
            "bncr.activity",
            json!({"accountId": "B", "leaseId": b1["leaseId"]}),
        )
        .await;
    assert_eq!(r["stale"], true);
    // Outbound for B goes to B's current lease holder only.
    host.transport.connect(2);
    host.transport.connect(3);
    g.send(TO, json!({"msg": "to b", "accountId": "B"}), "b-1")
        .await
        .unwrap();
    host.transport
        .wait_for("push to 3", Duration::from_secs(5), |t| {
            t.pushes(3).len() == 1
        })
        .await;
    assert!(host.transport.pushes(2).is_empty());
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_params_give_clear_invalid_request_errors() {
    let host = Host::new(json!({"accounts": ["Primary", "B"]}));
    let g = host.start(1).await;
    let cases: &[(&str, Value, &str)] = &[
        (
            "bncr.inbound",
            json!({"groupId": "0", "userId": "1"}),
            "platform/groupId/userId required",
        ),
        (
            "bncr.inbound",
            json!({"platform": "qq"}),
            "platform/groupId/userId required",
        ),
        (
            "bncr.inbound",
            json!({"platform": 5, "userId": "1"}),
            "invalid params",
        ),
        (
            "bncr.inbound",
            json!({"platform": "qq", "userId": {"x": 1}}),
            "invalid params",
        ),
        (
            "bncr.inbound",
            json!({"platform": "qq", "userId": "1", "type": "sticker"}),
            "type must be one of",
        ),
        ("bncr.connect", json!({"accountId": 5}), "invalid params"),
        (
            "bncr.connect",
            json!({"accountId": "Nobody"}),
            "unknown accountId",
        ),
        ("bncr.ack", json!({}), "messageId required"),
        ("bncr.ack", json!({"messageId": 12}), "invalid params"),
        (
            "bncr.ack",
            json!({"messageId": "x", "ok": "yes"}),
            "invalid params",
        ),
        (
            "bncr.file.init",
            json!({"fileSize": 3}),
            "transferId required",
        ),
        (
            "bncr.file.init",
            json!({"transferId": "../etc", "fileSize": 3}),
            "transferId must be",
        ),
        (
            "bncr.file.init",
            json!({"transferId": "t1"}),
            "fileSize required",
        ),
        (
            "bncr.file.init",
            json!({"transferId": "t1", "fileSize": 60_000_000}),
            "file too large",
        ),
        (
            "bncr.file.chunk",
            json!({"chunkIndex": 0, "offset": 0, "base64": "AA=="}),
            "transferId required",
        ),
        (
            "bncr.file.chunk",
            json!({"transferId": "nope", "chunkIndex": 0, "offset": 0, "base64": "AA=="}),
            "transfer not found",
        ),
        (
            "bncr.file.complete",
            json!({"transferId": "nope"}),
            "transfer not found",
        ),
        (
            "bncr.file.ack",
            json!({"transferId": "t", "stage": "middle"}),
            "stage must be",
        ),
        (
            "bncr.deadLetter.inspect",
            json!({"limit": "x"}),
            "invalid params",
        ),
        (
            "bncr.deadLetter.prune",
            json!({"dryRun": false}),
            "deadLetter-prune-requires-filter",
        ),
        ("bncr.activity", json!([1, 2]), "invalid params"),
    ];
    for (method, params, want) in cases {
        let err = g
            .call(1, method, params.clone())
            .await
            .expect_err(&format!("{method} {params} should fail"));
        assert_eq!(
            err.code,
            ErrorCode::InvalidRequest,
            "{method} {params}: {err}"
        );
        assert!(
            err.message.contains(want),
            "{method} {params}: got `{}`, want `{want}`",
            err.message
        );
    }
    for (to, message, want) in [
        ("Bncr:qq:0", json!("x"), "to must be"),
        ("qq::1", json!("x"), "to must be"),
        (TO, json!(5), "message must be a string or an object"),
        (TO, json!({"type": "gif", "msg": "x"}), "message.type"),
        (TO, json!({"type": "text"}), "needs msg, path or base64"),
        (
            TO,
            json!({"msg": "x", "accountId": "Nobody"}),
            "unknown accountId",
        ),
    ] {
        let err = g
            .send(to, message.clone(), "k")
            .await
            .expect_err("send should fail");
        assert_eq!(err.code, ErrorCode::InvalidRequest);
        assert!(
            err.message.contains(want),
            "{to} {message}: {}",
            err.message
        );
    }
    // Unknown fields are ignored.
    let r = g
        .ok(
            1,
            "bncr.inbound",
            json!({"platform": "qq", "userId": "1", "futureField": [1]}),
        )
        .await;
    assert_eq!(r["accepted"], true);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_back_off_then_dead_letter_after_the_limit() {
    let host = Host::new(json!({"retryLimit": 3, "retryBaseMs": 15, "retryCapMs": 40}));
    host.transport.connect(1);
    let g = host.start(1).await;
    g.ok(1, "bncr.connect", json!({})).await;
    let started = std::time::Instant::now();
    let id = g.send(TO, json!("never acked"), "r-1").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let d = g.ok(1, "bncr.diagnostics", json!({})).await;
        if d["deadLetter"] == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not dead-lettered: {d}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Pushes at 0, 15 and 15+30 ms; dead once the third push's 40 ms wait passed.
    assert!(started.elapsed() >= Duration::from_millis(15 + 30 + 40));
    assert_eq!(host.transport.pushes(1), vec![id.clone(); 3]);
    let ins = g.ok(1, "bncr.deadLetter.inspect", json!({})).await;
    assert_eq!(ins["total"], 1);
    assert_eq!(ins["entries"][0]["messageId"], id.as_str());
    assert_eq!(ins["entries"][0]["reason"], "retry-limit");
    assert_eq!(ins["entries"][0]["attempts"], 3);
    assert_eq!(ins["entries"][0]["preview"], "never acked");
    let a = g.ok(1, "bncr.ack", json!({"messageId": id})).await;
    assert_eq!(a["message"], "already-acked-or-missing");
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_retries_and_fatal_dead_letters() {
    let host = Host::new(json!({"retryBaseMs": 10, "retryCapMs": 20}));
    host.transport.connect(1);
    let g = host.start(1).await;
    g.ok(1, "bncr.connect", json!({})).await;
    let id = g.send(TO, json!("a"), "n-1").await.unwrap();
    host.transport
        .wait_for("push", Duration::from_secs(5), |t| t.pushes(1).len() == 1)
        .await;
    let r = g
        .ok(
            1,
            "bncr.ack",
            json!({"messageId": id, "ok": false, "error": "adapter busy"}),
        )
        .await;
    assert_eq!(r["willRetry"], true);
    host.transport
        .wait_for("retry push", Duration::from_secs(5), |t| {
            // At least one retry (more may follow every 20 ms).
            t.pushes(1).len() >= 2
        })
        .await;
    let r = g
        .ok(
            1,
            "bncr.ack",
            json!({"messageId": id, "ok": false, "fatal": true, "error": "blocked"}),
        )
        .await;
    assert_eq!(r["movedToDeadLetter"], true);
    let r = g
        .ok(
            1,
            "bncr.ack",
            json!({"messageId": id, "ok": false, "fatal": true}),
        )
        .await;
    assert_eq!(r["message"], "already-acked-or-missing");
    let ins = g
        .ok(1, "bncr.deadLetter.inspect", json!({"reason": "fatal"}))
        .await;
    assert_eq!(ins["total"], 1);
    assert_eq!(ins["entries"][0]["error"], "blocked");
    // The next message is not held up by the dead one.
    let id2 = g.send(TO, json!("b"), "n-2").await.unwrap();
    host.transport
        .wait_for("second message", Duration::from_secs(5), |t| {
            t.pushes(1).contains(&id2)
        })
        .await;
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_requires_a_filter_and_dry_run_is_the_default() {
    let host = Host::new(json!({}));
    host.transport.connect(1);
    let g = host.start(1).await;
    g.ok(1, "bncr.connect", json!({})).await;
    for i in 0..3 {
        let id = g
            .send(TO, json!(format!("d{i}")), &format!("d{i}"))
            .await
            .unwrap();
        host.transport
            .wait_for("push", Duration::from_secs(5), |t| {
                t.pushes(1).contains(&id)
            })
            .await;
        g.ok(
            1,
            "bncr.ack",
            json!({"messageId": id, "ok": false, "fatal": true}),
        )
        .await;
    }
    // Destructive: operator.write is not enough, even for a dry run.
    let err = g
        .call(1, "bncr.deadLetter.prune", json!({"reason": "fatal"}))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Forbidden);
    let err = g
        .call(ADMIN, "bncr.deadLetter.prune", json!({"dryRun": false}))
        .await
        .unwrap_err();
    assert_eq!(err.message, "deadLetter-prune-requires-filter");
    assert_eq!(err.details_code(), Some("deadLetter-prune-requires-filter"));
    let dry = g.ok(ADMIN, "bncr.deadLetter.prune", json!({})).await;
    assert_eq!(
        (
            dry["dryRun"].as_bool(),
            dry["matched"].as_u64(),
            dry["removed"].as_u64()
        ),
        (Some(true), Some(3), Some(0))
    );
    let page = g
        .ok(
            1,
            "bncr.deadLetter.inspect",
            json!({"limit": 2, "offset": 2}),
        )
        .await;
    assert_eq!(
        (
            page["total"].as_u64(),
            page["entries"].as_array().map(Vec::len)
        ),
        (Some(3), Some(1))
    );
    let none = g
        .ok(
            ADMIN,
            "bncr.deadLetter.prune",
            json!({"dryRun": false, "reason": "retry-limit"}),
        )
        .await;
    assert_eq!(none["removed"], 0);
    let real = g
        .ok(
            ADMIN,
            "bncr.deadLetter.prune",
            json!({"dryRun": false, "reason": "fatal"}),
        )
        .await;
    assert_eq!(real["removed"], 3);
    assert_eq!(
        g.ok(1, "bncr.deadLetter.inspect", json!({})).await["total"],
        0
    );
    assert_eq!(
        g.ok(1, "bncr.diagnostics", json!({})).await["deadLetter"],
        0
    );
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_refuse_and_echo_replies_through_the_outbox() {
    let host = Host::new(
        json!({"dmPolicy": "allowlist", "allowFrom": ["qq:7"], "groupPolicy": "disabled", "echo": {"enabled": true, "prefix": "> "}}),
    );
    host.transport.connect(1);
    host.transport.connect(OP);
    let g = host.start(1).await;
    g.ok(1, "bncr.connect", json!({})).await;
    let r = g
        .ok(
            1,
            "bncr.inbound",
            json!({"platform": "qq", "userId": "8", "msg": "x"}),
        )
        .await;
    assert_eq!(
        (r["accepted"].as_bool(), r["reason"].as_str()),
        (Some(false), Some("not-allowlisted"))
    );
    let r = g
        .ok(
            1,
            "bncr.inbound",
            json!({"platform": "qq", "groupId": "9", "userId": "7", "msg": "x"}),
        )
        .await;
    assert_eq!(r["reason"], "group-disabled");
    let r = g
        .ok(
            1,
            "bncr.inbound",
            json!({"platform": "qq", "userId": "7", "msg": "ping", "msgId": "e1"}),
        )
        .await;
    assert_eq!(r["accepted"], true);
    host.transport
        .wait_for("echo push", Duration::from_secs(5), |t| {
            t.pushes(1).len() == 1
        })
        .await;
    let push = host.transport.named("plugin.bncr.push").remove(0).payload;
    assert_eq!(push["message"]["msg"], "> ping");
    assert_eq!(push["message"]["userId"], "7");
    host.transport
        .wait_for("chat.inbound", Duration::from_secs(5), |t| {
            !t.to_conn(OP, "chat.inbound").is_empty()
        })
        .await;
    assert_eq!(host.transport.to_conn(OP, "chat.inbound").len(), 1);
    assert!(host.transport.to_conn(1, "chat.inbound").is_empty());
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_connection_goes_offline_and_handlers_refuse_when_store_closed() {
    let host = Host::new(json!({}));
    host.transport.connect(1);
    let g = host.start(1).await;
    let c = g.ok(1, "bncr.connect", json!({})).await;
    g.connection_closed(1);
    let d = g.ok(1, "bncr.diagnostics", json!({})).await;
    assert_eq!(d["accounts"][0]["online"], false);
    let id = g.send(TO, json!("later"), "o-1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(host.transport.pushes(1).is_empty());
    // The same client heartbeats with its lease: re-attached, delivery resumes.
    g.ok(1, "bncr.activity", json!({"leaseId": c["leaseId"]}))
        .await;
    host.transport
        .wait_for("push after reattach", Duration::from_secs(5), |t| {
            t.pushes(1) == vec![id.clone()]
        })
        .await;
    for s in g.decl.services.iter().rev() {
        s.clone().stop().await;
    }
    let err = g
        .call(1, "bncr.ack", json!({"messageId": id}))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Unavailable);
    assert!(g.send(TO, json!("x"), "o-2").await.is_err());
    g.ctl.retire();
}
