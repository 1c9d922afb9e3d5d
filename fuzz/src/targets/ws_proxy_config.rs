//! ws-proxy's config file, read the way the binary reads it
//! (`Settings::resolve` on a real file, with a token given on the command
//! line).
//!
//! Asserts: no panic; an error is one non-empty line (the binary prints it
//! and exits 2), naming the file when the file is at fault; accepted
//! settings keep their documented bounds (`max_payload` at least 64 KiB,
//! positive periods and in-flight cap, `auth = "none"` only on loopback
//! unless allowed); resolving writes nothing to the state directory.

use super::{message_class, signature};
use crate::engine::{Harness, InputKind, Target};
use rand::Rng;
use rand::rngs::StdRng;
use std::path::PathBuf;
use ws_proxy::{AuthMode, Cli, Settings};

const DICTIONARY: &[&str] = &[
    "server",
    "auth",
    "limits",
    "logging",
    "plugins",
    "restart",
    "bind",
    "port",
    "state_dir",
    "mode",
    "token",
    "password",
    "allow_remote_none",
    "max_failures_per_minute",
    "max_payload",
    "max_buffered_bytes",
    "tick_interval_ms",
    "handshake_timeout_ms",
    "max_in_flight",
    "ping_interval_ms",
    "shutdown_drain_ms",
    "format",
    "level",
    "dirs",
    "signals",
    "connections",
];

pub(super) fn target() -> Target {
    Target {
        name: "ws-proxy-config",
        about: "ws-proxy TOML config file: one-line errors, bounds kept, no writes",
        kind: InputKind::Toml,
        dictionary: DICTIONARY,
        seeds,
        generate,
        harness: || Box::new(WsConfigHarness::new()),
        known: &[],
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let example = include_str!("../../../ws-proxy/ws-proxy.example.toml");
    [
        example,
        "[server]\nbind = \"0.0.0.0\"\nport = 0\n[auth]\nmode = \"none\"\n",
        "[auth]\nmode = \"none\"\nallow_remote_none = true\n[server]\nbind = \"::\"\n",
        "[auth]\nmode = \"password\"\npassword = \"\"\n",
        "[limits]\nmax_payload = 65535\n",
        "[limits]\nmax_in_flight = 0\nping_interval_ms = 0\n",
        "[logging]\nformat = \"xml\"\nlevel = \"[[\"\n",
        "[restart]\nsignals = [\"SIGKILL\"]\n",
        "[server]\nport = 65536\n",
        "[plugins]\ndirs = [\"../x\"]\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn generate(rng: &mut StdRng) -> Vec<u8> {
    let mut out = String::new();
    for table in ["server", "auth", "limits", "logging", "restart"] {
        if rng.random_ratio(1, 2) {
            continue;
        }
        out.push_str(&format!("[{table}]\n"));
        for _ in 0..rng.random_range(0..4) {
            let key = DICTIONARY[rng.random_range(6..DICTIONARY.len())];
            let value = [
                "0",
                "1",
                "65535",
                "65536",
                "\"none\"",
                "\"token\"",
                "\"127.0.0.1\"",
                "\"0.0.0.0\"",
                "true",
                "\"json\"",
                "[\"SIGHUP\"]",
                "-1",
            ][rng.random_range(0..12)];
            out.push_str(&format!("{key} = {value}\n"));
        }
    }
    out.into_bytes()
}

struct WsConfigHarness {
    dir: tempfile::TempDir,
    file: PathBuf,
    state: PathBuf,
}

impl WsConfigHarness {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("gateway.toml");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).expect("state dir");
        WsConfigHarness { dir, file, state }
    }
}

impl Harness for WsConfigHarness {
    fn run(&mut self, input: &[u8]) -> u64 {
        std::fs::write(&self.file, input).expect("write the config file");
        let cli = Cli {
            config: Some(self.file.clone()),
            token: Some("fuzz-token".into()),
            state_dir: Some(self.state.clone()),
            ..Cli::default()
        };
        let outcome = Settings::resolve(&cli);
        let written = std::fs::read_dir(&self.state)
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(written, 0, "resolving settings wrote to the state dir");
        let _ = &self.dir;
        match outcome {
            Ok(s) => {
                assert!(
                    s.limits.max_payload >= 64 * 1024,
                    "max_payload below 64 KiB"
                );
                assert!(s.limits.tick_interval_ms > 0 && s.limits.ping_interval_ms > 0);
                assert!(s.limits.max_in_flight > 0, "max_in_flight 0 accepted");
                assert!(
                    s.auth.mode != AuthMode::None || s.bind.is_loopback() || {
                        let text = String::from_utf8_lossy(input);
                        text.contains("allow_remote_none")
                    },
                    "auth none on {} without allow_remote_none",
                    s.bind
                );
                signature(("ok", s.auth.mode == AuthMode::None, s.bind.is_loopback()))
            }
            Err(e) => {
                assert!(!e.0.is_empty(), "empty settings error");
                assert!(
                    !e.0.contains('\n'),
                    "a settings error is one line: {:?}",
                    e.0
                );
                if e.0.starts_with("config error") {
                    assert!(
                        e.0.contains(&*self.file.to_string_lossy()),
                        "a config error names the file: {}",
                        e.0
                    );
                }
                signature(("err", message_class(&e.0)))
            }
        }
    }
}
