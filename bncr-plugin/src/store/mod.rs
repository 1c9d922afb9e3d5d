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
//! One file, one open store at a time: an open waits (up to
//! [`PREVIOUS_CLOSE_WAIT`]) until the previous store on the same file ran
//! its queued jobs and closed, even if the stop that closed it returned
//! first ([`OpenGate`]). So a new generation never restores state that an
//! old generation's late jobs change afterwards. Past that wait the open
//! goes on with a turn of its own: the newest store always holds the
//! file's turn, so the open after it waits for it.
//!
//! Durability: `synchronous=FULL` in WAL mode, so a commit is fsynced
//! before its caller hears back (`send` returns, `accepted:true`) and
//! survives kill -9 and power loss. FULL is kept because the restart path
//! commits nothing: an open at the current schema only reads, and close
//! does not checkpoint. NORMAL would only speed up per-message writes, at
//! the price of the last commits on power loss.

use rusqlite::Connection;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

mod queries;
mod schema;

pub(crate) use queries::*;
use schema::migrate;

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

/// How long an open waits for the previous store on the same file to close
/// before it opens anyway (and warns). Well under the host's default service
/// start timeout (10 s); the previous store's jobs are each bounded by
/// SQLite's busy timeout (5 s).
pub(crate) const PREVIOUS_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Which database files have a store open, so that an open waits for the
/// previous store on the same file to close. Kept by the plugin's factory,
/// which outlives generations (nothing process-global): each generation's
/// bridge gets a clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct OpenGate(Arc<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>>);

/// A file's turn, held by its store until the database is closed.
type FileTurn = tokio::sync::OwnedMutexGuard<()>;

impl OpenGate {
    /// Whether a store holds `path`'s turn (is open, or still closing).
    #[cfg(test)]
    pub(crate) fn is_taken(&self, path: &Path) -> bool {
        lock(&self.0)
            .get(path)
            .is_some_and(|file| file.try_lock().is_err())
    }

    /// Wait (at most `wait`) for `path`'s turn. If the previous store is
    /// still closing after `wait`, the file gets a new turn, taken by this
    /// open (`false`): the newest store always holds the file's turn, so
    /// the open after it waits for it (and no longer for the old one).
    async fn turn(&self, path: &Path, wait: std::time::Duration) -> (FileTurn, bool) {
        let file = {
            let mut files = lock(&self.0);
            // Forget files nobody holds or waits for (the map's own
            // reference is the only one left).
            files.retain(|_, f| Arc::strong_count(f) > 1);
            files.entry(path.to_path_buf()).or_default().clone()
        };
        if let Ok(turn) = file.clone().try_lock_owned() {
            return (turn, true);
        }
        if let Ok(turn) = tokio::time::timeout(wait, file.lock_owned()).await {
            return (turn, true);
        }
        let fresh = Arc::new(tokio::sync::Mutex::new(()));
        let turn = fresh.clone().try_lock_owned().expect("a new lock is free");
        lock(&self.0).insert(path.to_path_buf(), fresh);
        (turn, false)
    }
}

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

