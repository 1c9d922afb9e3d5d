//! `RestartScope`: one generation of plugins, and everything that lives and
//! dies with it.
//!
//! Each plugin of a generation has its own in-flight count, its own request
//! cancellation, its own services and its own life (tasks, handles, sinks),
//! so that at a restart every plugin hands over on its own: its requests in
//! the old generation drain (or are cancelled at the deadline), its old
//! services stop, and only then do its new services start. A slow request of
//! one plugin never holds up another plugin's hand-over.

use crate::config::{GatewayConfig, RequestsConfig, RestartConfig};
use crate::frame::Features;
use crate::loader::{BuildError, Catalog, LoadContext, LoaderCache};
use crate::panic;
use crate::registry::{MethodEntry, PluginIndex, Registry, RegistryBuilder};
use plugin_api::host::LifeController;
use plugin_api::{
    EventTransport, Handler, MethodResult, Params, PluginFactory, RequestContext, RpcError, Service,
};
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Where a plugin of a generation stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginPhase {
    /// Its services have not started yet; requests wait (bounded).
    Starting,
    /// Serving.
    Running,
    /// A service failed to start; its methods answer `UNAVAILABLE`.
    Failed(String),
    /// It has handed over (or its generation has stopped).
    Stopped,
}

const PHASE_STARTING: u8 = 0;
const PHASE_RUNNING: u8 = 1;
const PHASE_FAILED: u8 = 2;
const PHASE_STOPPED: u8 = 3;

/// Why a generation cancels the requests still in flight at its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CancelReason {
    /// A restart replaced the generation (`gateway-restarting`).
    Restarting = 0,
    /// The gateway is stopping (`gateway-stopping`).
    Stopping = 1,
}

struct PluginRuntime {
    fast: AtomicU8,
    phase: watch::Sender<PluginPhase>,
    services: Vec<Arc<dyn Service>>,
    /// Services whose `start` was called, in start order.
    started: Mutex<Vec<Arc<dyn Service>>>,
    /// Set once the services were stopped (exactly once).
    stopped: AtomicBool,
    /// Cancels this plugin's in-flight requests (a child of the scope's).
    cancel: CancellationToken,
    /// The plugin's tasks, handles and sinks.
    life: LifeController,
}

impl PluginRuntime {
    fn set(&self, phase: PluginPhase) {
        let code = match phase {
            PluginPhase::Starting => PHASE_STARTING,
            PluginPhase::Running => PHASE_RUNNING,
            PluginPhase::Failed(_) => PHASE_FAILED,
            PluginPhase::Stopped => PHASE_STOPPED,
        };
        self.fast.store(code, Ordering::Release);
        self.phase.send_replace(phase);
    }
}

/// Requests in flight in one plugin of a generation.
#[derive(Default)]
struct PluginCount {
    inflight: AtomicUsize,
    empty: Notify,
}

/// Counts requests admitted by one generation, per plugin, and closes the
/// door on them.
struct Admission {
    open: AtomicBool,
    plugins: Box<[PluginCount]>,
}

impl Admission {
    fn enter(&self, plugin: PluginIndex) -> bool {
        self.plugins[plugin].inflight.fetch_add(1, Ordering::SeqCst);
        if self.open.load(Ordering::SeqCst) {
            return true;
        }
        self.leave(plugin);
        false
    }

    fn leave(&self, plugin: PluginIndex) {
        let count = &self.plugins[plugin];
        if count.inflight.fetch_sub(1, Ordering::SeqCst) == 1 && !self.open.load(Ordering::SeqCst) {
            count.empty.notify_waiters();
        }
    }

    fn in_flight(&self, plugin: PluginIndex) -> usize {
        self.plugins[plugin].inflight.load(Ordering::SeqCst)
    }

