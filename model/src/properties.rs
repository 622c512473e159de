//! The properties every configuration checks: `always` ones that must hold in every reachable
//! state, and `sometimes` ones (examples) that a configuration claims to reach. Which
//! configuration claims which example is in [`crate::suite`].

use stateright::Property;
use tether_proto::{CloseReason, ErrorCode};

use crate::rogue::Misbehavior;
use crate::state::{AppPhase, AppStream, ModelState, Outcome};
use crate::tunnel::TunnelModel;

/// The `always` properties, by name.
pub const ALWAYS: [&str; 13] = [
    "invariants hold at both ends (SPEC 10)",
    "received bytes are a prefix of what the peer sent on that stream (SPEC 5.3)",
    "a completed stream received every byte the peer sent (SPEC 5.3)",
    "unacknowledged bytes never exceed the window (SPEC 6.2)",
    "stream ids are never reused (SPEC 5.1)",
    "every stream ends exactly once (SPEC 5.2)",
    "no protocol error between honest ends (SPEC 8.2)",
    "the honest end answers a misbehaving peer as the SPEC demands (SPEC 5.4, 6.3, 8.2)",
    "when nothing can move, every stream is closed at both ends and nothing is held (SPEC 5.2, 7.5)",
    "two sessions left alone fall silent (liveness)",
    "frames in flight stay bounded (liveness)",
    "the keepalive deadline fires only with a PING unanswered (SPEC 7.3)",
    "DRAINING goes out at most once, never after this end's GOAWAY (SPEC 7.4)",
];

/// Examples an honest run can reach (each configuration claims some of them).
pub const COMPLETES: &str = "a stream completes both half-closes";
/// A cancel crossing the answer.
pub const CANCEL_CROSSES_DIAL_OK: &str = "a dial is cancelled while its DIAL_OK is in flight";
/// Flow control stalls and resumes.
pub const WINDOW_REOPENS: &str = "a window is exhausted and reopened";
/// A reset and a FIN on the wire at once.
pub const RESET_CROSSES_FIN: &str = "a reset crosses a FIN";
/// Tunnel loss fails a dial.
pub const DROP_FAILS_DIAL: &str = "the tunnel drops with a dial pending";
/// A server-started drain.
pub const SERVER_DRAINS: &str = "a drain the server started completes an open stream";
/// An agent-started drain.
pub const AGENT_DRAINS: &str = "a drain the agent started completes an open stream";
/// Concurrency.
pub const TWO_LIVE_EACH: &str = "each end has two of its own streams live at once";
/// The peer's limit.
pub const OPEN_AT_LIMIT: &str = "an open is refused at the peer's concurrency limit";
/// Several chunks queued.
pub const CHUNKS_QUEUED: &str = "several chunks are queued on one stream";
/// Example: a send is cut short by the sender's own send buffer while the window has room.
pub const SEND_BUFFER_FULL: &str = "a send is held back by this end's own send buffer";
/// Frame splitting.
pub const SPLIT: &str = "a chunk is split at MAX_FRAME_SIZE";
/// Keepalive PING and answer.
pub const KEEPALIVE_PING: &str = "the keepalive timer sends a PING that is answered";
/// An application's PING.
pub const PING_ANSWERED: &str = "an application's PING is answered";
/// Keepalive deadline.
pub const KEEPALIVE_EXPIRES: &str = "a keepalive deadline closes the tunnel";
/// The server's decision: no.
pub const REFUSED: &str = "the server refuses the agent";
/// The server's decision: yes, and a stream follows.
pub const WELCOMED: &str = "the server welcomes the agent and a stream completes";
/// Version negotiation fails.
pub const VERSION_MISMATCH: &str = "the versions do not match";
/// Handshake deadline.
pub const HANDSHAKE_EXPIRES: &str = "a handshake deadline passes";
/// A DRAINING notice leaves the tunnel usable (SPEC 7.4).
pub const DIALLED_AFTER_NOTICE: &str =
    "an end that announced a drain still accepts a dial before its GOAWAY";
/// The drop policy, seen from the peer.
pub const WALKS_AWAY: &str = "an application walks away from a live stream and the peer is told";

fn completed(st: &AppStream) -> bool {
    st.phase == AppPhase::Ended(Outcome::Completed)
}

fn closed_with(s: &ModelState, code: ErrorCode) -> bool {
    s.ends.iter().any(|e| match e.session.close_reason() {
        Some(CloseReason::Violation(v)) => v.code == code,
        Some(CloseReason::Peer { code: c, .. } | CloseReason::Local { code: c, .. }) => *c == code,
        _ => false,
    })
}

fn drained_by(s: &ModelState, starter: usize) -> bool {
    s.ends[starter].drain_started
        && !s.ends[1 - starter].drain_started
        && s.ends.iter().any(|e| {
            e.seen.goaway_with_open_stream
                && e.session.close_reason() == Some(&CloseReason::Drained)
                && e.streams.values().any(completed)
        })
}

