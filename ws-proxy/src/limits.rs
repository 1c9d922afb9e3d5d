//! Bounds on what a peer can make the process hold, and the counters that
//! say when one tripped.
//!
//! - [`Gate`]: caps on open connections in total, before auth and per peer
//!   address. A [`Permit`] lives as long as its connection; at the pending
//!   caps an unauthenticated connection is evicted, so half-sent requests
//!   cannot lock a real client out: at a peer's own cap that peer's oldest,
//!   at a global cap the oldest of the peer (an IPv6 peer counted by its
//!   /64) holding the most pending connections, so that a few addresses
//!   churning connections evict only their own.
//! - [`Activity`] and [`idle`]: the HTTP stage's idle timeout.
//! - [`WriteMeter`]: sees how many bytes the WebSocket layer holds unwritten
//!   (pongs and close frames included) so they count toward the
//!   connection's `maxBufferedBytes` with its outbox.
//! - Origin checks, protocol-violation close codes, and the file-descriptor
//!   limit.

use crate::connection::Outbox;
use hyper::HeaderMap;
use hyper::header;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite;
use tokio_util::sync::CancellationToken;

/// File descriptors kept free for everything that is not a client socket
/// (listener, store files, plugin files, logs).
const FD_RESERVE: u64 = 128;
/// How far the total may overshoot while evicted connections wind down.
const EVICTION_SLACK: usize = 32;

/// Counters for limits that tripped, rendered with the other metrics.
#[derive(Debug, Default)]
pub(crate) struct LimitMetrics {
    pub(crate) refused_max_connections: AtomicU64,
    pub(crate) refused_per_peer: AtomicU64,
    pub(crate) evicted_max_connections: AtomicU64,
    pub(crate) evicted_max_pending: AtomicU64,
    pub(crate) evicted_pending_per_peer: AtomicU64,
    pub(crate) evicted_fd_limit: AtomicU64,
    pub(crate) http_header_timeouts: AtomicU64,
    pub(crate) http_idle_timeouts: AtomicU64,
    pub(crate) accept_fd_exhausted: AtomicU64,
    pub(crate) accept_other_errors: AtomicU64,
    pub(crate) write_backlog_closes: AtomicU64,
    pub(crate) auth_rate_limited: AtomicU64,
    pub(crate) auth_throttled: AtomicU64,
    pub(crate) origin_refused: AtomicU64,
    pub(crate) close_1002: AtomicU64,
    pub(crate) close_1003: AtomicU64,
    pub(crate) close_1007: AtomicU64,
    pub(crate) close_1009: AtomicU64,
    pub(crate) open: AtomicU64,
    pub(crate) pending: AtomicU64,
}