    async fn wait_empty(&self, plugin: PluginIndex) {
        let count = &self.plugins[plugin];
        loop {
            let notified = count.empty.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if count.inflight.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// A request admitted by a generation. While it lives the generation counts
/// it as in flight in the plugin that serves it; dropping it releases the
/// generation.
pub struct Admitted {
    scope: Option<Arc<RestartScope>>,
    admission: Arc<Admission>,
    plugin: PluginIndex,
}

impl fmt::Debug for Admitted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admitted")
            .field("generation", &self.scope().generation)
            .field("plugin", &self.plugin)
            .finish()
    }
}

impl Admitted {
    /// The generation that admitted the request.
    pub fn scope(&self) -> &Arc<RestartScope> {
        self.scope.as_ref().expect("present until drop")
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        // Release the scope before counting the request out, so that once the
        // drain sees zero in flight no request holds the scope any more.
        drop(self.scope.take());
        self.admission.leave(self.plugin);
    }
}

/// A request of one plugin that also uses another plugin of its generation
/// (the core `send` calling a channel): counted in that plugin too, so that
/// plugin's hand-over waits for it, and cancelled with that plugin's own
/// requests at its drain deadline.
pub(crate) struct PluginUse {
    admission: Arc<Admission>,
    plugin: PluginIndex,
    cancel: CancellationToken,
}

impl PluginUse {
    /// Resolves when the used plugin cancels its in-flight requests (its
    /// drain deadline, or its generation dropped): answer
    /// [`RestartScope::answer_cancelled`] then, as that plugin's requests are.
    pub(crate) async fn cancelled(&self) {
        self.cancel.cancelled().await
    }
}

impl Drop for PluginUse {
    fn drop(&mut self) {
        self.admission.leave(self.plugin);
    }
}

/// What happened when a generation (or some of its plugins) shut down.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// In-flight requests had to be cancelled at the drain deadline.
    pub drain_timed_out: bool,
    /// How many requests were answered as cancelled at the deadline, each
    /// once (a core `send` is in flight in two plugins but answered once).
    pub cancelled_requests: usize,
    /// Services stopped (each exactly once).
    pub services_stopped: usize,
    /// Services whose stop failed, panicked or timed out.
    pub services_failed: Vec<String>,
    /// Background tasks that had to be aborted.
    pub aborted_tasks: usize,
}

impl ShutdownReport {
    pub(crate) fn add(&mut self, other: ShutdownReport) {
        self.drain_timed_out |= other.drain_timed_out;
        self.cancelled_requests += other.cancelled_requests;
        self.services_stopped += other.services_stopped;
        self.services_failed.extend(other.services_failed);
        self.aborted_tasks += other.aborted_tasks;
    }
}

/// How one plugin's requests drained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Drained {
    /// Requests in flight when the drain began.
    pub(crate) in_flight: usize,
    /// Requests cancelled at the deadline.
    pub(crate) cancelled: usize,
}

/// One generation: its loader cache, registry, plugin instances, services,
/// background tasks and event sinks. Built complete before it is published;
/// dropped as a whole after every plugin handed over.
///
/// Requests are admitted through [`crate::Gateway::admit`] and
/// [`crate::Gateway::dispatch`] only, never straight into a scope that may
/// have closed its door:
///
/// ```compile_fail
/// fn admit_around_the_gateway(s: &std::sync::Arc<gateway_core::RestartScope>) {
///     let _ = s.try_admit();
/// }
/// ```
pub struct RestartScope {
    generation: u64,
    registry: Registry,
    loader: LoaderCache,
    plugins: Vec<PluginRuntime>,
    admission: Arc<Admission>,
    request_cancel: CancellationToken,
    cancel_reason: AtomicU8,
    /// Requests answered as cancelled at a drain deadline.
    cancelled_answers: AtomicUsize,
    timings: RestartConfig,
    requests: RequestsConfig,
    live_scopes: Arc<AtomicUsize>,
    built_at: Instant,
}

impl fmt::Debug for RestartScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RestartScope")
            .field("generation", &self.generation)
            .field("registry", &self.registry)
            .finish()
    }
}

/// Filled with the scope once it is behind an `Arc`, for the core plugin.
pub(crate) type ScopeSlot = Arc<OnceLock<Weak<RestartScope>>>;

/// What a build needs besides the config.
pub(crate) struct BuildInputs<'a> {
    pub(crate) catalog: &'a Catalog,
    pub(crate) state_dir: &'a Path,
    pub(crate) transport: &'a Arc<dyn EventTransport>,
    pub(crate) live_scopes: &'a Arc<AtomicUsize>,
    pub(crate) core: PluginFactory,
    /// What the core plugin may do that others may not.
    pub(crate) policy: crate::policy::HostPolicy,
    /// Plugins found in manifests, runtime plugins already started.
    pub(crate) manifests: Vec<crate::loader::Candidate>,
}

