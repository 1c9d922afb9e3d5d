//! The plugin's configuration and its JSON Schema.

use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

/// Who may reach the bridge in direct chats or groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Everybody.
    #[default]
    Open,
    /// Only the ids listed in `allowFrom` / `groupAllowFrom`.
    Allowlist,
    /// Nobody.
    Disabled,
}

/// The built-in echo responder.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct EchoConfig {
    /// Reply to every accepted inbound message through the outbox.
    pub enabled: bool,
    /// Text put before the echoed message.
    pub prefix: String,
}

impl Default for EchoConfig {
    fn default() -> Self {
        EchoConfig {
            enabled: false,
            prefix: "echo: ".into(),
        }
    }
}

/// The bncr plugin's configuration (camelCase keys in JSON).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Config {
    /// Policy for direct chats (`groupId == "0"`).
    pub dm_policy: Policy,
    /// Policy for group chats.
    pub group_policy: Policy,
    /// Allowed user ids for direct chats (`userId` or `platform:userId`).
    pub allow_from: Vec<String>,
    /// Allowed group ids (`groupId` or `platform:groupId`).
    pub group_allow_from: Vec<String>,
    /// Keep outbound messages queued until `bncr.ack ok`; when false a
    /// message is done once the client's connection accepted the push.
    pub outbound_require_ack: bool,
    /// Pushes of one message before it is dead-lettered.
    pub retry_limit: u32,
    /// First retry delay in milliseconds; doubles per attempt.
    pub retry_base_ms: u64,
    /// Largest retry delay in milliseconds.
    pub retry_cap_ms: u64,
    /// Messages in flight per account; 1 keeps strict order.
    pub window: usize,
    /// Known account ids; when set, other accounts are refused.
    pub accounts: Option<Vec<String>>,
    /// The echo responder.
    pub echo: EchoConfig,
    /// How long inbound dedupe keys and send idempotency keys are kept.
    pub dedupe_ttl_ms: u64,
    /// Largest file accepted or sent, in bytes.
    pub max_file_bytes: u64,
    /// How long a server-to-client file transfer waits for each `bncr.file.ack`.
    pub file_ack_timeout_ms: u64,
    /// Most accounts the bridge keeps when `accounts` is not configured;
    /// a request naming one more account is refused.
    pub max_accounts: usize,
    /// An account's lease whose connection has been gone this long is
    /// pruned (store row and memory).
    pub lease_ttl_ms: u64,
    /// Most client-to-gateway file transfers in progress, all accounts.
    pub max_transfers: usize,
    /// Most client-to-gateway file transfers in progress per account.
    pub max_transfers_per_account: usize,
    /// A client-to-gateway transfer with no init or chunk for this long is
    /// dropped with its spooled bytes.
    pub transfer_ttl_ms: u64,
    /// Smallest `chunkSize` a client may announce (a file smaller than
    /// this may come in one chunk).
    pub file_min_chunk_bytes: u64,
    /// Most chunks one client-to-gateway transfer may have.
    pub file_max_chunks: u64,
    /// A connection counts as an operator for inbound hand-on only once
    /// the host has had it open this long (across restarts), so a Bncr
    /// client has time to make itself known (by calling `bncr.connect`)
    /// before it could be taken for an operator.
    pub inbound_grace_ms: u64,
    /// How often inbound messages no operator has received yet are offered
    /// again (besides whenever an operator connects).
    pub inbound_retry_ms: u64,
    /// Most accepted inbound messages no operator has received yet; one
    /// more is answered `accepted: false, reason: "inbound-full"` and not
    /// journaled.
    pub max_inbound_pending: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            dm_policy: Policy::Open,
            group_policy: Policy::Open,
            allow_from: Vec::new(),
            group_allow_from: Vec::new(),
            outbound_require_ack: true,
            retry_limit: 10,
            retry_base_ms: 1000,
            retry_cap_ms: 60_000,
            window: 1,
            accounts: None,
            echo: EchoConfig::default(),
            dedupe_ttl_ms: 6 * 3600 * 1000,
            max_file_bytes: 50 * 1024 * 1024,
            file_ack_timeout_ms: 30_000,
            max_accounts: 64,
            lease_ttl_ms: 7 * 24 * 3600 * 1000,
            max_transfers: 16,
            max_transfers_per_account: 4,
            transfer_ttl_ms: 10 * 60 * 1000,
            file_min_chunk_bytes: 16 * 1024,
            file_max_chunks: 4096,
            inbound_grace_ms: 1000,
            inbound_retry_ms: 5000,
            max_inbound_pending: 1000,
        }
    }
}

