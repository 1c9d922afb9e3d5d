//! Running cargo from xtask: the workspace root and building binaries.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The workspace root (the parent of this crate's directory).
pub(crate) fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.clone(), PathBuf::from)
}

/// A `cargo` command (the one running xtask) in the workspace root.
pub(crate) fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(program);
    command.current_dir(workspace_root());
    command
}

/// Builds `package`'s binary of the same name and returns its path.
pub(crate) fn build_binary(package: &str, release: bool) -> Result<PathBuf> {
    let mut command = cargo();
    command.args([
        "build",
        "--package",
        package,
        "--message-format=json-render-diagnostics",
    ]);
    if release {
        command.arg("--release");
    }
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .context("spawn cargo build")?;
    let stdout = child.stdout.take().context("cargo build stdout")?;
    let mut executable = None;
    for line in BufReader::new(stdout).lines() {
        executable = executable.or_else(|| artifact_executable(&line.ok()?, package));
    }
    if !child.wait()?.success() {
        bail!("cargo build --package {package} failed");
    }
    executable.with_context(|| format!("cargo build produced no binary named {package}"))
}

/// The executable path of a `compiler-artifact` message for the named binary.
fn artifact_executable(line: &str, name: &str) -> Option<PathBuf> {
    let message: Value = serde_json::from_str(line).ok()?;
    if message["reason"] != "compiler-artifact" || message["target"]["name"] != name {
        return None;
    }
    message["executable"].as_str().map(PathBuf::from)
}
