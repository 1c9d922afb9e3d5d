//! Client connections: the outbound queue of each (its [`Outbox`]), the
//! task that writes it to the socket, and the table of authenticated
//! connections that plugins' events go through.

use dashmap::DashMap;
use futures::{Sink, SinkExt};
use gateway_core::frame::encode_event;
use plugin_api::{ConnId, ConnectionInfo, EventTransport, OutboundEvent, Role};
use serde_json::value::RawValue;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Approximate framing overhead counted per queued item.
const ITEM_OVERHEAD: usize = 64;
/// How long a close frame may take to go out.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the writer task sends.
#[derive(Debug)]
enum Outgoing {
    /// An encoded frame (responses, the challenge).
    Frame(String),
    /// An event, framed with the connection's next `seq` when written.
    Event(Arc<str>, Arc<RawValue>),
    /// A close frame, after everything queued before it.
    Close(u16, String),
}

impl Outgoing {
    fn cost(&self) -> usize {
        ITEM_OVERHEAD
            + match self {
                Outgoing::Frame(s) => s.len(),
                Outgoing::Event(n, p) => n.len() + p.get().len(),
                Outgoing::Close(_, r) => r.len(),
            }
    }
}

/// One connection's outbound queue, bounded by bytes (`maxBufferedBytes`).
#[derive(Debug)]
pub(crate) struct Outbox {
    tx: mpsc::UnboundedSender<Outgoing>,
    buffered: AtomicUsize,
    max_buffered: usize,
    /// Cancelled to close at once (slow consumer): queued frames are dropped.
    abort: CancellationToken,
    abort_reason: Mutex<Option<(u16, String)>>,
    /// Cancelled once the connection is closing or closed.
    closed: CancellationToken,
    /// Set when the server asked to close.
    close_requested: std::sync::atomic::AtomicBool,
    /// Bytes the WebSocket layer holds unwritten (pongs included); they
    /// count toward the same budget.
    socket_backlog: std::sync::OnceLock<Arc<AtomicUsize>>,
    /// When the client last sent a frame (unix ms), for `system-presence`.
    last_activity_ms: std::sync::atomic::AtomicU64,
}

/// The receiving half, owned by the writer task.
#[derive(Debug)]
pub(crate) struct OutboxReceiver {
    rx: mpsc::UnboundedReceiver<Outgoing>,
}

impl Outbox {
    pub(crate) fn new(max_buffered: usize) -> (Arc<Outbox>, OutboxReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let outbox = Arc::new(Outbox {
            tx,
            buffered: AtomicUsize::new(0),
            max_buffered,
            abort: CancellationToken::new(),
            abort_reason: Mutex::new(None),
            closed: CancellationToken::new(),
            close_requested: std::sync::atomic::AtomicBool::new(false),
            socket_backlog: std::sync::OnceLock::new(),
            last_activity_ms: std::sync::atomic::AtomicU64::new(0),
        });
        (outbox, OutboxReceiver { rx })
    }

    fn push(&self, item: Outgoing) -> bool {
        if self.closed.is_cancelled() {
            return false;
        }
        let cost = item.cost();
        let now = self.buffered.fetch_add(cost, Ordering::AcqRel) + cost;
        let backlog = self
            .socket_backlog
            .get()
            .map_or(0, |b| b.load(Ordering::Acquire));
        if now + backlog > self.max_buffered {
            self.buffered.fetch_sub(cost, Ordering::AcqRel);
            self.close_now(1008, "slow consumer");
            return false;
        }
        if self.tx.send(item).is_err() {
            self.buffered.fetch_sub(cost, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Count `backlog` (bytes below the outbox not yet written) in the budget.
    pub(crate) fn count_socket_backlog(&self, backlog: Arc<AtomicUsize>) {
        let _ = self.socket_backlog.set(backlog);
    }

    /// Bytes queued in the outbox now.
    pub(crate) fn buffered(&self) -> usize {
        self.buffered.load(Ordering::Acquire)
    }

    /// Note that the client sent something at `unix_ms`.
    pub(crate) fn mark_activity(&self, unix_ms: u64) {
        self.last_activity_ms.store(unix_ms, Ordering::Relaxed);
    }

    /// When the client last sent something (unix ms).
    pub(crate) fn last_activity_ms(&self) -> u64 {
        self.last_activity_ms.load(Ordering::Relaxed)
    }

    /// Queue an encoded frame.
    pub(crate) fn frame(&self, text: String) -> bool {
        self.push(Outgoing::Frame(text))
    }

    /// Queue an event; the writer gives it the next `seq`.
    pub(crate) fn event(&self, name: Arc<str>, payload: Arc<RawValue>) -> bool {
        self.push(Outgoing::Event(name, payload))
    }

    /// Queue an event only if the client is keeping up (for `tick`): dropped,
    /// not queued, when anything sizeable is already waiting.
    pub(crate) fn event_if_idle(&self, name: Arc<str>, payload: Arc<RawValue>) -> bool {
        let idle_limit = (self.max_buffered / 4).min(256 * 1024);
        if self.buffered.load(Ordering::Acquire) > idle_limit {
            return false;
        }
        self.event(name, payload)
    }

    /// Close after everything already queued has been written.
    pub(crate) fn close(&self, code: u16, reason: &str) {
        self.close_requested.store(true, Ordering::Release);
        let _ = self.push(Outgoing::Close(code, reason.to_string()));
    }

    /// Close at once, dropping what is queued.
    pub(crate) fn close_now(&self, code: u16, reason: &str) {
        self.close_requested.store(true, Ordering::Release);
        {
            let mut r = self.abort_reason.lock().unwrap_or_else(|e| e.into_inner());
            if r.is_none() {
                *r = Some((code, reason.to_string()));
            }
        }
        self.abort.cancel();
    }

    /// Whether the server asked to close this connection.
    pub(crate) fn close_requested(&self) -> bool {
        self.close_requested.load(Ordering::Acquire)
    }

    /// Cancelled once the connection is closing (a close frame went out or
    /// the socket failed) or closed.
    pub(crate) fn closed(&self) -> &CancellationToken {
        &self.closed
    }
}

fn close_message(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_string().into(),
    }))
}

