//! The rows the bridge stores and the queries it runs, each a function
//! of a connection, run by the store's runner.

use super::StoreError;
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

/// One queued outbound message as stored.
#[derive(Debug, Clone)]
pub(crate) struct OutboxRow {
    pub(crate) seq: i64,
    pub(crate) message_id: String,
    pub(crate) account_id: String,
    pub(crate) session_key: String,
    pub(crate) payload: Value,
    pub(crate) attempts: u32,
    pub(crate) created_at: i64,
}

/// A lease as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaseRow {
    pub(crate) account_id: String,
    pub(crate) lease_id: String,
    pub(crate) epoch: u64,
    pub(crate) conn_id: Option<u64>,
    pub(crate) client_id: Option<String>,
    pub(crate) accepted_at: i64,
}

/// An inbound message journaled but not yet handed on.
#[derive(Debug, Clone)]
pub(crate) struct InboundRow {
    pub(crate) key: InboundKey,
    pub(crate) payload: Value,
}

/// The dedupe key of an inbound message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InboundKey {
    pub(crate) account_id: String,
    pub(crate) platform: String,
    pub(crate) group_id: String,
    pub(crate) user_id: String,
    pub(crate) msg_id: String,
}

/// Everything restored when the store opens.
#[derive(Debug, Default)]
pub(crate) struct Restored {
    pub(crate) outbox: Vec<OutboxRow>,
    pub(crate) dead_letters: Vec<(String, u64)>,
    pub(crate) leases: Vec<LeaseRow>,
    pub(crate) inbound_pending: Vec<InboundRow>,
    /// Connections known as Bncr clients.
    pub(crate) client_conns: Vec<u64>,
}

fn parse_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

/// Read back outbox, dead-letter counts, leases and pending inbound.
pub(crate) fn restore(conn: &Connection) -> Result<Restored, StoreError> {
    let mut out = Restored::default();
    let mut st = conn.prepare(
        "SELECT seq, message_id, account_id, session_key, payload, attempts, created_at FROM outbox ORDER BY seq",
    )?;
    let rows = st.query_map([], |r| {
        Ok(OutboxRow {
            seq: r.get(0)?,
            message_id: r.get(1)?,
            account_id: r.get(2)?,
            session_key: r.get(3)?,
            payload: parse_json(&r.get::<_, String>(4)?),
            attempts: r.get(5)?,
            created_at: r.get(6)?,
        })
    })?;
    for row in rows {
        out.outbox.push(row?);
    }
    let mut st =
        conn.prepare("SELECT account_id, COUNT(*) FROM dead_letter GROUP BY account_id")?;
    let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))?;
    for row in rows {
        out.dead_letters.push(row?);
    }
    let mut st = conn.prepare(
        "SELECT account_id, lease_id, epoch, conn_id, client_id, accepted_at FROM leases",
    )?;
    let rows = st.query_map([], |r| {
        Ok(LeaseRow {
            account_id: r.get(0)?,
            lease_id: r.get(1)?,
            epoch: r.get(2)?,
            conn_id: r.get(3)?,
            client_id: r.get(4)?,
            accepted_at: r.get(5)?,
        })
    })?;
    for row in rows {
        out.leases.push(row?);
    }
    let mut st = conn.prepare(
        "SELECT account_id, platform, group_id, user_id, msg_id, payload FROM inbound
         WHERE handed_on = 0 ORDER BY received_at",
    )?;
    let rows = st.query_map([], |r| {
        Ok(InboundRow {
            key: InboundKey {
                account_id: r.get(0)?,
                platform: r.get(1)?,
                group_id: r.get(2)?,
                user_id: r.get(3)?,
                msg_id: r.get(4)?,
            },
            payload: parse_json(&r.get::<_, String>(5)?),
        })
    })?;
    for row in rows {
        out.inbound_pending.push(row?);
    }
    let mut st = conn.prepare("SELECT conn_id FROM client_conns")?;
    let rows = st.query_map([], |r| r.get::<_, u64>(0))?;
    for row in rows {
        out.client_conns.push(row?);
    }
    Ok(out)
}

