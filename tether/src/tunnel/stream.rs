//! [`TetherStream`]: one stream of a tunnel as `AsyncRead + AsyncWrite` (shutdown is half-close),
//! its two directions as halves, and [`Incoming`], a peer's dial waiting for an answer.
//!
//! A handle only: the bytes wait in the session's receive and send buffers, and what becomes
//! of a stream whose handle is dropped is the session's drop policy (`Session::abandon`).
//!
//! Each direction has one waker slot in the tunnel, so each direction has one owner at a time:
//! every method that may wait takes `&mut self` of the stream or of its half, and a caller
//! cannot park two tasks on one direction (where the second would take the first's wakeup).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tether_proto::frame::Dial;
use tether_proto::{ErrorCode, StreamId};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Tunnel;
use crate::buffer::Chunks;

/// A stream's place in its tunnel. Dropping the last holder abandons the stream.
#[derive(Debug)]
pub(crate) struct Handle {
    tunnel: Tunnel,
    id: StreamId,
    forgotten: bool,
}

impl Drop for Handle {
    fn drop(&mut self) {
        if !self.forgotten {
            self.tunnel.abandon(self.id);
        }
    }
}

impl Handle {
    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let Some(chunk) = std::task::ready!(self.tunnel.poll_recv(self.id, buf.remaining(), cx))?
        else {
            return Poll::Ready(Ok(()));
        };
        buf.put_slice(chunk.chunk());
        // Bytes copied into the caller's buffer are consumed: their credit goes back.
        self.tunnel.release(self.id, chunk.len());
        Poll::Ready(Ok(()))
    }

    fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.tunnel
            .poll_send(self.id, &Bytes::copy_from_slice(buf), cx)
    }

    pub(crate) fn release(&self, n: usize) {
        self.tunnel.release(self.id, n);
    }

    pub(crate) fn finish(&self) -> io::Result<()> {
        self.tunnel.finish(self.id)
    }

    pub(crate) fn reset(&self, code: ErrorCode, reason: &str) {
        self.tunnel.reset(self.id, code, reason);
    }

    async fn recv_chunk(&self) -> io::Result<Option<Bytes>> {
        std::future::poll_fn(|cx| self.tunnel.poll_recv(self.id, usize::MAX, cx)).await
    }

    pub(crate) async fn recv_chunks(&self, out: &mut Chunks, max: usize) -> io::Result<bool> {
        std::future::poll_fn(|cx| self.tunnel.poll_recv_chunks(self.id, out, max, cx)).await
    }

    pub(crate) async fn send_bytes(&self, mut data: Bytes) -> io::Result<()> {
        while !data.is_empty() {
            let n = std::future::poll_fn(|cx| self.tunnel.poll_send(self.id, &data, cx)).await?;
            data = data.split_off(n);
        }
        Ok(())
    }
}

/// One stream through a tunnel.
///
/// Reading takes bytes the peer sent; their credit (SPEC 6.3) returns when `AsyncRead` copies
/// them out, or when [`TetherStream::release`] says they were consumed. Writing is accepted
/// only against credit, so a writer waits while the peer's consumer is slow. `shutdown` sends
/// FIN (half-close). Dropping the handle resets the stream with CANCEL unless both directions
/// have finished. [`TetherStream::split`] and [`TetherStream::into_split`] give each direction
/// to a task of its own.
///
/// One reader and one writer at a time, by construction: each waits through `&mut self`, so
/// two waits on one direction do not compile (the second would take the first's wakeup):
///
/// ```compile_fail
/// # async fn two_readers(mut s: tether::TetherStream) {
/// let first = s.recv_chunk();
/// let second = s.recv_chunk();
/// let _ = (first.await, second.await);
/// # }
/// ```
///
/// ```compile_fail
/// # fn shared(s: tether::TetherStream) {
/// let s = std::sync::Arc::new(s);
/// let t = s.clone();
/// tokio::spawn(async move { t.recv_chunk().await });
/// # }
/// ```
#[derive(Debug)]
pub struct TetherStream {
    h: Handle,
}

impl TetherStream {
    pub(super) fn new(tunnel: Tunnel, id: StreamId) -> TetherStream {
        TetherStream {
            h: Handle {
                tunnel,
                id,
                forgotten: false,
            },
        }
    }

    /// The stream id.
    pub fn id(&self) -> StreamId {
        self.h.id
    }

    /// The next bytes the peer sent, without copying them; `None` at the peer's FIN. The credit
    /// is not returned until [`TetherStream::release`] is called, so a caller that releases
    /// only after writing the bytes on makes a slow destination slow its own sender.
    pub fn recv_chunk(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + '_ {
        self.h.recv_chunk()
    }

    /// Returns `n` bytes of credit to the peer: they were consumed.
    pub fn release(&mut self, n: usize) {
        self.h.tunnel.release(self.h.id, n);
    }

