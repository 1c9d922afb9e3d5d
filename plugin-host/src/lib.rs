//! The host side of runtime plugins: plugin code that runs in its own
//! process and lives and dies with its generation.
//!
//! A [`RuntimePlugin`] is one plugin of one generation. [`RuntimePlugin::start`]
//! spawns its process (own process group, the plugin's directory as working
//! directory, an allow-listed environment, a fresh temporary directory) and
//! runs the `initialize` handshake; the declarations it returns are exactly
//! what the generation advertises and dispatches for the plugin. Calls are
//! forwarded with a deadline and cancelled when the caller stops waiting.
//! A process that crashes is respawned with backoff inside its generation
//! (it must declare the same methods and events again); every call it had
//! pending is answered once, `UNAVAILABLE`, retryable, `plugin-crashed`.
//! [`RuntimePlugin::stop`] ends the process for good: `shutdown`, stdin
//! closed, then SIGTERM and SIGKILL to its process group; it is always reaped.
//!
//! The wire format is in `plugin-protocol`; the Node.js host that runs
//! OpenClaw-style plugins is embedded here ([`node`]).

mod fingerprint;
mod lines;
pub mod node;
mod process;

pub use fingerprint::code_hash;

use plugin_api::{ConnId, EventSink, MethodResult, Params, RequestContext, RpcError, Value, scope};
use plugin_protocol::{
    self as proto, CallClient, CallParams, CallResult, EmitParams, InitializeParams,
    InitializeResult, method,
};
use process::{EmitFn, Ended, ExitFn, Failure, Process};
use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Bounds on what a plugin process can make the host hold or wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Longest line either side may write; a longer line from the plugin
    /// fails it, a longer request is refused before it is sent.
    pub max_line_bytes: usize,
    /// Calls in flight per process; beyond, callers get a retryable busy
    /// error and nothing is queued.
    pub max_calls_in_flight: usize,
    /// How long `initialize` may take.
    pub handshake_timeout: Duration,
    /// How long a call may take before the host answers a timeout and
    /// sends `cancel`.
    pub call_timeout: Duration,
    /// How long `start` / `stop` of the plugin's services may take.
    pub service_timeout: Duration,
    /// After `shutdown` and stdin closed, how long the process may take to
    /// exit before SIGTERM.
    pub stop_grace: Duration,
    /// After SIGTERM, how long before SIGKILL.
    pub term_grace: Duration,
    /// Crashes tolerated inside [`Limits::crash_window`]; one more and the
    /// plugin is failed until the next restart.
    pub crash_limit: usize,
    /// The window crashes are counted in.
    pub crash_window: Duration,
    /// First respawn delay; doubles per crash in the window, up to 5 s.
    pub respawn_backoff: Duration,
    /// After a call timed out, how long the process has to answer `ping`
    /// before it counts as hung and is killed (and respawned).
    pub ping_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line_bytes: 4 * 1024 * 1024,
            max_calls_in_flight: 256,
            handshake_timeout: Duration::from_secs(10),
            call_timeout: Duration::from_secs(30),
            service_timeout: Duration::from_secs(10),
            stop_grace: Duration::from_secs(2),
            term_grace: Duration::from_secs(1),
            crash_limit: 3,
            crash_window: Duration::from_secs(300),
            respawn_backoff: Duration::from_millis(100),
            ping_timeout: Duration::from_secs(2),
        }
    }
}

/// How to run one plugin for one generation.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    /// Plugin id.
    pub plugin_id: String,
    /// The generation the process belongs to.
    pub generation: u64,
    /// The plugin's directory: working directory of the process.
    pub dir: PathBuf,
    /// Program and arguments (never a shell string).
    pub argv: Vec<OsString>,
    /// Environment granted by the plugin's config, on top of the allow-list
    /// (`PATH`, `HOME`, `USER`, `LOGNAME`, `LANG`, `LANGUAGE`, `LC_ALL`,
    /// `LC_CTYPE`, `LC_MESSAGES`, `TZ`, `TERM`).
    pub env: Vec<(String, String)>,
    /// The plugin's validated config.
    pub config: Value,
    /// The plugin's durable directory (created if missing).
    pub state_dir: PathBuf,
    /// Where the per-generation temporary directory is created.
    pub tmp_root: PathBuf,
    /// Bounds.
    pub limits: Limits,
}

