//! Time as a value: the session reads no clock.

/// A point in time, in milliseconds of a monotonic clock the caller chooses. The session only
/// compares and adds, so a model checker or a test can make any instant it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time(u64);

impl Time {
    /// `ms` milliseconds after the clock's zero.
    pub const fn from_millis(ms: u64) -> Time {
        Time(ms)
    }

    /// Milliseconds since the clock's zero.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// `ms` milliseconds later (saturating).
    pub const fn plus_ms(self, ms: u64) -> Time {
        Time(self.0.saturating_add(ms))
    }
}
