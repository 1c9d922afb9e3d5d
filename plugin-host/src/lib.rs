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
//!
//! - this module: the public types, and what a [`RuntimePlugin`] reports;
//! - `handshake`: [`RuntimePlugin::start`], the `initialize` handshake and
//!   the checks on what a process declares;
//! - `calls`: calls forwarded with deadlines, events the process emits, and
//!   the errors a caller sees;
//! - `supervisor`: the serving process, crash counting, respawn with
//!   backoff and hang detection;
//! - `stop`: the stop sequence, and the kill on drop;
//! - `stderr`: the process's stderr forwarded to `tracing`, and its tail;
//! - `process`: one OS process (spawn, stdin writer, stdout reader, reaper,
//!   requests with deadlines); `lines`: bounded line reads;
//! - `fingerprint`: the hash of a plugin's code; [`node`]: finding Node.js
//!   and the embedded Node host.

mod calls;
mod fingerprint;
mod handshake;
mod lines;
pub mod node;
mod process;
mod stderr;
mod stop;
mod supervisor;

pub use fingerprint::code_hash;
pub use stderr::StderrTail;

use plugin_api::{EventSink, Value};
use plugin_protocol::InitializeResult;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use supervisor::Inner;

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

/// Environment variables the host sets for every plugin process: its
/// per-generation temporary directory, its id, its generation and its
/// durable directory. A plugin's configured environment cannot set them.
pub const HOST_ENV: [&str; 4] = [
    "TMPDIR",
    "GATEWAY_PLUGIN_ID",
    "GATEWAY_GENERATION",
    "GATEWAY_PLUGIN_STATE_DIR",
];

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
    /// `LC_CTYPE`, `LC_MESSAGES`, `TZ`, `TERM`); never [`HOST_ENV`].
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

/// Lock `m`, recovering the data if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
