//! Finding, validating and constructing the plugins of one generation.
//!
//! Plugins come from the [`Catalog`] compiled into the binary and from plugin
//! directories on disk, each plugin described by an `openclaw.plugin.json`
//! manifest. Everything is read again for every generation; the
//! [`LoaderCache`] that holds what was loaded belongs to one `RestartScope`.
//! There is no process-wide cache.

use crate::config::{ConfigError, ConfigOrigin, GatewayConfig};
use crate::policy::HostPolicy;
use plugin_api::host::LifeController;
use plugin_api::{
    EventTransport, Params, Plugin, PluginContext, PluginError, PluginFactory, Registrar, RpcError,
};
use plugin_host::RuntimePlugin;
use rustc_hash::FxHashMap;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The manifest file name in a plugin directory.
pub const MANIFEST_FILE: &str = "openclaw.plugin.json";

/// The plugins compiled into the binary, in load order.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    factories: Vec<PluginFactory>,
}

impl Catalog {
    /// An empty catalog (the core plugin is always added by the gateway).
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a plugin factory.
    pub fn with(mut self, factory: PluginFactory) -> Self {
        self.factories.push(factory);
        self
    }

    /// The factories, in load order.
    pub fn factories(&self) -> &[PluginFactory] {
        &self.factories
    }
}

/// A plugin manifest (`openclaw.plugin.json`). Unknown fields are ignored so
/// manifests written for other OpenClaw hosts still load.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Plugin id.
    pub id: String,
    /// Human-readable name.
    #[serde(default)]
    pub name: Option<String>,
    /// Version.
    #[serde(default = "default_version")]
    pub version: String,
    /// Whether it runs unless the config says otherwise.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// JSON Schema for the plugin's config.
    #[serde(default)]
    pub config_schema: Option<Value>,
    /// Methods served by built-in implementations or by configuration.
    #[serde(default, deserialize_with = "crate::strict::objects")]
    pub methods: Vec<ManifestMethod>,
    /// Events the plugin declares.
    #[serde(default)]
    pub events: Vec<String>,
    /// A command plugin: the process that speaks the plugin protocol.
    #[serde(default, deserialize_with = "crate::strict::optional_object_only")]
    pub runtime: Option<ManifestRuntime>,
}

/// `runtime` in a manifest: how to run a command plugin.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ManifestRuntime {
    /// Program and arguments (an argv, never a shell string); a relative
    /// program path resolves inside the plugin's directory.
    pub command: Vec<String>,
}

fn default_version() -> String {
    "0.0.0".into()
}

/// A method declared in a manifest.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ManifestMethod {
    /// Method name.
    pub name: String,
    /// Required scope; `"none"` for none; `operator.admin` when absent.
    #[serde(default)]
    pub scope: Option<String>,
    /// Listed in `features.methods` (default true).
    #[serde(default = "yes")]
    pub advertise: bool,
    /// Which built-in implementation serves it.
    #[serde(default)]
    pub handler: ManifestHandler,
    /// The reply for `handler = "reply"`; the plugin config's
    /// `replies.<method>` overrides it.
    #[serde(default)]
    pub reply: Option<Value>,
    /// Delay for `handler = "sleep"` (params `ms` override it).
    #[serde(default)]
    pub ms: Option<u64>,
}

fn yes() -> bool {
    true
}

/// Built-in implementations a manifest method can name.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ManifestHandler {
    /// Answer the configured reply (or `{"ok":true,"method":..}`).
    #[default]
    Reply,
    /// Answer the params back.
    Echo,
    /// Sleep `ms` then answer `{"slept":ms}`.
    Sleep,
    /// Answer an `UNAVAILABLE` error with the reply's text.
    Error,
    /// Panic (to exercise the host's panic handling).
    Panic,
}

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
    pub(crate) declarer: plugin_api::EventDeclarer,
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

