//! Settings: command line, environment and TOML file, resolved once at start.
//!
//! Precedence, highest first: flags, environment variables, the config file,
//! built-in defaults. The `[plugins]` and `[restart]` tables of the file are
//! read again at every restart through [`FileConfigSource`]; the server's own
//! tables (`[server]`, `[auth]`, `[limits]`, `[logging]`) are read at start.

use clap::{Parser, ValueEnum};
use gateway_core::{ConfigError, ConfigOrigin, ConfigSource, GatewayConfig};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// OpenClaw's default gateway port.
pub const DEFAULT_PORT: u16 = 18789;
/// Largest frame accepted before the handshake completes.
pub const PREAUTH_MAX_PAYLOAD: usize = 64 * 1024;
/// The file, below the state dir, holding a generated token.
pub const TOKEN_FILE: &str = "gateway.token";

/// The command line. Every flag but `--config` and `--plugin-dir` can also be
/// set in the config file; flags win over environment variables, which win
/// over the file.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "ws-proxy",
    version,
    about = "OpenClaw-compatible plugin gateway (protocol v4)"
)]
pub struct Cli {
    /// TOML config file (see ws-proxy.example.toml).
    #[arg(long, env = "GATEWAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long, env = "GATEWAY_BIND", value_name = "ADDR")]
    pub bind: Option<IpAddr>,
    /// Port to listen on; 0 picks a free one [default: 18789].
    #[arg(long, env = "GATEWAY_PORT")]
    pub port: Option<u16>,
    /// How clients authenticate [default: token, or password when only a password is set].
    #[arg(long, env = "GATEWAY_AUTH", value_enum)]
    pub auth: Option<AuthMode>,
    /// Shared token for `--auth token`; generated and stored in the state dir when unset.
    #[arg(long, env = "GATEWAY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Shared password for `--auth password`.
    #[arg(long, env = "GATEWAY_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Allow `--auth none` on a non-loopback address.
    #[arg(long)]
    pub allow_remote_none: bool,
    /// Extra plugin directory (repeatable); added to `plugins.dirs`.
    #[arg(long = "plugin-dir", value_name = "DIR")]
    pub plugin_dirs: Vec<PathBuf>,
    /// Durable state directory [default: ./state].
    #[arg(long, env = "GATEWAY_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Log format [default: text].
    #[arg(long, env = "GATEWAY_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `ws_proxy=debug,info` [default: info].
    #[arg(long, env = "GATEWAY_LOG_LEVEL")]
    pub log_level: Option<String>,
}

/// How clients authenticate at `connect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// A shared token (`auth.token`, or `auth.password` carrying it).
    Token,
    /// A shared password (`auth.password`, or `auth.token` carrying it).
    Password,
    /// No secret; loopback only unless explicitly allowed.
    None,
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[server]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerSection {
    bind: Option<IpAddr>,
    port: Option<u16>,
    state_dir: Option<PathBuf>,
}

/// `[auth]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthSection {
    mode: Option<AuthMode>,
    token: Option<String>,
    password: Option<String>,
    allow_remote_none: Option<bool>,
    max_failures_per_minute: Option<u32>,
}

/// `[logging]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoggingSection {
    format: Option<LogFormat>,
    level: Option<String>,
}

