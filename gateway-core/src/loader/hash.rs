//! The content hash that identifies what a generation loaded: the plugin's
//! identity (manifest bytes, code hash, or built-in id and version) plus
//! its config. A restart reports a plugin as changed when its hash did.

use serde_json::Value;
use sha2::{Digest, Sha256};

pub(super) fn content_hash(identity: &[u8], config: &Value) -> String {
    let mut h = Sha256::new();
    h.update(identity);
    h.update(b"\0config\0");
    h.update(config.to_string().as_bytes());
    hex::encode(&h.finalize()[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_hash_changes_with_identity_and_config() {
        let a = content_hash(b"x", &serde_json::json!({}));
        assert_eq!(a, content_hash(b"x", &serde_json::json!({})));
        assert_ne!(a, content_hash(b"y", &serde_json::json!({})));
        assert_ne!(a, content_hash(b"x", &serde_json::json!({"k": 1})));
        assert_eq!(a.len(), 16);
    }
}
