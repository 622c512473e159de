//! Errors, typed by who is at fault (SPEC 8).
//!
//! - [`DecodeError`]: the peer's bytes do not parse as a frame.
//! - [`ProtocolError`]: the frames parse but break a rule of the session.
//! - [`ApiError`]: the local caller asked for something the session cannot do.
//! - [`CloseReason`] and [`StreamError`]: what the application finally sees when a session or
//!   a stream ends, with who started it.

use core::fmt;

pub use crate::frame::DecodeError;
use crate::frame::{ErrorCode, FrameKind};

/// The peer's frames parse but break a rule (SPEC 8.2): the session sends GOAWAY with `code`
/// and closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProtocolError {
    /// The GOAWAY code.
    pub code: ErrorCode,
    /// The kind of the offending frame, if a frame was at fault.
    pub frame: Option<FrameKind>,
    /// What rule was broken.
    pub reason: &'static str,
}

impl ProtocolError {
    pub(crate) fn new(code: ErrorCode, frame: FrameKind, reason: &'static str) -> Self {
        ProtocolError {
            code,
            frame: Some(frame),
            reason,
        }
    }
}

impl From<DecodeError> for ProtocolError {
    fn from(e: DecodeError) -> Self {
        ProtocolError {
            code: e.code(),
            frame: Some(e.kind()),
            reason: e.reason(),
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.frame {
            Some(k) => write!(f, "{} on {k}: {}", self.code, self.reason),
            None => write!(f, "{}: {}", self.code, self.reason),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// The local caller asked for something the session cannot do now. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ApiError {
    /// The handshake has not completed (or the session is closed).
    NotOpen,
    /// The session is closed.
    Closed,
    /// A GOAWAY was sent or received: no new streams on this session.
    Draining,
    /// The peer's MAX_CONCURRENT_STREAMS is reached; retry after a stream ends.
    StreamLimit,
    /// Every stream id of this session is used: open a new tunnel (the session drains).
    IdsExhausted,
    /// No such stream (never opened, never announced, or abandoned).
    UnknownStream,
    /// Nothing to read yet; a `Readable` event follows when there is.
    WouldBlock,
    /// The stream ended abnormally (reset by either end, refused, failed dial, tunnel lost).
    Stream(StreamError),
    /// The stream is still dialing or pending: nothing may flow yet.
    NotEstablished,
    /// This end already finished its direction (or the stream closed cleanly).
    AlreadyFinished,
    /// `accept` and `reject` need a pending dial.
    NotPending,
    /// The stream was already reset or has ended.
    StreamEnded,
    /// `release` of more bytes than `recv` handed out.
    OverRelease,
    /// A read of at most 0 bytes.
    ZeroLength,
    /// `accept_hello` or `refuse_hello` with no HELLO awaiting a decision.
    NoHelloPending,
    /// The configuration is out of range (SPEC 4.2, 5.1).
    InvalidConfig(&'static str),
    /// A frame this end would build is invalid (a DIAL host, a HELLO over its limit, ...).
    InvalidFrame(&'static str),
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::NotOpen => f.write_str("session is not open"),
            ApiError::Closed => f.write_str("session is closed"),
            ApiError::Draining => f.write_str("session is draining: no new streams"),
            ApiError::StreamLimit => f.write_str("peer's concurrent stream limit reached"),
            ApiError::IdsExhausted => f.write_str("stream ids exhausted: open a new tunnel"),
            ApiError::UnknownStream => f.write_str("no such stream"),
            ApiError::WouldBlock => f.write_str("nothing to read yet"),
            ApiError::Stream(e) => write!(f, "stream {e}"),
            ApiError::NotEstablished => f.write_str("the stream is not established"),
            ApiError::AlreadyFinished => f.write_str("this end already finished the stream"),
            ApiError::NotPending => f.write_str("no pending dial on this stream"),
            ApiError::StreamEnded => f.write_str("the stream already ended"),
            ApiError::OverRelease => f.write_str("release of more bytes than were read"),
            ApiError::ZeroLength => f.write_str("a read of zero bytes"),
            ApiError::NoHelloPending => f.write_str("no HELLO awaiting a decision"),
            ApiError::InvalidConfig(s) => write!(f, "invalid configuration: {s}"),
            ApiError::InvalidFrame(s) => write!(f, "invalid frame: {s}"),
        }
    }
}

impl std::error::Error for ApiError {}

/// Which end started a close or a reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Initiator {
    /// This end (its application, or its session on detecting a fault).
    Local,
    /// The other end.
    Peer,
}

/// Why a session ended (SPEC 7.5), as the application sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseReason {
    /// A drain completed: GOAWAYs exchanged, every stream finished.
    Drained,
    /// The local application closed with `code`.
    Local {
        /// The GOAWAY code sent.
        code: ErrorCode,
        /// The reason sent.
        reason: String,
    },
    /// The peer closed with GOAWAY `code`.
    Peer {
        /// The GOAWAY code received.
        code: ErrorCode,
        /// The reason received.
        reason: String,
    },
    /// This end found the peer breaking the protocol and closed.
    Violation(ProtocolError),
    /// No frame arrived within the keepalive deadline.
    KeepaliveTimeout,
    /// The handshake did not complete in time.
    HandshakeTimeout,
    /// The transport under the tunnel ended without a GOAWAY.
    TransportLost,
}

impl CloseReason {
    /// The error code that stands for this close in stream errors.
    pub fn code(&self) -> ErrorCode {
        match self {
            CloseReason::Drained => ErrorCode::NO_ERROR,
            CloseReason::Local { code, .. } | CloseReason::Peer { code, .. } => *code,
            CloseReason::Violation(e) => e.code,
            CloseReason::KeepaliveTimeout => ErrorCode::KEEPALIVE_TIMEOUT,
            CloseReason::HandshakeTimeout => ErrorCode::HANDSHAKE_TIMEOUT,
            CloseReason::TransportLost => ErrorCode::CONNECTION_LOST,
        }
    }