/// The last lines a plugin wrote to stderr, for error reports.
#[derive(Debug)]
pub struct StderrTail {
    lines: Mutex<VecDeque<String>>,
    cap: usize,
}

impl StderrTail {
    fn new(cap: usize) -> Self {
        StderrTail {
            lines: Mutex::new(VecDeque::with_capacity(cap)),
            cap,
        }
    }

    fn push(&self, line: &str) {
        let mut l = lock(&self.lines);
        if l.len() == self.cap {
            l.pop_front();
        }
        l.push_back(line.chars().take(1000).collect());
    }

    /// The kept lines, oldest first.
    pub fn lines(&self) -> Vec<String> {
        lock(&self.lines).iter().cloned().collect()
    }
}

/// A plugin process that could not be started or did not complete the
/// handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartError {
    /// What went wrong.
    pub message: String,
    /// The last lines the process wrote to stderr.
    pub stderr: Vec<String>,
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if !self.stderr.is_empty() {
            write!(f, "; last stderr lines: {}", self.stderr.join(" | "))?;
        }
        Ok(())
    }
}

impl std::error::Error for StartError {}

/// Where a runtime plugin's process stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessState {
    /// Serving calls.
    Running,
    /// Crashed; being respawned. Calls answer `plugin-crashed`, retryable.
    Respawning,
    /// Given up on until the next restart.
    Failed(String),
    /// Stopped with its generation.
    Stopped,
}

impl ProcessState {
    /// `running`, `respawning`, `failed` or `stopped`.
    pub fn as_str(&self) -> &'static str {
        match self {
            ProcessState::Running => "running",
            ProcessState::Respawning => "respawning",
            ProcessState::Failed(_) => "failed",
            ProcessState::Stopped => "stopped",
        }
    }
}

/// What `status` and `health` show for a runtime plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessStatus {
    /// State.
    pub state: ProcessState,
    /// The current process id, if one runs.
    pub pid: Option<u32>,
    /// Crashes in this generation (each followed by a respawn attempt or
    /// the plugin failing).
    pub restarts: u32,
    /// How the last process ended, if one did.
    pub last_exit: Option<String>,
    /// Calls refused because the in-flight limit was reached.
    pub busy_rejections: u64,
    /// Calls answered with a timeout.
    pub call_timeouts: u64,
}

struct State {
    state: ProcessState,
    crashes: VecDeque<Instant>,
    restarts: u32,
    last_exit: Option<String>,
    services_started: bool,
    pid: Option<u32>,
    busy_rejections: u64,
    call_timeouts: u64,
}

struct Inner {
    spec: SpawnSpec,
    tmp: tempfile::TempDir,
    decl: OnceLock<InitializeResult>,
    current: Mutex<Option<Arc<Process>>>,
    state: Mutex<State>,
    sink: OnceLock<EventSink>,
    tail: Arc<StderrTail>,
    stop: CancellationToken,
}

/// One runtime plugin of one generation: its process, respawned on crash,
/// stopped with the generation. Dropping it kills the process group.
pub struct RuntimePlugin {
    inner: Arc<Inner>,
}

impl fmt::Debug for RuntimePlugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimePlugin")
            .field("plugin", &self.inner.spec.plugin_id)
            .field("generation", &self.inner.spec.generation)
            .finish()
    }
}