/// Write the outbox to `sink` until a close frame went out, the connection
/// was aborted, or the socket failed; pings every `ping_every`.
pub(crate) async fn run_writer<S>(
    outbox: Arc<Outbox>,
    mut rx: OutboxReceiver,
    mut sink: S,
    ping_every: Duration,
) where
    S: Sink<Message> + Unpin,
{
    let mut seq: u64 = 0;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    // Registered once, not once per frame.
    let abort = outbox.abort.cancelled();
    let closed = outbox.closed.cancelled();
    tokio::pin!(abort, closed);
    loop {
        let first = tokio::select! {
            biased;
            () = &mut abort => break,
            () = &mut closed => break,
            item = rx.rx.recv() => match item {
                None => break,
                Some(item) => Some(item),
            },
            _ = ping.tick() => None,
        };
        // Write the first item and whatever else is already queued, then
        // flush once: one write for a burst of pipelined responses.
        let mut close = None;
        let batch = async {
            let mut next = first;
            for _ in 0..MAX_BATCH {
                let Some(item) = next else {
                    sink.feed(Message::Ping(Vec::new().into())).await?;
                    break;
                };
                outbox.buffered.fetch_sub(item.cost(), Ordering::AcqRel);
                let msg = match item {
                    Outgoing::Frame(s) => Message::text(s),
                    Outgoing::Event(name, payload) => {
                        seq += 1;
                        Message::text(encode_event(&name, Some(&payload), Some(seq)))
                    }
                    Outgoing::Close(code, reason) => {
                        close = Some((code, reason));
                        break;
                    }
                };
                sink.feed(msg).await?;
                match rx.rx.try_recv() {
                    Ok(item) => next = Some(item),
                    Err(_) => break,
                }
            }
            sink.flush().await
        };
        let sent = tokio::select! {
            biased;
            () = &mut abort => break,
            r = batch => r.is_ok(),
        };
        if !sent {
            outbox.closed.cancel();
            return;
        }
        if let Some((code, reason)) = close {
            let _ =
                tokio::time::timeout(CLOSE_WRITE_TIMEOUT, sink.send(close_message(code, &reason)))
                    .await;
            debug!(code, reason = %reason, "close frame sent");
            outbox.closed.cancel();
            return;
        }
    }
    let reason = outbox
        .abort_reason
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let Some((code, reason)) = reason {
        debug!(code, reason = %reason, "closing connection");
        let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, sink.send(close_message(code, &reason)))
            .await;
    }
    outbox.closed.cancel();
}

/// Most frames written between two flushes.
const MAX_BATCH: usize = 64;

/// An authenticated connection as the table sees it.
#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) info: Arc<ConnectionInfo>,
    pub(crate) outbox: Arc<Outbox>,
    /// When it joined the table (unix ms).
    pub(crate) connected_at_ms: u64,
}

/// A connection as `system-presence` shows it.
#[derive(Debug, Clone)]
pub(crate) struct Presence {
    pub(crate) info: Arc<ConnectionInfo>,
    pub(crate) connected_at_ms: u64,
    pub(crate) last_activity_ms: u64,
}

/// Every authenticated connection, by id. Lives for the process; it is the
/// [`EventTransport`] the gateway's plugins reach clients through.
#[derive(Debug, Default)]
pub struct ConnectionTable {
    conns: DashMap<u64, Connection>,
}

impl ConnectionTable {
    pub(crate) fn insert(&self, info: Arc<ConnectionInfo>, outbox: Arc<Outbox>) {
        let connected_at_ms = crate::server::unix_ms();
        outbox.mark_activity(connected_at_ms);
        self.conns.insert(
            info.conn_id.0,
            Connection {
                info,
                outbox,
                connected_at_ms,
            },
        );
    }

