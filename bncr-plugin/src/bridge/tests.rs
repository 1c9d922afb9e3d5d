//! The bridge's stop against a hand-on pass in progress, driven step by
//! step: a store job the test holds (queued by the transport at the moment
//! of a delivery) makes the pass wait between delivering a message and
//! journaling it, exactly when the stop comes; the stop's budget against a
//! hung drain loop and a held store, and against a host that gives up on
//! it early; the lock order under a stop.

use super::*;
use plugin_api::host::{EventTransport, OutboundEvent, ReceiverFilter};
use plugin_api::{ClientInfo, Scopes};
use std::sync::mpsc;

/// The host's side of the tests: operators holding `operator.write`, each
/// open for an hour (past any grace), recording every `chat.inbound`
/// delivery; and the factory's store gate, kept across generations.
#[derive(Default)]
struct Operators {
    conns: Mutex<Vec<ConnectionInfo>>,
    delivered: Mutex<Vec<(u64, String)>>,
    /// Run once, at the next delivery (after it was recorded).
    on_delivery: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    gate: store::OpenGate,
}

impl Operators {
    fn join(&self, id: u64) {
        self.conns.lock().unwrap().push(info(id));
    }

    /// Run `f` at the next delivery.
    fn at_next_delivery(&self, f: impl FnOnce() + Send + 'static) {
        *self.on_delivery.lock().unwrap() = Some(Box::new(f));
    }

    fn delivered(&self) -> Vec<(u64, String)> {
        self.delivered.lock().unwrap().clone()
    }
}

impl EventTransport for Operators {
    fn send_to(&self, _conn: ConnId, _event: &OutboundEvent) -> bool {
        false
    }

    fn broadcast(&self, required_scope: &str, event: &OutboundEvent) -> usize {
        self.broadcast_where(required_scope, &|_, _| true, event)
    }

    fn broadcast_where(
        &self,
        required_scope: &str,
        filter: ReceiverFilter<'_>,
        event: &OutboundEvent,
    ) -> usize {
        let payload: Value = serde_json::from_str(event.payload.get()).unwrap();
        let msg_id = payload["msgId"].as_str().unwrap_or_default().to_string();
        let mut n = 0;
        for c in self.conns.lock().unwrap().iter() {
            if c.scopes.allows(required_scope) && filter(c, Duration::from_secs(3600)) {
                let mut delivered = self.delivered.lock().unwrap();
                delivered.push((c.conn_id.0, msg_id.clone()));
                n += 1;
            }
        }
        if n > 0 {
            let hook = self.on_delivery.lock().unwrap().take();
            if let Some(f) = hook {
                f();
            }
        }
        n
    }

    fn is_connected(&self, conn: ConnId) -> bool {
        self.conns.lock().unwrap().iter().any(|c| c.conn_id == conn)
    }
}

fn info(id: u64) -> ConnectionInfo {
    ConnectionInfo {
        conn_id: ConnId(id),
        role: Role::Operator,
        scopes: Scopes::new([scope::WRITE]),
        client: ClientInfo::default(),
    }
}

/// Generation `generation`'s bridge on `root`, not started.
fn bridge(
    generation: u64,
    root: &Path,
    transport: &Arc<Operators>,
    config: Value,
) -> (Arc<Bridge>, plugin_api::host::LifeController) {
    let (life, ctl) = plugin_api::host::scope_life(generation);
    let (events, declarer) =
        plugin_api::host::event_sink(crate::PLUGIN_ID, life.clone(), transport.clone());
    declarer.declare(crate::EVENTS.iter().map(|e| e.to_string()));
    let cfg = Config::from_value(&config).unwrap();
    let bridge = Arc::new(Bridge::new(
        cfg,
        root.to_path_buf(),
        events,
        life,
        "test",
        transport.gate.clone(),
    ));
    (bridge, ctl)
}

/// Generation `generation`'s bridge on `root`, started.
async fn started(
    generation: u64,
    root: &Path,
    transport: &Arc<Operators>,
) -> (Arc<Bridge>, plugin_api::host::LifeController) {
    started_with(generation, root, transport, json!({})).await
}

/// Generation `generation`'s bridge on `root` with `extra` config (no
/// grace, no timed retries: only what a test does starts a pass), started.
async fn started_with(
    generation: u64,
    root: &Path,
    transport: &Arc<Operators>,
    extra: Value,
) -> (Arc<Bridge>, plugin_api::host::LifeController) {
    let mut config = json!({"inboundGraceMs": 0, "inboundRetryMs": 600_000});
    for (k, v) in extra.as_object().unwrap() {
        config[k] = v.clone();
    }
    let (bridge, ctl) = bridge(generation, root, transport, config);
    bridge.start().await.unwrap();
    (bridge, ctl)
}

