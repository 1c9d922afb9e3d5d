//! One plugin OS process: spawn, the stdin writer, the stdout reader, the
//! stderr forwarder and the reaper, and requests with deadlines.

use crate::lines::{LineRead, read_line};
use crate::stderr::stderr_loop;
use crate::{Limits, SpawnSpec, StderrTail, lock};
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id as WaitId, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;
use plugin_protocol::{
    self as proto, CancelParams, EmitParams, ErrorObject, Id, LogParams, Message, MessageKind,
    method,
};
use serde::Serialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

/// How a process ended.
#[derive(Debug, Clone)]
pub(crate) struct Ended {
    /// `exit status 3`, `killed by signal 9 (SIGKILL)`.
    pub(crate) status: String,
    /// Why the host killed it, when it broke the protocol.
    pub(crate) violation: Option<String>,
    /// The host was stopping it on purpose.
    pub(crate) stopping: bool,
}

impl Ended {
    /// One line for logs and errors.
    pub(crate) fn describe(&self) -> String {
        match &self.violation {
            Some(v) => format!("{v} (process {})", self.status),
            None => self.status.clone(),
        }
    }
}

/// Why a request to the process got no result.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The process answered with a JSON-RPC error.
    Rpc(ErrorObject),
    /// The process ended before answering.
    Ended(Arc<Ended>),
    /// Too many calls in flight, or the process does not read its stdin.
    Busy,
    /// The request would exceed the maximum line length.
    TooLarge(usize),
    /// No answer before the deadline (`cancel` was sent).
    Timeout(Duration),
}

enum Out {
    Line(String),
    Close,
}

type Reply = Result<Box<RawValue>, Failure>;

/// What the process may ask of the host: deliver an event.
pub(crate) type EmitFn = Arc<dyn Fn(EmitParams) -> Result<usize, String> + Send + Sync>;
/// Told once when the process has ended and been reaped.
pub(crate) type ExitFn = Box<dyn FnOnce(u32, Arc<Ended>) + Send>;

/// A running plugin process.
pub(crate) struct Process {
    pid: u32,
    plugin: Arc<str>,
    generation: u64,
    out: mpsc::Sender<Out>,
    pending: Mutex<HashMap<Id, oneshot::Sender<Reply>>>,
    next_id: AtomicU64,
    calls: AtomicUsize,
    limits: Limits,
    violation: Mutex<Option<String>>,
    stopping: std::sync::atomic::AtomicBool,
    /// A liveness `ping` is in flight.
    pub(crate) probing: std::sync::atomic::AtomicBool,
    /// Set (under the lock) once the process is about to be reaped: its pid
    /// and process group id may then belong to someone else, so no signal
    /// is sent any more.
    reaped: Mutex<bool>,
    ended: watch::Receiver<Option<Arc<Ended>>>,
}

impl fmt::Debug for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Process")
            .field("plugin", &self.plugin)
            .field("pid", &self.pid)
            .finish()
    }
}

/// Everything but `PATH`-like basics is withheld from plugins.
const ENV_ALLOW: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
    "TZ",
    "TERM",
];

