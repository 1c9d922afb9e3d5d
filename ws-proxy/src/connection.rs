//! Client connections: the outbound queue of each (its [`Outbox`]), the
//! task that writes it to the socket, and the table of authenticated
//! connections that plugins' events go through.
//!
//! The outbound path loses nothing: every item queued is either written or
//! the connection is closed with a reason (a close frame, an abort such as
//! `slow consumer`, or a failed socket). Bytes are charged in one place
//! ([`Outbox::push`]) and refunded in one place (when the writer takes an
//! item off the queue, [`OutboxReceiver::recv`] / `try_recv`), so the
//! buffered count cannot drift.
//!
//! The writer also keeps the per-connection promise of `gateway.generation`:
//! every response carries the generation that produced it, and the writer
//! writes the `gateway.generation` event of a generation before the first
//! response of that generation on the connection.

use dashmap::DashMap;
use futures::{Sink, SinkExt};
use gateway_core::Gateway;
use gateway_core::frame::encode_event;
use plugin_api::{ConnId, ConnectionInfo, EventTransport, OutboundEvent, Role};
use serde_json::value::RawValue;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
/// Most frames written between two flushes.
pub(crate) const MAX_BATCH: usize = 64;
/// The event that tells a connection which generation serves it.
const GENERATION_EVENT: &str = "gateway.generation";

/// What the writer task sends.
#[derive(Debug)]
enum Outgoing {
    /// An encoded frame not produced by a generation (the challenge, an
    /// answer to a frame that never reached the gateway, `busy`).
    Frame(String),
    /// A response and the generation that produced it (0: none admitted it).
    Response(String, u64),
    /// hello-ok, describing `generation`: the connection now knows it.
    Hello(String, u64),
    /// An event, framed with the connection's next `seq` when written.
    Event(Arc<str>, Arc<RawValue>),
    /// `gateway.generation` for `generation`; written only if the
    /// connection has not been told of it (or a later one) yet.
    Generation(u64, Arc<RawValue>),
    /// A close frame, after everything queued before it.
    Close(u16, String),
}

impl Outgoing {
    fn cost(&self) -> usize {
        ITEM_OVERHEAD
            + match self {
                Outgoing::Frame(s) | Outgoing::Response(s, _) | Outgoing::Hello(s, _) => s.len(),
                Outgoing::Event(n, p) => n.len() + p.get().len(),
                Outgoing::Generation(_, p) => GENERATION_EVENT.len() + p.get().len(),
                Outgoing::Close(_, r) => r.len(),
            }
    }
}

/// One connection's outbound queue, bounded by bytes (`maxBufferedBytes`).
#[derive(Debug)]
pub(crate) struct Outbox {
    tx: mpsc::UnboundedSender<Outgoing>,
    /// Bytes queued and not yet taken by the writer.
    buffered: AtomicUsize,
    max_buffered: usize,
    /// Cancelled to close at once (slow consumer): queued frames are dropped.
    abort: CancellationToken,
    abort_reason: Mutex<Option<(u16, String)>>,
    /// Cancelled once the connection is closing or closed.
    closed: CancellationToken,
    /// Set when the server asked to close.
    close_requested: AtomicBool,
    /// Bytes the WebSocket layer holds unwritten (pongs included); they
    /// count toward the same budget.
    socket_backlog: std::sync::OnceLock<Arc<AtomicUsize>>,
    /// When the client last sent a frame (unix ms), for `system-presence`.
    last_activity_ms: std::sync::atomic::AtomicU64,
    /// The first close code the server asked for (0: none), for metrics.
    close_code: std::sync::atomic::AtomicU16,
}

/// The receiving half, owned by the writer task. Taking an item off the
/// queue refunds its bytes: the only refund there is (dropping the
/// receiver takes off, and so refunds, whatever is left).
#[derive(Debug)]
pub(crate) struct OutboxReceiver {
    rx: mpsc::UnboundedReceiver<Outgoing>,
    outbox: Arc<Outbox>,
}

impl OutboxReceiver {
    fn taken(&self, item: Outgoing) -> Outgoing {
        self.outbox
            .buffered
            .fetch_sub(item.cost(), Ordering::AcqRel);
        item
    }

