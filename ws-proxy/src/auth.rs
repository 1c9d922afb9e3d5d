//! Shared-secret authentication at `connect`, in constant time, with a
//! bounded per-peer limit on failures.
//!
//! Failures are counted per peer (an IPv4 address, or an IPv6 address's
//! /64 prefix, since one host usually holds a whole /64) in two fixed
//! one-minute buckets (the current and the previous one): each failure is
//! O(1), a rotation drops a whole bucket at once, and each bucket holds at
//! most [`MAX_TRACKED`] peers (further peers share one overflow slot).
//!
//! A tracked remote peer over the limit is refused before its secret is
//! looked at. The overflow slot never refuses anyone up front (that would
//! let anyone holding 4096 addresses lock every new client out); like
//! loopback, where every local client shares 127.0.0.1, a correct secret is
//! always accepted there and a wrong one is answered only after a delay that
//! grows with the excess, which throttles guessing clients without locking
//! out anyone who knows the secret.

use crate::config::{AuthMode, AuthSettings};
use crate::limits::LimitMetrics;
use gateway_core::frame::ConnectAuth;
use plugin_api::RpcError;
use serde_json::json;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// The window failures are counted in.
const WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked per bucket; beyond that they share [`OVERFLOW`].
pub(crate) const MAX_TRACKED: usize = 4096;
/// The slot addresses share once a bucket is full.
const OVERFLOW: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
/// Delay added per failure past the limit for a loopback client.
const THROTTLE_STEP: Duration = Duration::from_millis(200);
/// The longest a failing loopback client is held.
const THROTTLE_MAX: Duration = Duration::from_secs(3);

/// A refused `connect`: the error to answer, after `delay`.
#[derive(Debug)]
pub(crate) struct AuthRefusal {
    pub(crate) error: RpcError,
    pub(crate) delay: Duration,
}

/// Failures per address in the current and the previous window.
#[derive(Debug)]
struct FailureBook {
    started: Instant,
    current: HashMap<IpAddr, u32>,
    previous: HashMap<IpAddr, u32>,
}

impl FailureBook {
    /// Buckets start on a fixed grid (`started` advances by whole windows),
    /// so a failure in the current bucket counts until `started + 2 *
    /// WINDOW` and one in the previous bucket until `started + WINDOW`.
    fn rotate(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.started);
        if elapsed < WINDOW {
            return;
        }
        if elapsed < 2 * WINDOW {
            self.previous = std::mem::take(&mut self.current);
            self.started += WINDOW;
        } else {
            self.current.clear();
            self.previous.clear();
            self.started = now;
        }
    }

    /// Where `peer`'s failures are recorded: its own slot when it has one or
    /// there is room, else [`OVERFLOW`].
    fn key(&self, peer: IpAddr) -> IpAddr {
        let peer = peer_key(peer);
        if self.current.len() >= MAX_TRACKED && !self.current.contains_key(&peer) {
            OVERFLOW
        } else {
            peer
        }
    }

    /// Failures in `key`'s own slot (current + previous bucket).
    fn count_key(&self, key: IpAddr) -> u32 {
        self.current
            .get(&key)
            .copied()
            .unwrap_or(0)
            .saturating_add(self.previous.get(&key).copied().unwrap_or(0))
    }

    /// Failures counted against `peer` itself (never the overflow slot).
    fn count(&self, peer: IpAddr) -> u32 {
        self.count_key(peer_key(peer))
    }

    /// Record a failure; returns the slot's count and whether it was the
    /// shared overflow slot.
    fn record(&mut self, peer: IpAddr) -> (u32, bool) {
        let key = self.key(peer);
        let c = self.current.entry(key).or_insert(0);
        *c = c.saturating_add(1);
        (self.count_key(key), key == OVERFLOW)
    }

    /// How long until `peer`'s count drops below `limit`: failures in the
    /// previous bucket stop counting at `started + WINDOW`, those in the
    /// current one at `started + 2 * WINDOW`.
    fn retry_after(&self, peer: IpAddr, limit: u32, now: Instant) -> Duration {
        let key = peer_key(peer);
        let current = self.current.get(&key).copied().unwrap_or(0);
        let until = if current < limit {
            self.started + WINDOW
        } else {
            self.started + 2 * WINDOW
        };
        until.saturating_duration_since(now)
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

/// Checks credentials and remembers failures per peer address.
#[derive(Debug)]
pub(crate) struct Authenticator {
    settings: AuthSettings,
    book: Mutex<FailureBook>,
    metrics: Arc<LimitMetrics>,
}

fn is_local(peer: IpAddr) -> bool {
    peer.to_canonical().is_loopback()
}

/// The key a peer's failures are counted under: IPv4 (also IPv4-mapped)
/// addresses as they are, IPv6 addresses by their /64 prefix.
pub(crate) fn peer_key(peer: IpAddr) -> IpAddr {
    match peer.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
    }
}

