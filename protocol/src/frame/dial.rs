//! DIAL: opens a stream to a destination (SPEC 3.4.3).

use bytes::BufMut;

use super::wire::{self, fail, fits_str8, is_graphic_ascii, put_str8, str8, u8_, u16_};
use super::{StreamId, wire_enum};

wire_enum! {
    /// The transport a DIAL asks for (SPEC 3.4.3).
    Protocol(u8) {
        /// A TCP connection.
        TCP = 0x1,
    }
}

/// DIAL: open stream `stream` to `host:port` (SPEC 3.4.3).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Dial {
    /// The new stream.
    pub stream: StreamId,
    /// The transport.
    pub protocol: Protocol,
    /// A DNS name or an IP literal (IPv6 without brackets): 1 to 255 printable ASCII bytes.
    pub host: String,
    /// The destination port, not 0.
    pub port: u16,
}

impl Dial {
    /// Whether every field is valid (the decoder checks the same).
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.host.is_empty() || !fits_str8(&self.host) || !is_graphic_ascii(&self.host) {
            return Err("DIAL host is not 1-255 printable ASCII bytes");
        }
        if self.port == 0 {
            return Err("DIAL port is 0");
        }
        Ok(())
    }

    pub(crate) fn encoded_len(&self) -> usize {
        1 + 2 + 1 + self.host.len()
    }

    pub(crate) fn encode(&self, dst: &mut impl BufMut) {
        dst.put_u8(self.protocol.0);
        dst.put_u16(self.port);
        put_str8(dst, &self.host);
    }

    pub(crate) fn decode(stream: StreamId, payload: &[u8]) -> Result<Dial, &'static str> {
        let dial = wire::run(payload, |i| {
            let (i, protocol) = u8_("protocol")(i)?;
            let (i, port) = u16_("port")(i)?;
            let (i, host) = str8(
                "DIAL host runs past the payload",
                "DIAL host is not 1-255 printable ASCII bytes",
            )(i)?;
            if host.is_empty() {
                return fail("DIAL host is not 1-255 printable ASCII bytes");
            }
            Ok((
                i,
                Dial {
                    stream,
                    protocol: Protocol(protocol),
                    host: host.to_owned(),
                    port,
                },
            ))
        })?;
        dial.validate()?;
        Ok(dial)
    }
}
