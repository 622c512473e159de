//! RESET: aborts a stream (SPEC 3.4.7).

use bytes::BufMut;

use super::wire::{self, fits_str8, put_str8, str8, u32_};
use super::{ErrorCode, StreamId};

/// RESET: stream `stream` ends abnormally with `code`; also a refused or cancelled dial.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reset {
    /// The stream.
    pub stream: StreamId,
    /// Why.
    pub code: ErrorCode,
    /// A short human-readable reason, at most 255 bytes of UTF-8.
    pub reason: String,
}

impl Reset {
    /// Whether every field is valid (the decoder checks the same).
    pub fn validate(&self) -> Result<(), &'static str> {
        if !fits_str8(&self.reason) {
            return Err("reason over 255 bytes");
        }
        Ok(())
    }

    pub(crate) fn encoded_len(&self) -> usize {
        4 + 1 + self.reason.len()
    }

    pub(crate) fn encode(&self, dst: &mut impl BufMut) {
        dst.put_u32(self.code.0);
        put_str8(dst, &self.reason);
    }

    pub(crate) fn decode(stream: StreamId, payload: &[u8]) -> Result<Reset, &'static str> {
        wire::run(payload, |i| {
            let (i, code) = u32_("RESET code")(i)?;
            let (i, reason) = str8(
                "RESET reason runs past the payload",
                "RESET reason is not UTF-8",
            )(i)?;
            Ok((
                i,
                Reset {
                    stream,
                    //= SPEC §8.1
                    //# Unknown codes MUST be accepted and treated like `INTERNAL_ERROR`.
                    code: ErrorCode(code),
                    reason: reason.to_owned(),
                },
            ))
        })
    }
}
