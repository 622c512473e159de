//! Session behaviours (SPEC 4–7), through the in-memory pair and by feeding exact frames.

use bytes::{Bytes, BytesMut};
use tether_proto::frame::*;
use tether_proto::testing::{Carry, Pair, Side};
use tether_proto::{
    ApiError, CloseReason, Config, Event, Initiator, ProtocolError, Session, StreamState, Time,
};

fn config() -> Config {
    Config {
        keepalive_interval_ms: 0,
        ..Config::default()
    }
}

fn small_window(w: u32) -> Config {
    Config {
        initial_window: w,
        ..config()
    }
}

fn pair() -> Pair {
    Pair::established(config(), config())
}

/// The server opens a stream to 10.0.0.1:80 and the agent accepts it.
fn open_accepted(p: &mut Pair) -> StreamId {
    let id = p.server.open(Protocol::TCP, "10.0.0.1", 80).unwrap();
    p.run();
    let events = p.events(Side::Agent);
    assert!(
        matches!(&events[..], [Event::DialRequested { stream, dial }] if *stream == id && dial.port == 80),
        "{events:?}"
    );
    p.agent.accept(id).unwrap();
    p.run();
    assert_eq!(
        p.events(Side::Server),
        vec![Event::DialSucceeded { stream: id }]
    );
    id
}

/// Reads everything `s` has for `id`: the bytes, and whether the peer's FIN was reached.
fn read_all(s: &mut Session, id: StreamId) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    loop {
        match s.recv(id, usize::MAX) {
            Ok(Some(b)) => got.extend_from_slice(&b),
            Ok(None) => return (got, true),
            Err(ApiError::WouldBlock) => return (got, false),
            Err(e) => panic!("recv on {id}: {e}"),
        }
    }
}

fn goaway_code(frames: &[Frame]) -> Option<ErrorCode> {
    frames.iter().find_map(|f| match f {
        Frame::GoAway(g) => Some(g.code),
        _ => None,
    })
}

fn drain_frames(s: &mut Session) -> Vec<Frame> {
    core::iter::from_fn(|| s.poll_frame()).collect()
}

fn closed_reason(events: &[Event]) -> Option<&CloseReason> {
    events.iter().find_map(|e| match e {
        Event::Closed(r) => Some(r),
        _ => None,
    })
}

// ----- handshake -----

#[test]
fn handshake_exchanges_hello_and_welcome_then_both_ends_are_established() {
    let mut p = Pair::new(config(), config());
    p.record = true;
    p.run();
    let hello = p.events(Side::Server);
    let Some(Event::HelloReceived(h)) = hello.first() else {
        panic!("{hello:?}")
    };
    assert_eq!(h.agent_id, "agent-1");
    assert_eq!(h.versions, vec![PROTOCOL_VERSION]);
    assert!(
        !p.server.is_established(),
        "the server waits for its application's decision"
    );
    p.server.accept_hello(p.now).unwrap();
    p.run();
    assert!(matches!(
        &p.events(Side::Agent)[..],
        [Event::Established { version: 1, welcome: Some(w), .. }] if w.server_id == "server-1"
    ));
    assert!(matches!(
        &p.events(Side::Server)[..],
        [Event::Established {
            version: 1,
            welcome: None,
            ..
        }]
    ));
    assert!(matches!(&p.sent.1[..], [Frame::Hello(_)]));
    assert!(matches!(&p.sent.0[..], [Frame::Welcome(_)]));
}

#[test]
fn a_refused_hello_ends_both_ends_with_unauthorized() {
    let mut p = Pair::new(config(), config());
    p.run();
    p.events(Side::Server);
    p.server
        .refuse_hello(ErrorCode::UNAUTHORIZED, "bad token")
        .unwrap();
    p.run();
    let agent = p.events(Side::Agent);
    assert_eq!(
        closed_reason(&agent),
        Some(&CloseReason::Peer {
            code: ErrorCode::UNAUTHORIZED,
            reason: "bad token".into()
        })
    );
    assert!(p.server.is_finished() && p.agent.is_finished());
}

#[test]
fn no_common_version_closes_with_version_mismatch() {
    let agent = Config {
        versions: vec![7, 8],
        ..config()
    };
    let mut p = Pair::new(config(), agent);
    p.record = true;
    p.run();
    assert_eq!(goaway_code(&p.sent.0), Some(ErrorCode::VERSION_MISMATCH));
    let agent = p.events(Side::Agent);
    assert!(matches!(
        closed_reason(&agent),
        Some(CloseReason::Peer {
            code: ErrorCode::VERSION_MISMATCH,
            ..
        })
    ));
}

#[test]
fn the_server_picks_the_highest_common_version() {
    let server = Config {
        versions: vec![1, 2, 3],
        ..config()
    };
    let agent = Config {
        versions: vec![1, 2, 5],
        ..config()
    };
    let p = Pair::established(server, agent);
    assert_eq!(p.server.version(), 2);
    assert_eq!(p.agent.version(), 2);
}

#[test]
fn a_frame_before_hello_is_a_protocol_error() {
    let mut s = Session::server(
        config(),
        tether_proto::testing::test_server_identity(),
        Time::from_millis(0),
    )
    .unwrap();
    s.handle_frame(
        Time::from_millis(0),
        Frame::Ping(Ping {
            ack: false,
            payload: 1,
        }),
    );
    assert_eq!(
        goaway_code(&drain_frames(&mut s)),
        Some(ErrorCode::PROTOCOL_ERROR)
    );
    assert!(s.is_finished());
}

#[test]
fn the_handshake_deadline_closes_a_silent_tunnel() {
    let mut s = Session::server(
        config(),
        tether_proto::testing::test_server_identity(),
        Time::from_millis(0),
    )
    .unwrap();
    assert_eq!(s.poll_timeout(), Some(Time::from_millis(10_000)));
    s.handle_timeout(Time::from_millis(10_000));
    assert_eq!(
        goaway_code(&drain_frames(&mut s)),
        Some(ErrorCode::HANDSHAKE_TIMEOUT)
    );
    assert_eq!(s.close_reason(), Some(&CloseReason::HandshakeTimeout));
}

// ----- dials -----

#[test]
fn dial_accepted_establishes_the_stream_at_both_ends() {
    let mut p = pair();
    let id = open_accepted(&mut p);
    assert_eq!(id, StreamId(1), "the server opens odd ids");
    assert_eq!(p.server.stream_state(id), Some(StreamState::Open));
    assert_eq!(p.agent.stream_state(id), Some(StreamState::Open));
    let agent_id = p.agent.open(Protocol::TCP, "svc", 443).unwrap();
    assert_eq!(agent_id, StreamId(2), "the agent opens even ids");
}

#[test]
fn dial_rejected_reports_the_code_at_the_opener_and_frees_both_ends() {
    let mut p = pair();
    let id = p.server.open(Protocol::TCP, "10.0.0.9", 22).unwrap();
    p.run();
    p.events(Side::Agent);
    p.agent
        .reject(id, ErrorCode::DIAL_FORBIDDEN, "not on the allowlist")
        .unwrap();
    p.run();
    let events = p.events(Side::Server);
    let [Event::DialFailed { stream, error }] = &events[..] else {
        panic!("{events:?}")
    };
    assert_eq!(*stream, id);
    assert_eq!(error.code, ErrorCode::DIAL_FORBIDDEN);
    assert_eq!(error.reason, "not on the allowlist");
    assert_eq!(error.by, Initiator::Peer);
    assert_eq!(p.server.stream_count(), 0);
    assert_eq!(p.agent.stream_count(), 0);
}

