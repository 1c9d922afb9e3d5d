//! Runtime plugins in a generation: their processes are started (all at
//! once) before the registry is built, and a [`ProcessPlugin`] turns what a
//! process declared into registry entries that forward to it.

use crate::config::GatewayConfig;
use plugin_api::{BoxFuture, CreateFn, Plugin, PluginContext, Registrar, Service, Value};
use plugin_host::{Limits, RuntimePlugin, SpawnSpec, node};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How to run one runtime plugin, as found on disk.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    dir: PathBuf,
    what: LaunchKind,
    code_hash: String,
}

#[derive(Debug, Clone)]
enum LaunchKind {
    Command(Vec<OsString>),
    Node(PathBuf),
    /// A JS/TS plugin whose entry cannot be found: it fails to start like
    /// any other plugin that cannot start.
    BrokenNode(String),
}

impl Launch {
    /// A command plugin: `command[0]` resolves inside `dir` when it has a
    /// `/`, on `PATH` otherwise.
    pub(crate) fn command(dir: &Path, command: &[String]) -> Result<Launch, String> {
        let Some((program, args)) = command.split_first() else {
            return Err("runtime.command must name a program".into());
        };
        let resolved = if program.contains('/') {
            dir.join(program)
        } else {
            PathBuf::from(program)
        };
        let mut argv: Vec<OsString> = vec![resolved.clone().into()];
        argv.extend(args.iter().map(OsString::from));
        // The plugin's code: its directory, plus its program when that lives
        // elsewhere (a binary built into a target directory).
        let extra: Vec<&Path> = if program.contains('/') && !resolved.starts_with(dir) {
            vec![&resolved]
        } else {
            Vec::new()
        };
        Ok(Launch {
            dir: dir.to_path_buf(),
            code_hash: hash(dir, &extra),
            what: LaunchKind::Command(argv),
        })
    }

    /// An OpenClaw-style JS/TS plugin with this entry module.
    pub(crate) fn node(dir: &Path, entry: PathBuf) -> Launch {
        Launch {
            dir: dir.to_path_buf(),
            code_hash: hash(dir, &[]),
            what: LaunchKind::Node(entry),
        }
    }

    /// A JS/TS plugin (it has a `package.json` with `openclaw`) whose entry
    /// module is missing or not named.
    pub(crate) fn broken_node(dir: &Path, error: String) -> Launch {
        Launch {
            dir: dir.to_path_buf(),
            code_hash: hash(dir, &[]),
            what: LaunchKind::BrokenNode(error),
        }
    }

    /// Whether it runs under Node.js (a command plugin otherwise).
    pub(crate) fn is_node(&self) -> bool {
        matches!(self.what, LaunchKind::Node(_) | LaunchKind::BrokenNode(_))
    }

    /// Hash of the code that will run.
    pub(crate) fn code_hash(&self) -> &str {
        &self.code_hash
    }
}

fn hash(dir: &Path, extra: &[&Path]) -> String {
    plugin_host::code_hash(dir, extra).unwrap_or_else(|e| format!("unreadable: {e}"))
}

/// The bounds for plugin processes from `[plugins]`.
fn limits(config: &GatewayConfig) -> Limits {
    let p = &config.plugins;
    let d = Limits::default();
    Limits {
        handshake_timeout: p
            .handshake_timeout_ms
            .map_or(d.handshake_timeout, Duration::from_millis),
        call_timeout: p
            .call_timeout_ms
            .map_or(d.call_timeout, Duration::from_millis),
        max_calls_in_flight: p.max_calls_in_flight.unwrap_or(d.max_calls_in_flight),
        service_timeout: config.restart.start_timeout(),
        stop_grace: config.restart.stop_timeout().min(d.stop_grace),
        ..d
    }
}

