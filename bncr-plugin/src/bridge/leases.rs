//! Connections and per-account leases. [`Lease`]'s transitions are pure
//! (the instant is passed in) and tested without sleeping.

use super::*;

impl Lease {
    /// A new lease held by `conn`, taking the account over from `previous`:
    /// its epoch is one higher.
    pub(super) fn take_over(
        previous: Option<&Lease>,
        lease_id: String,
        conn: ConnId,
        client_id: Option<String>,
        accepted_at: i64,
    ) -> Lease {
        Lease {
            lease_id,
            epoch: previous.map_or(0, |l| l.epoch) + 1,
            conn: Some(conn),
            client_id,
            accepted_at,
            offline_since: None,
        }
    }

    /// Whether a request naming `lease_id` (and maybe `epoch`) names this
    /// lease. A request naming an older lease or epoch is stale.
    pub(super) fn is_current(&self, lease_id: &str, epoch: Option<u64>) -> bool {
        lease_id == self.lease_id && epoch.is_none_or(|e| e == self.epoch)
    }

    /// Its connection closed at `now`.
    pub(super) fn went_offline(&mut self, now: Instant) {
        self.conn = None;
        self.offline_since = Some(now);
    }

    /// The holder of an offline lease is back on `conn`; `false` (and no
    /// change) when the lease is held by a connection.
    pub(super) fn reattach(&mut self, conn: ConnId) -> bool {
        if self.conn.is_some() {
            return false;
        }
        self.conn = Some(conn);
        self.offline_since = None;
        true
    }

    /// Offline for at least `ttl` at `now`.
    pub(super) fn expired(&self, now: Instant, ttl: Duration) -> bool {
        self.offline_since
            .is_some_and(|t| now.saturating_duration_since(t) >= ttl)
    }
}

impl Bridge {
    // ---------------------------------------------------------------- connections

    /// Mark `conn` offline everywhere. (The host calls this on its own
    /// threads, also for an old generation during a hand-over: the store
    /// is called only once `state` is released, see the lock order.)
    pub(crate) fn connection_closed(&self, conn: ConnId) {
        let mut changed = Vec::new();
        let was_client = {
            let mut st = self.state();
            let was_client = st.clients.remove(&conn);
            let now = Instant::now();
            for (name, acc) in st.accounts.iter_mut() {
                acc.conns.remove(&conn);
                if let Some(l) = acc.lease.as_mut()
                    && l.conn == Some(conn)
                {
                    l.went_offline(now);
                    changed.push(lease_row(name, l));
                }
            }
            was_client
        };
        if was_client && let Ok(store) = self.store() {
            store.enqueue("client connection closed", move |c| {
                store::put_client_conn(c, conn.0, false)
            });
        }
        if changed.is_empty() {
            return;
        }
        tracing::info!(conn = %conn, accounts = changed.len(), "bncr connection offline");
        if let Ok(store) = self.store() {
            store.enqueue("lease offline", move |c| {
                for l in &changed {
                    store::put_lease(c, l)?;
                }
                Ok(())
            });
        }
    }

    /// Prune leases offline for `leaseTtlMs` (memory and store), then
    /// forget accounts that hold nothing: no lease, connection, queued
    /// message or dead letter. Returns how many leases were pruned.
    pub(super) fn prune_accounts(&self, now: Instant) -> usize {
        let ttl = Duration::from_millis(self.cfg.lease_ttl_ms);
        let mut expired = Vec::new();
        {
            let mut guard = self.state();
            let st = &mut *guard;
            for (name, acc) in st.accounts.iter_mut() {
                let stale = acc.lease.as_ref().is_some_and(|l| l.expired(now, ttl));
                if stale && acc.conns.is_empty() {
                    acc.lease = None;
                    expired.push(name.clone());
                }
            }
            st.accounts.retain(|_, a| {
                a.lease.is_some() || !a.conns.is_empty() || !a.queue.is_empty() || a.dead > 0
            });
            st.counters.leases_pruned += expired.len() as u64;
        }
        let n = expired.len();
        if n > 0 {
            tracing::info!(leases = n, "bncr offline leases pruned");
            if let Ok(store) = self.store() {
                store.enqueue("prune leases", move |c| {
                    for a in &expired {
                        store::delete_lease(c, a)?;
                    }
                    Ok(())
                });
            }
        }
        n
    }

