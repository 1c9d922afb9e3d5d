//! Real plugin processes (a Python command plugin from `tests/fixtures`),
//! real pipes, real signals.

use plugin_api::host::{EventTransport, OutboundEvent};
use plugin_api::{ConnId, ErrorCode, Params, RequestContext, RpcError};
use plugin_host::{Limits, ProcessState, RuntimePlugin, SpawnSpec};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/test_plugin.py")
}

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("plugin")).unwrap();
        Env { dir }
    }

    fn spec(&self, config: Value, limits: Limits) -> SpawnSpec {
        SpawnSpec {
            plugin_id: "t".into(),
            generation: 7,
            dir: self.dir.path().join("plugin"),
            argv: vec!["python3".into(), fixture().into()],
            // The last two try to override what the host sets: they lose.
            env: vec![
                ("GRANTED".into(), "yes".into()),
                ("GATEWAY_PLUGIN_ID".into(), "spoofed".into()),
                ("TMPDIR".into(), "/spoofed".into()),
            ],
            config,
            state_dir: self.dir.path().join("state/t"),
            tmp_root: self.dir.path().join("tmp"),
            limits,
        }
    }
}

async fn start(env: &Env, config: Value, limits: Limits) -> RuntimePlugin {
    RuntimePlugin::start(env.spec(config, limits))
        .await
        .expect("plugin starts")
}

fn ctx() -> RequestContext {
    plugin_api::host::internal_context(ConnId(42))
}

async fn call(p: &RuntimePlugin, method: &str, params: Value) -> Result<Value, RpcError> {
    p.call(&ctx(), method, &Params::from_value(&params)).await
}

async fn wait_state(p: &RuntimePlugin, want: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while p.status().state.as_str() != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "state stayed {:?}, wanted {want}",
            p.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `pid` still runs, or is a zombie this test process is the parent
/// of: the plugin host reaps what it spawned before it reports the exit, so
/// a zombie of ours left behind is a missing reap and counts as alive (the
/// waits below give a reap in flight its grace). A zombie reparented to
/// init (a grandchild) does not run any more.
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    fields.first() != Some(&"Z") || fields.get(1) == Some(&std::process::id().to_string().as_str())
}

fn reason(e: &RpcError) -> &str {
    e.details
        .as_ref()
        .and_then(|d| d.get("reason"))
        .and_then(Value::as_str)
        .unwrap_or("")
}

#[tokio::test]
async fn declarations_calls_environment_and_working_dir() {
    let env = Env::new();
    let p = start(&env, json!({}), Limits::default()).await;
    let d = p.declarations();
    assert_eq!(d.methods[0].name, "t.add");
    assert_eq!(d.methods[0].scope.as_deref(), Some("operator.read"));
    assert_eq!(d.events, vec!["plugin.t.ping".to_string()]);
    assert_eq!(d.services, vec!["svc".to_string()]);

    let v = call(&p, "t.add", json!({"a": 2, "b": 40})).await.unwrap();
    assert_eq!(v["sum"], 42);
    assert_eq!(v["generation"], 7);
    assert_eq!(v["client"]["connId"], 42);
    assert_eq!(v["client"]["role"], "operator");
    assert_eq!(v["client"]["scopes"], json!(["operator.admin"]));

    let e = call(&p, "t.error", json!({})).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidRequest);
    assert_eq!(e.message, "bad input");
    assert_eq!(e.details, Some(json!({"field": "a"})));

    let v = call(&p, "t.env", json!({})).await.unwrap();
    let penv = v["env"].as_object().unwrap();
    assert_eq!(
        v["cwd"],
        env.dir.path().join("plugin").display().to_string()
    );
    assert_eq!(penv["GRANTED"], "yes");
    assert_eq!(penv["GATEWAY_PLUGIN_ID"], "t");
    assert_eq!(penv["TMPDIR"], p.tmp_dir().display().to_string());
    assert!(p.tmp_dir().starts_with(env.dir.path().join("tmp")));
    // cargo sets CARGO and CARGO_PKG_NAME for this test process: they stay here.
    assert!(std::env::var("CARGO").is_ok());
    for key in penv.keys() {
        assert!(
            !key.starts_with("CARGO") && !key.starts_with("RUST"),
            "leaked {key}"
        );
    }
    assert!(env.dir.path().join("state/t").is_dir());

    let status = p.status();
    assert_eq!(status.state, ProcessState::Running);
    let pid = status.pid.unwrap();
    assert!(alive(pid));
    let tmp = p.tmp_dir().to_path_buf();
    assert_eq!(p.stop().await.as_deref(), Some("exit status 0"));
    assert!(!alive(pid));
    drop(p);
    assert!(!tmp.exists(), "the generation's temp dir is removed");
}