/// Start every launch at once and wait for all handshakes. Node.js is
/// located (and its version checked) once per build.
pub(crate) async fn start_all(
    config: &GatewayConfig,
    generation: u64,
    state_dir: &Path,
    launches: Vec<(usize, String, Launch, Value)>,
) -> Vec<(usize, Result<RuntimePlugin, String>)> {
    let node = if launches
        .iter()
        .any(|(_, _, l, _)| matches!(l.what, LaunchKind::Node(_) | LaunchKind::BrokenNode(_)))
    {
        Some(node::locate(config.plugins.node.as_deref()).await)
    } else {
        None
    };
    let limits = limits(config);
    let tmp_root = std::env::temp_dir().join("gateway-plugins");
    let starts = launches.into_iter().map(|(i, id, launch, plugin_config)| {
        let argv = match (&launch.what, &node) {
            (LaunchKind::Command(argv), _) => Ok(argv.clone()),
            (LaunchKind::BrokenNode(e), _) => Err(e.clone()),
            (LaunchKind::Node(entry), Some(Ok(node))) => Ok(node.argv(entry)),
            (LaunchKind::Node(_), Some(Err(e))) => Err(e.clone()),
            (LaunchKind::Node(_), None) => Err("Node.js was not located".to_string()),
        };
        let env = config
            .plugins
            .entries
            .get(&id)
            .map(|e| e.env.clone().into_iter().collect())
            .unwrap_or_default();
        let spec = argv.map(|argv| SpawnSpec {
            plugin_id: id.clone(),
            generation,
            dir: launch.dir.clone(),
            argv,
            env,
            config: plugin_config,
            state_dir: state_dir.join("plugins").join(&id),
            tmp_root: tmp_root.clone(),
            limits: limits.clone(),
        });
        async move {
            let outcome = match spec {
                Ok(spec) => RuntimePlugin::start(spec).await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            (i, outcome)
        }
    });
    futures::future::join_all(starts).await
}

/// The constructor of a runtime plugin's [`ProcessPlugin`]; `None` when
/// its process did not start (it then declares nothing).
pub(crate) fn create_fn(id: &str, version: &str, runtime: Option<Arc<RuntimePlugin>>) -> CreateFn {
    let (id, version) = (id.to_string(), version.to_string());
    Arc::new(move |_ctx: PluginContext| {
        Ok(Arc::new(ProcessPlugin {
            id: id.clone(),
            version: version.clone(),
            runtime: runtime.clone(),
        }) as Arc<dyn Plugin>)
    })
}

/// A runtime plugin as the registry sees it: exactly the methods and events
/// its process declared, each method forwarding to the process, and one
/// service whose start and stop are the process's.
struct ProcessPlugin {
    id: String,
    version: String,
    runtime: Option<Arc<RuntimePlugin>>,
}

impl Plugin for ProcessPlugin {
    fn id(&self) -> &str {
        &self.id
    }

    fn version(&self) -> &str {
        &self.version
    }

    fn register(&self, r: &mut Registrar) {
        let Some(rt) = &self.runtime else { return };
        let decl = rt.declarations();
        for e in &decl.events {
            r.event(e.clone());
        }
        for m in &decl.methods {
            let b = crate::registry::declare_method(r, &m.name, m.scope.as_deref(), m.advertise);
            let rt = rt.clone();
            let name: Arc<str> = m.name.as_str().into();
            b.handler(move |ctx, params| {
                let (rt, name) = (rt.clone(), name.clone());
                async move { rt.call(&ctx, &name, &params).await }
            });
        }
        r.service(Arc::new(ProcessService { rt: rt.clone() }));
    }
}

/// The process's services: started when the previous generation's process
/// of this plugin has stopped; stopping them also ends the process.
struct ProcessService {
    rt: Arc<RuntimePlugin>,
}

impl Service for ProcessService {
    fn name(&self) -> &str {
        "process"
    }

    fn start(self: Arc<Self>) -> BoxFuture<Result<(), String>> {
        Box::pin(async move { self.rt.start_services().await })
    }

    fn stop(self: Arc<Self>) -> BoxFuture<()> {
        Box::pin(async move {
            self.rt.stop().await;
        })
    }
}
