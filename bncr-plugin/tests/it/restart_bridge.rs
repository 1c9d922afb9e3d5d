//! Behaviour across generations: outbox, leases and dedupe survive a swap
//! and a kill.

use crate::common::{Host, ack_in_order, first_seen};
use serde_json::json;
use std::time::Duration;

const TO: &str = "Bncr:qq:0:10001";
/// A chat operator connection (not a Bncr client).
const OP: u64 = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_unacked_survive_a_generation_swap_on_the_same_connection() {
    let host = Host::new(json!({"retryBaseMs": 2000}));
    host.transport.connect(7);
    let g1 = host.start(1).await;
    g1.ok(7, "bncr.connect", json!({"clientId": "c1"})).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(
            g1.send(TO, json!(format!("m{i}")), &format!("k{i}"))
                .await
                .unwrap(),
        );
    }
    host.transport
        .wait_for("first push", Duration::from_secs(5), |t| {
            !t.pushes(7).is_empty()
        })
        .await;
    // Window 1: only the head is in flight.
    assert_eq!(host.transport.pushes(7), vec![ids[0].clone()]);
    g1.stop().await;

    let g2 = host.start(2).await;
    // No new bncr.connect: the restored lease points at connection 7.
    ack_in_order(&host, &g2, 7, &ids).await;
    assert_eq!(first_seen(&host.transport.pushes(7)), ids);
    let d = g2.ok(7, "bncr.diagnostics", json!({})).await;
    assert_eq!(d["outbox"], 0);
    assert_eq!(d["generation"], 2);
    g2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_queued_while_away_survive_a_kill() {
    let host = Host::new(json!({}));
    host.transport.connect(3);
    let g1 = host.start(1).await;
    g1.ok(3, "bncr.connect", json!({})).await;
    host.transport.disconnect(3);
    g1.connection_closed(3);
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(
            g1.send(
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
        host.transport.pushes(3).is_empty(),
        "nothing pushed while offline"
    );
    g1.kill();

    let g2 = host.start(2).await;
    host.transport.connect(4);
    let r = g2.ok(4, "bncr.connect", json!({})).await;
    assert_eq!(r["pending"], 10);
    ack_in_order(&host, &g2, 4, &ids).await;
    assert_eq!(first_seen(&host.transport.pushes(4)), ids);
    g2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_msg_id_is_deduped_across_a_swap() {
    let host = Host::new(json!({}));
    let inbound =
        json!({"platform": "qq", "groupId": "0", "userId": "42", "msg": "hi", "msgId": "m-1"});
    host.transport.connect(OP);
    let g1 = host.start(1).await;
    let r = g1.ok(1, "bncr.inbound", inbound.clone()).await;
    assert_eq!(r["accepted"], true);
    assert!(r.get("duplicated").is_none());
    g1.stop().await;
    let g2 = host.start(2).await;
    let r = g2.ok(1, "bncr.inbound", inbound.clone()).await;
    assert_eq!(r["accepted"], true);
    assert_eq!(r["duplicated"], true);
    assert_eq!(r["msgId"], "m-1");
    // Handed on once: by generation 1's inbound loop, or by generation 2's
    // at start if generation 1 stopped first; never twice.
    host.transport
        .wait_for("chat.inbound", Duration::from_secs(5), |t| {
            !t.named("chat.inbound").is_empty()
        })
        .await;
    assert_eq!(host.transport.named("chat.inbound").len(), 1);
    // Another account with the same route and msgId is a different message.
    let r = g2
        .ok(
            1,
            "bncr.inbound",
            json!({"accountId": "B", "platform": "qq", "userId": 42, "msgId": "m-1"}),
        )
        .await;
    assert!(r.get("duplicated").is_none());
    g2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journaled_but_not_handed_on_is_handed_on_by_the_next_generation() {
    let host = Host::new(json!({}));
    let g1 = host.start(1).await;
    g1.stop().await;
    // Simulate a crash between journaling and publishing.
    let db = host.dir.path().join("bncr/bncr.sqlite3");
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute(
        "INSERT INTO inbound(account_id, platform, group_id, user_id, msg_id, payload, received_at, handed_on)
         VALUES ('Primary','qq','0','5','lost-1', ?1, 1, 0)",
        [json!({"channel": "bncr", "msgId": "lost-1", "msg": "late"}).to_string()],
    )
    .unwrap();
    drop(c);
    host.transport.connect(OP);
    let g2 = host.start(2).await;
    host.transport
        .wait_for("hand-on", Duration::from_secs(5), |t| {
            !t.named("chat.inbound").is_empty()
        })
        .await;
    let ev = host.transport.named("chat.inbound");
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].payload["msgId"], "lost-1");
    g2.stop().await;
    let g3 = host.start(3).await;
    // Restored as handed on: nothing pending to offer again.
    let d = g3.ok(1, "bncr.diagnostics", json!({})).await;
    assert_eq!(d["inboundPending"], 0, "{d}");
    assert_eq!(
        host.transport.named("chat.inbound").len(),
        1,
        "handed on once only"
    );
    g3.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_send_survives_a_swap() {
    let host = Host::new(json!({}));
    let g1 = host.start(1).await;
    let a = g1.send(TO, json!("x"), "same").await.unwrap();
    let b = g1.send(TO, json!("y"), "same").await.unwrap();
    assert_eq!(a, b);
    g1.stop().await;
    let g2 = host.start(2).await;
    assert_eq!(g2.send(TO, json!("z"), "same").await.unwrap(), a);
    let d = g2.ok(1, "bncr.diagnostics", json!({})).await;
    assert_eq!(d["outbox"], 1, "queued once");
    g2.stop().await;
}
