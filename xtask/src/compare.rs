//! `cargo xtask compare`: ws-proxy against echo-baseline in one run.
//!
//! Both servers run as release child processes side by side, and the same
//! release load generator (this crate's `load --json`, also a child) drives
//! `health` at each connection shape, alternating between the two servers
//! for a number of rounds. The ratio ws-proxy / echo-baseline is therefore
//! taken between figures of the same run on the same machine state.

use crate::process::build_binary;
use crate::soak::{Gateway, free_port};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// What to compare.
#[derive(Debug, Clone)]
pub(crate) struct CompareConfig {
    /// Connection shapes as (connections, in flight per connection).
    pub(crate) shapes: Vec<(usize, usize)>,
    /// Load window per measurement.
    pub(crate) duration: Duration,
    /// Alternating rounds per shape.
    pub(crate) rounds: usize,
    /// Print one JSON object instead of a table.
    pub(crate) json: bool,
}

/// One load run's summary, as `load --json` prints it.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    /// Requests answered per second.
    pub(crate) rps: f64,
    p50_us: u64,
    p99_us: u64,
    /// Error answers.
    pub(crate) errors: u64,
}

/// Runs the comparison; `Ok(false)` if any load run saw errors.
pub(crate) async fn run(config: &CompareConfig) -> Result<bool> {
    let xtask = build_binary("xtask", true)?;
    let proxy_bin = build_binary("ws-proxy", true)?;
    let proxy = Gateway::start_with(&proxy_bin, &[]).await?;
    let token = proxy
        .credentials()
        .token
        .context("ws-proxy started with a token")?;
    let echo_port = free_port()?;
    let _echo = start_echo(&xtask, echo_port, &token).await?;
    let echo_url = format!("ws://127.0.0.1:{echo_port}");

    let mut rows = Vec::new();
    let mut clean = true;
    for &(conns, inflight) in &config.shapes {
        let (mut echo, mut gw) = (Vec::new(), Vec::new());
        for _ in 0..config.rounds {
            echo.push(load(
                &xtask,
                &echo_url,
                &token,
                conns,
                inflight,
                config.duration,
            )?);
            gw.push(load(
                &xtask,
                &proxy.url(),
                &token,
                conns,
                inflight,
                config.duration,
            )?);
        }
        clean &= echo.iter().chain(&gw).all(|s| s.errors == 0);
        rows.push(((conns, inflight), echo, gw));
    }
    if config.json {
        println!("{}", to_json(&rows));
    } else {
        print_table(&rows, config);
    }
    Ok(clean)
}

async fn start_echo(xtask: &Path, port: u16, token: &str) -> Result<tokio::process::Child> {
    let child = tokio::process::Command::new(xtask)
        .args([
            "echo-baseline",
            "--port",
            &port.to_string(),
            "--token",
            token,
        ])
        .args(["--duration", "1h"])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("start echo-baseline")?;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(child);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("echo-baseline did not listen on port {port}")
}

/// One `health` load run (the release `xtask load --json` as a child).
pub(crate) fn load(
    xtask: &Path,
    url: &str,
    token: &str,
    conns: usize,
    inflight: usize,
    duration: Duration,
) -> Result<Sample> {
    let out = std::process::Command::new(xtask)
        .args(["load", "--url", url, "--token", token, "--method", "health"])
        .args([
            "--conns",
            &conns.to_string(),
            "--inflight",
            &inflight.to_string(),
        ])
        .args([
            "--duration",
            &format!("{}ms", duration.as_millis()),
            "--json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("run load")?;
    if !out.status.success() {
        bail!(
            "load against {url} failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("load --json output")?;
    let errors = v["errors"]
        .as_object()
        .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
    Ok(Sample {
        rps: v["rps"].as_f64().unwrap_or(0.0),
        p50_us: v["p50_us"].as_u64().unwrap_or(0),
        p99_us: v["p99_us"].as_u64().unwrap_or(0),
        errors,
    })
}

type Row = ((usize, usize), Vec<Sample>, Vec<Sample>);

fn total_rps(samples: &[Sample]) -> f64 {
    samples.iter().map(|s| s.rps).sum()
}

fn to_json(rows: &[Row]) -> Value {
    let shapes: Vec<Value> = rows
        .iter()
        .map(|((c, k), echo, gw)| {
            let side = |s: &[Sample]| {
                json!(s.iter().map(|x| json!({"rps": x.rps, "p50_us": x.p50_us, "p99_us": x.p99_us, "errors": x.errors})).collect::<Vec<_>>())
            };
            json!({
                "conns": c, "inflight": k,
                "echo_baseline": side(echo), "ws_proxy": side(gw),
                "ratio": total_rps(gw) / total_rps(echo).max(1e-9),
            })
        })
        .collect();
    json!({ "method": "health", "shapes": shapes })
}

fn print_table(rows: &[Row], config: &CompareConfig) {
    println!(
        "health, {} s per run, {} alternating round(s) per shape; ratio = ws-proxy req/s / echo-baseline req/s",
        config.duration.as_secs_f64(),
        config.rounds
    );
    println!(
        "{:>10} | {:>28} | {:>28} | {:>6}",
        "conns x k", "echo-baseline req/s p50/p99us", "ws-proxy req/s p50/p99us", "ratio"
    );
    for ((c, k), echo, gw) in rows {
        for (i, (e, g)) in echo.iter().zip(gw).enumerate() {
            let shape = if i == 0 {
                format!("{c} x {k}")
            } else {
                String::new()
            };
            println!(
                "{:>10} | {:>10.0} {:>8}/{:<8} | {:>10.0} {:>8}/{:<8} | {:>6.2}",
                shape,
                e.rps,
                e.p50_us,
                e.p99_us,
                g.rps,
                g.p50_us,
                g.p99_us,
                g.rps / e.rps.max(1e-9)
            );
        }
        println!(
            "{:>10} | {:>28} | {:>28} | {:>6.2}",
            "all rounds",
            "",
            "",
            total_rps(gw) / total_rps(echo).max(1e-9)
        );
    }
}

/// Parses `64x16` into (64, 16).
pub(crate) fn parse_shape(s: &str) -> Result<(usize, usize), String> {
    let (c, k) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("expected CONNSxINFLIGHT, got {s:?}"))?;
    let num = |v: &str| v.trim().parse::<usize>().map_err(|e| format!("{s:?}: {e}"));
    let (c, k) = (num(c)?, num(k)?);
    if c == 0 || k == 0 {
        return Err(format!("{s:?}: both numbers must be at least 1"));
    }
    Ok((c, k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse() {
        assert_eq!(parse_shape("64x16"), Ok((64, 16)));
        assert_eq!(parse_shape("1X1"), Ok((1, 1)));
        assert!(parse_shape("64").is_err());
        assert!(parse_shape("0x4").is_err());
        assert!(parse_shape("ax4").is_err());
    }
}
