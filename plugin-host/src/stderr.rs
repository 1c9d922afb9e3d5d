//! A plugin's stderr: each line forwarded to `tracing` (target `plugin`,
//! tagged with plugin id, generation and pid) and the last lines kept for
//! error reports.

use crate::lines::{LineRead, read_line};
use crate::lock;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::io::BufReader;
use tracing::info;

/// The last lines a plugin wrote to stderr, for error reports.
#[derive(Debug)]
pub struct StderrTail {
    lines: Mutex<VecDeque<String>>,
    cap: usize,
}

impl StderrTail {
    pub(crate) fn new(cap: usize) -> Self {
        StderrTail {
            lines: Mutex::new(VecDeque::with_capacity(cap)),
            cap,
        }
    }

    fn push(&self, line: &str) {
        let mut l = lock(&self.lines);
        if l.len() == self.cap {
            l.pop_front();
        }
        l.push_back(line.chars().take(1000).collect());
    }

    /// The kept lines, oldest first.
    pub fn lines(&self) -> Vec<String> {
        lock(&self.lines).iter().cloned().collect()
    }
}

/// Forward the process's stderr line by line until it closes.
pub(crate) async fn stderr_loop(
    plugin: String,
    generation: u64,
    pid: u32,
    stderr: tokio::process::ChildStderr,
    tail: Arc<StderrTail>,
) {
    let mut r = BufReader::new(stderr);
    let mut buf = Vec::with_capacity(1024);
    loop {
        match read_line(&mut r, &mut buf, 8 * 1024, true).await {
            Ok(LineRead::Line) => {
                let line = String::from_utf8_lossy(&buf);
                info!(target: "plugin", plugin = %plugin, generation, pid, "{line}");
                tail.push(&line);
            }
            Ok(LineRead::TooLong) => {
                info!(target: "plugin", plugin = %plugin, generation, pid, "(a stderr line longer than 8 KiB was dropped)");
            }
            Ok(LineRead::Eof) | Err(_) => return,
        }
    }
}
