//! What the session tells the application (SPEC 7.2).

use crate::error::{CloseReason, StreamError};
use crate::frame::{Dial, ErrorCode, Hello, Settings, StreamId, Welcome};

/// An application event, from [`super::Session::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Event {
    /// Server end: an agent said HELLO. Decide with `accept_hello` or `refuse_hello`.
    HelloReceived(Hello),
    /// The handshake is done; streams may be opened.
    Established {
        /// The version in use.
        version: u16,
        /// The peer's settings, defaults applied where it left one out.
        peer_settings: Settings,
        /// Agent end: the server's WELCOME (server id and count). `None` at the server end.
        welcome: Option<Welcome>,
    },
    /// The peer opened a stream. Answer with `accept` or `reject`.
    DialRequested {
        /// The new stream.
        stream: StreamId,
        /// Where it should go.
        dial: Dial,
    },
    /// A stream this end opened is established.
    DialSucceeded {
        /// The stream.
        stream: StreamId,
    },
    /// A stream this end opened failed before it was established.
    DialFailed {
        /// The stream.
        stream: StreamId,
        /// Why, and who said so.
        error: StreamError,
    },
    /// Bytes or the peer's FIN arrived on a stream: call `recv` until it returns
    /// `WouldBlock` or the end. At most one is queued per stream until `recv` is called.
    Readable {
        /// The stream.
        stream: StreamId,
    },
    /// An established or pending stream ended abnormally; its unread bytes were dropped.
    /// `recv` and `send` report the same error until the stream is abandoned.
    Reset {
        /// The stream.
        stream: StreamId,
        /// Why, and who started it.
        error: StreamError,
    },
    /// A stream whose `send` was short may send again.
    Writable {
        /// The stream.
        stream: StreamId,
    },
    /// A PING sent by `ping` was answered.
    PingAnswered {
        /// Round-trip time in milliseconds of the caller's clock.
        rtt_ms: u64,
    },
    /// The peer sent GOAWAY with NO_ERROR: no new streams; existing ones go on.
    GoingAway {
        /// The highest stream id of this end that the peer processed.
        last_stream: StreamId,
        /// The peer's reason.
        reason: String,
    },
    /// The session ended; every stream has already had its final event. Last event.
    Closed(CloseReason),
}

impl Event {
    /// The stream the event is about, if any.
    pub fn stream(&self) -> Option<StreamId> {
        match self {
            Event::DialRequested { stream, .. }
            | Event::DialSucceeded { stream }
            | Event::DialFailed { stream, .. }
            | Event::Readable { stream }
            | Event::Reset { stream, .. }
            | Event::Writable { stream } => Some(*stream),
            _ => None,
        }
    }

    /// The error code, for events that carry one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Event::DialFailed { error, .. } | Event::Reset { error, .. } => Some(error.code),
            Event::Closed(r) => Some(r.code()),
            _ => None,
        }
    }
}