impl RuntimePlugin {
    /// Spawn the process and run the handshake. On error the process has
    /// been killed and reaped, and the error carries its last stderr lines.
    pub async fn start(spec: SpawnSpec) -> Result<RuntimePlugin, StartError> {
        let fail = |message: String, tail: &StderrTail| StartError {
            message,
            stderr: tail.lines(),
        };
        let tail = Arc::new(StderrTail::new(20));
        std::fs::create_dir_all(&spec.state_dir).map_err(|e| {
            fail(
                format!("cannot create state dir {}: {e}", spec.state_dir.display()),
                &tail,
            )
        })?;
        let _ = std::fs::create_dir_all(&spec.tmp_root);
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{}-g{}-", spec.plugin_id, spec.generation))
            .tempdir_in(&spec.tmp_root)
            .map_err(|e| {
                fail(
                    format!(
                        "cannot create a temporary directory in {}: {e}",
                        spec.tmp_root.display()
                    ),
                    &tail,
                )
            })?;
        let inner = Arc::new(Inner {
            spec,
            tmp,
            decl: OnceLock::new(),
            current: Mutex::new(None),
            state: Mutex::new(State {
                state: ProcessState::Running,
                crashes: VecDeque::new(),
                restarts: 0,
                last_exit: None,
                services_started: false,
                pid: None,
                busy_rejections: 0,
                call_timeouts: 0,
            }),
            sink: OnceLock::new(),
            tail: tail.clone(),
            stop: CancellationToken::new(),
        });
        let plugin = RuntimePlugin {
            inner: inner.clone(),
        };
        let (proc, decl) = handshake(&inner).await.map_err(|m| fail(m, &inner.tail))?;
        let _ = inner.decl.set(decl);
        inner.install(proc);
        Ok(plugin)
    }

    /// What the process declared in its handshake.
    pub fn declarations(&self) -> &InitializeResult {
        self.inner.decl.get().expect("set by start")
    }

    /// Where the plugin's events go. Set once by the host when the plugin
    /// joins its generation; `emit` before that is refused.
    pub fn attach_events(&self, sink: EventSink) {
        let _ = self.inner.sink.set(sink);
    }

    /// The generation's temporary directory for this plugin.
    pub fn tmp_dir(&self) -> &Path {
        self.inner.tmp.path()
    }

    /// The last lines the plugin wrote to stderr.
    pub fn stderr_tail(&self) -> Vec<String> {
        self.inner.tail.lines()
    }

    /// Forward a call of a declared method to the process.
    pub async fn call(&self, ctx: &RequestContext, method: &str, params: &Params) -> MethodResult {
        let Some(proc) = lock(&self.inner.current).clone() else {
            return Err(self.inner.not_serving(method));
        };
        let limits = &self.inner.spec.limits;
        let call = CallParams {
            method: method.to_string(),
            params: params.raw().map(ToOwned::to_owned),
            client: CallClient {
                conn_id: ctx.conn_id().0,
                role: ctx.role().as_str().to_string(),
                scopes: ctx.scopes().as_slice().to_vec(),
                client: serde_json::to_value(ctx.client()).unwrap_or(Value::Null),
            },
            deadline_ms: limits.call_timeout.as_millis() as u64,
        };
        let id = &self.inner.spec.plugin_id;
        // The request's own deadline (`requests.timeout_ms`, counted from
        // admission) may end the wait before `call_timeout` does and drop
        // this future: a call abandoned while still pending is counted and
        // probed like a timed-out one, or a hung process would go unnoticed.
        let mut abandoned = Abandoned {
            inner: &self.inner,
            proc: Some(proc.clone()),
        };
        let answer = proc.request(method::CALL, &call, limits.call_timeout).await;
        abandoned.proc = None;
        match answer {
            Ok(raw) => match serde_json::from_str::<CallResult>(raw.get()) {
                Ok(CallResult {
                    ok: true, payload, ..
                }) => Ok(payload.unwrap_or(Value::Null)),
                Ok(CallResult { error, .. }) => Err(error.map_or_else(
                    || RpcError::unavailable(format!("plugin {id} failed without an error")),
                    call_error,
                )),
                Err(e) => Err(RpcError::unavailable(format!(
                    "plugin {id} answered {method} with an invalid result: {e}"
                ))),
            },
            Err(f) => {
                match f {
                    Failure::Timeout(_) => {
                        lock(&self.inner.state).call_timeouts += 1;
                        probe(&self.inner, proc);
                    }
                    Failure::Busy => lock(&self.inner.state).busy_rejections += 1,
                    _ => {}
                }
                Err(self.inner.failure_error(method, f))
            }
        }
    }

