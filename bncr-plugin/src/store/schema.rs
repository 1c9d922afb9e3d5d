//! The database schema and its `user_version` migrations.

use super::{SCHEMA_VERSION, StoreError};
use rusqlite::Connection;

pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    // The common case, every restart: one read of the header. No DDL, no
    // write transaction, no fsync. Reading also opens the WAL if the
    // database is in WAL mode, so `journal_mode` below reports the truth.
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version == SCHEMA_VERSION {
        let mode: String = conn.pragma_query_value(None, "journal_mode", |r| r.get(0))?;
        if mode.eq_ignore_ascii_case("wal") {
            return Ok(());
        }
    }
    if version > SCHEMA_VERSION {
        return Err(StoreError(format!(
            "store schema version {version} is newer than this plugin's {SCHEMA_VERSION}"
        )));
    }
    // WAL is persistent in the file; set it once, before the migration
    // commits, outside any transaction.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // Re-read under the write lock: another opener may have migrated.
    let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError(format!(
            "store schema version {version} is newer than this plugin's {SCHEMA_VERSION}"
        )));
    }
    if version < 1 {
        tx.execute_batch(
            "CREATE TABLE outbox(
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                message_id TEXT NOT NULL UNIQUE,
                account_id TEXT NOT NULL,
                session_key TEXT NOT NULL,
                payload TEXT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                last_error TEXT,
                created_at INTEGER NOT NULL);
             CREATE TABLE dead_letter(
                message_id TEXT PRIMARY KEY,
                seq INTEGER NOT NULL,
                account_id TEXT NOT NULL,
                session_key TEXT NOT NULL,
                payload TEXT NOT NULL,
                attempts INTEGER NOT NULL,
                reason TEXT NOT NULL,
                error TEXT,
                created_at INTEGER NOT NULL,
                dead_at INTEGER NOT NULL);
             CREATE TABLE idempotency(
                key TEXT PRIMARY KEY,
                message_id TEXT NOT NULL,
                created_at INTEGER NOT NULL);
             CREATE TABLE inbound(
                account_id TEXT NOT NULL,
                platform TEXT NOT NULL,
                group_id TEXT NOT NULL,
                user_id TEXT NOT NULL,
                msg_id TEXT NOT NULL,
                payload TEXT NOT NULL,
                received_at INTEGER NOT NULL,
                handed_on INTEGER NOT NULL DEFAULT 0,
                PRIMARY KEY(account_id, platform, group_id, user_id, msg_id));
             CREATE INDEX inbound_pending ON inbound(handed_on, received_at);
             CREATE TABLE leases(
                account_id TEXT PRIMARY KEY,
                lease_id TEXT NOT NULL,
                epoch INTEGER NOT NULL,
                conn_id INTEGER,
                client_id TEXT,
                accepted_at INTEGER NOT NULL);",
        )?;
    }
    if version < 2 {
        // Indexes for the queries every generation runs: the start-of-drain
        // prune (idempotency by age), the restore (dead letters per
        // account) and the route lookup of `send` without an accountId.
        tx.execute_batch(
            "CREATE INDEX idempotency_created ON idempotency(created_at);
             CREATE INDEX inbound_route ON inbound(platform, group_id, user_id, received_at);
             CREATE INDEX dead_letter_account ON dead_letter(account_id);",
        )?;
    }
    if version < 3 {
        // Connections known as Bncr clients, so that a later generation
        // does not take a client connected across the restart for an
        // operator. Connection ids are unique across process lifetimes.
        tx.execute_batch("CREATE TABLE client_conns(conn_id INTEGER PRIMARY KEY);")?;
    }
    // Later versions append `if version < N { ... }` blocks here.
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}
