//! The counters of limits that tripped, and their exposition text.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters for limits that tripped, rendered with the other metrics.
#[derive(Debug, Default)]
pub(crate) struct LimitMetrics {
    pub(crate) refused_max_connections: AtomicU64,
    pub(crate) refused_per_peer: AtomicU64,
    pub(crate) evicted_max_connections: AtomicU64,
    pub(crate) evicted_max_pending: AtomicU64,
    pub(crate) evicted_pending_per_peer: AtomicU64,
    pub(crate) evicted_fd_limit: AtomicU64,
    pub(crate) http_header_timeouts: AtomicU64,
    pub(crate) http_idle_timeouts: AtomicU64,
    pub(crate) accept_fd_exhausted: AtomicU64,
    pub(crate) accept_other_errors: AtomicU64,
    pub(crate) write_backlog_closes: AtomicU64,
    pub(crate) auth_rate_limited: AtomicU64,
    pub(crate) auth_throttled: AtomicU64,
    pub(crate) origin_refused: AtomicU64,
    pub(crate) close_1002: AtomicU64,
    pub(crate) close_1003: AtomicU64,
    pub(crate) close_1007: AtomicU64,
    pub(crate) close_1009: AtomicU64,
    pub(crate) open: AtomicU64,
    pub(crate) pending: AtomicU64,
}

impl LimitMetrics {
    /// Add one to `counter`.
    pub(crate) fn count(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Append the exposition text.
    pub(crate) fn render(&self, out: &mut String) {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut family = |name: &str, help: &str, kind: &str, rows: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in rows {
                if labels.is_empty() {
                    let _ = writeln!(out, "{name} {value}");
                } else {
                    let _ = writeln!(out, "{name}{{{labels}}} {value}");
                }
            }
        };
        family(
            "gateway_tcp_connections_open",
            "TCP connections open (HTTP stage, handshake and authenticated).",
            "gauge",
            &[("", v(&self.open))],
        );
        family(
            "gateway_connections_pending",
            "Connections not yet authenticated.",
            "gauge",
            &[("", v(&self.pending))],
        );
        family(
            "gateway_connections_refused_total",
            "Connections refused at accept because a cap was reached.",
            "counter",
            &[
                (
                    "reason=\"max_connections\"",
                    v(&self.refused_max_connections),
                ),
                (
                    "reason=\"max_connections_per_peer\"",
                    v(&self.refused_per_peer),
                ),
            ],
        );
        family(
            "gateway_connections_evicted_total",
            "Unauthenticated connections closed to make room for a new one.",
            "counter",
            &[
                (
                    "reason=\"max_connections\"",
                    v(&self.evicted_max_connections),
                ),
                (
                    "reason=\"max_pending_connections\"",
                    v(&self.evicted_max_pending),
                ),
                (
                    "reason=\"max_pending_per_peer\"",
                    v(&self.evicted_pending_per_peer),
                ),
                ("reason=\"fd_limit\"", v(&self.evicted_fd_limit)),
            ],
        );
        family(
            "gateway_http_timeouts_total",
            "HTTP-stage connections closed by a timeout.",
            "counter",
            &[
                ("kind=\"header\"", v(&self.http_header_timeouts)),
                ("kind=\"idle\"", v(&self.http_idle_timeouts)),
            ],
        );
        family(
            "gateway_accept_errors_total",
            "Failed accepts (the listener backs off and keeps accepting).",
            "counter",
            &[
                ("kind=\"fd_limit\"", v(&self.accept_fd_exhausted)),
                ("kind=\"other\"", v(&self.accept_other_errors)),
            ],
        );
        family(
            "gateway_write_backlog_closes_total",
            "Connections closed 1008 because bytes the socket did not take (pongs included) exceeded maxBufferedBytes.",
            "counter",
            &[("", v(&self.write_backlog_closes))],
        );
        family(
            "gateway_auth_limited_total",
            "Failed connects past the failure limit: remote peers refused, loopback clients held back.",
            "counter",
            &[
                ("action=\"refused\"", v(&self.auth_rate_limited)),
                ("action=\"throttled\"", v(&self.auth_throttled)),
            ],
        );
        family(
            "gateway_origin_refused_total",
            "WebSocket upgrades refused 403 for their Origin.",
            "counter",
            &[("", v(&self.origin_refused))],
        );
        family(
            "gateway_protocol_closes_total",
            "Connections closed for a protocol violation, by close code.",
            "counter",
            &[
                ("code=\"1002\"", v(&self.close_1002)),
                ("code=\"1003\"", v(&self.close_1003)),
                ("code=\"1007\"", v(&self.close_1007)),
                ("code=\"1009\"", v(&self.close_1009)),
            ],
        );
    }
}
