//! What the application asks of the session: open, accept, send, receive, finish, reset,
//! abandon, ping, drain, close. Each either does it or returns an [`ApiError`] and changes
//! nothing.

use bytes::Bytes;

use super::stream::{Phase, RecvState, SendState, Stream, len32};
use super::{Session, cut_reason};
use crate::Time;
use crate::error::{ApiError, CloseReason};
use crate::frame::{Dial, ErrorCode, Protocol, StreamId};

impl Session {
    /// Opens a stream to `host:port` (SPEC 5.2): queues a DIAL and returns the new id.
    pub fn open(
        &mut self,
        protocol: Protocol,
        host: &str,
        port: u16,
    ) -> Result<StreamId, ApiError> {
        self.check_open()?;
        //= SPEC §7.4
        //# An end that receives GOAWAY `NO_ERROR` MUST NOT open streams afterwards
        if self.is_draining() {
            return Err(ApiError::Draining);
        }
        //= SPEC §5.7
        //# An end MUST NOT open a stream while the number of its own live streams equals the
        //# peer's MAX_CONCURRENT_STREAMS.
        if self.streams.local_live >= self.open_limit() {
            return Err(ApiError::StreamLimit);
        }
        if self.streams.next_local > self.config.stream_id_limit {
            // SPEC 5.1: ids are never reused; a session out of ids drains.
            //= SPEC §5.1
            //# MUST NOT open more streams on that session: it drains it
            self.start_drain("stream ids exhausted");
            self.debug_check();
            return Err(ApiError::IdsExhausted);
        }
        let id = StreamId(self.streams.next_local);
        let dial = Dial {
            stream: id,
            protocol,
            host: host.to_owned(),
            port,
        };
        dial.validate().map_err(ApiError::InvalidFrame)?;
        //= SPEC §5.1
        //# Each end MUST open its streams with strictly increasing ids.
        self.streams.next_local += 2;
        let stream = Stream::new(
            Phase::Dialing(Some(dial)),
            self.peer.initial_window(),
            self.config.initial_window,
            true,
        );
        self.streams.insert(id, stream);
        self.schedule(id);
        self.debug_check();
        Ok(id)
    }

    /// Accepts a pending dial: queues DIAL_OK; data may flow (SPEC 5.2).
    pub fn accept(&mut self, id: StreamId) -> Result<(), ApiError> {
        self.check_open()?;
        let s = self.streams.get_mut(id).ok_or(ApiError::UnknownStream)?;
        if s.phase != Phase::Pending {
            return Err(ApiError::NotPending);
        }
        s.phase = Phase::Established;
        s.dial_ok_queued = true;
        s.announced = true;
        self.schedule(id);
        self.debug_check();
        Ok(())
    }

    /// Rejects a pending dial with a RESET carrying `code` (a `DIAL_*` code, say).
    pub fn reject(&mut self, id: StreamId, code: ErrorCode, reason: &str) -> Result<(), ApiError> {
        self.check_open()?;
        match self.streams.get(id) {
            Some(s) if s.phase == Phase::Pending => self.reset(id, code, reason),
            Some(_) => Err(ApiError::NotPending),
            None => Err(ApiError::UnknownStream),
        }
    }

    /// Queues bytes on an established stream; returns how many were taken, at most the credit
    /// left and at most what this end's own send buffer (`max_send_window`) has room for,
    /// whatever the peer's window (SPEC 6.2, 10). When the count is short, or the window or
    /// the buffer is now full, a `Writable` event follows when there is room again. The bytes
    /// are not copied.
    pub fn send(&mut self, id: StreamId, data: Bytes) -> Result<usize, ApiError> {
        let cap = self.config.max_send_window;
        let s = self.sending_stream(id)?;
        //= SPEC §6.2
        //# A sender MUST NOT send more DATA payload on a stream than its window for it.
        let room = cap.saturating_sub(s.send.queued);
        let n = s.send.window.available().min(room).min(len32(&data));
        let short = (n as usize) < data.len();
        if n > 0 {
            let consumed = s.send.window.consume(n);
            debug_assert!(consumed.is_ok(), "n is at most the window");
            s.send.queued += n;
            s.send.queue.push_back(data.slice(..n as usize));
        }
        // SPEC 6.2: a writer that was cut short, or that used the last of the window, is told
        // when credit returns.
        if short || s.send.window.is_exhausted() || s.send.queued >= cap {
            s.want_writable = true;
        }
        if n > 0 {
            self.schedule(id);
        }
        self.debug_check();
        Ok(n as usize)
    }

