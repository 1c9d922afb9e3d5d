//! The client side of the OpenClaw gateway protocol (v4), shared by `load`
//! and `soak`: the handshake, request frames and reading server frames.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json, value::RawValue};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{Message, http::Uri};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

/// A WebSocket connection to a gateway.
pub(crate) type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long the handshake (challenge, connect, hello-ok) may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The request id of the `connect` request; load ids are decimal numbers.
const CONNECT_ID: &str = "connect";

/// What a client presents in its `connect` request.
#[derive(Debug, Clone)]
pub(crate) struct Credentials {
    /// Shared token (`auth.token`).
    pub(crate) token: Option<String>,
    /// Shared password (`auth.password`).
    pub(crate) password: Option<String>,
    /// Scopes to ask for.
    pub(crate) scopes: Vec<String>,
}

/// A connection that completed the handshake.
#[derive(Debug)]
pub(crate) struct Session {
    /// The open WebSocket.
    pub(crate) ws: WsStream,
    /// The hello-ok payload.
    pub(crate) hello: Value,
}

impl Session {
    /// `features.methods` advertised in hello-ok.
    pub(crate) fn advertised_methods(&self) -> Vec<String> {
        string_list(&self.hello["features"]["methods"])
    }

    /// `snapshot.generation` from hello-ok, if the server sent one.
    pub(crate) fn generation(&self) -> Option<u64> {
        self.hello["snapshot"]["generation"].as_u64()
    }
}

/// A server frame, reduced to what the clients here act on.
#[derive(Debug)]
pub(crate) enum Frame {
    /// A `res` frame.
    Response(Response),
    /// An `event` frame.
    Event {
        /// Event name.
        event: String,
    },
    /// Anything else (unknown frame type, non-JSON text).
    Other,
}

/// A `res` frame.
#[derive(Debug, Deserialize)]
pub(crate) struct Response {
    /// The request id it answers.
    pub(crate) id: String,
    /// Success flag.
    pub(crate) ok: bool,
    /// Present when `ok` is false.
    pub(crate) error: Option<ErrorBody>,
    /// Left unparsed: the load generator does not look at it.
    pub(crate) payload: Option<Box<RawValue>>,
}

/// The `error` object of a failed response.
#[derive(Debug, Deserialize)]
pub(crate) struct ErrorBody {
    /// Machine-readable code, e.g. `INVALID_REQUEST`.
    pub(crate) code: String,
    /// Human-readable message.
    #[serde(default)]
    pub(crate) message: String,
}

impl Response {
    /// The error code, or `"UNKNOWN"` for a failure without an error object.
    pub(crate) fn error_code(&self) -> &str {
        self.error.as_ref().map_or("UNKNOWN", |e| e.code.as_str())
    }

    /// True for `INVALID_REQUEST unknown method: ...`: the restart bug.
    pub(crate) fn is_unknown_method(&self) -> bool {
        self.error
            .as_ref()
            .is_some_and(|e| e.code == "INVALID_REQUEST" && e.message.starts_with("unknown method"))
    }
}

/// Only the fields needed to tell frames apart.
#[derive(Deserialize)]
struct FrameHead<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default)]
    event: Option<String>,
}

/// Refuses URLs whose host is not loopback: load is for local servers only.
pub(crate) fn ensure_loopback(url: &str) -> Result<()> {
    let uri: Uri = url.parse().with_context(|| format!("bad url {url}"))?;
    let host = uri.host().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        bail!("refusing non-loopback url {url}: load only targets local servers");
    }
    Ok(())
}

/// Opens a connection and runs the handshake up to hello-ok.
pub(crate) async fn connect(url: &str, creds: &Credentials) -> Result<Session> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(url, creds))
        .await
        .with_context(|| format!("handshake with {url} timed out"))?
}

