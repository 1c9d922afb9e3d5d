//! Events from plugins to connections, without touching sockets.

use crate::{ConnId, ConnectionInfo, Retired, ScopeLife};
use once_cell::sync::OnceCell;
use serde::Serialize;
use serde_json::value::RawValue;
use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Chooses receivers of [`EventSink::broadcast_where`]: given a
/// connection's info and how long it has been open (since it joined the
/// host's connection table), whether it receives the event. A host calls it
/// holding none of its locks (see [`EventTransport::broadcast_where`]).
pub type ReceiverFilter<'a> = &'a dyn Fn(&ConnectionInfo, Duration) -> bool;

/// One event, serialized once, ready to be framed per connection (the host
/// adds `seq`).
#[derive(Debug, Clone)]
pub struct OutboundEvent {
    /// Event name, e.g. `plugin.bncr.push`.
    pub name: Arc<str>,
    /// Payload JSON.
    pub payload: Arc<RawValue>,
    /// The generation whose plugin emitted it, stamped by the sink (0: a
    /// scope that never serves, such as a validation build). A host tells
    /// a connection about this generation before the event, as it does
    /// before a response of it, and delivers nothing of a generation that
    /// is not serving yet.
    pub generation: u64,
}

/// Delivers events to connections. Implemented by the host (ws-proxy); it
/// lives for the process, not for a generation.
pub trait EventTransport: Send + Sync + 'static {
    /// Queue `event` for one connection. `false` when the connection is gone
    /// or its queue refused the event.
    fn send_to(&self, conn: ConnId, event: &OutboundEvent) -> bool;

    /// Queue `event` for every operator connection holding `required_scope`.
    /// Returns how many connections it was queued for.
    fn broadcast(&self, required_scope: &str, event: &OutboundEvent) -> usize;

    /// [`EventTransport::broadcast`], leaving out the connections in
    /// `except`. Returns how many connections it was queued for. The default
    /// is [`EventTransport::broadcast_where`] with a filter leaving `except`
    /// out (so a transport that cannot ask a filter sends to none, and a
    /// count it returns is never an overstatement), or plain `broadcast`
    /// when `except` is empty.
    fn broadcast_except(
        &self,
        required_scope: &str,
        except: &[ConnId],
        event: &OutboundEvent,
    ) -> usize {
        if except.is_empty() {
            return self.broadcast(required_scope, event);
        }
        let filter = |info: &ConnectionInfo, _: Duration| !except.contains(&info.conn_id);
        self.broadcast_where(required_scope, &filter, event)
    }

    /// [`EventTransport::broadcast`] to the operators holding
    /// `required_scope` for which `filter` answers `true`, asked with each
    /// connection's info and how long it has been open: measured by the
    /// host from the moment the connection joined its table, so it does not
    /// depend on when (or whether) a plugin's connection-opened hook ran.
    /// Returns how many connections it was queued for. The default cannot
    /// ask: it sends to none, so a count it returns is never an
    /// overstatement.
    ///
    /// A host calls `filter` holding none of its own locks: it takes a
    /// snapshot of the entitled connections, releases the table, then asks.
    /// So a filter may call back into the host (`is_connected`, another
    /// event) and a slow one holds up no connection opening or closing. It
    /// runs on the emitting task, once per entitled connection: keep it
    /// cheap and never block in it.
    fn broadcast_where(
        &self,
        required_scope: &str,
        filter: ReceiverFilter<'_>,
        event: &OutboundEvent,
    ) -> usize {
        let _ = (required_scope, filter, event);
        0
    }

    /// How many client connections are open (for `status`).
    fn connection_count(&self) -> usize {
        0
    }

    /// Whether `conn` is an open, authenticated connection. Plugins restoring
    /// durable state (which may name connections of a crashed process) ask
    /// this instead of guessing.
    fn is_connected(&self, conn: ConnId) -> bool {
        let _ = conn;
        false
    }
}

/// A transport that delivers nowhere; for tests and headless embedding.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullTransport;

impl EventTransport for NullTransport {
    fn send_to(&self, _conn: ConnId, _event: &OutboundEvent) -> bool {
        false
    }
    fn broadcast(&self, _required_scope: &str, _event: &OutboundEvent) -> usize {
        0
    }
}