/// `[limits]`: per-connection policy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest frame after the handshake (`policy.maxPayload`), bytes.
    pub max_payload: usize,
    /// Outbound bytes queued for one client before it is closed as a slow
    /// consumer (`policy.maxBufferedBytes`).
    pub max_buffered_bytes: usize,
    /// `tick` event period (`policy.tickIntervalMs`).
    pub tick_interval_ms: u64,
    /// Time allowed from open to a successful `connect`.
    pub handshake_timeout_ms: u64,
    /// Requests one connection may have in flight.
    pub max_in_flight: usize,
    /// WebSocket ping period; a client silent for two periods plus 5 s is
    /// closed.
    pub ping_interval_ms: u64,
    /// On stop, how long in-flight requests may drain.
    pub shutdown_drain_ms: u64,
    /// HTTP stage: time allowed for a request's head, from when the
    /// connection is ready for it (the first request and each keep-alive one).
    pub http_header_timeout_ms: u64,
    /// HTTP stage: a connection that moved no bytes for this long is closed.
    pub http_idle_timeout_ms: u64,
    /// Open TCP connections in total (HTTP and WebSocket, before and after
    /// auth). Lowered at start to stay below the file-descriptor limit.
    pub max_connections: usize,
    /// Connections not yet authenticated (HTTP stage and `connect`
    /// handshake). At the cap the oldest of them is closed to make room.
    pub max_pending_connections: usize,
    /// Unauthenticated connections per peer address; at the cap that peer's
    /// oldest is closed to make room.
    pub max_pending_per_peer: usize,
    /// Open connections per non-loopback peer address; more are refused
    /// with HTTP 503. Loopback peers (all local clients share one address)
    /// count only toward `max_connections`.
    pub max_connections_per_peer: usize,
    /// Origins (`scheme://host[:port]`) allowed to open a WebSocket besides
    /// the gateway's own; an upgrade with any other `Origin` gets 403.
    pub allowed_origins: Vec<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload: 25 * 1024 * 1024,
            max_buffered_bytes: 50 * 1024 * 1024,
            tick_interval_ms: 30_000,
            handshake_timeout_ms: 10_000,
            max_in_flight: 128,
            ping_interval_ms: 25_000,
            shutdown_drain_ms: 5_000,
            http_header_timeout_ms: 10_000,
            http_idle_timeout_ms: 5_000,
            max_connections: 16_384,
            max_pending_connections: 1_024,
            max_pending_per_peer: 256,
            max_connections_per_peer: 1_024,
            allowed_origins: Vec::new(),
        }
    }
}

/// The whole config file. Unknown keys are errors.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    server: ServerSection,
    #[serde(default)]
    auth: AuthSection,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    logging: LoggingSection,
    #[serde(default)]
    plugins: gateway_core::PluginsConfig,
    #[serde(default)]
    restart: gateway_core::RestartConfig,
    #[serde(default)]
    requests: gateway_core::RequestsConfig,
}

/// The tables read only at process start. A change to any of their keys on
/// disk is reported at each restart as pending until the process restarts.
pub const PROCESS_TABLES: &[&str] = &["server", "auth", "limits", "logging"];

/// Authentication settings after resolution.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthSettings {
    /// The mode.
    pub mode: AuthMode,
    /// The secret clients must present (token or password); `None` for mode `none`.
    pub secret: Option<String>,
    /// Whether the token was generated (and stored in the state dir) at this start.
    pub generated: bool,
    /// Where the secret came from.
    pub origin: SecretOrigin,
    /// Failed connects per peer IP per minute before refusing (0: unlimited).
    pub max_failures_per_minute: u32,
}

impl fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthSettings")
            .field("mode", &self.mode)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("generated", &self.generated)
            .field("origin", &self.origin)
            .finish()
    }
}

/// Where the token or password clients present came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretOrigin {
    /// No secret (`--auth none`).
    None,
    /// The `--token` / `--password` flag.
    Flag,
    /// An environment variable (`GATEWAY_TOKEN`, `GATEWAY_PASSWORD`).
    Env(&'static str),
    /// The config file (`auth.token` / `auth.password`).
    File(PathBuf),
    /// Read from the token file in the state dir (generated at an earlier start).
    StateDir(PathBuf),
    /// Generated at this start and stored in the token file.
    Generated(PathBuf),
}

impl SecretOrigin {
    /// For people: `generated, stored in state/gateway.token`, `read from ...`.
    pub fn describe(&self) -> String {
        match self {
            SecretOrigin::None => "none".into(),
            SecretOrigin::Flag => "from the command line".into(),
            SecretOrigin::Env(var) => format!("from the environment ({var})"),
            SecretOrigin::File(p) => format!("from the config file {}", p.display()),
            SecretOrigin::StateDir(p) => format!("read from {}", p.display()),
            SecretOrigin::Generated(p) => format!("generated, stored in {}", p.display()),
        }
    }
}

