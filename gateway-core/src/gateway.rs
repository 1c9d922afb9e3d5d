//! The `Gateway`: the current generation behind one atomic pointer, dispatch,
//! and restarts that build, swap, drain, stop and start.

use crate::config::ConfigSource;
use crate::frame::Features;
use crate::loader::{BuildError, Candidate, Catalog, PluginSource};
use crate::panic;
use crate::scope::{Admitted, BuildInputs, RestartScope, ScopeSlot, ShutdownReport};
use arc_swap::ArcSwap;
use plugin_api::{
    ConnId, ConnectionInfo, EventTransport, MethodResult, Params, RequestContext, RpcError,
};
use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tracing::{error, info, warn};

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
    /// From trigger to the new generation serving.
    pub duration: Duration,
    /// Where that time went: build, old generation's drain and stop, new
    /// generation's start.
    pub phases: RestartPhases,
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
    /// Reading config and manifests, constructing plugins, freezing the registry.
    pub build: Duration,
    /// Draining the old generation and stopping its services.
    pub stop_old: Duration,
    /// Starting the new generation's services.
    pub start_new: Duration,
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

/// The last restart, as `status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct RestartRecord {
    /// Whether it succeeded.
    pub ok: bool,
    /// The generation serving afterwards.
    pub generation: u64,
    /// The error, when it failed.
    pub error: Option<String>,
    /// How long it took.
    pub duration_ms: f64,
    /// When it finished (unix ms).
    pub at_ms: u64,
}

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
    /// The last restart.
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

#[derive(Default)]
struct Coordinator {
    running: tokio::sync::Mutex<()>,
    pending: Mutex<Option<watch::Receiver<Option<RestartOutcome>>>>,
}

/// Lets the core plugin reach the gateway without keeping it alive.
pub(crate) type GatewayLink = Arc<OnceLock<std::sync::Weak<Inner>>>;

