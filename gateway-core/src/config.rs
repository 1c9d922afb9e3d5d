//! Gateway configuration: which plugins run, their settings, restart timings.
//!
//! Read again on every restart through a [`ConfigSource`]. Errors name the
//! file, the line and the field.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Everything gateway-core reads from configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Plugin selection and settings.
    #[serde(default)]
    pub plugins: PluginsConfig,
    /// Restart timings.
    #[serde(default)]
    pub restart: RestartConfig,
    /// Request deadlines.
    #[serde(default)]
    pub requests: RequestsConfig,
    /// Where this config was read from, for error messages.
    #[serde(skip)]
    pub origin: Option<ConfigOrigin>,
}

impl GatewayConfig {
    /// The rules parsing cannot express: positive deadlines, timeouts and
    /// caps, and plugin environments a process can hold. Run on every
    /// config as soon as it is read, before any plugin process is started
    /// with it, so a bad value fails a start, restart or validation with an
    /// error naming the field and runs nothing under it.
    pub fn check(&self) -> Result<(), ConfigError> {
        let origin = self.origin.as_ref();
        self.restart.check(origin)?;
        self.requests.check(origin)?;
        self.plugins.check(origin)
    }
}

/// The file a config came from and its text, to point errors at lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigOrigin {
    /// The file.
    pub path: PathBuf,
    /// Its text as read.
    pub text: Arc<str>,
}

/// `[plugins]`: directories to load from and per-plugin entries.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginsConfig {
    /// Directories holding plugins described by `openclaw.plugin.json`
    /// manifests (the directory itself or its subdirectories).
    #[serde(default)]
    pub dirs: Vec<PathBuf>,
    /// `[plugins.entries.<id>]`: enable, disable and configure plugins.
    #[serde(default)]
    pub entries: BTreeMap<String, PluginEntry>,
    /// The Node.js executable for JS/TS plugins; `node` on `PATH` when unset.
    #[serde(default)]
    pub node: Option<PathBuf>,
    /// How long a plugin process may take to answer `initialize`.
    #[serde(default)]
    pub handshake_timeout_ms: Option<u64>,
    /// How long a call to a plugin process may take.
    #[serde(default)]
    pub call_timeout_ms: Option<u64>,
    /// Calls in flight per plugin process; beyond, callers get a retryable
    /// busy error.
    #[serde(default)]
    pub max_calls_in_flight: Option<usize>,
}

