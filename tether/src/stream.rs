//! [`TetherStream`]: one stream of a tunnel as `AsyncRead + AsyncWrite` (shutdown is half-close).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tether_proto::{ErrorCode, StreamError, StreamId};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::buffer::Chunks;
use crate::tunnel::{Shared, Slot, Tunnel};

/// One stream through a tunnel.
///
/// Reading takes bytes the peer sent and returns their credit (SPEC 6.3) as they are taken;
/// writing is accepted only against credit, so a writer waits while the peer's consumer is
/// slow. `shutdown` sends FIN (half-close); dropping the stream before both directions finished
/// resets it with `CANCEL`.
#[derive(Debug)]
pub struct TetherStream {
    pub(crate) tunnel: Tunnel,
    pub(crate) id: StreamId,
    finished: AtomicBool,
    forgotten: bool,
}

fn stream_io_error(e: &StreamError) -> io::Error {
    let kind = if e.session_closed {
        io::ErrorKind::ConnectionAborted
    } else {
        io::ErrorKind::ConnectionReset
    };
    io::Error::new(kind, e.to_string())
}

impl TetherStream {
    pub(crate) fn new(tunnel: Tunnel, id: StreamId) -> TetherStream {
        TetherStream {
            tunnel,
            id,
            finished: AtomicBool::new(false),
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
        std::future::poll_fn(|cx| self.poll_chunk(cx)).await
    }

    /// Waits for bytes from the peer and moves what is queued, up to about `max` bytes, into
    /// `out` without copying; `false` at the peer's FIN. Credit is returned only by
    /// [`TetherStream::release`], as for [`TetherStream::recv_chunk`].
    pub(crate) async fn recv_chunks(&self, out: &mut Chunks, max: usize) -> io::Result<bool> {
        std::future::poll_fn(|cx| {
            let mut sh = self.tunnel.lock();
            let Some(slot) = std::task::ready!(self.poll_slot(&mut sh, cx))? else {
                return Poll::Ready(Ok(false));
            };
            // The slot holds at least one chunk: take it, and more while under `max`.
            while let Some(c) = slot.recv.pop_front() {
                out.push(c);
                if out.remaining() >= max {
                    break;
                }
            }
            Poll::Ready(Ok(true))
        })
        .await
    }

    fn poll_chunk(&self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        let mut sh = self.tunnel.lock();
        let slot = std::task::ready!(self.poll_slot(&mut sh, cx))?;
        Poll::Ready(Ok(slot.and_then(|s| s.recv.pop_front())))
    }

    /// The stream's slot once it holds a chunk; `None` at the peer's FIN (nothing queued);
    /// the stream's or the session's error; or pending, with the reader's waker registered.
    fn poll_slot<'a>(
        &self,
        sh: &'a mut Shared,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Option<&'a mut Slot>>> {
        let Shared { slots, closed, .. } = sh;
        let Some(slot) = slots.get_mut(&self.id) else {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "stream gone",
            )));
        };
        if !slot.recv.is_empty() {
            return Poll::Ready(Ok(Some(slot)));
        }
        if let Some(e) = &slot.error {
            return Poll::Ready(Err(stream_io_error(e)));
        }
        if slot.fin {
            return Poll::Ready(Ok(None));
        }
        if let Some(reason) = closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                reason.to_string(),
            )));
        }
        slot.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Returns `n` bytes of credit to the peer: they were consumed.
    pub fn release(&self, n: usize) {
        let due = {
            let mut sh = self.tunnel.lock();
            let _ = sh
                .session
                .release(self.id, u32::try_from(n).unwrap_or(u32::MAX));
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
        if let Some(slot) = sh.slots.get(&self.id)
            && let Some(e) = &slot.error
        {
            return Poll::Ready(Err(stream_io_error(e)));
        }
        if let Some(r) = &sh.closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                r.to_string(),
            )));
        }
        match sh.session.send(self.id, data.clone()) {
            Ok(0) => {
                if let Some(slot) = sh.slots.get_mut(&self.id) {
                    slot.write_waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Ok(n) => {
                drop(sh);
                self.tunnel.wake_writer();
                Poll::Ready(Ok(n))
            }
            Err(e) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                e.to_string(),
            ))),
        }
    }

    /// Half-closes this direction: FIN goes out after the queued bytes.
    pub fn finish(&self) {
        if !self.finished.swap(true, Ordering::AcqRel) {
            let _ = self.tunnel.lock().session.finish(self.id);
            self.tunnel.wake_writer();
        }
    }

    /// Aborts the stream with `code`.
    pub fn reset(&self, code: ErrorCode, reason: &str) {
        {
            let mut sh = self.tunnel.lock();
            let _ = sh.session.reset(self.id, code, reason);
            sh.slots.remove(&self.id);
        }
        self.tunnel.wake_writer();
    }

    /// Drops the handle without taking the tunnel's lock (used while it is held).
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
        let this = self.get_mut();
        let Some(mut chunk) = std::task::ready!(this.poll_chunk(cx))? else {
            return Poll::Ready(Ok(()));
        };
        let n = chunk.len().min(buf.remaining());
        buf.put_slice(&chunk[..n]);
        chunk.advance(n);
        if !chunk.is_empty() {
            let mut sh = this.tunnel.lock();
            if let Some(slot) = sh.slots.get_mut(&this.id) {
                slot.recv.push_front(chunk);
            }
        }
        // Bytes copied into the caller's buffer are consumed: their credit goes back.
        this.release(n);
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
        self.finish();
        Poll::Ready(Ok(()))
    }
}

impl Drop for TetherStream {
    fn drop(&mut self) {
        if self.forgotten {
            return;
        }
        let mut sh = self.tunnel.lock();
        let live = sh.session.stream_state(self.id).is_some();
        if let Some(slot) = sh.slots.remove(&self.id) {
            // Credit for bytes nobody will read goes back, so the peer is not left stalled.
            let held: usize = slot.recv.iter().map(Bytes::len).sum();
            let _ = sh
                .session
                .release(self.id, u32::try_from(held).unwrap_or(0));
        }
        let both_finished = self.finished.load(Ordering::Acquire)
            && !matches!(
                sh.session.stream_state(self.id),
                Some(tether_proto::StreamState::Open | tether_proto::StreamState::HalfClosedLocal)
            );
        if live && !both_finished {
            let _ = sh
                .session
                .reset(self.id, ErrorCode::CANCEL, "stream dropped");
        }
        drop(sh);
        self.tunnel.wake_writer();
    }
}
