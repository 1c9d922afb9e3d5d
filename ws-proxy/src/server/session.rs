//! One client connection: its writer, the handshake, joining the
//! connection table, the read loop (ticks, keepalive, frame checks), each
//! request handed to the gateway, and the close.

use super::{Shared, raw, unix_ms};
use crate::connection::{Outbox, run_writer};
use crate::limits::{binary_frame_close, read_error_close};
use crate::preauth::PreauthBudget;
use futures::StreamExt;
use gateway_core::frame::encode_response;
use plugin_api::{ConnId, ConnectionInfo, Params, RpcError};
use serde_json::json;
use std::future::Future as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self, Message};
use tracing::debug;

/// The answer to a request when its connection has too many in flight.
const BUSY: &str = "The server is busy. Please try again in a moment.";
/// How long a closing connection waits for the client's close frame.
pub(super) const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long a socket stays open after our close frame when the client's
/// reply cannot be read.
const CLOSE_LINGER: Duration = Duration::from_millis(200);

/// The first connection id of this process: its start time in unix ms,
/// times 1000. Plugins persist connection ids (the bncr store keeps the
/// connection holding each lease so that a client survives an in-process
/// restart); ids counted from 1 in every process let a lease restored after
/// a crash name whichever new connection got the same id. Ids stay below
/// 2^53, so JSON clients read them exactly.
pub(super) fn first_conn_id() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    ms.saturating_mul(1000).max(1)
}

pub(super) async fn run_connection<S>(
    shared: Arc<Shared>,
    ws: WebSocketStream<S>,
    peer: SocketAddr,
    budget: PreauthBudget,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn_id = ConnId(shared.next_conn.fetch_add(1, Ordering::Relaxed));
    let limits = shared.settings.limits.clone();
    let (sink, mut stream) = ws.split();
    let (outbox, rx) = Outbox::new(limits.max_buffered_bytes);
    budget.attach(&outbox);
    let ping_every = Duration::from_millis(limits.ping_interval_ms);
    let notices = shared.clone();
    let announce = move || notices.notices.current();
    let writer = tokio::spawn(run_writer(rx, sink, ping_every, announce));
    debug!(%peer, conn = %conn_id, "connection opened");
    crate::handshake::send_challenge(&outbox);
    let handshake = tokio::time::timeout(
        shared.settings.handshake_timeout(),
        crate::handshake::run(&shared, &mut stream, &outbox, peer, conn_id),
    )
    .await;
    let admitted = match handshake {
        Ok(r) => r,
        Err(_) => {
            outbox.close(1008, "handshake timeout");
            shared
                .metrics
                .ops
                .handshake_refused("handshake timeout", None);
            None
        }
    };
    if let Some((info, _generation)) = admitted {
        budget.lift();
        shared.table.insert(info.clone(), outbox.clone());
        shared.gateway.connection_opened(&info);
        // A restart may have swapped between hello-ok and joining the
        // table; the writer drops this when hello-ok already described it.
        let (generation, payload) = shared.notices.current();
        outbox.generation(generation, payload);
        serve(&shared, &mut stream, &outbox, info, &limits).await;
        shared.table.remove(conn_id);
        shared.gateway.connection_closed(conn_id);
    }
    // Let queued frames and the close frame go out and read until the
    // client's close reply (or the socket ends), within a bound.
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(_)) = stream.next().await {}
        if outbox.close_requested() {
            // The read side failed first (e.g. an oversized frame): let our
            // close frame out and give the peer a moment to read it before
            // the socket is dropped (unread input would reset it).
            outbox.closed().cancelled().await;
            tokio::time::sleep(CLOSE_LINGER).await;
        }
    })
    .await;
    outbox.closed().cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    shared.metrics.ops.connection_closed(outbox.close_code());
    debug!(%peer, conn = %conn_id, "connection closed");
}

