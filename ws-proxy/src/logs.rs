//! The in-memory log ring behind `logs.tail`: a bounded copy of the most
//! recent log lines, fed by a `tracing` layer next to the stderr writer.
//!
//! Logging belongs to the process (one global subscriber), so the ring does
//! too: [`crate::init_logging`] installs the layer that fills it; [`ring`] reads it. Memory is bounded by
//! [`RING_LINES`] lines of at most [`MAX_LINE_BYTES`] bytes each.

use serde::Serialize;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// Lines the ring keeps.
pub const RING_LINES: usize = 2000;
/// Longest line kept; longer lines are cut at a char boundary and marked.
pub const MAX_LINE_BYTES: usize = 2048;

/// One log line.
#[derive(Debug, Clone, Serialize)]
pub struct LogLine {
    /// Position in the process's log: 1 for the first line, counting up.
    pub cursor: u64,
    /// Unix ms.
    pub ts: u64,
    /// `ERROR`, `WARN`, `INFO`, `DEBUG` or `TRACE`.
    pub level: &'static str,
    /// The module that logged it.
    pub target: String,
    /// The message and fields, `message key=value ...`.
    pub message: String,
}

/// A page of the ring, newest last.
#[derive(Debug, Clone, Serialize)]
pub struct Tail {
    /// Lines after the asked cursor, oldest first.
    pub lines: Vec<LogLine>,
    /// Pass back as `cursor` to get only newer lines.
    pub cursor: u64,
    /// Lines between the asked cursor and the first line returned were lost
    /// (overwritten, or left out to respect the limits).
    pub truncated: bool,
    /// The asked cursor is ahead of the log (a different process): start again.
    pub reset: bool,
}

/// A bounded ring of recent log lines.
#[derive(Debug)]
pub struct LogRing {
    inner: Mutex<RingInner>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct RingInner {
    lines: VecDeque<LogLine>,
    /// Cursor of the newest line (0: none yet).
    last: u64,
}

impl LogRing {
    /// An empty ring keeping `capacity` lines.
    pub fn new(capacity: usize) -> Self {
        LogRing {
            inner: Mutex::new(RingInner::default()),
            capacity: capacity.max(1),
        }
    }

    fn push(&self, ts: u64, level: &'static str, target: &str, mut message: String) {
        if message.len() > MAX_LINE_BYTES {
            let mut cut = MAX_LINE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str(" …");
        }
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.last += 1;
        let line = LogLine {
            cursor: g.last,
            ts,
            level,
            target: target.to_string(),
            message,
        };
        if g.lines.len() == self.capacity {
            g.lines.pop_front();
        }
        g.lines.push_back(line);
    }

    /// Lines after `cursor` (all kept lines when `None`), at most `limit`
    /// and about `max_bytes` of text, newest kept when something must go.
    pub fn tail(&self, cursor: Option<u64>, limit: usize, max_bytes: usize) -> Tail {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let reset = cursor.is_some_and(|c| c > g.last);
        let after = if reset { 0 } else { cursor.unwrap_or(0) };
        let mut picked: Vec<LogLine> = Vec::new();
        let mut bytes = 0;
        for line in g.lines.iter().rev() {
            if line.cursor <= after || picked.len() >= limit {
                break;
            }
            let cost = line.message.len() + line.target.len() + 48;
            if bytes + cost > max_bytes && !picked.is_empty() {
                break;
            }
            bytes += cost;
            picked.push(line.clone());
        }
        picked.reverse();
        let first = picked.first().map_or(g.last + 1, |l| l.cursor);
        // Something was lost when the first line returned is not the one
        // right after the cursor (only meaningful when a cursor was given).
        let truncated = cursor.is_some() && !reset && first > after + 1;
        Tail {
            lines: picked,
            cursor: g.last,
            truncated,
            reset,
        }
    }
}

static RING: OnceLock<LogRing> = OnceLock::new();

/// The process's log ring (empty until [`crate::init_logging`] installed the layer).
pub fn ring() -> &'static LogRing {
    RING.get_or_init(|| LogRing::new(RING_LINES))
}

