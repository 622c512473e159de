//! Frames of kinds this implementation does not know (SPEC 3.2).

use bytes::Bytes;

use super::{FrameKind, StreamId};

//= SPEC §3.2
//# An implementation MUST NOT send a kind it has not negotiated.
// tether negotiates no extension: the session never puts an `Unknown` frame on the wire (only
// the decoder makes them, and tests re-encode them).
/// A frame of an unknown kind, kept whole so that it re-encodes to the same bytes. The session
/// ignores it (SPEC 3.2); its length was still checked against the limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Unknown {
    /// The kind byte.
    pub kind: FrameKind,
    /// The flags byte, uninterpreted.
    pub flags: u8,
    /// The stream id field.
    pub stream: StreamId,
    /// The payload, uninterpreted.
    pub payload: Bytes,
}
