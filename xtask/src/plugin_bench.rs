//! `cargo xtask plugin-bench`: what running plugin code in its own process
//! costs, measured through the ws-proxy binary in one run.
//!
//! 1. Latency of one request at a time: an in-process method (a manifest
//!    `reply`), a Rust command plugin (`examples/rust-plugin`) and a Node.js
//!    plugin, interleaved round-robin so all three see the same machine.
//! 2. Throughput at `conns x inflight`: a Node plugin method as a share of
//!    the in-process `health` method, same gateway, back to back.
//! 3. Restarts with `node_plugins` Node plugins: SIGUSR1 to the
//!    `gateway.generation` event on a live connection, p50/p99, while a load
//!    connection keeps calling a Node plugin (its failed requests counted).
//! 4. RSS of each Node plugin process and of the gateway.

use crate::client::{self, Session};
use crate::load::{LoadConfig, LoadReport};
use crate::restart_latency::{Seen, wait_for_generation};
use crate::soak::Gateway;
use anyhow::{Context, Result, bail, ensure};
use futures::SinkExt;
use hdrhistogram::Histogram;
use nix::sys::signal::{Signal, kill};
use serde_json::{Value, json};
use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// What to measure.
#[derive(Debug, Clone)]
pub(crate) struct PluginBenchConfig {
    /// Build and run release binaries.
    pub(crate) release: bool,
    /// Sequential requests per method for the latency comparison.
    pub(crate) latency_requests: usize,
    /// Connections for the throughput comparison.
    pub(crate) conns: usize,
    /// Requests in flight per connection.
    pub(crate) inflight: usize,
    /// Load window per throughput measurement.
    pub(crate) duration: Duration,
    /// Node plugins loaded for the restart measurement.
    pub(crate) node_plugins: usize,
    /// Restarts measured.
    pub(crate) restarts: usize,
}

const NODE_PLUGIN: &str = r#"
export default {
  id: "ID",
  register(api) {
    api.registerGatewayMethod("ID.echo", ({ params }) => params, { scope: "operator.read" });
  },
};
"#;

fn write_node_plugin(dir: &Path, id: &str) -> Result<()> {
    let d = dir.join(id);
    std::fs::create_dir_all(&d)?;
    std::fs::write(
        d.join("openclaw.plugin.json"),
        json!({"id": id, "version": "1.0.0"}).to_string(),
    )?;
    std::fs::write(
        d.join("package.json"),
        json!({"name": id, "type": "module", "openclaw": {"extensions": ["./index.js"]}})
            .to_string(),
    )?;
    std::fs::write(d.join("index.js"), NODE_PLUGIN.replace("ID", id))?;
    Ok(())
}

fn write_config(
    dir: &Path,
    node: &Path,
    plugins: &Path,
    rust_plugin: Option<&Path>,
) -> Result<std::path::PathBuf> {
    if let Some(bin) = rust_plugin {
        let d = plugins.join("rust-stats");
        std::fs::create_dir_all(&d)?;
        std::fs::write(
            d.join("openclaw.plugin.json"),
            json!({"id": "rust-stats", "runtime": {"command": [bin.display().to_string()]}})
                .to_string(),
        )?;
    }
    let d = plugins.join("inproc");
    std::fs::create_dir_all(&d)?;
    std::fs::write(
        d.join("openclaw.plugin.json"),
        json!({"id": "inproc", "methods": [{"name": "inproc.echo", "handler": "echo", "scope": "operator.read"}]})
            .to_string(),
    )?;
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            // Room for 64x16 calls in flight to one plugin process (the
            // default bound, 256, would refuse most of them busy).
            "[plugins]\nnode = {:?}\ndirs = [{:?}]\nmax_calls_in_flight = 2048\n",
            node.display().to_string(),
            plugins.display().to_string()
        ),
    )?;
    Ok(path)
}

/// Builds, measures, prints. Errors when a request failed where none may.
pub(crate) fn run(config: &PluginBenchConfig) -> Result<bool> {
    let node = crate::node::install()?;
    let binary = crate::process::build_binary("ws-proxy", config.release)?;
    let rust_plugin = crate::process::build_binary("example-rust-plugin", config.release)?;
    let runtime = crate::runtime()?;
    println!(
        "plugin-bench ({} build; the machine is shared, figures are ratios within one run)",
        if config.release { "release" } else { "debug" }
    );
    let ok1 = runtime.block_on(latency_and_throughput(config, &binary, &node, &rust_plugin))?;
    let ok2 = runtime.block_on(restarts(config, &binary, &node))?;
    Ok(ok1 && ok2)
}

