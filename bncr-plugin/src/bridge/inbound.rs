//! Inbound messages: policy, journaling, dedupe and hand-on to operators.

use super::*;

impl Bridge {
    // ---------------------------------------------------------------- inbound

    pub(super) fn allowed(&self, route: &Route) -> Result<(), &'static str> {
        let (policy, list, id) = if route.group_id == "0" {
            (self.cfg.dm_policy, &self.cfg.allow_from, &route.user_id)
        } else {
            (
                self.cfg.group_policy,
                &self.cfg.group_allow_from,
                &route.group_id,
            )
        };
        match policy {
            Policy::Open => Ok(()),
            Policy::Disabled => Err(if route.group_id == "0" {
                "dm-disabled"
            } else {
                "group-disabled"
            }),
            Policy::Allowlist => {
                let qualified = format!("{}:{id}", route.platform);
                if list.iter().any(|e| e == id || *e == qualified || e == "*") {
                    Ok(())
                } else {
                    Err("not-allowlisted")
                }
            }
        }
    }

    /// Handle `bncr.inbound`.
    pub(crate) async fn inbound(
        &self,
        ctx: &RequestContext,
        p: params::Inbound,
    ) -> Result<Value, RpcError> {
        let route = inbound_route(&p.platform, &p.group_id, &p.user_id)?;
        let account = self.account(p.common.account_id.as_deref())?;
        let kind = p.kind.clone().unwrap_or_else(|| "text".into());
        if !MESSAGE_TYPES.contains(&kind.as_str()) {
            return Err(RpcError::invalid_request(format!(
                "type must be one of {}",
                MESSAGE_TYPES.join("|")
            )));
        }
        let store = self.store()?;
        if self.stale(&account, &p.common) {
            return Ok(json!({"accepted": false, "stale": true, "accountId": account}));
        }
        self.state()
            .accounts
            .entry(account.clone())
            .or_default()
            .conns
            .insert(ctx.conn_id());
        if let Err(reason) = self.allowed(&route) {
            tracing::info!(account = %account, route = %route.as_string(), reason, "bncr inbound refused by policy");
            return Ok(json!({"accepted": false, "reason": reason, "accountId": account}));
        }
        let msg_id = params::id_opt(&p.msg_id).unwrap_or_else(|| self.new_id("in"));
        let session_key = p
            .session_key
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| route.session_key(&account));
        let mut payload = json!({
            "channel": "bncr",
            "accountId": account,
            "route": route.as_string(),
            "platform": route.platform,
            "groupId": route.group_id,
            "userId": route.user_id,
            "sessionKey": session_key,
            "msgId": msg_id,
            "msg": p.msg.clone().unwrap_or_default(),
            "type": kind,
            "ts": now_ms(),
        });
        for (k, v) in [
            ("base64", &p.base64),
            ("path", &p.path),
            ("mimeType", &p.mime_type),
            ("fileName", &p.file_name),
        ] {
            if let Some(v) = v {
                payload[k] = json!(v);
            }
        }
        let key = InboundKey {
            account_id: account.clone(),
            platform: route.platform.clone(),
            group_id: route.group_id.clone(),
            user_id: route.user_id.clone(),
            msg_id: msg_id.clone(),
        };
        // maxInboundPending: a peer must not make the pending queue (and
        // the journal's pending rows) grow without limit. A retry of a
        // message already pending is answered as a duplicate, not refused.
        let reserved = {
            let mut st = self.state();
            if st.inbound.iter().any(|(k, _)| *k == key) {
                return Ok(json!({
                    "accepted": true, "duplicated": true, "accountId": account,
                    "sessionKey": session_key, "msgId": msg_id,
                }));
            }
            let max = self.cfg.max_inbound_pending;
            if st.inbound.len() + st.inbound_reserved >= max {
                st.counters.inbound_refused += 1;
                drop(st);
                tracing::warn!(limit = max, account = %account, "bncr inbound refused: maxInboundPending reached");
                return Ok(
                    json!({"accepted": false, "reason": "inbound-full", "accountId": account}),
                );
            }
            st.inbound_reserved += 1;
            Reservation(Arc::clone(&self.state), false)
        };
        // Journal and queue in one store job: once journaled, the message is
        // queued in memory even if this request is cancelled meanwhile (a
        // deadline, a drain). A job that never runs releases the slot.
        let (k2, p2) = (key.clone(), payload.clone());
        let fresh = store
            .call(move |c| {
                let fresh = store::journal_inbound(c, &k2, &p2, now_ms())?;
                if fresh {
                    reserved.queue(k2, p2);
                }
                Ok(fresh)
            })
            .await
            .map_err(Self::store_err)?;
        if !fresh {
            return Ok(json!({
                "accepted": true, "duplicated": true, "accountId": account,
                "sessionKey": session_key, "msgId": msg_id,
            }));
        }
        // Only the inbound loop hands on: a request that is cancelled
        // cannot stop a hand-on pass halfway, nor wait behind a backlog.
        self.inbound_wake.notify_one();
        Ok(
            json!({"accepted": true, "accountId": account, "sessionKey": session_key, "msgId": msg_id}),
        )
    }

    // ---------------------------------------------------------------- hand-on

    /// Remember that `conn` is a Bncr client: it is never counted as an
    /// operator that received an inbound message.
    pub(crate) fn client_seen(&self, conn: ConnId) {
        let new = self.state().clients.insert(conn);
        if new && let Ok(store) = self.store() {
            store.enqueue("client connection", move |c| {
                store::put_client_conn(c, conn.0, true)
            });
        }
    }

    /// The host's connection-opened hook: wake the inbound loop when the
    /// new connection's grace ends, since it may be an operator from then
    /// on. (Whether it is one is decided at each offer, from how long the
    /// host has had it open: this hook may run after an offer already saw
    /// the connection, or in an earlier generation.)
    pub(crate) fn connection_opened(&self, info: &ConnectionInfo) {
        if info.role != Role::Operator || !info.scopes.allows(scope::WRITE) {
            return;
        }
        let now = Instant::now();
        let until = now + Duration::from_millis(self.cfg.inbound_grace_ms);
        let pending = {
            let mut st = self.state();
            // Graces that ended are dropped here too, not only by the loop
            // (which sleeps while nothing is pending): the set holds at
            // most the connections opened within one grace.
            st.grace_ends = st.grace_ends.split_off(&now);
            if !st.clients.contains(&info.conn_id) {
                st.grace_ends.insert(until);
            }
            !st.inbound.is_empty()
        };
        if pending {
            self.inbound_wake.notify_one();
        }
    }

    /// Who counts as an operator now, asked by the host of each connection
    /// holding `operator.write`: not a known Bncr client, and open for at
    /// least `inboundGraceMs` (measured by the host from when the
    /// connection joined its table, so neither a late opened hook nor a
    /// restart shortens the grace).
    fn is_operator(&self) -> impl Fn(&ConnectionInfo, Duration) -> bool + use<> {
        let clients = self.state().clients.clone();
        let grace = Duration::from_millis(self.cfg.inbound_grace_ms);
        move |info, open_for| open_for >= grace && !clients.contains(&info.conn_id)
    }

    /// Offer pending inbound messages to operators, oldest first, until one
    /// reaches nobody (the later ones would reach nobody either). A message
    /// is handed on, and never offered again, once at least one operator
    /// connection received it (or the echo responder queued its reply).
    /// Ends at the next message once the bridge stops. A message operators
    /// received has its journal mark queued at once, before anything is
    /// awaited, under `hand_on_step`: a stop closes the store's queue only
    /// after it, so the mark is journaled before the store closes.
    pub(super) async fn hand_on_pending(&self) {
        let _one_pass = self.hand_on_lock.lock().await;
        loop {
            let Some(offer) = self.offer_next() else {
                return;
            };
            let Offer {
                key,
                payload,
                received,
                mark,
            } = offer;
            let echoed = self.cfg.echo.enabled && self.echo(&key, &payload).await;
            if received == 0 && !echoed {
                let mut st = self.state();
                st.inbound.push_front((key.clone(), payload));
                st.counters.inbound_unreceived_offers += 1;
                drop(st);
                tracing::debug!(msg_id = %key.msg_id, "bncr inbound reached no operator; kept pending");
                return;
            }
            // Received: never offer it again, in this generation (memory,
            // done by `offer_next`) or a later one (the journal). Echoed
            // only: marked now (a stop in between leaves it pending, and
            // the next generation's echo is deduplicated by its key).
            self.state().counters.inbound_handed_on += 1;
            tracing::debug!(msg_id = %key.msg_id, operators = received, echoed, "bncr inbound handed on");
            let mark = match mark {
                Some(queued) => queued,
                None => self.queue_mark(&key),
            };
            let marked = match mark {
                Ok(answer) => answer.wait().await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            if let Err(e) = marked {
                tracing::error!(error = %e, msg_id = %key.msg_id, "bncr inbound handed on but not marked; a later generation offers it again");
            }
        }
    }

    /// Offer the oldest pending message (unless stopping): broadcast it to
    /// the operators, and if one received it, take it off the queue and
    /// queue its journal mark, all under `hand_on_step` and without an
    /// await. `None`: nothing to offer, or nobody received it and the echo
    /// responder is off (it stays pending).
    fn offer_next(&self) -> Option<Offer> {
        let _step = self.hand_on_step.lock().unwrap_or_else(|e| e.into_inner());
        if self.stop.is_cancelled() {
            return None;
        }
        let (key, payload) = self.state().inbound.front().cloned()?;
        let received = match self.events.broadcast_where(
            scope::WRITE,
            self.is_operator(),
            INBOUND_EVENT,
            &payload,
        ) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, msg_id = %key.msg_id, "bncr inbound not handed on; kept for the next generation");
                return None;
            }
        };
        if received == 0 && !self.cfg.echo.enabled {
            self.state().counters.inbound_unreceived_offers += 1;
            tracing::debug!(msg_id = %key.msg_id, "bncr inbound reached no operator; kept pending");
            return None;
        }
        // Taken off the queue before any await: if the pass is cancelled
        // during the echo, operators that received it are not offered it
        // again in this generation.
        {
            let mut st = self.state();
            if st.inbound.front().is_some_and(|(k, _)| *k == key) {
                st.inbound.pop_front();
            }
        }
        let mark = (received > 0).then(|| self.queue_mark(&key));
        Some(Offer {
            key,
            payload,
            received,
            mark,
        })
    }

    /// Queue the journal write marking `key` handed on.
    fn queue_mark(&self, key: &InboundKey) -> Result<store::Answer<()>, String> {
        let store = self.store().map_err(|e| e.message)?;
        let k = key.clone();
        store
            .queue_call(move |c| store::mark_handed_on(c, &k))
            .map_err(|e| e.to_string())
    }

    /// Queue the echo responder's reply; whether it is queued.
    async fn echo(&self, key: &InboundKey, payload: &Value) -> bool {
        let route = Route {
            platform: key.platform.clone(),
            group_id: key.group_id.clone(),
            user_id: key.user_id.clone(),
        };
        let text = format!(
            "{}{}",
            self.cfg.echo.prefix,
            payload
                .get("msg")
                .and_then(Value::as_str)
                .unwrap_or_default()
        );
        let message = json!({
            "platform": route.platform, "groupId": route.group_id, "userId": route.user_id,
            "type": "text", "msg": text,
        });
        let idem = format!(
            "echo:{}:{}:{}",
            key.account_id,
            route.as_string(),
            key.msg_id
        );
        match self.enqueue(&key.account_id, &route, message, &idem).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "bncr echo not queued; the message stays pending");
                false
            }
        }
    }

    /// Offer pending inbound messages whenever an operator may have
    /// appeared: a connection's grace ended, or every `inboundRetryMs`
    /// while messages are pending (an operator's queue may have refused).
    pub(super) async fn inbound_loop(self: Arc<Self>) {
        loop {
            if !self.state().inbound.is_empty() {
                self.hand_on_pending().await;
            }
            // Graces only matter while something is pending; with nothing
            // pending, wait to be woken (a new message or an operator).
            let until = {
                let now = Instant::now();
                let mut st = self.state();
                st.grace_ends.retain(|end| *end > now);
                let grace_end = st.grace_ends.first().copied();
                let retry = now + Duration::from_millis(self.cfg.inbound_retry_ms);
                (!st.inbound.is_empty()).then(|| grace_end.map_or(retry, |g| g.min(retry)))
            };
            let sleep = async {
                match until {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.stop.cancelled() => break,
                () = self.inbound_wake.notified() => {}
                () = sleep => {}
            }
        }
    }
}

/// A message offered by [`Bridge::offer_next`].
struct Offer {
    key: InboundKey,
    payload: Value,
    /// Operator connections that received it.
    received: usize,
    /// Its journal mark, queued when an operator received it.
    mark: Option<Result<store::Answer<()>, String>>,
}

/// One `maxInboundPending` slot held by a `bncr.inbound` request until its
/// message is queued (or the request ends, even by cancellation).
struct Reservation(Arc<Mutex<State>>, bool);

impl Reservation {
    /// Queue the message in the slot held: one lock, so the pending count
    /// never sees it twice or not at all.
    fn queue(mut self, key: InboundKey, payload: Value) {
        let mut st = self.0.lock().unwrap_or_else(|e| e.into_inner());
        st.inbound_reserved = st.inbound_reserved.saturating_sub(1);
        st.inbound.push_back((key, payload));
        self.1 = true;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.1 {
            return;
        }
        let mut st = self.0.lock().unwrap_or_else(|e| e.into_inner());
        st.inbound_reserved = st.inbound_reserved.saturating_sub(1);
    }
}