impl RestartScope {
    /// Build a complete generation: construct every enabled plugin, collect
    /// its declarations and freeze the registry. Nothing is started and
    /// nothing outside the new scope changes.
    pub(crate) fn build(
        generation: u64,
        config: &GatewayConfig,
        inputs: BuildInputs<'_>,
    ) -> Result<RestartScope, BuildError> {
        config.requests.check(config.origin.as_ref())?;
        let cx = LoadContext {
            config,
            state_dir: inputs.state_dir,
            generation,
            transport: inputs.transport,
            policy: inputs.policy,
        };
        let (loader, lives) =
            crate::loader::load(&cx, inputs.core, inputs.catalog, inputs.manifests)?;
        let request_cancel = CancellationToken::new();
        let mut builder = RegistryBuilder::with_policy(inputs.policy);
        let mut plugins = Vec::with_capacity(loader.plugins().len());
        for (p, life) in loader.plugins().iter().zip(lives) {
            let mut registrar = plugin_api::host::registrar(&p.id);
            panic::catch(|| p.instance.register(&mut registrar)).map_err(|msg| {
                BuildError::Plugin {
                    plugin: p.id.clone(),
                    message: format!("register panicked: {msg}"),
                }
            })?;
            let mut decl = plugin_api::host::declarations(registrar);
            p.declarer.declare(decl.events.iter().cloned());
            let services = std::mem::take(&mut decl.services);
            let phase = if let Some(e) = &p.start_error {
                PluginPhase::Failed(e.clone())
            } else if services.is_empty() {
                PluginPhase::Running
            } else {
                PluginPhase::Starting
            };
            builder
                .add_plugin(&p.id, decl)
                .map_err(BuildError::Registry)?;
            let rt = PluginRuntime {
                fast: AtomicU8::new(PHASE_STARTING),
                phase: watch::Sender::new(PluginPhase::Starting),
                services,
                started: Mutex::new(Vec::new()),
                stopped: AtomicBool::new(false),
                cancel: request_cancel.child_token(),
                life,
            };
            rt.set(phase);
            plugins.push(rt);
        }
        inputs.live_scopes.fetch_add(1, Ordering::SeqCst);
        Ok(RestartScope {
            generation,
            registry: builder.build(),
            loader,
            admission: Arc::new(Admission {
                open: AtomicBool::new(true),
                plugins: plugins.iter().map(|_| PluginCount::default()).collect(),
            }),
            plugins,
            request_cancel,
            cancel_reason: AtomicU8::new(CancelReason::Restarting as u8),
            cancelled_answers: AtomicUsize::new(0),
            timings: config.restart.clone(),
            requests: config.requests.clone(),
            live_scopes: inputs.live_scopes.clone(),
            built_at: Instant::now(),
        })
    }

    /// The generation number.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The immutable registry that both advertises and dispatches.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Advertised methods and events.
    pub fn features(&self) -> &Features {
        self.registry.features()
    }

    /// What this generation loaded.
    pub fn loader(&self) -> &LoaderCache {
        &self.loader
    }

    /// The restart timings this generation was built with.
    pub fn timings(&self) -> &RestartConfig {
        &self.timings
    }

    /// The request deadlines this generation applies.
    pub fn request_deadlines(&self) -> &RequestsConfig {
        &self.requests
    }

    /// How long ago it was built.
    pub fn age(&self) -> Duration {
        self.built_at.elapsed()
    }

    /// Requests in flight in this generation.
    pub fn in_flight(&self) -> usize {
        (0..self.plugins.len())
            .map(|p| self.admission.in_flight(p))
            .sum()
    }

    /// Requests in flight in plugin `id` of this generation.
    pub fn plugin_in_flight(&self, id: &str) -> usize {
        self.plugin_index(id)
            .map_or(0, |p| self.admission.in_flight(p))
    }

    /// Whether it still admits requests.
    pub fn is_admitting(&self) -> bool {
        self.admission.open.load(Ordering::SeqCst)
    }

    /// The index of plugin `id`, which matches plugins across generations.
    pub fn plugin_index(&self, id: &str) -> Option<PluginIndex> {
        self.loader.plugins().iter().position(|p| p.id == id)
    }

