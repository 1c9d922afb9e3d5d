//! Plugin manifests (`openclaw.plugin.json`), through a real gateway's
//! `validate` (discover, parse, check the config schema, construct the
//! declarative plugin, register, build the registry, then discard).
//!
//! Asserts: no panic; a manifest that builds serves every method it
//! declares (when enabled); a manifest error names the manifest file; every
//! build error has a non-empty message; validation never changes what the
//! running generation dispatches.

use super::{has_duplicate_keys, message_class, signature};
use crate::engine::{Harness, InputKind, Target};
use crate::mutate;
use gateway_core::{
    BuildError, Catalog, Gateway, GatewayConfig, GatewayOptions, MANIFEST_FILE, StaticConfig,
};
use plugin_api::host::NullTransport;
use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Map, Value, json};
use std::path::PathBuf;
use std::sync::Arc;

const DICTIONARY: &[&str] = &[
    "id",
    "name",
    "version",
    "enabled",
    "configSchema",
    "methods",
    "events",
    "scope",
    "advertise",
    "handler",
    "reply",
    "ms",
    "echo",
    "sleep",
    "error",
    "panic",
    "none",
    "operator.read",
    "operator.admin",
    "type",
    "object",
    "properties",
    "required",
    "additionalProperties",
    "pattern",
    "enum",
    "default",
    "$ref",
    "health",
    "connect",
    "config.get",
    "demo.a",
    "plugin.demo.ev",
];

pub(super) fn target() -> Target {
    Target {
        name: "manifest",
        about: "openclaw.plugin.json through Gateway::validate",
        kind: InputKind::Json,
        dictionary: DICTIONARY,
        seeds,
        generate,
        harness: || Box::new(ManifestHarness::new()),
        known: &[],
    }
}

fn seeds() -> Vec<Vec<u8>> {
    [
        json!({"id": "demo", "version": "1.0.0", "methods": [{"name": "demo.a"}, {"name": "demo.b", "handler": "echo", "scope": "none", "advertise": false}], "events": ["plugin.demo.ev"]}),
        json!({"id": "demo", "configSchema": {"type": "object", "properties": {"mode": {"enum": ["a", "b"]}}, "required": ["mode"]}, "methods": [{"name": "demo.a"}]}),
        json!({"id": "demo", "configSchema": {"type": "object", "additionalProperties": false}, "methods": [{"name": "config.demo", "scope": "none"}]}),
        json!({"id": "demo", "methods": [{"name": "health"}]}),
        json!({"id": "demo", "methods": [{"name": "x y"}, {"name": ""}]}),
        json!({"id": "demo", "methods": [{"name": "demo.a"}, {"name": "demo.a"}]}),
        json!({"id": "demo", "enabled": false, "methods": [{"name": "demo.a", "handler": "sleep", "ms": 5}]}),
        json!({"id": "", "methods": []}),
        json!({"id": "core"}),
        json!({"id": "demo", "configSchema": {"$ref": "http://example.invalid/s.json"}}),
        json!({"id": "demo", "methods": [{"name": "demo.a", "unknown": 1}]}),
    ]
    .iter()
    .map(|v| v.to_string().into_bytes())
    .collect()
}

fn generate(rng: &mut StdRng) -> Vec<u8> {
    let mut m = Map::new();
    m.insert(
        "id".into(),
        json!(["demo", "d2", "", "a b"][rng.random_range(0..4)]),
    );
    let methods: Vec<Value> = (0..rng.random_range(0..4))
        .map(|_| {
            let mut method = Map::new();
            method.insert("name".into(), json!(mutate::string(rng, DICTIONARY)));
            if rng.random() {
                method.insert(
                    "handler".into(),
                    json!(
                        ["reply", "echo", "error", "panic", "sleep", "x"][rng.random_range(0..6)]
                    ),
                );
            }
            if rng.random() {
                method.insert("scope".into(), json!(mutate::string(rng, DICTIONARY)));
            }
            Value::Object(method)
        })
        .collect();
    m.insert("methods".into(), Value::Array(methods));
    if rng.random_ratio(1, 3) {
        m.insert("configSchema".into(), mutate::value(rng, DICTIONARY, 3));
    }
    serde_json::to_vec(&Value::Object(m)).unwrap_or_default()
}

struct ManifestHarness {
    _runtime: tokio::runtime::Runtime,
    gateway: Gateway,
    _dir: tempfile::TempDir,
    manifest: PathBuf,
    serving: Vec<String>,
}

impl ManifestHarness {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let mut config = GatewayConfig::default();
        config.plugins.dirs = vec![dir.path().to_path_buf()];
        let gateway = runtime
            .block_on(Gateway::start(GatewayOptions {
                catalog: Catalog::new(),
                config: Arc::new(StaticConfig::new(config)),
                state_dir: dir.path().join("state"),
                transport: Arc::new(NullTransport),
            }))
            .expect("a gateway with an empty plugin dir starts");
        let serving = gateway.features().methods.to_vec();
        ManifestHarness {
            manifest: dir.path().join(MANIFEST_FILE),
            _runtime: runtime,
            gateway,
            _dir: dir,
            serving,
        }
    }
}

impl Harness for ManifestHarness {
    fn run(&mut self, input: &[u8]) -> u64 {
        std::fs::write(&self.manifest, input).expect("write the manifest");
        let outcome = self.gateway.validate();
        assert_eq!(
            self.gateway.features().methods.to_vec(),
            self.serving,
            "validate changed what the running generation serves"
        );
        match outcome {
            Ok(methods) => {
                // `Value` stops at 128 levels where the manifest parser
                // skips deep unknown fields; such manifests are not checked.
                let declared: Value = serde_json::from_slice(input).unwrap_or_default();
                let enabled = declared.get("enabled") != Some(&json!(false));
                if enabled && !has_duplicate_keys(input) {
                    for m in declared["methods"].as_array().into_iter().flatten() {
                        let name = m["name"].as_str().unwrap_or_default();
                        assert!(
                            methods.iter().any(|s| s == name),
                            "declared method {name:?} does not dispatch"
                        );
                    }
                }
                signature(("ok", enabled, methods.len().min(8)))
            }
            Err(e) => {
                let shown = e.to_string();
                assert!(!shown.is_empty(), "empty build error");
                let class = match &e {
                    BuildError::Manifest { path, message } => {
                        assert_eq!(path, &self.manifest, "a manifest error names the manifest");
                        assert!(!message.is_empty());
                        "manifest"
                    }
                    BuildError::Plugin { plugin, message } => {
                        assert!(!message.is_empty(), "plugin error without a message");
                        let _ = plugin;
                        "plugin"
                    }
                    BuildError::Registry(_) => "registry",
                    BuildError::Config(_) => "config",
                };
                signature(("err", class, message_class(&shown)))
            }
        }
    }
}