/// A Bncr client's request context on connection `id`.
fn client(id: u64) -> RequestContext {
    plugin_api::host::request_context(Arc::new(info(id)))
}

/// Accept inbound message `msg_id` from `client`.
async fn accept(bridge: &Bridge, client: &RequestContext, msg_id: &str) {
    let p: params::Inbound = serde_json::from_value(
        json!({"platform": "qq", "groupId": "0", "userId": "42", "msg": "hi", "msgId": msg_id}),
    )
    .unwrap();
    assert_eq!(bridge.inbound(client, p).await.unwrap()["accepted"], true);
}

/// Queue a job that holds `bridge`'s store until the returned sender sends
/// (or is dropped).
fn hold_store(bridge: &Bridge) -> mpsc::Sender<()> {
    let (release, held) = mpsc::channel::<()>();
    bridge
        .store()
        .unwrap()
        .enqueue("held by the test", move |_| {
            let _ = held.recv();
            Ok(())
        });
    release
}

/// The wake-up times the opened hook keeps stay bounded by the connections
/// opened within one grace, with or without anything pending (when the
/// inbound loop, which also drops them, sleeps).
#[test]
fn grace_wake_ups_are_kept_only_for_graces_not_ended() {
    let dir = tempfile::tempdir().unwrap();
    let ops = Arc::new(Operators::default());
    let (short, _ctl) = bridge(1, dir.path(), &ops, json!({"inboundGraceMs": 0}));
    let (long, _ctl2) = bridge(1, dir.path(), &ops, json!({"inboundGraceMs": 60_000}));
    for id in 1..=1000 {
        short.connection_opened(&info(id));
        long.connection_opened(&info(id));
    }
    assert!(
        short.state().grace_ends.len() <= 1,
        "ended graces are dropped"
    );
    // Graces not ended are kept: one wake-up per distinct end (opens a
    // nanosecond-resolution clock cannot tell apart would share one).
    let kept = long.state().grace_ends.len();
    assert!(kept > 500, "graces not ended are kept: {kept}");
    // Known Bncr clients need no wake-up.
    long.client_seen(ConnId(5000));
    long.connection_opened(&info(5000));
    assert_eq!(long.state().grace_ends.len(), kept);
}

/// Poll `cond` every millisecond, at most 10 s.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_hand_on_pass_never_delivers_a_message_twice_to_the_same_connection() {
    let dir = tempfile::tempdir().unwrap();
    let ops = Arc::new(Operators::default());
    let (gen1, ctl1) = started(1, dir.path(), &ops).await;
    // Two messages pending, nobody to receive them yet.
    let client = client(1);
    for id in ["m1", "m2"] {
        accept(&gen1, &client, id).await;
    }
    // The test holds the store: the pass delivers m1, then waits for its
    // journal mark, queued behind this job.
    let release = hold_store(&gen1);
    ops.join(100);
    gen1.inbound_wake.notify_one();
    until("m1 delivered", || !ops.delivered().is_empty()).await;
    // The restart: generation 1 stops while its pass waits for the store.
    let stopping = tokio::spawn({
        let gen1 = gen1.clone();
        async move { gen1.stop().await }
    });
    until("stop begun", || gen1.stop.is_cancelled()).await;
    // Give the stop time to get ahead of the pass. m1's mark is already
    // queued (behind the held job), so the store's close journals it
    // whether or not the stop waits for the pass; what this checks is that
    // the stopping generation offers nothing more (m2) and that the next
    // one offers only what was not received. (When the pass awaits
    // something before the mark, see the echo test below.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    release.send(()).unwrap();
    stopping.await.unwrap();
    // Whatever generation 1 was doing is over once its pass lock is free.
    let pass_over = tokio::time::timeout(Duration::from_secs(5), gen1.hand_on_lock.lock()).await;
    assert!(pass_over.is_ok(), "the pass ended");
    drop(pass_over);
    let by_gen1 = ops.delivered();
    drop(ctl1);

    // Generation 2 offers what generation 1 did not journal as received.
    let (gen2, _ctl2) = started(2, dir.path(), &ops).await;
    until("generation 2 hands on what is pending", || {
        let st = gen2.state();
        st.inbound.is_empty()
            && st.counters.inbound_handed_on + st.counters.inbound_unreceived_offers > 0
    })
    .await;
    gen2.stop().await;
    let to_op = |ids: &[&str]| -> Vec<(u64, String)> {
        ids.iter().map(|id| (100, id.to_string())).collect()
    };
    assert_eq!(
        ops.delivered(),
        to_op(&["m1", "m2"]),
        "each message reached the operator once, in order"
    );
    assert_eq!(
        by_gen1,
        to_op(&["m1"]),
        "the stopping generation offered nothing after the stop"
    );
}

