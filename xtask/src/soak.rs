//! `cargo xtask soak`: runs ws-proxy as a child process, drives `health`
//! load on many connections while SIGUSR1 restarts fire on a schedule, and
//! checks the restart contract from the outside (`docs/restart.md`):
//! every request answered exactly once, no connection closed, advertised
//! methods dispatch after each restart, live scopes settle at 1, the
//! generation advances, and SIGTERM ends the process cleanly. Alongside,
//! a few connections pipeline bursts of 200 requests (inline `health` and
//! an async manifest method that is in flight across swaps) and check the
//! order of what they receive ([`crate::pipeline`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Child;
use tokio::time::{Instant, sleep, timeout};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Credentials, Frame, Session};
use crate::load::{self, LoadConfig, LoadReport};
use crate::pipeline;

/// Restarts fired back to back in one burst.
const BURST_SIZE: usize = 10;
/// Interval between bursts.
const BURST_EVERY: Duration = Duration::from_secs(3);
/// How long ws-proxy may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long restarts may take to settle to one live scope after the load.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one probe call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the child may take to exit after SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections pipelining bursts next to the load.
const PIPELINE_CONNS: usize = 4;
/// Methods never called by the probe: they restart or have side effects.
const SKIPPED_METHODS: &[&str] = &["gateway.restart", "send"];
/// Name segments that mark a method as having side effects.
const SIDE_EFFECT_SEGMENTS: &[&str] = &[
    "send", "restart", "delete", "remove", "reset", "logout", "shutdown", "stop", "update", "set",
    "write", "run", "approve", "reject", "wake",
];

/// What the soak runs and for how long.
#[derive(Debug, Clone)]
pub(crate) struct SoakConfig {
    /// Length of the load window.
    pub(crate) duration: Duration,
    /// Interval between single restarts.
    pub(crate) restart_every: Duration,
    /// Connections.
    pub(crate) conns: usize,
    /// Requests in flight per connection.
    pub(crate) inflight: usize,
    /// Build the release binary instead of debug.
    pub(crate) release: bool,
    /// Use this binary instead of building.
    pub(crate) binary: Option<PathBuf>,
}

impl Default for SoakConfig {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(60),
            restart_every: Duration::from_millis(500),
            conns: 256,
            inflight: 16,
            release: false,
            binary: None,
        }
    }
}

/// Builds (unless given a binary) and soaks ws-proxy; true when no violation.
pub(crate) fn run(config: &SoakConfig) -> Result<bool> {
    let binary = match &config.binary {
        Some(path) => path.clone(),
        None => crate::process::build_binary("ws-proxy", config.release)?,
    };
    let runtime = crate::runtime()?;
    let summary = runtime.block_on(soak(&binary, config))?;
    summary.print();
    Ok(summary.violations.is_empty())
}

/// What the soak measured and found.
#[derive(Debug, Default)]
struct Summary {
    requests: u64,
    rps: f64,
    pipelined: pipeline::PipelineReport,
    signals: u64,
    generation_start: f64,
    generation_end: f64,
    probed_generations: usize,
    rss_start_kib: u64,
    rss_end_kib: u64,
    violations: Vec<String>,
    /// The end of the child's output, kept when something went wrong.
    log_tail: String,
}

impl Summary {
    fn print(&self) {
        println!(
            "soak: {} requests ({:.0} req/s), {} restart signals, generation {} -> {} ({} probed), RSS {} KiB -> {} KiB, {} violations",
            self.requests,
            self.rps,
            self.signals,
            self.generation_start,
            self.generation_end,
            self.probed_generations,
            self.rss_start_kib,
            self.rss_end_kib,
            self.violations.len()
        );
        println!(
            "soak: pipelined {} requests in {} bursts of {} ({} async, {} retryable), {} gateway.generation events on those connections",
            self.pipelined.answered,
            self.pipelined.bursts,
            pipeline::BURST,
            self.pipelined.async_answered,
            self.pipelined.retryable,
            self.pipelined.generation_events
        );
        for violation in &self.violations {
            println!("  violation: {violation}");
        }
        if !self.log_tail.is_empty() {
            println!("last lines of the ws-proxy log:\n{}", self.log_tail);
        }
    }
}

