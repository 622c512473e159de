//! One stream's state (SPEC 5).
//!
//! ```text
//!  opener                                  acceptor
//!  ------                                  --------
//!  open() -> Dialing{DIAL queued}
//!            | DIAL sent  ------ DIAL ---->  Pending   (DialRequested)
//!            |                               | accept()          | reject()
//!            |            <--- DIAL_OK ----  Established          Resetting -> RESET -> Closed
//!  Established (DialSucceeded)
//!
//!  Established = two halves, each ends on its own (half-close, SPEC 5.3):
//!    send: Open --finish()--> Finishing --last DATA with FIN sent--> Finished
//!    recv: Open --DATA with FIN received--> FinReceived --recv() returns the end--> Finished
//!  both Finished  ==> Closed (clean)
//!
//!  reset() from any state --> Resetting --RESET sent--> Closed (reset locally)
//!  RESET received in any state --> Closed (DialFailed / Reset event)
//!
//!  Closed holds nothing but how the stream ended, until the application abandons it;
//!  abandon() of a live stream resets it unless both halves are finished (SPEC 5.6).
//! ```
//!
//! A closed stream has freed everything but its outcome: its queues, its windows, its place
//! under MAX_CONCURRENT_STREAMS. An abandoned stream leaves the table the moment it is closed.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use super::window::Window;
use crate::error::{Initiator, StreamError};
use crate::frame::{Dial, ErrorCode};

/// Where a stream is in its life (SPEC 5.2).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Phase {
    /// Opener: the DIAL is queued (`Some`) or sent (`None`); waiting for DIAL_OK.
    Dialing(Option<Dial>),
    /// Acceptor: the DIAL arrived; the application has not decided.
    Pending,
    /// Both ends agree the stream exists; data may flow as the halves allow.
    Established,
    /// This end reset the stream; the RESET is queued. Frames from the peer are ignored.
    Resetting {
        /// The code to send.
        code: ErrorCode,
        /// The reason to send.
        reason: String,
    },
    /// Over: `None` if both halves finished, else why it failed. Nothing goes out or comes in;
    /// the entry waits for the application to abandon it.
    Closed(Option<StreamError>),
}

/// The sending half's state (SPEC 5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum SendState {
    /// The application may send.
    Open,
    /// `finish` was called; queued bytes and then FIN are still to go out.
    Finishing,
    /// FIN has gone out.
    Finished,
}

/// The receiving half's state (SPEC 5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum RecvState {
    /// The peer may send.
    Open,
    /// The peer's FIN arrived; buffered bytes may still wait for `recv`.
    FinReceived,
    /// The application read to the end.
    Finished,
}

/// The sending half: bytes accepted from the application and the credit left.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct SendHalf {
    pub(crate) state: SendState,
    /// Credit left; `window + unacked == peer INITIAL_WINDOW`.
    pub(crate) window: Window,
    /// Accepted bytes not yet framed, as the application's own `Bytes` (never copied).
    pub(crate) queue: VecDeque<Bytes>,
    /// Total length of `queue`.
    pub(crate) queued: u32,
}

/// The copy buffer's first allocation after it was drained, at most (larger runs grow it).
const TAIL_BLOCK: usize = 4096;

/// Bytes that arrived and wait for the application's `recv`, in order.
///
/// Large payloads are kept as the slices they arrived as (no copy); payloads under the
/// session's `recv_copy_below` (`T`) are appended to `tail`, which always holds the newest
/// bytes. So every chunk but the last is at least `T` long or followed by one that is: a
/// stream holds at most `2 × window / T + 2` chunks, whatever the frame sizes, so a peer that
/// sends 1-byte frames costs O(window) memory, not O(window × per-chunk overhead) (SPEC 10).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub(crate) struct RecvBuf {
    chunks: VecDeque<Bytes>,
    tail: BytesMut,
    len: u32,
}

impl RecvBuf {
    /// Bytes waiting.
    pub(crate) fn len(&self) -> u32 {
        self.len
    }

    /// Slices held (the tail counts as one), for the memory bound.
    pub(crate) fn chunk_count(&self) -> usize {
        self.chunks.len() + usize::from(!self.tail.is_empty())
    }

    /// Appends a payload that fits the window; one shorter than `copy_below` is copied.
    pub(crate) fn push(&mut self, payload: Bytes, copy_below: u32) {
        if payload.is_empty() {
            return;
        }
        self.len += len32(&payload);
        if len32(&payload) < copy_below {
            if self.tail.capacity() == 0 {
                // Room for a run of small payloads, in a block small enough to come from an
                // allocator's cache: a drained stream starts one per small payload.
                self.tail
                    .reserve(payload.len().max((copy_below as usize).min(TAIL_BLOCK)));
            }
            self.tail.extend_from_slice(&payload);
            return;
        }
        if !self.tail.is_empty() {
            self.chunks.push_back(self.tail.split().freeze());
        }
        self.chunks.push_back(payload);
    }

