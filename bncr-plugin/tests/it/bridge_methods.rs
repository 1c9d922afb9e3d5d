//! The `bncr.*` methods within one generation: the happy path, leases,
//! malformed params, retries, dead letters and acks.

use crate::common::{
    admin, bncr_client, delivered, diag, ok, operator, pushes, send, start, state_dir, wait_for,
};
use plugin_api::ErrorCode;
use serde_json::{Value, json};
use std::time::Duration;

const TO: &str = "Bncr:qq:0:10001";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_inbound_send_push_ack() {
    let dir = state_dir();
    // The operator opens in this generation; without a grace it is an
    // operator at once (the grace has its own tests in inbound_hand_on).
    let host = start(dir.path(), json!({"inboundGraceMs": 0})).await;
    let client = bncr_client(&host);
    let op = operator(&host);
    let c = ok(
        &client,
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
    let r = ok(&client, "bncr.inbound", inbound).await;
    assert_eq!(r["accepted"], true);
    assert_eq!(r["msgId"], "in-1");
    // Hand-on to operators runs in the bridge's inbound loop, after the
    // journaled `accepted: true`.
    wait_for(&host, "chat.inbound", || {
        !host.events_named("chat.inbound").is_empty()
    })
    .await;
    let ev = host.events_named("chat.inbound");
    assert_eq!(ev.len(), 1, "the operator, not the Bncr client: {ev:?}");
    assert_eq!(ev[0].0, op.conn_id());
    let p = &ev[0].1.payload;
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

    let id = send(&op, TO, json!("reply"), "op-1").await.unwrap();
    wait_for(&host, "push", || pushes(&client).len() == 1).await;
    let push = delivered(&host, "plugin.bncr.push").remove(0);
    assert_eq!(push["type"], "message.outbound");
    assert_eq!(push["messageId"], id.as_str());
    assert_eq!(push["idempotencyKey"], id.as_str());
    assert_eq!(
        push["message"],
        json!({"platform": "qq", "groupId": "0", "userId": "10001", "type": "text", "msg": "reply"})
    );
    let a = ok(&client, "bncr.ack", json!({"messageId": id})).await;
    assert_eq!(a["ok"], true);
    let a = ok(&client, "bncr.ack", json!({"messageId": id})).await;
    assert_eq!(
        a["message"], "already-acked-or-missing",
        "acks are idempotent"
    );
    let act = ok(&client, "bncr.activity", lease.clone()).await;
    assert_eq!(
        (
            act["ok"].as_bool(),
            act["pending"].as_u64(),
            act["activeConnections"].as_u64()
        ),
        (Some(true), Some(0), Some(1))
    );
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_per_account() {
    let dir = state_dir();
    let host = start(dir.path(), json!({})).await;
    let (c1, c2, c3) = (bncr_client(&host), bncr_client(&host), bncr_client(&host));
    let op = operator(&host);
    let a = ok(&c1, "bncr.connect", json!({"accountId": "A"})).await;
    let b1 = ok(&c2, "bncr.connect", json!({"accountId": "B"})).await;
    let b2 = ok(&c3, "bncr.connect", json!({"accountId": "B"})).await;
    assert_eq!(b2["connectionEpoch"], 2);
    let msg = |acc: &str, lease: &Value, id: &str| json!({"accountId": acc, "leaseId": lease["leaseId"], "platform": "tg", "userId": "u", "msgId": id});
    let r = ok(&c1, "bncr.inbound", msg("A", &a, "1")).await;
    assert_eq!(
        r["accepted"], true,
        "B's second client must not make A's lease stale"
    );
    let r = ok(&c2, "bncr.inbound", msg("B", &b1, "2")).await;
    assert_eq!(
        r,
        json!({"accepted": false, "stale": true, "accountId": "B"})
    );
    let r = ok(&c3, "bncr.inbound", msg("B", &b2, "3")).await;
    assert_eq!(r["accepted"], true);
    let r = ok(
        &c2,
        "bncr.activity",
        json!({"accountId": "B", "leaseId": b1["leaseId"]}),
    )
    .await;
    assert_eq!(r["stale"], true);
    // Outbound for B goes to B's current lease holder only.
    send(&op, TO, json!({"msg": "to b", "accountId": "B"}), "b-1")
        .await
        .unwrap();
    wait_for(&host, "push to the third", || pushes(&c3).len() == 1).await;
    assert!(pushes(&c2).is_empty());
    assert_eq!(delivered(&host, "plugin.bncr.push").len(), 1);
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_params_give_clear_invalid_request_errors() {
    let dir = state_dir();
    let host = start(dir.path(), json!({"accounts": ["Primary", "B"]})).await;
    // An admin may call every method, so each case meets the param check.
    let admin = admin(&host);
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
        let err = admin
            .call(method, params.clone())
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
        let err = send(&admin, to, message.clone(), "k")
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
    let r = ok(
        &admin,
        "bncr.inbound",
        json!({"platform": "qq", "userId": "1", "futureField": [1]}),
    )
    .await;
    assert_eq!(r["accepted"], true);
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_back_off_then_dead_letter_after_the_limit() {
    let dir = state_dir();
    let host = start(
        dir.path(),
        json!({"retryLimit": 3, "retryBaseMs": 15, "retryCapMs": 40}),
    )
    .await;
    let client = bncr_client(&host);
    let op = operator(&host);
    ok(&client, "bncr.connect", json!({})).await;
    let started = std::time::Instant::now();
    let id = send(&op, TO, json!("never acked"), "r-1").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let d = diag(&client).await;
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
    assert_eq!(pushes(&client), vec![id.clone(); 3]);
    let ins = ok(&client, "bncr.deadLetter.inspect", json!({})).await;
    assert_eq!(ins["total"], 1);
    assert_eq!(ins["entries"][0]["messageId"], id.as_str());
    assert_eq!(ins["entries"][0]["reason"], "retry-limit");
    assert_eq!(ins["entries"][0]["attempts"], 3);
    assert_eq!(ins["entries"][0]["preview"], "never acked");
    let a = ok(&client, "bncr.ack", json!({"messageId": id})).await;
    assert_eq!(a["message"], "already-acked-or-missing");
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_retries_and_fatal_dead_letters() {
    let dir = state_dir();
    let host = start(dir.path(), json!({"retryBaseMs": 10, "retryCapMs": 20})).await;
    let client = bncr_client(&host);
    let op = operator(&host);
    ok(&client, "bncr.connect", json!({})).await;
    let id = send(&op, TO, json!("a"), "n-1").await.unwrap();
    wait_for(&host, "push", || pushes(&client).len() == 1).await;
    let r = ok(
        &client,
        "bncr.ack",
        json!({"messageId": id, "ok": false, "error": "adapter busy"}),
    )
    .await;
    assert_eq!(r["willRetry"], true);
    // At least one retry (more may follow every 20 ms).
    wait_for(&host, "retry push", || pushes(&client).len() >= 2).await;
    let r = ok(
        &client,
        "bncr.ack",
        json!({"messageId": id, "ok": false, "fatal": true, "error": "blocked"}),
    )
    .await;
    assert_eq!(r["movedToDeadLetter"], true);
    let r = ok(
        &client,
        "bncr.ack",
        json!({"messageId": id, "ok": false, "fatal": true}),
    )
    .await;
    assert_eq!(r["message"], "already-acked-or-missing");
    let ins = ok(
        &client,
        "bncr.deadLetter.inspect",
        json!({"reason": "fatal"}),
    )
    .await;
    assert_eq!(ins["total"], 1);
    assert_eq!(ins["entries"][0]["error"], "blocked");
    // The next message is not held up by the dead one.
    let id2 = send(&op, TO, json!("b"), "n-2").await.unwrap();
    wait_for(&host, "second message", || pushes(&client).contains(&id2)).await;
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_requires_a_filter_and_dry_run_is_the_default() {
    let dir = state_dir();
    let host = start(dir.path(), json!({})).await;
    let client = bncr_client(&host);
    let op = operator(&host);
    let admin = admin(&host);
    ok(&client, "bncr.connect", json!({})).await;
    for i in 0..3 {
        let id = send(&op, TO, json!(format!("d{i}")), &format!("d{i}"))
            .await
            .unwrap();
        wait_for(&host, "push", || pushes(&client).contains(&id)).await;
        ok(
            &client,
            "bncr.ack",
            json!({"messageId": id, "ok": false, "fatal": true}),
        )
        .await;
    }
    // Destructive: operator.write is not enough, even for a dry run.
    let err = client
        .call("bncr.deadLetter.prune", json!({"reason": "fatal"}))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Forbidden);
    let err = admin
        .call("bncr.deadLetter.prune", json!({"dryRun": false}))
        .await
        .unwrap_err();
    assert_eq!(err.message, "deadLetter-prune-requires-filter");
    assert_eq!(err.details_code(), Some("deadLetter-prune-requires-filter"));
    let dry = ok(&admin, "bncr.deadLetter.prune", json!({})).await;
    assert_eq!(
        (
            dry["dryRun"].as_bool(),
            dry["matched"].as_u64(),
            dry["removed"].as_u64()
        ),
        (Some(true), Some(3), Some(0))
    );
    let page = ok(
        &client,
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
    let none = ok(
        &admin,
        "bncr.deadLetter.prune",
        json!({"dryRun": false, "reason": "retry-limit"}),
    )
    .await;
    assert_eq!(none["removed"], 0);
    let real = ok(
        &admin,
        "bncr.deadLetter.prune",
        json!({"dryRun": false, "reason": "fatal"}),
    )
    .await;
    assert_eq!(real["removed"], 3);
    assert_eq!(
        ok(&client, "bncr.deadLetter.inspect", json!({})).await["total"],
        0
    );
    assert_eq!(diag(&client).await["deadLetter"], 0);
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_refuse_and_echo_replies_through_the_outbox() {
    let dir = state_dir();
    // No grace: the echo counts as a receiver, so an operator still in its
    // grace would never be offered the message.
    let host = start(
        dir.path(),
        json!({"dmPolicy": "allowlist", "allowFrom": ["qq:7"], "groupPolicy": "disabled", "echo": {"enabled": true, "prefix": "> "}, "inboundGraceMs": 0}),
    )
    .await;
    let client = bncr_client(&host);
    let op = operator(&host);
    ok(&client, "bncr.connect", json!({})).await;
    let r = ok(
        &client,
        "bncr.inbound",
        json!({"platform": "qq", "userId": "8", "msg": "x"}),
    )
    .await;
    assert_eq!(
        (r["accepted"].as_bool(), r["reason"].as_str()),
        (Some(false), Some("not-allowlisted"))
    );
    let r = ok(
        &client,
        "bncr.inbound",
        json!({"platform": "qq", "groupId": "9", "userId": "7", "msg": "x"}),
    )
    .await;
    assert_eq!(r["reason"], "group-disabled");
    let r = ok(
        &client,
        "bncr.inbound",
        json!({"platform": "qq", "userId": "7", "msg": "ping", "msgId": "e1"}),
    )
    .await;
    assert_eq!(r["accepted"], true);
    wait_for(&host, "echo push", || pushes(&client).len() == 1).await;
    let push = delivered(&host, "plugin.bncr.push").remove(0);
    assert_eq!(push["message"]["msg"], "> ping");
    assert_eq!(push["message"]["userId"], "7");
    wait_for(&host, "chat.inbound", || {
        !op.events_named("chat.inbound").is_empty()
    })
    .await;
    assert_eq!(op.events_named("chat.inbound").len(), 1);
    assert!(client.events_named("chat.inbound").is_empty());
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_connection_goes_offline_and_requests_after_the_stop_are_refused_and_lose_nothing() {
    let dir = state_dir();
    let host = start(dir.path(), json!({})).await;
    let first = bncr_client(&host);
    let op = operator(&host);
    let c = ok(&first, "bncr.connect", json!({})).await;
    first.disconnect();
    let d = diag(&op).await;
    assert_eq!(d["accounts"][0]["online"], false);
    // The client comes back on a new connection, but has not said so yet.
    let back = bncr_client(&host);
    let id = send(&op, TO, json!("later"), "o-1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        host.events_named("plugin.bncr.push").is_empty(),
        "nothing pushed while the lease is offline"
    );
    // It heartbeats with its lease: re-attached, delivery resumes.
    ok(&back, "bncr.activity", json!({"leaseId": c["leaseId"]})).await;
    wait_for(&host, "push after reattach", || {
        pushes(&back) == vec![id.clone()]
    })
    .await;

    // Once the gateway stopped, requests are refused cleanly...
    host.shutdown().await;
    let err = back
        .call("bncr.ack", json!({"messageId": id}))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Unavailable);
    let err = send(&op, TO, json!("x"), "o-2").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Unavailable);
    // ... and lose nothing: the unacked message waits for the next process,
    // the refused one was never queued.
    let host = start(dir.path(), json!({})).await;
    let again = bncr_client(&host);
    let r = ok(&again, "bncr.connect", json!({})).await;
    assert_eq!(r["pending"], 1, "{r}");
    wait_for(&host, "push in the next process", || {
        pushes(&again) == vec![id.clone()]
    })
    .await;
    host.shutdown().await;
}