    /// Start the plugin's services (`start` request). Called once the
    /// previous generation's process of this plugin has stopped.
    pub async fn start_services(&self) -> Result<(), String> {
        lock(&self.inner.state).services_started = true;
        let Some(proc) = lock(&self.inner.current).clone() else {
            return Err(self.inner.not_serving("start").message);
        };
        let timeout = self.inner.spec.limits.service_timeout;
        match proc
            .request(method::START, &serde_json::json!({}), timeout)
            .await
        {
            Ok(_) => Ok(()),
            Err(f) => Err(self.inner.failure_error("start", f).message),
        }
    }

    /// End the plugin for good: stop its services (if started), then
    /// `shutdown`, stdin closed, SIGTERM, SIGKILL to the process group, with
    /// the configured graces. Returns how the process ended.
    pub async fn stop(&self) -> Option<String> {
        let inner = &self.inner;
        inner.stop.cancel();
        let services = std::mem::take(&mut lock(&inner.state).services_started);
        // Under the `current` lock, as `install` checks `stop`: a respawn
        // either installed its process before this (and it is stopped
        // here) or sees the stop and kills it.
        let proc = {
            let cur = lock(&inner.current);
            match cur.clone() {
                Some(p) => p,
                None => {
                    lock(&inner.state).state = ProcessState::Stopped;
                    return None;
                }
            }
        };
        let limits = &inner.spec.limits;
        if services
            && let Err(f) = proc
                .request(method::STOP, &serde_json::json!({}), limits.service_timeout)
                .await
        {
            let e = inner.failure_error("stop", f);
            warn!(plugin = %inner.spec.plugin_id, generation = inner.spec.generation, error = %e.message, "plugin services did not stop cleanly");
        }
        let ended = proc.shutdown(limits.stop_grace, limits.term_grace).await;
        lock(&inner.current).take();
        let mut st = lock(&inner.state);
        st.state = ProcessState::Stopped;
        st.pid = None;
        st.last_exit = Some(ended.describe());
        info!(plugin = %inner.spec.plugin_id, generation = inner.spec.generation, pid = proc.pid(), exit = %ended.describe(), "plugin process stopped");
        Some(ended.describe())
    }

    /// State, pid, crash count and last exit.
    pub fn status(&self) -> ProcessStatus {
        let st = lock(&self.inner.state);
        ProcessStatus {
            state: st.state.clone(),
            pid: st.pid,
            restarts: st.restarts,
            last_exit: st.last_exit.clone(),
            busy_rejections: st.busy_rejections,
            call_timeouts: st.call_timeouts,
        }
    }
}

impl Drop for RuntimePlugin {
    fn drop(&mut self) {
        self.inner.stop.cancel();
        if let Some(p) = lock(&self.inner.current).take() {
            p.kill_now();
        }
    }
}

/// Armed while a call waits for its answer; dropped armed (the caller
/// stopped waiting), it counts a call timeout and probes the process.
struct Abandoned<'a> {
    inner: &'a Arc<Inner>,
    proc: Option<Arc<Process>>,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        let Some(proc) = self.proc.take() else {
            return;
        };
        if proc.ended().is_some() || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        lock(&self.inner.state).call_timeouts += 1;
        probe(self.inner, proc);
    }
}

fn call_error(e: proto::CallError) -> RpcError {
    let code =
        serde_json::from_value(Value::String(e.code)).unwrap_or(plugin_api::ErrorCode::Unavailable);
    RpcError {
        code,
        message: e.message,
        details: e.details,
        retryable: e.retryable,
        retry_after_ms: e.retry_after_ms,
    }
}

