//! Dispatch end to end, in process: request text in, response text out.
//!
//! For each method, one criterion group holds our gateway and jsonrpsee side
//! by side, so their ratio comes from one run on one machine:
//!
//! - `dispatch/trivial`: a sync handler answering a small object
//!   (`Registrar::method(..).sync` / `RpcModule::register_method`).
//! - `dispatch/async`: an async handler that really yields to the runtime once
//!   before answering (`.handler` / `register_async_method`).
//!
//! Functions in each group:
//! - `gateway`: `frame::parse_request` -> `Params::from_raw` ->
//!   `Gateway::dispatch` -> `frame::encode_response`, as ws-proxy does per
//!   frame (minus the socket and the task spawn).
//! - `jsonrpsee`: `RpcModule::raw_json_request`, jsonrpsee's own in-process
//!   entry point (it also allocates a subscription channel per call).
//! - `jsonrpsee_callback`: parse a `jsonrpsee::types::Request`, look the
//!   method up and call its `MethodCallback` directly, which is the per-call
//!   work of jsonrpsee's server without its middleware: jsonrpsee's best case.
//!
//! Both sides run on the same current-thread tokio runtime via
//! `b.to_async(&runtime)`.

use benches::{ASYNC, BenchPlugin, TRIVIAL, current_thread_runtime, small_object, yield_once};
use criterion::{Criterion, criterion_group, criterion_main};
use gateway_core::Gateway;
use gateway_core::frame::{encode_response, parse_request};
use jsonrpsee::types::{ErrorObjectOwned, Request};
use jsonrpsee::{ConnectionId, Extensions, MethodCallback, RpcModule};
use plugin_api::{ConnId, Params, RequestContext};
use std::hint::black_box;
use std::task::{Context, Waker};
use std::time::Duration;

/// Our request frame for `method`, with the same id and params as jsonrpsee's.
fn gateway_request(method: &str) -> String {
    format!(r#"{{"type":"req","id":"1","method":"{method}","params":{{}}}}"#)
}

/// The JSON-RPC 2.0 request for `method`.
fn jsonrpsee_request(method: &str) -> String {
    format!(r#"{{"jsonrpc":"2.0","id":"1","method":"{method}","params":{{}}}}"#)
}

/// One request through our gateway, as ws-proxy handles a frame.
async fn gateway_call(gateway: &Gateway, ctx: &RequestContext, text: &str) -> String {
    let frame = parse_request(text).expect("valid frame");
    let params = frame
        .params
        .map(|p| Params::from_raw(p.to_owned()))
        .unwrap_or_default();
    let result = gateway.dispatch(ctx.clone(), &frame.method, params).await;
    encode_response(&frame.id, &result)
}

/// One request through jsonrpsee's in-process API.
async fn jsonrpsee_call(module: &RpcModule<()>, text: &str) -> String {
    let (response, _subscriptions) = module
        .raw_json_request(text, 1)
        .await
        .expect("valid JSON-RPC request");
    String::from(Box::<str>::from(response))
}

/// One request through jsonrpsee's method table, without `raw_json_request`'s
/// per-call channel.
async fn jsonrpsee_callback_call(module: &RpcModule<()>, text: &str) -> String {
    let req: Request<'_> = serde_json::from_str(text).expect("valid JSON-RPC request");
    let params = jsonrpsee::types::Params::new(req.params.as_ref().map(|p| p.get()));
    let response = match module.method(&req.method) {
        Some(MethodCallback::Sync(cb)) => cb(req.id, params, usize::MAX, Extensions::new()),
        Some(MethodCallback::Async(cb)) => {
            cb(
                req.id.into_owned(),
                params.into_owned(),
                ConnectionId(0),
                usize::MAX,
                Extensions::new(),
            )
            .await
        }
        _ => unreachable!("bench methods are plain methods"),
    };
    String::from(Box::<str>::from(response.into_json()))
}

/// Whether `fut` is pending when first polled (it is then dropped).
fn pending_on_first_poll(fut: impl Future<Output = String>) -> bool {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    fut.as_mut().poll(&mut cx).is_pending()
}

fn jsonrpsee_module() -> RpcModule<()> {
    let mut module = RpcModule::new(());
    module
        .register_method(TRIVIAL, |_, _, _| Ok::<_, ErrorObjectOwned>(small_object()))
        .expect("register trivial");
    module
        .register_async_method(ASYNC, |_, _, _| async {
            Ok::<_, ErrorObjectOwned>(yield_once().await)
        })
        .expect("register async");
    module
}

fn dispatch(c: &mut Criterion) {
    let runtime = current_thread_runtime();
    let gateway = runtime.block_on(benches::start_gateway(vec![BenchPlugin::dispatch()]));
    let ctx = plugin_api::host::internal_context(ConnId(1));
    let module = jsonrpsee_module();

    for (label, method) in [("trivial", TRIVIAL), ("async", ASYNC)] {
        let ours = gateway_request(method);
        let theirs = jsonrpsee_request(method);
        // Same answer on both sides, or the comparison means nothing.
        let a = runtime.block_on(gateway_call(&gateway, &ctx, &ours));
        let b = runtime.block_on(jsonrpsee_call(&module, &theirs));
        let b2 = runtime.block_on(jsonrpsee_callback_call(&module, &theirs));
        assert!(
            a.contains(r#""ok":true,"payload":{"n":1,"ok":true}"#),
            "{a}"
        );
        assert!(b.contains(r#""result":{"n":1,"ok":true}"#), "{b}");
        assert_eq!(b, b2);
        if method == ASYNC {
            // "async" must mean async: the first poll of each side is pending.
            runtime.block_on(async {
                assert!(pending_on_first_poll(gateway_call(&gateway, &ctx, &ours)));
                assert!(pending_on_first_poll(jsonrpsee_call(&module, &theirs)));
                assert!(pending_on_first_poll(jsonrpsee_callback_call(
                    &module, &theirs
                )));
            });
        }

        let mut group = c.benchmark_group(format!("dispatch/{label}"));
        group
            .sample_size(50)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
        group.bench_function("gateway", |b| {
            b.to_async(&runtime)
                .iter(|| async { black_box(gateway_call(&gateway, &ctx, black_box(&ours)).await) })
        });
        group.bench_function("jsonrpsee", |b| {
            b.to_async(&runtime)
                .iter(|| async { black_box(jsonrpsee_call(&module, black_box(&theirs)).await) })
        });
        group.bench_function("jsonrpsee_callback", |b| {
            b.to_async(&runtime).iter(|| async {
                black_box(jsonrpsee_callback_call(&module, black_box(&theirs)).await)
            })
        });
        group.finish();
    }
}

criterion_group!(benches, dispatch);
criterion_main!(benches);