async fn soak(binary: &Path, config: &SoakConfig) -> Result<Summary> {
    let plugins = tempfile::tempdir().context("create plugin dir")?;
    let plugin_dir = pipeline::write_plugin(plugins.path())?;
    // Every soak client connects from 127.0.0.1 at once (the load's
    // connections, the pipelining ones, the probe): room for all of them
    // in the per-peer handshake cap, which the soak does not test.
    let file = plugins.path().join("gateway.toml");
    std::fs::write(
        &file,
        format!(
            "[plugins]\ndirs = [{:?}]\n[limits]\nmax_pending_per_peer = {}\n",
            plugin_dir.display().to_string(),
            config.conns + PIPELINE_CONNS + 64,
        ),
    )?;
    let mut gateway = Gateway::start_with(binary, &["--config".into(), file.into()]).await?;
    let result = soak_running(&mut gateway, config).await;
    let mut summary = match result {
        Ok(summary) => summary,
        Err(err) => {
            gateway.kill().await;
            println!("{}", gateway.log_tail(30));
            return Err(err);
        }
    };
    summary.violations.extend(gateway.stop_and_observe().await);
    if !summary.violations.is_empty() {
        summary.log_tail = gateway.log_tail(30);
    }
    Ok(summary)
}

/// Everything between readiness and SIGTERM.
async fn soak_running(gateway: &mut Gateway, config: &SoakConfig) -> Result<Summary> {
    let mut summary = Summary {
        rss_start_kib: gateway.rss_kib()?,
        generation_start: gateway.metric("gateway_generation").await?,
        ..Summary::default()
    };
    let load_config = LoadConfig {
        url: gateway.url(),
        creds: gateway.credentials(),
        method: "health".into(),
        params: None,
        conns: config.conns,
        inflight: config.inflight,
        duration: config.duration,
    };
    let (report, signals, probes, pipelined) = tokio::join!(
        load::run(&load_config),
        fire_restarts(gateway.pid, config.restart_every, config.duration),
        probe_generations(
            &load_config.url,
            &load_config.creds,
            config.duration,
            config.restart_every
        ),
        pipeline::run(
            &load_config.url,
            &load_config.creds,
            PIPELINE_CONNS,
            config.duration
        ),
    );
    let report = report?;
    summary
        .violations
        .extend(pipelined.violations.iter().cloned());
    summary.pipelined = pipelined;
    if summary.pipelined.async_answered == 0 {
        summary
            .violations
            .push("no async request was pipelined".into());
    }
    summary.signals = signals?;
    summary.requests = report.answered();
    summary.rps = report.rps();
    summary.probed_generations = probes.generations;
    summary.violations.extend(probes.violations);
    summary.violations.extend(gateway.settle().await);
    summary.generation_end = gateway.metric("gateway_generation").await?;
    summary.violations.extend(failed_restarts(gateway).await);
    summary.violations.extend(load_violations(
        &report,
        summary.generation_end - summary.generation_start,
    ));
    summary
        .violations
        .extend(probe_once(&gateway.url(), &gateway.credentials()).await.1);
    if summary.generation_end <= summary.generation_start {
        summary.violations.push(format!(
            "gateway_generation did not advance: {} -> {}",
            summary.generation_start, summary.generation_end
        ));
    }
    summary.rss_end_kib = gateway.rss_kib()?;
    Ok(summary)
}