    /// Each plugin's id and phase, in load order.
    pub fn plugin_phases(&self) -> Vec<(&str, PluginPhase)> {
        self.loader
            .plugins()
            .iter()
            .zip(&self.plugins)
            .map(|(p, rt)| {
                let phase = rt.phase.borrow().clone();
                // A runtime plugin whose process was given up on (too many
                // crashes) is failed, whatever its services did.
                let process = p.runtime.as_ref().map(|r| r.status().state);
                match (phase, process) {
                    (PluginPhase::Running, Some(plugin_host::ProcessState::Failed(e))) => {
                        (p.id.as_str(), PluginPhase::Failed(e))
                    }
                    (phase, _) => (p.id.as_str(), phase),
                }
            })
            .collect()
    }

    /// Plugins that serve in this generation: loaded, not failed, and (for
    /// runtime plugins) with a process that has not been given up on. A
    /// restart that cannot start one of these fails instead of dropping it.
    pub fn serving_plugin_ids(&self) -> Vec<String> {
        self.loader
            .plugins()
            .iter()
            .zip(&self.plugins)
            .filter(|(p, rt)| {
                rt.fast.load(Ordering::Acquire) != PHASE_FAILED
                    && p.start_error.is_none()
                    && p.runtime.as_ref().is_none_or(|r| {
                        !matches!(r.status().state, plugin_host::ProcessState::Failed(_))
                    })
            })
            .map(|(p, _)| p.id.clone())
            .collect()
    }

    /// Plugins as `health` reports them: running ids, failed `(id, error)`,
    /// and ids not serving (starting or stopped). Reads the lock-free phase
    /// first; only a failed plugin's error text takes the lock.
    pub fn plugin_health(&self) -> (Vec<&str>, Vec<(&str, String)>, Vec<&str>) {
        let (mut loaded, mut failed, mut unavailable) = (Vec::new(), Vec::new(), Vec::new());
        for (p, rt) in self.loader.plugins().iter().zip(&self.plugins) {
            match rt.fast.load(Ordering::Acquire) {
                PHASE_RUNNING => match p.runtime.as_ref().map(|r| r.status().state) {
                    None | Some(plugin_host::ProcessState::Running) => loaded.push(p.id.as_str()),
                    Some(plugin_host::ProcessState::Failed(e)) => failed.push((p.id.as_str(), e)),
                    Some(_) => unavailable.push(p.id.as_str()),
                },
                PHASE_FAILED => match &*rt.phase.borrow() {
                    PluginPhase::Failed(e) => failed.push((p.id.as_str(), e.clone())),
                    // The text lands a moment after the flag.
                    _ => unavailable.push(p.id.as_str()),
                },
                _ => unavailable.push(p.id.as_str()),
            }
        }
        (loaded, failed, unavailable)
    }

    /// Running plugins that report themselves degraded through a health
    /// check, as `(id, reason)`, in load order.
    pub fn plugin_degraded(&self) -> Vec<(&str, String)> {
        let mut out = Vec::new();
        for (owner, check) in self.registry.health_checks() {
            if self.plugins[*owner].fast.load(Ordering::Acquire) != PHASE_RUNNING {
                continue;
            }
            let id = self.loader.plugins()[*owner].id.as_str();
            match crate::panic::catch(|| check()) {
                Ok(None) => {}
                Ok(Some(reason)) => out.push((id, reason)),
                Err(p) => out.push((id, format!("health check panicked: {p}"))),
            }
        }
        out
    }

    /// Admit a request counted in the core plugin, or `None` if this
    /// generation has closed its door.
    pub(crate) fn try_admit(self: &Arc<Self>) -> Option<Admitted> {
        self.try_admit_for(0)
    }

    /// Admit a request served by plugin `plugin` (its in-flight count is the
    /// one that plugin's hand-over drains), or `None` if this generation has
    /// closed its door.
    pub(crate) fn try_admit_for(self: &Arc<Self>, plugin: PluginIndex) -> Option<Admitted> {
        self.admission.enter(plugin).then(|| Admitted {
            scope: Some(self.clone()),
            admission: self.admission.clone(),
            plugin,
        })
    }

    /// Count an admitted request in `plugin` too, or `None` once the door
    /// is closed (the plugin may be handing over).
    pub(crate) fn use_plugin(&self, plugin: PluginIndex) -> Option<PluginUse> {
        self.admission.enter(plugin).then(|| PluginUse {
            admission: self.admission.clone(),
            plugin,
            cancel: self.plugins[plugin].cancel.clone(),
        })
    }

