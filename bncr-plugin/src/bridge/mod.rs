//! The bridge: one per generation, owned by the plugin instance. Holds
//! connections, leases and the in-memory mirror of the outbox; the store is
//! the source of truth for everything that must survive a restart.
//!
//! # Lock order
//!
//! Outermost first; a thread holding one lock takes only later ones:
//!
//! 1. `hand_on_lock` (async): one hand-on pass at a time; held across
//!    awaits by a pass, and by a stop until its store is closed.
//! 2. `hand_on_step`: a pass's delivery of one message and the queueing of
//!    its journal mark, and a stop's closing of the store's queue. Only
//!    plain work under it: the host's broadcast, `state`, the store's
//!    `queue`.
//! 3. The store's `conn`: held by its runner while a job runs; a job may
//!    take `state` (`bncr.inbound` queues its message in memory from its
//!    journal job).
//! 4. `state`: plain memory work only. Never held while calling the store
//!    ([`Bridge::store`], `enqueue`, `call`, `close`), the host (events,
//!    `is_connected`) or across an await (checked in debug builds by
//!    [`StateGuard`]).
//! 5. The store's `queue`: a leaf (a closer waiting for the runner waits on
//!    a condition variable, which releases it).
//!
//! `drain_done` and the store's `fault` are leaves too. Since a job may
//! hold `conn` while it waits for `state`, taking the store's queue under
//! `state` (store(), enqueue) would close a cycle as soon as anything waited
//! for `conn` under `queue`; both edges are excluded, either alone suffices.

use crate::config::{Config, Policy};
use crate::files::{OutgoingWaiters, Transfer};
use crate::params::{self, Common, IdStr};
use crate::store::{self, InboundKey, LeaseRow, OutboxRow, Store};
use plugin_api::{
    ConnId, ConnectionInfo, EventSink, RequestContext, Role, RpcError, ScopeHandle, ScopeLife,
    Value, scope,
};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

mod admin;
mod inbound;
mod leases;
mod outbox;
mod queue;
mod route;
#[cfg(test)]
mod tests;

use queue::{AckOutcome, Pending, Queue};
pub(crate) use route::{Route, inbound_route};

/// The event carrying one outbound message.
pub(crate) const PUSH_EVENT: &str = "plugin.bncr.push";
/// The operator event for accepted inbound messages.
pub(crate) const INBOUND_EVENT: &str = "chat.inbound";

/// The most a stop takes. The host gives a service's stop
/// `restart.service_stop_timeout_ms` (5 s by default) and then stops
/// waiting for it; a plugin is not told that value, so this stays well
/// under the default. Of it, the drain loop and a hand-on pass in progress
/// get two thirds ([`Bridge::stop`]); the rest is for closing the store,
/// which is always begun.
pub(crate) const STOP_BUDGET: Duration = Duration::from_secs(3);
/// The bridge protocol version reported by `bncr.connect`.
pub(crate) const PROTOCOL_VERSION: u32 = 2;
/// The canonical name of the default account.
pub(crate) const PRIMARY: &str = "Primary";
/// Message types a push may carry.
pub(crate) const MESSAGE_TYPES: &[&str] = &["text", "image", "video", "voice", "audio", "file"];

/// Unix time in milliseconds.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `""`, `default` and `primary` (any case) all mean [`PRIMARY`].
pub(crate) fn normalize_account(raw: Option<&str>) -> String {
    match raw.map(str::trim) {
        None | Some("") => PRIMARY.to_string(),
        Some(a) if a.eq_ignore_ascii_case("default") || a.eq_ignore_ascii_case("primary") => {
            PRIMARY.to_string()
        }
        Some(a) => a.to_string(),
    }
}

#[derive(Debug, Clone)]
struct Lease {
    lease_id: String,
    epoch: u64,
    conn: Option<ConnId>,
    client_id: Option<String>,
    accepted_at: i64,
    /// Since when no connection holds it (for `leaseTtlMs`).
    offline_since: Option<Instant>,
}