/// Every property: the `always` ones, then every example and every misbehaviour's detection.
pub fn all() -> Vec<Property<TunnelModel>> {
    let mut v = vec![
        Property::always(ALWAYS[0], |_: &TunnelModel, s: &ModelState| {
            s.ends.iter().all(|e| e.session.check_invariants().is_ok())
        }),
        Property::always(ALWAYS[1], |_: &TunnelModel, s: &ModelState| {
            (0..2).all(|i| {
                s.ends[i].streams.iter().all(|(id, st)| {
                    let sent = s.ends[1 - i]
                        .streams
                        .get(id)
                        .map_or(&[][..], |p| &p.sent[..]);
                    sent.starts_with(&st.received)
                })
            })
        }),
        Property::always(ALWAYS[2], |_: &TunnelModel, s: &ModelState| {
            (0..2).all(|i| {
                s.ends[i].streams.iter().all(|(id, st)| {
                    !completed(st)
                        || s.ends[1 - i]
                            .streams
                            .get(id)
                            .is_some_and(|p| p.finished && p.sent == st.received)
                })
            })
        }),
        Property::always(ALWAYS[3], |m: &TunnelModel, s: &ModelState| {
            let window = u64::from(m.bounds.window);
            s.ends.iter().all(|e| {
                e.streams
                    .values()
                    .all(|st| st.sent.len() as u64 <= st.credited + window)
            })
        }),
        Property::always(ALWAYS[4], |_: &TunnelModel, s: &ModelState| {
            s.ends.iter().all(|e| !e.seen.id_reused)
        }),
        Property::always(ALWAYS[5], |_: &TunnelModel, s: &ModelState| {
            s.ends.iter().all(|e| !e.seen.double_end)
        }),
        Property::always(ALWAYS[6], |_: &TunnelModel, s: &ModelState| {
            // Two honest ends that speak no common version close with VERSION_MISMATCH: a
            // disagreement, not a fault.
            s.verdict.is_some()
                || s.ends.iter().all(|e| match e.session.close_reason() {
                    Some(CloseReason::Violation(v)) => v.code == ErrorCode::VERSION_MISMATCH,
                    _ => true,
                })
        }),
        Property::always(ALWAYS[7], |_: &TunnelModel, s: &ModelState| {
            s.verdict.is_none_or(|v| v.expected == v.actual)
        }),
        Property::always(ALWAYS[8], |m: &TunnelModel, s: &ModelState| {
            // An endless run has its own verdict; it has no steps left, which is not a hang.
            s.endless
                || !m.is_quiescent(s)
                || s.ends.iter().all(|e| {
                    (e.session.is_established() || e.session.is_closed())
                        && e.session.stream_count() == 0
                        && e.session.stream_ids().next().is_none()
                        && e.session.pending_events() == 0
                        && e.streams.values().all(AppStream::ended)
                })
        }),
        Property::always(ALWAYS[9], |_: &TunnelModel, s: &ModelState| !s.endless),
        Property::always(ALWAYS[10], |m: &TunnelModel, s: &ModelState| {
            s.wire.iter().all(|w| w.len() <= m.bounds.max_in_flight())
        }),
        Property::always(ALWAYS[11], |_: &TunnelModel, s: &ModelState| {
            s.ends.iter().all(|e| !e.seen.keepalive_without_ping)
        }),
        Property::always(ALWAYS[12], |_: &TunnelModel, s: &ModelState| {
            s.ends
                .iter()
                .all(|e| e.drainings_sent <= 1 && !e.seen.draining_after_goaway)
        }),
        // ----- sometimes -----
        Property::sometimes(COMPLETES, |_: &TunnelModel, s: &ModelState| {
            s.ends[0].streams.values().any(completed)
        }),
        Property::sometimes(CANCEL_CROSSES_DIAL_OK, |_: &TunnelModel, s: &ModelState| {
            (0..2).any(|i| {
                s.ends[i].streams.iter().any(|(id, st)| {
                    st.cancelled
                        && s.wire[i].iter().any(|f| {
                            matches!(f, crate::state::Wire::Frame(tether_proto::Frame::DialOk(d)) if d.stream == *id)
                        })
                })
            })
        }),
        Property::sometimes(WINDOW_REOPENS, |_: &TunnelModel, s: &ModelState| {
            s.ends
                .iter()
                .any(|e| e.streams.values().any(|st| st.reopened))
        }),
        Property::sometimes(RESET_CROSSES_FIN, |_: &TunnelModel, s: &ModelState| {
            use crate::state::Wire::Frame as W;
            use tether_proto::Frame as F;
            (0..2).any(|i| {
                s.wire[i].iter().any(|f| match f {
                    W(F::Data(d)) if d.fin => s.wire[1 - i]
                        .iter()
                        .any(|g| matches!(g, W(F::Reset(r)) if r.stream == d.stream)),
                    _ => false,
                })
            })
        }),
        Property::sometimes(DROP_FAILS_DIAL, |_: &TunnelModel, s: &ModelState| {
            s.ends.iter().any(|e| {
                e.streams.values().any(|st| {
                    matches!(
                        st.phase,
                        AppPhase::Ended(Outcome::DialFailed(ErrorCode::CONNECTION_LOST, _))
                    )
                })
            })
        }),
        Property::sometimes(SERVER_DRAINS, |_: &TunnelModel, s: &ModelState| {
            drained_by(s, 0)
        }),
        Property::sometimes(AGENT_DRAINS, |_: &TunnelModel, s: &ModelState| {
            drained_by(s, 1)
        }),
        Property::sometimes(TWO_LIVE_EACH, |_: &TunnelModel, s: &ModelState| {
            s.ends.iter().all(|e| e.seen.two_live)
        }),
        Property::sometimes(OPEN_AT_LIMIT, |_: &TunnelModel, s: &ModelState| {
            s.ends.iter().any(|e| e.seen.open_at_limit)
        }),
        Property::sometimes(CHUNKS_QUEUED, |_: &TunnelModel, s: &ModelState| {
            s.ends.iter().any(|e| e.seen.chunks_queued)
        }),
        Property::sometimes(SEND_BUFFER_FULL, |_: &TunnelModel, s: &ModelState| {
            s.ends.iter().any(|e| e.seen.send_buffer_full)
        }),
        Property::sometimes(SPLIT, |_: &TunnelModel, s: &ModelState| {
            s.ends.iter().any(|e| e.seen.split)
        }),
        Property::sometimes(KEEPALIVE_PING, |m: &TunnelModel, s: &ModelState| {
            s.ends
                .iter()
                .any(|e| e.seen.keepalive_ping && e.answers > m.bounds.pings - e.pings_left)
        }),
        Property::sometimes(PING_ANSWERED, |_: &TunnelModel, s: &ModelState| {
            s.ends.iter().any(|e| e.seen.ping_answered)
        }),
        Property::sometimes(KEEPALIVE_EXPIRES, |_: &TunnelModel, s: &ModelState| {
            s.ends
                .iter()
                .any(|e| e.session.close_reason() == Some(&CloseReason::KeepaliveTimeout))
        }),
        Property::sometimes(REFUSED, |_: &TunnelModel, s: &ModelState| {
            matches!(
                s.ends[1].session.close_reason(),
                Some(CloseReason::Peer {
                    code: ErrorCode::UNAUTHORIZED,
                    ..
                })
            )
        }),
        Property::sometimes(WELCOMED, |_: &TunnelModel, s: &ModelState| {
            s.ends[1].hello_sent && s.ends[0].streams.values().any(completed)
        }),
        Property::sometimes(VERSION_MISMATCH, |_: &TunnelModel, s: &ModelState| {
            closed_with(s, ErrorCode::VERSION_MISMATCH)
        }),
        Property::sometimes(HANDSHAKE_EXPIRES, |_: &TunnelModel, s: &ModelState| {
            s.ends
                .iter()
                .any(|e| e.session.close_reason() == Some(&CloseReason::HandshakeTimeout))
        }),
        Property::sometimes(DIALLED_AFTER_NOTICE, |_: &TunnelModel, s: &ModelState| {
            s.ends.iter().any(|e| e.seen.dialled_after_notice)
        }),
        Property::sometimes(WALKS_AWAY, |_: &TunnelModel, s: &ModelState| {
            s.ends.iter().any(|e| e.seen.reset_by_walkaway)
        }),
    ];
    let detections: [fn(&TunnelModel, &ModelState) -> bool; 15] = [
        detects::<0>,
        detects::<1>,
        detects::<2>,
        detects::<3>,
        detects::<4>,
        detects::<5>,
        detects::<6>,
        detects::<7>,
        detects::<8>,
        detects::<9>,
        detects::<10>,
        detects::<11>,
        detects::<12>,
        detects::<13>,
        detects::<14>,
    ];
    for (m, condition) in Misbehavior::ALL.into_iter().zip(detections) {
        v.push(Property::sometimes(m.detected(), condition));
    }
    v
}

/// Whether the honest end met misbehaviour `K` (of [`Misbehavior::ALL`]) and closed with the
/// SPEC's code for it.
fn detects<const K: usize>(_: &TunnelModel, s: &ModelState) -> bool {
    let m = Misbehavior::ALL[K];
    s.verdict
        .is_some_and(|v| v.misbehavior == m && v.actual == crate::rogue::Answer::Closes(m.code()))
}
