//! The generation watcher: each new generation is announced to every
//! open connection.

use super::{Shared, raw};
use gateway_core::RestartConnections;
use serde_json::json;
use std::sync::Arc;

/// On each new generation: tell every connection (`gateway.generation`), or
/// close them all when `restart.connections = "close"`. A connection's
/// writer also tells it before the first response or plugin event of a
/// generation it was not told of yet, so this broadcast may come second;
/// the writer skips it then.
pub(super) async fn watch_generations(shared: Arc<Shared>) {
    let mut rx = shared.gateway.subscribe();
    rx.borrow_and_update();
    loop {
        tokio::select! {
            _ = shared.stopping.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
        rx.borrow_and_update();
        let scope = shared.gateway.current();
        if scope.timings().connections == RestartConnections::Close {
            let payload = raw(&json!({"reason": "gateway restarting", "restartExpectedMs": 1500}));
            for outbox in shared.table.outboxes() {
                outbox.event("shutdown".into(), payload.clone());
                outbox.close(1012, "service restart");
            }
        } else {
            let (generation, payload) = shared.notices.current();
            shared.table.announce_all(generation, &payload);
        }
    }
}
