//! The integration tests of this crate, as one test binary: each extra
//! binary would link the whole dependency tree again (rust-analyzer keeps
//! one `tests/it` binary per crate for the same reason). Run one area with
//! `cargo test -p gateway-core --test it <module>::`.

mod common;

mod handover;
mod layers;
mod plugin_signals;
mod restart_invariants;
mod restart_scenarios;
