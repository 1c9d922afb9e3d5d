//! Accepting TCP connections: the connection gate (caps per peer, pending
//! and in total) and the loop that hands each admitted socket to hyper.

use super::Shared;
use crate::limits::{Caps, Gate};
use crate::metrics::Metrics;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tracing::{debug, warn};

/// The connection caps, with the total kept below the file-descriptor limit
/// (whose soft value is raised to the hard one first).
pub(super) fn connection_gate(limits: &crate::config::Limits, metrics: &Metrics) -> Arc<Gate> {
    let (total, fds) = crate::limits::fd_bounded_cap(limits.max_connections);
    if total < limits.max_connections {
        warn!(
            configured = limits.max_connections,
            cap = total,
            fd_limit = fds,
            "limits.max_connections lowered to stay below the file-descriptor limit"
        );
    }
    Gate::new(
        Caps {
            total,
            pending: limits.max_pending_connections.min(total),
            pending_per_peer: limits.max_pending_per_peer,
            per_peer: limits.max_connections_per_peer,
        },
        metrics.limits.clone(),
    )
}

pub(super) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut last_warning: Option<Instant> = None;
    let header_timeout = Duration::from_millis(shared.settings.limits.http_header_timeout_ms);
    let idle_timeout = Duration::from_millis(shared.settings.limits.http_idle_timeout_ms);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shared.unlisten.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Never stop accepting: back off briefly, and when file
                    // descriptors ran out, free one from an unauthenticated
                    // connection. One warning per second at most.
                    let m = &shared.metrics.limits;
                    if crate::limits::is_fd_exhaustion(&e) {
                        m.count(&m.accept_fd_exhausted);
                        shared.gate.shed_for_fds();
                    } else {
                        m.count(&m.accept_other_errors);
                    }
                    if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        warn!(error = %e, "accept failed; backing off");
                        last_warning = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let permit = match shared.gate.admit(peer.ip()) {
            Ok(p) => p,
            Err(why) => {
                // Refused at once: a best-effort 503 without waiting, then close.
                let _ = stream.try_write(crate::limits::REFUSED_RESPONSE);
                debug!(%peer, ?why, "connection refused");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let shared2 = shared.clone();
        tokio::spawn(async move {
            let evicted = permit.evicted().clone();
            let (io, moved) = crate::limits::Activity::new(stream);
            let for_upgrade = permit.clone();
            let svc = hyper::service::service_fn(move |mut req| {
                let shared = shared2.clone();
                req.extensions_mut().insert(for_upgrade.clone());
                async move { Ok::<_, Infallible>(super::http::handle_http(shared, peer, req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades();
            drop(permit);
            let m = &shared.metrics.limits;
            tokio::select! {
                r = conn => if let Err(e) = r {
                    if e.is_timeout() {
                        m.count(&m.http_header_timeouts);
                    }
                    debug!(%peer, error = %e, "http connection ended with an error");
                },
                () = evicted.cancelled() => debug!(%peer, "http connection evicted"),
                () = crate::limits::idle(moved, idle_timeout) => {
                    m.count(&m.http_idle_timeouts);
                    debug!(%peer, "http connection idle; closed");
                }
            }
        });
    }
}
