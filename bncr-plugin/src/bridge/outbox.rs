//! The outbox: durable queueing, the drain that pushes to the account's
//! lease holder, retries, acks and dead letters.

use super::*;

impl Bridge {
    // ---------------------------------------------------------------- outbox

    /// Queue an outbound message durably; the same idempotency key returns the
    /// first message id and queues nothing.
    pub(crate) async fn enqueue(
        &self,
        account: &str,
        route: &Route,
        message: Value,
        idempotency_key: &str,
    ) -> Result<(String, bool), RpcError> {
        let store = self.store()?;
        let row = OutboxRow {
            seq: 0,
            message_id: self.new_id("bncr"),
            account_id: account.to_string(),
            session_key: route.session_key(account),
            payload: message,
            attempts: 0,
            created_at: now_ms(),
        };
        let key = idempotency_key.to_string();
        let (id, inserted) = store
            .call(move |c| store::insert_outbox(c, &key, row))
            .await
            .map_err(Self::store_err)?;
        let Some(row) = inserted else {
            return Ok((id, false));
        };
        {
            self.state().enqueue(row, Instant::now());
        }
        self.wake.notify_one();
        Ok((id, true))
    }

    /// The account to use for an outbound target: the message's `accountId`,
    /// else the account that last heard from the route, else `Primary`.
    pub(crate) async fn account_for_target(
        &self,
        explicit: Option<&str>,
        route: &Route,
    ) -> Result<String, RpcError> {
        if let Some(a) = explicit.filter(|a| !a.trim().is_empty()) {
            return self.account(Some(a));
        }
        let store = self.store()?;
        let r = route.clone();
        let found = store
            .call(move |c| store::account_for_route(c, &r.platform, &r.group_id, &r.user_id))
            .await
            .map_err(Self::store_err)?;
        match found {
            Some(a) => Ok(a),
            None => self.account(None),
        }
    }

    pub(super) async fn drain(self: Arc<Self>) {
        let mut prune_at = Instant::now();
        loop {
            if self.stop.is_cancelled() {
                break;
            }
            let now = Instant::now();
            let (pushes, deads, next) = self.plan(now);
            for p in pushes {
                if p.file.is_some() {
                    let me = self.clone();
                    if self
                        .life
                        .spawn(async move { me.push_with_file(p).await })
                        .is_err()
                    {
                        return;
                    }
                } else if self.push(p).is_err() {
                    return;
                }
            }
            for (account, seq, pending) in deads {
                self.dead_letter(&account, seq, pending, "retry-limit", None)
                    .await;
            }
            if now >= prune_at {
                self.prune_keys();
                self.prune_accounts(now);
                self.expire_transfers(now).await;
                prune_at = now + self.sweep_every();
            }
            let until = next.map_or(prune_at, |n| n.min(prune_at));
            tokio::select! {
                () = self.stop.cancelled() => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep_until(until.into()) => {}
            }
        }
    }

