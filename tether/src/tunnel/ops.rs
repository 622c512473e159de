//! The operations of one stream's handle: each is one session command through
//! [`Tunnel::drive`], its error surfaced as an `io::Error`, a waker left where a `Readable` or
//! `Writable` event will find it.

use std::io;
use std::task::{Context, Poll};

use bytes::Bytes;
use tether_proto::{ApiError, ErrorCode, Session, StreamId, StreamState};

use super::{Shared, Tunnel};
use crate::buffer::Chunks;

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

impl Tunnel {
    /// Accepts the pending dial `id`.
    pub(crate) fn accept(&self, id: StreamId) -> io::Result<()> {
        self.drive(|sh, _| sh.session.accept(id))
            .map_err(api_io_error)
    }

    /// Pending (waker registered) while `id` is a dial waiting for this end's answer; ready once
    /// it is anything else (cancelled by the opener, the tunnel closed).
    pub(crate) fn poll_pending(&self, id: StreamId, cx: &mut Context<'_>) -> Poll<()> {
        self.drive(|sh, _| match sh.session.stream_state(id) {
            Some(StreamState::Pending) => {
                sh.park_reader(id, cx);
                Poll::Pending
            }
            _ => Poll::Ready(()),
        })
    }

    /// Ready with why once `id` has ended abnormally (reset by either end, refused, its tunnel
    /// gone) or left the table; pending (reader's waker registered) while it lives. For a
    /// relay whose reading side waits on its socket rather than on the stream.
    pub(crate) fn poll_ended(&self, id: StreamId, cx: &mut Context<'_>) -> Poll<io::Error> {
        self.drive(|sh, _| {
            if let Some(e) = sh.session.stream_error(id) {
                return Poll::Ready(api_io_error(ApiError::Stream(e)));
            }
            if sh.session.stream_state(id).is_none() {
                return Poll::Ready(api_io_error(ApiError::UnknownStream));
            }
            sh.park_reader(id, cx);
            Poll::Pending
        })
    }

    /// One `recv` of at most `max` bytes; pending (waker registered) while nothing is there.
    pub(crate) fn poll_recv(
        &self,
        id: StreamId,
        max: usize,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Option<Bytes>>> {
        self.drive(|sh, _| match sh.session.recv(id, max) {
            Ok(got) => Poll::Ready(Ok(got)),
            Err(ApiError::WouldBlock) => {
                sh.park_reader(id, cx);
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(api_io_error(e))),
        })
    }

    /// Moves what `id` has buffered, up to about `max` bytes, into `out`; `false` at the
    /// peer's FIN. Bytes taken come first: the end or an error comes with the next call.
    pub(crate) fn poll_recv_chunks(
        &self,
        id: StreamId,
        out: &mut Chunks,
        max: usize,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<bool>> {
        use bytes::Buf;
        self.drive(|sh, _| {
            loop {
                let want = max.saturating_sub(out.remaining()).max(1);
                match sh.session.recv(id, want) {
                    Ok(Some(b)) => {
                        out.push(b);
                        if out.remaining() >= max {
                            return Poll::Ready(Ok(true));
                        }
                    }
                    _ if out.remaining() > 0 => return Poll::Ready(Ok(true)),
                    Ok(None) => return Poll::Ready(Ok(false)),
                    Err(ApiError::WouldBlock) => {
                        sh.park_reader(id, cx);
                        return Poll::Pending;
                    }
                    Err(e) => return Poll::Ready(Err(api_io_error(e))),
                }
            }
        })
    }

    /// Returns `n` bytes of credit on `id`. Credit goes back in batches (SPEC 6.4): most
    /// releases leave nothing to send and wake nobody.
    pub(crate) fn release(&self, id: StreamId, n: usize) {
        if let Some(s) = &self.inner.stats {
            s.received(n);
        }
        let released =
            self.drive(|sh, _| sh.session.release(id, u32::try_from(n).unwrap_or(u32::MAX)));
        // Only more than was read can fail here: the handle's bug, not the peer's.
        debug_assert!(released.is_ok(), "release: {released:?}");
    }

    /// One `send` on `id`; pending (waker registered) while the window is shut.
    pub(crate) fn poll_send(
        &self,
        id: StreamId,
        data: &Bytes,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        self.drive(|sh, _| match sh.session.send(id, data.clone()) {
            Ok(0) => {
                // A `Writable` event follows when credit returns (SPEC 6.2).
                if let Some(w) = sh.wakers.get_mut(&id) {
                    w.write = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Ok(n) => {
                if let Some(s) = &self.inner.stats {
                    s.sent(n);
                }
                Poll::Ready(Ok(n))
            }
            Err(e) => Poll::Ready(Err(api_io_error(e))),
        })
    }

    /// One `send` on `id` that never waits: what the credit takes now (maybe nothing).
    pub(crate) fn try_send(&self, id: StreamId, data: &Bytes) -> io::Result<usize> {
        self.drive(|sh, _| match sh.session.send(id, data.clone()) {
            Ok(n) => {
                if let Some(s) = &self.inner.stats {
                    s.sent(n);
                }
                Ok(n)
            }
            Err(e) => Err(api_io_error(e)),
        })
    }

    /// Half-closes `id`; finishing twice is harmless, a failed stream reports why.
    pub(crate) fn finish(&self, id: StreamId) -> io::Result<()> {
        // A writer parked on a shut window must learn that this direction is over.
        match self.drive(|sh, _| sh.finished_or_reset(id, |s| s.finish(id))) {
            Ok(()) | Err(ApiError::AlreadyFinished) => Ok(()),
            Err(e) => Err(api_io_error(e)),
        }
    }

    /// Resets `id`; a stream that already ended stays as it ended.
    pub(crate) fn reset(&self, id: StreamId, code: ErrorCode, reason: &str) {
        // No event follows a local reset: whoever waits on the stream is woken here.
        if let Err(e) = self.drive(|sh, _| sh.finished_or_reset(id, |s| s.reset(id, code, reason)))
        {
            tracing::debug!(stream = %id, error = %e, "reset of a stream that already ended");
        }
    }

    /// The handle of `id` is gone: the session's drop policy decides (SPEC 5.6).
    pub(crate) fn abandon(&self, id: StreamId) {
        let abandoned = self.drive(|sh, _| {
            sh.wakers.remove(&id);
            sh.session.abandon(id)
        });
        if let Err(e) = abandoned {
            tracing::debug!(stream = %id, error = %e, "abandon");
        }
    }
}

impl Shared {
    /// Runs `finish` or `reset` on `id` and wakes the tasks waiting on it: neither queues an
    /// event that would.
    fn finished_or_reset(
        &mut self,
        id: StreamId,
        command: impl FnOnce(&mut Session) -> Result<(), ApiError>,
    ) -> Result<(), ApiError> {
        let done = command(&mut self.session);
        if let Some(w) = self.wakers.get_mut(&id) {
            w.wake();
        }
        done
    }

    pub(super) fn park_reader(&mut self, id: StreamId, cx: &Context<'_>) {
        if let Some(w) = self.wakers.get_mut(&id) {
            w.read = Some(cx.waker().clone());
        }
    }
}
