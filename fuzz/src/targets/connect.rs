//! `connect` params (`gateway_core::frame::ConnectParams`) and protocol
//! negotiation.
//!
//! Asserts, against an independent reading of the JSON: params parse exactly
//! when every known field has its documented type (strict on known fields,
//! lenient on unknown ones); negotiation picks 4 when the range holds it,
//! else 3, else none. (Objects are objects: serde's derived structs also
//! take arrays, which this target caught; see `fuzz/regressions/connect`.)

use super::{has_duplicate_keys, message_class, signature};
use crate::engine::{Harness, InputKind, Target};
use crate::mutate;
use gateway_core::frame::ConnectParams;
use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Map, Value, json};

const DICTIONARY: &[&str] = &[
    "minProtocol",
    "maxProtocol",
    "client",
    "id",
    "version",
    "platform",
    "mode",
    "displayName",
    "instanceId",
    "deviceFamily",
    "role",
    "operator",
    "node",
    "scopes",
    "operator.read",
    "operator.write",
    "operator.admin",
    "auth",
    "token",
    "password",
    "caps",
    "locale",
    "device",
];

pub(super) fn target() -> Target {
    Target {
        name: "connect",
        about: "connect params: strict known fields, lenient unknown ones, negotiation",
        kind: InputKind::Json,
        dictionary: DICTIONARY,
        seeds,
        generate,
        harness: || Box::new(ConnectHarness),
        known: &[],
    }
}

fn seeds() -> Vec<Vec<u8>> {
    [
        r#"{"minProtocol":4,"maxProtocol":4,"client":{"id":"cli","version":"2026.9.6","platform":"linux","deviceFamily":"Linux","mode":"cli","instanceId":"x"},"caps":[],"auth":{"token":"t0k3n-s3cret"},"role":"operator","scopes":["operator.read"]}"#,
        r#"{"minProtocol":3,"maxProtocol":3,"client":{"id":"bncr","version":"1","platform":"node","mode":"backend"},"scopes":["operator.write"],"auth":{"password":"pw-s3cret-value"}}"#,
        r#"{"minProtocol":1,"maxProtocol":9,"client":{"id":"n","version":"1","platform":"ios","mode":"node","displayName":null},"role":"node"}"#,
        r#"{"minProtocol":5,"maxProtocol":6,"client":{"id":"x","version":"1","platform":"p","mode":"m"}}"#,
        r#"{"minProtocol":"4","maxProtocol":4,"client":{}}"#,
        r#"{"minProtocol":4,"maxProtocol":4,"client":{"id":"c","version":"1","platform":"p","mode":"m"},"auth":"secret-as-a-string"}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn generate(rng: &mut StdRng) -> Vec<u8> {
    let mut client = Map::new();
    for k in ["id", "version", "platform", "mode"] {
        if !rng.random_ratio(1, 8) {
            client.insert(k.into(), json!(mutate::string(rng, DICTIONARY)));
        }
    }
    if rng.random_ratio(1, 3) {
        client.insert("displayName".into(), mutate::value(rng, DICTIONARY, 0));
    }
    let mut m = Map::new();
    m.insert("minProtocol".into(), mutate::number(rng));
    m.insert("maxProtocol".into(), mutate::number(rng));
    m.insert("client".into(), Value::Object(client));
    if rng.random() {
        m.insert(
            "role".into(),
            json!(["operator", "node", "admin", ""][rng.random_range(0..4)]),
        );
    }
    if rng.random() {
        let scopes: Vec<Value> = (0..rng.random_range(0..4))
            .map(|_| json!(mutate::string(rng, DICTIONARY)))
            .collect();
        m.insert("scopes".into(), Value::Array(scopes));
    }
    if rng.random() {
        m.insert(
            "auth".into(),
            json!({"token": format!("tok-{}", rng.random::<u32>())}),
        );
    }
    if rng.random_ratio(1, 3) {
        m.insert(
            mutate::string(rng, DICTIONARY),
            mutate::value(rng, DICTIONARY, 2),
        );
    }
    serde_json::to_vec(&Value::Object(m)).unwrap_or_default()
}

fn is_u32(v: Option<&Value>) -> bool {
    v.and_then(Value::as_u64)
        .is_some_and(|n| n <= u64::from(u32::MAX))
}

fn opt_string(v: Option<&Value>) -> bool {
    matches!(v, None | Some(Value::Null | Value::String(_)))
}

/// Whether `v` has every known field of `connect` params with its documented type.
fn well_typed(o: &Map<String, Value>) -> bool {
    let client_ok = o.get("client").and_then(Value::as_object).is_some_and(|c| {
        ["id", "version", "platform", "mode"]
            .iter()
            .all(|k| c.get(*k).is_some_and(Value::is_string))
            && opt_string(c.get("displayName"))
            && opt_string(c.get("instanceId"))
    });
    let role_ok = matches!(o.get("role"), None | Some(Value::Null))
        || o.get("role")
            .and_then(Value::as_str)
            .is_some_and(|r| r == "operator" || r == "node");
    let scopes_ok = match o.get("scopes") {
        None | Some(Value::Null) => true,
        Some(Value::Array(a)) => a.iter().all(Value::is_string),
        Some(_) => false,
    };
    let auth_ok = match o.get("auth") {
        None | Some(Value::Null) => true,
        Some(Value::Object(a)) => opt_string(a.get("token")) && opt_string(a.get("password")),
        Some(_) => false,
    };
    is_u32(o.get("minProtocol"))
        && is_u32(o.get("maxProtocol"))
        && client_ok
        && role_ok
        && scopes_ok
        && auth_ok
}

struct ConnectHarness;

impl Harness for ConnectHarness {
    fn run(&mut self, input: &[u8]) -> u64 {
        let value: Option<Value> = serde_json::from_slice(input).ok();
        let object = value.as_ref().and_then(Value::as_object);
        match serde_json::from_slice::<ConnectParams>(input) {
            Ok(p) => {
                if let Some(v) = &value {
                    assert!(
                        v.is_object(),
                        "connect params that are not an object parsed: {v}"
                    );
                }
                if let Some(o) = object.filter(|_| !has_duplicate_keys(input)) {
                    assert!(well_typed(o), "accepted ill-typed connect params");
                }
                let range = p.min_protocol..=p.max_protocol;
                let want = if range.contains(&4) {
                    Some(4)
                } else if range.contains(&3) {
                    Some(3)
                } else {
                    None
                };
                assert_eq!(p.negotiate(), want, "negotiation for {range:?}");
                signature(("ok", want, p.role, p.auth.is_some()))
            }
            Err(e) => {
                let text = e.to_string();
                if let Some(o) = object {
                    assert!(
                        !well_typed(o) || has_duplicate_keys(input),
                        "refused well-typed connect params: {text}"
                    );
                }
                signature(("err", message_class(&text)))
            }
        }
    }
}
