//! Run a plugin written against `plugin-api` as a command plugin.
//!
//! ```no_run
//! use plugin_api::{Plugin, PluginContext, PluginFactory, Registrar, scope};
//! use std::sync::Arc;
//!
//! struct Hello;
//! impl Plugin for Hello {
//!     fn id(&self) -> &str { "hello" }
//!     fn version(&self) -> &str { "1.0.0" }
//!     fn register(&self, r: &mut plugin_api::Registrar) {
//!         r.method("hello.say").scope(scope::READ).sync(|_, _| Ok("hi".into()));
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     plugin_stdio::serve(PluginFactory::new("hello", "1.0.0", |_ctx: PluginContext| {
//!         Ok(Arc::new(Hello))
//!     }))
//! }
//! ```
//!
//! The binary then speaks the gateway's plugin protocol on stdin/stdout: the
//! gateway starts it for every generation (so a rebuilt binary answers after
//! the next restart), constructs the plugin from the `initialize` handshake,
//! declares what `register` declared, runs calls concurrently, starts and
//! stops services when told, and exits on `shutdown` or when stdin closes.
//! Write logs to stderr; stdout belongs to the protocol.
//!
//! Out of process, a plugin cannot declare channels (`send` routing),
//! node-only methods, connection-opened or connection-closed hooks, or
//! health checks; each kind declared is named on stderr (which the gateway
//! logs) and left out. [`run`] takes any reader and writer, so a plugin can be
//! tested without a gateway.

use plugin_api::host::{EventTransport, Handler, OutboundEvent};
use plugin_api::{
    ClientInfo, ConnId, ConnectionInfo, Params, PluginContext, PluginFactory, RequiredScope, Role,
    RpcError, Scopes, Service, Value,
};
use plugin_protocol::{
    self as proto, CallParams, CallResult, CancelParams, EmitParams, ErrorObject, InitializeParams,
    InitializeResult, Message, MessageKind, MethodDecl, method,
};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// Serve `factory`'s plugin on this process's stdin and stdout until the
/// gateway says `shutdown` or closes stdin. Call it from `main`.
pub fn serve(factory: PluginFactory) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("plugin {}: cannot start a runtime: {e}", factory.id);
            return ExitCode::FAILURE;
        }
    };
    let served = rt.block_on(async {
        // Pipes (what the gateway gives) are read and written through epoll;
        // tokio's stdin/stdout would hand every read to a blocking thread.
        match (pipe_in(), pipe_out()) {
            (Some(input), Some(output)) => run(factory.clone(), input, output).await,
            _ => run(factory.clone(), tokio::io::stdin(), tokio::io::stdout()).await,
        }
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("plugin {}: {e}", factory.id);
            ExitCode::FAILURE
        }
    }
}

fn pipe_in() -> Option<tokio::net::unix::pipe::Receiver> {
    use std::os::fd::AsFd;
    let fd = std::io::stdin().as_fd().try_clone_to_owned().ok()?;
    tokio::net::unix::pipe::Receiver::from_file(std::fs::File::from(fd)).ok()
}

fn pipe_out() -> Option<tokio::net::unix::pipe::Sender> {
    use std::os::fd::AsFd;
    let fd = std::io::stdout().as_fd().try_clone_to_owned().ok()?;
    tokio::net::unix::pipe::Sender::from_file(std::fs::File::from(fd)).ok()
}

/// Events go to the gateway as `emit` notifications.
struct StdioTransport {
    out: mpsc::UnboundedSender<String>,
}

impl StdioTransport {
    fn emit(&self, event: &OutboundEvent, conn_ids: Option<Vec<u64>>, scope: Option<&str>) -> bool {
        let payload = serde_json::from_str(event.payload.get()).unwrap_or(Value::Null);
        let params = EmitParams {
            event: event.name.to_string(),
            payload,
            conn_ids,
            scope: scope.map(str::to_string),
        };
        self.out
            .send(proto::notification_line(method::EMIT, &params))
            .is_ok()
    }
}

impl EventTransport for StdioTransport {
    fn send_to(&self, conn: ConnId, event: &OutboundEvent) -> bool {
        self.emit(event, Some(vec![conn.0]), None)
    }

    /// Returns 0: the gateway counts receivers, the plugin does not wait.
    fn broadcast(&self, required_scope: &str, event: &OutboundEvent) -> usize {
        self.emit(event, None, Some(required_scope));
        0
    }
}