/// The tracing layer feeding [`ring`].
#[derive(Debug, Default, Clone, Copy)]
pub struct RingLayer;

impl<S: Subscriber> Layer<S> for RingLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut v = LineVisitor::default();
        event.record(&mut v);
        let meta = event.metadata();
        let level = match *meta.level() {
            tracing::Level::ERROR => "ERROR",
            tracing::Level::WARN => "WARN",
            tracing::Level::INFO => "INFO",
            tracing::Level::DEBUG => "DEBUG",
            tracing::Level::TRACE => "TRACE",
        };
        let mut line = v.message;
        if !v.fields.is_empty() {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(&v.fields);
        }
        ring().push(crate::server::unix_ms(), level, meta.target(), line);
    }
}

#[derive(Default)]
struct LineVisitor {
    message: String,
    fields: String,
}

impl Visit for LineVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.sep();
            let _ = write!(self.fields, "{}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.sep();
            let _ = write!(self.fields, "{}={value:?}", field.name());
        }
    }
}

impl LineVisitor {
    fn sep(&mut self) {
        if !self.fields.is_empty() {
            self.fields.push(' ');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(n: u64, capacity: usize) -> LogRing {
        let r = LogRing::new(capacity);
        for i in 1..=n {
            r.push(i, "INFO", "t", format!("line {i}"));
        }
        r
    }

    #[test]
    fn keeps_the_newest_lines_up_to_capacity_and_reports_what_was_lost() {
        let cap = 5;
        for n in [cap as u64 - 1, cap as u64, cap as u64 + 1, 5 * cap as u64] {
            let r = filled(n, cap);
            let t = r.tail(None, 100, 1 << 20);
            assert_eq!(t.lines.len(), (n as usize).min(cap), "n={n}");
            assert_eq!(t.lines.last().unwrap().cursor, n);
            assert_eq!(t.cursor, n);
            // From cursor 0 something was lost once the ring wrapped.
            assert_eq!(r.tail(Some(0), 100, 1 << 20).truncated, n > cap as u64);
        }
    }

    #[test]
    fn a_cursor_returns_only_newer_lines_in_order() {
        let r = filled(10, 100);
        let t = r.tail(Some(7), 100, 1 << 20);
        let got: Vec<u64> = t.lines.iter().map(|l| l.cursor).collect();
        assert_eq!(got, vec![8, 9, 10]);
        assert!(!t.truncated && !t.reset);
        let none = r.tail(Some(10), 100, 1 << 20);
        assert!(none.lines.is_empty() && none.cursor == 10 && !none.truncated);
        let ahead = r.tail(Some(99), 100, 1 << 20);
        assert!(ahead.reset);
        assert_eq!(ahead.lines.len(), 10);
    }

    #[test]
    fn limits_keep_the_newest_lines_and_mark_the_gap() {
        let r = filled(50, 100);
        let t = r.tail(Some(0), 3, 1 << 20);
        let got: Vec<u64> = t.lines.iter().map(|l| l.cursor).collect();
        assert_eq!(got, vec![48, 49, 50]);
        assert!(t.truncated);
        // A byte budget below one line still returns the newest line.
        let t = r.tail(None, 100, 1);
        assert_eq!(t.lines.len(), 1);
        let t = r.tail(None, 100, 3 * 60);
        assert!(t.lines.len() < 5, "{}", t.lines.len());
    }

    #[test]
    fn long_lines_are_cut_at_a_char_boundary() {
        let r = LogRing::new(2);
        r.push(1, "WARN", "t", "é".repeat(MAX_LINE_BYTES));
        let t = r.tail(None, 1, 1 << 20);
        let m = &t.lines[0].message;
        assert!(
            m.len() <= MAX_LINE_BYTES + 4 && m.ends_with('…'),
            "{}",
            m.len()
        );
    }
}
