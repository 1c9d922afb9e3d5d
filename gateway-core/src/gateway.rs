//! The `Gateway`: the current generation behind one atomic pointer, dispatch,
//! and restarts that build, swap, drain, stop and start.

use crate::config::{ConfigSource, GatewayConfig};
use crate::core_plugin::{CORE_PLUGIN_ID, ControlLink, GatewayControl, RESTART_METHOD};
use crate::frame::Features;
use crate::loader::{BuildError, Candidate, Catalog, PluginSource};
use crate::panic;
use crate::policy::HostPolicy;
use crate::report::{
    GatewayStats, HandoverKind, PluginHandover, PluginReport, RESTART_HISTORY_LEN, RestartFailure,
    RestartOutcome, RestartPhases, RestartRecord, RestartReport, unix_ms,
};
use crate::scope::{
    Admitted, BuildInputs, CancelReason, PluginPhase, RestartScope, ScopeSlot, ShutdownReport,
};
use arc_swap::ArcSwap;
use plugin_api::{
    ConnId, ConnectionInfo, EventTransport, MethodResult, Params, RequestContext, RpcError,
};
use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
// Tokio's clock, so that restarts measured under a paused test clock are exact.
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// What a gateway is made of.
#[derive(Clone)]
pub struct GatewayOptions {
    /// Plugins compiled into the binary (the core plugin is always added).
    pub catalog: Catalog,
    /// Where configuration is read from, again at every restart.
    pub config: Arc<dyn ConfigSource>,
    /// Durable state lives below this directory.
    pub state_dir: PathBuf,
    /// How plugin events reach connections.
    pub transport: Arc<dyn EventTransport>,
}

impl fmt::Debug for GatewayOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayOptions")
            .field("catalog", &self.catalog)
            .field("state_dir", &self.state_dir)
            .finish()
    }
}

#[derive(Default)]
struct Coordinator {
    running: tokio::sync::Mutex<()>,
    pending: Mutex<Option<watch::Receiver<Option<RestartOutcome>>>>,
}

/// The core plugin's privileges, handed to the registry and loader as data:
/// it may take the host's method names and events, its restart method runs
/// outside admission, and it cannot be disabled.
const CORE_POLICY: HostPolicy = HostPolicy {
    privileged: Some(CORE_PLUGIN_ID),
    detached: &[RESTART_METHOD],
    required: &[CORE_PLUGIN_ID],
};

pub(crate) struct Inner {
    current: ArcSwap<RestartScope>,
    link: ControlLink,
    options: GatewayOptions,
    coordinator: Coordinator,
    live_scopes: Arc<AtomicUsize>,
    /// The generation being drained by a running restart, for `stats`.
    draining: Mutex<Weak<RestartScope>>,
    restarts_ok: AtomicU64,
    restart_micros_sum: AtomicU64,
    /// Build, stop-old, start-new and hand-over time of successful restarts, in µs.
    phase_micros_sum: [AtomicU64; 4],
    drain_timeouts: AtomicU64,
    drain_cancelled: AtomicU64,
    restarts_failed: AtomicU64,
    history: Mutex<VecDeque<RestartRecord>>,
    serving: watch::Sender<u64>,
    closing: AtomicBool,
    started_at: Instant,
}

/// The gateway: owns the current generation and swaps whole generations.
/// Cheap to clone; clones share one gateway.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway")
            .field("generation", &self.current().generation())
            .finish()
    }
}

