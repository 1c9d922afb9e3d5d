//! Running an admitted request: wait (bounded) for its plugin to serve,
//! call the handler, turn panics into errors, and answer retryable
//! `UNAVAILABLE` at the request's deadline or when its plugin cancels what
//! is still in flight at the drain deadline. Detached handlers run here too.

use super::{CancelReason, PHASE_RUNNING, PluginPhase, RestartScope};
use crate::panic;
use crate::registry::{MethodEntry, PluginIndex};
use plugin_api::host::Handler;
use plugin_api::{MethodResult, Params, RequestContext, RpcError};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tracing::{error, warn};

impl RestartScope {
    /// The answer for a request this generation cancels: retryable
    /// `UNAVAILABLE`, `gateway-restarting` or `gateway-stopping`.
    pub(crate) fn cancel_error(&self) -> RpcError {
        if self.cancel_reason.load(Ordering::SeqCst) == CancelReason::Stopping as u8 {
            RpcError::unavailable("gateway is stopping; retry the request")
                .with_details(serde_json::json!({"reason": "gateway-stopping"}))
                .retryable_after(None)
        } else {
            RpcError::restarting()
        }
    }

    /// Answer a request whose plugin cancelled it at the drain deadline,
    /// counting it (once) for [`ShutdownReport::cancelled_requests`].
    pub(crate) fn answer_cancelled(&self) -> RpcError {
        self.cancelled_answers.fetch_add(1, Ordering::SeqCst);
        self.cancel_error()
    }

    /// Requests answered as cancelled so far.
    pub(crate) fn cancelled_answers(&self) -> usize {
        self.cancelled_answers.load(Ordering::SeqCst)
    }

    /// Wait (bounded) until plugin `owner` serves. `what` names the method or
    /// channel for the error.
    pub(crate) async fn ready(&self, owner: PluginIndex, what: &str) -> Result<(), RpcError> {
        let rt = &self.plugins[owner];
        if rt.fast.load(Ordering::Acquire) == PHASE_RUNNING {
            return Ok(());
        }
        let mut rx = rt.phase.subscribe();
        let waited = tokio::time::timeout(
            self.timings.start_wait(),
            rx.wait_for(|p| *p != PluginPhase::Starting),
        )
        .await;
        let plugin = &self.loader.plugins()[owner].id;
        let phase = match waited {
            Ok(Ok(p)) => p.clone(),
            _ => PluginPhase::Starting,
        };
        match phase {
            PluginPhase::Running => Ok(()),
            PluginPhase::Starting => Err(RpcError::unavailable(format!(
                "plugin {plugin} has not started yet"
            ))
            .retryable_after(Some(500))
            .with_details(
                serde_json::json!({"method": what, "plugin": plugin, "reason": "plugin-starting"}),
            )),
            PluginPhase::Failed(e) => Err(RpcError::unavailable(format!(
                "plugin {plugin} failed to start: {e}"
            ))
            .with_details(
                serde_json::json!({"method": what, "plugin": plugin, "reason": "plugin-failed"}),
            )),
            PluginPhase::Stopped => Err(self.cancel_error()),
        }
    }

    /// Run an admitted request: wait for its plugin, call the handler, turn
    /// panics into errors; answer retryable `UNAVAILABLE` at the request's
    /// deadline (`request-timeout`) or when its plugin's hand-over cancels
    /// what is still in flight at the drain deadline.
    pub(crate) async fn invoke(
        &self,
        entry: &MethodEntry,
        ctx: RequestContext,
        params: Params,
    ) -> MethodResult {
        let deadline = self.requests.timeout_for(&entry.spec.name);
        let run = async {
            self.ready(entry.owner, &entry.spec.name).await?;
            run_handler(&entry.spec.handler, ctx, params)
                .await
                .map_err(|e| self.handler_error(entry, e))
        };
        tokio::select! {
            biased;
            r = tokio::time::timeout(deadline, run) => {
                r.unwrap_or_else(|_| Err(self.timed_out(entry, deadline)))
            }
            () = self.plugins[entry.owner].cancel.cancelled() => Err(self.answer_cancelled()),
        }
    }

    fn timed_out(&self, entry: &MethodEntry, deadline: Duration) -> RpcError {
        let plugin = &self.loader.plugins()[entry.owner].id;
        let method = &entry.spec.name;
        warn!(generation = self.generation, plugin = %plugin, method = %method, timeout_ms = deadline.as_millis() as u64, "request timed out");
        request_timeout(method, Some(plugin), deadline)
    }

    fn handler_error(&self, entry: &MethodEntry, e: HandlerFailure) -> RpcError {
        match e {
            HandlerFailure::Error(e) => e,
            HandlerFailure::Panic(msg) => {
                let plugin = &self.loader.plugins()[entry.owner].id;
                error!(generation = self.generation, plugin = %plugin, method = %entry.spec.name, panic = %msg, "plugin handler panicked");
                RpcError::unavailable(format!("handler for {} panicked: {msg}", entry.spec.name))
                    .with_details(serde_json::json!({"method": entry.spec.name, "plugin": plugin, "reason": "handler-panicked"}))
            }
        }
    }
}

/// The answer to a request that outlived its deadline.
pub(crate) fn request_timeout(method: &str, plugin: Option<&str>, deadline: Duration) -> RpcError {
    RpcError::unavailable(format!(
        "{method} did not finish within {} ms",
        deadline.as_millis()
    ))
    .with_details(serde_json::json!({
        "reason": "request-timeout",
        "method": method,
        "plugin": plugin,
        "timeoutMs": deadline.as_millis() as u64,
    }))
    .retryable_after(None)
}

pub(crate) enum HandlerFailure {
    Error(RpcError),
    Panic(String),
}

async fn run_handler(
    handler: &Handler,
    ctx: RequestContext,
    params: Params,
) -> Result<serde_json::Value, HandlerFailure> {
    match handler {
        Handler::Sync(f) => match panic::catch(|| f(&ctx, params)) {
            Ok(r) => r.map_err(HandlerFailure::Error),
            Err(p) => Err(HandlerFailure::Panic(p)),
        },
        Handler::Async(f) => {
            let fut = panic::catch(|| f(ctx, params)).map_err(HandlerFailure::Panic)?;
            match panic::catch_async(fut).await {
                Ok(r) => r.map_err(HandlerFailure::Error),
                Err(p) => Err(HandlerFailure::Panic(p)),
            }
        }
    }
}

/// Run a detached handler (outside any admission), within `deadline`.
pub(crate) async fn run_detached(
    handler: Handler,
    method: &str,
    deadline: Duration,
    ctx: RequestContext,
    params: Params,
) -> MethodResult {
    let run = run_handler(&handler, ctx, params);
    match tokio::time::timeout(deadline, run).await {
        Ok(r) => r.map_err(|e| match e {
            HandlerFailure::Error(e) => e,
            HandlerFailure::Panic(p) => RpcError::unavailable(format!("handler panicked: {p}")),
        }),
        Err(_) => {
            warn!(method = %method, timeout_ms = deadline.as_millis() as u64, "request timed out");
            Err(request_timeout(method, None, deadline))
        }
    }
}