/// What the host tells every plugin process about itself, in
/// [`crate::HOST_ENV`] order.
fn host_env(spec: &SpawnSpec, tmp_dir: &std::path::Path) -> [(&'static str, OsString); 4] {
    let [tmp, id, generation, state] = crate::HOST_ENV;
    [
        (tmp, tmp_dir.as_os_str().to_owned()),
        (id, spec.plugin_id.clone().into()),
        (generation, spec.generation.to_string().into()),
        (state, spec.state_dir.as_os_str().to_owned()),
    ]
}

impl Process {
    /// Spawn the process in its own process group, with the allowed
    /// environment, in the plugin's directory.
    pub(crate) fn spawn(
        spec: &SpawnSpec,
        tmp_dir: &std::path::Path,
        tail: Arc<StderrTail>,
        emit: EmitFn,
        on_exit: ExitFn,
    ) -> std::io::Result<Arc<Process>> {
        let (program, args) = spec
            .argv
            .split_first()
            .ok_or_else(|| std::io::Error::other("empty command"))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(&spec.dir)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        for key in ENV_ALLOW {
            if let Some(v) = std::env::var_os(key) {
                cmd.env(key, v);
            }
        }
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        // Last, so the configured environment cannot override what the
        // host tells the plugin about itself.
        for (k, v) in host_env(spec, tmp_dir) {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let pid = child.id().unwrap_or(0);
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let (out_tx, out_rx) = mpsc::channel(spec.limits.max_calls_in_flight * 2 + 64);
        let (ended_tx, ended_rx) = watch::channel(None);
        let proc = Arc::new(Process {
            pid,
            plugin: spec.plugin_id.as_str().into(),
            generation: spec.generation,
            out: out_tx,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            calls: AtomicUsize::new(0),
            limits: spec.limits.clone(),
            violation: Mutex::new(None),
            stopping: std::sync::atomic::AtomicBool::new(false),
            probing: std::sync::atomic::AtomicBool::new(false),
            reaped: Mutex::new(false),
            ended: ended_rx,
        });
        tokio::spawn(write_loop(stdin, out_rx));
        let reader = tokio::spawn(read_loop(proc.clone(), stdout, emit));
        let errors = tokio::spawn(stderr_loop(
            spec.plugin_id.clone(),
            spec.generation,
            pid,
            stderr,
            tail,
        ));
        tokio::spawn(reap(
            proc.clone(),
            child,
            [reader, errors],
            ended_tx,
            on_exit,
        ));
        debug!(plugin = %spec.plugin_id, generation = spec.generation, pid, "plugin process spawned");
        Ok(proc)
    }

    /// The OS process id (also its process group id).
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// How it ended, once it has.
    pub(crate) fn ended(&self) -> Option<Arc<Ended>> {
        self.ended.borrow().clone()
    }

    /// Send a notification; `false` if the process does not keep up.
    pub(crate) fn notify(&self, method: &str, params: &impl Serialize) -> bool {
        self.out
            .try_send(Out::Line(proto::notification_line(method, params)))
            .is_ok()
    }

    /// Send a request and wait for its answer until `deadline`. `call`
    /// requests count against the in-flight limit; when the caller stops
    /// waiting (deadline or dropped future), `cancel` is sent.
    pub(crate) async fn request(
        &self,
        method: &str,
        params: &impl Serialize,
        deadline: Duration,
    ) -> Reply {
        let is_call = method == method::CALL;
        let _slot = if is_call {
            let n = self.calls.fetch_add(1, Ordering::AcqRel);
            let slot = CallSlot(&self.calls);
            if n >= self.limits.max_calls_in_flight {
                return Err(Failure::Busy);
            }
            Some(slot)
        } else {
            None
        };
        if let Some(e) = self.ended() {
            return Err(Failure::Ended(e));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let line = proto::request_line(id, method, params);
        if line.len() > self.limits.max_line_bytes {
            return Err(Failure::TooLarge(line.len()));
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let mut guard = PendingGuard {
            proc: self,
            id,
            cancel: is_call,
        };
        // The reaper publishes the end before it answers what is pending: a
        // request inserted after that answer round sees the end here.
        if let Some(e) = self.ended() {
            guard.cancel = false;
            return Err(Failure::Ended(e));
        }
        if self.out.try_send(Out::Line(line)).is_err() {
            guard.cancel = false;
            return Err(Failure::Busy);
        }
        // The reaper answers every pending request once the process ended,
        // so a dropped sender cannot happen; map it to the end anyway.
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(reply)) => {
                guard.cancel = false;
                reply
            }
            Ok(Err(_)) => {
                guard.cancel = false;
                Err(Failure::Ended(self.ended().unwrap_or_else(|| {
                    Arc::new(Ended {
                        status: "unknown".into(),
                        violation: None,
                        stopping: false,
                    })
                })))
            }
            Err(_) => Err(Failure::Timeout(deadline)),
        }
    }

    /// Fail the process for breaking the protocol: remember why and kill its
    /// process group. The reaper reports it as a crash with this reason.
    pub(crate) fn violate(&self, why: String) {
        error!(plugin = %self.plugin, generation = self.generation, pid = self.pid, "{why}");
        lock(&self.violation).get_or_insert(why);
        self.signal(Signal::SIGKILL);
    }

    fn signal(&self, sig: Signal) {
        // Held while signalling: the reaper cannot reap (and free the pid)
        // in between the check and the kill.
        let reaped = lock(&self.reaped);
        if self.pid > 0 && !*reaped {
            let _ = killpg(Pid::from_raw(self.pid as i32), sig);
        }
    }

    /// Stop for good: `shutdown`, stdin closed, wait `grace`; then SIGTERM to
    /// the process group, wait `term_grace`; then SIGKILL. Returns once the
    /// process has been reaped.
    pub(crate) async fn shutdown(&self, grace: Duration, term_grace: Duration) -> Arc<Ended> {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.notify(method::SHUTDOWN, &serde_json::json!({}));
        let _ = self.out.try_send(Out::Close);
        let mut ended = self.ended.clone();
        if let Ok(Ok(e)) = tokio::time::timeout(grace, ended.wait_for(Option::is_some)).await {
            let e = e.clone().expect("some");
            // Children the plugin left behind in its group go too.
            self.signal(Signal::SIGKILL);
            return e;
        }
        warn!(plugin = %self.plugin, generation = self.generation, pid = self.pid, grace_ms = grace.as_millis() as u64, "plugin process did not exit after shutdown; sending SIGTERM");
        self.signal(Signal::SIGTERM);
        if let Ok(Ok(e)) = tokio::time::timeout(term_grace, ended.wait_for(Option::is_some)).await {
            let e = e.clone().expect("some");
            self.signal(Signal::SIGKILL);
            return e;
        }
        warn!(plugin = %self.plugin, generation = self.generation, pid = self.pid, "plugin process ignored SIGTERM; sending SIGKILL");
        self.signal(Signal::SIGKILL);
        let e = ended
            .wait_for(Option::is_some)
            .await
            .map(|e| e.clone().expect("some"));
        e.unwrap_or_else(|_| {
            Arc::new(Ended {
                status: "killed".into(),
                violation: None,
                stopping: true,
            })
        })
    }

    /// Kill the process group now, without waiting (for `Drop`).
    pub(crate) fn kill_now(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.signal(Signal::SIGKILL);
    }
}

struct CallSlot<'a>(&'a AtomicUsize);

impl Drop for CallSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct PendingGuard<'a> {
    proc: &'a Process,
    id: Id,
    cancel: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let removed = lock(&self.proc.pending).remove(&self.id).is_some();
        if removed && self.cancel {
            let _ = self
                .proc
                .notify(method::CANCEL, &CancelParams { id: self.id });
        }
    }
}

