//! A test host for plugin authors: runs plugins through the real gateway
//! (registry, admission, scope checks, services, events, restarts) with
//! in-memory connections instead of sockets.
//!
//! What a test can do with it, each exactly as the real host does it:
//! - open connections with any role, scopes and client identity
//!   ([`TestHost::connect`]) and close them ([`TestClient::disconnect`]);
//!   plugins' connection hooks run;
//! - call methods ([`TestClient::call`]) and the core `send`
//!   ([`TestClient::send`]) through admission and the scope check;
//! - read what each connection received, or every delivery in order
//!   ([`TestHost::events_named`]), and wait for deliveries without polling
//!   ([`TestHost::wait_until`]); an event is delivered only once its
//!   generation serves (see [`TestTransport`]). What is recorded is the
//!   plugins' events; the host's own `gateway.generation` notices are not;
//! - read `health` and a plugin's degraded reason ([`TestHost::health`],
//!   [`TestHost::degraded`]);
//! - restart in-process ([`TestHost::restart`]), stop
//!   ([`TestHost::shutdown`]), or crash ([`TestHost::crash`]: no drain, no
//!   service stop, connections gone) and start a new host on the same state
//!   directory, as a process killed with SIGKILL and started again.
//!
//! ```
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use gateway_core::testing::TestHost;
//! use plugin_api::{Plugin, PluginContext, PluginFactory, Registrar, scope};
//! use std::sync::Arc;
//!
//! struct Hello;
//! impl Plugin for Hello {
//!     fn id(&self) -> &str { "hello" }
//!     fn version(&self) -> &str { "1.0.0" }
//!     fn register(&self, r: &mut Registrar) {
//!         r.method("hello.say").scope(scope::READ).sync(|_, _| Ok(serde_json::json!("hi")));
//!     }
//! }
//!
//! let dir = std::env::temp_dir().join("hello-plugin-test");
//! let hello = || PluginFactory::new("hello", "1.0.0", |_: PluginContext| Ok(Arc::new(Hello)));
//! let host = TestHost::builder(&dir).plugin(hello()).start().await?;
//! let reader = host.connect_operator(&[scope::READ]);
//! assert_eq!(reader.call("hello.say", serde_json::json!({})).await?, "hi");
//! // The real scope check: a client holding no scope is refused.
//! let nobody = host.connect_operator(&[]);
//! assert!(nobody.call("hello.say", serde_json::json!({})).await.is_err());
//! host.restart().await?; // a new generation: a new plugin instance
//! host.crash(); // as SIGKILL: nothing stops, the connections are gone
//! let host = TestHost::builder(&dir).plugin(hello()).start().await?; // a new process
//! host.shutdown().await;
//! # Ok(()) }
//! # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
//! ```

use crate::config::{GatewayConfig, StaticConfig};
use crate::gateway::{Gateway, GatewayOptions};
use crate::loader::{BuildError, Catalog};
use crate::report::RestartOutcome;
use crate::scope::ShutdownReport;
use plugin_api::host::{EventTransport, OutboundEvent, ReceiverFilter};
use plugin_api::{
    ClientInfo, ConnId, ConnectionInfo, MethodResult, Params, PluginFactory, Role, RpcError,
    Scopes, Value,
};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::Notify;

/// Connection ids, unique across every host of the test process: the real
/// server never hands out an id again after a crash either, so a plugin that
/// persisted a connection id cannot mistake a new connection for an old one.
static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// One event as a test connection received it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedEvent {
    /// The event name, e.g. `plugin.bncr.push`.
    pub name: String,
    /// Its payload.
    pub payload: Value,
}

/// An open test connection as the transport sees it.
struct Open {
    info: Arc<ConnectionInfo>,
    /// When it joined the table.
    joined: tokio::time::Instant,
    /// How much earlier than `joined` it counts as opened
    /// ([`TestClient::backdate`]).
    backdated: Duration,
}

impl Open {
    fn open_for(&self, now: tokio::time::Instant) -> Duration {
        now.saturating_duration_since(self.joined) + self.backdated
    }
}

#[derive(Default)]
struct Table {
    /// The open connections, by id.
    open: BTreeMap<u64, Open>,
    /// Every delivery to any connection, in delivery order.
    log: Vec<(ConnId, ReceivedEvent)>,
}

/// Reads the generation serving now.
type ServingGeneration = Box<dyn Fn() -> u64 + Send + Sync>;

/// In-memory connections: the [`EventTransport`] of a [`TestHost`]. Sends
/// and broadcasts reach exactly the connections that are open and entitled
/// (operators holding the required scope), and report real counts. How long
/// a connection has been open ([`EventTransport::broadcast_where`]) is
/// measured on tokio's clock from when it joined the table, so a test on
/// paused time controls it exactly; [`TestClient::backdate`] adds to it.
///
/// As in the real host, a plugin's event is delivered only once its
/// generation serves (or served and is still handing over): one emitted
/// before the swap (from a constructor, a task spawned there, a build that
/// fails or a validation) reaches no connection and counts as delivered to
/// none. A [`EventTransport::broadcast_where`] filter is asked holding no
/// lock of the transport.
#[derive(Default)]
pub struct TestTransport {
    table: Mutex<Table>,
    arrived: Notify,
    /// Set once the gateway exists; until then every generation but 0
    /// counts as serving (and there is no connection yet).
    serving: OnceLock<ServingGeneration>,
}

impl fmt::Debug for TestTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = lock(&self.table);
        f.debug_struct("TestTransport")
            .field("connections", &t.open.len())
            .field("deliveries", &t.log.len())
            .finish()
    }
}

