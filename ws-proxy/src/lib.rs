//! ws-proxy: the gateway server users run.
//!
//! It owns what lives for the process (the listener, client connections and
//! their auth, connection ids, metrics, logging) and hands every request to
//! the generation that [`gateway_core::Gateway`] serves now. Modules:
//! [`config`] (command line, environment, TOML file), the server (hyper,
//! probes, WebSocket upgrade, handshake, per-connection loop), the
//! connection table (the plugins' [`plugin_api::EventTransport`]), metrics
//! and [`signals`].
//!
//! The binary is a thin wrapper around [`start`]; integration tests can
//! start a server in-process the same way.

mod auth;
pub mod config;
mod connection;
mod handshake;
mod metrics;
mod preauth;
mod server;
pub mod signals;

/// The README's Rust snippets, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeSnippets;

pub use config::{AuthMode, Cli, Limits, LogFormat, Settings, SettingsError};
pub use connection::ConnectionTable;
pub use metrics::Metrics;
pub use server::{RunningServer, ServerBuilder, StartError, start};

/// Install the global tracing subscriber (logs go to stderr).
pub fn init_logging(format: LogFormat, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
