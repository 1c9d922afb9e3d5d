//! The durable store: one SQLite database, its queries run in order on
//! tokio's blocking pool.
//!
//! Every query of a running generation runs off the async workers. Jobs run
//! in the order they were submitted, one at a time, by a runner borrowed
//! from the blocking pool while there is work (and for a short idle wait
//! before a checkpoint); fire-and-forget writes ([`Store::enqueue`])
//! therefore land before any later awaited job. No thread belongs to a
//! store or a generation: the pool's threads are reused across restarts, so
//! restarting creates no OS threads (and so no new malloc arenas).
//!
//! Open (with restore) and close, the two steps on the restart path, are
//! awaited on the blocking pool too, so the host's service start and stop
//! timeouts can fire while SQLite blocks (a busy lock, a slow disk).
//!
//! Durability: `synchronous=FULL` in WAL mode, so a commit is fsynced
//! before its caller hears back (`send` returns, `accepted:true`) and
//! survives kill -9 and power loss. FULL is kept because the restart path
//! commits nothing: an open at the current schema only reads, and close
//! does not checkpoint. NORMAL would only speed up per-message writes, at
//! the price of the last commits on power loss.

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

/// The newest schema version this code knows.
pub(crate) const SCHEMA_VERSION: i64 = 3;

/// A queued job. It records its own outcome in the fault state before it
/// answers its caller, so a caller never sees a result the health check
/// has not seen.
type Job = Box<dyn FnOnce(&mut Connection, &Shared) + Send + 'static>;

/// A store failure, as text for logs and error replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoreError(pub(crate) String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(e.to_string())
    }
}

/// After this long without a job, the store thread folds the WAL back into
/// the database (`wal_checkpoint(TRUNCATE)`) if anything was written since
/// the last checkpoint. This keeps the WAL, and so the recovery work of the
/// next open, small without putting a checkpoint on the restart path.
/// (The runner waits this long on its pool thread before it returns.)
const IDLE_CHECKPOINT: std::time::Duration = std::time::Duration::from_secs(1);

/// Handle to the store. Closing it finishes queued jobs and closes the
/// database.
///
/// Durability does not rest on checkpoints: every commit is fsynced to the
/// WAL (`synchronous=FULL`) before its caller hears back, and SQLite replays
/// the WAL on the next open, after a clean close and after kill -9 alike.
/// So closing skips the checkpoint SQLite would otherwise run (and fsync)
/// on the last close (`SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE`); the runner
/// checkpoints when idle instead, and SQLite's auto-checkpoint (1000 pages)
/// bounds the WAL under sustained load.
#[derive(Debug)]
pub(crate) struct Store {
    path: PathBuf,
    shared: Arc<Shared>,
}

/// What the runner and the handle share. Lock order: `queue`, then
/// `conn`. A job is popped and `conn` locked under one `queue` lock, so a
/// closer that takes the remaining jobs runs them after the one in hand.
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    conn: Mutex<Option<Connection>>,
    /// Where runners are borrowed from.
    runtime: tokio::runtime::Handle,
    /// SQLite opened the database read-only.
    read_only: bool,
    /// The last job's failure, until a later job writes successfully.
    fault: Mutex<Option<String>>,
    /// Jobs that failed, since open.
    failures: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
    /// A runner is serving the queue. Invariant (under this lock): jobs
    /// queued and not closed imply a runner.
    running: bool,
    /// Whether anything was written since the last checkpoint.
    dirty: bool,
}

/// Run blocking `f` on tokio's blocking pool and await it: the awaiting
/// future stays cancellable (a timeout around it fires on time) while `f`
/// runs to completion on its own.
async fn blocking<R, F>(f: F) -> Result<R, StoreError>
where
    R: Send + 'static,
    F: FnOnce() -> R + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError(format!("store task: {e}")))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Open (creating and migrating) the database at `path`. Blocking.
fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| StoreError(format!("{}: {e}", dir.display())))?;
    }
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // Per connection, not persistent: set on every open.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    )?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// Checkpoint and truncate the WAL without waiting for other readers.
fn checkpoint(conn: &Connection) {
    let _ = conn.busy_timeout(std::time::Duration::ZERO);
    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
        tracing::debug!(error = %e, "bncr store checkpoint skipped");
    }
    let _ = conn.busy_timeout(std::time::Duration::from_secs(5));
}

