//! A probe plugin whose every construction, start, stop, task tick and
//! request is recorded in a `Probe` owned by the test.

#![allow(dead_code, unreachable_pub)]

use gateway_core::{Catalog, Gateway, GatewayConfig, GatewayOptions, PluginEntry, StaticConfig};
use plugin_api::host::NullTransport;
use plugin_api::{
    BoxFuture, ConnId, EventSink, MethodResult, Params, Plugin, PluginContext, PluginError,
    PluginFactory, Registrar, ScopeHandle, ScopeLife, Service, Value, scope,
};
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the probe saw, across generations.
#[derive(Default)]
pub struct Probe {
    pub log: Mutex<Vec<String>>,
    pub constructed: AtomicUsize,
    pub alive: AtomicUsize,
    pub starts: AtomicUsize,
    pub stops: AtomicUsize,
    pub ticks: AtomicUsize,
    pub completed_after_stop: AtomicUsize,
    /// Slow handlers whose future was dropped before it finished.
    pub abandoned: AtomicUsize,
    /// The newest generation's handle, sink and life, to poke after retirement.
    pub last: Mutex<Option<(ScopeHandle<u64>, EventSink, ScopeLife)>>,
}

impl Probe {
    pub fn record(&self, entry: String) {
        self.log.lock().unwrap().push(entry);
    }
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
    pub fn count(&self, prefix: &str) -> usize {
        self.log().iter().filter(|l| l.starts_with(prefix)).count()
    }
}

#[derive(Deserialize, Default, Clone)]
#[serde(rename_all = "camelCase", default)]
pub struct ProbeConfig {
    pub methods: Option<Vec<String>>,
    pub fail_construct: bool,
    pub panic_construct: bool,
    pub fail_start: bool,
    pub start_delay_ms: u64,
    pub spawn_task: bool,
    /// Extra services (`probe-service-1`, ...) after the first.
    pub extra_services: usize,
    /// `start` never returns.
    pub start_hang: bool,
    /// `start` panics.
    pub start_panic: bool,
    /// `stop` never returns.
    pub stop_hang: bool,
    /// `stop` panics.
    pub stop_panic: bool,
}

struct ProbePlugin {
    id: String,
    probe: Arc<Probe>,
    cfg: ProbeConfig,
    life: ScopeLife,
    state: ScopeHandle<u64>,
}

impl Drop for ProbePlugin {
    fn drop(&mut self) {
        self.probe.alive.fetch_sub(1, Ordering::SeqCst);
    }
}

struct ProbeService {
    id: String,
    name: String,
    probe: Arc<Probe>,
    cfg: ProbeConfig,
    life: ScopeLife,
}

impl ProbeService {
    /// `probe` for the first service, `probe/probe-service-N` for extras.
    fn tag(&self) -> String {
        if self.name == "probe-service" {
            self.id.clone()
        } else {
            format!("{}/{}", self.id, self.name)
        }
    }
}

impl Service for ProbeService {
    fn name(&self) -> &str {
        &self.name
    }
    fn start(self: Arc<Self>) -> BoxFuture<Result<(), String>> {
        Box::pin(async move {
            let generation = self.life.generation();
            if self.cfg.start_delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(self.cfg.start_delay_ms)).await;
            }
            if self.cfg.start_hang {
                std::future::pending::<()>().await;
            }
            if self.cfg.start_panic {
                panic!("start panicked on purpose");
            }
            self.probe.starts.fetch_add(1, Ordering::SeqCst);
            self.probe
                .record(format!("start:{}:{generation}", self.tag()));
            if self.cfg.fail_start {
                return Err("refusing to start".into());
            }
            if self.cfg.spawn_task {
                let probe = self.probe.clone();
                self.life
                    .spawn(async move {
                        loop {
                            probe.ticks.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    })
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        })
    }
    fn stop(self: Arc<Self>) -> BoxFuture<()> {
        Box::pin(async move {
            self.probe.stops.fetch_add(1, Ordering::SeqCst);
            self.probe
                .record(format!("stop:{}:{}", self.tag(), self.life.generation()));
            if self.cfg.stop_hang {
                std::future::pending::<()>().await;
            }
            if self.cfg.stop_panic {
                panic!("stop panicked on purpose");
            }
        })
    }
}

impl Plugin for ProbePlugin {
    fn id(&self) -> &str {
        &self.id
    }
    fn version(&self) -> &str {
        "1.0.0"
    }
    fn register(&self, r: &mut Registrar) {
        let generation = self.life.generation();
        let methods = self
            .cfg
            .methods
            .clone()
            .unwrap_or_else(|| vec![format!("{}.ping", self.id)]);
        for m in methods {
            let name = m.clone();
            r.method(m)
                .scope(scope::READ)
                .sync(move |_, _| Ok(json!({"generation": generation, "method": name})));
        }
        let probe = self.probe.clone();
        let life = self.life.clone();
        r.method(format!("{}.slow", self.id))
            .scope(scope::READ)
            .handler(move |_, params: Params| {
                let probe = probe.clone();
                let life = life.clone();
                async move { slow(probe, life, params).await }
            });
        let state = self.state.clone();
        r.method(format!("{}.state", self.id))
            .scope(scope::READ)
            .sync(move |_, _| {
                let v = state.get_or_init(|| generation * 100)?;
                Ok(json!(*v))
            });
        r.method(format!("{}.panic", self.id))
            .scope(scope::READ)
            .sync(|_, _| panic!("probe handler panicked"));
        r.event(format!("plugin.{}.tick", self.id));
        let names = std::iter::once("probe-service".to_string())
            .chain((1..=self.cfg.extra_services).map(|i| format!("probe-service-{i}")));
        for name in names {
            r.service(Arc::new(ProbeService {
                id: self.id.clone(),
                name,
                probe: self.probe.clone(),
                cfg: self.cfg.clone(),
                life: self.life.clone(),
            }));
        }
        let probe = self.probe.clone();
        let id = self.id.clone();
        r.on_connection_closed(move |conn: ConnId| {
            probe.record(format!("closed:{id}:{generation}:{}", conn.0));
        });
    }
}

