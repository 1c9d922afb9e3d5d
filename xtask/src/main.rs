//! Project automation in Rust (matklad's xtask pattern): `cargo xtask ci`,
//! an OpenClaw-protocol load generator, an echo baseline server and a
//! restart soak against the ws-proxy binary.
#![allow(clippy::print_stdout)]

mod bncr_throughput;
mod ci;
mod client;
mod compare;
mod dashboard;
mod echo;
mod hostile;
mod idle_conns;
mod load;
mod node;
mod openclaw_cli;
mod pipeline;
mod plugin_bench;
mod process;
mod restart_latency;
mod soak;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::client::Credentials;

/// `cargo xtask <command>`.
#[derive(Debug, Parser)]
#[command(name = "xtask", about = "Project automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The tasks.
#[derive(Debug, Subcommand)]
enum Command {
    /// Everything CI checks: fmt, clippy, tests, benches build, docs, soak.
    Ci {
        /// Exit 0 even when a step was skipped (the OpenClaw CLI could not
        /// be installed). Ignored under CI (`CI` set), where a skip fails.
        #[arg(long)]
        allow_skip: bool,
    },
    /// Load generator for any OpenClaw protocol v4 server on loopback.
    Load(LoadArgs),
    /// Bare WebSocket server answering every request: the throughput ceiling.
    EchoBaseline(EchoArgs),
    /// Restart soak: ws-proxy under load while SIGUSR1 fires on a schedule.
    Soak(SoakArgs),
    /// SIGUSR1 restart latency (signal to new generation serving) and RSS.
    RestartLatency(RestartLatencyArgs),
    /// Bncr bridge throughput: operator `send` -> client push -> `bncr.ack`.
    BncrThroughput(BncrThroughputArgs),
    /// ws-proxy vs echo-baseline `health` throughput, in one run (release).
    Compare(CompareArgs),
    /// The dashboard in headless Chromium: sign in, restart, screenshots.
    Dashboard,
    /// `health` throughput with and without an open dashboard (release).
    DashboardCost(DashboardCostArgs),
    /// Install (once) a Node.js >= 22 for JS/TS plugins into target/node and
    /// print its path (what tests read from GATEWAY_TEST_NODE).
    Node,
    /// Runtime plugins' cost through the binary: latency in-process vs Rust
    /// command plugin vs Node plugin, Node throughput vs health, restarts
    /// with Node plugins, RSS per plugin process.
    PluginBench(PluginBenchArgs),
    /// Fuzz the parsers for a bounded time (frame, connect params, bncr
    /// params, gateway and ws-proxy config, manifests); see the `fuzz` crate.
    Fuzz(FuzzArgs),
    /// Hostile clients against the binary (loopback): one bounded case per
    /// limit; a pass/fail table, non-zero exit on any failure.
    Hostile {
        /// Build and run the release binary.
        #[arg(long)]
        release: bool,
    },
    /// Open N authenticated idle connections to the release binary and
    /// report its RSS per connection.
    IdleConns {
        /// Connections to open.
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
    },
    /// The real OpenClaw CLI (`openclaw gateway call`) against ws-proxy.
    OpenclawCli {
        /// Build and run the release binary.
        #[arg(long)]
        release: bool,
    },
}

/// Flags of `dashboard-cost`.
#[derive(Debug, Args)]
struct DashboardCostArgs {
    /// Connections of the `health` load.
    #[arg(long, default_value_t = 64)]
    conns: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 16)]
    inflight: usize,
    /// Load window per measurement.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Alternating rounds (without, then with a dashboard).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// Flags of `plugin-bench`.
#[derive(Debug, Args)]
struct PluginBenchArgs {
    /// Build and run release binaries.
    #[arg(long)]
    release: bool,
    /// Sequential requests per method for the latency comparison.
    #[arg(long, default_value_t = 2000)]
    latency_requests: usize,
    /// Connections for the throughput comparison.
    #[arg(long, default_value_t = 64)]
    conns: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 16)]
    inflight: usize,
    /// Seconds per throughput measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Node plugins for the restart measurement.
    #[arg(long, default_value_t = 10)]
    node_plugins: usize,
    /// Restarts measured.
    #[arg(long, default_value_t = 50)]
    restarts: usize,
}

/// Flags of `fuzz`.
#[derive(Debug, Args)]
struct FuzzArgs {
    /// Total time, split evenly between the targets.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Only this target (`cargo run -p fuzz -- --list` names them).
    #[arg(long)]
    target: Option<String>,
    /// Random seed, to repeat a run (printed by every run).
    #[arg(long)]
    seed: Option<u64>,
}