impl Config {
    /// Parse the host-validated config; `{}` or `null` gives the defaults.
    pub fn from_value(value: &Value) -> Result<Config, String> {
        if value.is_null() {
            return Ok(Config::default());
        }
        let cfg: Config = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
        if cfg.window == 0 {
            return Err("window must be at least 1".into());
        }
        if cfg.retry_limit == 0 {
            return Err("retryLimit must be at least 1".into());
        }
        for (name, v) in [
            ("maxAccounts", cfg.max_accounts as u64),
            ("maxTransfers", cfg.max_transfers as u64),
            (
                "maxTransfersPerAccount",
                cfg.max_transfers_per_account as u64,
            ),
            ("fileMinChunkBytes", cfg.file_min_chunk_bytes),
            ("fileMaxChunks", cfg.file_max_chunks),
            ("inboundRetryMs", cfg.inbound_retry_ms),
            ("maxInboundPending", cfg.max_inbound_pending as u64),
        ] {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if cfg.file_min_chunk_bytes > crate::files::MAX_IN_CHUNK {
            return Err(format!(
                "fileMinChunkBytes must be at most {}",
                crate::files::MAX_IN_CHUNK
            ));
        }
        Ok(cfg)
    }

    /// Delay before the next push of a message already pushed `attempts` times.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let shift = attempts.saturating_sub(1).min(32);
        let ms = self
            .retry_base_ms
            .saturating_mul(1u64 << shift)
            .min(self.retry_cap_ms.max(1));
        Duration::from_millis(ms.max(1))
    }
}

/// The JSON Schema the host validates the config against.
pub fn schema() -> Value {
    let policy =
        json!({"type": "string", "enum": ["open", "allowlist", "disabled"], "default": "open"});
    let ids = json!({"type": "array", "items": {"type": "string"}, "default": []});
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "bncr plugin config",
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "dmPolicy": policy,
            "groupPolicy": policy,
            "allowFrom": ids,
            "groupAllowFrom": ids,
            "outboundRequireAck": {"type": "boolean", "default": true},
            "retryLimit": {"type": "integer", "minimum": 1, "default": 10},
            "retryBaseMs": {"type": "integer", "minimum": 1, "default": 1000},
            "retryCapMs": {"type": "integer", "minimum": 1, "default": 60000},
            "window": {"type": "integer", "minimum": 1, "default": 1},
            "accounts": {"type": "array", "items": {"type": "string", "minLength": 1}},
            "echo": {
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "enabled": {"type": "boolean", "default": false},
                    "prefix": {"type": "string", "default": "echo: "}
                }
            },
            "dedupeTtlMs": {"type": "integer", "minimum": 1000, "default": 21600000},
            "maxFileBytes": {"type": "integer", "minimum": 1, "maximum": 52428800, "default": 52428800},
            "fileAckTimeoutMs": {"type": "integer", "minimum": 1, "default": 30000},
            "maxAccounts": {"type": "integer", "minimum": 1, "default": 64},
            "leaseTtlMs": {"type": "integer", "minimum": 1, "default": 604800000u64},
            "maxTransfers": {"type": "integer", "minimum": 1, "default": 16},
            "maxTransfersPerAccount": {"type": "integer", "minimum": 1, "default": 4},
            "transferTtlMs": {"type": "integer", "minimum": 1, "default": 600000},
            "fileMinChunkBytes": {"type": "integer", "minimum": 1, "maximum": 4194304, "default": 16384},
            "fileMaxChunks": {"type": "integer", "minimum": 1, "default": 4096},
            "inboundGraceMs": {"type": "integer", "minimum": 0, "default": 1000},
            "inboundRetryMs": {"type": "integer", "minimum": 1, "default": 5000},
            "maxInboundPending": {"type": "integer", "minimum": 1, "default": 1000}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_backoff() {
        let c = Config::from_value(&json!({})).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.backoff(1), Duration::from_secs(1));
        assert_eq!(c.backoff(3), Duration::from_secs(4));
        assert_eq!(c.backoff(30), Duration::from_secs(60));
        assert!(Config::from_value(&json!({"bogus": 1})).is_err());
        assert!(Config::from_value(&json!({"window": 0})).is_err());
        let c = Config::from_value(&json!({"dmPolicy": "allowlist", "echo": {"enabled": true}}))
            .unwrap();
        assert_eq!(c.dm_policy, Policy::Allowlist);
        assert!(c.echo.enabled);
    }

    #[test]
    fn schema_defaults_are_the_config_defaults() {
        let schema = schema();
        let mut obj = serde_json::Map::new();
        for (k, v) in schema["properties"].as_object().unwrap() {
            if let Some(d) = v.get("default") {
                obj.insert(k.clone(), d.clone());
            }
        }
        obj.insert("echo".into(), json!({"enabled": false, "prefix": "echo: "}));
        assert_eq!(
            Config::from_value(&Value::Object(obj)).unwrap(),
            Config::default()
        );
    }
}
