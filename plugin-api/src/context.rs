//! Who is asking: connection identity, role, granted scopes, client info, params.

use crate::RpcError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use std::fmt;
use std::sync::Arc;

/// A client connection's id. Connections outlive restarts, so ids do too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn-{}", self.0)
    }
}

/// The role a connection declared at `connect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A person or program operating the gateway (CLI, Control UI, chat bridges).
    #[default]
    Operator,
    /// A device node; it may call only methods declared for nodes.
    Node,
}

impl Role {
    /// The role as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Node => "node",
        }
    }
}

/// Well-known operator scopes.
pub mod scope {
    /// Read-only methods.
    pub const READ: &str = "operator.read";
    /// Methods that change state; implies [`READ`].
    pub const WRITE: &str = "operator.write";
    /// Everything under `operator.*`.
    pub const ADMIN: &str = "operator.admin";
    /// Device pairing.
    pub const PAIRING: &str = "operator.pairing";
    /// Exec approvals.
    pub const APPROVALS: &str = "operator.approvals";
}

/// The scopes granted to a connection.
///
/// `operator.admin` implies every `operator.*` scope and `operator.write`
/// implies `operator.read`; everything else must match exactly.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Scopes(Vec<String>);

impl Scopes {
    /// Scopes exactly as granted, duplicates removed, order kept.
    pub fn new<I, S>(scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut out: Vec<String> = Vec::new();
        for s in scopes {
            let s = s.into();
            if !out.contains(&s) {
                out.push(s);
            }
        }
        Scopes(out)
    }

    /// Whether a method that needs `required` may be called.
    pub fn allows(&self, required: &str) -> bool {
        self.0.iter().any(|held| {
            held == required
                || (held == scope::ADMIN && required.starts_with("operator."))
                || (held == scope::WRITE && required == scope::READ)
        })
    }

    /// The granted scope names.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }
}

/// What the client said about itself at `connect`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientInfo {
    /// Client kind, e.g. `cli`, `control-ui`, `bncr`.
    pub id: String,
    /// Client version.
    pub version: String,
    /// OS or runtime platform.
    pub platform: String,
    /// Client mode, e.g. `cli`, `ui`, `backend`.
    pub mode: String,
    /// Optional display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Optional instance id, stable across reconnects of one client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
}

/// Everything the host knows about an authenticated connection.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionInfo {
    /// The connection's id.
    pub conn_id: ConnId,
    /// Declared role.
    pub role: Role,
    /// Granted scopes.
    pub scopes: Scopes,
    /// Client self-description.
    pub client: ClientInfo,
}

/// The context a method handler runs in. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RequestContext {
    conn: Arc<ConnectionInfo>,
}

impl RequestContext {
    /// A context for requests arriving on `conn`
    /// ([`crate::host::request_context`]).
    pub(crate) fn new(conn: Arc<ConnectionInfo>) -> Self {
        RequestContext { conn }
    }

    /// The calling connection's id.
    pub fn conn_id(&self) -> ConnId {
        self.conn.conn_id
    }

    /// The calling connection's role.
    pub fn role(&self) -> Role {
        self.conn.role
    }

    /// The calling connection's scopes.
    pub fn scopes(&self) -> &Scopes {
        &self.conn.scopes
    }

    /// The calling client's self-description.
    pub fn client(&self) -> &ClientInfo {
        &self.conn.client
    }

    /// The whole connection record.
    pub fn connection(&self) -> &Arc<ConnectionInfo> {
        &self.conn
    }
}

/// A request's params, kept as raw JSON until a handler asks for them.
#[derive(Debug, Clone, Default)]
pub struct Params(Option<Box<RawValue>>);

impl Params {
    /// No params were sent.
    pub fn none() -> Self {
        Params(None)
    }

    /// Params from raw JSON text already validated as JSON.
    pub fn from_raw(raw: Box<RawValue>) -> Self {
        Params(Some(raw))
    }

    /// Params from a JSON value.
    pub fn from_value(value: &Value) -> Self {
        Params(serde_json::value::to_raw_value(value).ok())
    }

    /// The raw JSON, if any was sent.
    pub fn raw(&self) -> Option<&RawValue> {
        self.0.as_deref()
    }

    /// Deserialize into `T`. Absent or `null` params parse as `{}`, so a
    /// struct whose fields are all optional accepts a bare request. Errors are
    /// `INVALID_REQUEST` with serde's description of what was wrong.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, RpcError> {
        let text = match self.0.as_deref().map(RawValue::get) {
            None | Some("null") => "{}",
            Some(t) => t,
        };
        serde_json::from_str(text).map_err(RpcError::invalid_params)
    }

    /// The params as a JSON value (`null` when absent).
    pub fn to_value(&self) -> Value {
        self.0
            .as_deref()
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
            .unwrap_or(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_implications() {
        let admin = Scopes::new([scope::ADMIN]);
        assert!(admin.allows(scope::READ));
        assert!(admin.allows("operator.talk.secrets"));
        assert!(!admin.allows("node.invoke"));
        let write = Scopes::new([scope::WRITE]);
        assert!(write.allows(scope::READ));
        assert!(!write.allows(scope::ADMIN));
        let read = Scopes::new([scope::READ, scope::READ]);
        assert_eq!(read.as_slice().len(), 1);
        assert!(!read.allows(scope::WRITE));
        assert!(!Scopes::default().allows(scope::READ));
    }

    #[derive(Deserialize, Debug)]
    struct P {
        #[serde(default)]
        a: Option<u32>,
    }

    #[test]
    fn params_parse_and_errors() {
        assert_eq!(Params::none().parse::<P>().unwrap().a, None);
        let p = Params::from_value(&serde_json::json!({"a": 3}));
        assert_eq!(p.parse::<P>().unwrap().a, Some(3));
        let bad = Params::from_value(&serde_json::json!({"a": "x"}));
        let err = bad.parse::<P>().unwrap_err();
        assert_eq!(err.code, crate::ErrorCode::InvalidRequest);
        assert!(
            err.message.starts_with("invalid params:"),
            "{}",
            err.message
        );
    }
}
