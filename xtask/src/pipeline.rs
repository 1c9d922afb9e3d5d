//! Deep pipelining for the soak: connections that send bursts of requests
//! far beyond ws-proxy's writer batch in one flush, a mix of inline
//! (`health`) and async (a manifest `sleep` method, so requests are in
//! flight across swaps), and check every frame in the order it arrives:
//! each id answered exactly once, `seq` without gaps, `gateway.generation`
//! only moving forward, no response of generation N before that
//! connection's `gateway.generation` N (`health` answers carry their
//! generation), no `unknown method`, only retryable errors.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::SinkExt;
use serde_json::{Value, json};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Credentials, Session};

/// Requests per burst: beyond ws-proxy's writer batch (64) several times.
pub(crate) const BURST: usize = 200;
/// Every this many requests of a burst, one is the async sleep method.
const SLEEP_EVERY: usize = 5;
/// The manifest plugin and its async method.
const PLUGIN_ID: &str = "soakpipe";
/// The async method the bursts call.
pub(crate) const SLEEP_METHOD: &str = "soakpipe.sleep";
/// How long one burst may take to be fully answered.
const BURST_TIMEOUT: Duration = Duration::from_secs(30);

/// Write a plugin directory under `dir` with the manifest plugin serving
/// [`SLEEP_METHOD`]; returns the directory to pass as `--plugin-dir`.
pub(crate) fn write_plugin(dir: &Path) -> Result<std::path::PathBuf> {
    let plugins = dir.join("plugins");
    let plugin = plugins.join(PLUGIN_ID);
    std::fs::create_dir_all(&plugin)?;
    let manifest = json!({
        "id": PLUGIN_ID,
        "version": "1.0.0",
        "methods": [{"name": SLEEP_METHOD, "handler": "sleep", "scope": "operator.read", "ms": 20}],
    });
    std::fs::write(plugin.join("openclaw.plugin.json"), manifest.to_string())?;
    Ok(plugins)
}

/// What the pipelined connections saw.
#[derive(Debug, Default)]
pub(crate) struct PipelineReport {
    /// Requests answered.
    pub(crate) answered: u64,
    /// Of those, retryable `UNAVAILABLE` answers.
    pub(crate) retryable: u64,
    /// Async requests answered.
    pub(crate) async_answered: u64,
    /// Bursts fully answered.
    pub(crate) bursts: u64,
    /// `gateway.generation` events seen over all connections.
    pub(crate) generation_events: u64,
    /// Contract violations, each described.
    pub(crate) violations: Vec<String>,
}

/// Run `conns` pipelining connections until `duration` ends.
pub(crate) async fn run(
    url: &str,
    creds: &Credentials,
    conns: usize,
    duration: Duration,
) -> PipelineReport {
    let end = Instant::now() + duration;
    let tasks: Vec<_> = (0..conns)
        .map(|k| {
            let (url, creds) = (url.to_owned(), creds.clone());
            tokio::spawn(async move { drive(&url, &creds, k, end).await })
        })
        .collect();
    let mut report = PipelineReport::default();
    for task in tasks {
        match task.await {
            Ok(Ok(one)) => {
                report.answered += one.answered;
                report.retryable += one.retryable;
                report.async_answered += one.async_answered;
                report.bursts += one.bursts;
                report.generation_events += one.generation_events;
                report.violations.extend(one.violations);
            }
            Ok(Err(err)) => report
                .violations
                .push(format!("pipelined connection: {err:#}")),
            Err(err) => report.violations.push(format!("pipelined task: {err}")),
        }
    }
    if report.answered == 0 {
        report
            .violations
            .push("no pipelined request was answered".into());
    }
    report
}

/// One connection as its client sees it.
struct Observer {
    announced: u64,
    last_seq: u64,
    /// Method of every request sent and not yet answered.
    pending: HashMap<String, &'static str>,
    report: PipelineReport,
}

impl Observer {
    /// Check one frame; a violation is recorded and returned as an error
    /// (the connection's picture is wrong from there on).
    fn see(&mut self, text: &str) -> Result<(), String> {
        let frame: Value =
            serde_json::from_str(text).map_err(|e| format!("frame is not JSON: {e}"))?;
        match frame["type"].as_str() {
            Some("event") => self.event(&frame),
            Some("res") => self.response(&frame),
            _ => Err(format!("unexpected frame: {text}")),
        }
    }

    fn event(&mut self, frame: &Value) -> Result<(), String> {
        if let Some(seq) = frame["seq"].as_u64() {
            if seq != self.last_seq + 1 {
                return Err(format!("event seq {seq} after {}", self.last_seq));
            }
            self.last_seq = seq;
        }
        if frame["event"] == "gateway.generation" {
            let g = frame["payload"]["generation"].as_u64().unwrap_or(0);
            if g <= self.announced {
                return Err(format!(
                    "gateway.generation {g} after generation {} was announced",
                    self.announced
                ));
            }
            self.announced = g;
            self.report.generation_events += 1;
        }
        Ok(())
    }

