//! The table of authenticated connections: presence for the operator
//! tools, host broadcasts, and the plugins' [`EventTransport`].

use super::Outbox;
use dashmap::DashMap;
use plugin_api::{ConnId, ConnectionInfo, EventTransport, OutboundEvent, Role};
use serde_json::value::RawValue;
use std::sync::Arc;

/// An authenticated connection as the table sees it.
#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) info: Arc<ConnectionInfo>,
    pub(crate) outbox: Arc<Outbox>,
    /// When it joined the table (unix ms).
    pub(crate) connected_at_ms: u64,
}

/// A connection as `system-presence` shows it.
#[derive(Debug, Clone)]
pub(crate) struct Presence {
    pub(crate) info: Arc<ConnectionInfo>,
    pub(crate) connected_at_ms: u64,
    pub(crate) last_activity_ms: u64,
}

/// Every authenticated connection, by id. Lives for the process; it is the
/// [`EventTransport`] the gateway's plugins reach clients through.
#[derive(Debug, Default)]
pub struct ConnectionTable {
    conns: DashMap<u64, Connection>,
}

impl ConnectionTable {
    pub(crate) fn insert(&self, info: Arc<ConnectionInfo>, outbox: Arc<Outbox>) {
        let connected_at_ms = crate::server::unix_ms();
        outbox.mark_activity(connected_at_ms);
        self.conns.insert(
            info.conn_id.0,
            Connection {
                info,
                outbox,
                connected_at_ms,
            },
        );
    }

    /// Every connection with when it connected and was last heard from.
    pub(crate) fn presence(&self) -> Vec<Presence> {
        self.conns
            .iter()
            .map(|c| Presence {
                info: c.info.clone(),
                connected_at_ms: c.connected_at_ms,
                last_activity_ms: c.outbox.last_activity_ms(),
            })
            .collect()
    }

    pub(crate) fn remove(&self, conn: ConnId) {
        self.conns.remove(&conn.0);
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Every connection's outbox.
    pub(crate) fn outboxes(&self) -> Vec<Arc<Outbox>> {
        self.conns.iter().map(|c| c.outbox.clone()).collect()
    }

    /// Queue a host event (`shutdown`) for everyone.
    pub(crate) fn send_all(&self, name: &str, payload: &Arc<RawValue>) {
        let name: Arc<str> = name.into();
        for c in self.conns.iter() {
            c.outbox.event(name.clone(), payload.clone());
        }
    }

    /// Tell every connection about `generation` (skipped by a connection
    /// that already knows it or a later one).
    pub(crate) fn announce_all(&self, generation: u64, payload: &Arc<RawValue>) {
        for c in self.conns.iter() {
            c.outbox.generation(generation, payload.clone());
        }
    }
}

impl EventTransport for ConnectionTable {
    fn send_to(&self, conn: ConnId, event: &OutboundEvent) -> bool {
        match self.conns.get(&conn.0) {
            Some(c) => c.outbox.event(event.name.clone(), event.payload.clone()),
            None => false,
        }
    }

    fn broadcast(&self, required_scope: &str, event: &OutboundEvent) -> usize {
        self.conns
            .iter()
            .filter(|c| c.info.role == Role::Operator && c.info.scopes.allows(required_scope))
            .filter(|c| c.outbox.event(event.name.clone(), event.payload.clone()))
            .count()
    }

    fn broadcast_except(
        &self,
        required_scope: &str,
        except: &[ConnId],
        event: &OutboundEvent,
    ) -> usize {
        self.conns
            .iter()
            .filter(|c| c.info.role == Role::Operator && c.info.scopes.allows(required_scope))
            .filter(|c| !except.contains(&c.info.conn_id))
            .filter(|c| c.outbox.event(event.name.clone(), event.payload.clone()))
            .count()
    }

    fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn is_connected(&self, conn: ConnId) -> bool {
        self.conns.contains_key(&conn.0)
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::OutboxReceiver;
    use crate::connection::test_raw as raw;
    use plugin_api::{ClientInfo, Scopes};

    fn conn(table: &ConnectionTable, id: u64, role: Role, scopes: &[&str]) -> OutboxReceiver {
        let (outbox, rx) = Outbox::new(1 << 20);
        let info = Arc::new(ConnectionInfo {
            conn_id: ConnId(id),
            role,
            scopes: Scopes::new(scopes.iter().copied()),
            client: ClientInfo::default(),
        });
        table.insert(info, outbox);
        rx
    }

    fn event() -> OutboundEvent {
        OutboundEvent {
            name: "plugin.demo.ping".into(),
            payload: raw("{}"),
        }
    }

    #[test]
    fn broadcast_reaches_operators_holding_the_scope_and_send_to_one() {
        let table = ConnectionTable::default();
        let mut admin = conn(&table, 1, Role::Operator, &["operator.admin"]);
        let mut read = conn(&table, 2, Role::Operator, &["operator.read"]);
        let mut node = conn(&table, 3, Role::Node, &["operator.admin"]);
        assert_eq!(table.broadcast("operator.write", &event()), 1);
        assert!(admin.try_recv().is_some());
        assert!(read.try_recv().is_none());
        assert!(node.try_recv().is_none());
        assert_eq!(
            table.broadcast_except("operator.write", &[ConnId(1)], &event()),
            0
        );
        assert_eq!(
            table.broadcast_except("operator.read", &[ConnId(1)], &event()),
            1
        );
        assert!(read.try_recv().is_some() && admin.try_recv().is_none());
        assert!(table.send_to(ConnId(3), &event()));
        assert!(node.try_recv().is_some());
        assert!(!table.send_to(ConnId(9), &event()));
        assert_eq!(table.connection_count(), 3);
        table.remove(ConnId(1));
        assert_eq!(table.connection_count(), 2);
    }
}