#[test]
fn a_dial_cancelled_before_it_was_sent_puts_nothing_on_the_wire() {
    let mut p = pair();
    p.record = true;
    let id = p.server.open(Protocol::TCP, "10.0.0.1", 80).unwrap();
    p.server
        .reset(id, ErrorCode::CANCEL, "client went away")
        .unwrap();
    p.run();
    assert!(p.sent.0.is_empty(), "{:?}", p.sent.0);
    assert_eq!(p.server.stream_count(), 0);
    // The skipped id stays used: the next stream gets the next one.
    let next = p.server.open(Protocol::TCP, "10.0.0.1", 80).unwrap();
    assert_eq!(next, StreamId(3));
    p.run();
    assert!(
        matches!(&p.events(Side::Agent)[..], [Event::DialRequested { stream, .. }] if *stream == next)
    );
}

#[test]
fn a_dial_cancelled_while_pending_releases_the_acceptor() {
    let mut p = pair();
    let id = p.server.open(Protocol::TCP, "10.0.0.1", 80).unwrap();
    p.run();
    p.events(Side::Agent);
    p.server
        .reset(id, ErrorCode::CANCEL, "client went away")
        .unwrap();
    p.run();
    let events = p.events(Side::Agent);
    assert!(
        matches!(
            &events[..],
            [Event::Reset { stream, error }] if *stream == id && error.code == ErrorCode::CANCEL && error.by == Initiator::Peer
        ),
        "{events:?}"
    );
    assert_eq!(p.agent.stream_count(), 0);
    // The entry only says how it ended, until the application lets go of it.
    assert_eq!(p.agent.stream_state(id), Some(StreamState::Failed));
    assert_eq!(p.agent.accept(id), Err(ApiError::NotPending));
    p.agent.abandon(id).unwrap();
    assert_eq!(p.agent.accept(id), Err(ApiError::UnknownStream));
    p.run();
    assert!(
        p.agent.poll_frame().is_none(),
        "abandoning a failed stream sends nothing"
    );
}

#[test]
fn cancel_crossing_dial_ok_releases_both_ends() {
    let mut p = pair();
    let id = p.server.open(Protocol::TCP, "10.0.0.1", 80).unwrap();
    p.run();
    p.events(Side::Agent);
    // Both act before either hears from the other: DIAL_OK and RESET cross.
    p.agent.accept(id).unwrap();
    p.server.reset(id, ErrorCode::CANCEL, "cancelled").unwrap();
    p.transmit();
    p.deliver();
    p.run();
    assert_eq!(p.server.stream_count(), 0);
    assert_eq!(p.agent.stream_count(), 0);
    assert!(
        p.events(Side::Server).is_empty(),
        "the late DIAL_OK is discarded"
    );
    let agent = p.events(Side::Agent);
    assert!(matches!(&agent[..], [Event::Reset { error, .. }] if error.code == ErrorCode::CANCEL));
    assert!(
        p.server.is_established() && p.agent.is_established(),
        "no protocol error"
    );
}

#[test]
fn a_dial_for_an_unannounced_stream_reset_by_the_peer_leaves_no_event() {
    let mut p = pair();
    let id = p.server.open(Protocol::TCP, "10.0.0.1", 80).unwrap();
    p.run();
    p.server.reset(id, ErrorCode::CANCEL, "").unwrap();
    p.run();
    assert!(
        p.events(Side::Agent).is_empty(),
        "DialRequested was withdrawn with the stream"
    );
}

// ----- data and half-close -----

#[test]
fn half_close_local_first_then_remote_closes_the_stream_at_both_ends() {
    let mut p = pair();
    p.record = true;
    let id = open_accepted(&mut p);
    p.server.send(id, Bytes::from_static(b"request")).unwrap();
    p.server.finish(id).unwrap();
    p.run();
    assert_eq!(
        p.server.stream_state(id),
        Some(StreamState::HalfClosedLocal)
    );
    assert_eq!(
        p.agent.stream_state(id),
        Some(StreamState::HalfClosedRemote)
    );
    assert_eq!(p.events(Side::Agent), vec![Event::Readable { stream: id }]);
    assert_eq!(read_all(&mut p.agent, id), (b"request".to_vec(), true));
    p.agent.send(id, Bytes::from_static(b"response")).unwrap();
    p.agent.finish(id).unwrap();
    p.run();
    assert_eq!(p.events(Side::Server), vec![Event::Readable { stream: id }]);
    assert_eq!(read_all(&mut p.server, id), (b"response".to_vec(), true));
    // Closed at both ends: nothing counts, and the entries wait for their handles to go.
    assert_eq!(p.server.stream_state(id), Some(StreamState::Closed));
    assert_eq!(p.agent.stream_state(id), Some(StreamState::Closed));
    assert_eq!(p.server.stream_count() + p.agent.stream_count(), 0);
    p.server.abandon(id).unwrap();
    p.agent.abandon(id).unwrap();
    p.run();
    assert_eq!(p.server.stream_state(id), None);
    assert_eq!(p.agent.stream_state(id), None);
    assert!(
        !p.sent
            .0
            .iter()
            .chain(&p.sent.1)
            .any(|f| matches!(f, Frame::Reset(_))),
        "abandoning a closed stream sends nothing"
    );
}

#[test]
fn half_close_remote_first_then_local_closes_the_stream_at_both_ends() {
    let mut p = pair();
    let id = open_accepted(&mut p);
    p.agent.finish(id).unwrap();
    p.run();
    assert_eq!(
        p.server.stream_state(id),
        Some(StreamState::HalfClosedRemote)
    );
    assert_eq!(p.events(Side::Server), vec![Event::Readable { stream: id }]);
    assert_eq!(read_all(&mut p.server, id), (Vec::new(), true));
    // The server may still send after the peer finished.
    p.server.send(id, Bytes::from_static(b"late")).unwrap();
    p.server.finish(id).unwrap();
    p.run();
    p.events(Side::Agent);
    assert_eq!(read_all(&mut p.agent, id), (b"late".to_vec(), true));
    assert_eq!(p.server.stream_count() + p.agent.stream_count(), 0);
}

#[test]
fn send_after_finish_is_refused_locally() {
    let mut p = pair();
    let id = open_accepted(&mut p);
    p.server.finish(id).unwrap();
    assert!(matches!(
        p.server.send(id, Bytes::from_static(b"x")),
        Err(ApiError::AlreadyFinished)
    ));
}