    async fn recv(&mut self) -> Option<Outgoing> {
        let item = self.rx.recv().await?;
        Some(self.taken(item))
    }

    fn try_recv(&mut self) -> Option<Outgoing> {
        let item = self.rx.try_recv().ok()?;
        Some(self.taken(item))
    }
}

impl Drop for OutboxReceiver {
    /// The writer ended (the connection closed): refuse further items and
    /// refund what is still queued, so the count ends at zero.
    fn drop(&mut self) {
        self.rx.close();
        while self.try_recv().is_some() {}
    }
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
            close_requested: AtomicBool::new(false),
            socket_backlog: std::sync::OnceLock::new(),
            last_activity_ms: std::sync::atomic::AtomicU64::new(0),
            close_code: std::sync::atomic::AtomicU16::new(0),
        });
        let rx = OutboxReceiver {
            rx,
            outbox: outbox.clone(),
        };
        (outbox, rx)
    }

    /// The only place bytes are charged. An item that does not get into
    /// the queue is not charged (or is refunded right here); one that would
    /// exceed the cap closes the connection (`slow consumer`). A close
    /// frame is exempt from the cap (a connection queues at most a few), so
    /// a full queue still ends with the close the server asked for.
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
        if now + backlog > self.max_buffered && !matches!(item, Outgoing::Close(..)) {
            self.buffered.fetch_sub(cost, Ordering::AcqRel);
            self.close_now(1008, "slow consumer");
            return false;
        }
        if self.tx.send(item).is_err() {
            // The writer is gone: nothing will take it off the queue.
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

    fn note_close_code(&self, code: u16) {
        let _ = self
            .close_code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The close code the server asked for first, if it asked.
    pub(crate) fn close_code(&self) -> Option<u16> {
        match self.close_code.load(Ordering::Acquire) {
            0 => None,
            c => Some(c),
        }
    }

    /// Queue an encoded frame that no generation produced.
    pub(crate) fn frame(&self, text: String) -> bool {
        self.push(Outgoing::Frame(text))
    }

    /// Queue a response produced by `generation` (0: not admitted by any).
    /// The writer tells the connection about the generation first if it has
    /// not yet.
    pub(crate) fn response(&self, text: String, generation: u64) -> bool {
        self.push(Outgoing::Response(text, generation))
    }

    /// Queue hello-ok, which describes `generation`.
    pub(crate) fn hello(&self, text: String, generation: u64) -> bool {
        self.push(Outgoing::Hello(text, generation))
    }

    /// Queue an event; the writer gives it the next `seq`.
    pub(crate) fn event(&self, name: Arc<str>, payload: Arc<RawValue>) -> bool {
        self.push(Outgoing::Event(name, payload))
    }

    /// Queue `gateway.generation` for `generation` (payload: its number and
    /// features). Skipped by the writer when the connection already knows
    /// this generation or a later one.
    pub(crate) fn generation(&self, generation: u64, payload: Arc<RawValue>) -> bool {
        self.push(Outgoing::Generation(generation, payload))
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
        self.note_close_code(code);
        let _ = self.push(Outgoing::Close(code, reason.to_string()));
    }

    /// Close at once, dropping what is queued.
    pub(crate) fn close_now(&self, code: u16, reason: &str) {
        self.close_requested.store(true, Ordering::Release);
        self.note_close_code(code);
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

/// The `gateway.generation` payload of the generation serving now
/// (`{"generation":N,"features":{..}}`), built once per generation and
/// shared by every connection.
pub(crate) struct GenerationNotices {
    gateway: Gateway,
    latest: Mutex<Option<(u64, Arc<RawValue>)>>,
}

impl std::fmt::Debug for GenerationNotices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerationNotices").finish_non_exhaustive()
    }
}

impl GenerationNotices {
    pub(crate) fn new(gateway: Gateway) -> GenerationNotices {
        GenerationNotices {
            gateway,
            latest: Mutex::new(None),
        }
    }

    /// The current generation and its payload. Never older than a
    /// generation that admitted a request before this call.
    pub(crate) fn current(&self) -> (u64, Arc<RawValue>) {
        let scope = self.gateway.current();
        let generation = scope.generation();
        let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((g, p)) = latest.as_ref()
            && *g == generation
        {
            return (*g, p.clone());
        }
        let payload = serde_json::json!({"generation": generation, "features": scope.features()});
        let payload: Arc<RawValue> = serde_json::value::to_raw_value(&payload)
            .map(Arc::from)
            .unwrap_or_else(|_| Arc::from(RawValue::NULL.to_owned()));
        *latest = Some((generation, payload.clone()));
        (generation, payload)
    }
}

fn close_message(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_string().into(),
    }))
}

