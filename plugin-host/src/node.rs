//! Running OpenClaw-style JavaScript/TypeScript plugins under Node.js.
//!
//! The host program ([`NODE_HOST_JS`], one file without npm dependencies,
//! embedded in the binary) speaks the wire protocol on stdio, routes
//! `console.*` to stderr, loads the plugin's entry module and implements the
//! OpenClaw plugin API subset the gateway supports.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The Node.js host program, passed to `node` with `-e`.
pub const NODE_HOST_JS: &str = include_str!("node_host.mjs");

/// The oldest Node.js major version that runs plugins.
pub const MIN_NODE_MAJOR: u32 = 22;

/// A Node.js executable that was checked to be new enough.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRuntime {
    /// The executable.
    pub path: PathBuf,
    /// `major.minor.patch`.
    pub version: (u32, u32, u32),
}

/// Find Node.js: `configured` (config `plugins.node`) or `node` on `PATH`,
/// and check its version. The error is one line naming what was found.
pub async fn locate(configured: Option<&Path>) -> Result<NodeRuntime, String> {
    let path = match configured {
        Some(p) => p.to_path_buf(),
        None => find_on_path("node").ok_or_else(|| {
            format!(
                "Node.js not found: no `node` on PATH ({}); install Node.js {MIN_NODE_MAJOR} or newer, or set plugins.node",
                std::env::var("PATH").unwrap_or_default()
            )
        })?,
    };
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(&path)
            .arg("--version")
            .env_clear()
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| format!("Node.js at {} did not answer `--version`", path.display()))?
    .map_err(|e| format!("cannot run Node.js at {}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let version = parse_version(&text).ok_or_else(|| {
        format!(
            "{} --version printed {text:?}, not a Node.js version",
            path.display()
        )
    })?;
    if version.0 < MIN_NODE_MAJOR {
        return Err(format!(
            "Node.js {MIN_NODE_MAJOR} or newer is needed for JS/TS plugins; found {text} at {}; install a newer Node.js or set plugins.node",
            path.display()
        ));
    }
    Ok(NodeRuntime { path, version })
}

fn parse_version(s: &str) -> Option<(u32, u32, u32)> {
    let mut it = s.strip_prefix('v')?.split('.');
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    let patch = it.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    Some((major, minor, patch))
}

/// The first executable file called `name` on `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

impl NodeRuntime {
    /// The command line that runs `entry` (inside `plugin_dir`) under the
    /// embedded host. TypeScript entries get Node's type stripping.
    pub fn argv(&self, entry: &Path) -> Vec<OsString> {
        let mut argv: Vec<OsString> = vec![self.path.clone().into()];
        let ts = entry
            .extension()
            .is_some_and(|e| e == "ts" || e == "mts" || e == "cts");
        // Type stripping is on by default from 23.6 (and 22.18); before, it
        // needs the flag.
        if ts && self.version < (23, 6, 0) && !(self.version.0 == 22 && self.version.1 >= 18) {
            argv.push("--experimental-strip-types".into());
        }
        argv.push("--disable-warning=ExperimentalWarning".into());
        argv.push("--input-type=module".into());
        argv.push("-e".into());
        argv.push(NODE_HOST_JS.into());
        argv.push("--".into());
        argv.push(entry.as_os_str().to_owned());
        argv
    }
}

/// An OpenClaw-style plugin's entry module: the first of
/// `package.json`'s `openclaw.extensions`. `Ok(None)` when the directory has
/// no `package.json` or it names no extension.
pub fn openclaw_entry(dir: &Path) -> Result<Option<PathBuf>, String> {
    let pkg = dir.join("package.json");
    let text = match std::fs::read_to_string(&pkg) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", pkg.display())),
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: invalid JSON: {e}", pkg.display()))?;
    let Some(ext) = v.pointer("/openclaw/extensions") else {
        return Ok(None);
    };
    let first = ext
        .as_array()
        .and_then(|a| a.first())
        .and_then(|e| e.as_str())
        .ok_or_else(|| {
            format!(
                "{}: openclaw.extensions must be a non-empty array of module paths",
                pkg.display()
            )
        })?;
    let entry = dir.join(first);
    if !entry.is_file() {
        return Err(format!(
            "{}: the entry module {first} (openclaw.extensions) does not exist at {}",
            pkg.display(),
            entry.display()
        ));
    }
    Ok(Some(entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_ts_gets_the_flag_only_where_needed() {
        assert_eq!(parse_version("v24.1.0"), Some((24, 1, 0)));
        assert_eq!(parse_version("v20.19.2"), Some((20, 19, 2)));
        assert_eq!(parse_version("20.1"), None);
        let n = |v| NodeRuntime {
            path: "/n".into(),
            version: v,
        };
        let flag = |v, e: &str| {
            n(v).argv(Path::new(e))
                .iter()
                .any(|a| a == "--experimental-strip-types")
        };
        assert!(flag((22, 6, 0), "i.ts"));
        assert!(!flag((22, 6, 0), "i.js"));
        assert!(!flag((22, 18, 0), "i.ts"));
        assert!(flag((23, 5, 0), "i.mts"));
        assert!(!flag((24, 0, 0), "i.ts"));
    }

    #[test]
    fn entry_comes_from_package_json() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(openclaw_entry(d.path()), Ok(None));
        std::fs::write(
            d.path().join("package.json"),
            r#"{"openclaw":{"extensions":["./index.ts"]}}"#,
        )
        .unwrap();
        let e = openclaw_entry(d.path()).unwrap_err();
        assert!(
            e.contains("./index.ts") && e.contains("does not exist"),
            "{e}"
        );
        std::fs::write(d.path().join("index.ts"), "").unwrap();
        assert_eq!(
            openclaw_entry(d.path()).unwrap(),
            Some(d.path().join("./index.ts"))
        );
        std::fs::write(
            d.path().join("package.json"),
            r#"{"openclaw":{"extensions":[]}}"#,
        )
        .unwrap();
        assert!(openclaw_entry(d.path()).is_err());
    }
}
