//! `cargo xtask dashboard`: the operator dashboard in a real browser, and
//! `cargo xtask dashboard-cost`: what an open dashboard costs the gateway.
//!
//! The browser is Debian's headless Chromium, driven over the Chrome
//! DevTools Protocol on a WebSocket (the tokio-tungstenite client this crate
//! already has). CDP needs nothing at test time beyond the distribution's
//! `chromium` package: no npm download, no browser build pinned to a driver
//! version, no chromedriver whose version must match the browser's. The core
//! domains used here (Target, Page, Runtime, Input, Emulation, Network, Log)
//! have been stable for years.
//!
//! The check starts the debug ws-proxy, opens `/#token=...`, waits for
//! generation 1, presses Restart with real mouse events, waits for
//! generation 2 and its restart row, validates the config, and saves
//! desktop and phone screenshots under `target/dashboard/`. It fails on a
//! script error, a console error, a request to any other origin, horizontal
//! overflow at phone width, or a page heavier than 100 KiB.

use crate::client::{self, Credentials};
use crate::compare::{Sample, load};
use crate::process::{build_binary, workspace_root};
use crate::soak::{Gateway, http_get};
use anyhow::{Context, Result, bail, ensure};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any one wait in the browser check may take.
const WAIT: Duration = Duration::from_secs(30);
/// The files the page loads.
const PAGE_FILES: &[&str] = &[
    "/",
    "/dashboard/app.js",
    "/dashboard/app.css",
    "/dashboard/icon.svg",
];
/// The page weight goal.
const MAX_PAGE_BYTES: usize = 100 * 1024;
/// How often the page polls (app.js `POLL_MS`).
const POLL: Duration = Duration::from_secs(2);

/// Runs the browser check; an `Err` says what the page did wrong.
pub(crate) fn run() -> Result<()> {
    let chromium = find_chromium()?;
    let binary = build_binary("ws-proxy", false)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut gateway = Gateway::start_with(&binary, &[]).await?;
        let checked = check(&chromium, &gateway).await;
        if checked.is_err() {
            println!("dashboard: ws-proxy log tail:\n{}", gateway.log_tail(20));
        }
        gateway.kill().await;
        checked
    })
}

/// Debian's `chromium` (or `$CHROMIUM`).
fn find_chromium() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Ok(PathBuf::from(p));
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!("no chromium found: install it (Debian: apt-get install -y chromium) or set CHROMIUM")
}

async fn check(chromium: &Path, gateway: &Gateway) -> Result<()> {
    let port = gateway.port();
    let origin = format!("http://127.0.0.1:{port}");
    let weight = page_weight(port).await?;
    println!("dashboard: page weight {weight} bytes (goal < {MAX_PAGE_BYTES})");
    ensure!(weight < MAX_PAGE_BYTES, "page weighs {weight} bytes");

    let profile = tempfile::tempdir()?;
    let mut browser = Browser::launch(chromium, profile.path()).await?;
    let result = drive(&mut browser, gateway, &origin).await;
    browser.close().await;
    result
}

