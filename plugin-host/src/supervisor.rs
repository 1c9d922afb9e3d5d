//! Keeping a plugin's process alive within its generation: the serving
//! process, crash counting with a window and a limit, respawn with backoff,
//! and hang detection (a `ping` after a call timed out or was abandoned).

use crate::handshake::{handshake, same_declarations};
use crate::process::{Ended, Failure, Process};
use crate::{ProcessState, SpawnSpec, StderrTail, lock};
use plugin_api::EventSink;
use plugin_protocol::{InitializeResult, method};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// What the supervisor tracks of the plugin's processes in this generation.
pub(crate) struct State {
    pub(crate) state: ProcessState,
    pub(crate) crashes: VecDeque<Instant>,
    pub(crate) restarts: u32,
    pub(crate) last_exit: Option<String>,
    pub(crate) services_started: bool,
    pub(crate) pid: Option<u32>,
    pub(crate) busy_rejections: u64,
    pub(crate) call_timeouts: u64,
}

/// One runtime plugin's shared state: its spec and directories, what it
/// declared, the serving process, and the stop signal.
pub(crate) struct Inner {
    pub(crate) spec: SpawnSpec,
    pub(crate) tmp: tempfile::TempDir,
    pub(crate) decl: OnceLock<InitializeResult>,
    pub(crate) current: Mutex<Option<Arc<Process>>>,
    pub(crate) state: Mutex<State>,
    pub(crate) sink: OnceLock<EventSink>,
    pub(crate) tail: Arc<StderrTail>,
    pub(crate) stop: CancellationToken,
}

impl Inner {
    /// Make `proc` the serving process; `false` (and `proc` killed) if the
    /// plugin is being stopped. The stop check and the install happen under
    /// the `current` lock, which `stop` takes too, so a concurrent `stop`
    /// either sees this process or makes this refuse it.
    pub(crate) fn install(self: &Arc<Self>, proc: Arc<Process>) -> bool {
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

    /// The reaper's report that process `pid` ended: a crash of the serving
    /// process (not a stop) is counted and respawned.
    pub(crate) fn on_exit(self: &Arc<Self>, pid: u32, ended: Arc<Ended>) {
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
}

/// A call timed out: is the process still answering at all? Any answer to
/// `ping` (even an error) says yes; none within the deadline means it is
/// hung (an infinite loop, a blocked event loop), and it is killed, which
/// answers its pending calls and respawns it.
pub(crate) fn probe(inner: &Arc<Inner>, proc: Arc<Process>) {
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