#[derive(Debug, Default)]
struct Account {
    lease: Option<Lease>,
    conns: BTreeSet<ConnId>,
    queue: Queue,
    dead: u64,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    accounts: HashMap<String, Account>,
    /// message id -> (account, seq)
    index: HashMap<String, (String, i64)>,
    pub(crate) transfers: HashMap<String, Transfer>,
    pub(crate) waiters: OutgoingWaiters,
    /// Journaled inbound messages no operator has received yet, oldest first.
    inbound: VecDeque<(InboundKey, Value)>,
    /// `bncr.inbound` requests between their `maxInboundPending` check and
    /// their message being queued in `inbound`: counted against the limit
    /// so that concurrent requests cannot overshoot it.
    inbound_reserved: usize,
    /// Connections known to be Bncr clients (they called a client method):
    /// never counted as operators.
    clients: HashSet<ConnId>,
    /// When the graces of connections this generation heard of end (and
    /// of every connection open when it started): when the inbound loop
    /// wakes to offer pending messages again. Who is past its grace is
    /// the host's answer ([`plugin_api::EventSink::broadcast_where`]), not
    /// this.
    grace_ends: BTreeSet<Instant>,
    /// What the limits refused or expired, for `bncr.diagnostics`.
    pub(crate) counters: Counters,
}

/// Counts of limits that tripped and of inbound hand-on, this generation.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Counters {
    /// Requests refused because `maxAccounts` was reached.
    pub(crate) accounts_refused: u64,
    /// Offline leases pruned after `leaseTtlMs`.
    pub(crate) leases_pruned: u64,
    /// `bncr.file.init` refused by `maxTransfers` or `maxTransfersPerAccount`.
    pub(crate) transfers_refused: u64,
    /// Transfers dropped after `transferTtlMs` without progress.
    pub(crate) transfers_expired: u64,
    /// `bncr.file.init` refused by `fileMinChunkBytes` or `fileMaxChunks`.
    pub(crate) chunking_refused: u64,
    /// Inbound messages received by at least one operator.
    pub(crate) inbound_handed_on: u64,
    /// Offers of an inbound message that reached no operator.
    pub(crate) inbound_unreceived_offers: u64,
    /// `bncr.inbound` refused because `maxInboundPending` messages were
    /// pending.
    pub(crate) inbound_refused: u64,
}

impl State {
    /// Mirror an outbox row in memory: queued for its account in `seq`
    /// order, findable by message id, due at `next_at`.
    fn enqueue(&mut self, row: store::OutboxRow, next_at: Instant) {
        self.index
            .insert(row.message_id.clone(), (row.account_id.clone(), row.seq));
        self.accounts
            .entry(row.account_id)
            .or_default()
            .queue
            .insert(
                row.seq,
                Pending {
                    message_id: row.message_id,
                    session_key: row.session_key,
                    payload: row.payload,
                    attempts: row.attempts,
                    next_at,
                    created_at: row.created_at,
                    last_error: None,
                    transferring: false,
                },
            );
    }
}

thread_local! {
    /// How many bridge state guards this thread holds.
    static STATE_HELD: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// The locked bridge state. Counts, per thread, the guards held, so that
/// code which must not run under it (calls into the store) can check in
/// debug builds. A std guard cannot cross an await, so the count is exact.
pub(crate) struct StateGuard<'a>(MutexGuard<'a, State>);

impl<'a> StateGuard<'a> {
    fn new(guard: MutexGuard<'a, State>) -> Self {
        STATE_HELD.with(|n| n.set(n.get() + 1));
        StateGuard(guard)
    }

    /// Panics (in debug builds) if this thread holds the bridge state.
    fn assert_not_held(what: &str) {
        debug_assert_eq!(
            STATE_HELD.with(std::cell::Cell::get),
            0,
            "{what} called while holding the bridge state (see the lock order)"
        );
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        STATE_HELD.with(|n| n.set(n.get().saturating_sub(1)));
    }
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.0
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.0
    }
}

/// One push the drain decided to make.
#[derive(Debug)]
struct Push {
    account: String,
    seq: i64,
    conn: ConnId,
    payload: Value,
    attempts: u32,
    /// A local file to send with `plugin.bncr.file.*` before the push.
    file: Option<String>,
}

/// Empty the transfer spool, touching the file system only when needed.
fn reset_spool(spool: &Path) -> Result<(), store::StoreError> {
    let err = |e: std::io::Error| store::StoreError(format!("{}: {e}", spool.display()));
    match std::fs::read_dir(spool) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                std::fs::remove_dir_all(spool).map_err(err)?;
                std::fs::create_dir_all(spool).map_err(err)?;
            }
            Ok(())
        }
        Err(_) => {
            let _ = std::fs::remove_file(spool);
            std::fs::create_dir_all(spool).map_err(err)
        }
    }
}

