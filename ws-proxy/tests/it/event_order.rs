//! Plugin events and `gateway.generation` as a client sees them across real
//! SIGUSR1 restarts: the real binary, a real plugin process, real sockets.

use crate::common::*;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use std::path::Path;

/// A command plugin that emits `plugin.gen-probe.ping` (payload: its
/// generation and a counter) as fast as the host answers, from its
/// handshake on: before its generation serves, across the swap, and until
/// 200 events after its service started. Each emit is a request, so the
/// plugin waits for the host's answer before the next (no flood).
const PROBE_PY: &str = r#"
import json, sys, threading, time

out_lock = threading.Lock()
waiting = {}
waiting_lock = threading.Lock()
started = threading.Event()
stopping = threading.Event()
generation = 0


def send(msg):
    msg["jsonrpc"] = "2.0"
    with out_lock:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()


def pinger():
    n, after_start = 0, 0
    while not stopping.is_set() and after_start < 200 and n < 100000:
        n += 1
        rid = 1000000 + n
        done = threading.Event()
        with waiting_lock:
            waiting[rid] = done
        send({"id": rid, "method": "emit", "params": {
            "event": "plugin.gen-probe.ping",
            "payload": {"generation": generation, "n": n}}})
        done.wait(5)
        if started.is_set():
            after_start += 1
        time.sleep(0.0002)


for line in sys.stdin:
    msg = json.loads(line)
    method, id, params = msg.get("method"), msg.get("id"), msg.get("params") or {}
    if method is None:
        with waiting_lock:
            done = waiting.pop(id, None)
        if done is not None:
            done.set()
    elif method == "initialize":
        generation = params["generation"]
        send({"id": id, "result": {
            "protocolVersion": 1, "name": "generation probe", "version": "1.0.0",
            "methods": [], "events": ["plugin.gen-probe.ping"], "services": ["probe"]}})
        threading.Thread(target=pinger, daemon=True).start()
    elif method == "start":
        started.set()
        send({"id": id, "result": {}})
    elif method == "stop":
        stopping.set()
        send({"id": id, "result": {}})
    elif method == "shutdown":
        break
    elif id is not None:
        send({"id": id, "error": {"code": -32601, "message": "unknown method " + str(method)}})
"#;

fn probe_plugin(plugins: &Path) {
    let dir = plugins.join("gen-probe");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("plugin.py"), PROBE_PY).unwrap();
    let manifest = json!({"id": "gen-probe", "version": "1.0.0",
        "runtime": {"command": ["python3", "plugin.py"]}});
    std::fs::write(dir.join("openclaw.plugin.json"), manifest.to_string()).unwrap();
}

fn generation_of(frame: &Value) -> u64 {
    frame["payload"]["generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("no generation in {frame}"))
}

/// Events of generation N only after `gateway.generation` N: a plugin that
/// emits from the moment its process is up (so before the swap, and at
/// once after it) never gets an event of a generation to a client before
/// the client was told that generation, and the client is told each
/// generation exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_is_announced_before_any_event_it_emits() {
    const RESTARTS: u64 = 6;
    /// Events of the new generation to see after its notice, per restart.
    const EVENTS_AFTER: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(dir.path(), "");
    probe_plugin(&dir.path().join("plugins"));
    let p = Proc::start_in(dir, &["--config".into(), config.display().to_string()]).await;
    let (mut c, hello) = Client::admin(&p.url()).await;
    let mut told = hello["snapshot"]["generation"].as_u64().unwrap();
    assert_eq!(told, 1);
    // Everything the client read, for the failure message.
    let mut seen: Vec<String> = Vec::new();
    for generation in 2..=RESTARTS + 1 {
        p.signal(Signal::SIGUSR1);
        let mut after = 0;
        while told < generation || after < EVENTS_AFTER {
            let f = c
                .next_frame()
                .await
                .unwrap_or_else(|closed| panic!("closed: {closed:?}"));
            if f["type"] != "event" {
                continue;
            }
            match f["event"].as_str().unwrap() {
                "gateway.generation" => {
                    let g = generation_of(&f);
                    seen.push(format!("gateway.generation {g}"));
                    assert!(
                        g > told,
                        "told generation {g} after {told} (each once, in order): {seen:?}"
                    );
                    told = g;
                }
                "plugin.gen-probe.ping" => {
                    let g = generation_of(&f);
                    seen.push(format!("ping {g}#{}", f["payload"]["n"]));
                    assert!(
                        g <= told,
                        "an event of generation {g} before gateway.generation {g} \
                         (the client knew {told}): {:?}",
                        &seen[seen.len().saturating_sub(8)..]
                    );
                    if g == generation {
                        after += 1;
                    }
                }
                _ => {}
            }
        }
        assert_eq!(told, generation);
    }
    assert_eq!(c.call("health", json!({})).await["ok"], true);
}
