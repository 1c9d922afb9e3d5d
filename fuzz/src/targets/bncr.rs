//! The Bncr bridge's method params, through the real gateway.
//!
//! Each input is a method name on the first line and its params as JSON.
//! The request goes through `Gateway::dispatch` with a real bncr plugin, a
//! real SQLite store in a temp dir and an operator holding
//! `operator.write`, so parsing, validation and the handlers' own logic
//! (leases, outbox, files, dead letters) all run, and state builds up
//! across inputs. Asserts: no handler panics; every error is
//! `INVALID_REQUEST`, `FORBIDDEN` or `UNAVAILABLE` with a message no longer
//! than the request plus 1 KiB (answers are bounded by the request); every
//! success is a JSON object.

use super::{message_class, signature};
use crate::engine::{Harness, InputKind, Target};
use crate::mutate;
use gateway_core::{Catalog, Gateway, GatewayConfig, GatewayOptions, PluginEntry, StaticConfig};
use plugin_api::host::NullTransport;
use plugin_api::{ClientInfo, ConnId, ConnectionInfo, ErrorCode, Params, Role, Scopes};
use rand::Rng;
use rand::rngs::StdRng;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::sync::Arc;

const DICTIONARY: &[&str] = &[
    "accountId",
    "clientId",
    "leaseId",
    "connectionEpoch",
    "platform",
    "groupId",
    "userId",
    "msg",
    "type",
    "msgId",
    "base64",
    "path",
    "mimeType",
    "fileName",
    "sessionKey",
    "messageId",
    "ok",
    "fatal",
    "error",
    "transferId",
    "fileSize",
    "chunkSize",
    "totalChunks",
    "fileSha256",
    "chunkIndex",
    "offset",
    "size",
    "chunkSha256",
    "reason",
    "stage",
    "errorCode",
    "errorMessage",
    "olderThan",
    "limit",
    "dryRun",
    "channel",
    "to",
    "message",
    "idempotencyKey",
    "t1",
    "t2",
    "qq",
    "tg",
    "Primary",
    "default",
    "other",
    "init",
    "chunk",
    "complete",
    "abort",
    "retry-limit",
    "text",
    "image",
    "file",
    "bncr",
];

/// Every method the plugin declares, and the core `send` that reaches its
/// channel.
fn methods() -> impl Iterator<Item = &'static str> {
    bncr_plugin::METHODS.iter().copied().chain(["send"])
}

pub(super) fn target() -> Target {
    Target {
        name: "bncr",
        about: "bncr.* params through the real gateway, plugin and SQLite store",
        kind: InputKind::LineThenJson,
        dictionary: DICTIONARY,
        seeds,
        generate,
        harness: || Box::new(BncrHarness::new()),
        known: &[],
    }
}

fn seeds() -> Vec<Vec<u8>> {
    [
        ("bncr.connect", json!({"accountId": "Primary", "clientId": "c1"})),
        ("bncr.connect", json!({"accountId": "other"})),
        (
            "bncr.inbound",
            json!({"platform": "qq", "groupId": 0, "userId": 10001, "msg": "hi", "msgId": "m1"}),
        ),
        (
            "bncr.inbound",
            json!({"platform": "tg", "groupId": "-100", "userId": "5", "type": "image", "base64": "aGk=", "leaseId": "lease-x", "connectionEpoch": 1}),
        ),
        ("bncr.activity", json!({"accountId": "default"})),
        ("bncr.ack", json!({"messageId": "bncr-1", "ok": false, "error": "x"})),
        ("bncr.ack", json!({"messageId": "bncr-1", "fatal": true})),
        ("bncr.diagnostics", json!({})),
        (
            "bncr.file.init",
            json!({"transferId": "t1", "fileSize": 5, "chunkSize": 2, "fileName": "a.txt"}),
        ),
        (
            "bncr.file.chunk",
            json!({"transferId": "t1", "chunkIndex": 0, "offset": 0, "base64": "aGk=", "size": 2}),
        ),
        ("bncr.file.complete", json!({"transferId": "t1"})),
        ("bncr.file.abort", json!({"transferId": "t1", "reason": "r"})),
        (
            "bncr.file.ack",
            json!({"transferId": "t1", "stage": "chunk", "chunkIndex": 1, "ok": false}),
        ),
        (
            "bncr.deadLetter.inspect",
            json!({"reason": "fatal", "olderThan": 1000, "limit": 5, "offset": 1}),
        ),
        ("bncr.deadLetter.prune", json!({"dryRun": false, "reason": "fatal"})),
        (
            "send",
            json!({"channel": "bncr", "to": "Bncr:qq:0:10001", "message": "hello", "idempotencyKey": "k1"}),
        ),
        (
            "send",
            json!({"channel": "bncr", "to": "qq:0:1", "message": {"type": "file", "path": "/etc/passwd"}, "idempotencyKey": "k2"}),
        ),
    ]
    .into_iter()
    .map(|(m, p)| format!("{m}\n{p}").into_bytes())
    .collect()
}