    /// Admit nothing new from now on.
    pub(crate) fn close_admission(&self) {
        self.admission.open.store(false, Ordering::SeqCst);
    }

    /// The answer for a request this generation cancels: retryable
    /// `UNAVAILABLE`, `gateway-restarting` or `gateway-stopping`.
    pub(crate) fn cancel_error(&self) -> RpcError {
        if self.cancel_reason.load(Ordering::SeqCst) == CancelReason::Stopping as u8 {
            RpcError::unavailable("gateway is stopping; retry the request")
                .with_details(serde_json::json!({"reason": "gateway-stopping"}))
                .retryable_after(None)
        } else {
            RpcError::restarting()
        }
    }

    /// Answer a request whose plugin cancelled it at the drain deadline,
    /// counting it (once) for [`ShutdownReport::cancelled_requests`].
    pub(crate) fn answer_cancelled(&self) -> RpcError {
        self.cancelled_answers.fetch_add(1, Ordering::SeqCst);
        self.cancel_error()
    }

    /// Requests answered as cancelled so far.
    pub(crate) fn cancelled_answers(&self) -> usize {
        self.cancelled_answers.load(Ordering::SeqCst)
    }

    /// Wait (bounded) until plugin `owner` serves. `what` names the method or
    /// channel for the error.
    pub(crate) async fn ready(&self, owner: PluginIndex, what: &str) -> Result<(), RpcError> {
        let rt = &self.plugins[owner];
        if rt.fast.load(Ordering::Acquire) == PHASE_RUNNING {
            return Ok(());
        }
        let mut rx = rt.phase.subscribe();
        let waited = tokio::time::timeout(
            self.timings.start_wait(),
            rx.wait_for(|p| *p != PluginPhase::Starting),
        )
        .await;
        let plugin = &self.loader.plugins()[owner].id;
        let phase = match waited {
            Ok(Ok(p)) => p.clone(),
            _ => PluginPhase::Starting,
        };
        match phase {
            PluginPhase::Running => Ok(()),
            PluginPhase::Starting => Err(RpcError::unavailable(format!(
                "plugin {plugin} has not started yet"
            ))
            .retryable_after(Some(500))
            .with_details(
                serde_json::json!({"method": what, "plugin": plugin, "reason": "plugin-starting"}),
            )),
            PluginPhase::Failed(e) => Err(RpcError::unavailable(format!(
                "plugin {plugin} failed to start: {e}"
            ))
            .with_details(
                serde_json::json!({"method": what, "plugin": plugin, "reason": "plugin-failed"}),
            )),
            PluginPhase::Stopped => Err(self.cancel_error()),
        }
    }

    /// Run an admitted request: wait for its plugin, call the handler, turn
    /// panics into errors; answer retryable `UNAVAILABLE` at the request's
    /// deadline (`request-timeout`) or when its plugin's hand-over cancels
    /// what is still in flight at the drain deadline.
    pub(crate) async fn invoke(
        &self,
        entry: &MethodEntry,
        ctx: RequestContext,
        params: Params,
    ) -> MethodResult {
        let deadline = self.requests.timeout_for(&entry.spec.name);
        let run = async {
            self.ready(entry.owner, &entry.spec.name).await?;
            run_handler(&entry.spec.handler, ctx, params)
                .await
                .map_err(|e| self.handler_error(entry, e))
        };
        tokio::select! {
            biased;
            r = tokio::time::timeout(deadline, run) => {
                r.unwrap_or_else(|_| Err(self.timed_out(entry, deadline)))
            }
            () = self.plugins[entry.owner].cancel.cancelled() => Err(self.answer_cancelled()),
        }
    }

    fn timed_out(&self, entry: &MethodEntry, deadline: Duration) -> RpcError {
        let plugin = &self.loader.plugins()[entry.owner].id;
        let method = &entry.spec.name;
        warn!(generation = self.generation, plugin = %plugin, method = %method, timeout_ms = deadline.as_millis() as u64, "request timed out");
        request_timeout(method, Some(plugin), deadline)
    }