impl Gateway {
    /// Build generation 1 and start its services. Fails if the first build
    /// fails: there is no older generation to keep serving.
    pub async fn start(options: GatewayOptions) -> Result<Gateway, BuildError> {
        let config = options.config.load()?;
        let live_scopes = Arc::new(AtomicUsize::new(0));
        let link: ControlLink = Arc::new(OnceLock::new());
        let manifests = prepare(&options, 1, &config, &[]).await?;
        let scope = build_scope(&options, &live_scopes, &link, 1, &config, manifests)?;
        let inner = Arc::new(Inner {
            current: ArcSwap::new(scope.clone()),
            link: link.clone(),
            options,
            coordinator: Coordinator::default(),
            live_scopes,
            draining: Mutex::new(Weak::new()),
            restarts_ok: AtomicU64::new(0),
            restart_micros_sum: AtomicU64::new(0),
            phase_micros_sum: Default::default(),
            drain_timeouts: AtomicU64::new(0),
            drain_cancelled: AtomicU64::new(0),
            restarts_failed: AtomicU64::new(0),
            history: Mutex::new(VecDeque::with_capacity(RESTART_HISTORY_LEN)),
            serving: watch::Sender::new(0),
            closing: AtomicBool::new(false),
            started_at: Instant::now(),
        });
        let control: Arc<dyn GatewayControl> = inner.clone();
        let _ = link.set(Arc::downgrade(&control));
        drop(control);
        scope.start_services().await;
        inner.serving.send_replace(1);
        info!(
            generation = 1,
            methods = scope.features().methods.len(),
            plugins = scope.loader().plugins().len(),
            "generation 1 serving"
        );
        Ok(Gateway { inner })
    }

    /// The generation serving now. Read it once per request.
    pub fn current(&self) -> Arc<RestartScope> {
        self.inner.current.load_full()
    }

    /// What the current generation advertises.
    pub fn features(&self) -> Features {
        self.inner.current.load().features().clone()
    }

    /// Whether the current generation dispatches `method` (for bounded
    /// metric labels; a request itself is answered by the scope that admits it).
    pub fn dispatches(&self, method: &str) -> bool {
        self.inner.current.load().registry().get(method).is_some()
    }

