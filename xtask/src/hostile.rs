//! `cargo xtask hostile`: a hostile-client suite against the ws-proxy
//! binary, on loopback only. One case per limit the protocol promises
//! (HTTP stage, connection caps, descriptors, pongs, origins, failed auth,
//! protocol violations, logs). Each case is bounded in time and records the
//! gateway's peak RSS above its idle RSS while it ran; the run prints a
//! pass/fail table and exits non-zero on any failure.

use std::ffi::OsString;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::client::{self, Credentials};
use crate::soak::{Gateway, http_get};

/// The longest one case may take.
const CASE_TIMEOUT: Duration = Duration::from_secs(20);
/// Peak RSS above idle that any one attack may cost.
const RSS_BUDGET_KIB: u64 = 100 * 1024;

/// Limits small enough to trip quickly, large enough for real clients.
const CONFIG: &str = "\
[auth]
max_failures_per_minute = 3
[limits]
max_pending_connections = 128
max_pending_per_peer = 64
http_header_timeout_ms = 1000
http_idle_timeout_ms = 500
max_buffered_bytes = 262144
";

/// One row of the table.
#[derive(Debug)]
struct Row {
    name: &'static str,
    outcome: Result<String>,
    secs: f64,
    rss_peak_kib: u64,
}

/// Runs the suite against the ws-proxy binary (debug unless `release`);
/// `true` when every case passed.
pub(crate) fn run(release: bool) -> Result<bool> {
    let binary = crate::process::build_binary("ws-proxy", release)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let rows = runtime.block_on(suite(&binary))?;
    Ok(report(&rows))
}

async fn with_config(
    binary: &Path,
    dir: &Path,
    name: &str,
    toml: &str,
    extra: &[&str],
) -> Result<Gateway> {
    let path = dir.join(name);
    std::fs::write(&path, toml)?;
    let mut args: Vec<OsString> = vec!["--config".into(), path.into_os_string()];
    args.extend(extra.iter().map(OsString::from));
    Gateway::start_with(binary, &args).await
}

async fn suite(binary: &Path) -> Result<Vec<Row>> {
    let dir = tempfile::tempdir()?;
    let main = with_config(binary, dir.path(), "main.toml", CONFIG, &[]).await?;
    let mut rows = Vec::new();
    let g = &main;
    rows.push(
        case(
            g,
            "slowloris: 300 half-sent requests, a client still gets in",
            slowloris(g, 300),
        )
        .await,
    );
    rows.push(
        case(
            g,
            "HTTP header timeout closes a trickled request",
            header_timeout(g),
        )
        .await,
    );
    rows.push(
        case(
            g,
            "HTTP idle timeout closes a silent connection",
            idle_timeout(g),
        )
        .await,
    );
    rows.push(
        case(
            g,
            "pong flood: never reads, closed 1008 slow consumer",
            pong_flood(g),
        )
        .await,
    );
    rows.push(case(g, "Origin http://evil.example gets 403", evil_origin(g)).await);
    rows.push(
        case(
            g,
            "failed auth from loopback never locks out the token",
            auth_lockout(g),
        )
        .await,
    );
    rows.push(
        case(
            g,
            "invalid UTF-8 in a text frame: close 1007",
            raw_frame(g, frame(0x81, &[0xff, 0xfe]), 1007),
        )
        .await,
    );
    rows.push(
        case(
            g,
            "framing violation (RSV1 set): close 1002",
            raw_frame(g, frame(0xC1, b"{}"), 1002),
        )
        .await,
    );
    rows.push(
        case(
            g,
            "binary data frame: close 1003",
            raw_frame(g, frame(0x82, b"{}"), 1003),
        )
        .await,
    );
    rows.push(
        case(
            g,
            "100 KiB frame before auth: close 1009",
            preauth_oversize(g),
        )
        .await,
    );
    rows.push(
        case(
            g,
            "the gateway still serves after all of the above",
            still_serves(g),
        )
        .await,
    );
    drop(main);

    let capped = with_config(
        binary,
        dir.path(),
        "cap.toml",
        "[limits]\nmax_connections = 4\n",
        &[],
    )
    .await?;
    rows.push(
        case(
            &capped,
            "connection cap: N+1 refused with 503 at once",
            connection_cap(&capped, 4),
        )
        .await,
    );
    drop(capped);

    let fds = with_config(binary, dir.path(), "fds.toml", "", &[]).await?;
    rows.push(
        case(
            &fds,
            "256 descriptors, 300 half-sent requests: still accepting",
            fd_exhaustion(&fds),
        )
        .await,
    );
    drop(fds);

    let traced = with_config(
        binary,
        dir.path(),
        "trace.toml",
        "",
        &["--log-level", "trace"],
    )
    .await?;
    rows.push(
        case(
            &traced,
            "--log-level trace never prints a token or a frame",
            no_secrets_logged(&traced),
        )
        .await,
    );
    Ok(rows)
}

