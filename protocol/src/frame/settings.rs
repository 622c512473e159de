//! The settings block carried by HELLO and WELCOME (SPEC 3.5).

use core::fmt;

use bytes::BufMut;

use super::wire::{Res, fail, u8_, u16_, u32_};
use super::{MAX_PAYLOAD_LIMIT, MAX_WINDOW, wire_enum};

wire_enum! {
    /// A setting's id (SPEC 3.5). Unknown ids are carried and ignored.
    SettingId(u16) {
        /// The window each stream starts with, in the direction towards the sender.
        INITIAL_WINDOW = 0x1,
        /// The largest payload the sender accepts in one frame.
        MAX_FRAME_SIZE = 0x2,
        /// How many streams the peer may have open towards the sender at once.
        MAX_CONCURRENT_STREAMS = 0x3,
        /// The sender's keepalive interval in milliseconds; 0 = no keepalive.
        KEEPALIVE_INTERVAL = 0x4,
        /// 1: the sender accepts DRAINING frames (SPEC 7.4); 0 or absent: it does not.
        DRAIN_NOTICE = 0x5,
    }
}

/// The most settings one block may carry.
pub const MAX_SETTINGS: usize = 32;

/// The smallest MAX_FRAME_SIZE a peer may announce (SPEC 3.5).
pub const MIN_MAX_FRAME_SIZE: u32 = 1024;

/// The shortest KEEPALIVE_INTERVAL a receiver honours, in ms: a peer's smaller non-zero
/// value is raised to it (SPEC 7.3), so a peer cannot make this end PING without pause.
pub const MIN_KEEPALIVE_INTERVAL_MS: u64 = 1000;

/// Settings one end announces. `None` leaves the default of SPEC 3.5.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Settings {
    /// INITIAL_WINDOW: 1 ..= 2^31-1.
    pub initial_window: Option<u32>,
    /// MAX_FRAME_SIZE: 1024 ..= 16,777,215.
    pub max_frame_size: Option<u32>,
    /// MAX_CONCURRENT_STREAMS: any value; 0 forbids the peer to open streams.
    pub max_concurrent_streams: Option<u32>,
    /// KEEPALIVE_INTERVAL in milliseconds; 0 = none.
    pub keepalive_interval: Option<u32>,
    /// DRAIN_NOTICE: 0 or 1; 1 = the sender accepts DRAINING frames.
    pub drain_notice: Option<u32>,
    /// Settings this implementation does not know, in ascending id order; carried so that
    /// re-encoding gives the same bytes, otherwise ignored.
    pub unknown: Vec<(SettingId, u32)>,
}

impl Settings {
    /// Default INITIAL_WINDOW (SPEC 3.5).
    pub const DEFAULT_INITIAL_WINDOW: u32 = 256 * 1024;
    /// Default MAX_FRAME_SIZE (SPEC 3.5).
    pub const DEFAULT_MAX_FRAME_SIZE: u32 = 64 * 1024;
    /// Default MAX_CONCURRENT_STREAMS (SPEC 3.5).
    pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 1024;

    /// All pairs in ascending id order, as they go on the wire.
    pub fn pairs(&self) -> Vec<(SettingId, u32)> {
        let known = [
            (SettingId::INITIAL_WINDOW, self.initial_window),
            (SettingId::MAX_FRAME_SIZE, self.max_frame_size),
            (
                SettingId::MAX_CONCURRENT_STREAMS,
                self.max_concurrent_streams,
            ),
            (SettingId::KEEPALIVE_INTERVAL, self.keepalive_interval),
            (SettingId::DRAIN_NOTICE, self.drain_notice),
        ];
        let mut out: Vec<(SettingId, u32)> = known
            .into_iter()
            .filter_map(|(id, v)| v.map(|v| (id, v)))
            .chain(self.unknown.iter().copied())
            .collect();
        out.sort_by_key(|(id, _)| *id);
        out
    }

