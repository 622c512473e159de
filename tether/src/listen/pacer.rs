//! Accept pacing: a reconnect storm (every agent at once after a restart) or a burst of TLS
//! clients is taken at a steady rate; the rest wait in the kernel's backlog, or retry.

use std::time::Duration;

/// The lowest accept rate, per second: one connection every 100 s. A lower rate is
/// taken as this one, so the pacer's intervals and debt stay far inside the clock's range.
pub const MIN_AGENT_ACCEPT_RATE: f64 = 0.01;

/// Spaces out accepted connections (the agent port's, and an embedding proxy's own): at most `burst` at once, then `rate` per second
/// (a token bucket); a rate of 0 does not pace.
#[derive(Debug)]
pub struct AcceptPacer {
    every: Option<Duration>,
    burst: u32,
    /// When the bucket is full again: each accept moves it one interval on.
    full_at: tokio::time::Instant,
}

impl AcceptPacer {
    /// A pacer allowing `burst` accepts at once, then `rate` per second (at least
    /// [`MIN_AGENT_ACCEPT_RATE`]); a rate of 0, or one that is not finite, does not pace.
    pub fn new(rate: f64, burst: u32) -> AcceptPacer {
        AcceptPacer {
            // At most 100 s, so `every * (burst - 1)` is at most about 4e11 s: no overflow.
            every: (rate > 0.0 && rate.is_finite())
                .then(|| Duration::from_secs_f64(1.0 / rate.max(MIN_AGENT_ACCEPT_RATE))),
            burst: burst.max(1),
            full_at: tokio::time::Instant::now(),
        }
    }

    /// Waits until one more connection may be accepted, and counts it.
    pub async fn pace(&mut self) {
        let Some(every) = self.every else {
            return;
        };
        let now = tokio::time::Instant::now();
        // An empty bucket is `burst` intervals of debt; a full one is none.
        let full_at = self.full_at.max(now);
        let allowed_debt = every * (self.burst - 1);
        if full_at > now + allowed_debt {
            tokio::time::sleep_until(full_at - allowed_debt).await;
        }
        self.full_at = full_at + every;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn accepts_come_in_a_burst_then_at_the_rate() {
        let start = tokio::time::Instant::now();
        let mut p = AcceptPacer::new(10.0, 5);
        let mut at = Vec::new();
        for _ in 0..25 {
            p.pace().await;
            at.push(start.elapsed());
        }
        // The first five at once, then one every 100 ms.
        assert!(at[..5].iter().all(|t| t.is_zero()), "{at:?}");
        assert_eq!(at[5], Duration::from_millis(100));
        assert_eq!(at[24], Duration::from_millis(2000));
        // Idle for a while, the bucket fills up again, but no further than the burst.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let again = tokio::time::Instant::now();
        for _ in 0..6 {
            p.pace().await;
        }
        assert_eq!(again.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_under_the_floor_paces_at_the_floor_and_never_panics() {
        // 1e-20/s would be an interval no Duration holds; with the largest burst, the debt
        // would overflow one too. Both are taken at the floor: one every 100 s.
        for burst in [1, u32::MAX] {
            let start = tokio::time::Instant::now();
            let mut p = AcceptPacer::new(1e-20, burst);
            for _ in 0..3 {
                p.pace().await;
            }
            let waited = start.elapsed();
            let expected = if burst == 1 {
                Duration::from_secs(200)
            } else {
                Duration::ZERO
            };
            assert_eq!(waited, expected, "burst {burst}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_of_zero_does_not_pace() {
        let start = tokio::time::Instant::now();
        let mut p = AcceptPacer::new(0.0, 1);
        for _ in 0..1000 {
            p.pace().await;
        }
        assert!(start.elapsed().is_zero());
    }
}
