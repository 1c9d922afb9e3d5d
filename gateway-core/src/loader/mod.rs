//! Finding, validating and constructing the plugins of one generation.
//!
//! Plugins come from the [`Catalog`] compiled into the binary and from plugin
//! directories on disk, each plugin described by an `openclaw.plugin.json`
//! manifest. Everything is read again for every generation; the
//! [`LoaderCache`] that holds what was loaded belongs to one `RestartScope`.
//! There is no process-wide cache.
//!
//! - `catalog`: the plugins compiled in ([`Catalog`]).
//! - `manifest`: the manifest format ([`Manifest`], [`MANIFEST_FILE`]).
//! - `discovery`: plugin directories read from disk, each manifest
//!   checked and turned into a plugin to construct.
//! - `plugin_config`: each plugin's entry in the gateway config, whether
//!   it is enabled, its config validated against its JSON Schema.
//! - `hash`: the content hash that identifies what was loaded.
//! - `declarative`: the plugin that serves a manifest's methods.
//!
//! This file holds what a generation loaded ([`LoaderCache`],
//! [`LoadedPlugin`]), why a build fails ([`BuildError`]), and the two
//! build steps: `prepare` starts runtime plugins' processes, `load`
//! constructs every enabled plugin.

mod catalog;
mod declarative;
mod discovery;
mod hash;
mod manifest;
mod plugin_config;

pub use catalog::Catalog;
pub(crate) use discovery::discover_manifests;
pub use manifest::{MANIFEST_FILE, Manifest, ManifestHandler, ManifestMethod, ManifestRuntime};

use crate::config::{ConfigError, GatewayConfig};
use crate::policy::HostPolicy;
use catalog::builtin_candidate;
use hash::content_hash;
use plugin_api::host::EventTransport;
use plugin_api::host::LifeController;
use plugin_api::{Plugin, PluginContext, PluginError, PluginFactory};
use plugin_config::{check_entries_known, is_enabled, plugin_config};
use plugin_host::RuntimePlugin;
use rustc_hash::FxHashMap;
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a plugin came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginSource {
    /// The catalog compiled into the binary.
    Builtin,
    /// A manifest file on disk.
    Manifest(PathBuf),
}

impl fmt::Display for PluginSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PluginSource::Builtin => f.write_str("builtin"),
            PluginSource::Manifest(p) => write!(f, "{}", p.display()),
        }
    }
}

/// What kind of code a plugin is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    /// Compiled into the binary.
    Builtin,
    /// A manifest whose methods answer with built-in handlers.
    Manifest,
    /// An OpenClaw-style JS/TS package, run under Node.js.
    Node,
    /// A command plugin speaking the plugin protocol.
    Command,
}

impl PluginKind {
    /// `builtin`, `manifest`, `node` or `command`.
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Builtin => "builtin",
            PluginKind::Manifest => "manifest",
            PluginKind::Node => "node",
            PluginKind::Command => "command",
        }
    }
}

/// One constructed plugin of a generation.
///
/// Its instance and process are not reachable from outside the crate, so
/// nothing calls a plugin past admission and the scope check:
///
/// ```compile_fail
/// fn call_around_admission(p: &gateway_core::LoadedPlugin) {
///     let _ = &p.instance;
/// }
/// ```
///
/// ```compile_fail
/// fn call_process_directly(p: &gateway_core::LoadedPlugin) {
///     let _ = &p.runtime;
/// }
/// ```
pub struct LoadedPlugin {
    /// Plugin id.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Version of the code.
    pub version: String,
    /// Content hash of what was loaded (manifest or code identity, plus config).
    pub code_hash: String,
    /// Where it came from.
    pub source: PluginSource,
    /// The validated config it was constructed with.
    pub config: Value,
    /// The instance. Crate-private: its handlers are reached only through
    /// admission and the scope check (`Gateway::dispatch`).
    pub(crate) instance: Arc<dyn Plugin>,
    /// What kind of code it is.
    pub kind: PluginKind,
    /// Its process, for runtime (node and command) plugins that started.
    /// Crate-private: calls reach it only through admission; see
    /// [`LoadedPlugin::process_status`].
    pub(crate) runtime: Option<Arc<RuntimePlugin>>,
    /// Why its process could not start, for a runtime plugin the
    /// generation went live without.
    pub start_error: Option<String>,
    /// Fixes its event sink's events after `register`; kept by the host,
    /// never given to the plugin.
    pub(crate) declarer: plugin_api::host::EventDeclarer,
}

