//! GOAWAY: drain, or the last word before a close (SPEC 3.4.9).

use bytes::BufMut;

use super::wire::{self, fail, fits_str8, put_str8, str8, u32_};
use super::{ErrorCode, MAX_STREAM_ID, StreamId};

/// GOAWAY: the sender opens no more streams and processes none of the receiver's streams above
/// `last_stream`. `NO_ERROR` drains; any other code closes the tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GoAway {
    /// The highest stream id opened by the receiver that the sender has processed (0: none).
    pub last_stream: StreamId,
    /// Why.
    pub code: ErrorCode,
    /// A short human-readable reason, at most 255 bytes of UTF-8.
    pub reason: String,
}

impl GoAway {
    /// Whether every field is valid (the decoder checks the same).
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.last_stream.0 > MAX_STREAM_ID {
            return Err("GOAWAY last stream id has the reserved bit set");
        }
        if !fits_str8(&self.reason) {
            return Err("reason over 255 bytes");
        }
        Ok(())
    }

    pub(crate) fn encoded_len(&self) -> usize {
        4 + 4 + 1 + self.reason.len()
    }

    pub(crate) fn encode(&self, dst: &mut impl BufMut) {
        dst.put_u32(self.last_stream.0);
        dst.put_u32(self.code.0);
        put_str8(dst, &self.reason);
    }

    pub(crate) fn decode(payload: &[u8]) -> Result<GoAway, &'static str> {
        wire::run(payload, |i| {
            let (i, last) = u32_("GOAWAY last stream id")(i)?;
            if last > MAX_STREAM_ID {
                return fail("GOAWAY last stream id has the reserved bit set");
            }
            let (i, code) = u32_("GOAWAY code")(i)?;
            let (i, reason) = str8(
                "GOAWAY reason runs past the payload",
                "GOAWAY reason is not UTF-8",
            )(i)?;
            Ok((
                i,
                GoAway {
                    last_stream: StreamId(last),
                    code: ErrorCode(code),
                    reason: reason.to_owned(),
                },
            ))
        })
    }
}