async fn latency_and_throughput(
    config: &PluginBenchConfig,
    binary: &Path,
    node: &Path,
    rust_plugin: &Path,
) -> Result<bool> {
    let dir = tempfile::tempdir()?;
    let plugins = dir.path().join("plugins");
    write_node_plugin(&plugins, "nodebench")?;
    let cfg = write_config(dir.path(), node, &plugins, Some(rust_plugin))?;
    let gateway = Gateway::start_with(binary, &[OsString::from("--config"), cfg.into()]).await?;
    let mut session = client::connect(&gateway.url(), &gateway.credentials()).await?;
    let methods = [
        (
            "in-process (manifest echo)",
            "inproc.echo",
            json!({"values": [1]}),
        ),
        (
            "Rust command plugin",
            "rust-stats.mean",
            json!({"values": [1]}),
        ),
        ("Node plugin", "nodebench.echo", json!({"values": [1]})),
    ];
    let mut hist: Vec<Histogram<u64>> = methods
        .iter()
        .map(|_| Histogram::new(3).expect("valid"))
        .collect();
    // Warm up every path, then interleave.
    for round in 0..(config.latency_requests + 200) {
        for (i, (_, method, params)) in methods.iter().enumerate() {
            let id = format!("l{round}-{i}");
            let started = Instant::now();
            let res =
                client::call(&mut session, &id, method, params, Duration::from_secs(10)).await?;
            let took = started.elapsed();
            ensure!(res.ok, "{method} failed: {:?}", res.error);
            if round >= 200 {
                hist[i].record(took.as_micros() as u64)?;
            }
        }
    }
    println!(
        "\n1. one request at a time, {} per method, interleaved:",
        config.latency_requests
    );
    for ((name, method, _), h) in methods.iter().zip(&hist) {
        println!(
            "   {name:28} {method:18} p50 {:>6} us  p90 {:>6} us  p99 {:>6} us",
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.9),
            h.value_at_quantile(0.99)
        );
    }
    let base = hist[0].value_at_quantile(0.5) as i64;
    println!(
        "   added at p50: Rust command plugin {} us, Node plugin {} us (goal for Node: <= 60 us)",
        hist[1].value_at_quantile(0.5) as i64 - base,
        hist[2].value_at_quantile(0.5) as i64 - base
    );

    let load = |method: &str, params: Option<Value>| LoadConfig {
        url: gateway.url(),
        creds: gateway.credentials(),
        method: method.into(),
        params,
        conns: config.conns,
        inflight: config.inflight,
        duration: config.duration,
    };
    let health = crate::load::run(&load("health", None)).await?;
    let nodeload = crate::load::run(&load("nodebench.echo", Some(json!({"n": 1})))).await?;
    println!(
        "\n2. throughput at {}x{} for {:?} each:",
        config.conns, config.inflight, config.duration
    );
    print_load("in-process health", &health);
    print_load("Node plugin nodebench.echo", &nodeload);
    let ok_rps = |r: &LoadReport| r.ok as f64 / r.elapsed.as_secs_f64().max(1e-9);
    println!(
        "   Node plugin / health, successful answers per second = {:.1}% (goal >= 40%)",
        100.0 * ok_rps(&nodeload) / ok_rps(&health).max(1e-9)
    );
    let pids = plugin_children(gateway.pid.as_raw() as u32);
    for (pid, cmd) in &pids {
        println!(
            "   plugin process {pid}: RSS {} KiB ({cmd})",
            rss_kib(*pid)?
        );
    }
    let clean = nodeload.errors.is_empty() && nodeload.missing == 0 && nodeload.unexpected == 0;
    Ok(clean)
}

fn print_load(name: &str, r: &LoadReport) {
    let j = r.to_json();
    println!(
        "   {name:28} {:>8.0} req/s  p50 {} us  p99 {} us  errors {:?}",
        r.rps(),
        j["p50_us"],
        j["p99_us"],
        r.errors
    );
}