/// Why an event was not sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventError {
    /// The sink's generation has retired.
    Retired(Retired),
    /// The plugin did not declare this event in `register`, so it is not
    /// advertised and may not be emitted.
    Undeclared(String),
    /// The payload could not be serialized.
    Payload(String),
}

impl fmt::Display for EventError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventError::Retired(r) => write!(f, "event sink refused: {r}"),
            EventError::Undeclared(n) => write!(f, "event `{n}` was not declared"),
            EventError::Payload(e) => write!(f, "event payload: {e}"),
        }
    }
}

impl std::error::Error for EventError {}

/// A plugin's outlet for events, bound to its generation: it refuses once the
/// generation retires and only emits events the plugin declared.
#[derive(Clone)]
pub struct EventSink {
    plugin_id: Arc<str>,
    life: ScopeLife,
    transport: Arc<dyn EventTransport>,
    declared: Arc<OnceCell<HashSet<String>>>,
}

impl fmt::Debug for EventSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventSink")
            .field("plugin_id", &self.plugin_id)
            .field("generation", &self.life.generation())
            .finish()
    }
}

/// Event names the host itself emits; no plugin may declare or emit them,
/// so a client can trust that they come from the gateway.
pub const RESERVED_EVENTS: &[&str] = &[
    "connect.challenge",
    "tick",
    "shutdown",
    "gateway.generation",
];

/// Whether `name` is reserved for the host ([`RESERVED_EVENTS`]).
pub fn is_reserved_event(name: &str) -> bool {
    RESERVED_EVENTS.contains(&name)
}

/// The host's side of an [`EventSink`]: the one thing that can fix which
/// events the sink may emit. Only whoever created the sink holds it (see
/// [`crate::host::event_sink`]); the plugin gets the sink alone, so it cannot
/// widen its own event set, before or after `register`.
pub struct EventDeclarer {
    declared: Arc<OnceCell<HashSet<String>>>,
}

impl fmt::Debug for EventDeclarer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventDeclarer")
            .field("declared", &self.declared.get().map(HashSet::len))
            .finish()
    }
}

impl EventDeclarer {
    /// Fix the sink's events to what the plugin declared in `register`.
    /// Reserved names are dropped. Only the first call has an effect.
    pub fn declare(&self, events: impl IntoIterator<Item = String>) {
        let _ = self.declared.set(
            events
                .into_iter()
                .filter(|e| !is_reserved_event(e))
                .collect(),
        );
    }
}

impl EventSink {
    /// A sink and its declarer; see [`crate::host::event_sink`].
    pub(crate) fn with_declarer(
        plugin_id: &str,
        life: ScopeLife,
        transport: Arc<dyn EventTransport>,
    ) -> (Self, EventDeclarer) {
        let declared = Arc::new(OnceCell::new());
        (
            EventSink {
                plugin_id: plugin_id.into(),
                life,
                transport,
                declared: declared.clone(),
            },
            EventDeclarer { declared },
        )
    }

    fn prepare(&self, event: &str, payload: &impl Serialize) -> Result<OutboundEvent, EventError> {
        self.life.check().map_err(EventError::Retired)?;
        let declared = self.declared.get().is_some_and(|d| d.contains(event));
        if !declared || is_reserved_event(event) {
            return Err(EventError::Undeclared(event.to_string()));
        }
        let payload = serde_json::value::to_raw_value(payload)
            .map_err(|e| EventError::Payload(e.to_string()))?;
        Ok(OutboundEvent {
            name: event.into(),
            payload: payload.into(),
            generation: self.life.generation(),
        })
    }

    /// Send `event` to each of `conns`; returns how many accepted it.
    pub fn send(
        &self,
        conns: &[ConnId],
        event: &str,
        payload: &impl Serialize,
    ) -> Result<usize, EventError> {
        let ev = self.prepare(event, payload)?;
        Ok(conns
            .iter()
            .filter(|c| self.transport.send_to(**c, &ev))
            .count())
    }

    /// Send `event` to every operator holding `required_scope`; returns how
    /// many connections it was queued for.
    pub fn broadcast(
        &self,
        required_scope: &str,
        event: &str,
        payload: &impl Serialize,
    ) -> Result<usize, EventError> {
        let ev = self.prepare(event, payload)?;
        Ok(self.transport.broadcast(required_scope, &ev))
    }

