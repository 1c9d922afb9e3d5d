//! `cargo xtask bncr-throughput`: outbound messages per second through the
//! Bncr bridge of the real ws-proxy binary, send -> push -> ack on one
//! account, and the send-to-ack latency of each message.
//!
//! Two connections: an operator that calls core `send` N times, pipelined
//! with a bounded number in flight, and a simulated Bncr client that called
//! `bncr.connect` and answers every `plugin.bncr.push` with `bncr.ack` as
//! soon as it arrives. A message's latency runs from the operator writing its
//! `send` request to the client reading the successful reply to its ack (the
//! message is then out of the durable outbox). A measurement, not a test:
//! nothing here asserts a speed.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::SinkExt;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Session};
use crate::soak::Gateway;

/// Longest silence on a connection before the run is declared stuck.
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// The chat every message goes to.
const TARGET: &str = "Bncr:bench:0:user";

/// What `bncr-throughput` runs.
#[derive(Debug, Clone)]
pub(crate) struct ThroughputConfig {
    /// Messages the operator sends.
    pub(crate) messages: usize,
    /// The bridge's `window`: messages pushed per account before an ack.
    pub(crate) window: usize,
    /// `send` requests the operator keeps in flight.
    pub(crate) inflight: usize,
    /// Build the release binary instead of debug.
    pub(crate) release: bool,
    /// Use this binary instead of building.
    pub(crate) binary: Option<PathBuf>,
}

/// What one run measured.
#[derive(Debug)]
pub(crate) struct Report {
    messages: usize,
    window: usize,
    inflight: usize,
    elapsed: Duration,
    latency_us: Histogram<u64>,
    /// Pushes of a message the client had already acked or was acking.
    duplicate_pushes: u64,
    /// `outbox` in `bncr.diagnostics` after the run (0 when all acked).
    pending_after: u64,
}

impl Report {
    /// Messages acked per second, first `send` written to last ack answered.
    pub(crate) fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The one JSON object `--json` prints.
    pub(crate) fn to_json(&self) -> Value {
        let h = &self.latency_us;
        json!({
            "messages": self.messages,
            "window": self.window,
            "inflight": self.inflight,
            "elapsed_ms": self.elapsed.as_millis() as u64,
            "messages_per_s": self.rate().round(),
            "p50_us": h.value_at_quantile(0.50),
            "p99_us": h.value_at_quantile(0.99),
            "max_us": h.max(),
            "duplicate_pushes": self.duplicate_pushes,
            "pending_after": self.pending_after,
        })
    }

    /// Human-readable lines.
    pub(crate) fn print(&self) {
        let h = &self.latency_us;
        println!(
            "bncr send -> push -> ack: {} messages, window {}, {} sends in flight",
            self.messages, self.window, self.inflight
        );
        println!(
            "{:.0} messages/s over {:.2}s  send-to-ack p50 {:.2}ms p99 {:.2}ms max {:.2}ms",
            self.rate(),
            self.elapsed.as_secs_f64(),
            h.value_at_quantile(0.50) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.max() as f64 / 1000.0
        );
        println!(
            "duplicate pushes {}  pending after the run {}",
            self.duplicate_pushes, self.pending_after
        );
    }
}

/// Build (or take) the binary, start it with a temp state dir, measure.
pub(crate) fn run(config: &ThroughputConfig) -> Result<Report> {
    if config.messages == 0 || config.window == 0 || config.inflight == 0 {
        bail!("--messages, --window and --inflight must be at least 1");
    }
    let binary = match &config.binary {
        Some(path) => path.clone(),
        None => crate::process::build_binary("ws-proxy", config.release)?,
    };
    crate::runtime()?.block_on(measure(&binary, config))
}

async fn measure(binary: &Path, config: &ThroughputConfig) -> Result<Report> {
    let dir = tempfile::tempdir().context("create temp dir")?;
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        format!(
            "[plugins.entries.bncr.config]\nwindow = {}\n",
            config.window
        ),
    )
    .context("write the ws-proxy config")?;
    let args: Vec<OsString> = vec!["--config".into(), file.into()];
    let mut gateway = Gateway::start_with(binary, &args).await?;
    let result = measure_running(&gateway, config).await;
    if result.is_err() {
        println!("last lines of the ws-proxy log:\n{}", gateway.log_tail(30));
    }
    gateway.kill().await;
    result
}

