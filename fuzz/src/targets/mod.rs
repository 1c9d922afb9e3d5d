//! The fuzz targets, one per parser a peer or an operator can feed.

use crate::engine::Target;
use std::hash::{Hash, Hasher};

mod bncr;
mod connect;
mod frame;
mod gateway_config;
mod manifest;
mod ws_proxy_config;

/// Every target, in the order `cargo xtask fuzz` runs them.
pub fn all() -> Vec<Target> {
    vec![
        frame::target(),
        connect::target(),
        bncr::target(),
        gateway_config::target(),
        ws_proxy_config::target(),
        manifest::target(),
    ]
}

/// The target called `name`.
pub fn by_name(name: &str) -> Option<Target> {
    all().into_iter().find(|t| t.name == name)
}

/// An outcome signature from its parts.
pub(crate) fn signature<T: Hash>(parts: T) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

/// The class of an error message, without the values in it: the text
/// before the first `: ` (cut at the first quote or digit), plus serde's
/// kind of failure when one follows. Messages that differ only in the
/// offending value share a class, so the corpus does not fill up with them.
pub(crate) fn message_class(message: &str) -> String {
    const SERDE_KINDS: &[&str] = &[
        "missing field",
        "invalid type",
        "invalid value",
        "invalid length",
        "unknown field",
        "unknown variant",
        "duplicate field",
        "expected",
        "EOF",
        "trailing",
        "recursion limit",
        "number out of range",
        "control character",
        "invalid escape",
        "lone leading surrogate",
    ];
    let (head, tail) = message.split_once(": ").unwrap_or((message, ""));
    let head: String = head
        .split(|c: char| c == '`' || c == '"' || c == '\'' || c.is_ascii_digit())
        .next()
        .unwrap_or_default()
        .chars()
        .take(48)
        .collect();
    let kind = SERDE_KINDS
        .iter()
        .find(|k| tail.starts_with(*k) || tail.contains(&format!(": {k}")))
        .copied()
        .unwrap_or("");
    format!("{head}|{kind}")
}

/// Whether a JSON document has an object with the same key twice (serde
/// refuses those for structs on purpose, while `serde_json::Value` keeps the
/// last one, so oracles built on `Value` must know).
pub(crate) fn has_duplicate_keys(input: &[u8]) -> bool {
    use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

    struct Dup(bool);
    struct DupVisitor;

    impl<'de> Deserialize<'de> for Dup {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(DupVisitor)
        }
    }

    impl<'de> Visitor<'de> for DupVisitor {
        type Value = Dup;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<Dup, E> {
            Ok(Dup(false))
        }
        fn visit_i64<E>(self, _: i64) -> Result<Dup, E> {
            Ok(Dup(false))
        }
        fn visit_u64<E>(self, _: u64) -> Result<Dup, E> {
            Ok(Dup(false))
        }
        fn visit_f64<E>(self, _: f64) -> Result<Dup, E> {
            Ok(Dup(false))
        }
        fn visit_str<E>(self, _: &str) -> Result<Dup, E> {
            Ok(Dup(false))
        }
        fn visit_unit<E>(self) -> Result<Dup, E> {
            Ok(Dup(false))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Dup, A::Error> {
            let mut dup = false;
            while let Some(Dup(d)) = seq.next_element()? {
                dup |= d;
            }
            Ok(Dup(dup))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Dup, A::Error> {
            let mut keys = std::collections::HashSet::new();
            let mut dup = false;
            while let Some(k) = map.next_key::<String>()? {
                dup |= !keys.insert(k);
                let Dup(d) = map.next_value()?;
                dup |= d;
            }
            Ok(Dup(dup))
        }
    }

    serde_json::from_slice::<Dup>(input).is_ok_and(|Dup(d)| d)
}
