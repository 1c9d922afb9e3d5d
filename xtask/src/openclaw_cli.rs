//! `cargo xtask openclaw-cli`: the real OpenClaw CLI against ws-proxy.
//!
//! `docs/protocol.md` promises that OpenClaw's own clients work unchanged. This
//! installs the pinned OpenClaw CLI release and a Node.js it supports from
//! the npm registry into `target/openclaw-cli/` (kept between runs), starts
//! ws-proxy, and runs `openclaw gateway call ...` the way a user would:
//! `health`, `status`, `openclaw gateway probe` (not degraded), a bncr
//! plugin method, `gateway.restart`, a call after a real SIGUSR1, a wrong
//! token and an unknown method.

use crate::process::{build_binary, workspace_root};
use crate::soak::Gateway;
use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The OpenClaw release the protocol was observed from (`docs/protocol.md`).
const OPENCLAW: &str = "openclaw@2026.9.6";

/// How the check ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Every call behaved.
    Passed,
    /// The CLI could not be installed (no npm, registry unreachable): nothing
    /// was checked.
    NotInstalled(String),
}

/// Install if needed, then run every check; an `Err` is a gateway failure.
pub(crate) fn run(release: bool) -> Result<Outcome> {
    let root = workspace_root().join("target").join("openclaw-cli");
    let cli = match install(&root) {
        Ok(cli) => cli,
        Err(e) => return Ok(Outcome::NotInstalled(format!("{e:#}"))),
    };
    let binary = build_binary("ws-proxy", release)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut gateway = runtime.block_on(Gateway::start_with(&binary, &[]))?;
    let checked = check(&cli, &gateway);
    runtime.block_on(gateway.kill());
    checked.map(|()| Outcome::Passed)
}

/// The installed CLI: its entry point and the PATH that finds its Node.
#[derive(Debug)]
struct Cli {
    openclaw: PathBuf,
    path: String,
    home: PathBuf,
}

fn install(root: &Path) -> Result<Cli> {
    let node = crate::node::install()?;
    let node_bin = node.parent().context("node has a directory")?;
    let path = format!(
        "{}:{}",
        node_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let cli_dir = root.join("cli");
    let openclaw = cli_dir.join("node_modules/.bin/openclaw");
    let pinned = cli_dir.join(".installed");
    if !openclaw.exists() || std::fs::read_to_string(&pinned).ok().as_deref() != Some(OPENCLAW) {
        crate::node::npm_install(&cli_dir, OPENCLAW, Some(&path))?;
        std::fs::write(&pinned, OPENCLAW)?;
    }
    let home = root.join("home");
    std::fs::create_dir_all(&home)?;
    Ok(Cli {
        openclaw,
        path,
        home,
    })
}

/// `openclaw gateway call METHOD --url .. --token .. --json`: exit success
/// and the first JSON object printed.
fn call(cli: &Cli, gateway: &Gateway, method: &str, token: &str) -> Result<(bool, Value)> {
    let out = Command::new(&cli.openclaw)
        .args([
            "gateway",
            "call",
            method,
            "--url",
            &gateway.url(),
            "--token",
            token,
            "--json",
        ])
        .env("PATH", &cli.path)
        .env("HOME", &cli.home)
        .env("NO_COLOR", "1")
        .output()
        .with_context(|| format!("run openclaw gateway call {method}"))?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let json = text
        .find('{')
        .and_then(|at| {
            serde_json::Deserializer::from_str(&text[at..])
                .into_iter::<Value>()
                .next()?
                .ok()
        })
        .with_context(|| format!("openclaw gateway call {method} printed no JSON: {text}"))?;
    Ok((out.status.success(), json))
}

/// `openclaw gateway probe --json`: reachable, every read probe answered
/// (`health`, `status`, `system-presence`, `config.get`), not degraded.
fn probe(cli: &Cli, gateway: &Gateway, token: &str) -> Result<()> {
    let port = gateway.port().to_string();
    let out = Command::new(&cli.openclaw)
        .args(["gateway", "probe", "--url", &gateway.url(), "--port", &port])
        .args(["--token", token, "--timeout", "10000", "--json"])
        .env("PATH", &cli.path)
        .env("HOME", &cli.home)
        .env("NO_COLOR", "1")
        .output()
        .context("run openclaw gateway probe")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = text
        .find('{')
        .and_then(|at| serde_json::from_str(&text[at..]).ok())
        .with_context(|| format!("openclaw gateway probe printed no JSON: {text}"))?;
    ensure!(out.status.success(), "openclaw gateway probe failed: {v}");
    ensure!(
        v["ok"] == true && v["degraded"] == false,
        "openclaw gateway probe: ok {} degraded {}: {}",
        v["ok"],
        v["degraded"],
        v["warnings"]
    );
    let target = &v["targets"][0];
    ensure!(
        target["connect"]["rpcOk"] == true && target["health"]["ok"] == true,
        "probe target: {target}"
    );
    ensure!(
        target["self"]["version"].is_string() && target["config"]["gateway"]["authMode"] == "token",
        "probe self/config: {target}"
    );
    println!("openclaw-cli: gateway probe healthy, not degraded");
    Ok(())
}

fn check(cli: &Cli, gateway: &Gateway) -> Result<()> {
    let token = gateway
        .credentials()
        .token
        .context("ws-proxy started with a token")?;
    let ok = |method: &str| -> Result<Value> {
        let (success, v) = call(cli, gateway, method, &token)?;
        ensure!(success, "openclaw gateway call {method} failed: {v}");
        println!("openclaw-cli: {method} ok");
        Ok(v)
    };
    let health = ok("health")?;
    ensure!(
        health["ok"] == true && health["generation"] == 1,
        "health: {health}"
    );
    let loaded = health["plugins"]["loaded"].to_string();
    ensure!(
        loaded.contains("\"core\"") && loaded.contains("\"bncr\""),
        "health: {health}"
    );

    let status = ok("status")?;
    let methods = status["methods"].to_string();
    ensure!(
        methods.contains("\"bncr.connect\"") && methods.contains("\"health\""),
        "status: {status}"
    );

    probe(cli, gateway, &token)?;

    let diag = ok("bncr.diagnostics")?;
    ensure!(diag["channel"] == "bncr", "bncr.diagnostics: {diag}");

    let restarted = ok("gateway.restart")?;
    ensure!(
        restarted["ok"] == true && restarted["generation"] == 2,
        "gateway.restart: {restarted}"
    );

    kill(gateway.pid, Signal::SIGUSR1).context("send SIGUSR1")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = ok("health")?;
        if h["generation"] == 3 {
            break;
        }
        if Instant::now() > deadline {
            bail!("health after SIGUSR1 never reported generation 3: {h}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    let (success, refused) = call(cli, gateway, "health", "not-the-token")?;
    ensure!(!success, "a wrong token was accepted: {refused}");
    ensure!(
        refused.to_string().contains("unauthorized"),
        "wrong token: {refused}"
    );
    println!("openclaw-cli: wrong token refused");

    let (success, unknown) = call(cli, gateway, "no.such.method", &token)?;
    ensure!(!success, "an unknown method succeeded: {unknown}");
    ensure!(
        unknown.to_string().contains("INVALID_REQUEST")
            && unknown.to_string().contains("unknown method"),
        "unknown method: {unknown}"
    );
    println!("openclaw-cli: unknown method answered INVALID_REQUEST");
    Ok(())
}