    /// Generation numbers as they start serving; for `gateway.generation` events.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.serving.subscribe()
    }

    /// Admit a request to the current generation, counted in its core
    /// plugin: the pointer is read once, and if that generation closed its
    /// door in between, the newer one is read instead. Fails only while the
    /// gateway is stopping.
    pub fn admit(&self) -> Result<Admitted, RpcError> {
        loop {
            // Once shutdown began, nothing new is admitted, even while
            // shutdown still waits for a running restart.
            if self.is_closing() {
                return Err(closing_error());
            }
            // A guard, not a clone: the only reference count taken is the
            // one the admitted request keeps.
            let scope = self.inner.current.load();
            if let Some(a) = RestartScope::try_admit(&scope) {
                return Ok(a);
            }
            if self.door_closed_for_good(&scope) {
                return Err(closing_error());
            }
            std::hint::spin_loop();
        }
    }

    /// A generation refused admission: true if no newer one will admit.
    fn door_closed_for_good(&self, refused: &Arc<RestartScope>) -> bool {
        self.inner.closing.load(Ordering::SeqCst)
            || Arc::ptr_eq(refused, &self.inner.current.load())
    }

    /// Dispatch one request to the generation that admits it.
    pub async fn dispatch(
        &self,
        ctx: RequestContext,
        method: &str,
        params: Params,
    ) -> MethodResult {
        self.dispatch_tagged(ctx, method, params).await.1
    }

    /// [`Gateway::dispatch`], also saying which generation answered (0 when
    /// none admitted the request, e.g. while the gateway stops). A server
    /// uses it to tell a connection about generation N (`gateway.generation`)
    /// before it writes any answer generation N produced.
    pub async fn dispatch_tagged(
        &self,
        ctx: RequestContext,
        method: &str,
        params: Params,
    ) -> (u64, MethodResult) {
        // The pointer is read once; the method's plugin is looked up there
        // and the request is counted in that plugin, so that plugin's
        // hand-over (and no other) waits for it.
        let admitted = loop {
            let scope = self.inner.current.load();
            let generation = scope.generation();
            let Some(entry) = scope.registry().get(method) else {
                return (
                    generation,
                    Err(RpcError::invalid_request(format!(
                        "unknown method: {method}"
                    ))),
                );
            };
            if let Err(e) = entry.authorize(&ctx) {
                return (generation, Err(e));
            }
            // Once shutdown began, nothing new is admitted, even while
            // shutdown still waits for a running restart.
            if self.is_closing() {
                return (0, Err(closing_error()));
            }
            if entry.detached {
                let handler = entry.spec.handler.clone();
                let deadline = scope.request_deadlines().timeout_for(method);
                drop(scope);
                return (
                    generation,
                    crate::scope::run_detached(handler, method, deadline, ctx, params).await,
                );
            }
            if let Some(a) = RestartScope::try_admit_for(&scope, entry.owner) {
                break a;
            }
            if self.door_closed_for_good(&scope) {
                return (0, Err(closing_error()));
            }
            std::hint::spin_loop();
        };
        let scope = admitted.scope();
        let entry = scope
            .registry()
            .get(method)
            .expect("the admitting scope has the method");
        (scope.generation(), scope.invoke(entry, ctx, params).await)
    }

    /// Tell the current generation's plugins that an authenticated
    /// connection opened (it has joined the host's connection table).
    pub fn connection_opened(&self, info: &ConnectionInfo) {
        let scope = self.inner.current.load();
        for (owner, hook) in scope.registry().connection_opened_hooks() {
            if let Err(p) = panic::catch(|| hook(info)) {
                let plugin = &scope.registry().plugin_ids()[*owner];
                error!(plugin = %plugin, panic = %p, "connection-opened hook panicked");
            }
        }
    }

    /// Tell every generation that may hold state for `conn` that it closed:
    /// first a generation still handing over (only its plugins that have not
    /// stopped yet), then the current one. Each plugin's hook runs once per
    /// generation; a panicking hook is logged and the others still run.
    pub fn connection_closed(&self, conn: ConnId) {
        let draining = lock(&self.inner.draining).upgrade();
        if let Some(old) = draining {
            notify_closed(&old, conn, true);
        }
        notify_closed(&self.inner.current.load(), conn, false);
    }

    /// Build a generation from the current config and discard it, reporting
    /// what it would serve. Changes nothing that dispatches. Plugin
    /// processes are not started, so runtime plugins list no methods.
    pub fn validate(&self) -> Result<Vec<String>, BuildError> {
        let config = self.inner.options.config.load()?;
        let manifests = crate::loader::discover_manifests(&config.plugins.dirs)?;
        let scope = self.build_scope(0, &config, manifests)?;
        Ok(scope
            .registry()
            .method_names()
            .into_iter()
            .map(str::to_string)
            .collect())
    }

    fn build_scope(
        &self,
        generation: u64,
        config: &GatewayConfig,
        manifests: Vec<Candidate>,
    ) -> Result<Arc<RestartScope>, BuildError> {
        let i = &self.inner;
        build_scope(
            &i.options,
            &i.live_scopes,
            &i.link,
            generation,
            config,
            manifests,
        )
    }

    /// Read config and manifests, start the runtime plugins' processes
    /// (all at once, before the swap) and build the new generation.
    async fn build_next(&self, generation: u64) -> Result<Arc<RestartScope>, BuildError> {
        let config = self.inner.options.config.load()?;
        let serving = self.current().serving_plugin_ids();
        let manifests = prepare(&self.inner.options, generation, &config, &serving).await?;
        self.build_scope(generation, &config, manifests)
    }

    /// Restart in-process, triggered by the embedding program (`api`).
    /// See [`Gateway::restart_with`].
    pub async fn restart(&self) -> RestartOutcome {
        self.restart_with("api").await
    }

    /// Restart in-process: build a new generation from config and manifests
    /// read again, swap it in (it serves from that moment), then hand each
    /// plugin over on its own: drain and stop its old instance, start its
    /// new one. `trigger` names what asked for it (`SIGUSR1`,
    /// `gateway.restart`, ...) in the restart history. Concurrent calls
    /// coalesce: a call made while a restart runs joins the one pending
    /// restart behind it (recorded with the first joiner's trigger), which
    /// every such caller then shares.
    pub async fn restart_with(&self, trigger: &str) -> RestartOutcome {
        let mut rx = {
            let mut pending = lock(&self.inner.coordinator.pending);
            match &*pending {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    *pending = Some(rx.clone());
                    let gateway = self.clone();
                    let trigger = trigger.to_string();
                    tokio::spawn(async move {
                        let _running = gateway.inner.coordinator.running.lock().await;
                        // From here on, new triggers queue a further restart.
                        lock(&gateway.inner.coordinator.pending).take();
                        let started = Instant::now();
                        let outcome = match panic::catch_async(
                            gateway.restart_now(started, &trigger),
                        )
                        .await
                        {
                            Ok(o) => o,
                            Err(p) => Err(gateway.record_failure(
                                started,
                                &trigger,
                                format!("restart panicked: {p}"),
                                Vec::new(),
                            )),
                        };
                        tx.send_replace(Some(outcome));
                    });
                    rx
                }
            }
        };
        loop {
            if let Some(outcome) = rx.borrow_and_update().clone() {
                return outcome;
            }
            if rx.changed().await.is_err() {
                return Err(RestartFailure {
                    serving: self.current().generation(),
                    error: "restart task ended without an outcome".into(),
                    duration: Duration::ZERO,
                });
            }
        }
    }

    /// Process-level settings changed on disk (asked once per restart,
    /// off the path to the swap), with one warning line when there are any.
    fn pending_process_settings(&self) -> Vec<String> {
        let pending = self.inner.options.config.pending_process_settings();
        if !pending.is_empty() {
            warn!(
                settings = %pending.join(", "),
                "process-level settings changed on disk; they apply only when the process restarts"
            );
        }
        pending
    }

    async fn restart_now(&self, started: Instant, trigger: &str) -> RestartOutcome {
        if self.inner.closing.load(Ordering::SeqCst) {
            let pending = self.pending_process_settings();
            return Err(self.record_failure(
                started,
                trigger,
                "gateway is stopping".into(),
                pending,
            ));
        }
        let old_gen = self.current().generation();
        // Restarts are serialized, so the next number is free; a failed build
        // never served and leaves no gap.
        let generation = old_gen + 1;
        info!(from = old_gen, to = generation, trigger, "restart started");
        let new = match self.build_next(generation).await {
            Ok(s) => s,
            Err(e) => {
                let pending = self.pending_process_settings();
                return Err(self.record_failure(started, trigger, e.to_string(), pending));
            }
        };
        // The swap: from here on the new generation admits every request and
        // is announced; the old one admits nothing new.
        let old = self.inner.current.swap(new.clone());
        old.close_admission();
        *lock(&self.inner.draining) = Arc::downgrade(&old);
        self.inner.serving.send_replace(generation);
        let swapped_at = Instant::now();
        let build = swapped_at - started;
        info!(
            generation,
            build_ms = build.as_millis() as u64,
            methods = new.features().methods.len(),
            plugins = new.loader().plugins().len(),
            "generation {generation} serving"
        );
        let pending = self.pending_process_settings();
        let (methods_added, methods_removed) = diff_methods(&old, &new);
        let plugins = plugin_reports(&old, &new);
        let (handovers, shutdown) = hand_over(&old, &new).await;
        self.note_drain(&shutdown);
        // Under the lock: a concurrent `stats` has released its upgrade.
        *lock(&self.inner.draining) = Weak::new();
        let old_weak = Arc::downgrade(&old);
        drop(old);
        if old_weak.strong_count() > 0 {
            warn!(
                generation = old_gen,
                refs = old_weak.strong_count(),
                "retired generation is still referenced"
            );
        }
        let phases = RestartPhases {
            build,
            handover: swapped_at.elapsed(),
            stop_old: handovers
                .iter()
                .map(|h| h.drain + h.stop)
                .max()
                .unwrap_or_default(),
            start_new: handovers.iter().map(|h| h.start).max().unwrap_or_default(),
        };
        let failed_plugins: Vec<(String, String)> = new
            .plugin_phases()
            .into_iter()
            .filter_map(|(id, p)| match p {
                PluginPhase::Failed(e) => Some((id.to_string(), e)),
                _ => None,
            })
            .collect();
        let duration = started.elapsed();
        self.inner.restarts_ok.fetch_add(1, Ordering::Relaxed);
        self.inner
            .restart_micros_sum
            .fetch_add(duration.as_micros() as u64, Ordering::Relaxed);
        for (sum, d) in self.inner.phase_micros_sum.iter().zip([
            phases.build,
            phases.stop_old,
            phases.start_new,
            phases.handover,
        ]) {
            sum.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        }
        let plugins_changed: Vec<String> = plugins
            .iter()
            .filter(|p| p.changed)
            .map(|p| p.id.clone())
            .collect();
        info!(
            generation,
            trigger,
            duration_ms = duration.as_millis() as u64,
            build_ms = phases.build.as_millis() as u64,
            handover_ms = phases.handover.as_millis() as u64,
            stop_old_ms = phases.stop_old.as_millis() as u64,
            start_new_ms = phases.start_new.as_millis() as u64,
            added = ?methods_added,
            removed = ?methods_removed,
            changed = ?plugins_changed,
            "restart complete; every plugin handed over to generation {generation}"
        );
        self.push_record(RestartRecord {
            ok: true,
            generation,
            trigger: trigger.to_string(),
            at_ms: unix_ms(),
            duration_ms: duration.as_millis() as u64,
            phases,
            methods_added: methods_added.clone(),
            methods_removed: methods_removed.clone(),
            plugins_changed,
            error: None,
            pending_process_settings: pending.clone(),
        });
        Ok(RestartReport {
            generation,
            previous: old_gen,
            trigger: trigger.to_string(),
            duration,
            phases,
            handovers,
            pending_process_settings: pending,
            plugins,
            methods_added,
            methods_removed,
            shutdown,
            failed_plugins,
        })
    }

    fn record_failure(
        &self,
        started: Instant,
        trigger: &str,
        error: String,
        pending_process_settings: Vec<String>,
    ) -> RestartFailure {
        let serving = self.current().generation();
        let duration = started.elapsed();
        self.inner.restarts_failed.fetch_add(1, Ordering::Relaxed);
        self.push_record(RestartRecord {
            ok: false,
            generation: serving,
            trigger: trigger.to_string(),
            at_ms: unix_ms(),
            duration_ms: duration.as_millis() as u64,
            phases: RestartPhases {
                build: duration,
                ..RestartPhases::default()
            },
            methods_added: Vec::new(),
            methods_removed: Vec::new(),
            plugins_changed: Vec::new(),
            error: Some(error.clone()),
            pending_process_settings,
        });
        error!(generation = serving, trigger, error = %error, "restart failed; generation {serving} keeps serving");
        RestartFailure {
            serving,
            error,
            duration,
        }
    }

    /// Count a drain that reached its deadline, for `stats`.
    fn note_drain(&self, report: &ShutdownReport) {
        if report.drain_timed_out {
            self.inner.drain_timeouts.fetch_add(1, Ordering::Relaxed);
            self.inner
                .drain_cancelled
                .fetch_add(report.cancelled_requests as u64, Ordering::Relaxed);
        }
    }

    fn push_record(&self, record: RestartRecord) {
        let mut history = lock(&self.inner.history);
        if history.len() == RESTART_HISTORY_LEN {
            history.pop_back();
        }
        history.push_front(record);
    }

    /// The last [`RESTART_HISTORY_LEN`] restarts, newest first, failed
    /// ones included.
    pub fn restart_history(&self) -> Vec<RestartRecord> {
        self.inner.restart_history()
    }

    /// Stop: refuse new requests with `UNAVAILABLE gateway-closing`, drain
    /// in-flight requests within the current generation's deadline (or
    /// `drain`, when given), stop services. Waits for a running restart first.
    pub async fn shutdown(&self, drain: Option<Duration>) -> ShutdownReport {
        self.inner.closing.store(true, Ordering::SeqCst);
        let _running = self.inner.coordinator.running.lock().await;
        let scope = self.current();
        let drain = drain.unwrap_or_else(|| scope.timings().drain_timeout());
        info!(generation = scope.generation(), "gateway stopping");
        let report = scope.shutdown(drain).await;
        self.note_drain(&report);
        report
    }

    /// Whether [`Gateway::shutdown`] has begun.
    pub fn is_closing(&self) -> bool {
        self.inner.closing.load(Ordering::SeqCst)
    }

    /// Counters for status and metrics.
    pub fn stats(&self) -> GatewayStats {
        self.inner.stats()
    }

    /// The transport events go through (the host's connection table).
    pub fn transport(&self) -> &Arc<dyn EventTransport> {
        &self.inner.options.transport
    }
}

