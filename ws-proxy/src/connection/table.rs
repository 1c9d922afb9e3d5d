//! The table of authenticated connections: presence for the operator
//! tools, host broadcasts, and the plugins' [`EventTransport`].

use super::Outbox;
use dashmap::DashMap;
use plugin_api::host::{EventTransport, OutboundEvent, ReceiverFilter};
use plugin_api::{ConnId, ConnectionInfo, Role};
use serde_json::value::RawValue;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tracing::debug;

/// An authenticated connection as the table sees it.
#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) info: Arc<ConnectionInfo>,
    pub(crate) outbox: Arc<Outbox>,
    /// When it joined the table (unix ms).
    pub(crate) connected_at_ms: u64,
    /// When it joined the table, on the monotonic clock: how long it has
    /// been open, for [`EventTransport::broadcast_where`].
    joined: tokio::time::Instant,
}

/// A connection as `system-presence` shows it.
#[derive(Debug, Clone)]
pub(crate) struct Presence {
    pub(crate) info: Arc<ConnectionInfo>,
    pub(crate) connected_at_ms: u64,
    pub(crate) last_activity_ms: u64,
}

/// Reads the generation serving now.
type ServingGeneration = Box<dyn Fn() -> u64 + Send + Sync>;

/// Every authenticated connection, by id. Lives for the process; it is the
/// [`EventTransport`] the gateway's plugins reach clients through.
///
/// A plugin's event is queued only once its generation serves: one emitted
/// before the swap (from a constructor, a task spawned there, a plugin
/// process between its handshake and the swap, a build that fails or a
/// validation) reaches no connection, and the sink counts it delivered to
/// none. Each connection's writer then tells the connection about the
/// event's generation before the event, as before a response.
#[derive(Default)]
pub struct ConnectionTable {
    conns: DashMap<u64, Connection>,
    /// Set once by the server; until then every generation but 0 counts as
    /// serving (and there is no connection yet).
    serving: OnceLock<ServingGeneration>,
}

