//! The wire protocol between the gateway (host) and a plugin process.
//!
//! One UTF-8 JSON message per line on the plugin's stdin (host to plugin) and
//! stdout (plugin to host), shaped as JSON-RPC 2.0: requests carry an `id`
//! and a `method`, notifications a `method` and no `id`, responses the `id`
//! of their request and a `result` or an `error`. Requests travel in both
//! directions and many may be in flight. stderr is the plugin's log.
//!
//! This crate holds only the message types, so the host (`plugin-host`) and
//! the Rust plugin side (`plugin-stdio`) cannot drift apart. The full
//! reference, with the JavaScript side, is `docs/plugins.md`.
//!
//! | message | direction | kind |
//! |---|---|---|
//! | [`method::INITIALIZE`] | host → plugin | request → [`InitializeResult`] |
//! | [`method::INITIALIZED`] | host → plugin | notification |
//! | [`method::CALL`] | host → plugin | request → [`CallResult`] |
//! | [`method::CANCEL`] | host → plugin | notification ([`CancelParams`]) |
//! | [`method::START`] | host → plugin | request: start services |
//! | [`method::STOP`] | host → plugin | request: stop services |
//! | [`method::SHUTDOWN`] | host → plugin | notification: exit now |
//! | [`method::PING`] | host → plugin | request: liveness, after a call timed out |
//! | [`method::EMIT`] | plugin → host | request or notification ([`EmitParams`]) |
//! | [`method::LOG`] | plugin → host | notification ([`LogParams`]) |

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

/// The protocol versions this crate speaks, newest last.
pub const PROTOCOL_VERSIONS: &[u32] = &[1];

/// Method names.
pub mod method {
    /// Host → plugin request: versions, generation, plugin id, config.
    pub const INITIALIZE: &str = "initialize";
    /// Host → plugin notification: the handshake is complete.
    pub const INITIALIZED: &str = "initialized";
    /// Host → plugin request: run a declared method for a client.
    pub const CALL: &str = "call";
    /// Host → plugin notification: the caller of request `id` no longer
    /// waits (deadline passed, client gone, generation stopping).
    pub const CANCEL: &str = "cancel";
    /// Host → plugin request: start the plugin's services (the previous
    /// generation's process of this plugin has stopped).
    pub const START: &str = "start";
    /// Host → plugin request: stop the plugin's services, in reverse order.
    pub const STOP: &str = "stop";
    /// Host → plugin notification: exit. stdin closes right after.
    pub const SHUTDOWN: &str = "shutdown";
    /// Host → plugin request: are you alive? Sent after a call timed out;
    /// any answer (even a "method not found" error) counts, none within the
    /// deadline means the process is hung and it is killed.
    pub const PING: &str = "ping";
    /// Plugin → host: send a declared event to connections or operators.
    pub const EMIT: &str = "emit";
    /// Plugin → host notification: a log line for the gateway log.
    pub const LOG: &str = "log";
}

/// JSON-RPC error codes used on this wire.
pub mod code {
    /// The line is not valid JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// The message is not a valid request.
    pub const INVALID_REQUEST: i64 = -32600;
    /// The method is not known to the receiver.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// The params do not fit the method.
    pub const INVALID_PARAMS: i64 = -32602;
    /// The receiver failed while handling the request.
    pub const INTERNAL_ERROR: i64 = -32603;
}

/// A request or notification id.
pub type Id = u64;

/// One line on the wire, as read. Classify it with [`Message::kind`].
#[derive(Debug, Deserialize)]
pub struct Message {
    /// Always `"2.0"`; not checked on input.
    #[serde(default)]
    pub jsonrpc: Option<String>,
    /// Present on requests and responses.
    #[serde(default)]
    pub id: Option<Id>,
    /// Present on requests and notifications.
    #[serde(default)]
    pub method: Option<String>,
    /// Request or notification params.
    #[serde(default)]
    pub params: Option<Box<RawValue>>,
    /// A successful response's result.
    #[serde(default)]
    pub result: Option<Box<RawValue>>,
    /// A failed response's error.
    #[serde(default)]
    pub error: Option<ErrorObject>,
}

/// What a [`Message`] is.
#[derive(Debug)]
pub enum MessageKind<'a> {
    /// A request: answer it with a response carrying `id`.
    Request {
        /// Request id.
        id: Id,
        /// Method name.
        method: &'a str,
        /// Params (raw JSON), if any.
        params: Option<&'a RawValue>,
    },
    /// A notification: no answer.
    Notification {
        /// Method name.
        method: &'a str,
        /// Params (raw JSON), if any.
        params: Option<&'a RawValue>,
    },
    /// A response to a request this side sent.
    Response {
        /// The request's id.
        id: Id,
        /// `Ok(result)` or `Err(error)`.
        outcome: Result<&'a RawValue, &'a ErrorObject>,
    },
    /// None of the above.
    Invalid(&'static str),
}