    /// [`EventSink::broadcast`] to every operator holding `required_scope`
    /// except the connections in `except`; returns how many connections it
    /// was queued for.
    pub fn broadcast_except(
        &self,
        required_scope: &str,
        except: &[ConnId],
        event: &str,
        payload: &impl Serialize,
    ) -> Result<usize, EventError> {
        let ev = self.prepare(event, payload)?;
        Ok(self.transport.broadcast_except(required_scope, except, &ev))
    }

    /// [`EventSink::broadcast`] to every operator holding `required_scope`
    /// for which `filter(info, open_for)` is true, `open_for` being how long
    /// the connection has been open (see
    /// [`EventTransport::broadcast_where`]); returns how many connections it
    /// was queued for. For example, to leave out connections younger than a
    /// grace period, whenever the plugin heard of them:
    /// `sink.broadcast_where(scope::WRITE, |_, open| open >= grace, ..)`.
    /// The host asks `filter` holding none of its locks, so it may call
    /// back into this sink; it should be cheap.
    pub fn broadcast_where(
        &self,
        required_scope: &str,
        filter: impl Fn(&ConnectionInfo, Duration) -> bool,
        event: &str,
        payload: &impl Serialize,
    ) -> Result<usize, EventError> {
        let ev = self.prepare(event, payload)?;
        Ok(self.transport.broadcast_where(required_scope, &filter, &ev))
    }

    /// Whether `conn` is open now (see [`EventTransport::is_connected`]).
    pub fn is_connected(&self, conn: ConnId) -> bool {
        self.transport.is_connected(conn)
    }

