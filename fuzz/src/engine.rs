//! The fuzzing loop: seeds, mutation, outcome feedback, panic capture.

use crate::mutate;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

/// Largest input the engine hands a target.
const MAX_INPUT: usize = 64 * 1024;
/// Most inputs kept as seeds for further mutation.
const MAX_CORPUS: usize = 4096;

/// How inputs of a target are shaped, for the structure-aware mutators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// A JSON document (mutated as a tree when it parses).
    Json,
    /// A TOML document (mutated line-wise).
    Toml,
    /// A first line naming something, then a JSON document.
    LineThenJson,
}

/// One run of a target over inputs.
pub trait Harness {
    /// Run one input. Panics when the target's contract is violated;
    /// otherwise returns a signature of the outcome class (which branch or
    /// error kind), used as feedback: inputs with a new signature are kept.
    fn run(&mut self, input: &[u8]) -> u64;
}

/// A known, reported defect that a target trips: counted and printed, not
/// failed, so that CI stays green until the owner lands the fix. Remove the
/// entry when the fix lands.
#[derive(Debug, Clone, Copy)]
pub struct KnownIssue {
    /// A substring of the panic message that identifies it.
    pub contains: &'static str,
    /// Where it is tracked.
    pub tracked_in: &'static str,
}

/// A fuzz target.
pub struct Target {
    /// Short name, used on the command line and for directories.
    pub name: &'static str,
    /// What it exercises and what it asserts.
    pub about: &'static str,
    /// Input shape.
    pub kind: InputKind,
    /// Names and values worth inserting (field names, method names, ...).
    pub dictionary: &'static [&'static str],
    /// Valid and near-valid inputs to start from.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// A fresh structured input.
    pub generate: fn(&mut StdRng) -> Vec<u8>,
    /// Set up the harness (runtimes, temp dirs) once per run.
    pub harness: fn() -> Box<dyn Harness>,
    /// Defects already reported to their owners.
    pub known: &'static [KnownIssue],
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("name", &self.name).finish()
    }
}

/// An input that violated a target's contract.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The panic message.
    pub message: String,
    /// Where the input was saved, if it could be.
    pub saved: Option<PathBuf>,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Inputs run.
    pub execs: u64,
    /// Inputs kept as seeds at the end.
    pub corpus: usize,
    /// Distinct outcome classes seen.
    pub outcomes: usize,
    /// Contract violations (the run stops at the first one).
    pub failures: Vec<Failure>,
    /// Known issues tripped: the issue, how often, the first message.
    pub known: Vec<(KnownIssue, u64, String)>,
}

thread_local! {
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Route panic messages of the fuzzing thread into [`LAST_PANIC`] instead
/// of stderr (targets panic on purpose, and plugins' panics are caught by
/// the gateway); other threads keep the default hook.
fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CAPTURING.with(Cell::get) {
                let location = info
                    .location()
                    .map(|l| format!(" at {}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                let payload = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic".into());
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("{payload}{location}")));
            } else {
                default(info);
            }
        }));
    });
}

/// Run `input` through `harness`, turning a panic into its message.
fn run_one(harness: &mut dyn Harness, input: &[u8]) -> Result<u64, String> {
    install_hook();
    CAPTURING.with(|c| c.set(true));
    LAST_PANIC.with(|p| p.borrow_mut().take());
    let result = catch_unwind(AssertUnwindSafe(|| harness.run(input)));
    CAPTURING.with(|c| c.set(false));
    result.map_err(|_| {
        LAST_PANIC
            .with(|p| p.borrow_mut().take())
            .unwrap_or_else(|| "panic without a message".into())
    })
}

fn save(dir: &Path, target: &str, input: &[u8]) -> Option<PathBuf> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    input.hash(&mut h);
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir).ok()?;
    let path = dir.join(format!("{:016x}", h.finish()));
    std::fs::write(&path, input).ok()?;
    Some(path)
}

/// Fuzz `target` until `budget` has passed or it fails. `seed` makes the
/// run reproducible; failing inputs are saved below `artifacts`.
pub fn run_target(target: &Target, budget: Duration, seed: u64, artifacts: &Path) -> Report {
    let deadline = Instant::now() + budget;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut harness = (target.harness)();
    let mut report = Report::default();
    let mut seen: HashSet<u64> = HashSet::new();
    let mut corpus: Vec<Vec<u8>> = Vec::new();
    let mut known: Vec<(KnownIssue, u64, String)> = Vec::new();
    let mut seeds: Vec<Vec<u8>> = (target.seeds)();
    seeds.extend(regressions(target.name));
    let mut pending = seeds.clone();
    loop {
        if report.execs % 32 == 0 && Instant::now() >= deadline {
            break;
        }
        let input = match pending.pop() {
            Some(i) => i,
            None if corpus.is_empty() || rng.random_ratio(1, 8) => (target.generate)(&mut rng),
            None => {
                // A quarter of the mutations start again from a seed, so
                // the seeds' neighbourhood stays explored once the corpus
                // has grown.
                let base = if !seeds.is_empty() && rng.random_ratio(1, 4) {
                    &seeds[rng.random_range(0..seeds.len())]
                } else {
                    &corpus[rng.random_range(0..corpus.len())]
                };
                mutate::mutate(base, &corpus, target, &mut rng)
            }
        };
        let mut input = input;
        input.truncate(MAX_INPUT);
        report.execs += 1;
        match run_one(harness.as_mut(), &input) {
            Ok(sig) => {
                if seen.insert(sig) && corpus.len() < MAX_CORPUS {
                    corpus.push(input);
                }
            }
            Err(message) => {
                if let Some(k) = target.known.iter().find(|k| message.contains(k.contains)) {
                    match known.iter_mut().find(|(e, _, _)| e.contains == k.contains) {
                        Some((_, n, _)) => *n += 1,
                        None => known.push((*k, 1, message)),
                    }
                    // A known failure may have left the harness half-way;
                    // start a fresh one.
                    harness = (target.harness)();
                    continue;
                }
                let saved = save(artifacts, target.name, &input);
                report.failures.push(Failure { message, saved });
                break;
            }
        }
    }
    report.corpus = corpus.len();
    report.outcomes = seen.len();
    report.known = known;
    report
}

/// Run one saved input through `target`: `Err` with the panic message if it
/// violates the contract.
pub fn replay(target: &Target, input: &[u8]) -> Result<(), String> {
    let mut harness = (target.harness)();
    run_one(harness.as_mut(), input).map(|_| ())
}

/// Run every seed and checked-in regression input of `target` through one
/// harness; returns the failures as (input, message). Known issues count as
/// failures here only if `strict`.
pub fn replay_corpus(target: &Target, strict: bool) -> Vec<(Vec<u8>, String)> {
    let mut harness = (target.harness)();
    let mut failures = Vec::new();
    let mut inputs = (target.seeds)();
    inputs.extend(regressions(target.name));
    for input in inputs {
        if let Err(message) = run_one(harness.as_mut(), &input) {
            let known = target.known.iter().any(|k| message.contains(k.contains));
            if strict || !known {
                failures.push((input, message));
            }
            harness = (target.harness)();
        }
    }
    failures
}

/// The checked-in regression inputs of `target` (`fuzz/regressions/<target>/`).
pub(crate) fn regressions(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("regressions")
        .join(target);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    files
        .into_iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}