impl TestTransport {
    /// Whether `event` may be delivered now: its generation serves, or
    /// served and is still handing over. Generation 0 never serves.
    fn deliverable(&self, event: &OutboundEvent) -> bool {
        let serving = self.serving.get().map_or(u64::MAX, |now| now());
        event.generation != 0 && event.generation <= serving
    }

    fn record(log: &mut Vec<(ConnId, ReceivedEvent)>, conn: ConnId, event: &OutboundEvent) {
        let payload = serde_json::from_str(event.payload.get()).unwrap_or(Value::Null);
        log.push((
            conn,
            ReceivedEvent {
                name: event.name.to_string(),
                payload,
            },
        ));
    }

    fn delivered(
        &self,
        filter: impl Fn(ConnId, &ReceivedEvent) -> bool,
    ) -> Vec<(ConnId, ReceivedEvent)> {
        lock(&self.table)
            .log
            .iter()
            .filter(|(c, e)| filter(*c, e))
            .cloned()
            .collect()
    }
}

impl EventTransport for TestTransport {
    fn send_to(&self, conn: ConnId, event: &OutboundEvent) -> bool {
        if !self.deliverable(event) {
            return false;
        }
        let delivered = {
            let mut t = lock(&self.table);
            let open = t.open.contains_key(&conn.0);
            if open {
                Self::record(&mut t.log, conn, event);
            }
            open
        };
        if delivered {
            self.arrived.notify_waiters();
        }
        delivered
    }

    fn broadcast(&self, required_scope: &str, event: &OutboundEvent) -> usize {
        self.broadcast_where(required_scope, &|_, _| true, event)
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
        let now = tokio::time::Instant::now();
        // Asked on a snapshot, with the table unlocked, as the real host
        // does: the filter may call back into the transport.
        let entitled: Vec<(Arc<ConnectionInfo>, Duration)> = lock(&self.table)
            .open
            .values()
            .filter(|o| o.info.role == Role::Operator && o.info.scopes.allows(required_scope))
            .map(|o| (o.info.clone(), o.open_for(now)))
            .collect();
        let chosen: Vec<ConnId> = entitled
            .into_iter()
            .filter(|(info, open)| filter(info, *open))
            .map(|(info, _)| info.conn_id)
            .collect();
        let reached = {
            let t = &mut *lock(&self.table);
            let mut reached = 0;
            // A connection that closed while the filter ran receives nothing.
            for conn in chosen {
                if t.open.contains_key(&conn.0) {
                    Self::record(&mut t.log, conn, event);
                    reached += 1;
                }
            }
            reached
        };
        if reached > 0 {
            self.arrived.notify_waiters();
        }
        reached
    }

    fn connection_count(&self) -> usize {
        lock(&self.table).open.len()
    }

    fn is_connected(&self, conn: ConnId) -> bool {
        lock(&self.table).open.contains_key(&conn.0)
    }
}

/// Builds a [`TestHost`].
#[derive(Debug)]
pub struct TestHostBuilder {
    catalog: Catalog,
    config: GatewayConfig,
    state_dir: PathBuf,
}

impl TestHostBuilder {
    /// Add a compiled-in plugin.
    pub fn plugin(mut self, factory: PluginFactory) -> Self {
        self.catalog = self.catalog.with(factory);
        self
    }

    /// Configure plugin `id` (`[plugins.entries.<id>].config`); validated
    /// against the plugin's schema as in production.
    pub fn plugin_config(mut self, id: &str, config: Value) -> Self {
        set_entry_config(&mut self.config, id, config);
        self
    }

    /// Start from a whole gateway config (plugin dirs, entries, timings).
    pub fn config(mut self, config: GatewayConfig) -> Self {
        self.config = config;
        self
    }

    /// Build generation 1 and start its services.
    pub async fn start(self) -> Result<TestHost, BuildError> {
        let transport = Arc::new(TestTransport::default());
        let config = Arc::new(StaticConfig::new(self.config.clone()));
        let gateway = Gateway::start(GatewayOptions {
            catalog: self.catalog,
            config: config.clone(),
            state_dir: self.state_dir.clone(),
            transport: transport.clone(),
        })
        .await?;
        let shared = Arc::new(Shared {
            transport: transport.clone(),
            gateway: Mutex::new(Some(gateway.clone())),
        });
        // Events are delivered once their generation serves: the transport
        // reads the current scope itself, as the real host's table does;
        // after a crash no generation serves.
        let link = Arc::downgrade(&shared);
        let _ = transport.serving.set(Box::new(move || {
            link.upgrade()
                .and_then(|s| lock(&s.gateway).as_ref().map(|g| g.current().generation()))
                .unwrap_or(0)
        }));
        Ok(TestHost {
            shared,
            gateway,
            config,
            current: Mutex::new(self.config),
            state_dir: self.state_dir,
        })
    }
}

/// What a host and its connections share.
struct Shared {
    transport: Arc<TestTransport>,
    /// `None` once the host crashed: its connections died with it.
    gateway: Mutex<Option<Gateway>>,
}

/// A gateway with in-memory connections, for testing plugins end to end
/// without sockets. See the [module docs](self).
pub struct TestHost {
    shared: Arc<Shared>,
    gateway: Gateway,
    config: Arc<StaticConfig>,
    current: Mutex<GatewayConfig>,
    state_dir: PathBuf,
}

impl fmt::Debug for TestHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestHost")
            .field("gateway", &self.gateway)
            .field("transport", &self.shared.transport)
            .finish()
    }
}

impl TestHost {
    /// A host keeping durable plugin state below `state_dir`.
    pub fn builder(state_dir: impl AsRef<Path>) -> TestHostBuilder {
        TestHostBuilder {
            catalog: Catalog::new(),
            config: GatewayConfig::default(),
            state_dir: state_dir.as_ref().to_path_buf(),
        }
    }