impl Message {
    /// Parse one line.
    pub fn parse(line: &str) -> Result<Message, serde_json::Error> {
        serde_json::from_str(line)
    }

    /// Classify the message.
    pub fn kind(&self) -> MessageKind<'_> {
        match (&self.method, self.id, &self.result, &self.error) {
            (Some(m), Some(id), None, None) => MessageKind::Request {
                id,
                method: m,
                params: self.params.as_deref(),
            },
            (Some(m), None, None, None) => MessageKind::Notification {
                method: m,
                params: self.params.as_deref(),
            },
            (None, Some(id), Some(r), None) => MessageKind::Response { id, outcome: Ok(r) },
            (None, Some(id), None, Some(e)) => MessageKind::Response {
                id,
                outcome: Err(e),
            },
            (None, Some(_), None, None) => {
                MessageKind::Invalid("response with neither result nor error")
            }
            _ => MessageKind::Invalid("neither a request, a notification nor a response"),
        }
    }
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorObject {
    /// One of [`code`] or an application code.
    pub code: i64,
    /// What went wrong.
    pub message: String,
    /// Structured detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl ErrorObject {
    /// An error with a code and a message and no data.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        ErrorObject {
            code,
            message: message.into(),
            data: None,
        }
    }
}

#[derive(Serialize)]
struct OutRequest<'a, P: Serialize> {
    jsonrpc: &'static str,
    id: Id,
    method: &'a str,
    params: &'a P,
}

#[derive(Serialize)]
struct OutNotification<'a, P: Serialize> {
    jsonrpc: &'static str,
    method: &'a str,
    params: &'a P,
}

#[derive(Serialize)]
struct OutResult<'a, R: Serialize> {
    jsonrpc: &'static str,
    id: Id,
    result: &'a R,
}

#[derive(Serialize)]
struct OutError<'a> {
    jsonrpc: &'static str,
    id: Id,
    error: &'a ErrorObject,
}

fn line(v: &impl Serialize) -> String {
    // Serializing these shapes cannot fail: maps have string keys and every
    // payload is already JSON.
    let mut s = serde_json::to_string(v).unwrap_or_else(|_| "{}".to_string());
    s.push('\n');
    s
}

/// A request line (with its trailing newline).
pub fn request_line(id: Id, method: &str, params: &impl Serialize) -> String {
    line(&OutRequest {
        jsonrpc: "2.0",
        id,
        method,
        params,
    })
}

/// A notification line (with its trailing newline).
pub fn notification_line(method: &str, params: &impl Serialize) -> String {
    line(&OutNotification {
        jsonrpc: "2.0",
        method,
        params,
    })
}

/// A successful response line (with its trailing newline).
pub fn result_line(id: Id, result: &impl Serialize) -> String {
    line(&OutResult {
        jsonrpc: "2.0",
        id,
        result,
    })
}

/// An error response line (with its trailing newline).
pub fn error_line(id: Id, error: &ErrorObject) -> String {
    line(&OutError {
        jsonrpc: "2.0",
        id,
        error,
    })
}

/// `initialize` params (host → plugin).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitializeParams {
    /// Protocol versions the host speaks; the plugin picks one.
    pub protocol_versions: Vec<u32>,
    /// The generation this process belongs to.
    pub generation: u64,
    /// The plugin id from the manifest.
    pub plugin_id: String,
    /// The plugin's validated config (`{}` when none is configured).
    pub config: Value,
    /// The plugin's own durable directory; the only thing that survives a
    /// restart.
    pub state_dir: String,
    /// A fresh directory for this generation's temporary files; removed when
    /// the generation ends.
    pub tmp_dir: String,
}

/// `initialize` result (plugin → host): the chosen version and everything
/// the plugin declares. Exactly this is advertised and dispatched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitializeResult {
    /// The version the plugin chose from [`InitializeParams::protocol_versions`].
    pub protocol_version: u32,
    /// Human-readable plugin name.
    #[serde(default)]
    pub name: Option<String>,
    /// Version of the plugin's code.
    #[serde(default)]
    pub version: Option<String>,
    /// Methods, in declaration order.
    #[serde(default)]
    pub methods: Vec<MethodDecl>,
    /// Events the plugin may emit.
    #[serde(default)]
    pub events: Vec<String>,
    /// Service ids, in start order.
    #[serde(default)]
    pub services: Vec<String>,
}