    /// Whether every value is in range and the block is canonical: at most [`MAX_SETTINGS`]
    /// entries, unknown ids really unknown and strictly ascending.
    pub fn validate(&self) -> Result<(), &'static str> {
        if let Some(w) = self.initial_window
            && !(1..=MAX_WINDOW).contains(&w)
        {
            return Err("INITIAL_WINDOW out of range");
        }
        if let Some(m) = self.max_frame_size
            && !(MIN_MAX_FRAME_SIZE..=MAX_PAYLOAD_LIMIT).contains(&m)
        {
            return Err("MAX_FRAME_SIZE out of range");
        }
        if self.drain_notice.is_some_and(|d| d > 1) {
            return Err("DRAIN_NOTICE is not 0 or 1");
        }
        let mut last: Option<SettingId> = None;
        for (id, _) in &self.unknown {
            if id.name().is_some() {
                return Err("known setting listed as unknown");
            }
            if last.is_some_and(|l| l >= *id) {
                return Err("settings not in ascending id order");
            }
            last = Some(*id);
        }
        if self.pairs().len() > MAX_SETTINGS {
            return Err("too many settings");
        }
        Ok(())
    }

    pub(crate) fn encoded_len(&self) -> usize {
        1 + 6 * self.pairs().len()
    }

    pub(crate) fn encode(&self, dst: &mut impl BufMut) {
        let pairs = self.pairs();
        dst.put_u8(u8::try_from(pairs.len()).unwrap_or(u8::MAX));
        for (id, v) in pairs {
            dst.put_u16(id.0);
            dst.put_u32(v);
        }
    }

    pub(crate) fn parse(i: &[u8]) -> Res<'_, Settings> {
        let (mut i, n) = u8_("settings count")(i)?;
        if usize::from(n) > MAX_SETTINGS {
            return fail("too many settings");
        }
        let mut s = Settings::default();
        let mut last: Option<SettingId> = None;
        for _ in 0..n {
            let (rest, id) = u16_("setting id")(i)?;
            let (rest, v) = u32_("setting value")(rest)?;
            i = rest;
            let id = SettingId(id);
            if last.is_some_and(|l| l >= id) {
                return fail("settings not in ascending id order");
            }
            last = Some(id);
            match id {
                SettingId::INITIAL_WINDOW => s.initial_window = Some(v),
                SettingId::MAX_FRAME_SIZE => s.max_frame_size = Some(v),
                SettingId::MAX_CONCURRENT_STREAMS => s.max_concurrent_streams = Some(v),
                SettingId::KEEPALIVE_INTERVAL => s.keepalive_interval = Some(v),
                SettingId::DRAIN_NOTICE => s.drain_notice = Some(v),
                other => s.unknown.push((other, v)),
            }
        }
        match s.validate() {
            Ok(()) => Ok((i, s)),
            Err(reason) => fail(reason),
        }
    }

    /// INITIAL_WINDOW with its default applied.
    pub fn initial_window(&self) -> u32 {
        self.initial_window.unwrap_or(Self::DEFAULT_INITIAL_WINDOW)
    }

    /// MAX_FRAME_SIZE with its default applied.
    pub fn max_frame_size(&self) -> u32 {
        self.max_frame_size.unwrap_or(Self::DEFAULT_MAX_FRAME_SIZE)
    }

    /// MAX_CONCURRENT_STREAMS with its default applied.
    pub fn max_concurrent_streams(&self) -> u32 {
        self.max_concurrent_streams
            .unwrap_or(Self::DEFAULT_MAX_CONCURRENT_STREAMS)
    }

    /// Whether the sender accepts DRAINING frames (DRAIN_NOTICE = 1).
    pub fn drain_notice(&self) -> bool {
        self.drain_notice == Some(1)
    }

    /// KEEPALIVE_INTERVAL with its default (0, none) applied.
    pub fn keepalive_interval(&self) -> u32 {
        self.keepalive_interval.unwrap_or(0)
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (n, (id, v)) in self.pairs().into_iter().enumerate() {
            if n > 0 {
                f.write_str(",")?;
            }
            match id.name() {
                Some(name) => write!(f, "{}={v}", name.to_ascii_lowercase())?,
                None => write!(f, "{:#06x}={v}", id.0)?,
            }
        }
        f.write_str("}")
    }
}
