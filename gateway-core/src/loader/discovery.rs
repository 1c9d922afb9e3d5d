//! Plugin directories read from disk for every generation: each manifest
//! parsed and checked (id, schema, methods against code), its code found
//! (`runtime.command`, or a `package.json` entry run under Node.js) and
//! hashed, and the whole turned into a plugin to construct.

use super::declarative::DeclarativePlugin;
use super::{
    BuildError, Candidate, MANIFEST_FILE, Manifest, PluginKind, PluginSource, RuntimeSlot,
};
use plugin_api::{Plugin, PluginContext};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Every plugin described by a manifest in `dirs`, read from disk now.
pub(crate) fn discover_manifests(dirs: &[PathBuf]) -> Result<Vec<Candidate>, BuildError> {
    let mut found = Vec::new();
    for dir in dirs {
        if let Some(c) = manifest_candidate(&dir.join(MANIFEST_FILE))? {
            found.push(c);
            continue;
        }
        let entries = std::fs::read_dir(dir).map_err(|e| BuildError::Manifest {
            path: dir.clone(),
            message: format!("cannot read plugin directory: {e}"),
        })?;
        let mut here: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path().join(MANIFEST_FILE))
            .collect();
        here.sort();
        for path in here {
            found.extend(manifest_candidate(&path)?);
        }
    }
    Ok(found)
}

/// The plugin described by the manifest at `path`; `None` when there is no
/// file there (a subdirectory without a manifest is not a plugin).
fn manifest_candidate(path: &Path) -> Result<Option<Candidate>, BuildError> {
    let bad = |message: String| BuildError::Manifest {
        path: path.to_path_buf(),
        message,
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(bad(format!("cannot read: {e}"))),
    };
    // Straight from bytes to `Manifest`: no intermediate JSON tree.
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let crate::strict::Object(manifest): crate::strict::Object<Manifest> =
        serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let inner = e.inner();
            if inner.is_syntax() || inner.is_eof() {
                bad(format!("invalid JSON: {inner}"))
            } else {
                bad(format!("field `{}`: {inner}", e.path()))
            }
        })?;
    de.end().map_err(|e| bad(format!("invalid JSON: {e}")))?;
    if manifest.id.is_empty() || manifest.id.contains(char::is_whitespace) {
        return Err(bad(format!("invalid plugin id {:?}", manifest.id)));
    }
    if let Some(schema) = &manifest.config_schema {
        jsonschema::validator_for(schema).map_err(|e| bad(format!("invalid configSchema: {e}")))?;
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let (entry, broken) = match plugin_host::node::openclaw_entry(dir) {
        Ok(e) => (e, None),
        Err(e) => (None, Some(e)),
    };
    let launch = match (&manifest.runtime, entry) {
        _ if broken.is_some() => Some(crate::runtime::Launch::broken_node(
            dir,
            broken.unwrap_or_default(),
        )),
        (Some(_), Some(entry)) => {
            return Err(bad(format!(
                "both runtime.command and a JS entry module ({}) are given; keep one",
                entry.display()
            )));
        }
        (Some(rt), None) => Some(crate::runtime::Launch::command(dir, &rt.command).map_err(&bad)?),
        (None, Some(entry)) => Some(crate::runtime::Launch::node(dir, entry)),
        (None, None) if manifest.methods.is_empty() => {
            return Err(bad(
                "declares no methods, has no entry module (package.json openclaw.extensions) and no runtime.command: it would serve nothing".into(),
            ));
        }
        (None, None) => None,
    };
    if launch.is_some() && !manifest.methods.is_empty() {
        return Err(bad(
            "`methods` is for manifest-only plugins; a plugin with code declares its methods when it starts".into(),
        ));
    }
    let mut identity = b"manifest\0".to_vec();
    identity.extend_from_slice(&bytes);
    if let Some(l) = &launch {
        identity.extend_from_slice(b"\0code\0");
        identity.extend_from_slice(l.code_hash().as_bytes());
    }
    let m = Arc::new(manifest);
    let create_m = m.clone();
    let (kind, runtime) = match launch {
        Some(l) if l.is_node() => (PluginKind::Node, RuntimeSlot::Launch(l)),
        Some(l) => (PluginKind::Command, RuntimeSlot::Launch(l)),
        None => (PluginKind::Manifest, RuntimeSlot::None),
    };
    // A runtime plugin serves what its process declares; until `prepare`
    // starts it (a validation-only build never does), it serves nothing.
    let create: plugin_api::CreateFn = match &runtime {
        RuntimeSlot::Launch(_) => crate::runtime::create_fn(&m.id, &m.version, None),
        _ => Arc::new(move |ctx: PluginContext| {
            Ok(Arc::new(DeclarativePlugin::new(create_m.clone(), &ctx.config)) as Arc<dyn Plugin>)
        }),
    };
    Ok(Some(Candidate {
        id: m.id.clone(),
        name: m.name.clone().unwrap_or_else(|| m.id.clone()),
        version: m.version.clone(),
        source: PluginSource::Manifest(path.to_path_buf()),
        schema: m.config_schema.clone(),
        identity,
        create,
        enabled_default: m.enabled.unwrap_or(true),
        kind,
        runtime,
    }))
}