async fn restarts(config: &PluginBenchConfig, binary: &Path, node: &Path) -> Result<bool> {
    let dir = tempfile::tempdir()?;
    let plugins = dir.path().join("plugins");
    for i in 0..config.node_plugins {
        write_node_plugin(&plugins, &format!("np{i:02}"))?;
    }
    let cfg = write_config(dir.path(), node, &plugins, None)?;
    let gateway = Gateway::start_with(binary, &[OsString::from("--config"), cfg.into()]).await?;
    let mut watcher = client::connect(&gateway.url(), &gateway.credentials()).await?;
    let mut generation = watcher.generation().context("hello-ok has a generation")?;
    let node_pids: Vec<u32> = plugin_children(gateway.pid.as_raw() as u32)
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    ensure!(
        node_pids.len() == config.node_plugins,
        "{} plugin processes, expected {}",
        node_pids.len(),
        config.node_plugins
    );
    let mut rss: Vec<u64> = node_pids.iter().filter_map(|p| rss_kib(*p).ok()).collect();
    rss.sort_unstable();
    // A client keeps calling a Node plugin through every restart.
    let load_cfg = LoadConfig {
        url: gateway.url(),
        creds: gateway.credentials(),
        method: "np00.echo".into(),
        params: Some(json!({"n": 1})),
        conns: 2,
        inflight: 4,
        duration: Duration::from_secs(3600),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(keep_calling(load_cfg, stop.clone()));
    let mut took = Vec::with_capacity(config.restarts);
    for _ in 0..config.restarts {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        kill(gateway.pid, Signal::SIGUSR1)?;
        generation += 1;
        match wait_for_generation(&mut watcher, generation).await? {
            Seen::Next => took.push(started.elapsed()),
            Seen::Other(g) => bail!("expected generation {generation}, saw {g}"),
        }
    }
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = load.await??;
    took.sort_unstable();
    let q = |p: f64| took[((took.len() as f64 * p).ceil() as usize).clamp(1, took.len()) - 1];
    println!(
        "\n3. {} restarts with {} Node plugins (SIGUSR1 -> gateway.generation):",
        config.restarts, config.node_plugins
    );
    println!(
        "   p50 {:.0} ms  p99 {:.0} ms  max {:.0} ms (goal p99 < 1500 ms)",
        q(0.5).as_secs_f64() * 1e3,
        q(0.99).as_secs_f64() * 1e3,
        took.last().map_or(0.0, |d| d.as_secs_f64() * 1e3)
    );
    println!("   client calls to np00.echo meanwhile: {ok} ok, {failed} failed (goal 0)");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let left = plugin_children(gateway.pid.as_raw() as u32);
    println!(
        "\n4. RSS per Node plugin process: min {} KiB, median {} KiB, max {} KiB; gateway {} KiB after the restarts; plugin processes left: {}",
        rss.first().copied().unwrap_or(0),
        rss.get(rss.len() / 2).copied().unwrap_or(0),
        rss.last().copied().unwrap_or(0),
        gateway.rss_kib()?,
        left.len()
    );
    Ok(failed == 0 && left.len() == config.node_plugins)
}

/// Calls the load method in a loop with a window of requests in flight
/// until cancelled; returns (ok, failed). Unlike `load::run`, it runs for an
/// open-ended time.
async fn keep_calling(cfg: LoadConfig, stop: Arc<AtomicBool>) -> Result<(u64, u64)> {
    let mut sessions: Vec<Session> = Vec::new();
    for _ in 0..cfg.conns {
        sessions.push(client::connect(&cfg.url, &cfg.creds).await?);
    }
    let tasks = sessions.into_iter().enumerate().map(|(k, mut s)| {
        let (stop, method, params) = (stop.clone(), cfg.method.clone(), cfg.params.clone());
        let inflight = cfg.inflight;
        tokio::spawn(async move {
            let (mut ok, mut failed, mut pending, mut n) = (0u64, 0u64, 0usize, 0u64);
            loop {
                while pending < inflight && !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let text = client::request_text(&format!("k{k}-{n}"), &method, params.as_ref());
                    s.ws.send(Message::text(text)).await?;
                    pending += 1;
                }
                if pending == 0 {
                    return Ok::<_, anyhow::Error>((ok, failed));
                }
                let text =
                    tokio::time::timeout(Duration::from_secs(30), client::next_text(&mut s.ws))
                        .await
                        .context("a request went unanswered for 30 s")??
                        .context("the server closed the connection")?;
                if let client::Frame::Response(r) = client::parse_frame(&text) {
                    pending -= 1;
                    if r.ok {
                        ok += 1;
                    } else {
                        failed += 1;
                        eprintln!(
                            "failed: {} {:?}",
                            r.error_code(),
                            r.error.as_ref().map(|e| &e.message)
                        );
                    }
                }
            }
        })
    });
    let mut total = (0, 0);
    for t in tasks.collect::<Vec<_>>() {
        let (ok, failed) = t.await??;
        total.0 += ok;
        total.1 += failed;
    }
    Ok(total)
}

/// Live child processes of `parent` (the plugin processes), with commands.
fn plugin_children(parent: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.first() != Some(&"Z") && f.get(1) == Some(&parent.to_string().as_str()) {
            let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .split('\0')
                .next()
                .unwrap_or("")
                .to_string();
            out.push((pid, cmd));
        }
    }
    out
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}