/// Runs `body` bounded by [`CASE_TIMEOUT`], sampling the gateway's RSS.
async fn case<F>(g: &Gateway, name: &'static str, body: F) -> Row
where
    F: Future<Output = Result<String>>,
{
    let idle = g.rss_kib().unwrap_or(0);
    let peak = Arc::new(AtomicU64::new(idle));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done, pid) = (peak.clone(), done.clone(), g.pid);
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                if let Some(rss) = rss_of(pid.as_raw()) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let started = Instant::now();
    let outcome = match timeout(CASE_TIMEOUT, body).await {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!("did not finish within {CASE_TIMEOUT:?}")),
    };
    done.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    let rss_peak_kib = peak.load(Ordering::Relaxed).saturating_sub(idle);
    let outcome = outcome.and_then(|detail| {
        ensure!(
            rss_peak_kib <= RSS_BUDGET_KIB,
            "peak RSS {rss_peak_kib} KiB above idle (budget {RSS_BUDGET_KIB} KiB)"
        );
        Ok(detail)
    });
    Row {
        name,
        outcome,
        secs: started.elapsed().as_secs_f64(),
        rss_peak_kib,
    }
}

fn rss_of(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
}

fn report(rows: &[Row]) -> bool {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(10);
    println!("\n{:<width$}  result  secs   peak RSS above idle", "case");
    for r in rows {
        let (mark, detail) = match &r.outcome {
            Ok(d) => ("pass", d.clone()),
            Err(e) => ("FAIL", format!("{e:#}")),
        };
        println!(
            "{:<width$}  {mark}   {:>5.2}  {:>6} KiB  {detail}",
            r.name, r.secs, r.rss_peak_kib
        );
    }
    let failed = rows.iter().filter(|r| r.outcome.is_err()).count();
    println!("{} passed, {failed} failed", rows.len() - failed);
    failed == 0
}

fn creds(g: &Gateway) -> Credentials {
    g.credentials()
}

/// A request head that never ends.
async fn half_sent(port: u16) -> Result<TcpStream> {
    let mut t = TcpStream::connect(("127.0.0.1", port)).await?;
    t.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .await?;
    Ok(t)
}

/// Whether the server closed `t` within `within`.
async fn closed_within(t: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, t.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

async fn health(g: &Gateway) -> Result<()> {
    let mut s = client::connect(&g.url(), &creds(g)).await?;
    let r = client::call(&mut s, "h", "health", &json!({}), Duration::from_secs(5)).await?;
    ensure!(r.ok, "health failed");
    Ok(())
}

async fn slowloris(g: &Gateway, n: usize) -> Result<String> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        match half_sent(g.port()).await {
            Ok(t) => held.push(t),
            Err(_) => break,
        }
    }
    let started = Instant::now();
    health(g).await.context("a real client was locked out")?;
    let evicted = g
        .metric("gateway_connections_evicted_total{reason=\"max_pending_per_peer\"}")
        .await?;
    ensure!(evicted > 0.0, "nothing was evicted");
    Ok(format!(
        "client served in {} ms; {evicted} evicted",
        started.elapsed().as_millis()
    ))
}

async fn header_timeout(g: &Gateway) -> Result<String> {
    let mut t = half_sent(g.port()).await?;
    let started = Instant::now();
    loop {
        sleep(Duration::from_millis(100)).await;
        if t.write_all(b"a").await.is_err() || closed_within(&mut t, Duration::ZERO).await {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(8),
            "still open after 8 s"
        );
    }
    Ok(format!("closed after {} ms", started.elapsed().as_millis()))
}

