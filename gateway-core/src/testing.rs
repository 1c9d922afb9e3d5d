//! A test host for plugin authors: runs plugins through the real gateway
//! (registry, admission, scope checks, services, events, restarts) with
//! in-memory connections instead of sockets.
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
//! let host = TestHost::builder(&dir)
//!     .plugin(PluginFactory::new("hello", "1.0.0", |_: PluginContext| Ok(Arc::new(Hello))))
//!     .start()
//!     .await?;
//! let reader = host.connect_operator(&[scope::READ]);
//! assert_eq!(reader.call("hello.say", serde_json::json!({})).await?, "hi");
//! // The real scope check: a client holding no scope is refused.
//! let nobody = host.connect_operator(&[]);
//! assert!(nobody.call("hello.say", serde_json::json!({})).await.is_err());
//! host.restart().await?; // a new generation: a new plugin instance
//! host.shutdown().await;
//! # Ok(()) }
//! # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
//! ```

use crate::config::{GatewayConfig, StaticConfig};
use crate::gateway::{Gateway, GatewayOptions};
use crate::loader::{BuildError, Catalog};
use crate::report::RestartOutcome;
use crate::scope::ShutdownReport;
use plugin_api::{
    ClientInfo, ConnId, ConnectionInfo, EventTransport, MethodResult, OutboundEvent, Params,
    PluginFactory, RequestContext, Role, Scopes, Value,
};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// One event as a test connection received it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedEvent {
    /// The event name, e.g. `plugin.bncr.push`.
    pub name: String,
    /// Its payload.
    pub payload: Value,
}

struct TestConnection {
    info: Arc<ConnectionInfo>,
    events: Vec<ReceivedEvent>,
}

/// In-memory connections: the [`EventTransport`] of a [`TestHost`]. Sends
/// and broadcasts reach exactly the connections that are open and entitled
/// (operators holding the required scope), and report real counts.
#[derive(Default)]
pub struct TestTransport {
    conns: Mutex<BTreeMap<u64, TestConnection>>,
    arrived: Notify,
}

impl fmt::Debug for TestTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestTransport")
            .field("connections", &lock(&self.conns).len())
            .finish()
    }
}

impl TestTransport {
    fn deliver(&self, conn: &mut TestConnection, event: &OutboundEvent) {
        let payload = serde_json::from_str(event.payload.get()).unwrap_or(Value::Null);
        conn.events.push(ReceivedEvent {
            name: event.name.to_string(),
            payload,
        });
    }
}

impl EventTransport for TestTransport {
    fn send_to(&self, conn: ConnId, event: &OutboundEvent) -> bool {
        let delivered = match lock(&self.conns).get_mut(&conn.0) {
            Some(c) => {
                self.deliver(c, event);
                true
            }
            None => false,
        };
        if delivered {
            self.arrived.notify_waiters();
        }
        delivered
    }

    fn broadcast(&self, required_scope: &str, event: &OutboundEvent) -> usize {
        self.broadcast_except(required_scope, &[], event)
    }

    fn broadcast_except(
        &self,
        required_scope: &str,
        except: &[ConnId],
        event: &OutboundEvent,
    ) -> usize {
        let mut reached = 0;
        for c in lock(&self.conns).values_mut() {
            if c.info.role == Role::Operator
                && c.info.scopes.allows(required_scope)
                && !except.contains(&c.info.conn_id)
            {
                self.deliver(c, event);
                reached += 1;
            }
        }
        if reached > 0 {
            self.arrived.notify_waiters();
        }
        reached
    }

    fn connection_count(&self) -> usize {
        lock(&self.conns).len()
    }

    fn is_connected(&self, conn: ConnId) -> bool {
        lock(&self.conns).contains_key(&conn.0)
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
            state_dir: self.state_dir,
            transport: transport.clone(),
        })
        .await?;
        Ok(TestHost {
            gateway,
            transport,
            config,
            current: Mutex::new(self.config),
            next_conn: AtomicU64::new(1),
        })
    }
}

/// A gateway with in-memory connections, for testing plugins end to end
/// without sockets. See the [module docs](self).
pub struct TestHost {
    gateway: Gateway,
    transport: Arc<TestTransport>,
    config: Arc<StaticConfig>,
    current: Mutex<GatewayConfig>,
    next_conn: AtomicU64,
}

impl fmt::Debug for TestHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestHost")
            .field("gateway", &self.gateway)
            .field("transport", &self.transport)
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

    /// Open an operator connection holding `scopes`.
    pub fn connect_operator(&self, scopes: &[&str]) -> TestClient<'_> {
        self.connect(Role::Operator, scopes, ClientInfo::default())
    }

    /// Open a connection with any role, scopes and client identity.
    pub fn connect(&self, role: Role, scopes: &[&str], client: ClientInfo) -> TestClient<'_> {
        let conn_id = ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed));
        let info = Arc::new(ConnectionInfo {
            conn_id,
            role,
            scopes: Scopes::new(scopes.iter().copied()),
            client,
        });
        lock(&self.transport.conns).insert(
            conn_id.0,
            TestConnection {
                info: info.clone(),
                events: Vec::new(),
            },
        );
        // As the real host: the connection joins the table, then plugins hear of it.
        self.gateway.connection_opened(&info);
        TestClient { host: self, info }
    }

    /// Change plugin `id`'s config; it takes effect at the next restart.
    pub fn set_plugin_config(&self, id: &str, config: Value) {
        let mut current = lock(&self.current);
        set_entry_config(&mut current, id, config);
        self.config.set(current.clone());
    }

    /// Restart in-process, as SIGUSR1 does.
    pub async fn restart(&self) -> RestartOutcome {
        self.gateway.restart().await
    }

    /// Stop the gateway: drain, stop services, retire the generation.
    pub async fn shutdown(self) -> ShutdownReport {
        self.gateway.shutdown(None).await
    }
}

/// One in-memory connection of a [`TestHost`].
pub struct TestClient<'h> {
    host: &'h TestHost,
    info: Arc<ConnectionInfo>,
}

impl fmt::Debug for TestClient<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestClient")
            .field("conn_id", &self.info.conn_id)
            .finish()
    }
}

impl TestClient<'_> {
    /// This connection's id.
    pub fn conn_id(&self) -> ConnId {
        self.info.conn_id
    }

    /// Call `method` as this connection: the current generation admits it,
    /// checks role and scope, and answers, exactly as for a socket client.
    pub async fn call(&self, method: &str, params: Value) -> MethodResult {
        let ctx = RequestContext::new(self.info.clone());
        self.host
            .gateway
            .dispatch(ctx, method, Params::from_value(&params))
            .await
    }

    /// Every event this connection received so far, in order.
    pub fn events(&self) -> Vec<ReceivedEvent> {
        lock(&self.host.transport.conns)
            .get(&self.info.conn_id.0)
            .map(|c| c.events.clone())
            .unwrap_or_default()
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
        let wait = async {
            loop {
                let arrived = self.host.transport.arrived.notified();
                tokio::pin!(arrived);
                arrived.as_mut().enable();
                if self.events_named(name).len() >= count {
                    return;
                }
                arrived.await;
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
        self.events_named(name)
    }

    /// Close the connection: it stops receiving, and the gateway tells the
    /// plugins (their connection-closed hooks run).
    pub fn disconnect(self) {
        lock(&self.host.transport.conns).remove(&self.info.conn_id.0);
        self.host.gateway.connection_closed(self.info.conn_id);
    }
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
}
