//! WINDOW: a flow-control credit increment (SPEC 3.4.6).

use super::wire::{self, u32_};
use super::{MAX_WINDOW, StreamId};

/// WINDOW: the receiver of stream `stream` has consumed `increment` more bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WindowUpdate {
    /// The stream.
    pub stream: StreamId,
    /// 1 ..= 2^31-1 bytes of credit.
    pub increment: u32,
}

impl WindowUpdate {
    pub(crate) fn decode(stream: StreamId, payload: &[u8]) -> Result<WindowUpdate, &'static str> {
        let increment = wire::run(payload, u32_("WINDOW payload is not 4 bytes"))?;
        if increment == 0 || increment > MAX_WINDOW {
            return Err("WINDOW increment is not 1 ..= 2^31-1");
        }
        Ok(WindowUpdate { stream, increment })
    }
}
