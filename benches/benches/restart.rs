//! Scope build and swap.
//!
//! - `restart/plugins/{1,10,50}`: `Gateway::restart()` end to end (build the
//!   new scope, swap, drain the idle old one, stop and start services, drop
//!   the old one) with that many plugins of 10 sync methods and no services.
//! - `restart_with_service/plugins/{1,10,50}`: the same, each plugin also
//!   declaring one service whose start and stop return at once.
//! - `validate/plugins/50`: `Gateway::validate()`, a build that is discarded.
//!
//! Criterion reports means; the project target is a p99, so every measured
//! restart's own `RestartReport::duration` (trigger to new generation
//! serving) is also collected and its percentiles printed to stderr at the
//! end of the run.

use benches::{current_thread_runtime, fillers, start_gateway};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PLUGIN_COUNTS: [usize; 3] = [1, 10, 50];
const METHODS_PER_PLUGIN: usize = 10;

/// Each restart's reported duration, by group and plugin count.
type Durations = Arc<Mutex<Vec<(String, Vec<Duration>)>>>;

fn record(durations: &Durations, label: &str, d: Duration) {
    let mut all = durations.lock().unwrap_or_else(|e| e.into_inner());
    match all.iter_mut().find(|(l, _)| l == label) {
        Some((_, v)) => v.push(d),
        None => all.push((label.to_string(), vec![d])),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn report_percentiles(durations: &Durations) {
    let mut all = durations.lock().unwrap_or_else(|e| e.into_inner());
    eprintln!("\nrestart: RestartReport::duration (trigger to new generation serving)");
    for (label, v) in all.iter_mut() {
        v.sort_unstable();
        eprintln!(
            "  {label:<36} n={:<6} p50={:>9.3?} p99={:>9.3?} max={:>9.3?}",
            v.len(),
            percentile(v, 0.50),
            percentile(v, 0.99),
            percentile(v, 1.0),
        );
    }
}

fn restart(c: &mut Criterion) {
    let runtime = current_thread_runtime();
    let durations = Durations::default();
    for (group_name, service) in [("restart", false), ("restart_with_service", true)] {
        let mut group = c.benchmark_group(group_name);
        group
            .sample_size(50)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
        for count in PLUGIN_COUNTS {
            let gateway =
                runtime.block_on(start_gateway(fillers(count, METHODS_PER_PLUGIN, service)));
            let methods = gateway.current().registry().method_names().len();
            assert_eq!(methods, count * METHODS_PER_PLUGIN + 4);
            let label = format!("{group_name}/plugins/{count}");
            group.bench_function(BenchmarkId::new("plugins", count), |b| {
                b.to_async(&runtime).iter_custom(|iters| {
                    let gateway = gateway.clone();
                    let label = label.clone();
                    let durations = durations.clone();
                    async move {
                        let started = Instant::now();
                        for _ in 0..iters {
                            let report = gateway.restart().await.expect("restart succeeds");
                            record(&durations, &label, report.duration);
                            black_box(report);
                        }
                        started.elapsed()
                    }
                })
            });
            let stats = gateway.stats();
            assert_eq!(stats.live_scopes, 1, "old generations were dropped");
            assert_eq!(stats.restarts_failed, 0);
            runtime.block_on(gateway.shutdown(None));
        }
        group.finish();
    }

    let mut group = c.benchmark_group("validate");
    group
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let gateway = runtime.block_on(start_gateway(fillers(50, METHODS_PER_PLUGIN, false)));
    group.bench_function(BenchmarkId::new("plugins", 50), |b| {
        b.iter(|| black_box(gateway.validate().expect("config builds")))
    });
    group.finish();
    runtime.block_on(gateway.shutdown(None));

    report_percentiles(&durations);
}

criterion_group!(benches, restart);
criterion_main!(benches);