impl GatewayControl for Inner {
    fn restart(
        self: Arc<Self>,
        trigger: &'static str,
    ) -> futures::future::BoxFuture<'static, RestartOutcome> {
        Box::pin(async move { Gateway { inner: self }.restart_with(trigger).await })
    }

    fn stats(&self) -> GatewayStats {
        let i = self;
        GatewayStats {
            generation: i.current.load().generation(),
            live_scopes: i.live_scopes.load(Ordering::SeqCst),
            restarts_ok: i.restarts_ok.load(Ordering::Relaxed),
            restarts_failed: i.restarts_failed.load(Ordering::Relaxed),
            restart_seconds_sum: i.restart_micros_sum.load(Ordering::Relaxed) as f64 / 1e6,
            in_flight: i.current.load().in_flight()
                + lock(&i.draining).upgrade().map_or(0, |s| s.in_flight()),
            last_restart: lock(&i.history).front().cloned(),
            uptime: i.started_at.elapsed(),
            drain_timeouts: i.drain_timeouts.load(Ordering::Relaxed),
            drain_cancelled_requests: i.drain_cancelled.load(Ordering::Relaxed),
            restart_phases_sum: {
                let us =
                    |k: usize| Duration::from_micros(i.phase_micros_sum[k].load(Ordering::Relaxed));
                RestartPhases {
                    build: us(0),
                    stop_old: us(1),
                    start_new: us(2),
                    handover: us(3),
                }
            },
        }
    }

    fn restart_history(&self) -> Vec<RestartRecord> {
        lock(&self.history).iter().cloned().collect()
    }

    fn connection_count(&self) -> usize {
        self.options.transport.connection_count()
    }
}

