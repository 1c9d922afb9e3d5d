//! ws-proxy: the gateway server users run.
//!
//! It owns what lives for the process (the listener, client connections and
//! their auth, connection ids, metrics, logging) and hands every request to
//! the generation that [`gateway_core::Gateway`] serves now. Modules:
//! [`config`] (command line, environment, TOML file), the server (hyper,
//! probes, WebSocket upgrade, handshake, per-connection loop), the
//! connection table (the plugins' [`plugin_api::host::EventTransport`]), metrics
//! and [`signals`].
//!
//! The binary is a thin wrapper around [`start`]; integration tests can
//! start a server in-process the same way.

mod auth;
pub mod config;
mod connection;
mod dashboard;
mod handshake;
mod limits;
pub mod logs;
mod metrics;
mod ops;
mod ops_metrics;
mod preauth;
mod server;
pub mod signals;

/// The README's Rust snippets, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeSnippets;

/// The plugin guide's Rust example (`docs/plugins.md`), compiled and run as a
/// doctest: the guide cannot describe an API that does not exist.
#[cfg(doctest)]
#[doc = include_str!("../../docs/plugins.md")]
struct PluginGuideSnippets;

pub use config::{AuthMode, Cli, Limits, LogFormat, SecretOrigin, Settings, SettingsError};
pub use connection::ConnectionTable;
pub use metrics::Metrics;
pub use server::{RunningServer, ServerBuilder, StartError, start};

/// Install the global tracing subscriber: logs go to stderr and to the
/// in-memory ring `logs.tail` reads ([`logs::ring`]), filtered alike.
pub fn init_logging(format: LogFormat, level: &str) {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_new(capped_filter(level))
        .unwrap_or_else(|_| EnvFilter::new(capped_filter("info")));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.finish().with(logs::RingLayer).try_init(),
        LogFormat::Json => builder.json().finish().with(logs::RingLayer).try_init(),
    };
}

/// Crates that log frame contents (tokens included) at debug or trace, and
/// the most each may log whatever the configured filter says.
const FRAME_LOGGING_CRATES: &[(&str, &str)] = &[
    ("tungstenite", "info"),
    ("tokio_tungstenite", "info"),
    ("hyper", "debug"),
];

/// `level` with every directive for a frame-logging crate replaced by its
/// cap, so that no log level prints a frame's content.
fn capped_filter(level: &str) -> String {
    let mut parts: Vec<String> = level
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .filter(|d| {
            let target = d.split(['=', '[']).next().unwrap_or("");
            !FRAME_LOGGING_CRATES
                .iter()
                .any(|(c, _)| target == *c || target.starts_with(&format!("{c}::")))
        })
        .map(str::to_string)
        .collect();
    parts.extend(
        FRAME_LOGGING_CRATES
            .iter()
            .map(|(c, cap)| format!("{c}={cap}")),
    );
    parts.join(",")
}

#[cfg(test)]
mod tests {
    #[test]
    fn frame_logging_crates_are_capped_whatever_the_filter() {
        let f = super::capped_filter("trace,tungstenite=trace,tokio_tungstenite::compat=trace");
        assert_eq!(
            f,
            "trace,tungstenite=info,tokio_tungstenite=info,hyper=debug"
        );
        assert!(tracing_subscriber::EnvFilter::try_new(&f).is_ok());
    }
}