async fn write_loop(stdin: ChildStdin, mut rx: mpsc::Receiver<Out>) {
    let mut w = BufWriter::new(stdin);
    'outer: while let Some(msg) = rx.recv().await {
        let mut next = Some(msg);
        // Everything already queued goes out with one flush.
        while let Some(m) = next.take() {
            match m {
                Out::Line(l) => {
                    if w.write_all(l.as_bytes()).await.is_err() {
                        break 'outer;
                    }
                }
                Out::Close => {
                    let _ = w.flush().await;
                    break 'outer;
                }
            }
            next = rx.try_recv().ok();
        }
        if w.flush().await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
}

fn preview(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut s: String = text.chars().take(120).collect();
    if text.chars().count() > 120 {
        s.push('…');
    }
    s
}

async fn read_loop(proc: Arc<Process>, stdout: ChildStdout, emit: EmitFn) {
    let mut r = BufReader::with_capacity(64 * 1024, stdout);
    let mut buf = Vec::with_capacity(4096);
    loop {
        let max = proc.limits.max_line_bytes;
        match read_line(&mut r, &mut buf, max, false).await {
            Ok(LineRead::Line) if buf.is_empty() => continue,
            Ok(LineRead::Line) => {}
            Ok(LineRead::TooLong) => {
                proc.violate(format!(
                    "plugin `{}` wrote a line longer than {max} bytes to stdout; stdout carries only protocol messages (logs go to stderr)",
                    proc.plugin
                ));
                return;
            }
            Ok(LineRead::Eof) | Err(_) => return,
        }
        let parsed = std::str::from_utf8(&buf)
            .ok()
            .and_then(|t| Message::parse(t).ok());
        let Some(msg) = parsed else {
            proc.violate(format!(
                "plugin `{}` printed to stdout something that is not a protocol message: {:?}; stdout carries only protocol messages, logs go to stderr",
                proc.plugin,
                preview(&buf)
            ));
            return;
        };
        match msg.kind() {
            MessageKind::Response { id, outcome } => {
                let reply = outcome
                    .map(|r| r.to_owned())
                    .map_err(|e| Failure::Rpc(e.clone()));
                match lock(&proc.pending).remove(&id) {
                    Some(tx) => {
                        let _ = tx.send(reply);
                    }
                    None => debug!(plugin = %proc.plugin, id, "late answer dropped"),
                }
            }
            MessageKind::Request { id, method, params } => {
                let line = match handle_inbound(&proc, &emit, method, params) {
                    Ok(v) => proto::result_line(id, &v),
                    Err(e) => proto::error_line(id, &e),
                };
                let _ = proc.out.try_send(Out::Line(line));
            }
            MessageKind::Notification { method, params } => {
                if let Err(e) = handle_inbound(&proc, &emit, method, params) {
                    warn!(plugin = %proc.plugin, generation = proc.generation, method, error = %e.message, "plugin notification refused");
                }
            }
            MessageKind::Invalid(why) => {
                proc.violate(format!(
                    "plugin `{}` printed to stdout a line that is not a valid protocol message ({why}): {:?}; logs go to stderr",
                    proc.plugin,
                    preview(&buf)
                ));
                return;
            }
        }
    }
}