    fn response(&mut self, frame: &Value) -> Result<(), String> {
        let id = frame["id"].as_str().unwrap_or_default();
        let Some(method) = self.pending.remove(id) else {
            return Err(format!(
                "response to {id:?}, which is not pending (duplicate?)"
            ));
        };
        if method == "health"
            && let Some(g) = frame["payload"]["generation"].as_u64()
            && g > self.announced
        {
            return Err(format!(
                "response of generation {g} before its gateway.generation (connection last told {})",
                self.announced
            ));
        }
        self.report.answered += 1;
        if method == SLEEP_METHOD {
            self.report.async_answered += 1;
        }
        if frame["ok"] != true {
            let error = &frame["error"];
            let message = error["message"].as_str().unwrap_or_default();
            if message.starts_with("unknown method") {
                return Err(format!("{method} answered {message}"));
            }
            if error["code"] != "UNAVAILABLE" || error["retryable"] != true {
                return Err(format!("{method} answered a non-retryable error: {error}"));
            }
            self.report.retryable += 1;
        }
        Ok(())
    }
}

/// Bursts on one connection until `end`.
async fn drive(url: &str, creds: &Credentials, k: usize, end: Instant) -> Result<PipelineReport> {
    let mut session: Session = client::connect(url, creds).await?;
    let mut o = Observer {
        announced: session
            .generation()
            .context("hello-ok without a generation")?,
        last_seq: 0,
        pending: HashMap::new(),
        report: PipelineReport::default(),
    };
    let mut round = 0u64;
    while Instant::now() < end {
        for i in 0..BURST {
            let id = format!("p{k}-{round}-{i}");
            let (method, params) = if i % SLEEP_EVERY == SLEEP_EVERY - 1 {
                (SLEEP_METHOD, json!({"ms": 10 + (i % 7) * 15}))
            } else {
                ("health", json!({}))
            };
            let text = client::request_text(&id, method, Some(&params));
            o.pending.insert(id, method);
            session.ws.feed(Message::text(text)).await?;
        }
        // One flush: the whole burst goes out in as few writes as the
        // socket takes.
        session.ws.flush().await?;
        let answered = timeout(BURST_TIMEOUT, async {
            while !o.pending.is_empty() {
                let Some(text) = client::next_text(&mut session.ws).await? else {
                    anyhow::bail!("server closed with {} unanswered", o.pending.len());
                };
                if let Err(violation) = o.see(&text) {
                    o.report
                        .violations
                        .push(format!("connection {k}: {violation}"));
                    anyhow::bail!("stopped after a violation");
                }
            }
            Ok(())
        })
        .await;
        match answered {
            Ok(Ok(())) => o.report.bursts += 1,
            Ok(Err(err)) => {
                if o.report.violations.is_empty() {
                    o.report.violations.push(format!("connection {k}: {err:#}"));
                }
                return Ok(o.report);
            }
            Err(_) => {
                o.report.violations.push(format!(
                    "connection {k}: {} requests of burst {round} never answered within {BURST_TIMEOUT:?}",
                    o.pending.len()
                ));
                return Ok(o.report);
            }
        }
        round += 1;
    }
    Ok(o.report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observer() -> Observer {
        Observer {
            announced: 1,
            last_seq: 0,
            pending: HashMap::from([("a".into(), "health"), ("b".into(), SLEEP_METHOD)]),
            report: PipelineReport::default(),
        }
    }

    #[test]
    fn a_response_of_an_unannounced_generation_is_a_violation() {
        let mut o = observer();
        let early = r#"{"type":"res","id":"a","ok":true,"payload":{"generation":2}}"#;
        assert!(
            o.see(early)
                .unwrap_err()
                .contains("before its gateway.generation")
        );
        let mut o = observer();
        o.see(
            r#"{"type":"event","event":"gateway.generation","seq":1,"payload":{"generation":2}}"#,
        )
        .unwrap();
        o.see(early).unwrap();
        assert_eq!(o.report.answered, 1);
    }

    #[test]
    fn duplicates_backwards_generations_and_seq_gaps_are_violations() {
        let mut o = observer();
        o.see(r#"{"type":"res","id":"b","ok":true}"#).unwrap();
        assert!(o.see(r#"{"type":"res","id":"b","ok":true}"#).is_err());
        let mut o = observer();
        assert!(
            o.see(r#"{"type":"event","event":"gateway.generation","seq":1,"payload":{"generation":1}}"#)
                .is_err()
        );
        let mut o = observer();
        assert!(o.see(r#"{"type":"event","event":"tick","seq":2}"#).is_err());
    }

    #[test]
    fn only_retryable_errors_pass() {
        let mut o = observer();
        o.see(r#"{"type":"res","id":"b","ok":false,"error":{"code":"UNAVAILABLE","message":"x","retryable":true}}"#)
            .unwrap();
        assert_eq!(o.report.retryable, 1);
        let unknown = r#"{"type":"res","id":"a","ok":false,"error":{"code":"INVALID_REQUEST","message":"unknown method: health"}}"#;
        assert!(o.see(unknown).is_err());
    }
}
