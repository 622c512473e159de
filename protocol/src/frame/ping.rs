//! PING: keepalive and round-trip time (SPEC 3.4.8).

use super::wire::{self, u64_};

/// PING flag: this PING answers one with the same payload.
pub const FLAG_ACK: u8 = 0x1;

/// PING: an opaque 8-byte payload; the answer echoes it with `ack` set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ping {
    /// Whether this is an answer.
    pub ack: bool,
    /// Opaque to the receiver.
    pub payload: u64,
}

impl Ping {
    pub(crate) fn decode(flags: u8, payload: &[u8]) -> Result<Ping, &'static str> {
        let payload = wire::run(payload, u64_("PING payload is not 8 bytes"))?;
        Ok(Ping {
            ack: flags & FLAG_ACK != 0,
            payload,
        })
    }
}
