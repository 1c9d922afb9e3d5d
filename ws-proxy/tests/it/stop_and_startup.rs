//! Graceful stop by SIGTERM/SIGINT, bounded exit with a stuck handler, and
//! startup: defaults, generated token, refused settings and bad config files.

use crate::common::*;
use nix::sys::signal::Signal;
use serde_json::json;
use std::time::Duration;

fn plugin_config(dir: &std::path::Path, extra: &str) -> String {
    let path = config_for(dir, extra);
    write_plugin(&dir.join("plugins"), "demo", &[("demo.sleep", "sleep")]);
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_then_closes_1012_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let config = plugin_config(dir.path(), "");
    let mut p = Proc::start_in(dir, &["--config".into(), config]).await;
    let (mut c, _) = Client::admin(&p.url()).await;
    c.send_json(&json!({"type":"req","id":"slow","method":"demo.sleep","params":{"ms":1500}}))
        .await;
    // The request is in flight before the signal.
    eventually(WAIT, "the request to be in flight", || async {
        let (_, _, body) = http(p.addr, "GET", "/metrics").await;
        (metric(&body, "gateway_requests_in_flight") == Some(1.0)).then_some(())
    })
    .await;
    p.signal(Signal::SIGTERM);
    let shutdown = c.event("shutdown").await;
    assert_eq!(
        shutdown["payload"],
        json!({"reason":"gateway stopping","restartExpectedMs":null})
    );
    // While draining: not ready, and new requests are refused retryably.
    let (code, _, body) = http(p.addr, "GET", "/readyz").await;
    assert_eq!(code, 503, "{body}");
    let r = c.call("health", json!({})).await;
    assert_eq!(r["error"]["code"], "UNAVAILABLE", "{r}");
    assert_eq!(r["error"]["details"]["reason"], "gateway-closing");
    assert_eq!(r["error"]["retryable"], true);
    // The in-flight request completes.
    let r = c.response("slow").await;
    assert_eq!(r["payload"], json!({"slept": 1500}), "{r}");
    let (_, closed) = c.until_closed().await;
    assert_eq!(closed.code, Some(1012), "{closed:?}");
    let status = p.wait(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "stderr:\n{}", p.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_handler_cannot_hold_the_exit() {
    let dir = tempfile::tempdir().unwrap();
    let config = plugin_config(dir.path(), "[limits]\nshutdown_drain_ms = 300\n");
    let mut p = Proc::start_in(dir, &["--config".into(), config]).await;
    let (mut c, _) = Client::admin(&p.url()).await;
    c.send_json(&json!({"type":"req","id":"stuck","method":"demo.sleep","params":{"ms":600000}}))
        .await;
    eventually(WAIT, "the request to be in flight", || async {
        let (_, _, body) = http(p.addr, "GET", "/metrics").await;
        (metric(&body, "gateway_requests_in_flight") == Some(1.0)).then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    p.signal(Signal::SIGINT);
    let (frames, closed) = c.until_closed().await;
    let answer = frames.iter().find(|f| f["id"] == "stuck");
    if let Some(a) = answer {
        assert_eq!(a["error"]["code"], "UNAVAILABLE", "{a}");
        assert_eq!(a["error"]["retryable"], true, "{a}");
    }
    assert_eq!(closed.code, Some(1012));
    let status = p.wait(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0));
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_flags_generates_a_private_token_and_prints_how_to_connect() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path().to_path_buf();
    // `--port 0` only, to stay off the real default port.
    let mut p = Proc::spawn(dir, &["--port".into(), "0".into()]).await;
    let token_file = cwd.join("state").join("gateway.token");
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    assert!(token.len() >= 32);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(p.addr.ip().is_loopback());
    let banner = eventually(WAIT, "the connect line", || async {
        let out = p.stdout.lock().unwrap().clone();
        out.contains("--json").then_some(out)
    })
    .await;
    assert!(
        banner.contains(&format!(
            "openclaw gateway call health --url ws://{} --token {token} --json",
            p.addr
        )),
        "{banner}"
    );
    let (mut c, hello) = Client::connect(&p.url(), Some(&token), &["operator.read"]).await;
    let methods = hello["features"]["methods"].as_array().unwrap();
    assert!(methods.contains(&json!("bncr.connect")));
    assert_eq!(c.call("status", json!({})).await["ok"], true);
    p.signal(Signal::SIGTERM);
    assert_eq!(p.wait(Duration::from_secs(15)).await.code(), Some(0));
}

#[tokio::test]
async fn bad_config_exits_2_naming_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        "[server]\nport = 1\n\n[limits]\nmax_payload = \"big\"\n",
    )
    .unwrap();
    let p = path.display().to_string();
    let (code, _, stderr) = run_binary(&["--config", &p], None).await;
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&format!("{p}:5")), "{stderr}");
    assert!(stderr.contains("limits.max_payload"), "{stderr}");
    // Unknown keys too.
    std::fs::write(&path, "[auth]\ntokne = \"x\"\n").unwrap();
    let (code, _, stderr) = run_binary(&["--config", &p], None).await;
    assert_eq!(code, 2);
    assert!(stderr.contains(&format!("{p}:2")), "{stderr}");
    assert!(stderr.contains("tokne"), "{stderr}");
}

#[tokio::test]
async fn failed_first_build_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    // A plugin may not take a core method name.
    write_plugin(&plugins, "thief", &[("health", "reply")]);
    let state = dir.path().join("state").display().to_string();
    let (code, _, stderr) = run_binary(
        &[
            "--port",
            "0",
            "--token",
            "t",
            "--state-dir",
            &state,
            "--plugin-dir",
            &plugins.display().to_string(),
        ],
        None,
    )
    .await;
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("health"), "{stderr}");
}

#[tokio::test]
async fn auth_none_on_a_public_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state").display().to_string();
    let (code, _, stderr) = run_binary(
        &[
            "--bind",
            "0.0.0.0",
            "--port",
            "0",
            "--auth",
            "none",
            "--state-dir",
            &state,
        ],
        None,
    )
    .await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("without authentication"), "{stderr}");
}
