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
        std::future::poll_fn(|cx| self.tunnel.poll_recv(self.id, usize::MAX, cx)).await
    }

    /// Waits for bytes from the peer and moves what is buffered, up to about `max` bytes,
    /// into `out` without copying; `false` at the peer's FIN. Credit is returned only by
    /// [`TetherStream::release`], as for [`TetherStream::recv_chunk`].
    pub(crate) async fn recv_chunks(&self, out: &mut Chunks, max: usize) -> io::Result<bool> {
        std::future::poll_fn(|cx| self.tunnel.poll_recv_chunks(self.id, out, max, cx)).await
    }

    /// Returns `n` bytes of credit to the peer: they were consumed.
    pub fn release(&self, n: usize) {
        self.tunnel.release(self.id, n);
    }

    /// Sends `data` without copying it, waiting for credit as needed.
    pub async fn send_bytes(&self, mut data: Bytes) -> io::Result<()> {
        while !data.is_empty() {
            let n = std::future::poll_fn(|cx| self.tunnel.poll_send(self.id, &data, cx)).await?;
            data = data.split_off(n);
        }
        Ok(())
    }

    /// Half-closes this direction: FIN goes out after the queued bytes. Finishing twice is
    /// harmless; a stream that failed reports why.
    pub fn finish(&self) -> io::Result<()> {
        self.tunnel.finish(self.id)
    }

    /// Aborts the stream with `code`. A stream that already ended stays as it ended.
    pub fn reset(&self, code: ErrorCode, reason: &str) {
        self.tunnel.reset(self.id, code, reason);
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
        let Some(chunk) = std::task::ready!(this.tunnel.poll_recv(this.id, buf.remaining(), cx))?
        else {
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
        self.tunnel
            .poll_send(self.id, &Bytes::copy_from_slice(buf), cx)
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
        if !self.forgotten {
            self.tunnel.abandon(self.id);
        }
    }
}
