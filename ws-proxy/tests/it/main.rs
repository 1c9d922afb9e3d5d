//! The integration tests of this crate, as one test binary: each extra
//! binary would link the whole dependency tree again (rust-analyzer keeps
//! one `tests/it` binary per crate for the same reason). Run one area with
//! `cargo test -p ws-proxy --test it <module>::`.

mod common;

mod bncr_e2e;
mod docs_reference;
mod event_order;
mod handshake_table;
mod hostile_input;
mod open_connections;
mod operator_tools;
mod probes_http;
mod requests_after_handshake;
mod restart_handover;
mod restart_signals;
mod runtime_plugins;
mod stop_and_startup;
