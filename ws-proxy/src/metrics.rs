//! Prometheus metrics, rendered in the text exposition format (0.0.4).
//!
//! Process-lifetime counters live here; generation gauges are read from
//! [`Gateway::stats`] at scrape time. The `method` label only takes names the
//! current registry dispatches (else `unknown`), so it stays bounded.

use dashmap::DashMap;
use gateway_core::Gateway;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the request duration histogram, in seconds.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Outcome labels of `gateway_requests_total`, in counter order.
const OUTCOMES: [&str; 8] = [
    "ok",
    "busy",
    "invalid_request",
    "forbidden",
    "unavailable",
    "not_paired",
    "agent_timeout",
    "approval_not_found",
];

/// Per method: one counter per outcome.
type OutcomeCounters = [AtomicU64; OUTCOMES.len()];

/// Process-lifetime metrics.
#[derive(Debug)]
pub struct Metrics {
    requests: DashMap<String, OutcomeCounters>,
    buckets: Vec<AtomicU64>,
    duration_count: AtomicU64,
    duration_micros: AtomicU64,
    /// Counters for limits that tripped (see `limits`).
    pub(crate) limits: std::sync::Arc<crate::limits::LimitMetrics>,
    /// Handshake failures, closes, cancellations, process and plugin figures.
    pub(crate) ops: crate::ops_metrics::OpsMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: DashMap::new(),
            buckets: BUCKETS.iter().map(|_| AtomicU64::new(0)).collect(),
            duration_count: AtomicU64::new(0),
            duration_micros: AtomicU64::new(0),
            limits: Default::default(),
            ops: Default::default(),
        }
    }
}

impl Metrics {
    /// Count one answered request. `method` must already be bounded.
    /// `outcome` is one of the labels in `OUTCOMES` (others count as
    /// `unavailable`). Allocates only the first time a method is seen.
    pub fn observe_request(&self, method: &str, outcome: &'static str, elapsed: Duration) {
        let i = OUTCOMES.iter().position(|o| *o == outcome).unwrap_or(4);
        if let Some(c) = self.requests.get(method) {
            c[i].fetch_add(1, Ordering::Relaxed);
        } else {
            self.requests
                .entry(method.to_string())
                .or_insert_with(|| std::array::from_fn(|_| AtomicU64::new(0)))[i]
                .fetch_add(1, Ordering::Relaxed);
        }
        let secs = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.duration_count.fetch_add(1, Ordering::Relaxed);
        self.duration_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// Render every metric.
    pub fn render(&self, gateway: &Gateway, connections_open: usize) -> String {
        let stats = gateway.stats();
        let mut out = String::with_capacity(2048);
        gauge(
            &mut out,
            "gateway_connections_open",
            "Client WebSocket connections open (after the handshake).",
            connections_open as f64,
        );
        let _ = writeln!(
            out,
            "# HELP gateway_requests_total Requests answered, by method and outcome.\n# TYPE gateway_requests_total counter"
        );
        let mut rows: Vec<(String, &'static str, u64)> = self
            .requests
            .iter()
            .flat_map(|e| {
                let method = e.key().clone();
                OUTCOMES
                    .iter()
                    .zip(e.value().iter())
                    .map(|(o, c)| (method.clone(), *o, c.load(Ordering::Relaxed)))
                    .filter(|r| r.2 > 0)
                    .collect::<Vec<_>>()
            })
            .collect();
        rows.sort();
        for (m, o, v) in rows {
            let _ = writeln!(
                out,
                "gateway_requests_total{{method=\"{}\",outcome=\"{o}\"}} {v}",
                escape(&m)
            );
        }
        let _ = writeln!(
            out,
            "# HELP gateway_request_duration_seconds Time from admission to response.\n# TYPE gateway_request_duration_seconds histogram"
        );
        let mut cumulative = 0;
        for (b, c) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "gateway_request_duration_seconds_bucket{{le=\"{b}\"}} {cumulative}"
            );
        }
        let count = self.duration_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "gateway_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}\ngateway_request_duration_seconds_sum {}\ngateway_request_duration_seconds_count {count}",
            self.duration_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "# HELP gateway_restarts_total In-process restarts, by outcome.\n# TYPE gateway_restarts_total counter\ngateway_restarts_total{{outcome=\"ok\"}} {}\ngateway_restarts_total{{outcome=\"failed\"}} {}",
            stats.restarts_ok, stats.restarts_failed
        );
        let _ = writeln!(
            out,
            "# HELP gateway_restart_duration_seconds Duration of successful restarts.\n# TYPE gateway_restart_duration_seconds summary\ngateway_restart_duration_seconds_sum {}\ngateway_restart_duration_seconds_count {}",
            stats.restart_seconds_sum, stats.restarts_ok
        );
        gauge(
            &mut out,
            "gateway_generation",
            "The generation serving.",
            stats.generation as f64,
        );
        gauge(
            &mut out,
            "gateway_live_scopes",
            "Generations alive (1 when settled).",
            stats.live_scopes as f64,
        );
        gauge(
            &mut out,
            "gateway_requests_in_flight",
            "Requests being handled, across generations.",
            stats.in_flight as f64,
        );
        gauge(
            &mut out,
            "gateway_uptime_seconds",
            "Time since the gateway started.",
            stats.uptime.as_secs_f64(),
        );
        self.limits.render(&mut out);
        render_plugin_processes(&mut out, gateway);
        self.ops.render(&mut out, gateway);
        out
    }
}

/// Per runtime plugin of the generation serving: whether its process is
/// up, and the bounds it tripped (crashes, busy refusals, timeouts).
fn render_plugin_processes(out: &mut String, gateway: &Gateway) {
    let scope = gateway.current();
    let rows: Vec<(String, gateway_core::ProcessStatus)> = scope
        .loader()
        .plugins()
        .iter()
        .filter_map(|p| Some((escape(&p.id), p.process_status()?)))
        .collect();
    if rows.is_empty() {
        return;
    }
    type Pick = fn(&gateway_core::ProcessStatus) -> f64;
    let series: [(&str, &str, Pick); 5] = [
        (
            "gateway_plugin_process_up",
            "1 while the plugin's process serves (this generation).",
            |s| f64::from(u8::from(s.state == gateway_core::ProcessState::Running)),
        ),
        (
            "gateway_plugin_process_crashes",
            "Crashes of the plugin's process in this generation.",
            |s| f64::from(s.restarts),
        ),
        (
            "gateway_plugin_busy_rejections",
            "Calls refused in this generation: the plugin had max_calls_in_flight calls in flight.",
            |s| s.busy_rejections as f64,
        ),
        (
            "gateway_plugin_call_timeouts",
            "Calls to the plugin that timed out in this generation.",
            |s| s.call_timeouts as f64,
        ),
        (
            "gateway_plugin_process_resident_memory_bytes",
            "Resident memory of the plugin's process (0 while none runs).",
            |s| {
                s.pid
                    .map_or(0.0, |pid| crate::ops_metrics::resident_bytes(pid) as f64)
            },
        ),
    ];
    for (name, help, pick) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (id, status) in &rows {
            let _ = writeln!(out, "{name}{{plugin=\"{id}\"}} {}", pick(status));
        }
    }
}

fn gauge(out: &mut String, name: &str, help: &str, value: f64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
