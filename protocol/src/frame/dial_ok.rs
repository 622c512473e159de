//! DIAL_OK: the acceptor connected the destination (SPEC 3.4.4).

use super::StreamId;

/// DIAL_OK: stream `stream` is established. The payload is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DialOk {
    /// The stream.
    pub stream: StreamId,
}

impl DialOk {
    pub(crate) fn decode(stream: StreamId, payload: &[u8]) -> Result<DialOk, &'static str> {
        if !payload.is_empty() {
            return Err("DIAL_OK payload is not empty");
        }
        Ok(DialOk { stream })
    }
}
