//! Calls forwarded to the process with their deadlines, the events it
//! emits back, and the errors a caller sees when the process cannot answer.

use crate::process::{Failure, Process};
use crate::supervisor::{Inner, probe};
use crate::{ProcessState, RuntimePlugin, lock};
use plugin_api::{ConnId, MethodResult, Params, RequestContext, RpcError, Value, scope};
use plugin_protocol::{self as proto, CallClient, CallParams, CallResult, EmitParams, method};
use std::sync::Arc;

impl RuntimePlugin {
    /// Forward a call of a declared method to the process.
    pub async fn call(&self, ctx: &RequestContext, method: &str, params: &Params) -> MethodResult {
        let Some(proc) = lock(&self.inner.current).clone() else {
            return Err(self.inner.not_serving(method));
        };
        let limits = &self.inner.spec.limits;
        let call = CallParams {
            method: method.to_string(),
            params: params.raw().map(ToOwned::to_owned),
            client: CallClient {
                conn_id: ctx.conn_id().0,
                role: ctx.role().as_str().to_string(),
                scopes: ctx.scopes().as_slice().to_vec(),
                client: serde_json::to_value(ctx.client()).unwrap_or(Value::Null),
            },
            deadline_ms: limits.call_timeout.as_millis() as u64,
        };
        let id = &self.inner.spec.plugin_id;
        // The request's own deadline (`requests.timeout_ms`, counted from
        // admission) may end the wait before `call_timeout` does and drop
        // this future: a call abandoned while still pending is counted and
        // probed like a timed-out one, or a hung process would go unnoticed.
        let mut abandoned = Abandoned {
            inner: &self.inner,
            proc: Some(proc.clone()),
        };
        let answer = proc.request(method::CALL, &call, limits.call_timeout).await;
        abandoned.proc = None;
        match answer {
            Ok(raw) => match serde_json::from_str::<CallResult>(raw.get()) {
                Ok(CallResult {
                    ok: true, payload, ..
                }) => Ok(payload.unwrap_or(Value::Null)),
                Ok(CallResult { error, .. }) => Err(error.map_or_else(
                    || RpcError::unavailable(format!("plugin {id} failed without an error")),
                    call_error,
                )),
                Err(e) => Err(RpcError::unavailable(format!(
                    "plugin {id} answered {method} with an invalid result: {e}"
                ))),
            },
            Err(f) => {
                match f {
                    Failure::Timeout(_) => {
                        lock(&self.inner.state).call_timeouts += 1;
                        probe(&self.inner, proc);
                    }
                    Failure::Busy => lock(&self.inner.state).busy_rejections += 1,
                    _ => {}
                }
                Err(self.inner.failure_error(method, f))
            }
        }
    }

    /// Start the plugin's services (`start` request). Called once the
    /// previous generation's process of this plugin has stopped.
    pub async fn start_services(&self) -> Result<(), String> {
        lock(&self.inner.state).services_started = true;
        let Some(proc) = lock(&self.inner.current).clone() else {
            return Err(self.inner.not_serving("start").message);
        };
        let timeout = self.inner.spec.limits.service_timeout;
        match proc
            .request(method::START, &serde_json::json!({}), timeout)
            .await
        {
            Ok(_) => Ok(()),
            Err(f) => Err(self.inner.failure_error("start", f).message),
        }
    }
}

/// Armed while a call waits for its answer; dropped armed (the caller
/// stopped waiting), it counts a call timeout and probes the process.
struct Abandoned<'a> {
    inner: &'a Arc<Inner>,
    proc: Option<Arc<Process>>,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        let Some(proc) = self.proc.take() else {
            return;
        };
        if proc.ended().is_some() || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        lock(&self.inner.state).call_timeouts += 1;
        probe(self.inner, proc);
    }
}

fn call_error(e: proto::CallError) -> RpcError {
    let code =
        serde_json::from_value(Value::String(e.code)).unwrap_or(plugin_api::ErrorCode::Unavailable);
    RpcError {
        code,
        message: e.message,
        details: e.details,
        retryable: e.retryable,
        retry_after_ms: e.retry_after_ms,
    }
}

impl Inner {
    /// Deliver an event the process emitted, through the generation's sink.
    pub(crate) fn emit(&self, p: EmitParams) -> Result<usize, String> {
        let sink = self
            .sink
            .get()
            .ok_or("the plugin's generation is not serving yet")?;
        let sent = match p.conn_ids {
            Some(ids) => {
                let conns: Vec<ConnId> = ids.into_iter().map(ConnId).collect();
                sink.send(&conns, &p.event, &p.payload)
            }
            None => sink.broadcast(
                p.scope.as_deref().unwrap_or(scope::READ),
                &p.event,
                &p.payload,
            ),
        };
        sent.map_err(|e| e.to_string())
    }

    fn crashed_error(&self, method: &str, exit: &str) -> RpcError {
        let id = &self.spec.plugin_id;
        RpcError::unavailable(format!("plugin {id} crashed ({exit}); retry the request"))
            .with_details(serde_json::json!({
                "reason": "plugin-crashed", "plugin": id, "method": method, "exit": exit,
            }))
            .retryable_after(Some(self.spec.limits.respawn_backoff.as_millis() as u64))
    }

    fn not_serving(&self, method: &str) -> RpcError {
        let st = lock(&self.state);
        let id = &self.spec.plugin_id;
        match &st.state {
            ProcessState::Failed(e) => RpcError::unavailable(format!("plugin {id} failed: {e}"))
                .with_details(
                    serde_json::json!({"reason": "plugin-failed", "plugin": id, "method": method}),
                ),
            ProcessState::Stopped => RpcError::restarting(),
            ProcessState::Respawning | ProcessState::Running => {
                let exit = st.last_exit.clone().unwrap_or_default();
                drop(st);
                self.crashed_error(method, &exit)
            }
        }
    }

    /// The error a caller of `method` sees for `f`.
    pub(crate) fn failure_error(&self, method: &str, f: Failure) -> RpcError {
        let id = &self.spec.plugin_id;
        let limits = &self.spec.limits;
        match f {
            Failure::Ended(e) if e.stopping => RpcError::restarting(),
            Failure::Ended(e) => self.crashed_error(method, &e.describe()),
            Failure::Busy => RpcError::unavailable(format!(
                "plugin {id} is busy ({} calls in flight); retry the request",
                limits.max_calls_in_flight
            ))
            .with_details(
                serde_json::json!({"reason": "plugin-busy", "plugin": id, "method": method}),
            )
            .retryable_after(Some(50)),
            Failure::TooLarge(n) => RpcError::invalid_request(format!(
                "request too large for plugin {id}: {n} bytes, limit {}",
                limits.max_line_bytes
            )),
            Failure::Timeout(d) => RpcError::unavailable(format!(
                "plugin {id} did not answer {method} within {} ms",
                d.as_millis()
            ))
            .with_details(
                serde_json::json!({"reason": "plugin-timeout", "plugin": id, "method": method}),
            )
            .retryable_after(None),
            Failure::Rpc(e) => RpcError::unavailable(format!(
                "plugin {id} refused {method}: {}",
                e.message
            ))
            .with_details(
                serde_json::json!({"reason": "plugin-error", "plugin": id, "method": method}),
            ),
        }
    }
}
