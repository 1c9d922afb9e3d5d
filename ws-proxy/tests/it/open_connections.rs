//! What a client holding one connection open observes, against the binary:
//! every pipelined request answered exactly once (bursts around the
//! writer's batch size and the in-flight cap, written in one TCP write),
//! `gateway.generation` N before any response generation N produced, and
//! restart signals (SIGHUP included) that never end the process.

use crate::common::*;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

/// The writer's batch (frames written between two flushes) in ws-proxy.
const BATCH: usize = 64;
const BUSY: &str = "The server is busy. Please try again in a moment.";

/// Append `text` as one client text frame. Client frames must be masked;
/// the all-zero key is a valid key that leaves the payload as it is.
fn push_frame(out: &mut Vec<u8>, text: &str) {
    let b = text.as_bytes();
    out.push(0x81);
    match b.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend((n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend((n as u64).to_be_bytes());
        }
    }
    out.extend([0u8; 4]);
    out.extend(b);
}

/// Write every request in ONE write on the raw socket.
async fn pipeline(c: &mut Client, requests: &[Value]) {
    let mut bytes = Vec::new();
    for r in requests {
        push_frame(&mut bytes, &r.to_string());
    }
    let sock = c.ws.get_mut();
    sock.write_all(&bytes).await.unwrap();
    sock.flush().await.unwrap();
}

fn req(id: &str, method: &str, params: Value) -> Value {
    json!({"type":"req","id":id,"method":method,"params":params})
}

/// One connection as its client sees it, checked frame by frame in arrival
/// order: `seq` counts events without gaps, `gateway.generation` only moves
/// forward, no response of a generation the connection was not told of yet
/// (`health` answers carry their generation), no `unknown method` for a
/// method the connection was last told exists, no id answered twice.
struct Observer {
    announced: u64,
    told: BTreeSet<String>,
    last_seq: u64,
    /// Method of every request sent and not yet answered.
    pending: HashMap<String, String>,
    answered: HashMap<String, Value>,
    /// Every frame after hello-ok, in order.
    frames: Vec<Value>,
    generation_events: u64,
}

impl Observer {
    fn new(hello: &Value) -> Observer {
        Observer {
            announced: hello["snapshot"]["generation"].as_u64().unwrap(),
            told: methods_of(&hello["features"]),
            last_seq: 0,
            pending: HashMap::new(),
            answered: HashMap::new(),
            frames: Vec::new(),
            generation_events: 0,
        }
    }

    fn sent(&mut self, requests: &[Value]) {
        for r in requests {
            let id = r["id"].as_str().unwrap().to_string();
            let method = r["method"].as_str().unwrap().to_string();
            assert!(self.pending.insert(id, method).is_none(), "id reused");
        }
    }

    fn see(&mut self, f: Value) -> Result<(), String> {
        self.frames.push(f.clone());
        if f["type"] == "event" {
            if let Some(seq) = f["seq"].as_u64() {
                if seq != self.last_seq + 1 {
                    return Err(format!("seq {seq} after {}", self.last_seq));
                }
                self.last_seq = seq;
            }
            if f["event"] == "gateway.generation" {
                let g = f["payload"]["generation"].as_u64().unwrap();
                if g <= self.announced {
                    return Err(format!("gateway.generation {g} after {}", self.announced));
                }
                self.announced = g;
                self.told = methods_of(&f["payload"]["features"]);
                self.generation_events += 1;
            }
            return Ok(());
        }
        let id = f["id"].as_str().unwrap_or_default().to_string();
        let Some(method) = self.pending.remove(&id) else {
            return Err(format!("{id} answered twice or never asked: {f}"));
        };
        if let Some(g) = f["payload"]["generation"].as_u64()
            && method == "health"
            && g > self.announced
        {
            return Err(format!(
                "response of generation {g} before its gateway.generation (last told {}): {f}",
                self.announced
            ));
        }
        let msg = f["error"]["message"].as_str().unwrap_or("");
        if msg.starts_with("unknown method") && self.told.contains(&method) {
            return Err(format!(
                "{method} was last advertised (generation {}) but answered {f}",
                self.announced
            ));
        }
        self.answered.insert(id, f);
        Ok(())
    }

