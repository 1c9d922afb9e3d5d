//! The listener: hyper serving probes and metrics, upgrading WebSockets, and
//! the life of each client connection from challenge to close.

use crate::auth::Authenticator;
use crate::config::Settings;
use crate::connection::{ConnectionTable, GenerationNotices, Outbox, run_writer};
use crate::limits::{
    Caps, Gate, Permit, WriteBacklog, WriteMeter, binary_frame_close, read_error_close,
};
use crate::metrics::Metrics;
use crate::preauth::{PreauthBudget, PreauthCap};
use futures::StreamExt;
use gateway_core::frame::encode_response;
use gateway_core::{BuildError, Catalog, Gateway, GatewayOptions, PluginPhase, RestartConnections};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use plugin_api::{ConnId, ConnectionInfo, Params, PluginFactory, RequestContext, RpcError};
use serde_json::json;
use serde_json::value::RawValue;
use std::convert::Infallible;
use std::fmt;
use std::future::Future as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message, handshake::derive_accept_key};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// The answer to a request when its connection has too many in flight.
const BUSY: &str = "The server is busy. Please try again in a moment.";
/// How long a closing connection waits for the client's close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long a socket stays open after our close frame when the client's
/// reply cannot be read.
const CLOSE_LINGER: Duration = Duration::from_millis(200);

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
    /// The next connection id; see [`first_conn_id`].
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
    let gate = connection_gate(&settings.limits, &metrics);
    let shared = Arc::new(Shared {
        auth: Authenticator::new(settings.auth.clone(), metrics.limits.clone()),
        notices: GenerationNotices::new(gateway.clone()),
        settings,
        gateway,
        table,
        metrics,
        gate,
        local_port: addr.port(),
        next_conn: AtomicU64::new(first_conn_id()),
        connections: TaskTracker::new(),
        requests: TaskTracker::new(),
        stopping: CancellationToken::new(),
        unlisten: CancellationToken::new(),
    });
    let _ = link.set(Arc::downgrade(&shared));
    tokio::spawn(accept_loop(shared.clone(), listener));
    tokio::spawn(watch_generations(shared.clone()));
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

fn raw(value: &serde_json::Value) -> Arc<RawValue> {
    serde_json::value::to_raw_value(value)
        .map(Arc::from)
        .unwrap_or_else(|_| Arc::from(RawValue::NULL.to_owned()))
}

