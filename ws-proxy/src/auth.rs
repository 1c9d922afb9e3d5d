//! Shared-secret authentication at `connect`, in constant time, with a
//! per-peer limit on failures.

use crate::config::{AuthMode, AuthSettings};
use dashmap::DashMap;
use gateway_core::frame::ConnectAuth;
use plugin_api::RpcError;
use serde_json::json;
use std::net::IpAddr;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// The window failures are counted in.
const WINDOW: Duration = Duration::from_secs(60);

/// Checks credentials and remembers failures per peer IP.
#[derive(Debug)]
pub(crate) struct Authenticator {
    settings: AuthSettings,
    failures: DashMap<IpAddr, (Instant, u32)>,
}

impl Authenticator {
    pub(crate) fn new(settings: AuthSettings) -> Self {
        Authenticator {
            settings,
            failures: DashMap::new(),
        }
    }

    /// `Some(error)` when `peer` has failed too often within the window.
    pub(crate) fn rate_limited(&self, peer: IpAddr) -> Option<RpcError> {
        let limit = self.settings.max_failures_per_minute;
        if limit == 0 {
            return None;
        }
        let entry = self.failures.get(&peer)?;
        let (start, count) = *entry;
        let elapsed = start.elapsed();
        if elapsed >= WINDOW || count < limit {
            return None;
        }
        let retry = (WINDOW - elapsed).as_millis() as u64;
        Some(
            RpcError::invalid_request(
                "unauthorized: too many failed authentication attempts; retry later",
            )
            .with_details(json!({"code": "AUTH_RATE_LIMITED"}))
            .retryable_after(Some(retry.max(1))),
        )
    }

    fn record_failure(&self, peer: IpAddr) {
        let now = Instant::now();
        let mut e = self.failures.entry(peer).or_insert((now, 0));
        if e.0.elapsed() >= WINDOW {
            *e = (now, 0);
        }
        e.1 += 1;
        // Keep the table small: forget expired peers now and then.
        drop(e);
        if self.failures.len() > 4096 {
            self.failures.retain(|_, (t, _)| t.elapsed() < WINDOW);
        }
    }

    /// Check the offered credentials; failures are counted against `peer`.
    pub(crate) fn check(
        &self,
        peer: IpAddr,
        offered: Option<&ConnectAuth>,
    ) -> Result<(), RpcError> {
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
            self.record_failure(peer);
            return Err(RpcError::invalid_request(format!(
                "unauthorized: gateway {what} missing (connect with auth.{what})"
            ))
            .with_details(json!({"code": missing})));
        }
        let mut ok = subtle::Choice::from(0u8);
        for c in &candidates {
            ok |= secret.as_bytes().ct_eq(c.as_bytes());
        }
        if bool::from(ok) {
            Ok(())
        } else {
            self.record_failure(peer);
            Err(
                RpcError::invalid_request(format!("unauthorized: gateway {what} mismatch"))
                    .with_details(json!({"code": mismatch})),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(mode: AuthMode, secret: Option<&str>, limit: u32) -> Authenticator {
        Authenticator::new(AuthSettings {
            mode,
            secret: secret.map(str::to_string),
            generated: false,
            max_failures_per_minute: limit,
        })
    }

    fn offer(token: Option<&str>, password: Option<&str>) -> ConnectAuth {
        ConnectAuth {
            token: token.map(str::to_string),
            password: password.map(str::to_string),
        }
    }

    #[test]
    fn either_field_carries_the_secret() {
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        let a = auth(AuthMode::Token, Some("s3"), 0);
        assert!(a.check(peer, Some(&offer(Some("s3"), None))).is_ok());
        assert!(a.check(peer, Some(&offer(None, Some("s3")))).is_ok());
        let e = a.check(peer, None).unwrap_err();
        assert_eq!(e.details_code(), Some("AUTH_TOKEN_MISSING"));
        let e = a.check(peer, Some(&offer(Some("no"), None))).unwrap_err();
        assert_eq!(e.details_code(), Some("AUTH_TOKEN_MISMATCH"));
        let p = auth(AuthMode::Password, Some("pw"), 0);
        let e = p.check(peer, Some(&offer(None, Some("x")))).unwrap_err();
        assert_eq!(e.details_code(), Some("AUTH_PASSWORD_MISMATCH"));
        assert!(p.check(peer, Some(&offer(Some("pw"), None))).is_ok());
        assert!(auth(AuthMode::None, None, 0).check(peer, None).is_ok());
    }

    #[test]
    fn failures_are_rate_limited_per_peer() {
        let a = auth(AuthMode::Token, Some("s"), 2);
        let p1: IpAddr = "10.0.0.1".parse().unwrap();
        let p2: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..2 {
            assert!(a.rate_limited(p1).is_none());
            let _ = a.check(p1, None);
        }
        let e = a.rate_limited(p1).unwrap();
        assert_eq!(e.details_code(), Some("AUTH_RATE_LIMITED"));
        assert_eq!(e.retryable, Some(true));
        assert!(a.rate_limited(p2).is_none());
    }
}
