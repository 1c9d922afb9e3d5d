//! HTTP on the listener: liveness and readiness probes, metrics, the
//! dashboard's files, and the WebSocket upgrade with its buffer sizes.

use super::Shared;
use crate::limits::{Permit, WriteBacklog, WriteMeter};
use crate::preauth::{PreauthBudget, PreauthCap};
use gateway_core::PluginPhase;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};
use tracing::debug;

type HttpResponse = Response<Full<Bytes>>;

pub(super) fn handle_http(
    shared: Arc<Shared>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> HttpResponse {
    if is_upgrade(&req) {
        return upgrade(shared, peer, req);
    }
    let head = req.method() == Method::HEAD;
    let get = req.method() == Method::GET || head;
    match req.uri().path() {
        "/healthz" | "/health" if get => {
            let stats = shared.gateway.stats();
            let body = json!({"ok": true, "status": "live", "generation": stats.generation,
                "uptimeMs": stats.uptime.as_millis() as u64});
            probe(StatusCode::OK, &body, head)
        }
        "/readyz" | "/ready" if get => {
            let scope = shared.gateway.current();
            let failed: Vec<_> = scope
                .plugin_phases()
                .into_iter()
                .filter_map(|(id, p)| match p {
                    PluginPhase::Failed(e) => Some(json!({"id": id, "error": e})),
                    _ => None,
                })
                .collect();
            let degraded: Vec<_> = scope
                .plugin_degraded()
                .into_iter()
                .map(|(id, reason)| json!({"id": id, "reason": reason}))
                .collect();
            let closing = shared.gateway.is_closing() || shared.stopping.is_cancelled();
            let ready = failed.is_empty() && degraded.is_empty() && !closing;
            let mut body = json!({"ok": ready, "status": if ready {"ready"} else {"not-ready"},
                "generation": scope.generation()});
            if !failed.is_empty() {
                body["failedPlugins"] = json!(failed);
            }
            if !degraded.is_empty() {
                body["degradedPlugins"] = json!(degraded);
            }
            if closing {
                body["reason"] = json!("gateway stopping");
            }
            let code = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            probe(code, &body, head)
        }
        "/metrics" if get => {
            let text = shared.metrics.render(&shared.gateway, shared.table.len());
            let mut r = Response::new(Full::new(if head {
                Bytes::new()
            } else {
                Bytes::from(text)
            }));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        "/healthz" | "/health" | "/readyz" | "/ready" | "/metrics" => {
            let mut r = probe(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"ok": false, "status": "method-not-allowed"}),
                false,
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
        path if crate::dashboard::serves(path) => crate::dashboard::respond(path, get, head),
        _ => probe(
            StatusCode::NOT_FOUND,
            &json!({"ok": false, "status": "not-found"}),
            head,
        ),
    }
}

fn probe(code: StatusCode, body: &serde_json::Value, head: bool) -> HttpResponse {
    let text = if head {
        Bytes::new()
    } else {
        Bytes::from(body.to_string())
    };
    let mut r = Response::new(Full::new(text));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|p| p.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    has(header::UPGRADE, "websocket") && has(header::CONNECTION, "upgrade")
}

fn upgrade(shared: Arc<Shared>, peer: SocketAddr, mut req: Request<Incoming>) -> HttpResponse {
    if !crate::limits::origin_allowed(req.headers(), &shared.settings.limits.allowed_origins) {
        let m = &shared.metrics.limits;
        m.count(&m.origin_refused);
        debug!(%peer, "websocket upgrade refused for its origin");
        return probe(
            StatusCode::FORBIDDEN,
            &json!({"ok": false, "status": "forbidden", "reason": "origin not allowed"}),
            false,
        );
    }
    let Some(permit) = req.extensions_mut().remove::<Arc<Permit>>() else {
        return probe(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"ok": false, "status": "busy"}),
            false,
        );
    };
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let version_ok = req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    let (Some(key), true, true) = (key, version_ok, req.method() == Method::GET) else {
        let mut r = probe(
            StatusCode::BAD_REQUEST,
            &json!({"ok": false, "status": "bad-websocket-request"}),
            false,
        );
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return r;
    };
    if shared.stopping.is_cancelled() {
        return probe(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"ok": false, "status": "not-ready", "reason": "gateway stopping"}),
            false,
        );
    }
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let tracker = shared.connections.clone();
    tracker.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let limits = &shared.settings.limits;
                let config = websocket_config(limits);
                let backlog =
                    WriteBacklog::new(limits.max_buffered_bytes, shared.metrics.limits.clone());
                // Twice the pre-auth frame cap: room for frame headers and a
                // request pipelined right behind `connect`, never a large frame.
                let budget = PreauthBudget::new(2 * crate::config::PREAUTH_MAX_PAYLOAD)
                    .with_connection(permit, backlog.clone());
                let ws = WebSocketStream::from_raw_socket(
                    WriteMeter::new(
                        PreauthCap::new(TokioIo::new(upgraded), budget.clone()),
                        backlog,
                    ),
                    WsRole::Server,
                    Some(config),
                )
                .await;
                super::session::run_connection(shared, ws, peer, budget).await;
            }
            Err(e) => debug!(%peer, error = %e, "websocket upgrade failed"),
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

/// Buffer sizes for one WebSocket. Small read and write buffers keep an
/// idle connection cheap (tungstenite allocates its read buffer up front);
/// large frames still get a buffer of their own size. The write buffer may
/// grow (with pongs a client never reads) only to `maxBufferedBytes` plus
/// room for a close frame; the [`WriteMeter`] closes the connection before.
fn websocket_config(limits: &crate::config::Limits) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(limits.max_payload))
        .max_frame_size(Some(limits.max_payload))
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_write_buffer_size(limits.max_buffered_bytes.max(WS_WRITE_BUFFER) + CLOSE_ROOM)
}

/// Bytes read from the socket at a time.
const WS_READ_BUFFER: usize = 4 * 1024;
/// Outgoing bytes collected before a write to the socket (a flush writes
/// what is there).
const WS_WRITE_BUFFER: usize = 8 * 1024;
/// Room above the budget for a close frame and pongs in flight.
const CLOSE_ROOM: usize = 64 * 1024;
