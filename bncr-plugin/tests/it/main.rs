//! The integration tests of this crate, as one test binary: each extra
//! binary would link the whole dependency tree again (rust-analyzer keeps
//! one `tests/it` binary per crate for the same reason). Run one area with
//! `cargo test -p bncr-plugin --test it <module>::`.

mod common;

mod bridge_methods;
mod files_transfer;
mod inbound_hand_on;
mod limits;
mod restart_bridge;
