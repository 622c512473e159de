//! [`DecodeError`]: bytes that do not parse as a frame (SPEC 8.2).

use core::fmt;

use super::{ErrorCode, FrameKind};

/// The bytes do not parse as a frame. Always the peer's fault; the session answers with GOAWAY
/// and closes (SPEC 8.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DecodeError {
    /// The header announced a payload over the limit; nothing of it was read or allocated.
    TooLarge {
        /// The frame's kind.
        kind: FrameKind,
        /// The announced payload length.
        len: u32,
        /// The limit in force.
        max: u32,
    },
    /// A header or payload field is invalid.
    Malformed {
        /// The frame's kind.
        kind: FrameKind,
        /// What is wrong.
        reason: &'static str,
    },
}

impl DecodeError {
    /// The GOAWAY code this error closes the tunnel with.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLarge { .. } => ErrorCode::FRAME_TOO_LARGE,
            DecodeError::Malformed { .. } => ErrorCode::MALFORMED_FRAME,
        }
    }

    /// The kind of the frame that failed.
    pub fn kind(&self) -> FrameKind {
        match self {
            DecodeError::TooLarge { kind, .. } | DecodeError::Malformed { kind, .. } => *kind,
        }
    }

    /// A static reason, for GOAWAY and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "frame length over the limit",
            DecodeError::Malformed { reason, .. } => reason,
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooLarge { kind, len, max } => {
                write!(f, "{kind} frame of {len} bytes is over the limit of {max}")
            }
            DecodeError::Malformed { kind, reason } => {
                write!(f, "malformed {kind} frame: {reason}")
            }
        }
    }
}

impl std::error::Error for DecodeError {}