impl Store {
    /// Open (creating and migrating) the database at `path` and run `init`
    /// on it (restoring state), on the blocking pool. Must be called inside
    /// a tokio runtime; later jobs run on that runtime's blocking pool.
    pub(crate) async fn open<R, F>(path: &Path, init: F) -> Result<(Store, R), StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let db = path.to_path_buf();
        let (conn, r, read_only) = blocking(move || {
            let mut conn = open_connection(&db)?;
            let r = init(&mut conn)?;
            let read_only = conn.is_readonly(rusqlite::MAIN_DB)?;
            Ok::<_, StoreError>((conn, r, read_only))
        })
        .await??;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            conn: Mutex::new(Some(conn)),
            runtime: tokio::runtime::Handle::current(),
            read_only,
            fault: Mutex::new(None),
            failures: Default::default(),
        });
        Ok((
            Store {
                path: path.to_path_buf(),
                shared,
            },
            r,
        ))
    }

    /// The database file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the store accepts work.
    pub(crate) fn is_open(&self) -> bool {
        !lock(&self.shared.queue).closed
    }

    /// Why the store cannot do its job, if it cannot: SQLite opened the
    /// database read-only (the file or its directory is not writable), or
    /// the last job failed and no write has succeeded since.
    pub(crate) fn fault(&self) -> Option<String> {
        if self.shared.read_only {
            return Some(format!("{} is read-only", self.path.display()));
        }
        lock(&self.shared.fault).clone()
    }

    /// Whether SQLite opened the database read-only.
    pub(crate) fn is_read_only(&self) -> bool {
        self.shared.read_only
    }

    /// How many jobs failed since the store opened.
    pub(crate) fn failures(&self) -> u64 {
        self.shared
            .failures
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Run `f` on the store's runner and wait for its result.
    pub(crate) async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |c, shared| {
            let before = c.total_changes();
            let r = f(c);
            shared.record(c, before, r.as_ref().err());
            let _ = tx.send(r);
        });
        self.submit(job)?;
        rx.await
            .map_err(|_| StoreError("store closed before the job ran".into()))?
    }

    /// Queue `f` without waiting; errors are logged.
    pub(crate) fn enqueue<F>(&self, what: &'static str, f: F)
    where
        F: FnOnce(&mut Connection) -> Result<(), StoreError> + Send + 'static,
    {
        let job: Job = Box::new(move |c, shared| {
            let before = c.total_changes();
            let r = f(c);
            if let Err(e) = &r {
                tracing::warn!(error = %e, what, "bncr store write failed");
            }
            shared.record(c, before, r.as_ref().err());
        });
        if self.submit(job).is_err() {
            tracing::debug!(what, "bncr store closed; write skipped");
        }
    }

    fn submit(&self, job: Job) -> Result<(), StoreError> {
        let mut q = lock(&self.shared.queue);
        if q.closed {
            return Err(StoreError("store is not open".into()));
        }
        q.jobs.push_back(job);
        let start = !q.running;
        q.running = true;
        drop(q);
        if start {
            let shared = self.shared.clone();
            // Dropping the join handle detaches the runner; it ends when
            // the queue is empty (and checkpointed) or closed.
            drop(self.shared.runtime.spawn_blocking(move || serve(&shared)));
        } else {
            self.shared.ready.notify_one();
        }
        Ok(())
    }

    /// Stop accepting work, run the jobs still queued, close the database.
    /// Runs on the blocking pool (after any job a runner has in hand); the
    /// caller awaits it, so a timeout around `close` can fire. When this
    /// returns the database is closed. Idempotent.
    pub(crate) async fn close(&self) {
        let shared = self.shared.clone();
        let _ = blocking(move || shared.close_now()).await;
    }
}

impl Shared {
    fn close_now(&self) {
        // Under the queue lock (lock order: queue, then conn): mark closed,
        // take the queued jobs and the connection together, so the store
        // thread can neither pick up a later job nor close the connection
        // with jobs still to run. Taking `conn` waits for a job in hand.
        let (rest, conn) = {
            let mut q = lock(&self.queue);
            q.closed = true;
            let rest = std::mem::take(&mut q.jobs);
            let conn = lock(&self.conn).take();
            (rest, conn)
        };
        self.ready.notify_one();
        if let Some(mut conn) = conn {
            for job in rest {
                self.run(job, &mut conn);
            }
            close_connection(conn);
        }
    }
}

