//! The bridge: one per generation, owned by the plugin instance. Holds
//! connections, leases and the in-memory mirror of the outbox; the store is
//! the source of truth for everything that must survive a restart.

use crate::config::{Config, Policy};
use crate::files::{OutgoingWaiters, Transfer};
use crate::params::{self, Common, IdStr};
use crate::store::{self, InboundKey, LeaseRow, OutboxRow, Store};
use plugin_api::{
    ConnId, EventSink, RequestContext, RpcError, ScopeHandle, ScopeLife, Value, scope,
};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The event carrying one outbound message.
pub(crate) const PUSH_EVENT: &str = "plugin.bncr.push";
/// The operator event for accepted inbound messages.
pub(crate) const INBOUND_EVENT: &str = "chat.inbound";
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

/// A chat address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    pub(crate) platform: String,
    pub(crate) group_id: String,
    pub(crate) user_id: String,
}

impl Route {
    /// `platform:groupId:userId`.
    pub(crate) fn as_string(&self) -> String {
        format!("{}:{}:{}", self.platform, self.group_id, self.user_id)
    }

    /// The session key used when the client gives none.
    pub(crate) fn session_key(&self, account: &str) -> String {
        format!("bncr:{account}:{}", self.as_string())
    }

    /// Parse an outbound target: `Bncr:<platform>:<groupId>:<userId>`, the
    /// `Bncr:` prefix optional (any case). `userId` keeps any further colons.
    pub(crate) fn parse_target(to: &str) -> Option<Route> {
        let to = to.trim();
        let rest = match to.get(..5) {
            Some(p) if p.eq_ignore_ascii_case("bncr:") => &to[5..],
            _ => to,
        };
        let mut it = rest.splitn(3, ':');
        let (p, g, u) = (it.next()?, it.next()?, it.next()?);
        if p.is_empty() || g.is_empty() || u.is_empty() {
            return None;
        }
        Some(Route {
            platform: p.into(),
            group_id: g.into(),
            user_id: u.into(),
        })
    }
}

#[derive(Debug, Clone)]
struct Lease {
    lease_id: String,
    epoch: u64,
    conn: Option<ConnId>,
    client_id: Option<String>,
    accepted_at: i64,
}

#[derive(Debug, Clone)]
struct Pending {
    message_id: String,
    session_key: String,
    payload: Value,
    attempts: u32,
    next_at: Instant,
    created_at: i64,
    last_error: Option<String>,
    /// A file for this message is being sent to the client.
    transferring: bool,
}

