//! The plugin itself, its construction context and its factory.

use crate::{EventSink, PluginError, Registrar, ScopeHandle, ScopeLife};
use serde_json::Value;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// A plugin instance. One instance lives in exactly one generation: the host
/// constructs a fresh one for every scope it builds.
pub trait Plugin: Send + Sync + 'static {
    /// Stable id, e.g. `bncr`. Must equal the id of the factory or manifest
    /// that produced it.
    fn id(&self) -> &str;
    /// Version of the plugin's code.
    fn version(&self) -> &str;
    /// Declare methods, events, services and channels. Pure: the host may call
    /// it for a scope it then discards.
    fn register(&self, registrar: &mut Registrar);
}

/// What a plugin is given when it is constructed for a generation.
#[derive(Debug, Clone)]
pub struct PluginContext {
    /// The plugin's id.
    pub plugin_id: String,
    /// The plugin's configuration, already validated against its schema
    /// (`{}` when none is configured).
    pub config: Value,
    /// The gateway's state directory; durable files go below it.
    pub state_dir: PathBuf,
    /// Where the plugin's events go.
    pub events: EventSink,
    /// The generation the plugin belongs to.
    pub life: ScopeLife,
}

impl PluginContext {
    /// The generation number.
    pub fn generation(&self) -> u64 {
        self.life.generation()
    }

    /// A new scope-bound handle for plugin state.
    pub fn handle<T>(&self) -> ScopeHandle<T> {
        self.life.handle()
    }
}

/// Constructs a plugin for a generation.
pub type CreateFn =
    Arc<dyn Fn(PluginContext) -> Result<Arc<dyn Plugin>, PluginError> + Send + Sync>;

/// A plugin compiled into the binary: its identity, its config schema and how
/// to construct it.
#[derive(Clone)]
pub struct PluginFactory {
    /// Plugin id.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Code version.
    pub version: String,
    /// Whether the plugin runs when the config does not mention it.
    pub enabled_by_default: bool,
    /// JSON Schema for the plugin's config; `None` accepts any object.
    pub config_schema: Option<Value>,
    /// Constructor.
    pub create: CreateFn,
}

impl fmt::Debug for PluginFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginFactory")
            .field("id", &self.id)
            .field("version", &self.version)
            .field("enabled_by_default", &self.enabled_by_default)
            .finish()
    }
}

impl PluginFactory {
    /// A factory from a constructor closure; enabled by default, no schema.
    pub fn new<F>(id: &str, version: &str, create: F) -> Self
    where
        F: Fn(PluginContext) -> Result<Arc<dyn Plugin>, PluginError> + Send + Sync + 'static,
    {
        PluginFactory {
            id: id.to_string(),
            name: id.to_string(),
            version: version.to_string(),
            enabled_by_default: true,
            config_schema: None,
            create: Arc::new(create),
        }
    }

    /// Set the human-readable name.
    pub fn with_name(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    /// Set the config schema.
    pub fn with_schema(mut self, schema: Value) -> Self {
        self.config_schema = Some(schema);
        self
    }

    /// Run only when the config enables it.
    pub fn disabled_by_default(mut self) -> Self {
        self.enabled_by_default = false;
        self
    }
}