async fn serve<S>(
    shared: &Arc<Shared>,
    stream: &mut S,
    outbox: &Arc<Outbox>,
    info: Arc<ConnectionInfo>,
    limits: &crate::config::Limits,
) where
    S: futures::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let in_flight = Arc::new(AtomicUsize::new(0));
    let tick_every = Duration::from_millis(limits.tick_interval_ms);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + tick_every, tick_every);
    let idle = Duration::from_millis(limits.ping_interval_ms) * 2 + Duration::from_secs(5);
    let mut last_seen = tokio::time::Instant::now();
    // Created once: a timer and a cancellation waiter per frame would cost
    // more than the frame. The idle timer is pushed back lazily, only when
    // it fires and the client was heard from since.
    let idle_timer = tokio::time::sleep_until(last_seen + idle);
    let closed = outbox.closed().clone();
    let closed = closed.cancelled();
    tokio::pin!(idle_timer, closed);
    loop {
        let msg = tokio::select! {
            () = &mut closed => return,
            _ = tick.tick() => {
                let payload = raw(&json!({"ts": unix_ms()}));
                outbox.event_if_idle("tick".into(), payload);
                continue;
            }
            () = &mut idle_timer => {
                if last_seen + idle > tokio::time::Instant::now() {
                    idle_timer.as_mut().reset(last_seen + idle);
                    continue;
                }
                debug!(conn = %info.conn_id, "keepalive timeout");
                outbox.close(1001, "keepalive timeout");
                return;
            }
            m = stream.next() => m,
        };
        last_seen = tokio::time::Instant::now();
        outbox.mark_activity(unix_ms());
        let msg = match msg {
            None | Some(Ok(Message::Close(_))) => return,
            Some(Ok(m)) => m,
            Some(Err(tungstenite::Error::Capacity(_))) => {
                outbox.close(1009, "payload too large");
                return;
            }
            Some(Err(e)) => {
                debug!(conn = %info.conn_id, error = %e, "read failed");
                if let Some((code, reason)) = read_error_close(&shared.metrics.limits, &e) {
                    outbox.close(code, reason);
                }
                return;
            }
        };
        let text = match &msg {
            Message::Text(t) => t.as_str(),
            Message::Binary(_) => {
                let (code, reason) = binary_frame_close(&shared.metrics.limits);
                outbox.close(code, reason);
                return;
            }
            _ => continue,
        };
        if text.len() > limits.max_payload {
            outbox.close(1009, "payload too large");
            return;
        }
        handle_request(
            shared,
            outbox,
            &info,
            &in_flight,
            text,
            limits.max_in_flight,
        );
    }
}

fn handle_request(
    shared: &Arc<Shared>,
    outbox: &Arc<Outbox>,
    info: &Arc<ConnectionInfo>,
    in_flight: &Arc<AtomicUsize>,
    text: &str,
    max_in_flight: usize,
) {
    let frame = match gateway_core::frame::parse_request(text) {
        Ok(f) => f,
        Err(e) => {
            if let Some(id) = &e.id {
                outbox.frame(encode_response(id, &Err(e.to_rpc_error())));
            }
            return;
        }
    };
    if frame.method == "connect" {
        let err = RpcError::invalid_request("invalid handshake: already connected")
            .with_details(json!({"code": "ALREADY_CONNECTED"}));
        outbox.frame(encode_response(&frame.id, &Err(err)));
        return;
    }
    if in_flight.fetch_add(1, Ordering::AcqRel) >= max_in_flight {
        in_flight.fetch_sub(1, Ordering::AcqRel);
        let err = RpcError::unavailable(BUSY).retryable_after(Some(250));
        shared.metrics.observe_request(
            bounded_method(shared, &frame.method),
            "busy",
            Duration::ZERO,
        );
        outbox.frame(encode_response(&frame.id, &Err(err)));
        return;
    }
    let id = frame.id.into_owned();
    let method = frame.method.into_owned();
    let params = frame
        .params
        .map(|p| Params::from_raw(p.to_owned()))
        .unwrap_or_default();
    let ctx = plugin_api::host::request_context(info.clone());
    let (shared, outbox, in_flight) = (shared.clone(), outbox.clone(), in_flight.clone());
    let tracker = shared.requests.clone();
    let answer = async move {
        let started = Instant::now();
        let (generation, result) = shared.gateway.dispatch_tagged(ctx, &method, params).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => {
                shared.metrics.ops.request_failed(e);
                outcome_label(e)
            }
        };
        outbox.response(encode_response(&id, &result), generation);
        in_flight.fetch_sub(1, Ordering::AcqRel);
        shared.metrics.observe_request(
            bounded_method(&shared, &method),
            outcome,
            started.elapsed(),
        );
    };
    // Most methods answer without waiting (sync handlers): run them here and
    // spare the task spawn. A request that has to wait continues as its own
    // task; its first poll there registers real wakers, so the no-op waker of
    // this first poll is never relied on.
    let mut answer = Box::pin(answer);
    let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
    if answer.as_mut().poll(&mut cx).is_pending() {
        tracker.spawn(answer);
    }
}

fn outcome_label(e: &RpcError) -> &'static str {
    use plugin_api::ErrorCode::*;
    match e.code {
        InvalidRequest => "invalid_request",
        Forbidden => "forbidden",
        Unavailable => "unavailable",
        NotPaired => "not_paired",
        AgentTimeout => "agent_timeout",
        ApprovalNotFound => "approval_not_found",
    }
}

/// The method name if the current registry has it, else `unknown`: keeps
/// the metric label set bounded.
fn bounded_method<'m>(shared: &Shared, method: &'m str) -> &'m str {
    if shared.gateway.dispatches(method) {
        method
    } else {
        "unknown"
    }
}