    /// Half-closes this end's direction: FIN goes out after the queued bytes (SPEC 5.3).
    pub fn finish(&mut self, id: StreamId) -> Result<(), ApiError> {
        let s = self.sending_stream(id)?;
        s.send.state = SendState::Finishing;
        s.want_writable = false;
        self.schedule(id);
        self.debug_check();
        Ok(())
    }

    /// Takes up to `max` (at least 1) bytes the peer sent on `id`, in order and without
    /// copying: `Ok(Some(bytes))`, or `Ok(None)` once the peer's FIN has been reached.
    /// [`ApiError::WouldBlock`]: nothing yet, and a `Readable` event follows when there is.
    /// [`ApiError::Stream`]: the stream failed, and why.
    ///
    /// The bytes' credit goes back only with [`Session::release`] (SPEC 6.3), so an application
    /// that releases after writing them on makes a slow destination slow its own sender.
    pub fn recv(&mut self, id: StreamId, max: usize) -> Result<Option<Bytes>, ApiError> {
        if max == 0 {
            return Err(ApiError::ZeroLength);
        }
        let s = self.streams.get_mut(id).ok_or(ApiError::UnknownStream)?;
        if let Some(e) = s.error() {
            return Err(ApiError::Stream(e));
        }
        match s.phase {
            Phase::Established => {}
            // A stream that ended cleanly with the session may still hold unread bytes.
            Phase::Closed(_) => return Ok(s.recv.buf.pop(max)),
            _ => return Err(ApiError::NotEstablished),
        }
        s.recv.notified = false;
        if let Some(bytes) = s.recv.buf.pop(max) {
            s.recv.unreleased += len32(&bytes);
            self.debug_check();
            return Ok(Some(bytes));
        }
        let result = match s.recv.state {
            RecvState::Open => Err(ApiError::WouldBlock),
            RecvState::FinReceived | RecvState::Finished => {
                s.recv.state = RecvState::Finished;
                if s.is_done() {
                    self.end_stream(id, None);
                }
                Ok(None)
            }
        };
        self.debug_check();
        result
    }

    /// Returns `n` bytes of credit on `id`: the application has consumed them (written them
    /// on). WINDOW frames go out in batches (SPEC 6.4). Releasing on a closed stream does
    /// nothing.
    pub fn release(&mut self, id: StreamId, n: u32) -> Result<(), ApiError> {
        let s = self.streams.get_mut(id).ok_or(ApiError::UnknownStream)?;
        if !s.is_live() {
            return Ok(());
        }
        //= SPEC §6.3
        //# A receiver MUST NOT return credit for bytes it has not received
        if n > s.recv.unreleased {
            return Err(ApiError::OverRelease);
        }
        s.recv.unreleased -= n;
        s.recv.pending += n;
        self.schedule(id);
        self.debug_check();
        Ok(())
    }

    /// Aborts a live stream: a RESET with `code` goes out (or, for a DIAL not yet sent,
    /// nothing does) and the stream's queued bytes and undelivered events are dropped
    /// (SPEC 5.5). No event follows for it; `recv` and `send` report the reset.
    pub fn reset(&mut self, id: StreamId, code: ErrorCode, reason: &str) -> Result<(), ApiError> {
        self.check_open()?;
        let reason = cut_reason(reason);
        let s = self.streams.get_mut(id).ok_or(ApiError::UnknownStream)?;
        match s.phase {
            Phase::Resetting { .. } | Phase::Closed(_) => return Err(ApiError::StreamEnded),
            Phase::Dialing(Some(_)) => {
                // Never on the wire: the peer never learns of it (SPEC 5.1 allows the gap).
                s.phase = Phase::Resetting {
                    code,
                    reason: reason.to_owned(),
                };
                let error = s.error();
                self.end_stream(id, error);
            }
            _ => {
                s.phase = Phase::Resetting {
                    code,
                    reason: reason.to_owned(),
                };
                s.drop_queues();
                self.purge_events(id);
                self.schedule(id);
            }
        }
        self.debug_check();
        Ok(())
    }