impl LimitMetrics {
    /// Add one to `counter`.
    pub(crate) fn count(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Append the exposition text.
    pub(crate) fn render(&self, out: &mut String) {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut family = |name: &str, help: &str, kind: &str, rows: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in rows {
                if labels.is_empty() {
                    let _ = writeln!(out, "{name} {value}");
                } else {
                    let _ = writeln!(out, "{name}{{{labels}}} {value}");
                }
            }
        };
        family(
            "gateway_tcp_connections_open",
            "TCP connections open (HTTP stage, handshake and authenticated).",
            "gauge",
            &[("", v(&self.open))],
        );
        family(
            "gateway_connections_pending",
            "Connections not yet authenticated.",
            "gauge",
            &[("", v(&self.pending))],
        );
        family(
            "gateway_connections_refused_total",
            "Connections refused at accept because a cap was reached.",
            "counter",
            &[
                (
                    "reason=\"max_connections\"",
                    v(&self.refused_max_connections),
                ),
                (
                    "reason=\"max_connections_per_peer\"",
                    v(&self.refused_per_peer),
                ),
            ],
        );
        family(
            "gateway_connections_evicted_total",
            "Unauthenticated connections closed to make room for a new one.",
            "counter",
            &[
                (
                    "reason=\"max_connections\"",
                    v(&self.evicted_max_connections),
                ),
                (
                    "reason=\"max_pending_connections\"",
                    v(&self.evicted_max_pending),
                ),
                (
                    "reason=\"max_pending_per_peer\"",
                    v(&self.evicted_pending_per_peer),
                ),
                ("reason=\"fd_limit\"", v(&self.evicted_fd_limit)),
            ],
        );
        family(
            "gateway_http_timeouts_total",
            "HTTP-stage connections closed by a timeout.",
            "counter",
            &[
                ("kind=\"header\"", v(&self.http_header_timeouts)),
                ("kind=\"idle\"", v(&self.http_idle_timeouts)),
            ],
        );
        family(
            "gateway_accept_errors_total",
            "Failed accepts (the listener backs off and keeps accepting).",
            "counter",
            &[
                ("kind=\"fd_limit\"", v(&self.accept_fd_exhausted)),
                ("kind=\"other\"", v(&self.accept_other_errors)),
            ],
        );
        family(
            "gateway_write_backlog_closes_total",
            "Connections closed 1008 because bytes the socket did not take (pongs included) exceeded maxBufferedBytes.",
            "counter",
            &[("", v(&self.write_backlog_closes))],
        );
        family(
            "gateway_auth_limited_total",
            "Failed connects past the failure limit: remote peers refused, loopback clients held back.",
            "counter",
            &[
                ("action=\"refused\"", v(&self.auth_rate_limited)),
                ("action=\"throttled\"", v(&self.auth_throttled)),
            ],
        );
        family(
            "gateway_origin_refused_total",
            "WebSocket upgrades refused 403 for their Origin.",
            "counter",
            &[("", v(&self.origin_refused))],
        );
        family(
            "gateway_protocol_closes_total",
            "Connections closed for a protocol violation, by close code.",
            "counter",
            &[
                ("code=\"1002\"", v(&self.close_1002)),
                ("code=\"1003\"", v(&self.close_1003)),
                ("code=\"1007\"", v(&self.close_1007)),
                ("code=\"1009\"", v(&self.close_1009)),
            ],
        );
    }
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `max_connections` reached and nothing unauthenticated to evict.
    MaxConnections,
    /// `max_connections_per_peer` reached for a remote peer.
    PerPeer,
}

/// The caps a [`Gate`] enforces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caps {
    pub(crate) total: usize,
    pub(crate) pending: usize,
    pub(crate) pending_per_peer: usize,
    pub(crate) per_peer: usize,
}

#[derive(Debug, Default)]
struct GateState {
    next: u64,
    total: usize,
    /// Unauthenticated connections, oldest first.
    pending: BTreeMap<u64, (IpAddr, CancellationToken)>,
    pending_per_peer: HashMap<IpAddr, usize>,
    /// Open connections per remote peer.
    per_peer: HashMap<IpAddr, usize>,
}

impl GateState {
    fn unpend(&mut self, id: u64) -> bool {
        let Some((peer, _)) = self.pending.remove(&id) else {
            return false;
        };
        if let Some(n) = self.pending_per_peer.get_mut(&peer) {
            *n -= 1;
            if *n == 0 {
                self.pending_per_peer.remove(&peer);
            }
        }
        true
    }

    /// At a global cap: evict the oldest unauthenticated connection of the
    /// peer (IPv6 by /64) that holds the most of them; ties go to the peer
    /// whose oldest connection is oldest.
    fn evict_from_largest_peer(&mut self) -> bool {
        let mut groups: HashMap<IpAddr, usize> = HashMap::new();
        for (p, n) in &self.pending_per_peer {
            *groups.entry(crate::auth::peer_key(*p)).or_insert(0) += n;
        }
        let Some(most) = groups.values().copied().max() else {
            return false;
        };
        let id = self
            .pending
            .iter()
            .find(|(_, (p, _))| groups.get(&crate::auth::peer_key(*p)) == Some(&most))
            .map(|(id, (_, token))| {
                token.cancel();
                *id
            });
        id.is_some_and(|id| self.unpend(id))
    }

    /// Evict the oldest unauthenticated connection (of `peer`, if given).
    fn evict_oldest(&mut self, peer: Option<IpAddr>) -> bool {
        let id = self
            .pending
            .iter()
            .find(|(_, (p, _))| peer.is_none_or(|want| *p == want))
            .map(|(id, (_, token))| {
                token.cancel();
                *id
            });
        id.is_some_and(|id| self.unpend(id))
    }
}

/// Admission control for TCP connections; lives for the process.
#[derive(Debug)]
pub(crate) struct Gate {
    caps: Caps,
    state: Mutex<GateState>,
    metrics: Arc<LimitMetrics>,
}

fn key(peer: IpAddr) -> IpAddr {
    peer.to_canonical()
}