async fn handshake(inner: &Arc<Inner>) -> Result<(Arc<Process>, InitializeResult), String> {
    let spec = &inner.spec;
    let weak: Weak<Inner> = Arc::downgrade(inner);
    let emit: EmitFn = Arc::new(move |p| match weak.upgrade() {
        Some(i) => i.emit(p),
        None => Err("the plugin has stopped".into()),
    });
    let weak: Weak<Inner> = Arc::downgrade(inner);
    let on_exit: ExitFn = Box::new(move |pid, ended| {
        if let Some(i) = weak.upgrade() {
            i.on_exit(pid, ended);
        }
    });
    let program = spec.argv.first().map(|p| p.to_string_lossy().into_owned());
    let proc =
        Process::spawn(spec, inner.tmp.path(), inner.tail.clone(), emit, on_exit).map_err(|e| {
            format!(
                "cannot start `{}` in {}: {e}",
                program.unwrap_or_default(),
                spec.dir.display()
            )
        })?;
    let params = InitializeParams {
        protocol_versions: proto::PROTOCOL_VERSIONS.to_vec(),
        generation: spec.generation,
        plugin_id: spec.plugin_id.clone(),
        config: spec.config.clone(),
        state_dir: spec.state_dir.display().to_string(),
        tmp_dir: inner.tmp.path().display().to_string(),
    };
    let limits = &spec.limits;
    let answer = proc
        .request(method::INITIALIZE, &params, limits.handshake_timeout)
        .await;
    let result = match answer {
        Ok(raw) => serde_json::from_str::<InitializeResult>(raw.get())
            .map_err(|e| format!("invalid `initialize` result: {e}"))
            .and_then(|d| check_declarations(&d).map(|()| d)),
        Err(Failure::Timeout(d)) => Err(format!(
            "no answer to `initialize` within {} ms (handshake timeout)",
            d.as_millis()
        )),
        Err(Failure::Ended(e)) => Err(format!(
            "the process ended during the handshake: {}",
            e.describe()
        )),
        Err(Failure::Rpc(e)) => Err(format!("`initialize` failed: {}", e.message)),
        Err(Failure::Busy | Failure::TooLarge(_)) => Err(
            "`initialize` could not be sent (the config is too large or stdin is blocked)".into(),
        ),
    };
    match result {
        Ok(decl) => {
            proc.notify(method::INITIALIZED, &serde_json::json!({}));
            Ok((proc, decl))
        }
        Err(m) => {
            proc.kill_now();
            // Wait (bounded) for the reaper, which also collects the last
            // stderr lines for the error.
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                proc.shutdown(Duration::ZERO, Duration::ZERO),
            )
            .await;
            Err(m)
        }
    }
}

fn check_declarations(d: &InitializeResult) -> Result<(), String> {
    if !proto::PROTOCOL_VERSIONS.contains(&d.protocol_version) {
        return Err(format!(
            "the plugin chose protocol version {}, the host speaks {:?}",
            d.protocol_version,
            proto::PROTOCOL_VERSIONS
        ));
    }
    let mut seen = HashSet::new();
    for m in &d.methods {
        if m.name.is_empty() || m.name.contains(char::is_whitespace) {
            return Err(format!("invalid method name {:?}", m.name));
        }
        if !seen.insert(m.name.as_str()) {
            return Err(format!("method `{}` declared twice", m.name));
        }
    }
    if let Some(e) = d.events.iter().find(|e| e.is_empty()) {
        return Err(format!("invalid event name {e:?}"));
    }
    Ok(())
}

/// Whether a respawned process declares what the first one did.
fn same_declarations(a: &InitializeResult, b: &InitializeResult) -> bool {
    a.methods == b.methods && a.events == b.events
}

