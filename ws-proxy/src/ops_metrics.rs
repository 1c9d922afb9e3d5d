//! The metrics an operator asks for first: why handshakes fail, how
//! connections end, requests cancelled or timed out, drains that hit their
//! deadline, restart phases, the process (memory, file descriptors,
//! threads), each plugin's state and process, and the Bncr outbox.
//!
//! Every label takes values from a fixed list or the plugin ids of the
//! current generation (bounded by configuration). Plugin and Bncr figures
//! are read at scrape time from `status` and `bncr.diagnostics`, the same
//! answers operators see, so no plugin needs a metrics API.

use gateway_core::Gateway;
use plugin_api::{ConnId, ErrorCode, Params, RpcError};
use serde_json::Value;
use std::fmt::Write as _;
use std::future::Future as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

/// `reason` labels of `gateway_handshake_failures_total`.
const HANDSHAKE_REASONS: &[&str] = &[
    "invalid_frame",
    "not_connect",
    "invalid_params",
    "protocol_mismatch",
    "unauthorized",
    "rate_limited",
    "preauth_too_large",
    "timeout",
    "protocol_violation",
];

/// `code` labels of `gateway_auth_failures_total` (`other` last).
const AUTH_CODES: &[&str] = &[
    "AUTH_TOKEN_MISSING",
    "AUTH_TOKEN_MISMATCH",
    "AUTH_PASSWORD_MISSING",
    "AUTH_PASSWORD_MISMATCH",
    "other",
];

/// `code` labels of `gateway_connection_closes_total`: the close code the
/// server sent, `peer` when the client closed or went away first, `other`
/// for a code not listed.
const CLOSE_CODES: &[&str] = &[
    "1000", "1001", "1002", "1003", "1007", "1008", "1009", "1011", "1012", "peer", "other",
];

/// `reason` labels of `gateway_requests_cancelled_total`.
const CANCEL_REASONS: &[&str] = &["restart", "stopping"];
/// `kind` labels of `gateway_requests_timed_out_total`.
const TIMEOUT_KINDS: &[&str] = &["plugin_start", "agent", "request"];
/// Plugin states, as `status` names them.
const PLUGIN_STATES: &[&str] = &["starting", "running", "respawning", "failed", "stopped"];

fn counters(n: usize) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

/// Process-lifetime counters; the rest is read at scrape time.
#[derive(Debug)]
pub(crate) struct OpsMetrics {
    handshake: Box<[AtomicU64]>,
    auth: Box<[AtomicU64]>,
    closes: Box<[AtomicU64]>,
    cancelled: Box<[AtomicU64]>,
    timed_out: Box<[AtomicU64]>,
}

impl Default for OpsMetrics {
    fn default() -> Self {
        OpsMetrics {
            handshake: counters(HANDSHAKE_REASONS.len()),
            auth: counters(AUTH_CODES.len()),
            closes: counters(CLOSE_CODES.len()),
            cancelled: counters(CANCEL_REASONS.len()),
            timed_out: counters(TIMEOUT_KINDS.len()),
        }
    }
}

impl OpsMetrics {
    /// Count a refused handshake by the close reason the server gave and,
    /// for auth failures, the error's `details.code`.
    pub(crate) fn handshake_refused(&self, close_reason: &str, details_code: Option<&str>) {
        let reason = match close_reason {
            "invalid request frame" => "invalid_frame",
            "invalid handshake" => "not_connect",
            "invalid connect params" => "invalid_params",
            "protocol mismatch" => "protocol_mismatch",
            "unauthorized" => "unauthorized",
            "too many failed attempts" => "rate_limited",
            "preauth payload too large" => "preauth_too_large",
            "handshake timeout" => "timeout",
            _ => "protocol_violation",
        };
        bump(&self.handshake, HANDSHAKE_REASONS, reason);
        if reason == "unauthorized" {
            let code = details_code.filter(|c| AUTH_CODES.contains(c));
            bump(&self.auth, AUTH_CODES, code.unwrap_or("other"));
        }
    }

