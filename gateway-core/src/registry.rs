//! The method registry of one generation: immutable once built.
//!
//! Dispatch, `features.methods` and the method list in `status` all read the
//! same `Registry`; the advertised list is derived from the dispatch map when
//! the registry is built, so there is no second copy that could drift.

use crate::frame::Features;
use crate::policy::HostPolicy;
use plugin_api::host::{Declarations, MethodSpec};
use plugin_api::{
    Channel, ConnectionClosedHook, ConnectionOpenedHook, HealthCheck, MethodBuilder, Registrar,
    RequestContext, RequiredScope, Role, RpcError, scope,
};
use rustc_hash::FxHashMap;
use std::fmt;
use std::sync::Arc;

/// Method names the core plugin owns; no other plugin may take them.
pub const CORE_METHODS: &[&str] = &["health", "status", "gateway.restart", "send"];

/// Names used by the handshake itself.
pub const HANDSHAKE_METHODS: &[&str] = &["connect"];

/// Prefixes whose methods always need `operator.admin`.
pub const ADMIN_PREFIXES: &[&str] = &["config.", "exec.approvals.", "wizard.", "update."];

/// Methods under an admin prefix that need `operator.read` instead, as in
/// OpenClaw: `config.get` answers with every secret redacted, and
/// `openclaw gateway probe` reads it holding only `operator.read`.
pub const READ_EXCEPTIONS: &[&str] = &["config.get"];

/// Index of a plugin within its scope, in load order.
pub type PluginIndex = usize;

/// One dispatchable method.
#[derive(Debug)]
pub struct MethodEntry {
    /// The plugin that declared it.
    pub owner: PluginIndex,
    /// The declaration, with the scope the gateway enforces. Crate-private:
    /// the handler is reached only through `Gateway::dispatch`, after
    /// admission and the scope check.
    pub(crate) spec: MethodSpec,
    /// Runs outside the scope's admission (only the core `gateway.restart`,
    /// which waits for the very drain it would otherwise block).
    pub(crate) detached: bool,
}

impl MethodEntry {
    /// Check the caller's role and scopes against this method.
    pub(crate) fn authorize(&self, ctx: &RequestContext) -> Result<(), RpcError> {
        let spec = &self.spec;
        // A node may call node-only and scope-free methods, an operator
        // anything but node-only ones; either way the scope check follows (a
        // node-only `config.*` method needs operator.admin like any other).
        if ctx.role() == Role::Node {
            if !spec.node_only && spec.scope != RequiredScope::None {
                return Err(RpcError::forbidden(format!(
                    "method {} is not available to node connections",
                    spec.name
                ))
                .with_details(serde_json::json!({"code": "ROLE_NOT_ALLOWED", "role": "node"})));
            }
        } else if spec.node_only {
            return Err(RpcError::forbidden(format!(
                "method {} requires the node role",
                spec.name
            ))
            .with_details(serde_json::json!({"code": "NODE_ROLE_REQUIRED"})));
        }
        match &spec.scope {
            RequiredScope::None => Ok(()),
            RequiredScope::Scope(s) if ctx.scopes().allows(s) => Ok(()),
            RequiredScope::Scope(s) => Err(RpcError::forbidden(format!("missing scope: {s}"))
                .with_details(serde_json::json!({
                    "code": "MISSING_SCOPE",
                    "missingScope": s,
                    "requiredScopes": [s],
                }))),
        }
    }
}

/// A channel the core `send` method can route to.
#[derive(Clone)]
pub struct ChannelEntry {
    /// The plugin that declared it.
    pub owner: PluginIndex,
    /// The channel; reached only through the core `send` method.
    pub(crate) channel: Arc<dyn Channel>,
}

impl fmt::Debug for ChannelEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelEntry")
            .field("owner", &self.owner)
            .finish()
    }
}