async fn handshake(url: &str, creds: &Credentials) -> Result<Session> {
    let (mut ws, _) = connect_async(url)
        .await
        .with_context(|| format!("connect to {url}"))?;
    wait_for_event(&mut ws, "connect.challenge").await?;
    ws.send(Message::text(connect_request(creds).to_string()))
        .await?;
    let res = wait_for_response(&mut ws, CONNECT_ID).await?;
    if !res.ok {
        let msg = res.error.map(|e| format!("{}: {}", e.code, e.message));
        bail!("connect refused: {}", msg.unwrap_or_default());
    }
    let hello = match res.payload {
        Some(raw) => serde_json::from_str(raw.get())?,
        None => Value::Null,
    };
    Ok(Session { ws, hello })
}

/// The params of our `connect` request.
fn connect_request(creds: &Credentials) -> Value {
    let mut auth = serde_json::Map::new();
    if let Some(token) = &creds.token {
        auth.insert("token".into(), json!(token));
    }
    if let Some(password) = &creds.password {
        auth.insert("password".into(), json!(password));
    }
    let params = json!({
        "minProtocol": 4,
        "maxProtocol": 4,
        "client": {
            "id": "xtask-load",
            "version": env!("CARGO_PKG_VERSION"),
            "platform": std::env::consts::OS,
            "mode": "cli",
        },
        "role": "operator",
        "scopes": creds.scopes,
        "auth": auth,
    });
    json!({"type": "req", "id": CONNECT_ID, "method": "connect", "params": params})
}

/// The text of a request frame.
pub(crate) fn request_text(id: &str, method: &str, params: Option<&Value>) -> String {
    let mut frame = json!({"type": "req", "id": id, "method": method});
    if let Some(params) = params {
        frame["params"] = params.clone();
    }
    frame.to_string()
}

/// Classifies one text frame from the server.
pub(crate) fn parse_frame(text: &str) -> Frame {
    let Ok(head) = serde_json::from_str::<FrameHead<'_>>(text) else {
        return Frame::Other;
    };
    match head.kind {
        "res" => serde_json::from_str(text).map_or(Frame::Other, Frame::Response),
        "event" => Frame::Event {
            event: head.event.unwrap_or_default(),
        },
        _ => Frame::Other,
    }
}

/// The next text frame, skipping ping/pong; `None` once the server closed.
pub(crate) async fn next_text(ws: &mut WsStream) -> Result<Option<String>> {
    while let Some(msg) = ws.next().await {
        match msg? {
            Message::Text(text) => return Ok(Some(text.as_str().to_owned())),
            Message::Close(_) => return Ok(None),
            _ => {}
        }
    }
    Ok(None)
}

/// Reads until the named event arrives.
async fn wait_for_event(ws: &mut WsStream, name: &str) -> Result<()> {
    loop {
        let text = next_text(ws)
            .await?
            .with_context(|| format!("closed before event {name}"))?;
        if matches!(parse_frame(&text), Frame::Event { event } if event == name) {
            return Ok(());
        }
    }
}

/// Reads until the response to `id` arrives, ignoring events.
pub(crate) async fn wait_for_response(ws: &mut WsStream, id: &str) -> Result<Response> {
    loop {
        let text = next_text(ws)
            .await?
            .with_context(|| format!("closed before response {id}"))?;
        if let Frame::Response(res) = parse_frame(&text)
            && res.id == id
        {
            return Ok(res);
        }
    }
}

/// Sends one request and waits (bounded) for its response.
pub(crate) async fn call(
    session: &mut Session,
    id: &str,
    method: &str,
    params: &Value,
    timeout: Duration,
) -> Result<Response> {
    let text = request_text(id, method, Some(params));
    session.ws.send(Message::text(text)).await?;
    tokio::time::timeout(timeout, wait_for_response(&mut session.ws, id))
        .await
        .with_context(|| format!("no answer to {method} within {timeout:?}"))?
}

/// A JSON array of strings as a `Vec`, skipping non-strings.
fn string_list(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