    /// Count a finished WebSocket connection by the close code the server
    /// sent (`None`: the client closed or went away first).
    pub(crate) fn connection_closed(&self, server_code: Option<u16>) {
        let label = match server_code {
            None => "peer",
            Some(1000) => "1000",
            Some(1001) => "1001",
            Some(1002) => "1002",
            Some(1003) => "1003",
            Some(1007) => "1007",
            Some(1008) => "1008",
            Some(1009) => "1009",
            Some(1011) => "1011",
            Some(1012) => "1012",
            Some(_) => "other",
        };
        bump(&self.closes, CLOSE_CODES, label);
    }

    /// Count an error answer that was a cancellation or a time-out.
    pub(crate) fn request_failed(&self, e: &RpcError) {
        if e.code == ErrorCode::AgentTimeout {
            bump(&self.timed_out, TIMEOUT_KINDS, "agent");
            return;
        }
        let reason = e
            .details
            .as_ref()
            .and_then(|d| d.get("reason"))
            .and_then(Value::as_str);
        match reason {
            Some("gateway-restarting") => bump(&self.cancelled, CANCEL_REASONS, "restart"),
            Some("gateway-closing" | "gateway-stopping") => {
                bump(&self.cancelled, CANCEL_REASONS, "stopping")
            }
            Some("request-timeout") => bump(&self.timed_out, TIMEOUT_KINDS, "request"),
            Some("plugin-starting") => bump(&self.timed_out, TIMEOUT_KINDS, "plugin_start"),
            _ => {}
        }
    }

    /// Append the exposition text.
    pub(crate) fn render(&self, out: &mut String, gateway: &Gateway) {
        family(
            out,
            "gateway_handshake_failures_total",
            "Refused handshakes, by reason.",
            "counter",
        );
        rows(
            out,
            "gateway_handshake_failures_total",
            "reason",
            HANDSHAKE_REASONS,
            &self.handshake,
        );
        family(
            out,
            "gateway_auth_failures_total",
            "Connects refused for their credentials, by error code.",
            "counter",
        );
        rows(
            out,
            "gateway_auth_failures_total",
            "code",
            AUTH_CODES,
            &self.auth,
        );
        family(
            out,
            "gateway_connection_closes_total",
            "WebSocket connections ended, by the close code the server sent (peer: the client closed or went away first).",
            "counter",
        );
        rows(
            out,
            "gateway_connection_closes_total",
            "code",
            CLOSE_CODES,
            &self.closes,
        );
        family(
            out,
            "gateway_requests_cancelled_total",
            "Requests answered UNAVAILABLE because their generation was draining or stopped (restart) or the gateway was stopping (stopping).",
            "counter",
        );
        rows(
            out,
            "gateway_requests_cancelled_total",
            "reason",
            CANCEL_REASONS,
            &self.cancelled,
        );
        family(
            out,
            "gateway_requests_timed_out_total",
            "Requests that timed out: waiting for a plugin to start (plugin_start), AGENT_TIMEOUT answers (agent), or the per-request deadline (request).",
            "counter",
        );
        rows(
            out,
            "gateway_requests_timed_out_total",
            "kind",
            TIMEOUT_KINDS,
            &self.timed_out,
        );

        let stats = gateway.stats();
        family(
            out,
            "gateway_drain_timeouts_total",
            "Drains (restart or stop) that reached their deadline and cancelled what was left.",
            "counter",
        );
        let _ = writeln!(out, "gateway_drain_timeouts_total {}", stats.drain_timeouts);
        family(
            out,
            "gateway_drain_cancelled_requests_total",
            "Requests cancelled at a drain deadline.",
            "counter",
        );
        let _ = writeln!(
            out,
            "gateway_drain_cancelled_requests_total {}",
            stats.drain_cancelled_requests
        );
        family(
            out,
            "gateway_restart_phase_seconds",
            "Time successful restarts spent in each phase: build (trigger to swap; the new generation serves from its end), handover (swap until every plugin handed over), stop_old and start_new (the slowest plugin's drain-and-stop and start).",
            "summary",
        );
        let p = stats.restart_phases_sum;
        for (phase, d) in [
            ("build", p.build),
            ("stop_old", p.stop_old),
            ("start_new", p.start_new),
            ("handover", p.handover),
        ] {
            let _ = writeln!(
                out,
                "gateway_restart_phase_seconds_sum{{phase=\"{phase}\"}} {}\ngateway_restart_phase_seconds_count{{phase=\"{phase}\"}} {}",
                d.as_secs_f64(),
                stats.restarts_ok
            );
        }

        render_process(out);
        render_plugins(out, gateway);
        render_bncr(out, gateway);
    }
}

