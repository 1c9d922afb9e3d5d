//! `cargo xtask load`: keeps K requests pipelined on each of N connections
//! for a fixed time and reports throughput, latency and errors.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Result;
use futures::{FutureExt, SinkExt, StreamExt, future::try_join_all};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::time::{Instant, timeout_at};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Credentials, Frame, Session, WsStream};

/// How long pending requests may take to be answered after the load window.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What to send, where, and for how long.
#[derive(Debug, Clone)]
pub(crate) struct LoadConfig {
    /// `ws://127.0.0.1:PORT`.
    pub(crate) url: String,
    /// Auth and scopes for `connect`.
    pub(crate) creds: Credentials,
    /// Method to call.
    pub(crate) method: String,
    /// Params to send with each request (omitted when `None`).
    pub(crate) params: Option<Value>,
    /// Number of connections.
    pub(crate) conns: usize,
    /// Requests kept in flight per connection.
    pub(crate) inflight: usize,
    /// Length of the load window.
    pub(crate) duration: Duration,
}

/// What one connection observed.
#[derive(Debug)]
struct ConnStats {
    latency_us: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    /// Responses whose id was not pending: duplicates or never sent.
    unexpected: u64,
    /// Requests still unanswered when the connection ended.
    missing: u64,
    /// Responses `INVALID_REQUEST unknown method` for the load method.
    unknown_method: u64,
    closed_by_server: bool,
    generation_events: u64,
}

impl ConnStats {
    fn new() -> Self {
        Self {
            latency_us: Histogram::new(3).expect("3 significant figures is valid"),
            ok: 0,
            errors: BTreeMap::new(),
            unexpected: 0,
            missing: 0,
            unknown_method: 0,
            closed_by_server: false,
            generation_events: 0,
        }
    }
}

/// The merged result of a load run.
#[derive(Debug)]
pub(crate) struct LoadReport {
    /// From the end of the handshakes to the end of the drain.
    pub(crate) elapsed: Duration,
    latency_us: Histogram<u64>,
    /// Successful responses.
    pub(crate) ok: u64,
    /// Failed responses by error code.
    pub(crate) errors: BTreeMap<String, u64>,
    /// Responses to ids not pending (duplicates or unknown).
    pub(crate) unexpected: u64,
    /// Requests never answered.
    pub(crate) missing: u64,
    /// `unknown method` answers to the load method.
    pub(crate) unknown_method: u64,
    /// Connections the server closed during the run.
    pub(crate) server_closes: u64,
    /// Fewest `gateway.generation` events any one connection saw.
    pub(crate) min_generation_events: u64,
}

impl LoadReport {
    fn merge(elapsed: Duration, stats: Vec<ConnStats>) -> Self {
        let mut report = Self {
            elapsed,
            latency_us: Histogram::new(3).expect("3 significant figures is valid"),
            ok: 0,
            errors: BTreeMap::new(),
            unexpected: 0,
            missing: 0,
            unknown_method: 0,
            server_closes: 0,
            min_generation_events: stats.iter().map(|s| s.generation_events).min().unwrap_or(0),
        };
        for s in stats {
            report
                .latency_us
                .add(&s.latency_us)
                .expect("histograms auto-resize");
            report.ok += s.ok;
            for (code, n) in s.errors {
                *report.errors.entry(code).or_default() += n;
            }
            report.unexpected += s.unexpected;
            report.missing += s.missing;
            report.unknown_method += s.unknown_method;
            report.server_closes += u64::from(s.closed_by_server);
        }
        report
    }

    /// All responses, successful or not.
    pub(crate) fn answered(&self) -> u64 {
        self.ok + self.errors.values().sum::<u64>()
    }

    /// Responses per second over the whole run.
    pub(crate) fn rps(&self) -> f64 {
        self.answered() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The one JSON object `--json` prints.
    pub(crate) fn to_json(&self) -> Value {
        json!({
            "rps": self.rps().round(),
            "p50_us": self.latency_us.value_at_quantile(0.50),
            "p90_us": self.latency_us.value_at_quantile(0.90),
            "p99_us": self.latency_us.value_at_quantile(0.99),
            "max_us": self.latency_us.max(),
            "ok": self.ok,
            "errors": self.errors,
        })
    }

    /// Human-readable lines.
    pub(crate) fn print(&self) {
        let h = &self.latency_us;
        println!(
            "{:.0} req/s over {:.2}s  latency p50 {}us p90 {}us p99 {}us max {}us",
            self.rps(),
            self.elapsed.as_secs_f64(),
            h.value_at_quantile(0.50),
            h.value_at_quantile(0.90),
            h.value_at_quantile(0.99),
            h.max()
        );
        println!("ok {}  errors {:?}", self.ok, self.errors);
        if self.unexpected + self.missing + self.server_closes > 0 {
            println!(
                "unexpected responses {}  missing responses {}  server closes {}",
                self.unexpected, self.missing, self.server_closes
            );
        }
    }
}

/// Opens every connection, then runs the load window on all of them.
pub(crate) async fn run(config: &LoadConfig) -> Result<LoadReport> {
    client::ensure_loopback(&config.url)?;
    let sessions =
        try_join_all((0..config.conns).map(|_| client::connect(&config.url, &config.creds)))
            .await?;
    let start = Instant::now();
    let deadline = start + config.duration;
    let tasks = sessions.into_iter().map(|session| {
        let config = config.clone();
        tokio::spawn(async move { drive_connection(session, &config, deadline).await })
    });
    let stats = try_join_all(tasks).await?;
    Ok(LoadReport::merge(start.elapsed(), stats))
}

/// Pipelined requests on one connection until `deadline`, then a drain.
async fn drive_connection(session: Session, config: &LoadConfig, deadline: Instant) -> ConnStats {
    let mut conn = Pipeline {
        ws: session.ws,
        config,
        pending: HashMap::with_capacity(config.inflight),
        next_id: 1,
        stats: ConnStats::new(),
    };
    conn.run(deadline).await;
    conn.stats
}

/// One connection's request pipeline.
struct Pipeline<'a> {
    ws: WsStream,
    config: &'a LoadConfig,
    /// Request id -> send time.
    pending: HashMap<u64, Instant>,
    next_id: u64,
    stats: ConnStats,
}

