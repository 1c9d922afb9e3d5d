//! What the host grants its own plugin, handed to the registry and the loader
//! as data so that neither knows any plugin by name.

/// The privileges of the one plugin the host trusts (the core plugin),
/// built by the gateway. The default grants nothing to anyone.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct HostPolicy {
    /// The plugin that may declare host-owned method names and host events.
    pub(crate) privileged: Option<&'static str>,
    /// Methods of the privileged plugin that run outside the scope's
    /// admission (they outlive the generation that admitted them).
    pub(crate) detached: &'static [&'static str],
    /// Plugins that the config may not disable.
    pub(crate) required: &'static [&'static str],
}

impl HostPolicy {
    /// Whether `plugin_id` is the privileged plugin.
    pub(crate) fn is_privileged(&self, plugin_id: &str) -> bool {
        self.privileged == Some(plugin_id)
    }
}