/// A violation if `/metrics` counts failed restarts: the soak never breaks
/// the config, so every restart should succeed.
async fn failed_restarts(gateway: &Gateway) -> Option<String> {
    let failed = gateway
        .metric(r#"gateway_restarts_total{outcome="failed"}"#)
        .await
        .ok()?;
    (failed > 0.0).then(|| format!("{failed} restarts failed (gateway_restarts_total)"))
}

/// Violations the load generator saw on its connections.
fn load_violations(report: &LoadReport, generations_advanced: f64) -> Vec<String> {
    let mut found = Vec::new();
    let mut check = |count: u64, what: &str| {
        if count > 0 {
            found.push(format!("{count} {what}"));
        }
    };
    check(
        report.unexpected,
        "responses to ids not pending (duplicates or unknown)",
    );
    check(report.missing, "requests never answered");
    check(report.server_closes, "connections closed by the server");
    check(report.unknown_method, "`unknown method` answers to health");
    if report.answered() == 0 {
        found.push("no request was answered".into());
    }
    if generations_advanced >= 2.0 && report.min_generation_events == 0 {
        found.push("a connection never received a gateway.generation event".into());
    }
    found
}

/// Sends SIGUSR1 every `every`, plus a burst of back-to-back signals every
/// few seconds, for `duration`. Returns how many signals were sent.
async fn fire_restarts(pid: Pid, every: Duration, duration: Duration) -> Result<u64> {
    let end = Instant::now() + duration;
    let mut next_burst = Instant::now() + BURST_EVERY;
    let mut sent = 0;
    while Instant::now() + every < end {
        sleep(every).await;
        let count = if Instant::now() >= next_burst {
            next_burst += BURST_EVERY;
            BURST_SIZE
        } else {
            1
        };
        for _ in 0..count {
            kill(pid, Signal::SIGUSR1).context("send SIGUSR1")?;
            sent += 1;
        }
    }
    Ok(sent)
}

/// What the generation probe found.
#[derive(Debug, Default)]
struct ProbeReport {
    generations: usize,
    violations: Vec<String>,
}

/// Connects anew every `every` during the run; for each generation not
/// seen before, calls every advertised method.
async fn probe_generations(
    url: &str,
    creds: &Credentials,
    duration: Duration,
    every: Duration,
) -> ProbeReport {
    let end = Instant::now() + duration;
    let mut report = ProbeReport::default();
    let mut last_generation = None;
    while Instant::now() < end {
        let (generation, violations) = probe_once_unless(url, creds, last_generation).await;
        if generation != last_generation {
            report.generations += 1;
            last_generation = generation;
        }
        report.violations.extend(violations);
        sleep(every).await;
    }
    report
}

/// A probe on a new connection, skipped when its generation was checked.
async fn probe_once_unless(
    url: &str,
    creds: &Credentials,
    checked: Option<u64>,
) -> (Option<u64>, Vec<String>) {
    match client::connect(url, creds).await {
        Ok(session) if checked.is_some() && session.generation() == checked => {
            (checked, Vec::new())
        }
        Ok(session) => (session.generation(), check_methods(session).await),
        Err(err) => (checked, vec![format!("probe connection failed: {err:#}")]),
    }
}

/// A probe on a new connection: every advertised method must dispatch.
async fn probe_once(url: &str, creds: &Credentials) -> (Option<u64>, Vec<String>) {
    probe_once_unless(url, creds, None).await
}

/// Calls each advertised method without side effects with `{}`; an
/// `unknown method` answer (or none) for an advertised method is a violation.
async fn check_methods(mut session: Session) -> Vec<String> {
    let generation = session.generation();
    let mut violations = Vec::new();
    let methods = session.advertised_methods();
    for (index, method) in methods.iter().filter(|m| !has_side_effects(m)).enumerate() {
        let id = format!("probe-{index}");
        match client::call(&mut session, &id, method, &json!({}), CALL_TIMEOUT).await {
            Ok(res) if res.is_unknown_method() => violations.push(format!(
                "advertised method {method} answered unknown method (hello-ok generation {generation:?})"
            )),
            Ok(_) => {}
            Err(err) => violations.push(format!("advertised method {method}: {err:#}")),
        }
    }
    violations
}

/// True for methods the probe must not call.
fn has_side_effects(method: &str) -> bool {
    SKIPPED_METHODS.contains(&method)
        || method
            .split(['.', '_', '-'])
            .any(|segment| SIDE_EFFECT_SEGMENTS.contains(&segment.to_ascii_lowercase().as_str()))
}

/// The ws-proxy child process and what it was started with; shared with
/// `restart-latency`.
#[derive(Debug)]
pub(crate) struct Gateway {
    child: Child,
    /// The child's process id, for signals and `/proc`.
    pub(crate) pid: Pid,
    port: u16,
    token: String,
    log: PathBuf,
    /// Holds the state dir and log until the soak ends.
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts ws-proxy on a free loopback port and waits for `/readyz`,
    /// passing `extra_args` (e.g. `--plugin-dir`) after the port, auth and
    /// state-dir flags.
    pub(crate) async fn start_with(binary: &Path, extra_args: &[OsString]) -> Result<Self> {
        let dir = tempfile::tempdir().context("create temp dir")?;
        let state_dir = dir.path().join("state");
        std::fs::create_dir_all(&state_dir)?;
        let log = dir.path().join("ws-proxy.log");
        let log_file = std::fs::File::create(&log)?;
        let port = free_port()?;
        let token = format!("soak-{}-{port}", std::process::id());
        let child = tokio::process::Command::new(binary)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--auth", "token", "--token", &token])
            .arg("--state-dir")
            .arg(&state_dir)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let raw_pid = child.id().context("child has no pid")?;
        let pid = Pid::from_raw(i32::try_from(raw_pid)?);
        let mut gateway = Self {
            child,
            pid,
            port,
            token,
            log,
            _dir: dir,
        };
        gateway.wait_ready().await?;
        Ok(gateway)
    }

    pub(crate) fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// The loopback port it listens on.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn credentials(&self) -> Credentials {
        Credentials {
            token: Some(self.token.clone()),
            password: None,
            scopes: vec!["operator.admin".into()],
        }
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "ws-proxy exited before ready ({status}):\n{}",
                    self.log_tail(30)
                );
            }
            if matches!(http_get(self.port, "/readyz").await, Ok((200, _))) {
                return Ok(());
            }
            sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "ws-proxy not ready within {READY_TIMEOUT:?}:\n{}",
            self.log_tail(30)
        )
    }

    /// One sample from `/metrics`, named with its labels if it has any.
    pub(crate) async fn metric(&self, name: &str) -> Result<f64> {
        let (status, body) = http_get(self.port, "/metrics").await?;
        if status != 200 {
            bail!("GET /metrics answered {status}");
        }
        metric_value(&body, name).with_context(|| format!("/metrics has no {name}"))
    }

    /// Waits for `gateway_live_scopes` to read 1; a violation if it does not.
    pub(crate) async fn settle(&self) -> Option<String> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let mut last = None;
        while Instant::now() < deadline {
            last = self.metric("gateway_live_scopes").await.ok();
            if last == Some(1.0) {
                return None;
            }
            sleep(Duration::from_millis(200)).await;
        }
        Some(format!(
            "gateway_live_scopes is {last:?}, not 1, {SETTLE_TIMEOUT:?} after the load"
        ))
    }

    /// CPU time the child's threads have run so far (the sum of each
    /// thread's `schedstat` run time, nanosecond resolution).
    pub(crate) fn cpu_time(&self) -> Result<Duration> {
        let mut total = 0u64;
        for task in std::fs::read_dir(format!("/proc/{}/task", self.pid))? {
            // A thread may end between the listing and the read.
            let Ok(stat) = std::fs::read_to_string(task?.path().join("schedstat")) else {
                continue;
            };
            let ns: u64 = stat
                .split_whitespace()
                .next()
                .and_then(|f| f.parse().ok())
                .context("schedstat's first field")?;
            total += ns;
        }
        Ok(Duration::from_nanos(total))
    }

    /// VmRSS of the child in KiB.
    pub(crate) fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .context("no VmRSS in /proc status")
    }

    /// SIGTERM with one client connected: it must see the `shutdown` event
    /// and close 1012, and the process must exit 0 in time.
    pub(crate) async fn stop_and_observe(&mut self) -> Vec<String> {
        let mut violations = Vec::new();
        let observer = client::connect(&self.url(), &self.credentials()).await;
        if let Err(err) = kill(self.pid, Signal::SIGTERM) {
            violations.push(format!("SIGTERM failed: {err}"));
        }
        match observer {
            Ok(session) => violations.extend(observe_shutdown(session).await),
            Err(err) => violations.push(format!("shutdown observer could not connect: {err:#}")),
        }
        match timeout(EXIT_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => {
                violations.push(format!("ws-proxy exited with {status} after SIGTERM"))
            }
            Ok(Err(err)) => violations.push(format!("waiting for ws-proxy: {err}")),
            Err(_) => {
                violations.push(format!(
                    "ws-proxy did not exit within {EXIT_TIMEOUT:?} of SIGTERM"
                ));
                self.kill().await;
            }
        }
        violations
    }

    pub(crate) async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// The file the child's stdout and stderr go to.
    pub(crate) fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the child's output.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Reads until close: expects the `shutdown` event and close code 1012.