impl Drop for Store {
    /// Without [`Store::close`] (a generation dropped without stopping): a
    /// runner still serving finishes the queue and closes the database;
    /// with no runner the queue is empty and the database closes when the
    /// last reference goes.
    fn drop(&mut self) {
        lock(&self.shared.queue).closed = true;
        self.shared.ready.notify_one();
    }
}

impl Shared {
    /// Run one job. A panicking job is logged (and counted as a failure)
    /// and does not take the store down with it.
    fn run(&self, job: Job, conn: &mut Connection) {
        let panicked =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(conn, self))).is_err();
        if panicked {
            tracing::error!("bncr store job panicked");
            let e = StoreError("store job panicked".into());
            self.record(conn, conn.total_changes(), Some(&e));
        }
    }

    /// Keep the fault state after a job: a failure is remembered until a
    /// later job writes successfully (`before` is the connection's change
    /// count before the job).
    fn record(&self, conn: &Connection, before: u64, failed: Option<&StoreError>) {
        let mut fault = lock(&self.fault);
        match failed {
            Some(e) => {
                self.failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                *fault = Some(e.to_string());
            }
            None if conn.total_changes() != before => *fault = None,
            None => {}
        }
    }
}

fn close_connection(conn: Connection) {
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "bncr store close failed");
    }
}

/// A runner's loop, on a blocking-pool thread: run jobs in order; when the
/// queue is empty after writes, wait [`IDLE_CHECKPOINT`] for more work, then
/// checkpoint; return when there is nothing left to do. Once closed and
/// drained, close the database unless a closer already took it.
fn serve(shared: &Shared) {
    let mut q = lock(&shared.queue);
    loop {
        if let Some(job) = q.jobs.pop_front() {
            let mut c = lock(&shared.conn);
            drop(q);
            if let Some(conn) = c.as_mut() {
                let before = conn.total_changes();
                shared.run(job, conn);
                let wrote = conn.total_changes() != before;
                drop(c);
                q = lock(&shared.queue);
                q.dirty |= wrote;
            } else {
                drop(c);
                q = lock(&shared.queue);
            }
            continue;
        }
        if q.closed {
            q.running = false;
            drop(q);
            if let Some(conn) = lock(&shared.conn).take() {
                close_connection(conn);
            }
            return;
        }
        if !q.dirty {
            q.running = false;
            return;
        }
        let (guard, timeout) = shared
            .ready
            .wait_timeout(q, IDLE_CHECKPOINT)
            .unwrap_or_else(|e| e.into_inner());
        q = guard;
        if timeout.timed_out() && q.jobs.is_empty() && !q.closed {
            q.dirty = false;
            drop(q);
            if let Some(conn) = lock(&shared.conn).as_ref() {
                checkpoint(conn);
            }
            q = lock(&shared.queue);
        }
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    // The common case, every restart: one read of the header. No DDL, no
    // write transaction, no fsync. Reading also opens the WAL if the
    // database is in WAL mode, so `journal_mode` below reports the truth.
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version == SCHEMA_VERSION {
        let mode: String = conn.pragma_query_value(None, "journal_mode", |r| r.get(0))?;
        if mode.eq_ignore_ascii_case("wal") {
            return Ok(());
        }
    }
    if version > SCHEMA_VERSION {
        return Err(StoreError(format!(
            "store schema version {version} is newer than this plugin's {SCHEMA_VERSION}"
        )));
    }
    // WAL is persistent in the file; set it once, before the migration
    // commits, outside any transaction.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // Re-read under the write lock: another opener may have migrated.
    let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError(format!(
            "store schema version {version} is newer than this plugin's {SCHEMA_VERSION}"
        )));
    }
    if version < 1 {
        tx.execute_batch(
            "CREATE TABLE outbox(
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                message_id TEXT NOT NULL UNIQUE,
                account_id TEXT NOT NULL,
                session_key TEXT NOT NULL,
                payload TEXT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                last_error TEXT,
                created_at INTEGER NOT NULL);
             CREATE TABLE dead_letter(
                message_id TEXT PRIMARY KEY,
                seq INTEGER NOT NULL,
                account_id TEXT NOT NULL,
                session_key TEXT NOT NULL,
                payload TEXT NOT NULL,
                attempts INTEGER NOT NULL,
                reason TEXT NOT NULL,
                error TEXT,
                created_at INTEGER NOT NULL,
                dead_at INTEGER NOT NULL);
             CREATE TABLE idempotency(
                key TEXT PRIMARY KEY,
                message_id TEXT NOT NULL,
                created_at INTEGER NOT NULL);
             CREATE TABLE inbound(
                account_id TEXT NOT NULL,
                platform TEXT NOT NULL,
                group_id TEXT NOT NULL,
                user_id TEXT NOT NULL,
                msg_id TEXT NOT NULL,
                payload TEXT NOT NULL,
                received_at INTEGER NOT NULL,
                handed_on INTEGER NOT NULL DEFAULT 0,
                PRIMARY KEY(account_id, platform, group_id, user_id, msg_id));
             CREATE INDEX inbound_pending ON inbound(handed_on, received_at);
             CREATE TABLE leases(
                account_id TEXT PRIMARY KEY,
                lease_id TEXT NOT NULL,
                epoch INTEGER NOT NULL,
                conn_id INTEGER,
                client_id TEXT,
                accepted_at INTEGER NOT NULL);",
        )?;
    }
    if version < 2 {
        // Indexes for the queries every generation runs: the start-of-drain
        // prune (idempotency by age), the restore (dead letters per
        // account) and the route lookup of `send` without an accountId.
        tx.execute_batch(
            "CREATE INDEX idempotency_created ON idempotency(created_at);
             CREATE INDEX inbound_route ON inbound(platform, group_id, user_id, received_at);
             CREATE INDEX dead_letter_account ON dead_letter(account_id);",
        )?;
    }
    if version < 3 {
        // Connections known as Bncr clients, so that a later generation
        // does not take a client connected across the restart for an
        // operator. Connection ids are unique across process lifetimes.
        tx.execute_batch("CREATE TABLE client_conns(conn_id INTEGER PRIMARY KEY);")?;
    }
    // Later versions append `if version < N { ... }` blocks here.
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