/// Everything the server needs, resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Listen address.
    pub bind: IpAddr,
    /// Listen port (0: any free port).
    pub port: u16,
    /// Authentication.
    pub auth: AuthSettings,
    /// Per-connection policy.
    pub limits: Limits,
    /// Durable state directory.
    pub state_dir: PathBuf,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
    /// Where plugin and restart config is read at each restart.
    pub source: FileConfigSource,
    /// The config as read at start (validated; signals known).
    pub initial: GatewayConfig,
}

/// A settings problem; the binary prints it as one line and exits 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsError(pub String);

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SettingsError {}

impl From<ConfigError> for SettingsError {
    fn from(e: ConfigError) -> Self {
        SettingsError(e.to_string())
    }
}

/// Re-reads the config file (if any) at every load and adds the
/// `--plugin-dir` directories to `plugins.dirs`. Relative plugin directories
/// in the file are taken relative to the file's directory. Remembers the
/// process-level tables as they were at start, to report changes to them.
#[derive(Debug, Clone, Default)]
pub struct FileConfigSource {
    file: Option<PathBuf>,
    extra_dirs: Vec<PathBuf>,
    at_start: Arc<BTreeMap<String, toml::Value>>,
}

impl FileConfigSource {
    /// A source reading `file` (if any) plus `extra_dirs`.
    pub fn new(file: Option<PathBuf>, extra_dirs: Vec<PathBuf>) -> Self {
        FileConfigSource {
            file,
            extra_dirs,
            at_start: Arc::default(),
        }
    }

    /// The config file, if one was given.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    fn read(&self) -> Result<(FileConfig, Option<ConfigOrigin>), ConfigError> {
        match &self.file {
            None => Ok((FileConfig::default(), None)),
            Some(path) => {
                let (cfg, origin): (FileConfig, _) = gateway_core::read_toml_file(path)?;
                Ok((cfg, Some(origin)))
            }
        }
    }

    /// Remember the process-level settings of the file as read at start.
    fn remember_process_settings(&mut self, origin: Option<&ConfigOrigin>) {
        self.at_start = Arc::new(origin.map(process_settings).unwrap_or_default());
    }

    fn gateway_config(
        &self,
        file: &FileConfig,
        origin: Option<ConfigOrigin>,
    ) -> Result<GatewayConfig, ConfigError> {
        let base = self
            .file
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf);
        let mut plugins = file.plugins.clone();
        if let Some(base) = base.filter(|b| !b.as_os_str().is_empty()) {
            for d in &mut plugins.dirs {
                if d.is_relative() {
                    *d = base.join(&*d);
                }
            }
        }
        plugins.dirs.extend(self.extra_dirs.iter().cloned());
        for s in &file.restart.signals {
            if crate::signals::RestartSignal::from_name(s).is_none() {
                return Err(ConfigError::at_field(
                    origin.as_ref(),
                    "restart.signals",
                    format!("unknown signal `{s}` (expected SIGUSR1, SIGUSR2 or SIGHUP)"),
                ));
            }
        }
        Ok(GatewayConfig {
            plugins,
            restart: file.restart.clone(),
            requests: file.requests.clone(),
            origin,
        })
    }
}

impl ConfigSource for FileConfigSource {
    fn load(&self) -> Result<GatewayConfig, ConfigError> {
        let (file, origin) = self.read()?;
        self.gateway_config(&file, origin)
    }

