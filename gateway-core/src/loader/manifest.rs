//! The manifest format: `openclaw.plugin.json` in a plugin directory.

use serde::Deserialize;
use serde_json::Value;

/// The manifest file name in a plugin directory.
pub const MANIFEST_FILE: &str = "openclaw.plugin.json";

/// A plugin manifest (`openclaw.plugin.json`). Unknown fields are ignored so
/// manifests written for other OpenClaw hosts still load.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Plugin id.
    pub id: String,
    /// Human-readable name.
    #[serde(default)]
    pub name: Option<String>,
    /// Version.
    #[serde(default = "default_version")]
    pub version: String,
    /// Whether it runs unless the config says otherwise.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// JSON Schema for the plugin's config.
    #[serde(default)]
    pub config_schema: Option<Value>,
    /// Methods served by built-in implementations or by configuration.
    #[serde(default, deserialize_with = "crate::strict::objects")]
    pub methods: Vec<ManifestMethod>,
    /// Events the plugin declares.
    #[serde(default)]
    pub events: Vec<String>,
    /// A command plugin: the process that speaks the plugin protocol.
    #[serde(default, deserialize_with = "crate::strict::optional_object_only")]
    pub runtime: Option<ManifestRuntime>,
}

/// `runtime` in a manifest: how to run a command plugin.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ManifestRuntime {
    /// Program and arguments (an argv, never a shell string); a relative
    /// program path resolves inside the plugin's directory.
    pub command: Vec<String>,
}

fn default_version() -> String {
    "0.0.0".into()
}

/// A method declared in a manifest.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ManifestMethod {
    /// Method name.
    pub name: String,
    /// Required scope; `"none"` for none; `operator.admin` when absent.
    #[serde(default)]
    pub scope: Option<String>,
    /// Listed in `features.methods` (default true).
    #[serde(default = "yes")]
    pub advertise: bool,
    /// Which built-in implementation serves it.
    #[serde(default)]
    pub handler: ManifestHandler,
    /// The reply for `handler = "reply"`; the plugin config's
    /// `replies.<method>` overrides it.
    #[serde(default)]
    pub reply: Option<Value>,
    /// Delay for `handler = "sleep"` (params `ms` override it).
    #[serde(default)]
    pub ms: Option<u64>,
}

fn yes() -> bool {
    true
}

/// Built-in implementations a manifest method can name.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ManifestHandler {
    /// Answer the configured reply (or `{"ok":true,"method":..}`).
    #[default]
    Reply,
    /// Answer the params back.
    Echo,
    /// Sleep `ms` then answer `{"slept":ms}`.
    Sleep,
    /// Answer an `UNAVAILABLE` error with the reply's text.
    Error,
    /// Panic (to exercise the host's panic handling).
    Panic,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_parses_with_unknown_fields_and_defaults() {
        let m: Manifest = serde_json::from_str(
            r#"{"id":"demo","kind":"tool","methods":[{"name":"demo.a"},{"name":"demo.b","handler":"echo","scope":"none","advertise":false}]}"#,
        )
        .unwrap();
        assert_eq!(m.version, "0.0.0");
        assert_eq!(m.methods[0].handler, ManifestHandler::Reply);
        assert!(m.methods[0].advertise);
        assert_eq!(m.methods[1].handler, ManifestHandler::Echo);
        assert!(!m.methods[1].advertise);
    }

    #[test]
    fn manifest_parts_are_objects_not_arrays() {
        let parse =
            |text: &str| serde_json::from_str::<crate::strict::Object<Manifest>>(text).map(|o| o.0);
        assert!(parse(r#"{"id":"d","methods":[{"name":"d.a"}],"runtime":null}"#).is_ok());
        for bad in [
            r#"{"id":"d","methods":[["d.a"]]}"#,
            r#"["d"]"#,
            r#"{"id":"d","runtime":[["node","x.js"]]}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
