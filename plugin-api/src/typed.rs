//! Conveniences for plugin authors: handlers that take typed params and
//! return any `Serialize`, and services written as two async closures.

use crate::context::{Params, RequestContext};
use crate::error::RpcError;
use crate::registrar::{BoxFuture, MethodBuilder, Service};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

/// Turn a handler's value into the JSON answer. A value that cannot be
/// serialized is the plugin's bug, answered `UNAVAILABLE` rather than a panic.
fn answer<R: Serialize>(value: R) -> Result<serde_json::Value, RpcError> {
    serde_json::to_value(value)
        .map_err(|e| RpcError::unavailable(format!("the handler's answer is not JSON: {e}")))
}

impl MethodBuilder<'_> {
    /// Declare with a synchronous handler taking typed params `P` (parsed
    /// from the request; a mismatch answers `INVALID_REQUEST` naming the
    /// field) and returning any `Serialize`.
    ///
    /// ```
    /// use plugin_api::{Registrar, scope};
    ///
    /// #[derive(serde::Deserialize)]
    /// struct Add { a: i64, b: i64 }
    ///
    /// fn register(r: &mut Registrar) {
    ///     r.method("calc.add").scope(scope::READ).typed(|_ctx, p: Add| Ok(p.a + p.b));
    /// }
    /// ```
    pub fn typed<P, R, F>(self, f: F)
    where
        P: DeserializeOwned,
        R: Serialize,
        F: Fn(&RequestContext, P) -> Result<R, RpcError> + Send + Sync + 'static,
    {
        self.sync(move |ctx, params: Params| answer(f(ctx, params.parse::<P>()?)?));
    }

    /// Declare with an async handler taking typed params `P` and returning
    /// any `Serialize`.
    pub fn typed_async<P, R, F, Fut>(self, f: F)
    where
        P: DeserializeOwned + Send + 'static,
        R: Serialize,
        F: Fn(RequestContext, P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, RpcError>> + Send + 'static,
    {
        let f = Arc::new(f);
        self.handler(move |ctx, params: Params| {
            let f = f.clone();
            async move {
                let p = params.parse::<P>()?;
                answer(f(ctx, p).await?)
            }
        });
    }
}

type StartFn = Box<dyn Fn() -> BoxFuture<Result<(), String>> + Send + Sync>;
type StopFn = Box<dyn Fn() -> BoxFuture<()> + Send + Sync>;

/// A [`Service`] made of an async start and an optional async stop, for
/// plugins that do not need a type of their own.
///
/// ```
/// use plugin_api::{Registrar, ServiceFn};
///
/// fn register(r: &mut Registrar) {
///     r.service(
///         ServiceFn::new("ticker")
///             .on_start(|| async { Ok(()) })
///             .on_stop(|| async {})
///             .into_service(),
///     );
/// }
/// ```
pub struct ServiceFn {
    name: String,
    start: StartFn,
    stop: StopFn,
}

impl fmt::Debug for ServiceFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceFn")
            .field("name", &self.name)
            .finish()
    }
}

impl ServiceFn {
    /// A service called `name` whose start and stop do nothing yet.
    pub fn new(name: impl Into<String>) -> ServiceFn {
        ServiceFn {
            name: name.into(),
            start: Box::new(|| Box::pin(async { Ok(()) })),
            stop: Box::new(|| Box::pin(async {})),
        }
    }

    /// What `start` does; an error marks the plugin failed.
    pub fn on_start<F, Fut>(mut self, f: F) -> ServiceFn
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.start = Box::new(move || Box::pin(f()));
        self
    }

    /// What `stop` does (called exactly once if `start` was called).
    pub fn on_stop<F, Fut>(mut self, f: F) -> ServiceFn
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.stop = Box::new(move || Box::pin(f()));
        self
    }

    /// The service, ready for [`Registrar::service`](crate::Registrar::service).
    pub fn into_service(self) -> Arc<dyn Service> {
        Arc::new(self)
    }
}

impl Service for ServiceFn {
    fn name(&self) -> &str {
        &self.name
    }

    fn start(self: Arc<Self>) -> BoxFuture<Result<(), String>> {
        (self.start)()
    }

    fn stop(self: Arc<Self>) -> BoxFuture<()> {
        (self.stop)()
    }
}

#[cfg(test)]
mod tests {
    use crate::registrar::Handler;
    use crate::{ConnId, Params, Registrar, ServiceFn, scope};
    use serde::{Deserialize, Serialize};
    use serde_json::json;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Add {
        a: i64,
        b: i64,
    }

    #[derive(Serialize)]
    struct Sum {
        sum: i64,
    }

    fn call_sync(r: Registrar, params: serde_json::Value) -> crate::MethodResult {
        let d = r.into_declarations();
        let Handler::Sync(h) = &d.methods[0].handler else {
            panic!("typed declares a sync handler")
        };
        h(
            &crate::host::internal_context(ConnId(1)),
            Params::from_value(&params),
        )
    }

    #[test]
    fn typed_parses_params_and_serializes_the_answer() {
        let mut r = Registrar::new("calc");
        r.method("calc.add")
            .scope(scope::READ)
            .typed(|_, p: Add| Ok(Sum { sum: p.a + p.b }));
        assert_eq!(
            call_sync(r, json!({"a": 2, "b": 3})).unwrap(),
            json!({"sum": 5})
        );
    }

    #[test]
    fn typed_refuses_bad_params_as_invalid_request() {
        for bad in [
            json!({"a": 1}),
            json!({"a": "x", "b": 1}),
            json!({"a": 1, "b": 2, "c": 3}),
        ] {
            let mut r = Registrar::new("calc");
            r.method("calc.add").typed(|_, p: Add| Ok(p.a + p.b));
            let err = call_sync(r, bad.clone()).unwrap_err();
            assert_eq!(err.code, crate::ErrorCode::InvalidRequest, "{bad}");
        }
    }

    #[tokio::test]
    async fn typed_async_awaits_and_answers() {
        let mut r = Registrar::new("calc");
        r.method("calc.add")
            .typed_async(|_, p: Add| async move { Ok(vec![p.a, p.b]) });
        let d = r.into_declarations();
        let Handler::Async(h) = &d.methods[0].handler else {
            panic!("typed_async declares an async handler")
        };
        let got = h(
            crate::host::internal_context(ConnId(1)),
            Params::from_value(&json!({"a": 1, "b": 2})),
        )
        .await;
        assert_eq!(got.unwrap(), json!([1, 2]));
    }

    #[tokio::test]
    async fn service_fn_runs_its_closures() {
        let started = Arc::new(AtomicUsize::new(0));
        let stopped = Arc::new(AtomicUsize::new(0));
        let (s1, s2) = (started.clone(), stopped.clone());
        let svc = ServiceFn::new("worker")
            .on_start(move || {
                let s = s1.clone();
                async move {
                    s.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            })
            .on_stop(move || {
                let s = s2.clone();
                async move {
                    s.fetch_add(1, Ordering::SeqCst);
                }
            })
            .into_service();
        assert_eq!(svc.name(), "worker");
        svc.clone().start().await.unwrap();
        svc.clone().stop().await;
        assert_eq!(
            (
                started.load(Ordering::SeqCst),
                stopped.load(Ordering::SeqCst)
            ),
            (1, 1)
        );
        let failing = ServiceFn::new("broken")
            .on_start(|| async { Err("no disk".to_string()) })
            .into_service();
        assert_eq!(failing.start().await.unwrap_err(), "no disk");
    }
}
