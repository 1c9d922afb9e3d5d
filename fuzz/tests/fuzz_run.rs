//! The bounded fuzzing run itself, as an ignored test so that
//! `cargo xtask fuzz` (and its CI step) reuse what `cargo test --workspace`
//! compiled: `cargo test --workspace --test fuzz_run -- --ignored
//! --nocapture`, configured by `FUZZ_SECONDS`, `FUZZ_TARGET`, `FUZZ_SEED`.

#[test]
#[ignore = "long-running; run by `cargo xtask fuzz`"]
fn fuzz_run() {
    let mut options = fuzz::RunOptions::default();
    if let Some(s) = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        options.seconds = s;
    }
    options.target = std::env::var("FUZZ_TARGET").ok().filter(|t| !t.is_empty());
    options.seed = std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok());
    assert!(fuzz::run(&options), "fuzzing found a contract violation");
}
