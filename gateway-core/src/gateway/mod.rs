//! The `Gateway`: the current generation behind one atomic pointer, dispatch,
//! and restarts that build, swap, drain, stop and start.
//!
//! - `dispatch`: the way in. Admission and dispatch of requests to the
//!   generation that admits them, and connection events to every generation
//!   that may hold state for a connection.
//! - `restart`: restart coordination (concurrent triggers coalesce into one
//!   pending restart) and one restart's sequence: build, swap, announce,
//!   hand over, record.
//! - `handover`: one hand-over chain per plugin, all at once: drain and stop
//!   the old instance, start the new one.
//! - `history`: the restart history, the restart and drain counters, and what
//!   a restart reports about methods and plugins.
//! - `control`: the gateway as the core plugin sees it ([`GatewayControl`]).
//!
//! This file holds what a gateway is made of, how a generation is built,
//! and start and shutdown.

mod control;
mod dispatch;
mod handover;
mod history;
mod restart;

use crate::config::{ConfigSource, GatewayConfig};
use crate::core_plugin::{CORE_PLUGIN_ID, ControlLink, GatewayControl, RESTART_METHOD};
use crate::frame::Features;
use crate::loader::{BuildError, Candidate, Catalog};
use crate::policy::HostPolicy;
use crate::report::{GatewayStats, RESTART_HISTORY_LEN, RestartRecord};
use crate::scope::{BuildInputs, RestartScope, ScopeSlot, ShutdownReport};
use arc_swap::ArcSwap;
use plugin_api::host::EventTransport;
use restart::Coordinator;
use std::collections::VecDeque;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
// Tokio's clock, so that restarts measured under a paused test clock are exact.
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::info;

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
        let config = load_config(&options)?;
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

    /// Build a generation from the current config and discard it, reporting
    /// what it would serve. Changes nothing that dispatches. Plugin
    /// processes are not started, so runtime plugins list no methods.
    pub fn validate(&self) -> Result<Vec<String>, BuildError> {
        let config = load_config(&self.inner.options)?;
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

    /// Read and check the config, read the manifests, start the runtime
    /// plugins' processes (all at once, before the swap) and build the new
    /// generation.
    async fn build_next(&self, generation: u64) -> Result<Arc<RestartScope>, BuildError> {
        let config = load_config(&self.inner.options)?;
        let serving = self.current().serving_plugin_ids();
        let manifests = prepare(&self.inner.options, generation, &config, &serving).await?;
        self.build_scope(generation, &config, manifests)
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

/// Read the config and check it ([`GatewayConfig::check`]) before anything
/// (a plugin process above all) runs under it.
fn load_config(options: &GatewayOptions) -> Result<GatewayConfig, BuildError> {
    let config = options.config.load()?;
    config.check()?;
    Ok(config)
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
