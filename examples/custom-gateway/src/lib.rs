//! The `greeter` plugin this example compiles into its gateway.
//!
//! It shows the pieces a compiled-in plugin uses: typed params, a scope, an
//! event declared in `register` and emitted through the generation's
//! [`EventSink`], and per-generation state that starts fresh at every restart.

use plugin_api::{EventSink, Plugin, PluginContext, PluginFactory, Registrar, RpcError, scope};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The plugin id, also its config section `[plugins.entries.greeter]`.
pub const PLUGIN_ID: &str = "greeter";
/// The event operators receive for every greeting (plugin events are named
/// `plugin.<id>.<name>`).
pub const GREETED: &str = "plugin.greeter.greeted";

/// Params of `greeter.hello`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Hello {
    name: String,
    #[serde(default = "one")]
    times: u8,
}

fn one() -> u8 {
    1
}

/// The answer of `greeter.hello`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Greeting {
    greeting: Vec<String>,
    greeted_this_generation: u64,
}

/// One generation's greeter: counts greetings since this generation began.
#[derive(Debug)]
struct Greeter {
    greeted: Arc<AtomicU64>,
    events: EventSink,
}

impl Plugin for Greeter {
    fn id(&self) -> &str {
        PLUGIN_ID
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn register(&self, r: &mut Registrar) {
        r.event(GREETED);
        let greeted = self.greeted.clone();
        let events = self.events.clone();
        r.method("greeter.hello")
            .scope(scope::READ)
            .typed(move |_ctx, hello: Hello| {
                if hello.times == 0 || hello.times > 10 {
                    return Err(RpcError::invalid_params("times must be 1 to 10"));
                }
                let count = greeted.fetch_add(1, Ordering::Relaxed) + 1;
                // Operators holding operator.read hear about every greeting.
                let _ = events.broadcast(
                    scope::READ,
                    GREETED,
                    &serde_json::json!({ "name": hello.name }),
                );
                Ok(Greeting {
                    greeting: vec![format!("hello, {}", hello.name); usize::from(hello.times)],
                    greeted_this_generation: count,
                })
            });
    }
}

/// The factory the gateway calls once per generation.
pub fn factory() -> PluginFactory {
    PluginFactory::new(
        PLUGIN_ID,
        env!("CARGO_PKG_VERSION"),
        |ctx: PluginContext| {
            Ok(Arc::new(Greeter {
                greeted: Arc::new(AtomicU64::new(0)),
                events: ctx.events.clone(),
            }))
        },
    )
}