impl Inner {
    /// Make `proc` the serving process; `false` (and `proc` killed) if the
    /// plugin is being stopped. The stop check and the install happen under
    /// the `current` lock, which `stop` takes too, so a concurrent `stop`
    /// either sees this process or makes this refuse it.
    fn install(self: &Arc<Self>, proc: Arc<Process>) -> bool {
        let pid = proc.pid();
        {
            let mut cur = lock(&self.current);
            if self.stop.is_cancelled() {
                drop(cur);
                proc.kill_now();
                return false;
            }
            *cur = Some(proc.clone());
            let mut st = lock(&self.state);
            st.state = ProcessState::Running;
            st.pid = Some(pid);
        }
        // Ended between the handshake and now: the reaper's report was not
        // for the current process, so handle it here.
        if let Some(e) = proc.ended() {
            self.on_exit(pid, e);
        }
        true
    }

    fn emit(&self, p: EmitParams) -> Result<usize, String> {
        let sink = self
            .sink
            .get()
            .ok_or("the plugin's generation is not serving yet")?;
        let sent = match p.conn_ids {
            Some(ids) => {
                let conns: Vec<ConnId> = ids.into_iter().map(ConnId).collect();
                sink.send(&conns, &p.event, &p.payload)
            }
            None => sink.broadcast(
                p.scope.as_deref().unwrap_or(scope::READ),
                &p.event,
                &p.payload,
            ),
        };
        sent.map_err(|e| e.to_string())
    }

    fn on_exit(self: &Arc<Self>, pid: u32, ended: Arc<Ended>) {
        let was_current = {
            let mut cur = lock(&self.current);
            if cur.as_ref().is_some_and(|p| p.pid() == pid) {
                cur.take();
                true
            } else {
                false
            }
        };
        if !was_current || ended.stopping || self.stop.is_cancelled() {
            return;
        }
        if let Some(attempt) = self.record_crash(&ended.describe()) {
            tokio::spawn(respawn(self.clone(), attempt));
        }
    }

    /// Count a crash; `Some(crashes in the window)` if a respawn should
    /// follow, `None` if the plugin is now failed.
    fn record_crash(&self, what: &str) -> Option<usize> {
        let spec = &self.spec;
        let now = Instant::now();
        let mut st = lock(&self.state);
        st.last_exit = Some(what.to_string());
        st.restarts += 1;
        st.pid = None;
        st.crashes.push_back(now);
        while st
            .crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > spec.limits.crash_window)
        {
            st.crashes.pop_front();
        }
        let n = st.crashes.len();
        if n > spec.limits.crash_limit {
            let msg = format!(
                "crashed {n} times within {} s (last: {what}); failed until the next restart",
                spec.limits.crash_window.as_secs()
            );
            error!(plugin = %spec.plugin_id, generation = spec.generation, error = %msg, "plugin failed");
            st.state = ProcessState::Failed(msg);
            return None;
        }
        warn!(plugin = %spec.plugin_id, generation = spec.generation, exit = %what, crashes = n, "plugin process crashed; respawning");
        st.state = ProcessState::Respawning;
        Some(n)
    }

    fn fail(&self, msg: String) {
        error!(plugin = %self.spec.plugin_id, generation = self.spec.generation, error = %msg, "plugin failed");
        lock(&self.state).state = ProcessState::Failed(msg);
    }

    fn crashed_error(&self, method: &str, exit: &str) -> RpcError {
        let id = &self.spec.plugin_id;
        RpcError::unavailable(format!("plugin {id} crashed ({exit}); retry the request"))
            .with_details(serde_json::json!({
                "reason": "plugin-crashed", "plugin": id, "method": method, "exit": exit,
            }))
            .retryable_after(Some(self.spec.limits.respawn_backoff.as_millis() as u64))
    }

    fn not_serving(&self, method: &str) -> RpcError {
        let st = lock(&self.state);
        let id = &self.spec.plugin_id;
        match &st.state {
            ProcessState::Failed(e) => RpcError::unavailable(format!("plugin {id} failed: {e}"))
                .with_details(
                    serde_json::json!({"reason": "plugin-failed", "plugin": id, "method": method}),
                ),
            ProcessState::Stopped => RpcError::restarting(),
            ProcessState::Respawning | ProcessState::Running => {
                let exit = st.last_exit.clone().unwrap_or_default();
                drop(st);
                self.crashed_error(method, &exit)
            }
        }
    }

    fn failure_error(&self, method: &str, f: Failure) -> RpcError {
        let id = &self.spec.plugin_id;
        let limits = &self.spec.limits;
        match f {
            Failure::Ended(e) if e.stopping => RpcError::restarting(),
            Failure::Ended(e) => self.crashed_error(method, &e.describe()),
            Failure::Busy => RpcError::unavailable(format!(
                "plugin {id} is busy ({} calls in flight); retry the request",
                limits.max_calls_in_flight
            ))
            .with_details(
                serde_json::json!({"reason": "plugin-busy", "plugin": id, "method": method}),
            )
            .retryable_after(Some(50)),
            Failure::TooLarge(n) => RpcError::invalid_request(format!(
                "request too large for plugin {id}: {n} bytes, limit {}",
                limits.max_line_bytes
            )),
            Failure::Timeout(d) => RpcError::unavailable(format!(
                "plugin {id} did not answer {method} within {} ms",
                d.as_millis()
            ))
            .with_details(
                serde_json::json!({"reason": "plugin-timeout", "plugin": id, "method": method}),
            )
            .retryable_after(None),
            Failure::Rpc(e) => RpcError::unavailable(format!(
                "plugin {id} refused {method}: {}",
                e.message
            ))
            .with_details(
                serde_json::json!({"reason": "plugin-error", "plugin": id, "method": method}),
            ),
        }
    }
}

