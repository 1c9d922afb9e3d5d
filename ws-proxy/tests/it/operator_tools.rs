//! What an operator uses beyond the core methods: OpenClaw's generic
//! methods (`system-presence`, `config.get`, `logs.tail`),
//! `gateway.validate`, the dashboard files and the start banner.

use crate::common::*;
use serde_json::{Value, json};
use sha2::Digest;

fn error_code(res: &Value) -> &str {
    res["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_presence_lists_the_gateway_then_each_client_oldest_first_without_secrets() {
    let mut s = Server::start(&[]).await;
    let (mut reader, hello) = Client::connect(&s.url(), Some(TOKEN), &["operator.read"]).await;
    let reader_id = hello["server"]["connId"].clone();
    let (mut admin, hello) = Client::admin(&s.url()).await;
    let admin_id = hello["server"]["connId"].clone();

    let res = reader.call("system-presence", json!({})).await;
    assert_eq!(res["ok"], true, "{res}");
    let list = res["payload"].as_array().unwrap();
    assert_eq!(list.len(), 3, "{res}");
    assert_eq!(list[0]["mode"], "gateway");
    assert_eq!(list[0]["reason"], "self");
    let ids: Vec<Value> = list[1..].iter().map(|e| e["connId"].clone()).collect();
    assert_eq!(ids, vec![reader_id, admin_id.clone()]);
    let me = &list[1];
    assert_eq!(me["clientId"], "cli");
    assert_eq!(me["mode"], "cli");
    assert_eq!(me["version"], "2026.9.6");
    assert_eq!(me["platform"], "linux");
    assert_eq!(me["role"], "operator");
    assert_eq!(me["instanceId"], "t");
    assert_eq!(me["scopes"], json!(["operator.read"]));
    let since = me["connectedAtMs"].as_u64().unwrap();
    let active = me["lastActivityAtMs"].as_u64().unwrap();
    assert!(active >= since && since > 1_600_000_000_000, "{me}");
    assert!(!res.to_string().contains(TOKEN), "the token leaked: {res}");

    // Activity moves forward when the client sends; a closed client leaves.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let res = admin.call("system-presence", json!({})).await;
    let admin_entry = res["payload"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["connId"] == admin_id)
        .unwrap()
        .clone();
    assert!(admin_entry["lastActivityAtMs"].as_u64().unwrap() > active);
    drop(reader);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let res = admin.call("system-presence", json!({})).await;
        if res["payload"].as_array().unwrap().len() == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{res}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // Without a read scope: refused like any read method.
    let (mut none, _) = Client::connect(&s.url(), Some(TOKEN), &[]).await;
    let res = none.call("system-presence", json!({})).await;
    assert_eq!(error_code(&res), "FORBIDDEN", "{res}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_get_redacts_every_secret_and_hashes_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = config_for(
        dir.path(),
        concat!(
            "[auth]\ntoken = \"file-secret-token\"\n",
            "[plugins.entries.bncr]\nenabled = true\n",
            // Credentials under names that do not look secret.
            "[plugins.entries.bncr.env]\nOPENAI_KEY = \"sk-env-leak\"\n",
            "DATABASE_URL = \"postgres://u:pw-leak@db/x\"\n",
            "[plugins.entries.bncr.config]\nallowFrom = [\"list-leak\"]\nretryLimit = 3\n",
            "echo = { prefix = \"cfg-leak\" }\n",
        ),
    );
    let p = path.display().to_string();
    let mut s = Server::start(&["--config", &p]).await;
    let (mut admin, _) = Client::admin(&s.url()).await;
    let res = admin.call("config.get", json!({})).await;
    assert_eq!(res["ok"], true, "{res}");
    let c = &res["payload"];
    assert_eq!(c["path"], p);
    assert_eq!(c["exists"], true);
    assert_eq!(c["valid"], true, "{c}");
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(c["hash"], hex::encode(sha2::Sha256::digest(&bytes)));
    // The flag's token (TOKEN) is in effect; the file's token is redacted too.
    assert_eq!(c["file"]["auth"]["token"], "__REDACTED__");
    assert_eq!(c["config"]["gateway"]["auth"]["token"], "__REDACTED__");
    assert_eq!(c["config"]["gateway"]["auth"]["mode"], "token");
    assert_eq!(c["config"]["gateway"]["port"], s.addr.port());
    assert_eq!(c["config"]["limits"]["maxInFlight"], 128);
    // Plugin env values and config strings are redacted whatever their keys
    // are called; keys and non-string settings stay.
    let x = &c["file"]["plugins"]["entries"]["bncr"];
    assert_eq!(x["env"]["OPENAI_KEY"], "__REDACTED__", "{c}");
    assert_eq!(x["env"]["DATABASE_URL"], "__REDACTED__");
    assert_eq!(x["config"]["echo"]["prefix"], "__REDACTED__");
    assert_eq!(x["config"]["allowFrom"][0], "__REDACTED__");
    assert_eq!(x["config"]["retryLimit"], 3);
    let x = &c["config"]["plugins"]["entries"]["bncr"];
    assert_eq!(x["config"]["echo"]["prefix"], "__REDACTED__", "{c}");
    assert_eq!(x["config"]["allowFrom"][0], "__REDACTED__");
    assert_eq!(x["config"]["retryLimit"], 3);
    let text = res.to_string();
    assert!(
        !text.contains("file-secret-token") && !text.contains(TOKEN),
        "{text}"
    );
    for leak in ["sk-env-leak", "pw-leak", "cfg-leak", "list-leak"] {
        assert!(!text.contains(leak), "{leak} leaked: {text}");
    }

    // An edit shows at once: new hash, and a broken file is reported.
    std::fs::write(&path, "[plugins]\ndirs = 7\n").unwrap();
    let res = admin.call("config.get", json!({})).await;
    let c = &res["payload"];
    assert_ne!(c["hash"], hex::encode(sha2::Sha256::digest(&bytes)));
    assert_eq!(c["valid"], false, "{c}");
    assert!(!c["issues"].as_array().unwrap().is_empty(), "{c}");

    // operator.read suffices (as in OpenClaw, whose probe reads it so);
    // without it: refused.
    let (mut reader, _) = Client::connect(&s.url(), Some(TOKEN), &["operator.read"]).await;
    let res = reader.call("config.get", json!({})).await;
    assert_eq!(res["ok"], true, "{res}");
    assert!(!res.to_string().contains("file-secret-token"));
    let (mut none, _) = Client::connect(&s.url(), Some(TOKEN), &[]).await;
    let res = none.call("config.get", json!({})).await;
    assert_eq!(error_code(&res), "FORBIDDEN", "{res}");
    assert_eq!(res["error"]["details"]["missingScope"], "operator.read");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_get_without_a_file_says_so() {
    let mut s = Server::start(&[]).await;
    let (mut admin, _) = Client::admin(&s.url()).await;
    let c = admin.call("config.get", json!({})).await["payload"].clone();
    assert_eq!(c["path"], Value::Null);
    assert_eq!(c["exists"], false);
    assert_eq!(c["hash"], Value::Null);
    assert_eq!(c["config"]["auth"]["tokenOrigin"], "from the command line");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_tail_pages_with_a_cursor_within_its_limits() {
    ws_proxy::init_logging(ws_proxy::LogFormat::Text, "info");
    let mut s = Server::start(&[]).await;
    let (mut admin, _) = Client::admin(&s.url()).await;
    let first = admin.call("logs.tail", json!({})).await;
    assert_eq!(first["ok"], true, "{first}");
    let cursor = first["payload"]["cursor"].as_u64().unwrap();
    assert!(first["payload"]["lines"].as_array().unwrap().len() as u64 <= cursor);

    // A restart logs; only lines after the cursor come back, in order.
    assert_eq!(admin.call("gateway.restart", json!({})).await["ok"], true);
    let deadline = std::time::Instant::now() + WAIT;
    let next = loop {
        let r = admin.call("logs.tail", json!({"cursor": cursor})).await;
        let lines = r["payload"]["entries"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if lines
            .iter()
            .any(|l| l["message"].as_str().unwrap_or("").contains("generation 2"))
        {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "{r}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let p = &next["payload"];
    let cursors: Vec<u64> = p["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["cursor"].as_u64().unwrap())
        .collect();
    assert_eq!(cursors.first(), Some(&(cursor + 1)), "{p}");
    assert!(cursors.windows(2).all(|w| w[1] == w[0] + 1), "{cursors:?}");
    assert_eq!(p["cursor"].as_u64(), cursors.last().copied());
    assert_eq!(p["truncated"], false);
    assert_eq!(p["lines"].as_array().unwrap().len(), cursors.len());

    // Limits: 1 line (the newest, gap marked); oversized asks are clamped.
    let one = admin
        .call("logs.tail", json!({"cursor": 0, "limit": 1}))
        .await;
    let one = &one["payload"];
    assert_eq!(one["entries"].as_array().unwrap().len(), 1);
    assert_eq!(one["entries"][0]["cursor"], one["cursor"]);
    assert_eq!(one["truncated"], true);
    let big = admin
        .call(
            "logs.tail",
            json!({"limit": 1_000_000, "maxBytes": 1u64 << 40}),
        )
        .await;
    assert_eq!(big["payload"]["limit"], 1000);
    assert_eq!(big["payload"]["maxBytes"], 1024 * 1024);
    // A cursor from another process's log starts over.
    let ahead = admin
        .call("logs.tail", json!({"cursor": u64::MAX / 2}))
        .await;
    assert_eq!(ahead["payload"]["reset"], true);
    // Bad params: a clear error, the connection stays.
    let bad = admin.call("logs.tail", json!({"limit": "many"})).await;
    assert_eq!(error_code(&bad), "INVALID_REQUEST", "{bad}");
    // Never a frame's content or a secret.
    assert!(!big.to_string().contains(TOKEN));
    let (mut reader, _) = Client::connect(&s.url(), Some(TOKEN), &["operator.read"]).await;
    assert_eq!(
        error_code(&reader.call("logs.tail", json!({})).await),
        "FORBIDDEN"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_reports_what_a_restart_would_serve_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = config_for(dir.path(), "");
    let p = path.display().to_string();
    let mut s = Server::start(&["--config", &p]).await;
    let (mut admin, _) = Client::admin(&s.url()).await;
    let same = admin.call("gateway.validate", json!({})).await;
    let v = &same["payload"];
    assert_eq!(v["ok"], true, "{same}");
    assert_eq!(v["methodsAdded"], json!([]));
    assert_eq!(v["methodsRemoved"], json!([]));
    assert!(
        v["methods"]
            .as_array()
            .unwrap()
            .contains(&json!("gateway.validate"))
    );

    // A new plugin on disk: reported as added, not served.
    write_plugin(
        &dir.path().join("plugins"),
        "demo",
        &[("demo.hello", "echo")],
    );
    let added = admin.call("gateway.validate", json!({})).await;
    assert_eq!(
        added["payload"]["methodsAdded"],
        json!(["demo.hello"]),
        "{added}"
    );
    assert_eq!(added["payload"]["generation"], 1);
    let unknown = admin.call("demo.hello", json!({})).await;
    assert_eq!(error_code(&unknown), "INVALID_REQUEST");

    // A broken config: the error, and generation 1 keeps serving.
    std::fs::write(&path, "[plugins]\ndirs = 7\n").unwrap();
    let broken = admin.call("gateway.validate", json!({})).await;
    assert_eq!(broken["ok"], true, "{broken}");
    assert_eq!(broken["payload"]["ok"], false);
    assert!(
        broken["payload"]["error"]
            .as_str()
            .unwrap()
            .contains("gateway.toml"),
        "{broken}"
    );
    assert_eq!(
        admin.call("health", json!({})).await["payload"]["generation"],
        1
    );
    assert_eq!(s.running().gateway().stats().live_scopes, 1);

    let (mut reader, _) = Client::connect(&s.url(), Some(TOKEN), &["operator.read"]).await;
    assert_eq!(
        error_code(&reader.call("gateway.validate", json!({})).await),
        "FORBIDDEN"
    );
    s.stop().await;
}

#[tokio::test]
async fn the_dashboard_is_served_from_the_binary_with_a_strict_policy() {
    let mut s = Server::start(&[]).await;
    for path in ["/", "/ui", "/status"] {
        let (code, headers, body) = http(s.addr, "GET", path).await;
        assert_eq!(code, 200, "{path}");
        assert_eq!(
            header(&headers, "content-type"),
            Some("text/html; charset=utf-8")
        );
        assert_eq!(header(&headers, "cache-control"), Some("no-store"));
        let csp = header(&headers, "content-security-policy").unwrap();
        assert!(csp.starts_with("default-src 'none'"), "{csp}");
        assert!(csp.contains("script-src 'self'") && csp.contains("connect-src 'self'"));
        assert!(!csp.contains("unsafe") && !csp.contains("http"), "{csp}");
        assert!(body.contains("/dashboard/app.js"), "{path}");
    }
    let (code, headers, body) = http(s.addr, "GET", "/dashboard/app.js").await;
    assert_eq!(code, 200);
    assert_eq!(
        header(&headers, "content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert!(body.contains("gateway.restart"));
    let (code, _, body) = http(s.addr, "HEAD", "/").await;
    assert_eq!((code, body.as_str()), (200, ""));
    let (code, headers, _) = http(s.addr, "POST", "/").await;
    assert_eq!(code, 405);
    assert_eq!(header(&headers, "allow"), Some("GET, HEAD"));
    let (code, _, _) = http(s.addr, "GET", "/dashboard/missing.js").await;
    assert_eq!(code, 404);
    // The probes still answer JSON.
    let (code, _, body) = http(s.addr, "GET", "/health").await;
    assert_eq!(code, 200);
    assert!(body.contains("\"live\""));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_banner_links_the_dashboard_and_shows_a_token_in_full_only_when_generated() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path().to_path_buf();
    let banner = |p: &Proc| {
        let out = p.stdout.clone();
        async move {
            eventually(WAIT, "the banner", || {
                let out = out.clone();
                async move {
                    let text = out.lock().unwrap().clone();
                    text.contains("--json").then_some(text)
                }
            })
            .await
        }
    };
    let mut first = Proc::spawn(dir, &["--port".into(), "0".into()]).await;
    let token = std::fs::read_to_string(cwd.join("state/gateway.token"))
        .unwrap()
        .trim()
        .to_string();
    let text = banner(&first).await;
    assert!(
        text.contains("auth: token (generated, stored in ./state/gateway.token)"),
        "{text}"
    );
    assert!(
        text.contains(&format!("dashboard: http://{}/#token={token}", first.addr)),
        "{text}"
    );
    assert!(text.contains(&format!("--token {token} --json")), "{text}");
    first.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(first.wait(WAIT).await.code(), Some(0));

    // The second start reads the stored token: said so, and the token only
    // appears in the link's fragment.
    let dir = first.dir;
    let mut second = Proc::spawn(dir, &["--port".into(), "0".into()]).await;
    let text = banner(&second).await;
    assert!(
        text.contains("auth: token (read from ./state/gateway.token)"),
        "{text}"
    );
    assert!(
        text.contains(&format!("dashboard: http://{}/#token={token}", second.addr)),
        "{text}"
    );
    assert_eq!(text.matches(&token).count(), 1, "{text}");
    assert!(text.contains("--token \"$GATEWAY_TOKEN\""), "{text}");
    second.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(second.wait(WAIT).await.code(), Some(0));
}

async fn scrape(s: &Server) -> String {
    let (code, _, body) = http(s.addr, "GET", "/metrics").await;
    assert_eq!(code, 200);
    body
}

/// Connect with `token` (or none) and return the answer; the server closes.
async fn connect_as(url: &str, token: Option<&str>) -> (Value, Closed) {
    let mut c = Client::open(url).await;
    c.next_frame().await.unwrap();
    let mut p = connect_params(4, 4, &["operator.read"]);
    if let Some(t) = token {
        p["auth"] = json!({"token": t});
    }
    let res = c.request_raw("connect", p).await;
    let (_, closed) = c.until_closed().await;
    (res, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_handshake_failures_by_code_and_closes_by_code() {
    let mut s = Server::start(&[]).await;
    let (r, closed) = connect_as(&s.url(), Some("wrong")).await;
    assert_eq!(r["error"]["details"]["code"], "AUTH_TOKEN_MISMATCH");
    assert_eq!(closed.code, Some(1008));
    let (r, _) = connect_as(&s.url(), None).await;
    assert_eq!(r["error"]["details"]["code"], "AUTH_TOKEN_MISSING");
    let mut c = Client::open(&s.url()).await;
    c.next_frame().await.unwrap();
    let r = c.request_raw("health", json!({})).await;
    assert_eq!(r["ok"], false);
    let (_, closed) = c.until_closed().await;
    assert_eq!(closed.code, Some(1008));
    // A client that leaves on its own.
    let (c, _) = Client::admin(&s.url()).await;
    drop(c);

    let body = eventually(WAIT, "four closes counted", || async {
        let body = scrape(&s).await;
        let closes = metric(&body, "gateway_connection_closes_total{code=\"1008\"}").zip(metric(
            &body,
            "gateway_connection_closes_total{code=\"peer\"}",
        ));
        (closes == Some((3.0, 1.0))).then_some(body)
    })
    .await;
    let m = |k: &str| metric(&body, k).unwrap_or_else(|| panic!("{k} missing:\n{body}"));
    assert_eq!(
        m("gateway_auth_failures_total{code=\"AUTH_TOKEN_MISMATCH\"}"),
        1.0
    );
    assert_eq!(
        m("gateway_auth_failures_total{code=\"AUTH_TOKEN_MISSING\"}"),
        1.0
    );
    assert_eq!(
        m("gateway_auth_failures_total{code=\"AUTH_PASSWORD_MISMATCH\"}"),
        0.0
    );
    assert_eq!(
        m("gateway_handshake_failures_total{reason=\"unauthorized\"}"),
        2.0
    );
    assert_eq!(
        m("gateway_handshake_failures_total{reason=\"not_connect\"}"),
        1.0
    );
    assert_eq!(
        m("gateway_handshake_failures_total{reason=\"timeout\"}"),
        0.0
    );
    assert_eq!(m("gateway_connection_closes_total{code=\"1012\"}"), 0.0);

    // The process, the plugins and the Bncr bridge.
    assert!(m("gateway_process_resident_memory_bytes") > 1_000_000.0);
    assert!(m("gateway_process_open_fds") >= 3.0);
    assert!(m("gateway_process_threads") >= 2.0);
    for plugin in ["core", "bncr", "ops"] {
        let key = format!("gateway_plugin_state{{plugin=\"{plugin}\",state=\"running\"}}");
        assert_eq!(m(&key), 1.0, "{plugin}");
        let key = format!("gateway_plugin_state{{plugin=\"{plugin}\",state=\"failed\"}}");
        assert_eq!(m(&key), 0.0, "{plugin}");
    }
    assert_eq!(m("gateway_bncr_outbox_messages"), 0.0);
    assert_eq!(m("gateway_bncr_pushes_in_flight"), 0.0);
    assert_eq!(m("gateway_bncr_dead_letters"), 0.0);
    // Every sample line belongs to a family declared before it.
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap();
        let family = name
            .trim_end_matches("_sum")
            .trim_end_matches("_count")
            .trim_end_matches("_bucket");
        assert!(
            body.contains(&format!("# TYPE {family} "))
                || body.contains(&format!("# TYPE {name} ")),
            "{line}"
        );
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_drain_timeouts_cancelled_requests_and_restart_phases() {
    let dir = tempfile::tempdir().unwrap();
    let path = config_for(dir.path(), "[restart]\ndrain_timeout_ms = 100\n");
    let pdir = dir.path().join("plugins").join("slow");
    std::fs::create_dir_all(&pdir).unwrap();
    std::fs::write(
        pdir.join("openclaw.plugin.json"),
        json!({"id": "slow", "version": "1.0.0", "methods": [
            {"name": "slow.wait", "handler": "sleep", "scope": "operator.read", "ms": 5000}
        ]})
        .to_string(),
    )
    .unwrap();
    let p = path.display().to_string();
    let mut s = Server::start(&["--config", &p]).await;
    let (mut a, _) = Client::admin(&s.url()).await;
    let (mut b, _) = Client::admin(&s.url()).await;
    let id = a.fresh_id();
    a.send_json(&json!({"type": "req", "id": id, "method": "slow.wait", "params": {}}))
        .await;
    eventually(WAIT, "the slow request to be in flight", || async {
        (metric(&scrape(&s).await, "gateway_requests_in_flight") == Some(1.0)).then_some(())
    })
    .await;
    let restarted = b.call("gateway.restart", json!({})).await;
    assert_eq!(restarted["ok"], true, "{restarted}");
    let cancelled = a.response(&id).await;
    assert_eq!(
        cancelled["error"]["details"]["reason"], "gateway-restarting",
        "{cancelled}"
    );

    let body = eventually(WAIT, "the cancelled request counted", || async {
        let body = scrape(&s).await;
        (metric(
            &body,
            "gateway_requests_cancelled_total{reason=\"restart\"}",
        ) == Some(1.0))
        .then_some(body)
    })
    .await;
    let m = |k: &str| metric(&body, k).unwrap_or_else(|| panic!("{k} missing:\n{body}"));
    assert_eq!(m("gateway_drain_timeouts_total"), 1.0);
    assert_eq!(m("gateway_drain_cancelled_requests_total"), 1.0);
    assert_eq!(
        m("gateway_requests_cancelled_total{reason=\"stopping\"}"),
        0.0
    );
    for phase in ["build", "stop_old", "start_new", "handover"] {
        let count = format!("gateway_restart_phase_seconds_count{{phase=\"{phase}\"}}");
        assert_eq!(m(&count), 1.0);
    }
    // The drain waited for its deadline (100 ms) before cancelling.
    assert!(m("gateway_restart_phase_seconds_sum{phase=\"stop_old\"}") >= 0.1);
    s.stop().await;
}