    /// Who started the close.
    pub fn initiator(&self) -> Initiator {
        match self {
            CloseReason::Peer { .. } | CloseReason::TransportLost => Initiator::Peer,
            _ => Initiator::Local,
        }
    }

    /// Whether this is a graceful end (a drain, or a GOAWAY with NO_ERROR).
    pub fn is_graceful(&self) -> bool {
        self.code() == ErrorCode::NO_ERROR
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Drained => f.write_str("drained"),
            CloseReason::Local { code, reason } => write!(f, "closed locally ({code}: {reason})"),
            CloseReason::Peer { code, reason } => write!(f, "closed by peer ({code}: {reason})"),
            CloseReason::Violation(e) => write!(f, "peer broke the protocol ({e})"),
            CloseReason::KeepaliveTimeout => f.write_str("keepalive timed out"),
            CloseReason::HandshakeTimeout => f.write_str("handshake timed out"),
            CloseReason::TransportLost => f.write_str("tunnel transport lost"),
        }
    }
}

impl std::error::Error for CloseReason {}

/// How a stream ended abnormally, as the application sees it (SPEC 5.5).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamError {
    /// The RESET code, or the code of the session close that ended the stream.
    pub code: ErrorCode,
    /// The reason given.
    pub reason: String,
    /// Who started it.
    pub by: Initiator,
    /// Whether the whole session ended (rather than this stream alone).
    pub session_closed: bool,
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = match self.by {
            Initiator::Local => "locally",
            Initiator::Peer => "by peer",
        };
        let what = if self.session_closed {
            "tunnel closed"
        } else {
            "reset"
        };
        write!(f, "{what} {who} ({}: {})", self.code, self.reason)
    }
}

impl std::error::Error for StreamError {}

impl From<&CloseReason> for StreamError {
    /// How a stream ends when its whole session does (SPEC 7.5).
    fn from(reason: &CloseReason) -> Self {
        StreamError {
            code: reason.code(),
            reason: reason.to_string(),
            by: reason.initiator(),
            session_closed: true,
        }
    }
}