    fn handler_error(&self, entry: &MethodEntry, e: HandlerFailure) -> RpcError {
        match e {
            HandlerFailure::Error(e) => e,
            HandlerFailure::Panic(msg) => {
                let plugin = &self.loader.plugins()[entry.owner].id;
                error!(generation = self.generation, plugin = %plugin, method = %entry.spec.name, panic = %msg, "plugin handler panicked");
                RpcError::unavailable(format!("handler for {} panicked: {msg}", entry.spec.name))
                    .with_details(serde_json::json!({"method": entry.spec.name, "plugin": plugin, "reason": "handler-panicked"}))
            }
        }
    }

    /// Start every plugin's services, one plugin after the other, in load
    /// order (the first generation).
    pub(crate) async fn start_services(&self) {
        for index in 0..self.plugins.len() {
            self.start_plugin(index).await;
        }
    }

    /// Start plugin `index`'s services in order, each with a timeout; a
    /// failure marks the plugin failed and its methods answer `UNAVAILABLE`.
    pub(crate) async fn start_plugin(&self, index: PluginIndex) {
        let rt = &self.plugins[index];
        if rt.services.is_empty() {
            return;
        }
        let id = &self.loader.plugins()[index].id;
        let mut failure = None;
        for svc in &rt.services {
            lock(&rt.started).push(svc.clone());
            let started = tokio::time::timeout(
                self.timings.start_timeout(),
                panic::catch_async(svc.clone().start()),
            )
            .await;
            let err = match started {
                Ok(Ok(Ok(()))) => continue,
                Ok(Ok(Err(e))) => e,
                Ok(Err(p)) => format!("start panicked: {p}"),
                Err(_) => format!("start timed out after {:?}", self.timings.start_timeout()),
            };
            error!(generation = self.generation, plugin = %id, service = svc.name(), error = %err, "plugin failed to start");
            failure = Some(format!("service {}: {err}", svc.name()));
            break;
        }
        rt.set(failure.map_or(PluginPhase::Running, PluginPhase::Failed));
    }

    /// Let plugin `index`'s in-flight requests finish until `deadline`, then
    /// cancel what is left (answered retryable `UNAVAILABLE` with `reason`).
    /// Call after [`RestartScope::close_admission`].
    pub(crate) async fn drain_plugin(
        &self,
        index: PluginIndex,
        deadline: Duration,
        reason: CancelReason,
    ) -> Drained {
        let mut drained = Drained {
            in_flight: self.admission.in_flight(index),
            cancelled: 0,
        };
        if tokio::time::timeout(deadline, self.admission.wait_empty(index))
            .await
            .is_ok()
        {
            return drained;
        }
        drained.cancelled = self.admission.in_flight(index);
        let id = &self.loader.plugins()[index].id;
        warn!(
            generation = self.generation,
            plugin = %id,
            in_flight = drained.cancelled,
            deadline_ms = deadline.as_millis() as u64,
            "drain timeout; cancelling in-flight requests"
        );
        self.cancel_reason.store(reason as u8, Ordering::SeqCst);
        self.plugins[index].cancel.cancel();
        if tokio::time::timeout(Duration::from_secs(1), self.admission.wait_empty(index))
            .await
            .is_err()
        {
            warn!(
                generation = self.generation,
                plugin = %id,
                "requests still in flight after cancellation"
            );
        }
        drained
    }

    /// Stop plugin `index`'s services in reverse start order, exactly once,
    /// each with a timeout; then retire its handles, sinks and tasks.
    pub(crate) async fn stop_plugin(&self, index: PluginIndex) -> ShutdownReport {
        let mut report = ShutdownReport::default();
        let rt = &self.plugins[index];
        let id = &self.loader.plugins()[index].id;
        if !rt.stopped.swap(true, Ordering::SeqCst) {
            let started = std::mem::take(&mut *lock(&rt.started));
            for svc in started.into_iter().rev() {
                let stopped = tokio::time::timeout(
                    self.timings.stop_timeout(),
                    panic::catch_async(svc.clone().stop()),
                )
                .await;
                report.services_stopped += 1;
                let failure = match stopped {
                    Ok(Ok(())) => continue,
                    Ok(Err(p)) => format!("stop panicked: {p}"),
                    Err(_) => format!("stop timed out after {:?}", self.timings.stop_timeout()),
                };
                error!(generation = self.generation, plugin = %id, service = svc.name(), error = %failure, "plugin service failed to stop");
                report
                    .services_failed
                    .push(format!("{id}/{}: {failure}", svc.name()));
            }
        }
        rt.set(PluginPhase::Stopped);
        rt.life.retire();
        report.aborted_tasks = rt.life.reap_tasks(Duration::from_millis(250)).await;
        if report.aborted_tasks > 0 {
            warn!(
                generation = self.generation,
                plugin = %id,
                aborted = report.aborted_tasks,
                "aborted background tasks that ignored retirement"
            );
        }
        report
    }

