//! One account's outbound queue as a pure state machine: which messages to
//! push, retry or dead-letter at a given instant, and how an ack ends a
//! message. No I/O and no clock of its own: every transition takes `now`,
//! so the retry schedule is tested without sleeping.

use crate::config::Config;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Instant;

/// One queued outbound message.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub(crate) message_id: String,
    pub(crate) session_key: String,
    pub(crate) payload: Value,
    /// Pushes so far.
    pub(crate) attempts: u32,
    /// When it is due (again).
    pub(crate) next_at: Instant,
    pub(crate) created_at: i64,
    pub(crate) last_error: Option<String>,
    /// A file for this message is being sent to the client.
    pub(crate) transferring: bool,
}

/// One account's queued messages in creation order (`seq`).
#[derive(Debug, Default)]
pub(crate) struct Queue {
    items: BTreeMap<i64, Pending>,
}

/// What the queue decided at one instant.
#[derive(Debug, Default)]
pub(crate) struct Step {
    /// Messages to push now, in order; their attempt is already counted
    /// and their next retry scheduled.
    pub(crate) push: Vec<i64>,
    /// Messages out of tries, removed from the queue: dead-letter them.
    pub(crate) dead: Vec<(i64, Pending)>,
    /// When to step again (`None`: only when something changes).
    pub(crate) next: Option<Instant>,
}

/// How a `bncr.ack` ends for a queued message.
#[derive(Debug)]
pub(crate) enum AckOutcome {
    /// Delivered: removed from the queue.
    Done,
    /// Removed: dead-letter it for `reason` (`fatal` or `retry-limit`).
    Dead(Pending, &'static str),
    /// Stays queued; the next push is due in this many ms.
    Retry(u64),
}

impl Queue {
    /// Queue `p` at its creation position `seq`.
    pub(crate) fn insert(&mut self, seq: i64, p: Pending) {
        self.items.insert(seq, p);
    }

    /// Remove a message.
    pub(crate) fn remove(&mut self, seq: i64) -> Option<Pending> {
        self.items.remove(&seq)
    }

    /// A message, to change it in place (file transfer bookkeeping).
    pub(crate) fn get_mut(&mut self, seq: i64) -> Option<&mut Pending> {
        self.items.get_mut(&seq)
    }

    /// How many are queued.
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Queued messages, oldest first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&i64, &Pending)> {
        self.items.iter()
    }