    /// The gateway under test.
    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// The state directory plugins keep durable files below.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Open an operator connection holding `scopes`.
    pub fn connect_operator(&self, scopes: &[&str]) -> TestClient {
        self.connect(Role::Operator, scopes, ClientInfo::default())
    }

    /// Open a connection with any role, scopes and client identity (what the
    /// client said at `connect`). As in the real host, it joins the
    /// connection table, then the plugins' connection-opened hooks run.
    pub fn connect(&self, role: Role, scopes: &[&str], client: ClientInfo) -> TestClient {
        self.begin_connect(role, scopes, client).finish()
    }

    /// The first half of [`TestHost::connect`]: the connection joins the
    /// table (it can receive events and call methods) but the plugins'
    /// connection-opened hooks have not run yet; [`Opening::finish`] runs
    /// them. The real host has the same moment between the two, so a test
    /// can hold a connection in it for as long as it needs.
    pub fn begin_connect(&self, role: Role, scopes: &[&str], client: ClientInfo) -> Opening {
        let conn_id = ConnId(NEXT_CONN.fetch_add(1, Ordering::Relaxed));
        let info = Arc::new(ConnectionInfo {
            conn_id,
            role,
            scopes: Scopes::new(scopes.iter().copied()),
            client,
        });
        lock(&self.shared.transport.table).open.insert(
            conn_id.0,
            Open {
                info: info.clone(),
                joined: tokio::time::Instant::now(),
                backdated: Duration::ZERO,
            },
        );
        Opening {
            client: TestClient {
                shared: self.shared.clone(),
                info,
            },
            gateway: self.gateway.clone(),
        }
    }

    /// Every event delivered to any connection (closed ones included), in
    /// delivery order, with the connection that received it.
    pub fn events(&self) -> Vec<(ConnId, ReceivedEvent)> {
        self.shared.transport.delivered(|_, _| true)
    }

    /// The deliveries of events called `name`, as [`TestHost::events`].
    pub fn events_named(&self, name: &str) -> Vec<(ConnId, ReceivedEvent)> {
        self.shared.transport.delivered(|_, e| e.name == name)
    }

    /// Wait until `cond` holds, checking it now and after every delivery to
    /// any connection; `false` if `timeout` passed first.
    pub async fn wait_until(&self, timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
        wait_until(&self.shared.transport, timeout, &mut cond).await
    }

    /// The core `health` answer, as any client sees it (`ok`, `generation`,
    /// `plugins.loaded`, `plugins.errors`, `plugins.degraded`, ...).
    pub async fn health(&self) -> MethodResult {
        // `health` needs no scope; the caller is the embedding program.
        let ctx = plugin_api::host::internal_context(ConnId(0));
        self.gateway
            .dispatch(ctx, "health", Params::from_value(&Value::Null))
            .await
    }

    /// The reason `health` gives for plugin `id` being degraded (its health
    /// check answered `Some`), or `None` while it is not.
    pub async fn degraded(&self, id: &str) -> Result<Option<String>, RpcError> {
        let health = self.health().await?;
        Ok(health["plugins"]["degraded"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["id"] == id)
            .map(|d| d["reason"].as_str().unwrap_or_default().to_string()))
    }

    /// Change plugin `id`'s config; it takes effect at the next restart.
    pub fn set_plugin_config(&self, id: &str, config: Value) {
        let mut current = lock(&self.current);
        set_entry_config(&mut current, id, config);
        self.config.set(current.clone());
    }

    /// Restart in-process, as SIGUSR1 does: connections stay open.
    pub async fn restart(&self) -> RestartOutcome {
        self.gateway.restart().await
    }

    /// Stop the gateway as SIGTERM does: refuse new requests, drain, stop
    /// services, retire the generation. Connections stay readable; their
    /// calls are refused with `UNAVAILABLE` from here on.
    pub async fn shutdown(&self) -> ShutdownReport {
        self.gateway.shutdown(None).await
    }

    /// Die as a process killed with SIGKILL: no drain, no service is
    /// stopped, no connection-closed hook runs. Every connection is gone
    /// (its calls are refused with `UNAVAILABLE`, what it received stays
    /// readable); the generation is dropped, so its tasks are aborted and
    /// its handles refuse. Durable state stays as it was on disk: start a
    /// new host on [`TestHost::state_dir`] to see what a restarted process
    /// sees. A call still in flight keeps its generation until it returns.
    pub fn crash(self) {
        let gateway = lock(&self.shared.gateway).take();
        lock(&self.shared.transport.table).open.clear();
        drop(gateway);
        drop(self);
    }
}

/// A connection that joined the table and whose connection-opened hooks
/// have not run yet ([`TestHost::begin_connect`]).
pub struct Opening {
    client: TestClient,
    gateway: Gateway,
}

impl fmt::Debug for Opening {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opening")
            .field("conn_id", &self.client.info.conn_id)
            .finish()
    }
}

impl Opening {
    /// The connection, usable already (it receives and may call).
    pub fn client(&self) -> &TestClient {
        &self.client
    }

    /// Run the plugins' connection-opened hooks (of the generation serving
    /// now), as the real host does right after the table insert.
    pub fn finish(self) -> TestClient {
        if self.client.is_connected() {
            self.gateway.connection_opened(&self.client.info);
        }
        self.client
    }
}

/// One in-memory connection of a [`TestHost`]. It may outlive the host's
/// shutdown or crash, and be moved into other tasks.
pub struct TestClient {
    shared: Arc<Shared>,
    info: Arc<ConnectionInfo>,
}