    /// Keys of `[server]`, `[auth]`, `[limits]` and `[logging]` (dotted, any
    /// depth, added or removed keys included) whose value on disk differs
    /// from the value at process start. A file that cannot be read or
    /// parsed now reports nothing here (the restart itself reports it).
    fn pending_process_settings(&self) -> Vec<String> {
        let Some(path) = &self.file else {
            return Vec::new();
        };
        let Ok(text) = std::fs::read_to_string(path) else {
            return Vec::new();
        };
        let origin = ConfigOrigin {
            path: path.clone(),
            text: text.into(),
        };
        let now = process_settings(&origin);
        if now.is_empty() && origin.text.parse::<toml::Table>().is_err() {
            return Vec::new();
        }
        let before = &*self.at_start;
        let mut changed: Vec<String> = before
            .keys()
            .chain(now.keys())
            .filter(|k| before.get(*k) != now.get(*k))
            .cloned()
            .collect();
        changed.sort_unstable();
        changed.dedup();
        changed
    }
}

/// The process-level tables of a config file flattened to dotted keys
/// (`auth.mode`, `limits.max_in_flight`, ...); arrays are compared whole.
fn process_settings(origin: &ConfigOrigin) -> BTreeMap<String, toml::Value> {
    fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, toml::Value>) {
        match value {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    flatten(&format!("{prefix}.{k}"), v, out);
                }
            }
            v => {
                out.insert(prefix.to_string(), v.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    let Ok(doc) = origin.text.parse::<toml::Table>() else {
        return out;
    };
    for table in PROCESS_TABLES {
        if let Some(v) = doc.get(*table) {
            flatten(table, v, &mut out);
        }
    }
    out
}

impl Settings {
    /// Resolve settings from the command line (which already carries the
    /// environment), the config file and defaults. Reads or creates the
    /// generated token when token auth has no token.
    pub fn resolve(cli: &Cli) -> Result<Settings, SettingsError> {
        let mut source = FileConfigSource::new(cli.config.clone(), cli.plugin_dirs.clone());
        let (file, origin) = source.read()?;
        source.remember_process_settings(origin.as_ref());
        let initial = source.gateway_config(&file, origin)?;
        let bind = cli
            .bind
            .or(file.server.bind)
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let port = cli.port.or(file.server.port).unwrap_or(DEFAULT_PORT);
        let state_dir = cli
            .state_dir
            .clone()
            .or(file.server.state_dir.clone())
            .unwrap_or_else(|| PathBuf::from("./state"));
        let token = cli.token.clone().or(file.auth.token.clone());
        let password = cli.password.clone().or(file.auth.password.clone());
        let mode =
            cli.auth
                .or(file.auth.mode)
                .unwrap_or(if password.is_some() && token.is_none() {
                    AuthMode::Password
                } else {
                    AuthMode::Token
                });
        let allow_remote_none = cli.allow_remote_none || file.auth.allow_remote_none == Some(true);
        if mode == AuthMode::None && !bind.is_loopback() && !allow_remote_none {
            return Err(SettingsError(format!(
                "refusing to serve {bind} without authentication: use --auth token, or allow it with --allow-remote-none (auth.allow_remote_none = true)"
            )));
        }
        let limits = file.limits.clone();
        if limits.max_payload < PREAUTH_MAX_PAYLOAD {
            return Err(SettingsError(format!(
                "limits.max_payload must be at least {PREAUTH_MAX_PAYLOAD} bytes"
            )));
        }
        if limits.tick_interval_ms == 0 || limits.ping_interval_ms == 0 || limits.max_in_flight == 0
        {
            return Err(SettingsError(
                "limits.tick_interval_ms, limits.ping_interval_ms and limits.max_in_flight must be positive".into(),
            ));
        }
        if limits.http_header_timeout_ms == 0
            || limits.http_idle_timeout_ms == 0
            || limits.max_connections == 0
            || limits.max_pending_connections == 0
            || limits.max_pending_per_peer == 0
            || limits.max_connections_per_peer == 0
        {
            return Err(SettingsError(
                "limits.http_header_timeout_ms, limits.http_idle_timeout_ms, limits.max_connections, limits.max_pending_connections, limits.max_pending_per_peer and limits.max_connections_per_peer must be positive".into(),
            ));
        }
        if let Some(bad) = limits
            .allowed_origins
            .iter()
            .find(|o| crate::limits::normalize_origin(o).is_none())
        {
            return Err(SettingsError(format!(
                "limits.allowed_origins: {bad:?} is not an origin (expected scheme://host[:port])"
            )));
        }
        // Which layer supplied a secret: the flag (clap fills it from the
        // environment too, so compare), else the file.
        let origin_of = |flag: &Option<String>, var: &'static str| match flag {
            Some(v) if std::env::var(var).ok().as_ref() == Some(v) => SecretOrigin::Env(var),
            Some(_) => SecretOrigin::Flag,
            None => cli
                .config
                .clone()
                .map_or(SecretOrigin::None, SecretOrigin::File),
        };
        let (secret, generated, origin) = match mode {
            AuthMode::None => (None, false, SecretOrigin::None),
            AuthMode::Password => match password.filter(|p| !p.is_empty()) {
                Some(p) => (Some(p), false, origin_of(&cli.password, "GATEWAY_PASSWORD")),
                None => {
                    return Err(SettingsError(
                        "--auth password needs a password (--password, GATEWAY_PASSWORD or auth.password)".into(),
                    ));
                }
            },
            AuthMode::Token => match token.filter(|t| !t.is_empty()) {
                Some(t) => (Some(t), false, origin_of(&cli.token, "GATEWAY_TOKEN")),
                None => {
                    let (t, created) = stored_token(&state_dir)?;
                    let path = state_dir.join(TOKEN_FILE);
                    let o = if created {
                        SecretOrigin::Generated(path)
                    } else {
                        SecretOrigin::StateDir(path)
                    };
                    (Some(t), created, o)
                }
            },
        };
        Ok(Settings {
            bind,
            port,
            auth: AuthSettings {
                mode,
                secret,
                generated,
                origin,
                max_failures_per_minute: file.auth.max_failures_per_minute.unwrap_or(10),
            },
            limits,
            state_dir,
            log_format: cli.log_format.or(file.logging.format).unwrap_or_default(),
            log_level: cli
                .log_level
                .clone()
                .or(file.logging.level.clone())
                .unwrap_or_else(|| "info".into()),
            source,
            initial,
        })
    }

    /// Handshake timeout.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.handshake_timeout_ms)
    }
}