/// One queued outbound message as stored.
#[derive(Debug, Clone)]
pub(crate) struct OutboxRow {
    pub(crate) seq: i64,
    pub(crate) message_id: String,
    pub(crate) account_id: String,
    pub(crate) session_key: String,
    pub(crate) payload: Value,
    pub(crate) attempts: u32,
    pub(crate) created_at: i64,
}

/// A lease as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaseRow {
    pub(crate) account_id: String,
    pub(crate) lease_id: String,
    pub(crate) epoch: u64,
    pub(crate) conn_id: Option<u64>,
    pub(crate) client_id: Option<String>,
    pub(crate) accepted_at: i64,
}

/// An inbound message journaled but not yet handed on.
#[derive(Debug, Clone)]
pub(crate) struct InboundRow {
    pub(crate) key: InboundKey,
    pub(crate) payload: Value,
}

/// The dedupe key of an inbound message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InboundKey {
    pub(crate) account_id: String,
    pub(crate) platform: String,
    pub(crate) group_id: String,
    pub(crate) user_id: String,
    pub(crate) msg_id: String,
}

/// Everything restored when the store opens.
#[derive(Debug, Default)]
pub(crate) struct Restored {
    pub(crate) outbox: Vec<OutboxRow>,
    pub(crate) dead_letters: Vec<(String, u64)>,
    pub(crate) leases: Vec<LeaseRow>,
    pub(crate) inbound_pending: Vec<InboundRow>,
    /// Connections known as Bncr clients.
    pub(crate) client_conns: Vec<u64>,
}

fn parse_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

