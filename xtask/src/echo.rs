//! `cargo xtask echo-baseline`: a bare WebSocket server that speaks just
//! enough of the protocol (challenge, connect, hello-ok) and answers every
//! request `{"ok":true}`. Its throughput is the practical ceiling for the
//! gateway on the same machine.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use futures::{SinkExt, StreamExt, stream::SplitSink};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, frame::coding::CloseCode};
use tokio_tungstenite::{WebSocketStream, accept_async, tungstenite::Message};

/// Outbound frames queued per connection before the reader waits.
const OUTBOX_CAPACITY: usize = 1024;

/// Where and how the echo server listens.
#[derive(Debug, Clone)]
pub(crate) struct EchoConfig {
    /// Loopback port to listen on.
    pub(crate) port: u16,
    /// Token the `connect` request must carry, if any.
    pub(crate) token: Option<String>,
    /// Stop after this long instead of waiting for Ctrl-C.
    pub(crate) duration: Option<Duration>,
}

/// Serves until Ctrl-C or the configured duration.
pub(crate) async fn run(config: EchoConfig) -> Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", config.port))
        .await
        .with_context(|| format!("bind 127.0.0.1:{}", config.port))?;
    println!("echo-baseline listening on ws://{}", listener.local_addr()?);
    tokio::select! {
        () = stop_requested(config.duration) => Ok(()),
        res = accept_loop(listener, config.token) => res,
    }
}

async fn stop_requested(duration: Option<Duration>) {
    match duration {
        Some(d) => tokio::select! {
            () = tokio::time::sleep(d) => {}
            _ = tokio::signal::ctrl_c() => {}
        },
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn accept_loop(listener: TcpListener, token: Option<String>) -> Result<()> {
    let conn_ids = AtomicU64::new(1);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let conn_id = conn_ids.fetch_add(1, Ordering::Relaxed);
        let token = token.clone();
        tokio::spawn(async move {
            // A client that misbehaves only ends its own connection.
            let _ = serve_connection(stream, token.as_deref(), conn_id).await;
        });
    }
}

async fn serve_connection(stream: TcpStream, token: Option<&str>, conn_id: u64) -> Result<()> {
    let mut ws = accept_async(stream).await?;
    ws.send(Message::text(challenge_event().to_string()))
        .await?;
    let connect = read_connect(&mut ws).await?;
    let id = connect["id"].as_str().unwrap_or("").to_owned();
    if let Err(reason) = check_connect(&connect, token) {
        let res = error_response(&id, &reason);
        ws.send(Message::text(res.to_string())).await?;
        ws.close(Some(CloseFrame {
            code: CloseCode::Policy,
            reason: reason.into(),
        }))
        .await?;
        return Ok(());
    }
    let scopes = connect["params"]["scopes"].clone();
    ws.send(Message::text(hello_ok(&id, conn_id, scopes).to_string()))
        .await?;
    answer_requests(ws).await
}

/// Reads the first text frame and parses it.
async fn read_connect(ws: &mut WebSocketStream<TcpStream>) -> Result<Value> {
    while let Some(msg) = ws.next().await {
        if let Message::Text(text) = msg? {
            return Ok(serde_json::from_str(text.as_str())?);
        }
    }
    bail!("closed before connect")
}

/// Checks the frame is a `connect` request with the expected token.
fn check_connect(frame: &Value, token: Option<&str>) -> Result<(), String> {
    if frame["type"] != "req" || frame["method"] != "connect" {
        return Err("invalid handshake: first request must be connect".into());
    }
    let auth = &frame["params"]["auth"];
    let given = auth["token"].as_str().or(auth["password"].as_str());
    match token {
        Some(expected) if given != Some(expected) => Err("unauthorized: token mismatch".into()),
        _ => Ok(()),
    }
}

/// Answers every request; a writer task batches responses into flushes.
async fn answer_requests(ws: WebSocketStream<TcpStream>) -> Result<()> {
    let (sink, mut stream) = ws.split();
    let (tx, rx) = mpsc::channel::<Message>(OUTBOX_CAPACITY);
    let writer = tokio::spawn(write_outbox(sink, rx));
    while let Some(msg) = stream.next().await {
        match msg? {
            Message::Text(text) => {
                let Some(res) = ok_response(text.as_str()) else {
                    continue;
                };
                if tx.send(Message::text(res)).await.is_err() {
                    break;
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    drop(tx);
    writer.await??;
    Ok(())
}

async fn write_outbox(
    mut sink: SplitSink<WebSocketStream<TcpStream>, Message>,
    mut rx: mpsc::Receiver<Message>,
) -> Result<()> {
    while let Some(msg) = rx.recv().await {
        sink.feed(msg).await?;
        while let Ok(msg) = rx.try_recv() {
            sink.feed(msg).await?;
        }
        sink.flush().await?;
    }
    let _ = sink.close().await;
    Ok(())
}

/// The `{"ok":true}` response to a request frame; `None` for anything else.
fn ok_response(text: &str) -> Option<String> {
    let frame: Value = serde_json::from_str(text).ok()?;
    if frame["type"] != "req" {
        return None;
    }
    let id = frame["id"].as_str()?;
    Some(json!({"type": "res", "id": id, "ok": true, "payload": {"ok": true}}).to_string())
}

fn challenge_event() -> Value {
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    json!({"type": "event", "event": "connect.challenge", "payload": {"nonce": format!("echo-{ts}"), "ts": ts}})
}

fn hello_ok(id: &str, conn_id: u64, scopes: Value) -> Value {
    let payload = json!({
        "type": "hello-ok",
        "protocol": 4,
        "server": {"version": env!("CARGO_PKG_VERSION"), "connId": format!("echo-{conn_id}")},
        "features": {"methods": ["health"], "events": []},
        "snapshot": {"generation": 1, "uptimeMs": 0},
        "auth": {"role": "operator", "scopes": scopes},
        "policy": {"maxPayload": 26_214_400, "maxBufferedBytes": 52_428_800, "tickIntervalMs": 30_000},
    });
    json!({"type": "res", "id": id, "ok": true, "payload": payload})
}

fn error_response(id: &str, message: &str) -> Value {
    json!({"type": "res", "id": id, "ok": false, "error": {"code": "INVALID_REQUEST", "message": message}})
}
