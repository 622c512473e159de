//! Target `session_pair`: two sessions through the pair harness.

use std::collections::{BTreeMap, BTreeSet};

use arbitrary::{Result, Unstructured};
use bytes::Bytes;

use crate::error::CloseReason;
use crate::frame::*;
use crate::session::{Event, StreamState};
use crate::testing::{Carry, Pair, Side};

use super::ops::fuzz_config;

/// Target `session_pair`: two sessions through the pair harness with arbitrary commands, chunk
/// splits, stalls and a possible tunnel drop. What each end received on each stream is a prefix
/// of what the other sent, and once both applications finish everything, nothing leaks.
pub fn session_pair(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let _ = run_session_pair(&mut u);
}

#[derive(Default)]
struct Tally {
    sent: BTreeMap<(Side, StreamId), Vec<u8>>,
    received: BTreeMap<(Side, StreamId), Vec<u8>>,
    pending: Vec<(Side, StreamId)>,
    /// `recv` returned the peer's FIN.
    fin: BTreeSet<(Side, StreamId)>,
    /// `finish` succeeded.
    finished: BTreeSet<(Side, StreamId)>,
    /// Reset, refused or failed, at either end, by anyone.
    reset: BTreeSet<StreamId>,
    /// An application PING of this side waits for its answer.
    ping_waiting: BTreeSet<Side>,
    /// Some `go_away` succeeded.
    drained: bool,
    dropped: bool,
}