impl MethodEntry {
    /// The method name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The scope a caller must hold.
    pub fn required_scope(&self) -> &plugin_api::RequiredScope {
        &self.spec.scope
    }

    /// Whether `features.methods` lists it.
    pub fn is_advertised(&self) -> bool {
        self.spec.advertise
    }

    /// Whether only node-role connections may call it.
    pub fn is_node_only(&self) -> bool {
        self.spec.node_only
    }
}

/// The immutable method registry of one generation.
pub struct Registry {
    owners: Vec<String>,
    methods: FxHashMap<Box<str>, MethodEntry>,
    features: Features,
    channels: FxHashMap<String, ChannelEntry>,
    closed_hooks: Vec<(PluginIndex, ConnectionClosedHook)>,
    opened_hooks: Vec<(PluginIndex, ConnectionOpenedHook)>,
    health_checks: Vec<(PluginIndex, HealthCheck)>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("plugins", &self.owners)
            .field("methods", &self.methods.len())
            .field("advertised", &self.features.methods.len())
            .finish()
    }
}

impl Registry {
    /// The entry for `method`: one hash lookup.
    #[inline]
    pub fn get(&self, method: &str) -> Option<&MethodEntry> {
        self.methods.get(method)
    }

    /// What this registry advertises.
    pub fn features(&self) -> &Features {
        &self.features
    }

    /// Every dispatchable method name, advertised or not, sorted.
    pub fn method_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.methods.keys().map(|k| &**k).collect();
        names.sort_unstable();
        names
    }

    /// The plugin id owning `method`.
    pub fn owner_of(&self, method: &str) -> Option<&str> {
        self.get(method).map(|e| self.owners[e.owner].as_str())
    }

    /// Plugin ids in load order.
    pub fn plugin_ids(&self) -> &[String] {
        &self.owners
    }

    /// The channel with id `id`.
    pub fn channel(&self, id: &str) -> Option<&ChannelEntry> {
        self.channels.get(id)
    }

    /// Channel ids, sorted.
    pub fn channel_ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.channels.keys().map(String::as_str).collect();
        ids.sort_unstable();
        ids
    }

    /// Connection-closed hooks with their owners.
    pub(crate) fn connection_closed_hooks(&self) -> &[(PluginIndex, ConnectionClosedHook)] {
        &self.closed_hooks
    }

    /// Connection-opened hooks with their owners.
    pub(crate) fn connection_opened_hooks(&self) -> &[(PluginIndex, ConnectionOpenedHook)] {
        &self.opened_hooks
    }

    /// Health checks with their owners.
    pub(crate) fn health_checks(&self) -> &[(PluginIndex, HealthCheck)] {
        &self.health_checks
    }
}

/// Why a registry could not be built. Each names the plugins involved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryError {
    /// Two plugins declared one method name.
    DuplicateMethod {
        /// The method.
        method: String,
        /// The plugin that declared it first.
        first: String,
        /// The plugin that declared it again.
        second: String,
    },
    /// A plugin declared a name the core owns.
    ReservedMethod {
        /// The method.
        method: String,
        /// The offending plugin.
        plugin: String,
    },
    /// A method name was empty or had whitespace.
    InvalidName {
        /// The method.
        method: String,
        /// The offending plugin.
        plugin: String,
    },
    /// Two plugins declared one channel id.
    DuplicateChannel {
        /// The channel.
        channel: String,
        /// First declarer.
        first: String,
        /// Second declarer.
        second: String,
    },
    /// A plugin declared an event name it may not emit: one the gateway
    /// itself emits ([`plugin_api::RESERVED_EVENTS`]), or a `chat.*` event
    /// without declaring a channel.
    ReservedEvent {
        /// The event.
        event: String,
        /// The offending plugin.
        plugin: String,
    },
    /// Two plugins share an id.
    DuplicatePlugin {
        /// The plugin id.
        plugin: String,
    },
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryError::DuplicateMethod {
                method,
                first,
                second,
            } => write!(
                f,
                "duplicate method `{method}`: declared by plugin `{first}` and by plugin `{second}`"
            ),
            RegistryError::ReservedMethod { method, plugin } => write!(
                f,
                "plugin `{plugin}` may not declare `{method}`: the name is reserved for the core"
            ),
            RegistryError::InvalidName { method, plugin } => {
                write!(
                    f,
                    "plugin `{plugin}` declared an invalid method name {method:?}"
                )
            }
            RegistryError::DuplicateChannel {
                channel,
                first,
                second,
            } => write!(
                f,
                "duplicate channel `{channel}`: declared by plugin `{first}` and by plugin `{second}`"
            ),
            RegistryError::ReservedEvent { event, plugin } => write!(
                f,
                "plugin `{plugin}` may not declare event `{event}`: {}",
                if event.starts_with("chat.") {
                    "chat.* events belong to plugins that declare a channel"
                } else {
                    "the gateway itself emits it"
                }
            ),
            RegistryError::DuplicatePlugin { plugin } => {
                write!(f, "plugin id `{plugin}` is loaded twice")
            }
        }
    }
}