    /// Takes up to `max` (at least 1) bytes from the front, without copying.
    pub(crate) fn pop(&mut self, max: usize) -> Option<Bytes> {
        let out = match self.chunks.front_mut() {
            Some(front) if front.len() > max => front.split_to(max),
            Some(_) => self.chunks.pop_front()?,
            None if self.tail.is_empty() => return None,
            None => {
                let out = self.tail.split_to(max.min(self.tail.len())).freeze();
                if self.tail.is_empty() {
                    // Everything received was taken: keep no spare capacity, so a stream
                    // that goes quiet after a burst holds nothing (up to a window otherwise).
                    self.tail = BytesMut::new();
                }
                out
            }
        };
        self.len -= len32(&out);
        Some(out)
    }

    /// Drops every byte; returns how many there were.
    pub(crate) fn clear(&mut self) -> u32 {
        let n = self.len;
        *self = RecvBuf::default();
        n
    }
}

/// The receiving half: the peer's credit, the bytes waiting, and what the application holds.
///
/// `window + buffered + unreleased + pending == local INITIAL_WINDOW` while the stream lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RecvHalf {
    pub(crate) state: RecvState,
    /// The peer's credit as this end knows it.
    pub(crate) window: Window,
    /// Arrived, not yet taken by `recv`.
    pub(crate) buf: RecvBuf,
    /// Taken by `recv`, not yet released.
    pub(crate) unreleased: u32,
    /// Released, not yet granted back in a WINDOW frame.
    pub(crate) pending: u32,
    /// A `Readable` event went out and no `recv` followed yet: no second one is queued.
    pub(crate) notified: bool,
}

/// One stream in the session's table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Stream {
    pub(crate) phase: Phase,
    pub(crate) send: SendHalf,
    pub(crate) recv: RecvHalf,
    /// Acceptor: DIAL_OK is queued.
    pub(crate) dial_ok_queued: bool,
    /// The application knows the stream (opened it, or polled its `DialRequested`): it gets
    /// the stream's final event, and the stream stays in the table until it abandons it.
    pub(crate) announced: bool,
    /// The application let go of the stream: it leaves the table once closed.
    pub(crate) abandoned: bool,
    /// The stream is in the session's ready ring.
    pub(crate) scheduled: bool,
    /// A `send` was short, or filled the window or the send buffer: a `Writable` event is owed
    /// when there is room again (credit returns, or queued bytes go out).
    pub(crate) want_writable: bool,
}

impl Stream {
    pub(crate) fn new(phase: Phase, send_window: u32, recv_window: u32, announced: bool) -> Self {
        Stream {
            phase,
            send: SendHalf {
                state: SendState::Open,
                window: Window::new(send_window),
                queue: VecDeque::new(),
                queued: 0,
            },
            recv: RecvHalf {
                state: RecvState::Open,
                window: Window::new(recv_window),
                buf: RecvBuf::default(),
                unreleased: 0,
                pending: 0,
                notified: false,
            },
            dial_ok_queued: false,
            announced,
            abandoned: false,
            scheduled: false,
            want_writable: false,
        }
    }

    /// Whether the stream still counts: it is not closed.
    pub(crate) fn is_live(&self) -> bool {
        !matches!(self.phase, Phase::Closed(_))
    }

    /// Whether everything this stream carries has crossed: this end's FIN went out and the
    /// peer's arrived. Only the application's reading is left.
    pub(crate) fn is_complete(&self) -> bool {
        self.phase == Phase::Established
            && self.send.state == SendState::Finished
            && self.recv.state != RecvState::Open
    }

    /// Whether both halves are finished: the stream closed normally.
    pub(crate) fn is_done(&self) -> bool {
        self.phase == Phase::Established
            && self.send.state == SendState::Finished
            && self.recv.state == RecvState::Finished
    }

    /// The error the application sees for a stream it reset or that failed, if any.
    pub(crate) fn error(&self) -> Option<StreamError> {
        match &self.phase {
            Phase::Resetting { code, reason } => Some(StreamError {
                code: *code,
                reason: reason.clone(),
                by: Initiator::Local,
                session_closed: false,
            }),
            Phase::Closed(e) => e.clone(),
            _ => None,
        }
    }

    /// Drops what waits to go out, and what arrived and was not read (a reset stream): the
    /// unread bytes count as released, which keeps the receive sum, and no WINDOW follows.
    pub(crate) fn drop_queues(&mut self) {
        self.send.queue.clear();
        self.send.queued = 0;
        self.dial_ok_queued = false;
        self.want_writable = false;
        self.drop_unread();
    }

    /// Drops the bytes that arrived and were not read, counting them as released.
    pub(crate) fn drop_unread(&mut self) {
        self.recv.pending += self.recv.buf.clear();
        self.recv.notified = false;
    }

