//! Counters the tunnels, the listener and the agent keep: plain atomics a caller reads when it
//! likes (a metrics exposition, a test, a log line). The library exports nothing by itself.
//!
//! Every label set is bounded by this end: error codes fall into the slots of the codes this
//! end knows and one `other` slot, refusals and connect failures into fixed kinds, so a peer
//! that picks codes at will cannot grow what a caller exports (docs/SECURITY.md).

use std::sync::atomic::{AtomicU64, Ordering};

use tether_proto::ErrorCode;
use tether_proto::error::Initiator;

/// Slots for the error codes this end knows (0x00..=0x0f and 0x100..=0x104, SPEC 8), and one
/// for any other.
const SLOTS: usize = 16 + 5 + 1;

fn slot(code: ErrorCode) -> usize {
    match code.0 {
        c @ 0..=0x0f => c as usize,
        c @ 0x100..=0x104 => 16 + (c - 0x100) as usize,
        _ => SLOTS - 1,
    }
}

fn slot_name(i: usize) -> &'static str {
    let n = u32::try_from(i).unwrap_or(u32::MAX);
    let code = match i {
        0..=15 => ErrorCode(n),
        16..=20 => ErrorCode(0x100 + n - 16),
        _ => return "other",
    };
    code.name().unwrap_or("other")
}

fn count(n: &AtomicU64) -> u64 {
    n.load(Ordering::Relaxed)
}

fn add(n: &AtomicU64) {
    n.fetch_add(1, Ordering::Relaxed);
}

/// Counters the tunnels of one process share: payload bytes each way and stream errors by
/// code and by who started them.
#[derive(Debug)]
pub struct TunnelStats {
    sent: AtomicU64,
    received: AtomicU64,
    /// `[local | peer][code index, or the last slot for an unknown code]`.
    errors: [[AtomicU64; SLOTS]; 2],
}

impl Default for TunnelStats {
    fn default() -> Self {
        TunnelStats {
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            errors: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }
}

impl TunnelStats {
    /// Counts `n` payload bytes sent.
    pub fn sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts `n` payload bytes received (consumed by the application).
    pub fn received(&self, n: usize) {
        self.received.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts a stream that ended with `code`, started by `by`.
    pub fn stream_error(&self, code: ErrorCode, by: Initiator) {
        let who = usize::from(by == Initiator::Peer);
        add(&self.errors[who][slot(code)]);
    }

    /// Payload bytes sent and received on every stream so far.
    pub fn bytes(&self) -> (u64, u64) {
        (count(&self.sent), count(&self.received))
    }

    /// Streams that ended with an error so far, by code name (`"other"` for a code this end
    /// does not know) and by who ended them; only the non-zero counts.
    pub fn stream_errors(&self) -> Vec<(&'static str, Initiator, u64)> {
        let mut out = Vec::new();
        for (by, row) in [Initiator::Local, Initiator::Peer]
            .into_iter()
            .zip(&self.errors)
        {
            for (i, v) in row.iter().enumerate() {
                let n = count(v);
                if n > 0 {
                    out.push((slot_name(i), by, n));
                }
            }
        }
        out
    }
}

/// Why an agent connection was refused before it became a tunnel (or, `Revoked`, closed
/// after).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// The TLS handshake failed (bad or missing client certificate, wrong CA, not TLS).
    Tls,
    /// TLS and HELLO did not finish within the handshake deadline.
    Timeout,
    /// The session's handshake failed (bad HELLO, version mismatch, the agent left).
    Handshake,
    /// The credential does not allow the HELLO (token, id, identifiers).
    Unauthorized,
    /// The client certificate could not be read.
    Certificate,
    /// What the HELLO claims is held by a live tunnel of another credential (an address that
    /// must not be split between two agents).
    Conflict,
    /// An admitted tunnel closed because what it claims is no longer proven (its node no
    /// longer has the address, say).
    Revoked,
}

impl RefusalKind {
    /// Every kind, in the order [`ListenerStats::refused`] reports them.
    pub const ALL: [RefusalKind; 7] = [
        RefusalKind::Tls,
        RefusalKind::Timeout,
        RefusalKind::Handshake,
        RefusalKind::Unauthorized,
        RefusalKind::Certificate,
        RefusalKind::Conflict,
        RefusalKind::Revoked,
    ];

    /// A short name, for a metrics label.
    pub fn name(self) -> &'static str {
        match self {
            RefusalKind::Tls => "tls",
            RefusalKind::Timeout => "timeout",
            RefusalKind::Handshake => "handshake",
            RefusalKind::Unauthorized => "unauthorized",
            RefusalKind::Certificate => "certificate",
            RefusalKind::Conflict => "conflict",
            RefusalKind::Revoked => "revoked",
        }
    }
}

