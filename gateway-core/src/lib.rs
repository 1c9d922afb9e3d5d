//! The restart-safe core of the gateway, embeddable as a library.
//!
//! A generation of plugins lives in one [`RestartScope`]: its loader cache,
//! its immutable [`Registry`], its plugin instances, services, tasks and event
//! sinks. The [`Gateway`] publishes the current scope behind one atomic
//! pointer; a request reads it once and is answered by that scope alone. A
//! restart builds a complete new scope from config and manifests read again
//! and swaps it in; then each plugin hands over on its own (its old requests
//! drain, its old services stop, its new services start); a failed build
//! leaves the old scope serving. Every request has a deadline. What the gateway advertises and
//! what it dispatches come from the same registry, so they cannot differ.
//!
//! This crate has no sockets: the host (ws-proxy, or your program) owns
//! connections and hands requests to [`Gateway::dispatch`].

mod config;
mod core_plugin;
pub mod frame;
mod gateway;
mod loader;
mod panic;
mod policy;
mod registry;
mod report;
mod runtime;
mod scope;
mod strict;
pub mod testing;

pub use config::{
    ConfigError, ConfigOrigin, ConfigSource, DEFAULT_REQUEST_TIMEOUT_MS, GatewayConfig,
    PluginEntry, PluginsConfig, RequestsConfig, RestartConfig, RestartConnections, StaticConfig,
    TomlFileConfig, parse_toml, read_toml_file, toml_field_position,
};
pub use core_plugin::{CORE_EVENTS, CORE_PLUGIN_ID};
pub use frame::Features;
pub use gateway::{Gateway, GatewayOptions};
pub use loader::{
    BuildError, Catalog, LoadedPlugin, LoaderCache, MANIFEST_FILE, Manifest, ManifestHandler,
    ManifestMethod, ManifestRuntime, PluginKind, PluginSource,
};
pub use plugin_host::{ProcessState, ProcessStatus};
pub use registry::{
    ADMIN_PREFIXES, CORE_METHODS, ChannelEntry, HANDSHAKE_METHODS, MethodEntry, PluginIndex,
    READ_EXCEPTIONS, Registry, RegistryBuilder, RegistryError,
};
pub use report::{
    GatewayStats, HandoverKind, PluginHandover, PluginReport, RESTART_HISTORY_LEN, RestartFailure,
    RestartOutcome, RestartPhases, RestartRecord, RestartReport,
};
pub use scope::{Admitted, PluginPhase, RestartScope, ShutdownReport};