/// Insert an outbound message unless its idempotency key is known. Returns
/// the message id and, when new, its row.
pub(crate) fn insert_outbox(
    conn: &mut Connection,
    idempotency_key: &str,
    row: OutboxRow,
) -> Result<(String, Option<OutboxRow>), StoreError> {
    let tx = conn.transaction()?;
    let existing: Option<String> = tx
        .query_row(
            "SELECT message_id FROM idempotency WHERE key = ?1",
            [idempotency_key],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(id) = existing {
        return Ok((id, None));
    }
    tx.execute(
        "INSERT INTO outbox(message_id, account_id, session_key, payload, attempts, created_at)
         VALUES (?1, ?2, ?3, ?4, 0, ?5)",
        params![
            row.message_id,
            row.account_id,
            row.session_key,
            row.payload.to_string(),
            row.created_at
        ],
    )?;
    let seq = tx.last_insert_rowid();
    tx.execute(
        "INSERT INTO idempotency(key, message_id, created_at) VALUES (?1, ?2, ?3)",
        params![idempotency_key, row.message_id, row.created_at],
    )?;
    tx.commit()?;
    let id = row.message_id.clone();
    Ok((id, Some(OutboxRow { seq, ..row })))
}

/// Move an outbox entry to the dead letters. Returns whether it was queued.
pub(crate) fn dead_letter(
    conn: &mut Connection,
    message_id: &str,
    reason: &str,
    error: Option<&str>,
    attempts: u32,
    now: i64,
) -> Result<bool, StoreError> {
    let tx = conn.transaction()?;
    let n = tx.execute(
        "INSERT OR REPLACE INTO dead_letter(message_id, seq, account_id, session_key, payload, attempts, reason, error, created_at, dead_at)
         SELECT message_id, seq, account_id, session_key, payload, MAX(attempts, ?2), ?3, COALESCE(?4, last_error), created_at, ?5
         FROM outbox WHERE message_id = ?1",
        params![message_id, attempts, reason, error, now],
    )?;
    tx.execute("DELETE FROM outbox WHERE message_id = ?1", [message_id])?;
    tx.commit()?;
    Ok(n > 0)
}

/// Journal an inbound message; `false` when its key was already journaled.
pub(crate) fn journal_inbound(
    conn: &mut Connection,
    key: &InboundKey,
    payload: &Value,
    now: i64,
) -> Result<bool, StoreError> {
    let n = conn.execute(
        "INSERT OR IGNORE INTO inbound(account_id, platform, group_id, user_id, msg_id, payload, received_at, handed_on)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0)",
        params![
            key.account_id,
            key.platform,
            key.group_id,
            key.user_id,
            key.msg_id,
            payload.to_string(),
            now
        ],
    )?;
    Ok(n == 1)
}

/// Mark a journaled inbound message handed on.
pub(crate) fn mark_handed_on(conn: &mut Connection, key: &InboundKey) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE inbound SET handed_on = 1 WHERE account_id = ?1 AND platform = ?2 AND group_id = ?3 AND user_id = ?4 AND msg_id = ?5",
        params![key.account_id, key.platform, key.group_id, key.user_id, key.msg_id],
    )?;
    Ok(())
}

/// The account that most recently received a message from this route.
pub(crate) fn account_for_route(
    conn: &Connection,
    platform: &str,
    group_id: &str,
    user_id: &str,
) -> Result<Option<String>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT account_id FROM inbound WHERE platform = ?1 AND group_id = ?2 AND user_id = ?3
             ORDER BY received_at DESC LIMIT 1",
            params![platform, group_id, user_id],
            |r| r.get(0),
        )
        .optional()?)
}

/// Drop dedupe and idempotency keys older than `cutoff` (unix ms).
pub(crate) fn prune_keys(conn: &mut Connection, cutoff: i64) -> Result<(usize, usize), StoreError> {
    let a = conn.execute(
        "DELETE FROM inbound WHERE handed_on = 1 AND received_at < ?1",
        [cutoff],
    )?;
    let b = conn.execute("DELETE FROM idempotency WHERE created_at < ?1", [cutoff])?;
    Ok((a, b))
}

/// Write or update an account's lease.
pub(crate) fn put_lease(conn: &mut Connection, lease: &LeaseRow) -> Result<(), StoreError> {
    conn.execute(
        "INSERT OR REPLACE INTO leases(account_id, lease_id, epoch, conn_id, client_id, accepted_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            lease.account_id,
            lease.lease_id,
            lease.epoch,
            lease.conn_id,
            lease.client_id,
            lease.accepted_at
        ],
    )?;
    Ok(())
}

