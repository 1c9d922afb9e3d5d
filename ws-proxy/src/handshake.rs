//! The `connect` handshake: challenge, first frame, params, protocol, auth,
//! hello-ok. Every failure answers (when the frame had an id) and closes with
//! the code `docs/protocol.md` assigns.

use crate::config::PREAUTH_MAX_PAYLOAD;
use crate::connection::Outbox;
use crate::server::Shared;
use futures::{Stream, StreamExt};
use gateway_core::frame::{
    ConnectParams, PROTOCOL_VERSION, encode_event, encode_response, parse_request,
};
use plugin_api::{ConnId, ConnectionInfo, RpcError, Scopes};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_tungstenite::tungstenite::{self, Message};
use tracing::debug;

/// A failed handshake: what to answer and how to close.
struct Refusal {
    id: Option<String>,
    error: Option<Box<RpcError>>,
    code: u16,
    reason: &'static str,
    /// How long to hold the answer (a throttled failing client).
    delay: std::time::Duration,
}

impl Refusal {
    fn silent(code: u16, reason: &'static str) -> Self {
        Refusal {
            id: None,
            error: None,
            code,
            reason,
            delay: std::time::Duration::ZERO,
        }
    }
    fn answer(id: &str, error: RpcError, code: u16, reason: &'static str) -> Self {
        Refusal {
            id: Some(id.to_string()),
            error: Some(Box::new(error)),
            code,
            reason,
            delay: std::time::Duration::ZERO,
        }
    }
}

/// Send the `connect.challenge` event (it has no `seq`: it precedes the
/// session whose events are counted).
pub(crate) fn send_challenge(outbox: &Outbox) {
    let payload = json!({"nonce": crate::config::random_hex(16), "ts": crate::server::unix_ms()});
    let raw = serde_json::value::to_raw_value(&payload).ok();
    outbox.frame(encode_event("connect.challenge", raw.as_deref(), None));
}

/// Read frames until the first request and run the handshake. On success
/// the hello-ok response is queued and the connection's identity returned
/// with the generation hello-ok described;
/// on failure the refusal is queued (answer, then close) and `None` returned.
/// `None` too when the client went away.
pub(crate) async fn run<S>(
    shared: &Shared,
    stream: &mut S,
    outbox: &Outbox,
    peer: SocketAddr,
    conn_id: ConnId,
) -> Option<(Arc<ConnectionInfo>, u64)>
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let text = loop {
        match stream.next().await? {
            Ok(Message::Text(t)) => break t.as_str().to_owned(),
            Ok(Message::Binary(_)) => {
                let (code, reason) = crate::limits::binary_frame_close(&shared.metrics.limits);
                refuse(shared, outbox, Refusal::silent(code, reason));
                return None;
            }
            Ok(Message::Close(_)) => return None,
            Ok(_) => continue,
            Err(tungstenite::Error::Capacity(_)) => {
                refuse(
                    shared,
                    outbox,
                    Refusal::silent(1009, "preauth payload too large"),
                );
                return None;
            }
            Err(tungstenite::Error::Io(e)) if crate::preauth::is_exceeded(&e) => {
                refuse(
                    shared,
                    outbox,
                    Refusal::silent(1009, "preauth payload too large"),
                );
                return None;
            }
            Err(e) => {
                if let Some((code, reason)) =
                    crate::limits::read_error_close(&shared.metrics.limits, &e)
                {
                    refuse(shared, outbox, Refusal::silent(code, reason));
                }
                return None;
            }
        }
    };
    if text.len() > PREAUTH_MAX_PAYLOAD {
        refuse(
            shared,
            outbox,
            Refusal::silent(1009, "preauth payload too large"),
        );
        return None;
    }
    match connect(shared, &text, peer, conn_id) {
        Ok((id, info, hello)) => {
            let generation = hello["snapshot"]["generation"].as_u64().unwrap_or(0);
            outbox.hello(encode_response(&id, &Ok(hello)), generation);
            Some((info, generation))
        }
        Err(r) => {
            debug!(%peer, code = r.code, reason = r.reason, "handshake refused");
            if !r.delay.is_zero() {
                tokio::time::sleep(r.delay).await;
            }
            refuse(shared, outbox, r);
            None
        }
    }
}

fn refuse(shared: &Shared, outbox: &Outbox, r: Refusal) {
    let details_code = r
        .error
        .as_ref()
        .and_then(|e| e.details.as_ref())
        .and_then(|d| d.get("code"))
        .and_then(serde_json::Value::as_str);
    shared.metrics.ops.handshake_refused(r.reason, details_code);
    if let (Some(id), Some(err)) = (&r.id, r.error) {
        outbox.frame(encode_response(id, &Err(*err)));
    }
    outbox.close(r.code, r.reason);
}

fn connect(
    shared: &Shared,
    text: &str,
    peer: SocketAddr,
    conn_id: ConnId,
) -> Result<(String, Arc<ConnectionInfo>, serde_json::Value), Refusal> {
    let frame = match parse_request(text) {
        Ok(f) => f,
        Err(e) => {
            return Err(match &e.id {
                Some(id) => Refusal::answer(id, e.to_rpc_error(), 1008, "invalid request frame"),
                None => Refusal::silent(1008, "invalid request frame"),
            });
        }
    };
    let id = frame.id.as_ref();
    if frame.method != "connect" {
        return Err(Refusal::answer(
            id,
            RpcError::invalid_request("invalid handshake: first request must be connect"),
            1008,
            "invalid handshake",
        ));
    }
    if let Some(err) = shared.auth.rate_limited(peer.ip()) {
        return Err(Refusal::answer(id, err, 1008, "too many failed attempts"));
    }
    let raw = frame.params.map_or("null", |p| p.get());
    let params: ConnectParams = serde_json::from_str(raw).map_err(|e| {
        Refusal::answer(
            id,
            RpcError::invalid_request(format!("invalid connect params: {e}")),
            1008,
            "invalid connect params",
        )
    })?;
    let Some(protocol) = params.negotiate() else {
        return Err(Refusal::answer(
            id,
            RpcError::invalid_request("protocol mismatch").with_details(json!({
                "code": "PROTOCOL_MISMATCH",
                "expectedProtocol": PROTOCOL_VERSION,
                "supportedProtocols": [4, 3],
            })),
            1002,
            "protocol mismatch",
        ));
    };
    shared
        .auth
        .check(peer.ip(), params.auth.as_ref())
        .map_err(|r| Refusal {
            delay: r.delay,
            ..Refusal::answer(id, r.error, 1008, "unauthorized")
        })?;
    let info = Arc::new(ConnectionInfo {
        conn_id,
        role: params.role.unwrap_or_default(),
        scopes: Scopes::new(params.scopes.unwrap_or_default()),
        client: params.client,
    });
    let scope = shared.gateway.current();
    let limits = &shared.settings.limits;
    let hello = json!({
        "type": "hello-ok",
        "protocol": protocol,
        "server": {"version": env!("CARGO_PKG_VERSION"), "connId": conn_id.to_string()},
        "features": scope.features(),
        "snapshot": {
            "generation": scope.generation(),
            "uptimeMs": shared.gateway.stats().uptime.as_millis() as u64,
        },
        "auth": {"role": info.role.as_str(), "scopes": info.scopes.as_slice()},
        "policy": {
            "maxPayload": limits.max_payload,
            "maxBufferedBytes": limits.max_buffered_bytes,
            "tickIntervalMs": limits.tick_interval_ms,
        },
    });
    Ok((id.to_string(), info, hello))
}
