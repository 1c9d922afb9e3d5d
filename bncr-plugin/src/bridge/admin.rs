//! Operator-facing views: diagnostics and dead-letter inspect and prune.

use super::*;

impl Bridge {
    // ---------------------------------------------------------------- diagnostics

    /// Handle `bncr.diagnostics`.
    pub(crate) fn diagnostics(&self, p: Common) -> Result<Value, RpcError> {
        let only = p.account_id.as_deref().map(|a| normalize_account(Some(a)));
        let store_open = self.store().is_ok();
        let (read_only, failures) = self
            .store()
            .map_or((false, 0), |s| (s.is_read_only(), s.failures()));
        let fault = self.fault();
        let st = self.state();
        let mut accounts = Vec::new();
        let mut names: Vec<&String> = st.accounts.keys().collect();
        names.sort();
        for name in names {
            if only.as_ref().is_some_and(|o| o != name) {
                continue;
            }
            let a = &st.accounts[name];
            let now = Instant::now();
            let in_flight = a.queue.window(&self.cfg).filter(|q| q.attempts > 0).count();
            accounts.push(json!({
                "accountId": name,
                "online": a.lease.as_ref().is_some_and(|l| l.conn.is_some()),
                "connections": a.conns.iter().map(|c| c.0).collect::<Vec<_>>(),
                "lease": a.lease.as_ref().map(|l| json!({
                    "leaseId": l.lease_id, "connectionEpoch": l.epoch,
                    "connId": l.conn.map(|c| c.0), "clientId": l.client_id,
                    "acceptedAt": l.accepted_at,
                })),
                "outbox": {
                    "pending": a.queue.len(),
                    "inFlight": in_flight,
                    "oldestCreatedAt": a.queue.iter().next().map(|(_, q)| q.created_at),
                    "nextRetryInMs": a.queue.window(&self.cfg)
                        .map(|q| q.next_at.saturating_duration_since(now).as_millis() as u64).min(),
                },
                "deadLetter": a.dead,
            }));
        }
        Ok(json!({
            "ok": true,
            "channel": "bncr",
            "generation": self.life.generation(),
            "bridgeVersion": self.version,
            "store": {
                "open": store_open,
                "readOnly": read_only,
                "fault": fault,
                "failures": failures,
                "path": self.root.join("bncr.sqlite3"),
                "schemaVersion": store::SCHEMA_VERSION,
            },
            "accounts": accounts,
            "outbox": st.accounts.values().map(|a| a.queue.len()).sum::<usize>(),
            "deadLetter": st.accounts.values().map(|a| a.dead).sum::<u64>(),
            "inboundPending": st.inbound.len(),
            "counters": st.counters,
            "waiters": st.waiters.len(),
            "transfers": st.transfers.len(),
            "config": {
                "window": self.cfg.window, "retryLimit": self.cfg.retry_limit,
                "retryBaseMs": self.cfg.retry_base_ms, "retryCapMs": self.cfg.retry_cap_ms,
                "outboundRequireAck": self.cfg.outbound_require_ack, "echo": self.cfg.echo.enabled,
                "maxAccounts": self.cfg.max_accounts, "leaseTtlMs": self.cfg.lease_ttl_ms,
                "maxTransfers": self.cfg.max_transfers,
                "maxTransfersPerAccount": self.cfg.max_transfers_per_account,
                "transferTtlMs": self.cfg.transfer_ttl_ms,
                "fileMinChunkBytes": self.cfg.file_min_chunk_bytes,
                "fileMaxChunks": self.cfg.file_max_chunks,
                "inboundGraceMs": self.cfg.inbound_grace_ms,
                "inboundRetryMs": self.cfg.inbound_retry_ms,
                "maxInboundPending": self.cfg.max_inbound_pending,
            },
            "now": now_ms(),
        }))
    }

    /// Handle `bncr.deadLetter.inspect`.
    pub(crate) async fn dead_inspect(&self, p: params::DeadLetter) -> Result<Value, RpcError> {
        let filter = dead_filter(&p)?;
        let limit = p.limit.unwrap_or(20);
        if !(1..=MAX_INSPECT_LIMIT).contains(&limit) {
            return Err(RpcError::invalid_request(format!(
                "limit must be 1..={MAX_INSPECT_LIMIT}"
            )));
        }
        let offset = p.offset.unwrap_or(0);
        if offset > MAX_INSPECT_OFFSET {
            return Err(RpcError::invalid_request(format!(
                "offset must be 0..={MAX_INSPECT_OFFSET}"
            )));
        }
        let store = self.store()?;
        let f2 = filter.clone();
        let (total, entries) = store
            .call(move |c| store::inspect_dead(c, &f2, limit, offset))
            .await
            .map_err(Self::store_err)?;
        Ok(
            json!({"ok": true, "total": total, "limit": limit, "offset": offset, "entries": entries}),
        )
    }

    /// Handle `bncr.deadLetter.prune`.
    pub(crate) async fn dead_prune(&self, p: params::DeadLetter) -> Result<Value, RpcError> {
        let dry_run = p.dry_run.unwrap_or(true);
        if !dry_run && p.reason.is_none() && p.older_than.is_none() {
            return Err(
                RpcError::invalid_request("deadLetter-prune-requires-filter")
                    .with_details(json!({"code": "deadLetter-prune-requires-filter"})),
            );
        }
        let filter = dead_filter(&p)?;
        let store = self.store()?;
        let per_account = store
            .call(move |c| store::prune_dead(c, &filter, dry_run))
            .await
            .map_err(Self::store_err)?;
        let matched: u64 = per_account.iter().map(|(_, n)| n).sum();
        if !dry_run {
            let mut st = self.state();
            for (a, n) in &per_account {
                if let Some(acc) = st.accounts.get_mut(a) {
                    acc.dead = acc.dead.saturating_sub(*n);
                }
            }
            drop(st);
            tracing::info!(removed = matched, "bncr dead letters pruned");
        }
        Ok(
            json!({"ok": true, "dryRun": dry_run, "matched": matched, "removed": if dry_run { 0 } else { matched }}),
        )
    }
}

/// Largest `limit` of `bncr.deadLetter.inspect`.
const MAX_INSPECT_LIMIT: u64 = 500;
/// Largest `offset` of `bncr.deadLetter.inspect` (far beyond any real
/// dead-letter count; keeps the SQL in range).
const MAX_INSPECT_OFFSET: u64 = 1_000_000_000;

/// The filter of an inspect or prune; `olderThan` (an age in ms) must not
/// reach before the Unix epoch.
fn dead_filter(p: &params::DeadLetter) -> Result<store::DeadFilter, RpcError> {
    let now = now_ms();
    let before = match p.older_than {
        None => None,
        Some(ms) => Some(
            i64::try_from(ms)
                .ok()
                .and_then(|ms| now.checked_sub(ms))
                .filter(|b| *b >= 0)
                .ok_or_else(|| {
                    RpcError::invalid_request(format!("olderThan must be 0..={now} (ms of age)"))
                })?,
        ),
    };
    Ok(store::DeadFilter {
        account_id: p.account_id.as_deref().map(|a| normalize_account(Some(a))),
        reason: p.reason.clone(),
        before,
    })
}
