//! Wire frames of protocol v4: requests in, responses and events out.
//!
//! Params stay raw JSON until a handler parses them; responses are written
//! straight into a `String` without building an intermediate tree.

use plugin_api::{ClientInfo, MethodResult, Role, RpcError};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt::Write as _;

/// The protocol version we speak natively.
pub const PROTOCOL_VERSION: u32 = 4;
/// The older version we also answer (older Bncr clients); frames are the same.
pub const PROTOCOL_COMPAT: u32 = 3;

/// A request frame: `{"type":"req","id":string,"method":string,"params"?:any}`.
#[derive(Debug, Clone)]
pub struct RequestFrame<'a> {
    /// Request id, echoed in the response.
    pub id: Cow<'a, str>,
    /// Method name.
    pub method: Cow<'a, str>,
    /// Raw params, if any (JSON `null` counts as none).
    pub params: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireRequest<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    method: Cow<'a, str>,
    #[serde(borrow, default)]
    params: Option<&'a RawValue>,
}

/// A frame that is not a valid request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    /// The frame's `id`, when one could be read: an error response is owed.
    pub id: Option<String>,
    /// What was wrong, for the error message.
    pub reason: String,
}

impl FrameError {
    /// The error to answer with: `INVALID_REQUEST invalid request frame: ...`.
    pub fn to_rpc_error(&self) -> RpcError {
        RpcError::invalid_request(format!("invalid request frame: {}", self.reason))
    }
}

/// Parse one text frame as a request.
pub fn parse_request(text: &str) -> Result<RequestFrame<'_>, FrameError> {
    // serde reads a struct from an array of its fields too; a frame is an
    // object (`["req","1","health"]` is not a request; found by fuzzing).
    if !text
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
    {
        return Err(diagnose(
            text,
            serde::de::Error::custom("frame must be a JSON object"),
        ));
    }
    match serde_json::from_str::<WireRequest<'_>>(text) {
        Ok(w) if w.kind == "req" && !w.id.is_empty() && !w.method.is_empty() => Ok(RequestFrame {
            id: w.id,
            method: w.method,
            params: w.params,
        }),
        Ok(w) => {
            let reason = if w.kind != "req" {
                format!("type must be \"req\", got {:?}", w.kind)
            } else if w.id.is_empty() {
                "id must be a non-empty string".to_string()
            } else {
                "method must be a non-empty string".to_string()
            };
            let id = (!w.id.is_empty()).then(|| w.id.into_owned());
            Err(FrameError { id, reason })
        }
        Err(e) => Err(diagnose(text, e)),
    }
}

/// Work out what was wrong with a frame that failed the fast parse, and
/// whether it carried a usable id.
fn diagnose(text: &str, err: serde_json::Error) -> FrameError {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
        return FrameError {
            id: None,
            reason: format!("malformed JSON: {err}"),
        };
    };
    let Some(obj) = value.as_object() else {
        return FrameError {
            id: None,
            reason: "frame must be a JSON object".into(),
        };
    };
    let id = obj
        .get("id")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    let reason = match (obj.get("type"), obj.get("id"), obj.get("method")) {
        (Some(t), _, _) if t != "req" => format!("type must be \"req\", got {t}"),
        (None, _, _) => "missing field `type`".to_string(),
        (_, Some(i), _) if !i.is_string() => "id must be a non-empty string".to_string(),
        (_, None, _) => "missing field `id`".to_string(),
        (_, _, Some(m)) if !m.is_string() => "method must be a non-empty string".to_string(),
        (_, _, None) => "missing field `method`".to_string(),
        _ => err.to_string(),
    };
    FrameError { id, reason }
}

fn push_json_str(out: &mut String, s: &str) {
    // Serializing a str into a String cannot fail.
    let escaped = serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    out.push_str(&escaped);
}