impl Tally {
    fn absorb(&mut self, p: &mut Pair) {
        for side in [Side::Server, Side::Agent] {
            for e in p.events(side) {
                match e {
                    Event::Readable { stream } => {
                        let got = self.received.entry((side, stream)).or_default();
                        loop {
                            match p.session(side).recv(stream, 1500) {
                                Ok(Some(data)) => got.extend_from_slice(&data),
                                Ok(None) => {
                                    self.fin.insert((side, stream));
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                    }
                    Event::DialRequested { stream, .. } => self.pending.push((side, stream)),
                    Event::DialFailed { stream, .. } | Event::Reset { stream, .. } => {
                        self.reset.insert(stream);
                    }
                    Event::PingAnswered { .. } => {
                        self.ping_waiting.remove(&side);
                    }
                    _ => {}
                }
            }
        }
        for ((side, stream), got) in &self.received {
            let sent = self
                .sent
                .get(&(side.peer(), *stream))
                .map_or(&[][..], |v| &v[..]);
            assert!(
                sent.starts_with(got),
                "{side:?} stream {stream}: received bytes are not a prefix of what was sent"
            );
        }
        assert_eq!(p.server.check_invariants(), Ok(()));
        assert_eq!(p.agent.check_invariants(), Ok(()));
    }
}

fn run_session_pair(u: &mut Unstructured<'_>) -> Result<()> {
    let mut cfg = fuzz_config(u)?;
    cfg.keepalive_interval_ms = 0;
    cfg.max_concurrent_streams = cfg.max_concurrent_streams.max(1);
    cfg.stream_id_limit = 1_000;
    let mut p = Pair::established(cfg.clone(), cfg);
    if u.arbitrary()? {
        let sizes: Vec<usize> = (0..u.int_in_range(1..=4)?)
            .map(|_| Ok(usize::from(u.int_in_range(1u16..=3000)?)))
            .collect::<Result<_>>()?;
        p.carry = Carry::Bytes(sizes);
    }
    let mut t = Tally::default();
    let mut counter = 0u8;
    for _ in 0..256 {
        if u.is_empty() {
            break;
        }
        let side = if u.arbitrary()? {
            Side::Server
        } else {
            Side::Agent
        };
        let id = StreamId(u.int_in_range(1..=10)?);
        match u.int_in_range(0..=12)? {
            0 => {
                let _ = p.session(side).open(Protocol::TCP, "dest", 80);
            }
            1 => {
                if let Some(i) = (!t.pending.is_empty())
                    .then(|| u.choose_index(t.pending.len()))
                    .transpose()?
                {
                    let (s, id) = t.pending.swap_remove(i);
                    let _ = if u.arbitrary()? {
                        p.session(s).accept(id)
                    } else {
                        p.session(s).reject(id, ErrorCode::DIAL_REFUSED, "no")
                    };
                }
            }
            2 | 3 => {
                counter = counter.wrapping_add(1);
                let len = u.int_in_range(1..=4000)?;
                let bytes = Bytes::from(vec![counter; len]);
                if let Ok(n) = p.session(side).send(id, bytes.clone()) {
                    t.sent
                        .entry((side, id))
                        .or_default()
                        .extend_from_slice(&bytes[..n]);
                }
            }
            4 => {
                if p.session(side).finish(id).is_ok() {
                    t.finished.insert((side, id));
                }
            }
            5 => {
                if p.session(side)
                    .reset(id, ErrorCode::CANCEL, "cancel")
                    .is_ok()
                {
                    t.reset.insert(id);
                }
            }
            6 => {
                let n = p.session(side).unreleased(id);
                let _ = p.session(side).release(id, n);
            }
            12 => {
                let now = p.now;
                if p.session(side).ping(now).is_ok() {
                    t.ping_waiting.insert(side);
                }
            }
            7 => p.stall(side, u.arbitrary()?),
            8 => {
                p.step();
            }
            9 => {
                p.run();
            }
            10 => {
                if u.ratio(1, 16)? {
                    p.drop_tunnel();
                    t.dropped = true;
                }
            }
            _ => {
                t.drained |= p.session(side).go_away("drain").is_ok();
            }
        }
        t.absorb(&mut p);
    }
    // Both applications now finish everything they have: accept, release, finish.
    p.stall(Side::Server, false);
    p.stall(Side::Agent, false);
    for _ in 0..10_000 {
        p.run();
        t.absorb(&mut p);
        let mut acted = false;
        for (side, id) in core::mem::take(&mut t.pending) {
            acted |= p.session(side).accept(id).is_ok();
        }
        for side in [Side::Server, Side::Agent] {
            let ids: Vec<StreamId> = p.session(side).stream_ids().collect();
            for id in ids {
                let s = p.session(side);
                let n = s.unreleased(id);
                if n > 0 {
                    acted |= s.release(id, n).is_ok();
                }
                if s.queued(id) == 0 && s.finish(id).is_ok() {
                    t.finished.insert((side, id));
                    acted = true;
                }
                // A stream that is over is let go of, as a dropped handle would.
                if matches!(
                    s.stream_state(id),
                    Some(StreamState::Closed | StreamState::Failed)
                ) {
                    acted |= s.abandon(id).is_ok();
                }
            }
        }
        if !acted && !p.in_flight() {
            break;
        }
    }
    p.run();
    t.absorb(&mut p);
    for side in [Side::Server, Side::Agent] {
        let s = p.session(side);
        assert_eq!(s.stream_count(), 0, "{side:?}: a stream leaked: {s:?}");
        assert_eq!(
            s.stream_ids().count(),
            0,
            "{side:?}: a closed stream was kept after it was abandoned: {s:?}"
        );
        // Honest ends never call each other's frames a violation, whatever was done to the
        // tunnel.
        assert!(
            !matches!(s.close_reason(), Some(CloseReason::Violation(_))),
            "{side:?} closed with {:?} between honest ends",
            s.close_reason()
        );
    }
    if !t.dropped {
        // Progress: every stream both applications finished and nobody reset arrived whole,
        // in order, with its FIN, at both ends.
        for &(side, id) in &t.finished {
            if t.reset.contains(&id) {
                continue;
            }
            let peer = side.peer();
            let sent = t.sent.get(&(side, id)).map_or(&[][..], |v| &v[..]);
            let got = t.received.get(&(peer, id)).map_or(&[][..], |v| &v[..]);
            assert_eq!(got, sent, "{peer:?} stream {id}: not every byte arrived");
            assert!(
                t.fin.contains(&(peer, id)),
                "{peer:?} stream {id}: FIN never read"
            );
        }
        for side in [Side::Server, Side::Agent] {
            // Every application PING on a session that is still open was answered.
            if !p.session(side).is_closed() {
                assert!(
                    !t.ping_waiting.contains(&side),
                    "{side:?}: a PING went unanswered"
                );
            }
            // A drain, once started, completes at both ends when the streams are done.
            if t.drained {
                assert_eq!(
                    p.session(side).close_reason(),
                    Some(&CloseReason::Drained),
                    "{side:?}: the drain did not complete"
                );
            }
        }
    } else {
        for side in [Side::Server, Side::Agent] {
            assert!(
                matches!(
                    p.session(side).close_reason(),
                    Some(CloseReason::TransportLost | CloseReason::Drained)
                ),
                "{side:?} after the tunnel dropped: {:?}",
                p.session(side).close_reason()
            );
        }
    }
    Ok(())
}