async fn slow(probe: Arc<Probe>, life: ScopeLife, params: Params) -> MethodResult {
    let ms = params
        .to_value()
        .get("ms")
        .and_then(Value::as_u64)
        .unwrap_or(100);
    /// Counts the handler as abandoned unless it finished.
    struct Unfinished(Option<Arc<Probe>>);
    impl Drop for Unfinished {
        fn drop(&mut self) {
            if let Some(p) = self.0.take() {
                p.abandoned.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    let mut unfinished = Unfinished(Some(probe.clone()));
    tokio::time::sleep(Duration::from_millis(ms)).await;
    unfinished.0 = None;
    let generation = life.generation();
    // Stops are recorded after services stop: a request that completes after
    // its generation's stop is a violation.
    if probe
        .log()
        .iter()
        .any(|l| l.starts_with("stop:") && l.ends_with(&format!(":{generation}")))
    {
        probe.completed_after_stop.fetch_add(1, Ordering::SeqCst);
    }
    probe.record(format!("done:{generation}"));
    Ok(json!({"generation": generation, "slept": ms}))
}

/// A factory for a probe plugin with id `id`.
pub fn probe_factory(id: &str, probe: Arc<Probe>) -> PluginFactory {
    let pid = id.to_string();
    PluginFactory::new(id, "1.0.0", move |ctx: PluginContext| {
        let cfg: ProbeConfig = serde_json::from_value(ctx.config.clone())
            .map_err(|e| PluginError::new(format!("bad probe config: {e}")))?;
        if cfg.panic_construct {
            panic!("constructor panicked on purpose");
        }
        if cfg.fail_construct {
            return Err(PluginError::new("constructor refused on purpose"));
        }
        probe.constructed.fetch_add(1, Ordering::SeqCst);
        probe.alive.fetch_add(1, Ordering::SeqCst);
        let state = ctx.handle::<u64>();
        *probe.last.lock().unwrap() = Some((state.clone(), ctx.events.clone(), ctx.life.clone()));
        Ok(Arc::new(ProbePlugin {
            id: pid.clone(),
            probe: probe.clone(),
            cfg,
            life: ctx.life.clone(),
            state,
        }))
    })
}

/// Config entries: `(plugin id, config JSON)`.
pub fn config_with(entries: &[(&str, Value)]) -> GatewayConfig {
    let mut cfg = GatewayConfig::default();
    for (id, c) in entries {
        cfg.plugins.entries.insert(
            (*id).to_string(),
            PluginEntry {
                enabled: None,
                config: Some(c.clone()),
                ..PluginEntry::default()
            },
        );
    }
    cfg.restart.drain_timeout_ms = 2_000;
    cfg.restart.start_wait_ms = 2_000;
    cfg
}

pub struct Harness {
    pub gateway: Gateway,
    pub config: Arc<StaticConfig>,
    pub probe: Arc<Probe>,
    pub state_dir: tempfile::TempDir,
}

/// A gateway with the probe plugin `probe` (and any extra factories).
pub async fn harness(config: GatewayConfig, extra: Vec<PluginFactory>) -> Harness {
    let probe = Arc::new(Probe::default());
    let mut catalog = Catalog::new().with(probe_factory("probe", probe.clone()));
    for f in extra {
        catalog = catalog.with(f);
    }
    let config = Arc::new(StaticConfig::new(config));
    let state_dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(GatewayOptions {
        catalog,
        config: config.clone(),
        state_dir: state_dir.path().to_path_buf(),
        transport: Arc::new(NullTransport),
    })
    .await
    .expect("first build");
    Harness {
        gateway,
        config,
        probe,
        state_dir,
    }
}

/// Call `method` as an admin operator.
pub async fn call(gw: &Gateway, method: &str, params: Value) -> MethodResult {
    gw.dispatch(
        plugin_api::host::internal_context(ConnId(1)),
        method,
        Params::from_value(&params),
    )
    .await
}

/// Whether `method` dispatches (anything but `unknown method`).
pub async fn dispatches(gw: &Gateway, method: &str) -> bool {
    match call(gw, method, json!({})).await {
        Ok(_) => true,
        Err(e) => !e.message.starts_with("unknown method"),
    }
}

/// Poll `cond` until true or `limit` passes.
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    cond()
}