struct Served {
    methods: HashMap<String, Handler>,
    services: Vec<Arc<dyn Service>>,
    _life: plugin_api::host::LifeController,
}

/// Speak the protocol on `input` / `output` until `shutdown` or the end of
/// `input`. What [`serve`] runs; usable in tests with in-memory pipes.
pub async fn run<R, W>(factory: PluginFactory, input: R, output: W) -> Result<(), String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(async move {
        let mut output = output;
        while let Some(line) = rx.recv().await {
            if output.write_all(line.as_bytes()).await.is_err() {
                return;
            }
            while let Ok(more) = rx.try_recv() {
                if output.write_all(more.as_bytes()).await.is_err() {
                    return;
                }
            }
            if output.flush().await.is_err() {
                return;
            }
        }
    });
    let mut served: Option<Arc<Served>> = None;
    let mut calls: HashMap<proto::Id, AbortHandle> = HashMap::new();
    let mut lines = BufReader::new(input).lines();
    while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
        if line.is_empty() {
            continue;
        }
        let Ok(msg) = Message::parse(&line) else {
            eprintln!(
                "plugin {}: the gateway sent a line that is not JSON",
                factory.id
            );
            continue;
        };
        calls.retain(|_, h| !h.is_finished());
        match msg.kind() {
            MessageKind::Request { id, method, params } => match method {
                method::INITIALIZE => {
                    let line = match initialize(&factory, params, &tx) {
                        Ok((s, result)) => {
                            served = Some(Arc::new(s));
                            proto::result_line(id, &result)
                        }
                        Err(message) => proto::error_line(
                            id,
                            &ErrorObject::new(proto::code::INTERNAL_ERROR, message),
                        ),
                    };
                    let _ = tx.send(line);
                }
                method::CALL => {
                    let Some(s) = served.clone() else {
                        let _ = tx.send(not_initialized(id));
                        continue;
                    };
                    let p: Result<CallParams, _> =
                        serde_json::from_str(params.map_or("null", RawValue::get));
                    let tx2 = tx.clone();
                    let task = tokio::spawn(async move {
                        let result = match p {
                            Ok(p) => call(&s, p).await,
                            Err(e) => failed(RpcError::invalid_params(e)),
                        };
                        let _ = tx2.send(proto::result_line(id, &result));
                    });
                    calls.insert(id, task.abort_handle());
                }
                method::START | method::STOP => {
                    let Some(s) = served.clone() else {
                        let _ = tx.send(not_initialized(id));
                        continue;
                    };
                    let start = method == method::START;
                    let tx2 = tx.clone();
                    tokio::spawn(async move {
                        let line = match services(&s, start).await {
                            Ok(()) => proto::result_line(id, &serde_json::json!({})),
                            Err(message) => proto::error_line(
                                id,
                                &ErrorObject::new(proto::code::INTERNAL_ERROR, message),
                            ),
                        };
                        let _ = tx2.send(line);
                    });
                }
                method::PING => {
                    let _ = tx.send(proto::result_line(id, &serde_json::json!({})));
                }
                other => {
                    let _ = tx.send(proto::error_line(
                        id,
                        &ErrorObject::new(
                            proto::code::METHOD_NOT_FOUND,
                            format!("unknown method {other}"),
                        ),
                    ));
                }
            },
            MessageKind::Notification { method, params } => match method {
                method::CANCEL => {
                    if let Ok(p) =
                        serde_json::from_str::<CancelParams>(params.map_or("null", RawValue::get))
                        && let Some(h) = calls.remove(&p.id)
                    {
                        h.abort();
                    }
                }
                method::SHUTDOWN => break,
                _ => {}
            },
            MessageKind::Response { .. } | MessageKind::Invalid(_) => {}
        }
    }
    for (_, h) in calls.drain() {
        h.abort();
    }
    drop(served);
    drop(tx);
    let _ = writer.await;
    Ok(())
}

fn not_initialized(id: proto::Id) -> String {
    proto::error_line(
        id,
        &ErrorObject::new(proto::code::INVALID_REQUEST, "initialize first"),
    )
}