impl PluginsConfig {
    /// Process timeouts and the in-flight cap must be positive (zero would
    /// make every call time out or busy), and an entry's `env` cannot set
    /// what the host tells every plugin process ([`plugin_host::HOST_ENV`]),
    /// a name a process environment cannot hold, or a value holding NUL.
    fn check(&self, origin: Option<&ConfigOrigin>) -> Result<(), ConfigError> {
        let positive = [
            ("plugins.handshake_timeout_ms", self.handshake_timeout_ms),
            ("plugins.call_timeout_ms", self.call_timeout_ms),
            (
                "plugins.max_calls_in_flight",
                self.max_calls_in_flight.map(|n| n as u64),
            ),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, v)| *v == Some(0)) {
            return Err(ConfigError::at_field(origin, field, "must be positive"));
        }
        for (id, entry) in &self.entries {
            for (key, value) in &entry.env {
                let field = format!("plugins.entries.{id}.env.{key}");
                if plugin_host::HOST_ENV.contains(&key.as_str()) {
                    return Err(ConfigError::at_field(
                        origin,
                        &field,
                        "is set by the gateway for every plugin process and cannot be configured",
                    ));
                }
                if key.is_empty() || key.contains(['=', '\0']) {
                    return Err(ConfigError::at_field(
                        origin,
                        &field,
                        "is not a valid environment variable name",
                    ));
                }
                if value.contains('\0') {
                    return Err(ConfigError::at_field(
                        origin,
                        &field,
                        "holds a NUL character, which a process environment cannot hold",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `[plugins.entries.<id>]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginEntry {
    /// Overrides the plugin's default.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// The plugin's settings, validated against its config schema.
    #[serde(default)]
    pub config: Option<Value>,
    /// Environment variables a plugin process gets on top of the
    /// allow-list (`PATH`, `HOME`, `LANG`, ...). The gateway's own
    /// environment is never passed on otherwise.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// `[restart]`: timings of the swap.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RestartConfig {
    /// How long the old generation may finish in-flight requests.
    pub drain_timeout_ms: u64,
    /// Per service, how long `stop` may take.
    pub service_stop_timeout_ms: u64,
    /// Per service, how long `start` may take.
    pub service_start_timeout_ms: u64,
    /// How long a request waits for its plugin to start.
    pub start_wait_ms: u64,
    /// What the host does with client connections on restart.
    pub connections: RestartConnections,
    /// Signals that trigger an in-process restart (host setting), by name:
    /// `SIGUSR1`, `SIGUSR2`, `SIGHUP` (all three by default). A host
    /// ignores (and logs) a restart signal left out of this list.
    pub signals: Vec<String>,
}

/// What happens to client connections on an in-process restart.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RestartConnections {
    /// Connections stay open and are told the new generation.
    #[default]
    Keep,
    /// OpenClaw's behaviour: `shutdown` event, then close 1012.
    Close,
}

impl Default for RestartConfig {
    fn default() -> Self {
        RestartConfig {
            drain_timeout_ms: 5_000,
            service_stop_timeout_ms: 5_000,
            service_start_timeout_ms: 10_000,
            start_wait_ms: 5_000,
            connections: RestartConnections::Keep,
            signals: vec!["SIGUSR1".into(), "SIGUSR2".into(), "SIGHUP".into()],
        }
    }
}

impl RestartConfig {
    /// A service's start and stop need time: zero would fail every start
    /// and abandon every stop. (A zero drain, cancelling in-flight requests
    /// at once, and a zero start wait, answering requests to a starting
    /// plugin at once, are allowed.)
    fn check(&self, origin: Option<&ConfigOrigin>) -> Result<(), ConfigError> {
        for (field, ms) in [
            (
                "restart.service_start_timeout_ms",
                self.service_start_timeout_ms,
            ),
            (
                "restart.service_stop_timeout_ms",
                self.service_stop_timeout_ms,
            ),
        ] {
            if ms == 0 {
                return Err(ConfigError::at_field(origin, field, "must be positive"));
            }
        }
        Ok(())
    }

    /// Drain deadline.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
    /// Service stop timeout.
    pub fn stop_timeout(&self) -> Duration {
        Duration::from_millis(self.service_stop_timeout_ms)
    }
    /// Service start timeout.
    pub fn start_timeout(&self) -> Duration {
        Duration::from_millis(self.service_start_timeout_ms)
    }
    /// Bounded wait for a plugin to start.
    pub fn start_wait(&self) -> Duration {
        Duration::from_millis(self.start_wait_ms)
    }
}

/// `[requests]`: how long one request may run before it is answered
/// retryable `UNAVAILABLE` (`details.reason = "request-timeout"`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RequestsConfig {
    /// Deadline of every request, from admission to answer (waiting for a
    /// plugin to start included).
    pub timeout_ms: u64,
    /// Deadlines of single methods, overriding `timeout_ms`
    /// (`[requests.method_timeout_ms]` with `"bncr.send" = 60000`).
    pub method_timeout_ms: BTreeMap<String, u64>,
}

/// The default request deadline: 30 s.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 30_000;

impl Default for RequestsConfig {
    fn default() -> Self {
        RequestsConfig {
            timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
            method_timeout_ms: BTreeMap::new(),
        }
    }
}

impl RequestsConfig {
    /// The deadline of `method`.
    pub fn timeout_for(&self, method: &str) -> Duration {
        Duration::from_millis(
            self.method_timeout_ms
                .get(method)
                .copied()
                .unwrap_or(self.timeout_ms),
        )
    }

    /// Every deadline must be positive: a request without one could hold its
    /// generation forever.
    fn check(&self, origin: Option<&ConfigOrigin>) -> Result<(), ConfigError> {
        if self.timeout_ms == 0 {
            return Err(ConfigError::at_field(
                origin,
                "requests.timeout_ms",
                "must be positive",
            ));
        }
        if let Some((m, _)) = self.method_timeout_ms.iter().find(|(_, ms)| **ms == 0) {
            return Err(ConfigError::at_field(
                origin,
                &format!("requests.method_timeout_ms.{m}"),
                "must be positive",
            ));
        }
        Ok(())
    }
}

/// A configuration problem, pointing at the file, line and field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, when the config came from one.
    pub file: Option<PathBuf>,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// Dotted path of the field, when known (e.g. `plugins.entries.bncr.config.dmPolicy`).
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    /// An error with only a message.
    pub fn new(message: impl Into<String>) -> Self {
        ConfigError {
            file: None,
            line: None,
            column: None,
            field: None,
            message: message.into(),
        }
    }

    /// Point the error at `field` of `origin`, finding its line when the
    /// origin's text is TOML.
    pub fn at_field(
        origin: Option<&ConfigOrigin>,
        field: &str,
        message: impl Into<String>,
    ) -> Self {
        let mut e = ConfigError::new(message);
        e.field = Some(field.to_string());
        if let Some(o) = origin {
            e.file = Some(o.path.clone());
            if let Some((line, col)) = toml_field_position(&o.text, field) {
                e.line = Some(line);
                e.column = Some(col);
            }
        }
        e
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("config error")?;
        if let Some(file) = &self.file {
            write!(f, " in {}", file.display())?;
            if let Some(line) = self.line {
                write!(f, ":{line}")?;
                if let Some(col) = self.column {
                    write!(f, ":{col}")?;
                }
            }
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        // One line whatever the message quotes: a value from the file (e.g.
        // `mode = "\none"`) can carry control characters.
        f.write_str(": ")?;
        for c in self.message.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Where the gateway reads its configuration from, again at every restart.
pub trait ConfigSource: Send + Sync + 'static {
    /// Read and parse the configuration now.
    fn load(&self) -> Result<GatewayConfig, ConfigError>;

    /// Names (dotted, never values) of settings that only take effect when
    /// the process starts and that changed on disk since it started. Each
    /// restart asks, logs them and shows them in `status.lastRestart`. The
    /// default has no such settings.
    fn pending_process_settings(&self) -> Vec<String> {
        Vec::new()
    }
}

/// A config held in memory; embedding programs and tests replace it between
/// restarts with [`StaticConfig::set`].
#[derive(Debug, Default)]
pub struct StaticConfig(Mutex<GatewayConfig>);

impl StaticConfig {
    /// Start with `config`.
    pub fn new(config: GatewayConfig) -> Self {
        StaticConfig(Mutex::new(config))
    }
    /// Replace the config; takes effect at the next restart.
    pub fn set(&self, config: GatewayConfig) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = config;
    }
}

impl ConfigSource for StaticConfig {
    fn load(&self) -> Result<GatewayConfig, ConfigError> {
        Ok(self.0.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// A TOML file holding (at least) `[plugins]`, `[restart]` and `[requests]` tables, read
/// again on every load. Other top-level tables are ignored, so the file can be
/// shared with the server's own settings.
#[derive(Debug, Clone)]
pub struct TomlFileConfig {
    path: PathBuf,
}

impl TomlFileConfig {
    /// Read from `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        TomlFileConfig { path: path.into() }
    }
}

#[derive(Debug, Deserialize)]
struct GatewaySections {
    #[serde(default)]
    plugins: PluginsConfig,
    #[serde(default)]
    restart: RestartConfig,
    #[serde(default)]
    requests: RequestsConfig,
}

impl ConfigSource for TomlFileConfig {
    fn load(&self) -> Result<GatewayConfig, ConfigError> {
        let (sections, origin): (GatewaySections, _) = read_toml_file(&self.path)?;
        Ok(GatewayConfig {
            plugins: sections.plugins,
            restart: sections.restart,
            requests: sections.requests,
            origin: Some(origin),
        })
    }
}

/// Read and parse a TOML file into `T`, with errors naming file, line and field.
pub fn read_toml_file<T: DeserializeOwned>(path: &Path) -> Result<(T, ConfigOrigin), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: Some(path.to_path_buf()),
        ..ConfigError::new(format!("cannot read: {e}"))
    })?;
    let origin = ConfigOrigin {
        path: path.to_path_buf(),
        text: text.into(),
    };
    let value = parse_toml(&origin)?;
    Ok((value, origin))
}

/// Parse TOML text into `T`, with errors naming the origin's file, line and field.
pub fn parse_toml<T: DeserializeOwned>(origin: &ConfigOrigin) -> Result<T, ConfigError> {
    let de = toml::Deserializer::parse(&origin.text).map_err(|e| toml_error(origin, None, &e))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let field = (field != ".").then_some(field);
        toml_error(origin, field, e.inner())
    })
}

