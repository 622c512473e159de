//! Target `session_ops`: one session under arbitrary input.

use arbitrary::{Result, Unstructured};
use bytes::{Bytes, BytesMut};

use crate::Time;
use crate::error::CloseReason;
use crate::frame::*;
use crate::session::{Config, Session, StreamState};
use crate::testing::{Pair, test_agent_identity, test_server_identity};

use super::frames::arbitrary_frame_with;

/// Target `session_ops`: arbitrary inbound frames, commands and timeouts applied to one session;
/// no panic, and `check_invariants()` holds after every step.
pub fn session_ops(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let _ = run_session_ops(&mut u);
}

pub(super) fn fuzz_config(u: &mut Unstructured<'_>) -> Result<Config> {
    let c = Config {
        initial_window: u.int_in_range(1..=100_000)?,
        max_frame_size: u.int_in_range(MIN_MAX_FRAME_SIZE..=70_000)?,
        max_concurrent_streams: u.int_in_range(0..=4)?,
        keepalive_interval_ms: u.int_in_range(0..=2000)?,
        keepalive_timeout_ms: u.int_in_range(1..=5000)?,
        handshake_timeout_ms: u.int_in_range(0..=5000)?,
        stream_id_limit: u.int_in_range(1..=40)?,
        ..Config::default()
    };
    // This end's own caps, derived from bytes already taken so that corpus files keep their
    // meaning: a send buffer below or above the peer's window, an open limit of 1 to 4, a copy
    // threshold of 1 byte to 4 KiB.
    Ok(Config {
        max_send_window: 1 + c.initial_window / 2,
        max_open_streams: 1 + c.stream_id_limit % 4,
        recv_copy_below: 1 + c.max_frame_size % 4096,
        ..c
    })
}

fn run_session_ops(u: &mut Unstructured<'_>) -> Result<()> {
    let server_cfg = fuzz_config(u)?;
    let agent_cfg = fuzz_config(u)?;
    let as_server: bool = u.arbitrary()?;
    let mut s = if u.arbitrary()? {
        // Start established, so that stream frames reach the stream machinery.
        let mut p = Pair::new(server_cfg, agent_cfg);
        p.run();
        let _ = p.server.accept_hello(p.now);
        p.run();
        if as_server { p.server } else { p.agent }
    } else if as_server {
        Session::server(server_cfg, test_server_identity(), Time::from_millis(0))
            .map_err(|_| arbitrary::Error::IncorrectFormat)?
    } else {
        Session::agent(agent_cfg, test_agent_identity(), Time::from_millis(0))
            .map_err(|_| arbitrary::Error::IncorrectFormat)?
    };
    let mut now = Time::from_millis(0);
    for _ in 0..512 {
        if u.is_empty() {
            break;
        }
        let id = StreamId(u.int_in_range(1..=12)?);
        match u.int_in_range(0..=19)? {
            0..=4 => {
                let f = arbitrary_frame_with(u, &mut |u| Ok(StreamId(u.int_in_range(1..=12)?)))?;
                let before = Before::of(&s, &f);
                s.handle_frame(now, f);
                before.check(&s);
            }
            5 => {
                let mut buf = BytesMut::from({
                    let n = u.int_in_range(0..=64)?;
                    u.bytes(n)?
                });
                let was_closed = s.is_closed();
                s.handle_bytes(now, &mut buf);
                if let (false, Some(CloseReason::Violation(e))) = (was_closed, s.close_reason()) {
                    let parse = [ErrorCode::MALFORMED_FRAME, ErrorCode::FRAME_TOO_LARGE];
                    assert!(
                        parse.contains(&e.code)
                            || e.frame.is_some_and(|k| codes_for(k).contains(&e.code)),
                        "bytes closed the session with {e:?}, which SPEC 8 does not allow"
                    );
                }
            }
            6 => {
                let _ = s.open(Protocol::TCP, "h", 1);
            }
            7 => {
                let _ = s.accept(id);
            }
            8 => {
                let _ = s.reject(id, ErrorCode::DIAL_REFUSED, "no");
            }
            9 => {
                let n = u.int_in_range(0..=5000)?;
                let _ = s.send(id, Bytes::from(vec![1u8; n]));
            }
            10 => {
                let _ = s.finish(id);
            }
            11 => {
                let _ = s.reset(id, ErrorCode(u.arbitrary()?), "r");
            }
            12 => {
                let n = u.arbitrary()?;
                let _ = s.release(id, n);
            }
            13 => {
                let _ = s.ping(now);
            }
            14 => {
                let _ = match u.int_in_range(0..=2)? {
                    0 => s.go_away("bye"),
                    1 => s.announce_draining().map(|_| ()),
                    _ => s.close(ErrorCode(u.arbitrary()?), "close"),
                };
            }
            15 => {
                now = now.plus_ms(u.int_in_range(0..=3000)?);
                s.handle_timeout(now);
                assert!(
                    s.poll_timeout().is_none_or(|t| t > now),
                    "handle_timeout(now) leaves no timer due at now"
                );
            }
            18 => {
                let max = u.int_in_range(1..=5000)?;
                let _ = s.recv(id, max);
            }
            19 => {
                let _ = s.abandon(id);
            }
            16 => {
                let wants = s.wants_transmit();
                if s.poll_frame().is_some() {
                    assert!(wants, "a frame was ready while wants_transmit() said no");
                    while s.poll_frame().is_some() {}
                }
                while s.poll_event().is_some() {}
            }
            _ => {
                if u.ratio(1, 8)? {
                    s.handle_transport_closed();
                }
            }
        }
        assert_eq!(s.check_invariants(), Ok(()));
    }
    Ok(())
}