fn closing_error() -> RpcError {
    RpcError::unavailable("gateway is stopping")
        .with_details(serde_json::json!({"reason": "gateway-closing"}))
        .retryable_after(None)
}

/// Discover manifest plugins and start the runtime ones. `serving`: the
/// plugins serving in the current generation, whose failure to start fails
/// the build.
async fn prepare(
    options: &GatewayOptions,
    generation: u64,
    config: &GatewayConfig,
    serving: &[String],
) -> Result<Vec<Candidate>, BuildError> {
    let manifests = crate::loader::discover_manifests(&config.plugins.dirs)?;
    crate::loader::prepare(config, generation, &options.state_dir, serving, manifests).await
}

fn build_scope(
    options: &GatewayOptions,
    live_scopes: &Arc<AtomicUsize>,
    link: &ControlLink,
    generation: u64,
    config: &GatewayConfig,
    manifests: Vec<Candidate>,
) -> Result<Arc<RestartScope>, BuildError> {
    let slot: ScopeSlot = Arc::new(OnceLock::new());
    let inputs = BuildInputs {
        catalog: &options.catalog,
        state_dir: &options.state_dir,
        transport: &options.transport,
        live_scopes,
        core: crate::core_plugin::factory(link.clone(), slot.clone()),
        policy: CORE_POLICY,
        manifests,
    };
    let scope = Arc::new(RestartScope::build(generation, config, inputs)?);
    let _ = slot.set(Arc::downgrade(&scope));
    Ok(scope)
}