#[test]
fn reset_while_data_is_in_flight_discards_it_and_tells_the_peer() {
    let mut p = pair();
    let id = open_accepted(&mut p);
    p.server.send(id, Bytes::from(vec![7u8; 1000])).unwrap();
    p.transmit();
    // The agent has not processed the data yet when the reset is sent behind it.
    p.server.reset(id, ErrorCode::CANCEL, "abort").unwrap();
    p.run();
    let ev = p.events(Side::Agent);
    assert_eq!(
        ev,
        vec![Event::Reset {
            stream: id,
            error: tether_proto::StreamError {
                code: ErrorCode::CANCEL,
                reason: "abort".into(),
                by: Initiator::Peer,
                session_closed: false
            }
        }],
        "undelivered data is discarded with the stream"
    );
    assert_eq!(p.agent.stream_count(), 0);
    assert_eq!(p.server.stream_count(), 0);
}

#[test]
fn both_ends_resetting_at_once_is_not_an_error() {
    let mut p = pair();
    let id = open_accepted(&mut p);
    p.server.reset(id, ErrorCode::CANCEL, "a").unwrap();
    p.agent.reset(id, ErrorCode::ABORTED, "b").unwrap();
    p.run();
    assert!(p.events(Side::Server).is_empty());
    assert!(p.events(Side::Agent).is_empty());
    assert!(p.server.is_established() && p.agent.is_established());
    assert_eq!(p.server.stream_count() + p.agent.stream_count(), 0);
}

// ----- flow control -----

#[test]
fn window_exhausted_then_reopened_when_the_receiver_releases() {
    let mut p = Pair::established(small_window(1000), small_window(1000));
    p.record = true;
    let id = open_accepted(&mut p);
    let accepted = p.server.send(id, Bytes::from(vec![1u8; 1500])).unwrap();
    assert_eq!(accepted, 1000, "only the window is taken");
    assert_eq!(p.server.send_capacity(id), 0);
    p.run();
    p.events(Side::Agent);
    assert_eq!(read_all(&mut p.agent, id).0.len(), 1000);
    // Not yet released: no credit returns.
    assert!(p.events(Side::Server).is_empty());
    p.agent.release(id, 400).unwrap();
    p.run();
    assert!(
        p.events(Side::Server).is_empty(),
        "400 < half the window: no WINDOW yet"
    );
    p.agent.release(id, 600).unwrap();
    p.run();
    let windows: Vec<_> = p
        .sent
        .1
        .iter()
        .filter(|f| matches!(f, Frame::Window(_)))
        .collect();
    assert_eq!(windows.len(), 1, "one batched WINDOW for 1000 bytes");
    assert_eq!(p.events(Side::Server), vec![Event::Writable { stream: id }]);
    assert_eq!(p.server.send_capacity(id), 1000);
    assert_eq!(p.server.send(id, Bytes::from(vec![2u8; 500])).unwrap(), 500);
}

#[test]
fn a_release_under_the_batch_threshold_leaves_nothing_to_transmit() {
    let mut p = Pair::established(small_window(1000), small_window(1000));
    let id = open_accepted(&mut p);
    assert_eq!(
        p.server.send(id, Bytes::from(vec![1u8; 1000])).unwrap(),
        1000
    );
    p.run();
    p.events(Side::Agent);
    read_all(&mut p.agent, id);
    assert!(!p.agent.wants_transmit(), "all sent, nothing due");
    p.agent.release(id, 400).unwrap();
    assert!(
        !p.agent.wants_transmit(),
        "400 < half the window: no WINDOW is due, a writer need not wake"
    );
    p.agent.release(id, 100).unwrap();
    assert!(p.agent.wants_transmit(), "half the window: a WINDOW is due");
    assert!(matches!(p.agent.poll_frame(), Some(Frame::Window(_))));
    assert!(!p.agent.wants_transmit());
}

#[test]
fn a_send_that_uses_the_last_of_the_window_is_told_when_credit_returns() {
    let mut p = Pair::established(small_window(10), small_window(10));
    let id = open_accepted(&mut p);
    assert_eq!(p.server.send(id, Bytes::from(vec![1u8; 10])).unwrap(), 10);
    p.run();
    p.events(Side::Agent);
    read_all(&mut p.agent, id);
    p.agent.release(id, 10).unwrap();
    p.run();
    assert_eq!(p.events(Side::Server), vec![Event::Writable { stream: id }]);
}

#[test]
fn a_stalled_reader_on_one_stream_does_not_stop_a_large_transfer_on_another() {
    let mut p = Pair::established(small_window(64 * 1024), small_window(64 * 1024));
    p.carry = Carry::Bytes(vec![1500, 9000, 17, 65536]);
    let stalled = open_accepted(&mut p);
    let busy = open_accepted(&mut p);
    // The stalled stream fills its window and is never released.
    let filled = p
        .server
        .send(stalled, Bytes::from(vec![0xee; 200_000]))
        .unwrap();
    assert_eq!(filled, 64 * 1024);
    let total = 8 * 1024 * 1024;
    let chunk = Bytes::from(vec![0x5a; 32 * 1024]);
    let (mut sent, mut received, mut stalled_seen) = (0usize, 0usize, 0usize);
    for _ in 0..100_000 {
        while sent < total {
            let n = p
                .server
                .send(busy, chunk.slice(..chunk.len().min(total - sent)))
                .unwrap();
            if n == 0 {
                break;
            }
            sent += n;
        }
        if sent == total && p.server.stream_state(busy) == Some(StreamState::Open) {
            p.server.finish(busy).unwrap();
        }
        p.run();
        for e in p.events(Side::Agent) {
            match e {
                Event::Readable { stream } if stream == busy => {
                    let (data, _) = read_all(&mut p.agent, busy);
                    received += data.len();
                    p.agent
                        .release(busy, u32::try_from(data.len()).unwrap())
                        .unwrap();
                }
                Event::Readable { stream } if stream == stalled => {
                    stalled_seen += read_all(&mut p.agent, stalled).0.len();
                }
                _ => {}
            }
        }
        p.events(Side::Server);
        if received == total {
            break;
        }
    }
    assert_eq!(received, total, "the busy stream completed");
    assert_eq!(
        stalled_seen,
        64 * 1024,
        "the stalled stream got exactly its window"
    );
    assert_eq!(p.agent.unreleased(stalled), 64 * 1024);
    assert_eq!(p.server.send_capacity(stalled), 0);
}

#[test]
fn no_payload_byte_is_copied_between_the_two_sessions() {
    let mut p = Pair::established(config(), config());
    let id = open_accepted(&mut p);
    let payload = Bytes::from(vec![3u8; 200_000]);
    let n = p.server.send(id, payload.clone()).unwrap();
    p.run();
    assert_eq!(p.events(Side::Agent), vec![Event::Readable { stream: id }]);
    let mut offset = 0;
    while let Ok(Some(data)) = p.agent.recv(id, usize::MAX) {
        assert_eq!(
            data.as_ptr(),
            payload[offset..].as_ptr(),
            "payload at {offset} arrives as a slice of the sent Bytes"
        );
        assert!(data.len() <= Settings::DEFAULT_MAX_FRAME_SIZE as usize);
        offset += data.len();
    }
    assert_eq!(offset, n);
}

// ----- keepalive -----