impl Gate {
    pub(crate) fn new(caps: Caps, metrics: Arc<LimitMetrics>) -> Arc<Gate> {
        Arc::new(Gate {
            caps,
            state: Mutex::new(GateState::default()),
            metrics,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, s: &GateState) {
        self.metrics.open.store(s.total as u64, Ordering::Relaxed);
        self.metrics
            .pending
            .store(s.pending.len() as u64, Ordering::Relaxed);
    }

    /// Admit a new connection from `peer`, evicting unauthenticated ones
    /// when a pending cap (or the total) is reached.
    pub(crate) fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Arc<Permit>, Refused> {
        let peer = key(peer);
        let m = &self.metrics;
        let mut s = self.state();
        let remote = !peer.is_loopback();
        if remote && s.per_peer.get(&peer).copied().unwrap_or(0) >= self.caps.per_peer {
            m.count(&m.refused_per_peer);
            return Err(Refused::PerPeer);
        }
        if s.total >= self.caps.total {
            if s.total >= self.caps.total + EVICTION_SLACK || !s.evict_from_largest_peer() {
                m.count(&m.refused_max_connections);
                return Err(Refused::MaxConnections);
            }
            m.count(&m.evicted_max_connections);
        }
        if s.pending_per_peer.get(&peer).copied().unwrap_or(0) >= self.caps.pending_per_peer
            && s.evict_oldest(Some(peer))
        {
            m.count(&m.evicted_pending_per_peer);
        }
        if s.pending.len() >= self.caps.pending && s.evict_from_largest_peer() {
            m.count(&m.evicted_max_pending);
        }
        s.next += 1;
        let id = s.next;
        let evict = CancellationToken::new();
        s.total += 1;
        if remote {
            *s.per_peer.entry(peer).or_insert(0) += 1;
        }
        s.pending.insert(id, (peer, evict.clone()));
        *s.pending_per_peer.entry(peer).or_insert(0) += 1;
        self.publish(&s);
        Ok(Arc::new(Permit {
            gate: self.clone(),
            id,
            peer,
            evict,
        }))
    }

    /// File descriptors ran out: close the oldest unauthenticated connection.
    pub(crate) fn shed_for_fds(&self) {
        let mut s = self.state();
        if s.evict_from_largest_peer() {
            self.metrics.count(&self.metrics.evicted_fd_limit);
        }
        self.publish(&s);
    }

    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let s = self.state();
        (s.total, s.pending.len())
    }
}

/// One admitted connection's place under the caps; released on drop.
#[derive(Debug)]
pub(crate) struct Permit {
    gate: Arc<Gate>,
    id: u64,
    peer: IpAddr,
    evict: CancellationToken,
}

impl Permit {
    /// The connection authenticated: it no longer counts as pending and can
    /// no longer be evicted.
    pub(crate) fn authenticated(&self) {
        let mut s = self.gate.state();
        s.unpend(self.id);
        self.gate.publish(&s);
    }

    /// Cancelled when the connection was evicted to make room.
    pub(crate) fn evicted(&self) -> &CancellationToken {
        &self.evict
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut s = self.gate.state();
        s.unpend(self.id);
        s.total -= 1;
        if let Some(n) = s.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                s.per_peer.remove(&self.peer);
            }
        }
        self.gate.publish(&s);
    }
}

/// The answer to a refused connection, written without waiting.
pub(crate) const REFUSED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncache-control: no-store\r\nconnection: close\r\ncontent-length: 60\r\n\r\n{\"ok\":false,\"status\":\"busy\",\"reason\":\"too many connections\"}";

/// Whether an accept error means the process (or system) ran out of file
/// descriptors.
pub(crate) fn is_fd_exhaustion(e: &io::Error) -> bool {
    // EMFILE (per process) and ENFILE (system-wide) on Linux.
    matches!(e.raw_os_error(), Some(23 | 24))
}

/// Raise the soft file-descriptor limit to the hard one and return the
/// connection cap that keeps client sockets below it.
pub(crate) fn fd_bounded_cap(configured: usize) -> (usize, Option<u64>) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return (configured, None);
    };
    let soft = if hard > soft && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let room = if soft > 2 * FD_RESERVE {
        soft - FD_RESERVE
    } else {
        soft / 2
    };
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    (
        configured.min(room.saturating_sub(EVICTION_SLACK)).max(1),
        Some(soft),
    )
}