/// Per-connection state of the writer: the event counter and the newest
/// generation the connection has been told of.
struct WriterState<A> {
    seq: u64,
    announced: u64,
    /// The current generation and its `gateway.generation` payload.
    announce: A,
}

impl<A> WriterState<A>
where
    A: Fn() -> (u64, Arc<RawValue>),
{
    fn event(&mut self, name: &str, payload: &RawValue) -> Message {
        self.seq += 1;
        Message::text(encode_event(name, Some(payload), Some(self.seq)))
    }

    /// Feed one item to `sink` (a response of a generation the connection
    /// was not told of yet is preceded by that generation's event). Returns
    /// the close frame's code and reason for [`Outgoing::Close`], which is
    /// not fed.
    async fn feed<S>(
        &mut self,
        sink: &mut S,
        item: Outgoing,
    ) -> Result<Option<(u16, String)>, S::Error>
    where
        S: Sink<Message> + Unpin,
    {
        let msg = match item {
            Outgoing::Frame(s) => Message::text(s),
            Outgoing::Response(s, generation) => {
                if generation > self.announced {
                    let (current, payload) = (self.announce)();
                    debug_assert!(current >= generation);
                    let notice = self.event(GENERATION_EVENT, &payload);
                    self.announced = self.announced.max(current);
                    sink.feed(notice).await?;
                }
                Message::text(s)
            }
            Outgoing::Hello(s, generation) => {
                self.announced = self.announced.max(generation);
                Message::text(s)
            }
            Outgoing::Event(name, payload) => self.event(&name, &payload),
            Outgoing::Generation(generation, payload) => {
                if generation <= self.announced {
                    return Ok(None);
                }
                self.announced = generation;
                self.event(GENERATION_EVENT, &payload)
            }
            Outgoing::Close(code, reason) => return Ok(Some((code, reason))),
        };
        sink.feed(msg).await?;
        Ok(None)
    }
}

/// What woke the writer.
enum Wake {
    Item(Outgoing),
    Ping,
}

/// Write `first` and up to `MAX_BATCH - 1` more items already queued, then
/// flush once: one write for a burst of pipelined responses. An item is
/// taken off the queue only when it is about to be written, so a batch
/// that ends leaves the rest queued for the next. Returns the close frame
/// to send when the batch reached [`Outgoing::Close`] (everything before it
/// is flushed).
async fn write_batch<S, A>(
    sink: &mut S,
    rx: &mut OutboxReceiver,
    state: &mut WriterState<A>,
    first: Wake,
) -> Result<Option<(u16, String)>, S::Error>
where
    S: Sink<Message> + Unpin,
    A: Fn() -> (u64, Arc<RawValue>),
{
    let mut next = Some(first);
    let mut written = 0;
    while let Some(wake) = next.take() {
        match wake {
            Wake::Ping => sink.feed(Message::Ping(Vec::new().into())).await?,
            Wake::Item(item) => {
                if let Some(close) = state.feed(sink, item).await? {
                    sink.flush().await?;
                    return Ok(Some(close));
                }
            }
        }
        written += 1;
        if written < MAX_BATCH {
            next = rx.try_recv().map(Wake::Item);
        }
    }
    sink.flush().await?;
    Ok(None)
}

