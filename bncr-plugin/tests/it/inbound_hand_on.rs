//! Inbound hand-on: an accepted message stays pending until an operator
//! received it, is handed on when one appears, and is never offered again
//! once received, in this generation or a later one, or after a crash.
//!
//! "Received" means: the `chat.inbound` event was queued on at least one
//! authenticated operator connection holding `operator.write` that is not a
//! Bncr client (a connection that called a Bncr client method) and has been
//! open for at least `inboundGraceMs`, counted from when it joined the
//! host's connection table: whether or not its connection-opened hook ran
//! yet, and in whichever generation it opened.

use crate::common::{
    WAIT, bncr_client, bncr_client_opening, diag, journaled_handed_on, ok, operator, payloads,
    start, state_dir, until_counter, until_journaled_handed_on, wait_for,
};
use gateway_core::testing::{TestClient, TestHost};
use plugin_api::scope;
use serde_json::{Value, json};
use std::time::Duration;

fn inbound(msg_id: &str) -> Value {
    json!({"platform": "qq", "groupId": "0", "userId": "42", "msg": format!("text of {msg_id}"), "msgId": msg_id})
}

/// Inbound ids `c` received, in order.
fn received(c: &TestClient) -> Vec<String> {
    payloads(c, "chat.inbound")
        .iter()
        .map(|p| p["msgId"].as_str().unwrap().to_string())
        .collect()
}