fn generate(rng: &mut StdRng) -> Vec<u8> {
    let all: Vec<&str> = methods().collect();
    let method = all[rng.random_range(0..all.len())];
    let mut params = Map::new();
    for _ in 0..rng.random_range(0..7) {
        let key = DICTIONARY[rng.random_range(0..DICTIONARY.len())];
        let value = match rng.random_range(0..4) {
            0 => mutate::number(rng),
            1 => json!(mutate::string(rng, DICTIONARY)),
            2 => mutate::value(rng, DICTIONARY, 1),
            _ => json!(["t1", "t2", "qq", "0", "Primary"][rng.random_range(0..5)]),
        };
        params.insert(key.into(), value);
    }
    format!("{method}\n{}", Value::Object(params)).into_bytes()
}

struct BncrHarness {
    runtime: tokio::runtime::Runtime,
    gateway: Gateway,
    _state: tempfile::TempDir,
    next_conn: u64,
}

impl BncrHarness {
    fn new() -> Self {
        let state = tempfile::tempdir().expect("temp dir for the bncr store");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let mut config = GatewayConfig::default();
        config.plugins.entries.insert(
            "bncr".into(),
            PluginEntry {
                enabled: Some(true),
                config: Some(json!({"echo": {"enabled": true}, "retryBaseMs": 1})),
                ..PluginEntry::default()
            },
        );
        let gateway = runtime
            .block_on(Gateway::start(GatewayOptions {
                catalog: Catalog::new().with(bncr_plugin::factory()),
                config: Arc::new(StaticConfig::new(config)),
                state_dir: state.path().to_path_buf(),
                transport: Arc::new(NullTransport),
            }))
            .expect("a gateway with the bncr plugin starts");
        BncrHarness {
            runtime,
            gateway,
            _state: state,
            next_conn: 0,
        }
    }
}

impl Harness for BncrHarness {
    fn run(&mut self, input: &[u8]) -> u64 {
        let Ok(text) = std::str::from_utf8(input) else {
            return 0;
        };
        let (method, params) = text.split_once('\n').unwrap_or((text, ""));
        if !(method.starts_with("bncr.") || method == "send") {
            return 1;
        }
        // Params reach a handler only as valid JSON (the frame parser checks).
        let Ok(raw) = serde_json::from_str::<Box<RawValue>>(params) else {
            return 2;
        };
        // A handful of connections, so leases change hands.
        self.next_conn = (self.next_conn + 1) % 3;
        let ctx = plugin_api::host::request_context(Arc::new(ConnectionInfo {
            conn_id: ConnId(1 + self.next_conn),
            role: Role::Operator,
            scopes: Scopes::new(["operator.write"]),
            client: ClientInfo::default(),
        }));
        let result =
            self.runtime
                .block_on(self.gateway.dispatch(ctx, method, Params::from_raw(raw)));
        match result {
            Ok(payload) => {
                assert!(
                    payload.is_object(),
                    "{method} answered a non-object: {payload}"
                );
                let keys: Vec<&String> = payload
                    .as_object()
                    .map(|o| o.keys().collect())
                    .unwrap_or_default();
                signature((method, "ok", keys))
            }
            Err(e) => {
                assert!(!e.message.is_empty(), "{method}: empty error message");
                assert!(
                    matches!(
                        e.code,
                        ErrorCode::InvalidRequest | ErrorCode::Forbidden | ErrorCode::Unavailable
                    ),
                    "{method}: unexpected error code {:?}",
                    e.code
                );
                let reason = e.details.as_ref().and_then(|d| d.get("reason"));
                assert_ne!(
                    reason,
                    Some(&json!("handler-panicked")),
                    "a bncr handler panicked: {}",
                    e.message
                );
                assert!(
                    e.message.len() <= input.len() + 1024,
                    "{method}: a {} byte error message is larger than the request ({} bytes)",
                    e.message.len(),
                    input.len()
                );
                let known = methods().find(|m| *m == method);
                signature((known, e.code.as_str(), message_class(&e.message)))
            }
        }
    }
}
