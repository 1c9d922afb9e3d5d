//! Every row of the handshake table of `docs/protocol.md`, hello-ok's shape, protocol 3
//! negotiation, auth modes and the failed-auth rate limit.

use crate::common::*;
use serde_json::{Value, json};

/// Open, read the challenge, send `frame`; return what came back and how it closed.
async fn first_frame(url: &str, frame: &str) -> (Vec<Value>, Closed) {
    let mut c = Client::open(url).await;
    let ch = c.next_frame().await.unwrap();
    assert_eq!(ch["event"], "connect.challenge");
    c.send_text(frame).await;
    c.until_closed().await
}

fn req(id: &str, method: &str, params: Value) -> String {
    json!({"type":"req","id":id,"method":method,"params":params}).to_string()
}

fn only_error(frames: &[Value], id: &str) -> Value {
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0]["type"], "res");
    assert_eq!(frames[0]["id"], id);
    assert_eq!(frames[0]["ok"], false);
    frames[0]["error"].clone()
}

#[tokio::test]
async fn challenge_then_hello_ok_with_every_field() {
    let s = Server::start(&[]).await;
    let mut c = Client::open(&s.url()).await;
    let ch = c.next_frame().await.unwrap();
    assert_eq!(ch["type"], "event");
    assert_eq!(ch["event"], "connect.challenge");
    assert!(
        ch["payload"]["nonce"]
            .as_str()
            .is_some_and(|n| n.len() >= 16)
    );
    assert!(ch["payload"]["ts"].as_u64().unwrap() > 1_600_000_000_000);
    // Exactly what the OpenClaw 2026.9.6 CLI sends.
    let params = json!({"minProtocol":4,"maxProtocol":4,"client":{"id":"cli","version":"2026.9.6",
        "platform":"linux","deviceFamily":"Linux","mode":"cli","instanceId":"abc"},
        "caps":[],"auth":{"token":TOKEN},"role":"operator","scopes":["operator.read"],
        "locale":"en","userAgent":"x","newerField":{"a":1}});
    let res = c.request_raw("connect", params).await;
    assert_eq!(res["ok"], true, "{res}");
    let h = &res["payload"];
    assert_eq!(h["type"], "hello-ok");
    assert_eq!(h["protocol"], 4);
    assert!(h["server"]["version"].is_string());
    assert!(h["server"]["connId"].is_string());
    let methods: Vec<&str> = h["features"]["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    for m in [
        "health",
        "status",
        "gateway.restart",
        "send",
        "bncr.connect",
    ] {
        assert!(methods.contains(&m), "{m} missing from {methods:?}");
    }
    let events = h["features"]["events"].as_array().unwrap();
    assert!(events.contains(&json!("gateway.generation")));
    assert_eq!(h["snapshot"]["generation"], 1);
    assert!(h["snapshot"]["uptimeMs"].is_u64());
    assert_eq!(
        h["auth"],
        json!({"role":"operator","scopes":["operator.read"]})
    );
    assert_eq!(h["policy"]["maxPayload"], 25 * 1024 * 1024);
    assert_eq!(h["policy"]["maxBufferedBytes"], 50 * 1024 * 1024);
    assert_eq!(h["policy"]["tickIntervalMs"], 30000);
    // The advertised list is what dispatches.
    let res = c.call("status", json!({})).await;
    assert_eq!(res["ok"], true, "{res}");
}

#[tokio::test]
async fn older_clients_get_protocol_3() {
    let s = Server::start(&[]).await;
    let mut c = Client::open(&s.url()).await;
    c.next_frame().await.unwrap();
    let mut p = connect_params(2, 3, &[]);
    p["auth"] = json!({"token": TOKEN});
    let res = c.request_raw("connect", p).await;
    assert_eq!(res["payload"]["protocol"], 3, "{res}");
    let res = c.call("health", json!({})).await;
    assert_eq!(res["ok"], true, "{res}");
    // A range reaching past 4 is answered with 4.
    let (_c, hello) = {
        let mut c = Client::open(&s.url()).await;
        c.next_frame().await.unwrap();
        let mut p = connect_params(3, 9, &[]);
        p["auth"] = json!({"token": TOKEN});
        let res = c.request_raw("connect", p).await;
        (c, res["payload"].clone())
    };
    assert_eq!(hello["protocol"], 4);
}