#[test]
fn keepalive_pings_are_answered_and_keep_the_tunnel_alive() {
    let ka = Config {
        keepalive_interval_ms: 1000,
        keepalive_timeout_ms: 3000,
        ..Config::default()
    };
    let mut p = Pair::established(ka.clone(), ka);
    for _ in 0..20 {
        p.advance_to_next();
    }
    assert!(p.now >= Time::from_millis(5000));
    assert!(p.server.is_established() && p.agent.is_established());
}

#[test]
fn the_keepalive_deadline_closes_the_session_and_fails_every_stream_and_pending_dial_at_both_ends()
{
    let ka = Config {
        keepalive_interval_ms: 1000,
        keepalive_timeout_ms: 3000,
        ..Config::default()
    };
    let mut p = Pair::established(ka.clone(), ka);
    let open = open_accepted(&mut p);
    let dialing = p.server.open(Protocol::TCP, "10.0.0.2", 80).unwrap();
    let agent_dial = p.agent.open(Protocol::TCP, "10.0.0.3", 80).unwrap();
    p.run();
    p.events(Side::Agent);
    p.events(Side::Server);
    // The tunnel goes silent in both directions without closing.
    p.stall(Side::Agent, true);
    p.stall(Side::Server, true);
    let mut rounds = 0;
    while !(p.server.is_closed() && p.agent.is_closed()) {
        assert!(p.advance_to_next(), "a timer is always pending");
        rounds += 1;
        assert!(rounds < 20);
    }
    assert!(
        p.now <= Time::from_millis(1000 + 3000),
        "found within interval + timeout"
    );
    for side in [Side::Server, Side::Agent] {
        let ev = p.events(side);
        assert_eq!(
            closed_reason(&ev),
            Some(&CloseReason::KeepaliveTimeout),
            "{side:?}"
        );
        let failed: Vec<StreamId> = ev.iter().filter_map(Event::stream).collect();
        // In id order: 1 (open), 2 (the agent's dial), 3 (the server's dial).
        assert_eq!(failed, vec![open, agent_dial, dialing], "{side:?}: {ev:?}");
        assert!(
            ev.iter()
                .all(|e| e.code() == Some(ErrorCode::KEEPALIVE_TIMEOUT))
        );
        assert_eq!(p.session(side).stream_count(), 0);
    }
}

#[test]
fn any_frame_from_the_peer_extends_the_keepalive_deadline() {
    let ka = Config {
        keepalive_interval_ms: 1000,
        keepalive_timeout_ms: 3000,
        ..Config::default()
    };
    let mut s = Session::server(
        ka,
        tether_proto::testing::test_server_identity(),
        Time::from_millis(0),
    )
    .unwrap();
    let mut a = Session::agent(
        config(),
        tether_proto::testing::test_agent_identity(),
        Time::from_millis(0),
    )
    .unwrap();
    let mut p = Pair::from_sessions(s.clone(), a.clone());
    p.handshake();
    (s, a) = (p.server, p.agent);
    s.handle_timeout(Time::from_millis(1000));
    assert!(matches!(
        s.poll_frame(),
        Some(Frame::Ping(Ping { ack: false, .. }))
    ));
    assert_eq!(s.poll_timeout(), Some(Time::from_millis(4000)));
    // The answer is stuck, but other frames arrive.
    let _ = a;
    s.handle_frame(
        Time::from_millis(3500),
        Frame::Ping(Ping {
            ack: false,
            payload: 99,
        }),
    );
    assert_eq!(s.poll_timeout(), Some(Time::from_millis(6500)));
    s.handle_timeout(Time::from_millis(4000));
    assert!(s.is_established());
}

#[test]
fn a_flood_of_pings_leaves_one_answer_queued() {
    let mut p = pair();
    for n in 0..10_000u64 {
        p.agent.handle_frame(
            p.now,
            Frame::Ping(Ping {
                ack: false,
                payload: n,
            }),
        );
    }
    let frames = drain_frames(&mut p.agent);
    assert_eq!(
        frames,
        vec![Frame::Ping(Ping {
            ack: true,
            payload: 9_999
        })]
    );
}

#[test]
fn ping_reports_the_round_trip_time() {
    let mut p = pair();
    p.latency_ms = 5;
    p.server.ping(p.now).unwrap();
    for _ in 0..4 {
        p.advance_to_next();
    }
    assert_eq!(
        p.events(Side::Server),
        vec![Event::PingAnswered { rtt_ms: 10 }]
    );
}

// ----- drain -----

#[test]
fn goaway_drains_open_streams_then_closes_both_ends() {
    let mut p = pair();
    let id = open_accepted(&mut p);
    p.server.go_away("restarting").unwrap();
    p.run();
    assert!(matches!(
        &p.events(Side::Agent)[..],
        [Event::GoingAway {
            last_stream: StreamId(0),
            ..
        }]
    ));
    assert_eq!(p.agent.open(Protocol::TCP, "x", 1), Err(ApiError::Draining));
    assert_eq!(
        p.server.open(Protocol::TCP, "x", 1),
        Err(ApiError::Draining)
    );
    // The open stream still works and finishes.
    p.server
        .send(id, Bytes::from_static(b"last words"))
        .unwrap();
    p.server.finish(id).unwrap();
    p.agent.finish(id).unwrap();
    p.run();
    // The drain completes once each application has read its stream to the end.
    assert_eq!(read_all(&mut p.agent, id), (b"last words".to_vec(), true));
    assert_eq!(read_all(&mut p.server, id), (Vec::new(), true));
    p.run();
    for side in [Side::Server, Side::Agent] {
        let ev = p.events(side);
        assert_eq!(
            closed_reason(&ev),
            Some(&CloseReason::Drained),
            "{side:?} {ev:?}"
        );
        assert!(p.session(side).is_finished());
    }
}

#[test]
fn a_dial_crossing_a_goaway_is_refused_and_safe_to_retry() {
    let mut p = pair();
    let id = p.agent.open(Protocol::TCP, "10.0.0.1", 80).unwrap();
    p.server.go_away("draining").unwrap();
    p.run();
    let ev = p.events(Side::Agent);
    assert!(
        ev.iter().any(|e| matches!(e, Event::DialFailed { stream, error } if *stream == id && error.code == ErrorCode::REFUSED_STREAM)),
        "{ev:?}"
    );
    assert_eq!(closed_reason(&ev), Some(&CloseReason::Drained));
}

#[test]
fn an_empty_session_drains_at_once() {
    let mut p = pair();
    p.agent.go_away("bye").unwrap();
    p.run();
    assert!(p.server.is_finished() && p.agent.is_finished());
}

#[test]
fn stream_id_exhaustion_starts_a_drain() {
    let agent = Config {
        stream_id_limit: 6,
        ..config()
    };
    let mut p = Pair::established(config(), agent);
    for expected in [2, 4, 6] {
        assert_eq!(
            p.agent.open(Protocol::TCP, "h", 1).unwrap(),
            StreamId(expected)
        );
    }
    assert_eq!(
        p.agent.open(Protocol::TCP, "h", 1),
        Err(ApiError::IdsExhausted)
    );
    assert!(p.agent.is_draining());
    p.record = true;
    p.run();
    assert!(
        p.sent
            .1
            .iter()
            .any(|f| matches!(f, Frame::GoAway(g) if g.code == ErrorCode::NO_ERROR))
    );
}