/// Hand every plugin over from `old` to `new`, each on its own and all at
/// once: a plugin in both drains its old requests (cancelled at the drain
/// deadline), stops its old services, then starts its new ones; a plugin
/// only in `new` starts at once; one only in `old` drains and stops.
/// `old` must have closed admission.
async fn hand_over(
    old: &RestartScope,
    new: &RestartScope,
) -> (Vec<PluginHandover>, ShutdownReport) {
    let deadline = new.timings().drain_timeout();
    let swapped = Instant::now();
    let chain = |old_index: Option<usize>, new_index: Option<usize>, id: String| async move {
        let mut h = PluginHandover {
            id,
            kind: match (old_index, new_index) {
                (Some(_), Some(_)) => HandoverKind::Replaced,
                (None, _) => HandoverKind::Added,
                (_, None) => HandoverKind::Removed,
            },
            in_flight: 0,
            cancelled: 0,
            drain: Duration::ZERO,
            stop: Duration::ZERO,
            start: Duration::ZERO,
            total: Duration::ZERO,
        };
        let mut report = ShutdownReport::default();
        if let Some(o) = old_index {
            let t = Instant::now();
            let drained = old
                .drain_plugin(o, deadline, CancelReason::Restarting)
                .await;
            h.in_flight = drained.in_flight;
            h.cancelled = drained.cancelled;
            h.drain = t.elapsed();
            let t = Instant::now();
            report = old.stop_plugin(o).await;
            report.drain_timed_out = drained.cancelled > 0;
            h.stop = t.elapsed();
        }
        if let Some(n) = new_index {
            let t = Instant::now();
            new.start_plugin(n).await;
            h.start = t.elapsed();
        }
        h.total = swapped.elapsed();
        debug!(plugin = %h.id, kind = ?h.kind, in_flight = h.in_flight, cancelled = h.cancelled,
            drain_ms = h.drain.as_millis() as u64, stop_ms = h.stop.as_millis() as u64,
            start_ms = h.start.as_millis() as u64, "plugin handed over");
        (h, report)
    };
    let mut chains = Vec::new();
    for (n, p) in new.loader().plugins().iter().enumerate() {
        chains.push(chain(old.plugin_index(&p.id), Some(n), p.id.clone()));
    }
    for (o, p) in old.loader().plugins().iter().enumerate() {
        if new.plugin_index(&p.id).is_none() {
            chains.push(chain(Some(o), None, p.id.clone()));
        }
    }
    let mut total = ShutdownReport::default();
    let mut handovers = Vec::with_capacity(chains.len());
    for (h, report) in futures::future::join_all(chains).await {
        total.add(report);
        handovers.push(h);
    }
    // Counted where requests are answered, so a request in flight in two
    // plugins (a core `send` into a channel) counts once.
    total.cancelled_requests = old.cancelled_answers();
    (handovers, total)
}