/// The connection caps, with the total kept below the file-descriptor limit
/// (whose soft value is raised to the hard one first).
fn connection_gate(limits: &crate::config::Limits, metrics: &Metrics) -> Arc<Gate> {
    let (total, fds) = crate::limits::fd_bounded_cap(limits.max_connections);
    if total < limits.max_connections {
        warn!(
            configured = limits.max_connections,
            cap = total,
            fd_limit = fds,
            "limits.max_connections lowered to stay below the file-descriptor limit"
        );
    }
    Gate::new(
        Caps {
            total,
            pending: limits.max_pending_connections.min(total),
            pending_per_peer: limits.max_pending_per_peer,
            per_peer: limits.max_connections_per_peer,
        },
        metrics.limits.clone(),
    )
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut last_warning: Option<Instant> = None;
    let header_timeout = Duration::from_millis(shared.settings.limits.http_header_timeout_ms);
    let idle_timeout = Duration::from_millis(shared.settings.limits.http_idle_timeout_ms);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shared.unlisten.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Never stop accepting: back off briefly, and when file
                    // descriptors ran out, free one from an unauthenticated
                    // connection. One warning per second at most.
                    let m = &shared.metrics.limits;
                    if crate::limits::is_fd_exhaustion(&e) {
                        m.count(&m.accept_fd_exhausted);
                        shared.gate.shed_for_fds();
                    } else {
                        m.count(&m.accept_other_errors);
                    }
                    if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        warn!(error = %e, "accept failed; backing off");
                        last_warning = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let permit = match shared.gate.admit(peer.ip()) {
            Ok(p) => p,
            Err(why) => {
                // Refused at once: a best-effort 503 without waiting, then close.
                let _ = stream.try_write(crate::limits::REFUSED_RESPONSE);
                debug!(%peer, ?why, "connection refused");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let shared2 = shared.clone();
        tokio::spawn(async move {
            let evicted = permit.evicted().clone();
            let (io, moved) = crate::limits::Activity::new(stream);
            let for_upgrade = permit.clone();
            let svc = hyper::service::service_fn(move |mut req| {
                let shared = shared2.clone();
                req.extensions_mut().insert(for_upgrade.clone());
                async move { Ok::<_, Infallible>(handle_http(shared, peer, req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades();
            drop(permit);
            let m = &shared.metrics.limits;
            tokio::select! {
                r = conn => if let Err(e) = r {
                    if e.is_timeout() {
                        m.count(&m.http_header_timeouts);
                    }
                    debug!(%peer, error = %e, "http connection ended with an error");
                },
                () = evicted.cancelled() => debug!(%peer, "http connection evicted"),
                () = crate::limits::idle(moved, idle_timeout) => {
                    m.count(&m.http_idle_timeouts);
                    debug!(%peer, "http connection idle; closed");
                }
            }
        });
    }
}

/// On each new generation: tell every connection (`gateway.generation`), or
/// close them all when `restart.connections = "close"`. A connection's
/// writer also tells it before the first response of a generation it was
/// not told of yet, so this broadcast may come second; the writer skips it
/// then.
async fn watch_generations(shared: Arc<Shared>) {
    let mut rx = shared.gateway.subscribe();
    rx.borrow_and_update();
    loop {
        tokio::select! {
            _ = shared.stopping.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
        rx.borrow_and_update();
        let scope = shared.gateway.current();
        if scope.timings().connections == RestartConnections::Close {
            let payload = raw(&json!({"reason": "gateway restarting", "restartExpectedMs": 1500}));
            for outbox in shared.table.outboxes() {
                outbox.event("shutdown".into(), payload.clone());
                outbox.close(1012, "service restart");
            }
        } else {
            let (generation, payload) = shared.notices.current();
            shared.table.announce_all(generation, &payload);
        }
    }
}

type HttpResponse = Response<Full<Bytes>>;

fn handle_http(shared: Arc<Shared>, peer: SocketAddr, req: Request<Incoming>) -> HttpResponse {
    if is_upgrade(&req) {
        return upgrade(shared, peer, req);
    }
    let head = req.method() == Method::HEAD;
    let get = req.method() == Method::GET || head;
    match req.uri().path() {
        "/healthz" | "/health" if get => {
            let stats = shared.gateway.stats();
            let body = json!({"ok": true, "status": "live", "generation": stats.generation,
                "uptimeMs": stats.uptime.as_millis() as u64});
            probe(StatusCode::OK, &body, head)
        }
        "/readyz" | "/ready" if get => {
            let scope = shared.gateway.current();
            let failed: Vec<_> = scope
                .plugin_phases()
                .into_iter()
                .filter_map(|(id, p)| match p {
                    PluginPhase::Failed(e) => Some(json!({"id": id, "error": e})),
                    _ => None,
                })
                .collect();
            let degraded: Vec<_> = scope
                .plugin_degraded()
                .into_iter()
                .map(|(id, reason)| json!({"id": id, "reason": reason}))
                .collect();
            let closing = shared.gateway.is_closing() || shared.stopping.is_cancelled();
            let ready = failed.is_empty() && degraded.is_empty() && !closing;
            let mut body = json!({"ok": ready, "status": if ready {"ready"} else {"not-ready"},
                "generation": scope.generation()});
            if !failed.is_empty() {
                body["failedPlugins"] = json!(failed);
            }
            if !degraded.is_empty() {
                body["degradedPlugins"] = json!(degraded);
            }
            if closing {
                body["reason"] = json!("gateway stopping");
            }
            let code = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            probe(code, &body, head)
        }
        "/metrics" if get => {
            let text = shared.metrics.render(&shared.gateway, shared.table.len());
            let mut r = Response::new(Full::new(if head {
                Bytes::new()
            } else {
                Bytes::from(text)
            }));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        "/healthz" | "/health" | "/readyz" | "/ready" | "/metrics" => {
            let mut r = probe(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"ok": false, "status": "method-not-allowed"}),
                false,
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
        path if crate::dashboard::serves(path) => crate::dashboard::respond(path, get, head),
        _ => probe(
            StatusCode::NOT_FOUND,
            &json!({"ok": false, "status": "not-found"}),
            head,
        ),
    }
}

fn probe(code: StatusCode, body: &serde_json::Value, head: bool) -> HttpResponse {
    let text = if head {
        Bytes::new()
    } else {
        Bytes::from(body.to_string())
    };
    let mut r = Response::new(Full::new(text));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|p| p.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    has(header::UPGRADE, "websocket") && has(header::CONNECTION, "upgrade")
}

fn upgrade(shared: Arc<Shared>, peer: SocketAddr, mut req: Request<Incoming>) -> HttpResponse {
    if !crate::limits::origin_allowed(req.headers(), &shared.settings.limits.allowed_origins) {
        let m = &shared.metrics.limits;
        m.count(&m.origin_refused);
        debug!(%peer, "websocket upgrade refused for its origin");
        return probe(
            StatusCode::FORBIDDEN,
            &json!({"ok": false, "status": "forbidden", "reason": "origin not allowed"}),
            false,
        );
    }
    let Some(permit) = req.extensions_mut().remove::<Arc<Permit>>() else {
        return probe(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"ok": false, "status": "busy"}),
            false,
        );
    };
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let version_ok = req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    let (Some(key), true, true) = (key, version_ok, req.method() == Method::GET) else {
        let mut r = probe(
            StatusCode::BAD_REQUEST,
            &json!({"ok": false, "status": "bad-websocket-request"}),
            false,
        );
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return r;
    };
    if shared.stopping.is_cancelled() {
        return probe(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"ok": false, "status": "not-ready", "reason": "gateway stopping"}),
            false,
        );
    }
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let tracker = shared.connections.clone();
    tracker.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let limits = &shared.settings.limits;
                let config = websocket_config(limits);
                let backlog =
                    WriteBacklog::new(limits.max_buffered_bytes, shared.metrics.limits.clone());
                // Twice the pre-auth frame cap: room for frame headers and a
                // request pipelined right behind `connect`, never a large frame.
                let budget = PreauthBudget::new(2 * crate::config::PREAUTH_MAX_PAYLOAD)
                    .with_connection(permit, backlog.clone());
                let ws = WebSocketStream::from_raw_socket(
                    WriteMeter::new(
                        PreauthCap::new(TokioIo::new(upgraded), budget.clone()),
                        backlog,
                    ),
                    WsRole::Server,
                    Some(config),
                )
                .await;
                run_connection(shared, ws, peer, budget).await;
            }
            Err(e) => debug!(%peer, error = %e, "websocket upgrade failed"),
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

/// Buffer sizes for one WebSocket. Small read and write buffers keep an
/// idle connection cheap (tungstenite allocates its read buffer up front);
/// large frames still get a buffer of their own size. The write buffer may
/// grow (with pongs a client never reads) only to `maxBufferedBytes` plus
/// room for a close frame; the [`WriteMeter`] closes the connection before.
fn websocket_config(limits: &crate::config::Limits) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(limits.max_payload))
        .max_frame_size(Some(limits.max_payload))
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_write_buffer_size(limits.max_buffered_bytes.max(WS_WRITE_BUFFER) + CLOSE_ROOM)
}

/// Bytes read from the socket at a time.
const WS_READ_BUFFER: usize = 4 * 1024;
/// Outgoing bytes collected before a write to the socket (a flush writes
/// what is there).
const WS_WRITE_BUFFER: usize = 8 * 1024;
/// Room above the budget for a close frame and pongs in flight.
const CLOSE_ROOM: usize = 64 * 1024;

/// The first connection id of this process: its start time in unix ms,
/// times 1000. Plugins persist connection ids (the bncr store keeps the
/// connection holding each lease so that a client survives an in-process
/// restart); ids counted from 1 in every process let a lease restored after
/// a crash name whichever new connection got the same id. Ids stay below
/// 2^53, so JSON clients read them exactly.
fn first_conn_id() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    ms.saturating_mul(1000).max(1)
}

async fn run_connection<S>(
    shared: Arc<Shared>,
    ws: WebSocketStream<S>,
    peer: SocketAddr,
    budget: PreauthBudget,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn_id = ConnId(shared.next_conn.fetch_add(1, Ordering::Relaxed));
    let limits = shared.settings.limits.clone();
    let (sink, mut stream) = ws.split();
    let (outbox, rx) = Outbox::new(limits.max_buffered_bytes);
    budget.attach(&outbox);
    let ping_every = Duration::from_millis(limits.ping_interval_ms);
    let notices = shared.clone();
    let announce = move || notices.notices.current();
    let writer = tokio::spawn(run_writer(rx, sink, ping_every, announce));
    debug!(%peer, conn = %conn_id, "connection opened");
    crate::handshake::send_challenge(&outbox);
    let handshake = tokio::time::timeout(
        shared.settings.handshake_timeout(),
        crate::handshake::run(&shared, &mut stream, &outbox, peer, conn_id),
    )
    .await;
    let admitted = match handshake {
        Ok(r) => r,
        Err(_) => {
            outbox.close(1008, "handshake timeout");
            shared
                .metrics
                .ops
                .handshake_refused("handshake timeout", None);
            None
        }
    };
    if let Some((info, _generation)) = admitted {
        budget.lift();
        shared.table.insert(info.clone(), outbox.clone());
        shared.gateway.connection_opened(&info);
        // A restart may have swapped between hello-ok and joining the
        // table; the writer drops this when hello-ok already described it.
        let (generation, payload) = shared.notices.current();
        outbox.generation(generation, payload);
        serve(&shared, &mut stream, &outbox, info, &limits).await;
        shared.table.remove(conn_id);
        shared.gateway.connection_closed(conn_id);
    }
    // Let queued frames and the close frame go out and read until the
    // client's close reply (or the socket ends), within a bound.
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(_)) = stream.next().await {}
        if outbox.close_requested() {
            // The read side failed first (e.g. an oversized frame): let our
            // close frame out and give the peer a moment to read it before
            // the socket is dropped (unread input would reset it).
            outbox.closed().cancelled().await;
            tokio::time::sleep(CLOSE_LINGER).await;
        }
    })
    .await;
    outbox.closed().cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    shared.metrics.ops.connection_closed(outbox.close_code());
    debug!(%peer, conn = %conn_id, "connection closed");
}