/// Read back outbox, dead-letter counts, leases and pending inbound.
pub(crate) fn restore(conn: &Connection) -> Result<Restored, StoreError> {
    let mut out = Restored::default();
    let mut st = conn.prepare(
        "SELECT seq, message_id, account_id, session_key, payload, attempts, created_at FROM outbox ORDER BY seq",
    )?;
    let rows = st.query_map([], |r| {
        Ok(OutboxRow {
            seq: r.get(0)?,
            message_id: r.get(1)?,
            account_id: r.get(2)?,
            session_key: r.get(3)?,
            payload: parse_json(&r.get::<_, String>(4)?),
            attempts: r.get(5)?,
            created_at: r.get(6)?,
        })
    })?;
    for row in rows {
        out.outbox.push(row?);
    }
    let mut st =
        conn.prepare("SELECT account_id, COUNT(*) FROM dead_letter GROUP BY account_id")?;
    let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))?;
    for row in rows {
        out.dead_letters.push(row?);
    }
    let mut st = conn.prepare(
        "SELECT account_id, lease_id, epoch, conn_id, client_id, accepted_at FROM leases",
    )?;
    let rows = st.query_map([], |r| {
        Ok(LeaseRow {
            account_id: r.get(0)?,
            lease_id: r.get(1)?,
            epoch: r.get(2)?,
            conn_id: r.get(3)?,
            client_id: r.get(4)?,
            accepted_at: r.get(5)?,
        })
    })?;
    for row in rows {
        out.leases.push(row?);
    }
    let mut st = conn.prepare(
        "SELECT account_id, platform, group_id, user_id, msg_id, payload FROM inbound
         WHERE handed_on = 0 ORDER BY received_at",
    )?;
    let rows = st.query_map([], |r| {
        Ok(InboundRow {
            key: InboundKey {
                account_id: r.get(0)?,
                platform: r.get(1)?,
                group_id: r.get(2)?,
                user_id: r.get(3)?,
                msg_id: r.get(4)?,
            },
            payload: parse_json(&r.get::<_, String>(5)?),
        })
    })?;
    for row in rows {
        out.inbound_pending.push(row?);
    }
    let mut st = conn.prepare("SELECT conn_id FROM client_conns")?;
    let rows = st.query_map([], |r| r.get::<_, u64>(0))?;
    for row in rows {
        out.client_conns.push(row?);
    }
    Ok(out)
}

/// Insert an outbound message unless its idempotency key is known. Returns
/// the message id and, when new, its row.
pub(crate) fn insert_outbox(
    conn: &mut Connection,
    idempotency_key: &str,
    row: OutboxRow,
) -> Result<(String, Option<OutboxRow>), StoreError> {
    let tx = conn.transaction()?;
    let existing: Option<String> = tx
        .query_row(
            "SELECT message_id FROM idempotency WHERE key = ?1",
            [idempotency_key],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(id) = existing {
        return Ok((id, None));
    }
    tx.execute(
        "INSERT INTO outbox(message_id, account_id, session_key, payload, attempts, created_at)
         VALUES (?1, ?2, ?3, ?4, 0, ?5)",
        params![
            row.message_id,
            row.account_id,
            row.session_key,
            row.payload.to_string(),
            row.created_at
        ],
    )?;
    let seq = tx.last_insert_rowid();
    tx.execute(
        "INSERT INTO idempotency(key, message_id, created_at) VALUES (?1, ?2, ?3)",
        params![idempotency_key, row.message_id, row.created_at],
    )?;
    tx.commit()?;
    let id = row.message_id.clone();
    Ok((id, Some(OutboxRow { seq, ..row })))
}

/// Move an outbox entry to the dead letters. Returns whether it was queued.
pub(crate) fn dead_letter(
    conn: &mut Connection,
    message_id: &str,
    reason: &str,
    error: Option<&str>,
    attempts: u32,
    now: i64,
) -> Result<bool, StoreError> {
    let tx = conn.transaction()?;
    let n = tx.execute(
        "INSERT OR REPLACE INTO dead_letter(message_id, seq, account_id, session_key, payload, attempts, reason, error, created_at, dead_at)
         SELECT message_id, seq, account_id, session_key, payload, MAX(attempts, ?2), ?3, COALESCE(?4, last_error), created_at, ?5
         FROM outbox WHERE message_id = ?1",
        params![message_id, attempts, reason, error, now],
    )?;
    tx.execute("DELETE FROM outbox WHERE message_id = ?1", [message_id])?;
    tx.commit()?;
    Ok(n > 0)
}

/// Journal an inbound message; `false` when its key was already journaled.
pub(crate) fn journal_inbound(
    conn: &mut Connection,
    key: &InboundKey,
    payload: &Value,
    now: i64,
) -> Result<bool, StoreError> {
    let n = conn.execute(
        "INSERT OR IGNORE INTO inbound(account_id, platform, group_id, user_id, msg_id, payload, received_at, handed_on)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0)",
        params![
            key.account_id,
            key.platform,
            key.group_id,
            key.user_id,
            key.msg_id,
            payload.to_string(),
            now
        ],
    )?;
    Ok(n == 1)
}

/// Mark a journaled inbound message handed on.
pub(crate) fn mark_handed_on(conn: &mut Connection, key: &InboundKey) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE inbound SET handed_on = 1 WHERE account_id = ?1 AND platform = ?2 AND group_id = ?3 AND user_id = ?4 AND msg_id = ?5",
        params![key.account_id, key.platform, key.group_id, key.user_id, key.msg_id],
    )?;
    Ok(())
}

