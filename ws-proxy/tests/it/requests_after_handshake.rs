//! The after-handshake table of `docs/protocol.md`, scope enforcement, ticks and seq.

use crate::common::*;
use serde_json::json;
use std::time::Duration;

/// A server with a manifest plugin `demo` serving reply/echo/sleep/error/panic.
async fn demo_server(extra: &str) -> Server {
    let plugins = tempfile::tempdir().unwrap();
    write_plugin(
        plugins.path(),
        "demo",
        &[
            ("demo.reply", "reply"),
            ("demo.echo", "echo"),
            ("demo.sleep", "sleep"),
            ("demo.error", "error"),
            ("demo.panic", "panic"),
        ],
    );
    let dir = plugins.keep();
    let toml = format!(
        "[plugins]\ndirs = [{:?}]\n{extra}",
        dir.display().to_string()
    );
    Server::with_config(&toml, &[]).await
}

#[tokio::test]
async fn unknown_method_and_bad_frames_keep_the_connection() {
    let s = demo_server("").await;
    let (mut c, _) = Client::admin(&s.url()).await;
    let r = c.call("nope.nothing", json!({})).await;
    assert_eq!(r["ok"], false);
    assert_eq!(r["error"]["code"], "INVALID_REQUEST");
    assert_eq!(r["error"]["message"], "unknown method: nope.nothing");
    // Bad JSON and frames without an id: no answer.
    c.send_text("{not json").await;
    c.send_text(r#"{"type":"req","method":"health"}"#).await;
    // A frame with an id but not a request: answered. Read frame by frame
    // (not `response`, which skips answers to other ids): the first
    // response after the two unanswerable frames must be this one.
    c.send_text(r#"{"type":"event","id":"e1","method":"health"}"#)
        .await;
    let r = loop {
        let f = c.next_frame().await.unwrap();
        if f["type"] == "res" {
            break f;
        }
        assert_eq!(f["type"], "event", "{f}");
    };
    assert_eq!(r["id"], "e1", "an unanswerable frame was answered: {r}");
    assert_eq!(r["error"]["code"], "INVALID_REQUEST");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("invalid request frame: "),
        "{r}"
    );
    c.send_text(r#"{"type":"req","id":"e2"}"#).await;
    c.send_text("{not json either").await;
    c.send_json(&json!({"type":"req","id":"last","method":"health"}))
        .await;
    // Still open, and exactly e2 then `last` were answered: every frame up
    // to `last`'s answer is read and kept, nothing skipped.
    let mut seen = Vec::new();
    loop {
        let f = c.next_frame().await.unwrap();
        let done = f["id"] == "last";
        seen.push(f);
        if done {
            break;
        }
    }
    let answers: Vec<&serde_json::Value> = seen.iter().filter(|f| f["type"] != "event").collect();
    assert_eq!(answers.len(), 2, "{seen:?}");
    assert_eq!(answers[0]["id"], "e2");
    assert!(
        answers[0]["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("invalid request frame: ")
    );
    assert_eq!(answers[1]["ok"], true, "{seen:?}");
}

#[tokio::test]
async fn handler_errors_and_panics_answer_unavailable() {
    let s = demo_server("").await;
    let (mut c, hello) = Client::admin(&s.url()).await;
    let methods = hello["features"]["methods"].as_array().unwrap();
    assert!(methods.contains(&json!("demo.panic")));
    let r = c.call("demo.error", json!({})).await;
    assert_eq!(r["error"]["code"], "UNAVAILABLE", "{r}");
    let r = c.call("demo.panic", json!({})).await;
    assert_eq!(r["error"]["code"], "UNAVAILABLE", "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("panicked"),
        "{r}"
    );
    let r = c.call("demo.echo", json!({"a": [1, 2]})).await;
    assert_eq!(r["payload"], json!({"a": [1, 2]}));
}

#[tokio::test]
async fn responses_may_come_out_of_order() {
    let s = demo_server("").await;
    let (mut c, _) = Client::admin(&s.url()).await;
    c.send_json(&json!({"type":"req","id":"slow","method":"demo.sleep","params":{"ms":300}}))
        .await;
    c.send_json(&json!({"type":"req","id":"fast","method":"health"}))
        .await;
    let first = loop {
        let f = c.next_frame().await.unwrap();
        if f["type"] == "res" {
            break f;
        }
    };
    assert_eq!(first["id"], "fast");
    let r = c.response("slow").await;
    assert_eq!(r["payload"], json!({"slept": 300}));
}

#[tokio::test]
async fn too_many_in_flight_is_busy_and_retryable() {
    let s = demo_server("[limits]\nmax_in_flight = 2\n").await;
    let (mut c, _) = Client::admin(&s.url()).await;
    for i in 0..3 {
        c.send_json(
            &json!({"type":"req","id":format!("s{i}"),"method":"demo.sleep","params":{"ms":400}}),
        )
        .await;
    }
    let r = c.response("s2").await;
    assert_eq!(r["error"]["code"], "UNAVAILABLE");
    assert_eq!(
        r["error"]["message"],
        "The server is busy. Please try again in a moment."
    );
    assert_eq!(r["error"]["retryable"], true);
    assert_eq!(c.response("s0").await["ok"], true);
    assert_eq!(c.response("s1").await["ok"], true);
    assert_eq!(c.call("health", json!({})).await["ok"], true);
}

#[tokio::test]
async fn second_connect_is_an_error_and_the_connection_stays() {
    let s = demo_server("").await;
    let (mut c, _) = Client::admin(&s.url()).await;
    let mut p = connect_params(4, 4, &["operator.admin"]);
    p["auth"] = json!({"token": TOKEN});
    let r = c.call("connect", p).await;
    assert_eq!(r["ok"], false);
    assert_eq!(r["error"]["code"], "INVALID_REQUEST");
    assert_eq!(c.call("health", json!({})).await["ok"], true);
}

#[tokio::test]
async fn frame_over_max_payload_closes_1009() {
    let s = demo_server("[limits]\nmax_payload = 70000\n").await;
    let (mut c, hello) = Client::admin(&s.url()).await;
    assert_eq!(hello["policy"]["maxPayload"], 70000);
    // Under the limit (and over the pre-auth 64 KiB) is fine.
    let pad = "x".repeat(66_000);
    let r = c.call("demo.echo", json!({ "pad": pad })).await;
    assert_eq!(r["ok"], true);
    let pad = "x".repeat(80_000);
    c.send_json(&json!({"type":"req","id":"big","method":"demo.echo","params":{"pad":pad}}))
        .await;
    let (frames, closed) = c.until_closed().await;
    assert!(frames.iter().all(|f| f["id"] != "big"), "{frames:?}");
    assert_eq!(closed.code, Some(1009));
}

#[tokio::test]
async fn missing_scope_shape_and_health_without_scopes() {
    let s = demo_server("").await;
    let (mut none, hello) = Client::connect(&s.url(), Some(TOKEN), &[]).await;
    assert_eq!(hello["auth"]["scopes"], json!([]));
    assert_eq!(none.call("health", json!({})).await["ok"], true);
    let r = none.call("status", json!({})).await;
    assert_eq!(r["error"]["code"], "FORBIDDEN");
    assert_eq!(r["error"]["message"], "missing scope: operator.read");
    assert_eq!(r["error"]["details"]["code"], "MISSING_SCOPE");
    assert_eq!(r["error"]["details"]["missingScope"], "operator.read");
    assert_eq!(
        r["error"]["details"]["requiredScopes"],
        json!(["operator.read"])
    );
    let (mut read, _) = Client::connect(&s.url(), Some(TOKEN), &["operator.read"]).await;
    assert_eq!(read.call("status", json!({})).await["ok"], true);
    assert_eq!(read.call("demo.reply", json!({})).await["ok"], true);
    let r = read.call("gateway.restart", json!({})).await;
    assert_eq!(r["error"]["code"], "FORBIDDEN");
    assert_eq!(r["error"]["details"]["missingScope"], "operator.admin");
    // Write implies read; unknown operator scopes are kept as given.
    let (mut w, hello) = Client::connect(
        &s.url(),
        Some(TOKEN),
        &["operator.write", "operator.talk.secrets"],
    )
    .await;
    assert_eq!(
        hello["auth"]["scopes"],
        json!(["operator.write", "operator.talk.secrets"])
    );
    assert_eq!(w.call("status", json!({})).await["ok"], true);
}

#[tokio::test]
async fn ticks_carry_ts_and_seq_counts_from_one() {
    let s = demo_server("[limits]\ntick_interval_ms = 100\n").await;
    let (mut c, hello) = Client::admin(&s.url()).await;
    assert_eq!(hello["policy"]["tickIntervalMs"], 100);
    let t1 = c.event("tick").await;
    let t2 = c.event("tick").await;
    assert!(t1["payload"]["ts"].as_u64().unwrap() > 0);
    assert_eq!(t1["seq"], 1, "{t1}");
    assert_eq!(t2["seq"], 2, "{t2}");
}

#[tokio::test]
async fn slow_consumer_is_closed() {
    let s = demo_server("[limits]\nmax_buffered_bytes = 200000\n").await;
    let (mut c, _) = Client::admin(&s.url()).await;
    let pad = "y".repeat(60_000);
    // Ask for far more than kernel buffers hold, without reading.
    let mut sent = 0;
    let gone = loop {
        if s.running().connections_open() == 0 {
            break true;
        }
        if sent >= 2000 {
            break false;
        }
        let frame =
            json!({"type":"req","id":format!("f{sent}"),"method":"demo.echo","params":{"pad":pad}});
        if tokio::time::timeout(Duration::from_secs(2), c.send_json_checked(&frame))
            .await
            .map_or(true, |ok| !ok)
        {
            break true;
        }
        sent += 1;
    };
    assert!(gone, "still open after {sent} unread responses");
    eventually(WAIT, "connection dropped", || async {
        (s.running().connections_open() == 0).then_some(())
    })
    .await;
    let (_, closed) = c.until_closed().await;
    // Either the close frame made it out, or the socket was dropped.
    assert!(
        closed.code.is_none() || (closed.code == Some(1008) && closed.reason == "slow consumer"),
        "{closed:?}"
    );
}