// ----- concurrency -----

#[test]
fn a_dial_over_the_concurrent_limit_is_refused_with_refused_stream() {
    let agent = Config {
        max_concurrent_streams: 1,
        ..config()
    };
    let mut p = Pair::established(config(), agent);
    let _first = p.server.open(Protocol::TCP, "a", 1).unwrap();
    assert_eq!(
        p.server.open(Protocol::TCP, "b", 1),
        Err(ApiError::StreamLimit)
    );
    // A peer that ignores the limit gets a refusal it can tell apart.
    p.run();
    p.agent.handle_frame(
        p.now,
        Frame::Dial(Dial {
            stream: StreamId(3),
            protocol: Protocol::TCP,
            host: "b".into(),
            port: 1,
        }),
    );
    let frames = drain_frames(&mut p.agent);
    assert!(
        matches!(
            &frames[..],
            [Frame::Reset(r)] if r.stream == StreamId(3) && r.code == ErrorCode::REFUSED_STREAM
        ),
        "{frames:?}"
    );
    assert!(p.agent.is_established());
}

#[test]
fn a_flood_of_dials_over_the_limit_ends_in_enhance_your_calm() {
    let agent = Config {
        max_concurrent_streams: 2,
        ..config()
    };
    let mut p = Pair::established(config(), agent);
    for n in 0..10u32 {
        p.agent.handle_frame(
            p.now,
            Frame::Dial(Dial {
                stream: StreamId(1 + 2 * n),
                protocol: Protocol::TCP,
                host: "h".into(),
                port: 1,
            }),
        );
    }
    assert!(p.agent.is_closed());
    assert_eq!(
        goaway_code(&drain_frames(&mut p.agent)),
        Some(ErrorCode::ENHANCE_YOUR_CALM)
    );
}

/// Found by the session_pair fuzzer: an honest server that dials, cancels and dials again,
/// all in one burst of bytes a draining agent reads at once, is not a flood. Each cancel's
/// RESET drops the refusal still queued for that DIAL, so the queue stays within what the
/// peer has live (SPEC 5.4).
#[test]
fn a_peer_that_cancels_refused_dials_and_dials_again_in_one_burst_is_not_a_flood() {
    let agent = Config {
        max_concurrent_streams: 2,
        ..config()
    };
    let mut p = Pair::established(config(), agent);
    p.agent.go_away("drain").unwrap();
    let mut burst = BytesMut::new();
    for n in 0..10u32 {
        let stream = StreamId(1 + 2 * n);
        Frame::Dial(Dial {
            stream,
            protocol: Protocol::TCP,
            host: "h".into(),
            port: 1,
        })
        .encode(&mut burst);
        Frame::Reset(Reset {
            stream,
            code: ErrorCode::CANCEL,
            reason: "cancel".into(),
        })
        .encode(&mut burst);
    }
    p.agent.handle_bytes(p.now, &mut burst);
    assert!(!p.agent.is_closed(), "{:?}", p.agent.close_reason());
    let frames = drain_frames(&mut p.agent);
    assert!(
        !frames.iter().any(|f| matches!(f, Frame::Reset(_))),
        "refusals of cancelled dials are not sent: {frames:?}"
    );
    assert_eq!(p.agent.check_invariants(), Ok(()));
}

// ----- violations -----

/// Feeds `frames` to the agent end of an established pair with one open stream (1), and
/// returns the GOAWAY code it answered with.
fn violation_code(frames: Vec<Frame>) -> (ErrorCode, Vec<Event>) {
    let mut p = Pair::established(small_window(100), small_window(100));
    let id = open_accepted(&mut p);
    assert_eq!(id, StreamId(1));
    for f in frames {
        p.agent.handle_frame(p.now, f);
    }
    let code = goaway_code(&drain_frames(&mut p.agent)).expect("a GOAWAY");
    let ev = p.events(Side::Agent);
    assert!(p.agent.is_finished());
    (code, ev)
}

fn data(stream: u32, fin: bool, len: usize) -> Frame {
    Frame::Data(Data {
        stream: StreamId(stream),
        fin,
        payload: Bytes::from(vec![0u8; len]),
    })
}

#[test]
fn each_protocol_violation_gives_its_goaway_code() {
    let dial = |id| {
        Frame::Dial(Dial {
            stream: StreamId(id),
            protocol: Protocol::TCP,
            host: "h".into(),
            port: 1,
        })
    };
    let cases: Vec<(&str, Vec<Frame>, ErrorCode)> = vec![
        (
            "data after FIN",
            vec![data(1, true, 1), data(1, false, 1)],
            ErrorCode::STREAM_CLOSED,
        ),
        (
            "window overrun",
            vec![data(1, false, 101)],
            ErrorCode::FLOW_CONTROL_ERROR,
        ),
        (
            "WINDOW grants more than was sent",
            vec![Frame::Window(WindowUpdate {
                stream: StreamId(1),
                increment: 1,
            })],
            ErrorCode::FLOW_CONTROL_ERROR,
        ),
        (
            "DIAL reuses an id",
            vec![dial(1)],
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            "DIAL with the receiver's parity",
            vec![dial(2)],
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            "DATA for a never-opened stream",
            vec![data(5, false, 1)],
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            "RESET for a never-opened local stream",
            vec![Frame::Reset(Reset {
                stream: StreamId(8),
                code: ErrorCode::CANCEL,
                reason: String::new(),
            })],
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            "DIAL_OK for a stream the peer opened",
            vec![Frame::DialOk(DialOk {
                stream: StreamId(1),
            })],
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            "DATA before DIAL_OK",
            vec![dial(3), data(3, false, 1)],
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            "HELLO after the handshake",
            vec![Frame::Hello(Hello {
                versions: vec![1],
                agent_id: "x".into(),
                identifiers: vec![],
                settings: Settings::default(),
                token: None,
            })],
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            "DIAL after the peer's GOAWAY",
            vec![
                Frame::GoAway(GoAway {
                    last_stream: StreamId(0),
                    code: ErrorCode::NO_ERROR,
                    reason: String::new(),
                }),
                dial(3),
            ],
            ErrorCode::PROTOCOL_ERROR,
        ),
    ];
    for (name, frames, code) in cases {
        let (got, ev) = violation_code(frames);
        assert_eq!(got, code, "{name}");
        assert!(
            matches!(closed_reason(&ev), Some(CloseReason::Violation(ProtocolError { code: c, .. })) if *c == code),
            "{name}: {ev:?}"
        );
        // The open stream ended with the same code at this end.
        assert!(
            ev.iter().any(|e| matches!(e, Event::Reset { stream: StreamId(1), error } if error.code == code && error.session_closed)),
            "{name}: {ev:?}"
        );
    }
}

