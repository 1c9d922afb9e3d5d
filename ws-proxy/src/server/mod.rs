//! The listener: hyper serving probes and metrics, upgrading WebSockets, and
//! the life of each client connection from challenge to close.
//!
//! - this module: [`ServerBuilder`] / [`start`], the process-lifetime
//!   [`Shared`] state, and [`RunningServer`] with its graceful stop;
//! - `accept`: the accept loop and the connection gate every TCP
//!   connection holds a permit of;
//! - `generations`: tells every connection of each new generation;
//! - `http`: probes, metrics, the dashboard, and the WebSocket upgrade;
//! - `session`: one client connection from challenge to close, and the
//!   requests it sends.

mod accept;
mod generations;
mod http;
mod session;

use crate::auth::Authenticator;
use crate::config::Settings;
use crate::connection::{ConnectionTable, GenerationNotices};
use crate::limits::Gate;
use crate::metrics::Metrics;
use gateway_core::{BuildError, Catalog, Gateway, GatewayOptions};
use plugin_api::PluginFactory;
use serde_json::json;
use serde_json::value::RawValue;
use session::CLOSE_GRACE;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// State shared by the listener and every connection; lives for the process.
pub(crate) struct Shared {
    pub(crate) settings: Settings,
    pub(crate) gateway: Gateway,
    pub(crate) table: Arc<ConnectionTable>,
    pub(crate) auth: Authenticator,
    pub(crate) metrics: Metrics,
    /// Caps on open connections.
    gate: Arc<Gate>,
    /// The port actually bound (differs from the setting with port 0).
    pub(crate) local_port: u16,
    /// The `gateway.generation` payload of the generation serving now.
    pub(crate) notices: GenerationNotices,
    /// The next connection id; see [`session::first_conn_id`].
    next_conn: AtomicU64,
    /// Connection tasks.
    connections: TaskTracker,
    /// Request tasks.
    requests: TaskTracker,
    /// Cancelled when the server begins to stop (new WebSockets refused,
    /// readiness 503).
    stopping: CancellationToken,
    /// Cancelled when the listener closes, at the end of a stop.
    unlisten: CancellationToken,
}

/// Why the server could not start.
#[derive(Debug)]
pub enum StartError {
    /// The listen address could not be bound.
    Bind(SocketAddr, std::io::Error),
    /// The first generation could not be built.
    Build(BuildError),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Bind(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            StartError::Build(e) => write!(f, "cannot start: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// A server that is accepting connections.
pub struct RunningServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl fmt::Debug for RunningServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunningServer")
            .field("addr", &self.addr)
            .finish()
    }
}

/// Bind, build generation 1 (with the built-in core and bncr plugins), and
/// start accepting connections. The same as
/// `ServerBuilder::new(settings).start()`.
pub async fn start(settings: Settings) -> Result<RunningServer, StartError> {
    ServerBuilder::new(settings).start().await
}

/// A server with the embedder's own plugins compiled in, next to the
/// built-in ones (core, the operator tools, and the Bncr bridge unless left out). What the binary
/// runs is `ServerBuilder::new(settings).start()`.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use clap::Parser;
/// use plugin_api::{Plugin, PluginContext, PluginFactory, Registrar, scope};
/// use std::sync::Arc;
///
/// struct Greeter;
/// impl Plugin for Greeter {
///     fn id(&self) -> &str { "greeter" }
///     fn version(&self) -> &str { "1.0.0" }
///     fn register(&self, r: &mut Registrar) {
///         r.method("greeter.hello")
///             .scope(scope::READ)
///             .sync(|_ctx, _params| Ok(serde_json::json!({"hello": "world"})));
///     }
/// }
///
/// let settings = ws_proxy::Settings::resolve(&ws_proxy::Cli::parse())?;
/// let server = ws_proxy::ServerBuilder::new(settings)
///     .plugin(PluginFactory::new("greeter", "1.0.0", |_: PluginContext| Ok(Arc::new(Greeter))))
///     .start()
///     .await?;
/// println!("serving on {}", server.local_addr());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ServerBuilder {
    settings: Settings,
    catalog: Catalog,
}

impl ServerBuilder {
    /// A server with these settings and the built-in Bncr bridge.
    pub fn new(settings: Settings) -> ServerBuilder {
        ServerBuilder {
            settings,
            catalog: Catalog::new().with(bncr_plugin::factory()),
        }
    }

    /// Leave the built-in Bncr bridge out (the core plugin is always there).
    pub fn without_bncr(mut self) -> ServerBuilder {
        let kept = self
            .catalog
            .factories()
            .iter()
            .filter(|f| f.id != bncr_plugin::PLUGIN_ID)
            .cloned()
            .fold(Catalog::new(), Catalog::with);
        self.catalog = kept;
        self
    }