/// What an agent listener counts: connections in their handshake now, refusals by kind, and
/// the counters its tunnels share.
#[derive(Debug, Default)]
pub struct ListenerStats {
    handshaking: AtomicU64,
    refused: [AtomicU64; RefusalKind::ALL.len()],
    /// Bytes and stream errors of every tunnel this listener accepted.
    pub tunnels: std::sync::Arc<TunnelStats>,
}

impl ListenerStats {
    /// Agent connections in their TLS handshake or HELLO now.
    pub fn handshaking(&self) -> u64 {
        count(&self.handshaking)
    }

    /// Refusals so far, by kind (in [`RefusalKind::ALL`]'s order).
    pub fn refused(&self) -> [(RefusalKind, u64); RefusalKind::ALL.len()] {
        RefusalKind::ALL.map(|k| (k, count(&self.refused[k as usize])))
    }

    /// Counts one refusal (the listener's own, and a caller's after admission).
    pub fn refuse(&self, kind: RefusalKind) {
        add(&self.refused[kind as usize]);
    }

    pub(crate) fn handshake_started(&self) {
        add(&self.handshaking);
    }

    pub(crate) fn handshake_ended(&self) {
        self.handshaking.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where an agent's attempt to bring up a tunnel failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The TCP connection.
    Tcp,
    /// The TLS handshake.
    Tls,
    /// The handshake deadline (TCP, TLS and WELCOME together).
    Timeout,
    /// The server refused the credential.
    Unauthorized,
    /// The session's handshake (a bad WELCOME, a version mismatch, the server left).
    Handshake,
    /// The bearer token file could not be read.
    Token,
}

impl Stage {
    /// Every stage, in the order [`AgentStats::connect_failures`] reports them.
    pub const ALL: [Stage; 6] = [
        Stage::Tcp,
        Stage::Tls,
        Stage::Timeout,
        Stage::Unauthorized,
        Stage::Handshake,
        Stage::Token,
    ];

    /// A short name, for a metrics label.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Tcp => "tcp",
            Stage::Tls => "tls",
            Stage::Timeout => "timeout",
            Stage::Unauthorized => "unauthorized",
            Stage::Handshake => "handshake",
            Stage::Token => "token",
        }
    }
}

/// What an agent counts: tunnels open now, the server count it aims at, turns of its
/// connection loops, duplicate tunnels closed, failures by stage, and its tunnels' counters.
#[derive(Debug, Default)]
pub struct AgentStats {
    tunnels: AtomicU64,
    server_count: AtomicU64,
    syncs: AtomicU64,
    duplicates: AtomicU64,
    failures: [AtomicU64; 6],
    /// Bytes and stream errors of every tunnel of this agent.
    pub tunnel: std::sync::Arc<TunnelStats>,
}

impl AgentStats {
    /// Tunnels open to servers now (as of the connection loops' last turn).
    pub fn tunnels(&self) -> u64 {
        count(&self.tunnels)
    }

    /// Servers the agent keeps tunnels to: announced, or counted from leases.
    pub fn server_count(&self) -> u64 {
        count(&self.server_count)
    }

    /// Turns of the loops that keep a tunnel to every server.
    pub fn syncs(&self) -> u64 {
        count(&self.syncs)
    }

    /// Tunnels closed at once because they reached a server the agent already held.
    pub fn duplicates(&self) -> u64 {
        count(&self.duplicates)
    }

    /// Tunnels that did not come up, by stage (in [`Stage::ALL`]'s order).
    pub fn connect_failures(&self) -> [(Stage, u64); 6] {
        Stage::ALL.map(|s| (s, count(&self.failures[s as usize])))
    }

    pub(crate) fn set_tunnels(&self, n: usize) {
        self.tunnels.store(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn set_server_count(&self, n: usize) {
        self.server_count.store(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn sync(&self) {
        add(&self.syncs);
    }

    pub(crate) fn duplicate(&self) {
        add(&self.duplicates);
    }

    pub(crate) fn failed(&self, stage: Stage) {
        add(&self.failures[stage as usize]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_codes_share_one_slot() {
        let s = TunnelStats::default();
        s.stream_error(ErrorCode::CANCEL, Initiator::Peer);
        s.stream_error(ErrorCode(0x7777), Initiator::Peer);
        s.stream_error(ErrorCode(0x7778), Initiator::Local);
        s.stream_error(ErrorCode(0x7779), Initiator::Local);
        assert_eq!(
            s.stream_errors(),
            vec![
                ("other", Initiator::Local, 2),
                ("CANCEL", Initiator::Peer, 1),
                ("other", Initiator::Peer, 1),
            ]
        );
    }

    #[test]
    fn every_known_code_has_its_own_slot() {
        for c in (0..=0x0fu32).chain(0x100..=0x104) {
            let code = ErrorCode(c);
            if let Some(name) = code.name() {
                assert_eq!(slot_name(slot(code)), name, "{code:?}");
            }
        }
    }
}
