//! Bounded fuzzing on the stable toolchain.
//!
//! Every parser a peer or an operator can feed is a [`Target`]: the request
//! frame parser, `connect` params, the Bncr bridge's method params (through
//! the real gateway dispatch, so validation and store logic run too), the
//! gateway's TOML config, ws-proxy's config file, and plugin manifests. Each
//! target asserts that nothing panics and that errors have the documented
//! shape (e.g. a frame error carries the request id when the input had one).
//!
//! The engine ([`run_target`]) is a mutation fuzzer without coverage
//! instrumentation, so it needs no nightly flags and no separate
//! instrumented build: it starts from seed inputs, mutates them byte-wise
//! and structure-aware (JSON trees, TOML lines, a dictionary of the
//! protocol's names and boundary numbers), generates fresh structured
//! inputs, and keeps every input whose *outcome class* (which error, which
//! branch) it has not seen yet as a new seed. It runs for a fixed time.
//!
//! `cargo xtask fuzz --seconds N` runs all targets for N seconds in total;
//! inputs that fail are written to `target/fuzz/failures/<target>/` and can
//! be replayed with `cargo run -p fuzz -- --target <t> --replay <file>`.
//! Inputs under `fuzz/regressions/<target>/` are replayed by `cargo test`.

mod engine;
pub mod mutate;
pub mod targets;

pub use engine::{
    Failure, Harness, InputKind, KnownIssue, Report, Target, replay, replay_corpus, run_target,
};

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What [`run`] fuzzes and for how long.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Total time, split evenly between the targets.
    pub seconds: f64,
    /// Only this target.
    pub target: Option<String>,
    /// Random seed; a fresh one (printed) when `None`.
    pub seed: Option<u64>,
    /// Where failing inputs are saved.
    pub artifacts: PathBuf,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            seconds: 60.0,
            target: None,
            seed: None,
            artifacts: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
                .join("fuzz")
                .join("failures"),
        }
    }
}

/// Fuzz every target (or the one named) for the time given, printing one
/// line per target; `false` when a target failed or the name is unknown.
#[allow(clippy::print_stdout)]
pub fn run(options: &RunOptions) -> bool {
    let targets: Vec<Target> = match &options.target {
        Some(name) => match targets::by_name(name) {
            Some(t) => vec![t],
            None => {
                println!("fuzz: no target {name:?}; targets: {}", names());
                return false;
            }
        },
        None => targets::all(),
    };
    let seed = options.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let per_target = Duration::from_secs_f64(options.seconds.max(0.1) / targets.len() as f64);
    println!(
        "fuzz: {} targets, {:.1}s each, seed {seed}",
        targets.len(),
        per_target.as_secs_f64()
    );
    let mut failed = false;
    for (i, t) in targets.iter().enumerate() {
        let started = Instant::now();
        let report = run_target(
            t,
            per_target,
            seed.wrapping_add(i as u64),
            &options.artifacts,
        );
        let took = started.elapsed().as_secs_f64();
        let known: u64 = report.known.iter().map(|(_, n, _)| n).sum();
        println!(
            "  {:<16} {:>9} execs in {took:.1}s ({:.0}/s), {} outcome classes, {} inputs kept{}",
            t.name,
            report.execs,
            report.execs as f64 / took.max(1e-9),
            report.outcomes,
            report.corpus,
            if known > 0 {
                format!(", {known} known-issue hits")
            } else {
                String::new()
            }
        );
        for (issue, n, message) in &report.known {
            println!(
                "    known issue, {n} hits, not counted as a failure ({}): {message}",
                issue.tracked_in
            );
        }
        for f in &report.failures {
            failed = true;
            println!("  {} FAILED: {}", t.name, f.message);
            if let Some(p) = &f.saved {
                println!(
                    "    input saved to {}; replay: cargo run -p fuzz -- --target {} --replay {}",
                    p.display(),
                    t.name,
                    p.display()
                );
            }
        }
    }
    if failed {
        println!("fuzz: FAILED (seed {seed}; repeat with --seed {seed})");
    } else {
        println!("fuzz: no failures (seed {seed})");
    }
    !failed
}

fn names() -> String {
    targets::all()
        .iter()
        .map(|t| t.name)
        .collect::<Vec<_>>()
        .join(", ")
}
