//! [`TetherStream`]: one stream of a tunnel as `AsyncRead + AsyncWrite` (shutdown is half-close).
//!
//! A handle only: the bytes wait in the session's receive and send buffers, and what becomes
//! of a stream whose handle is dropped is the session's drop policy (`Session::abandon`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tether_proto::{ApiError, ErrorCode, StreamId};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::buffer::Chunks;
use crate::tunnel::Tunnel;

/// One stream through a tunnel.
///
/// Reading takes bytes the peer sent; their credit (SPEC 6.3) returns when `AsyncRead` copies
/// them out, or when [`TetherStream::release`] says they were consumed. Writing is accepted
/// only against credit, so a writer waits while the peer's consumer is slow. `shutdown` sends
/// FIN (half-close). Dropping the handle resets the stream with CANCEL unless both directions
/// have finished.
#[derive(Debug)]
pub struct TetherStream {
    pub(crate) tunnel: Tunnel,
    pub(crate) id: StreamId,
    forgotten: bool,
}

/// The `io::Error` for a session command that failed: a stream that ended abnormally is a
/// reset (or an abort when the whole tunnel went), anything else is a broken pipe.
pub(crate) fn api_io_error(e: ApiError) -> io::Error {
    let kind = match &e {
        ApiError::Stream(s) if s.session_closed => io::ErrorKind::ConnectionAborted,
        ApiError::Stream(_) => io::ErrorKind::ConnectionReset,
        ApiError::Closed => io::ErrorKind::ConnectionAborted,
        ApiError::UnknownStream => io::ErrorKind::NotConnected,
        _ => io::ErrorKind::BrokenPipe,
    };
    io::Error::new(kind, e.to_string())
}

impl TetherStream {
    pub(crate) fn new(tunnel: Tunnel, id: StreamId) -> TetherStream {
        TetherStream {
            tunnel,
            id,
            forgotten: false,
        }
    }

    /// The stream id.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// The next bytes the peer sent, without copying them; `None` at the peer's FIN. The credit
    /// is not returned until [`TetherStream::release`] is called, so a caller that releases
    /// only after writing the bytes on makes a slow destination slow its own sender.
    pub async fn recv_chunk(&self) -> io::Result<Option<Bytes>> {
        std::future::poll_fn(|cx| self.poll_recv(cx, usize::MAX)).await
    }

    /// Waits for bytes from the peer and moves what is buffered, up to about `max` bytes,
    /// into `out` without copying; `false` at the peer's FIN. Credit is returned only by
    /// [`TetherStream::release`], as for [`TetherStream::recv_chunk`].
    pub(crate) async fn recv_chunks(&self, out: &mut Chunks, max: usize) -> io::Result<bool> {
        std::future::poll_fn(|cx| {
            let mut sh = self.tunnel.lock();
            loop {
                let want = max.saturating_sub(out.remaining()).max(1);
                match sh.session.recv(self.id, want) {
                    Ok(Some(b)) => {
                        out.push(b);
                        if out.remaining() >= max {
                            return Poll::Ready(Ok(true));
                        }
                    }
                    // What was taken goes first; the end or the error comes with the next call.
                    _ if out.remaining() > 0 => return Poll::Ready(Ok(true)),
                    Ok(None) => return Poll::Ready(Ok(false)),
                    Err(ApiError::WouldBlock) => {
                        if let Some(w) = sh.wakers.get_mut(&self.id) {
                            w.read = Some(cx.waker().clone());
                        }
                        return Poll::Pending;
                    }
                    Err(e) => return Poll::Ready(Err(api_io_error(e))),
                }
            }
        })
        .await
    }

