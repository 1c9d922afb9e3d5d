//! Liveness, readiness, 405/404 and the /metrics exposition.

use crate::common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn liveness_and_readiness() {
    let s = Server::start(&[]).await;
    for (path, status) in [
        ("/healthz", "live"),
        ("/health", "live"),
        ("/readyz", "ready"),
        ("/ready", "ready"),
    ] {
        let (code, headers, body) = http(s.addr, "GET", path).await;
        assert_eq!(code, 200, "{path}");
        assert_eq!(header(&headers, "content-type"), Some("application/json"));
        assert_eq!(header(&headers, "cache-control"), Some("no-store"));
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["ok"], true, "{path}: {v}");
        assert_eq!(v["status"], status, "{path}: {v}");
        let (code, headers, body) = http(s.addr, "HEAD", path).await;
        assert_eq!(code, 200, "HEAD {path}");
        assert_eq!(header(&headers, "cache-control"), Some("no-store"));
        assert!(body.is_empty());
    }
}

// A plugin whose service fails to start makes the process not ready (503,
// naming the plugin) while it stays live; a restart that fixes it makes it
// ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_503_while_a_plugin_failed_to_start() {
    use nix::sys::signal::Signal;
    let dir = tempfile::tempdir().unwrap();
    // bncr's store cannot open: its database path is a directory.
    let db = dir.path().join("state").join("bncr").join("bncr.sqlite3");
    std::fs::create_dir_all(&db).unwrap();
    let p = Proc::start_in(dir, &[]).await;
    for path in ["/readyz", "/ready"] {
        let (code, _, body) = http(p.addr, "GET", path).await;
        assert_eq!(code, 503, "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["ok"], false, "{v}");
        assert_eq!(v["status"], "not-ready", "{v}");
        assert_eq!(v["failedPlugins"][0]["id"], "bncr", "{v}");
        assert!(
            v["failedPlugins"][0]["error"]
                .as_str()
                .unwrap()
                .contains("store"),
            "{v}"
        );
        let (code, _, _) = http(p.addr, "HEAD", path).await;
        assert_eq!(code, 503, "HEAD {path}");
    }
    let (code, _, _) = http(p.addr, "GET", "/healthz").await;
    assert_eq!(code, 200, "still live");
    // Its methods answer UNAVAILABLE plugin-failed; the rest serves.
    let (mut c, _) = Client::admin(&p.url()).await;
    let r = c.call("bncr.diagnostics", json!({})).await;
    assert_eq!(r["error"]["details"]["reason"], "plugin-failed", "{r}");
    assert_eq!(c.call("health", json!({})).await["payload"]["ok"], false);
    // Fixed on disk and restarted: ready again.
    std::fs::remove_dir(&db).unwrap();
    p.signal(Signal::SIGUSR1);
    c.event("gateway.generation").await;
    eventually(WAIT, "ready after the fix", || async {
        let (code, _, _) = http(p.addr, "GET", "/readyz").await;
        (code == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn other_methods_405_and_unknown_paths_404() {
    let s = Server::start(&[]).await;
    for path in ["/healthz", "/health", "/readyz", "/ready", "/metrics"] {
        for method in ["POST", "PUT", "DELETE"] {
            let (code, headers, _) = http(s.addr, method, path).await;
            assert_eq!(code, 405, "{method} {path}");
            assert_eq!(header(&headers, "allow"), Some("GET, HEAD"));
        }
    }
    let (code, _, _) = http(s.addr, "GET", "/nope").await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn metrics_report_requests_and_generations() {
    let s = Server::start(&[]).await;
    let (mut c, _) = Client::admin(&s.url()).await;
    assert_eq!(c.call("health", json!({})).await["ok"], true);
    assert_eq!(c.call("no.such.method", json!({})).await["ok"], false);
    let (mut none, _) = Client::connect(&s.url(), Some(TOKEN), &[]).await;
    assert_eq!(none.call("status", json!({})).await["ok"], false);
    let body = eventually(WAIT, "metrics to count the requests", || async {
        let (code, headers, body) = http(s.addr, "GET", "/metrics").await;
        assert_eq!(code, 200);
        assert!(
            header(&headers, "content-type")
                .unwrap()
                .starts_with("text/plain")
        );
        metric(
            &body,
            r#"gateway_requests_total{method="status",outcome="forbidden"}"#,
        )
        .is_some()
        .then_some(body)
    })
    .await;
    for name in [
        "gateway_connections_open",
        "gateway_generation",
        "gateway_live_scopes",
        "gateway_requests_in_flight",
        "gateway_restart_duration_seconds_sum",
        "gateway_restart_duration_seconds_count",
        "gateway_request_duration_seconds_count",
        r#"gateway_restarts_total{outcome="ok"}"#,
        r#"gateway_restarts_total{outcome="failed"}"#,
    ] {
        assert!(metric(&body, name).is_some(), "{name} missing:\n{body}");
    }
    assert!(body.contains("# TYPE gateway_request_duration_seconds histogram"));
    assert_eq!(metric(&body, "gateway_connections_open"), Some(2.0));
    assert_eq!(metric(&body, "gateway_generation"), Some(1.0));
    assert_eq!(metric(&body, "gateway_live_scopes"), Some(1.0));
    assert_eq!(
        metric(
            &body,
            r#"gateway_requests_total{method="health",outcome="ok"}"#
        ),
        Some(1.0)
    );
    // Unknown names never become labels.
    assert_eq!(
        metric(
            &body,
            r#"gateway_requests_total{method="unknown",outcome="invalid_request"}"#
        ),
        Some(1.0)
    );
    assert!(!body.contains("no.such.method"));
    // A restart shows up.
    assert_eq!(c.call("gateway.restart", json!({})).await["ok"], true);
    let (_, _, body) = http(s.addr, "GET", "/metrics").await;
    assert_eq!(metric(&body, "gateway_generation"), Some(2.0));
    assert_eq!(
        metric(&body, r#"gateway_restarts_total{outcome="ok"}"#),
        Some(1.0)
    );
}
