//! `cargo xtask restart-latency`: how long a real SIGUSR1 restart of the
//! ws-proxy binary takes, from the signal to the new generation serving, and
//! how RSS behaves over many restarts.
//!
//! One connection stays open. For each restart: take `t0`, send SIGUSR1, read
//! until the `gateway.generation` event naming the next generation arrives
//! (ws-proxy sends it after the new generation's services started), then call
//! one plugin method to confirm it dispatches. Restarts are spaced a little
//! apart so they never coalesce. Targets (goals, not asserts): p99 under 5 ms
//! with 50 plugins; idle RSS under 15 MiB; RSS after 1000 restarts within 5%
//! of RSS after 10.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::SinkExt;
use nix::sys::signal::{Signal, kill};
use serde_json::{Value, json};
use tokio::time::{Instant, sleep, timeout};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Session};
use crate::soak::Gateway;

/// How long one restart may take before it counts as missing.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the confirming call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after each restart so consecutive signals never coalesce.
const SPACING: Duration = Duration::from_millis(20);
/// The restart after which the "after 10" RSS sample is taken.
const EARLY_RSS_AFTER: u64 = 10;
/// Idle time before the idle RSS sample, so start-up allocations settle.
const IDLE_SETTLE: Duration = Duration::from_millis(500);

/// What `restart-latency` generates, runs and measures.
#[derive(Debug, Clone)]
pub(crate) struct RestartLatencyConfig {
    /// Manifest plugins to generate.
    pub(crate) plugins: usize,
    /// Methods per plugin.
    pub(crate) methods: usize,
    /// SIGUSR1 restarts to measure.
    pub(crate) restarts: u64,
    /// Build the release binary instead of debug.
    pub(crate) release: bool,
    /// Use this binary instead of building.
    pub(crate) binary: Option<PathBuf>,
    /// `--log-level` passed to ws-proxy.
    pub(crate) log_level: Option<String>,
    /// `--config` passed to ws-proxy.
    pub(crate) config: Option<PathBuf>,
    /// Copy ws-proxy's output here at the end.
    pub(crate) keep_log: Option<PathBuf>,
}

/// What one run measured.
#[derive(Debug, Default)]
struct Report {
    plugins: usize,
    methods: usize,
    restarts: u64,
    /// Signal -> `gateway.generation` event, one per completed restart.
    latencies_us: Vec<u64>,
    rss_idle_kib: u64,
    rss_after_10_kib: Option<u64>,
    rss_after_n_kib: u64,
    live_scopes: Option<f64>,
    failures: Vec<String>,
}

impl Report {
    /// The `q`-quantile (0..=1) by nearest rank; 0 without samples.
    fn quantile_us(&self, q: f64) -> u64 {
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        nearest_rank(&sorted, q)
    }

    fn rss_ratio(&self) -> Option<f64> {
        let early = self.rss_after_10_kib?;
        (early > 0).then(|| self.rss_after_n_kib as f64 / early as f64)
    }

    fn to_json(&self) -> Value {
        json!({
            "p50_us": self.quantile_us(0.50),
            "p90_us": self.quantile_us(0.90),
            "p99_us": self.quantile_us(0.99),
            "max_us": self.quantile_us(1.0),
            "restarts": self.latencies_us.len(),
            "plugins": self.plugins,
            "rss_idle_kib": self.rss_idle_kib,
            "rss_after_10_kib": self.rss_after_10_kib,
            "rss_after_n_kib": self.rss_after_n_kib,
        })
    }

    fn print(&self) {
        println!(
            "restart-latency: {} plugins x {} methods, {}/{} restarts measured",
            self.plugins,
            self.methods,
            self.latencies_us.len(),
            self.restarts
        );
        println!(
            "  signal -> new generation serving: p50 {} us, p90 {} us, p99 {} us, max {} us",
            self.quantile_us(0.50),
            self.quantile_us(0.90),
            self.quantile_us(0.99),
            self.quantile_us(1.0)
        );
        let early = self
            .rss_after_10_kib
            .map_or_else(|| "-".to_owned(), |kib| kib.to_string());
        let ratio = self
            .rss_ratio()
            .map_or_else(|| "-".to_owned(), |r| format!("{r:.3}"));
        println!(
            "  RSS: idle {} KiB, after {EARLY_RSS_AFTER} restarts {early} KiB, after {} restarts {} KiB (last/after-{EARLY_RSS_AFTER} {ratio})",
            self.rss_idle_kib,
            self.latencies_us.len(),
            self.rss_after_n_kib
        );
        println!("  gateway_live_scopes at the end: {:?}", self.live_scopes);
        for failure in &self.failures {
            println!("  failure: {failure}");
        }
    }
}