/// What the runner and the handle share.
///
/// Locks: `conn` is held by the runner while it runs a job, and a job may
/// take the bridge's state lock (see the bridge's lock order); `queue` is
/// a leaf: nothing else is locked, nor waited for, while it is held (a
/// closer waits on `idle`, which releases it). So a thread holding the
/// bridge's state may always submit (or be refused) at once.
///
/// Only the runner uses the connection while it runs; a closer takes it
/// only once no runner is left (and none can start: the queue is closed).
struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the runner: a job was queued or the store closed.
    ready: Condvar,
    /// Wakes closers: the runner returned.
    idle: Condvar,
    conn: Mutex<Option<Connection>>,
    /// This store's turn on its file; released once the database is
    /// closed (declared after `conn`, so dropped after it too).
    turn: Mutex<Option<FileTurn>>,
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
    ///
    /// Waits first (at most [`PREVIOUS_CLOSE_WAIT`]) for the previous store
    /// that `gate` saw on `path` to close.
    pub(crate) async fn open<R, F>(
        gate: &OpenGate,
        path: &Path,
        init: F,
    ) -> Result<(Store, R), StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        Self::open_waiting(gate, path, PREVIOUS_CLOSE_WAIT, init).await
    }

    /// [`Store::open`], waiting at most `wait` for the previous store.
    async fn open_waiting<R, F>(
        gate: &OpenGate,
        path: &Path,
        wait: std::time::Duration,
        init: F,
    ) -> Result<(Store, R), StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let (turn, in_turn) = gate.turn(path, wait).await;
        if !in_turn {
            tracing::warn!(
                path = %path.display(),
                wait_ms = wait.as_millis() as u64,
                "bncr store: the previous generation's store is still finishing its writes; opening anyway"
            );
        }
        let db = path.to_path_buf();
        // The turn goes with the blocking work and comes back with its
        // result: if this future is cancelled (the host's start timeout)
        // while SQLite works, the turn is released only when that work
        // ends (after the connection it opened closes).
        let (conn, r, read_only, turn) = blocking(move || {
            let turn = turn;
            let mut conn = open_connection(&db)?;
            let r = init(&mut conn)?;
            let read_only = conn.is_readonly(rusqlite::MAIN_DB)?;
            Ok::<_, StoreError>((conn, r, read_only, turn))
        })
        .await??;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            idle: Condvar::new(),
            conn: Mutex::new(Some(conn)),
            turn: Mutex::new(Some(turn)),
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
        self.queue_call(f)?.wait().await
    }

    /// Queue `f` now and hear its result later: once this returns, the job
    /// runs even if the store starts closing before its result is awaited.
    pub(crate) fn queue_call<R, F>(&self, f: F) -> Result<Answer<R>, StoreError>
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
        Ok(Answer(rx))
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

    /// Stop accepting work, at once: later jobs are refused; the jobs
    /// already queued still run, then the database closes (see
    /// [`Store::close`]). Never blocks. Idempotent.
    pub(crate) fn stop_accepting(&self) {
        lock(&self.shared.queue).closed = true;
        self.shared.ready.notify_one();
    }

    /// Stop accepting work, run the jobs still queued, close the database.
    /// Waits on the blocking pool (for the runner to finish the queue); the
    /// caller awaits it, so a timeout around `close` can fire, and the
    /// queued jobs still run and the database still closes after it
    /// fired. When this returns the database is closed. Idempotent.
    pub(crate) async fn close(&self) {
        self.begin_close().wait().await;
    }

    /// Stop accepting work and begin closing on the blocking pool, now:
    /// the queued jobs run and the database closes whether or not the
    /// returned [`Closing`] is awaited. Never blocks; needs no runtime
    /// context (for a drop guard).
    pub(crate) fn begin_close(&self) -> Closing {
        self.stop_accepting();
        let shared = self.shared.clone();
        Closing(
            self.shared
                .runtime
                .spawn_blocking(move || shared.close_now()),
        )
    }
}

/// A close begun with [`Store::begin_close`].
#[derive(Debug)]
pub(crate) struct Closing(tokio::task::JoinHandle<()>);

impl Closing {
    /// Wait until the database is closed. Cancellable: the close goes on.
    pub(crate) async fn wait(self) {
        if let Err(e) = self.0.await {
            tracing::warn!(error = %e, "bncr store close task failed");
        }
    }
}

/// The result of a job queued with [`Store::queue_call`].
#[derive(Debug)]
pub(crate) struct Answer<R>(tokio::sync::oneshot::Receiver<Result<R, StoreError>>);

impl<R> Answer<R> {
    /// Wait for the job's result.
    pub(crate) async fn wait(self) -> Result<R, StoreError> {
        self.0
            .await
            .map_err(|_| StoreError("store closed before the job ran".into()))?
    }
}