/// Flags of `compare`.
#[derive(Debug, Args)]
struct CompareArgs {
    /// Connection shapes, CONNSxINFLIGHT.
    #[arg(long, value_delimiter = ',', default_value = "1x1,64x1,64x16", value_parser = compare::parse_shape)]
    shapes: Vec<(usize, usize)>,
    /// Load window per measurement.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Alternating rounds per shape.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Print exactly one JSON object.
    #[arg(long)]
    json: bool,
}

/// Auth and scopes presented in `connect`.
#[derive(Debug, Args)]
struct AuthArgs {
    /// Shared token (`auth.token`).
    #[arg(long)]
    token: Option<String>,
    /// Shared password (`auth.password`).
    #[arg(long)]
    password: Option<String>,
    /// Scopes to ask for.
    #[arg(long, value_delimiter = ',', default_value = "operator.admin")]
    scopes: Vec<String>,
}

impl AuthArgs {
    fn credentials(&self) -> Credentials {
        Credentials {
            token: self.token.clone(),
            password: self.password.clone(),
            scopes: self.scopes.clone(),
        }
    }
}

/// Flags of `load`.
#[derive(Debug, Args)]
struct LoadArgs {
    /// Server URL, loopback only.
    #[arg(long)]
    url: String,
    #[command(flatten)]
    auth: AuthArgs,
    /// Method to call.
    #[arg(long, default_value = "health")]
    method: String,
    /// Params as JSON (omitted when not given).
    #[arg(long)]
    params: Option<String>,
    /// Connections.
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 1)]
    inflight: usize,
    /// Length of the load window, e.g. `10s`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Print exactly one JSON object.
    #[arg(long)]
    json: bool,
}

/// Flags of `echo-baseline`.
#[derive(Debug, Args)]
struct EchoArgs {
    /// Loopback port.
    #[arg(long)]
    port: u16,
    /// Token `connect` must carry.
    #[arg(long)]
    token: Option<String>,
    /// Stop after this long instead of at Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
}

/// Flags of `soak`.
#[derive(Debug, Args)]
struct SoakArgs {
    /// Length of the load window.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Interval between single SIGUSR1 restarts.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    restart_every: Duration,
    /// Connections.
    #[arg(long, default_value_t = 256)]
    conns: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 16)]
    inflight: usize,
    /// Build and run the release binary.
    #[arg(long)]
    release: bool,
    /// Run this ws-proxy binary instead of building one.
    #[arg(long)]
    binary: Option<std::path::PathBuf>,
}

/// Flags of `restart-latency`.
#[derive(Debug, Args)]
struct RestartLatencyArgs {
    /// Manifest plugins to generate.
    #[arg(long, default_value_t = 50)]
    plugins: usize,
    /// Methods per plugin.
    #[arg(long, default_value_t = 10)]
    methods: usize,
    /// SIGUSR1 restarts to measure.
    #[arg(long, default_value_t = 200)]
    restarts: u64,
    /// Build and run the release binary.
    #[arg(long)]
    release: bool,
    /// Run this ws-proxy binary instead of building one.
    #[arg(long)]
    binary: Option<std::path::PathBuf>,
    /// `--log-level` for ws-proxy (e.g. `debug` to see restart phases).
    #[arg(long)]
    log_level: Option<String>,
    /// `--config` for ws-proxy (e.g. to disable a built-in plugin).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Copy ws-proxy's output to this file at the end.
    #[arg(long)]
    keep_log: Option<std::path::PathBuf>,
    /// Print exactly one JSON object.
    #[arg(long)]
    json: bool,
}