    /// Step every online account's queue at `now` (see [`Queue::step`]) and
    /// turn its decisions into pushes and dead letters.
    #[allow(clippy::type_complexity)]
    pub(super) fn plan(
        &self,
        now: Instant,
    ) -> (Vec<Push>, Vec<(String, i64, Pending)>, Option<Instant>) {
        let mut pushes = Vec::new();
        let mut deads = Vec::new();
        let mut next: Option<Instant> = None;
        let files_dir = self.root.join("files");
        let mut st = self.state();
        let st = &mut *st;
        for (name, acc) in st.accounts.iter_mut() {
            let Some(conn) = acc.lease.as_ref().and_then(|l| l.conn) else {
                continue;
            };
            let step = acc.queue.step(now, &self.cfg);
            if let Some(t) = step.next {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
            for (seq, p) in step.dead {
                st.index.remove(&p.message_id);
                deads.push((name.clone(), seq, p));
            }
            for seq in step.push {
                let Some(p) = acc.queue.get_mut(seq) else {
                    continue;
                };
                let file = p
                    .payload
                    .get("path")
                    .and_then(Value::as_str)
                    .filter(|path| {
                        p.payload.get("base64").is_none() && Path::new(path).starts_with(&files_dir)
                    })
                    .map(str::to_string);
                p.transferring = file.is_some();
                pushes.push(Push {
                    file,
                    account: name.clone(),
                    seq,
                    conn,
                    attempts: p.attempts,
                    payload: json!({
                        "type": "message.outbound",
                        "messageId": p.message_id,
                        "idempotencyKey": p.message_id,
                        "sessionKey": p.session_key,
                        "ts": now_ms(),
                        "message": p.payload,
                    }),
                });
            }
        }
        (pushes, deads, next)
    }

    /// Send the message's file first, then push the message with `path`
    /// replaced by the client's path for it.
    pub(super) async fn push_with_file(self: Arc<Self>, mut p: Push) {
        let path = p.file.take().unwrap_or_default();
        let mime = p.payload["message"]["mimeType"]
            .as_str()
            .map(str::to_string);
        let result = match self.sendable_file(&path) {
            Some(local) => {
                self.send_file(p.conn, &p.account, local, mime.as_deref())
                    .await
            }
            None => Err(format!("not a sendable file: {path}")),
        };
        let ok = match result {
            Ok(client_path) => {
                p.payload["message"]["path"] = json!(client_path);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, account = %p.account, "bncr file transfer failed; will retry");
                false
            }
        };
        if let Some(a) = self.state().accounts.get_mut(&p.account) {
            a.queue.transfer_ended(p.seq, ok, Instant::now(), &self.cfg);
        }
        if ok {
            let _ = self.push(p);
        }
        self.wake.notify_one();
    }