    /// The application lets go of stream `id` (its handle was dropped): the one drop policy
    /// (SPEC 5.6). A closed stream leaves the table. A live one is reset with CANCEL, unless
    /// both halves are finished (this end called `finish` and the peer's FIN arrived): then
    /// its queued bytes and FIN still go out and bytes not yet read are dropped. Either way
    /// the stream leaves the table as soon as it is closed, and no event follows for it.
    pub fn abandon(&mut self, id: StreamId) -> Result<(), ApiError> {
        let s = self.streams.get_mut(id).ok_or(ApiError::UnknownStream)?;
        s.abandoned = true;
        let both_finished = s.send.state != SendState::Open && s.recv.state != RecvState::Open;
        match s.phase {
            Phase::Closed(_) => {
                self.streams.remove(id);
            }
            Phase::Resetting { .. } => {}
            Phase::Established if both_finished => {
                // Bytes nobody will read are dropped; the peer has finished, so their credit
                // is moot.
                s.drop_unread();
                s.recv.state = RecvState::Finished;
                if s.is_done() {
                    self.end_stream(id, None);
                }
            }
            Phase::Dialing(_) | Phase::Pending | Phase::Established => {
                self.reset(id, ErrorCode::CANCEL, "stream abandoned")?;
            }
        }
        // SPEC 5.6: no event follows an abandon, not even one queued before it.
        self.purge_events(id);
        self.debug_check();
        Ok(())
    }

    /// Sends a PING; `PingAnswered` reports the round trip. At most one PING is outstanding:
    /// a second call while one is waits for the same answer.
    pub fn ping(&mut self, now: Time) -> Result<(), ApiError> {
        self.check_open()?;
        match &mut self.keepalive.outstanding {
            Some(p) => p.by_app = true,
            None => self.send_ping(now, true),
        }
        self.debug_check();
        Ok(())
    }

    /// Announces a drain to come (SPEC 7.4): a DRAINING frame goes out, once, if the peer
    /// announced DRAIN_NOTICE; nothing else changes (streams may still be opened both ways
    /// until [`Session::go_away`]). `Ok(false)` when the peer does not take the notice or this
    /// end is draining already.
    pub fn announce_draining(&mut self) -> Result<bool, ApiError> {
        self.check_open()?;
        //= SPEC §7.4
        //# an end MUST NOT send DRAINING to a peer that did not, nor after its own GOAWAY, nor
        //# more than once per session.
        if self.is_draining() || !self.peer.drain_notice() {
            return Ok(false);
        }
        //= SPEC §7.4
        //# DRAINING changes nothing in the session: both ends may still open streams, and the
        //# sender MUST keep accepting DIALs until its GOAWAY.
        // (Only `drain` refuses DIALs; the notice is a flag beside it.)
        if !self.notice.given {
            self.notice.given = true;
            self.notice.out = true;
        }
        self.debug_check();
        Ok(true)
    }

    /// Starts a graceful drain (SPEC 7.4): a GOAWAY with NO_ERROR goes out, no new streams
    /// either way, existing streams finish, then the session closes with `Drained`. A second
    /// call while draining changes nothing.
    pub fn go_away(&mut self, reason: &str) -> Result<(), ApiError> {
        self.check_open()?;
        if !self.is_draining() {
            self.start_drain(reason);
        }
        self.debug_check();
        Ok(())
    }

    /// Closes at once with a GOAWAY carrying `code`; every stream ends with an error.
    pub fn close(&mut self, code: ErrorCode, reason: &str) -> Result<(), ApiError> {
        if self.is_closed() {
            return Err(ApiError::Closed);
        }
        let reason = cut_reason(reason);
        self.shutdown(
            CloseReason::Local {
                code,
                reason: reason.to_owned(),
            },
            Some((code, reason)),
        );
        self.debug_check();
        Ok(())
    }

    /// The stream `id` if it is established and this end may still send on it.
    fn sending_stream(&mut self, id: StreamId) -> Result<&mut Stream, ApiError> {
        let open = self.check_open();
        let s = self.streams.get_mut(id).ok_or(ApiError::UnknownStream)?;
        if let Some(e) = s.error() {
            return Err(ApiError::Stream(e));
        }
        match s.phase {
            Phase::Established => open?,
            Phase::Closed(_) => return Err(ApiError::AlreadyFinished),
            _ => return Err(ApiError::NotEstablished),
        }
        //= SPEC §5.3
        //# A DATA with FIN ends the sender's direction; the sender MUST NOT send DATA on that
        //# stream afterwards.
        if s.send.state != SendState::Open {
            return Err(ApiError::AlreadyFinished);
        }
        Ok(s)
    }
}
