//! The write meter: the bytes the WebSocket layer holds unwritten (pongs
//! and close frames included) count toward the connection's
//! `maxBufferedBytes` together with its outbox.

use super::LimitMetrics;
use crate::connection::Outbox;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes the WebSocket layer holds for one connection that the socket has
/// not taken yet, as seen at its last write attempt.
#[derive(Debug)]
pub(crate) struct WriteBacklog {
    bytes: Arc<AtomicUsize>,
    budget: usize,
    outbox: OnceLock<Weak<Outbox>>,
    tripped: AtomicBool,
    metrics: Arc<LimitMetrics>,
}

impl WriteBacklog {
    pub(crate) fn new(budget: usize, metrics: Arc<LimitMetrics>) -> Arc<Self> {
        Arc::new(WriteBacklog {
            bytes: Arc::new(AtomicUsize::new(0)),
            budget,
            outbox: OnceLock::new(),
            tripped: AtomicBool::new(false),
            metrics,
        })
    }

    /// Count this backlog in `outbox`'s budget, and close it when the two
    /// together exceed it.
    pub(crate) fn attach(&self, outbox: &Arc<Outbox>) {
        outbox.count_socket_backlog(self.bytes.clone());
        let _ = self.outbox.set(Arc::downgrade(outbox));
    }

    fn observe(&self, unwritten: usize) {
        self.bytes.store(unwritten, Ordering::Release);
        if unwritten == 0 {
            return;
        }
        let Some(outbox) = self.outbox.get().and_then(Weak::upgrade) else {
            return;
        };
        if unwritten + outbox.buffered() > self.budget && !self.tripped.swap(true, Ordering::AcqRel)
        {
            self.metrics.count(&self.metrics.write_backlog_closes);
            outbox.close_now(1008, "slow consumer");
        }
    }
}

/// A socket that reports, at each write attempt, how much the WebSocket
/// layer above it still holds (tungstenite writes its whole buffer each
/// time, so the length offered minus what the socket took is that backlog).
#[derive(Debug)]
pub(crate) struct WriteMeter<S> {
    inner: S,
    backlog: Arc<WriteBacklog>,
}

impl<S> WriteMeter<S> {
    pub(crate) fn new(inner: S, backlog: Arc<WriteBacklog>) -> Self {
        WriteMeter { inner, backlog }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteMeter<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteMeter<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        match &r {
            Poll::Ready(Ok(n)) => this.backlog.observe(data.len() - n),
            Poll::Pending => this.backlog.observe(data.len()),
            Poll::Ready(Err(_)) => {}
        }
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
