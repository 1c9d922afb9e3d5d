//! Errors as they travel on the wire.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// The protocol's error codes. Clients branch on these (and on `details.code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// Malformed frame, unknown method, bad params, failed handshake.
    InvalidRequest,
    /// The connection lacks a scope or role the method needs.
    Forbidden,
    /// The server cannot answer now (restarting, busy, plugin failed or panicked).
    Unavailable,
    /// The device is not paired.
    NotPaired,
    /// Reserved by the protocol.
    AgentTimeout,
    /// Reserved by the protocol.
    ApprovalNotFound,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::NotPaired => "NOT_PAIRED",
            ErrorCode::AgentTimeout => "AGENT_TIMEOUT",
            ErrorCode::ApprovalNotFound => "APPROVAL_NOT_FOUND",
        }
    }
}

/// An error answer: `{"code","message","details"?,"retryable"?,"retryAfterMs"?}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcError {
    /// Machine-readable class of the failure.
    pub code: ErrorCode,
    /// Human-readable text; clients must not parse it.
    pub message: String,
    /// Structured detail, conventionally an object with a `code` field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
    /// Whether the same request may succeed if sent again later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
    /// A hint for when to retry.
    #[serde(
        default,
        rename = "retryAfterMs",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry_after_ms: Option<u64>,
}

impl RpcError {
    /// An error with a code and a message and nothing else.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
            details: None,
            retryable: None,
            retry_after_ms: None,
        }
    }

    /// `INVALID_REQUEST` with the given message.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }

    /// `INVALID_REQUEST` for params that do not fit the method.
    pub fn invalid_params(message: impl fmt::Display) -> Self {
        Self::new(
            ErrorCode::InvalidRequest,
            format!("invalid params: {message}"),
        )
    }

    /// `FORBIDDEN` with the given message.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    /// `UNAVAILABLE` with the given message.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }

    /// The retryable `UNAVAILABLE` a request gets when its generation retires
    /// before it completes.
    pub fn restarting() -> Self {
        Self::unavailable("gateway is restarting; retry the request")
            .with_details(serde_json::json!({ "reason": "gateway-restarting" }))
            .retryable_after(None)
    }

    /// Attach structured details.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// Mark retryable, with an optional hint in milliseconds.
    pub fn retryable_after(mut self, retry_after_ms: Option<u64>) -> Self {
        self.retryable = Some(true);
        self.retry_after_ms = retry_after_ms;
        self
    }

    /// `details.code` if present.
    pub fn details_code(&self) -> Option<&str> {
        self.details.as_ref()?.get("code")?.as_str()
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for RpcError {}

/// A plugin could not be constructed or registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginError(pub String);

impl PluginError {
    /// Wrap any displayable error.
    pub fn new(message: impl fmt::Display) -> Self {
        PluginError(message.to_string())
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PluginError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_with_protocol_field_names() {
        let e = RpcError::unavailable("busy").retryable_after(Some(250));
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"code":"UNAVAILABLE","message":"busy","retryable":true,"retryAfterMs":250})
        );
        let back: RpcError = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn restarting_is_retryable_with_reason() {
        let e = RpcError::restarting();
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert_eq!(e.retryable, Some(true));
        assert_eq!(e.details.unwrap()["reason"], "gateway-restarting");
    }
}