fn toml_error(origin: &ConfigOrigin, field: Option<String>, e: &toml::de::Error) -> ConfigError {
    let (line, column) = match e.span() {
        Some(span) => {
            let (l, c) = line_col(&origin.text, span.start);
            (Some(l), Some(c))
        }
        None => field
            .as_deref()
            .and_then(|f| toml_field_position(&origin.text, f))
            .map_or((None, None), |(l, c)| (Some(l), Some(c))),
    };
    ConfigError {
        file: Some(origin.path.clone()),
        line,
        column,
        field,
        message: e.message().trim().to_string(),
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, col)
}

/// The line and column of the dotted `field` in TOML `text` (the deepest key
/// of the path that exists), if it parses.
pub fn toml_field_position(text: &str, field: &str) -> Option<(usize, usize)> {
    // toml_edit 0.23 panics ("all items have spans") on some invalid
    // documents, e.g. "plugins==\n[plugins."; only hand it text the toml
    // parser accepts (found by `cargo xtask fuzz`).
    text.parse::<toml::Table>().ok()?;
    let doc = text.parse::<toml_edit::Document<String>>().ok()?;
    let mut item: &toml_edit::Item = doc.as_item();
    let mut best: Option<std::ops::Range<usize>> = None;
    for key in field.split('.').filter(|k| !k.is_empty()) {
        let next = if let Some(table) = item.as_table_like() {
            let (k, v) = table.get_key_value(key)?;
            if let Some(span) = k.span() {
                best = Some(span);
            }
            v
        } else if let (Some(arr), Ok(i)) = (item.as_array(), key.parse::<usize>()) {
            let v = arr.get(i)?;
            if let Some(span) = v.span() {
                best = Some(span);
            }
            return best.map(|s| line_col(text, s.start));
        } else {
            break;
        };
        item = next;
    }
    best.map(|s| line_col(text, s.start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn origin(text: &str) -> ConfigOrigin {
        ConfigOrigin {
            path: "gateway.toml".into(),
            text: text.into(),
        }
    }

    #[test]
    fn parses_plugins_and_restart_tables() {
        let text = r#"
[server]
port = 1

[plugins]
dirs = ["./p"]

[plugins.entries.bncr]
enabled = true
config = { dmPolicy = "open" }

[restart]
drain_timeout_ms = 100

[requests]
timeout_ms = 2500

[requests.method_timeout_ms]
"bncr.send" = 60000
"#;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        let cfg = TomlFileConfig::new(f.path()).load().unwrap();
        assert_eq!(cfg.plugins.dirs, vec![PathBuf::from("./p")]);
        let e = &cfg.plugins.entries["bncr"];
        assert_eq!(e.enabled, Some(true));
        assert_eq!(e.config.as_ref().unwrap()["dmPolicy"], "open");
        assert_eq!(cfg.restart.drain_timeout_ms, 100);
        assert_eq!(cfg.restart.start_wait_ms, 5_000);
        assert_eq!(
            cfg.requests.timeout_for("bncr.send"),
            Duration::from_secs(60)
        );
        assert_eq!(
            cfg.requests.timeout_for("health"),
            Duration::from_millis(2500)
        );
        assert!(cfg.requests.check(cfg.origin.as_ref()).is_ok());
    }

    #[test]
    fn plugin_process_settings_are_checked() {
        let check = |text: &str| {
            let cfg: GatewaySections = parse_toml(&origin(text)).unwrap();
            cfg.plugins.check(Some(&origin(text)))
        };
        let ok = "[plugins]\ncall_timeout_ms = 1\nhandshake_timeout_ms = 1\nmax_calls_in_flight = 1\n\
                  [plugins.entries.p.env]\nAPI_KEY = \"x\"\n";
        assert!(check(ok).is_ok());
        for field in [
            "call_timeout_ms",
            "handshake_timeout_ms",
            "max_calls_in_flight",
        ] {
            let err = check(&format!("[plugins]\n{field} = 0\n")).unwrap_err();
            assert_eq!(err.field, Some(format!("plugins.{field}")));
            assert_eq!(err.line, Some(2));
            assert_eq!(err.message, "must be positive");
        }
        for key in plugin_host::HOST_ENV {
            let err = check(&format!("[plugins.entries.p.env]\n{key} = \"x\"\n")).unwrap_err();
            assert_eq!(err.field, Some(format!("plugins.entries.p.env.{key}")));
            assert!(err.message.contains("set by the gateway"), "{err}");
        }
        let err = check("[plugins.entries.p.env]\n\"A=B\" = \"x\"\n").unwrap_err();
        assert!(err.message.contains("not a valid"), "{err}");
    }

    /// What `Gateway` runs right after every load: both sections, and a
    /// NUL in an env value (which no process environment can hold) named by
    /// its field before any process is spawned with it.
    #[test]
    fn the_whole_config_check_covers_requests_plugins_and_env_values() {
        let load = |text: &str| {
            let mut f = tempfile::NamedTempFile::new().unwrap();
            f.write_all(text.as_bytes()).unwrap();
            TomlFileConfig::new(f.path()).load().unwrap()
        };
        let ok = load("[plugins.entries.p.env]\nAPI_KEY = \"a b=c\"\nEMPTY = \"\"\n");
        assert_eq!(ok.check(), Ok(()));
        let cfg = load("[plugins.entries.p.env]\nAPI_KEY = \"x\"\nTOKEN = \"a\\u0000b\"\n");
        assert_eq!(cfg.plugins.entries["p"].env["TOKEN"], "a\0b");
        let err = cfg.check().unwrap_err();
        assert_eq!(err.field.as_deref(), Some("plugins.entries.p.env.TOKEN"));
        assert_eq!(err.line, Some(3));
        assert!(err.message.contains("NUL"), "{err}");
        assert!(!err.to_string().contains('\0'), "{err:?}");
        let err = load("[requests]\ntimeout_ms = 0\n").check().unwrap_err();
        assert_eq!(err.field.as_deref(), Some("requests.timeout_ms"));
        let err = load("[plugins]\ncall_timeout_ms = 0\n")
            .check()
            .unwrap_err();
        assert_eq!(err.field.as_deref(), Some("plugins.call_timeout_ms"));
        for field in ["service_start_timeout_ms", "service_stop_timeout_ms"] {
            let err = load(&format!("[restart]\n{field} = 0\n"))
                .check()
                .unwrap_err();
            assert_eq!(err.field, Some(format!("restart.{field}")));
            assert_eq!(err.line, Some(2));
        }
        let zero_drain =
            "[restart]\ndrain_timeout_ms = 0\nstart_wait_ms = 0\nservice_stop_timeout_ms = 1\n";
        assert_eq!(load(zero_drain).check(), Ok(()));
    }

    #[test]
    fn request_deadlines_must_be_positive() {
        let text = "[requests]\ntimeout_ms = 0\n";
        let cfg: GatewaySections = parse_toml(&origin(text)).unwrap();
        let err = cfg.requests.check(Some(&origin(text))).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("requests.timeout_ms"));
        assert_eq!(err.line, Some(2));
        let text = "[requests.method_timeout_ms]\n\"a.b\" = 0\n";
        let cfg: GatewaySections = parse_toml(&origin(text)).unwrap();
        let err = cfg.requests.check(None).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("requests.method_timeout_ms.a.b"));
        assert_eq!(
            RequestsConfig::default().timeout_for("x"),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn type_errors_name_file_line_and_field() {
        let text = "[plugins.entries.bncr]\nenabled = \"yes\"\n";
        let err = parse_toml::<GatewaySections>(&origin(text)).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("plugins.entries.bncr.enabled"));
        assert_eq!(err.line, Some(2));
        let shown = err.to_string();
        assert!(shown.contains("gateway.toml:2"), "{shown}");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let text = "[plugins]\ndirs = [\"a\"\n\n[restart]\n";
        let err = parse_toml::<GatewaySections>(&origin(text)).unwrap_err();
        assert!(err.line.is_some(), "{err}");
        assert!(err.to_string().starts_with("config error in gateway.toml:"));
    }

    #[test]
    fn errors_stay_on_one_line_when_a_value_has_control_characters() {
        let text = "[restart]\nconnections = \"\\nclose\\t\"\n";
        let err = parse_toml::<GatewaySections>(&origin(text)).unwrap_err();
        let shown = err.to_string();
        assert!(!shown.contains('\n') && !shown.contains('\t'), "{shown:?}");
        assert!(
            shown.contains("\\nclose\\t"),
            "escaped, not dropped: {shown}"
        );
    }

    #[test]
    fn unknown_fields_are_errors() {
        let text = "[restart]\ndrain_timeout = 5\n";
        let err = parse_toml::<GatewaySections>(&origin(text)).unwrap_err();
        assert!(err.message.contains("unknown field"), "{err}");
        assert_eq!(err.line, Some(2));
    }

    #[test]
    fn field_positions_in_invalid_documents_are_none() {
        assert_eq!(toml_field_position("plugins==\n[plugins.", "plugins"), None);
        assert_eq!(toml_field_position("[a]b\n", "a"), None);
    }

    #[test]
    fn finds_nested_field_positions() {
        let text = "[plugins.entries.bncr.config]\ndmPolicy = \"x\"\nretry = { limit = 3 }\n";
        assert_eq!(
            toml_field_position(text, "plugins.entries.bncr.config.dmPolicy"),
            Some((2, 1))
        );
        assert_eq!(
            toml_field_position(text, "plugins.entries.bncr.config.retry.limit"),
            Some((3, 11))
        );
        let e = ConfigError::at_field(
            Some(&origin(text)),
            "plugins.entries.bncr.config.dmPolicy",
            "bad",
        );
        assert_eq!(
            e.to_string(),
            "config error in gateway.toml:2:1: field `plugins.entries.bncr.config.dmPolicy`: bad"
        );
    }
}
