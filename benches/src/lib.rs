//! Fixtures shared by the criterion benchmarks in `benches/`: plugins that
//! declare bench methods, and gateways built from them.
//!
//! Nothing here is timed; the bench targets decide what is measured.

use gateway_core::{Catalog, Gateway, GatewayConfig, GatewayOptions, StaticConfig};
use plugin_api::host::{Declarations, NullTransport};
use plugin_api::{
    BoxFuture, MethodResult, Plugin, PluginContext, PluginFactory, Registrar, Service, Value,
};
use serde_json::json;
use std::sync::Arc;

/// The sync method both sides answer: a small JSON object, no awaiting.
pub const TRIVIAL: &str = "bench.trivial";
/// The async method both sides answer: yields to the runtime once, then
/// answers the same object.
pub const ASYNC: &str = "bench.async";

/// What [`TRIVIAL`] and [`ASYNC`] answer, on both sides.
pub fn small_object() -> Value {
    json!({ "ok": true, "n": 1 })
}

/// The async handler body shared by both sides: really yields once.
pub async fn yield_once() -> Value {
    tokio::task::yield_now().await;
    small_object()
}

/// A plugin `id` that declares [`TRIVIAL`] and [`ASYNC`] (when `dispatch`),
/// plus `methods` sync filler methods `{id}.m{j}`, plus one trivial service
/// when `service`. All need no scope.
#[derive(Debug, Clone)]
pub struct BenchPlugin {
    id: String,
    dispatch: bool,
    methods: usize,
    service: bool,
}

impl BenchPlugin {
    /// The plugin serving [`TRIVIAL`] and [`ASYNC`], id `bench`.
    pub fn dispatch() -> Self {
        BenchPlugin {
            id: "bench".into(),
            dispatch: true,
            methods: 0,
            service: false,
        }
    }

    /// A filler plugin `p{index}` with `methods` sync methods.
    pub fn filler(index: usize, methods: usize) -> Self {
        BenchPlugin {
            id: format!("p{index}"),
            dispatch: false,
            methods,
            service: false,
        }
    }

    /// Also declare one service whose start and stop return at once.
    pub fn with_service(mut self) -> Self {
        self.service = true;
        self
    }

    /// The plugin's factory, for a [`Catalog`].
    pub fn factory(self) -> PluginFactory {
        let id = self.id.clone();
        // A fresh instance per generation, as the host expects.
        PluginFactory::new(&id, "1.0.0", move |_ctx: PluginContext| {
            Ok(Arc::new(self.clone()) as Arc<dyn Plugin>)
        })
    }

    /// What the plugin declares, as the host would collect it.
    pub fn declarations(&self) -> Declarations {
        let mut r = plugin_api::host::registrar(&self.id);
        self.register(&mut r);
        plugin_api::host::declarations(r)
    }
}

impl Plugin for BenchPlugin {
    fn id(&self) -> &str {
        &self.id
    }

    fn version(&self) -> &str {
        "1.0.0"
    }

    fn register(&self, r: &mut Registrar) {
        if self.dispatch {
            r.method(TRIVIAL).no_scope().sync(|_, _| Ok(small_object()));
            r.method(ASYNC)
                .no_scope()
                .handler(|_, _| async { MethodResult::Ok(yield_once().await) });
        }
        for j in 0..self.methods {
            r.method(format!("{}.m{j}", self.id))
                .no_scope()
                .sync(|_, _| Ok(Value::Null));
        }
        if self.service {
            r.service(Arc::new(TrivialService));
        }
    }
}

/// A service whose start and stop do nothing.
#[derive(Debug)]
struct TrivialService;

impl Service for TrivialService {
    fn name(&self) -> &str {
        "trivial"
    }

    fn start(self: Arc<Self>) -> BoxFuture<Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    fn stop(self: Arc<Self>) -> BoxFuture<()> {
        Box::pin(async {})
    }
}

/// `count` filler plugins of `methods` methods each, with a service each
/// when `service`.
pub fn fillers(count: usize, methods: usize, service: bool) -> Vec<BenchPlugin> {
    (0..count)
        .map(|i| {
            let p = BenchPlugin::filler(i, methods);
            if service { p.with_service() } else { p }
        })
        .collect()
}

/// Start a gateway serving `plugins` (plus the core plugin) with the default
/// config. Must run inside a tokio runtime.
pub async fn start_gateway(plugins: Vec<BenchPlugin>) -> Gateway {
    let catalog = plugins
        .into_iter()
        .fold(Catalog::new(), |c, p| c.with(p.factory()));
    Gateway::start(GatewayOptions {
        catalog,
        config: Arc::new(StaticConfig::new(GatewayConfig::default())),
        // Bench plugins write nothing; the directory need not exist.
        state_dir: std::env::temp_dir().join("gateway-benches"),
        transport: Arc::new(NullTransport),
    })
    .await
    .expect("bench gateway builds")
}

/// A current-thread tokio runtime, as both sides of every async bench use.
pub fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}
