//! Flow-control window arithmetic (SPEC 6), in one checked newtype.
//!
//! Both ends keep two views of every stream direction:
//!
//! - the **sender's** window: how many more bytes it may send. It shrinks when the application
//!   hands bytes to the session and grows by WINDOW increments. Invariant: `window + unacked ==
//!   peer's INITIAL_WINDOW`, where `unacked` counts bytes sent and not yet credited back.
//! - the **receiver's** window: how many more bytes the peer may send. It shrinks as DATA
//!   arrives and grows when a WINDOW frame goes out. Invariant: `window + unreleased + pending
//!   == local INITIAL_WINDOW`.
//!
//! Neither view ever exceeds the INITIAL_WINDOW it started from: a receiver grants back only
//! bytes it received (SPEC 6.3), so a peer can make this end hold at most INITIAL_WINDOW bytes
//! per stream.

use core::fmt;

/// A flow-control window: bytes that may still be sent in one direction of one stream.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(crate) struct Window(u32);

/// A window operation that would break SPEC 6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum WindowError {
    /// More bytes than the window holds.
    Overrun,
    /// The window would grow past its cap (the INITIAL_WINDOW).
    Overflow,
}

impl Window {
    /// A window of `n` bytes.
    pub(crate) fn new(n: u32) -> Window {
        Window(n)
    }

    /// Bytes that may still be sent.
    pub(crate) fn available(self) -> u32 {
        self.0
    }

    /// Whether nothing may be sent.
    pub(crate) fn is_exhausted(self) -> bool {
        self.0 == 0
    }

    /// Takes `n` bytes out of the window.
    pub(crate) fn consume(&mut self, n: u32) -> Result<(), WindowError> {
        self.0 = self.0.checked_sub(n).ok_or(WindowError::Overrun)?;
        Ok(())
    }

    /// Adds `n` bytes of credit; the result may not exceed `cap`.
    pub(crate) fn grow(&mut self, n: u32, cap: u32) -> Result<(), WindowError> {
        match self.0.checked_add(n) {
            Some(w) if w <= cap => {
                self.0 = w;
                Ok(())
            }
            _ => Err(WindowError::Overflow),
        }
    }
}

impl fmt::Debug for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Window({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consuming_more_than_available_is_an_overrun_and_changes_nothing() {
        let mut w = Window::new(3);
        assert_eq!(w.consume(4), Err(WindowError::Overrun));
        assert_eq!(w.available(), 3);
        w.consume(3).unwrap();
        assert!(w.is_exhausted());
    }

    #[test]
    fn growing_past_the_cap_is_an_overflow_and_changes_nothing() {
        let mut w = Window::new(2);
        assert_eq!(w.grow(3, 4), Err(WindowError::Overflow));
        assert_eq!(w.grow(u32::MAX, u32::MAX), Err(WindowError::Overflow));
        assert_eq!(w.available(), 2);
        w.grow(2, 4).unwrap();
        assert_eq!(w.available(), 4);
    }
}
