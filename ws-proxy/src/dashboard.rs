//! The operator dashboard: static files embedded in the binary, served at
//! `/` (and `/ui`, `/status`, where OpenClaw serves its Control UI).
//!
//! The page signs in over the same WebSocket protocol as any operator
//! client; the server only hands out files. It reads the token from the URL
//! fragment, which browsers never send in a request. Every response carries
//! a Content-Security-Policy that allows nothing but this origin.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

/// Paths that answer the dashboard page.
const PAGE_PATHS: &[&str] = &["/", "/index.html", "/ui", "/ui/", "/status"];

/// The embedded files: path, content type, body.
const FILES: &[(&str, &str, &str)] = &[
    (
        "/dashboard/app.js",
        "text/javascript; charset=utf-8",
        include_str!("../dashboard/app.js"),
    ),
    (
        "/dashboard/app.css",
        "text/css; charset=utf-8",
        include_str!("../dashboard/app.css"),
    ),
    (
        "/dashboard/icon.svg",
        "image/svg+xml",
        include_str!("../dashboard/icon.svg"),
    ),
];

const INDEX: &str = include_str!("../dashboard/index.html");

/// Self only: no inline script or style, no other origin, no framing.
/// `connect-src 'self'` covers the page's own `ws://` origin.
pub(crate) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// Whether `path` is a dashboard path.
pub(crate) fn serves(path: &str) -> bool {
    PAGE_PATHS.contains(&path) || FILES.iter().any(|f| f.0 == path)
}

/// The file at `path` (GET or HEAD), or 405 for other methods.
pub(crate) fn respond(path: &str, get: bool, head: bool) -> Response<Full<Bytes>> {
    if !get {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let (ctype, body) = FILES
        .iter()
        .find(|f| f.0 == path)
        .map_or(("text/html; charset=utf-8", INDEX), |f| (f.1, f.2));
    let mut r = Response::new(Full::new(if head {
        Bytes::new()
    } else {
        Bytes::from_static(body.as_bytes())
    }));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_stays_under_100_kb_and_loads_nothing_from_elsewhere() {
        let weight = INDEX.len() + FILES.iter().map(|f| f.2.len()).sum::<usize>();
        assert!(weight < 100 * 1024, "{weight} bytes");
        for text in std::iter::once(INDEX)
            .chain(FILES.iter().filter(|f| !f.0.ends_with(".svg")).map(|f| f.2))
        {
            for bad in [
                "http://",
                "https://",
                "//cdn",
                "<script>",
                " style=\"",
                "onclick=",
            ] {
                assert!(!text.contains(bad), "{bad} in a dashboard file");
            }
        }
    }
}