impl std::fmt::Debug for ConnectionTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionTable")
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl ConnectionTable {
    /// Read the generation serving now from `serving` (the gateway's
    /// current scope, read exactly, not a copy that could lag the swap).
    pub(crate) fn follow_generations(&self, serving: impl Fn() -> u64 + Send + Sync + 'static) {
        let _ = self.serving.set(Box::new(serving));
    }

    /// Whether `event` may be queued now: its generation serves, or served
    /// and is still handing over. Generation 0 never serves.
    fn deliverable(&self, event: &OutboundEvent) -> bool {
        let serving = self.serving.get().map_or(u64::MAX, |now| now());
        if event.generation == 0 || event.generation > serving {
            debug!(
                event = %event.name,
                generation = event.generation,
                serving,
                "event of a generation that is not serving not delivered"
            );
            return false;
        }
        true
    }

    pub(crate) fn insert(&self, info: Arc<ConnectionInfo>, outbox: Arc<Outbox>) {
        let connected_at_ms = crate::server::unix_ms();
        outbox.mark_activity(connected_at_ms);
        self.conns.insert(
            info.conn_id.0,
            Connection {
                info,
                outbox,
                connected_at_ms,
                joined: tokio::time::Instant::now(),
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
        if !self.deliverable(event) {
            return false;
        }
        match self.conns.get(&conn.0) {
            Some(c) => c.outbox.plugin_event(event),
            None => false,
        }
    }

    fn broadcast(&self, required_scope: &str, event: &OutboundEvent) -> usize {
        if !self.deliverable(event) {
            return 0;
        }
        self.conns
            .iter()
            .filter(|c| c.info.role == Role::Operator && c.info.scopes.allows(required_scope))
            .filter(|c| c.outbox.plugin_event(event))
            .count()
    }

    fn broadcast_except(
        &self,
        required_scope: &str,
        except: &[ConnId],
        event: &OutboundEvent,
    ) -> usize {
        if !self.deliverable(event) {
            return 0;
        }
        self.conns
            .iter()
            .filter(|c| c.info.role == Role::Operator && c.info.scopes.allows(required_scope))
            .filter(|c| !except.contains(&c.info.conn_id))
            .filter(|c| c.outbox.plugin_event(event))
            .count()
    }

    fn broadcast_where(
        &self,
        required_scope: &str,
        filter: ReceiverFilter<'_>,
        event: &OutboundEvent,
    ) -> usize {
        if !self.deliverable(event) {
            return 0;
        }
        // The filter is asked on a snapshot, with no shard of the table
        // locked: it may call back into the table, and a slow one holds up
        // no connection joining or leaving. One that left meanwhile is not
        // queued the event.
        let now = tokio::time::Instant::now();
        let entitled: Vec<(Arc<ConnectionInfo>, Duration, Arc<Outbox>)> = self
            .conns
            .iter()
            .filter(|c| c.info.role == Role::Operator && c.info.scopes.allows(required_scope))
            .map(|c| {
                let open = now.saturating_duration_since(c.joined);
                (c.info.clone(), open, c.outbox.clone())
            })
            .collect();
        entitled
            .into_iter()
            .filter(|(info, open, _)| filter(info, *open))
            .filter(|(info, _, outbox)| {
                self.conns.contains_key(&info.conn_id.0) && outbox.plugin_event(event)
            })
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
    use crate::connection::outbox::Outgoing;
    use crate::connection::test_raw as raw;
    use plugin_api::{ClientInfo, Scopes};
    use std::sync::atomic::{AtomicU64, Ordering};

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
        event_of(1)
    }

    fn event_of(generation: u64) -> OutboundEvent {
        OutboundEvent {
            name: "plugin.demo.ping".into(),
            payload: raw("{}"),
            generation,
        }
    }

    /// The generation of the event queued next, if one is.
    fn queued_generation(rx: &mut OutboxReceiver) -> Option<u64> {
        match rx.try_recv()? {
            Outgoing::Event(_, _, generation) => Some(generation),
            other => panic!("not an event: {other:?}"),
        }
    }

    #[test]
    fn events_are_queued_with_their_generation_once_it_serves() {
        let table = ConnectionTable::default();
        let serving = Arc::new(AtomicU64::new(1));
        let now = serving.clone();
        table.follow_generations(move || now.load(Ordering::SeqCst));
        let mut rx = conn(&table, 1, Role::Operator, &["operator.admin"]);
        // Generation 2 is being built: its events reach no connection, by
        // any route, and the sink is told so.
        let early = event_of(2);
        assert!(!table.send_to(ConnId(1), &early));
        assert_eq!(table.broadcast("operator.read", &early), 0);
        assert_eq!(table.broadcast_except("operator.read", &[], &early), 0);
        // A validation build's sink (generation 0) never serves.
        assert_eq!(table.broadcast("operator.read", &event_of(0)), 0);
        assert_eq!(queued_generation(&mut rx), None);
        // The swap: 2 serves, 1 still hands over; both are delivered, each
        // with the generation that emitted it.
        serving.store(2, Ordering::SeqCst);
        assert!(table.send_to(ConnId(1), &event_of(2)));
        assert_eq!(table.broadcast("operator.read", &event_of(1)), 1);
        assert_eq!(
            table.broadcast_except("operator.read", &[ConnId(9)], &event_of(2)),
            1
        );
        assert_eq!(queued_generation(&mut rx), Some(2));
        assert_eq!(queued_generation(&mut rx), Some(1));
        assert_eq!(queued_generation(&mut rx), Some(2));
        assert_eq!(queued_generation(&mut rx), None);
    }

    /// The filter is asked with no part of the table locked: it can ask
    /// the table itself, and a connection leaving while a filter runs (on
    /// another thread) is not held up by it. Before, the iteration held the
    /// asked connection's shard: the leave waited for the whole broadcast.
    #[test]
    fn broadcast_where_asks_its_filter_with_the_table_unlocked() {
        let table = Arc::new(ConnectionTable::default());
        let mut rxs: Vec<_> = (1..=4)
            .map(|id| conn(&table, id, Role::Operator, &["operator.write"]))
            .collect();
        let left_meanwhile = std::sync::Mutex::new(None);
        let filter = |info: &ConnectionInfo, _| {
            assert!(table.is_connected(info.conn_id), "re-entry into the table");
            if info.conn_id == ConnId(3) {
                let (done, finished) = std::sync::mpsc::channel();
                let t = table.clone();
                std::thread::spawn(move || {
                    t.remove(ConnId(3));
                    let _ = done.send(());
                });
                let left = finished.recv_timeout(Duration::from_secs(10)).is_ok();
                *left_meanwhile.lock().unwrap() = Some(left);
            }
            info.conn_id != ConnId(2)
        };
        // 1 and 4: 2 was filtered out, 3 left while the filter ran.
        assert_eq!(
            table.broadcast_where("operator.write", &filter, &event()),
            2
        );
        assert_eq!(*left_meanwhile.lock().unwrap(), Some(true));
        assert_eq!(table.len(), 3);
        let queued: Vec<bool> = rxs.iter_mut().map(|rx| rx.try_recv().is_some()).collect();
        assert_eq!(queued, [true, false, false, true]);
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

    /// Paused time: each connection's age is exactly what the test
    /// advanced, so the limit is hit to the millisecond.
    #[tokio::test(start_paused = true)]
    async fn broadcast_where_sees_how_long_each_connection_has_been_open() {
        let grace = Duration::from_millis(1000);
        let ms = Duration::from_millis(1);
        let table = ConnectionTable::default();
        // Joined at 0, 1 and 2 ms: at 1001 ms they are open for grace+1ms,
        // grace and grace-1ms.
        let mut older = conn(&table, 1, Role::Operator, &["operator.write"]);
        tokio::time::advance(ms).await;
        let mut exact = conn(&table, 2, Role::Operator, &["operator.write"]);
        tokio::time::advance(ms).await;
        let mut younger = conn(&table, 3, Role::Operator, &["operator.write"]);
        // Not entitled, however old: a reader, a node.
        let mut read = conn(&table, 4, Role::Operator, &["operator.read"]);
        let mut node = conn(&table, 5, Role::Node, &["operator.write"]);
        tokio::time::advance(grace - ms).await;
        let seen = std::sync::Mutex::new(Vec::new());
        let filter = |info: &ConnectionInfo, open: Duration| {
            seen.lock().unwrap().push((info.conn_id.0, open));
            open >= grace
        };
        assert_eq!(
            table.broadcast_where("operator.write", &filter, &event()),
            2
        );
        let mut asked = seen.lock().unwrap().clone();
        asked.sort();
        assert_eq!(
            asked,
            [(1, grace + ms), (2, grace), (3, grace - ms)],
            "asked about the entitled connections only, with their ages"
        );
        assert!(older.try_recv().is_some() && exact.try_recv().is_some());
        assert!(younger.try_recv().is_none());
        assert!(read.try_recv().is_none() && node.try_recv().is_none());
        // One millisecond later the youngest is past its grace too (5N:
        // every connection of a bigger table is asked).
        tokio::time::advance(ms).await;
        assert_eq!(
            table.broadcast_where("operator.write", &filter, &event()),
            3
        );
        for id in 10..30 {
            let _rx = conn(&table, id, Role::Operator, &["operator.write"]);
        }
        seen.lock().unwrap().clear();
        assert_eq!(
            table.broadcast_where("operator.write", &filter, &event()),
            3
        );
        assert_eq!(seen.lock().unwrap().len(), 23);
        // An event of a generation that is not serving reaches nobody and
        // asks nothing.
        let table = ConnectionTable::default();
        table.follow_generations(|| 1);
        let _rx = conn(&table, 1, Role::Operator, &["operator.write"]);
        seen.lock().unwrap().clear();
        assert_eq!(
            table.broadcast_where("operator.write", &filter, &event_of(2)),
            0
        );
        assert!(seen.lock().unwrap().is_empty());
    }
}
