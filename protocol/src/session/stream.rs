//! One stream's state (SPEC 5).
//!
//! ```text
//!  opener                                  acceptor
//!  ------                                  --------
//!  open() -> Dialing{DIAL queued}
//!            | DIAL sent  ------ DIAL ---->  Pending   (DialRequested)
//!            |                               | accept()          | reject()
//!            |            <--- DIAL_OK ----  Established          Resetting -> RESET -> gone
//!  Established (DialSucceeded)
//!
//!  Established = two halves, each ends on its own (half-close, SPEC 5.3):
//!    send: Open --finish()--> Finishing --last DATA with FIN sent--> Finished
//!    recv: Open --DATA with FIN received--> Finished
//!  both Finished  ==> the stream is closed and removed.
//!
//!  reset() from any state --> Resetting --RESET sent--> gone
//!  RESET received in any state --> gone (DialFailed / Reset event)
//! ```
//!
//! A stream that is gone has freed everything: its queue, its windows, its table entry.

use std::collections::VecDeque;

use bytes::Bytes;

use super::window::Window;
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
    /// The peer's FIN arrived.
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

/// The receiving half: the peer's credit and what the application still holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RecvHalf {
    pub(crate) state: RecvState,
    /// The peer's credit as this end knows it.
    pub(crate) window: Window,
    /// Delivered to the application, not yet released.
    pub(crate) unreleased: u32,
    /// Released, not yet granted back in a WINDOW frame.
    pub(crate) pending: u32,
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
    /// the stream's final event.
    pub(crate) announced: bool,
    /// The stream is in the session's ready ring.
    pub(crate) scheduled: bool,
    /// A `send` was short; a `Writable` event is owed when credit returns.
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
                unreleased: 0,
                pending: 0,
            },
            dial_ok_queued: false,
            announced,
            scheduled: false,
            want_writable: false,
        }
    }

    /// Whether both halves are finished: the stream closed normally.
    pub(crate) fn is_done(&self) -> bool {
        self.phase == Phase::Established
            && self.send.state == SendState::Finished
            && self.recv.state == RecvState::Finished
    }

    /// Whether a frame for this stream is waiting to go out.
    pub(crate) fn has_work(&self, window_threshold: u32) -> bool {
        match &self.phase {
            Phase::Resetting { .. } | Phase::Dialing(Some(_)) => true,
            Phase::Dialing(None) | Phase::Pending => false,
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
            (Phase::Established, SendState::Open, RecvState::Open) => StreamState::Open,
            (Phase::Established, _, RecvState::Open) => StreamState::HalfClosedLocal,
            (Phase::Established, SendState::Open, RecvState::Finished) => {
                StreamState::HalfClosedRemote
            }
            (Phase::Established, _, RecvState::Finished) => StreamState::Closing,
        }
    }
}

/// A stream's state as the application sees it (SPEC 5.2). A stream not in the table is
/// closed: [`super::Session::stream_state`] returns `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamState {
    /// Opener: waiting for DIAL_OK.
    Dialing,
    /// Acceptor: waiting for the application to accept or reject.
    Pending,
    /// Both directions open.
    Open,
    /// This end finished (FIN queued or sent); the peer may still send.
    HalfClosedLocal,
    /// The peer finished; this end may still send.
    HalfClosedRemote,
    /// Both finished; this end's FIN or last bytes are still queued.
    Closing,
    /// This end reset the stream; the RESET is still queued.
    Resetting,
}
