//! Each plugin's entry in the gateway config (`[plugins.entries.<id>]`):
//! every entry names a known plugin, whether the plugin is enabled, and its
//! config validated against the plugin's JSON Schema (errors name the
//! field and its line).

use super::{BuildError, Candidate};
use crate::config::{ConfigError, ConfigOrigin, GatewayConfig};
use serde_json::Value;

/// A candidate's config from `[plugins.entries.<id>]` (`{}` when absent),
/// validated against its schema.
pub(super) fn plugin_config(config: &GatewayConfig, c: &Candidate) -> Result<Value, BuildError> {
    let value = config
        .plugins
        .entries
        .get(&c.id)
        .and_then(|e| e.config.clone())
        .unwrap_or_else(|| Value::Object(Default::default()));
    validate_config(config.origin.as_ref(), &c.id, c.schema.as_ref(), &value)?;
    Ok(value)
}

/// Whether a candidate runs in this config.
pub(super) fn is_enabled(config: &GatewayConfig, c: &Candidate) -> bool {
    config
        .plugins
        .entries
        .get(&c.id)
        .and_then(|e| e.enabled)
        .unwrap_or(c.enabled_default)
}

pub(super) fn check_entries_known(
    config: &GatewayConfig,
    candidates: &[Candidate],
) -> Result<(), BuildError> {
    for id in config.plugins.entries.keys() {
        if !candidates.iter().any(|c| &c.id == id) {
            let mut known: Vec<&str> = candidates.iter().map(|c| c.id.as_str()).collect();
            known.sort_unstable();
            return Err(ConfigError::at_field(
                config.origin.as_ref(),
                &format!("plugins.entries.{id}"),
                format!("no plugin with id `{id}` (known: {})", known.join(", ")),
            )
            .into());
        }
    }
    Ok(())
}

fn validate_config(
    origin: Option<&ConfigOrigin>,
    plugin: &str,
    schema: Option<&Value>,
    config: &Value,
) -> Result<(), BuildError> {
    let base = format!("plugins.entries.{plugin}.config");
    let Some(schema) = schema else {
        if config.is_object() {
            return Ok(());
        }
        return Err(ConfigError::at_field(origin, &base, "must be a table").into());
    };
    let validator = jsonschema::validator_for(schema).map_err(|e| BuildError::Plugin {
        plugin: plugin.into(),
        message: format!("invalid config schema: {e}"),
    })?;
    if let Some(err) = validator.iter_errors(config).next() {
        let pointer = err.instance_path().to_string();
        let field = pointer
            .split('/')
            .filter(|s| !s.is_empty())
            .fold(base, |acc, seg| format!("{acc}.{seg}"));
        return Err(ConfigError::at_field(origin, &field, err.to_string()).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_errors_name_the_field() {
        let schema = serde_json::json!({
            "type":"object","additionalProperties":false,
            "properties":{"mode":{"enum":["a","b"]}}
        });
        let origin = ConfigOrigin {
            path: "g.toml".into(),
            text: "[plugins.entries.p.config]\nmode = \"c\"\n".into(),
        };
        let err = validate_config(
            Some(&origin),
            "p",
            Some(&schema),
            &serde_json::json!({"mode":"c"}),
        )
        .unwrap_err();
        let BuildError::Config(e) = err else {
            panic!("expected config error")
        };
        assert_eq!(e.field.as_deref(), Some("plugins.entries.p.config.mode"));
        assert_eq!(e.line, Some(2));
        assert!(
            validate_config(None, "p", Some(&schema), &serde_json::json!({"mode":"a"})).is_ok()
        );
        assert!(validate_config(None, "p", None, &serde_json::json!(3)).is_err());
    }
}