#[tokio::test]
async fn first_frame_not_json_closes_1008_without_answer() {
    let s = Server::start(&[]).await;
    for bad in ["not json", "[1,2]", r#"{"type":"req","method":"connect"}"#] {
        let (frames, closed) = first_frame(&s.url(), bad).await;
        assert!(frames.is_empty(), "{bad}: {frames:?}");
        assert_eq!(closed.code, Some(1008), "{bad}");
        assert_eq!(closed.reason, "invalid request frame");
    }
}

#[tokio::test]
async fn first_request_must_be_connect() {
    let s = Server::start(&[]).await;
    let (frames, closed) = first_frame(&s.url(), &req("a", "health", json!({}))).await;
    let e = only_error(&frames, "a");
    assert_eq!(e["code"], "INVALID_REQUEST");
    assert_eq!(
        e["message"],
        "invalid handshake: first request must be connect"
    );
    assert_eq!(closed.code, Some(1008));
}

#[tokio::test]
async fn invalid_connect_params() {
    let s = Server::start(&[]).await;
    let cases = [
        json!({"minProtocol":"4","maxProtocol":4,"client":{"id":"c","version":"1","platform":"p","mode":"cli"}}),
        json!({"minProtocol":4,"maxProtocol":4}),
        json!({"minProtocol":4,"maxProtocol":4,"client":{"id":"c","version":"1","platform":"p","mode":"cli"},"scopes":"operator.read"}),
        json!({"minProtocol":4,"maxProtocol":4,"client":{"id":"c","version":"1","platform":"p","mode":"cli"},"role":"king"}),
        Value::Null,
    ];
    for p in cases {
        let (frames, closed) = first_frame(&s.url(), &req("p", "connect", p.clone())).await;
        let e = only_error(&frames, "p");
        assert_eq!(e["code"], "INVALID_REQUEST", "{p}");
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .starts_with("invalid connect params: "),
            "{p}: {e}"
        );
        assert_eq!(closed.code, Some(1008));
    }
}

#[tokio::test]
async fn protocol_mismatch_closes_1002() {
    let s = Server::start(&[]).await;
    for (min, max) in [(5, 6), (1, 2)] {
        let mut p = connect_params(min, max, &[]);
        p["auth"] = json!({"token": TOKEN});
        let (frames, closed) = first_frame(&s.url(), &req("v", "connect", p)).await;
        let e = only_error(&frames, "v");
        assert_eq!(e["code"], "INVALID_REQUEST");
        assert_eq!(e["message"], "protocol mismatch");
        assert_eq!(e["details"]["code"], "PROTOCOL_MISMATCH");
        assert_eq!(e["details"]["expectedProtocol"], 4);
        assert_eq!(closed.code, Some(1002));
    }
}

async fn auth_failure(url: &str, auth: Value) -> (Value, Closed) {
    let mut p = connect_params(4, 4, &["operator.read"]);
    if !auth.is_null() {
        p["auth"] = auth;
    }
    let (frames, closed) = first_frame(url, &req("x", "connect", p)).await;
    (only_error(&frames, "x"), closed)
}

#[tokio::test]
async fn token_missing_or_wrong() {
    let s = Server::start(&[]).await;
    let (e, closed) = auth_failure(&s.url(), Value::Null).await;
    assert_eq!(e["code"], "INVALID_REQUEST");
    assert!(e["message"].as_str().unwrap().starts_with("unauthorized: "));
    assert_eq!(e["details"]["code"], "AUTH_TOKEN_MISSING");
    assert_eq!(closed.code, Some(1008));
    let (e, closed) = auth_failure(&s.url(), json!({"token": "wrong"})).await;
    assert_eq!(e["details"]["code"], "AUTH_TOKEN_MISMATCH");
    assert!(e["message"].as_str().unwrap().starts_with("unauthorized: "));
    assert_eq!(closed.code, Some(1008));
    // The secret may travel in either field.
    let mut c = Client::open(&s.url()).await;
    c.next_frame().await.unwrap();
    let mut p = connect_params(4, 4, &[]);
    p["auth"] = json!({"password": TOKEN});
    assert_eq!(c.request_raw("connect", p).await["ok"], true);
}

#[tokio::test]
async fn password_missing_or_wrong() {
    let s = Server::start(&["--auth", "password", "--password", "hunter2"]).await;
    let (e, closed) = auth_failure(&s.url(), json!({})).await;
    assert_eq!(e["details"]["code"], "AUTH_PASSWORD_MISSING");
    assert_eq!(closed.code, Some(1008));
    let (e, _) = auth_failure(&s.url(), json!({"password": "hunter3"})).await;
    assert_eq!(e["details"]["code"], "AUTH_PASSWORD_MISMATCH");
    let mut c = Client::open(&s.url()).await;
    c.next_frame().await.unwrap();
    let mut p = connect_params(4, 4, &[]);
    p["auth"] = json!({"password": "hunter2"});
    assert_eq!(c.request_raw("connect", p).await["ok"], true);
}