/// The per-generation bridge.
pub(crate) struct Bridge {
    pub(crate) cfg: Config,
    pub(crate) root: PathBuf,
    pub(crate) events: EventSink,
    pub(crate) life: ScopeLife,
    store: ScopeHandle<Store>,
    state: Arc<Mutex<State>>,
    wake: Notify,
    stop: CancellationToken,
    drain_done: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    counter: AtomicU64,
    version: String,
    /// One hand-on pass at a time, so inbound messages reach operators in
    /// the order they were accepted.
    hand_on_lock: tokio::sync::Mutex<()>,
    /// Held while a pass delivers a message and queues its journal mark,
    /// and while a stop closes the store's queue: a message an operator
    /// received always has its mark queued before the store stops taking
    /// work (and so journaled before it closes).
    hand_on_step: Mutex<()>,
    /// Which store files are open, across generations (from the factory).
    gate: store::OpenGate,
    /// Wakes the inbound loop: a message is pending or an operator opened.
    inbound_wake: Notify,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("generation", &self.life.generation())
            .field("root", &self.root)
            .finish()
    }
}

impl Bridge {
    /// A bridge for one generation. Does no I/O.
    pub(crate) fn new(
        cfg: Config,
        root: PathBuf,
        events: EventSink,
        life: ScopeLife,
        version: &str,
        gate: store::OpenGate,
    ) -> Self {
        Bridge {
            cfg,
            root,
            events,
            store: life.handle(),
            stop: life.cancellation().child_token(),
            life,
            state: Arc::new(Mutex::new(State::default())),
            wake: Notify::new(),
            drain_done: Mutex::new(None),
            counter: AtomicU64::new(0),
            version: version.to_string(),
            hand_on_lock: tokio::sync::Mutex::new(()),
            hand_on_step: Mutex::new(()),
            gate,
            inbound_wake: Notify::new(),
        }
    }