    /// The messages in the window (the `window` oldest), oldest first.
    pub(crate) fn window<'a>(&'a self, cfg: &Config) -> impl Iterator<Item = &'a Pending> {
        self.items.values().take(cfg.window)
    }

    /// Decide at `now` for the window: messages due are pushed (an attempt
    /// counted, the next one `backoff(attempts)` later); a due message that
    /// already had `retryLimit` pushes is removed for the dead letters and
    /// the next message moves into the window. Order: only the window's
    /// messages are ever pushed, so with `window = 1` a message is pushed
    /// only after every older one was acked or dead-lettered.
    pub(crate) fn step(&mut self, now: Instant, cfg: &Config) -> Step {
        let mut out = Step::default();
        let mut next: Option<Instant> = None;
        let mut soonest = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        let head: Vec<i64> = self.items.keys().take(cfg.window).copied().collect();
        for seq in head {
            let Some(p) = self.items.get_mut(&seq) else {
                continue;
            };
            if p.transferring {
                continue;
            }
            if p.next_at > now {
                soonest(p.next_at);
                continue;
            }
            if p.attempts >= cfg.retry_limit {
                if let Some(p) = self.items.remove(&seq) {
                    out.dead.push((seq, p));
                }
                // The next message moved into the window: step again now.
                soonest(now);
                continue;
            }
            p.attempts += 1;
            p.next_at = now + cfg.backoff(p.attempts);
            soonest(p.next_at);
            out.push.push(seq);
        }
        out.next = next;
        out
    }

    /// The client's `bncr.ack` for message `seq` at `now`. `None` when the
    /// message is not queued (acks are idempotent).
    pub(crate) fn ack(
        &mut self,
        seq: i64,
        ok: bool,
        fatal: bool,
        error: Option<String>,
        now: Instant,
        cfg: &Config,
    ) -> Option<AckOutcome> {
        if ok && !fatal {
            return self.items.remove(&seq).map(|_| AckOutcome::Done);
        }
        let p = self.items.get_mut(&seq)?;
        if fatal || p.attempts >= cfg.retry_limit {
            let mut p = self.items.remove(&seq)?;
            if error.is_some() {
                p.last_error = error;
            }
            return Some(AckOutcome::Dead(
                p,
                if fatal { "fatal" } else { "retry-limit" },
            ));
        }
        p.last_error = error;
        let wait = p.next_at.saturating_duration_since(now);
        Some(AckOutcome::Retry(wait.as_millis() as u64))
    }

    /// The push of `seq` reached no connection: not an attempt; due again
    /// as soon as the account has a connection.
    pub(crate) fn refused(&mut self, seq: i64, now: Instant) {
        if let Some(p) = self.items.get_mut(&seq) {
            p.attempts = p.attempts.saturating_sub(1);
            p.next_at = now;
        }
    }

    /// A file transfer for `seq` ended at `now`: the message's retry clock
    /// restarts from the end of the transfer.
    pub(crate) fn transfer_ended(&mut self, seq: i64, ok: bool, now: Instant, cfg: &Config) {
        if let Some(q) = self.items.get_mut(&seq) {
            q.transferring = false;
            q.next_at = now + cfg.backoff(q.attempts);
            if !ok {
                q.last_error = Some("file transfer failed".into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pending(id: &str, now: Instant) -> Pending {
        Pending {
            message_id: id.into(),
            session_key: "s".into(),
            payload: Value::Null,
            attempts: 0,
            next_at: now,
            created_at: 0,
            last_error: None,
            transferring: false,
        }
    }

    fn queue(ids: &[&str], now: Instant) -> Queue {
        let mut q = Queue::default();
        for (i, id) in ids.iter().enumerate() {
            q.insert(i as i64 + 1, pending(id, now));
        }
        q
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn retries_back_off_1_2_4_seconds_capped_then_dead_letter_after_10_tries() {
        let cfg = Config::default();
        let t0 = Instant::now();
        let mut q = queue(&["m"], t0);
        let mut now = t0;
        let mut pushes = Vec::new();
        loop {
            let step = q.step(now, &cfg);
            if !step.dead.is_empty() {
                assert_eq!(step.dead[0].1.message_id, "m");
                assert_eq!(step.dead[0].1.attempts, 10);
                break;
            }
            assert_eq!(step.push, [1], "due at {:?}", now - t0);
            pushes.push((now - t0).as_secs());
            // Nothing happens before the next retry is due.
            let next = step.next.unwrap();
            let early = q.step(next - Duration::from_millis(1), &cfg);
            assert!(early.push.is_empty() && early.dead.is_empty());
            now = next;
        }
        // Pushed at 0, then after 1, 2, 4, 8, 16, 32, 60, 60, 60 s.
        assert_eq!(pushes, [0, 1, 3, 7, 15, 31, 63, 123, 183, 243]);
        assert!(q.is_empty());
    }

    #[test]
    fn window_of_one_keeps_per_account_order_through_acks_and_nacks() {
        let cfg = Config::default();
        let now = Instant::now();
        let mut q = queue(&["a", "b", "c"], now);
        assert_eq!(q.step(now, &cfg).push, [1]);
        // Not acked yet: "b" is not pushed, however long we wait.
        let later = now + 30 * S;
        let step = q.step(later, &cfg);
        assert_eq!(step.push, [1], "only a retry of the head");
        // A nack keeps the head in place.
        match q.ack(1, false, false, Some("busy".into()), later, &cfg) {
            Some(AckOutcome::Retry(ms)) => assert!(ms > 0),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            q.ack(1, true, false, None, later, &cfg),
            Some(AckOutcome::Done)
        ));
        assert_eq!(q.iter().next().unwrap().1.message_id, "b");
        assert_eq!(q.step(later, &cfg).push, [2]);
        assert!(matches!(
            q.ack(2, true, false, None, later, &cfg),
            Some(AckOutcome::Done)
        ));
        assert_eq!(q.step(later, &cfg).push, [3]);
        // Acks are idempotent.
        assert!(q.ack(2, true, false, None, later, &cfg).is_none());
    }

    #[test]
    fn a_fatal_ack_dead_letters_at_once_and_the_next_moves_up() {
        let cfg = Config::default();
        let now = Instant::now();
        let mut q = queue(&["a", "b"], now);
        q.step(now, &cfg);
        match q.ack(1, false, true, Some("blocked".into()), now, &cfg) {
            Some(AckOutcome::Dead(p, reason)) => {
                assert_eq!((p.message_id.as_str(), reason), ("a", "fatal"));
                assert_eq!(p.last_error.as_deref(), Some("blocked"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(q.step(now, &cfg).push, [2]);
    }

    #[test]
    fn a_nack_after_the_last_try_dead_letters_for_retry_limit() {
        let cfg = Config {
            retry_limit: 2,
            ..Config::default()
        };
        let now = Instant::now();
        let mut q = queue(&["a"], now);
        q.step(now, &cfg);
        assert!(matches!(
            q.ack(1, false, false, None, now, &cfg),
            Some(AckOutcome::Retry(_))
        ));
        q.step(now + 2 * S, &cfg);
        assert!(matches!(
            q.ack(1, false, false, None, now + 2 * S, &cfg),
            Some(AckOutcome::Dead(_, "retry-limit"))
        ));
    }

    #[test]
    fn a_refused_push_is_not_an_attempt() {
        let cfg = Config::default();
        let now = Instant::now();
        let mut q = queue(&["a"], now);
        q.step(now, &cfg);
        q.refused(1, now);
        let step = q.step(now, &cfg);
        assert_eq!(step.push, [1], "due again at once");
        assert_eq!(q.iter().next().unwrap().1.attempts, 1);
    }

    #[test]
    fn a_wider_window_pushes_that_many_in_order() {
        let cfg = Config {
            window: 2,
            ..Config::default()
        };
        let now = Instant::now();
        let mut q = queue(&["a", "b", "c"], now);
        assert_eq!(q.step(now, &cfg).push, [1, 2]);
        assert!(matches!(
            q.ack(2, true, false, None, now, &cfg),
            Some(AckOutcome::Done)
        ));
        assert_eq!(q.step(now, &cfg).push, [3]);
    }
}