#[tokio::test]
async fn auth_none_on_loopback() {
    let s = Server::start(&["--auth", "none"]).await;
    let (mut c, hello) = Client::connect(&s.url(), None, &["operator.read"]).await;
    assert_eq!(hello["auth"]["scopes"], json!(["operator.read"]));
    assert_eq!(c.call("status", json!({})).await["ok"], true);
}

#[tokio::test]
async fn oversized_preauth_frame_closes_1009() {
    let s = Server::start(&[]).await;
    let big = format!(
        r#"{{"type":"req","id":"b","method":"connect","params":{{"pad":"{}"}}}}"#,
        "x".repeat(70 * 1024)
    );
    let (frames, closed) = first_frame(&s.url(), &big).await;
    assert!(frames.is_empty(), "{frames:?}");
    assert_eq!(closed.code, Some(1009));
    assert_eq!(closed.reason, "preauth payload too large");
}

#[tokio::test]
async fn a_huge_preauth_frame_is_refused_before_it_is_buffered() {
    // A frame header announcing 8 MiB (under maxPayload, 25 MiB, so the
    // WebSocket layer's own limit would wait for all of it), followed by
    // only 200 KiB. The pre-auth byte budget must close 1009 at once, not
    // wait for the rest (which would end in a 1008 handshake timeout).
    use tokio::io::AsyncWriteExt;
    let s = Server::start(&[]).await;
    let mut c = Client::open(&s.url()).await;
    let ch = c.next_frame().await.expect("challenge");
    assert_eq!(ch["event"], "connect.challenge");
    let announced: u64 = 8 * 1024 * 1024;
    let mut frame = vec![0x81u8, 0x80 | 127];
    frame.extend_from_slice(&announced.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]); // mask key 0: payload as is
    frame.extend(std::iter::repeat_n(b'x', 200 * 1024));
    let raw = match c.ws.get_mut() {
        tokio_tungstenite::MaybeTlsStream::Plain(tcp) => tcp,
        _ => unreachable!("plain TCP in tests"),
    };
    let started = std::time::Instant::now();
    let _ = raw.write_all(&frame).await;
    let (frames, closed) = c.until_closed().await;
    assert!(frames.is_empty(), "{frames:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "closed promptly"
    );
    match closed.code {
        Some(code) => {
            assert_eq!(code, 1009);
            assert_eq!(closed.reason, "preauth payload too large");
        }
        // The kernel may reset the socket under unread bytes first.
        None => assert!(closed.reason.contains("reset"), "{}", closed.reason),
    }
    let (mut ok, _) = Client::admin(&s.url()).await;
    assert_eq!(ok.call("health", json!({})).await["ok"], true);
}

#[tokio::test]
async fn no_connect_within_the_timeout_closes_1008() {
    let s = Server::with_config("[limits]\nhandshake_timeout_ms = 300\n", &[]).await;
    let mut c = Client::open(&s.url()).await;
    let ch = c.next_frame().await.unwrap();
    assert_eq!(ch["event"], "connect.challenge");
    let (frames, closed) = c.until_closed().await;
    assert!(frames.is_empty(), "{frames:?}");
    assert_eq!(closed.code, Some(1008));
    assert_eq!(closed.reason, "handshake timeout");
}

#[tokio::test]
async fn repeated_local_failures_are_throttled_not_locked_out() {
    let s = Server::with_config("[auth]\nmax_failures_per_minute = 3\n", &[]).await;
    for _ in 0..4 {
        let (e, closed) = auth_failure(&s.url(), json!({"token": "bad"})).await;
        assert_eq!(e["details"]["code"], "AUTH_TOKEN_MISMATCH");
        assert_eq!(closed.code, Some(1008));
    }
    // All local clients share 127.0.0.1: someone else's failures never
    // refuse the right token (the failing client is held back instead).
    let (mut c, hello) = Client::connect(&s.url(), Some(TOKEN), &["operator.read"]).await;
    assert_eq!(hello["type"], "hello-ok");
    assert_eq!(c.call("health", json!({})).await["ok"], true);
}