    /// Read until every request sent is answered (an error naming the
    /// unanswered ids after 30 s: ticks keep a connection busy, so the
    /// per-frame wait alone would never end).
    async fn drain(&mut self, c: &mut Client) -> Result<(), String> {
        let deadline = Instant::now() + 3 * WAIT;
        while !self.pending.is_empty() {
            if Instant::now() > deadline {
                let mut ids: Vec<&String> = self.pending.keys().collect();
                ids.sort();
                return Err(format!("{} never answered: {ids:?}", ids.len()));
            }
            let f = c.next_frame().await.map_err(|closed| {
                format!("closed with {} unanswered: {closed:?}", self.pending.len())
            })?;
            self.see(f)?;
        }
        Ok(())
    }
}

/// `n` `health` requests with ids `<tag>-<i>`.
fn health_burst(n: usize, tag: &str) -> Vec<Value> {
    (0..n)
        .map(|i| req(&format!("{tag}-{i}"), "health", json!({})))
        .collect()
}

async fn start_with(plugins: &[(&str, &[(&str, &str)])], extra: &str) -> Proc {
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(dir.path(), extra);
    for (id, methods) in plugins {
        write_plugin(&dir.path().join("plugins"), id, methods);
    }
    Proc::start_in(dir, &["--config".into(), config.display().to_string()]).await
}

/// Burst sizes around the writer's batch and well beyond it; each burst is
/// one TCP write, several rounds on several connections at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_bursts_around_the_writer_batch_are_answered_once() {
    let p = start_with(
        &[],
        "[limits]\nmax_buffered_bytes = 1048576\ntick_interval_ms = 200\n",
    )
    .await;
    let sizes = [
        BATCH - 1,
        BATCH,
        BATCH + 1,
        200,
        5 * BATCH,
        1000,
        5 * BATCH + 1,
    ];
    let conns: Vec<_> = (0..4)
        .map(|k| {
            let url = p.url();
            tokio::spawn(async move {
                let (mut c, hello) = Client::admin(&url).await;
                let mut o = Observer::new(&hello);
                for round in 0..3 {
                    for n in sizes {
                        let burst = health_burst(n, &format!("c{k}r{round}n{n}"));
                        o.sent(&burst);
                        pipeline(&mut c, &burst).await;
                        o.drain(&mut c).await?;
                        // Inline answers keep the order they were asked in.
                        let got: Vec<&Value> =
                            o.frames.iter().filter(|f| f["type"] == "res").collect();
                        let tail = &got[got.len() - n..];
                        for (i, f) in tail.iter().enumerate() {
                            if f["id"] != burst[i]["id"] || f["ok"] != true {
                                return Err(format!("position {i} of {n}: {f}"));
                            }
                        }
                    }
                }
                // The byte accounting did not drift: ticks still flow and the
                // connection is open.
                loop {
                    let f = c.next_frame().await.map_err(|e| format!("{e:?}"))?;
                    let tick = f["event"] == "tick";
                    o.see(f)?;
                    if tick {
                        break;
                    }
                }
                Ok::<usize, String>(o.answered.len())
            })
        })
        .collect();
    let per_conn: usize = 3 * sizes.iter().sum::<usize>();
    for t in conns {
        let n = t.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n, per_conn);
    }
}

/// Many bursts on one connection with a small outbound cap: the connection
/// is never closed as a slow consumer and ticks keep coming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_bursts_keep_ticks_flowing_under_a_small_buffer_cap() {
    let p = start_with(
        &[],
        "[limits]\nmax_buffered_bytes = 262144\ntick_interval_ms = 100\n",
    )
    .await;
    let (mut c, hello) = Client::admin(&p.url()).await;
    let mut o = Observer::new(&hello);
    for round in 0..300 {
        let burst = health_burst(200, &format!("b{round}"));
        o.sent(&burst);
        pipeline(&mut c, &burst).await;
        o.drain(&mut c).await.unwrap_or_else(|e| panic!("{e}"));
    }
    let ticks_before = o.frames.iter().filter(|f| f["event"] == "tick").count();
    loop {
        let f = c.next_frame().await.expect("connection closed");
        let tick = f["event"] == "tick";
        o.see(f).unwrap();
        if tick {
            break;
        }
    }
    assert_eq!(o.answered.len(), 300 * 200);
    eprintln!("ticks during the bursts: {ticks_before}");
}

