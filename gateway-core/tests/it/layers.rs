//! gateway-core's modules form layers (ARCHITECTURE.md, gateway-core): each
//! module uses only modules in layers below its own, so the module graph
//! has no cycle. A `use` that points up or sideways fails here, naming it.
//!
//! A module is a file `src/x.rs` or a directory `src/x/`; every file under
//! `src/x/` is in x's layer. Paths that stay inside x (`self::`, a `super::`
//! that does not climb past x, `crate::x::`) are internal; a `super::`
//! chain that climbs to the crate root is checked as `crate::` is.
//! Comments are not read: a doc link is not a dependency.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Lowest first; a module may use any module of a lower layer.
const LAYERS: &[&[&str]] = &[
    &["config", "panic", "policy", "strict"],
    &["frame"],
    &["registry"],
    &["runtime"],
    &["loader"],
    &["scope"],
    &["report"],
    &["core_plugin"],
    &["gateway"],
    &["testing"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// One source file of the crate.
struct Source {
    /// Relative to `src/`, for messages.
    path: String,
    /// The module its top-level code is in: `src/scope/health.rs` is
    /// `["scope", "health"]`, `src/scope/mod.rs` and `src/scope.rs` are
    /// `["scope"]`.
    module: Vec<String>,
    text: String,
}

fn sources(src: &Path) -> Vec<Source> {
    let mut out = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        for entry in std::fs::read_dir(src.join(&rel)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                dirs.push(rel.join(&name));
                continue;
            }
            let Some(stem) = name.strip_suffix(".rs") else {
                continue;
            };
            let mut module: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if stem != "mod" && stem != "lib" {
                module.push(stem.to_string());
            }
            out.push(Source {
                path: rel.join(&name).display().to_string(),
                module,
                text: std::fs::read_to_string(&path).unwrap(),
            });
        }
    }
    out
}

/// The name a path continues with; for `{` or `*`, that character.
fn ident_at(text: &str) -> String {
    let name: String = text
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    match name.is_empty() {
        true => text.chars().take(1).collect(),
        false => name,
    }
}

/// The modules at the crate root that `source` names, with the line
/// number: after `crate::`, or after a `super::` chain that climbs to the
/// crate root. A name that is no module (`crate::Name`, `crate::{..}`) is
/// returned as it is, so that the caller rejects it.
fn root_paths(source: &Source) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    // Indents of the inline `mod name {` blocks open at this line; rustfmt
    // closes each with a `}` at the same indent.
    let mut inline: Vec<usize> = Vec::new();
    for (n, line) in source.text.lines().enumerate() {
        let code = line.trim_start();
        let indent = line.len() - code.len();
        if inline.last() == Some(&indent) && code == "}" {
            inline.pop();
            continue;
        }
        if code.starts_with("//") {
            continue;
        }
        let declaration = code.split_once("mod ").map(|(vis, rest)| {
            (vis.is_empty() || vis.starts_with("pub")) && rest.trim_end().ends_with('{')
        });
        if declaration == Some(true) {
            inline.push(indent);
        }
        let depth = source.module.len() + inline.len();
        for (at, _) in code.match_indices("crate::") {
            if code[..at].ends_with('$') {
                continue;
            }
            out.push((n + 1, ident_at(&code[at + "crate::".len()..])));
        }
        for (at, _) in code.match_indices("super::") {
            if code[..at].ends_with("::") {
                continue; // counted with the chain it continues
            }
            let mut rest = &code[at..];
            let mut climbs = 0;
            while let Some(r) = rest.strip_prefix("super::") {
                climbs += 1;
                rest = r;
            }
            if climbs >= depth {
                // At (or past) the crate root: what follows names a module.
                let named = if climbs == depth {
                    ident_at(rest)
                } else {
                    "super (past the crate root)".to_string()
                };
                out.push((n + 1, named));
            }
        }
    }
    out
}

#[test]
fn every_gateway_core_module_uses_only_modules_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let sources = sources(&src);
    let modules: BTreeSet<&str> = sources
        .iter()
        .filter_map(|s| s.module.first().map(String::as_str))
        .collect();
    let listed: BTreeSet<&str> = LAYERS.iter().flat_map(|l| l.iter().copied()).collect();
    assert_eq!(
        modules, listed,
        "every module of src/ has exactly one layer"
    );
    let mut wrong = Vec::new();
    for source in &sources {
        let Some(module) = source.module.first() else {
            continue; // lib.rs declares and re-exports the modules
        };
        let own = layer(module).unwrap();
        for (line, used) in root_paths(source) {
            let at = format!("{}:{line}", source.path);
            match layer(&used) {
                Some(_) if used == *module => {}
                // `crate::Name` or `crate::{...}` would hide which module is used.
                None => wrong.push(format!("{at}: `{used}` names no module")),
                Some(l) if l >= own => wrong.push(format!(
                    "{at}: {module} (layer {own}) uses {used} (layer {l})"
                )),
                Some(_) => {}
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// The checker itself, on text: it must see through module directories,
/// inline modules and `super::` chains, or the test above proves nothing.
#[test]
fn the_layer_check_reads_paths_as_rust_resolves_them() {
    let file = |path: &str, text: &str| {
        let mut module: Vec<String> = path
            .trim_end_matches(".rs")
            .split('/')
            .map(str::to_string)
            .collect();
        if module.last().is_some_and(|m| m == "mod") {
            module.pop();
        }
        Source {
            path: path.into(),
            module,
            text: text.into(),
        }
    };
    let names = |s: &Source| -> Vec<String> { root_paths(s).into_iter().map(|(_, m)| m).collect() };
    let nested = file(
        "scope/health.rs",
        "use super::PluginPhase;\nuse crate::scope::X;\nuse super::super::gateway::Gateway;\n\
         /// [`crate::Gateway`]\nfn f() { crate::registry::g(); }\n",
    );
    assert_eq!(names(&nested), ["scope", "gateway", "registry"]);
    let top = file(
        "scope/mod.rs",
        "mod health;\nuse super::report::R;\n#[cfg(test)]\nmod tests {\n    use super::*;\n    \
         mod deeper {\n        use super::super::X;\n    }\n    use super::super::loader::L;\n}\n\
         use super::{a, b};\n",
    );
    assert_eq!(names(&top), ["report", "loader", "{"]);
    let flat = file(
        "gateway.rs",
        "use crate::{Gateway, scope};\nuse super::super::x;\n",
    );
    assert_eq!(names(&flat), ["{", "super (past the crate root)"]);
}