fn bump(counters: &[AtomicU64], labels: &[&str], label: &str) {
    if let Some(i) = labels.iter().position(|l| *l == label) {
        counters[i].fetch_add(1, Ordering::Relaxed);
    }
}

fn family(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn rows(out: &mut String, name: &str, label: &str, labels: &[&str], values: &[AtomicU64]) {
    for (l, v) in labels.iter().zip(values) {
        let _ = writeln!(
            out,
            "{name}{{{label}=\"{l}\"}} {}",
            v.load(Ordering::Relaxed)
        );
    }
}

/// Resident memory, open file descriptors and threads, from `/proc/self`.
fn render_process(out: &mut String) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(rss) = status_field(&status, "VmRSS:") {
        family(
            out,
            "gateway_process_resident_memory_bytes",
            "Resident memory of the gateway process.",
            "gauge",
        );
        let _ = writeln!(out, "gateway_process_resident_memory_bytes {}", rss * 1024);
    }
    if let Some(threads) = status_field(&status, "Threads:") {
        family(
            out,
            "gateway_process_threads",
            "Threads of the gateway process.",
            "gauge",
        );
        let _ = writeln!(out, "gateway_process_threads {threads}");
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        family(
            out,
            "gateway_process_open_fds",
            "Open file descriptors of the gateway process.",
            "gauge",
        );
        // One of them is the directory being read.
        let _ = writeln!(
            out,
            "gateway_process_open_fds {}",
            dir.count().saturating_sub(1)
        );
    }
}

fn status_field(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Each plugin's state (one row per state, 1 for the current one). Plugin
/// processes have their own series (`gateway_plugin_process_*`).
fn render_plugins(out: &mut String, gateway: &Gateway) {
    let Some(status) = call_now(gateway, "status") else {
        return;
    };
    let plugins = status["plugins"].as_array().cloned().unwrap_or_default();
    family(
        out,
        "gateway_plugin_state",
        "Each plugin of the serving generation: 1 for its current state.",
        "gauge",
    );
    for p in &plugins {
        let id = label_value(p["id"].as_str().unwrap_or("?"));
        let state = p["state"].as_str().unwrap_or("");
        for s in PLUGIN_STATES {
            let _ = writeln!(
                out,
                "gateway_plugin_state{{plugin=\"{id}\",state=\"{s}\"}} {}",
                u8::from(state == *s)
            );
        }
    }
}

/// Resident memory of process `pid` (0 when it cannot be read).
pub(crate) fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status_field(&status, "VmRSS:").map_or(0, |kib| kib * 1024)
}

/// The Bncr bridge's queues, summed over accounts.
fn render_bncr(out: &mut String, gateway: &Gateway) {
    let Some(d) = call_now(gateway, "bncr.diagnostics") else {
        return;
    };
    let accounts = d["accounts"].as_array().cloned().unwrap_or_default();
    let sum = |f: &dyn Fn(&Value) -> u64| accounts.iter().map(f).sum::<u64>();
    let pending = sum(&|a| a["outbox"]["pending"].as_u64().unwrap_or(0));
    let pushing = sum(&|a| a["outbox"]["inFlight"].as_u64().unwrap_or(0));
    let online = sum(&|a| u64::from(a["online"] == true));
    let dead = d["deadLetter"].as_u64().unwrap_or(0);
    for (name, help, v) in [
        (
            "gateway_bncr_outbox_messages",
            "Outbound Bncr messages queued, not yet acknowledged.",
            pending,
        ),
        (
            "gateway_bncr_pushes_in_flight",
            "Outbound Bncr messages pushed and awaiting their ack.",
            pushing,
        ),
        (
            "gateway_bncr_dead_letters",
            "Outbound Bncr messages given up on (dead letters), kept for inspection.",
            dead,
        ),
        (
            "gateway_bncr_accounts_online",
            "Bncr accounts with a connected client holding the lease.",
            online,
        ),
    ] {
        family(out, name, help, "gauge");
        let _ = writeln!(out, "{name} {v}");
    }
    let inbound = d["inboundPending"].as_u64().unwrap_or(0);
    family(
        out,
        "gateway_bncr_inbound_pending",
        "Accepted inbound Bncr messages no operator has received yet.",
        "gauge",
    );
    let _ = writeln!(out, "gateway_bncr_inbound_pending {inbound}");
    // Counted by the bridge of the serving generation (they restart from 0
    // at a restart, which Prometheus counters tolerate).
    let c = &d["counters"];
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    family(
        out,
        "gateway_bncr_limit_trips_total",
        "Bncr requests refused, or state dropped, by a bridge limit.",
        "counter",
    );
    for (limit, v) in [
        ("maxAccounts", n("accountsRefused")),
        ("leaseTtlMs", n("leasesPruned")),
        ("maxTransfers", n("transfersRefused")),
        ("transferTtlMs", n("transfersExpired")),
        ("fileChunking", n("chunkingRefused")),
        ("maxInboundPending", n("inboundRefused")),
    ] {
        let _ = writeln!(
            out,
            "gateway_bncr_limit_trips_total{{limit=\"{limit}\"}} {v}"
        );
    }
    family(
        out,
        "gateway_bncr_store_failures_total",
        "Bncr store operations that failed.",
        "counter",
    );
    let failures = d["store"]["failures"].as_u64().unwrap_or(0);
    let _ = writeln!(out, "gateway_bncr_store_failures_total {failures}");
}

