//! The way in: a request is admitted by the generation serving now (read
//! once from the pointer), counted in the plugin that serves it, checked
//! for role and scope and dispatched there; connection events reach every
//! generation that may hold state for the connection.

use super::{Gateway, lock};
use crate::panic;
use crate::scope::{Admitted, PluginPhase, RestartScope};
use plugin_api::{ConnId, ConnectionInfo, MethodResult, Params, RequestContext, RpcError};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tracing::error;

impl Gateway {
    /// Admit a request to the current generation, counted in its core
    /// plugin: the pointer is read once, and if that generation closed its
    /// door in between, the newer one is read instead. Fails only while the
    /// gateway is stopping.
    pub fn admit(&self) -> Result<Admitted, RpcError> {
        loop {
            // Once shutdown began, nothing new is admitted, even while
            // shutdown still waits for a running restart.
            if self.is_closing() {
                return Err(closing_error());
            }
            // A guard, not a clone: the only reference count taken is the
            // one the admitted request keeps.
            let scope = self.inner.current.load();
            if let Some(a) = RestartScope::try_admit(&scope) {
                return Ok(a);
            }
            if self.door_closed_for_good(&scope) {
                return Err(closing_error());
            }
            std::hint::spin_loop();
        }
    }

    /// A generation refused admission: true if no newer one will admit.
    fn door_closed_for_good(&self, refused: &Arc<RestartScope>) -> bool {
        self.inner.closing.load(Ordering::SeqCst)
            || Arc::ptr_eq(refused, &self.inner.current.load())
    }

    /// Dispatch one request to the generation that admits it.
    pub async fn dispatch(
        &self,
        ctx: RequestContext,
        method: &str,
        params: Params,
    ) -> MethodResult {
        self.dispatch_tagged(ctx, method, params).await.1
    }

    /// [`Gateway::dispatch`], also saying which generation answered (0 when
    /// none admitted the request, e.g. while the gateway stops). A server
    /// uses it to tell a connection about generation N (`gateway.generation`)
    /// before it writes any answer generation N produced.
    pub async fn dispatch_tagged(
        &self,
        ctx: RequestContext,
        method: &str,
        params: Params,
    ) -> (u64, MethodResult) {
        // The pointer is read once; the method's plugin is looked up there
        // and the request is counted in that plugin, so that plugin's
        // hand-over (and no other) waits for it.
        let admitted = loop {
            let scope = self.inner.current.load();
            let generation = scope.generation();
            let Some(entry) = scope.registry().get(method) else {
                return (
                    generation,
                    Err(RpcError::invalid_request(format!(
                        "unknown method: {method}"
                    ))),
                );
            };
            if let Err(e) = entry.authorize(&ctx) {
                return (generation, Err(e));
            }
            // Once shutdown began, nothing new is admitted, even while
            // shutdown still waits for a running restart.
            if self.is_closing() {
                return (0, Err(closing_error()));
            }
            if entry.detached {
                let handler = entry.spec.handler.clone();
                let deadline = scope.request_deadlines().timeout_for(method);
                drop(scope);
                return (
                    generation,
                    crate::scope::run_detached(handler, method, deadline, ctx, params).await,
                );
            }
            if let Some(a) = RestartScope::try_admit_for(&scope, entry.owner) {
                break a;
            }
            if self.door_closed_for_good(&scope) {
                return (0, Err(closing_error()));
            }
            std::hint::spin_loop();
        };
        let scope = admitted.scope();
        let entry = scope
            .registry()
            .get(method)
            .expect("the admitting scope has the method");
        (scope.generation(), scope.invoke(entry, ctx, params).await)
    }

    /// Tell the current generation's plugins that an authenticated
    /// connection opened (it has joined the host's connection table).
    pub fn connection_opened(&self, info: &ConnectionInfo) {
        let scope = self.inner.current.load();
        for (owner, hook) in scope.registry().connection_opened_hooks() {
            if let Err(p) = panic::catch(|| hook(info)) {
                let plugin = &scope.registry().plugin_ids()[*owner];
                error!(plugin = %plugin, panic = %p, "connection-opened hook panicked");
            }
        }
    }

    /// Tell every generation that may hold state for `conn` that it closed:
    /// first a generation still handing over (only its plugins that have not
    /// stopped yet), then the current one. Each plugin's hook runs once per
    /// generation; a panicking hook is logged and the others still run.
    pub fn connection_closed(&self, conn: ConnId) {
        let draining = lock(&self.inner.draining).upgrade();
        if let Some(old) = draining {
            notify_closed(&old, conn, true);
        }
        notify_closed(&self.inner.current.load(), conn, false);
    }
}

fn closing_error() -> RpcError {
    RpcError::unavailable("gateway is stopping")
        .with_details(serde_json::json!({"reason": "gateway-closing"}))
        .retryable_after(None)
}

/// Run `scope`'s connection-closed hooks for `conn`; with `live_only`, skip
/// plugins that already handed over.
fn notify_closed(scope: &RestartScope, conn: ConnId, live_only: bool) {
    let phases = live_only.then(|| scope.plugin_phases());
    for (owner, hook) in scope.registry().connection_closed_hooks() {
        if phases
            .as_ref()
            .is_some_and(|p| p[*owner].1 == PluginPhase::Stopped)
        {
            continue;
        }
        if let Err(p) = panic::catch(|| hook(conn)) {
            let plugin = &scope.registry().plugin_ids()[*owner];
            error!(generation = scope.generation(), plugin = %plugin, panic = %p, "connection-closed hook panicked");
        }
    }
}