impl LoadedPlugin {
    /// Its process's state, pid, restarts and last exit, for runtime (node
    /// and command) plugins whose process started.
    pub fn process_status(&self) -> Option<plugin_host::ProcessStatus> {
        self.runtime.as_ref().map(|r| r.status())
    }
}

impl fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("id", &self.id)
            .field("version", &self.version)
            .field("code_hash", &self.code_hash)
            .field("source", &self.source)
            .field("kind", &self.kind)
            .finish()
    }
}

/// What one generation loaded: manifests parsed and instances constructed,
/// keyed by content hash. Owned by the `RestartScope`; dropped with it.
#[derive(Debug, Default)]
pub struct LoaderCache {
    plugins: Vec<LoadedPlugin>,
    by_hash: FxHashMap<String, usize>,
    /// Plugins found but disabled.
    pub disabled: Vec<String>,
}

impl LoaderCache {
    /// Loaded plugins in load order.
    pub fn plugins(&self) -> &[LoadedPlugin] {
        &self.plugins
    }

    /// The plugin loaded with this content hash.
    pub fn by_hash(&self, hash: &str) -> Option<&LoadedPlugin> {
        self.by_hash.get(hash).map(|i| &self.plugins[*i])
    }

    fn push(&mut self, p: LoadedPlugin) {
        self.by_hash.insert(p.code_hash.clone(), self.plugins.len());
        self.plugins.push(p);
    }
}

/// Why a generation could not be built. The old generation keeps serving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildError {
    /// The configuration could not be read or is invalid.
    Config(ConfigError),
    /// A manifest on disk could not be read or parsed.
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// A plugin's constructor failed or panicked.
    Plugin {
        /// The plugin.
        plugin: String,
        /// What went wrong.
        message: String,
    },
    /// The declarations do not form a valid registry.
    Registry(crate::registry::RegistryError),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::Config(e) => e.fmt(f),
            BuildError::Manifest { path, message } => {
                write!(f, "plugin manifest {}: {message}", path.display())
            }
            BuildError::Plugin { plugin, message } => write!(f, "plugin `{plugin}`: {message}"),
            BuildError::Registry(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for BuildError {}

impl From<ConfigError> for BuildError {
    fn from(e: ConfigError) -> Self {
        BuildError::Config(e)
    }
}

/// A plugin found, before construction.
pub(crate) struct Candidate {
    id: String,
    name: String,
    version: String,
    source: PluginSource,
    schema: Option<Value>,
    identity: Vec<u8>,
    create: plugin_api::CreateFn,
    enabled_default: bool,
    kind: PluginKind,
    runtime: RuntimeSlot,
}

/// A runtime plugin's process as the build found it.
pub(crate) enum RuntimeSlot {
    /// Not a runtime plugin.
    None,
    /// To be started by `prepare` (or never, when only validating).
    Launch(crate::runtime::Launch),
    /// Started and handshaken.
    Started(Arc<RuntimePlugin>),
    /// Could not start; the generation goes live without it.
    Failed(String),
}

/// Inputs shared by every plugin constructed for one generation.
pub(crate) struct LoadContext<'a> {
    pub(crate) config: &'a GatewayConfig,
    pub(crate) state_dir: &'a Path,
    pub(crate) generation: u64,
    pub(crate) transport: &'a Arc<dyn EventTransport>,
    /// Which plugins cannot be disabled.
    pub(crate) policy: HostPolicy,
}

