//! Liveness, readiness, 405/404 and the /metrics exposition.

mod common;

use common::*;
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
