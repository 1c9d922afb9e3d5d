//! The connection gate: caps on open connections in total, before auth
//! and per peer address, and the eviction of unauthenticated connections
//! that keeps half-sent requests from locking a real client out.

use super::LimitMetrics;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// How far the total may overshoot while evicted connections wind down.
pub(super) const EVICTION_SLACK: usize = 32;

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
}
