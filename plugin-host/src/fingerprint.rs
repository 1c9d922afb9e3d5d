//! Content hashes of plugin code, so `status` shows which code a generation
//! runs and a restart reports what changed.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Files hashed per plugin directory at most; beyond, the hash covers
/// names and sizes only.
const MAX_FILES: usize = 5_000;
/// Bytes read per plugin directory at most; beyond, names and sizes only.
const MAX_BYTES: u64 = 64 * 1024 * 1024;

/// A short hex hash of the plugin's code: every file below `dir` (hidden
/// entries and `node_modules` skipped: what an entry module imports from
/// its own directory is included) and each of `extra` (e.g. a command
/// binary outside the directory).
pub fn code_hash(dir: &Path, extra: &[&Path]) -> std::io::Result<String> {
    let mut files = Vec::new();
    collect(dir, dir, &mut files)?;
    files.sort();
    let mut h = Sha256::new();
    let mut budget = MAX_BYTES;
    let many = files.len() > MAX_FILES;
    for rel in &files {
        let path = dir.join(rel);
        h.update(rel.to_string_lossy().as_bytes());
        h.update([0]);
        hash_file(&mut h, &path, many, &mut budget)?;
    }
    for path in extra {
        h.update(b"\0extra\0");
        h.update(path.to_string_lossy().as_bytes());
        let mut unlimited = u64::MAX;
        hash_file(&mut h, path, false, &mut unlimited)?;
    }
    Ok(hex::encode(&h.finalize()[..8]))
}

fn hash_file(
    h: &mut Sha256,
    path: &Path,
    names_only: bool,
    budget: &mut u64,
) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if names_only || meta.len() > *budget {
        h.update(meta.len().to_le_bytes());
        return Ok(());
    }
    *budget -= meta.len();
    h.update(std::fs::read(path)?);
    Ok(())
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name == "node_modules" {
            continue;
        }
        let ty = entry.file_type()?;
        let path = entry.path();
        if ty.is_dir() {
            collect(root, &path, out)?;
        } else if ty.is_file() || ty.is_symlink() && path.is_file() {
            out.push(path.strip_prefix(root).unwrap_or(&path).to_path_buf());
        }
        if out.len() > MAX_FILES * 2 {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_with_any_file_below_the_directory() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("index.js"), "a").unwrap();
        std::fs::create_dir(d.path().join("lib")).unwrap();
        std::fs::write(d.path().join("lib/util.js"), "b").unwrap();
        std::fs::create_dir(d.path().join("node_modules")).unwrap();
        std::fs::write(d.path().join("node_modules/x.js"), "c").unwrap();
        let a = code_hash(d.path(), &[]).unwrap();
        assert_eq!(a, code_hash(d.path(), &[]).unwrap());
        std::fs::write(d.path().join("node_modules/x.js"), "changed").unwrap();
        assert_eq!(
            a,
            code_hash(d.path(), &[]).unwrap(),
            "node_modules is not the plugin's code"
        );
        std::fs::write(d.path().join("lib/util.js"), "B").unwrap();
        let b = code_hash(d.path(), &[]).unwrap();
        assert_ne!(a, b, "an imported file changed");
        let bin = d.path().join(".bin");
        std::fs::write(&bin, "1").unwrap();
        let c = code_hash(d.path(), &[&bin]).unwrap();
        assert_ne!(b, c);
        assert_eq!(c.len(), 16);
    }
}