/// The host's default service stop timeout (`restart.service_stop_timeout_ms`):
/// a stop that takes longer is abandoned by the host.
const HOST_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// With the echo responder on and an operator present, the pass awaits the
/// echo's store writes after delivering a message. A stop in that moment
/// (the store held) still journals the message as handed on: the operator
/// that received it is not offered it again after the restart, and the
/// echo's reply is queued once. Fails if the stop neither waits for the
/// pass nor finds the mark queued at delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_the_echo_is_pending_journals_what_the_operator_received() {
    let dir = tempfile::tempdir().unwrap();
    let ops = Arc::new(Operators::default());
    let echo = json!({"echo": {"enabled": true}});
    ops.join(100);
    let (gen1, ctl1) = started_with(1, dir.path(), &ops, echo.clone()).await;
    // At the delivery of m1, the store is held: the pass then waits for
    // the echo's writes.
    let (release_tx, release_rx) = mpsc::channel::<mpsc::Sender<()>>();
    let held_by = gen1.clone();
    ops.at_next_delivery(move || {
        let _ = release_tx.send(hold_store(&held_by));
    });
    let client = client(1);
    gen1.client_seen(client.conn_id());
    accept(&gen1, &client, "m1").await;
    until("m1 delivered", || !ops.delivered().is_empty()).await;
    let release = release_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let stopping = tokio::spawn({
        let gen1 = gen1.clone();
        async move { gen1.stop().await }
    });
    until("stop begun", || gen1.stop.is_cancelled()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    release.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the stop ends")
        .unwrap();
    drop(ctl1);

    let (gen2, _ctl2) = started_with(2, dir.path(), &ops, echo).await;
    let (pending, replies) = {
        let st = gen2.state();
        (st.inbound.len(), st.index.len())
    };
    gen2.stop().await;
    assert_eq!(pending, 0, "m1 is journaled as handed on");
    assert_eq!(replies, 1, "the echo's reply is queued once");
    assert_eq!(
        ops.delivered(),
        [(100, "m1".to_string())],
        "the operator received m1 once"
    );
}

/// A stop whose drain loop hangs and whose hand-on pass waits for a held
/// store still ends within its budget, well inside the host's stop
/// timeout, with the store taking no more work. The store closes once its
/// queued jobs ran, and the next generation's open waits for that: it
/// restores m1 as handed on and does not offer it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_a_hung_drain_loop_and_a_held_store_ends_within_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let ops = Arc::new(Operators::default());
    let (gen1, ctl1) = started(1, dir.path(), &ops).await;
    let client = client(1);
    accept(&gen1, &client, "m1").await;
    // The drain loop never reports done (as one stuck in a file transfer).
    let (_hung, never) = tokio::sync::oneshot::channel();
    *gen1.drain_done.lock().unwrap() = Some(never);
    let (release_tx, release_rx) = mpsc::channel::<mpsc::Sender<()>>();
    let held_by = gen1.clone();
    ops.at_next_delivery(move || {
        let _ = release_tx.send(hold_store(&held_by));
    });
    ops.join(100);
    gen1.inbound_wake.notify_one();
    until("m1 delivered", || !ops.delivered().is_empty()).await;
    let release = release_rx.recv_timeout(Duration::from_secs(10)).unwrap();

    let begun = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), gen1.stop())
        .await
        .expect("the stop ends while the store is held");
    let took = begun.elapsed();
    assert!(
        took < HOST_STOP_TIMEOUT,
        "the stop ends within the host's stop timeout: {took:?}"
    );
    assert!(
        took >= STOP_BUDGET * 2 / 3,
        "it waited for the loops: {took:?}"
    );
    assert!(gen1.store().is_err(), "the store takes no more work");
    drop(ctl1);

    // The old store still runs its queued jobs: generation 2's start waits.
    let starting = tokio::spawn({
        let (root, ops) = (dir.path().to_path_buf(), ops.clone());
        async move { started(2, &root, &ops).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!starting.is_finished(), "the open waits for the old store");
    release.send(()).unwrap();
    let (gen2, _ctl2) = tokio::time::timeout(Duration::from_secs(10), starting)
        .await
        .expect("generation 2 starts once the old store closed")
        .unwrap();
    let pending = gen2.state().inbound.len();
    gen2.stop().await;
    assert_eq!(pending, 0, "m1 was journaled by the old store's close");
    assert_eq!(ops.delivered(), [(100, "m1".to_string())]);
}

/// A host whose stop timeout is shorter than the wait for the loops gives
/// up on the stop (drops it) before it began closing the store: the store
/// still stops taking work at once and closes, and the next generation's
/// open does not wait for it. What was accepted is restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_the_host_gives_up_on_before_the_close_still_closes_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bncr.sqlite3");
    let ops = Arc::new(Operators::default());
    let (gen1, _ctl1) = started(1, dir.path(), &ops).await;
    let client = client(1);
    accept(&gen1, &client, "m1").await;
    // The drain loop never reports done (as one stuck in a file transfer).
    let (_hung, never) = tokio::sync::oneshot::channel();
    *gen1.drain_done.lock().unwrap() = Some(never);
    assert!(ops.gate.is_taken(&path), "generation 1 holds the file");

    let gave_up = tokio::time::timeout(Duration::from_millis(300), gen1.stop()).await;
    assert!(gave_up.is_err(), "the stop still waited for the drain loop");
    // Generation 1 is not retired (its control is held): only the stop's
    // drop guard can have closed its store.
    assert!(gen1.store().is_err(), "the store took no more work at once");
    until("the old store closed", || !ops.gate.is_taken(&path)).await;

    let (gen2, _ctl2) =
        tokio::time::timeout(store::PREVIOUS_CLOSE_WAIT - Duration::from_secs(1), async {
            started(2, dir.path(), &ops).await
        })
        .await
        .expect("the next open does not wait for the old store");
    let pending = gen2.state().inbound.len();
    gen2.stop().await;
    assert_eq!(pending, 1, "m1, accepted, is restored");
}

