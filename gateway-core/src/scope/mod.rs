//! `RestartScope`: one generation of plugins, and everything that lives and
//! dies with it.
//!
//! Each plugin of a generation has its own in-flight count, its own request
//! cancellation, its own services and its own life (tasks, handles, sinks),
//! so that at a restart every plugin hands over on its own: its requests in
//! the old generation drain (or are cancelled at the deadline), its old
//! services stop, and only then do its new services start. A slow request of
//! one plugin never holds up another plugin's hand-over.
//!
//! - `admission`: the door and the per-plugin in-flight counts
//!   ([`Admitted`], `PluginUse`).
//! - `invoke`: running an admitted request: wait for its plugin, the
//!   request deadline, cancellation at the drain deadline, panics.
//! - `lifecycle`: a plugin's services start, its requests drain, its
//!   services stop; the whole generation's shutdown ([`ShutdownReport`]).
//! - `health`: each plugin's phase and health, as `health` and `status`
//!   report them.
//!
//! This file holds the scope itself: how a generation is built, what it
//! is made of, and what dropping it ends.

mod admission;
mod health;
mod invoke;
mod lifecycle;

pub use admission::Admitted;
pub(crate) use invoke::run_detached;
/// Named by the gateway's hand-over test; the gateway reads its fields.
#[cfg(test)]
pub(crate) use lifecycle::Drained;
pub use lifecycle::ShutdownReport;

use crate::config::{GatewayConfig, RequestsConfig, RestartConfig};
use crate::frame::Features;
use crate::loader::{BuildError, Catalog, LoadContext, LoaderCache};
use crate::panic;
use crate::registry::{PluginIndex, Registry, RegistryBuilder};
use admission::{Admission, PluginCount};
use plugin_api::host::EventTransport;
use plugin_api::host::LifeController;
use plugin_api::{PluginFactory, Service};
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

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
    /// nothing outside the new scope changes. `config` was checked
    /// ([`GatewayConfig::check`]) when it was read.
    pub(crate) fn build(
        generation: u64,
        config: &GatewayConfig,
        inputs: BuildInputs<'_>,
    ) -> Result<RestartScope, BuildError> {
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

    /// The index of plugin `id`, which matches plugins across generations.
    pub fn plugin_index(&self, id: &str) -> Option<PluginIndex> {
        self.loader.plugins().iter().position(|p| p.id == id)
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
