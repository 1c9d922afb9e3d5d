//! Every target's seeds and checked-in regression inputs
//! (`fuzz/regressions/<target>/`) pass, and the engine really reports a
//! contract violation: the fuzzing itself runs in `cargo xtask fuzz`.

use fuzz::{Harness, InputKind, Target};
use std::time::Duration;

#[test]
fn seeds_and_regressions_pass_every_target() {
    let targets = fuzz::targets::all();
    assert_eq!(targets.len(), 6);
    for t in &targets {
        let failures = fuzz::replay_corpus(t, false);
        assert!(
            failures.is_empty(),
            "{}: {} inputs fail, first: {:?} -> {}",
            t.name,
            failures.len(),
            String::from_utf8_lossy(&failures[0].0),
            failures[0].1
        );
    }
}

#[test]
fn regression_inputs_exist_for_the_bugs_found() {
    for (target, file) in [
        ("gateway-config", "toml-edit-panics-on-invalid-document"),
        ("connect", "auth-as-array"),
        ("connect", "role-as-enum-object"),
        ("frame", "deep-unknown-field-with-id"),
        ("manifest", "method-as-array"),
        ("frame", "request-as-array"),
        ("frame", "array-with-id-like-field"),
    ] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("regressions")
            .join(target)
            .join(file);
        let input = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let t = fuzz::targets::by_name(target).expect("target exists");
        assert_eq!(fuzz::replay(&t, &input), Ok(()), "{}", path.display());
    }
}

/// A harness that breaks its contract on inputs containing `BUG`.
struct Planted;

impl Harness for Planted {
    fn run(&mut self, input: &[u8]) -> u64 {
        assert!(
            !input.windows(3).any(|w| w == b"BUG"),
            "planted bug reached"
        );
        input.len() as u64
    }
}

#[test]
fn the_engine_finds_a_planted_bug_and_saves_the_input() {
    let target = Target {
        name: "planted",
        about: "test",
        kind: InputKind::Json,
        dictionary: &["BUG"],
        seeds: || vec![br#"{"a":"x"}"#.to_vec()],
        generate: |_| b"{}".to_vec(),
        harness: || Box::new(Planted),
        known: &[],
    };
    let dir = tempfile::tempdir().unwrap();
    let report = fuzz::run_target(&target, Duration::from_secs(20), 7, dir.path());
    assert_eq!(report.failures.len(), 1, "{report:?}");
    let failure = &report.failures[0];
    assert!(
        failure.message.contains("planted bug reached"),
        "{}",
        failure.message
    );
    let saved = std::fs::read(failure.saved.as_ref().expect("input saved")).unwrap();
    assert!(saved.windows(3).any(|w| w == b"BUG"));
    assert!(fuzz::replay(&target, &saved).is_err());
}