/// Run `scope`'s connection-closed hooks for `conn`; with `live_only`, skip
/// plugins that already handed over.
fn notify_closed(scope: &RestartScope, conn: ConnId, live_only: bool) {
    let phases = live_only.then(|| scope.plugin_phases());
    for (owner, hook) in scope.registry().connection_closed_hooks() {
        if phases
            .as_ref()
            .is_some_and(|p| p[*owner].1 == PluginPhase::Stopped)
        {
            continue;
        }
        if let Err(p) = panic::catch(|| hook(conn)) {
            let plugin = &scope.registry().plugin_ids()[*owner];
            error!(generation = scope.generation(), plugin = %plugin, panic = %p, "connection-closed hook panicked");
        }
    }
}

fn diff_methods(old: &RestartScope, new: &RestartScope) -> (Vec<String>, Vec<String>) {
    let o: BTreeSet<&str> = old.registry().method_names().into_iter().collect();
    let n: BTreeSet<&str> = new.registry().method_names().into_iter().collect();
    (
        n.difference(&o).map(|s| s.to_string()).collect(),
        o.difference(&n).map(|s| s.to_string()).collect(),
    )
}

fn plugin_reports(old: &RestartScope, new: &RestartScope) -> Vec<PluginReport> {
    new.loader()
        .plugins()
        .iter()
        .map(|p| PluginReport {
            id: p.id.clone(),
            version: p.version.clone(),
            code_hash: p.code_hash.clone(),
            changed: old
                .loader()
                .by_hash(&p.code_hash)
                .is_none_or(|o| o.id != p.id),
            source: match &p.source {
                PluginSource::Builtin => "builtin".into(),
                PluginSource::Manifest(path) => path.display().to_string(),
            },
        })
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::{Gateway, GatewayOptions};
    use crate::config::{GatewayConfig, StaticConfig};
    use crate::loader::Catalog;
    use crate::scope::{CancelReason, Drained};
    use plugin_api::{
        BoxFuture, Channel, ConnId, ErrorCode, NullTransport, OutboundMessage, Params, Plugin,
        PluginFactory, Registrar, RequestContext, RpcError, SendReceipt,
    };
    use serde_json::json;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::time::Instant;

    /// A plugin whose channel `hang` never answers.
    struct Hang;

    impl Plugin for Hang {
        fn id(&self) -> &str {
            "hang"
        }
        fn version(&self) -> &str {
            "1.0.0"
        }
        fn register(&self, r: &mut Registrar) {
            r.channel("hang", Arc::new(Hang));
        }
    }

    impl Channel for Hang {
        fn send(
            self: Arc<Self>,
            _: RequestContext,
            _: OutboundMessage,
        ) -> BoxFuture<Result<SendReceipt, RpcError>> {
            Box::pin(std::future::pending())
        }
    }

    // The core `send` into a channel: only the channel's plugin reaches its
    // drain deadline here (the core plugin is not drained at all), and that
    // alone ends the send, answered as the channel's own requests are.
    #[tokio::test(start_paused = true)]
    async fn the_channels_drain_deadline_alone_cancels_a_core_send_into_it() {
        let state = tempfile::tempdir().unwrap();
        let gw = Gateway::start(GatewayOptions {
            catalog: Catalog::new()
                .with(PluginFactory::new("hang", "1.0.0", |_| Ok(Arc::new(Hang)))),
            config: Arc::new(StaticConfig::new(GatewayConfig::default())),
            state_dir: state.path().to_path_buf(),
            transport: Arc::new(NullTransport),
        })
        .await
        .unwrap();
        let scope = gw.current();
        let send = tokio::spawn({
            let gw = gw.clone();
            let params =
                json!({"channel": "hang", "to": "x", "message": "hi", "idempotencyKey": "k"});
            async move {
                gw.dispatch(
                    RequestContext::internal(ConnId(1)),
                    "send",
                    Params::from_value(&params),
                )
                .await
            }
        });
        while scope.plugin_in_flight("hang") == 0 {
            tokio::task::yield_now().await;
        }
        scope.close_admission();
        let channel = scope.plugin_index("hang").unwrap();
        let t0 = Instant::now();
        let drained = scope
            .drain_plugin(
                channel,
                Duration::from_millis(250),
                CancelReason::Restarting,
            )
            .await;
        let took = t0.elapsed();
        assert_eq!(
            drained,
            Drained {
                in_flight: 1,
                cancelled: 1
            }
        );
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_millis(260),
            "{took:?}"
        );
        tokio::task::yield_now().await;
        assert!(send.is_finished(), "answered at the channel's deadline");
        let err = send.await.unwrap().unwrap_err();
        assert_eq!(err.code, ErrorCode::Unavailable);
        assert_eq!(err.retryable, Some(true));
        assert_eq!(err.details.unwrap()["reason"], "gateway-restarting");
        assert_eq!(scope.in_flight(), 0, "both slots are free");
    }
}