/// The GOAWAY codes SPEC §4, §5.4, §6.3 and §8.2 allow when a frame of `kind` breaks a rule;
/// GOAWAY and unknown kinds never do. (FRAME_TOO_LARGE is allowed for any kind: a frame handed
/// over whole may still exceed what this end announced.)
fn codes_for(kind: FrameKind) -> &'static [ErrorCode] {
    const PROTOCOL: ErrorCode = ErrorCode::PROTOCOL_ERROR;
    match kind {
        FrameKind::HELLO | FrameKind::WELCOME => &[PROTOCOL, ErrorCode::VERSION_MISMATCH],
        FrameKind::DIAL => &[PROTOCOL, ErrorCode::ENHANCE_YOUR_CALM],
        // DRAINING: before the session is open (SPEC 7.4, 4.1).
        FrameKind::DIAL_OK | FrameKind::RESET | FrameKind::PING | FrameKind::DRAINING => {
            &[PROTOCOL]
        }
        FrameKind::DATA => &[
            PROTOCOL,
            ErrorCode::STREAM_CLOSED,
            ErrorCode::FLOW_CONTROL_ERROR,
        ],
        FrameKind::WINDOW => &[PROTOCOL, ErrorCode::FLOW_CONTROL_ERROR],
        // SPEC 7.4: only a NO_ERROR GOAWAY that disowns an accepted stream (checked below).
        FrameKind::GOAWAY => &[PROTOCOL],
        _ => &[],
    }
}

/// What one inbound frame met, for checking the session's answer against the SPEC's table.
struct Before {
    kind: FrameKind,
    closed: bool,
    /// The stream had the peer's FIN already and the frame is DATA (SPEC 5.4: STREAM_CLOSED).
    data_after_fin: bool,
    /// The frame is a NO_ERROR GOAWAY whose last stream is below a stream of this end that
    /// the peer accepted (SPEC 7.4: PROTOCOL_ERROR).
    goaway_disowns: bool,
}

impl Before {
    fn of(s: &Session, f: &Frame) -> Before {
        let state = s.stream_state(f.stream());
        let established = |id| {
            matches!(
                s.stream_state(id),
                Some(
                    StreamState::Open
                        | StreamState::HalfClosedLocal
                        | StreamState::HalfClosedRemote
                        | StreamState::Closing
                )
            )
        };
        let goaway_disowns = matches!(f, Frame::GoAway(g) if g.code == ErrorCode::NO_ERROR
            && s.stream_ids().any(|id| s.role().opens(id) && id > g.last_stream && established(id)));
        Before {
            goaway_disowns,
            kind: f.kind(),
            closed: s.is_closed(),
            data_after_fin: matches!(f, Frame::Data(d) if d.payload.len() <= s.max_inbound_payload() as usize)
                && matches!(
                    state,
                    Some(StreamState::HalfClosedRemote | StreamState::Closing)
                ),
        }
    }

    fn check(&self, s: &Session) {
        let Some(CloseReason::Violation(e)) = s.close_reason() else {
            return;
        };
        if self.closed {
            return;
        }
        assert_eq!(e.frame, Some(self.kind), "{e:?} blames another kind");
        if e.code == ErrorCode::FRAME_TOO_LARGE {
            return;
        }
        assert!(
            codes_for(self.kind).contains(&e.code),
            "{:?} closed the session with {e:?}, which SPEC 5.4/6.3/7.4/8.2 does not allow",
            self.kind
        );
        if self.data_after_fin {
            assert_eq!(e.code, ErrorCode::STREAM_CLOSED, "DATA after FIN: {e:?}");
        }
        if self.kind == FrameKind::GOAWAY {
            assert!(
                self.goaway_disowns,
                "GOAWAY refused though it disowned nothing: {e:?}"
            );
        }
    }
}
