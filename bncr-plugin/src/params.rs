//! Request parameter shapes. Known fields are typed strictly; unknown fields
//! are ignored so newer clients keep working.

use plugin_api::RpcError;
use serde::{Deserialize, Deserializer};

/// An id the Node.js client may send as a string or as an integer (QQ and
/// WeChat ids are often numeric). Anything else is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct IdStr(pub(crate) String);

impl<'de> Deserialize<'de> for IdStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            I(i64),
            U(u64),
        }
        match Raw::deserialize(d) {
            Ok(Raw::S(s)) => Ok(IdStr(s)),
            Ok(Raw::I(i)) => Ok(IdStr(i.to_string())),
            Ok(Raw::U(u)) => Ok(IdStr(u.to_string())),
            Err(_) => Err(serde::de::Error::custom(
                "expected a string or an integer id",
            )),
        }
    }
}

/// Optional id, trimmed; empty counts as absent.
pub(crate) fn id_opt(v: &Option<IdStr>) -> Option<String> {
    v.as_ref()
        .map(|s| s.0.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Fields every `bncr.*` method may carry.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Common {
    pub(crate) account_id: Option<String>,
    pub(crate) client_id: Option<String>,
    pub(crate) lease_id: Option<String>,
    pub(crate) connection_epoch: Option<u64>,
}

/// `bncr.inbound`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Inbound {
    #[serde(flatten)]
    pub(crate) common: Common,
    pub(crate) platform: Option<String>,
    pub(crate) group_id: Option<IdStr>,
    pub(crate) user_id: Option<IdStr>,
    pub(crate) msg: Option<String>,
    #[serde(default, rename = "type")]
    pub(crate) kind: Option<String>,
    pub(crate) msg_id: Option<IdStr>,
    pub(crate) base64: Option<String>,
    pub(crate) path: Option<String>,
    pub(crate) mime_type: Option<String>,
    pub(crate) file_name: Option<String>,
    pub(crate) session_key: Option<String>,
}

/// `bncr.ack`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Ack {
    pub(crate) message_id: Option<String>,
    pub(crate) ok: Option<bool>,
    pub(crate) fatal: Option<bool>,
    pub(crate) error: Option<String>,
}

/// `bncr.file.init`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FileInit {
    #[serde(flatten)]
    pub(crate) common: Common,
    pub(crate) transfer_id: Option<String>,
    pub(crate) session_key: Option<String>,
    pub(crate) file_name: Option<String>,
    pub(crate) mime_type: Option<String>,
    pub(crate) file_size: Option<u64>,
    pub(crate) chunk_size: Option<u64>,
    pub(crate) total_chunks: Option<u64>,
    pub(crate) file_sha256: Option<String>,
    pub(crate) platform: Option<String>,
    pub(crate) group_id: Option<IdStr>,
    pub(crate) user_id: Option<IdStr>,
}

/// `bncr.file.chunk`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FileChunk {
    pub(crate) transfer_id: Option<String>,
    pub(crate) chunk_index: Option<u64>,
    pub(crate) offset: Option<u64>,
    pub(crate) size: Option<u64>,
    pub(crate) chunk_sha256: Option<String>,
    pub(crate) base64: Option<String>,
}

/// `bncr.file.complete` and `bncr.file.abort`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FileEnd {
    pub(crate) transfer_id: Option<String>,
    pub(crate) reason: Option<String>,
}

/// `bncr.file.ack`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FileAck {
    pub(crate) transfer_id: Option<String>,
    pub(crate) stage: Option<String>,
    pub(crate) chunk_index: Option<u64>,
    pub(crate) ok: Option<bool>,
    pub(crate) error_code: Option<String>,
    pub(crate) error_message: Option<String>,
    pub(crate) path: Option<String>,
}

/// `bncr.deadLetter.inspect` and `bncr.deadLetter.prune`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DeadLetter {
    pub(crate) account_id: Option<String>,
    pub(crate) reason: Option<String>,
    /// Age in milliseconds: entries dead-lettered longer ago than this.
    pub(crate) older_than: Option<u64>,
    pub(crate) limit: Option<u64>,
    pub(crate) offset: Option<u64>,
    pub(crate) dry_run: Option<bool>,
}

/// A required, non-empty string param.
pub(crate) fn required(v: Option<String>, name: &str) -> Result<String, RpcError> {
    v.map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| RpcError::invalid_request(format!("{name} required")))
}
