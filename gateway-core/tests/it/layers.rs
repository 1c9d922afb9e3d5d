//! gateway-core's modules form layers (ARCHITECTURE.md, gateway-core): each
//! module uses only modules in layers below its own, so the module graph
//! has no cycle. A `use` that points up or sideways fails here, naming it.

use std::collections::BTreeSet;
use std::path::Path;

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

#[test]
fn every_gateway_core_module_uses_only_modules_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files: BTreeSet<String> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .filter(|m| m != "lib")
        .collect();
    let listed: BTreeSet<String> = LAYERS
        .iter()
        .flat_map(|l| l.iter().map(|m| m.to_string()))
        .collect();
    assert_eq!(files, listed, "every module of src/ has exactly one layer");
    let mut wrong = Vec::new();
    for module in &listed {
        let own = layer(module).unwrap();
        let text = std::fs::read_to_string(src.join(format!("{module}.rs"))).unwrap();
        for (at, _) in text.match_indices("crate::") {
            let used: String = text[at + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            match layer(&used) {
                // `crate::Name` or `crate::{...}` would hide which module is used.
                None => wrong.push(format!("{module}: `crate::{used}` names no module")),
                Some(l) if l >= own => {
                    wrong.push(format!("{module} (layer {own}) uses {used} (layer {l})"))
                }
                Some(_) => {}
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}
