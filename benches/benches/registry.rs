//! Method lookup on 1 and 2 threads, with 36 methods registered (3 plugins of
//! 10 methods, the bench plugin's 2 and the core plugin's 4 in the gateway;
//! the same but the core's 4 in the bare registry).
//!
//! - `registry/gateway_lookup/{1,2}_threads`: the real dispatch path's lookup,
//!   `Gateway::current()` (an atomic pointer read plus a reference count) and
//!   `RestartScope::registry().get(name)`.
//! - `registry/gateway_admit/{1,2}_threads`: what `Gateway::dispatch` really
//!   does before calling the handler: `Gateway::admit()` (pointer read, the
//!   generation's admission counter) and the lookup, then the release.
//! - `registry/get/{1,2}_threads`: `Registry::get` alone on a shared
//!   `Arc<Registry>` built with `RegistryBuilder`.
//!
//! With 2 threads each thread does the full iteration count at once and the
//! figure is the slower thread's time per lookup: equal to the 1-thread figure
//! when lookups scale perfectly, larger when the threads contend.

use benches::{BenchPlugin, TRIVIAL, current_thread_runtime, fillers};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use gateway_core::{Gateway, Registry, RegistryBuilder};
use plugin_api::Plugin;
use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// A method registered by a filler plugin; looked up on every iteration.
const NAME: &str = "p1.m5";

/// The dispatch path's lookup; the entry is `black_box`ed while the scope it
/// borrows from is held.
fn gateway_lookup(gateway: &Gateway, name: &str) -> bool {
    let scope = gateway.current();
    black_box(scope.registry().get(name)).is_some()
}

/// Admission plus lookup, as `Gateway::dispatch` does them.
fn gateway_admit(gateway: &Gateway, name: &str) -> bool {
    let admitted = gateway.admit().expect("gateway is serving");
    black_box(admitted.scope().registry().get(name)).is_some()
}

/// Run `op` `iters` times on each of `threads` threads started together;
/// the slowest thread's elapsed time.
fn on_threads<F>(threads: usize, iters: u64, op: F) -> Duration
where
    F: Fn() -> bool + Sync,
{
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let started = Instant::now();
                    for _ in 0..iters {
                        black_box(op());
                    }
                    started.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .max()
            .unwrap_or_default()
    })
}

fn registry_of(plugins: &[BenchPlugin]) -> Arc<Registry> {
    let mut builder = RegistryBuilder::new();
    for p in plugins {
        builder
            .add_plugin(p.id(), p.declarations())
            .expect("no duplicates");
    }
    Arc::new(builder.build())
}

fn plugins() -> Vec<BenchPlugin> {
    let mut plugins = fillers(3, 10, false);
    plugins.push(BenchPlugin::dispatch());
    plugins
}

fn registry(c: &mut Criterion) {
    let runtime = current_thread_runtime();
    let gateway = runtime.block_on(benches::start_gateway(plugins()));
    assert_eq!(gateway.current().registry().method_names().len(), 36);
    assert!(gateway_lookup(&gateway, NAME) && gateway_lookup(&gateway, TRIVIAL));
    assert!(gateway_admit(&gateway, NAME));
    let registry = registry_of(&plugins());
    assert!(registry.get(NAME).is_some());

    let mut group = c.benchmark_group("registry");
    group
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for threads in [1, 2] {
        let id = format!("{threads}_threads");
        group.bench_function(BenchmarkId::new("gateway_lookup", &id), |b| {
            b.iter_custom(|iters| {
                on_threads(threads, iters, || {
                    gateway_lookup(black_box(&gateway), black_box(NAME))
                })
            })
        });
        group.bench_function(BenchmarkId::new("gateway_admit", &id), |b| {
            b.iter_custom(|iters| {
                on_threads(threads, iters, || {
                    gateway_admit(black_box(&gateway), black_box(NAME))
                })
            })
        });
        group.bench_function(BenchmarkId::new("get", &id), |b| {
            b.iter_custom(|iters| {
                on_threads(threads, iters, || {
                    black_box(black_box(&registry).get(black_box(NAME))).is_some()
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, registry);
criterion_main!(benches);