/// Wait until the bridge offered pending messages at least `n` more times
/// without anyone receiving them (read through `c`): a real observable
/// instead of a sleep.
async fn offers_pass(c: &TestClient, n: u64) {
    let offers = |d: Value| d["counters"]["inboundUnreceivedOffers"].as_u64().unwrap();
    let start = offers(diag(c).await);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let d = diag(c).await;
        if offers(d.clone()) >= start + n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no further offers: {d}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_with_no_operator_then_an_operator_connects_and_gets_it_once() {
    let dir = state_dir();
    let host = start(
        dir.path(),
        json!({"inboundGraceMs": 0, "inboundRetryMs": 20}),
    )
    .await;
    let bncr = bncr_client(&host);
    ok(&bncr, "bncr.connect", json!({})).await;
    for id in ["a", "b", "c"] {
        let r = ok(&bncr, "bncr.inbound", inbound(id)).await;
        assert_eq!(r["accepted"], true);
    }
    // The Bncr client's own connection holds operator.write but is not an
    // operator: it received nothing, and everything is pending.
    offers_pass(&bncr, 2).await;
    assert!(received(&bncr).is_empty());
    assert_eq!(diag(&bncr).await["inboundPending"], 3);
    // A read-only operator is no receiver either.
    let _reader = host.connect_operator(&[scope::READ]);
    offers_pass(&bncr, 2).await;
    assert!(host.events_named("chat.inbound").is_empty());
    // An operator connects: it gets all three, in order, once.
    let first = operator(&host);
    wait_for(&host, "hand-on", || received(&first).len() == 3).await;
    // The bridge counts a message handed on just after the delivery.
    until_counter(&bncr, "inboundHandedOn", 3).await;
    let d = diag(&bncr).await;
    assert_eq!(d["inboundPending"], 0, "{d}");
    assert_eq!(d["counters"]["inboundHandedOn"], 3);
    // A second operator connecting later is not handed them again, and a
    // new message goes to both operators at once.
    let second = operator(&host);
    ok(&bncr, "bncr.inbound", inbound("d")).await;
    // Handed on by the inbound loop, which the request wakes.
    wait_for(&host, "hand-on of d", || {
        received(&first).len() == 4 && received(&second).len() == 1
    })
    .await;
    assert_eq!(received(&first), ["a", "b", "c", "d"]);
    assert_eq!(received(&second), ["d"]);
    // Journaled as handed on: a later generation offers nothing (both
    // operators, open before it, would get anything offered at once).
    until_journaled_handed_on(dir.path(), &["a", "b", "c", "d"]).await;
    host.restart().await.unwrap();
    assert_eq!(diag(&bncr).await["inboundPending"], 0);
    host.shutdown().await;
    assert_eq!(host.events_named("chat.inbound").len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_inbound_survives_restarts_and_a_crash_until_an_operator_receives_it() {
    let dir = state_dir();
    let host = start(
        dir.path(),
        json!({"inboundGraceMs": 0, "inboundRetryMs": 20}),
    )
    .await;
    let bncr = bncr_client(&host);
    ok(&bncr, "bncr.inbound", inbound("p-1")).await;
    offers_pass(&bncr, 1).await;
    host.restart().await.unwrap();
    // Generation 2, still nobody: pending again, not lost, not marked.
    assert_eq!(diag(&bncr).await["inboundPending"], 1);
    offers_pass(&bncr, 1).await;
    assert!(host.events_named("chat.inbound").is_empty());
    // The process dies without stopping anything; the journal still holds
    // the message as not handed on.
    host.crash();
    assert_eq!(journaled_handed_on(dir.path(), "p-1"), Some(false));

    // The next process restores it as pending and hands it to the first
    // operator. (It may reach the operator in the moment between joining
    // the connection table and the bridge hearing of it; an operator is a
    // receiver either way.)
    let host = start(
        dir.path(),
        json!({"inboundGraceMs": 0, "inboundRetryMs": 20}),
    )
    .await;
    let op = operator(&host);
    wait_for(&host, "hand-on", || !received(&op).is_empty()).await;
    until_counter(&op, "inboundHandedOn", 1).await;
    until_journaled_handed_on(dir.path(), &["p-1"]).await;
    // Journaled as handed on: a later generation offers it to nobody (the
    // operator, open before it, would get it at once).
    host.restart().await.unwrap();
    assert_eq!(diag(&op).await["inboundPending"], 0);
    host.shutdown().await;
    assert_eq!(received(&op), ["p-1"], "exactly once");
    assert_eq!(host.events_named("chat.inbound").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bncr_client_reconnecting_within_its_grace_is_not_taken_for_an_operator() {
    let dir = state_dir();
    let host = start(
        dir.path(),
        json!({"inboundGraceMs": 60000, "inboundRetryMs": 20}),
    )
    .await;
    // Every connection opens before the message is pending: a connection
    // that opens while the bridge offers a message may be offered it before
    // the bridge heard of the connection (and started its grace).
    let bncr = bncr_client(&host);
    let second = bncr_client(&host);
    let op = operator(&host);
    ok(&bncr, "bncr.inbound", inbound("g-1")).await;
    // The second connection makes itself known as a Bncr client within its
    // grace: it is never handed the message (nor is the operator, still in
    // its grace).
    offers_pass(&bncr, 2).await;
    ok(&second, "bncr.connect", json!({})).await;
    offers_pass(&bncr, 2).await;
    assert!(host.events_named("chat.inbound").is_empty());
    // A restart does not end anyone's grace: the operator opened less than
    // a minute ago in either generation.
    host.restart().await.unwrap();
    offers_pass(&bncr, 2).await;
    assert!(host.events_named("chat.inbound").is_empty());
    // Once it has been open for the grace, it gets the message; the two
    // Bncr clients, however long they are open, never do.
    for c in [&bncr, &second, &op] {
        c.backdate(GRACE);
    }
    wait_for(&host, "hand-on", || {
        !host.events_named("chat.inbound").is_empty()
    })
    .await;
    until_journaled_handed_on(dir.path(), &["g-1"]).await;
    host.shutdown().await;
    assert_eq!(received(&op), ["g-1"]);
    assert!(received(&second).is_empty());
    assert_eq!(host.events_named("chat.inbound").len(), 1);
}

/// The grace of the tests below: far longer than any of them runs, so a
/// connection reaches it only when the test backdates it.
const GRACE: Duration = Duration::from_millis(60_000);

fn long_grace() -> Value {
    json!({"inboundGraceMs": GRACE.as_millis() as u64, "inboundRetryMs": 20})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bncr_client_whose_opened_hook_has_not_run_yet_is_not_offered_pending_inbound() {
    let dir = state_dir();
    let host = start(dir.path(), long_grace()).await;
    let bncr = bncr_client(&host);
    ok(&bncr, "bncr.connect", json!({})).await;
    ok(&bncr, "bncr.inbound", inbound("w-1")).await;
    // A Bncr client reconnecting: it joined the table, and the bridge has
    // not heard of it (its hook has not run). Offers made meanwhile skip
    // it: it has not been open for the grace.
    let opening = bncr_client_opening(&host);
    offers_pass(&bncr, 3).await;
    assert!(received(opening.client()).is_empty());
    let second = opening.finish();
    offers_pass(&bncr, 2).await;
    ok(&second, "bncr.connect", json!({})).await;
    offers_pass(&bncr, 2).await;
    // An operator open for a moment less than the grace: nothing yet.
    let op = operator(&host);
    op.backdate(GRACE - Duration::from_secs(1));
    offers_pass(&bncr, 2).await;
    assert!(host.events_named("chat.inbound").is_empty());
    // Open for the grace: it receives the message, once.
    op.backdate(Duration::from_secs(1));
    wait_for(&host, "hand-on", || received(&op).len() == 1).await;
    until_journaled_handed_on(dir.path(), &["w-1"]).await;
    host.restart().await.unwrap();
    assert_eq!(diag(&bncr).await["inboundPending"], 0);
    host.shutdown().await;
    assert_eq!(received(&op), ["w-1"]);
    assert_eq!(host.events_named("chat.inbound").len(), 1, "to nobody else");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bncr_client_in_its_grace_across_a_restart_is_not_offered_pending_inbound() {
    let dir = state_dir();
    let host = start(dir.path(), long_grace()).await;
    let bncr = bncr_client(&host);
    ok(&bncr, "bncr.connect", json!({})).await;
    // Opened (its hook ran in generation 1), not identified yet.
    let second = bncr_client(&host);
    ok(&bncr, "bncr.inbound", inbound("r-1")).await;
    offers_pass(&bncr, 2).await;
    // Generation 2 never saw `second` open; it is still in its grace.
    host.restart().await.unwrap();
    offers_pass(&bncr, 3).await;
    assert!(host.events_named("chat.inbound").is_empty());
    ok(&second, "bncr.connect", json!({})).await;
    host.restart().await.unwrap();
    // An operator open for the grace gets it exactly once; the clients,
    // open as long, never.
    let op = operator(&host);
    for c in [&bncr, &second, &op] {
        c.backdate(GRACE);
    }
    wait_for(&host, "hand-on", || received(&op).len() == 1).await;
    until_journaled_handed_on(dir.path(), &["r-1"]).await;
    host.restart().await.unwrap();
    assert_eq!(diag(&bncr).await["inboundPending"], 0);
    host.shutdown().await;
    assert_eq!(received(&op), ["r-1"]);
    assert_eq!(host.events_named("chat.inbound").len(), 1, "to nobody else");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_responder_counts_as_a_receiver() {
    let dir = state_dir();
    let host = start(dir.path(), json!({"echo": {"enabled": true}})).await;
    let bncr = bncr_client(&host);
    ok(&bncr, "bncr.connect", json!({})).await;
    ok(&bncr, "bncr.inbound", inbound("e-1")).await;
    // Handed on by the inbound loop, which the request wakes.
    let deadline = tokio::time::Instant::now() + WAIT;
    let d = loop {
        let d = diag(&bncr).await;
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
    host.shutdown().await;
}

/// A host with no grace and no timed retries, so only an operator's
/// arrival starts a hand-on pass, and a Bncr client whose messages `ids`
/// are pending (offered once, to nobody).
async fn pending_until_an_operator(ids: &[&str]) -> (tempfile::TempDir, TestHost, TestClient) {
    let dir = state_dir();
    let host = start(
        dir.path(),
        json!({"inboundGraceMs": 0, "inboundRetryMs": 600_000}),
    )
    .await;
    let bncr = bncr_client(&host);
    ok(&bncr, "bncr.connect", json!({})).await;
    for id in ids {
        ok(&bncr, "bncr.inbound", inbound(id)).await;
    }
    until_counter(&bncr, "inboundUnreceivedOffers", 1).await;
    (dir, host, bncr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_during_a_hand_on_pass_does_not_deliver_twice_to_the_same_connection() {
    let (dir, host, bncr) = pending_until_an_operator(&["s-1", "s-2"]).await;
    // Another process holds the database's write lock: the pass delivers
    // s-1, then waits for its journal write.
    let db = rusqlite::Connection::open(dir.path().join("bncr/bncr.sqlite3")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let op = operator(&host);
    wait_for(&host, "s-1 delivered", || received(&op) == ["s-1"]).await;
    // The restart comes while s-1's journal mark waits for the lock. The
    // store's close runs queued jobs first, so the restart cannot end
    // within this time whatever the stop does about the pass; what this
    // checks is that the stopping generation offers nothing more (s-2) and
    // that s-1 is journaled. (Well below the store's 5 s busy timeout.)
    let restart = host.restart();
    tokio::pin!(restart);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut restart)
            .await
            .is_err(),
        "the restart waits for the mark, which waits for the lock"
    );
    drop(db);
    restart.await.unwrap();
    // Generation 2 offers s-2, which generation 1 did not hand on.
    wait_for(&host, "s-2 delivered", || received(&op).len() >= 2).await;
    until_journaled_handed_on(dir.path(), &["s-1", "s-2"]).await;
    host.restart().await.unwrap();
    assert_eq!(diag(&bncr).await["inboundPending"], 0);
    host.shutdown().await;
    assert_eq!(received(&op), ["s-1", "s-2"], "each once, in order");
}

/// Another process holds the database's write lock for longer than the
/// bridge's stop budget (3 s) while a restart comes: the stop still ends
/// within the host's stop timeout (the restart reports no failed service
/// stop), the old store closes once its queued journal mark got the lock,
/// and the new generation's open waits for that: the operator that received
/// s-1 is not offered it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_while_the_database_is_locked_past_the_stop_budget_offers_nothing_twice() {
    let (dir, host, _bncr) = pending_until_an_operator(&["t-1", "t-2"]).await;
    // Past the stop budget (3 s), within the store's busy timeout (5 s).
    let held = Duration::from_millis(3_500);
    let db_path = dir.path().join("bncr/bncr.sqlite3");
    let (locked_tx, locked) = std::sync::mpsc::channel();
    let locker = std::thread::spawn(move || {
        let db = rusqlite::Connection::open(db_path).unwrap();
        db.execute_batch("BEGIN IMMEDIATE").unwrap();
        locked_tx.send(()).unwrap();
        std::thread::sleep(held);
        db.execute_batch("ROLLBACK").unwrap();
    });
    locked.recv().unwrap();
    let op = operator(&host);
    wait_for(&host, "t-1 delivered", || received(&op) == ["t-1"]).await;
    let report = host.restart().await.expect("the restart succeeds");
    assert!(
        report.shutdown.services_failed.is_empty(),
        "no service stop failed or timed out: {:?}",
        report.shutdown
    );
    locker.join().unwrap();
    wait_for(&host, "t-2 delivered", || received(&op).len() >= 2).await;
    until_journaled_handed_on(dir.path(), &["t-1", "t-2"]).await;
    host.shutdown().await;
    assert_eq!(received(&op), ["t-1", "t-2"], "each once, in order");
}
