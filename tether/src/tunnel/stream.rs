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

/// What the other side of a relay did while a send to the stream waited for credit: the
/// client of a CONNECT (its socket), the caller of a gRPC call (its packets), the destination
/// at the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gone {
    /// It finished sending (EOF, CLOSE_REQ): what waits may still go out while the stream
    /// moves, for at most the linger without progress.
    Finished,
    /// It failed (a reset, an error, a cancelled call): nothing will be read for it, and
    /// the stream is reset at once.
    Failed(String),
}

/// A send begun by [`Handle::send_or_wait`]: done at once, or waiting for credit.
pub(crate) enum Sending<'a> {
    Done(Option<io::Result<bool>>),
    Waiting(Pin<Box<dyn Future<Output = io::Result<bool>> + Send + 'a>>),
}

impl Future for Sending<'_> {
    type Output = io::Result<bool>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        match self.get_mut() {
            Sending::Done(r) => Poll::Ready(r.take().unwrap_or(Ok(false))),
            Sending::Waiting(f) => f.as_mut().poll(cx),
        }
    }
}

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

    /// Resolves with why once the stream has ended abnormally (see [`RecvHalf::ended`]).
    pub(crate) fn ended(&self) -> impl Future<Output = io::Error> + '_ {
        std::future::poll_fn(|cx| self.poll_ended(cx))
    }

    /// [`Handle::ended`], polled.
    pub(crate) fn poll_ended(&self, cx: &mut Context<'_>) -> Poll<io::Error> {
        self.tunnel.poll_ended(self.id, cx)
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

    /// [`Handle::send_bytes`], watching the relay's other side meanwhile (see
    /// [`SendHalf::send_watching`]). What the credit takes at once goes without the watch;
    /// the rest waits in a boxed future, so a relay that never waits (and an idle one) holds
    /// none of the waiting's state.
    pub(crate) async fn send_watching(
        &self,
        mut data: Bytes,
        watch: impl Future<Output = Gone>,
    ) -> io::Result<bool> {
        let n = self.tunnel.try_send(self.id, &data)?;
        data = data.split_off(n);
        if data.is_empty() {
            return Ok(false);
        }
        Box::pin(self.send_waiting(data, watch)).await
    }

    /// [`Handle::send_watching`] for this crate's pump, eager: what the credit takes now is
    /// sent when this is called, and the future holds only the boxed wait for the rest (and
    /// `watch` is made only then), so the task of a stream that is not waiting is that much
    /// smaller (an idle stream's memory, docs/BENCHMARKS.md).
    pub(crate) fn send_or_wait<'a, W>(
        &'a self,
        mut data: Bytes,
        watch: impl FnOnce() -> W,
    ) -> Sending<'a>
    where
        W: Future<Output = Gone> + Send + 'a,
    {
        match self.tunnel.try_send(self.id, &data) {
            Err(e) => Sending::Done(Some(Err(e))),
            Ok(n) if n == data.len() => Sending::Done(Some(Ok(false))),
            Ok(n) => {
                data = data.split_off(n);
                Sending::Waiting(Box::pin(self.send_waiting(data, watch())))
            }
        }
    }

    async fn send_waiting(
        &self,
        mut data: Bytes,
        watch: impl Future<Output = Gone>,
    ) -> io::Result<bool> {
        let linger = self.tunnel.linger();
        let mut watch = std::pin::pin!(watch);
        let mut finished = false;
        // Armed once the other side has finished: the time the send may still take without
        // moving a byte. Boxed: most sends never wait for it.
        let mut deadline: Option<Pin<Box<tokio::time::Sleep>>> = None;
        std::future::poll_fn(|cx| {
            loop {
                if data.is_empty() {
                    return Poll::Ready(Ok(finished));
                }
                match self.tunnel.poll_send(self.id, &data, cx) {
                    Poll::Ready(Ok(n)) => {
                        data = data.split_off(n);
                        if let Some(d) = &mut deadline {
                            d.as_mut().reset(tokio::time::Instant::now() + linger);
                        }
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
                if !finished {
                    match watch.as_mut().poll(cx) {
                        Poll::Ready(Gone::Failed(why)) => {
                            self.reset(ErrorCode::CANCEL, &why);
                            let e = io::Error::new(io::ErrorKind::ConnectionAborted, why);
                            return Poll::Ready(Err(e));
                        }
                        Poll::Ready(Gone::Finished) => {
                            finished = true;
                            deadline = Some(Box::pin(tokio::time::sleep(linger)));
                        }
                        Poll::Pending => {}
                    }
                }
                if let Some(d) = &mut deadline
                    && d.as_mut().poll(cx).is_ready()
                {
                    let why = "the other side finished and the stream took nothing for the linger";
                    self.reset(ErrorCode::CANCEL, why);
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)));
                }
                return Poll::Pending;
            }
        })
        .await
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

    /// Resolves with why once the stream has ended abnormally: reset by either end, refused,
    /// its tunnel gone. A relay whose receiving side waits on its socket (a client that does
    /// not read) races its write against this, so a stream the other side gave up on does
    /// not keep that socket for ever. Uses the receiving direction's wakeup: not while a
    /// receive waits.
    pub fn ended(&mut self) -> impl Future<Output = io::Error> + '_ {
        self.h.ended()
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

    /// Sends `data`, waiting for credit as needed, while `watch` looks after the relay's other
    /// side, so a wait on a stalled peer never hides that side going away (docs/SECURITY.md,
    /// "Nothing stranded"). If it fails, the stream is reset with CANCEL at once. If it
    /// finishes, the send goes on while the stream takes bytes, but no longer than the
    /// tunnel's linger ([`crate::Tunnel::linger`]) without taking one: then the stream is
    /// reset, since nothing would ever read what waits. `Ok(true)` if the other side finished
    /// meanwhile.
    pub fn send_watching<'b>(
        &'b mut self,
        data: Bytes,
        watch: impl Future<Output = Gone> + 'b,
    ) -> impl Future<Output = io::Result<bool>> + 'b {
        self.h.send_watching(data, watch)
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