/// Encode a response frame for `id` from a method result.
pub fn encode_response(id: &str, result: &MethodResult) -> String {
    let mut out = String::with_capacity(64);
    out.push_str(r#"{"type":"res","id":"#);
    push_json_str(&mut out, id);
    match result {
        Ok(payload) => {
            out.push_str(r#","ok":true,"payload":"#);
            out.push_str(&serde_json::to_string(payload).unwrap_or_else(|_| "null".into()));
        }
        Err(err) => {
            out.push_str(r#","ok":false,"error":"#);
            out.push_str(&serde_json::to_string(err).unwrap_or_else(|_| "null".into()));
        }
    }
    out.push('}');
    out
}

/// Encode an event frame. `seq` counts events per connection from 1.
pub fn encode_event(event: &str, payload: Option<&RawValue>, seq: Option<u64>) -> String {
    let mut out = String::with_capacity(64);
    out.push_str(r#"{"type":"event","event":"#);
    push_json_str(&mut out, event);
    if let Some(p) = payload {
        out.push_str(r#","payload":"#);
        out.push_str(p.get());
    }
    if let Some(seq) = seq {
        let _ = write!(out, r#","seq":{seq}"#);
    }
    out.push('}');
    out
}

/// Credentials offered at `connect`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct ConnectAuth {
    /// Shared token.
    #[serde(default)]
    pub token: Option<String>,
    /// Shared password.
    #[serde(default)]
    pub password: Option<String>,
}

/// Params of the `connect` request. Strict on the types of known fields
/// (objects must be JSON objects, never arrays read field by field), lenient
/// on unknown ones (newer clients send more).
#[derive(Debug, Clone)]
pub struct ConnectParams {
    /// Lowest protocol the client speaks.
    pub min_protocol: u32,
    /// Highest protocol the client speaks.
    pub max_protocol: u32,
    /// The client's self-description.
    pub client: ClientInfo,
    /// Requested role; `operator` by default.
    pub role: Option<Role>,
    /// Requested scopes.
    pub scopes: Option<Vec<String>>,
    /// Credentials.
    pub auth: Option<ConnectAuth>,
}

/// The wire shape of [`ConnectParams`].
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConnectParamsObject {
    min_protocol: u32,
    max_protocol: u32,
    #[serde(deserialize_with = "crate::strict::object_only")]
    client: ClientInfo,
    #[serde(default, deserialize_with = "optional_role")]
    role: Option<Role>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default, deserialize_with = "crate::strict::optional_object_only")]
    auth: Option<ConnectAuth>,
}

impl<'de> Deserialize<'de> for ConnectParams {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let p: ConnectParamsObject = crate::strict::object_only(d)?;
        Ok(ConnectParams {
            min_protocol: p.min_protocol,
            max_protocol: p.max_protocol,
            client: p.client,
            role: p.role,
            scopes: p.scopes,
            auth: p.auth,
        })
    }
}

/// The role, only as the string `operator` or `node` (serde would also take
/// an enum written as `{"node": null}`).
fn optional_role<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Role>, D::Error> {
    match Option::<String>::deserialize(d)?.as_deref() {
        None => Ok(None),
        Some("operator") => Ok(Some(Role::Operator)),
        Some("node") => Ok(Some(Role::Node)),
        Some(other) => Err(serde::de::Error::unknown_variant(
            other,
            &["operator", "node"],
        )),
    }
}

impl ConnectParams {
    /// The protocol version to answer with, if the client's range allows one.
    pub fn negotiate(&self) -> Option<u32> {
        [PROTOCOL_VERSION, PROTOCOL_COMPAT]
            .into_iter()
            .find(|v| (self.min_protocol..=self.max_protocol).contains(v))
    }
}

/// What a connection is told it may call and hear; read from the registry
/// that dispatches.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Features {
    /// Advertised methods.
    pub methods: std::sync::Arc<[String]>,
    /// Advertised events.
    pub events: std::sync::Arc<[String]>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_requests_and_keeps_params_raw() {
        let f =
            parse_request(r#"{"type":"req","id":"1","method":"health","params":{"a": [1, 2]}}"#)
                .unwrap();
        assert_eq!(f.id, "1");
        assert_eq!(f.method, "health");
        assert_eq!(f.params.unwrap().get(), r#"{"a": [1, 2]}"#);
        let f = parse_request(r#"{"type":"req","id":"2","method":"x","params":null}"#).unwrap();
        assert!(f.params.is_none());
        let f = parse_request(r#"{"id":"a\"b","method":"m","type":"req","extra":1}"#).unwrap();
        assert_eq!(f.id, "a\"b");
    }

    #[test]
    fn diagnoses_bad_frames() {
        let cases: &[(&str, Option<&str>, &str)] = &[
            ("not json", None, "malformed JSON"),
            ("[1,2]", None, "must be a JSON object"),
            (r#"["req","1","health"]"#, None, "must be a JSON object"),
            (r#" ["x","event","m"]"#, None, "must be a JSON object"),
            (
                r#"{"type":"res","id":"7","method":"m"}"#,
                Some("7"),
                "type must be",
            ),
            (
                r#"{"type":"req","id":"7"}"#,
                Some("7"),
                "missing field `method`",
            ),
            (r#"{"type":"req","method":"m"}"#, None, "missing field `id`"),
            (r#"{"type":"req","id":5,"method":"m"}"#, None, "id must be"),
            (r#"{"type":"req","id":"","method":"m"}"#, None, "id must be"),
            (
                r#"{"type":"req","id":"8","method":""}"#,
                Some("8"),
                "method must be",
            ),
            (
                r#"{"type":"req","id":"9","method":3}"#,
                Some("9"),
                "method must be",
            ),
        ];
        for (text, id, reason) in cases {
            let e = parse_request(text).unwrap_err();
            assert_eq!(e.id.as_deref(), *id, "{text}");
            assert!(e.reason.contains(reason), "{text}: {}", e.reason);
            assert!(
                e.to_rpc_error()
                    .message
                    .starts_with("invalid request frame: ")
            );
        }
    }

    #[test]
    fn encodes_responses_and_events() {
        let ok = encode_response("i\"d", &Ok(json!({"ok": true})));
        let v: serde_json::Value = serde_json::from_str(&ok).unwrap();
        assert_eq!(
            v,
            json!({"type":"res","id":"i\"d","ok":true,"payload":{"ok":true}})
        );
        let err = encode_response("2", &Err(RpcError::invalid_request("unknown method: x")));
        let v: serde_json::Value = serde_json::from_str(&err).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"]["code"], "INVALID_REQUEST");
        let raw = serde_json::value::to_raw_value(&json!({"ts": 1})).unwrap();
        let ev = encode_event("tick", Some(&raw), Some(3));
        let v: serde_json::Value = serde_json::from_str(&ev).unwrap();
        assert_eq!(
            v,
            json!({"type":"event","event":"tick","payload":{"ts":1},"seq":3})
        );
    }

    #[test]
    fn negotiates_protocol() {
        let p = |min, max| ConnectParams {
            min_protocol: min,
            max_protocol: max,
            client: ClientInfo::default(),
            role: None,
            scopes: None,
            auth: None,
        };
        assert_eq!(p(4, 4).negotiate(), Some(4));
        assert_eq!(p(1, 9).negotiate(), Some(4));
        assert_eq!(p(3, 3).negotiate(), Some(3));
        assert_eq!(p(5, 6).negotiate(), None);
        assert_eq!(p(1, 2).negotiate(), None);
    }

    #[test]
    fn connect_params_from_the_openclaw_cli() {
        let text = r#"{"minProtocol":4,"maxProtocol":4,"client":{"id":"cli","version":"2026.9.6",
            "platform":"linux","deviceFamily":"Linux","mode":"cli","instanceId":"x"},
            "caps":[],"auth":{"token":"t"},"role":"operator","scopes":["operator.read"]}"#;
        let p: ConnectParams = serde_json::from_str(text).unwrap();
        assert_eq!(p.client.id, "cli");
        assert_eq!(p.auth.unwrap().token.as_deref(), Some("t"));
        assert_eq!(p.role, Some(Role::Operator));
        assert!(serde_json::from_str::<ConnectParams>(r#"{"minProtocol":"4"}"#).is_err());
    }

    #[test]
    fn connect_params_take_objects_not_arrays() {
        let client = r#"{"id":"c","version":"1","platform":"p","mode":"m"}"#;
        let ok = format!(
            r#"{{"minProtocol":4,"maxProtocol":4,"client":{client},"auth":null,"role":null}}"#
        );
        assert!(serde_json::from_str::<ConnectParams>(&ok).is_ok());
        for bad in [
            format!(r#"[4,4,{client}]"#),
            r#"{"minProtocol":4,"maxProtocol":4,"client":["c","1","p","m"]}"#.to_string(),
            format!(r#"{{"minProtocol":4,"maxProtocol":4,"client":{client},"auth":["secret"]}}"#),
            format!(
                r#"{{"minProtocol":4,"maxProtocol":4,"client":{client},"role":{{"node":null}}}}"#
            ),
            format!(r#"{{"minProtocol":4,"maxProtocol":4,"client":{client},"role":"admin"}}"#),
        ] {
            assert!(
                serde_json::from_str::<ConnectParams>(&bad).is_err(),
                "{bad}"
            );
        }
    }
}