/// A candidate's config from `[plugins.entries.<id>]` (`{}` when absent),
/// validated against its schema.
fn plugin_config(config: &GatewayConfig, c: &Candidate) -> Result<Value, BuildError> {
    let value = config
        .plugins
        .entries
        .get(&c.id)
        .and_then(|e| e.config.clone())
        .unwrap_or_else(|| Value::Object(Default::default()));
    validate_config(config.origin.as_ref(), &c.id, c.schema.as_ref(), &value)?;
    Ok(value)
}

/// Whether a candidate runs in this config.
fn is_enabled(config: &GatewayConfig, c: &Candidate) -> bool {
    config
        .plugins
        .entries
        .get(&c.id)
        .and_then(|e| e.enabled)
        .unwrap_or(c.enabled_default)
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

fn builtin_candidate(f: &PluginFactory) -> Candidate {
    let identity = format!("builtin\0{}\0{}\0{}", f.id, f.version, f.name).into_bytes();
    Candidate {
        id: f.id.clone(),
        name: f.name.clone(),
        version: f.version.clone(),
        source: PluginSource::Builtin,
        schema: f.config_schema.clone(),
        identity,
        create: f.create.clone(),
        enabled_default: f.enabled_by_default,
        kind: PluginKind::Builtin,
        runtime: RuntimeSlot::None,
    }
}

/// Every plugin described by a manifest in `dirs`, read from disk now.
pub(crate) fn discover_manifests(dirs: &[PathBuf]) -> Result<Vec<Candidate>, BuildError> {
    let mut found = Vec::new();
    for dir in dirs {
        if let Some(c) = manifest_candidate(&dir.join(MANIFEST_FILE))? {
            found.push(c);
            continue;
        }
        let entries = std::fs::read_dir(dir).map_err(|e| BuildError::Manifest {
            path: dir.clone(),
            message: format!("cannot read plugin directory: {e}"),
        })?;
        let mut here: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path().join(MANIFEST_FILE))
            .collect();
        here.sort();
        for path in here {
            found.extend(manifest_candidate(&path)?);
        }
    }
    Ok(found)
}