async fn serve<S>(
    shared: &Arc<Shared>,
    stream: &mut S,
    outbox: &Arc<Outbox>,
    info: Arc<ConnectionInfo>,
    limits: &crate::config::Limits,
) where
    S: futures::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let in_flight = Arc::new(AtomicUsize::new(0));
    let tick_every = Duration::from_millis(limits.tick_interval_ms);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + tick_every, tick_every);
    let idle = Duration::from_millis(limits.ping_interval_ms) * 2 + Duration::from_secs(5);
    let mut last_seen = tokio::time::Instant::now();
    // Created once: a timer and a cancellation waiter per frame would cost
    // more than the frame. The idle timer is pushed back lazily, only when
    // it fires and the client was heard from since.
    let idle_timer = tokio::time::sleep_until(last_seen + idle);
    let closed = outbox.closed().clone();
    let closed = closed.cancelled();
    tokio::pin!(idle_timer, closed);
    loop {
        let msg = tokio::select! {
            () = &mut closed => return,
            _ = tick.tick() => {
                let payload = raw(&json!({"ts": unix_ms()}));
                outbox.event_if_idle("tick".into(), payload);
                continue;
            }
            () = &mut idle_timer => {
                if last_seen + idle > tokio::time::Instant::now() {
                    idle_timer.as_mut().reset(last_seen + idle);
                    continue;
                }
                debug!(conn = %info.conn_id, "keepalive timeout");
                outbox.close(1001, "keepalive timeout");
                return;
            }
            m = stream.next() => m,
        };
        last_seen = tokio::time::Instant::now();
        outbox.mark_activity(unix_ms());
        let msg = match msg {
            None | Some(Ok(Message::Close(_))) => return,
            Some(Ok(m)) => m,
            Some(Err(tungstenite::Error::Capacity(_))) => {
                outbox.close(1009, "payload too large");
                return;
            }
            Some(Err(e)) => {
                debug!(conn = %info.conn_id, error = %e, "read failed");
                if let Some((code, reason)) = read_error_close(&shared.metrics.limits, &e) {
                    outbox.close(code, reason);
                }
                return;
            }
        };
        let text = match &msg {
            Message::Text(t) => t.as_str(),
            Message::Binary(_) => {
                let (code, reason) = binary_frame_close(&shared.metrics.limits);
                outbox.close(code, reason);
                return;
            }
            _ => continue,
        };
        if text.len() > limits.max_payload {
            outbox.close(1009, "payload too large");
            return;
        }
        handle_request(
            shared,
            outbox,
            &info,
            &in_flight,
            text,
            limits.max_in_flight,
        );
    }
}