    /// Whether the caller named a lease (or epoch) that is no longer the
    /// account's current one. Callers that name none are never stale.
    pub(super) fn stale(&self, account: &str, common: &Common) -> bool {
        let st = self.state();
        let current = st.accounts.get(account).and_then(|a| a.lease.as_ref());
        match (common.lease_id.as_deref(), current) {
            (Some(given), Some(l)) => !l.is_current(given, common.connection_epoch),
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    pub(super) fn counts(&self, account: &str) -> (usize, usize, u64, bool) {
        let st = self.state();
        st.accounts.get(account).map_or((0, 0, 0, false), |a| {
            (
                a.conns.len(),
                a.queue.len(),
                a.dead,
                a.lease.as_ref().is_some_and(|l| l.conn.is_some()),
            )
        })
    }

    /// Handle `bncr.connect`: a new lease for the account, held by the caller.
    pub(crate) async fn connect(&self, ctx: &RequestContext, p: Common) -> Result<Value, RpcError> {
        let account = self.account(p.account_id.as_deref())?;
        let store = self.store()?;
        let conn = ctx.conn_id();
        let now = now_ms();
        let row = {
            let mut st = self.state();
            let acc = st.accounts.entry(account.clone()).or_default();
            let lease = Lease::take_over(
                acc.lease.as_ref(),
                self.new_id("lease"),
                conn,
                p.client_id.clone(),
                now,
            );
            acc.conns.insert(conn);
            let row = lease_row(&account, &lease);
            acc.lease = Some(lease);
            row
        };
        let r2 = row.clone();
        store
            .call(move |c| store::put_lease(c, &r2))
            .await
            .map_err(Self::store_err)?;
        self.wake.notify_one();
        tracing::info!(account = %account, conn = %conn, epoch = row.epoch, client = ?row.client_id, "bncr client connected");
        let (active, pending, dead, online) = self.counts(&account);
        Ok(json!({
            "channel": "bncr",
            "accountId": account,
            "bridgeVersion": self.version,
            "pushEvent": PUSH_EVENT,
            "online": online,
            "isPrimary": account == PRIMARY,
            "activeConnections": active,
            "pending": pending,
            "deadLetter": dead,
            "leaseId": row.lease_id,
            "connectionEpoch": row.epoch,
            "protocolVersion": PROTOCOL_VERSION,
            "acceptedAt": now,
            "now": now_ms(),
        }))
    }

    /// Handle `bncr.activity`: a heartbeat; re-attaches a lease whose
    /// connection was marked offline when the caller holds it.
    pub(crate) fn activity(&self, ctx: &RequestContext, p: Common) -> Result<Value, RpcError> {
        let account = self.account(p.account_id.as_deref())?;
        let store = self.store()?;
        if self.stale(&account, &p) {
            return Ok(json!({"ok": false, "stale": true, "accountId": account, "now": now_ms()}));
        }
        let conn = ctx.conn_id();
        let reattached = {
            let mut st = self.state();
            let acc = st.accounts.entry(account.clone()).or_default();
            acc.conns.insert(conn);
            match acc.lease.as_mut() {
                Some(l) if p.lease_id.is_some() => l.reattach(conn).then(|| lease_row(&account, l)),
                _ => None,
            }
        };
        if let Some(row) = reattached {
            store.enqueue("lease reattach", move |c| store::put_lease(c, &row));
            self.wake.notify_one();
        }
        let (active, pending, dead, _) = self.counts(&account);
        Ok(json!({
            "ok": true,
            "accountId": account,
            "activeConnections": active,
            "pending": pending,
            "deadLetter": dead,
            "now": now_ms(),
        }))
    }
}

pub(super) fn lease_row(account: &str, l: &Lease) -> LeaseRow {
    LeaseRow {
        account_id: account.to_string(),
        lease_id: l.lease_id.clone(),
        epoch: l.epoch,
        conn_id: l.conn.map(|c| c.0),
        client_id: l.client_id.clone(),
        accepted_at: l.accepted_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(epoch: u64) -> Lease {
        Lease::take_over(None, "l1".into(), ConnId(1), None, 0).with_epoch(epoch)
    }

    impl Lease {
        fn with_epoch(mut self, epoch: u64) -> Lease {
            self.epoch = epoch;
            self
        }
    }

    #[test]
    fn taking_over_raises_the_epoch_and_makes_the_old_lease_stale() {
        let first = Lease::take_over(None, "l1".into(), ConnId(1), None, 0);
        assert_eq!(first.epoch, 1);
        let second = Lease::take_over(Some(&first), "l2".into(), ConnId(2), None, 5);
        assert_eq!((second.epoch, second.conn), (2, Some(ConnId(2))));
        assert!(second.is_current("l2", Some(2)) && second.is_current("l2", None));
        assert!(!second.is_current("l1", None), "the old lease id is stale");
        assert!(!second.is_current("l2", Some(1)), "an old epoch is stale");
    }

    #[test]
    fn offline_leases_expire_after_the_ttl_and_reattach_resets() {
        let ttl = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut l = lease(3);
        assert!(!l.expired(t0 + 10 * ttl, ttl), "online never expires");
        l.went_offline(t0);
        assert!(!l.expired(t0 + ttl - Duration::from_millis(1), ttl));
        assert!(l.expired(t0 + ttl, ttl));
        assert!(l.reattach(ConnId(9)));
        assert!(!l.reattach(ConnId(10)), "held: no takeover by reattach");
        assert_eq!((l.conn, l.epoch), (Some(ConnId(9)), 3));
        assert!(!l.expired(t0 + 10 * ttl, ttl));
    }
}