#[test]
fn a_window_that_credits_bytes_not_yet_sent_is_a_flow_control_error() {
    // Found by fuzz/session_ops (regressions/session_ops/window-credits-unsent-bytes): credit
    // for bytes still queued at the sender, never on the wire, was accepted and broke the
    // invariant that queued bytes are part of the unacknowledged ones.
    let mut p = pair();
    let id = open_accepted(&mut p);
    p.server.send(id, Bytes::from(vec![1u8; 100])).unwrap();
    // The 100 bytes are queued, not sent: the peer can have received none of them.
    p.server.handle_frame(
        p.now,
        Frame::Window(WindowUpdate {
            stream: id,
            increment: 2,
        }),
    );
    assert_eq!(
        goaway_code(&drain_frames(&mut p.server)),
        Some(ErrorCode::FLOW_CONTROL_ERROR)
    );
    assert_eq!(p.server.check_invariants(), Ok(()));
}

#[test]
fn a_window_for_bytes_sent_is_accepted_while_more_are_queued() {
    let mut p = Pair::established(small_window(1000), small_window(1000));
    let id = open_accepted(&mut p);
    p.server.send(id, Bytes::from(vec![1u8; 600])).unwrap();
    p.run();
    p.events(Side::Agent);
    // 400 more are queued, not sent, when the credit for the first 600 arrives.
    p.server.send(id, Bytes::from(vec![2u8; 400])).unwrap();
    p.server.handle_frame(
        p.now,
        Frame::Window(WindowUpdate {
            stream: id,
            increment: 600,
        }),
    );
    assert!(p.server.is_established());
    assert_eq!(p.server.send_capacity(id), 600);
}

#[test]
fn dial_ok_for_an_established_stream_is_a_protocol_error() {
    let mut p = pair();
    let id = open_accepted(&mut p);
    p.server
        .handle_frame(p.now, Frame::DialOk(DialOk { stream: id }));
    assert_eq!(
        goaway_code(&drain_frames(&mut p.server)),
        Some(ErrorCode::PROTOCOL_ERROR)
    );
}

#[test]
fn malformed_bytes_close_the_tunnel_with_malformed_frame() {
    let mut p = pair();
    let mut buf = BytesMut::from(&[0x05u8, 0, 0, 0, 0, 0, 0, 0, 0, 0][..]);
    p.agent.handle_bytes(p.now, &mut buf);
    assert_eq!(
        goaway_code(&drain_frames(&mut p.agent)),
        Some(ErrorCode::MALFORMED_FRAME)
    );
    assert!(buf.is_empty());
}

#[test]
fn a_frame_over_max_frame_size_closes_the_tunnel_with_frame_too_large() {
    let agent = Config {
        max_frame_size: 1024,
        ..config()
    };
    let mut p = Pair::established(config(), agent);
    assert_eq!(p.agent.max_inbound_payload(), 1024);
    let mut buf = BytesMut::new();
    Header {
        kind: FrameKind::DATA,
        flags: 0,
        stream: StreamId(1),
        len: 1025,
    }
    .encode(&mut buf);
    p.agent.handle_bytes(p.now, &mut buf);
    assert_eq!(
        goaway_code(&drain_frames(&mut p.agent)),
        Some(ErrorCode::FRAME_TOO_LARGE)
    );
}

#[test]
fn the_sender_splits_data_to_the_peers_max_frame_size() {
    let agent = Config {
        max_frame_size: 1024,
        ..config()
    };
    let mut p = Pair::established(config(), agent);
    p.carry = Carry::Bytes(vec![333]);
    p.record = true;
    let id = open_accepted(&mut p);
    p.server.send(id, Bytes::from(vec![1u8; 5000])).unwrap();
    p.run();
    p.events(Side::Agent);
    assert_eq!(read_all(&mut p.agent, id).0.len(), 5000);
    assert!(
        p.sent
            .0
            .iter()
            .all(|f| !matches!(f, Frame::Data(d) if d.payload.len() > 1024))
    );
    assert!(p.agent.is_established());
}

// ----- frames for closed streams -----

#[test]
fn frames_for_closed_streams_are_ignored() {
    let mut p = pair();
    let id = open_accepted(&mut p);
    p.server.finish(id).unwrap();
    p.agent.finish(id).unwrap();
    p.run();
    p.events(Side::Server);
    assert_eq!(read_all(&mut p.server, id), (Vec::new(), true));
    assert_eq!(p.server.stream_state(id), Some(StreamState::Closed));
    for f in [
        Frame::Window(WindowUpdate {
            stream: id,
            increment: 5,
        }),
        Frame::Reset(Reset {
            stream: id,
            code: ErrorCode::CANCEL,
            reason: String::new(),
        }),
        Frame::DialOk(DialOk { stream: id }),
        data(1, false, 3),
    ] {
        p.server.handle_frame(p.now, f.clone());
        // Once the application let go, the id is simply gone: still ignored.
        let mut gone = p.server.clone();
        gone.abandon(id).unwrap();
        gone.handle_frame(p.now, f);
        assert!(gone.is_established() && gone.stream_state(id).is_none());
    }
    assert!(drain_frames(&mut p.server).is_empty());
    assert!(p.events(Side::Server).is_empty());
    assert!(p.server.is_established());
}

// ----- tunnel loss -----

#[test]
fn dropping_the_tunnel_fails_every_stream_at_both_ends() {
    let mut p = pair();
    let open = open_accepted(&mut p);
    let dialing = p.server.open(Protocol::TCP, "10.0.0.2", 80).unwrap();
    p.run();
    p.events(Side::Agent);
    p.drop_tunnel();
    let server = p.events(Side::Server);
    assert_eq!(
        server.iter().filter_map(Event::stream).collect::<Vec<_>>(),
        vec![open, dialing]
    );
    assert!(
        matches!(&server[1], Event::DialFailed { error, .. } if error.code == ErrorCode::CONNECTION_LOST && error.session_closed)
    );
    let agent = p.events(Side::Agent);
    assert_eq!(
        agent.iter().filter_map(Event::stream).collect::<Vec<_>>(),
        vec![open, dialing],
        "the agent's pending (announced) dial fails too"
    );
    assert_eq!(closed_reason(&agent), Some(&CloseReason::TransportLost));
    assert_eq!(p.server.stream_count() + p.agent.stream_count(), 0);
}

#[test]
fn unknown_frame_kinds_are_ignored() {
    let mut p = pair();
    p.agent.handle_frame(
        p.now,
        Frame::Unknown(Unknown {
            kind: FrameKind(0x70),
            flags: 0xff,
            stream: StreamId(12345),
            payload: Bytes::from_static(b"future"),
        }),
    );
    assert!(drain_frames(&mut p.agent).is_empty());
    assert!(p.agent.is_established());
}

#[test]
fn sessions_are_values_that_clone_compare_and_hash() {
    use std::collections::hash_map::DefaultHasher;
    use std::hash::{Hash, Hasher};
    let mut p = pair();
    let id = open_accepted(&mut p);
    p.server.send(id, Bytes::from_static(b"x")).unwrap();
    let a = p.server.clone();
    assert_eq!(a, p.server);
    let h = |s: &Session| {
        let mut h = DefaultHasher::new();
        s.hash(&mut h);
        h.finish()
    };
    assert_eq!(h(&a), h(&p.server));
    p.run();
    assert_ne!(a, p.server);
    assert!(p.server.check_invariants().is_ok());
}

// ----- boundaries the mutation run found untested (docs/MODEL.md, "Mutation score") -----

