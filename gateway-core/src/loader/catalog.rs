//! The plugins compiled into the binary, and how each becomes a plugin to
//! construct.

use super::{Candidate, PluginKind, PluginSource, RuntimeSlot};
use plugin_api::PluginFactory;

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

pub(super) fn builtin_candidate(f: &PluginFactory) -> Candidate {
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