fn initialize(
    factory: &PluginFactory,
    params: Option<&RawValue>,
    tx: &mpsc::UnboundedSender<String>,
) -> Result<(Served, InitializeResult), String> {
    let p: InitializeParams = serde_json::from_str(params.map_or("null", RawValue::get))
        .map_err(|e| format!("invalid initialize params: {e}"))?;
    let version = proto::PROTOCOL_VERSIONS
        .iter()
        .rev()
        .find(|v| p.protocol_versions.contains(v))
        .copied()
        .ok_or_else(|| {
            format!(
                "no common protocol version: host {:?}, plugin {:?}",
                p.protocol_versions,
                proto::PROTOCOL_VERSIONS
            )
        })?;
    let (life, controller) = plugin_api::host::scope_life(p.generation);
    let transport = Arc::new(StdioTransport { out: tx.clone() });
    let (sink, declarer) = plugin_api::host::event_sink(&p.plugin_id, life.clone(), transport);
    let ctx = PluginContext {
        plugin_id: p.plugin_id.clone(),
        config: p.config,
        state_dir: p.state_dir.into(),
        events: sink.clone(),
        life,
    };
    let plugin = (factory.create)(ctx).map_err(|e| format!("constructor failed: {e}"))?;
    let mut registrar = plugin_api::host::registrar(&p.plugin_id);
    plugin.register(&mut registrar);
    let decl = plugin_api::host::declarations(registrar);
    declarer.declare(decl.events.iter().cloned());
    let unavailable = unavailable_out_of_process(&decl);
    if !unavailable.is_empty() {
        eprintln!(
            "plugin {}: {} not available to command plugins; ignored",
            p.plugin_id,
            unavailable.join(", ")
        );
    }
    let mut methods = HashMap::new();
    let mut decls = Vec::new();
    for m in decl.methods {
        if m.node_only {
            eprintln!(
                "plugin {}: node-only method {} is not available to command plugins; ignored",
                p.plugin_id, m.name
            );
            continue;
        }
        decls.push(MethodDecl {
            name: m.name.clone(),
            scope: Some(match &m.scope {
                RequiredScope::None => "none".to_string(),
                RequiredScope::Scope(s) => s.clone(),
            }),
            advertise: m.advertise,
        });
        methods.insert(m.name, m.handler);
    }
    let result = InitializeResult {
        protocol_version: version,
        name: Some(factory.name.clone()),
        version: Some(plugin.version().to_string()),
        methods: decls,
        events: decl.events,
        services: decl.services.iter().map(|s| s.name().to_string()).collect(),
    };
    Ok((
        Served {
            methods,
            services: decl.services,
            _life: controller,
        },
        result,
    ))
}

fn failed(e: RpcError) -> CallResult {
    CallResult {
        ok: false,
        payload: None,
        error: Some(proto::CallError {
            code: e.code.as_str().to_string(),
            message: e.message,
            details: e.details,
            retryable: e.retryable,
            retry_after_ms: e.retry_after_ms,
        }),
    }
}

async fn call(s: &Served, p: CallParams) -> CallResult {
    let Some(handler) = s.methods.get(&p.method).cloned() else {
        return failed(RpcError::invalid_request(format!(
            "unknown method: {}",
            p.method
        )));
    };
    let role = if p.client.role == "node" {
        Role::Node
    } else {
        Role::Operator
    };
    let client: ClientInfo = serde_json::from_value(p.client.client).unwrap_or_default();
    let ctx = plugin_api::host::request_context(Arc::new(ConnectionInfo {
        conn_id: ConnId(p.client.conn_id),
        role,
        scopes: Scopes::new(p.client.scopes),
        client,
    }));
    let params = p.params.map_or_else(Params::none, Params::from_raw);
    // A panicking handler fails its call, not the plugin.
    let outcome = tokio::spawn(async move {
        match handler {
            Handler::Sync(f) => f(&ctx, params),
            Handler::Async(f) => f(ctx, params).await,
        }
    })
    .await;
    match outcome {
        Ok(Ok(payload)) => CallResult {
            ok: true,
            payload: Some(payload),
            error: None,
        },
        Ok(Err(e)) => failed(e),
        Err(e) => failed(RpcError::unavailable(format!(
            "handler for {} panicked: {e}",
            p.method
        ))),
    }
}

async fn services(s: &Served, start: bool) -> Result<(), String> {
    if start {
        for svc in &s.services {
            svc.clone()
                .start()
                .await
                .map_err(|e| format!("service {}: {e}", svc.name()))?;
        }
    } else {
        for svc in s.services.iter().rev() {
            svc.clone().stop().await;
        }
    }
    Ok(())
}