async fn drive(b: &mut Browser, gateway: &Gateway, origin: &str) -> Result<()> {
    let token = gateway.credentials().token.context("a token")?;
    b.viewport(1280, 900, false).await?;
    b.navigate(&format!("{origin}/#token={token}")).await?;
    b.wait_for("generation 1 and signed in", "document.getElementById('generation').textContent === '1' && document.getElementById('link').textContent === 'live'").await?;
    ensure!(
        b.eval("location.hash").await? == "",
        "the token stayed in the address bar"
    );
    println!("dashboard: signed in with the fragment token, generation 1");
    b.wait_for(
        "this page among the connected clients",
        "document.querySelector('#clients tbody').textContent.includes('this page')",
    )
    .await?;
    b.wait_for(
        "the log tail",
        "document.querySelectorAll('#logs div').length > 0",
    )
    .await?;

    b.click("#restart-btn").await?;
    b.wait_for(
        "generation 2 and its restart row",
        "document.getElementById('generation').textContent === '2' && !!document.querySelector('#history tr[data-generation=\"2\"][data-ok=\"true\"]')",
    )
    .await?;
    let result = b
        .eval("document.getElementById('action-result').textContent")
        .await?;
    ensure!(
        result.as_str().unwrap_or("").contains("Generation 2"),
        "restart result: {result}"
    );
    println!("dashboard: Restart pressed, generation 2 and its restart row shown");

    b.click("#validate-btn").await?;
    b.wait_for(
        "the validation result",
        "document.getElementById('action-result').textContent.startsWith('Config is valid')",
    )
    .await?;
    println!("dashboard: Validate config answered");

    // Let one more poll land so the screenshots show settled data.
    tokio::time::sleep(POLL + Duration::from_millis(300)).await;
    let dir = workspace_root().join("target").join("dashboard");
    std::fs::create_dir_all(&dir)?;
    b.screenshot(&dir.join("desktop.png")).await?;
    b.viewport(390, 844, true).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let overflow = b
        .eval("document.documentElement.scrollWidth - window.innerWidth")
        .await?;
    ensure!(
        overflow.as_f64().unwrap_or(1.0) <= 0.0,
        "the page is {overflow} px wider than a phone screen"
    );
    b.screenshot(&dir.join("phone.png")).await?;
    println!(
        "dashboard: screenshots in {} (desktop.png, phone.png)",
        dir.display()
    );

    b.pump(Duration::from_millis(200)).await?;
    ensure!(b.errors.is_empty(), "page errors: {:#?}", b.errors);
    let foreign: Vec<&String> = b
        .requests
        .iter()
        .filter(|u| {
            !u.starts_with(&format!("{origin}/"))
                && !u.starts_with(&origin.replace("http://", "ws://"))
        })
        .collect();
    ensure!(foreign.is_empty(), "requests to other origins: {foreign:?}");
    println!(
        "dashboard: {} requests, all to {origin}; no script or console errors",
        b.requests.len()
    );
    Ok(())
}

/// Bytes of every file the page loads.
async fn page_weight(port: u16) -> Result<usize> {
    let mut total = 0;
    for path in PAGE_FILES {
        let (status, body) = http_get(port, path).await?;
        ensure!(status == 200, "GET {path}: {status}");
        total += body.len();
    }
    Ok(total)
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A headless Chromium and one page, over CDP.
struct Browser {
    child: tokio::process::Child,
    ws: Ws,
    session: String,
    next_id: u64,
    /// Script exceptions, console errors and error log entries.
    errors: Vec<String>,
    /// Every URL the page requested (HTTP and WebSocket).
    requests: Vec<String>,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser")
            .field("session", &self.session)
            .finish()
    }
}

impl Browser {
    async fn launch(chromium: &Path, profile: &Path) -> Result<Browser> {
        let child = tokio::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", chromium.display()))?;
        // Chromium writes its port and browser target path here.
        let active = profile.join("DevToolsActivePort");
        let deadline = Instant::now() + WAIT;
        let endpoint = loop {
            if let Ok(text) = std::fs::read_to_string(&active) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    break format!("ws://127.0.0.1:{port}{path}");
                }
            }
            ensure!(
                Instant::now() < deadline,
                "chromium did not start its DevTools endpoint"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (ws, _) = tokio_tungstenite::connect_async(&endpoint)
            .await
            .context("connect to chromium's DevTools")?;
        let mut b = Browser {
            child,
            ws,
            session: String::new(),
            next_id: 0,
            errors: Vec::new(),
            requests: Vec::new(),
        };
        let target = b
            .send_browser("Target.createTarget", json!({"url": "about:blank"}))
            .await?;
        let target_id = target["targetId"].as_str().context("targetId")?.to_string();
        let attached = b
            .send_browser(
                "Target.attachToTarget",
                json!({"targetId": target_id, "flatten": true}),
            )
            .await?;
        b.session = attached["sessionId"]
            .as_str()
            .context("sessionId")?
            .to_string();
        for domain in [
            "Page.enable",
            "Runtime.enable",
            "Network.enable",
            "Log.enable",
        ] {
            b.send(domain, json!({})).await?;
        }
        Ok(b)
    }