    /// Push one message; `Err` when the generation retired.
    pub(super) fn push(&self, p: Push) -> Result<(), ()> {
        let sent = match self.events.send(&[p.conn], PUSH_EVENT, &p.payload) {
            Ok(n) => n,
            Err(plugin_api::EventError::Retired(_)) => return Err(()),
            Err(e) => {
                tracing::warn!(error = %e, "bncr push failed");
                0
            }
        };
        let message_id = p.payload["messageId"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if sent == 0 {
            // The connection is gone: not an attempt. Wait for a new lease.
            if let Some(a) = self.state().accounts.get_mut(&p.account) {
                a.queue.refused(p.seq, Instant::now());
            }
            tracing::info!(account = %p.account, conn = %p.conn, "bncr connection refused a push; marked offline");
            self.connection_closed(p.conn);
            return Ok(());
        }
        let store = match self.store() {
            Ok(s) => s,
            Err(_) => return Ok(()),
        };
        if self.cfg.outbound_require_ack {
            let attempts = p.attempts;
            store.enqueue("record attempt", move |c| {
                c.execute(
                    "UPDATE outbox SET attempts = ?1 WHERE message_id = ?2",
                    rusqlite::params![attempts, message_id],
                )?;
                Ok(())
            });
        } else {
            {
                let mut st = self.state();
                st.index.remove(&message_id);
                if let Some(acc) = st.accounts.get_mut(&p.account) {
                    acc.queue.remove(p.seq);
                }
            }
            store.enqueue("remove delivered", move |c| {
                c.execute("DELETE FROM outbox WHERE message_id = ?1", [message_id])?;
                Ok(())
            });
            self.wake.notify_one();
        }
        Ok(())
    }

    pub(super) async fn dead_letter(
        &self,
        account: &str,
        _seq: i64,
        p: Pending,
        reason: &str,
        error: Option<String>,
    ) {
        let error = error.or(p.last_error.clone());
        let Ok(store) = self.store() else {
            // Still in the store's outbox; the next generation retries it.
            return;
        };
        let id = p.message_id.clone();
        let reason_s = reason.to_string();
        let attempts = p.attempts;
        let err2 = error.clone();
        let res = store
            .call(move |c| {
                store::dead_letter(c, &id, &reason_s, err2.as_deref(), attempts, now_ms())
            })
            .await;
        match res {
            Ok(_) => {
                if let Some(acc) = self.state().accounts.get_mut(account) {
                    acc.dead += 1;
                }
                tracing::warn!(
                    account,
                    message_id = %p.message_id,
                    attempts = p.attempts,
                    reason,
                    error = error.as_deref().unwrap_or(""),
                    "bncr message dead-lettered"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, message_id = %p.message_id, "bncr dead-letter write failed")
            }
        }
        self.wake.notify_one();
    }

    /// How often expired keys, offline leases and idle transfers are swept:
    /// every minute, or twice per the shorter of `leaseTtlMs` and
    /// `transferTtlMs`.
    fn sweep_every(&self) -> Duration {
        let half = self.cfg.lease_ttl_ms.min(self.cfg.transfer_ttl_ms) / 2;
        Duration::from_millis(half.clamp(10, 60_000))
    }

    pub(super) fn prune_keys(&self) {
        let Ok(store) = self.store() else { return };
        let cutoff = now_ms() - self.cfg.dedupe_ttl_ms as i64;
        store.enqueue("prune dedupe keys", move |c| {
            let (a, b) = store::prune_keys(c, cutoff)?;
            if a + b > 0 {
                tracing::debug!(inbound = a, idempotency = b, "bncr pruned expired keys");
            }
            Ok(())
        });
    }

    /// Handle `bncr.ack`.
    pub(crate) async fn ack(&self, p: params::Ack) -> Result<Value, RpcError> {
        let message_id = params::required(p.message_id, "messageId")?;
        let store = self.store()?;
        let ok = p.ok.unwrap_or(true);
        let fatal = p.fatal.unwrap_or(false);
        enum Next {
            Missing,
            Done,
            Dead(String, i64, Pending, &'static str),
            Retry(u64),
        }
        let next = {
            let mut st = self.state();
            let st = &mut *st;
            match st.index.get(&message_id).cloned() {
                None => Next::Missing,
                Some((account, seq)) => {
                    let acc = st.accounts.entry(account.clone()).or_default();
                    let outcome =
                        acc.queue
                            .ack(seq, ok, fatal, p.error.clone(), Instant::now(), &self.cfg);
                    match outcome {
                        None => Next::Missing,
                        Some(AckOutcome::Done) => {
                            st.index.remove(&message_id);
                            Next::Done
                        }
                        Some(AckOutcome::Dead(q, reason)) => {
                            st.index.remove(&message_id);
                            Next::Dead(account, seq, q, reason)
                        }
                        Some(AckOutcome::Retry(ms)) => Next::Retry(ms),
                    }
                }
            }
        };
        match next {
            Next::Missing => Ok(json!({"ok": true, "message": "already-acked-or-missing"})),
            Next::Done => {
                let id = message_id.clone();
                store
                    .call(move |c| {
                        c.execute("DELETE FROM outbox WHERE message_id = ?1", [id])?;
                        Ok(())
                    })
                    .await
                    .map_err(Self::store_err)?;
                self.wake.notify_one();
                Ok(json!({"ok": true, "messageId": message_id}))
            }
            Next::Dead(account, seq, q, reason) => {
                self.dead_letter(&account, seq, q, reason, p.error).await;
                Ok(
                    json!({"ok": true, "messageId": message_id, "movedToDeadLetter": true, "reason": reason}),
                )
            }
            Next::Retry(wait) => {
                let id = message_id.clone();
                let err = p.error;
                store.enqueue("record nack", move |c| {
                    c.execute(
                        "UPDATE outbox SET last_error = ?1 WHERE message_id = ?2",
                        rusqlite::params![err, id],
                    )?;
                    Ok(())
                });
                Ok(
                    json!({"ok": true, "messageId": message_id, "willRetry": true, "retryInMs": wait}),
                )
            }
        }
    }
}
