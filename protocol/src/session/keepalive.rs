//! Timers and keepalive (SPEC 4.4, 7.3): one small table of deadlines, and the PING state.

use super::Time;

/// The session's deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Timer {
    /// The handshake must be done by then (SPEC 4.4).
    Handshake = 0,
    /// With a PING outstanding, some frame must arrive by then (SPEC 7.3).
    KeepaliveDeadline = 1,
    /// The next keepalive PING goes out then.
    NextPing = 2,
}

const TIMERS: usize = 3;
const ALL: [Timer; TIMERS] = [Timer::Handshake, Timer::KeepaliveDeadline, Timer::NextPing];

/// When each timer fires, if it is set (in the manner of quinn-proto's `TimerTable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(crate) struct TimerTable([Option<Time>; TIMERS]);

impl TimerTable {
    pub(crate) fn set(&mut self, timer: Timer, at: Time) {
        self.0[timer as usize] = Some(at);
    }

    pub(crate) fn stop(&mut self, timer: Timer) {
        self.0[timer as usize] = None;
    }

    pub(crate) fn get(&self, timer: Timer) -> Option<Time> {
        self.0[timer as usize]
    }

    pub(crate) fn is_set(&self, timer: Timer) -> bool {
        self.get(timer).is_some()
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Time> {
        self.0.iter().flatten().min().copied()
    }

    /// The first timer (in the order handshake, keepalive deadline, next PING) due at `now`.
    pub(crate) fn expired(&self, now: Time) -> Option<Timer> {
        ALL.into_iter()
            .find(|t| self.get(*t).is_some_and(|at| at <= now))
    }

    pub(crate) fn stop_all(&mut self) {
        *self = TimerTable::default();
    }
}

/// A PING this end sent and has no answer to yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct OutstandingPing {
    pub(crate) payload: u64,
    pub(crate) sent_at: Time,
    /// The application asked for it and wants `PingAnswered`.
    pub(crate) by_app: bool,
}

/// PINGs: the one outstanding, the one queued, and the answer owed to the peer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Keepalive {
    pub(crate) outstanding: Option<OutstandingPing>,
    /// A PING to send (its payload).
    pub(crate) ping_out: Option<u64>,
    /// A PING ACK owed to the peer (its payload). SPEC 7.3: one answer is kept.
    pub(crate) pong_out: Option<u64>,
    next_payload: u64,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            outstanding: None,
            ping_out: None,
            pong_out: None,
            next_payload: 1,
        }
    }
}

impl Keepalive {
    /// Queues a new PING sent at `now`.
    pub(crate) fn send(&mut self, now: Time, by_app: bool) {
        let payload = self.next_payload;
        self.next_payload = self.next_payload.wrapping_add(1);
        self.outstanding = Some(OutstandingPing {
            payload,
            sent_at: now,
            by_app,
        });
        self.ping_out = Some(payload);
    }

    /// An ACK with `payload` arrived: the outstanding PING it answers, if it answers one.
    pub(crate) fn answered(&mut self, payload: u64) -> Option<OutstandingPing> {
        match self.outstanding {
            Some(p) if p.payload == payload => self.outstanding.take(),
            _ => None,
        }
    }

    /// Forgets everything queued and outstanding (the session ended).
    pub(crate) fn clear(&mut self) {
        self.outstanding = None;
        self.ping_out = None;
        self.pong_out = None;
    }
}
