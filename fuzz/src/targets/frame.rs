//! `gateway_core::frame::parse_request`: every text frame a client sends.
//!
//! Asserts: no panic; a parsed request is exactly the JSON object's `type`
//! `"req"`, non-empty string `id` and `method`, and `params` (`null` = none);
//! an error is `INVALID_REQUEST "invalid request frame: ..."` and carries the
//! frame's id whenever the frame was a JSON object with a non-empty string
//! `id` (so the client is answered), and none otherwise; a well-formed
//! request is never refused (except with duplicate keys, which serde refuses
//! on purpose); the response encoder gives the id back unchanged.

use super::{has_duplicate_keys, message_class, signature};
use crate::engine::{Harness, InputKind, Target};
use crate::mutate;
use gateway_core::frame::{encode_response, parse_request};
use plugin_api::ErrorCode;
use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Map, Value, json};

const DICTIONARY: &[&str] = &[
    "type",
    "req",
    "res",
    "event",
    "id",
    "method",
    "params",
    "health",
    "status",
    "connect",
    "gateway.restart",
    "send",
    "bncr.inbound",
];

pub(super) fn target() -> Target {
    Target {
        name: "frame",
        about: "request frame parser: ids on errors, exact fields on success",
        kind: InputKind::Json,
        dictionary: DICTIONARY,
        seeds,
        generate,
        harness: || Box::new(FrameHarness),
        known: &[],
    }
}

fn seeds() -> Vec<Vec<u8>> {
    [
        r#"{"type":"req","id":"1","method":"health"}"#,
        r#"{"type":"req","id":"2","method":"send","params":{"channel":"bncr","to":"Bncr:qq:0:1","message":"hi","idempotencyKey":"k"}}"#,
        r#"{"type":"req","id":"a\"b\\c\u00e9","method":"m","params":null,"extra":[1,2]}"#,
        r#"{"id":"3","method":"status","type":"req","params":[1,{"a":{}}]}"#,
        r#"{"type":"res","id":"4","method":"m"}"#,
        r#"{"type":"req","id":5,"method":"m"}"#,
        r#"{"type":"req","id":"","method":"m"}"#,
        r#"{"type":"req","id":"6","method":""}"#,
        r#"{"type":"req","id":"7"}"#,
        r#"{"type":"req","id":"8","id":"9","method":"m"}"#,
        r#"[{"type":"req","id":"1","method":"health"}]"#,
        r#"{"type":"req","id":"10","method":"connect","params":{"minProtocol":4,"maxProtocol":4,"client":{"id":"cli","version":"2026.9.6","platform":"linux","mode":"cli"},"auth":{"token":"t"}}}"#,
        "not json",
        "",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn generate(rng: &mut StdRng) -> Vec<u8> {
    let mut m = Map::new();
    let mut field = |rng: &mut StdRng, name: &str, good: Value| {
        match rng.random_range(0..5) {
            0 => {}
            1 => {
                m.insert(name.into(), mutate::value(rng, DICTIONARY, 1));
            }
            _ => {
                m.insert(name.into(), good);
            }
        };
    };
    field(rng, "type", json!("req"));
    let id = mutate::string(rng, DICTIONARY);
    field(rng, "id", json!(id));
    let method = mutate::string(rng, DICTIONARY);
    field(rng, "method", json!(method));
    let params = mutate::value(rng, DICTIONARY, 3);
    field(rng, "params", params);
    if rng.random_ratio(1, 4) {
        m.insert(
            mutate::string(rng, DICTIONARY),
            mutate::value(rng, DICTIONARY, 2),
        );
    }
    serde_json::to_vec(&Value::Object(m)).unwrap_or_default()
}

struct FrameHarness;

impl Harness for FrameHarness {
    fn run(&mut self, input: &[u8]) -> u64 {
        // Text frames are UTF-8 by the time they reach the parser.
        let Ok(text) = std::str::from_utf8(input) else {
            return 0;
        };
        let value: Option<Value> = serde_json::from_str(text).ok();
        let object = value.as_ref().and_then(Value::as_object);
        let wire_id = object
            .and_then(|o| o.get("id"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty());
        match parse_request(text) {
            Ok(f) => {
                assert!(!f.id.is_empty(), "parsed a request with an empty id");
                assert!(
                    !f.method.is_empty(),
                    "parsed a request with an empty method"
                );
                if let Some(v) = &value {
                    assert!(
                        v.is_object(),
                        "a frame that is not an object was parsed: {v}"
                    );
                }
                if let Some(o) = object {
                    assert_eq!(
                        o.get("type"),
                        Some(&json!("req")),
                        "type of a parsed request"
                    );
                    assert_eq!(wire_id, Some(&*f.id), "id of a parsed request");
                    assert_eq!(
                        o.get("method").and_then(Value::as_str),
                        Some(&*f.method),
                        "method of a parsed request"
                    );
                    match (f.params, o.get("params")) {
                        (None, None | Some(Value::Null)) => {}
                        (Some(raw), Some(v)) => {
                            let parsed: Value = serde_json::from_str(raw.get())
                                .unwrap_or_else(|e| panic!("raw params do not parse: {e}"));
                            assert_eq!(&parsed, v, "raw params differ from the frame's");
                        }
                        (p, v) => panic!("params {p:?} but the frame has {v:?}"),
                    }
                }
                let res = encode_response(&f.id, &Ok(json!({"ok": true})));
                let back: Value = serde_json::from_str(&res)
                    .unwrap_or_else(|e| panic!("response is not JSON: {e}: {res}"));
                assert_eq!(back["id"], json!(&*f.id), "response id");
                signature(("ok", f.params.is_some()))
            }
            Err(e) => {
                // `Value` stops at 128 levels of nesting where the frame
                // parser skips deep unknown fields; such frames have no
                // independent reading of their id.
                if value.is_some() {
                    assert_eq!(
                        e.id.as_deref(),
                        wire_id,
                        "a frame error must carry the frame's id exactly when it had one ({})",
                        e.reason
                    );
                } else if let Some(id) = &e.id {
                    assert!(!id.is_empty(), "an empty id on a frame error");
                }
                assert!(!e.reason.is_empty(), "empty error reason");
                let rpc = e.to_rpc_error();
                assert_eq!(rpc.code, ErrorCode::InvalidRequest);
                assert!(rpc.message.starts_with("invalid request frame: "));
                if let Some(o) = object {
                    let well_formed = o.get("type") == Some(&json!("req"))
                        && wire_id.is_some()
                        && o.get("method")
                            .and_then(Value::as_str)
                            .is_some_and(|m| !m.is_empty());
                    assert!(
                        !well_formed || has_duplicate_keys(input),
                        "a well-formed request was refused: {}",
                        e.reason
                    );
                }
                if let Some(id) = &e.id {
                    let res = encode_response(id, &Err(rpc));
                    let back: Value = serde_json::from_str(&res)
                        .unwrap_or_else(|e| panic!("error response is not JSON: {e}: {res}"));
                    assert_eq!(back["id"], json!(id), "error response id");
                    assert_eq!(back["ok"], json!(false));
                    assert_eq!(back["error"]["code"], json!("INVALID_REQUEST"));
                }
                signature(("err", message_class(&e.reason), e.id.is_some()))
            }
        }
    }
}
