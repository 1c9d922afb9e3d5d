//! What a hostile peer can do, answered as the contract says: connection
//! caps and HTTP timeouts, origins, failed-auth limits, protocol violations,
//! a client that never reads, and secrets kept out of the logs.

use crate::common::*;
use futures::{SinkExt, StreamExt};
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

async fn metrics(s: &Server) -> String {
    http(s.addr, "GET", "/metrics").await.2
}

/// A request head that never ends.
async fn half_sent(addr: std::net::SocketAddr) -> TcpStream {
    let mut t = TcpStream::connect(addr).await.unwrap();
    t.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    t
}

/// Whether the server closed `t` (EOF or reset) within `within`.
async fn closed_by_server(t: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + within;
    loop {
        match timeout(
            deadline.saturating_duration_since(Instant::now()),
            t.read(&mut buf),
        )
        .await
        {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn slowloris_cannot_lock_out_a_client() {
    let s = Server::with_config(
        "[limits]\nmax_pending_connections = 100\nmax_pending_per_peer = 50\n",
        &[],
    )
    .await;
    let mut attackers = Vec::new();
    for _ in 0..300 {
        attackers.push(half_sent(s.addr).await);
    }
    // The attack holds 300 half-sent requests; a real client still gets in,
    // and probes still answer.
    let (mut c, _) = Client::admin(&s.url()).await;
    assert_eq!(c.call("health", json!({})).await["ok"], true);
    let body = metrics(&s).await;
    let evicted = metric(
        &body,
        "gateway_connections_evicted_total{reason=\"max_pending_per_peer\"}",
    )
    .unwrap();
    assert!(evicted >= 250.0, "{body}");
    assert!(
        metric(&body, "gateway_connections_pending").unwrap() <= 50.0,
        "{body}"
    );
    // The oldest attackers were closed; the newest are still waiting.
    assert!(closed_by_server(&mut attackers[0], WAIT).await);
    let last = attackers.last_mut().unwrap();
    assert!(!closed_by_server(last, Duration::from_millis(100)).await);
}

#[tokio::test]
async fn unfinished_and_idle_http_connections_time_out() {
    let s = Server::with_config(
        "[limits]\nhttp_header_timeout_ms = 600\nhttp_idle_timeout_ms = 200\n",
        &[],
    )
    .await;
    // A head trickled one byte at a time never completes: the header timeout.
    let mut slow = half_sent(s.addr).await;
    let started = Instant::now();
    let trickle = async {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if slow.write_all(b"a").await.is_err() {
                return;
            }
        }
    };
    let _ = timeout(WAIT, trickle).await;
    assert!(started.elapsed() < WAIT, "header timeout never fired");
    // A connection that sends nothing: the idle timeout.
    let mut idle = TcpStream::connect(s.addr).await.unwrap();
    assert!(closed_by_server(&mut idle, WAIT).await);
    let body = eventually(WAIT, "both timeouts counted", || async {
        let body = metrics(&s).await;
        let header = metric(&body, "gateway_http_timeouts_total{kind=\"header\"}")?;
        let idle = metric(&body, "gateway_http_timeouts_total{kind=\"idle\"}")?;
        (header >= 1.0 && idle >= 1.0).then_some(body)
    })
    .await;
    assert!(body.contains("gateway_http_timeouts_total"));
}

#[tokio::test]
async fn beyond_the_connection_cap_new_connections_get_503_at_once() {
    let s = Server::with_config("[limits]\nmax_connections = 3\n", &[]).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(Client::admin(&s.url()).await.0);
    }
    // N+1: refused at once with 503, not queued.
    let mut t = TcpStream::connect(s.addr).await.unwrap();
    let mut buf = Vec::new();
    timeout(WAIT, t.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    // One leaves: the next one is admitted.
    held.pop().unwrap().ws.close(None).await.unwrap();
    eventually(WAIT, "a slot to free up", || async {
        tokio_tungstenite::connect_async(s.url()).await.ok()
    })
    .await;
    let body = metrics_after_close(&s).await;
    assert!(
        metric(
            &body,
            "gateway_connections_refused_total{reason=\"max_connections\"}"
        )
        .unwrap()
            >= 1.0,
        "{body}"
    );
}

/// /metrics needs a connection slot itself; wait for one.
async fn metrics_after_close(s: &Server) -> String {
    eventually(WAIT, "metrics", || async {
        let mut t = TcpStream::connect(s.addr).await.ok()?;
        t.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        timeout(WAIT, t.read_to_end(&mut buf)).await.ok()?.ok()?;
        let text = String::from_utf8_lossy(&buf).to_string();
        text.starts_with("HTTP/1.1 200").then_some(text)
    })
    .await
}

#[tokio::test]
async fn a_browser_origin_other_than_the_gateway_gets_403() {
    let s = Server::start(&["--auth", "none"]).await;
    let mut req = s.url().into_client_request().unwrap();
    req.headers_mut()
        .insert("origin", "http://evil.example".parse().unwrap());
    let err = tokio_tungstenite::connect_async(req).await.unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(r) => assert_eq!(r.status(), 403),
        e => panic!("expected 403, got {e}"),
    }
    // The gateway's own origin and no origin at all are fine.
    let mut req = s.url().into_client_request().unwrap();
    let own = format!("http://{}", s.addr);
    req.headers_mut().insert("origin", own.parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_ok());
    let (mut c, _) = Client::connect(&s.url(), None, &["operator.admin"]).await;
    assert_eq!(c.call("health", json!({})).await["ok"], true);
    let body = metrics(&s).await;
    assert_eq!(metric(&body, "gateway_origin_refused_total"), Some(1.0));
}

#[tokio::test]
async fn an_allowed_origin_from_the_config_is_accepted() {
    let s = Server::with_config(
        "[limits]\nallowed_origins = [\"https://control.example.com\"]\n",
        &[],
    )
    .await;
    let mut req = s.url().into_client_request().unwrap();
    req.headers_mut()
        .insert("origin", "https://control.example.com".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_ok());
}

async fn connect_with(url: &str, token: &str) -> serde_json::Value {
    let mut c = Client::open(url).await;
    c.next_frame().await.unwrap();
    let mut p = connect_params(4, 4, &["operator.read"]);
    p["auth"] = json!({"token": token});
    c.request_raw("connect", p).await
}

#[tokio::test]
async fn failing_local_clients_are_throttled_and_never_lock_out_the_right_token() {
    let s = Server::with_config("[auth]\nmax_failures_per_minute = 3\n", &[]).await;
    let mut last_wrong = Duration::ZERO;
    for i in 0..6 {
        let started = Instant::now();
        let r = connect_with(&s.url(), "wrong").await;
        assert_eq!(r["ok"], false);
        assert_eq!(
            r["error"]["details"]["code"], "AUTH_TOKEN_MISMATCH",
            "attempt {i}: {r}"
        );
        last_wrong = started.elapsed();
    }
    // Past the limit the failing client is held back (3 over: 600 ms)...
    assert!(last_wrong >= Duration::from_millis(500), "{last_wrong:?}");
    // ...but the right token from the same address is accepted.
    let r = connect_with(&s.url(), TOKEN).await;
    assert_eq!(r["ok"], true, "{r}");
    let body = metrics(&s).await;
    assert_eq!(
        metric(&body, "gateway_auth_limited_total{action=\"throttled\"}"),
        Some(3.0),
        "{body}"
    );
}

/// An authenticated raw WebSocket client (tungstenite does the framing for
/// the handshake; raw bytes go to the socket afterwards).
async fn raw_client(url: &str) -> Client {
    let (c, _) = Client::admin(url).await;
    c
}

async fn send_raw(c: &mut Client, bytes: &[u8]) {
    use tokio_tungstenite::MaybeTlsStream;
    match c.ws.get_mut() {
        MaybeTlsStream::Plain(t) => t.write_all(bytes).await.unwrap(),
        _ => unreachable!(),
    }
}

/// A masked client frame (mask key 0, so the payload is sent as is).
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut f = vec![first, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    f.extend_from_slice(payload);
    f
}

#[tokio::test]
async fn protocol_violations_close_with_their_codes() {
    let s = Server::start(&[]).await;
    for (what, bytes, code) in [
        ("invalid utf-8 text", frame(0x81, &[0xff, 0xfe, 0xfd]), 1007),
        ("reserved bit set", frame(0xC1, b"{}"), 1002),
        ("unknown opcode", frame(0x83, b"{}"), 1002),
        (
            "binary data frame",
            frame(0x82, br#"{"type":"req","id":"1","method":"health"}"#),
            1003,
        ),
    ] {
        let mut c = raw_client(&s.url()).await;
        send_raw(&mut c, &bytes).await;
        let (_, closed) = c.until_closed().await;
        assert_eq!(closed.code, Some(code), "{what}: {closed:?}");
    }
    // Before the handshake too.
    let mut c = Client::open(&s.url()).await;
    c.next_frame().await.unwrap();
    c.ws.send(Message::binary(b"{}".to_vec())).await.unwrap();
    assert_eq!(c.until_closed().await.1.code, Some(1003));
    let body = metrics(&s).await;
    assert_eq!(
        metric(&body, "gateway_protocol_closes_total{code=\"1002\"}"),
        Some(2.0)
    );
    assert_eq!(
        metric(&body, "gateway_protocol_closes_total{code=\"1003\"}"),
        Some(2.0)
    );
    assert_eq!(
        metric(&body, "gateway_protocol_closes_total{code=\"1007\"}"),
        Some(1.0)
    );
    // The server is fine.
    let (mut ok, _) = Client::admin(&s.url()).await;
    assert_eq!(ok.call("health", json!({})).await["ok"], true);
}

#[tokio::test]
async fn a_client_that_pings_and_never_reads_is_closed_as_a_slow_consumer() {
    let s = Server::with_config("[limits]\nmax_buffered_bytes = 262144\n", &[]).await;
    // A small receive buffer so the kernel holds little for us.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(s.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(s.url(), stream)
        .await
        .unwrap();
    ws.next().await.unwrap().unwrap(); // the challenge
    let mut p = connect_params(4, 4, &["operator.admin"]);
    p["auth"] = json!({"token": TOKEN});
    let req = json!({"type": "req", "id": "c", "method": "connect", "params": p});
    ws.send(Message::text(req.to_string())).await.unwrap();
    let hello = ws.next().await.unwrap().unwrap();
    assert!(hello.to_text().unwrap().contains("hello-ok"), "{hello}");
    // Ping with the largest control payload, never reading the pongs.
    let payload = vec![7u8; 125];
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sent = 0usize;
    let mut tripped = false;
    while Instant::now() < deadline {
        let r = timeout(
            Duration::from_secs(1),
            ws.send(Message::Ping(payload.clone().into())),
        )
        .await;
        match r {
            Ok(Ok(())) => sent += 1,
            _ => {
                tripped = true;
                break;
            }
        }
        if sent.is_multiple_of(512) {
            let body = metrics(&s).await;
            if metric(&body, "gateway_write_backlog_closes_total") == Some(1.0) {
                tripped = true;
                break;
            }
        }
    }
    assert!(tripped, "never closed after {sent} pings");
    let body = eventually(WAIT, "the slow consumer to be counted and gone", || async {
        let body = metrics(&s).await;
        (metric(&body, "gateway_write_backlog_closes_total") == Some(1.0)
            && metric(&body, "gateway_connections_open") == Some(0.0))
        .then_some(body)
    })
    .await;
    assert!(body.contains("gateway_write_backlog_closes_total 1"));
    // Bounded: ~2 KiB of pongs per 2 KiB of the budget, never more than the
    // budget plus the kernel's buffers were ever queued.
    assert!(sent < 200_000, "{sent} pings before the close");
}

#[tokio::test]
async fn tokens_never_reach_the_logs_at_trace() {
    let secret_wrong = "wrong-secret-zz9-plural-z-alpha";
    let mut p = Proc::start(&["--log-level".into(), "trace".into()]).await;
    let (mut c, _) = Client::admin(&p.url()).await;
    assert_eq!(c.call("health", json!({"echo": TOKEN})).await["ok"], true);
    let r = connect_with(&p.url(), secret_wrong).await;
    assert_eq!(r["ok"], false);
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.signal(nix::sys::signal::Signal::SIGTERM);
    p.wait(Duration::from_secs(20)).await;
    let (err, out) = (p.stderr(), p.stdout.lock().unwrap().clone());
    assert!(
        err.contains("TRACE") || err.contains("DEBUG"),
        "trace logging is on:\n{err}"
    );
    for secret in [TOKEN, secret_wrong] {
        assert!(!err.contains(secret), "{secret} in stderr:\n{err}");
        // The banner's dashboard link carries the token in its fragment
        // (never sent in a request); nowhere else on stdout.
        for line in out.lines().filter(|l| l.contains(secret)) {
            assert!(
                secret == TOKEN
                    && line.starts_with("dashboard: http://")
                    && line.ends_with(&format!("/#token={TOKEN}")),
                "{secret} in stdout:\n{out}"
            );
        }
    }
}