/// Flags of `bncr-throughput`.
#[derive(Debug, Args)]
struct BncrThroughputArgs {
    /// Messages the operator sends.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// The bridge's `window` (messages pushed per account before an ack).
    #[arg(long, default_value_t = 1)]
    window: usize,
    /// `send` requests the operator keeps in flight.
    #[arg(long, default_value_t = 64)]
    inflight: usize,
    /// Build and run the release binary.
    #[arg(long)]
    release: bool,
    /// Run this ws-proxy binary instead of building one.
    #[arg(long)]
    binary: Option<std::path::PathBuf>,
    /// Print exactly one JSON object.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Ci { allow_skip } => ci::run(allow_skip),
        Command::Node => {
            let node = node::install()?;
            println!("{}", node.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Load(args) => runtime()?.block_on(run_load(args)),
        Command::EchoBaseline(args) => {
            let config = echo::EchoConfig {
                port: args.port,
                token: args.token,
                duration: args.duration,
            };
            runtime()?.block_on(echo::run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Soak(args) => Ok(exit_code(soak::run(&soak_config(args))?)),
        Command::RestartLatency(args) => {
            let config = restart_latency::RestartLatencyConfig {
                plugins: args.plugins,
                methods: args.methods,
                restarts: args.restarts,
                release: args.release,
                binary: args.binary,
                log_level: args.log_level,
                config: args.config,
                keep_log: args.keep_log,
            };
            Ok(exit_code(restart_latency::run(&config, args.json)?))
        }
        Command::BncrThroughput(args) => {
            let config = bncr_throughput::ThroughputConfig {
                messages: args.messages,
                window: args.window,
                inflight: args.inflight,
                release: args.release,
                binary: args.binary,
            };
            let report = bncr_throughput::run(&config)?;
            if args.json {
                println!("{}", report.to_json());
            } else {
                report.print();
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::PluginBench(a) => Ok(exit_code(plugin_bench::run(
            &plugin_bench::PluginBenchConfig {
                release: a.release,
                latency_requests: a.latency_requests,
                conns: a.conns,
                inflight: a.inflight,
                duration: Duration::from_secs(a.seconds),
                node_plugins: a.node_plugins,
                restarts: a.restarts,
            },
        )?)),
        Command::Fuzz(args) => Ok(exit_code(fuzz(
            args.seconds,
            args.target.as_deref(),
            args.seed,
        )?)),
        Command::Hostile { release } => Ok(exit_code(hostile::run(release)?)),
        Command::IdleConns { conns } => Ok(exit_code(idle_conns::run(conns)?)),
        Command::OpenclawCli { release } => match openclaw_cli::run(release)? {
            openclaw_cli::Outcome::Passed => {
                println!("openclaw-cli: every call behaved");
                Ok(ExitCode::SUCCESS)
            }
            openclaw_cli::Outcome::NotInstalled(why) => {
                println!("openclaw-cli: NOT RUN, the CLI could not be installed: {why}");
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Dashboard => {
            dashboard::run()?;
            println!("dashboard: every check passed");
            Ok(ExitCode::SUCCESS)
        }
        Command::DashboardCost(args) => {
            let config = dashboard::CostConfig {
                conns: args.conns,
                inflight: args.inflight,
                duration: args.duration,
                rounds: args.rounds.max(1),
            };
            let cost = runtime()?.block_on(dashboard::cost(&config))?;
            let (with, without) = (cost.with, cost.without);
            println!(
                "health {}x{}: with a dashboard open {:.4} of without ({:+.2}%), {} rounds of {:?}",
                config.conns,
                config.inflight,
                with / without.max(1e-9),
                (with / without.max(1e-9) - 1.0) * 100.0,
                config.rounds,
                config.duration
            );
            println!(
                "dashboard CPU: {:.3} ms per second = {:.3}% of the gateway's work at {:.0} req/s",
                cost.dashboard_cpu_per_s.as_secs_f64() * 1e3,
                cost.cpu_share() * 100.0,
                cost.load_rps
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Compare(args) => {
            let config = compare::CompareConfig {
                shapes: args.shapes,
                duration: args.duration,
                rounds: args.rounds.max(1),
                json: args.json,
            };
            Ok(exit_code(runtime()?.block_on(compare::run(&config))?))
        }
    }
}

/// Run the `fuzz` crate's loop through its `fuzz_run` test: the dev
/// profile (overflow checks and debug assertions on) and the features
/// `cargo test --workspace` resolves, so nothing beyond what the tests
/// compiled is built. `true` when no target failed.
pub(crate) fn fuzz(seconds: f64, target: Option<&str>, seed: Option<u64>) -> Result<bool> {
    let mut command = process::cargo();
    command.args([
        "test",
        "--workspace",
        "--test",
        "fuzz_run",
        "--",
        "--ignored",
        "--nocapture",
    ]);
    command.env("FUZZ_SECONDS", seconds.to_string());
    command.env("FUZZ_TARGET", target.unwrap_or_default());
    match seed {
        Some(s) => command.env("FUZZ_SEED", s.to_string()),
        None => command.env_remove("FUZZ_SEED"),
    };
    let status = command
        .status()
        .with_context(|| format!("spawn {command:?}"))?;
    Ok(status.success())
}

/// Success when every check passed.
fn exit_code(passed: bool) -> ExitCode {
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The multi-thread runtime the network tasks run on.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("build tokio runtime")
}

async fn run_load(args: LoadArgs) -> Result<ExitCode> {
    let params = args
        .params
        .as_deref()
        .map(serde_json::from_str)
        .transpose()
        .context("--params is not JSON")?;
    let config = load::LoadConfig {
        url: args.url,
        creds: args.auth.credentials(),
        method: args.method,
        params,
        conns: args.conns,
        inflight: args.inflight,
        duration: args.duration,
    };
    let report = load::run(&config).await?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        report.print();
    }
    Ok(ExitCode::SUCCESS)
}

fn soak_config(args: SoakArgs) -> soak::SoakConfig {
    soak::SoakConfig {
        duration: args.duration,
        restart_every: args.restart_every,
        conns: args.conns,
        inflight: args.inflight,
        release: args.release,
        binary: args.binary,
    }
}