fn handle_request(
    shared: &Arc<Shared>,
    outbox: &Arc<Outbox>,
    info: &Arc<ConnectionInfo>,
    in_flight: &Arc<AtomicUsize>,
    text: &str,
    max_in_flight: usize,
) {
    let frame = match gateway_core::frame::parse_request(text) {
        Ok(f) => f,
        Err(e) => {
            if let Some(id) = &e.id {
                outbox.frame(encode_response(id, &Err(e.to_rpc_error())));
            }
            return;
        }
    };
    if frame.method == "connect" {
        let err = RpcError::invalid_request("invalid handshake: already connected")
            .with_details(json!({"code": "ALREADY_CONNECTED"}));
        outbox.frame(encode_response(&frame.id, &Err(err)));
        return;
    }
    if in_flight.fetch_add(1, Ordering::AcqRel) >= max_in_flight {
        in_flight.fetch_sub(1, Ordering::AcqRel);
        let err = RpcError::unavailable(BUSY).retryable_after(Some(250));
        shared.metrics.observe_request(
            bounded_method(shared, &frame.method),
            "busy",
            Duration::ZERO,
        );
        outbox.frame(encode_response(&frame.id, &Err(err)));
        return;
    }
    let id = frame.id.into_owned();
    let method = frame.method.into_owned();
    let params = frame
        .params
        .map(|p| Params::from_raw(p.to_owned()))
        .unwrap_or_default();
    let ctx = RequestContext::new(info.clone());
    let (shared, outbox, in_flight) = (shared.clone(), outbox.clone(), in_flight.clone());
    let tracker = shared.requests.clone();
    let answer = async move {
        let started = Instant::now();
        let (generation, result) = shared.gateway.dispatch_tagged(ctx, &method, params).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => {
                shared.metrics.ops.request_failed(e);
                outcome_label(e)
            }
        };
        outbox.response(encode_response(&id, &result), generation);
        in_flight.fetch_sub(1, Ordering::AcqRel);
        shared.metrics.observe_request(
            bounded_method(&shared, &method),
            outcome,
            started.elapsed(),
        );
    };
    // Most methods answer without waiting (sync handlers): run them here and
    // spare the task spawn. A request that has to wait continues as its own
    // task; its first poll there registers real wakers, so the no-op waker of
    // this first poll is never relied on.
    let mut answer = Box::pin(answer);
    let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
    if answer.as_mut().poll(&mut cx).is_pending() {
        tracker.spawn(answer);
    }
}

fn outcome_label(e: &RpcError) -> &'static str {
    use plugin_api::ErrorCode::*;
    match e.code {
        InvalidRequest => "invalid_request",
        Forbidden => "forbidden",
        Unavailable => "unavailable",
        NotPaired => "not_paired",
        AgentTimeout => "agent_timeout",
        ApprovalNotFound => "approval_not_found",
    }
}

/// The method name if the current registry has it, else `unknown`: keeps
/// the metric label set bounded.
fn bounded_method<'m>(shared: &Shared, method: &'m str) -> &'m str {
    if shared.gateway.dispatches(method) {
        method
    } else {
        "unknown"
    }
}