    /// Compile one more plugin in. Like every plugin it is constructed anew
    /// for each generation, configured under `[plugins.entries.<id>]`, and
    /// its methods are advertised and dispatched from the same registry.
    pub fn plugin(mut self, factory: PluginFactory) -> ServerBuilder {
        self.catalog = self.catalog.with(factory);
        self
    }

    /// Bind, build generation 1 and start accepting connections.
    pub async fn start(self) -> Result<RunningServer, StartError> {
        start_with(self.settings, self.catalog).await
    }
}

async fn start_with(settings: Settings, catalog: Catalog) -> Result<RunningServer, StartError> {
    let want = SocketAddr::new(settings.bind, settings.port);
    let listener = TcpListener::bind(want)
        .await
        .map_err(|e| StartError::Bind(want, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| StartError::Bind(want, e))?;
    let table = Arc::new(ConnectionTable::default());
    let link = crate::ops::ServerLink::default();
    let gateway = Gateway::start(GatewayOptions {
        // The operator tools need this process's connections, settings
        // and logs, so they are always there, like the core plugin.
        catalog: catalog.with(crate::ops::factory(link.clone())),
        config: Arc::new(settings.source.clone()),
        state_dir: settings.state_dir.clone(),
        transport: table.clone(),
    })
    .await
    .map_err(StartError::Build)?;
    let metrics = Metrics::default();
    let gate = accept::connection_gate(&settings.limits, &metrics);
    let shared = Arc::new(Shared {
        auth: Authenticator::new(settings.auth.clone(), metrics.limits.clone()),
        notices: GenerationNotices::new(gateway.clone()),
        settings,
        gateway,
        table,
        metrics,
        gate,
        local_port: addr.port(),
        next_conn: AtomicU64::new(session::first_conn_id()),
        connections: TaskTracker::new(),
        requests: TaskTracker::new(),
        stopping: CancellationToken::new(),
        unlisten: CancellationToken::new(),
    });
    let _ = link.set(Arc::downgrade(&shared));
    // Plugin events are delivered once their generation serves: the table
    // reads the current scope itself, exactly as dispatch does.
    let serving = Arc::downgrade(&shared);
    shared.table.follow_generations(move || {
        serving
            .upgrade()
            .map_or(0, |s| s.gateway.current().generation())
    });
    tokio::spawn(accept::accept_loop(shared.clone(), listener));
    tokio::spawn(generations::watch_generations(shared.clone()));
    info!(%addr, "listening on ws://{addr}");
    Ok(RunningServer { shared, addr })
}

impl RunningServer {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The gateway behind this server.
    pub fn gateway(&self) -> &Gateway {
        &self.shared.gateway
    }

    /// Authenticated connections open now.
    pub fn connections_open(&self) -> usize {
        self.shared.table.len()
    }

    /// Stop gracefully: stop accepting, send every connection `shutdown`,
    /// drain in-flight requests within the configured deadline, stop the
    /// gateway, close every connection 1012. Every wait is bounded.
    pub async fn stop(self) {
        let s = &self.shared;
        s.stopping.cancel();
        let drain = Duration::from_millis(s.settings.limits.shutdown_drain_ms);
        let grace = drain + Duration::from_secs(5);
        // Polled once before the event goes out, so the gateway already
        // refuses new requests (`gateway-closing`) when clients hear of it.
        let mut shutdown = std::pin::pin!(s.gateway.shutdown(Some(drain)));
        let first = futures::poll!(shutdown.as_mut());
        let payload = raw(&json!({"reason": "gateway stopping", "restartExpectedMs": null}));
        s.table.send_all("shutdown", &payload);
        if first.is_pending() && tokio::time::timeout(grace, shutdown).await.is_err() {
            warn!(timeout = ?grace, "gateway shutdown timed out; stopping anyway");
        }
        s.requests.close();
        if tokio::time::timeout(Duration::from_secs(2), s.requests.wait())
            .await
            .is_err()
        {
            warn!("requests still running after the drain deadline; abandoned");
        }
        for outbox in s.table.outboxes() {
            outbox.close(1012, "service restart");
        }
        s.connections.close();
        if tokio::time::timeout(CLOSE_GRACE + Duration::from_secs(1), s.connections.wait())
            .await
            .is_err()
        {
            warn!("connections still open after close; dropping them");
        }
        s.unlisten.cancel();
        info!("stopped");
    }
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(super) fn raw(value: &serde_json::Value) -> Arc<RawValue> {
    serde_json::value::to_raw_value(value)
        .map(Arc::from)
        .unwrap_or_else(|_| Arc::from(RawValue::NULL.to_owned()))
}