/// Answer `method` now if it answers without waiting (sync handlers);
/// `None` when it is not served or would wait.
fn call_now(gateway: &Gateway, method: &str) -> Option<Value> {
    if !gateway.dispatches(method) {
        return None;
    }
    let ctx = plugin_api::host::internal_context(ConnId(0));
    let mut fut = std::pin::pin!(gateway.dispatch(ctx, method, Params::none()));
    let mut cx = Context::from_waker(futures::task::noop_waker_ref());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(v)) => Some(v),
        _ => None,
    }
}

/// A Prometheus label value: quotes, backslashes and newlines escaped.
fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(m: &OpsMetrics, f: fn(&OpsMetrics) -> &[AtomicU64], labels: &[&str], l: &str) -> u64 {
        let i = labels.iter().position(|x| *x == l).unwrap();
        f(m)[i].load(Ordering::Relaxed)
    }

    #[test]
    fn labels_stay_within_their_lists() {
        let m = OpsMetrics::default();
        m.handshake_refused("unauthorized", Some("AUTH_TOKEN_MISMATCH"));
        m.handshake_refused("unauthorized", Some("SOMETHING_NEW"));
        m.handshake_refused("binary frames are not supported", None);
        m.handshake_refused("handshake timeout", None);
        assert_eq!(
            value(&m, |m| &m.handshake, HANDSHAKE_REASONS, "unauthorized"),
            2
        );
        assert_eq!(
            value(
                &m,
                |m| &m.handshake,
                HANDSHAKE_REASONS,
                "protocol_violation"
            ),
            1
        );
        assert_eq!(value(&m, |m| &m.handshake, HANDSHAKE_REASONS, "timeout"), 1);
        assert_eq!(value(&m, |m| &m.auth, AUTH_CODES, "AUTH_TOKEN_MISMATCH"), 1);
        assert_eq!(value(&m, |m| &m.auth, AUTH_CODES, "other"), 1);
        for code in [
            Some(1000),
            Some(1008),
            Some(4999),
            Some(65535),
            Some(0),
            None,
        ] {
            m.connection_closed(code);
        }
        assert_eq!(value(&m, |m| &m.closes, CLOSE_CODES, "1000"), 1);
        assert_eq!(value(&m, |m| &m.closes, CLOSE_CODES, "1008"), 1);
        assert_eq!(value(&m, |m| &m.closes, CLOSE_CODES, "other"), 3);
        assert_eq!(value(&m, |m| &m.closes, CLOSE_CODES, "peer"), 1);
        m.request_failed(&RpcError::restarting());
        m.request_failed(
            &RpcError::unavailable("x")
                .with_details(serde_json::json!({"reason": "plugin-starting"})),
        );
        m.request_failed(&RpcError::unavailable("busy"));
        assert_eq!(value(&m, |m| &m.cancelled, CANCEL_REASONS, "restart"), 1);
        assert_eq!(
            value(&m, |m| &m.timed_out, TIMEOUT_KINDS, "plugin_start"),
            1
        );
    }
}