/// The kinds of declarations `decl` holds that a plugin process cannot
/// serve, named for the warning.
fn unavailable_out_of_process(decl: &plugin_api::host::Declarations) -> Vec<&'static str> {
    [
        (!decl.channels.is_empty(), "channels"),
        (
            !decl.connection_opened.is_empty(),
            "connection-opened hooks",
        ),
        (
            !decl.connection_closed.is_empty(),
            "connection-closed hooks",
        ),
        (!decl.health.is_empty(), "health checks"),
    ]
    .into_iter()
    .filter_map(|(declared, kind)| declared.then_some(kind))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_api::{Plugin, scope};
    use tokio::io::AsyncBufReadExt;

    struct Adder;
    impl Plugin for Adder {
        fn id(&self) -> &str {
            "adder"
        }
        fn version(&self) -> &str {
            "1.2.3"
        }
        fn register(&self, r: &mut plugin_api::Registrar) {
            r.event("plugin.adder.sum");
            r.method("adder.add").scope(scope::READ).sync(|ctx, p| {
                let v = p.to_value();
                let sum = v["a"].as_i64().unwrap_or(0) + v["b"].as_i64().unwrap_or(0);
                Ok(serde_json::json!({"sum": sum, "conn": ctx.conn_id().0}))
            });
            r.method("adder.boom").sync(|_, _| panic!("boom"));
        }
    }

    #[test]
    fn every_kind_a_process_cannot_serve_is_named() {
        let decl = |f: &dyn Fn(&mut plugin_api::Registrar)| {
            let mut r = plugin_api::host::registrar("p");
            f(&mut r);
            plugin_api::host::declarations(r)
        };
        assert!(unavailable_out_of_process(&decl(&|r| Adder.register(r))).is_empty());
        let all = decl(&|r| {
            r.on_connection_opened(|_| {});
            r.on_connection_closed(|_| {});
            r.health_check(|| None);
        });
        assert_eq!(
            unavailable_out_of_process(&all),
            [
                "connection-opened hooks",
                "connection-closed hooks",
                "health checks"
            ]
        );
    }

    #[tokio::test]
    async fn handshake_then_calls_answer_by_id() {
        let factory = PluginFactory::new("adder", "1.2.3", |_ctx: PluginContext| {
            Ok(Arc::new(Adder) as Arc<dyn Plugin>)
        });
        let (host_in, plugin_out) = tokio::io::duplex(64 * 1024);
        let (plugin_in, mut host_out) = tokio::io::duplex(64 * 1024);
        let served = tokio::spawn(run(factory, plugin_in, plugin_out));
        let init = InitializeParams {
            protocol_versions: vec![1],
            generation: 4,
            plugin_id: "adder".into(),
            config: serde_json::json!({}),
            state_dir: "/tmp".into(),
            tmp_dir: "/tmp".into(),
        };
        let client =
            serde_json::json!({"connId": 9, "role": "operator", "scopes": ["operator.read"]});
        let mut script = proto::request_line(1, method::INITIALIZE, &init);
        script += &proto::request_line(
            2,
            method::CALL,
            &serde_json::json!({"method": "adder.add", "params": {"a": 2, "b": 40}, "client": client, "deadlineMs": 1000}),
        );
        script += &proto::request_line(
            3,
            method::CALL,
            &serde_json::json!({"method": "adder.boom", "client": client, "deadlineMs": 1000}),
        );
        host_out.write_all(script.as_bytes()).await.unwrap();
        let mut lines = BufReader::new(host_in).lines();
        let mut answers = HashMap::new();
        while answers.len() < 3 {
            let l = lines.next_line().await.unwrap().unwrap();
            let v: Value = serde_json::from_str(&l).unwrap();
            answers.insert(v["id"].as_u64().unwrap(), v);
        }
        let shutdown = proto::notification_line(method::SHUTDOWN, &());
        host_out.write_all(shutdown.as_bytes()).await.unwrap();
        served.await.unwrap().unwrap();
        let init = &answers[&1]["result"];
        assert_eq!(init["protocolVersion"], 1);
        assert_eq!(init["version"], "1.2.3");
        assert_eq!(
            init["methods"],
            serde_json::json!([{"name":"adder.add","scope":"operator.read"},{"name":"adder.boom","scope":"operator.admin"}])
        );
        assert_eq!(init["events"], serde_json::json!(["plugin.adder.sum"]));
        assert_eq!(
            answers[&2]["result"],
            serde_json::json!({"ok": true, "payload": {"sum": 42, "conn": 9}})
        );
        assert_eq!(answers[&3]["result"]["ok"], false);
        assert!(
            answers[&3]["result"]["error"]["message"]
                .as_str()
                .unwrap()
                .contains("panicked")
        );
    }
}