    /// Sends `data` without copying it, waiting for credit as needed.
    pub fn send_bytes(&mut self, data: Bytes) -> impl Future<Output = io::Result<()>> + '_ {
        self.h.send_bytes(data)
    }

    /// Half-closes this direction: FIN goes out after the queued bytes. Finishing twice is
    /// harmless; a stream that failed reports why.
    pub fn finish(&mut self) -> io::Result<()> {
        self.h.tunnel.finish(self.h.id)
    }

    /// Aborts the stream with `code`. A stream that already ended stays as it ended.
    pub fn reset(&self, code: ErrorCode, reason: &str) {
        self.h.tunnel.reset(self.h.id, code, reason);
    }

    /// Both directions, borrowed, each for a task of its own (or one `select!`).
    pub fn split(&mut self) -> (RecvHalf<'_>, SendHalf<'_>) {
        (
            RecvHalf {
                h: Shared::Borrowed(&self.h),
            },
            SendHalf {
                h: Shared::Borrowed(&self.h),
            },
        )
    }

    /// Both directions, owned; the stream is abandoned when both halves are dropped.
    pub fn into_split(self) -> (RecvHalf<'static>, SendHalf<'static>) {
        let h = Arc::new(self.h);
        (
            RecvHalf {
                h: Shared::Owned(h.clone()),
            },
            SendHalf {
                h: Shared::Owned(h),
            },
        )
    }

    /// The handle by shared reference, for this crate's pump, which gives each direction to
    /// one future of its own.
    pub(crate) fn h(&self) -> &Handle {
        &self.h
    }

    /// Drops the handle without taking the tunnel's lock (used while it is held, for a handle
    /// that never reached the application: the caller rejects the dial itself).
    pub(super) fn forget(mut self) {
        self.h.forgotten = true;
    }

    fn pinned(self: Pin<&mut Self>) -> &Handle {
        &self.get_mut().h
    }
}

impl AsyncRead for TetherStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.pinned().poll_read(cx, buf)
    }
}

impl AsyncWrite for TetherStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.pinned().poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.get_mut().finish())
    }
}

/// A half's hold on its stream: borrowed from a [`TetherStream`], or shared with the other
/// half.
#[derive(Debug)]
enum Shared<'a> {
    Borrowed(&'a Handle),
    Owned(Arc<Handle>),
}

impl std::ops::Deref for Shared<'_> {
    type Target = Handle;

    fn deref(&self) -> &Handle {
        match self {
            Shared::Borrowed(h) => h,
            Shared::Owned(h) => h,
        }
    }
}

/// The receiving direction of a stream: the peer's bytes and the credit they hold.
#[derive(Debug)]
pub struct RecvHalf<'a> {
    h: Shared<'a>,
}

impl RecvHalf<'_> {
    /// The stream id.
    pub fn id(&self) -> StreamId {
        self.h.id
    }

    /// As [`TetherStream::recv_chunk`].
    pub fn recv_chunk(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + '_ {
        self.h.recv_chunk()
    }

    /// Waits for bytes from the peer and moves what is buffered, up to about `max` bytes,
    /// into `out` without copying; `false` at the peer's FIN. Credit is returned only by
    /// [`RecvHalf::release`], as for [`TetherStream::recv_chunk`].
    pub fn recv_chunks<'b>(
        &'b mut self,
        out: &'b mut Chunks,
        max: usize,
    ) -> impl Future<Output = io::Result<bool>> + 'b {
        self.h.recv_chunks(out, max)
    }

    /// As [`TetherStream::release`].
    pub fn release(&mut self, n: usize) {
        self.h.tunnel.release(self.h.id, n);
    }

    /// As [`TetherStream::reset`]: aborts both directions.
    pub fn reset(&self, code: ErrorCode, reason: &str) {
        self.h.tunnel.reset(self.h.id, code, reason);
    }
}

impl AsyncRead for RecvHalf<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.h.poll_read(cx, buf)
    }
}

/// The sending direction of a stream.
#[derive(Debug)]
pub struct SendHalf<'a> {
    h: Shared<'a>,
}

impl SendHalf<'_> {
    /// The stream id.
    pub fn id(&self) -> StreamId {
        self.h.id
    }

    /// As [`TetherStream::send_bytes`].
    pub fn send_bytes(&mut self, data: Bytes) -> impl Future<Output = io::Result<()>> + '_ {
        self.h.send_bytes(data)
    }

    /// As [`TetherStream::finish`].
    pub fn finish(&mut self) -> io::Result<()> {
        self.h.tunnel.finish(self.h.id)
    }

    /// As [`TetherStream::reset`]: aborts both directions.
    pub fn reset(&self, code: ErrorCode, reason: &str) {
        self.h.tunnel.reset(self.h.id, code, reason);
    }
}

impl AsyncWrite for SendHalf<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.h.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.get_mut().finish())
    }
}

/// A dial from the peer, waiting for this end to accept or reject it. Dropping it rejects
/// the dial with CANCEL (the session's drop policy).
#[derive(Debug)]
pub struct Incoming {
    pub(super) stream: TetherStream,
    pub(super) dial: Dial,
}

impl Incoming {
    /// Where the peer wants the stream to go.
    pub fn dial(&self) -> &Dial {
        &self.dial
    }

    /// The stream's id.
    pub fn stream_id(&self) -> StreamId {
        self.stream.id()
    }

    /// Accepts: DIAL_OK goes out and the stream is established. Fails if the peer gave up on
    /// the dial meanwhile, or the tunnel closed.
    pub fn accept(self) -> io::Result<TetherStream> {
        self.stream.h.tunnel.accept(self.stream.h.id)?;
        Ok(self.stream)
    }

    /// Rejects with `code` (a `DIAL_*` code) and a short reason.
    pub fn reject(self, code: ErrorCode, reason: &str) {
        self.stream.reset(code, reason);
    }

    /// Resolves once the dial is over without this end's answer: the opener cancelled it
    /// (RESET) or the tunnel closed. An acceptor races its connect against this, so a dial the
    /// opener gave up on holds no socket (SPEC 5.5).
    pub async fn cancelled(&mut self) {
        let h = &self.stream.h;
        std::future::poll_fn(|cx| h.tunnel.poll_pending(h.id, cx)).await;
    }
}
