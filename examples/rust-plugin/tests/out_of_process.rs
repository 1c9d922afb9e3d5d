//! The example binary as the gateway runs it: a real process speaking the
//! plugin protocol, driven by the gateway's own host side.

use plugin_api::{ConnId, Params, scope};
use plugin_host::{Limits, ProcessState, RuntimePlugin, SpawnSpec};
use serde_json::json;
use std::path::Path;

#[tokio::test]
async fn declares_serves_and_runs_its_service_out_of_process() {
    let dir = tempfile::tempdir().unwrap();
    let rt = RuntimePlugin::start(SpawnSpec {
        plugin_id: "rust-stats".into(),
        generation: 3,
        dir: Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf(),
        argv: vec![env!("CARGO_BIN_EXE_example-rust-plugin").into()],
        env: Vec::new(),
        config: json!({}),
        state_dir: dir.path().join("state"),
        tmp_root: dir.path().join("tmp"),
        limits: Limits::default(),
    })
    .await
    .expect("starts");
    let d = rt.declarations();
    assert_eq!(d.methods.len(), 1);
    assert_eq!(d.methods[0].name, "rust-stats.mean");
    assert_eq!(d.methods[0].scope.as_deref(), Some(scope::READ));
    assert_eq!(d.events, vec!["plugin.rust-stats.computed".to_string()]);
    assert_eq!(d.services, vec!["counter".to_string()]);

    let ctx = plugin_api::host::internal_context(ConnId(1));
    let call = |v| {
        let ctx = ctx.clone();
        let rt = &rt;
        async move {
            rt.call(&ctx, "rust-stats.mean", &Params::from_value(&v))
                .await
        }
    };
    let r = call(json!({"values": [1, 2, 6]})).await.unwrap();
    assert_eq!(r["mean"], 3.0);
    assert_eq!(r["generation"], 3);
    assert_eq!(r["serviceRunning"], false);
    rt.start_services().await.unwrap();
    let r = call(json!({"values": [4]})).await.unwrap();
    assert_eq!(
        (r["calls"].as_u64(), r["serviceRunning"].as_bool()),
        (Some(2), Some(true))
    );
    let e = call(json!({"values": []})).await.unwrap_err();
    assert_eq!(e.message, "invalid params: values must not be empty");
    assert_eq!(rt.stop().await.as_deref(), Some("exit status 0"));
    assert_eq!(rt.status().state, ProcessState::Stopped);
    assert!(
        rt.stderr_tail()
            .iter()
            .any(|l| l.contains("counter stopped after 2 calls")),
        "{:?}",
        rt.stderr_tail()
    );
}