async fn observe_shutdown(mut session: Session) -> Vec<String> {
    let mut saw_shutdown = false;
    let mut close_code = None;
    let read = async {
        while let Some(Ok(msg)) = session.ws.next().await {
            match msg {
                Message::Text(text) => {
                    saw_shutdown |= matches!(client::parse_frame(text.as_str()), Frame::Event { event } if event == "shutdown");
                }
                Message::Close(frame) => {
                    close_code = frame.map(|f| u16::from(f.code));
                    break;
                }
                _ => {}
            }
        }
    };
    let timed_out = timeout(EXIT_TIMEOUT, read).await.is_err();
    let mut violations = Vec::new();
    if timed_out {
        violations.push("connection not closed within the exit timeout after SIGTERM".into());
    }
    if !saw_shutdown {
        violations.push("no shutdown event after SIGTERM".into());
    }
    if close_code != Some(1012) {
        violations.push(format!(
            "close code after SIGTERM was {close_code:?}, not 1012"
        ));
    }
    violations
}

/// A free loopback port: bind port 0, read it, release it.
pub(crate) fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A plain HTTP/1.0 GET on loopback: status and body.
pub(crate) async fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    timeout(CALL_TIMEOUT, stream.read_to_string(&mut response)).await??;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("malformed HTTP status line")?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok((status, body.to_owned()))
}

/// The value of the sample `name` (with its labels, exactly as the server
/// writes them) in Prometheus text.
fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_value_reads_unlabelled_samples_only() {
        let text = "# TYPE gateway_generation gauge\ngateway_generation 7\ngateway_generation_x 9\ngateway_live_scopes 1\ngateway_restarts_total{outcome=\"failed\"} 2\n";
        assert_eq!(metric_value(text, "gateway_generation"), Some(7.0));
        assert_eq!(metric_value(text, "gateway_live_scopes"), Some(1.0));
        assert_eq!(metric_value(text, "gateway_restarts_total"), None);
        let failed = r#"gateway_restarts_total{outcome="failed"}"#;
        assert_eq!(metric_value(text, failed), Some(2.0));
    }

    #[test]
    fn side_effect_methods_are_skipped() {
        for method in ["send", "gateway.restart", "sessions.delete", "config.set"] {
            assert!(has_side_effects(method), "{method}");
        }
        for method in ["health", "status", "plugins.list", "bncr.status"] {
            assert!(!has_side_effects(method), "{method}");
        }
    }
}