impl std::error::Error for RegistryError {}

/// Collects plugin declarations and checks them into a [`Registry`].
#[derive(Default)]
pub struct RegistryBuilder {
    owners: Vec<String>,
    methods: FxHashMap<Box<str>, MethodEntry>,
    events: Vec<String>,
    channels: FxHashMap<String, ChannelEntry>,
    closed_hooks: Vec<(PluginIndex, ConnectionClosedHook)>,
    opened_hooks: Vec<(PluginIndex, ConnectionOpenedHook)>,
    health_checks: Vec<(PluginIndex, HealthCheck)>,
    policy: HostPolicy,
}

impl fmt::Debug for RegistryBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryBuilder")
            .field("plugins", &self.owners)
            .field("methods", &self.methods.len())
            .finish()
    }
}

impl RegistryBuilder {
    /// An empty builder that grants no plugin the host's names.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty builder that grants `policy.privileged` the host's names.
    pub(crate) fn with_policy(policy: HostPolicy) -> Self {
        Self {
            policy,
            ..Self::default()
        }
    }

    /// Add one plugin's declarations. On error nothing of this plugin is kept,
    /// but the builder as a whole should be discarded: the build has failed.
    pub fn add_plugin(
        &mut self,
        plugin_id: &str,
        decl: Declarations,
    ) -> Result<PluginIndex, RegistryError> {
        if self.owners.iter().any(|o| o == plugin_id) {
            return Err(RegistryError::DuplicatePlugin {
                plugin: plugin_id.to_string(),
            });
        }
        let core = self.policy.is_privileged(plugin_id);
        let index = self.owners.len();
        // Check everything before inserting anything.
        let mut seen: Vec<&str> = Vec::with_capacity(decl.methods.len());
        for m in &decl.methods {
            let name = m.name.as_str();
            if name.is_empty() || name.chars().any(char::is_whitespace) {
                return Err(RegistryError::InvalidName {
                    method: m.name.clone(),
                    plugin: plugin_id.into(),
                });
            }
            let reserved = CORE_METHODS.contains(&name) || HANDSHAKE_METHODS.contains(&name);
            if reserved && !core {
                return Err(RegistryError::ReservedMethod {
                    method: m.name.clone(),
                    plugin: plugin_id.into(),
                });
            }
            if let Some(prev) = self.methods.get(name) {
                return Err(RegistryError::DuplicateMethod {
                    method: m.name.clone(),
                    first: self.owners[prev.owner].clone(),
                    second: plugin_id.into(),
                });
            }
            if seen.contains(&name) {
                return Err(RegistryError::DuplicateMethod {
                    method: m.name.clone(),
                    first: plugin_id.into(),
                    second: plugin_id.into(),
                });
            }
            seen.push(name);
        }
        for e in &decl.events {
            let chat_without_channel = e.starts_with("chat.") && decl.channels.is_empty();
            if !core && (plugin_api::is_reserved_event(e) || chat_without_channel) {
                return Err(RegistryError::ReservedEvent {
                    event: e.clone(),
                    plugin: plugin_id.into(),
                });
            }
        }
        for (id, _) in &decl.channels {
            if let Some(prev) = self.channels.get(id) {
                return Err(RegistryError::DuplicateChannel {
                    channel: id.clone(),
                    first: self.owners[prev.owner].clone(),
                    second: plugin_id.into(),
                });
            }
        }
        self.owners.push(plugin_id.to_string());
        for mut spec in decl.methods {
            if READ_EXCEPTIONS.contains(&spec.name.as_str()) {
                spec.scope = RequiredScope::Scope(scope::READ.to_string());
            } else if ADMIN_PREFIXES.iter().any(|p| spec.name.starts_with(p)) {
                spec.scope = RequiredScope::Scope(scope::ADMIN.to_string());
            }
            let detached = core && self.policy.detached.contains(&spec.name.as_str());
            self.methods.insert(
                spec.name.clone().into_boxed_str(),
                MethodEntry {
                    owner: index,
                    spec,
                    detached,
                },
            );
        }
        for e in decl.events {
            if !self.events.contains(&e) {
                self.events.push(e);
            }
        }
        for (id, channel) in decl.channels {
            self.channels.insert(
                id,
                ChannelEntry {
                    owner: index,
                    channel,
                },
            );
        }
        self.closed_hooks
            .extend(decl.connection_closed.into_iter().map(|hook| (index, hook)));
        self.opened_hooks
            .extend(decl.connection_opened.into_iter().map(|hook| (index, hook)));
        self.health_checks
            .extend(decl.health.into_iter().map(|check| (index, check)));
        Ok(index)
    }