/// In-flight cap N = 8, bursts of N-1, N, N+1 and 5N slow requests in one
/// write: exactly the requests beyond the cap are answered busy
/// (retryable), the others complete, and the slots are free afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_cap_edges_answer_exactly_the_excess_busy() {
    const CAP: usize = 8;
    let p = start_with(
        &[("demo", &[("demo.sleep", "sleep")])],
        &format!("[limits]\nmax_in_flight = {CAP}\n"),
    )
    .await;
    let runs: Vec<_> = [CAP - 1, CAP, CAP + 1, 5 * CAP]
        .into_iter()
        .map(|n| {
            let url = p.url();
            tokio::spawn(async move {
                let (mut c, hello) = Client::admin(&url).await;
                let mut o = Observer::new(&hello);
                for round in 0..2 {
                    let burst: Vec<Value> = (0..n)
                        .map(|i| req(&format!("r{round}-{i}"), "demo.sleep", json!({"ms": 1500})))
                        .collect();
                    o.sent(&burst);
                    pipeline(&mut c, &burst).await;
                    o.drain(&mut c)
                        .await
                        .unwrap_or_else(|e| panic!("n={n}: {e}"));
                    for (i, r) in burst.iter().enumerate() {
                        let f = &o.answered[r["id"].as_str().unwrap()];
                        if i < CAP {
                            assert_eq!(f["payload"], json!({"slept": 1500}), "n={n} i={i}: {f}");
                        } else {
                            assert_eq!(f["error"]["code"], "UNAVAILABLE", "n={n} i={i}: {f}");
                            assert_eq!(f["error"]["message"], BUSY);
                            assert_eq!(f["error"]["retryable"], true);
                        }
                    }
                }
            })
        })
        .collect();
    for r in runs {
        r.await.unwrap();
    }
    let (_, _, body) = http(p.addr, "GET", "/metrics").await;
    let busy = metric(
        &body,
        r#"gateway_requests_total{method="demo.sleep",outcome="busy"}"#,
    );
    assert_eq!(busy, Some(2.0 * (1 + 4 * CAP) as f64), "{body}");
}

/// Deep pipelining during a SIGUSR1 storm: bursts of 1,000 mixed inline
/// (`health`) and async (`demo.sleep`) requests on several connections.
/// Every id answered once, only retryable errors, frame order held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_bursts_during_a_sigusr1_storm() {
    let p = start_with(
        &[("demo", &[("demo.sleep", "sleep")])],
        "[limits]\nmax_in_flight = 4096\n",
    )
    .await;
    let stop = Instant::now() + Duration::from_secs(6);
    let conns: Vec<_> = (0..4)
        .map(|k| {
            let url = p.url();
            tokio::spawn(async move {
                let (mut c, hello) = Client::admin(&url).await;
                let mut o = Observer::new(&hello);
                let mut round = 0;
                while Instant::now() < stop {
                    let burst: Vec<Value> = (0..1000)
                        .map(|i| {
                            let id = format!("c{k}r{round}-{i}");
                            if i % 4 == 3 {
                                req(&id, "demo.sleep", json!({"ms": 5 + (i % 5) * 10}))
                            } else {
                                req(&id, "health", json!({}))
                            }
                        })
                        .collect();
                    o.sent(&burst);
                    pipeline(&mut c, &burst).await;
                    o.drain(&mut c).await?;
                    round += 1;
                }
                let mut retried = 0;
                for f in o.answered.values() {
                    if f["ok"] != true {
                        if f["error"]["code"] != "UNAVAILABLE" || f["error"]["retryable"] != true {
                            return Err(format!("unexpected error: {f}"));
                        }
                        retried += 1;
                    }
                }
                Ok::<_, String>((o.answered.len(), retried, o.generation_events))
            })
        })
        .collect();
    let mut signals = 0;
    while Instant::now() < stop {
        tokio::time::sleep(Duration::from_millis(60)).await;
        p.signal(Signal::SIGUSR1);
        signals += 1;
    }
    let mut total = 0;
    for t in conns {
        let (n, retried, told) = t.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
        assert!(told >= 1, "a connection was never told of a new generation");
        eprintln!("{n} answered ({retried} retryable), {told} generation events");
        total += n;
    }
    assert!(total >= 4000, "{total}");
    let (_, _, body) = http(p.addr, "GET", "/metrics").await;
    let generation = metric(&body, "gateway_generation").unwrap();
    eprintln!("{signals} signals, generation {generation}");
    assert!(generation >= 3.0, "{generation}");
}

