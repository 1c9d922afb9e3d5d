//! The operator reference (`docs/operations.md`) against the real binary:
//! every metric family `/metrics` serves is documented, and every metric the
//! page names exists, so the page cannot drift from the code unnoticed.

use crate::common::*;
use serde_json::json;
use std::collections::BTreeSet;
use std::path::Path;

fn operations_md() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md");
    std::fs::read_to_string(path).unwrap()
}

/// Metric family names from the `# HELP` and `# TYPE` lines of a scrape.
fn families(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter_map(|l| {
            l.strip_prefix("# HELP ")
                .or_else(|| l.strip_prefix("# TYPE "))
        })
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Every `gateway_*` metric name written in backticks on the page.
fn documented(page: &str) -> BTreeSet<String> {
    page.split('`')
        .skip(1)
        .step_by(2)
        .filter_map(|code| {
            let name: String = code
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            (name.starts_with("gateway_") && name.len() > "gateway_".len()).then_some(name)
        })
        .collect()
}

/// The binary with a command plugin (so the per-process series appear) and
/// the built-in Bncr bridge (so its series appear): every family the code
/// can render is in one scrape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_served_metric_is_documented_and_every_documented_one_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(dir.path(), "");
    let plugin = dir.path().join("plugins/stats");
    std::fs::create_dir_all(&plugin).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugin-host/tests/fixtures/test_plugin.py")
        .canonicalize()
        .unwrap();
    std::fs::write(
        plugin.join("openclaw.plugin.json"),
        json!({"id": "stats", "runtime": {"command": ["python3", script.display().to_string()]}})
            .to_string(),
    )
    .unwrap();
    let mut p = Proc::start_in(dir, &["--config".into(), config.display().to_string()]).await;
    // One request answered, so the request families carry a sample too.
    let (mut c, _) = Client::admin(&p.url()).await;
    assert_eq!(c.call("health", json!({})).await["ok"], true);
    let body = eventually(WAIT, "the plugin process serving", || {
        let addr = p.addr;
        async move {
            let (status, _, body) = http(addr, "GET", "/metrics").await;
            (status == 200 && body.contains("gateway_plugin_process_up{plugin=\"stats\"} 1"))
                .then_some(body)
        }
    })
    .await;
    let served = families(&body);
    for must in [
        "gateway_requests_total",
        "gateway_plugin_process_up",
        "gateway_bncr_inbound_pending",
    ] {
        assert!(served.contains(must), "{must} not served:\n{body}");
    }
    let page = documented(&operations_md());
    let undocumented: Vec<_> = served.difference(&page).collect();
    let not_served: Vec<_> = page.difference(&served).collect();
    assert!(
        undocumented.is_empty() && not_served.is_empty(),
        "served by /metrics but not in docs/operations.md: {undocumented:?}; \
         named in docs/operations.md but not served: {not_served:?}"
    );
    p.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(p.wait(WAIT).await.success());
}