#[test]
fn a_chunk_of_exactly_max_frame_size_goes_out_as_one_data_frame() {
    let mut p = pair();
    let id = open_accepted(&mut p);
    let max = p.server.peer_settings().max_frame_size() as usize;
    assert_eq!(p.server.send(id, Bytes::from(vec![1u8; max])), Ok(max));
    let frames = drain_frames(&mut p.server);
    assert!(
        matches!(&frames[..], [Frame::Data(d)] if d.payload.len() == max && !d.fin),
        "{:?}",
        frames.iter().map(Frame::payload_len).collect::<Vec<_>>()
    );
    // Nothing of it is left behind: the next byte goes out alone, not after an empty frame.
    assert_eq!(p.server.send(id, Bytes::from_static(b"x")), Ok(1));
    let frames = drain_frames(&mut p.server);
    assert!(
        matches!(&frames[..], [Frame::Data(d)] if d.payload.len() == 1),
        "{:?}",
        frames.iter().map(Frame::payload_len).collect::<Vec<_>>()
    );
}

#[test]
fn a_send_that_fits_the_window_promises_no_writable() {
    let mut p = Pair::established(small_window(100), small_window(100));
    let id = open_accepted(&mut p);
    // 10 of 100 bytes: taken whole, window not exhausted; nothing to be told later.
    assert_eq!(p.server.send(id, Bytes::from(vec![1u8; 10])), Ok(10));
    p.run();
    let (got, _) = read_all(&mut p.agent, id);
    assert_eq!(got.len(), 10);
    p.agent.release(id, 10).unwrap();
    // Credit returns only in batches (SPEC 6.4): send more so the threshold is crossed.
    assert_eq!(p.server.send(id, Bytes::from(vec![2u8; 50])), Ok(50));
    p.run();
    let (got, _) = read_all(&mut p.agent, id);
    p.agent
        .release(id, u32::try_from(got.len()).unwrap())
        .unwrap();
    p.run();
    let events = p.events(Side::Server);
    assert!(
        !events.iter().any(|e| matches!(e, Event::Writable { .. })),
        "{events:?}"
    );
    assert_eq!(p.server.send_capacity(id), 100, "the credit did come back");
}

#[test]
fn a_reason_over_255_bytes_is_cut_at_a_character_boundary_and_the_reset_still_goes_out() {
    let mut p = pair();
    let id = open_accepted(&mut p);
    // 254 ASCII bytes, then a two-byte character that would end at byte 256.
    let long = format!("{}é and more", "r".repeat(254));
    assert_eq!(p.server.reset(id, ErrorCode::CANCEL, &long), Ok(()));
    let frames: Vec<Frame> = std::iter::from_fn(|| p.server.poll_frame()).collect();
    let reset = frames
        .iter()
        .find_map(|f| match f {
            Frame::Reset(r) => Some(r.clone()),
            _ => None,
        })
        .expect("the RESET went out");
    assert_eq!(reset.reason, "r".repeat(254), "cut before the character");
}

#[test]
fn a_close_and_a_drain_with_long_reasons_send_their_goaway() {
    for drain in [false, true] {
        let mut p = pair();
        let long = "x".repeat(1000);
        if drain {
            assert_eq!(p.server.go_away(&long), Ok(()));
        } else {
            assert_eq!(p.server.close(ErrorCode::UNAUTHORIZED, &long), Ok(()));
        }
        let goaway = std::iter::from_fn(|| p.server.poll_frame())
            .find_map(|f| match f {
                Frame::GoAway(g) => Some(g),
                _ => None,
            })
            .expect("the GOAWAY went out");
        assert_eq!(goaway.reason.len(), 255);
    }
}

#[test]
fn poll_transmit_encodes_every_ready_frame_and_counts_them() {
    let mut p = pair();
    let a = p.server.open(Protocol::TCP, "a", 1).unwrap();
    let b = p.server.open(Protocol::TCP, "b", 2).unwrap();
    let mut out = BytesMut::new();
    assert_eq!(p.server.poll_transmit(&mut out), 2);
    let (frames, error) = tether_proto::testing::decode_all(&out, MIN_MAX_FRAME_SIZE);
    assert_eq!(error, None);
    let ids: Vec<StreamId> = frames.iter().map(Frame::stream).collect();
    assert_eq!(ids, vec![a, b]);
    assert!(frames.iter().all(|f| matches!(f, Frame::Dial(_))));
    assert_eq!(p.server.poll_transmit(&mut out), 0, "nothing left");
}

#[test]
fn a_keepalive_interval_without_a_timeout_is_refused_and_no_keepalive_needs_none() {
    let cfg = |interval: u64, timeout: u64| Config {
        keepalive_interval_ms: interval,
        keepalive_timeout_ms: timeout,
        ..Config::default()
    };
    let identity = tether_proto::testing::test_agent_identity;
    assert!(matches!(
        Session::agent(cfg(1000, 0), identity(), Time::from_millis(0)),
        Err(ApiError::InvalidConfig(_))
    ));
    assert!(Session::agent(cfg(0, 0), identity(), Time::from_millis(0)).is_ok());
}

#[test]
fn recv_never_returns_more_than_asked_nor_an_empty_slice_before_the_end() {
    let mut p = pair();
    let id = open_accepted(&mut p);
    p.agent.send(id, Bytes::from(vec![5u8; 2000])).unwrap();
    p.run();
    let mut sizes = Vec::new();
    while let Ok(Some(b)) = p.server.recv(id, 100) {
        sizes.push(b.len());
    }
    assert_eq!(sizes.iter().sum::<usize>(), 2000);
    assert!(sizes.iter().all(|&n| n > 0 && n <= 100), "{sizes:?}");
}

// ----- bounds this end chooses, whatever the peer announces (SPEC 10) -----

#[test]
fn a_peer_announcing_a_huge_window_gets_no_more_queued_than_this_ends_own_send_buffer() {
    let server = Config {
        max_send_window: 4096,
        ..config()
    };
    let agent = Config {
        initial_window: MAX_WINDOW,
        ..config()
    };
    let mut p = Pair::established(server, agent);
    let id = open_accepted(&mut p);
    let big = Bytes::from(vec![7u8; 1 << 20]);
    assert_eq!(p.server.send(id, big.clone()).unwrap(), 4096);
    // The peer's window has room for 2 GiB; this end's buffer is full.
    assert_eq!(p.server.send(id, big.clone()).unwrap(), 0);
    assert!(p.events(Side::Server).is_empty());
    // Once the bytes have left the buffer (onto the wire), the writer is told, once.
    let frames = drain_frames(&mut p.server);
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(p.events(Side::Server), vec![Event::Writable { stream: id }]);
    assert_eq!(p.server.send(id, big).unwrap(), 4096);
}

#[test]
fn a_peer_announcing_unlimited_streams_gets_no_more_opens_than_this_ends_own_limit() {
    let server = Config {
        max_open_streams: 2,
        ..config()
    };
    let agent = Config {
        max_concurrent_streams: u32::MAX,
        ..config()
    };
    let mut p = Pair::established(server, agent);
    p.server.open(Protocol::TCP, "10.0.0.1", 80).unwrap();
    p.server.open(Protocol::TCP, "10.0.0.1", 80).unwrap();
    assert_eq!(
        p.server.open(Protocol::TCP, "10.0.0.1", 80),
        Err(ApiError::StreamLimit)
    );
}

