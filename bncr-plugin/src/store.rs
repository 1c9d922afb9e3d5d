//! The durable store: one SQLite database owned by a dedicated thread.
//!
//! Every query runs on the store thread, so no async worker ever blocks on
//! SQLite. Jobs run in the order they were submitted; fire-and-forget writes
//! ([`Store::enqueue`]) therefore land before any later awaited job.

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc;
use std::thread::JoinHandle;

/// The newest schema version this code knows.
pub(crate) const SCHEMA_VERSION: i64 = 1;

type Job = Box<dyn FnOnce(&mut Connection) + Send + 'static>;

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

/// Handle to the store thread. Closing it finishes queued jobs, checkpoints
/// the WAL and closes the database.
#[derive(Debug)]
pub(crate) struct Store {
    path: PathBuf,
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Store {
    /// Open (creating and migrating) the database at `path` and start its
    /// thread. Blocking: call from a blocking context.
    pub(crate) fn open(path: &Path) -> Result<(Store, Connection), StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError(format!("{}: {e}", dir.display())))?;
        }
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        migrate(&mut conn)?;
        // The returned connection is used once for restoring state, then
        // handed to the thread by `spawn`.
        Ok((
            Store {
                path: path.to_path_buf(),
                tx: Mutex::new(None),
                thread: Mutex::new(None),
            },
            conn,
        ))
    }

    /// Start the store thread that owns `conn`.
    pub(crate) fn spawn(&self, mut conn: Connection) -> Result<(), StoreError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let handle = std::thread::Builder::new()
            .name("bncr-store".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job(&mut conn);
                }
                let _ = conn.pragma_update(None, "wal_checkpoint", "TRUNCATE");
                if let Err((_, e)) = conn.close() {
                    tracing::warn!(error = %e, "bncr store close failed");
                }
            })
            .map_err(|e| StoreError(format!("store thread: {e}")))?;
        *lock(&self.tx) = Some(tx);
        *lock(&self.thread) = Some(handle);
        Ok(())
    }

    /// The database file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the store accepts work.
    pub(crate) fn is_open(&self) -> bool {
        lock(&self.tx).is_some()
    }

    /// Run `f` on the store thread and wait for its result.
    pub(crate) async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |c| {
            let _ = tx.send(f(c));
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
        let job: Job = Box::new(move |c| {
            if let Err(e) = f(c) {
                tracing::warn!(error = %e, what, "bncr store write failed");
            }
        });
        if self.submit(job).is_err() {
            tracing::debug!(what, "bncr store closed; write skipped");
        }
    }

    fn submit(&self, job: Job) -> Result<(), StoreError> {
        let guard = lock(&self.tx);
        let tx = guard
            .as_ref()
            .ok_or_else(|| StoreError("store is not open".into()))?;
        tx.send(job)
            .map_err(|_| StoreError("store thread has exited".into()))
    }

    /// Stop accepting work, let queued jobs finish, close the database.
    /// Blocking: call from a blocking context. Idempotent.
    pub(crate) fn close(&self) {
        drop(lock(&self.tx).take());
        if let Some(h) = lock(&self.thread).take() {
            let _ = h.join();
        }
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError(format!(
            "store schema version {version} is newer than this plugin's {SCHEMA_VERSION}"
        )));
    }
    let tx = conn.transaction()?;
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