pub(crate) struct Inner {
    current: ArcSwap<RestartScope>,
    link: GatewayLink,
    options: GatewayOptions,
    coordinator: Coordinator,
    live_scopes: Arc<AtomicUsize>,
    /// The generation being drained by a running restart, for `stats`.
    draining: Mutex<Weak<RestartScope>>,
    restarts_ok: AtomicU64,
    restart_micros_sum: AtomicU64,
    /// Build, stop-old and start-new time of successful restarts, in µs.
    phase_micros_sum: [AtomicU64; 3],
    drain_timeouts: AtomicU64,
    drain_cancelled: AtomicU64,
    restarts_failed: AtomicU64,
    last_restart: Mutex<Option<RestartRecord>>,
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
        let link: GatewayLink = Arc::new(OnceLock::new());
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
            last_restart: Mutex::new(None),
            serving: watch::Sender::new(0),
            closing: AtomicBool::new(false),
            started_at: Instant::now(),
        });
        let _ = link.set(Arc::downgrade(&inner));
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

    /// Admit a request to the current generation: the pointer is read once,
    /// and if that generation closed its door in between, the newer one is
    /// read instead. Fails only while the gateway is stopping.
    pub fn admit(&self) -> Result<Admitted, RpcError> {
        loop {
            // A guard, not a clone: the only reference count taken is the
            // one the admitted request keeps.
            let scope = self.inner.current.load();
            if let Some(a) = RestartScope::try_admit(&scope) {
                return Ok(a);
            }
            if self.inner.closing.load(Ordering::SeqCst)
                || Arc::ptr_eq(&scope, &self.inner.current.load())
            {
                return Err(closing_error());
            }
            std::hint::spin_loop();
        }
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
        let admitted = match self.admit() {
            Ok(a) => a,
            Err(e) => return (0, Err(e)),
        };
        let scope = admitted.scope();
        let generation = scope.generation();
        let Some(entry) = scope.registry().get(method) else {
            return (
                generation,
                Err(RpcError::invalid_request(format!(
                    "unknown method: {method}"
                ))),
            );
        };
        if let Err(e) = RestartScope::authorize(entry, &ctx) {
            return (generation, Err(e));
        }
        if entry.detached {
            let handler = entry.spec.handler.clone();
            drop(admitted);
            return (
                generation,
                crate::scope::run_detached(handler, ctx, params).await,
            );
        }
        (generation, scope.invoke(entry, ctx, params).await)
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

    /// Tell the current generation's plugins that a connection closed.
    pub fn connection_closed(&self, conn: ConnId) {
        let scope = self.inner.current.load();
        for (owner, hook) in scope.registry().connection_closed_hooks() {
            if let Err(p) = panic::catch(|| hook(conn)) {
                let plugin = &scope.registry().plugin_ids()[*owner];
                error!(plugin = %plugin, panic = %p, "connection-closed hook panicked");
            }
        }
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
        config: &crate::GatewayConfig,
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

    /// Restart in-process: build a new generation from config and manifests
    /// read again, swap it in, drain and stop the old one, start the new one.
    /// Concurrent calls coalesce: a call made while a restart runs joins the
    /// one pending restart behind it, which every such caller then shares.
    pub async fn restart(&self) -> RestartOutcome {
        let mut rx = {
            let mut pending = lock(&self.inner.coordinator.pending);
            match &*pending {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    *pending = Some(rx.clone());
                    let gateway = self.clone();
                    tokio::spawn(async move {
                        let _running = gateway.inner.coordinator.running.lock().await;
                        // From here on, new triggers queue a further restart.
                        lock(&gateway.inner.coordinator.pending).take();
                        let started = Instant::now();
                        let outcome =
                            match panic::catch_async(gateway.restart_now(started)).await {
                                Ok(o) => o,
                                Err(p) => Err(gateway
                                    .record_failure(started, format!("restart panicked: {p}"))),
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

    async fn restart_now(&self, started: Instant) -> RestartOutcome {
        if self.inner.closing.load(Ordering::SeqCst) {
            return Err(self.record_failure(started, "gateway is stopping".into()));
        }
        let old_gen = self.current().generation();
        // Restarts are serialized, so the next number is free; a failed build
        // never served and leaves no gap.
        let generation = old_gen + 1;
        info!(from = old_gen, to = generation, "restart started");
        let new = match self.build_next(generation).await {
            Ok(s) => s,
            Err(e) => return Err(self.record_failure(started, e.to_string())),
        };
        let built_at = Instant::now();
        let old = self.inner.current.swap(new.clone());
        let (methods_added, methods_removed) = diff_methods(&old, &new);
        let plugins = plugin_reports(&old, &new);
        *lock(&self.inner.draining) = Arc::downgrade(&old);
        let shutdown = old.shutdown(new.timings().drain_timeout()).await;
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
        let stopped_at = Instant::now();
        new.start_services().await;
        let phases = RestartPhases {
            build: built_at - started,
            stop_old: stopped_at - built_at,
            start_new: stopped_at.elapsed(),
        };
        let failed_plugins: Vec<(String, String)> = new
            .plugin_phases()
            .into_iter()
            .filter_map(|(id, p)| match p {
                crate::PluginPhase::Failed(e) => Some((id.to_string(), e)),
                _ => None,
            })
            .collect();
        self.inner.serving.send_replace(generation);
        let duration = started.elapsed();
        self.inner.restarts_ok.fetch_add(1, Ordering::Relaxed);
        self.inner
            .restart_micros_sum
            .fetch_add(duration.as_micros() as u64, Ordering::Relaxed);
        for (sum, d) in self.inner.phase_micros_sum.iter().zip([
            phases.build,
            phases.stop_old,
            phases.start_new,
        ]) {
            sum.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        }
        self.set_last(RestartRecord {
            ok: true,
            generation,
            error: None,
            duration_ms: duration.as_secs_f64() * 1e3,
            at_ms: unix_ms(),
        });
        info!(
            generation,
            duration_ms = duration.as_secs_f64() * 1e3,
            build_ms = phases.build.as_secs_f64() * 1e3,
            stop_old_ms = phases.stop_old.as_secs_f64() * 1e3,
            start_new_ms = phases.start_new.as_secs_f64() * 1e3,
            added = ?methods_added,
            removed = ?methods_removed,
            changed = ?plugins.iter().filter(|p| p.changed).map(|p| p.id.as_str()).collect::<Vec<_>>(),
            "restart complete; generation {generation} serving"
        );
        Ok(RestartReport {
            generation,
            previous: old_gen,
            duration,
            phases,
            plugins,
            methods_added,
            methods_removed,
            shutdown,
            failed_plugins,
        })
    }

    fn record_failure(&self, started: Instant, error: String) -> RestartFailure {
        let serving = self.current().generation();
        let duration = started.elapsed();
        self.inner.restarts_failed.fetch_add(1, Ordering::Relaxed);
        self.set_last(RestartRecord {
            ok: false,
            generation: serving,
            error: Some(error.clone()),
            duration_ms: duration.as_secs_f64() * 1e3,
            at_ms: unix_ms(),
        });
        error!(generation = serving, error = %error, "restart failed; generation {serving} keeps serving");
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

    fn set_last(&self, record: RestartRecord) {
        *lock(&self.inner.last_restart) = Some(record);
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
        let i = &self.inner;
        GatewayStats {
            generation: i.current.load().generation(),
            live_scopes: i.live_scopes.load(Ordering::SeqCst),
            restarts_ok: i.restarts_ok.load(Ordering::Relaxed),
            restarts_failed: i.restarts_failed.load(Ordering::Relaxed),
            restart_seconds_sum: i.restart_micros_sum.load(Ordering::Relaxed) as f64 / 1e6,
            in_flight: i.current.load().in_flight()
                + lock(&i.draining).upgrade().map_or(0, |s| s.in_flight()),
            last_restart: lock(&i.last_restart).clone(),
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
                }
            },
        }
    }

    /// The transport events go through (the host's connection table).
    pub fn transport(&self) -> &Arc<dyn EventTransport> {
        &self.inner.options.transport
    }

    pub(crate) fn from_inner(inner: Arc<Inner>) -> Gateway {
        Gateway { inner }
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
    config: &crate::GatewayConfig,
    serving: &[String],
) -> Result<Vec<Candidate>, BuildError> {
    let manifests = crate::loader::discover_manifests(&config.plugins.dirs)?;
    crate::loader::prepare(config, generation, &options.state_dir, serving, manifests).await
}

fn build_scope(
    options: &GatewayOptions,
    live_scopes: &Arc<AtomicUsize>,
    link: &GatewayLink,
    generation: u64,
    config: &crate::GatewayConfig,
    manifests: Vec<Candidate>,
) -> Result<Arc<RestartScope>, BuildError> {
    let slot: ScopeSlot = Arc::new(OnceLock::new());
    let inputs = BuildInputs {
        catalog: &options.catalog,
        state_dir: &options.state_dir,
        transport: &options.transport,
        live_scopes,
        core: crate::core_plugin::factory(link.clone(), slot.clone()),
        manifests,
    };
    let scope = Arc::new(RestartScope::build(generation, config, inputs)?);
    let _ = slot.set(Arc::downgrade(&scope));
    Ok(scope)
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

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