    /// Drops every buffer of a stream that ends: nothing of it is held but its outcome and,
    /// for a clean end, the bytes before the peer's FIN that were not read yet (they all
    /// arrived; SPEC 7.5).
    pub(crate) fn release_buffers(&mut self) {
        self.send.queue.clear();
        self.send.queued = 0;
        if self.phase != Phase::Closed(None) {
            self.recv.buf.clear();
        }
        self.recv.unreleased = 0;
        self.recv.pending = 0;
        self.recv.notified = false;
        self.dial_ok_queued = false;
        self.want_writable = false;
    }

    /// Whether a frame for this stream is waiting to go out.
    pub(crate) fn has_work(&self, window_threshold: u32) -> bool {
        match &self.phase {
            Phase::Resetting { .. } | Phase::Dialing(Some(_)) => true,
            Phase::Dialing(None) | Phase::Pending | Phase::Closed(_) => false,
            Phase::Established => {
                self.dial_ok_queued
                    || self.wants_window_update(window_threshold)
                    || self.send.queued > 0
                    || self.send.state == SendState::Finishing
            }
        }
    }

    /// Whether enough credit was released to be worth a WINDOW frame (SPEC 6.4).
    pub(crate) fn wants_window_update(&self, threshold: u32) -> bool {
        self.recv.state == RecvState::Open && self.recv.pending >= threshold.max(1)
    }

    /// The public view of the state.
    pub(crate) fn state(&self) -> StreamState {
        match (&self.phase, self.send.state, self.recv.state) {
            (Phase::Dialing(_), ..) => StreamState::Dialing,
            (Phase::Pending, ..) => StreamState::Pending,
            (Phase::Resetting { .. }, ..) => StreamState::Resetting,
            (Phase::Closed(None), ..) => StreamState::Closed,
            (Phase::Closed(Some(_)), ..) => StreamState::Failed,
            (Phase::Established, SendState::Open, RecvState::Open) => StreamState::Open,
            (Phase::Established, _, RecvState::Open) => StreamState::HalfClosedLocal,
            (Phase::Established, SendState::Open, _) => StreamState::HalfClosedRemote,
            (Phase::Established, ..) => StreamState::Closing,
        }
    }
}

/// A stream's state as the application sees it (SPEC 5.2). A stream not in the table was
/// never known to the application, or was abandoned: [`super::Session::stream_state`] returns
/// `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StreamState {
    /// Opener: waiting for DIAL_OK.
    Dialing,
    /// Acceptor: waiting for the application to accept or reject.
    Pending,
    /// Both directions open.
    Open,
    /// This end finished (FIN queued or sent); the peer may still send.
    HalfClosedLocal,
    /// The peer finished (its FIN arrived); this end may still send.
    HalfClosedRemote,
    /// Both finished; this end's FIN or last bytes are still queued, or the peer's last
    /// bytes and FIN are still to be read.
    Closing,
    /// This end reset the stream; the RESET is still queued.
    Resetting,
    /// Both halves finished and everything was read: held until abandoned.
    Closed,
    /// Ended abnormally (reset, refused, failed dial, tunnel lost): held until abandoned.
    Failed,
}

/// A payload length as `u32`; payloads are bounded far below 4 GiB (SPEC 3.6).
pub(crate) fn len32(b: &[u8]) -> u32 {
    u32::try_from(b.len()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_drained_receive_buffer_keeps_no_spare_capacity() {
        let mut buf = RecvBuf::default();
        for _ in 0..16 {
            buf.push(Bytes::from(vec![1u8; 16 * 1024]), 64 * 1024);
        }
        let mut taken = 0;
        while let Some(b) = buf.pop(usize::MAX) {
            taken += b.len();
        }
        assert_eq!(taken, 256 * 1024);
        assert_eq!(
            buf.tail.capacity(),
            0,
            "a quiet stream holds no copy buffer"
        );
        // A partial read keeps the rest, and its capacity, until it is taken.
        buf.push(Bytes::from(vec![2u8; 100]), 64 * 1024);
        assert_eq!(buf.pop(40).map(|b| b.len()), Some(40));
        assert_eq!(buf.len(), 60);
        assert!(buf.tail.capacity() >= 60);
    }

    proptest! {
        /// SPEC 10: however a peer sizes its frames and however the application reads, a
        /// receive buffer holding at most `window` bytes holds at most `2·window/T + 2`
        /// slices.
        #[test]
        fn a_receive_buffer_holds_o_window_slices_whatever_the_frame_sizes(
            window in 1u32..200_000,
            copy_below in 1u32..70_000,
            ops in proptest::collection::vec((any::<bool>(), 1usize..70_000), 1..400),
        ) {
            let mut buf = RecvBuf::default();
            for (push, n) in ops {
                if push {
                    let room = window - buf.len();
                    let n = n.min(room as usize);
                    if n == 0 {
                        continue;
                    }
                    buf.push(Bytes::from(vec![0u8; n]), copy_below);
                } else {
                    let _ = buf.pop(n);
                }
                prop_assert!(buf.len() <= window);
                let bound = 2 * (window / copy_below) as usize + 2;
                prop_assert!(buf.chunk_count() <= bound, "{} slices over {bound}", buf.chunk_count());
            }
        }
    }
}