async fn measure_running(gateway: &Gateway, config: &ThroughputConfig) -> Result<Report> {
    let creds = gateway.credentials();
    let mut bncr = client::connect(&gateway.url(), &creds).await?;
    let res = client::call(
        &mut bncr,
        "bncr-connect",
        "bncr.connect",
        &json!({"clientId": "xtask-bncr-throughput"}),
        IDLE_TIMEOUT,
    )
    .await?;
    if !res.ok {
        bail!("bncr.connect failed: {}", res.error_code());
    }
    let operator = client::connect(&gateway.url(), &creds).await?;
    let n = config.messages;
    let acker = tokio::spawn(ack_pushes(bncr, n));
    let sender = tokio::spawn(send_messages(operator, n, config.inflight));
    let (sent_at, mut operator) = sender.await.context("sender task")??;
    let (acked_at, duplicate_pushes) = acker.await.context("acker task")??;
    let mut latency_us = Histogram::new(3).expect("3 significant figures is valid");
    for (sent, acked) in sent_at.iter().zip(&acked_at) {
        let micros = u64::try_from(acked.duration_since(*sent).as_micros()).unwrap_or(u64::MAX);
        latency_us
            .record(micros)
            .expect("auto-resizing histograms record any u64");
    }
    let first = sent_at.iter().min().copied().context("no messages")?;
    let last = acked_at.iter().max().copied().context("no acks")?;
    let diag = client::call(
        &mut operator,
        "diag",
        "bncr.diagnostics",
        &json!({}),
        IDLE_TIMEOUT,
    )
    .await?;
    let pending_after = diag
        .payload
        .as_deref()
        .and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok())
        .and_then(|d| d["outbox"].as_u64())
        .context("bncr.diagnostics without outbox")?;
    Ok(Report {
        messages: n,
        window: config.window,
        inflight: config.inflight,
        elapsed: last.duration_since(first),
        latency_us,
        duplicate_pushes,
        pending_after,
    })
}

/// The next frame as JSON, failing on silence or close.
async fn next_json(session: &mut Session, who: &str) -> Result<Value> {
    let text = timeout(IDLE_TIMEOUT, client::next_text(&mut session.ws))
        .await
        .with_context(|| format!("{who}: nothing received for {IDLE_TIMEOUT:?}"))??
        .with_context(|| format!("{who}: the server closed the connection"))?;
    serde_json::from_str(&text).with_context(|| format!("{who}: frame is not JSON"))
}

/// The operator: `send` message `i` with text `m<i>` and idempotency key
/// `k<i>`, keeping `inflight` requests outstanding. Returns when each was
/// written.
async fn send_messages(
    mut session: Session,
    n: usize,
    inflight: usize,
) -> Result<(Vec<Instant>, Session)> {
    let mut sent_at = Vec::with_capacity(n);
    let mut answered = 0;
    while answered < n {
        while sent_at.len() < n && sent_at.len() - answered < inflight {
            let i = sent_at.len();
            let params = json!({
                "channel": "bncr", "to": TARGET, "message": format!("m{i}"),
                "idempotencyKey": format!("k{i}"),
            });
            let text = client::request_text(&format!("s{i}"), "send", Some(&params));
            sent_at.push(Instant::now());
            session.ws.send(Message::text(text)).await?;
        }
        let frame = next_json(&mut session, "operator").await?;
        if frame["type"] != "res" {
            continue;
        }
        if frame["ok"] != true {
            bail!("send {} failed: {}", frame["id"], frame["error"]);
        }
        answered += 1;
    }
    Ok((sent_at, session))
}

/// The Bncr client: ack every push at once. Returns, per message index, when
/// its ack was answered, and how many pushes were repeats.
async fn ack_pushes(mut session: Session, n: usize) -> Result<(Vec<Instant>, u64)> {
    let mut acked_at: Vec<Option<Instant>> = vec![None; n];
    let mut acking: HashMap<String, usize> = HashMap::new();
    let mut done = 0;
    let mut duplicates = 0u64;
    let mut acks_sent = 0u64;
    while done < n {
        let frame = next_json(&mut session, "bncr client").await?;
        match frame["type"].as_str() {
            Some("event") if frame["event"] == "plugin.bncr.push" => {
                let push = &frame["payload"];
                let index = push["message"]["msg"]
                    .as_str()
                    .and_then(|m| m.strip_prefix('m')?.parse::<usize>().ok())
                    .filter(|i| *i < n)
                    .with_context(|| format!("unexpected push {push}"))?;
                let message_id = push["messageId"]
                    .as_str()
                    .context("push without messageId")?;
                if acked_at[index].is_some() || acking.values().any(|i| *i == index) {
                    duplicates += 1;
                }
                acks_sent += 1;
                let id = format!("a{acks_sent}");
                let params = json!({"messageId": message_id});
                let text = client::request_text(&id, "bncr.ack", Some(&params));
                session.ws.send(Message::text(text)).await?;
                acking.insert(id, index);
            }
            Some("res") => {
                let id = frame["id"].as_str().unwrap_or_default();
                let Some(index) = acking.remove(id) else {
                    continue;
                };
                if frame["ok"] != true {
                    bail!("bncr.ack failed: {}", frame["error"]);
                }
                if acked_at[index].is_none() {
                    acked_at[index] = Some(Instant::now());
                    done += 1;
                }
            }
            _ => {}
        }
    }
    let acked_at = acked_at.into_iter().flatten().collect();
    Ok((acked_at, duplicates))
}