/// The value at quantile `q` of sorted samples, by nearest rank.
fn nearest_rank(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Builds (unless given a binary), measures and prints; true when every
/// restart completed, every call dispatched and one scope is live at the end.
pub(crate) fn run(config: &RestartLatencyConfig, json_output: bool) -> Result<bool> {
    if config.plugins == 0 || config.methods == 0 {
        bail!("--plugins and --methods must be at least 1");
    }
    let binary = match &config.binary {
        Some(path) => path.clone(),
        None => crate::process::build_binary("ws-proxy", config.release)?,
    };
    let plugin_dir = tempfile::tempdir().context("create plugin dir")?;
    write_plugins(plugin_dir.path(), config.plugins, config.methods)?;
    let runtime = crate::runtime()?;
    let report = runtime.block_on(measure(&binary, plugin_dir.path(), config))?;
    if json_output {
        println!("{}", report.to_json());
    } else {
        report.print();
    }
    if json_output {
        for failure in &report.failures {
            eprintln!("restart-latency: {failure}");
        }
    }
    Ok(report.failures.is_empty())
}

/// The id of generated plugin `index`.
fn plugin_id(index: usize) -> String {
    format!("latency-p{index:03}")
}

/// The name of method `method` of generated plugin `plugin`.
fn method_name(plugin: usize, method: usize) -> String {
    format!("{}.m{method:03}", plugin_id(plugin))
}

/// Writes `plugins` manifest plugins of `methods` reply methods each, one
/// subdirectory per plugin.
fn write_plugins(dir: &Path, plugins: usize, methods: usize) -> Result<()> {
    for plugin in 0..plugins {
        let id = plugin_id(plugin);
        let methods: Vec<Value> = (0..methods)
            .map(|method| {
                json!({
                    "name": method_name(plugin, method),
                    "scope": "operator.read",
                    "handler": "reply",
                    "reply": {"plugin": id, "method": method},
                })
            })
            .collect();
        let manifest = json!({"id": id, "version": "1.0.0", "methods": methods});
        let plugin_dir = dir.join(&id);
        std::fs::create_dir_all(&plugin_dir)?;
        std::fs::write(
            plugin_dir.join("openclaw.plugin.json"),
            serde_json::to_vec_pretty(&manifest)?,
        )
        .with_context(|| format!("write manifest of {id}"))?;
    }
    Ok(())
}

async fn measure(
    binary: &Path,
    plugin_dir: &Path,
    config: &RestartLatencyConfig,
) -> Result<Report> {
    let mut args: Vec<OsString> = vec!["--plugin-dir".into(), plugin_dir.into()];
    if let Some(level) = &config.log_level {
        args.extend(["--log-level".into(), level.into()]);
    }
    if let Some(file) = &config.config {
        args.extend(["--config".into(), file.into()]);
    }
    let mut gateway = Gateway::start_with(binary, &args).await?;
    let result = measure_running(&gateway, config).await;
    if let Some(path) = &config.keep_log {
        std::fs::copy(gateway.log_path(), path)
            .with_context(|| format!("copy the ws-proxy log to {}", path.display()))?;
    }
    let mut report = match result {
        Ok(report) => report,
        Err(err) => {
            gateway.kill().await;
            println!("{}", gateway.log_tail(30));
            return Err(err);
        }
    };
    report.failures.extend(gateway.stop_and_observe().await);
    if !report.failures.is_empty() {
        println!("last lines of the ws-proxy log:\n{}", gateway.log_tail(30));
    }
    Ok(report)
}

/// Everything between readiness and stopping the child.
async fn measure_running(gateway: &Gateway, config: &RestartLatencyConfig) -> Result<Report> {
    let mut report = Report {
        plugins: config.plugins,
        methods: config.methods,
        restarts: config.restarts,
        ..Report::default()
    };
    let mut session = client::connect(&gateway.url(), &gateway.credentials()).await?;
    let mut generation = session
        .generation()
        .context("hello-ok carries no snapshot.generation")?;
    let advertised = session.advertised_methods();
    let expected = method_name(config.plugins - 1, config.methods - 1);
    if !advertised.contains(&expected) {
        bail!("hello-ok does not advertise {expected}: the plugins did not load");
    }
    sleep(IDLE_SETTLE).await;
    report.rss_idle_kib = gateway.rss_kib()?;

    for restart in 1..=config.restarts {
        let t0 = Instant::now();
        kill(gateway.pid, Signal::SIGUSR1).context("send SIGUSR1")?;
        match wait_for_generation(&mut session, generation + 1).await {
            Ok(Seen::Next) => report.latencies_us.push(micros(t0.elapsed())),
            Ok(Seen::Other(got)) => {
                report.failures.push(format!(
                    "restart {restart}: expected generation {}, got {got}",
                    generation + 1
                ));
                generation = got;
                continue;
            }
            Err(err) => {
                report.failures.push(format!("restart {restart}: {err:#}"));
                break;
            }
        }
        generation += 1;
        let index = usize::try_from(restart)?;
        let method = method_name(index % config.plugins, index % config.methods);
        if let Err(err) = confirm_dispatch(&mut session, restart, &method).await {
            report
                .failures
                .push(format!("restart {restart}: {method}: {err:#}"));
        }
        if restart == EARLY_RSS_AFTER {
            report.rss_after_10_kib = Some(gateway.rss_kib()?);
        }
        sleep(SPACING).await;
    }
    report.rss_after_n_kib = gateway.rss_kib()?;

    let failed = gateway
        .metric(r#"gateway_restarts_total{outcome="failed"}"#)
        .await
        .unwrap_or(0.0);
    if failed > 0.0 {
        report
            .failures
            .push(format!("{failed} restarts failed (gateway_restarts_total)"));
    }
    let live = gateway.metric("gateway_live_scopes").await?;
    report.live_scopes = Some(live);
    if live != 1.0 {
        report
            .failures
            .push(format!("gateway_live_scopes is {live}, not 1"));
    }
    Ok(report)
}

/// Which `gateway.generation` event arrived.
#[derive(Debug)]
pub(crate) enum Seen {
    /// The one expected.
    Next,
    /// Another generation (restarts coalesced or one was skipped).
    Other(u64),
}

/// Reads until a `gateway.generation` event; ignores every other frame.
pub(crate) async fn wait_for_generation(session: &mut Session, expected: u64) -> Result<Seen> {
    let read = async {
        loop {
            let text = client::next_text(&mut session.ws)
                .await?
                .context("connection closed while waiting for gateway.generation")?;
            if let Some(generation) = generation_event(&text) {
                return Ok(if generation == expected {
                    Seen::Next
                } else {
                    Seen::Other(generation)
                });
            }
        }
    };
    timeout(EVENT_TIMEOUT, read)
        .await
        .with_context(|| format!("no gateway.generation {expected} within {EVENT_TIMEOUT:?}"))?
}

/// The generation of a `gateway.generation` event frame, `None` for any
/// other frame.
fn generation_event(text: &str) -> Option<u64> {
    let frame: Value = serde_json::from_str(text).ok()?;
    if frame["type"] != "event" || frame["event"] != "gateway.generation" {
        return None;
    }
    frame["payload"]["generation"].as_u64()
}

/// Calls `method` once; it must answer `ok`.
async fn confirm_dispatch(session: &mut Session, restart: u64, method: &str) -> Result<()> {
    let id = format!("confirm-{restart}");
    let text = client::request_text(&id, method, None);
    session.ws.send(Message::text(text)).await?;
    let res = timeout(
        CALL_TIMEOUT,
        client::wait_for_response(&mut session.ws, &id),
    )
    .await
    .with_context(|| format!("no answer within {CALL_TIMEOUT:?}"))??;
    if !res.ok {
        let message = res.error.as_ref().map_or("", |e| e.message.as_str());
        bail!("answered {}: {message}", res.error_code());
    }
    Ok(())
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let sorted: Vec<u64> = (1..=100).collect();
        assert_eq!(nearest_rank(&sorted, 0.50), 50);
        assert_eq!(nearest_rank(&sorted, 0.99), 99);
        assert_eq!(nearest_rank(&sorted, 1.0), 100);
        assert_eq!(nearest_rank(&sorted, 0.0), 1);
        assert_eq!(nearest_rank(&[], 0.5), 0);
    }

    #[test]
    fn generation_events_are_recognised() {
        let event = r#"{"type":"event","event":"gateway.generation","payload":{"generation":7,"features":{}}}"#;
        assert_eq!(generation_event(event), Some(7));
        let tick = r#"{"type":"event","event":"tick","payload":{"ts":1}}"#;
        assert_eq!(generation_event(tick), None);
        assert_eq!(generation_event("not json"), None);
    }

    #[test]
    fn generated_manifests_load_as_written() {
        let dir = tempfile::tempdir().expect("temp dir");
        write_plugins(dir.path(), 2, 3).expect("write plugins");
        let path = dir.path().join(plugin_id(1)).join("openclaw.plugin.json");
        let manifest: Value =
            serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json");
        assert_eq!(manifest["id"], "latency-p001");
        assert_eq!(manifest["methods"].as_array().map(Vec::len), Some(3));
        assert_eq!(manifest["methods"][2]["name"], "latency-p001.m002");
    }
}