/// The token stored in the state dir, created (mode 0600) when absent;
/// `true` when it was created now.
fn stored_token(state_dir: &Path) -> Result<(String, bool), SettingsError> {
    let path = state_dir.join(TOKEN_FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let t = text.trim();
        if !t.is_empty() {
            return Ok((t.to_string(), false));
        }
    }
    std::fs::create_dir_all(state_dir).map_err(|e| {
        SettingsError(format!(
            "cannot create state dir {}: {e}",
            state_dir.display()
        ))
    })?;
    let token = random_hex(24);
    write_private(&path, &token)
        .map_err(|e| SettingsError(format!("cannot write {}: {e}", path.display())))?;
    Ok((token, true))
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")
}

/// `n` random bytes as lowercase hex.
pub(crate) fn random_hex(n: usize) -> String {
    use rand::RngCore;
    use std::fmt::Write;
    let mut bytes = vec![0u8; n];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().fold(String::with_capacity(n * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(config: Option<PathBuf>, state: &Path) -> Cli {
        Cli {
            config,
            state_dir: Some(state.to_path_buf()),
            ..Cli::default()
        }
    }

    #[test]
    fn the_example_file_documents_valid_defaults() {
        let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("ws-proxy.example.toml");
        let tmp = tempfile::tempdir().unwrap();
        let mut c = cli(Some(example), tmp.path());
        c.token = Some("t".into());
        let s = Settings::resolve(&c).unwrap();
        assert_eq!(s.limits, Limits::default());
        assert_eq!(s.port, DEFAULT_PORT);
        assert_eq!(s.initial.restart, gateway_core::RestartConfig::default());
        assert_eq!(s.auth.max_failures_per_minute, 10);
        assert_eq!(s.initial.requests, gateway_core::RequestsConfig::default());
    }

    /// The fields of the table at `path` in a config file, as the parser
    /// itself lists them: a probe key there makes serde's
    /// `deny_unknown_fields` name every field it expects. `None` when the
    /// value at `path` is not a struct (a leaf, or a map of values).
    fn fields_at(path: &[String]) -> Option<Vec<String>> {
        let mut value = toml::Value::Table(toml::Table::from_iter([(
            "__probe".to_string(),
            toml::Value::Integer(1),
        )]));
        for key in path.iter().rev() {
            value = toml::Value::Table(toml::Table::from_iter([(key.clone(), value)]));
        }
        let origin = ConfigOrigin {
            path: "probe.toml".into(),
            text: toml::to_string(&value).unwrap().into(),
        };
        let message = gateway_core::parse_toml::<FileConfig>(&origin)
            .err()?
            .message;
        let expected = message
            .strip_prefix("unknown field `__probe`, ")?
            .split_once("expected")
            .map_or("", |(_, list)| list);
        Some(
            expected
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect(),
        )
    }

    /// Every key a config file accepts, dotted (`limits.max_payload`), with
    /// `<id>` where any name goes (`plugins.entries.<id>.env`). Derived from
    /// [`FileConfig`] through the parser, so a field added to any table
    /// shows up here without anyone listing it.
    fn accepted_keys() -> Vec<String> {
        fn walk(path: Vec<String>, out: &mut Vec<String>) {
            if let Some(fields) = fields_at(&path) {
                for f in fields {
                    walk([path.clone(), vec![f]].concat(), out);
                }
                return;
            }
            let mut entry = path.clone();
            entry.push("<id>".into());
            if fields_at(&entry).is_some() {
                walk(entry, out);
            } else {
                out.push(path.join("."));
            }
        }
        let mut out = Vec::new();
        walk(Vec::new(), &mut out);
        out
    }

    /// The example file with its commented-out keys and tables
    /// (`# token = "..."`, `# [plugins.entries.bncr]`) switched on.
    fn example_with_commented_keys() -> String {
        let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("ws-proxy.example.toml");
        let text = std::fs::read_to_string(example).unwrap();
        let is_key = |s: &str| {
            let key = s.split_once(" = ").map_or("", |(k, _)| k);
            !key.is_empty()
                && (key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    || (key.starts_with('"') && key.ends_with('"')))
        };
        let is_header = |s: &str| {
            s.starts_with('[')
                && s.ends_with(']')
                && s[1..s.len() - 1]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        };
        text.lines()
            .map(
                |line| match line.strip_prefix('#').map(|r| r.trim_start()) {
                    Some(rest) if is_key(rest) || is_header(rest) => rest,
                    _ => line,
                },
            )
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Dotted paths of every table and value in `table`.
    fn paths(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
        for (k, v) in table {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if let toml::Value::Table(t) = v {
                paths(&path, t, out);
            }
            out.push(path);
        }
    }

    #[test]
    fn every_accepted_key_is_in_the_example_and_in_operations_md() {
        let keys = accepted_keys();
        // The walk itself works: tables, a map of tables, leaves.
        for k in [
            "server.bind",
            "limits.allowed_origins",
            "plugins.node",
            "plugins.entries.<id>.env",
            "requests.method_timeout_ms",
        ] {
            assert!(keys.iter().any(|x| x == k), "{k} not derived: {keys:?}");
        }
        let example = example_with_commented_keys();
        // What the example shows, commented-out keys included, parses.
        let origin = ConfigOrigin {
            path: "ws-proxy.example.toml".into(),
            text: example.clone().into(),
        };
        if let Err(e) = gateway_core::parse_toml::<FileConfig>(&origin) {
            panic!("the example with its commented keys switched on: {e}");
        }
        let mut shown = Vec::new();
        paths("", &example.parse::<toml::Table>().unwrap(), &mut shown);
        let matches = |key: &str, path: &str| {
            let (k, p): (Vec<_>, Vec<_>) = (key.split('.').collect(), path.split('.').collect());
            k.len() == p.len() && k.iter().zip(&p).all(|(k, p)| *k == "<id>" || k == p)
        };
        let ops = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md"),
        )
        .unwrap();
        let missing_example: Vec<_> = keys
            .iter()
            .filter(|k| !shown.iter().any(|p| matches(k, p)))
            .collect();
        let missing_ops: Vec<_> = keys
            .iter()
            .filter(|k| !ops.contains(&format!("| `{k}")))
            .collect();
        assert!(
            missing_example.is_empty() && missing_ops.is_empty(),
            "keys the gateway accepts but ws-proxy.example.toml does not show: {missing_example:?}; \
             keys missing from the key table of docs/operations.md: {missing_ops:?}"
        );
    }

    #[test]
    fn reports_changed_process_settings_by_name_only() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("g.toml");
        let start = "[server]\nport = 0\n[auth]\nmode = \"token\"\ntoken = \"secret-one\"\n[limits]\nmax_in_flight = 4\n[restart]\ndrain_timeout_ms = 100\n";
        std::fs::write(&path, start).unwrap();
        let s = Settings::resolve(&cli(Some(path.clone()), tmp.path())).unwrap();
        assert!(s.source.pending_process_settings().is_empty());
        // Plugin and restart settings apply at restart: not pending.
        std::fs::write(&path, start.replace("= 100", "= 200")).unwrap();
        assert!(s.source.pending_process_settings().is_empty());
        // A changed value, a changed secret, an added and a removed key.
        let edited = "[server]\n[auth]\nmode = \"none\"\ntoken = \"secret-two\"\n[limits]\nmax_in_flight = 4\nmax_payload = 70000\n[logging]\nlevel = \"debug\"\n";
        std::fs::write(&path, edited).unwrap();
        let pending = s.source.pending_process_settings();
        assert_eq!(
            pending,
            [
                "auth.mode",
                "auth.token",
                "limits.max_payload",
                "logging.level",
                "server.port"
            ]
        );
        assert!(!pending.iter().any(|p| p.contains("secret")));
        // Back as it was: nothing pending.
        std::fs::write(&path, start).unwrap();
        assert!(s.source.pending_process_settings().is_empty());
        // A broken file reports nothing here (the restart reports the error).
        std::fs::write(&path, "[auth\n").unwrap();
        assert!(s.source.pending_process_settings().is_empty());
    }

    #[test]
    fn flags_win_over_the_file_and_plugin_dirs_add_up() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("g.toml");
        std::fs::write(
            &path,
            "[server]\nport = 1234\nbind = \"127.0.0.2\"\n[auth]\ntoken = \"file\"\n[plugins]\ndirs = [\"rel\"]\n",
        )
        .unwrap();
        let mut c = cli(Some(path), tmp.path());
        c.port = Some(4321);
        c.plugin_dirs = vec![PathBuf::from("/extra")];
        let s = Settings::resolve(&c).unwrap();
        assert_eq!(s.port, 4321);
        assert_eq!(s.bind.to_string(), "127.0.0.2");
        assert_eq!(s.auth.secret.as_deref(), Some("file"));
        assert_eq!(
            s.initial.plugins.dirs,
            vec![tmp.path().join("rel"), PathBuf::from("/extra")]
        );
        c.token = Some("flag".into());
        assert_eq!(
            Settings::resolve(&c).unwrap().auth.secret.as_deref(),
            Some("flag")
        );
    }

    #[test]
    fn unknown_restart_signals_are_config_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("g.toml");
        std::fs::write(&path, "[restart]\nsignals = [\"SIGUSR1\", \"SIGKILL\"]\n").unwrap();
        let e = Settings::resolve(&cli(Some(path), tmp.path())).unwrap_err();
        assert!(e.0.contains("restart.signals"), "{e}");
        assert!(e.0.contains("g.toml:2"), "{e}");
    }
}