/// The account that most recently received a message from this route.
pub(crate) fn account_for_route(
    conn: &Connection,
    platform: &str,
    group_id: &str,
    user_id: &str,
) -> Result<Option<String>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT account_id FROM inbound WHERE platform = ?1 AND group_id = ?2 AND user_id = ?3
             ORDER BY received_at DESC LIMIT 1",
            params![platform, group_id, user_id],
            |r| r.get(0),
        )
        .optional()?)
}

/// Drop dedupe and idempotency keys older than `cutoff` (unix ms).
pub(crate) fn prune_keys(conn: &mut Connection, cutoff: i64) -> Result<(usize, usize), StoreError> {
    let a = conn.execute(
        "DELETE FROM inbound WHERE handed_on = 1 AND received_at < ?1",
        [cutoff],
    )?;
    let b = conn.execute("DELETE FROM idempotency WHERE created_at < ?1", [cutoff])?;
    Ok((a, b))
}

/// Write or update an account's lease.
pub(crate) fn put_lease(conn: &mut Connection, lease: &LeaseRow) -> Result<(), StoreError> {
    conn.execute(
        "INSERT OR REPLACE INTO leases(account_id, lease_id, epoch, conn_id, client_id, accepted_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            lease.account_id,
            lease.lease_id,
            lease.epoch,
            lease.conn_id,
            lease.client_id,
            lease.accepted_at
        ],
    )?;
    Ok(())
}

/// Remember that a connection is a Bncr client (`known`) or forget it.
pub(crate) fn put_client_conn(
    conn: &mut Connection,
    conn_id: u64,
    known: bool,
) -> Result<(), StoreError> {
    if known {
        conn.execute(
            "INSERT OR IGNORE INTO client_conns(conn_id) VALUES (?1)",
            [conn_id],
        )?;
    } else {
        conn.execute("DELETE FROM client_conns WHERE conn_id = ?1", [conn_id])?;
    }
    Ok(())
}

/// Delete an account's lease.
pub(crate) fn delete_lease(conn: &mut Connection, account_id: &str) -> Result<(), StoreError> {
    conn.execute("DELETE FROM leases WHERE account_id = ?1", [account_id])?;
    Ok(())
}

/// Dead-letter filters shared by inspect and prune.
#[derive(Debug, Clone, Default)]
pub(crate) struct DeadFilter {
    pub(crate) account_id: Option<String>,
    pub(crate) reason: Option<String>,
    /// Dead-lettered before this unix-ms instant.
    pub(crate) before: Option<i64>,
}

impl DeadFilter {
    fn clause(&self) -> (String, Vec<rusqlite::types::Value>) {
        use rusqlite::types::Value as V;
        let mut sql = String::from(" WHERE 1=1");
        let mut args = Vec::new();
        if let Some(a) = &self.account_id {
            sql.push_str(" AND account_id = ?");
            args.push(V::Text(a.clone()));
        }
        if let Some(r) = &self.reason {
            sql.push_str(" AND reason = ?");
            args.push(V::Text(r.clone()));
        }
        if let Some(b) = self.before {
            sql.push_str(" AND dead_at < ?");
            args.push(V::Integer(b));
        }
        (sql, args)
    }
}

/// One dead letter, summarised for `bncr.deadLetter.inspect`.
pub(crate) fn inspect_dead(
    conn: &Connection,
    filter: &DeadFilter,
    limit: u64,
    offset: u64,
) -> Result<(u64, Vec<Value>), StoreError> {
    let (clause, args) = filter.clause();
    let total: u64 = conn.query_row(
        &format!("SELECT COUNT(*) FROM dead_letter{clause}"),
        rusqlite::params_from_iter(args.iter()),
        |r| r.get(0),
    )?;
    let mut st = conn.prepare(&format!(
        "SELECT message_id, account_id, session_key, payload, attempts, reason, error, created_at, dead_at
         FROM dead_letter{clause} ORDER BY dead_at, seq LIMIT {limit} OFFSET {offset}"
    ))?;
    let rows = st.query_map(rusqlite::params_from_iter(args.iter()), |r| {
        let payload = parse_json(&r.get::<_, String>(3)?);
        let mut preview: String = payload
            .get("msg")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .chars()
            .take(80)
            .collect();
        if preview.is_empty() {
            preview = payload
                .get("fileName")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .into();
        }
        Ok(serde_json::json!({
            "messageId": r.get::<_, String>(0)?,
            "accountId": r.get::<_, String>(1)?,
            "sessionKey": r.get::<_, String>(2)?,
            "route": {
                "platform": payload.get("platform"),
                "groupId": payload.get("groupId"),
                "userId": payload.get("userId"),
            },
            "type": payload.get("type"),
            "preview": preview,
            "attempts": r.get::<_, u32>(4)?,
            "reason": r.get::<_, String>(5)?,
            "error": r.get::<_, Option<String>>(6)?,
            "createdAt": r.get::<_, i64>(7)?,
            "deadAt": r.get::<_, i64>(8)?,
        }))
    })?;
    let mut entries = Vec::new();
    for row in rows {
        entries.push(row?);
    }
    Ok((total, entries))
}