impl fmt::Debug for TestClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestClient")
            .field("conn_id", &self.info.conn_id)
            .field("role", &self.info.role)
            .finish()
    }
}

impl TestClient {
    /// This connection's id.
    pub fn conn_id(&self) -> ConnId {
        self.info.conn_id
    }

    /// What the host knows about this connection.
    pub fn info(&self) -> &ConnectionInfo {
        &self.info
    }

    /// Count this connection as opened `by` earlier than it did: the
    /// transport reports it open that much longer (to every
    /// [`EventTransport::broadcast_where`] filter). Lets a test reach a rule
    /// such as "open for at least the grace period" without waiting for it.
    /// Adds up when called again.
    pub fn backdate(&self, by: Duration) {
        if let Some(open) = lock(&self.shared.transport.table)
            .open
            .get_mut(&self.info.conn_id.0)
        {
            open.backdated += by;
        }
    }

    /// Whether the connection is still open.
    pub fn is_connected(&self) -> bool {
        self.shared.transport.is_connected(self.info.conn_id)
    }

    /// Call `method` as this connection: the current generation admits it,
    /// checks role and scope, and answers, exactly as for a socket client.
    /// After the host crashed: `UNAVAILABLE` (the connection is gone).
    pub async fn call(&self, method: &str, params: Value) -> MethodResult {
        let Some(gateway) = lock(&self.shared.gateway).clone() else {
            return Err(RpcError::unavailable(
                "connection lost: the test host crashed",
            ));
        };
        let ctx = plugin_api::host::request_context(self.info.clone());
        gateway
            .dispatch(ctx, method, Params::from_value(&params))
            .await
    }

    /// The core `send` method as this connection calls it (it needs
    /// `operator.write`): route `message` to `to` through `channel`, keyed
    /// by `idempotency_key`. Answers the channel's message id.
    pub async fn send(
        &self,
        channel: &str,
        to: &str,
        message: Value,
        idempotency_key: &str,
    ) -> Result<String, RpcError> {
        let params = serde_json::json!({
            "channel": channel,
            "to": to,
            "message": message,
            "idempotencyKey": idempotency_key,
        });
        let answer = self.call("send", params).await?;
        answer["messageId"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| {
                RpcError::unavailable(format!("send answered without a messageId: {answer}"))
            })
    }

    /// Every event this connection received so far, in order.
    pub fn events(&self) -> Vec<ReceivedEvent> {
        let me = self.info.conn_id;
        self.shared
            .transport
            .delivered(|c, _| c == me)
            .into_iter()
            .map(|(_, e)| e)
            .collect()
    }

    /// The received events called `name`, in order.
    pub fn events_named(&self, name: &str) -> Vec<ReceivedEvent> {
        self.events()
            .into_iter()
            .filter(|e| e.name == name)
            .collect()
    }

    /// Wait until `count` events called `name` arrived (or `timeout`
    /// passed); returns those received by then.
    pub async fn wait_for_events(
        &self,
        name: &str,
        count: usize,
        timeout: Duration,
    ) -> Vec<ReceivedEvent> {
        let mut enough = || self.events_named(name).len() >= count;
        wait_until(&self.shared.transport, timeout, &mut enough).await;
        self.events_named(name)
    }

    /// Close the connection: it stops receiving, and the gateway tells the
    /// plugins (their connection-closed hooks run).
    pub fn disconnect(self) {
        let was_open = lock(&self.shared.transport.table)
            .open
            .remove(&self.info.conn_id.0)
            .is_some();
        let gateway = lock(&self.shared.gateway).clone();
        if let (true, Some(gateway)) = (was_open, gateway) {
            gateway.connection_closed(self.info.conn_id);
        }
    }
}

async fn wait_until(
    transport: &TestTransport,
    timeout: Duration,
    cond: &mut dyn FnMut() -> bool,
) -> bool {
    let wait = async {
        loop {
            let arrived = transport.arrived.notified();
            tokio::pin!(arrived);
            // Registered before the check, so a delivery in between wakes us.
            arrived.as_mut().enable();
            if cond() {
                return;
            }
            arrived.await;
        }
    };
    tokio::time::timeout(timeout, wait).await.is_ok()
}