#[tokio::test]
async fn a_crash_answers_every_pending_call_once_and_the_process_comes_back() {
    let env = Env::new();
    let p = Arc::new(start(&env, json!({}), Limits::default()).await);
    let first_pid = p.status().pid.unwrap();
    p.start_services().await.unwrap();
    let mut pending = Vec::new();
    for _ in 0..5 {
        let p = p.clone();
        pending.push(tokio::spawn(async move {
            call(&p, "t.sleep", json!({"ms": 30_000})).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = call(&p, "t.exit", json!({"code": 3})).await.unwrap_err();
    assert_eq!(reason(&e), "plugin-crashed");
    for h in pending {
        let e = tokio::time::timeout(Duration::from_secs(5), h)
            .await
            .expect("answered promptly")
            .unwrap()
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert_eq!(e.retryable, Some(true));
        assert_eq!(reason(&e), "plugin-crashed");
        assert_eq!(e.details.as_ref().unwrap()["exit"], "exit status 3");
    }
    // While it respawns, its methods answer the same.
    wait_state(&p, "running").await;
    let s = p.status();
    assert_eq!(s.restarts, 1);
    assert_eq!(s.last_exit.as_deref(), Some("exit status 3"));
    assert_ne!(s.pid, Some(first_pid));
    assert!(!alive(first_pid));
    assert_eq!(
        call(&p, "t.add", json!({"a": 1, "b": 1})).await.unwrap()["sum"],
        2
    );
    p.stop().await;
}

#[tokio::test]
async fn a_fourth_crash_within_the_window_fails_the_plugin() {
    let env = Env::new();
    let p = start(&env, json!({}), Limits::default()).await;
    for n in 1..=4u32 {
        wait_state(&p, "running").await;
        let _ = call(&p, "t.exit", json!({"code": 1})).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while p.status().restarts < n {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let s = p.status();
    let ProcessState::Failed(msg) = &s.state else {
        panic!("expected failed, got {s:?}")
    };
    assert!(msg.contains("crashed 4 times"), "{msg}");
    assert_eq!(s.pid, None);
    let e = call(&p, "t.add", json!({})).await.unwrap_err();
    assert_eq!(reason(&e), "plugin-failed");
    assert_eq!(e.retryable, None);
}

#[tokio::test]
async fn garbage_and_floods_on_stdout_fail_the_process_with_what_was_printed() {
    let env = Env::new();
    let limits = Limits {
        max_line_bytes: 64 * 1024,
        ..Limits::default()
    };
    let p = start(&env, json!({}), limits).await;
    let e = call(&p, "t.garbage", json!({})).await.unwrap_err();
    assert_eq!(reason(&e), "plugin-crashed");
    let exit = e.details.as_ref().unwrap()["exit"].as_str().unwrap();
    assert!(exit.contains("hello from print()"), "{exit}");
    assert!(exit.contains("logs go to stderr"), "{exit}");
    assert!(exit.contains("SIGKILL"), "{exit}");

    wait_state(&p, "running").await;
    let e = call(&p, "t.flood", json!({})).await.unwrap_err();
    let exit = e.details.as_ref().unwrap()["exit"].as_str().unwrap();
    assert!(exit.contains("longer than 65536 bytes"), "{exit}");
    wait_state(&p, "running").await;
    assert_eq!(p.status().restarts, 2);
    assert!(call(&p, "t.add", json!({})).await.is_ok());
    p.stop().await;
}

#[tokio::test]
async fn calls_beyond_the_in_flight_limit_are_refused_busy_without_queueing() {
    let env = Env::new();
    let limits = Limits {
        max_calls_in_flight: 4,
        ..Limits::default()
    };
    let p = Arc::new(start(&env, json!({}), limits).await);
    let spawn_sleep = |ms: u64| {
        let p = p.clone();
        tokio::spawn(async move { call(&p, "t.sleep", json!({"ms": ms})).await })
    };
    // N-1 and N are admitted.
    let held: Vec<_> = (0..4).map(|_| spawn_sleep(1500)).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // N+1 .. 5N are refused at once.
    let mut busy = 0;
    for _ in 0..16 {
        let e = call(&p, "t.add", json!({})).await.unwrap_err();
        assert_eq!(reason(&e), "plugin-busy");
        assert_eq!(e.retryable, Some(true));
        busy += 1;
    }
    assert_eq!(busy, 16);
    assert_eq!(p.status().busy_rejections, 16);
    for h in held {
        assert_eq!(h.await.unwrap().unwrap()["slept"], 1500);
    }
    assert!(call(&p, "t.add", json!({})).await.is_ok());
    p.stop().await;
}

#[tokio::test]
async fn a_call_past_its_deadline_is_answered_and_cancelled() {
    let env = Env::new();
    let limits = Limits {
        call_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let p = start(&env, json!({}), limits).await;
    let e = call(&p, "t.sleep", json!({"ms": 3000})).await.unwrap_err();
    assert_eq!(reason(&e), "plugin-timeout");
    assert_eq!(e.retryable, Some(true));
    assert_eq!(p.status().call_timeouts, 1);
    // The late answer is dropped; the process keeps serving.
    assert_eq!(call(&p, "t.add", json!({"a": 1})).await.unwrap()["sum"], 1);
    assert_eq!(p.status().restarts, 0);
    p.stop().await;
}

#[tokio::test]
async fn handshake_failures_are_clear_errors_with_the_last_stderr_lines() {
    let env = Env::new();
    let err = RuntimePlugin::start(env.spec(json!({"exitOnInit": true}), Limits::default()))
        .await
        .unwrap_err();
    assert!(err.message.contains("exit status 7"), "{err}");
    assert_eq!(err.stderr, vec!["about to fail: bad config".to_string()]);
    assert!(err.to_string().contains("about to fail"), "{err}");

    let limits = Limits {
        handshake_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let err = RuntimePlugin::start(env.spec(json!({"hangOnInit": true}), limits))
        .await
        .unwrap_err();
    assert!(err.message.contains("handshake timeout"), "{err}");

    let err = RuntimePlugin::start(env.spec(json!({"garbageOnInit": true}), Limits::default()))
        .await
        .unwrap_err();
    assert!(err.message.contains("starting up!"), "{err}");
    assert!(err.message.contains("logs go to stderr"), "{err}");

    let mut spec = env.spec(json!({}), Limits::default());
    spec.argv = vec!["./no-such-binary".into()];
    let err = RuntimePlugin::start(spec).await.unwrap_err();
    assert!(
        err.message.contains("cannot start `./no-such-binary`"),
        "{err}"
    );

    let err = RuntimePlugin::start(env.spec(json!({"methods": ["a", "a"]}), Limits::default()))
        .await
        .unwrap_err();
    assert!(err.message.contains("declared twice"), "{err}");
}

#[tokio::test]
async fn stop_escalates_to_sigkill_and_takes_the_process_group() {
    let env = Env::new();
    let limits = Limits {
        stop_grace: Duration::from_millis(300),
        term_grace: Duration::from_millis(300),
        ..Limits::default()
    };
    let p = start(&env, json!({"ignoreShutdown": true}), limits).await;
    let pid = p.status().pid.unwrap();
    let grandchild = call(&p, "t.grandchild", json!({})).await.unwrap()["pid"]
        .as_u64()
        .unwrap() as u32;
    assert!(alive(grandchild));
    let exit = p.stop().await.unwrap();
    assert_eq!(exit, "killed by signal 9 (SIGKILL)");
    assert!(!alive(pid));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while alive(grandchild) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "grandchild survived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(p.status().state, ProcessState::Stopped);
    let e = call(&p, "t.add", json!({})).await.unwrap_err();
    assert_eq!(reason(&e), "gateway-restarting");
}

#[tokio::test]
async fn dropping_the_plugin_kills_its_process() {
    let env = Env::new();
    let p = start(&env, json!({}), Limits::default()).await;
    let pid = p.status().pid.unwrap();
    drop(p);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(tokio::time::Instant::now() < deadline, "process survived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_respawn_that_declares_something_else_fails_the_plugin() {
    let env = Env::new();
    let marker = env.dir.path().join("marker");
    let p = start(
        &env,
        json!({"changeAfterCrashFile": marker.display().to_string()}),
        Limits::default(),
    )
    .await;
    let _ = call(&p, "t.exit", json!({})).await;
    wait_state(&p, "failed").await;
    let ProcessState::Failed(msg) = p.status().state else {
        unreachable!()
    };
    assert!(msg.contains("declared different methods"), "{msg}");
}

#[derive(Default)]
struct Recorder(Mutex<Vec<(String, String)>>);

impl EventTransport for Recorder {
    fn send_to(&self, _conn: ConnId, ev: &OutboundEvent) -> bool {
        self.broadcast("", ev);
        true
    }
    fn broadcast(&self, scope: &str, ev: &OutboundEvent) -> usize {
        self.0
            .lock()
            .unwrap()
            .push((scope.to_string(), ev.name.to_string()));
        1
    }
}

#[tokio::test]
async fn only_declared_events_reach_the_transport() {
    let env = Env::new();
    let p = start(&env, json!({}), Limits::default()).await;
    let (life, _ctl) = plugin_api::host::scope_life(7);
    let rec = Arc::new(Recorder::default());
    let (sink, declarer) = plugin_api::host::event_sink("t", life, rec.clone());
    declarer.declare(p.declarations().events.iter().cloned());
    p.attach_events(sink);
    call(&p, "t.emit", json!({"event": "plugin.t.ping"}))
        .await
        .unwrap();
    call(&p, "t.emit", json!({"event": "plugin.t.undeclared"}))
        .await
        .unwrap();
    // The emit notifications precede the answers on the same pipe.
    let got = rec.0.lock().unwrap().clone();
    assert_eq!(
        got,
        vec![("operator.read".to_string(), "plugin.t.ping".to_string())]
    );
    p.stop().await;
}

#[tokio::test]
async fn a_hung_process_is_found_by_ping_after_a_timeout_and_killed() {
    let env = Env::new();
    let limits = Limits {
        call_timeout: Duration::from_millis(300),
        ping_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let p = Arc::new(start(&env, json!({}), limits).await);
    let pid = p.status().pid.unwrap();
    let e = call(&p, "t.hang", json!({})).await.unwrap_err();
    assert_eq!(reason(&e), "plugin-timeout");
    // The ping goes unanswered: the process is killed and comes back.
    wait_state(&p, "respawning").await;
    wait_state(&p, "running").await;
    assert!(!alive(pid));
    let s = p.status();
    assert!(s.last_exit.unwrap().contains("unresponsive"));
    assert_eq!(call(&p, "t.add", json!({"a": 2})).await.unwrap()["sum"], 2);

    // A slow call in a process that still answers is not a hang.
    let e = call(&p, "t.sleep", json!({"ms": 1500})).await.unwrap_err();
    assert_eq!(reason(&e), "plugin-timeout");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(p.status().restarts, 1);
    p.stop().await;
}

#[tokio::test]
async fn a_hung_process_is_found_when_the_request_deadline_ends_the_wait_first() {
    // The defaults: `requests.timeout_ms` (30 s from admission) ends before
    // `call_timeout` (30 s from the send), so the gateway drops the call's
    // future before the plugin host's own timeout fires. Model that with a
    // request deadline shorter than the call timeout.
    let env = Env::new();
    let limits = Limits {
        ping_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    assert!(limits.call_timeout >= Duration::from_secs(30));
    let p = Arc::new(start(&env, json!({}), limits).await);
    let pid = p.status().pid.unwrap();
    let request_deadline = Duration::from_millis(300);
    let r = tokio::time::timeout(request_deadline, call(&p, "t.hang", json!({}))).await;
    assert!(r.is_err(), "the hung call answered: {r:?}");
    assert_eq!(p.status().call_timeouts, 1);
    // The ping goes unanswered: the process is killed and comes back.
    wait_state(&p, "respawning").await;
    wait_state(&p, "running").await;
    assert!(!alive(pid));
    let s = p.status();
    assert_eq!(s.restarts, 1);
    assert!(s.last_exit.unwrap().contains("unresponsive"));
    assert_eq!(call(&p, "t.add", json!({"a": 2})).await.unwrap()["sum"], 2);
    p.stop().await;
}

#[tokio::test]
async fn a_crash_kills_the_process_group_with_its_grandchildren() {
    let env = Env::new();
    let pidfile = env.dir.path().join("grandchild.pid");
    let mut spec = env.spec(json!({}), Limits::default());
    // A grandchild in the plugin's group that holds stdout open.
    spec.argv = vec![
        "sh".into(),
        "-c".into(),
        format!(
            "sleep 60 & echo $! > '{}'; exec python3 '{}'",
            pidfile.display(),
            fixture().display()
        )
        .into(),
    ];
    let p = RuntimePlugin::start(spec).await.expect("plugin starts");
    let grandchild: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(grandchild));
    let e = call(&p, "t.exit", json!({"code": 3})).await.unwrap_err();
    assert_eq!(reason(&e), "plugin-crashed");
    wait_state(&p, "running").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while alive(grandchild) {
        assert!(
            std::time::Instant::now() < deadline,
            "the crashed process's grandchild {grandchild} survived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(call(&p, "t.add", json!({"a": 2})).await.unwrap()["sum"], 2);
    p.stop().await;
}
