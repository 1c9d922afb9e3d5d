//! A tiny in-process host that drives the plugin the way gateway-core does:
//! one `ScopeLife` per generation, services started in order and stopped in
//! reverse, then the generation retired. Its transport answers like the real
//! connection table: a connection is an authenticated operator holding the
//! scopes it was given (Bncr clients connect as operators with
//! `operator.write`, exactly like the real client), and a broadcast reaches,
//! and counts, only the connections that hold the scope.

#![allow(dead_code, unreachable_pub)]

use plugin_api::{
    Channel, ClientInfo, ConnId, ConnectionInfo, Declarations, EventTransport, Handler,
    OutboundEvent, OutboundMessage, Params, PluginContext, RequestContext, Role, RpcError, Scopes,
    Value,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One recorded event, queued for connection `conn`.
#[derive(Debug, Clone)]
pub struct Ev {
    pub conn: Option<u64>,
    pub name: String,
    pub payload: Value,
}

/// Records every event a connection accepted; connections not connected
/// refuse.
#[derive(Debug, Default)]
pub struct Transport {
    connected: Mutex<HashMap<u64, Arc<ConnectionInfo>>>,
    events: Mutex<Vec<Ev>>,
}

impl Transport {
    fn deliver(&self, conn: u64, ev: &OutboundEvent) {
        self.events.lock().unwrap().push(Ev {
            conn: Some(conn),
            name: ev.name.to_string(),
            payload: serde_json::from_str(ev.payload.get()).unwrap(),
        });
    }

    /// Connections holding `scope` as operators, minus `except`, in id order.
    fn operators(&self, scope: &str, except: &[ConnId]) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .connected
            .lock()
            .unwrap()
            .values()
            .filter(|c| c.role == Role::Operator && c.scopes.allows(scope))
            .map(|c| c.conn_id.0)
            .filter(|c| !except.contains(&ConnId(*c)))
            .collect();
        ids.sort_unstable();
        ids
    }
}

impl EventTransport for Transport {
    fn send_to(&self, conn: ConnId, ev: &OutboundEvent) -> bool {
        if !self.is_connected(conn) {
            return false;
        }
        self.deliver(conn.0, ev);
        true
    }
    fn broadcast(&self, scope: &str, ev: &OutboundEvent) -> usize {
        self.broadcast_except(scope, &[], ev)
    }
    fn broadcast_except(&self, scope: &str, except: &[ConnId], ev: &OutboundEvent) -> usize {
        let to = self.operators(scope, except);
        for c in &to {
            self.deliver(*c, ev);
        }
        to.len()
    }
    fn connection_count(&self) -> usize {
        self.connected.lock().unwrap().len()
    }
    fn is_connected(&self, conn: ConnId) -> bool {
        self.connected.lock().unwrap().contains_key(&conn.0)
    }
}

/// The connection info of an operator holding `scopes`.
pub fn operator_info(conn: u64, scopes: &[&str]) -> Arc<ConnectionInfo> {
    Arc::new(ConnectionInfo {
        conn_id: ConnId(conn),
        role: Role::Operator,
        scopes: Scopes::new(scopes.iter().copied()),
        client: ClientInfo::default(),
    })
}