/// A method renamed on disk while a client keeps calling it across the
/// restart: client A holds generation 1, which advertises
/// `weather.today`; a 3 s request of another plugin is in flight; the
/// method is renamed on disk and SIGUSR1 sent while A keeps calling. A hears
/// `gateway.generation` 2 before any answer generation 2 produced, and is
/// never answered `unknown method` for a method it was last told exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_event_precedes_every_answer_of_that_generation() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(dir.path(), "");
    let plugins = dir.path().join("plugins");
    write_plugin(&plugins, "weather", &[("weather.today", "reply")]);
    write_plugin(&plugins, "slow", &[("slow.sleep", "sleep")]);
    let p = Proc::start_in(dir, &["--config".into(), config.display().to_string()]).await;
    let (mut a, hello) = Client::admin(&p.url()).await;
    let mut o = Observer::new(&hello);
    assert!(o.told.contains("weather.today"));
    let (mut b, _) = Client::admin(&p.url()).await;
    b.send_json(&req("slow", "slow.sleep", json!({"ms": 3000})))
        .await;
    // Let the slow request be admitted by generation 1.
    tokio::time::sleep(Duration::from_millis(200)).await;
    write_plugin(&plugins, "weather", &[("weather.now", "reply")]);
    p.signal(Signal::SIGUSR1);
    let started = Instant::now();
    let mut n = 0;
    let mut unknown_after_told = 0;
    // Call until generation 2 answered several calls and the slow request
    // finished.
    while started.elapsed() < Duration::from_secs(5) || o.announced < 2 {
        assert!(started.elapsed() < WAIT, "no generation 2 within {WAIT:?}");
        n += 1;
        let burst = [
            req(&format!("w{n}"), "weather.today", json!({})),
            req(&format!("h{n}"), "health", json!({})),
        ];
        o.sent(&burst);
        pipeline(&mut a, &burst).await;
        o.drain(&mut a).await.unwrap_or_else(|e| {
            panic!(
                "{e}\n+{:?} frames: {:#?}",
                started.elapsed(),
                &o.frames[o.frames.len().saturating_sub(6)..]
            )
        });
        if o.answered[&format!("w{n}")]["error"]["message"] == "unknown method: weather.today" {
            unknown_after_told += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(o.announced, 2);
    assert!(!o.told.contains("weather.today"));
    assert!(o.told.contains("weather.now"));
    assert!(unknown_after_told > 0, "generation 2 never answered A");
    assert_eq!(a.call("weather.now", json!({})).await["ok"], true);
    // The slow request completed on generation 1.
    assert_eq!(b.response("slow").await["payload"], json!({"slept": 3000}));
}

async fn generation_of(c: &mut Client) -> u64 {
    c.call("health", json!({})).await["payload"]["generation"]
        .as_u64()
        .unwrap()
}

/// SIGHUP restarts by default, like a reload; the connection stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_restarts_by_default() {
    let mut p = start_with(&[], "").await;
    let (mut c, _) = Client::admin(&p.url()).await;
    p.signal(Signal::SIGHUP);
    let ev = c.event("gateway.generation").await;
    assert_eq!(ev["payload"]["generation"], 2, "{ev}");
    p.signal(Signal::SIGHUP);
    let ev = c.event("gateway.generation").await;
    assert_eq!(ev["payload"]["generation"], 3, "{ev}");
    assert_eq!(generation_of(&mut c).await, 3);
    assert!(p.child.try_wait().unwrap().is_none(), "process exited");
}

/// With SIGHUP (and SIGUSR2) left out of `restart.signals` they are logged
/// and ignored, never an exit; a listed signal still restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlisted_restart_signals_are_logged_and_ignored() {
    let mut p = start_with(&[], "[restart]\nsignals = [\"SIGUSR1\"]\n").await;
    let (mut c, _) = Client::admin(&p.url()).await;
    p.signal(Signal::SIGHUP);
    p.signal(Signal::SIGUSR2);
    eventually(WAIT, "the ignored signals in the log", || async {
        let log = p.stderr();
        (log.contains("SIGHUP") && log.contains("SIGUSR2")).then_some(())
    })
    .await;
    assert!(p.child.try_wait().unwrap().is_none(), "process exited");
    assert_eq!(generation_of(&mut c).await, 1);
    p.signal(Signal::SIGUSR1);
    let ev = c.event("gateway.generation").await;
    assert_eq!(ev["payload"]["generation"], 2, "{ev}");
    assert!(c.events.iter().all(|e| e["event"] != "gateway.generation"));
    assert!(p.child.try_wait().unwrap().is_none(), "process exited");
}