    /// One `recv` of at most `max` bytes; pending (waker registered) while nothing is there.
    fn poll_recv(&self, cx: &mut Context<'_>, max: usize) -> Poll<io::Result<Option<Bytes>>> {
        let mut sh = self.tunnel.lock();
        match sh.session.recv(self.id, max) {
            Ok(got) => Poll::Ready(Ok(got)),
            Err(ApiError::WouldBlock) => {
                if let Some(w) = sh.wakers.get_mut(&self.id) {
                    w.read = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(api_io_error(e))),
        }
    }

    /// Returns `n` bytes of credit to the peer: they were consumed.
    pub fn release(&self, n: usize) {
        let due = {
            let mut sh = self.tunnel.lock();
            let released = sh
                .session
                .release(self.id, u32::try_from(n).unwrap_or(u32::MAX));
            // Only more than was read can fail here, which is this module's bug, not the peer's.
            debug_assert!(released.is_ok(), "release: {released:?}");
            // Credit goes back in batches (SPEC 6.4): most releases leave nothing to send.
            sh.session.wants_transmit()
        };
        if due {
            self.tunnel.wake_writer();
        }
    }

    /// Sends `data` without copying it, waiting for credit as needed.
    pub async fn send_bytes(&self, mut data: Bytes) -> io::Result<()> {
        while !data.is_empty() {
            let n = std::future::poll_fn(|cx| self.poll_send(cx, &data)).await?;
            data = data.split_off(n);
        }
        Ok(())
    }

    fn poll_send(&self, cx: &mut Context<'_>, data: &Bytes) -> Poll<io::Result<usize>> {
        let mut sh = self.tunnel.lock();
        match sh.session.send(self.id, data.clone()) {
            Ok(0) => {
                // A `Writable` event follows when credit returns (SPEC 6.2).
                if let Some(w) = sh.wakers.get_mut(&self.id) {
                    w.write = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Ok(n) => {
                drop(sh);
                self.tunnel.wake_writer();
                Poll::Ready(Ok(n))
            }
            Err(e) => Poll::Ready(Err(api_io_error(e))),
        }
    }

    /// Half-closes this direction: FIN goes out after the queued bytes. Finishing twice is
    /// harmless; a stream that failed reports why.
    pub fn finish(&self) -> io::Result<()> {
        let finished = self.tunnel.lock().session.finish(self.id);
        self.tunnel.wake_writer();
        match finished {
            Ok(()) | Err(ApiError::AlreadyFinished) => Ok(()),
            Err(e) => Err(api_io_error(e)),
        }
    }

    /// Aborts the stream with `code`. A stream that already ended stays as it ended.
    pub fn reset(&self, code: ErrorCode, reason: &str) {
        let reset = self.tunnel.lock().session.reset(self.id, code, reason);
        if let Err(e) = reset {
            tracing::debug!(stream = %self.id, error = %e, "reset of a stream that already ended");
        }
        self.tunnel.wake_writer();
    }

    /// Drops the handle without taking the tunnel's lock (used while it is held, for a handle
    /// that never reached the application: the caller rejects the dial itself).
    pub(crate) fn forget(mut self) {
        self.forgotten = true;
    }
}

impl AsyncRead for TetherStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let this = self.get_mut();
        let Some(chunk) = std::task::ready!(this.poll_recv(cx, buf.remaining()))? else {
            return Poll::Ready(Ok(()));
        };
        buf.put_slice(chunk.chunk());
        // Bytes copied into the caller's buffer are consumed: their credit goes back.
        this.release(chunk.len());
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TetherStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.poll_send(cx, &Bytes::copy_from_slice(buf))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.finish())
    }
}

impl Drop for TetherStream {
    fn drop(&mut self) {
        if self.forgotten {
            return;
        }
        let due = {
            let mut sh = self.tunnel.lock();
            sh.wakers.remove(&self.id);
            // SPEC 5.6: the session decides what a dropped handle means.
            if let Err(e) = sh.session.abandon(self.id) {
                tracing::debug!(stream = %self.id, error = %e, "abandon");
            }
            sh.session.wants_transmit()
        };
        if due {
            self.tunnel.wake_writer();
        }
    }
}