/// The three-lock cycle on stop: a store job waiting for the bridge state
/// (as `bncr.inbound`'s journal job does), the host closing a client's
/// connection (its hook takes the state and writes the lease), and the
/// stop closing the store. All three finish. Before, the close held the
/// store's queue while it waited for the job, the hook held the state while
/// it waited for the queue, and the job waited for the state, forever.
#[test]
fn a_stop_a_store_job_taking_the_state_and_a_closing_connection_all_finish() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ops = Arc::new(Operators::default());
    let finished = rt.block_on(async {
        let (gen1, _ctl1) = started(1, dir.path(), &ops).await;
        // A Bncr client holding the lease: its close has a lease and its
        // client row to write.
        let client = client(7);
        gen1.client_seen(client.conn_id());
        gen1.connect(&client, Common::default()).await.unwrap();
        let (in_job, job_started) = mpsc::channel::<()>();
        let (go, job_waits) = mpsc::channel::<()>();
        let state = gen1.state.clone();
        let (job_done_tx, job_done) = mpsc::channel::<()>();
        gen1.store()
            .unwrap()
            .enqueue("waits, then takes the state", move |_| {
                in_job.send(()).unwrap();
                let _ = job_waits.recv();
                // Let the hook take the state first.
                std::thread::sleep(Duration::from_millis(100));
                drop(state.lock());
                let _ = job_done_tx.send(());
                Ok(())
            });
        job_started.recv_timeout(Duration::from_secs(10)).unwrap();
        let stopping = tokio::spawn({
            let gen1 = gen1.clone();
            async move { gen1.stop().await }
        });
        // The stop reaches the store's close (which waits for the job): the
        // store stops taking work first.
        until("the stop closed the store's queue", || {
            gen1.store().is_err()
        })
        .await;
        let hook = std::thread::spawn({
            let gen1 = gen1.clone();
            move || {
                go.send(()).unwrap();
                gen1.connection_closed(ConnId(7));
            }
        });
        let all = async {
            tokio::task::spawn_blocking(move || job_done.recv())
                .await
                .unwrap()
                .unwrap();
            stopping.await.unwrap();
            tokio::task::spawn_blocking(move || hook.join())
                .await
                .unwrap()
        };
        tokio::time::timeout(Duration::from_secs(5), all).await
    });
    // A deadlocked runtime cannot be dropped: leave its threads.
    rt.shutdown_background();
    let hook = finished.expect("the job, the hook and the stop all finished (no deadlock)");
    assert!(hook.is_ok(), "the connection-closed hook did not panic");
}