    /// The bridge's state, locked (see the lock order above).
    pub(crate) fn state(&self) -> StateGuard<'_> {
        StateGuard::new(self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A fresh unique id: `<prefix>-<24 hex>`.
    pub(crate) fn new_id(&self, prefix: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mut h = Sha256::new();
        h.update(format!(
            "{prefix}|{nanos}|{n}|{}|{}",
            std::process::id(),
            self.life.generation()
        ));
        let digest = h.finalize();
        format!("{prefix}-{}", hex::encode(&digest[..12]))
    }

    /// The open store, or a clean `UNAVAILABLE`. Never called holding
    /// `state` (the lock order).
    pub(crate) fn store(&self) -> Result<&Store, RpcError> {
        StateGuard::assert_not_held("Bridge::store");
        match self.store.get() {
            Ok(Some(s)) if s.is_open() => Ok(s),
            Ok(_) => {
                Err(RpcError::unavailable("bncr store is not open").retryable_after(Some(500)))
            }
            Err(r) => Err(r.into()),
        }
    }

    fn store_err(e: store::StoreError) -> RpcError {
        RpcError::unavailable(format!("bncr store: {e}"))
    }

    /// The account named by `raw`, refused when `accounts` is configured and
    /// does not list it.
    /// Without `accounts`, at most `maxAccounts` accounts are kept: a new
    /// one beyond that is refused until stale leases are pruned.
    pub(crate) fn account(&self, raw: Option<&str>) -> Result<String, RpcError> {
        let account = normalize_account(raw);
        if let Some(known) = &self.cfg.accounts {
            let ok = known.iter().any(|k| normalize_account(Some(k)) == account);
            if !ok {
                return Err(RpcError::invalid_request(format!(
                    "unknown accountId: {account}"
                )));
            }
            return Ok(account);
        }
        let mut st = self.state();
        let max = self.cfg.max_accounts;
        if !st.accounts.contains_key(&account) && st.accounts.len() >= max {
            st.counters.accounts_refused += 1;
            drop(st);
            tracing::warn!(limit = max, "bncr account refused: maxAccounts reached");
            return Err(RpcError::invalid_request(format!(
                "too many accounts (maxAccounts {max})"
            ))
            .with_details(json!({"code": "account-limit", "limit": max})));
        }
        // Reserve the account now, so that concurrent requests cannot
        // overshoot the cap between this check and their first use.
        st.accounts.entry(account.clone()).or_default();
        Ok(account)
    }

    /// Why the plugin cannot do its job right now, for the host's health
    /// and readiness: the store is read-only or its last job failed.
    pub(crate) fn fault(&self) -> Option<String> {
        match self.store.get() {
            Ok(Some(s)) => s.fault().map(|f| format!("bncr store: {f}")),
            _ => None,
        }
    }

    // ---------------------------------------------------------------- lifecycle

    /// Open the store, restore state, start the drain, hand on journaled
    /// inbound messages.
    pub(crate) async fn start(self: &Arc<Self>) -> Result<(), String> {
        let path = self.root.join("bncr.sqlite3");
        let files = self.root.join("files");
        if matches!(self.store.get(), Ok(Some(_))) {
            return Err("bncr store already opened in this generation".into());
        }
        // Open, migrate and restore in one hand-off to the store thread.
        let (store, restored) = Store::open(&self.gate, &path, move |conn| {
            let restored = store::restore(conn)?;
            // Spools of transfers cut by the previous generation are useless.
            reset_spool(&files.join("spool"))?;
            Ok(restored)
        })
        .await
        .map_err(|e| format!("bncr store open failed: {e}"))?;
        let mut spare = Some(store);
        self.store
            .get_or_init(|| spare.take().expect("taken once"))
            .map_err(|e| e.to_string())?;
        if let Some(extra) = spare {
            // Started twice in one generation: keep the first store.
            extra.close().await;
            return Err("bncr store already opened in this generation".into());
        }
        let now = Instant::now();
        // Connections open before this generation started (it never saw
        // them open) are past their grace by this time at the latest.
        self.state()
            .grace_ends
            .insert(now + Duration::from_millis(self.cfg.inbound_grace_ms));
        let pending_inbound = restored.inbound_pending.len();
        // Asked of the host before `state` is locked (the lock order).
        let live: HashSet<ConnId> = restored
            .leases
            .iter()
            .filter_map(|l| l.conn_id)
            .chain(restored.client_conns.iter().copied())
            .map(ConnId)
            .filter(|c| self.events.is_connected(*c))
            .collect();
        let mut store_for_cleanup: Option<Vec<u64>> = None;
        let (outbox_n, dead_n, lease_n) = {
            let mut guard = self.state();
            let st = &mut *guard;
            for l in &restored.leases {
                let acc = st.accounts.entry(l.account_id.clone()).or_default();
                // A lease restored after a crash names a connection of the
                // dead process: keep the lease (the client may resume it) but
                // only as online if the host still has that connection.
                let conn = l.conn_id.map(ConnId).filter(|c| live.contains(c));
                if let Some(c) = conn {
                    acc.conns.insert(c);
                    st.clients.insert(c);
                }
                acc.lease = Some(Lease {
                    lease_id: l.lease_id.clone(),
                    epoch: l.epoch,
                    conn,
                    client_id: l.client_id.clone(),
                    accepted_at: l.accepted_at,
                    offline_since: conn.is_none().then_some(now),
                });
            }
            let mut dead_total = 0;
            for (a, n) in &restored.dead_letters {
                st.accounts.entry(a.clone()).or_default().dead = *n;
                dead_total += n;
            }
            let outbox_n = restored.outbox.len();
            for row in restored.outbox {
                st.enqueue(row, now);
            }
            // Client connections still open stay clients; the rows of
            // closed ones are dropped.
            let mut gone = Vec::new();
            for c in restored.client_conns.iter().copied().map(ConnId) {
                if live.contains(&c) {
                    st.clients.insert(c);
                } else {
                    gone.push(c.0);
                }
            }
            if !gone.is_empty() {
                store_for_cleanup = Some(gone);
            }
            st.inbound.extend(
                restored
                    .inbound_pending
                    .into_iter()
                    .map(|row| (row.key, row.payload)),
            );
            (outbox_n, dead_total, restored.leases.len())
        };
        if let (Some(gone), Ok(store)) = (store_for_cleanup, self.store()) {
            store.enqueue("forget closed client connections", move |c| {
                for id in gone {
                    store::put_client_conn(c, id, false)?;
                }
                Ok(())
            });
        }
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        *self.drain_done.lock().unwrap_or_else(|e| e.into_inner()) = Some(done_rx);
        let me = self.clone();
        self.life
            .spawn(async move {
                me.drain().await;
                drop(done_tx);
            })
            .map_err(|e| e.to_string())?;
        let me = self.clone();
        self.life
            .spawn(async move { me.inbound_loop().await })
            .map_err(|e| e.to_string())?;
        tracing::info!(
            generation = self.life.generation(),
            outbox = outbox_n,
            dead_letters = dead_n,
            leases = lease_n,
            inbound_pending = pending_inbound,
            read_only = self.store().is_ok_and(Store::is_read_only),
            "bncr store opened"
        );
        if let Some(fault) = self.fault() {
            tracing::error!(fault = %fault, "bncr store cannot take writes; reporting degraded");
        }
        Ok(())
    }

    /// Stop the drain and the inbound hand-on, fail waiters as timeouts,
    /// close the store; within [`STOP_BUDGET`] in all.
    ///
    /// The drain loop and a hand-on pass in progress get two thirds of the
    /// budget to end (they end at their next step once stopping). Then the
    /// store stops taking work and closes with whatever is queued, whether
    /// or not they ended: a message an operator received has its journal
    /// mark queued by then (see `hand_on_step`). If the store is still
    /// running queued jobs when the budget is spent (SQLite waiting for a
    /// lock), the stop returns and the store closes when they are done;
    /// the next generation's open waits for that ([`store::OpenGate`]).
    ///
    /// If the host stops waiting first (its `service_stop_timeout_ms` under
    /// the loops' two thirds) and drops this future before the close began,
    /// a drop guard begins it then, the same way, without waiting.
    pub(crate) async fn stop(self: &Arc<Self>) {
        let begun = tokio::time::Instant::now();
        let deadline = begun + STOP_BUDGET;
        let loops_deadline = begun + STOP_BUDGET * 2 / 3;
        self.stop.cancel();
        let unclosed = CloseOnDrop(Some(self.clone()));
        let done = self
            .drain_done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(rx) = done
            && tokio::time::timeout_at(loops_deadline, rx).await.is_err()
        {
            tracing::warn!(
                wait_ms = (loops_deadline - begun).as_millis() as u64,
                "bncr drain loop still running at stop; closing the store anyway"
            );
        }
        // Held until the store is closed, so no pass starts after this.
        let pass = tokio::time::timeout_at(loops_deadline, self.hand_on_lock.lock()).await;
        if pass.is_err() {
            tracing::warn!(
                wait_ms = (loops_deadline - begun).as_millis() as u64,
                "bncr hand-on pass still running at stop; closing the store under it (what it delivered is journaled)"
            );
        }
        let (closing, counts) = unclosed.begin();
        let store = self.store.get().ok().flatten();
        // Queued writes finish before the database closes. (If the
        // generation already retired, the handle refuses; the store then
        // closes by itself once dropped.)
        let closed = match closing {
            Some(c) => tokio::time::timeout_at(deadline, c.wait()).await.is_ok(),
            None => true,
        };
        let StopCounts {
            waiters,
            transfers,
            pending,
            dead,
        } = counts;
        if closed {
            tracing::info!(
                generation = self.life.generation(),
                pending,
                dead_letters = dead,
                failed_waiters = waiters,
                dropped_transfers = transfers,
                store = ?store.map(Store::path),
                "bncr store closed"
            );
        } else {
            tracing::warn!(
                generation = self.life.generation(),
                pending,
                dead_letters = dead,
                failed_waiters = waiters,
                dropped_transfers = transfers,
                budget_ms = STOP_BUDGET.as_millis() as u64,
                "bncr store still running queued writes at the end of the stop; it closes when they are done, and the next open waits for that"
            );
        }
        drop(pass);
    }

    /// A stop's synchronous part: close the store's queue (between hand-on
    /// steps), fail the waiters, drop the transfers, and begin closing the
    /// store on the blocking pool. Takes `hand_on_step`, then `state`, one
    /// at a time (the lock order); awaits nothing.
    fn begin_store_close(&self) -> (Option<store::Closing>, StopCounts) {
        let store = self.store.get().ok().flatten();
        {
            // Not while a pass delivers a message and queues its mark.
            let _step = self.hand_on_step.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = store {
                s.stop_accepting();
            }
        }
        let counts = {
            let mut st = self.state();
            let waiters = st.waiters.fail_all();
            let transfers = st.transfers.len();
            st.transfers.clear();
            StopCounts {
                waiters,
                transfers,
                pending: st.accounts.values().map(|a| a.queue.len()).sum(),
                dead: st.accounts.values().map(|a| a.dead).sum(),
            }
        };
        (store.map(Store::begin_close), counts)
    }
}

/// What a stop found, for its log line.
struct StopCounts {
    waiters: usize,
    transfers: usize,
    pending: usize,
    dead: u64,
}

/// Held by a stop until it begins the store close; if the stop is dropped
/// first (the host's stop timeout fired), begins the close on drop.
struct CloseOnDrop(Option<Arc<Bridge>>);

impl CloseOnDrop {
    /// Begin the close now; the guard is spent.
    fn begin(mut self) -> (Option<store::Closing>, StopCounts) {
        let bridge = self.0.take().expect("a guard begins the close once");
        bridge.begin_store_close()
    }
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let Some(bridge) = self.0.take() {
            let (closing, _) = bridge.begin_store_close();
            tracing::warn!(
                generation = bridge.life.generation(),
                closing = closing.is_some(),
                "bncr stop given up by the host before the store close began; the store closes in the background, and the next open waits for that"
            );
        }
    }
}