async fn idle_timeout(g: &Gateway) -> Result<String> {
    let mut t = TcpStream::connect(("127.0.0.1", g.port())).await?;
    let started = Instant::now();
    ensure!(
        closed_within(&mut t, Duration::from_secs(8)).await,
        "still open after 8 s"
    );
    Ok(format!("closed after {} ms", started.elapsed().as_millis()))
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub(crate) async fn handshake_on(ws: &mut Ws, g: &Gateway) -> Result<()> {
    client::next_text(ws).await?.context("no challenge")?;
    let params = json!({
        "minProtocol": 4, "maxProtocol": 4,
        "client": {"id": "xtask-hostile", "version": "1", "platform": "linux", "mode": "cli"},
        "role": "operator", "scopes": ["operator.admin"],
        "auth": {"token": creds(g).token},
    });
    ws.send(Message::text(client::request_text(
        "c",
        "connect",
        Some(&params),
    )))
    .await?;
    let r = client::wait_for_response(ws, "c").await?;
    ensure!(r.ok, "connect refused");
    Ok(())
}

async fn pong_flood(g: &Gateway) -> Result<String> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.set_recv_buffer_size(4096)?;
    let stream = sock.connect(([127, 0, 0, 1], g.port()).into()).await?;
    let (ws, _) = tokio_tungstenite::client_async(g.url(), MaybeTlsStream::Plain(stream)).await?;
    let mut ws = ws;
    handshake_on(&mut ws, g).await?;
    let payload = vec![7u8; 125];
    let mut sent = 0u64;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(15) {
        let r = timeout(
            Duration::from_secs(1),
            ws.send(Message::Ping(payload.clone().into())),
        )
        .await;
        if !matches!(r, Ok(Ok(()))) {
            break;
        }
        sent += 1;
        if sent.is_multiple_of(1024) && g.metric("gateway_write_backlog_closes_total").await? >= 1.0
        {
            break;
        }
    }
    let closes = g.metric("gateway_write_backlog_closes_total").await?;
    ensure!(closes >= 1.0, "not closed after {sent} pings");
    Ok(format!(
        "closed after {sent} pings ({} KiB of pongs)",
        sent * 127 / 1024
    ))
}

async fn evil_origin(g: &Gateway) -> Result<String> {
    let mut req = g.url().into_client_request()?;
    req.headers_mut()
        .insert("origin", "http://evil.example".parse()?);
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 403 => {}
        Err(e) => bail!("expected 403, got {e}"),
        Ok(_) => bail!("the upgrade was accepted"),
    }
    let mut own = g.url().into_client_request()?;
    own.headers_mut()
        .insert("origin", format!("http://127.0.0.1:{}", g.port()).parse()?);
    tokio_tungstenite::connect_async(own)
        .await
        .context("own origin refused")?;
    Ok("403; the gateway's own origin is accepted".into())
}

async fn auth_lockout(g: &Gateway) -> Result<String> {
    let wrong = Credentials {
        token: Some("wrong".into()),
        password: None,
        scopes: vec!["operator.read".into()],
    };
    for _ in 0..8 {
        ensure!(
            client::connect(&g.url(), &wrong).await.is_err(),
            "a wrong token was accepted"
        );
    }
    let started = Instant::now();
    health(g).await.context("the right token was refused")?;
    Ok(format!(
        "right token accepted in {} ms after 8 failures",
        started.elapsed().as_millis()
    ))
}

/// A masked client frame (mask key 0).
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![first, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    f.extend_from_slice(payload);
    f
}

async fn close_code(ws: &mut Ws) -> Result<Option<u16>> {
    loop {
        match timeout(Duration::from_secs(5), ws.next()).await? {
            Some(Ok(Message::Close(f))) => return Ok(f.map(|f| u16::from(f.code))),
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("no close frame: {e}"),
            None => bail!("no close frame: stream ended"),
        }
    }
}

