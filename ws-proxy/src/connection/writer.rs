//! The writer task: takes items off a connection's outbox only when it is
//! about to write them, writes bursts with one flush, numbers events, and
//! writes `gateway.generation` before the first response or plugin event of
//! a generation the connection was not told of.

use super::{GENERATION_EVENT, OutboxReceiver, outbox::Outgoing};
use futures::{Sink, SinkExt};
use gateway_core::frame::encode_event;
use serde_json::value::RawValue;
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tracing::debug;

/// How long a close frame may take to go out.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Most frames written between two flushes.
pub(crate) const MAX_BATCH: usize = 64;

fn close_message(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_string().into(),
    }))
}

/// Per-connection state of the writer: the event counter and the newest
/// generation the connection has been told of.
struct WriterState<A> {
    seq: u64,
    announced: u64,
    /// The current generation and its `gateway.generation` payload.
    announce: A,
}

impl<A> WriterState<A>
where
    A: Fn() -> (u64, Arc<RawValue>),
{
    fn event(&mut self, name: &str, payload: &RawValue) -> Message {
        self.seq += 1;
        Message::text(encode_event(name, Some(payload), Some(self.seq)))
    }

    /// Before an item of `generation` (0: none): if the connection was not
    /// told of that generation yet, feed `gateway.generation` of the
    /// generation serving now. That is never older than `generation`: a
    /// response comes from a generation that admitted it, so it served, and
    /// the table queues no event of a generation that is not serving yet.
    async fn announce_up_to<S>(&mut self, sink: &mut S, generation: u64) -> Result<(), S::Error>
    where
        S: Sink<Message> + Unpin,
    {
        if generation <= self.announced {
            return Ok(());
        }
        let (current, payload) = (self.announce)();
        debug_assert!(current >= generation);
        if current > self.announced {
            self.announced = current;
            let notice = self.event(GENERATION_EVENT, &payload);
            sink.feed(notice).await?;
        }
        Ok(())
    }

    /// Feed one item to `sink` (a response or plugin event of a generation
    /// the connection was not told of yet is preceded by that generation's
    /// `gateway.generation`; one of an older generation, still handing
    /// over, is written as it is). Returns
    /// the close frame's code and reason for [`Outgoing::Close`], which is
    /// not fed.
    async fn feed<S>(
        &mut self,
        sink: &mut S,
        item: Outgoing,
    ) -> Result<Option<(u16, String)>, S::Error>
    where
        S: Sink<Message> + Unpin,
    {
        let msg = match item {
            Outgoing::Frame(s) => Message::text(s),
            Outgoing::Response(s, generation) => {
                self.announce_up_to(sink, generation).await?;
                Message::text(s)
            }
            Outgoing::Hello(s, generation) => {
                self.announced = self.announced.max(generation);
                Message::text(s)
            }
            Outgoing::Event(name, payload, generation) => {
                self.announce_up_to(sink, generation).await?;
                self.event(&name, &payload)
            }
            Outgoing::Generation(generation, payload) => {
                if generation <= self.announced {
                    return Ok(None);
                }
                self.announced = generation;
                self.event(GENERATION_EVENT, &payload)
            }
            Outgoing::Close(code, reason) => return Ok(Some((code, reason))),
        };
        sink.feed(msg).await?;
        Ok(None)
    }
}

/// What woke the writer.
enum Wake {
    Item(Outgoing),
    Ping,
}

/// Write `first` and up to `MAX_BATCH - 1` more items already queued, then
/// flush once: one write for a burst of pipelined responses. An item is
/// taken off the queue only when it is about to be written, so a batch
/// that ends leaves the rest queued for the next. Returns the close frame
/// to send when the batch reached [`Outgoing::Close`] (everything before it
/// is flushed).
async fn write_batch<S, A>(
    sink: &mut S,
    rx: &mut OutboxReceiver,
    state: &mut WriterState<A>,
    first: Wake,
) -> Result<Option<(u16, String)>, S::Error>
where
    S: Sink<Message> + Unpin,
    A: Fn() -> (u64, Arc<RawValue>),
{
    let mut next = Some(first);
    let mut written = 0;
    while let Some(wake) = next.take() {
        match wake {
            Wake::Ping => sink.feed(Message::Ping(Vec::new().into())).await?,
            Wake::Item(item) => {
                if let Some(close) = state.feed(sink, item).await? {
                    sink.flush().await?;
                    return Ok(Some(close));
                }
            }
        }
        written += 1;
        if written < MAX_BATCH {
            next = rx.try_recv().map(Wake::Item);
        }
    }
    sink.flush().await?;
    Ok(None)
}

