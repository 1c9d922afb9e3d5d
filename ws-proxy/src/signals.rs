//! Process signals: restart triggers (SIGUSR1, SIGUSR2 and SIGHUP by
//! default, as nginx reloads on SIGHUP) and stop (SIGTERM, SIGINT). Every
//! restart signal is handled whether or not it is configured, so none of
//! them can end the process by its default action: one left out of
//! `restart.signals` is logged and ignored.

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
    /// SIGHUP, the conventional reload signal.
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

    /// Every signal that can be configured as a restart trigger.
    pub const ALL: [RestartSignal; 3] =
        [RestartSignal::Usr1, RestartSignal::Usr2, RestartSignal::Hup];
}

/// Install handlers for every restart signal and for SIGTERM/SIGINT. A
/// restart signal listed in the current generation's `restart.signals`
/// (read again at each restart, so the list can change without a process
/// restart) calls [`Gateway::restart`] (concurrent triggers coalesce in
/// gateway-core); one not listed is logged and ignored, never an exit.
/// `names` is the list configured at start, logged once. Returns a token
/// cancelled on SIGTERM or SIGINT.
pub fn install(gateway: &Gateway, names: &[String]) -> std::io::Result<CancellationToken> {
    info!(signals = ?names, "restart signals");
    let stop = CancellationToken::new();
    for sig in RestartSignal::ALL {
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
                "signal is not in restart.signals; ignored"
            );
            continue;
        }
        info!(signal = sig.name(), "restart requested by signal");
        let gw = gateway.clone();
        // The outcome is logged by gateway-core; triggers coalesce there.
        tokio::spawn(async move {
            let _ = gw.restart_with(sig.name()).await;
        });
    }
}