async fn raw_frame(g: &Gateway, bytes: Vec<u8>, want: u16) -> Result<String> {
    let mut s = client::connect(&g.url(), &creds(g)).await?;
    match s.ws.get_mut() {
        MaybeTlsStream::Plain(t) => t.write_all(&bytes).await?,
        _ => bail!("not a plain socket"),
    }
    let code = close_code(&mut s.ws).await?;
    ensure!(code == Some(want), "closed {code:?}, expected {want}");
    Ok(format!("closed {want}"))
}

async fn preauth_oversize(g: &Gateway) -> Result<String> {
    let (mut ws, _) = tokio_tungstenite::connect_async(g.url()).await?;
    client::next_text(&mut ws).await?;
    let _ = ws.send(Message::text("x".repeat(100 * 1024))).await;
    let code = close_code(&mut ws).await?;
    ensure!(code == Some(1009), "closed {code:?}, expected 1009");
    Ok("closed 1009".into())
}

async fn still_serves(g: &Gateway) -> Result<String> {
    health(g).await?;
    let (status, _) = http_get(g.port(), "/readyz").await?;
    ensure!(status == 200, "/readyz {status}");
    Ok("health ok, /readyz 200".into())
}

async fn connection_cap(g: &Gateway, cap: usize) -> Result<String> {
    let mut held = Vec::new();
    for _ in 0..cap {
        held.push(client::connect(&g.url(), &creds(g)).await?);
    }
    let mut t = TcpStream::connect(("127.0.0.1", g.port())).await?;
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = timeout(Duration::from_secs(5), t.read_to_end(&mut buf)).await?;
    let text = String::from_utf8_lossy(&buf);
    ensure!(text.starts_with("HTTP/1.1 503"), "answer: {text:?}");
    let ms = started.elapsed().as_millis();
    drop(held);
    Ok(format!("503 in {ms} ms"))
}

async fn fd_exhaustion(g: &Gateway) -> Result<String> {
    let pid = g.pid.as_raw().to_string();
    let limited = tokio::process::Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=256:256"])
        .status()
        .await;
    if !matches!(limited, Ok(s) if s.success()) {
        bail!("prlimit is needed to lower the gateway's descriptor limit");
    }
    let mut held = Vec::new();
    for _ in 0..300 {
        if let Ok(t) = half_sent(g.port()).await {
            held.push(t);
        }
    }
    sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    health(g).await.context("a real client was locked out")?;
    let fd_errors = g
        .metric("gateway_accept_errors_total{kind=\"fd_limit\"}")
        .await
        .unwrap_or(0.0);
    Ok(format!(
        "client served in {} ms; {fd_errors} accepts hit the descriptor limit",
        started.elapsed().as_millis()
    ))
}

async fn no_secrets_logged(g: &Gateway) -> Result<String> {
    let token = creds(g).token.unwrap_or_default();
    let mut s = client::connect(&g.url(), &creds(g)).await?;
    let marker = "frame-content-marker-4c1d";
    client::call(
        &mut s,
        "m",
        "health",
        &json!({"probe": marker}),
        Duration::from_secs(5),
    )
    .await?;
    let wrong = Credentials {
        token: Some("wrong-secret-q9x".into()),
        password: None,
        scopes: vec![],
    };
    let _ = client::connect(&g.url(), &wrong).await;
    drop(s);
    sleep(Duration::from_millis(300)).await;
    let text = std::fs::read_to_string(g.log_path())?;
    // Log lines only: the startup banner on stdout prints the dashboard
    // link, whose fragment carries the token on purpose.
    let levels = [" TRACE ", " DEBUG ", " INFO ", " WARN ", " ERROR "];
    let log: Vec<&str> = text
        .lines()
        .filter(|l| levels.iter().any(|lvl| l.contains(lvl)))
        .collect();
    ensure!(
        log.iter().any(|l| l.contains(" DEBUG ")),
        "debug and trace logging is off"
    );
    for secret in [token.as_str(), "wrong-secret-q9x", marker] {
        if let Some(line) = log.iter().find(|l| l.contains(secret)) {
            bail!("{secret:?} is in the log: {line}");
        }
    }
    Ok(format!(
        "{} log lines, none with a token or frame",
        log.len()
    ))
}
