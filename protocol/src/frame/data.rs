//! DATA: stream bytes (SPEC 3.4.5).

use bytes::Bytes;

use super::StreamId;

/// DATA flag: the sender's direction of the stream ends after this payload.
pub const FLAG_FIN: u8 = 0x1;

/// DATA: bytes of stream `stream`; `fin` half-closes the sender's direction.
///
/// The payload is a `Bytes`: a decoded payload is a slice of the read buffer and an encoded one
/// can go to a vectored write as it is (see [`super::Frame::payload_bytes`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Data {
    /// The stream.
    pub stream: StreamId,
    /// Whether this is the last DATA of the sender's direction.
    pub fin: bool,
    /// The bytes; may be empty.
    pub payload: Bytes,
}
