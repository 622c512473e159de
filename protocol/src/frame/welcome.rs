//! WELCOME: the server's answer to HELLO (SPEC 3.4.2).

use core::fmt;

use bytes::BufMut;

use super::settings::Settings;
use super::wire::{self, fail, fits_str8, put_str8, str8, u16_};

/// WELCOME: the chosen version and who the server is (SPEC 3.4.2).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Welcome {
    /// The version chosen from the HELLO's list.
    pub version: u16,
    /// The server's id: 1 to 255 bytes of UTF-8.
    pub server_id: String,
    /// How many servers the agent should hold tunnels to (HA); at least 1.
    pub server_count: u16,
    /// The server's settings.
    pub settings: Settings,
}

impl Welcome {
    /// Whether every field is valid (the decoder checks the same).
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.server_id.is_empty() || !fits_str8(&self.server_id) {
            return Err("server id is not 1-255 bytes");
        }
        if self.server_count == 0 {
            return Err("server count is 0");
        }
        self.settings.validate()
    }

    pub(crate) fn encoded_len(&self) -> usize {
        2 + 1 + self.server_id.len() + 2 + self.settings.encoded_len()
    }

    pub(crate) fn encode(&self, dst: &mut impl BufMut) {
        dst.put_u16(self.version);
        put_str8(dst, &self.server_id);
        dst.put_u16(self.server_count);
        self.settings.encode(dst);
    }

    pub(crate) fn decode(payload: &[u8]) -> Result<Welcome, &'static str> {
        let welcome = wire::run(payload, |i| {
            let (i, version) = u16_("version")(i)?;
            let (i, server_id) =
                str8("server id runs past the payload", "server id is not UTF-8")(i)?;
            let (i, server_count) = u16_("server count")(i)?;
            let (i, settings) = Settings::parse(i)?;
            if server_id.is_empty() {
                return fail("server id is not 1-255 bytes");
            }
            Ok((
                i,
                Welcome {
                    version,
                    server_id: server_id.to_owned(),
                    server_count,
                    settings,
                },
            ))
        })?;
        welcome.validate()?;
        Ok(welcome)
    }

    pub(crate) fn describe(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "WELCOME version={} server_id={:?} server_count={} settings={}",
            self.version, self.server_id, self.server_count, self.settings
        )
    }
}