    async fn close(mut self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            self.send_browser("Browser.close", json!({})),
        )
        .await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let _ = self.child.kill().await;
    }

    async fn send_browser(&mut self, method: &str, params: Value) -> Result<Value> {
        self.command(None, method, params).await
    }

    async fn send(&mut self, method: &str, params: Value) -> Result<Value> {
        let session = self.session.clone();
        self.command(Some(&session), method, params).await
    }

    async fn command(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(msg.to_string())).await?;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .with_context(|| format!("no answer to {method}"))?
                .context("DevTools connection closed")??;
            let Message::Text(text) = frame else { continue };
            let v: Value = serde_json::from_str(text.as_str())?;
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    bail!("{method}: {e}");
                }
                return Ok(v["result"].clone());
            }
            self.observe(&v);
        }
    }

    /// Read events for `d` (errors and requests are kept).
    async fn pump(&mut self, d: Duration) -> Result<()> {
        let until = tokio::time::Instant::now() + d;
        while let Ok(Some(frame)) = tokio::time::timeout_at(until, self.ws.next()).await {
            if let Message::Text(text) = frame? {
                let v: Value = serde_json::from_str(text.as_str())?;
                self.observe(&v);
            }
        }
        Ok(())
    }

    fn observe(&mut self, v: &Value) {
        let p = &v["params"];
        match v["method"].as_str().unwrap_or("") {
            "Runtime.exceptionThrown" => self.errors.push(format!(
                "exception: {}",
                p["exceptionDetails"]["exception"]["description"]
                    .as_str()
                    .unwrap_or_else(|| p["exceptionDetails"]["text"].as_str().unwrap_or("?"))
            )),
            "Runtime.consoleAPICalled" if p["type"] == "error" => {
                self.errors.push(format!("console.error: {}", p["args"]));
            }
            "Log.entryAdded" if p["entry"]["level"] == "error" => {
                self.errors.push(format!(
                    "log: {}",
                    p["entry"]["text"].as_str().unwrap_or("?")
                ));
            }
            "Network.requestWillBeSent" => {
                if let Some(u) = p["request"]["url"].as_str() {
                    self.requests.push(u.to_string());
                }
            }
            "Network.webSocketCreated" => {
                if let Some(u) = p["url"].as_str() {
                    self.requests.push(u.to_string());
                }
            }
            _ => {}
        }
    }

    async fn viewport(&mut self, width: u32, height: u32, mobile: bool) -> Result<()> {
        self.send(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": if mobile {2} else {1}, "mobile": mobile}),
        )
        .await?;
        Ok(())
    }

    async fn navigate(&mut self, url: &str) -> Result<()> {
        let r = self.send("Page.navigate", json!({"url": url})).await?;
        if let Some(e) = r.get("errorText") {
            bail!("navigate: {e}");
        }
        Ok(())
    }

    async fn eval(&mut self, expression: &str) -> Result<Value> {
        let r = self
            .send(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("{expression}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    async fn wait_for(&mut self, what: &str, condition: &str) -> Result<()> {
        // A page still loading has no elements yet: an exception is "not yet".
        let guarded = format!(
            "(() => {{ try {{ return !!({condition}); }} catch (e) {{ return false; }} }})()"
        );
        let deadline = Instant::now() + WAIT;
        loop {
            if self.eval(&guarded).await? == Value::Bool(true) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let text = self
                    .eval("document.body.innerText.slice(0, 2000)")
                    .await
                    .unwrap_or_default();
                bail!(
                    "timed out waiting for {what}; the page shows:\n{}",
                    text.as_str().unwrap_or("")
                );
            }
            self.pump(Duration::from_millis(100)).await?;
        }
    }

    /// A real mouse click at the middle of the element.
    async fn click(&mut self, selector: &str) -> Result<()> {
        let rect = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({selector:?}); e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
            ))
            .await?;
        let (x, y) = (
            rect[0].as_f64().context("x")?,
            rect[1].as_f64().context("y")?,
        );
        for kind in ["mousePressed", "mouseReleased"] {
            self.send(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            )
            .await?;
        }
        Ok(())
    }

    /// A PNG of the whole page at the current width.
    async fn screenshot(&mut self, path: &Path) -> Result<()> {
        let r = self
            .send(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await?;
        let data = r["data"].as_str().context("screenshot data")?;
        use base64::Engine as _;
        let png = base64::engine::general_purpose::STANDARD.decode(data)?;
        std::fs::write(path, png)?;
        Ok(())
    }
}

