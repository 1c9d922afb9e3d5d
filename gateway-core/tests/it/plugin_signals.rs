//! Signals a plugin exchanges with the host besides requests: a health check
//! that reports the plugin degraded, and the connection-opened hook.

use crate::common::*;
use gateway_core::PluginPhase;
use plugin_api::{
    ClientInfo, ConnId, ConnectionInfo, Plugin, PluginContext, PluginFactory, Registrar, Role,
    Scopes,
};
use serde_json::json;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Shared {
    degraded: Mutex<Option<String>>,
    opened: Mutex<Vec<(u64, u64)>>,
}

struct Signals {
    shared: Arc<Shared>,
    generation: u64,
}

impl Plugin for Signals {
    fn id(&self) -> &str {
        "signals"
    }
    fn version(&self) -> &str {
        "1.0.0"
    }
    fn register(&self, r: &mut Registrar) {
        let s = self.shared.clone();
        r.health_check(move || s.degraded.lock().unwrap().clone());
        let (s, generation) = (self.shared.clone(), self.generation);
        r.on_connection_opened(move |info| {
            s.opened.lock().unwrap().push((generation, info.conn_id.0));
        });
    }
}

fn factory(shared: Arc<Shared>) -> PluginFactory {
    PluginFactory::new("signals", "1.0.0", move |ctx: PluginContext| {
        Ok(Arc::new(Signals {
            shared: shared.clone(),
            generation: ctx.generation(),
        }) as Arc<dyn Plugin>)
    })
}

#[tokio::test]
async fn a_degraded_plugin_fails_health_with_its_reason_until_it_recovers() {
    let shared = Arc::new(Shared::default());
    let h = harness(config_with(&[]), vec![factory(shared.clone())]).await;
    let health = call(&h.gateway, "health", json!({})).await.unwrap();
    assert_eq!(health["ok"], true, "{health}");
    assert_eq!(health["plugins"]["degraded"], json!([]));
    *shared.degraded.lock().unwrap() = Some("store is read-only".into());
    let health = call(&h.gateway, "health", json!({})).await.unwrap();
    assert_eq!(health["ok"], false, "{health}");
    assert_eq!(
        health["plugins"]["degraded"],
        json!([{"id": "signals", "reason": "store is read-only"}])
    );
    let scope = h.gateway.current();
    assert_eq!(
        scope.plugin_degraded(),
        vec![("signals", "store is read-only".to_string())]
    );
    // Degraded is not failed: the plugin keeps serving.
    assert!(
        scope
            .plugin_phases()
            .iter()
            .all(|(_, p)| *p == PluginPhase::Running)
    );
    drop(scope);
    *shared.degraded.lock().unwrap() = None;
    let health = call(&h.gateway, "health", json!({})).await.unwrap();
    assert_eq!(health["ok"], true, "{health}");
}

#[tokio::test]
async fn connection_opened_reaches_the_current_generation_only() {
    let shared = Arc::new(Shared::default());
    let h = harness(config_with(&[]), vec![factory(shared.clone())]).await;
    let info = |id| ConnectionInfo {
        conn_id: ConnId(id),
        role: Role::Operator,
        scopes: Scopes::new(["operator.write"]),
        client: ClientInfo::default(),
    };
    h.gateway.connection_opened(&info(7));
    h.gateway.restart().await.unwrap();
    h.gateway.connection_opened(&info(8));
    assert_eq!(*shared.opened.lock().unwrap(), vec![(1, 7), (2, 8)]);
}