impl Authenticator {
    pub(crate) fn new(settings: AuthSettings, metrics: Arc<LimitMetrics>) -> Self {
        Authenticator {
            settings,
            book: Mutex::new(FailureBook {
                started: Instant::now(),
                current: HashMap::new(),
                previous: HashMap::new(),
            }),
            metrics,
        }
    }

    fn book(&self) -> std::sync::MutexGuard<'_, FailureBook> {
        let mut b = self.book.lock().unwrap_or_else(|e| e.into_inner());
        b.rotate(Instant::now());
        b
    }

    /// `Some(error)` when remote `peer` has failed too often recently under
    /// its own slot; never for loopback nor for the shared overflow slot
    /// (see the module docs).
    pub(crate) fn rate_limited(&self, peer: IpAddr) -> Option<RpcError> {
        let limit = self.settings.max_failures_per_minute;
        if limit == 0 || is_local(peer) {
            return None;
        }
        let book = self.book();
        if book.count(peer) < limit {
            return None;
        }
        let retry = book.retry_after(peer, limit, Instant::now()).as_millis() as u64;
        drop(book);
        self.metrics.count(&self.metrics.auth_rate_limited);
        Some(
            RpcError::invalid_request(
                "unauthorized: too many failed authentication attempts; retry later",
            )
            .with_details(json!({"code": "AUTH_RATE_LIMITED"}))
            .retryable_after(Some(retry.max(1))),
        )
    }

    /// Count a failure; returns how long to hold the answer.
    fn record_failure(&self, peer: IpAddr) -> Duration {
        let limit = self.settings.max_failures_per_minute;
        let (count, overflow) = self.book().record(peer);
        if limit == 0 || !(is_local(peer) || overflow) || count <= limit {
            return Duration::ZERO;
        }
        self.metrics.count(&self.metrics.auth_throttled);
        THROTTLE_STEP
            .saturating_mul(count - limit)
            .min(THROTTLE_MAX)
    }

    /// Addresses the failure book tracks now (bounded by 2 x [`MAX_TRACKED`]).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.book().tracked()
    }

    /// Check the offered credentials; failures are counted against `peer`.
    pub(crate) fn check(
        &self,
        peer: IpAddr,
        offered: Option<&ConnectAuth>,
    ) -> Result<(), AuthRefusal> {
        let Some(secret) = &self.settings.secret else {
            return Ok(());
        };
        let (what, missing, mismatch) = match self.settings.mode {
            AuthMode::None => return Ok(()),
            AuthMode::Token => ("token", "AUTH_TOKEN_MISSING", "AUTH_TOKEN_MISMATCH"),
            AuthMode::Password => (
                "password",
                "AUTH_PASSWORD_MISSING",
                "AUTH_PASSWORD_MISMATCH",
            ),
        };
        let (first, second) = match self.settings.mode {
            AuthMode::Password => (
                offered.and_then(|a| a.password.as_deref()),
                offered.and_then(|a| a.token.as_deref()),
            ),
            _ => (
                offered.and_then(|a| a.token.as_deref()),
                offered.and_then(|a| a.password.as_deref()),
            ),
        };
        let candidates: Vec<&str> = [first, second]
            .into_iter()
            .flatten()
            .filter(|s| !s.is_empty())
            .collect();
        if candidates.is_empty() {
            return Err(AuthRefusal {
                delay: self.record_failure(peer),
                error: RpcError::invalid_request(format!(
                    "unauthorized: gateway {what} missing (connect with auth.{what})"
                ))
                .with_details(json!({"code": missing})),
            });
        }
        let mut ok = subtle::Choice::from(0u8);
        for c in &candidates {
            ok |= secret.as_bytes().ct_eq(c.as_bytes());
        }
        if bool::from(ok) {
            Ok(())
        } else {
            Err(AuthRefusal {
                delay: self.record_failure(peer),
                error: RpcError::invalid_request(format!("unauthorized: gateway {what} mismatch"))
                    .with_details(json!({"code": mismatch})),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(mode: AuthMode, secret: Option<&str>, limit: u32) -> Authenticator {
        Authenticator::new(
            AuthSettings {
                mode,
                secret: secret.map(str::to_string),
                generated: false,
                origin: crate::config::SecretOrigin::Flag,
                max_failures_per_minute: limit,
            },
            Arc::default(),
        )
    }

    fn offer(token: Option<&str>, password: Option<&str>) -> ConnectAuth {
        ConnectAuth {
            token: token.map(str::to_string),
            password: password.map(str::to_string),
        }
    }

    fn code(r: Result<(), AuthRefusal>) -> Option<String> {
        r.unwrap_err().error.details_code().map(str::to_string)
    }

    #[test]
    fn either_field_carries_the_secret() {
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        let a = auth(AuthMode::Token, Some("s3"), 0);
        assert!(a.check(peer, Some(&offer(Some("s3"), None))).is_ok());
        assert!(a.check(peer, Some(&offer(None, Some("s3")))).is_ok());
        assert_eq!(
            code(a.check(peer, None)).as_deref(),
            Some("AUTH_TOKEN_MISSING")
        );
        assert_eq!(
            code(a.check(peer, Some(&offer(Some("no"), None)))).as_deref(),
            Some("AUTH_TOKEN_MISMATCH")
        );
        let p = auth(AuthMode::Password, Some("pw"), 0);
        assert_eq!(
            code(p.check(peer, Some(&offer(None, Some("x"))))).as_deref(),
            Some("AUTH_PASSWORD_MISMATCH")
        );
        assert!(p.check(peer, Some(&offer(Some("pw"), None))).is_ok());
        assert!(auth(AuthMode::None, None, 0).check(peer, None).is_ok());
    }

    #[test]
    fn remote_failures_are_rate_limited_per_peer() {
        let a = auth(AuthMode::Token, Some("s"), 2);
        let p1: IpAddr = "10.0.0.1".parse().unwrap();
        let p2: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..2 {
            assert!(a.rate_limited(p1).is_none());
            let r = a.check(p1, None).unwrap_err();
            assert_eq!(
                r.delay,
                Duration::ZERO,
                "remote peers are refused, not held"
            );
        }
        let e = a.rate_limited(p1).unwrap();
        assert_eq!(e.details_code(), Some("AUTH_RATE_LIMITED"));
        assert_eq!(e.retryable, Some(true));
        assert!(a.rate_limited(p2).is_none());
    }

    #[test]
    fn loopback_failures_throttle_the_failing_client_and_never_refuse_the_secret() {
        for local in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
            // A fresh book each: an IPv4-mapped address counts as the IPv4
            // address it maps.
            let a = auth(AuthMode::Token, Some("s"), 3);
            let peer: IpAddr = local.parse().unwrap();
            let mut delays = Vec::new();
            for _ in 0..6 {
                assert!(
                    a.rate_limited(peer).is_none(),
                    "{local} is never refused up front"
                );
                delays.push(
                    a.check(peer, Some(&offer(Some("bad"), None)))
                        .unwrap_err()
                        .delay,
                );
            }
            assert_eq!(&delays[..3], &[Duration::ZERO; 3], "{local}: {delays:?}");
            assert!(
                delays[3] > Duration::ZERO && delays[4] > delays[3],
                "{local}: {delays:?}"
            );
            assert!(delays.iter().all(|d| *d <= THROTTLE_MAX));
            assert!(
                a.check(peer, Some(&offer(Some("s"), None))).is_ok(),
                "the right secret is accepted whatever others failed"
            );
        }
    }

    #[test]
    fn bookkeeping_is_bounded_and_overflow_never_locks_out_a_new_peer() {
        let a = auth(AuthMode::Token, Some("s"), 5);
        for i in 0..(MAX_TRACKED as u32 + 3000) {
            let peer = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let _ = a.check(peer, None);
        }
        assert!(a.tracked() <= MAX_TRACKED + 1, "{}", a.tracked());
        // The 3000 addresses past the bound share the overflow slot, which
        // is over the limit: that throttles wrong secrets there but never
        // refuses a fresh address up front, and its correct secret passes.
        let late = IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000));
        assert!(a.rate_limited(late).is_none());
        assert!(a.check(late, Some(&offer(Some("s"), None))).is_ok());
        let held = a.check(late, None).unwrap_err().delay;
        assert!(held > Duration::ZERO && held <= THROTTLE_MAX, "{held:?}");
        // Tracked addresses are judged on their own.
        let early = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000));
        assert!(a.rate_limited(early).is_none());
        for _ in 0..4 {
            let _ = a.check(early, None);
        }
        assert!(a.rate_limited(early).is_some());
    }

    #[test]
    fn ipv6_peers_are_keyed_by_their_64() {
        let a = auth(AuthMode::Token, Some("s"), 3);
        for i in 0..3u16 {
            let peer = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, i + 1));
            let _ = a.check(peer, None);
        }
        let same64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert!(a.rate_limited(same64).is_some());
        let other64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(a.rate_limited(other64).is_none());
    }

    #[test]
    fn retry_after_is_when_failures_really_stop_counting() {
        let mut b = FailureBook {
            started: Instant::now(),
            current: HashMap::new(),
            previous: HashMap::new(),
        };
        let p: IpAddr = "10.2.2.2".parse().unwrap();
        let t0 = b.started;
        for _ in 0..3 {
            b.record(p);
        }
        // All three in the current bucket: they count until t0 + 2 windows.
        assert_eq!(b.retry_after(p, 3, t0), 2 * WINDOW);
        b.rotate(t0 + WINDOW + Duration::from_secs(10));
        assert_eq!(b.started, t0 + WINDOW, "buckets stay on the grid");
        let now = t0 + WINDOW + Duration::from_secs(10);
        assert_eq!(b.count(p), 3);
        assert_eq!(b.retry_after(p, 3, now), Duration::from_secs(50));
        // A client retrying then is no longer over the limit.
        b.rotate(t0 + 2 * WINDOW);
        assert_eq!(b.count(p), 0);
    }

    #[test]
    fn buckets_rotate_so_old_failures_are_forgotten() {
        let mut b = FailureBook {
            started: Instant::now(),
            current: HashMap::new(),
            previous: HashMap::new(),
        };
        let p: IpAddr = "10.1.1.1".parse().unwrap();
        assert_eq!(b.record(p), (1, false));
        let t0 = b.started;
        b.rotate(t0 + WINDOW);
        assert_eq!(b.count(p), 1, "the previous window still counts");
        assert_eq!(b.record(p), (2, false));
        b.rotate(t0 + 3 * WINDOW);
        assert_eq!(b.count(p), 0);
        assert_eq!(b.tracked(), 0);
    }
}