/// Count (dry run) or delete dead letters matching `filter`; returns the
/// count and the affected accounts with their counts.
pub(crate) fn prune_dead(
    conn: &mut Connection,
    filter: &DeadFilter,
    dry_run: bool,
) -> Result<Vec<(String, u64)>, StoreError> {
    let (clause, args) = filter.clause();
    let tx = conn.transaction()?;
    let per_account = {
        let mut st = tx.prepare(&format!(
            "SELECT account_id, COUNT(*) FROM dead_letter{clause} GROUP BY account_id"
        ))?;
        let rows = st.query_map(rusqlite::params_from_iter(args.iter()), |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?))
        })?;
        rows.collect::<Result<Vec<_>, _>>()?
    };
    if !dry_run {
        tx.execute(
            &format!("DELETE FROM dead_letter{clause}"),
            rusqlite::params_from_iter(args.iter()),
        )?;
    }
    tx.commit()?;
    Ok(per_account)
}

#[cfg(test)]
mod crash_tests {
    use super::*;
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    const CHILD_ENV: &str = "BNCR_KILL9_CHILD";

    fn outbox_row(i: usize) -> OutboxRow {
        OutboxRow {
            seq: 0,
            message_id: format!("m{i}"),
            account_id: "Primary".into(),
            session_key: "s".into(),
            payload: serde_json::json!({"msg": format!("hello {i}")}),
            attempts: 0,
            created_at: 1,
        }
    }

