//! Inbound hand-on: an accepted message stays pending until an operator
//! received it, is handed on when one appears, and is never offered again
//! once received, in this generation or a later one.
//!
//! "Received" means: the `chat.inbound` event was queued on at least one
//! authenticated operator connection holding `operator.write` that is not a
//! Bncr client (a connection that called a Bncr client method) and is past
//! its `inboundGraceMs` since opening.

use crate::common::{Gen, Host, operator_info};
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);
const BNCR: u64 = 1;

fn inbound(msg_id: &str) -> Value {
    json!({"platform": "qq", "groupId": "0", "userId": "42", "msg": format!("text of {msg_id}"), "msgId": msg_id})
}

async fn diag(g: &Gen) -> Value {
    g.ok(BNCR, "bncr.diagnostics", json!({})).await
}

/// Inbound ids `conn` received, in order.
fn received(host: &Host, conn: u64) -> Vec<String> {
    host.transport
        .to_conn(conn, "chat.inbound")
        .iter()
        .map(|p| p["msgId"].as_str().unwrap().to_string())
        .collect()
}

/// Wait until the bridge offered pending messages at least `n` more times
/// without anyone receiving them: a real observable instead of a sleep.
async fn offers_pass(g: &Gen, n: u64) {
    let start = diag(g).await["counters"]["inboundUnreceivedOffers"]
        .as_u64()
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = diag(g).await["counters"]["inboundUnreceivedOffers"]
            .as_u64()
            .unwrap();
        if now >= start + n {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no further offers");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_with_no_operator_then_an_operator_connects_and_gets_it_once() {
    let host = Host::new(json!({"inboundGraceMs": 0, "inboundRetryMs": 20}));
    host.transport.connect(BNCR);
    let g = host.start(1).await;
    g.ok(BNCR, "bncr.connect", json!({})).await;
    for id in ["a", "b", "c"] {
        let r = g.ok(BNCR, "bncr.inbound", inbound(id)).await;
        assert_eq!(r["accepted"], true);
    }
    // The Bncr client's own connection holds operator.write but is not an
    // operator: it received nothing, and everything is pending.
    offers_pass(&g, 2).await;
    assert!(received(&host, BNCR).is_empty());
    assert_eq!(diag(&g).await["inboundPending"], 3);
    // A read-only operator is no receiver either.
    g.open(&host.transport, operator_info(600, &["operator.read"]));
    offers_pass(&g, 2).await;
    assert!(host.transport.named("chat.inbound").is_empty());
    // An operator connects: it gets all three, in order, once.
    g.open(&host.transport, operator_info(601, &["operator.write"]));
    host.transport
        .wait_for("hand-on", WAIT, |t| {
            t.to_conn(601, "chat.inbound").len() == 3
        })
        .await;
    let d = diag(&g).await;
    assert_eq!(d["inboundPending"], 0, "{d}");
    assert_eq!(d["counters"]["inboundHandedOn"], 3);
    // A second operator connecting later is not handed them again, and a
    // new message goes to both operators at once.
    g.open(&host.transport, operator_info(602, &["operator.write"]));
    g.ok(BNCR, "bncr.inbound", inbound("d")).await;
    // Handed on by the inbound loop, which the request wakes.
    host.transport
        .wait_for("hand-on of d", WAIT, |t| {
            t.to_conn(601, "chat.inbound").len() == 4 && t.to_conn(602, "chat.inbound").len() == 1
        })
        .await;
    assert_eq!(received(&host, 601), ["a", "b", "c", "d"]);
    assert_eq!(received(&host, 602), ["d"]);
    g.stop().await;
    // Journaled as handed on: a later generation offers nothing.
    let g2 = host.start(2).await;
    assert_eq!(diag(&g2).await["inboundPending"], 0);
    g2.stop().await;
    assert_eq!(host.transport.named("chat.inbound").len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_inbound_survives_restarts_until_an_operator_receives_it() {
    let host = Host::new(json!({"inboundGraceMs": 0, "inboundRetryMs": 20}));
    host.transport.connect(BNCR);
    let g1 = host.start(1).await;
    g1.ok(BNCR, "bncr.inbound", inbound("p-1")).await;
    offers_pass(&g1, 1).await;
    g1.stop().await;
    // Generation 2, still nobody: pending again, not lost, not marked.
    let g2 = host.start(2).await;
    assert_eq!(diag(&g2).await["inboundPending"], 1);
    offers_pass(&g2, 1).await;
    // A crash-like end: dropped without stopping.
    g2.kill();
    let g3 = host.start(3).await;
    assert_eq!(diag(&g3).await["inboundPending"], 1);
    g3.open(&host.transport, operator_info(700, &["operator.write"]));
    host.transport
        .wait_for("hand-on", WAIT, |t| {
            !t.to_conn(700, "chat.inbound").is_empty()
        })
        .await;
    g3.stop().await;
    let g4 = host.start(4).await;
    assert_eq!(diag(&g4).await["inboundPending"], 0);
    g4.stop().await;
    assert_eq!(received(&host, 700), ["p-1"], "exactly once");
    assert_eq!(host.transport.named("chat.inbound").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bncr_client_reconnecting_within_its_grace_is_not_taken_for_an_operator() {
    let host = Host::new(json!({"inboundGraceMs": 60000, "inboundRetryMs": 20}));
    host.transport.connect(BNCR);
    let g = host.start(1).await;
    g.ok(BNCR, "bncr.inbound", inbound("g-1")).await;
    // A new connection opens and makes itself known as a Bncr client
    // within its grace: it is never handed the message.
    g.open(&host.transport, operator_info(2, &["operator.write"]));
    offers_pass(&g, 2).await;
    g.ok(2, "bncr.connect", json!({})).await;
    offers_pass(&g, 2).await;
    assert!(host.transport.named("chat.inbound").is_empty());
    // An operator that was connected before this generation (no grace) is.
    host.transport.connect(3);
    host.transport
        .wait_for("hand-on", WAIT, |t| !t.named("chat.inbound").is_empty())
        .await;
    assert_eq!(received(&host, 3), ["g-1"]);
    assert!(received(&host, 2).is_empty());
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_responder_counts_as_a_receiver() {
    let host = Host::new(json!({"echo": {"enabled": true}}));
    host.transport.connect(BNCR);
    let g = host.start(1).await;
    g.ok(BNCR, "bncr.connect", json!({})).await;
    g.ok(BNCR, "bncr.inbound", inbound("e-1")).await;
    // Handed on by the inbound loop, which the request wakes.
    let deadline = tokio::time::Instant::now() + WAIT;
    let d = loop {
        let d = diag(&g).await;
        if d["counters"]["inboundHandedOn"] == 1 || tokio::time::Instant::now() > deadline {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(d["counters"]["inboundHandedOn"], 1, "{d}");
    assert_eq!(
        (d["inboundPending"].as_u64(), d["outbox"].as_u64()),
        (Some(0), Some(1)),
        "{d}"
    );
    g.stop().await;
}