/// One declared method.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MethodDecl {
    /// Full method name.
    pub name: String,
    /// Required scope; absent means `operator.admin`; `"none"` means any
    /// authenticated connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Listed in the advertised method list (default true).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub advertise: bool,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// Who is calling, as the plugin sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallClient {
    /// The connection id (stable across restarts).
    pub conn_id: u64,
    /// `operator` or `node`.
    pub role: String,
    /// Scopes granted to the connection.
    pub scopes: Vec<String>,
    /// The client's self-description (`id`, `version`, `platform`, `mode`, ...).
    #[serde(default)]
    pub client: Value,
}

/// `call` params (host → plugin).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallParams {
    /// The declared method.
    pub method: String,
    /// The request's params (`null` when absent).
    #[serde(default)]
    pub params: Option<Box<RawValue>>,
    /// The caller.
    pub client: CallClient,
    /// Milliseconds until the host stops waiting and sends `cancel`.
    pub deadline_ms: u64,
}

/// `call` result (plugin → host): `{ok:true, payload}` or `{ok:false, error}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallResult {
    /// Whether the method succeeded.
    pub ok: bool,
    /// The answer when `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// The error when not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<CallError>,
}

/// An error answer, in the gateway protocol's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallError {
    /// `INVALID_REQUEST`, `FORBIDDEN`, `UNAVAILABLE`, ...; anything else is
    /// answered as `UNAVAILABLE`.
    pub code: String,
    /// Human-readable text.
    pub message: String,
    /// Structured detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
    /// Whether the client may retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
    /// Retry hint in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// `cancel` params (host → plugin).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelParams {
    /// The `call` request's id.
    pub id: Id,
}

/// `emit` params (plugin → host). Only declared events are delivered.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EmitParams {
    /// A declared event name.
    pub event: String,
    /// The event payload.
    #[serde(default)]
    pub payload: Value,
    /// Deliver to these connections only; when absent, to every operator
    /// holding `scope`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conn_ids: Option<Vec<u64>>,
    /// Scope a broadcast's receivers must hold (default `operator.read`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// `emit` result (host → plugin), when sent as a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmitResult {
    /// How many connections the event was queued for.
    pub delivered: usize,
}

/// `log` params (plugin → host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogParams {
    /// `debug`, `info`, `warn` or `error`.
    pub level: String,
    /// The message.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_classify() {
        let l = request_line(7, method::CALL, &serde_json::json!({"a": 1}));
        assert!(l.ends_with('\n') && !l[..l.len() - 1].contains('\n'));
        let m = Message::parse(l.trim_end()).unwrap();
        assert!(
            matches!(m.kind(), MessageKind::Request { id: 7, method: "call", params: Some(p) } if p.get() == r#"{"a":1}"#)
        );
        let n = Message::parse(notification_line(method::SHUTDOWN, &()).trim_end()).unwrap();
        assert!(matches!(
            n.kind(),
            MessageKind::Notification {
                method: "shutdown",
                ..
            }
        ));
        let r = Message::parse(result_line(3, &true).trim_end()).unwrap();
        assert!(
            matches!(r.kind(), MessageKind::Response { id: 3, outcome: Ok(v) } if v.get() == "true")
        );
        let e = ErrorObject {
            code: code::METHOD_NOT_FOUND,
            message: "no".into(),
            data: None,
        };
        let r = Message::parse(error_line(4, &e).trim_end()).unwrap();
        assert!(matches!(r.kind(), MessageKind::Response { id: 4, outcome: Err(x) } if *x == e));
        let bad = Message::parse(r#"{"id":1}"#).unwrap();
        assert!(matches!(bad.kind(), MessageKind::Invalid(_)));
        let bad = Message::parse(r#"{"jsonrpc":"2.0"}"#).unwrap();
        assert!(matches!(bad.kind(), MessageKind::Invalid(_)));
    }

    #[test]
    fn declarations_default_to_admin_and_advertised() {
        let r: InitializeResult = serde_json::from_str(
            r#"{"protocolVersion":1,"methods":[{"name":"a.b"},{"name":"a.c","scope":"none","advertise":false}]}"#,
        )
        .unwrap();
        assert_eq!(r.methods[0].scope, None);
        assert!(r.methods[0].advertise);
        assert_eq!(r.methods[1].scope.as_deref(), Some("none"));
        assert!(!r.methods[1].advertise);
        assert!(r.events.is_empty() && r.services.is_empty());
    }

    #[test]
    fn call_result_shapes() {
        let ok: CallResult = serde_json::from_str(r#"{"ok":true,"payload":{"x":1}}"#).unwrap();
        assert!(ok.ok && ok.error.is_none());
        let err: CallResult = serde_json::from_str(
            r#"{"ok":false,"error":{"code":"INVALID_REQUEST","message":"bad","retryAfterMs":5}}"#,
        )
        .unwrap();
        let e = err.error.unwrap();
        assert_eq!(
            (e.code.as_str(), e.retry_after_ms),
            ("INVALID_REQUEST", Some(5))
        );
    }
}