#[test]
fn a_peer_keepalive_interval_below_the_floor_is_raised_to_it() {
    let server = Config {
        keepalive_interval_ms: 0,
        ..config()
    };
    let agent = Config {
        keepalive_interval_ms: 1,
        keepalive_timeout_ms: 60_000,
        ..config()
    };
    let mut p = Pair::established(server, agent);
    p.record = true;
    for _ in 0..500 {
        p.advance(10);
        p.run();
    }
    let server_pings = p
        .sent
        .0
        .iter()
        .filter(|f| matches!(f, Frame::Ping(ping) if !ping.ack))
        .count();
    // 5 s at the 1 s floor: five PINGs, not five thousand.
    let at_the_floor = (5000 / MIN_KEEPALIVE_INTERVAL_MS) as usize;
    assert!(
        (at_the_floor - 1..=at_the_floor).contains(&server_pings),
        "{server_pings} PINGs in 5 s"
    );
}

// ----- GOAWAY corner cases (SPEC 7.4) -----

#[test]
fn a_goaway_whose_last_stream_disowns_an_accepted_stream_is_a_protocol_error() {
    let mut p = pair();
    let id = open_accepted(&mut p);
    // The agent accepted stream 1, then says it processed nothing above 0.
    p.server.handle_frame(
        Time::from_millis(0),
        Frame::GoAway(GoAway {
            last_stream: StreamId(id.0 - 1),
            code: ErrorCode::NO_ERROR,
            reason: "drain".into(),
        }),
    );
    assert_eq!(
        goaway_code(&drain_frames(&mut p.server)),
        Some(ErrorCode::PROTOCOL_ERROR)
    );
}

#[test]
fn an_error_goaway_after_a_drain_goaway_closes_with_its_code_and_a_second_drain_changes_nothing() {
    let mut p = pair();
    let _id = open_accepted(&mut p);
    let drain = |last| {
        Frame::GoAway(GoAway {
            last_stream: StreamId(last),
            code: ErrorCode::NO_ERROR,
            reason: "drain".into(),
        })
    };
    let now = Time::from_millis(0);
    p.server.handle_frame(now, drain(1));
    // A second drain GOAWAY, even with another last stream, is ignored.
    p.server.handle_frame(now, drain(0));
    assert!(!p.server.is_closed());
    p.server.handle_frame(
        now,
        Frame::GoAway(GoAway {
            last_stream: StreamId(0),
            code: ErrorCode::INTERNAL_ERROR,
            reason: "crashed".into(),
        }),
    );
    assert!(p.server.is_closed());
    let events = p.events(Side::Server);
    assert!(
        matches!(
            closed_reason(&events),
            Some(CloseReason::Peer {
                code: ErrorCode::INTERNAL_ERROR,
                ..
            })
        ),
        "{events:?}"
    );
}

#[test]
fn a_goaway_before_the_session_is_open_ends_it_at_once_whatever_its_code() {
    let mut p = Pair::new(config(), config());
    p.server.handle_frame(
        Time::from_millis(0),
        Frame::GoAway(GoAway {
            last_stream: StreamId(7),
            code: ErrorCode::NO_ERROR,
            reason: "never mind".into(),
        }),
    );
    assert!(p.server.is_closed());
}

#[test]
fn version_0_is_reserved_and_no_session_speaks_it() {
    let bad = Config {
        versions: vec![0, 1],
        ..config()
    };
    let e = Session::agent(
        bad,
        tether_proto::testing::test_agent_identity(),
        Time::from_millis(0),
    );
    assert!(matches!(e, Err(ApiError::InvalidConfig(_))), "{e:?}");
}

// ----- the DRAINING notice (SPEC 7.4) -----

#[test]
fn a_draining_notice_goes_out_once_and_the_noticed_end_still_opens_streams_on_it() {
    let mut p = pair();
    assert!(
        p.agent.peer_settings().drain_notice(),
        "tether takes notices"
    );
    assert!(!p.agent.wants_transmit());
    assert!(p.agent.announce_draining().unwrap());
    // A writer that waits for `wants_transmit` is woken for it.
    assert!(p.agent.wants_transmit());
    assert!(p.agent.announce_draining().unwrap(), "again: nothing more");
    assert_eq!(drain_frames(&mut p.agent), vec![Frame::Draining]);
    p.agent.announce_draining().unwrap();
    assert!(drain_frames(&mut p.agent).is_empty(), "once per session");
    p.server.handle_frame(p.now, Frame::Draining);
    assert!(p.server.peer_will_drain());
    assert!(p.server.is_usable(), "a notice is not a drain");
    // The noticed end still dials the agent, and the agent still accepts.
    let id = open_accepted(&mut p);
    assert_eq!(p.server.stream_state(id), Some(StreamState::Open));
    // Then the agent drains for real.
    p.agent.go_away("stopping").unwrap();
    p.run();
    assert!(!p.server.is_usable());
}

#[test]
fn no_draining_notice_goes_to_a_peer_that_did_not_announce_it_nor_after_goaway() {
    // An agent whose HELLO has no DRAIN_NOTICE (another implementation).
    let mut s = Session::server(
        config(),
        tether_proto::testing::test_server_identity(),
        Time::from_millis(0),
    )
    .unwrap();
    s.handle_frame(
        Time::from_millis(0),
        Frame::Hello(Hello {
            versions: vec![1],
            agent_id: "other".into(),
            identifiers: vec![],
            settings: Settings::default(),
            token: None,
        }),
    );
    s.accept_hello(Time::from_millis(0)).unwrap();
    assert!(matches!(&drain_frames(&mut s)[..], [Frame::Welcome(w)] if w.settings.drain_notice()));
    assert!(!s.announce_draining().unwrap());
    assert!(drain_frames(&mut s).is_empty());
    // A peer that takes it, after this end's GOAWAY: nothing either.
    let mut p = pair();
    p.agent.go_away("stopping").unwrap();
    assert!(!p.agent.announce_draining().unwrap());
    assert!(!drain_frames(&mut p.agent).contains(&Frame::Draining));
}

#[test]
fn a_draining_notice_before_the_handshake_or_with_a_payload_is_refused() {
    let mut s = Session::server(
        config(),
        tether_proto::testing::test_server_identity(),
        Time::from_millis(0),
    )
    .unwrap();
    s.handle_frame(Time::from_millis(0), Frame::Draining);
    assert_eq!(
        goaway_code(&drain_frames(&mut s)),
        Some(ErrorCode::PROTOCOL_ERROR)
    );
    let header = Header {
        kind: FrameKind::DRAINING,
        flags: 0,
        stream: StreamId(0),
        len: 1,
    };
    assert!(matches!(
        Frame::decode(header, Bytes::from_static(b"x")),
        Err(DecodeError::Malformed { .. })
    ));
    let bad = Settings {
        drain_notice: Some(2),
        ..Settings::default()
    };
    assert!(bad.validate().is_err());
}