/// Write the outbox to `sink` until a close frame went out, the connection
/// was aborted, or the socket failed; pings every `ping_every`. `announce`
/// gives the current generation and its `gateway.generation` payload;
/// `announced` is the generation the connection knows at start (0 before
/// hello-ok).
pub(crate) async fn run_writer<S, A>(
    mut rx: OutboxReceiver,
    mut sink: S,
    ping_every: Duration,
    announce: A,
) where
    S: Sink<Message> + Unpin,
    A: Fn() -> (u64, Arc<RawValue>),
{
    let outbox = rx.outbox.clone();
    let mut state = WriterState {
        seq: 0,
        announced: 0,
        announce,
    };
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    // Registered once, not once per frame.
    let abort = outbox.abort.cancelled();
    let closed = outbox.closed.cancelled();
    tokio::pin!(abort, closed);
    loop {
        let first = tokio::select! {
            biased;
            () = &mut abort => break,
            () = &mut closed => break,
            item = rx.recv() => match item {
                None => break,
                Some(item) => Wake::Item(item),
            },
            _ = ping.tick() => Wake::Ping,
        };
        let written = tokio::select! {
            biased;
            () = &mut abort => break,
            r = write_batch(&mut sink, &mut rx, &mut state, first) => r,
        };
        match written {
            Err(_) => {
                outbox.closed.cancel();
                return;
            }
            Ok(None) => {}
            Ok(Some((code, reason))) => {
                let _ = tokio::time::timeout(
                    CLOSE_WRITE_TIMEOUT,
                    sink.send(close_message(code, &reason)),
                )
                .await;
                debug!(code, reason = %reason, "close frame sent");
                outbox.closed.cancel();
                return;
            }
        }
    }
    let reason = outbox
        .abort_reason
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let Some((code, reason)) = reason {
        debug!(code, reason = %reason, "closing connection");
        let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, sink.send(close_message(code, &reason)))
            .await;
    }
    outbox.closed.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::Outbox;
    use crate::connection::outbox::ITEM_OVERHEAD;
    use crate::connection::test_raw as raw;
    use plugin_api::host::OutboundEvent;
    use std::pin::Pin;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};

    /// A socket that keeps every frame written and counts flushes.
    #[derive(Clone, Default)]
    struct Recorder {
        frames: Arc<Mutex<Vec<Message>>>,
        flushes: Arc<AtomicUsize>,
    }

    impl Recorder {
        fn texts(&self) -> Vec<String> {
            self.frames
                .lock()
                .unwrap()
                .iter()
                .filter_map(|m| match m {
                    Message::Text(t) => Some(t.as_str().to_string()),
                    _ => None,
                })
                .collect()
        }
        fn len(&self) -> usize {
            self.frames.lock().unwrap().len()
        }
        fn close(&self) -> Option<(u16, String)> {
            self.frames.lock().unwrap().iter().find_map(|m| match m {
                Message::Close(Some(f)) => Some((u16::from(f.code), f.reason.to_string())),
                _ => None,
            })
        }
    }

    impl Sink<Message> for Recorder {
        type Error = std::io::Error;
        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
            self.frames.lock().unwrap().push(item);
            Ok(())
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            self.flushes.fetch_add(1, Ordering::Relaxed);
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Generation 1 serving, forever.
    fn generation_one() -> (u64, Arc<RawValue>) {
        (1, raw(r#"{"generation":1}"#))
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// Queue `n` numbered frames, then a close; run the writer to the end.
    async fn write_burst(n: usize) -> (Recorder, Arc<Outbox>) {
        let (outbox, rx) = Outbox::new(1 << 24);
        for i in 0..n {
            assert!(outbox.frame(format!("f{i}")));
        }
        outbox.close(1000, "done");
        let rec = Recorder::default();
        run_writer(rx, rec.clone(), HOUR, generation_one).await;
        (rec, outbox)
    }

    /// Wait until the writer wrote `n` messages; a writer that stops short
    /// fails the test instead of hanging it.
    async fn until_len(rec: &Recorder, n: usize) {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while rec.len() < n {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "the writer wrote {} of {n} messages",
            rec.len()
        );
    }

    #[tokio::test]
    async fn every_frame_of_a_burst_is_written_in_order_at_batch_edges() {
        for n in [
            1,
            MAX_BATCH - 1,
            MAX_BATCH,
            MAX_BATCH + 1,
            2 * MAX_BATCH + 1,
            5 * MAX_BATCH,
            200,
        ] {
            let (rec, outbox) = write_burst(n).await;
            let want: Vec<String> = (0..n).map(|i| format!("f{i}")).collect();
            assert_eq!(rec.texts(), want, "burst of {n}");
            assert_eq!(rec.close(), Some((1000, "done".into())), "burst of {n}");
            assert_eq!(outbox.buffered.load(Ordering::Acquire), 0, "burst of {n}");
            // One flush per batch, not one per frame.
            let flushes = rec.flushes.load(Ordering::Relaxed);
            assert!(flushes <= n / MAX_BATCH + 2, "{flushes} flushes for {n}");
        }
    }

    #[tokio::test]
    async fn bursts_queued_while_the_writer_runs_arrive_in_order() {
        let (outbox, rx) = Outbox::new(1 << 24);
        let rec = Recorder::default();
        let writer = tokio::spawn(run_writer(rx, rec.clone(), HOUR, generation_one));
        let mut sent = 0;
        for n in [MAX_BATCH - 1, MAX_BATCH, MAX_BATCH + 1, 5 * MAX_BATCH] {
            for _ in 0..n {
                assert!(outbox.frame(format!("f{sent}")));
                sent += 1;
            }
            tokio::task::yield_now().await;
        }
        outbox.close(1000, "done");
        writer.await.unwrap();
        let want: Vec<String> = (0..sent).map(|i| format!("f{i}")).collect();
        assert_eq!(rec.texts(), want);
        assert_eq!(outbox.buffered.load(Ordering::Acquire), 0);
    }

    /// A frame whose queue cost is exactly `cost` bytes.
    fn frame_costing(cost: usize) -> String {
        "x".repeat(cost - ITEM_OVERHEAD)
    }

    #[tokio::test]
    async fn queue_cap_edges_write_everything_accepted_or_close_1008() {
        const CAP: usize = 10_000;
        for total in [CAP - 1, CAP, CAP + 1] {
            let (outbox, rx) = Outbox::new(CAP);
            // Nine frames of 1000 bytes and one making up the rest.
            let mut frames: Vec<String> = (0..9).map(|_| frame_costing(1000)).collect();
            frames.push(frame_costing(total - 9000));
            let accepted: Vec<bool> = frames.iter().map(|f| outbox.frame(f.clone())).collect();
            assert!(accepted[..9].iter().all(|a| *a), "total {total}");
            let rec = Recorder::default();
            if total <= CAP {
                assert!(accepted[9], "total {total} fits the cap");
                assert_eq!(outbox.buffered.load(Ordering::Acquire), total);
                outbox.close(1000, "done");
                run_writer(rx, rec.clone(), HOUR, generation_one).await;
                assert_eq!(rec.texts(), frames, "total {total}");
                assert_eq!(rec.close(), Some((1000, "done".into())));
            } else {
                assert!(!accepted[9], "total {total} is over the cap");
                run_writer(rx, rec.clone(), HOUR, generation_one).await;
                assert_eq!(rec.close(), Some((1008, "slow consumer".into())));
            }
            assert_eq!(outbox.buffered.load(Ordering::Acquire), 0, "total {total}");
            assert!(outbox.closed().is_cancelled());
        }
    }

    #[tokio::test]
    async fn ticks_keep_flowing_after_many_bursts_with_a_small_cap() {
        let (outbox, rx) = Outbox::new(16 * 1024);
        let rec = Recorder::default();
        let writer = tokio::spawn(run_writer(rx, rec.clone(), HOUR, generation_one));
        let mut expected = 0;
        for round in 0..1000 {
            for i in 0..150 {
                assert!(outbox.frame(format!("r{round}-{i}")), "round {round}");
            }
            expected += 150;
            until_len(&rec, expected).await;
            assert_eq!(outbox.buffered.load(Ordering::Acquire), 0, "round {round}");
            assert!(
                outbox.event_if_idle("tick".into(), raw("{}")),
                "round {round}"
            );
            expected += 1;
        }
        outbox.close(1000, "done");
        writer.await.unwrap();
        assert_eq!(rec.len(), expected + 1);
        assert!(!outbox.abort.is_cancelled());
    }

    fn parsed(rec: &Recorder) -> Vec<serde_json::Value> {
        rec.texts()
            .iter()
            .map(|t| serde_json::from_str(t).unwrap())
            .collect()
    }

    /// What the client saw: `event#seq:payload.generation` for events, the
    /// id for responses.
    fn shape(rec: &Recorder) -> Vec<String> {
        parsed(rec)
            .iter()
            .map(|f| match f["type"].as_str().unwrap() {
                "event" => format!(
                    "{}#{}:{}",
                    f["event"].as_str().unwrap(),
                    f["seq"],
                    f["payload"]["generation"]
                ),
                _ => f["id"].as_str().unwrap().to_string(),
            })
            .collect()
    }

    /// A plugin event `name` emitted by `generation` (payload `{}`).
    fn plugin_event(name: &str, generation: u64) -> OutboundEvent {
        OutboundEvent {
            name: name.into(),
            payload: raw("{}"),
            generation,
        }
    }

    #[tokio::test]
    async fn a_generation_is_announced_before_its_first_event_exactly_once() {
        let announce = || (2, raw(r#"{"generation":2}"#));
        let (outbox, rx) = Outbox::new(1 << 20);
        outbox.hello(r#"{"type":"res","id":"hello"}"#.into(), 1);
        outbox.plugin_event(&plugin_event("p.a", 1));
        // The first event of generation 2 comes before its broadcast.
        outbox.plugin_event(&plugin_event("p.b", 2));
        outbox.plugin_event(&plugin_event("p.c", 2));
        outbox.response(r#"{"type":"res","id":"r2"}"#.into(), 2);
        outbox.generation(2, raw(r#"{"generation":2}"#));
        // Generation 1 still hands over: its events and responses go out
        // as they are, with no older notice.
        outbox.plugin_event(&plugin_event("p.d", 1));
        outbox.response(r#"{"type":"res","id":"r1"}"#.into(), 1);
        outbox.event("tick".into(), raw("{}"));
        outbox.plugin_event(&plugin_event("p.e", 2));
        outbox.close(1000, "done");
        let rec = Recorder::default();
        run_writer(rx, rec.clone(), HOUR, announce).await;
        assert_eq!(
            shape(&rec),
            [
                "hello",
                "p.a#1:null",
                "gateway.generation#2:2",
                "p.b#3:null",
                "p.c#4:null",
                "r2",
                "p.d#5:null",
                "r1",
                "tick#6:null",
                "p.e#7:null",
            ]
        );
        assert_eq!(outbox.buffered.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn responses_and_events_of_new_generations_share_one_notice_each() {
        // Three generations, their responses and events interleaved, each
        // kind first in turn; the connection serves 4 by the end.
        let serving = Arc::new(AtomicUsize::new(2));
        let now = serving.clone();
        let announce = move || {
            let g = now.load(Ordering::SeqCst) as u64;
            (g, raw(&format!(r#"{{"generation":{g}}}"#)))
        };
        let (outbox, rx) = Outbox::new(1 << 20);
        let rec = Recorder::default();
        let writer = tokio::spawn(run_writer(rx, rec.clone(), HOUR, announce));
        outbox.hello(r#"{"type":"res","id":"hello"}"#.into(), 1);
        // Generation 2: a response first.
        outbox.response(r#"{"type":"res","id":"r2"}"#.into(), 2);
        outbox.plugin_event(&plugin_event("p.2", 2));
        until_len(&rec, 3).await;
        // Generation 3: an event first.
        serving.store(3, Ordering::SeqCst);
        outbox.plugin_event(&plugin_event("p.3", 3));
        outbox.response(r#"{"type":"res","id":"r3"}"#.into(), 3);
        outbox.plugin_event(&plugin_event("p.2late", 2));
        until_len(&rec, 7).await;
        // Generation 4 serves already when an event of 3 the connection was
        // told of and one of 4 arrive: one notice, naming 4.
        serving.store(4, Ordering::SeqCst);
        outbox.plugin_event(&plugin_event("p.3b", 3));
        outbox.plugin_event(&plugin_event("p.4", 4));
        outbox.generation(4, raw(r#"{"generation":4}"#));
        outbox.response(r#"{"type":"res","id":"r4"}"#.into(), 4);
        outbox.close(1000, "done");
        writer.await.unwrap();
        assert_eq!(
            shape(&rec),
            [
                "hello",
                "gateway.generation#1:2",
                "r2",
                "p.2#2:null",
                "gateway.generation#3:3",
                "p.3#4:null",
                "r3",
                "p.2late#5:null",
                "p.3b#6:null",
                "gateway.generation#7:4",
                "p.4#8:null",
                "r4",
            ]
        );
    }

    #[tokio::test]
    async fn a_generation_is_announced_before_its_first_response() {
        let announce = || (2, raw(r#"{"generation":2}"#));
        let (outbox, rx) = Outbox::new(1 << 20);
        outbox.hello(r#"{"type":"res","id":"hello"}"#.into(), 1);
        outbox.response(r#"{"type":"res","id":"a","g":1}"#.into(), 1);
        outbox.response(r#"{"type":"res","id":"b","g":2}"#.into(), 2);
        // The broadcast of generation 2 arrives late: skipped.
        outbox.generation(2, raw(r#"{"generation":2}"#));
        outbox.response(r#"{"type":"res","id":"c","g":1}"#.into(), 1);
        outbox.event("tick".into(), raw("{}"));
        outbox.generation(3, raw(r#"{"generation":3}"#));
        outbox.response(r#"{"type":"res","id":"d","g":3}"#.into(), 3);
        outbox.response(r#"{"type":"res","id":"e","g":0}"#.into(), 0);
        outbox.close(1000, "done");
        let rec = Recorder::default();
        run_writer(rx, rec.clone(), HOUR, announce).await;
        assert_eq!(
            shape(&rec),
            [
                "hello",
                "a",
                "gateway.generation#1:2",
                "b",
                "c",
                "tick#2:null",
                "gateway.generation#3:3",
                "d",
                "e"
            ]
        );
    }

    #[tokio::test]
    async fn the_announcement_names_the_generation_serving_now() {
        // A response of generation 2 written while 4 serves: the connection
        // is told 4 (whose features it can rely on), and nothing older later.
        let announce = || (4, raw(r#"{"generation":4}"#));
        let (outbox, rx) = Outbox::new(1 << 20);
        outbox.hello("{\"type\":\"res\",\"id\":\"hello\"}".into(), 1);
        outbox.response("{\"type\":\"res\",\"id\":\"a\"}".into(), 2);
        outbox.generation(3, raw(r#"{"generation":3}"#));
        outbox.response("{\"type\":\"res\",\"id\":\"b\"}".into(), 4);
        outbox.generation(5, raw(r#"{"generation":5}"#));
        outbox.close(1000, "done");
        let rec = Recorder::default();
        run_writer(rx, rec.clone(), HOUR, announce).await;
        let gens: Vec<(u64, u64)> = parsed(&rec)
            .iter()
            .filter(|f| f["event"] == GENERATION_EVENT)
            .map(|f| {
                (
                    f["seq"].as_u64().unwrap(),
                    f["payload"]["generation"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(gens, [(1, 4), (2, 5)]);
        assert_eq!(outbox.buffered.load(Ordering::Acquire), 0);
    }
}
