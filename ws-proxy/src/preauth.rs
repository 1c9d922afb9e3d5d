//! A byte budget on what an unauthenticated client may make us read.
//!
//! tokio-tungstenite fixes its frame limits when the stream is created, at
//! `maxPayload` (25 MiB by default). Before the handshake the protocol allows
//! only 64 KiB, so the upgraded socket is wrapped: until the handshake
//! succeeds and [`PreauthBudget::lift`] is called, reads stop with
//! [`is_exceeded`] errors once the budget is spent, and the connection is
//! closed 1009 without ever buffering a large frame.

use crate::connection::Outbox;
use crate::limits::{Permit, WriteBacklog};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::WaitForCancellationFutureOwned;

const LIFTED: usize = usize::MAX;
const MARKER: &str = "preauth payload too large";
const EVICTED: &str = "evicted before authentication";

/// The bytes an unauthenticated connection may still send; shared between
/// the socket wrapper and the handshake. It also carries the connection's
/// place under the connection caps and its write backlog.
#[derive(Debug, Clone)]
pub(crate) struct PreauthBudget {
    bytes: Arc<AtomicUsize>,
    permit: Option<Arc<Permit>>,
    backlog: Option<Arc<WriteBacklog>>,
}

impl PreauthBudget {
    /// A budget of `bytes` (frame headers included).
    pub(crate) fn new(bytes: usize) -> Self {
        PreauthBudget {
            bytes: Arc::new(AtomicUsize::new(bytes)),
            permit: None,
            backlog: None,
        }
    }

    /// The connection's permit (released when the last clone drops) and
    /// write backlog.
    pub(crate) fn with_connection(
        mut self,
        permit: Arc<Permit>,
        backlog: Arc<WriteBacklog>,
    ) -> Self {
        self.permit = Some(permit);
        self.backlog = Some(backlog);
        self
    }

    /// Count the socket's write backlog in `outbox`'s budget.
    pub(crate) fn attach(&self, outbox: &Arc<Outbox>) {
        if let Some(b) = &self.backlog {
            b.attach(outbox);
        }
    }

    /// The client authenticated: no pre-auth limit any more, and the
    /// connection can no longer be evicted.
    pub(crate) fn lift(&self) {
        self.bytes.store(LIFTED, Ordering::Release);
        if let Some(p) = &self.permit {
            p.authenticated();
        }
    }

    fn remaining(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    fn spend(&self, n: usize) {
        let _ = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                (r != LIFTED).then(|| r.saturating_sub(n))
            });
    }
}

/// Whether `e` is the error a spent budget produces.
pub(crate) fn is_exceeded(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::InvalidData && e.to_string() == MARKER
}

/// A socket whose reads are capped by a [`PreauthBudget`], and end when the
/// connection is evicted before it authenticated.
pub(crate) struct PreauthCap<S> {
    inner: S,
    budget: PreauthBudget,
    scratch: Option<Box<[u8; 4096]>>,
    evicted: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl<S> std::fmt::Debug for PreauthCap<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreauthCap")
            .field("budget", &self.budget)
            .finish()
    }
}

impl<S> PreauthCap<S> {
    pub(crate) fn new(inner: S, budget: PreauthBudget) -> Self {
        let evicted = budget
            .permit
            .as_ref()
            .map(|p| Box::pin(p.evicted().clone().cancelled_owned()));
        PreauthCap {
            inner,
            budget,
            scratch: Some(Box::new([0; 4096])),
            evicted,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PreauthCap<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let remaining = this.budget.remaining();
        if remaining == LIFTED {
            // Authenticated: free what only the pre-auth path needs.
            this.scratch = None;
            this.evicted = None;
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if let Some(evicted) = &mut this.evicted
            && evicted.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                EVICTED,
            )));
        }
        if remaining == 0 {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, MARKER)));
        }
        // Read no more than the budget allows, through a small buffer (this
        // path only runs until the handshake is done).
        let scratch = this.scratch.get_or_insert_with(|| Box::new([0; 4096]));
        let n = remaining.min(buf.remaining()).min(scratch.len());
        let mut limited = ReadBuf::new(&mut scratch[..n]);
        match Pin::new(&mut this.inner).poll_read(cx, &mut limited) {
            Poll::Ready(Ok(())) => {
                let got = limited.filled();
                this.budget.spend(got.len());
                buf.put_slice(got);
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PreauthCap<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_stop_at_the_budget_until_lifted() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let budget = PreauthBudget::new(10);
        let mut capped = PreauthCap::new(server, budget.clone());
        client.write_all(&[7u8; 100]).await.unwrap();
        let mut buf = vec![0u8; 100];
        let mut total = 0;
        let err = loop {
            match capped.read(&mut buf[total..]).await {
                Ok(n) => total += n,
                Err(e) => break e,
            }
        };
        assert_eq!(total, 10);
        assert!(is_exceeded(&err));
        budget.lift();
        let n = capped.read(&mut buf).await.unwrap();
        assert_eq!(n, 90, "after lifting, reads pass straight through");
    }
}