fn set_entry_config(config: &mut GatewayConfig, id: &str, value: Value) {
    let entry = config.plugins.entries.entry(id.to_string()).or_default();
    entry.config = Some(value);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::{Plugin, PluginContext, Registrar, scope};
    use serde_json::json;

    /// Counts calls per generation and broadcasts each one.
    struct Counter {
        calls: Arc<AtomicU64>,
        opened: Arc<AtomicU64>,
        events: plugin_api::EventSink,
    }

    impl Plugin for Counter {
        fn id(&self) -> &str {
            "counter"
        }
        fn version(&self) -> &str {
            "1"
        }
        fn register(&self, r: &mut Registrar) {
            r.event("plugin.counter.counted");
            r.method("counter.next").scope(scope::WRITE).sync({
                let events = self.events.clone();
                let calls = self.calls.clone();
                move |_ctx, _params| {
                    let n = calls.fetch_add(1, Ordering::Relaxed) + 1;
                    let reached = events
                        .broadcast(scope::READ, "plugin.counter.counted", &json!({ "n": n }))
                        .unwrap_or(0);
                    Ok(json!({ "n": n, "reached": reached }))
                }
            });
            r.method("counter.others").scope(scope::WRITE).sync({
                let events = self.events.clone();
                move |ctx, _params| {
                    let except = [ctx.conn_id()];
                    let reached = events
                        .broadcast_except(scope::READ, &except, "plugin.counter.counted", &0)
                        .unwrap_or(0);
                    Ok(json!({ "reached": reached }))
                }
            });
            let opened = self.opened.clone();
            r.on_connection_opened(move |_| {
                opened.fetch_add(1, Ordering::Relaxed);
            });
            let opened = self.opened.clone();
            r.method("counter.opened")
                .scope(scope::READ)
                .sync(move |_, _| Ok(json!(opened.load(Ordering::Relaxed))));
        }
    }

    fn counter() -> PluginFactory {
        PluginFactory::new("counter", "1", |ctx: PluginContext| {
            Ok(Arc::new(Counter {
                calls: Arc::new(AtomicU64::new(0)),
                opened: Arc::new(AtomicU64::new(0)),
                events: ctx.events.clone(),
            }))
        })
    }

    #[tokio::test]
    async fn calls_go_through_scopes_events_reach_entitled_connections_and_restarts_renew() {
        let dir = std::env::temp_dir().join(format!("gateway-core-testing-{}", std::process::id()));
        let host = TestHost::builder(&dir)
            .plugin(counter())
            .start()
            .await
            .unwrap();
        let writer = host.connect_operator(&[scope::WRITE]);
        let reader = host.connect_operator(&[scope::READ]);
        let node = host.connect(Role::Node, &[scope::ADMIN], ClientInfo::default());

        let denied = reader.call("counter.next", json!({})).await.unwrap_err();
        assert_eq!(denied.details_code(), Some("MISSING_SCOPE"));

        let first = writer.call("counter.next", json!({})).await.unwrap();
        // Both operators hold operator.read (write implies read); the node does not count.
        assert_eq!(first, json!({"n": 1, "reached": 2}));
        assert_eq!(reader.events_named("plugin.counter.counted").len(), 1);
        assert!(node.events().is_empty());
        // Everyone entitled but the caller; and the plugin heard of all three opens.
        let others = writer.call("counter.others", json!({})).await.unwrap();
        assert_eq!(others, json!({"reached": 1}));
        assert_eq!(reader.events_named("plugin.counter.counted").len(), 2);
        assert_eq!(writer.call("counter.opened", json!({})).await.unwrap(), 3);

        reader.disconnect();
        let second = writer.call("counter.next", json!({})).await.unwrap();
        assert_eq!(second, json!({"n": 2, "reached": 1}));

        host.restart().await.unwrap();
        let fresh = writer.call("counter.next", json!({})).await.unwrap();
        assert_eq!(fresh["n"], 1, "a new generation constructs a new plugin");
        let unknown = writer.call("counter.missing", json!({})).await.unwrap_err();
        assert!(unknown.message.contains("unknown method"), "{unknown:?}");
        let got = writer
            .wait_for_events("plugin.counter.counted", 3, Duration::from_secs(1))
            .await;
        assert_eq!(got.len(), 3, "the caller of counter.others got none");
        host.shutdown().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Counts what the host did to the `probe` plugin, across generations.
    #[derive(Default)]
    struct Probe {
        starts: AtomicU64,
        stops: AtomicU64,
        closed: AtomicU64,
        /// For each connection-opened hook: whether the connection could
        /// already receive events.
        opened_reachable: Mutex<Vec<bool>>,
        /// Background tasks whose future was dropped (ended or aborted).
        tasks_ended: AtomicU64,
        degraded: Mutex<Option<String>>,
        sent: Mutex<Vec<(ConnId, plugin_api::OutboundMessage)>>,
    }

    struct TaskGuard(Arc<Probe>);
    impl Drop for TaskGuard {
        fn drop(&mut self) {
            self.0.tasks_ended.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct ProbeChannel(Arc<Probe>);
    impl plugin_api::Channel for ProbeChannel {
        fn send(
            self: Arc<Self>,
            ctx: plugin_api::RequestContext,
            m: plugin_api::OutboundMessage,
        ) -> futures::future::BoxFuture<'static, Result<plugin_api::SendReceipt, RpcError>>
        {
            Box::pin(async move {
                let message_id = format!("m-{}", m.idempotency_key);
                lock(&self.0.sent).push((ctx.conn_id(), m));
                Ok(plugin_api::SendReceipt { message_id })
            })
        }
    }

    struct ProbePlugin {
        probe: Arc<Probe>,
        life: plugin_api::ScopeLife,
        events: plugin_api::EventSink,
    }

    impl Plugin for ProbePlugin {
        fn id(&self) -> &str {
            "probe"
        }
        fn version(&self) -> &str {
            "1"
        }
        fn register(&self, r: &mut Registrar) {
            let (probe, life) = (self.probe.clone(), self.life.clone());
            r.service(
                plugin_api::ServiceFn::new("probe")
                    .on_start(move || {
                        probe.starts.fetch_add(1, Ordering::SeqCst);
                        let guard = TaskGuard(probe.clone());
                        let spawned = life.spawn(async move {
                            let _guard = guard;
                            std::future::pending::<()>().await;
                        });
                        async move { spawned.map_err(|e| e.to_string()) }
                    })
                    .on_stop({
                        let probe = self.probe.clone();
                        move || {
                            probe.stops.fetch_add(1, Ordering::SeqCst);
                            async {}
                        }
                    })
                    .into_service(),
            );
            let (probe, events) = (self.probe.clone(), self.events.clone());
            r.on_connection_opened(move |info| {
                lock(&probe.opened_reachable).push(events.is_connected(info.conn_id));
            });
            let probe = self.probe.clone();
            r.on_connection_closed(move |_| {
                probe.closed.fetch_add(1, Ordering::SeqCst);
            });
            let probe = self.probe.clone();
            r.health_check(move || lock(&probe.degraded).clone());
            r.channel("probe", Arc::new(ProbeChannel(self.probe.clone())));
            r.method("probe.whoami").scope(scope::READ).sync(|ctx, _| {
                Ok(json!({"conn": ctx.conn_id().0, "client": ctx.client().id, "role": ctx.role() == Role::Node}))
            });
            r.event("plugin.probe.note");
            // To the operators open for at least `params` milliseconds.
            let events = self.events.clone();
            r.method("probe.elders")
                .scope(scope::READ)
                .sync(move |_, params| {
                    let min = Duration::from_millis(params.parse::<u64>()?);
                    let reached = events
                        .broadcast_where(
                            scope::READ,
                            |_, open| open >= min,
                            "plugin.probe.note",
                            &0,
                        )
                        .unwrap_or(0);
                    Ok(json!(reached))
                });
            // A filter calling back into the sink.
            let events = self.events.clone();
            r.method("probe.reentrant")
                .scope(scope::READ)
                .sync(move |_, _| {
                    let reached = events
                        .broadcast_where(
                            scope::READ,
                            |info, _| events.is_connected(info.conn_id),
                            "plugin.probe.note",
                            &"reentrant",
                        )
                        .unwrap_or(0);
                    Ok(json!(reached))
                });
            let events = self.events.clone();
            r.method("probe.note")
                .scope(scope::WRITE)
                .sync(move |_, params| {
                    let n: Value = params.parse()?;
                    let reached = events
                        .broadcast(scope::READ, "plugin.probe.note", &n)
                        .unwrap_or(0);
                    Ok(json!(reached))
                });
        }
    }

    fn probe(p: &Arc<Probe>) -> PluginFactory {
        let p = p.clone();
        PluginFactory::new("probe", "1", move |ctx: PluginContext| {
            Ok(Arc::new(ProbePlugin {
                probe: p.clone(),
                life: ctx.life.clone(),
                events: ctx.events.clone(),
            }))
        })
    }

    async fn probe_host(dir: &Path, p: &Arc<Probe>) -> TestHost {
        TestHost::builder(dir)
            .plugin(probe(p))
            .start()
            .await
            .unwrap()
    }

    /// Wait in 1 ms steps until `counter` reaches `want` (a task's end is processed by
    /// the runtime after the abort), at most a few seconds.
    async fn until(counter: &AtomicU64, want: u64) -> u64 {
        for _ in 0..10_000 {
            if counter.load(Ordering::SeqCst) >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        counter.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn a_restart_stops_services_a_crash_stops_nothing_and_a_new_host_starts_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let p = Arc::new(Probe::default());
        let host = probe_host(dir.path(), &p).await;
        let client = host.connect_operator(&[scope::WRITE]);
        let first_id = client.conn_id();
        assert_eq!(p.starts.load(Ordering::SeqCst), 1);

        host.restart().await.unwrap();
        assert_eq!(
            (
                p.stops.load(Ordering::SeqCst),
                p.starts.load(Ordering::SeqCst)
            ),
            (1, 2),
            "a restart stops the old services, then starts the new ones"
        );
        assert_eq!(
            until(&p.tasks_ended, 1).await,
            1,
            "generation 1's task ended"
        );
        assert!(client.is_connected(), "connections survive a restart");
        assert_eq!(
            client
                .send("probe", "x", json!("before"), "k0")
                .await
                .unwrap(),
            "m-k0"
        );

        host.crash();
        assert_eq!(
            until(&p.tasks_ended, 2).await,
            2,
            "the crashed generation's task is gone"
        );
        assert_eq!(
            p.stops.load(Ordering::SeqCst),
            1,
            "a crash stops no service"
        );
        assert_eq!(
            p.closed.load(Ordering::SeqCst),
            0,
            "and runs no connection-closed hook"
        );
        assert!(!client.is_connected(), "connections die with the process");
        let gone = client.call("probe.whoami", json!({})).await.unwrap_err();
        assert_eq!(gone.code, plugin_api::ErrorCode::Unavailable);
        assert_eq!(lock(&p.sent).len(), 1);
        client.disconnect();
        assert_eq!(
            p.closed.load(Ordering::SeqCst),
            0,
            "a dead connection closes nothing"
        );

        // A new process on the same state directory: fresh generation 1,
        // connection ids never handed out before.
        let host = probe_host(dir.path(), &p).await;
        assert_eq!(host.gateway().stats().generation, 1);
        assert_eq!(p.starts.load(Ordering::SeqCst), 3);
        let again = host.connect_operator(&[scope::READ]);
        assert!(again.conn_id().0 > first_id.0);
        let me = again.call("probe.whoami", json!({})).await.unwrap();
        assert_eq!(me["conn"], again.conn_id().0);
        host.shutdown().await;
        assert_eq!(
            p.stops.load(Ordering::SeqCst),
            2,
            "shutdown stops the services"
        );
        let after = again.call("probe.whoami", json!({})).await.unwrap_err();
        assert_eq!(after.details.unwrap()["reason"], "gateway-closing");
    }

    /// Paused time: a connection's age is what the test advanced, plus
    /// what it backdated, exactly.
    #[tokio::test(start_paused = true)]
    async fn broadcast_where_sees_each_connection_open_since_it_joined_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let p = Arc::new(Probe::default());
        let host = probe_host(dir.path(), &p).await;
        let grace = Duration::from_secs(60);
        let ms = Duration::from_millis(1);
        let asker = host.connect_operator(&[scope::READ]);
        let elders = || asker.call("probe.elders", json!(grace.as_millis() as u64));
        // Open for grace-1ms, grace, grace+1ms: the last two are reached.
        let young = host.connect_operator(&[scope::READ]);
        let exact = host.connect_operator(&[scope::READ]);
        let old = host.connect_operator(&[scope::READ]);
        young.backdate(grace - ms * 2);
        exact.backdate(grace - ms);
        old.backdate(grace);
        tokio::time::advance(ms).await;
        assert_eq!(elders().await.unwrap(), 2);
        let notes = |c: &TestClient| c.events_named("plugin.probe.note").len();
        assert_eq!((notes(&young), notes(&exact), notes(&old)), (0, 1, 1));
        // Time passes for every connection alike.
        tokio::time::advance(ms).await;
        assert_eq!(elders().await.unwrap(), 3);
        assert_eq!(notes(&young), 1);
        assert_eq!(notes(&asker), 0, "the asker is a minute younger");

        // A connection in the moment between joining the table and the
        // hooks: it receives, and its age counts from the table insert.
        let opening = host.begin_connect(Role::Operator, &[scope::READ], ClientInfo::default());
        assert_eq!(lock(&p.opened_reachable).len(), 4, "its hook has not run");
        opening.client().backdate(grace);
        assert_eq!(elders().await.unwrap(), 4);
        assert_eq!(notes(opening.client()), 1);
        let late = opening.finish();
        assert_eq!(*lock(&p.opened_reachable), [true; 5]);
        // A node or a connection without the scope is never asked about.
        let node = host.connect(Role::Node, &[scope::READ], ClientInfo::default());
        node.backdate(grace * 2);
        assert_eq!(elders().await.unwrap(), 4);
        assert!(node.events().is_empty());
        late.disconnect();
        assert_eq!(elders().await.unwrap(), 3);
        host.shutdown().await;
    }

    #[tokio::test]
    async fn health_names_a_degraded_plugin_and_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let p = Arc::new(Probe::default());
        let host = probe_host(dir.path(), &p).await;
        assert_eq!(host.degraded("probe").await.unwrap(), None);
        assert_eq!(host.health().await.unwrap()["ok"], true);
        *lock(&p.degraded) = Some("disk full".into());
        assert_eq!(
            host.degraded("probe").await.unwrap().as_deref(),
            Some("disk full")
        );
        assert_eq!(host.degraded("core").await.unwrap(), None);
        let health = host.health().await.unwrap();
        assert_eq!(health["ok"], false, "{health}");
        assert_eq!(health["generation"], 1);
        *lock(&p.degraded) = None;
        assert_eq!(host.degraded("probe").await.unwrap(), None);
        host.shutdown().await;
    }

    #[tokio::test]
    async fn send_goes_through_the_core_plugin_and_its_scope_check() {
        let dir = tempfile::tempdir().unwrap();
        let p = Arc::new(Probe::default());
        let host = probe_host(dir.path(), &p).await;
        let writer = host.connect_operator(&[scope::WRITE]);
        let reader = host.connect_operator(&[scope::READ]);
        let id = writer
            .send("probe", "room-1", json!({"text": "hi"}), "key-1")
            .await
            .unwrap();
        assert_eq!(id, "m-key-1");
        let sent = lock(&p.sent).clone();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].0, writer.conn_id(), "the channel sees the caller");
        assert_eq!(
            (
                sent[0].1.to.as_str(),
                &sent[0].1.message,
                sent[0].1.idempotency_key.as_str()
            ),
            ("room-1", &json!({"text": "hi"}), "key-1")
        );
        let denied = reader
            .send("probe", "room-1", json!("x"), "key-2")
            .await
            .unwrap_err();
        assert_eq!(denied.details_code(), Some("MISSING_SCOPE"));
        let unknown = writer
            .send("nope", "room-1", json!("x"), "key-3")
            .await
            .unwrap_err();
        assert_eq!(unknown.details_code(), Some("UNKNOWN_CHANNEL"));
        assert_eq!(lock(&p.sent).len(), 1, "refused sends reach no channel");
        host.shutdown().await;
    }

    #[tokio::test]
    async fn connections_carry_their_identity_and_every_delivery_is_logged_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = Arc::new(Probe::default());
        let host = probe_host(dir.path(), &p).await;
        let bncr = ClientInfo {
            id: "bncr".into(),
            mode: "backend".into(),
            ..ClientInfo::default()
        };
        let a = host.connect(Role::Operator, &[scope::WRITE], bncr);
        let b = host.connect_operator(&[scope::READ]);
        let node = host.connect(Role::Node, &[scope::READ], ClientInfo::default());
        let me = a.call("probe.whoami", json!({})).await.unwrap();
        assert_eq!(
            me,
            json!({"conn": a.conn_id().0, "client": "bncr", "role": false})
        );
        assert_eq!(a.info().client.mode, "backend");
        assert!(
            node.call("probe.whoami", json!({})).await.is_err(),
            "a node calls no operator method"
        );

        // A client may be moved into another task; the host wakes on the delivery.
        let (a_id, b_id) = (a.conn_id(), b.conn_id());
        let caller = tokio::spawn(async move {
            tokio::task::yield_now().await;
            a.call("probe.note", json!(1)).await.unwrap()
        });
        let arrived = host
            .wait_until(Duration::from_secs(5), || {
                b.events_named("plugin.probe.note").len() == 1
            })
            .await;
        assert!(arrived);
        assert_eq!(caller.await.unwrap(), 2, "both operators, not the node");
        b.disconnect();
        assert_eq!(host.events(), host.events_named("plugin.probe.note"));
        let log = host.events_named("plugin.probe.note");
        let to: Vec<ConnId> = log.iter().map(|(c, _)| *c).collect();
        assert_eq!(
            to,
            [a_id, b_id],
            "in delivery order, closed connections included"
        );
        assert!(log.iter().all(|(_, e)| e.payload == 1));
        assert_eq!(p.closed.load(Ordering::SeqCst), 1);
        assert_eq!(
            *lock(&p.opened_reachable),
            [true, true, true],
            "as in the real host, a connection joins the table before the hooks run"
        );
        assert!(
            !host.wait_until(Duration::from_millis(1), || false).await,
            "false when the time is up"
        );
        host.shutdown().await;
    }
    /// The real host asks a `broadcast_where` filter holding none of its
    /// locks; so does the test host. Run on a thread of its own: a filter
    /// that deadlocks the transport fails the test instead of hanging it.
    #[test]
    fn a_broadcast_where_filter_may_call_back_into_the_sink() {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let reached = rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let p = Arc::new(Probe::default());
                let host = probe_host(dir.path(), &p).await;
                let a = host.connect_operator(&[scope::READ]);
                let _b = host.connect_operator(&[scope::READ]);
                let reached = a.call("probe.reentrant", json!({})).await.unwrap();
                assert_eq!(a.events_named("plugin.probe.note").len(), 1);
                host.shutdown().await;
                reached
            });
            let _ = done.send(reached);
        });
        let reached = finished
            .recv_timeout(Duration::from_secs(60))
            .expect("the filter's call into the sink returned");
        assert_eq!(reached, 2);
    }

    /// `early` keeps its newest sink where `nudge` finds it, and says
    /// goodbye from its service's stop; `nudge`, registered after it in the
    /// same build, emits through that sink: an event of a generation before
    /// the swap, as a task spawned by a constructor or a plugin process can
    /// emit one.
    #[derive(Default)]
    struct Early {
        sink: Mutex<Option<plugin_api::EventSink>>,
        /// (generation, connections reached) of each emit during a build.
        during_build: Mutex<Vec<(u64, usize)>>,
    }

    struct EarlyPlugin {
        events: plugin_api::EventSink,
        generation: u64,
    }

    impl Plugin for EarlyPlugin {
        fn id(&self) -> &str {
            "early"
        }
        fn version(&self) -> &str {
            "1"
        }
        fn register(&self, r: &mut Registrar) {
            r.event("plugin.early.note");
            let (events, generation) = (self.events.clone(), self.generation);
            r.service(
                plugin_api::ServiceFn::new("early")
                    .on_start(|| async { Ok::<(), String>(()) })
                    .on_stop(move || {
                        let _ = events.broadcast(
                            scope::READ,
                            "plugin.early.note",
                            &json!({ "stop": generation }),
                        );
                        async {}
                    })
                    .into_service(),
            );
            let (events, generation) = (self.events.clone(), self.generation);
            r.method("early.note").scope(scope::READ).sync(move |_, _| {
                let reached = events
                    .broadcast(
                        scope::READ,
                        "plugin.early.note",
                        &json!({ "call": generation }),
                    )
                    .unwrap_or(0);
                Ok(json!(reached))
            });
        }
    }

    struct NudgePlugin {
        early: Arc<Early>,
        generation: u64,
    }

    impl Plugin for NudgePlugin {
        fn id(&self) -> &str {
            "nudge"
        }
        fn version(&self) -> &str {
            "1"
        }
        fn register(&self, _: &mut Registrar) {
            let sink = lock(&self.early.sink).clone();
            if let Some(sink) = sink {
                let reached = sink
                    .broadcast(
                        scope::READ,
                        "plugin.early.note",
                        &json!({ "built": self.generation }),
                    )
                    .expect("declared, and the generation is live");
                lock(&self.early.during_build).push((self.generation, reached));
            }
        }
    }

    fn early_plugins(early: &Arc<Early>) -> (PluginFactory, PluginFactory) {
        let e = early.clone();
        let first = PluginFactory::new("early", "1", move |ctx: PluginContext| {
            *lock(&e.sink) = Some(ctx.events.clone());
            Ok(Arc::new(EarlyPlugin {
                events: ctx.events.clone(),
                generation: ctx.life.generation(),
            }))
        });
        let e = early.clone();
        let second = PluginFactory::new("nudge", "1", move |ctx: PluginContext| {
            Ok(Arc::new(NudgePlugin {
                early: e.clone(),
                generation: ctx.life.generation(),
            }))
        });
        (first, second)
    }

    /// As in the real host: an event of a generation that is not serving
    /// yet (emitted during its build, before the swap, or by a validation
    /// build) reaches no connection and counts as reaching none; one of the
    /// generation handing over after the swap, and of the serving one, is
    /// delivered.
    #[tokio::test]
    async fn events_of_a_generation_not_serving_yet_reach_no_connection() {
        let dir = tempfile::tempdir().unwrap();
        let early = Arc::new(Early::default());
        let (first, second) = early_plugins(&early);
        let host = TestHost::builder(dir.path())
            .plugin(first)
            .plugin(second)
            .start()
            .await
            .unwrap();
        let reader = host.connect_operator(&[scope::READ]);
        let notes = || -> Vec<Value> {
            reader
                .events_named("plugin.early.note")
                .into_iter()
                .map(|e| e.payload)
                .collect()
        };
        assert_eq!(reader.call("early.note", json!({})).await.unwrap(), 1);
        host.restart().await.unwrap();
        host.gateway().validate().unwrap();
        assert_eq!(
            *lock(&early.during_build),
            [(1, 0), (2, 0), (0, 0)],
            "generation 2 emitted while 1 served, 0 never serves"
        );
        assert_eq!(reader.call("early.note", json!({})).await.unwrap(), 1);
        assert_eq!(
            notes(),
            [json!({"call": 1}), json!({"stop": 1}), json!({"call": 2})],
            "generation 1 handing over still reaches the connection"
        );
        host.shutdown().await;
    }
}
