//! The HTTP stage's idle timeout: a socket wrapper that counts the bytes
//! moved through it, and a timer that fires when the count stands still.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A socket that counts the bytes moved through it (the HTTP stage's idle
/// timeout watches the count).
#[derive(Debug)]
pub(crate) struct Activity<S> {
    inner: S,
    moved: Arc<AtomicU64>,
}

impl<S> Activity<S> {
    pub(crate) fn new(inner: S) -> (Self, Arc<AtomicU64>) {
        let moved = Arc::new(AtomicU64::new(0));
        (
            Activity {
                inner,
                moved: moved.clone(),
            },
            moved,
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Activity<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.moved.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Activity<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &r {
            this.moved.fetch_add(*n as u64, Ordering::Relaxed);
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

/// Resolves once no byte moved for a whole `period` (checked every period,
/// so after between one and two periods of silence).
pub(crate) async fn idle(moved: Arc<AtomicU64>, period: Duration) {
    let mut last = moved.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(period).await;
        let now = moved.load(Ordering::Relaxed);
        if now == last {
            return;
        }
        last = now;
    }
}