/// Write the outbox to `sink` until a close frame went out, the connection
/// was aborted, or the socket failed; pings every `ping_every`. `announce`
/// gives the current generation and its `gateway.generation` payload;
/// `announced` is the generation the connection knows at start (0 before
/// hello-ok).
pub(crate) async fn run_writer<S, A>(
    mut rx: OutboxReceiver,
    mut sink: S,
    ping_every: Duration,
    announce: A,
) where
    S: Sink<Message> + Unpin,
    A: Fn() -> (u64, Arc<RawValue>),
{
    let outbox = rx.outbox.clone();
    let mut state = WriterState {
        seq: 0,
        announced: 0,
        announce,
    };
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
            item = rx.recv() => match item {
                None => break,
                Some(item) => Wake::Item(item),
            },
            _ = ping.tick() => Wake::Ping,
        };
        let written = tokio::select! {
            biased;
            () = &mut abort => break,
            r = write_batch(&mut sink, &mut rx, &mut state, first) => r,
        };
        match written {
            Err(_) => {
                outbox.closed.cancel();
                return;
            }
            Ok(None) => {}
            Ok(Some((code, reason))) => {
                let _ = tokio::time::timeout(
                    CLOSE_WRITE_TIMEOUT,
                    sink.send(close_message(code, &reason)),
                )
                .await;
                debug!(code, reason = %reason, "close frame sent");
                outbox.closed.cancel();
                return;
            }
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

    /// Queue a host event (`shutdown`) for everyone.
    pub(crate) fn send_all(&self, name: &str, payload: &Arc<RawValue>) {
        let name: Arc<str> = name.into();
        for c in self.conns.iter() {
            c.outbox.event(name.clone(), payload.clone());
        }
    }

    /// Tell every connection about `generation` (skipped by a connection
    /// that already knows it or a later one).
    pub(crate) fn announce_all(&self, generation: u64, payload: &Arc<RawValue>) {
        for c in self.conns.iter() {
            c.outbox.generation(generation, payload.clone());
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
    use std::pin::Pin;
    use std::task::{Context, Poll};

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
            payload: raw("{}"),
        }
    }

    fn raw(s: &str) -> Arc<RawValue> {
        Arc::from(RawValue::from_string(s.into()).unwrap())
    }

    #[test]
    fn broadcast_reaches_operators_holding_the_scope_and_send_to_one() {
        let table = ConnectionTable::default();
        let mut admin = conn(&table, 1, Role::Operator, &["operator.admin"]);
        let mut read = conn(&table, 2, Role::Operator, &["operator.read"]);
        let mut node = conn(&table, 3, Role::Node, &["operator.admin"]);
        assert_eq!(table.broadcast("operator.write", &event()), 1);
        assert!(admin.try_recv().is_some());
        assert!(read.try_recv().is_none());
        assert!(node.try_recv().is_none());
        assert_eq!(
            table.broadcast_except("operator.write", &[ConnId(1)], &event()),
            0
        );
        assert_eq!(
            table.broadcast_except("operator.read", &[ConnId(1)], &event()),
            1
        );
        assert!(read.try_recv().is_some() && admin.try_recv().is_none());
        assert!(table.send_to(ConnId(3), &event()));
        assert!(node.try_recv().is_some());
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
        assert!(outbox.event_if_idle("tick".into(), raw("{}")));
        assert!(outbox.frame("x".repeat(1500)));
        assert!(!outbox.event_if_idle("tick".into(), raw("{}")));
    }

    /// A socket that keeps every frame written and counts flushes.
    #[derive(Clone, Default)]
    struct Recorder {
        frames: Arc<Mutex<Vec<Message>>>,
        flushes: Arc<AtomicUsize>,
    }

    impl Recorder {
        fn texts(&self) -> Vec<String> {
            self.frames
                .lock()
                .unwrap()
                .iter()
                .filter_map(|m| match m {
                    Message::Text(t) => Some(t.as_str().to_string()),
                    _ => None,
                })
                .collect()
        }
        fn len(&self) -> usize {
            self.frames.lock().unwrap().len()
        }
        fn close(&self) -> Option<(u16, String)> {
            self.frames.lock().unwrap().iter().find_map(|m| match m {
                Message::Close(Some(f)) => Some((u16::from(f.code), f.reason.to_string())),
                _ => None,
            })
        }
    }

    impl Sink<Message> for Recorder {
        type Error = std::io::Error;
        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
            self.frames.lock().unwrap().push(item);
            Ok(())
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            self.flushes.fetch_add(1, Ordering::Relaxed);
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Generation 1 serving, forever.
    fn generation_one() -> (u64, Arc<RawValue>) {
        (1, raw(r#"{"generation":1}"#))
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// Queue `n` numbered frames, then a close; run the writer to the end.
    async fn write_burst(n: usize) -> (Recorder, Arc<Outbox>) {
        let (outbox, rx) = Outbox::new(1 << 24);
        for i in 0..n {
            assert!(outbox.frame(format!("f{i}")));
        }
        outbox.close(1000, "done");
        let rec = Recorder::default();
        run_writer(rx, rec.clone(), HOUR, generation_one).await;
        (rec, outbox)
    }

    #[tokio::test]
    async fn every_frame_of_a_burst_is_written_in_order_at_batch_edges() {
        for n in [
            1,
            MAX_BATCH - 1,
            MAX_BATCH,
            MAX_BATCH + 1,
            2 * MAX_BATCH + 1,
            5 * MAX_BATCH,
            200,
        ] {
            let (rec, outbox) = write_burst(n).await;
            let want: Vec<String> = (0..n).map(|i| format!("f{i}")).collect();
            assert_eq!(rec.texts(), want, "burst of {n}");
            assert_eq!(rec.close(), Some((1000, "done".into())), "burst of {n}");
            assert_eq!(outbox.buffered.load(Ordering::Acquire), 0, "burst of {n}");
            // One flush per batch, not one per frame.
            let flushes = rec.flushes.load(Ordering::Relaxed);
            assert!(flushes <= n / MAX_BATCH + 2, "{flushes} flushes for {n}");
        }
    }

    #[tokio::test]
    async fn bursts_queued_while_the_writer_runs_arrive_in_order() {
        let (outbox, rx) = Outbox::new(1 << 24);
        let rec = Recorder::default();
        let writer = tokio::spawn(run_writer(rx, rec.clone(), HOUR, generation_one));
        let mut sent = 0;
        for n in [MAX_BATCH - 1, MAX_BATCH, MAX_BATCH + 1, 5 * MAX_BATCH] {
            for _ in 0..n {
                assert!(outbox.frame(format!("f{sent}")));
                sent += 1;
            }
            tokio::task::yield_now().await;
        }
        outbox.close(1000, "done");
        writer.await.unwrap();
        let want: Vec<String> = (0..sent).map(|i| format!("f{i}")).collect();
        assert_eq!(rec.texts(), want);
        assert_eq!(outbox.buffered.load(Ordering::Acquire), 0);
    }

    /// A frame whose queue cost is exactly `cost` bytes.
    fn frame_costing(cost: usize) -> String {
        "x".repeat(cost - ITEM_OVERHEAD)
    }

    #[tokio::test]
    async fn queue_cap_edges_write_everything_accepted_or_close_1008() {
        const CAP: usize = 10_000;
        for total in [CAP - 1, CAP, CAP + 1] {
            let (outbox, rx) = Outbox::new(CAP);
            // Nine frames of 1000 bytes and one making up the rest.
            let mut frames: Vec<String> = (0..9).map(|_| frame_costing(1000)).collect();
            frames.push(frame_costing(total - 9000));
            let accepted: Vec<bool> = frames.iter().map(|f| outbox.frame(f.clone())).collect();
            assert!(accepted[..9].iter().all(|a| *a), "total {total}");
            let rec = Recorder::default();
            if total <= CAP {
                assert!(accepted[9], "total {total} fits the cap");
                assert_eq!(outbox.buffered.load(Ordering::Acquire), total);
                outbox.close(1000, "done");
                run_writer(rx, rec.clone(), HOUR, generation_one).await;
                assert_eq!(rec.texts(), frames, "total {total}");
                assert_eq!(rec.close(), Some((1000, "done".into())));
            } else {
                assert!(!accepted[9], "total {total} is over the cap");
                run_writer(rx, rec.clone(), HOUR, generation_one).await;
                assert_eq!(rec.close(), Some((1008, "slow consumer".into())));
            }
            assert_eq!(outbox.buffered.load(Ordering::Acquire), 0, "total {total}");
            assert!(outbox.closed().is_cancelled());
        }
    }

    #[tokio::test]
    async fn ticks_keep_flowing_after_many_bursts_with_a_small_cap() {
        let (outbox, rx) = Outbox::new(16 * 1024);
        let rec = Recorder::default();
        let writer = tokio::spawn(run_writer(rx, rec.clone(), HOUR, generation_one));
        let mut expected = 0;
        for round in 0..1000 {
            for i in 0..150 {
                assert!(outbox.frame(format!("r{round}-{i}")), "round {round}");
            }
            expected += 150;
            while rec.len() < expected {
                tokio::task::yield_now().await;
            }
            assert_eq!(outbox.buffered.load(Ordering::Acquire), 0, "round {round}");
            assert!(
                outbox.event_if_idle("tick".into(), raw("{}")),
                "round {round}"
            );
            expected += 1;
        }
        outbox.close(1000, "done");
        writer.await.unwrap();
        assert_eq!(rec.len(), expected + 1);
        assert!(!outbox.abort.is_cancelled());
    }

    fn parsed(rec: &Recorder) -> Vec<serde_json::Value> {
        rec.texts()
            .iter()
            .map(|t| serde_json::from_str(t).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_generation_is_announced_before_its_first_response() {
        let announce = || (2, raw(r#"{"generation":2}"#));
        let (outbox, rx) = Outbox::new(1 << 20);
        outbox.hello(r#"{"type":"res","id":"hello"}"#.into(), 1);
        outbox.response(r#"{"type":"res","id":"a","g":1}"#.into(), 1);
        outbox.response(r#"{"type":"res","id":"b","g":2}"#.into(), 2);
        // The broadcast of generation 2 arrives late: skipped.
        outbox.generation(2, raw(r#"{"generation":2}"#));
        outbox.response(r#"{"type":"res","id":"c","g":1}"#.into(), 1);
        outbox.event("tick".into(), raw("{}"));
        outbox.generation(3, raw(r#"{"generation":3}"#));
        outbox.response(r#"{"type":"res","id":"d","g":3}"#.into(), 3);
        outbox.response(r#"{"type":"res","id":"e","g":0}"#.into(), 0);
        outbox.close(1000, "done");
        let rec = Recorder::default();
        run_writer(rx, rec.clone(), HOUR, announce).await;
        let frames = parsed(&rec);
        let shape: Vec<String> = frames
            .iter()
            .map(|f| match f["type"].as_str().unwrap() {
                "event" => format!(
                    "{}#{}:{}",
                    f["event"].as_str().unwrap(),
                    f["seq"],
                    f["payload"]["generation"]
                ),
                _ => f["id"].as_str().unwrap().to_string(),
            })
            .collect();
        assert_eq!(
            shape,
            [
                "hello",
                "a",
                "gateway.generation#1:2",
                "b",
                "c",
                "tick#2:null",
                "gateway.generation#3:3",
                "d",
                "e"
            ]
        );
    }

    #[tokio::test]
    async fn the_announcement_names_the_generation_serving_now() {
        // A response of generation 2 written while 4 serves: the connection
        // is told 4 (whose features it can rely on), and nothing older later.
        let announce = || (4, raw(r#"{"generation":4}"#));
        let (outbox, rx) = Outbox::new(1 << 20);
        outbox.hello("{\"type\":\"res\",\"id\":\"hello\"}".into(), 1);
        outbox.response("{\"type\":\"res\",\"id\":\"a\"}".into(), 2);
        outbox.generation(3, raw(r#"{"generation":3}"#));
        outbox.response("{\"type\":\"res\",\"id\":\"b\"}".into(), 4);
        outbox.generation(5, raw(r#"{"generation":5}"#));
        outbox.close(1000, "done");
        let rec = Recorder::default();
        run_writer(rx, rec.clone(), HOUR, announce).await;
        let gens: Vec<(u64, u64)> = parsed(&rec)
            .iter()
            .filter(|f| f["event"] == GENERATION_EVENT)
            .map(|f| {
                (
                    f["seq"].as_u64().unwrap(),
                    f["payload"]["generation"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(gens, [(1, 4), (2, 5)]);
        assert_eq!(outbox.buffered.load(Ordering::Acquire), 0);
    }
}
