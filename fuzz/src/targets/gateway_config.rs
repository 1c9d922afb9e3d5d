//! The gateway's TOML config (`[plugins]`, `[restart]`) as
//! `gateway_core::parse_toml` reads it, and the field locator errors use.
//!
//! Asserts: no panic; an error names the file, has a 1-based line within
//! the text (and a column) when it has one, a non-empty dotted field when
//! it has one, and is one line; `toml_field_position` and
//! `ConfigError::at_field` accept any text and any dotted path.

use super::{message_class, signature};
use crate::engine::{Harness, InputKind, Target};
use gateway_core::{ConfigError, ConfigOrigin, GatewayConfig, parse_toml, toml_field_position};
use rand::Rng;
use rand::rngs::StdRng;
use std::path::Path;

const FILE: &str = "fuzz.toml";

const DICTIONARY: &[&str] = &[
    "plugins",
    "plugins.entries.bncr",
    "plugins.entries.bncr.config",
    "plugins.entries.core",
    "plugins.entries.demo",
    "restart",
    "dirs",
    "entries",
    "enabled",
    "config",
    "drain_timeout_ms",
    "service_stop_timeout_ms",
    "service_start_timeout_ms",
    "start_wait_ms",
    "connections",
    "signals",
    "dmPolicy",
    "retryLimit",
    "echo",
    "server",
    "auth",
];

pub(super) fn target() -> Target {
    Target {
        name: "gateway-config",
        about: "gateway TOML config: errors name file, line and field",
        kind: InputKind::Toml,
        dictionary: DICTIONARY,
        seeds,
        generate,
        harness: || Box::new(ConfigHarness),
        known: &[],
    }
}

fn seeds() -> Vec<Vec<u8>> {
    [
        "[plugins]\ndirs = [\"./p\", \"/abs\"]\n\n[plugins.entries.bncr]\nenabled = true\nconfig = { dmPolicy = \"open\", echo = { enabled = true } }\n\n[restart]\ndrain_timeout_ms = 100\nconnections = \"close\"\nsignals = [\"SIGUSR1\", \"SIGHUP\"]\n",
        "[plugins.entries.bncr.config]\ndmPolicy = \"allowlist\"\nallowFrom = [\"qq:1\"]\n[plugins.entries.bncr.config.echo]\nprefix = \"> \"\n",
        "[restart]\ndrain_timeout = 5\n",
        "[plugins.entries.bncr]\nenabled = \"yes\"\n",
        "[plugins]\ndirs = [\"a\"\n\n[restart]\n",
        "plugins = 3\n",
        "[[plugins]]\nx = 1\n",
        "[restart]\nconnections = \"sometimes\"\n\u{e9}\u{e9} = 1\n",
        "",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn generate(rng: &mut StdRng) -> Vec<u8> {
    let mut out = String::new();
    for _ in 0..rng.random_range(1..6) {
        let table = DICTIONARY[rng.random_range(0..6)];
        out.push_str(&format!("[{table}]\n"));
        for _ in 0..rng.random_range(0..4) {
            let key = DICTIONARY[rng.random_range(6..DICTIONARY.len())];
            let value =
                ["1", "\"x\"", "true", "[]", "{}", "-5", "[\"SIGUSR2\"]"][rng.random_range(0..7)];
            out.push_str(&format!("{key} = {value}\n"));
        }
    }
    out.into_bytes()
}

struct ConfigHarness;

fn check_error(e: &ConfigError, text: &str) {
    let shown = e.to_string();
    assert_eq!(
        e.file.as_deref(),
        Some(Path::new(FILE)),
        "error names the file: {shown}"
    );
    assert!(
        shown.starts_with(&format!("config error in {FILE}")),
        "error display: {shown}"
    );
    if let Some(line) = e.line {
        let lines = text.matches('\n').count() + 1;
        assert!(
            (1..=lines).contains(&line),
            "line {line} outside the text's {lines} lines: {shown}"
        );
        assert!(
            e.column.is_some_and(|c| c >= 1),
            "a line without a column: {shown}"
        );
    }
    if let Some(field) = &e.field {
        assert!(!field.is_empty(), "empty field: {shown}");
    }
    assert!(!e.message.is_empty(), "empty message: {shown}");
    assert!(
        !shown.contains('\n'),
        "a config error is one line: {shown:?}"
    );
}

impl Harness for ConfigHarness {
    fn run(&mut self, input: &[u8]) -> u64 {
        let Ok(text) = std::str::from_utf8(input) else {
            return 0;
        };
        let origin = ConfigOrigin {
            path: FILE.into(),
            text: text.into(),
        };
        // The locator on dotted paths made of the input's own words.
        let words: Vec<&str> = text
            .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
            .filter(|w| !w.is_empty())
            .take(8)
            .collect();
        for w in &words {
            if let Some((line, column)) = toml_field_position(text, w) {
                assert!(
                    line >= 1 && column >= 1,
                    "position ({line}, {column}) for {w}"
                );
            }
            check_error(&ConfigError::at_field(Some(&origin), w, "probe"), text);
        }
        match parse_toml::<GatewayConfig>(&origin) {
            Ok(cfg) => signature((
                "ok",
                cfg.plugins.dirs.len().min(3),
                cfg.plugins.entries.len().min(3),
            )),
            Err(e) => {
                check_error(&e, text);
                let table = e.field.as_deref().map(|f| {
                    let depth = f.split('.').count();
                    (f.split('.').next().unwrap_or_default().to_string(), depth)
                });
                signature(("err", table, message_class(&e.message)))
            }
        }
    }
}