#[derive(Debug, Default)]
struct Account {
    lease: Option<Lease>,
    conns: BTreeSet<ConnId>,
    queue: BTreeMap<i64, Pending>,
    dead: u64,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    accounts: HashMap<String, Account>,
    /// message id -> (account, seq)
    index: HashMap<String, (String, i64)>,
    pub(crate) transfers: HashMap<String, Transfer>,
    pub(crate) waiters: OutgoingWaiters,
    inbound_pending: usize,
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
    state: Mutex<State>,
    wake: Notify,
    stop: CancellationToken,
    drain_done: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    counter: AtomicU64,
    version: String,
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
    ) -> Self {
        Bridge {
            cfg,
            root,
            events,
            store: life.handle(),
            stop: life.cancellation().child_token(),
            life,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            drain_done: Mutex::new(None),
            counter: AtomicU64::new(0),
            version: version.to_string(),
        }
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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

    /// The open store, or a clean `UNAVAILABLE`.
    pub(crate) fn store(&self) -> Result<&Store, RpcError> {
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
    pub(crate) fn account(&self, raw: Option<&str>) -> Result<String, RpcError> {
        let account = normalize_account(raw);
        if let Some(known) = &self.cfg.accounts {
            let ok = known.iter().any(|k| normalize_account(Some(k)) == account);
            if !ok {
                return Err(RpcError::invalid_request(format!(
                    "unknown accountId: {account}"
                )));
            }
        }
        Ok(account)
    }

    // ---------------------------------------------------------------- lifecycle

    /// Open the store, restore state, start the drain, hand on journaled
    /// inbound messages.
    pub(crate) async fn start(self: &Arc<Self>) -> Result<(), String> {
        let path = self.root.join("bncr.sqlite3");
        let files = self.root.join("files");
        // Open, migrate and restore in one hand-off to the store thread.
        let (store, restored) = Store::open(&path, move |conn| {
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
        let pending_inbound = restored.inbound_pending.len();
        let (outbox_n, dead_n, lease_n) = {
            let mut st = self.state();
            for l in &restored.leases {
                let acc = st.accounts.entry(l.account_id.clone()).or_default();
                // A lease restored after a crash names a connection of the
                // dead process: keep the lease (the client may resume it) but
                // only as online if the host still has that connection.
                let conn = l
                    .conn_id
                    .map(ConnId)
                    .filter(|c| self.events.is_connected(*c));
                if let Some(c) = conn {
                    acc.conns.insert(c);
                }
                acc.lease = Some(Lease {
                    lease_id: l.lease_id.clone(),
                    epoch: l.epoch,
                    conn,
                    client_id: l.client_id.clone(),
                    accepted_at: l.accepted_at,
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
            st.inbound_pending = pending_inbound;
            (outbox_n, dead_total, restored.leases.len())
        };
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        *self.drain_done.lock().unwrap_or_else(|e| e.into_inner()) = Some(done_rx);
        let me = self.clone();
        self.life
            .spawn(async move {
                me.drain().await;
                drop(done_tx);
            })
            .map_err(|e| e.to_string())?;
        tracing::info!(
            generation = self.life.generation(),
            outbox = outbox_n,
            dead_letters = dead_n,
            leases = lease_n,
            inbound_pending = pending_inbound,
            "bncr store opened"
        );
        for row in restored.inbound_pending {
            self.hand_on(row.key, row.payload).await;
        }
        Ok(())
    }

    /// Stop the drain, fail waiters as timeouts, close the store.
    pub(crate) async fn stop(self: &Arc<Self>) {
        self.stop.cancel();
        let done = self
            .drain_done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(rx) = done {
            let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
        }
        let (waiters, transfers, pending, dead) = {
            let mut st = self.state();
            let w = st.waiters.fail_all();
            let t = st.transfers.len();
            st.transfers.clear();
            let pending: usize = st.accounts.values().map(|a| a.queue.len()).sum();
            let dead: u64 = st.accounts.values().map(|a| a.dead).sum();
            (w, t, pending, dead)
        };
        let store = self
            .store
            .get()
            .ok()
            .flatten()
            .map(|s| s.path().to_path_buf());
        // Queued writes finish before the thread closes the database; this
        // returns once it is closed. (If the generation already retired the
        // handle refuses; dropping the bridge then drops the sender and the
        // thread closes the database by itself.)
        if let Ok(Some(s)) = self.store.get() {
            s.close().await;
        }
        tracing::info!(
            generation = self.life.generation(),
            pending,
            dead_letters = dead,
            failed_waiters = waiters,
            dropped_transfers = transfers,
            store = ?store,
            "bncr store closed"
        );
    }

    // ---------------------------------------------------------------- outbox

    /// Queue an outbound message durably; the same idempotency key returns the
    /// first message id and queues nothing.
    pub(crate) async fn enqueue(
        &self,
        account: &str,
        route: &Route,
        message: Value,
        idempotency_key: &str,
    ) -> Result<(String, bool), RpcError> {
        let store = self.store()?;
        let row = OutboxRow {
            seq: 0,
            message_id: self.new_id("bncr"),
            account_id: account.to_string(),
            session_key: route.session_key(account),
            payload: message,
            attempts: 0,
            created_at: now_ms(),
        };
        let key = idempotency_key.to_string();
        let (id, inserted) = store
            .call(move |c| store::insert_outbox(c, &key, row))
            .await
            .map_err(Self::store_err)?;
        let Some(row) = inserted else {
            return Ok((id, false));
        };
        {
            self.state().enqueue(row, Instant::now());
        }
        self.wake.notify_one();
        Ok((id, true))
    }

    /// The account to use for an outbound target: the message's `accountId`,
    /// else the account that last heard from the route, else `Primary`.
    pub(crate) async fn account_for_target(
        &self,
        explicit: Option<&str>,
        route: &Route,
    ) -> Result<String, RpcError> {
        if let Some(a) = explicit.filter(|a| !a.trim().is_empty()) {
            return self.account(Some(a));
        }
        let store = self.store()?;
        let r = route.clone();
        let found = store
            .call(move |c| store::account_for_route(c, &r.platform, &r.group_id, &r.user_id))
            .await
            .map_err(Self::store_err)?;
        match found {
            Some(a) => Ok(a),
            None => self.account(None),
        }
    }

    async fn drain(self: Arc<Self>) {
        let mut prune_at = Instant::now();
        loop {
            if self.stop.is_cancelled() {
                break;
            }
            let now = Instant::now();
            let (pushes, deads, next) = self.plan(now);
            for p in pushes {
                if p.file.is_some() {
                    let me = self.clone();
                    if self
                        .life
                        .spawn(async move { me.push_with_file(p).await })
                        .is_err()
                    {
                        return;
                    }
                } else if self.push(p).is_err() {
                    return;
                }
            }
            for (account, seq, pending) in deads {
                self.dead_letter(&account, seq, pending, "retry-limit", None)
                    .await;
            }
            if now >= prune_at {
                self.prune_keys();
                prune_at = now + Duration::from_secs(60);
            }
            let until = next.map_or(prune_at, |n| n.min(prune_at));
            tokio::select! {
                () = self.stop.cancelled() => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep_until(until.into()) => {}
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn plan(&self, now: Instant) -> (Vec<Push>, Vec<(String, i64, Pending)>, Option<Instant>) {
        let mut pushes = Vec::new();
        let mut deads = Vec::new();
        let mut next: Option<Instant> = None;
        let limit = self.cfg.retry_limit;
        let files_dir = self.root.join("files");
        let mut st = self.state();
        let st = &mut *st;
        for (name, acc) in st.accounts.iter_mut() {
            let Some(conn) = acc.lease.as_ref().and_then(|l| l.conn) else {
                continue;
            };
            let head: Vec<i64> = acc.queue.keys().take(self.cfg.window).copied().collect();
            for seq in head {
                let Some(p) = acc.queue.get_mut(&seq) else {
                    continue;
                };
                if p.transferring {
                    continue;
                }
                if p.next_at > now {
                    next = Some(next.map_or(p.next_at, |n| n.min(p.next_at)));
                    continue;
                }
                if p.attempts >= limit {
                    if let Some(p) = acc.queue.remove(&seq) {
                        st.index.remove(&p.message_id);
                        deads.push((name.clone(), seq, p));
                    }
                    // The next message moves into the window; plan again now.
                    next = Some(now);
                    continue;
                }
                p.attempts += 1;
                p.next_at = now + self.cfg.backoff(p.attempts);
                let file = p
                    .payload
                    .get("path")
                    .and_then(Value::as_str)
                    .filter(|path| {
                        p.payload.get("base64").is_none() && Path::new(path).starts_with(&files_dir)
                    })
                    .map(str::to_string);
                p.transferring = file.is_some();
                pushes.push(Push {
                    file,
                    account: name.clone(),
                    seq,
                    conn,
                    attempts: p.attempts,
                    payload: json!({
                        "type": "message.outbound",
                        "messageId": p.message_id,
                        "idempotencyKey": p.message_id,
                        "sessionKey": p.session_key,
                        "ts": now_ms(),
                        "message": p.payload,
                    }),
                });
                next = Some(next.map_or(p.next_at, |n| n.min(p.next_at)));
            }
        }
        (pushes, deads, next)
    }

    /// Send the message's file first, then push the message with `path`
    /// replaced by the client's path for it.
    async fn push_with_file(self: Arc<Self>, mut p: Push) {
        let path = p.file.take().unwrap_or_default();
        let mime = p.payload["message"]["mimeType"]
            .as_str()
            .map(str::to_string);
        let result = match self.sendable_file(&path) {
            Some(local) => {
                self.send_file(p.conn, &p.account, local, mime.as_deref())
                    .await
            }
            None => Err(format!("not a sendable file: {path}")),
        };
        let ok = match result {
            Ok(client_path) => {
                p.payload["message"]["path"] = json!(client_path);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, account = %p.account, "bncr file transfer failed; will retry");
                false
            }
        };
        {
            let mut st = self.state();
            if let Some(q) = st
                .accounts
                .get_mut(&p.account)
                .and_then(|a| a.queue.get_mut(&p.seq))
            {
                q.transferring = false;
                q.next_at = Instant::now() + self.cfg.backoff(q.attempts);
                if !ok {
                    q.last_error = Some("file transfer failed".into());
                }
            }
        }
        if ok {
            let _ = self.push(p);
        }
        self.wake.notify_one();
    }

    /// Push one message; `Err` when the generation retired.
    fn push(&self, p: Push) -> Result<(), ()> {
        let sent = match self.events.send(&[p.conn], PUSH_EVENT, &p.payload) {
            Ok(n) => n,
            Err(plugin_api::EventError::Retired(_)) => return Err(()),
            Err(e) => {
                tracing::warn!(error = %e, "bncr push failed");
                0
            }
        };
        let message_id = p.payload["messageId"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if sent == 0 {
            // The connection is gone: not an attempt. Wait for a new lease.
            {
                let mut st = self.state();
                if let Some(q) = st
                    .accounts
                    .get_mut(&p.account)
                    .and_then(|a| a.queue.get_mut(&p.seq))
                {
                    q.attempts = q.attempts.saturating_sub(1);
                    q.next_at = Instant::now();
                }
            }
            tracing::info!(account = %p.account, conn = %p.conn, "bncr connection refused a push; marked offline");
            self.connection_closed(p.conn);
            return Ok(());
        }
        let store = match self.store() {
            Ok(s) => s,
            Err(_) => return Ok(()),
        };
        if self.cfg.outbound_require_ack {
            let attempts = p.attempts;
            store.enqueue("record attempt", move |c| {
                c.execute(
                    "UPDATE outbox SET attempts = ?1 WHERE message_id = ?2",
                    rusqlite::params![attempts, message_id],
                )?;
                Ok(())
            });
        } else {
            {
                let mut st = self.state();
                st.index.remove(&message_id);
                if let Some(acc) = st.accounts.get_mut(&p.account) {
                    acc.queue.remove(&p.seq);
                }
            }
            store.enqueue("remove delivered", move |c| {
                c.execute("DELETE FROM outbox WHERE message_id = ?1", [message_id])?;
                Ok(())
            });
            self.wake.notify_one();
        }
        Ok(())
    }

    async fn dead_letter(
        &self,
        account: &str,
        _seq: i64,
        p: Pending,
        reason: &str,
        error: Option<String>,
    ) {
        let error = error.or(p.last_error.clone());
        let Ok(store) = self.store() else {
            // Still in the store's outbox; the next generation retries it.
            return;
        };
        let id = p.message_id.clone();
        let reason_s = reason.to_string();
        let attempts = p.attempts;
        let err2 = error.clone();
        let res = store
            .call(move |c| {
                store::dead_letter(c, &id, &reason_s, err2.as_deref(), attempts, now_ms())
            })
            .await;
        match res {
            Ok(_) => {
                if let Some(acc) = self.state().accounts.get_mut(account) {
                    acc.dead += 1;
                }
                tracing::warn!(
                    account,
                    message_id = %p.message_id,
                    attempts = p.attempts,
                    reason,
                    error = error.as_deref().unwrap_or(""),
                    "bncr message dead-lettered"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, message_id = %p.message_id, "bncr dead-letter write failed")
            }
        }
        self.wake.notify_one();
    }

    fn prune_keys(&self) {
        let Ok(store) = self.store() else { return };
        let cutoff = now_ms() - self.cfg.dedupe_ttl_ms as i64;
        store.enqueue("prune dedupe keys", move |c| {
            let (a, b) = store::prune_keys(c, cutoff)?;
            if a + b > 0 {
                tracing::debug!(inbound = a, idempotency = b, "bncr pruned expired keys");
            }
            Ok(())
        });
    }

    /// Handle `bncr.ack`.
    pub(crate) async fn ack(&self, p: params::Ack) -> Result<Value, RpcError> {
        let message_id = params::required(p.message_id, "messageId")?;
        let store = self.store()?;
        let ok = p.ok.unwrap_or(true);
        let fatal = p.fatal.unwrap_or(false);
        enum Next {
            Missing,
            Done,
            Dead(String, i64, Pending, &'static str),
            Retry(u64),
        }
        let next = {
            let mut st = self.state();
            let st = &mut *st;
            match st.index.get(&message_id).cloned() {
                None => Next::Missing,
                Some((account, seq)) => {
                    let acc = st.accounts.entry(account.clone()).or_default();
                    if ok && !fatal {
                        acc.queue.remove(&seq);
                        st.index.remove(&message_id);
                        Next::Done
                    } else {
                        let limit_hit = acc
                            .queue
                            .get(&seq)
                            .is_some_and(|q| q.attempts >= self.cfg.retry_limit);
                        if fatal || limit_hit {
                            match acc.queue.remove(&seq) {
                                Some(mut q) => {
                                    st.index.remove(&message_id);
                                    if p.error.is_some() {
                                        q.last_error = p.error.clone();
                                    }
                                    Next::Dead(
                                        account,
                                        seq,
                                        q,
                                        if fatal { "fatal" } else { "retry-limit" },
                                    )
                                }
                                None => Next::Missing,
                            }
                        } else if let Some(q) = acc.queue.get_mut(&seq) {
                            q.last_error = p.error.clone();
                            let wait = q.next_at.saturating_duration_since(Instant::now());
                            Next::Retry(wait.as_millis() as u64)
                        } else {
                            Next::Missing
                        }
                    }
                }
            }
        };
        match next {
            Next::Missing => Ok(json!({"ok": true, "message": "already-acked-or-missing"})),
            Next::Done => {
                let id = message_id.clone();
                store
                    .call(move |c| {
                        c.execute("DELETE FROM outbox WHERE message_id = ?1", [id])?;
                        Ok(())
                    })
                    .await
                    .map_err(Self::store_err)?;
                self.wake.notify_one();
                Ok(json!({"ok": true, "messageId": message_id}))
            }
            Next::Dead(account, seq, q, reason) => {
                self.dead_letter(&account, seq, q, reason, p.error).await;
                Ok(
                    json!({"ok": true, "messageId": message_id, "movedToDeadLetter": true, "reason": reason}),
                )
            }
            Next::Retry(wait) => {
                let id = message_id.clone();
                let err = p.error;
                store.enqueue("record nack", move |c| {
                    c.execute(
                        "UPDATE outbox SET last_error = ?1 WHERE message_id = ?2",
                        rusqlite::params![err, id],
                    )?;
                    Ok(())
                });
                Ok(
                    json!({"ok": true, "messageId": message_id, "willRetry": true, "retryInMs": wait}),
                )
            }
        }
    }

    // ---------------------------------------------------------------- connections

    /// Mark `conn` offline everywhere.
    pub(crate) fn connection_closed(&self, conn: ConnId) {
        let mut changed = Vec::new();
        {
            let mut st = self.state();
            for (name, acc) in st.accounts.iter_mut() {
                acc.conns.remove(&conn);
                if let Some(l) = acc.lease.as_mut()
                    && l.conn == Some(conn)
                {
                    l.conn = None;
                    changed.push(lease_row(name, l));
                }
            }
        }
        if changed.is_empty() {
            return;
        }
        tracing::info!(conn = %conn, accounts = changed.len(), "bncr connection offline");
        if let Ok(store) = self.store() {
            store.enqueue("lease offline", move |c| {
                for l in &changed {
                    store::put_lease(c, l)?;
                }
                Ok(())
            });
        }
    }

    /// Whether the caller named a lease (or epoch) that is no longer the
    /// account's current one. Callers that name none are never stale.
    fn stale(&self, account: &str, common: &Common) -> bool {
        let st = self.state();
        let current = st.accounts.get(account).and_then(|a| a.lease.as_ref());
        match (common.lease_id.as_deref(), current) {
            (Some(given), Some(l)) => {
                given != l.lease_id || common.connection_epoch.is_some_and(|e| e != l.epoch)
            }
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    fn counts(&self, account: &str) -> (usize, usize, u64, bool) {
        let st = self.state();
        st.accounts.get(account).map_or((0, 0, 0, false), |a| {
            (
                a.conns.len(),
                a.queue.len(),
                a.dead,
                a.lease.as_ref().is_some_and(|l| l.conn.is_some()),
            )
        })
    }

    /// Handle `bncr.connect`: a new lease for the account, held by the caller.
    pub(crate) async fn connect(&self, ctx: &RequestContext, p: Common) -> Result<Value, RpcError> {
        let account = self.account(p.account_id.as_deref())?;
        let store = self.store()?;
        let conn = ctx.conn_id();
        let now = now_ms();
        let row = {
            let mut st = self.state();
            let acc = st.accounts.entry(account.clone()).or_default();
            let epoch = acc.lease.as_ref().map_or(0, |l| l.epoch) + 1;
            let lease = Lease {
                lease_id: self.new_id("lease"),
                epoch,
                conn: Some(conn),
                client_id: p.client_id.clone(),
                accepted_at: now,
            };
            acc.conns.insert(conn);
            let row = lease_row(&account, &lease);
            acc.lease = Some(lease);
            row
        };
        let r2 = row.clone();
        store
            .call(move |c| store::put_lease(c, &r2))
            .await
            .map_err(Self::store_err)?;
        self.wake.notify_one();
        tracing::info!(account = %account, conn = %conn, epoch = row.epoch, client = ?row.client_id, "bncr client connected");
        let (active, pending, dead, online) = self.counts(&account);
        Ok(json!({
            "channel": "bncr",
            "accountId": account,
            "bridgeVersion": self.version,
            "pushEvent": PUSH_EVENT,
            "online": online,
            "isPrimary": account == PRIMARY,
            "activeConnections": active,
            "pending": pending,
            "deadLetter": dead,
            "leaseId": row.lease_id,
            "connectionEpoch": row.epoch,
            "protocolVersion": PROTOCOL_VERSION,
            "acceptedAt": now,
            "now": now_ms(),
        }))
    }

    /// Handle `bncr.activity`: a heartbeat; re-attaches a lease whose
    /// connection was marked offline when the caller holds it.
    pub(crate) fn activity(&self, ctx: &RequestContext, p: Common) -> Result<Value, RpcError> {
        let account = self.account(p.account_id.as_deref())?;
        let store = self.store()?;
        if self.stale(&account, &p) {
            return Ok(json!({"ok": false, "stale": true, "accountId": account, "now": now_ms()}));
        }
        let conn = ctx.conn_id();
        let reattached = {
            let mut st = self.state();
            let acc = st.accounts.entry(account.clone()).or_default();
            acc.conns.insert(conn);
            match acc.lease.as_mut() {
                Some(l) if l.conn.is_none() && p.lease_id.is_some() => {
                    l.conn = Some(conn);
                    Some(lease_row(&account, l))
                }
                _ => None,
            }
        };
        if let Some(row) = reattached {
            store.enqueue("lease reattach", move |c| store::put_lease(c, &row));
            self.wake.notify_one();
        }
        let (active, pending, dead, _) = self.counts(&account);
        Ok(json!({
            "ok": true,
            "accountId": account,
            "activeConnections": active,
            "pending": pending,
            "deadLetter": dead,
            "now": now_ms(),
        }))
    }

    // ---------------------------------------------------------------- inbound

    fn allowed(&self, route: &Route) -> Result<(), &'static str> {
        let (policy, list, id) = if route.group_id == "0" {
            (self.cfg.dm_policy, &self.cfg.allow_from, &route.user_id)
        } else {
            (
                self.cfg.group_policy,
                &self.cfg.group_allow_from,
                &route.group_id,
            )
        };
        match policy {
            Policy::Open => Ok(()),
            Policy::Disabled => Err(if route.group_id == "0" {
                "dm-disabled"
            } else {
                "group-disabled"
            }),
            Policy::Allowlist => {
                let qualified = format!("{}:{id}", route.platform);
                if list.iter().any(|e| e == id || *e == qualified || e == "*") {
                    Ok(())
                } else {
                    Err("not-allowlisted")
                }
            }
        }
    }

    /// Handle `bncr.inbound`.
    pub(crate) async fn inbound(
        &self,
        ctx: &RequestContext,
        p: params::Inbound,
    ) -> Result<Value, RpcError> {
        let route = inbound_route(&p.platform, &p.group_id, &p.user_id)?;
        let account = self.account(p.common.account_id.as_deref())?;
        let kind = p.kind.clone().unwrap_or_else(|| "text".into());
        if !MESSAGE_TYPES.contains(&kind.as_str()) {
            return Err(RpcError::invalid_request(format!(
                "type must be one of {}",
                MESSAGE_TYPES.join("|")
            )));
        }
        let store = self.store()?;
        if self.stale(&account, &p.common) {
            return Ok(json!({"accepted": false, "stale": true, "accountId": account}));
        }
        self.state()
            .accounts
            .entry(account.clone())
            .or_default()
            .conns
            .insert(ctx.conn_id());
        if let Err(reason) = self.allowed(&route) {
            tracing::info!(account = %account, route = %route.as_string(), reason, "bncr inbound refused by policy");
            return Ok(json!({"accepted": false, "reason": reason, "accountId": account}));
        }
        let msg_id = params::id_opt(&p.msg_id).unwrap_or_else(|| self.new_id("in"));
        let session_key = p
            .session_key
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| route.session_key(&account));
        let mut payload = json!({
            "channel": "bncr",
            "accountId": account,
            "route": route.as_string(),
            "platform": route.platform,
            "groupId": route.group_id,
            "userId": route.user_id,
            "sessionKey": session_key,
            "msgId": msg_id,
            "msg": p.msg.clone().unwrap_or_default(),
            "type": kind,
            "ts": now_ms(),
        });
        for (k, v) in [
            ("base64", &p.base64),
            ("path", &p.path),
            ("mimeType", &p.mime_type),
            ("fileName", &p.file_name),
        ] {
            if let Some(v) = v {
                payload[k] = json!(v);
            }
        }
        let key = InboundKey {
            account_id: account.clone(),
            platform: route.platform.clone(),
            group_id: route.group_id.clone(),
            user_id: route.user_id.clone(),
            msg_id: msg_id.clone(),
        };
        let (k2, p2) = (key.clone(), payload.clone());
        let fresh = store
            .call(move |c| store::journal_inbound(c, &k2, &p2, now_ms()))
            .await
            .map_err(Self::store_err)?;
        if !fresh {
            return Ok(json!({
                "accepted": true, "duplicated": true, "accountId": account,
                "sessionKey": session_key, "msgId": msg_id,
            }));
        }
        self.state().inbound_pending += 1;
        self.hand_on(key, payload).await;
        Ok(
            json!({"accepted": true, "accountId": account, "sessionKey": session_key, "msgId": msg_id}),
        )
    }

    /// Publish a journaled inbound message to operators (and the echo
    /// responder), then mark it handed on.
    async fn hand_on(&self, key: InboundKey, payload: Value) {
        match self.events.broadcast(scope::WRITE, INBOUND_EVENT, &payload) {
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, msg_id = %key.msg_id, "bncr inbound not handed on; kept for the next generation");
                return;
            }
        }
        if self.cfg.echo.enabled {
            let route = Route {
                platform: key.platform.clone(),
                group_id: key.group_id.clone(),
                user_id: key.user_id.clone(),
            };
            let text = format!(
                "{}{}",
                self.cfg.echo.prefix,
                payload
                    .get("msg")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
            );
            let message = json!({
                "platform": route.platform, "groupId": route.group_id, "userId": route.user_id,
                "type": "text", "msg": text,
            });
            let idem = format!(
                "echo:{}:{}:{}",
                key.account_id,
                route.as_string(),
                key.msg_id
            );
            if let Err(e) = self.enqueue(&key.account_id, &route, message, &idem).await {
                tracing::warn!(error = %e, "bncr echo not queued; kept for the next generation");
                return;
            }
        }
        if let Ok(store) = self.store() {
            store.enqueue("mark handed on", move |c| store::mark_handed_on(c, &key));
            let mut st = self.state();
            st.inbound_pending = st.inbound_pending.saturating_sub(1);
        }
    }

    // ---------------------------------------------------------------- diagnostics

    /// Handle `bncr.diagnostics`.
    pub(crate) fn diagnostics(&self, p: Common) -> Result<Value, RpcError> {
        let only = p.account_id.as_deref().map(|a| normalize_account(Some(a)));
        let store_open = self.store().is_ok();
        let st = self.state();
        let mut accounts = Vec::new();
        let mut names: Vec<&String> = st.accounts.keys().collect();
        names.sort();
        for name in names {
            if only.as_ref().is_some_and(|o| o != name) {
                continue;
            }
            let a = &st.accounts[name];
            let now = Instant::now();
            let in_flight = a
                .queue
                .values()
                .take(self.cfg.window)
                .filter(|q| q.attempts > 0)
                .count();
            accounts.push(json!({
                "accountId": name,
                "online": a.lease.as_ref().is_some_and(|l| l.conn.is_some()),
                "connections": a.conns.iter().map(|c| c.0).collect::<Vec<_>>(),
                "lease": a.lease.as_ref().map(|l| json!({
                    "leaseId": l.lease_id, "connectionEpoch": l.epoch,
                    "connId": l.conn.map(|c| c.0), "clientId": l.client_id,
                    "acceptedAt": l.accepted_at,
                })),
                "outbox": {
                    "pending": a.queue.len(),
                    "inFlight": in_flight,
                    "oldestCreatedAt": a.queue.values().next().map(|q| q.created_at),
                    "nextRetryInMs": a.queue.values().take(self.cfg.window)
                        .map(|q| q.next_at.saturating_duration_since(now).as_millis() as u64).min(),
                },
                "deadLetter": a.dead,
            }));
        }
        Ok(json!({
            "ok": true,
            "channel": "bncr",
            "generation": self.life.generation(),
            "bridgeVersion": self.version,
            "store": {
                "open": store_open,
                "path": self.root.join("bncr.sqlite3"),
                "schemaVersion": store::SCHEMA_VERSION,
            },
            "accounts": accounts,
            "outbox": st.accounts.values().map(|a| a.queue.len()).sum::<usize>(),
            "deadLetter": st.accounts.values().map(|a| a.dead).sum::<u64>(),
            "inboundPending": st.inbound_pending,
            "waiters": st.waiters.len(),
            "transfers": st.transfers.len(),
            "config": {
                "window": self.cfg.window, "retryLimit": self.cfg.retry_limit,
                "retryBaseMs": self.cfg.retry_base_ms, "retryCapMs": self.cfg.retry_cap_ms,
                "outboundRequireAck": self.cfg.outbound_require_ack, "echo": self.cfg.echo.enabled,
            },
            "now": now_ms(),
        }))
    }

    /// Handle `bncr.deadLetter.inspect`.
    pub(crate) async fn dead_inspect(&self, p: params::DeadLetter) -> Result<Value, RpcError> {
        let store = self.store()?;
        let filter = dead_filter(&p);
        let limit = p.limit.unwrap_or(20).min(500);
        let offset = p.offset.unwrap_or(0);
        let f2 = filter.clone();
        let (total, entries) = store
            .call(move |c| store::inspect_dead(c, &f2, limit, offset))
            .await
            .map_err(Self::store_err)?;
        Ok(
            json!({"ok": true, "total": total, "limit": limit, "offset": offset, "entries": entries}),
        )
    }

    /// Handle `bncr.deadLetter.prune`.
    pub(crate) async fn dead_prune(&self, p: params::DeadLetter) -> Result<Value, RpcError> {
        let dry_run = p.dry_run.unwrap_or(true);
        if !dry_run && p.reason.is_none() && p.older_than.is_none() {
            return Err(
                RpcError::invalid_request("deadLetter-prune-requires-filter")
                    .with_details(json!({"code": "deadLetter-prune-requires-filter"})),
            );
        }
        let store = self.store()?;
        let filter = dead_filter(&p);
        let per_account = store
            .call(move |c| store::prune_dead(c, &filter, dry_run))
            .await
            .map_err(Self::store_err)?;
        let matched: u64 = per_account.iter().map(|(_, n)| n).sum();
        if !dry_run {
            let mut st = self.state();
            for (a, n) in &per_account {
                if let Some(acc) = st.accounts.get_mut(a) {
                    acc.dead = acc.dead.saturating_sub(*n);
                }
            }
            drop(st);
            tracing::info!(removed = matched, "bncr dead letters pruned");
        }
        Ok(
            json!({"ok": true, "dryRun": dry_run, "matched": matched, "removed": if dry_run { 0 } else { matched }}),
        )
    }
}

fn dead_filter(p: &params::DeadLetter) -> store::DeadFilter {
    store::DeadFilter {
        account_id: p.account_id.as_deref().map(|a| normalize_account(Some(a))),
        reason: p.reason.clone(),
        before: p.older_than.map(|ms| now_ms() - ms as i64),
    }
}

fn lease_row(account: &str, l: &Lease) -> LeaseRow {
    LeaseRow {
        account_id: account.to_string(),
        lease_id: l.lease_id.clone(),
        epoch: l.epoch,
        conn_id: l.conn.map(|c| c.0),
        client_id: l.client_id.clone(),
        accepted_at: l.accepted_at,
    }
}

/// The route of an inbound request, or the contract's error.
pub(crate) fn inbound_route(
    platform: &Option<String>,
    group_id: &Option<IdStr>,
    user_id: &Option<IdStr>,
) -> Result<Route, RpcError> {
    let platform = platform.as_deref().map(str::trim).unwrap_or_default();
    let group = params::id_opt(group_id).unwrap_or_else(|| "0".into());
    let user = params::id_opt(user_id).unwrap_or_default();
    if platform.is_empty() || user.is_empty() {
        return Err(RpcError::invalid_request(
            "platform/groupId/userId required",
        ));
    }
    Ok(Route {
        platform: platform.into(),
        group_id: group,
        user_id: user,
    })
}