/// What `dashboard-cost` measures.
#[derive(Debug, Clone)]
pub(crate) struct CostConfig {
    /// Connections of the `health` load.
    pub(crate) conns: usize,
    /// In flight per connection.
    pub(crate) inflight: usize,
    /// Load window per measurement.
    pub(crate) duration: Duration,
    /// Alternating rounds (without, with).
    pub(crate) rounds: usize,
}

/// What `dashboard-cost` found.
#[derive(Debug)]
pub(crate) struct Cost {
    /// `health` req/s summed over the rounds without a dashboard.
    pub(crate) without: f64,
    /// The same with a dashboard polling.
    pub(crate) with: f64,
    /// Gateway CPU per second of wall time with a dashboard polling and no
    /// other load, above the same without it (idle).
    pub(crate) dashboard_cpu_per_s: Duration,
    /// Gateway CPU per `health` request under the load.
    pub(crate) cpu_per_request: Duration,
    /// `health` requests per second the gateway answered under the load.
    pub(crate) load_rps: f64,
}

impl Cost {
    /// The dashboard's CPU as a share of what the gateway spends at the
    /// measured load: how many `health` requests its CPU would have
    /// answered, over the requests answered per second.
    pub(crate) fn cpu_share(&self) -> f64 {
        let per_req = self.cpu_per_request.as_secs_f64().max(1e-12);
        self.dashboard_cpu_per_s.as_secs_f64() / per_req / self.load_rps.max(1e-9)
    }
}

/// `health` throughput with and without a dashboard polling the gateway
/// the way app.js does (status, health, system-presence, bncr.diagnostics,
/// logs.tail and GET /metrics every 2 s), alternating in one run on release
/// builds; then the gateway's CPU time with the dashboard alone against
/// idle, and per `health` request under the load. Throughput on a shared
/// machine swings by more than the dashboard costs; CPU time counts only
/// the gateway's own work.
pub(crate) async fn cost(config: &CostConfig) -> Result<Cost> {
    let xtask = build_binary("xtask", true)?;
    let proxy_bin = build_binary("ws-proxy", true)?;
    let gateway = Gateway::start_with(&proxy_bin, &[]).await?;
    let token = gateway.credentials().token.context("a token")?;
    let (mut without, mut with) = (Vec::<Sample>::new(), Vec::<Sample>::new());
    for round in 0..config.rounds {
        without.push(load_blocking(&xtask, &gateway, &token, config).await?);
        let (stop, poller) = open_dashboard(&gateway);
        let sample = load_blocking(&xtask, &gateway, &token, config).await;
        stop.notify_one();
        let polls = poller.await??;
        with.push(sample?);
        println!(
            "round {}: without {:.0} req/s, with a dashboard ({polls} polls) {:.0} req/s",
            round + 1,
            without[round].rps,
            with[round].rps
        );
    }
    ensure!(
        without.iter().chain(&with).all(|s| s.errors == 0),
        "a load run saw errors"
    );
    let sum = |v: &[Sample]| v.iter().map(|s| s.rps).sum::<f64>();
    // CPU: idle, then a dashboard alone, for the same window; then one more
    // load round.
    let window = CPU_WINDOW;
    let t0 = gateway.cpu_time()?;
    tokio::time::sleep(window).await;
    let idle = gateway.cpu_time()? - t0;
    let (stop, poller) = open_dashboard(&gateway);
    let t0 = gateway.cpu_time()?;
    tokio::time::sleep(window).await;
    let polled = gateway.cpu_time()? - t0;
    stop.notify_one();
    let polls = poller.await??;
    let t0 = gateway.cpu_time()?;
    let load = load_blocking(&xtask, &gateway, &token, config).await?;
    let loaded = gateway.cpu_time()? - t0;
    ensure!(load.errors == 0, "the CPU load run saw errors");
    let requests = load.rps * config.duration.as_secs_f64();
    let secs = window.as_secs_f64();
    let cost = Cost {
        without: sum(&without),
        with: sum(&with),
        dashboard_cpu_per_s: polled.saturating_sub(idle).div_f64(secs),
        cpu_per_request: loaded.div_f64(requests.max(1.0)),
        load_rps: load.rps,
    };
    println!(
        "cpu: idle {:.2} ms/s, dashboard alone ({polls} polls) {:.2} ms/s, under load {:.0} ms/s for {:.0} req/s ({:.2} us per request)",
        idle.as_secs_f64() * 1e3 / secs,
        polled.as_secs_f64() * 1e3 / secs,
        loaded.as_secs_f64() * 1e3 / config.duration.as_secs_f64(),
        load.rps,
        cost.cpu_per_request.as_secs_f64() * 1e6
    );
    Ok(cost)
}