/// A call timed out: is the process still answering at all? Any answer to
/// `ping` (even an error) says yes; none within the deadline means it is
/// hung (an infinite loop, a blocked event loop), and it is killed, which
/// answers its pending calls and respawns it.
fn probe(inner: &Arc<Inner>, proc: Arc<Process>) {
    use std::sync::atomic::Ordering;
    if proc.probing.swap(true, Ordering::AcqRel) {
        return;
    }
    let timeout = inner.spec.limits.ping_timeout;
    let id = inner.spec.plugin_id.clone();
    tokio::spawn(async move {
        if let Err(Failure::Timeout(_)) = proc
            .request(method::PING, &serde_json::json!({}), timeout)
            .await
        {
            proc.violate(format!(
                "plugin `{id}` is unresponsive: a call timed out and `ping` got no answer within {} ms",
                timeout.as_millis()
            ));
        }
        proc.probing.store(false, Ordering::Release);
    });
}

async fn respawn(inner: Arc<Inner>, mut attempt: usize) {
    let spec = &inner.spec;
    loop {
        let shift = attempt.saturating_sub(1).min(6) as u32;
        let delay = (spec.limits.respawn_backoff * 2u32.pow(shift)).min(Duration::from_secs(5));
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = inner.stop.cancelled() => return,
        }
        match handshake(&inner).await {
            Ok((proc, decl)) => {
                if inner.stop.is_cancelled() {
                    proc.kill_now();
                    return;
                }
                if !same_declarations(inner.decl.get().expect("set"), &decl) {
                    proc.kill_now();
                    inner.fail("the respawned process declared different methods or events than the generation serves".into());
                    return;
                }
                let services = lock(&inner.state).services_started;
                if !inner.install(proc.clone()) {
                    return;
                }
                info!(plugin = %spec.plugin_id, generation = spec.generation, pid = proc.pid(), "plugin process respawned");
                if services
                    && let Err(f) = proc
                        .request(
                            method::START,
                            &serde_json::json!({}),
                            spec.limits.service_timeout,
                        )
                        .await
                {
                    let e = inner.failure_error("start", f);
                    warn!(plugin = %spec.plugin_id, generation = spec.generation, error = %e.message, "respawned plugin's services did not start");
                }
                return;
            }
            Err(m) => {
                if inner.stop.is_cancelled() {
                    return;
                }
                match inner.record_crash(&m) {
                    Some(n) => attempt = n,
                    None => return,
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