impl Transport {
    /// An authenticated operator connection with `operator.write`: what a
    /// Bncr client and a chat operator both are.
    pub fn connect(&self, conn: u64) {
        self.connect_as(operator_info(conn, &["operator.write"]));
    }
    pub fn connect_as(&self, info: Arc<ConnectionInfo>) {
        self.connected.lock().unwrap().insert(info.conn_id.0, info);
    }
    pub fn disconnect(&self, conn: u64) {
        self.connected.lock().unwrap().remove(&conn);
    }
    /// Payloads of `name` events queued for `conn`, in order.
    pub fn to_conn(&self, conn: u64, name: &str) -> Vec<Value> {
        self.named(name)
            .into_iter()
            .filter(|e| e.conn == Some(conn))
            .map(|e| e.payload)
            .collect()
    }
    pub fn events(&self) -> Vec<Ev> {
        self.events.lock().unwrap().clone()
    }
    pub fn named(&self, name: &str) -> Vec<Ev> {
        self.events()
            .into_iter()
            .filter(|e| e.name == name)
            .collect()
    }
    /// Message ids pushed to `conn`, in push order (repeats included).
    pub fn pushes(&self, conn: u64) -> Vec<String> {
        self.named("plugin.bncr.push")
            .into_iter()
            .filter(|e| e.conn == Some(conn))
            .map(|e| e.payload["messageId"].as_str().unwrap().to_string())
            .collect()
    }
    /// Wait (polling) until `cond` holds; panics with `what` after `timeout`.
    pub async fn wait_for(&self, what: &str, timeout: Duration, cond: impl Fn(&Transport) -> bool) {
        let deadline = Instant::now() + timeout;
        while !cond(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; events: {:#?}",
                self.events()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// The process-lifetime part: state dir and transport.
pub struct Host {
    pub dir: tempfile::TempDir,
    pub transport: Arc<Transport>,
    pub config: Value,
}

/// One generation of the plugin.
pub struct Gen {
    pub ctl: plugin_api::host::LifeController,
    pub decl: Declarations,
    transport: Arc<Transport>,
}

impl Host {
    pub fn new(config: Value) -> Host {
        Host {
            dir: tempfile::tempdir().unwrap(),
            transport: Arc::new(Transport::default()),
            config,
        }
    }

    /// Build, register and start generation `generation`.
    pub async fn start(&self, generation: u64) -> Gen {
        let (life, ctl) = plugin_api::host::scope_life(generation);
        let (sink, declarer) =
            plugin_api::host::event_sink("bncr", life.clone(), self.transport.clone());
        let ctx = PluginContext {
            plugin_id: "bncr".into(),
            config: self.config.clone(),
            state_dir: self.dir.path().to_path_buf(),
            events: sink.clone(),
            life,
        };
        let factory = bncr_plugin::factory();
        let plugin = (factory.create)(ctx).expect("plugin constructs");
        let mut r = plugin_api::host::registrar("bncr");
        plugin.register(&mut r);
        let decl = plugin_api::host::declarations(r);
        declarer.declare(decl.events.clone());
        for s in &decl.services {
            s.clone().start().await.expect("service starts");
        }
        Gen {
            ctl,
            decl,
            transport: self.transport.clone(),
        }
    }
}

impl Gen {
    pub async fn call(&self, conn: u64, method: &str, params: Value) -> Result<Value, RpcError> {
        let spec = self
            .decl
            .methods
            .iter()
            .find(|m| m.name == method)
            .unwrap_or_else(|| panic!("method {method} not declared"));
        // The caller is the connection as the transport knows it (an
        // unknown id calls as an internal admin), checked like the host
        // checks it.
        let info = self.transport.connected.lock().unwrap().get(&conn).cloned();
        let ctx = match info {
            Some(info) => RequestContext::new(info),
            None => RequestContext::internal(ConnId(conn)),
        };
        if let Some(needed) = spec.scope.as_str()
            && !ctx.scopes().allows(needed)
        {
            return Err(RpcError::forbidden(format!("missing scope: {needed}")));
        }
        let params = Params::from_value(&params);
        match &spec.handler {
            Handler::Sync(h) => h(&ctx, params),
            Handler::Async(h) => h(ctx, params).await,
        }
    }

    /// `call` that must succeed.
    pub async fn ok(&self, conn: u64, method: &str, params: Value) -> Value {
        match self.call(conn, method, params.clone()).await {
            Ok(v) => v,
            Err(e) => panic!("{method} {params} failed: {e}"),
        }
    }

    /// The core `send` through the `bncr` channel.
    pub async fn send(&self, to: &str, message: Value, key: &str) -> Result<String, RpcError> {
        let ch: Arc<dyn Channel> = self
            .decl
            .channels
            .iter()
            .find(|c| c.0 == "bncr")
            .expect("bncr channel")
            .1
            .clone();
        ch.send(
            RequestContext::internal(ConnId(999)),
            OutboundMessage {
                to: to.into(),
                message,
                idempotency_key: key.into(),
            },
        )
        .await
        .map(|r| r.message_id)
    }

    /// A connection opens as the real host does it: it joins the table,
    /// then the connection-opened hooks run.
    pub fn open(&self, transport: &Transport, info: Arc<ConnectionInfo>) {
        transport.connect_as(info.clone());
        for h in &self.decl.connection_opened {
            h(&info);
        }
    }

    /// What the host's `health` would report for this plugin: the first
    /// degraded reason, if any.
    pub fn degraded(&self) -> Option<String> {
        self.decl.health.iter().find_map(|h| h())
    }

    pub fn connection_closed(&self, conn: u64) {
        for h in &self.decl.connection_closed {
            h(ConnId(conn));
        }
    }

    /// Stop services in reverse order, then retire and reap.
    pub async fn stop(self) {
        for s in self.decl.services.iter().rev() {
            s.clone().stop().await;
        }
        self.ctl.retire();
        assert_eq!(
            self.ctl.reap_tasks(Duration::from_secs(2)).await,
            0,
            "tasks ignored cancellation"
        );
    }

    /// Drop everything without stopping: as close to kill -9 as in-process gets.
    pub fn kill(self) {
        drop(self);
    }
}

/// Ack each id once it was pushed to `conn`, in order, through `gen`.
pub async fn ack_in_order(host: &Host, g: &Gen, conn: u64, ids: &[String]) {
    for id in ids {
        host.transport
            .wait_for(&format!("push of {id}"), Duration::from_secs(5), |t| {
                t.pushes(conn).contains(id)
            })
            .await;
        let r = g
            .ok(
                conn,
                "bncr.ack",
                serde_json::json!({"messageId": id, "ok": true}),
            )
            .await;
        assert_eq!(r["ok"], true);
    }
}

/// The distinct ids in order of first appearance.
pub fn first_seen(ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for id in ids {
        if !out.contains(id) {
            out.push(id.clone());
        }
    }
    out
}