/// How long the CPU of the idle gateway, and of the gateway serving a
/// dashboard alone, is measured.
const CPU_WINDOW: Duration = Duration::from_secs(20);

async fn load_blocking(
    xtask: &Path,
    gateway: &Gateway,
    token: &str,
    c: &CostConfig,
) -> Result<Sample> {
    let (xtask, url, token, c2) = (
        xtask.to_path_buf(),
        gateway.url(),
        token.to_string(),
        c.clone(),
    );
    tokio::task::spawn_blocking(move || {
        load(&xtask, &url, &token, c2.conns, c2.inflight, c2.duration)
    })
    .await?
}

/// A dashboard polling `gateway` until the returned notify is notified;
/// the task answers how many polls it made.
fn open_dashboard(
    gateway: &Gateway,
) -> (
    std::sync::Arc<tokio::sync::Notify>,
    tokio::task::JoinHandle<Result<u64>>,
) {
    let stop = std::sync::Arc::new(tokio::sync::Notify::new());
    let poller = tokio::spawn(poll_like_the_dashboard(
        gateway.url(),
        gateway.port(),
        gateway.credentials(),
        stop.clone(),
    ));
    (stop, poller)
}

/// One dashboard's traffic: the calls app.js makes every poll.
async fn poll_like_the_dashboard(
    url: String,
    port: u16,
    creds: Credentials,
    stop: std::sync::Arc<tokio::sync::Notify>,
) -> Result<u64> {
    let mut session = client::connect(&url, &creds).await?;
    let mut cursor = Value::Null;
    let mut polls = 0u64;
    let mut tick = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            () = stop.notified() => return Ok(polls),
            _ = tick.tick() => {}
        }
        for (i, method) in ["status", "health", "system-presence", "bncr.diagnostics"]
            .iter()
            .enumerate()
        {
            let id = format!("p{polls}-{i}");
            let res = client::call(&mut session, &id, method, &json!({}), WAIT).await?;
            ensure!(res.ok, "{method} failed");
        }
        let id = format!("p{polls}-logs");
        let res = client::call(
            &mut session,
            &id,
            "logs.tail",
            &json!({"cursor": cursor, "limit": 200}),
            WAIT,
        )
        .await?;
        if let Some(p) = res.payload {
            let v: Value = serde_json::from_str(p.get())?;
            cursor = v["cursor"].clone();
        }
        http_get(port, "/metrics").await?;
        polls += 1;
    }
}