/// Remember that a connection is a Bncr client (`known`) or forget it.
pub(crate) fn put_client_conn(
    conn: &mut Connection,
    conn_id: u64,
    known: bool,
) -> Result<(), StoreError> {
    if known {
        conn.execute(
            "INSERT OR IGNORE INTO client_conns(conn_id) VALUES (?1)",
            [conn_id],
        )?;
    } else {
        conn.execute("DELETE FROM client_conns WHERE conn_id = ?1", [conn_id])?;
    }
    Ok(())
}

/// Delete an account's lease.
pub(crate) fn delete_lease(conn: &mut Connection, account_id: &str) -> Result<(), StoreError> {
    conn.execute("DELETE FROM leases WHERE account_id = ?1", [account_id])?;
    Ok(())
}

/// Dead-letter filters shared by inspect and prune.
#[derive(Debug, Clone, Default)]
pub(crate) struct DeadFilter {
    pub(crate) account_id: Option<String>,
    pub(crate) reason: Option<String>,
    /// Dead-lettered before this unix-ms instant.
    pub(crate) before: Option<i64>,
}

impl DeadFilter {
    fn clause(&self) -> (String, Vec<rusqlite::types::Value>) {
        use rusqlite::types::Value as V;
        let mut sql = String::from(" WHERE 1=1");
        let mut args = Vec::new();
        if let Some(a) = &self.account_id {
            sql.push_str(" AND account_id = ?");
            args.push(V::Text(a.clone()));
        }
        if let Some(r) = &self.reason {
            sql.push_str(" AND reason = ?");
            args.push(V::Text(r.clone()));
        }
        if let Some(b) = self.before {
            sql.push_str(" AND dead_at < ?");
            args.push(V::Integer(b));
        }
        (sql, args)
    }
}

/// One dead letter, summarised for `bncr.deadLetter.inspect`.
pub(crate) fn inspect_dead(
    conn: &Connection,
    filter: &DeadFilter,
    limit: u64,
    offset: u64,
) -> Result<(u64, Vec<Value>), StoreError> {
    let (clause, args) = filter.clause();
    let total: u64 = conn.query_row(
        &format!("SELECT COUNT(*) FROM dead_letter{clause}"),
        rusqlite::params_from_iter(args.iter()),
        |r| r.get(0),
    )?;
    let mut st = conn.prepare(&format!(
        "SELECT message_id, account_id, session_key, payload, attempts, reason, error, created_at, dead_at
         FROM dead_letter{clause} ORDER BY dead_at, seq LIMIT {limit} OFFSET {offset}"
    ))?;
    let rows = st.query_map(rusqlite::params_from_iter(args.iter()), |r| {
        let payload = parse_json(&r.get::<_, String>(3)?);
        let mut preview: String = payload
            .get("msg")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .chars()
            .take(80)
            .collect();
        if preview.is_empty() {
            preview = payload
                .get("fileName")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .into();
        }
        Ok(serde_json::json!({
            "messageId": r.get::<_, String>(0)?,
            "accountId": r.get::<_, String>(1)?,
            "sessionKey": r.get::<_, String>(2)?,
            "route": {
                "platform": payload.get("platform"),
                "groupId": payload.get("groupId"),
                "userId": payload.get("userId"),
            },
            "type": payload.get("type"),
            "preview": preview,
            "attempts": r.get::<_, u32>(4)?,
            "reason": r.get::<_, String>(5)?,
            "error": r.get::<_, Option<String>>(6)?,
            "createdAt": r.get::<_, i64>(7)?,
            "deadAt": r.get::<_, i64>(8)?,
        }))
    })?;
    let mut entries = Vec::new();
    for row in rows {
        entries.push(row?);
    }
    Ok((total, entries))
}

/// Count (dry run) or delete dead letters matching `filter`; returns the
/// count and the affected accounts with their counts.
pub(crate) fn prune_dead(
    conn: &mut Connection,
    filter: &DeadFilter,
    dry_run: bool,
) -> Result<Vec<(String, u64)>, StoreError> {
    let (clause, args) = filter.clause();
    let tx = conn.transaction()?;
    let per_account = {
        let mut st = tx.prepare(&format!(
            "SELECT account_id, COUNT(*) FROM dead_letter{clause} GROUP BY account_id"
        ))?;
        let rows = st.query_map(rusqlite::params_from_iter(args.iter()), |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?))
        })?;
        rows.collect::<Result<Vec<_>, _>>()?
    };
    if !dry_run {
        tx.execute(
            &format!("DELETE FROM dead_letter{clause}"),
            rusqlite::params_from_iter(args.iter()),
        )?;
    }
    tx.commit()?;
    Ok(per_account)
}
