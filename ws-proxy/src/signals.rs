//! Process signals: restart triggers (SIGUSR1, SIGUSR2 by default; SIGHUP on
//! request) and stop (SIGTERM, SIGINT).

use gateway_core::Gateway;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A signal that may trigger an in-process restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartSignal {
    /// SIGUSR1, the seed's restart signal.
    Usr1,
    /// SIGUSR2, OpenClaw's restart signal since 2026.9.
    Usr2,
    /// SIGHUP, when configured.
    Hup,
}

impl RestartSignal {
    /// Parse `SIGUSR1`, `USR1`, ... (case-insensitive).
    pub fn from_name(name: &str) -> Option<RestartSignal> {
        let up = name.trim().to_ascii_uppercase();
        match up.strip_prefix("SIG").unwrap_or(&up) {
            "USR1" => Some(RestartSignal::Usr1),
            "USR2" => Some(RestartSignal::Usr2),
            "HUP" => Some(RestartSignal::Hup),
            _ => None,
        }
    }

    /// The conventional name.
    pub fn name(self) -> &'static str {
        match self {
            RestartSignal::Usr1 => "SIGUSR1",
            RestartSignal::Usr2 => "SIGUSR2",
            RestartSignal::Hup => "SIGHUP",
        }
    }

    fn kind(self) -> SignalKind {
        match self {
            RestartSignal::Usr1 => SignalKind::user_defined1(),
            RestartSignal::Usr2 => SignalKind::user_defined2(),
            RestartSignal::Hup => SignalKind::hangup(),
        }
    }
}

/// Install handlers for the restart signals named in `names` and for
/// SIGTERM/SIGINT. Restart signals call [`Gateway::restart`] (concurrent
/// triggers coalesce in gateway-core); a signal no longer listed in the
/// current generation's `restart.signals` is logged and ignored. Returns a
/// token cancelled on SIGTERM or SIGINT.
pub fn install(gateway: &Gateway, names: &[String]) -> std::io::Result<CancellationToken> {
    let stop = CancellationToken::new();
    let mut seen = Vec::new();
    for name in names {
        let Some(sig) = RestartSignal::from_name(name) else {
            continue;
        };
        if seen.contains(&sig) {
            continue;
        }
        seen.push(sig);
        let stream = signal(sig.kind())?;
        tokio::spawn(restart_loop(gateway.clone(), sig, stream, stop.clone()));
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let token = stop.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(signal = name, "stop requested");
        token.cancel();
    });
    Ok(stop)
}

async fn restart_loop(
    gateway: Gateway,
    sig: RestartSignal,
    mut stream: Signal,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            got = stream.recv() => if got.is_none() { return },
        }
        let listed = gateway
            .current()
            .timings()
            .signals
            .iter()
            .any(|n| RestartSignal::from_name(n) == Some(sig));
        if !listed {
            warn!(
                signal = sig.name(),
                "signal is no longer in restart.signals; ignored"
            );
            continue;
        }
        info!(signal = sig.name(), "restart requested by signal");
        let gw = gateway.clone();
        // The outcome is logged by gateway-core; triggers coalesce there.
        tokio::spawn(async move {
            let _ = gw.restart().await;
        });
    }
}