/// The plugin described by the manifest at `path`; `None` when there is no
/// file there (a subdirectory without a manifest is not a plugin).
fn manifest_candidate(path: &Path) -> Result<Option<Candidate>, BuildError> {
    let bad = |message: String| BuildError::Manifest {
        path: path.to_path_buf(),
        message,
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(bad(format!("cannot read: {e}"))),
    };
    // Straight from bytes to `Manifest`: no intermediate JSON tree.
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let crate::strict::Object(manifest): crate::strict::Object<Manifest> =
        serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let inner = e.inner();
            if inner.is_syntax() || inner.is_eof() {
                bad(format!("invalid JSON: {inner}"))
            } else {
                bad(format!("field `{}`: {inner}", e.path()))
            }
        })?;
    de.end().map_err(|e| bad(format!("invalid JSON: {e}")))?;
    if manifest.id.is_empty() || manifest.id.contains(char::is_whitespace) {
        return Err(bad(format!("invalid plugin id {:?}", manifest.id)));
    }
    if let Some(schema) = &manifest.config_schema {
        jsonschema::validator_for(schema).map_err(|e| bad(format!("invalid configSchema: {e}")))?;
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let (entry, broken) = match plugin_host::node::openclaw_entry(dir) {
        Ok(e) => (e, None),
        Err(e) => (None, Some(e)),
    };
    let launch = match (&manifest.runtime, entry) {
        _ if broken.is_some() => Some(crate::runtime::Launch::broken_node(
            dir,
            broken.unwrap_or_default(),
        )),
        (Some(_), Some(entry)) => {
            return Err(bad(format!(
                "both runtime.command and a JS entry module ({}) are given; keep one",
                entry.display()
            )));
        }
        (Some(rt), None) => Some(crate::runtime::Launch::command(dir, &rt.command).map_err(&bad)?),
        (None, Some(entry)) => Some(crate::runtime::Launch::node(dir, entry)),
        (None, None) if manifest.methods.is_empty() => {
            return Err(bad(
                "declares no methods, has no entry module (package.json openclaw.extensions) and no runtime.command: it would serve nothing".into(),
            ));
        }
        (None, None) => None,
    };
    if launch.is_some() && !manifest.methods.is_empty() {
        return Err(bad(
            "`methods` is for manifest-only plugins; a plugin with code declares its methods when it starts".into(),
        ));
    }
    let mut identity = b"manifest\0".to_vec();
    identity.extend_from_slice(&bytes);
    if let Some(l) = &launch {
        identity.extend_from_slice(b"\0code\0");
        identity.extend_from_slice(l.code_hash().as_bytes());
    }
    let m = Arc::new(manifest);
    let create_m = m.clone();
    let (kind, runtime) = match launch {
        Some(l) if l.is_node() => (PluginKind::Node, RuntimeSlot::Launch(l)),
        Some(l) => (PluginKind::Command, RuntimeSlot::Launch(l)),
        None => (PluginKind::Manifest, RuntimeSlot::None),
    };
    // A runtime plugin serves what its process declares; until `prepare`
    // starts it (a validation-only build never does), it serves nothing.
    let create: plugin_api::CreateFn = match &runtime {
        RuntimeSlot::Launch(_) => crate::runtime::create_fn(&m.id, &m.version, None),
        _ => Arc::new(move |ctx: PluginContext| {
            Ok(Arc::new(DeclarativePlugin::new(create_m.clone(), &ctx.config)) as Arc<dyn Plugin>)
        }),
    };
    Ok(Some(Candidate {
        id: m.id.clone(),
        name: m.name.clone().unwrap_or_else(|| m.id.clone()),
        version: m.version.clone(),
        source: PluginSource::Manifest(path.to_path_buf()),
        schema: m.config_schema.clone(),
        identity,
        create,
        enabled_default: m.enabled.unwrap_or(true),
        kind,
        runtime,
    }))
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

fn check_entries_known(config: &GatewayConfig, candidates: &[Candidate]) -> Result<(), BuildError> {
    for id in config.plugins.entries.keys() {
        if !candidates.iter().any(|c| &c.id == id) {
            let mut known: Vec<&str> = candidates.iter().map(|c| c.id.as_str()).collect();
            known.sort_unstable();
            return Err(ConfigError::at_field(
                config.origin.as_ref(),
                &format!("plugins.entries.{id}"),
                format!("no plugin with id `{id}` (known: {})", known.join(", ")),
            )
            .into());
        }
    }
    Ok(())
}

fn validate_config(
    origin: Option<&ConfigOrigin>,
    plugin: &str,
    schema: Option<&Value>,
    config: &Value,
) -> Result<(), BuildError> {
    let base = format!("plugins.entries.{plugin}.config");
    let Some(schema) = schema else {
        if config.is_object() {
            return Ok(());
        }
        return Err(ConfigError::at_field(origin, &base, "must be a table").into());
    };
    let validator = jsonschema::validator_for(schema).map_err(|e| BuildError::Plugin {
        plugin: plugin.into(),
        message: format!("invalid config schema: {e}"),
    })?;
    if let Some(err) = validator.iter_errors(config).next() {
        let pointer = err.instance_path().to_string();
        let field = pointer
            .split('/')
            .filter(|s| !s.is_empty())
            .fold(base, |acc, seg| format!("{acc}.{seg}"));
        return Err(ConfigError::at_field(origin, &field, err.to_string()).into());
    }
    Ok(())
}

fn content_hash(identity: &[u8], config: &Value) -> String {
    let mut h = Sha256::new();
    h.update(identity);
    h.update(b"\0config\0");
    h.update(config.to_string().as_bytes());
    hex::encode(&h.finalize()[..8])
}

/// Serves the methods a manifest declares, with built-in implementations.
struct DeclarativePlugin {
    manifest: Arc<Manifest>,
    replies: FxHashMap<String, Value>,
}

impl DeclarativePlugin {
    fn new(manifest: Arc<Manifest>, config: &Value) -> Self {
        let replies = config
            .get("replies")
            .and_then(Value::as_object)
            .map(|o| o.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        DeclarativePlugin { manifest, replies }
    }
}

impl Plugin for DeclarativePlugin {
    fn id(&self) -> &str {
        &self.manifest.id
    }

    fn version(&self) -> &str {
        &self.manifest.version
    }

    fn register(&self, r: &mut Registrar) {
        for e in &self.manifest.events {
            r.event(e.clone());
        }
        for m in &self.manifest.methods {
            let b = crate::registry::declare_method(r, &m.name, m.scope.as_deref(), m.advertise);
            let name = m.name.clone();
            let reply = self
                .replies
                .get(&m.name)
                .cloned()
                .or_else(|| m.reply.clone())
                .unwrap_or_else(|| serde_json::json!({ "ok": true, "method": name }));
            match m.handler {
                ManifestHandler::Reply => b.sync(move |_, _| Ok(reply.clone())),
                ManifestHandler::Echo => b.sync(|_, p: Params| Ok(p.to_value())),
                ManifestHandler::Error => {
                    let text = reply
                        .as_str()
                        .map_or_else(|| reply.to_string(), str::to_string);
                    b.sync(move |_, _| Err(RpcError::unavailable(text.clone())))
                }
                ManifestHandler::Panic => b.sync(move |_, _| panic!("{name} panicked on purpose")),
                ManifestHandler::Sleep => {
                    let default_ms = m.ms.unwrap_or(100);
                    b.handler(move |_, p: Params| async move {
                        let ms = p
                            .to_value()
                            .get("ms")
                            .and_then(Value::as_u64)
                            .unwrap_or(default_ms);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        Ok(serde_json::json!({ "slept": ms }))
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_parses_with_unknown_fields_and_defaults() {
        let m: Manifest = serde_json::from_str(
            r#"{"id":"demo","kind":"tool","methods":[{"name":"demo.a"},{"name":"demo.b","handler":"echo","scope":"none","advertise":false}]}"#,
        )
        .unwrap();
        assert_eq!(m.version, "0.0.0");
        assert_eq!(m.methods[0].handler, ManifestHandler::Reply);
        assert!(m.methods[0].advertise);
        assert_eq!(m.methods[1].handler, ManifestHandler::Echo);
        assert!(!m.methods[1].advertise);
    }

    #[test]
    fn manifest_parts_are_objects_not_arrays() {
        let parse =
            |text: &str| serde_json::from_str::<crate::strict::Object<Manifest>>(text).map(|o| o.0);
        assert!(parse(r#"{"id":"d","methods":[{"name":"d.a"}],"runtime":null}"#).is_ok());
        for bad in [
            r#"{"id":"d","methods":[["d.a"]]}"#,
            r#"["d"]"#,
            r#"{"id":"d","runtime":[["node","x.js"]]}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn content_hash_changes_with_identity_and_config() {
        let a = content_hash(b"x", &serde_json::json!({}));
        assert_eq!(a, content_hash(b"x", &serde_json::json!({})));
        assert_ne!(a, content_hash(b"y", &serde_json::json!({})));
        assert_ne!(a, content_hash(b"x", &serde_json::json!({"k": 1})));
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn schema_errors_name_the_field() {
        let schema = serde_json::json!({
            "type":"object","additionalProperties":false,
            "properties":{"mode":{"enum":["a","b"]}}
        });
        let origin = ConfigOrigin {
            path: "g.toml".into(),
            text: "[plugins.entries.p.config]\nmode = \"c\"\n".into(),
        };
        let err = validate_config(
            Some(&origin),
            "p",
            Some(&schema),
            &serde_json::json!({"mode":"c"}),
        )
        .unwrap_err();
        let BuildError::Config(e) = err else {
            panic!("expected config error")
        };
        assert_eq!(e.field.as_deref(), Some("plugins.entries.p.config.mode"));
        assert_eq!(e.line, Some(2));
        assert!(
            validate_config(None, "p", Some(&schema), &serde_json::json!({"mode":"a"})).is_ok()
        );
        assert!(validate_config(None, "p", None, &serde_json::json!(3)).is_err());
    }
}