    /// Freeze into a registry. The advertised list is derived here from the
    /// dispatch map itself.
    pub fn build(self) -> Registry {
        let mut advertised: Vec<String> = self
            .methods
            .values()
            .filter(|e| e.spec.advertise)
            .map(|e| e.spec.name.clone())
            .collect();
        advertised.sort_unstable();
        let mut events = self.events;
        events.sort_unstable();
        Registry {
            owners: self.owners,
            methods: self.methods,
            features: Features {
                methods: advertised.into(),
                events: events.into(),
            },
            channels: self.channels,
            closed_hooks: self.closed_hooks,
            opened_hooks: self.opened_hooks,
            health_checks: self.health_checks,
        }
    }
}

/// Start declaring method `name` with a manifest-style scope (absent:
/// `operator.admin`; `"none"`: no scope) and advertise flag.
pub(crate) fn declare_method<'r>(
    r: &'r mut Registrar,
    name: &str,
    scope: Option<&str>,
    advertise: bool,
) -> MethodBuilder<'r> {
    let b = r.method(name);
    let b = match scope {
        None => b.scope(scope::ADMIN),
        Some("none") => b.no_scope(),
        Some(s) => b.scope(s),
    };
    if advertise { b } else { b.hidden() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::Value;

    fn decl(plugin: &str, methods: &[&str]) -> Declarations {
        let mut r = plugin_api::host::registrar(plugin);
        for m in methods {
            r.method(*m).sync(|_, _| Ok(Value::Null));
        }
        plugin_api::host::declarations(r)
    }

    #[test]
    fn duplicate_across_plugins_names_both_owners() {
        let mut b = RegistryBuilder::new();
        b.add_plugin("alpha", decl("alpha", &["shared.m"])).unwrap();
        let err = b
            .add_plugin("beta", decl("beta", &["beta.x", "shared.m"]))
            .unwrap_err();
        assert_eq!(
            err,
            RegistryError::DuplicateMethod {
                method: "shared.m".into(),
                first: "alpha".into(),
                second: "beta".into()
            }
        );
        let text = err.to_string();
        assert!(text.contains("alpha") && text.contains("beta"), "{text}");
        // Nothing of the failed plugin leaked into the builder.
        let reg = b.build();
        assert!(reg.get("beta.x").is_none());
    }

    #[test]
    fn duplicate_within_one_plugin_fails() {
        let mut b = RegistryBuilder::new();
        assert!(matches!(
            b.add_plugin("a", decl("a", &["a.m", "a.m"])),
            Err(RegistryError::DuplicateMethod { .. })
        ));
    }

    #[test]
    fn plugins_cannot_take_core_names() {
        for name in ["health", "status", "gateway.restart", "send", "connect"] {
            let mut b = RegistryBuilder::new();
            let err = b.add_plugin("evil", decl("evil", &[name])).unwrap_err();
            assert!(
                matches!(err, RegistryError::ReservedMethod { .. }),
                "{name}"
            );
        }
    }

    #[test]
    fn reserved_prefixes_need_admin() {
        let mut r = plugin_api::host::registrar("p");
        r.method("config.set")
            .scope(scope::READ)
            .sync(|_, _| Ok(Value::Null));
        r.method("wizard.run")
            .no_scope()
            .sync(|_, _| Ok(Value::Null));
        r.method("p.read")
            .scope(scope::READ)
            .sync(|_, _| Ok(Value::Null));
        // config.get needs exactly operator.read, whatever was declared.
        r.method("config.get")
            .no_scope()
            .sync(|_, _| Ok(Value::Null));
        let mut b = RegistryBuilder::new();
        b.add_plugin("p", plugin_api::host::declarations(r))
            .unwrap();
        let reg = b.build();
        for m in ["config.set", "wizard.run"] {
            assert_eq!(reg.get(m).unwrap().spec.scope.as_str(), Some(scope::ADMIN));
        }
        assert_eq!(
            reg.get("config.get").unwrap().spec.scope.as_str(),
            Some(scope::READ)
        );
        assert_eq!(
            reg.get("p.read").unwrap().spec.scope.as_str(),
            Some(scope::READ)
        );
    }

    #[test]
    fn advertised_list_is_derived_from_the_dispatch_map() {
        let mut r = plugin_api::host::registrar("p");
        r.method("p.b").sync(|_, _| Ok(Value::Null));
        r.method("p.a").sync(|_, _| Ok(Value::Null));
        r.method("p.hidden").hidden().sync(|_, _| Ok(Value::Null));
        r.event("plugin.p.e");
        let mut b = RegistryBuilder::new();
        b.add_plugin("p", plugin_api::host::declarations(r))
            .unwrap();
        let reg = b.build();
        assert_eq!(
            &*reg.features().methods,
            &["p.a".to_string(), "p.b".to_string()]
        );
        for m in reg.features().methods.iter() {
            assert!(reg.get(m).is_some());
        }
        assert!(reg.get("p.hidden").is_some());
        assert_eq!(reg.method_names(), vec!["p.a", "p.b", "p.hidden"]);
        assert_eq!(reg.owner_of("p.a"), Some("p"));
        assert_eq!(&*reg.features().events, &["plugin.p.e".to_string()]);
    }

    #[test]
    fn plugins_cannot_declare_host_events_and_chat_needs_a_channel() {
        for name in plugin_api::RESERVED_EVENTS.iter().chain(&["chat.inbound"]) {
            let mut r = plugin_api::host::registrar("evil");
            r.event(*name);
            let err = RegistryBuilder::new()
                .add_plugin("evil", plugin_api::host::declarations(r))
                .unwrap_err();
            assert_eq!(
                err,
                RegistryError::ReservedEvent {
                    event: name.to_string(),
                    plugin: "evil".into()
                }
            );
        }
        struct Nowhere;
        impl plugin_api::Channel for Nowhere {
            fn send(
                self: Arc<Self>,
                _ctx: plugin_api::RequestContext,
                _msg: plugin_api::OutboundMessage,
            ) -> plugin_api::BoxFuture<Result<plugin_api::SendReceipt, plugin_api::RpcError>>
            {
                Box::pin(async { Err(plugin_api::RpcError::unavailable("nowhere")) })
            }
        }
        let mut r = plugin_api::host::registrar("bridge");
        r.event("chat.inbound").channel("bridge", Arc::new(Nowhere));
        assert!(
            RegistryBuilder::new()
                .add_plugin("bridge", plugin_api::host::declarations(r))
                .is_ok()
        );
    }

    #[test]
    fn node_only_methods_keep_their_scope_check() {
        use plugin_api::{ClientInfo, ConnId, ConnectionInfo, RequestContext, Role, Scopes};
        let mut r = plugin_api::host::registrar("p");
        r.method("config.node.apply")
            .node_only()
            .no_scope()
            .sync(|_, _| Ok(Value::Null));
        r.method("p.node.report")
            .node_only()
            .no_scope()
            .sync(|_, _| Ok(Value::Null));
        r.method("p.node.write")
            .node_only()
            .scope(scope::WRITE)
            .sync(|_, _| Ok(Value::Null));
        let mut b = RegistryBuilder::new();
        b.add_plugin("p", plugin_api::host::declarations(r))
            .unwrap();
        let reg = b.build();
        let ctx = |role, scopes: &[&str]| {
            plugin_api::host::request_context(Arc::new(ConnectionInfo {
                conn_id: ConnId(1),
                role,
                scopes: Scopes::new(scopes.iter().copied()),
                client: ClientInfo::default(),
            }))
        };
        let check = |m: &str, c: &RequestContext| {
            reg.get(m)
                .unwrap()
                .authorize(c)
                .map_err(|e| e.details_code().unwrap_or("").to_string())
        };
        let node = ctx(Role::Node, &[]);
        // A reserved prefix needs operator.admin even for a node-only method.
        assert_eq!(
            check("config.node.apply", &node),
            Err("MISSING_SCOPE".into())
        );
        assert_eq!(
            check("config.node.apply", &ctx(Role::Node, &["operator.admin"])),
            Ok(())
        );
        assert_eq!(check("p.node.report", &node), Ok(()));
        assert_eq!(check("p.node.write", &node), Err("MISSING_SCOPE".into()));
        assert_eq!(
            check("p.node.write", &ctx(Role::Node, &["operator.write"])),
            Ok(())
        );
        let admin = ctx(Role::Operator, &["operator.admin"]);
        assert_eq!(
            check("p.node.report", &admin),
            Err("NODE_ROLE_REQUIRED".into())
        );
    }

    #[test]
    fn host_names_and_detached_methods_are_granted_by_policy_only() {
        let names = ["status", "gateway.restart"];
        // Without a policy no plugin is special, whatever its id.
        let err = RegistryBuilder::new()
            .add_plugin("core", decl("core", &names))
            .unwrap_err();
        assert!(matches!(err, RegistryError::ReservedMethod { .. }), "{err}");
        let policy = HostPolicy {
            privileged: Some("host"),
            detached: &["gateway.restart"],
            required: &[],
        };
        let mut b = RegistryBuilder::with_policy(policy);
        b.add_plugin("host", decl("host", &names)).unwrap();
        // The privileged plugin's names stay closed to everyone else.
        let err = b.add_plugin("core", decl("core", &["health"])).unwrap_err();
        assert!(matches!(err, RegistryError::ReservedMethod { .. }), "{err}");
        b.add_plugin("other", decl("other", &["other.gateway.restart"]))
            .unwrap();
        let reg = b.build();
        assert!(reg.get("gateway.restart").unwrap().detached);
        assert!(!reg.get("status").unwrap().detached);
        assert!(!reg.get("other.gateway.restart").unwrap().detached);
    }
}
