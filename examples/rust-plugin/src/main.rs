//! Example: a Rust plugin written against `plugin-api`, run out of process.
//!
//! `plugin_stdio::serve` is the only line that differs from a plugin
//! compiled into the gateway. Build it (`cargo build -p example-rust-plugin`)
//! and point a manifest's `runtime.command` at the binary (see
//! `examples/rust-plugin/openclaw.plugin.json`); after a rebuild, a restart
//! (SIGUSR1) runs the new code.
//!
//! - `rust-stats.mean` computes the mean of `params.values` and sends the
//!   caller a `plugin.rust-stats.computed` event first;
//! - the `counter` service counts calls while it runs and logs the count
//!   when it stops (to stderr, the plugin's log).

use plugin_api::{
    BoxFuture, Plugin, PluginContext, PluginFactory, Registrar, RpcError, Service, scope,
};
use serde_json::json;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

struct Counter {
    running: AtomicBool,
    calls: AtomicU64,
}

impl Service for Counter {
    fn name(&self) -> &str {
        "counter"
    }
    fn start(self: Arc<Self>) -> BoxFuture<Result<(), String>> {
        Box::pin(async move {
            self.running.store(true, Ordering::SeqCst);
            Ok(())
        })
    }
    fn stop(self: Arc<Self>) -> BoxFuture<()> {
        Box::pin(async move {
            self.running.store(false, Ordering::SeqCst);
            eprintln!(
                "rust-stats: counter stopped after {} calls",
                self.calls.load(Ordering::SeqCst)
            );
        })
    }
}

struct RustStats {
    ctx: PluginContext,
    counter: Arc<Counter>,
}

impl Plugin for RustStats {
    fn id(&self) -> &str {
        "rust-stats"
    }
    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }
    fn register(&self, r: &mut Registrar) {
        r.event("plugin.rust-stats.computed");
        r.service(self.counter.clone());
        let events = self.ctx.events.clone();
        let counter = self.counter.clone();
        let generation = self.ctx.generation();
        r.method("rust-stats.mean")
            .scope(scope::READ)
            .sync(move |ctx, params| {
                let values: Vec<f64> = params
                    .to_value()
                    .get("values")
                    .and_then(|v| serde_json::from_value(v.clone()).ok())
                    .ok_or_else(|| {
                        RpcError::invalid_params("values must be an array of numbers")
                    })?;
                if values.is_empty() {
                    return Err(RpcError::invalid_params("values must not be empty"));
                }
                let mean = values.iter().sum::<f64>() / values.len() as f64;
                let calls = counter.calls.fetch_add(1, Ordering::SeqCst) + 1;
                let _ = events.send(
                    &[ctx.conn_id()],
                    "plugin.rust-stats.computed",
                    &json!({"mean": mean}),
                );
                Ok(json!({
                    "mean": mean,
                    "count": values.len(),
                    "calls": calls,
                    "serviceRunning": counter.running.load(Ordering::SeqCst),
                    "generation": generation,
                }))
            });
    }
}

fn main() -> ExitCode {
    plugin_stdio::serve(PluginFactory::new(
        "rust-stats",
        env!("CARGO_PKG_VERSION"),
        |ctx: PluginContext| {
            Ok(Arc::new(RustStats {
                ctx,
                counter: Arc::new(Counter {
                    running: AtomicBool::new(false),
                    calls: AtomicU64::new(0),
                }),
            }) as Arc<dyn Plugin>)
        },
    ))
}