/// Find every plugin, validate configs, and construct the enabled ones. Each
/// plugin gets a life of its own (so it can hand over on its own at a
/// restart); the controllers come back in load order.
pub(crate) fn load(
    cx: &LoadContext<'_>,
    core: PluginFactory,
    catalog: &Catalog,
    manifests: Vec<Candidate>,
) -> Result<(LoaderCache, Vec<LifeController>), BuildError> {
    let mut candidates = vec![builtin_candidate(&core)];
    candidates.extend(catalog.factories().iter().map(builtin_candidate));
    candidates.extend(manifests);
    check_unique_ids(&candidates)?;
    check_entries_known(cx.config, &candidates)?;

    let mut cache = LoaderCache::default();
    let mut lives = Vec::new();
    for c in candidates {
        let entry = cx.config.plugins.entries.get(&c.id);
        let enabled = entry.and_then(|e| e.enabled).unwrap_or(c.enabled_default);
        if !enabled && cx.policy.required.contains(&c.id.as_str()) {
            return Err(ConfigError::at_field(
                cx.config.origin.as_ref(),
                &format!("plugins.entries.{}.enabled", c.id),
                format!("the {} plugin cannot be disabled", c.id),
            )
            .into());
        }
        if !enabled {
            cache.disabled.push(c.id);
            continue;
        }
        let config = plugin_config(cx.config, &c)?;
        let code_hash = content_hash(&c.identity, &config);
        let (life, controller) = plugin_api::host::scope_life(cx.generation);
        let (sink, declarer) =
            plugin_api::host::event_sink(&c.id, life.clone(), cx.transport.clone());
        let (runtime, start_error) = match &c.runtime {
            RuntimeSlot::Started(rt) => {
                rt.attach_events(sink.clone());
                (Some(rt.clone()), None)
            }
            RuntimeSlot::Failed(e) => (None, Some(e.clone())),
            RuntimeSlot::None | RuntimeSlot::Launch(_) => (None, None),
        };
        let ctx = PluginContext {
            plugin_id: c.id.clone(),
            config: config.clone(),
            state_dir: cx.state_dir.to_path_buf(),
            events: sink.clone(),
            life,
        };
        let create = c.create.clone();
        let instance = crate::panic::catch(|| create(ctx))
            .map_err(|p| BuildError::Plugin {
                plugin: c.id.clone(),
                message: format!("constructor panicked: {p}"),
            })?
            .map_err(|e: PluginError| BuildError::Plugin {
                plugin: c.id.clone(),
                message: format!("constructor failed: {e}"),
            })?;
        if instance.id() != c.id {
            return Err(BuildError::Plugin {
                plugin: c.id.clone(),
                message: format!("constructed plugin reports id `{}`", instance.id()),
            });
        }
        cache.push(LoadedPlugin {
            id: c.id,
            name: c.name,
            version: c.version,
            code_hash,
            source: c.source,
            config,
            instance,
            kind: c.kind,
            runtime,
            start_error,
            declarer,
        });
        lives.push(controller);
    }
    Ok((cache, lives))
}

/// Start the processes of every enabled runtime plugin among `manifests`,
/// all at once, and wait for their handshakes. A plugin that cannot start
/// fails the build if `serving` lists it (it serves in the current
/// generation); otherwise the generation goes live without it.
pub(crate) async fn prepare(
    config: &GatewayConfig,
    generation: u64,
    state_dir: &Path,
    serving: &[String],
    mut manifests: Vec<Candidate>,
) -> Result<Vec<Candidate>, BuildError> {
    let mut launches = Vec::new();
    for (i, c) in manifests.iter().enumerate() {
        if let RuntimeSlot::Launch(l) = &c.runtime
            && is_enabled(config, c)
        {
            launches.push((i, c.id.clone(), l.clone(), plugin_config(config, c)?));
        }
    }
    if launches.is_empty() {
        return Ok(manifests);
    }
    let started = crate::runtime::start_all(config, generation, state_dir, launches).await;
    for (i, outcome) in started {
        let c = &mut manifests[i];
        c.runtime = match outcome {
            Ok(rt) => {
                let rt = Arc::new(rt);
                c.create = crate::runtime::create_fn(&c.id, &c.version, Some(rt.clone()));
                RuntimeSlot::Started(rt)
            }
            Err(e) if serving.contains(&c.id) => {
                return Err(BuildError::Plugin {
                    plugin: c.id.clone(),
                    message: format!("{e} (the running generation keeps serving it)"),
                });
            }
            Err(e) => {
                tracing::error!(generation, plugin = %c.id, error = %e, "plugin failed to start; the generation goes live without it");
                RuntimeSlot::Failed(e)
            }
        };
    }
    Ok(manifests)
}

fn check_unique_ids(candidates: &[Candidate]) -> Result<(), BuildError> {
    for (i, c) in candidates.iter().enumerate() {
        if let Some(prev) = candidates[..i].iter().find(|p| p.id == c.id) {
            return Err(BuildError::Plugin {
                plugin: c.id.clone(),
                message: format!(
                    "plugin id declared twice: by {} and by {}",
                    prev.source, c.source
                ),
            });
        }
    }
    Ok(())
}