impl Pipeline<'_> {
    async fn run(&mut self, deadline: Instant) {
        let drain_deadline = deadline + DRAIN_TIMEOUT;
        if self.refill(deadline).await.is_err() {
            return self.server_closed();
        }
        loop {
            let sending = Instant::now() < deadline;
            if !sending && self.pending.is_empty() {
                break;
            }
            let limit = if sending { deadline } else { drain_deadline };
            let msg = match timeout_at(limit, self.ws.next()).await {
                Ok(msg) => msg,
                Err(_) if sending => continue,
                Err(_) => break,
            };
            if !self.handle(msg) {
                return self.server_closed();
            }
            while let Some(msg) = self.ws.next().now_or_never() {
                if !self.handle(msg) {
                    return self.server_closed();
                }
            }
            if self.refill(deadline).await.is_err() {
                return self.server_closed();
            }
        }
        self.stats.missing += self.pending.len() as u64;
        let _ = self.ws.close(None).await;
    }

    /// Tops the pipeline up to `inflight` while the window is open.
    async fn refill(&mut self, deadline: Instant) -> Result<()> {
        if Instant::now() >= deadline || self.pending.len() >= self.config.inflight {
            return Ok(());
        }
        while self.pending.len() < self.config.inflight {
            let id = self.next_id;
            self.next_id += 1;
            let text = client::request_text(
                &id.to_string(),
                &self.config.method,
                self.config.params.as_ref(),
            );
            self.ws.feed(Message::text(text)).await?;
            self.pending.insert(id, Instant::now());
        }
        self.ws.flush().await?;
        Ok(())
    }

    /// Handles one incoming message; false once the connection is gone.
    fn handle(
        &mut self,
        msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> bool {
        match msg {
            Some(Ok(Message::Text(text))) => {
                self.on_frame(client::parse_frame(text.as_str()));
                true
            }
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => false,
            Some(Ok(_)) => true,
        }
    }

    fn on_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Response(res) => {
                let sent = res
                    .id
                    .parse::<u64>()
                    .ok()
                    .and_then(|id| self.pending.remove(&id));
                let Some(sent) = sent else {
                    self.stats.unexpected += 1;
                    return;
                };
                let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                self.stats
                    .latency_us
                    .record(micros)
                    .expect("auto-resizing histograms record any u64");
                if res.ok {
                    self.stats.ok += 1;
                } else {
                    self.stats.unknown_method += u64::from(res.is_unknown_method());
                    *self
                        .stats
                        .errors
                        .entry(res.error_code().to_owned())
                        .or_default() += 1;
                }
            }
            Frame::Event { event } if event == "gateway.generation" => {
                self.stats.generation_events += 1;
            }
            Frame::Event { .. } | Frame::Other => {}
        }
    }

    fn server_closed(&mut self) {
        self.stats.closed_by_server = true;
        self.stats.missing += self.pending.len() as u64;
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::echo::{self, EchoConfig};

    fn creds(token: &str) -> Credentials {
        Credentials {
            token: Some(token.into()),
            password: None,
            scopes: vec!["operator.admin".into()],
        }
    }

    /// Starts echo-baseline on a free port for a few seconds; returns its URL.
    async fn start_echo() -> String {
        let port = crate::soak::free_port().expect("free port");
        let config = EchoConfig {
            port,
            token: Some("t".into()),
            duration: Some(Duration::from_secs(10)),
        };
        tokio::spawn(echo::run(config));
        let url = format!("ws://127.0.0.1:{port}");
        for _ in 0..50 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        url
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_pipelined_request_is_answered_once() {
        let config = LoadConfig {
            url: start_echo().await,
            creds: creds("t"),
            method: "health".into(),
            params: Some(json!({})),
            conns: 4,
            inflight: 8,
            duration: Duration::from_millis(300),
        };
        let report = run(&config).await.expect("load runs");
        assert!(report.ok > 0);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(
            (report.unexpected, report.missing, report.server_closes),
            (0, 0, 0)
        );
        let json = report.to_json();
        for key in [
            "rps", "p50_us", "p90_us", "p99_us", "max_us", "ok", "errors",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_token_fails_the_handshake() {
        let url = start_echo().await;
        let err = client::connect(&url, &creds("wrong"))
            .await
            .expect_err("refused");
        assert!(format!("{err:#}").contains("unauthorized"), "{err:#}");
    }

    #[test]
    fn only_loopback_urls_are_accepted() {
        for url in ["ws://127.0.0.1:1", "ws://localhost:1", "ws://[::1]:1"] {
            assert!(client::ensure_loopback(url).is_ok(), "{url}");
        }
        assert!(client::ensure_loopback("ws://10.0.0.1:1").is_err());
    }
}