    /// Every connection with when it connected and was last heard from.
    pub(crate) fn presence(&self) -> Vec<Presence> {
        self.conns
            .iter()
            .map(|c| Presence {
                info: c.info.clone(),
                connected_at_ms: c.connected_at_ms,
                last_activity_ms: c.outbox.last_activity_ms(),
            })
            .collect()
    }

    pub(crate) fn remove(&self, conn: ConnId) {
        self.conns.remove(&conn.0);
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Every connection's outbox.
    pub(crate) fn outboxes(&self) -> Vec<Arc<Outbox>> {
        self.conns.iter().map(|c| c.outbox.clone()).collect()
    }

    /// Queue a host event (`gateway.generation`, `shutdown`) for everyone.
    pub(crate) fn send_all(&self, name: &str, payload: &Arc<RawValue>) {
        let name: Arc<str> = name.into();
        for c in self.conns.iter() {
            c.outbox.event(name.clone(), payload.clone());
        }
    }
}

impl EventTransport for ConnectionTable {
    fn send_to(&self, conn: ConnId, event: &OutboundEvent) -> bool {
        match self.conns.get(&conn.0) {
            Some(c) => c.outbox.event(event.name.clone(), event.payload.clone()),
            None => false,
        }
    }

    fn broadcast(&self, required_scope: &str, event: &OutboundEvent) -> usize {
        self.conns
            .iter()
            .filter(|c| c.info.role == Role::Operator && c.info.scopes.allows(required_scope))
            .filter(|c| c.outbox.event(event.name.clone(), event.payload.clone()))
            .count()
    }

    fn broadcast_except(
        &self,
        required_scope: &str,
        except: &[ConnId],
        event: &OutboundEvent,
    ) -> usize {
        self.conns
            .iter()
            .filter(|c| c.info.role == Role::Operator && c.info.scopes.allows(required_scope))
            .filter(|c| !except.contains(&c.info.conn_id))
            .filter(|c| c.outbox.event(event.name.clone(), event.payload.clone()))
            .count()
    }

    fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn is_connected(&self, conn: ConnId) -> bool {
        self.conns.contains_key(&conn.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::{ClientInfo, Scopes};

    fn conn(table: &ConnectionTable, id: u64, role: Role, scopes: &[&str]) -> OutboxReceiver {
        let (outbox, rx) = Outbox::new(1 << 20);
        let info = Arc::new(ConnectionInfo {
            conn_id: ConnId(id),
            role,
            scopes: Scopes::new(scopes.iter().copied()),
            client: ClientInfo::default(),
        });
        table.insert(info, outbox);
        rx
    }

    fn event() -> OutboundEvent {
        OutboundEvent {
            name: "plugin.demo.ping".into(),
            payload: Arc::from(RawValue::from_string("{}".into()).unwrap()),
        }
    }

    #[test]
    fn broadcast_reaches_operators_holding_the_scope_and_send_to_one() {
        let table = ConnectionTable::default();
        let mut admin = conn(&table, 1, Role::Operator, &["operator.admin"]);
        let mut read = conn(&table, 2, Role::Operator, &["operator.read"]);
        let mut node = conn(&table, 3, Role::Node, &["operator.admin"]);
        assert_eq!(table.broadcast("operator.write", &event()), 1);
        assert!(admin.rx.try_recv().is_ok());
        assert!(read.rx.try_recv().is_err());
        assert!(node.rx.try_recv().is_err());
        assert_eq!(
            table.broadcast_except("operator.write", &[ConnId(1)], &event()),
            0
        );
        assert_eq!(
            table.broadcast_except("operator.read", &[ConnId(1)], &event()),
            1
        );
        assert!(read.rx.try_recv().is_ok() && admin.rx.try_recv().is_err());
        assert!(table.send_to(ConnId(3), &event()));
        assert!(node.rx.try_recv().is_ok());
        assert!(!table.send_to(ConnId(9), &event()));
        assert_eq!(table.connection_count(), 3);
        table.remove(ConnId(1));
        assert_eq!(table.connection_count(), 2);
    }

    #[test]
    fn a_full_outbox_refuses_and_aborts_the_connection() {
        let (outbox, _rx) = Outbox::new(1000);
        assert!(outbox.frame("x".repeat(500)));
        assert!(!outbox.frame("x".repeat(500)));
        assert!(outbox.abort.is_cancelled());
        assert_eq!(
            outbox.abort_reason.lock().unwrap().clone(),
            Some((1008, "slow consumer".to_string()))
        );
    }

    #[test]
    fn ticks_are_dropped_for_a_client_that_is_behind() {
        let (outbox, _rx) = Outbox::new(4000);
        let p: Arc<RawValue> = Arc::from(RawValue::from_string("{}".into()).unwrap());
        assert!(outbox.event_if_idle("tick".into(), p.clone()));
        assert!(outbox.frame("x".repeat(1500)));
        assert!(!outbox.event_if_idle("tick".into(), p));
    }
}
