//! What restarts report: the outcome every trigger receives, the records
//! `status` shows, and the gateway's counters. Plain data, below both the
//! gateway that fills it in and the core plugin that serves it.

use crate::scope::ShutdownReport;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One plugin in a restart report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginReport {
    /// Plugin id.
    pub id: String,
    /// Code version.
    pub version: String,
    /// Content hash of what was loaded.
    pub code_hash: String,
    /// Whether the hash differs from the previous generation's (or the plugin is new).
    pub changed: bool,
    /// Where it came from.
    pub source: String,
}

/// What a successful restart did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartReport {
    /// The generation now serving.
    pub generation: u64,
    /// The generation it replaced.
    pub previous: u64,
    /// What triggered it (`SIGUSR1`, `gateway.restart`, `api`, ...).
    pub trigger: String,
    /// From trigger to every plugin handed over (the new generation serves
    /// from the swap on, after `phases.build`).
    pub duration: Duration,
    /// Where that time went.
    pub phases: RestartPhases,
    /// Each plugin's hand-over, in the new generation's load order, then
    /// plugins only the old generation had.
    pub handovers: Vec<PluginHandover>,
    /// Process-level settings changed on disk that apply only at the next
    /// process start (names only).
    pub pending_process_settings: Vec<String>,
    /// Plugins of the new generation.
    pub plugins: Vec<PluginReport>,
    /// Methods the new generation dispatches that the old did not.
    pub methods_added: Vec<String>,
    /// Methods the old generation dispatched that the new does not.
    pub methods_removed: Vec<String>,
    /// How the old generation ended.
    pub shutdown: ShutdownReport,
    /// Plugins of the new generation that failed to start.
    pub failed_plugins: Vec<(String, String)>,
}

/// How long each phase of a restart took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestartPhases {
    /// From the trigger to the swap: reading config and manifests,
    /// constructing plugins, freezing the registry. The new generation
    /// serves (and is announced) from the end of this phase.
    pub build: Duration,
    /// From the swap until every plugin handed over.
    pub handover: Duration,
    /// The longest drain-and-stop of one plugin's old instance.
    pub stop_old: Duration,
    /// The longest start of one plugin's new services.
    pub start_new: Duration,
}

/// How a plugin's hand-over went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoverKind {
    /// In both generations: old drained and stopped, then new started.
    Replaced,
    /// Only in the new generation: started at once.
    Added,
    /// Only in the old generation: drained and stopped.
    Removed,
}

/// One plugin's hand-over from the old generation to the new.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginHandover {
    /// The plugin id (plugins are matched across generations by id).
    pub id: String,
    /// Replaced, added or removed.
    pub kind: HandoverKind,
    /// Its requests in flight in the old generation when the drain began.
    pub in_flight: usize,
    /// Of those, cancelled at the drain deadline.
    pub cancelled: usize,
    /// Draining its old requests.
    pub drain: Duration,
    /// Stopping its old services and reaping its old tasks.
    pub stop: Duration,
    /// Starting its new services.
    pub start: Duration,
    /// From the swap until its new instance serves (for a removed plugin:
    /// until its old instance stopped).
    pub total: Duration,
}

/// A restart that did not happen; the old generation keeps serving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartFailure {
    /// The generation still serving.
    pub serving: u64,
    /// Why.
    pub error: String,
    /// How long the attempt took.
    pub duration: Duration,
}

impl fmt::Display for RestartFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "restart failed (generation {} keeps serving): {}",
            self.serving, self.error
        )
    }
}

impl std::error::Error for RestartFailure {}

/// The outcome every coalesced trigger of one restart receives.
pub type RestartOutcome = Result<RestartReport, RestartFailure>;

/// One restart as `status` (`lastRestart`, `restartHistory`) shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartRecord {
    /// Whether it succeeded.
    pub ok: bool,
    /// The generation serving afterwards.
    pub generation: u64,
    /// What triggered it (`SIGUSR1`, `SIGUSR2`, `SIGHUP`, `gateway.restart`,
    /// `api`, ...).
    pub trigger: String,
    /// When it finished (unix ms).
    pub at_ms: u64,
    /// How long it took, in whole milliseconds.
    pub duration_ms: u64,
    /// Where the time went (zero for a failed build's later phases).
    pub phases: RestartPhases,
    /// Methods the new generation added.
    pub methods_added: Vec<String>,
    /// Methods the new generation removed.
    pub methods_removed: Vec<String>,
    /// Plugins whose code or config changed (or that are new).
    pub plugins_changed: Vec<String>,
    /// The error, when it failed.
    pub error: Option<String>,
    /// Process-level settings changed on disk that apply only at the next
    /// process start (names only, never values).
    pub pending_process_settings: Vec<String>,
}

/// How many restart records `Gateway::restart_history` keeps.
pub const RESTART_HISTORY_LEN: usize = 32;

/// Counters for status and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayStats {
    /// The generation serving.
    pub generation: u64,
    /// Scopes alive (built and not yet dropped); 1 when settled.
    pub live_scopes: usize,
    /// Restarts that succeeded.
    pub restarts_ok: u64,
    /// Restarts that failed (old generation kept serving).
    pub restarts_failed: u64,
    /// Sum of successful restart durations, in seconds.
    pub restart_seconds_sum: f64,
    /// Requests in flight across generations.
    pub in_flight: usize,
    /// The last restart (the newest entry of `Gateway::restart_history`).
    pub last_restart: Option<RestartRecord>,
    /// Time since the gateway started.
    pub uptime: Duration,
    /// Drains (at restarts and at the stop) that reached their deadline.
    pub drain_timeouts: u64,
    /// Requests cancelled at a drain deadline (answered `UNAVAILABLE`,
    /// reason `gateway-restarting`).
    pub drain_cancelled_requests: u64,
    /// Time spent in each restart phase, summed over successful restarts.
    pub restart_phases_sum: RestartPhases,
}

/// Milliseconds since the Unix epoch, for timestamps clients see.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
