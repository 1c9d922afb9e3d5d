//! Starting a plugin process: its state and temporary directories, the
//! spawn, the `initialize` handshake with its deadline, and the checks on
//! what the process declares (a respawned one must declare the same).

use crate::process::{EmitFn, ExitFn, Failure, Process};
use crate::supervisor::{Inner, State};
use crate::{ProcessState, RuntimePlugin, SpawnSpec, StartError, StderrTail};
use plugin_protocol::{self as proto, InitializeParams, InitializeResult, method};
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

impl RuntimePlugin {
    /// Spawn the process and run the handshake. On error the process has
    /// been killed and reaped, and the error carries its last stderr lines.
    pub async fn start(spec: SpawnSpec) -> Result<RuntimePlugin, StartError> {
        let fail = |message: String, tail: &StderrTail| StartError {
            message,
            stderr: tail.lines(),
        };
        let tail = Arc::new(StderrTail::new(20));
        std::fs::create_dir_all(&spec.state_dir).map_err(|e| {
            fail(
                format!("cannot create state dir {}: {e}", spec.state_dir.display()),
                &tail,
            )
        })?;
        let _ = std::fs::create_dir_all(&spec.tmp_root);
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{}-g{}-", spec.plugin_id, spec.generation))
            .tempdir_in(&spec.tmp_root)
            .map_err(|e| {
                fail(
                    format!(
                        "cannot create a temporary directory in {}: {e}",
                        spec.tmp_root.display()
                    ),
                    &tail,
                )
            })?;
        let inner = Arc::new(Inner {
            spec,
            tmp,
            decl: OnceLock::new(),
            current: Mutex::new(None),
            state: Mutex::new(State {
                state: ProcessState::Running,
                crashes: VecDeque::new(),
                restarts: 0,
                last_exit: None,
                services_started: false,
                pid: None,
                busy_rejections: 0,
                call_timeouts: 0,
            }),
            sink: OnceLock::new(),
            tail: tail.clone(),
            stop: CancellationToken::new(),
        });
        let plugin = RuntimePlugin {
            inner: inner.clone(),
        };
        let (proc, decl) = handshake(&inner).await.map_err(|m| fail(m, &inner.tail))?;
        let _ = inner.decl.set(decl);
        inner.install(proc);
        Ok(plugin)
    }
}

/// Spawn a process for `inner` and run the `initialize` handshake. On
/// error the process has been killed and reaped.
pub(crate) async fn handshake(
    inner: &Arc<Inner>,
) -> Result<(Arc<Process>, InitializeResult), String> {
    let spec = &inner.spec;
    let weak: Weak<Inner> = Arc::downgrade(inner);
    let emit: EmitFn = Arc::new(move |p| match weak.upgrade() {
        Some(i) => i.emit(p),
        None => Err("the plugin has stopped".into()),
    });
    let weak: Weak<Inner> = Arc::downgrade(inner);
    let on_exit: ExitFn = Box::new(move |pid, ended| {
        if let Some(i) = weak.upgrade() {
            i.on_exit(pid, ended);
        }
    });
    let program = spec.argv.first().map(|p| p.to_string_lossy().into_owned());
    let proc =
        Process::spawn(spec, inner.tmp.path(), inner.tail.clone(), emit, on_exit).map_err(|e| {
            format!(
                "cannot start `{}` in {}: {e}",
                program.unwrap_or_default(),
                spec.dir.display()
            )
        })?;
    let params = InitializeParams {
        protocol_versions: proto::PROTOCOL_VERSIONS.to_vec(),
        generation: spec.generation,
        plugin_id: spec.plugin_id.clone(),
        config: spec.config.clone(),
        state_dir: spec.state_dir.display().to_string(),
        tmp_dir: inner.tmp.path().display().to_string(),
    };
    let limits = &spec.limits;
    let answer = proc
        .request(method::INITIALIZE, &params, limits.handshake_timeout)
        .await;
    let result = match answer {
        Ok(raw) => serde_json::from_str::<InitializeResult>(raw.get())
            .map_err(|e| format!("invalid `initialize` result: {e}"))
            .and_then(|d| check_declarations(&d).map(|()| d)),
        Err(Failure::Timeout(d)) => Err(format!(
            "no answer to `initialize` within {} ms (handshake timeout)",
            d.as_millis()
        )),
        Err(Failure::Ended(e)) => Err(format!(
            "the process ended during the handshake: {}",
            e.describe()
        )),
        Err(Failure::Rpc(e)) => Err(format!("`initialize` failed: {}", e.message)),
        Err(Failure::Busy | Failure::TooLarge(_)) => Err(
            "`initialize` could not be sent (the config is too large or stdin is blocked)".into(),
        ),
    };
    match result {
        Ok(decl) => {
            proc.notify(method::INITIALIZED, &serde_json::json!({}));
            Ok((proc, decl))
        }
        Err(m) => {
            proc.kill_now();
            // Wait (bounded) for the reaper, which also collects the last
            // stderr lines for the error.
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                proc.shutdown(Duration::ZERO, Duration::ZERO),
            )
            .await;
            Err(m)
        }
    }
}

fn check_declarations(d: &InitializeResult) -> Result<(), String> {
    if !proto::PROTOCOL_VERSIONS.contains(&d.protocol_version) {
        return Err(format!(
            "the plugin chose protocol version {}, the host speaks {:?}",
            d.protocol_version,
            proto::PROTOCOL_VERSIONS
        ));
    }
    let mut seen = HashSet::new();
    for m in &d.methods {
        if m.name.is_empty() || m.name.contains(char::is_whitespace) {
            return Err(format!("invalid method name {:?}", m.name));
        }
        if !seen.insert(m.name.as_str()) {
            return Err(format!("method `{}` declared twice", m.name));
        }
    }
    if let Some(e) = d.events.iter().find(|e| e.is_empty()) {
        return Err(format!("invalid event name {e:?}"));
    }
    Ok(())
}

/// Whether a respawned process declares what the first one did.
pub(crate) fn same_declarations(a: &InitializeResult, b: &InitializeResult) -> bool {
    a.methods == b.methods && a.events == b.events
}