    /// The plugin this sink belongs to.
    pub fn plugin_id(&self) -> &str {
        &self.plugin_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, String, String, u64)>>);
    impl EventTransport for Recorder {
        fn send_to(&self, conn: ConnId, ev: &OutboundEvent) -> bool {
            self.0.lock().unwrap().push((
                conn.0,
                ev.name.to_string(),
                ev.payload.get().to_string(),
                ev.generation,
            ));
            true
        }
        fn broadcast(&self, _s: &str, ev: &OutboundEvent) -> usize {
            self.send_to(ConnId(0), ev);
            1
        }
    }

    #[test]
    fn sink_sends_declared_events_stamped_with_its_generation_and_refuses_after_retire() {
        let (life, ctl) = ScopeLife::new(2);
        let rec = Arc::new(Recorder::default());
        let (sink, declarer) = crate::host::event_sink("demo", life, rec.clone());
        declarer.declare(["plugin.demo.ping".to_string()]);
        assert_eq!(
            sink.send(
                &[ConnId(5), ConnId(6)],
                "plugin.demo.ping",
                &serde_json::json!({"n":1})
            )
            .unwrap(),
            2
        );
        assert_eq!(
            sink.send(&[ConnId(5)], "plugin.demo.other", &1),
            Err(EventError::Undeclared("plugin.demo.other".into()))
        );
        ctl.retire();
        assert!(matches!(
            sink.broadcast("operator.read", "plugin.demo.ping", &1),
            Err(EventError::Retired(_))
        ));
        let got = rec.0.lock().unwrap().clone();
        assert_eq!(got.len(), 2);
        // Stamped with the sink's generation, for the host's ordering.
        assert_eq!(
            got[0],
            (5, "plugin.demo.ping".into(), r#"{"n":1}"#.into(), 2)
        );
    }

    #[test]
    fn default_broadcast_except_never_overstates() {
        let (life, _ctl) = ScopeLife::new(1);
        let rec = Arc::new(Recorder::default());
        let (sink, declarer) = crate::host::event_sink("demo", life, rec.clone());
        declarer.declare(["plugin.demo.ping".to_string()]);
        let b = |except: &[ConnId]| {
            sink.broadcast_except("operator.write", except, "plugin.demo.ping", &1)
                .unwrap()
        };
        assert_eq!(b(&[]), 1);
        // A transport that cannot exclude sends to nobody and says so.
        assert_eq!(b(&[ConnId(3)]), 0);
        assert_eq!(rec.0.lock().unwrap().len(), 1);
    }

    /// Three operator connections; asks filters, and implements nothing
    /// else but `broadcast` (through its filter).
    #[derive(Default)]
    struct Filtering(Mutex<Vec<u64>>);
    impl EventTransport for Filtering {
        fn send_to(&self, _conn: ConnId, _ev: &OutboundEvent) -> bool {
            false
        }
        fn broadcast(&self, s: &str, ev: &OutboundEvent) -> usize {
            self.broadcast_where(s, &|_, _| true, ev)
        }
        fn broadcast_where(
            &self,
            _s: &str,
            filter: ReceiverFilter<'_>,
            _ev: &OutboundEvent,
        ) -> usize {
            let mut reached = self.0.lock().unwrap();
            let mut n = 0;
            for id in [1, 2, 3] {
                let info = ConnectionInfo {
                    conn_id: ConnId(id),
                    role: crate::Role::Operator,
                    scopes: crate::Scopes::new([crate::scope::WRITE]),
                    client: crate::ClientInfo::default(),
                };
                if filter(&info, Duration::ZERO) {
                    reached.push(id);
                    n += 1;
                }
            }
            n
        }
    }

    #[test]
    fn default_broadcast_except_asks_broadcast_where_when_the_transport_can() {
        let (life, _ctl) = ScopeLife::new(1);
        let t = Arc::new(Filtering::default());
        let (sink, declarer) = crate::host::event_sink("demo", life, t.clone());
        declarer.declare(["plugin.demo.ping".to_string()]);
        let b = |except: &[ConnId]| {
            let n = sink
                .broadcast_except("operator.write", except, "plugin.demo.ping", &1)
                .unwrap();
            (n, std::mem::take(&mut *t.0.lock().unwrap()))
        };
        assert_eq!(b(&[]), (3, vec![1, 2, 3]));
        assert_eq!(b(&[ConnId(2)]), (2, vec![1, 3]));
        assert_eq!(b(&[ConnId(4)]), (3, vec![1, 2, 3]));
        assert_eq!(b(&[ConnId(1), ConnId(2), ConnId(3)]), (0, vec![]));
    }

    #[test]
    fn default_broadcast_where_sends_to_none_and_says_so() {
        let (life, _ctl) = ScopeLife::new(1);
        let rec = Arc::new(Recorder::default());
        let (sink, declarer) = crate::host::event_sink("demo", life, rec.clone());
        declarer.declare(["plugin.demo.ping".to_string()]);
        // Even a filter that takes everyone: a transport that cannot ask
        // it reaches nobody, and the count says so.
        let n = sink
            .broadcast_where("operator.write", |_, _| true, "plugin.demo.ping", &1)
            .unwrap();
        assert_eq!(n, 0);
        assert!(rec.0.lock().unwrap().is_empty());
        // An undeclared event is refused as by every other route.
        assert_eq!(
            sink.broadcast_where("operator.write", |_, _| true, "plugin.demo.other", &1),
            Err(EventError::Undeclared("plugin.demo.other".into()))
        );
    }
}

#[cfg(test)]
mod sealing {
    use super::*;

    #[test]
    fn only_the_declarer_fixes_events_and_reserved_names_never_go_out() {
        let (life, _ctl) = ScopeLife::new(1);
        let (sink, declarer) = crate::host::event_sink("p", life, Arc::new(NullTransport));
        // What the plugin holds (its sink, clones of it) has no way to
        // declare; until the host declares, nothing can be emitted.
        let plugin_copy = sink.clone();
        assert!(matches!(
            plugin_copy.broadcast("operator.read", "plugin.p.x", &1),
            Err(EventError::Undeclared(_))
        ));
        declarer.declare([
            "plugin.p.x".to_string(),
            "shutdown".to_string(),
            "tick".to_string(),
        ]);
        // A second declaration (the host's own, later) changes nothing.
        declarer.declare(["plugin.p.y".to_string()]);
        assert_eq!(
            plugin_copy.broadcast("operator.read", "plugin.p.x", &1),
            Ok(0)
        );
        assert!(
            plugin_copy
                .broadcast("operator.read", "plugin.p.y", &1)
                .is_err()
        );
        for reserved in RESERVED_EVENTS {
            assert_eq!(
                plugin_copy.send(&[ConnId(1)], reserved, &1),
                Err(EventError::Undeclared(reserved.to_string())),
                "{reserved}"
            );
        }
    }
}