/// A socket that counts the bytes moved through it (the HTTP stage's idle
/// timeout watches the count).
#[derive(Debug)]
pub(crate) struct Activity<S> {
    inner: S,
    moved: Arc<AtomicU64>,
}

impl<S> Activity<S> {
    pub(crate) fn new(inner: S) -> (Self, Arc<AtomicU64>) {
        let moved = Arc::new(AtomicU64::new(0));
        (
            Activity {
                inner,
                moved: moved.clone(),
            },
            moved,
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Activity<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.moved.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Activity<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &r {
            this.moved.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Resolves once no byte moved for a whole `period` (checked every period,
/// so after between one and two periods of silence).
pub(crate) async fn idle(moved: Arc<AtomicU64>, period: Duration) {
    let mut last = moved.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(period).await;
        let now = moved.load(Ordering::Relaxed);
        if now == last {
            return;
        }
        last = now;
    }
}

/// Bytes the WebSocket layer holds for one connection that the socket has
/// not taken yet, as seen at its last write attempt.
#[derive(Debug)]
pub(crate) struct WriteBacklog {
    bytes: Arc<AtomicUsize>,
    budget: usize,
    outbox: OnceLock<Weak<Outbox>>,
    tripped: AtomicBool,
    metrics: Arc<LimitMetrics>,
}

impl WriteBacklog {
    pub(crate) fn new(budget: usize, metrics: Arc<LimitMetrics>) -> Arc<Self> {
        Arc::new(WriteBacklog {
            bytes: Arc::new(AtomicUsize::new(0)),
            budget,
            outbox: OnceLock::new(),
            tripped: AtomicBool::new(false),
            metrics,
        })
    }

    /// Count this backlog in `outbox`'s budget, and close it when the two
    /// together exceed it.
    pub(crate) fn attach(&self, outbox: &Arc<Outbox>) {
        outbox.count_socket_backlog(self.bytes.clone());
        let _ = self.outbox.set(Arc::downgrade(outbox));
    }

    fn observe(&self, unwritten: usize) {
        self.bytes.store(unwritten, Ordering::Release);
        if unwritten == 0 {
            return;
        }
        let Some(outbox) = self.outbox.get().and_then(Weak::upgrade) else {
            return;
        };
        if unwritten + outbox.buffered() > self.budget && !self.tripped.swap(true, Ordering::AcqRel)
        {
            self.metrics.count(&self.metrics.write_backlog_closes);
            outbox.close_now(1008, "slow consumer");
        }
    }
}

/// A socket that reports, at each write attempt, how much the WebSocket
/// layer above it still holds (tungstenite writes its whole buffer each
/// time, so the length offered minus what the socket took is that backlog).
#[derive(Debug)]
pub(crate) struct WriteMeter<S> {
    inner: S,
    backlog: Arc<WriteBacklog>,
}

impl<S> WriteMeter<S> {
    pub(crate) fn new(inner: S, backlog: Arc<WriteBacklog>) -> Self {
        WriteMeter { inner, backlog }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteMeter<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteMeter<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        match &r {
            Poll::Ready(Ok(n)) => this.backlog.observe(data.len() - n),
            Poll::Pending => this.backlog.observe(data.len()),
            Poll::Ready(Err(_)) => {}
        }
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The close for a binary data frame (the protocol is text only).
pub(crate) fn binary_frame_close(m: &LimitMetrics) -> (u16, &'static str) {
    m.count(&m.close_1003);
    (1003, "text frames only")
}

/// The close a read error calls for: 1007 for invalid UTF-8, 1002 for a
/// framing violation, 1009 for an oversized frame; `None` when the
/// connection is simply gone.
pub(crate) fn read_error_close(
    m: &LimitMetrics,
    e: &tungstenite::Error,
) -> Option<(u16, &'static str)> {
    use tungstenite::error::ProtocolError;
    let (code, reason, counter) = match e {
        tungstenite::Error::Utf8(_) => (1007, "invalid utf-8", &m.close_1007),
        tungstenite::Error::Capacity(_) => (1009, "payload too large", &m.close_1009),
        tungstenite::Error::Protocol(
            ProtocolError::ResetWithoutClosingHandshake
            | ProtocolError::SendAfterClosing
            | ProtocolError::ReceivedAfterClosing,
        ) => return None,
        tungstenite::Error::Protocol(_) => (1002, "protocol error", &m.close_1002),
        _ => return None,
    };
    m.count(counter);
    Some((code, reason))
}

/// `scheme://host[:port]`, lower-cased, default port dropped; `None` when
/// `s` is not an http(s) origin.
pub(crate) fn normalize_origin(s: &str) -> Option<String> {
    let s = s.trim().trim_end_matches('/');
    let (scheme, rest) = s.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return None,
    };
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return None;
    }
    let rest = rest.to_ascii_lowercase();
    let host = rest.strip_suffix(default_port).unwrap_or(&rest);
    Some(format!("{scheme}://{host}"))
}

/// Whether `host` (a Host header: name or address, optional port) names
/// this machine by address or as `localhost`, so that no DNS answer can
/// point it elsewhere.
fn is_literal_local_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    name.eq_ignore_ascii_case("localhost")
        || name.to_ascii_lowercase().ends_with(".localhost")
        || name.parse::<IpAddr>().is_ok()
}

/// Whether a WebSocket upgrade with these headers may proceed: no `Origin`
/// (not a browser), an origin in `allowed`, or the gateway's own origin
/// (`http(s)://` + the Host header, when Host is an address or localhost:
/// a name could be rebound by DNS to this machine).
pub(crate) fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Some(origin) = origin.to_str().ok().and_then(normalize_origin) else {
        return false;
    };
    if allowed
        .iter()
        .any(|a| normalize_origin(a).as_deref() == Some(origin.as_str()))
    {
        return true;
    }
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    is_literal_local_host(host)
        && ["http", "https"].iter().any(|scheme| {
            normalize_origin(&format!("{scheme}://{host}")).as_deref() == Some(&origin)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(total: usize, pending: usize, pending_per_peer: usize, per_peer: usize) -> Arc<Gate> {
        Gate::new(
            Caps {
                total,
                pending,
                pending_per_peer,
                per_peer,
            },
            Arc::default(),
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_pending_cap_evicts_the_oldest_and_admits_the_newcomer() {
        let g = gate(100, 3, 100, 100);
        let p: Vec<_> = (0..3).map(|_| g.admit(ip("127.0.0.1")).unwrap()).collect();
        assert_eq!(g.counts(), (3, 3));
        let fourth = g.admit(ip("127.0.0.1")).unwrap();
        assert!(p[0].evicted().is_cancelled(), "the oldest pending goes");
        assert!(!p[1].evicted().is_cancelled() && !fourth.evicted().is_cancelled());
        assert_eq!(g.counts(), (4, 3), "the evicted one counts until it closes");
        drop(p);
        assert_eq!(g.counts(), (1, 1));
        assert_eq!(g.metrics.evicted_max_pending.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_pending_cap_evicts_from_the_peer_holding_the_most() {
        let g = gate(100, 6, 100, 100);
        let victim = g.admit(ip("10.0.0.9")).unwrap();
        // Two addresses in one IPv6 /64 count as one peer.
        let a: Vec<_> = (0..3)
            .map(|i| g.admit(ip(&format!("2001:db8:0:1::{}", i + 1))).unwrap())
            .collect();
        let b = g.admit(ip("10.0.0.7")).unwrap();
        let b2 = g.admit(ip("10.0.0.7")).unwrap();
        assert_eq!(g.counts(), (6, 6));
        let new = g.admit(ip("2001:db8:0:1::ff")).unwrap();
        assert!(a[0].evicted().is_cancelled(), "the /64's oldest goes");
        assert!(!victim.evicted().is_cancelled(), "not the globally oldest");
        assert!(!b.evicted().is_cancelled() && !b2.evicted().is_cancelled());
        assert!(!new.evicted().is_cancelled());
        // Churning from the /64 keeps evicting only its own.
        let churn: Vec<_> = (0..5)
            .map(|_| g.admit(ip("2001:db8:0:1::77")).unwrap())
            .collect();
        assert!(!churn[4].evicted().is_cancelled());
        assert!(!victim.evicted().is_cancelled());
        assert!(!b.evicted().is_cancelled() && !b2.evicted().is_cancelled());
        assert_eq!(g.metrics.evicted_max_pending.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn authenticated_connections_are_never_evicted_and_the_total_refuses() {
        let g = gate(2, 10, 10, 10);
        let a = g.admit(ip("127.0.0.1")).unwrap();
        a.authenticated();
        let b = g.admit(ip("127.0.0.1")).unwrap();
        b.authenticated();
        assert_eq!(
            g.admit(ip("127.0.0.1")).unwrap_err(),
            Refused::MaxConnections
        );
        drop(b);
        let c = g.admit(ip("127.0.0.1")).unwrap();
        // At the total with one pending: a newcomer evicts it.
        let d = g.admit(ip("127.0.0.1")).unwrap();
        assert!(c.evicted().is_cancelled() && !d.evicted().is_cancelled());
        assert!(!a.evicted().is_cancelled());
        assert_eq!(g.metrics.refused_max_connections.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn per_peer_caps_refuse_remote_peers_and_evict_within_a_peer() {
        let g = gate(100, 100, 2, 3);
        let r: Vec<_> = (0..2).map(|_| g.admit(ip("10.0.0.1")).unwrap()).collect();
        let third = g.admit(ip("10.0.0.1")).unwrap();
        assert!(
            r[0].evicted().is_cancelled(),
            "per-peer pending cap evicts that peer's oldest"
        );
        assert_eq!(g.admit(ip("10.0.0.1")).unwrap_err(), Refused::PerPeer);
        let other = g.admit(ip("10.0.0.2")).unwrap();
        assert!(!other.evicted().is_cancelled() && !third.evicted().is_cancelled());
        // Loopback is exempt from the per-peer total (all local clients share it).
        let locals: Vec<_> = (0..5).map(|_| g.admit(ip("127.0.0.1")).unwrap()).collect();
        locals.iter().for_each(|p| p.authenticated());
        assert!(g.admit(ip("::ffff:127.0.0.1")).is_ok());
    }

    #[test]
    fn origins_are_checked_against_the_host_and_the_allow_list() {
        let h = |origin: Option<&str>, host: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::HOST, host.parse().unwrap());
            if let Some(o) = origin {
                m.insert(header::ORIGIN, o.parse().unwrap());
            }
            m
        };
        let allow = vec!["https://Control.Example.com:443".to_string()];
        assert!(origin_allowed(&h(None, "127.0.0.1:18789"), &[]));
        assert!(origin_allowed(
            &h(Some("http://127.0.0.1:18789"), "127.0.0.1:18789"),
            &[]
        ));
        assert!(origin_allowed(
            &h(Some("http://localhost:18789"), "localhost:18789"),
            &[]
        ));
        assert!(origin_allowed(
            &h(Some("http://[::1]:8080"), "[::1]:8080"),
            &[]
        ));
        assert!(origin_allowed(
            &h(Some("http://localhost"), "localhost:80"),
            &[]
        ));
        assert!(!origin_allowed(
            &h(Some("http://evil.example"), "127.0.0.1:18789"),
            &[]
        ));
        assert!(!origin_allowed(&h(Some("null"), "127.0.0.1:18789"), &[]));
        assert!(!origin_allowed(
            &h(Some("http://127.0.0.1:9999"), "127.0.0.1:18789"),
            &[]
        ));
        // DNS rebinding: the page's own host name resolved to 127.0.0.1.
        assert!(!origin_allowed(
            &h(Some("http://evil.example:18789"), "evil.example:18789"),
            &[]
        ));
        assert!(origin_allowed(
            &h(Some("https://control.example.com"), "127.0.0.1:1"),
            &allow
        ));
        assert!(!origin_allowed(
            &h(Some("http://control.example.com"), "127.0.0.1:1"),
            &allow
        ));
        assert_eq!(normalize_origin("ftp://x"), None);
        assert_eq!(normalize_origin("http://a/b"), None);
    }

    #[test]
    fn the_refusal_is_a_well_formed_503() {
        let text = std::str::from_utf8(REFUSED_RESPONSE).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(body).unwrap()["status"],
            "busy"
        );
    }

    #[test]
    fn read_errors_map_to_close_codes() {
        let m = LimitMetrics::default();
        let utf8 = tungstenite::Error::Utf8("bad".into());
        assert_eq!(read_error_close(&m, &utf8).unwrap().0, 1007);
        let framing =
            tungstenite::Error::Protocol(tungstenite::error::ProtocolError::NonZeroReservedBits);
        assert_eq!(read_error_close(&m, &framing).unwrap().0, 1002);
        assert_eq!(
            read_error_close(&m, &tungstenite::Error::ConnectionClosed),
            None
        );
        assert_eq!(binary_frame_close(&m).0, 1003);
        assert_eq!(m.close_1003.load(Ordering::Relaxed), 1);
    }
}
