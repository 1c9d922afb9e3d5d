//! The example gateway over a real WebSocket: the compiled-in plugin is
//! advertised and dispatched, validates its params, emits its event, and is
//! constructed anew at every restart.

use clap::Parser;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

const TOKEN: &str = "example-token";
type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame within 10 s")
            .expect("open")
            .expect("readable");
        if let Message::Text(t) = msg {
            return serde_json::from_str(&t).expect("json frame");
        }
    }
}

/// Send a request and collect frames until its response; events seen on the
/// way are returned too, in order.
async fn call(ws: &mut Ws, id: &str, method: &str, params: Value) -> (Value, Vec<Value>) {
    let frame = json!({"type": "req", "id": id, "method": method, "params": params});
    ws.send(Message::text(frame.to_string())).await.unwrap();
    let mut events = Vec::new();
    loop {
        let f = next_json(ws).await;
        if f["type"] == "res" {
            assert_eq!(
                f["id"], id,
                "one request in flight, so the next response is its"
            );
            return (f, events);
        }
        events.push(f);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greeter_is_served_validated_and_fresh_per_generation() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state").display().to_string();
    let cli = ws_proxy::Cli::parse_from([
        "custom-gateway",
        "--port",
        "0",
        "--token",
        TOKEN,
        "--state-dir",
        &state,
    ]);
    let settings = ws_proxy::Settings::resolve(&cli).unwrap();
    let server = ws_proxy::ServerBuilder::new(settings)
        .without_bncr()
        .plugin(custom_gateway::factory())
        .start()
        .await
        .unwrap();
    let url = format!("ws://{}", server.local_addr());
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["event"], "connect.challenge");
    let (hello, _) = call(
        &mut ws,
        "c",
        "connect",
        json!({"minProtocol": 4, "maxProtocol": 4,
               "client": {"id": "test", "version": "1", "platform": "linux", "mode": "cli"},
               "auth": {"token": TOKEN}, "scopes": ["operator.admin"]}),
    )
    .await;
    let methods = hello["payload"]["features"]["methods"].as_array().unwrap();
    assert!(methods.contains(&json!("greeter.hello")), "{methods:?}");
    assert!(
        !methods.contains(&json!("bncr.connect")),
        "without_bncr leaves the bridge out"
    );
    assert!(
        hello["payload"]["features"]["events"]
            .as_array()
            .unwrap()
            .contains(&json!("plugin.greeter.greeted"))
    );

    let (r, events) = call(
        &mut ws,
        "1",
        "greeter.hello",
        json!({"name": "Ada", "times": 2}),
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        r["payload"]["greeting"],
        json!(["hello, Ada", "hello, Ada"])
    );
    assert_eq!(r["payload"]["greetedThisGeneration"], 1);
    // The handler emitted the event before it answered, so this operator
    // (operator.admin implies operator.read) hears of it first.
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["event"], custom_gateway::GREETED);
    assert_eq!(events[0]["payload"]["name"], "Ada");

    for bad in [
        json!({}),
        json!({"name": "x", "times": 0}),
        json!({"name": "x", "extra": 1}),
    ] {
        let (r, _) = call(&mut ws, "bad", "greeter.hello", bad.clone()).await;
        assert_eq!(r["ok"], false, "{bad} must be refused");
        assert_eq!(r["error"]["code"], "INVALID_REQUEST", "{r}");
    }

    let (r, _) = call(&mut ws, "2", "greeter.hello", json!({"name": "Bo"})).await;
    assert_eq!(r["payload"]["greetedThisGeneration"], 2);

    let (r, mut events) = call(&mut ws, "3", "gateway.restart", json!({})).await;
    assert_eq!(r["ok"], true, "{r}");
    // A new generation constructed a new greeter: its count starts again.
    let (r, later) = call(&mut ws, "4", "greeter.hello", json!({"name": "Cy"})).await;
    assert_eq!(r["payload"]["greetedThisGeneration"], 1, "{r}");
    // The new generation is announced at the swap, so the event may come
    // before or after the restart's own answer, but always before the first
    // answer generation 2 produced.
    events.extend(later);
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "gateway.generation" && e["payload"]["generation"] == 2),
        "the connection was told about generation 2 before its answer: {events:?}"
    );
    server.stop().await;
}