impl Shared {
    /// Wait until no runner is left (it runs the queued jobs and closes the
    /// database itself), then close the database if no runner did. The
    /// queue is closed, so no runner starts after this.
    fn close_now(&self) {
        let mut q = lock(&self.queue);
        q.closed = true;
        self.ready.notify_one();
        while q.running {
            q = self.idle.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        drop(q);
        self.close_database();
    }

    /// Close the database if it is still open, then release the file's
    /// turn (the next store on the file may open).
    fn close_database(&self) {
        let conn = lock(&self.conn).take();
        if let Some(conn) = conn {
            close_connection(conn);
        }
        drop(lock(&self.turn).take());
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
/// drained, close the database, then tell waiting closers. No lock is held
/// while another is taken: `queue` is released before `conn` is locked.
fn serve(shared: &Shared) {
    let mut q = lock(&shared.queue);
    loop {
        if let Some(job) = q.jobs.pop_front() {
            drop(q);
            let mut c = lock(&shared.conn);
            let wrote = c.as_mut().is_some_and(|conn| {
                let before = conn.total_changes();
                shared.run(job, conn);
                conn.total_changes() != before
            });
            drop(c);
            q = lock(&shared.queue);
            q.dirty |= wrote;
            continue;
        }
        if q.closed {
            drop(q);
            shared.close_database();
            lock(&shared.queue).running = false;
            shared.idle.notify_all();
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
            let gate = OpenGate::default();
            let (store, _) = Store::open(&gate, &path, |c| restore(c)).await.unwrap();
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
        let gate = OpenGate::default();
        let (store, _) = Store::open(&gate, &path, |c| restore(c)).await.unwrap();
        for i in 0..50 {
            store.enqueue("test insert", move |c| {
                insert_outbox(c, &format!("k{i}"), outbox_row(i)).map(|_| ())
            });
        }
        store.close().await;
        assert!(!store.is_open());
        assert!(store.call(|_| Ok(())).await.is_err());
        let (again, r) = Store::open(&gate, &path, |c| restore(c)).await.unwrap();
        let ids: Vec<_> = r.outbox.iter().map(|o| o.message_id.clone()).collect();
        let want: Vec<_> = (0..50).map(|i| format!("m{i}")).collect();
        assert_eq!(ids, want);
        again.close().await;
        // Close right after an enqueue, many times: the job always runs
        // before the database closes.
        for i in 50..150 {
            let (s, _) = Store::open(&gate, &path, |_| Ok(())).await.unwrap();
            s.enqueue("test insert", move |c| {
                insert_outbox(c, &format!("k{i}"), outbox_row(i)).map(|_| ())
            });
            s.close().await;
        }
        let (again, r) = Store::open(&gate, &path, |c| restore(c)).await.unwrap();
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
        let err = Store::open(&gate, &path, |c| restore(c)).await.unwrap_err();
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
        let gate = OpenGate::default();
        let hold = Duration::from_secs(5);
        // Open: the restore step blocks until released (at most 5 s).
        let (release, blocked) = mpsc::channel::<()>();
        let open = Store::open(&gate, &path, move |_| {
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
        let (store, _) = Store::open(&gate, &path, |_| Ok(())).await.unwrap();
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

    /// A close waiting for the job in hand never holds the queue lock, so a
    /// thread holding another lock the job needs (the bridge's state) can
    /// still submit (and be refused): the three of them finish. Before,
    /// the closer held the queue while it waited for the connection, and
    /// the job, the submitter and the closer waited for each other forever.
    #[test]
    fn a_close_waiting_for_a_job_never_blocks_a_submitter() {
        use std::sync::mpsc;
        use std::time::Duration;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let finished = rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("bncr.sqlite3");
            let (store, _) = Store::open(&OpenGate::default(), &path, |_| Ok(()))
                .await
                .unwrap();
            let store = Arc::new(store);
            // Stands for the bridge's state lock.
            let outside = Arc::new(Mutex::new(()));
            let (in_job, job_started) = mpsc::channel::<()>();
            let (go, job_waits) = mpsc::channel::<()>();
            let o = outside.clone();
            store.enqueue("waits, then takes the outside lock", move |_| {
                in_job.send(()).unwrap();
                let _ = job_waits.recv();
                drop(lock(&o));
                Ok(())
            });
            job_started.recv_timeout(Duration::from_secs(10)).unwrap();
            let closing = tokio::spawn({
                let store = store.clone();
                async move { store.close().await }
            });
            // The close stops the queue on its first step, then waits for
            // the job in hand: the submitter below comes after that.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while store.is_open() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the close began within 10 s"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let (done, submitted) = mpsc::channel::<bool>();
            std::thread::spawn({
                let store = store.clone();
                move || {
                    let _held = lock(&outside);
                    go.send(()).unwrap();
                    let refused = store.queue_call(|_| Ok(())).is_err();
                    let _ = done.send(refused);
                }
            });
            let all = async {
                let refused = tokio::task::spawn_blocking(move || submitted.recv())
                    .await
                    .unwrap();
                closing.await.unwrap();
                refused
            };
            tokio::time::timeout(Duration::from_secs(5), all).await
        });
        // A deadlocked runtime cannot be dropped: leave its threads.
        rt.shutdown_background();
        let refused =
            finished.expect("the job, the submitter and the close all finished (no deadlock)");
        assert_eq!(refused, Ok(true), "a job submitted after close is refused");
    }

    /// An open waits for the previous store on the same file to run its
    /// queued jobs and close, even when the close was begun and its caller
    /// gave up waiting (a stop past its budget): the new store restores
    /// what the old one's late jobs wrote.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_open_waits_for_the_previous_store_on_the_file_to_close() {
        use std::sync::mpsc;
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bncr.sqlite3");
        let gate = OpenGate::default();
        let (old, _) = Store::open(&gate, &path, |c| restore(c)).await.unwrap();
        let (release, held) = mpsc::channel::<()>();
        old.enqueue("held by the test", move |_| {
            let _ = held.recv();
            Ok(())
        });
        old.enqueue("late write", |c| {
            insert_outbox(c, "k-late", outbox_row(7)).map(|_| ())
        });
        let gave_up = tokio::time::timeout(Duration::from_millis(100), old.close()).await;
        assert!(gave_up.is_err(), "the close waits for the held job");
        assert!(!old.is_open(), "but the store took no more work");
        let opening = tokio::spawn({
            let (gate, path) = (gate.clone(), path.clone());
            async move { Store::open(&gate, &path, |c| restore(c)).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!opening.is_finished(), "the open waits for the old store");
        release.send(()).unwrap();
        let (new, r) = tokio::time::timeout(Duration::from_secs(10), opening)
            .await
            .expect("the open goes on once the old store closed")
            .unwrap()
            .unwrap();
        let ids: Vec<_> = r.outbox.iter().map(|o| o.message_id.as_str()).collect();
        assert_eq!(ids, ["m7"], "the old store's late write is restored");
        new.close().await;
        // A store open on one file holds up no open of another.
        let (b, _) = Store::open(&gate, &path, |_| Ok(())).await.unwrap();
        let other = dir.path().join("other.sqlite3");
        let a = tokio::time::timeout(
            Duration::from_secs(4),
            Store::open(&gate, &other, |_| Ok(())),
        )
        .await
        .expect("another file's open does not wait")
        .unwrap()
        .0;
        a.close().await;
        b.close().await;
    }

    /// An open cancelled while its restore still runs on the blocking pool
    /// (the host's start timeout) keeps the file's turn until that work
    /// ends: the next open restores what the cancelled one wrote.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_open_keeps_the_file_turn_until_its_restore_ends() {
        use std::sync::mpsc;
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bncr.sqlite3");
        let gate = OpenGate::default();
        let (in_init, init_started) = mpsc::channel::<()>();
        let (release, init_waits) = mpsc::channel::<()>();
        let cancelled = tokio::spawn({
            let (gate, path) = (gate.clone(), path.clone());
            async move {
                Store::open(&gate, &path, move |c| {
                    in_init.send(()).unwrap();
                    let _ = init_waits.recv();
                    insert_outbox(c, "k-slow", outbox_row(3)).map(|_| ())
                })
                .await
            }
        });
        tokio::task::spawn_blocking(move || init_started.recv_timeout(Duration::from_secs(10)))
            .await
            .unwrap()
            .expect("the first open reached its restore");
        cancelled.abort();
        assert!(cancelled.await.unwrap_err().is_cancelled());
        let opening = tokio::spawn({
            let (gate, path) = (gate.clone(), path.clone());
            async move { Store::open(&gate, &path, |c| restore(c)).await }
        });
        // Give an open that did not wait the chance to finish first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !opening.is_finished(),
            "the open waits for the cancelled one"
        );
        release.send(()).unwrap();
        let (new, r) = tokio::time::timeout(Duration::from_secs(10), opening)
            .await
            .expect("the open goes on once the cancelled restore ended")
            .unwrap()
            .unwrap();
        let ids: Vec<_> = r.outbox.iter().map(|o| o.message_id.as_str()).collect();
        assert_eq!(ids, ["m3"], "the cancelled open's write is restored");
        new.close().await;
    }

    /// An open that stopped waiting for a previous store still closing
    /// holds the file's turn itself: the open after it waits for it, not
    /// for the old store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_open_past_its_wait_holds_the_file_turn_for_the_next_open() {
        use std::sync::mpsc;
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bncr.sqlite3");
        let gate = OpenGate::default();
        let (old, _) = Store::open(&gate, &path, |_| Ok(())).await.unwrap();
        let (release, held) = mpsc::channel::<()>();
        old.enqueue("held by the test", move |_| {
            let _ = held.recv();
            Ok(())
        });
        let old_closing = old.begin_close();
        let (newest, _) = Store::open_waiting(&gate, &path, Duration::from_millis(100), |_| Ok(()))
            .await
            .unwrap();
        release.send(()).unwrap();
        old_closing.wait().await;
        assert!(
            gate.is_taken(&path),
            "the newest store holds the file after the old one closed"
        );
        let opening = tokio::spawn({
            let (gate, path) = (gate.clone(), path.clone());
            async move { Store::open(&gate, &path, |_| Ok(())).await }
        });
        // Give an open that did not wait the chance to finish first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !opening.is_finished(),
            "the next open waits for the newest store"
        );
        newest.close().await;
        let (next, _) = tokio::time::timeout(Duration::from_secs(4), opening)
            .await
            .expect("the next open goes on once the newest store closed")
            .unwrap()
            .unwrap();
        next.close().await;
        assert!(!gate.is_taken(&path), "no turn is left once all closed");
    }

    /// A version-1 store (no indexes) is migrated to the current schema on
    /// open, keeping its rows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn version_1_store_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bncr.sqlite3");
        let gate = OpenGate::default();
        let (s, _) = Store::open(&gate, &path, |_| Ok(())).await.unwrap();
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
        let (s, r) = Store::open(&gate, &path, |c| restore(c)).await.unwrap();
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
            let gate = OpenGate::default();
            let (store, r) = Store::open(&gate, &path, |c| restore(c)).await.unwrap();
            let ids: Vec<_> = r.outbox.iter().map(|o| o.message_id.as_str()).collect();
            assert_eq!(ids, ["m0", "m1", "m2", "m3", "m4"]);
            assert_eq!(r.inbound_pending.len(), 1);
            assert_eq!(r.inbound_pending[0].key.msg_id, "in-1");
            store.close().await;
        });
    }
}
