//! `fuzz`: run the fuzz targets for a bounded time (see the crate docs).
//!
//! ```text
//! fuzz [--seconds N] [--target NAME] [--seed S] [--artifacts DIR]
//! fuzz --target NAME --replay FILE
//! fuzz --list
//! ```
//!
//! `cargo xtask fuzz` runs the same loop through the `fuzz_run` test, so
//! that it reuses what `cargo test --workspace` compiled.

use std::path::PathBuf;
use std::process::ExitCode;

#[allow(clippy::print_stdout)]
fn main() -> ExitCode {
    let mut options = fuzz::RunOptions::default();
    let mut replay: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_default();
        match arg.as_str() {
            "--seconds" => options.seconds = value().parse().unwrap_or(options.seconds),
            "--target" => options.target = Some(value()),
            "--seed" => options.seed = value().parse().ok(),
            "--replay" => replay = Some(PathBuf::from(value())),
            "--artifacts" => options.artifacts = PathBuf::from(value()),
            "--list" => {
                for t in fuzz::targets::all() {
                    println!("{:<16} {}", t.name, t.about);
                }
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!(
                    "fuzz: unknown argument {other:?} (see --list, --seconds, --target, --seed, --replay)"
                );
                return ExitCode::from(2);
            }
        }
    }
    if let Some(path) = replay {
        let Ok(input) = std::fs::read(&path) else {
            eprintln!("fuzz: cannot read {}", path.display());
            return ExitCode::from(2);
        };
        let targets = match &options.target {
            Some(name) => fuzz::targets::by_name(name).into_iter().collect(),
            None => fuzz::targets::all(),
        };
        let mut failed = targets.is_empty();
        for t in &targets {
            match fuzz::replay(t, &input) {
                Ok(()) => println!("{}: ok", t.name),
                Err(message) => {
                    println!("{}: FAILED: {message}", t.name);
                    failed = true;
                }
            }
        }
        return if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        };
    }
    if fuzz::run(&options) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
