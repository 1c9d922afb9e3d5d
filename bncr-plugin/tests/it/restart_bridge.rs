//! Behaviour across generations: outbox, leases and dedupe survive an
//! in-process restart and a crash.

use crate::common::{
    ack_in_order, bncr_client, delivered, diag, first_seen, ok, operator, pushes, send, start,
    state_dir, until_journaled_handed_on, wait_for,
};
use serde_json::json;
use std::time::Duration;

const TO: &str = "Bncr:qq:0:10001";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_unacked_survive_a_generation_swap_on_the_same_connection() {
    let dir = state_dir();
    let host = start(dir.path(), json!({"retryBaseMs": 2000})).await;
    let client = bncr_client(&host);
    let op = operator(&host);
    ok(&client, "bncr.connect", json!({"clientId": "c1"})).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(
            send(&op, TO, json!(format!("m{i}")), &format!("k{i}"))
                .await
                .unwrap(),
        );
    }
    wait_for(&host, "first push", || !pushes(&client).is_empty()).await;
    // Window 1: only the head is in flight.
    assert_eq!(pushes(&client), vec![ids[0].clone()]);
    host.restart().await.unwrap();

    // No new bncr.connect: the restored lease points at the same connection.
    ack_in_order(&host, &client, &ids).await;
    assert_eq!(first_seen(&pushes(&client)), ids);
    let d = diag(&client).await;
    assert_eq!(d["outbox"], 0);
    assert_eq!(d["generation"], 2);
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_queued_while_away_survive_a_crash() {
    let dir = state_dir();
    let host = start(dir.path(), json!({})).await;
    let away = bncr_client(&host);
    let op = operator(&host);
    ok(&away, "bncr.connect", json!({})).await;
    away.disconnect();
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(
            send(
                &op,
                TO,
                json!({"type": "text", "msg": format!("away {i}")}),
                &format!("a{i}"),
            )
            .await
            .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        host.events_named("plugin.bncr.push").is_empty(),
        "nothing pushed while offline"
    );
    // The process dies: no drain, no service stop.
    host.crash();

    let host = start(dir.path(), json!({})).await;
    let back = bncr_client(&host);
    let r = ok(&back, "bncr.connect", json!({})).await;
    assert_eq!(r["pending"], 10);
    ack_in_order(&host, &back, &ids).await;
    assert_eq!(first_seen(&pushes(&back)), ids);
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_msg_id_is_deduped_across_a_swap() {
    let dir = state_dir();
    let host = start(dir.path(), json!({})).await;
    let inbound =
        json!({"platform": "qq", "groupId": "0", "userId": "42", "msg": "hi", "msgId": "m-1"});
    let client = bncr_client(&host);
    let _op = operator(&host);
    let r = ok(&client, "bncr.inbound", inbound.clone()).await;
    assert_eq!(r["accepted"], true);
    assert!(r.get("duplicated").is_none());
    host.restart().await.unwrap();
    let r = ok(&client, "bncr.inbound", inbound.clone()).await;
    assert_eq!(r["accepted"], true);
    assert_eq!(r["duplicated"], true);
    assert_eq!(r["msgId"], "m-1");
    // Handed on once: by generation 1's inbound loop, or by generation 2's
    // at start if generation 1 stopped first; never twice.
    wait_for(&host, "chat.inbound", || {
        !host.events_named("chat.inbound").is_empty()
    })
    .await;
    assert_eq!(host.events_named("chat.inbound").len(), 1);
    // Another account with the same route and msgId is a different message.
    let r = ok(
        &client,
        "bncr.inbound",
        json!({"accountId": "B", "platform": "qq", "userId": 42, "msgId": "m-1"}),
    )
    .await;
    assert!(r.get("duplicated").is_none());
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journaled_but_not_handed_on_is_handed_on_by_the_next_generation() {
    let dir = state_dir();
    let host = start(dir.path(), json!({})).await;
    host.shutdown().await;
    drop(host);
    // Simulate a crash between journaling and publishing. Received now: a
    // row handed on and older than `dedupeTtlMs` is pruned by the next sweep.
    let db = dir.path().join("bncr/bncr.sqlite3");
    let c = rusqlite::Connection::open(&db).unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    c.execute(
        "INSERT INTO inbound(account_id, platform, group_id, user_id, msg_id, payload, received_at, handed_on)
         VALUES ('Primary','qq','0','5','lost-1', ?1, ?2, 0)",
        rusqlite::params![
            json!({"channel": "bncr", "msgId": "lost-1", "msg": "late"}).to_string(),
            now_ms
        ],
    )
    .unwrap();
    drop(c);
    let host = start(dir.path(), json!({})).await;
    // Offered once its grace (1 s by default) has passed.
    let op = operator(&host);
    wait_for(&host, "hand-on", || {
        !host.events_named("chat.inbound").is_empty()
    })
    .await;
    let ev = delivered(&host, "chat.inbound");
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["msgId"], "lost-1");
    until_journaled_handed_on(dir.path(), &["lost-1"]).await;
    host.restart().await.unwrap();
    // Restored as handed on: nothing pending to offer again (the operator,
    // connected before this generation, would get it at once).
    let d = diag(&op).await;
    assert_eq!(d["inboundPending"], 0, "{d}");
    assert_eq!(d["generation"], 2, "{d}");
    assert_eq!(
        host.events_named("chat.inbound").len(),
        1,
        "handed on once only"
    );
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_send_survives_a_swap() {
    let dir = state_dir();
    let host = start(dir.path(), json!({})).await;
    let op = operator(&host);
    let a = send(&op, TO, json!("x"), "same").await.unwrap();
    let b = send(&op, TO, json!("y"), "same").await.unwrap();
    assert_eq!(a, b);
    host.restart().await.unwrap();
    assert_eq!(send(&op, TO, json!("z"), "same").await.unwrap(), a);
    let d = diag(&op).await;
    assert_eq!(d["outbox"], 1, "queued once");
    host.shutdown().await;
}