    /// End this generation when the gateway stops: admit nothing new, drain
    /// every plugin's requests concurrently until the deadline (then cancel
    /// them with `gateway-stopping`), then stop the plugins' services in
    /// reverse start order exactly once, and retire handles, sinks and tasks.
    pub(crate) async fn shutdown(&self, drain: Duration) -> ShutdownReport {
        self.close_admission();
        let mut report = ShutdownReport::default();
        let drains =
            (0..self.plugins.len()).map(|p| self.drain_plugin(p, drain, CancelReason::Stopping));
        for d in futures::future::join_all(drains).await {
            report.drain_timed_out |= d.cancelled > 0;
        }
        report.cancelled_requests = self.cancelled_answers();
        for index in (0..self.plugins.len()).rev() {
            report.add(self.stop_plugin(index).await);
        }
        debug!(generation = self.generation, ?report, "generation stopped");
        report
    }
}

impl Drop for RestartScope {
    fn drop(&mut self) {
        let unstopped: usize = self
            .plugins
            .iter()
            .filter(|rt| !rt.stopped.load(Ordering::SeqCst))
            .map(|rt| lock(&rt.started).len())
            .sum();
        if unstopped > 0 {
            warn!(
                generation = self.generation,
                services = unstopped,
                "generation dropped without shutdown; its services were not stopped"
            );
        }
        // Anything still waiting on this generation gives up, its tasks are
        // aborted, and its handles and sinks refuse from now on. The registry,
        // the loader cache and the plugin instances go with the fields.
        self.request_cancel.cancel();
        let mut aborted = 0;
        for rt in &self.plugins {
            rt.life.retire();
            aborted += rt.life.abort_tasks();
        }
        self.live_scopes.fetch_sub(1, Ordering::SeqCst);
        info!(
            generation = self.generation,
            aborted_tasks = aborted,
            "generation released"
        );
    }
}

/// The answer to a request that outlived its deadline.
pub(crate) fn request_timeout(method: &str, plugin: Option<&str>, deadline: Duration) -> RpcError {
    RpcError::unavailable(format!(
        "{method} did not finish within {} ms",
        deadline.as_millis()
    ))
    .with_details(serde_json::json!({
        "reason": "request-timeout",
        "method": method,
        "plugin": plugin,
        "timeoutMs": deadline.as_millis() as u64,
    }))
    .retryable_after(None)
}

pub(crate) enum HandlerFailure {
    Error(RpcError),
    Panic(String),
}

async fn run_handler(
    handler: &Handler,
    ctx: RequestContext,
    params: Params,
) -> Result<serde_json::Value, HandlerFailure> {
    match handler {
        Handler::Sync(f) => match panic::catch(|| f(&ctx, params)) {
            Ok(r) => r.map_err(HandlerFailure::Error),
            Err(p) => Err(HandlerFailure::Panic(p)),
        },
        Handler::Async(f) => {
            let fut = panic::catch(|| f(ctx, params)).map_err(HandlerFailure::Panic)?;
            match panic::catch_async(fut).await {
                Ok(r) => r.map_err(HandlerFailure::Error),
                Err(p) => Err(HandlerFailure::Panic(p)),
            }
        }
    }
}

/// Run a detached handler (outside any admission), within `deadline`.
pub(crate) async fn run_detached(
    handler: Handler,
    method: &str,
    deadline: Duration,
    ctx: RequestContext,
    params: Params,
) -> MethodResult {
    let run = run_handler(&handler, ctx, params);
    match tokio::time::timeout(deadline, run).await {
        Ok(r) => r.map_err(|e| match e {
            HandlerFailure::Error(e) => e,
            HandlerFailure::Panic(p) => RpcError::unavailable(format!("handler panicked: {p}")),
        }),
        Err(_) => {
            warn!(method = %method, timeout_ms = deadline.as_millis() as u64, "request timed out");
            Err(request_timeout(method, None, deadline))
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