    /// The child: write through the store like the bridge does, say so,
    /// then wait to be killed with the database open.
    fn child(path: PathBuf) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (store, _) = Store::open(&path, |c| restore(c)).await.unwrap();
            for i in 0..5 {
                store
                    .call(move |c| insert_outbox(c, &format!("k{i}"), outbox_row(i)))
                    .await
                    .unwrap();
            }
            let key = InboundKey {
                account_id: "Primary".into(),
                platform: "qq".into(),
                group_id: "0".into(),
                user_id: "1".into(),
                msg_id: "in-1".into(),
            };
            let fresh = store
                .call(move |c| journal_inbound(c, &key, &serde_json::json!({"msg": "hi"}), 1))
                .await
                .unwrap();
            assert!(fresh);
            let mut out = std::io::stdout().lock();
            std::io::Write::write_all(&mut out, b"bncr-kill9: written\n").unwrap();
            std::io::Write::flush(&mut out).unwrap();
            drop(out);
            loop {
                std::thread::sleep(std::time::Duration::from_secs(60));
            }
        });
    }

    /// Jobs still queued when `close` is called run, in order, before the
    /// database closes; work submitted after close is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn close_runs_queued_jobs_then_closes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bncr.sqlite3");
        let (store, _) = Store::open(&path, |c| restore(c)).await.unwrap();
        for i in 0..50 {
            store.enqueue("test insert", move |c| {
                insert_outbox(c, &format!("k{i}"), outbox_row(i)).map(|_| ())
            });
        }
        store.close().await;
        assert!(!store.is_open());
        assert!(store.call(|_| Ok(())).await.is_err());
        let (again, r) = Store::open(&path, |c| restore(c)).await.unwrap();
        let ids: Vec<_> = r.outbox.iter().map(|o| o.message_id.clone()).collect();
        let want: Vec<_> = (0..50).map(|i| format!("m{i}")).collect();
        assert_eq!(ids, want);
        again.close().await;
        // Close right after an enqueue, many times: the job always runs
        // before the database closes.
        for i in 50..150 {
            let (s, _) = Store::open(&path, |_| Ok(())).await.unwrap();
            s.enqueue("test insert", move |c| {
                insert_outbox(c, &format!("k{i}"), outbox_row(i)).map(|_| ())
            });
            s.close().await;
        }
        let (again, r) = Store::open(&path, |c| restore(c)).await.unwrap();
        assert_eq!(r.outbox.len(), 150);
        again.close().await;
        // Current schema: opening again is read-only.
        let c = Connection::open(&path).unwrap();
        let v: i64 = c
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        c.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(c);
        let err = Store::open(&path, |c| restore(c)).await.unwrap_err();
        assert!(err.0.contains("newer"), "{err}");
    }

    /// Open and close run on the blocking pool and are awaited, so a
    /// timeout around them (the host's service start and stop timeouts)
    /// fires while SQLite blocks; the blocked work finishes on its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn timeouts_around_open_and_close_fire_while_sqlite_blocks() {
        use std::sync::mpsc;
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bncr.sqlite3");
        let hold = Duration::from_secs(5);
        // Open: the restore step blocks until released (at most 5 s).
        let (release, blocked) = mpsc::channel::<()>();
        let open = Store::open(&path, move |_| {
            let _ = blocked.recv_timeout(hold);
            Ok(())
        });
        let r = tokio::time::timeout(Duration::from_millis(50), open).await;
        assert!(
            r.is_err(),
            "the timeout fired before the blocked open returned"
        );
        let _ = release.send(());
        // Close: a queued job blocks the connection until released.
        let (store, _) = Store::open(&path, |_| Ok(())).await.unwrap();
        let (release, blocked) = mpsc::channel::<()>();
        store.enqueue("block", move |_| {
            let _ = blocked.recv_timeout(hold);
            Ok(())
        });
        let r = tokio::time::timeout(Duration::from_millis(50), store.close()).await;
        assert!(
            r.is_err(),
            "the timeout fired before the blocked close returned"
        );
        let _ = release.send(());
        store.close().await;
    }

    /// A version-1 store (no indexes) is migrated to the current schema on
    /// open, keeping its rows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn version_1_store_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bncr.sqlite3");
        let (s, _) = Store::open(&path, |_| Ok(())).await.unwrap();
        s.call(|c| insert_outbox(c, "k0", outbox_row(0)).map(|_| ()))
            .await
            .unwrap();
        s.close().await;
        let c = Connection::open(&path).unwrap();
        c.execute_batch(
            "DROP INDEX idempotency_created; DROP INDEX inbound_route;
             DROP INDEX dead_letter_account; DROP TABLE client_conns;
             PRAGMA user_version = 1;",
        )
        .unwrap();
        drop(c);
        let (s, r) = Store::open(&path, |c| restore(c)).await.unwrap();
        assert_eq!(r.outbox.len(), 1);
        let (v, n) = s
            .call(|c| {
                let v: i64 = c.pragma_query_value(None, "user_version", |r| r.get(0))?;
                let n: i64 = c.query_row(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name IN
                     ('idempotency_created', 'inbound_route', 'dead_letter_account')",
                    [],
                    |r| r.get(0),
                )?;
                Ok((v, n))
            })
            .await
            .unwrap();
        assert_eq!((v, n), (SCHEMA_VERSION, 3));
        s.close().await;
    }

    /// Writes acknowledged by the store survive SIGKILL of the process that
    /// holds the database open: no clean close, no checkpoint, only the
    /// fsynced WAL.
    #[test]
    fn acknowledged_writes_survive_kill_9() {
        if let Some(path) = std::env::var_os(CHILD_ENV) {
            child(PathBuf::from(path));
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bncr.sqlite3");
        let mut proc = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::crash_tests::acknowledged_writes_survive_kill_9",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(proc.stdout.take().unwrap());
        let mut written = false;
        for line in out.lines() {
            if line.unwrap().contains("bncr-kill9: written") {
                written = true;
                break;
            }
        }
        proc.kill().unwrap(); // SIGKILL
        let _ = proc.wait();
        assert!(written, "child did not report its writes");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        rt.block_on(async {
            let (store, r) = Store::open(&path, |c| restore(c)).await.unwrap();
            let ids: Vec<_> = r.outbox.iter().map(|o| o.message_id.as_str()).collect();
            assert_eq!(ids, ["m0", "m1", "m2", "m3", "m4"]);
            assert_eq!(r.inbound_pending.len(), 1);
            assert_eq!(r.inbound_pending[0].key.msg_id, "in-1");
            store.close().await;
        });
    }
}
