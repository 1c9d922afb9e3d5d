//! The Origin check on WebSocket upgrades: browsers may connect from an
//! allowed origin or from the gateway's own (by address or `localhost`).

use hyper::HeaderMap;
use hyper::header;
use std::net::IpAddr;

/// `scheme://host[:port]`, lower-cased, default port dropped; `None` when
/// `s` is not an http(s) origin.
pub(crate) fn normalize_origin(s: &str) -> Option<String> {
    let s = s.trim().trim_end_matches('/');
    let (scheme, rest) = s.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return None,
    };
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return None;
    }
    let rest = rest.to_ascii_lowercase();
    let host = rest.strip_suffix(default_port).unwrap_or(&rest);
    Some(format!("{scheme}://{host}"))
}

/// Whether `host` (a Host header: name or address, optional port) names
/// this machine by address or as `localhost`, so that no DNS answer can
/// point it elsewhere.
fn is_literal_local_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    name.eq_ignore_ascii_case("localhost")
        || name.to_ascii_lowercase().ends_with(".localhost")
        || name.parse::<IpAddr>().is_ok()
}

/// Whether a WebSocket upgrade with these headers may proceed: no `Origin`
/// (not a browser), an origin in `allowed`, or the gateway's own origin
/// (`http(s)://` + the Host header, when Host is an address or localhost:
/// a name could be rebound by DNS to this machine).
pub(crate) fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Some(origin) = origin.to_str().ok().and_then(normalize_origin) else {
        return false;
    };
    if allowed
        .iter()
        .any(|a| normalize_origin(a).as_deref() == Some(origin.as_str()))
    {
        return true;
    }
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    is_literal_local_host(host)
        && ["http", "https"].iter().any(|scheme| {
            normalize_origin(&format!("{scheme}://{host}")).as_deref() == Some(&origin)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked_against_the_host_and_the_allow_list() {
        let h = |origin: Option<&str>, host: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::HOST, host.parse().unwrap());
            if let Some(o) = origin {
                m.insert(header::ORIGIN, o.parse().unwrap());
            }
            m
        };
        let allow = vec!["https://Control.Example.com:443".to_string()];
        assert!(origin_allowed(&h(None, "127.0.0.1:18789"), &[]));
        assert!(origin_allowed(
            &h(Some("http://127.0.0.1:18789"), "127.0.0.1:18789"),
            &[]
        ));
        assert!(origin_allowed(
            &h(Some("http://localhost:18789"), "localhost:18789"),
            &[]
        ));
        assert!(origin_allowed(
            &h(Some("http://[::1]:8080"), "[::1]:8080"),
            &[]
        ));
        assert!(origin_allowed(
            &h(Some("http://localhost"), "localhost:80"),
            &[]
        ));
        assert!(!origin_allowed(
            &h(Some("http://evil.example"), "127.0.0.1:18789"),
            &[]
        ));
        assert!(!origin_allowed(&h(Some("null"), "127.0.0.1:18789"), &[]));
        assert!(!origin_allowed(
            &h(Some("http://127.0.0.1:9999"), "127.0.0.1:18789"),
            &[]
        ));
        // DNS rebinding: the page's own host name resolved to 127.0.0.1.
        assert!(!origin_allowed(
            &h(Some("http://evil.example:18789"), "evil.example:18789"),
            &[]
        ));
        assert!(origin_allowed(
            &h(Some("https://control.example.com"), "127.0.0.1:1"),
            &allow
        ));
        assert!(!origin_allowed(
            &h(Some("http://control.example.com"), "127.0.0.1:1"),
            &allow
        ));
        assert_eq!(normalize_origin("ftp://x"), None);
        assert_eq!(normalize_origin("http://a/b"), None);
    }
}