fn handle_inbound(
    proc: &Process,
    emit: &EmitFn,
    method: &str,
    params: Option<&RawValue>,
) -> Result<serde_json::Value, ErrorObject> {
    let bad = |m: String| ErrorObject::new(proto::code::INVALID_PARAMS, m);
    let text = params.map_or("null", RawValue::get);
    match method {
        method::EMIT => {
            let p: EmitParams =
                serde_json::from_str(text).map_err(|e| bad(format!("emit params: {e}")))?;
            let n = emit(p).map_err(|m| ErrorObject::new(proto::code::INVALID_REQUEST, m))?;
            Ok(serde_json::json!({ "delivered": n }))
        }
        method::LOG => {
            let p: LogParams =
                serde_json::from_str(text).map_err(|e| bad(format!("log params: {e}")))?;
            let (plugin, generation) = (&*proc.plugin, proc.generation);
            match p.level.as_str() {
                "error" => error!(target: "plugin", plugin, generation, "{}", p.message),
                "warn" => warn!(target: "plugin", plugin, generation, "{}", p.message),
                "debug" => debug!(target: "plugin", plugin, generation, "{}", p.message),
                _ => info!(target: "plugin", plugin, generation, "{}", p.message),
            }
            Ok(serde_json::Value::Null)
        }
        other => Err(ErrorObject::new(
            proto::code::METHOD_NOT_FOUND,
            format!("the host has no method `{other}`"),
        )),
    }
}

fn describe_status(s: ExitStatus) -> String {
    if let Some(code) = s.code() {
        return format!("exit status {code}");
    }
    match s.signal() {
        Some(sig) => {
            let name = Signal::try_from(sig).map_or("?", |s| s.as_str());
            format!("killed by signal {sig} ({name})")
        }
        None => s.to_string(),
    }
}

async fn reap(
    proc: Arc<Process>,
    mut child: Child,
    readers: [tokio::task::JoinHandle<()>; 2],
    ended_tx: watch::Sender<Option<Arc<Ended>>>,
    on_exit: ExitFn,
) {
    // Wait for the exit without reaping (WNOWAIT): the zombie keeps the
    // pid and the process group id from being reused, so the group, with
    // any grandchildren still holding the pipes, can be killed safely.
    // Only then is the child reaped, and no signal is sent after that.
    if proc.pid > 0 {
        let pid = Pid::from_raw(proc.pid as i32);
        exited_unreaped(pid).await;
        let mut reaped = lock(&proc.reaped);
        let _ = killpg(pid, Signal::SIGKILL);
        *reaped = true;
    }
    let status = match child.wait().await {
        Ok(s) => describe_status(s),
        Err(e) => format!("wait failed: {e}"),
    };
    // Answers and log lines written just before the exit still count (a
    // grandchild holding the pipes open cannot delay this for long).
    let _ = tokio::time::timeout(Duration::from_millis(200), futures_join(readers)).await;
    let ended = Arc::new(Ended {
        status,
        violation: lock(&proc.violation).clone(),
        stopping: proc.stopping.load(Ordering::SeqCst),
    });
    ended_tx.send_replace(Some(ended.clone()));
    let pending: Vec<_> = lock(&proc.pending).drain().collect();
    for (_, tx) in pending {
        let _ = tx.send(Err(Failure::Ended(ended.clone())));
    }
    on_exit(proc.pid, ended);
}

/// Until `pid` has exited, without reaping it.
async fn exited_unreaped(pid: Pid) {
    use tokio::signal::unix::{SignalKind, signal};
    // Subscribed before the first check, so an exit in between still wakes
    // this; the timeout is a safety net for a missed signal.
    let mut sigchld = signal(SignalKind::child()).ok();
    loop {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | WaitPidFlag::WNOHANG;
        match waitid(WaitId::Pid(pid), flags) {
            Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::EINTR) => {}
            // Exited, or cannot be waited for: reap (or fail to) below.
            _ => return,
        }
        match sigchld.as_mut() {
            Some(s) => {
                let _ = tokio::time::timeout(Duration::from_millis(200), s.recv()).await;
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn futures_join(handles: [tokio::task::JoinHandle<()>; 2]) {
    for h in handles {
        let _ = h.await;
    }
}
