//! The receive buffer, `recv`, and the drop policy (`abandon`) that live in the core
//! (SPEC 5.6, 6.3, 7.2, 10), through the in-memory pair and by feeding exact frames.

use bytes::Bytes;
use tether_proto::frame::*;
use tether_proto::testing::{Pair, Side};
use tether_proto::{ApiError, Config, Event, Initiator, Session, StreamState, Time};

fn config(window: u32) -> Config {
    Config {
        keepalive_interval_ms: 0,
        initial_window: window,
        ..Config::default()
    }
}

fn open_accepted(p: &mut Pair) -> StreamId {
    let id = p.server.open(Protocol::TCP, "10.0.0.1", 80).unwrap();
    p.run();
    p.events(Side::Agent);
    p.agent.accept(id).unwrap();
    p.run();
    p.events(Side::Server);
    id
}

fn frames(s: &mut Session) -> Vec<Frame> {
    core::iter::from_fn(|| s.poll_frame()).collect()
}

fn resets(frames: &[Frame]) -> Vec<(StreamId, ErrorCode)> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Reset(r) => Some((r.stream, r.code)),
            _ => None,
        })
        .collect()
}

fn data(stream: StreamId, fin: bool, payload: &[u8]) -> Frame {
    Frame::Data(Data {
        stream,
        fin,
        payload: Bytes::copy_from_slice(payload),
    })
}

#[test]
fn readable_is_queued_once_until_recv_is_called() {
    let mut p = Pair::established(config(1000), config(1000));
    let id = open_accepted(&mut p);
    for _ in 0..3 {
        p.server.send(id, Bytes::from_static(b"abc")).unwrap();
        p.run();
    }
    assert_eq!(p.events(Side::Agent), vec![Event::Readable { stream: id }]);
    assert_eq!(p.agent.buffered(id), 9);
    assert_eq!(p.agent.recv(id, 4).unwrap().unwrap(), &b"abca"[..]);
    assert_eq!(p.agent.recv(id, 100).unwrap().unwrap(), &b"bcabc"[..]);
    assert_eq!(p.agent.recv(id, 100), Err(ApiError::WouldBlock));
    assert_eq!(p.agent.unreleased(id), 9, "read bytes wait for release");
    p.server.send(id, Bytes::from_static(b"d")).unwrap();
    p.run();
    assert_eq!(
        p.events(Side::Agent),
        vec![Event::Readable { stream: id }],
        "a recv that found nothing re-arms the event"
    );
}

#[test]
fn a_fin_reaches_recv_after_every_buffered_byte() {
    let mut p = Pair::established(config(1000), config(1000));
    let id = open_accepted(&mut p);
    p.server.send(id, Bytes::from_static(b"last")).unwrap();
    p.server.finish(id).unwrap();
    p.run();
    assert_eq!(p.events(Side::Agent), vec![Event::Readable { stream: id }]);
    assert_eq!(
        p.agent.stream_state(id),
        Some(StreamState::HalfClosedRemote)
    );
    assert_eq!(p.agent.recv(id, 100).unwrap().unwrap(), &b"last"[..]);
    assert_eq!(p.agent.recv(id, 100), Ok(None));
    assert_eq!(
        p.agent.recv(id, 100),
        Ok(None),
        "the end reads as the end again"
    );
    assert_eq!(p.agent.recv(id, 0), Err(ApiError::ZeroLength));
}

#[test]
fn one_byte_frames_are_coalesced_so_memory_follows_the_window() {
    let window = 64 * 1024;
    let mut p = Pair::established(config(window), config(window));
    let id = open_accepted(&mut p);
    // A hostile server end: 64 Ki frames of one byte each, never read by the agent.
    for i in 0..window {
        p.agent
            .handle_frame(p.now, data(id, false, &[u8::try_from(i % 251).unwrap()]));
        // check_invariants bounds the receive buffer at O(window / 1 KiB) slices.
        if i % 4096 == 0 {
            assert_eq!(p.agent.check_invariants(), Ok(()));
        }
    }
    assert!(p.agent.is_established());
    assert_eq!(p.agent.buffered(id), window);
    let first = p.agent.recv(id, usize::MAX).unwrap().unwrap();
    assert_eq!(
        first.len(),
        window as usize,
        "the 1-byte payloads were kept as one slice"
    );
    assert!(
        first
            .iter()
            .enumerate()
            .all(|(i, b)| *b == u8::try_from(i % 251).unwrap())
    );
    // One byte more than the window is still an overrun.
    p.agent.handle_frame(p.now, data(id, false, &[0]));
    assert_eq!(
        p.agent.close_reason().map(|r| r.code()),
        Some(ErrorCode::FLOW_CONTROL_ERROR)
    );
}

#[test]
fn large_payloads_stay_slices_between_small_ones_in_order() {
    let mut p = Pair::established(config(100_000), config(100_000));
    let id = open_accepted(&mut p);
    let big = Bytes::from(vec![7u8; 4000]);
    p.agent.handle_frame(p.now, data(id, false, b"ab"));
    p.agent.handle_frame(
        p.now,
        Frame::Data(Data {
            stream: id,
            fin: false,
            payload: big.clone(),
        }),
    );
    p.agent.handle_frame(p.now, data(id, true, b"cd"));
    assert_eq!(p.agent.recv(id, usize::MAX).unwrap().unwrap(), &b"ab"[..]);
    let got = p.agent.recv(id, usize::MAX).unwrap().unwrap();
    assert_eq!(got.as_ptr(), big.as_ptr(), "a large payload is not copied");
    assert_eq!(p.agent.recv(id, usize::MAX).unwrap().unwrap(), &b"cd"[..]);
    assert_eq!(p.agent.recv(id, usize::MAX), Ok(None));
}

#[test]
fn a_peer_reset_is_reported_by_recv_and_send_until_the_stream_is_abandoned() {
    let mut p = Pair::established(config(1000), config(1000));
    let id = open_accepted(&mut p);
    p.server.send(id, Bytes::from_static(b"unread")).unwrap();
    p.run();
    p.server
        .reset(id, ErrorCode::ABORTED, "socket failed")
        .unwrap();
    p.run();
    let events = p.events(Side::Agent);
    assert!(
        matches!(&events[..], [Event::Reset { stream, error }] if *stream == id && error.code == ErrorCode::ABORTED),
        "the Readable of the unread bytes is dropped with them: {events:?}"
    );
    let Err(ApiError::Stream(e)) = p.agent.recv(id, 10) else {
        panic!("recv reports the reset");
    };
    assert_eq!((e.code, e.by), (ErrorCode::ABORTED, Initiator::Peer));
    assert_eq!(
        p.agent.send(id, Bytes::from_static(b"x")),
        Err(ApiError::Stream(e))
    );
    assert_eq!(
        p.agent.stream_count(),
        0,
        "a failed stream no longer counts"
    );
    assert_eq!(p.agent.buffered(id), 0, "its unread bytes were freed");
    // The server end reset it itself: its reads say so too.
    assert!(matches!(
        p.server.recv(id, 10),
        Err(ApiError::Stream(e)) if e.by == Initiator::Local && e.code == ErrorCode::ABORTED
    ));
    p.agent.abandon(id).unwrap();
    p.server.abandon(id).unwrap();
    assert_eq!(
        p.agent.stream_ids().count() + p.server.stream_ids().count(),
        0
    );
    assert_eq!(p.agent.recv(id, 10), Err(ApiError::UnknownStream));
}

#[test]
fn abandoning_an_open_stream_resets_it_with_cancel() {
    let mut p = Pair::established(config(1000), config(1000));
    p.record = true;
    let id = open_accepted(&mut p);
    p.agent.abandon(id).unwrap();
    assert_eq!(p.agent.stream_state(id), Some(StreamState::Resetting));
    p.run();
    assert_eq!(resets(&p.sent.1), vec![(id, ErrorCode::CANCEL)]);
    assert_eq!(p.agent.stream_state(id), None, "gone once the RESET is out");
    let events = p.events(Side::Server);
    assert!(
        matches!(&events[..], [Event::Reset { error, .. }] if error.code == ErrorCode::CANCEL),
        "{events:?}"
    );
    assert!(
        p.events(Side::Agent).is_empty(),
        "no event for a stream let go of"
    );
}

#[test]
fn abandoning_after_both_halves_finished_lets_the_last_bytes_and_fin_go_out() {
    let mut p = Pair::established(config(1000), config(1000));
    p.record = true;
    let id = open_accepted(&mut p);
    p.agent.finish(id).unwrap();
    p.run();
    // The server has its peer's FIN (unread) and queues its own last bytes and FIN.
    p.server.send(id, Bytes::from_static(b"bye")).unwrap();
    p.server.finish(id).unwrap();
    p.server.abandon(id).unwrap();
    p.run();
    assert!(resets(&p.sent.0).is_empty(), "nothing is reset");
    assert_eq!(p.server.stream_state(id), None);
    p.events(Side::Agent);
    let mut got = Vec::new();
    while let Ok(Some(b)) = p.agent.recv(id, 100) {
        got.extend_from_slice(&b);
    }
    assert_eq!(got, b"bye");
    assert_eq!(p.agent.stream_state(id), Some(StreamState::Closed));
}

#[test]
fn abandoning_with_only_this_end_finished_resets_it() {
    let mut p = Pair::established(config(1000), config(1000));
    p.record = true;
    let id = open_accepted(&mut p);
    p.server.finish(id).unwrap();
    p.run();
    p.server.abandon(id).unwrap();
    p.run();
    assert_eq!(resets(&p.sent.0), vec![(id, ErrorCode::CANCEL)]);
}

#[test]
fn abandoning_a_pending_dial_rejects_it_and_frees_its_place() {
    let server = Config {
        max_concurrent_streams: 1,
        ..config(1000)
    };
    let agent = Config {
        max_concurrent_streams: 1,
        ..config(1000)
    };
    let mut p = Pair::established(server, agent);
    p.record = true;
    let id = p.server.open(Protocol::TCP, "10.0.0.1", 80).unwrap();
    p.run();
    assert!(matches!(
        &p.events(Side::Agent)[..],
        [Event::DialRequested { .. }]
    ));
    // The application that got the dial walks away without deciding.
    p.agent.abandon(id).unwrap();
    p.run();
    assert_eq!(resets(&p.sent.1), vec![(id, ErrorCode::CANCEL)]);
    assert!(matches!(
        &p.events(Side::Server)[..],
        [Event::DialFailed { error, .. }] if error.code == ErrorCode::CANCEL
    ));
    assert_eq!(p.agent.stream_count(), 0);
    p.server.abandon(id).unwrap();
    // The limit of one is free again.
    let again = p.server.open(Protocol::TCP, "10.0.0.1", 80).unwrap();
    p.run();
    assert!(
        matches!(&p.events(Side::Agent)[..], [Event::DialRequested { stream, .. }] if *stream == again)
    );
}

#[test]
fn abandoning_a_dial_not_yet_sent_puts_nothing_on_the_wire() {
    let mut p = Pair::established(config(1000), config(1000));
    p.record = true;
    let id = p.server.open(Protocol::TCP, "10.0.0.1", 80).unwrap();
    p.server.abandon(id).unwrap();
    p.run();
    assert!(p.sent.0.is_empty());
    assert_eq!(p.server.stream_state(id), None);
}

#[test]
fn after_the_tunnel_drops_every_held_stream_reports_it_until_abandoned() {
    let mut p = Pair::established(config(1000), config(1000));
    let id = open_accepted(&mut p);
    p.drop_tunnel();
    let Err(ApiError::Stream(e)) = p.server.recv(id, 10) else {
        panic!("recv reports the lost tunnel");
    };
    assert!(e.session_closed && e.code == ErrorCode::CONNECTION_LOST);
    assert_eq!(p.server.abandon(id), Ok(()));
    assert_eq!(p.server.stream_ids().count(), 0);
}

#[test]
fn a_frame_handed_over_the_inbound_limit_is_refused_as_the_decoder_would() {
    let mut p = Pair::established(config(1000), config(1000));
    let id = open_accepted(&mut p);
    let limit = p.agent.max_inbound_payload() as usize;
    p.agent.handle_frame(
        p.now,
        Frame::Data(Data {
            stream: id,
            fin: false,
            payload: Bytes::from(vec![0u8; limit + 1]),
        }),
    );
    assert_eq!(
        p.agent.close_reason().map(|r| r.code()),
        Some(ErrorCode::FRAME_TOO_LARGE)
    );
}

#[test]
fn an_agent_whose_welcome_never_comes_sends_goaway_handshake_timeout() {
    let mut s = Session::agent(
        config(1000),
        tether_proto::testing::test_agent_identity(),
        Time::from_millis(0),
    )
    .unwrap();
    assert!(matches!(&frames(&mut s)[..], [Frame::Hello(_)]));
    assert_eq!(s.poll_timeout(), Some(Time::from_millis(10_000)));
    s.handle_timeout(Time::from_millis(9_999));
    assert!(!s.is_closed(), "not before the deadline");
    s.handle_timeout(Time::from_millis(10_000));
    assert!(matches!(
        &frames(&mut s)[..],
        [Frame::GoAway(g)] if g.code == ErrorCode::HANDSHAKE_TIMEOUT
    ));
    assert!(s.is_finished());
}

#[test]
fn no_event_follows_an_abandon_even_one_queued_before_it() {
    let mut p = Pair::established(config(1000), config(1000));
    let id = open_accepted(&mut p);
    p.server.reset(id, ErrorCode::ABORTED, "gone").unwrap();
    p.run();
    // The Reset event is queued at the agent; its application lets go before looking.
    assert_eq!(p.agent.pending_events(), 1);
    p.agent.abandon(id).unwrap();
    assert!(p.events(Side::Agent).is_empty());
    assert_eq!(p.agent.stream_ids().count(), 0);
}

#[test]
fn a_stream_abandoned_while_its_fin_waits_gets_no_event_when_it_fails() {
    let mut p = Pair::established(config(1000), config(1000));
    let id = open_accepted(&mut p);
    p.agent.finish(id).unwrap();
    p.run();
    p.events(Side::Server);
    // Both halves finished at the server; its FIN is queued, not yet sent.
    p.server.finish(id).unwrap();
    p.server.abandon(id).unwrap();
    p.server.handle_frame(
        p.now,
        Frame::Reset(Reset {
            stream: id,
            code: ErrorCode::ABORTED,
            reason: "late".into(),
        }),
    );
    assert!(p.events(Side::Server).is_empty());
    assert_eq!(p.server.stream_ids().count(), 0);
}

#[test]
fn a_rejected_dial_the_application_lets_go_of_leaves_the_table_once_its_reset_is_out() {
    let mut p = Pair::established(config(1000), config(1000));
    for _ in 0..50 {
        let id = p.agent.open(Protocol::TCP, "svc", 443).unwrap();
        p.run();
        assert!(matches!(
            &p.events(Side::Server)[..],
            [Event::DialRequested { .. }]
        ));
        p.server
            .reject(id, ErrorCode::DIAL_FORBIDDEN, "no")
            .unwrap();
        p.server.abandon(id).unwrap();
        p.run();
        assert!(matches!(
            &p.events(Side::Agent)[..],
            [Event::DialFailed { error, .. }] if error.code == ErrorCode::DIAL_FORBIDDEN
        ));
        p.agent.abandon(id).unwrap();
    }
    assert_eq!(p.server.stream_ids().count(), 0, "no refused dial is held");
    assert_eq!(p.agent.stream_ids().count(), 0);
}

#[test]
fn the_keepalive_timer_sends_no_second_ping_while_the_applications_is_unanswered() {
    let cfg = Config {
        keepalive_interval_ms: 1000,
        keepalive_timeout_ms: 5000,
        ..config(1000)
    };
    let mut p = Pair::established(cfg.clone(), cfg);
    p.record = true;
    p.stall(Side::Agent, true);
    p.server.ping(p.now).unwrap();
    p.advance(1000);
    p.run();
    let pings = p
        .sent
        .0
        .iter()
        .filter(|f| matches!(f, Frame::Ping(ping) if !ping.ack))
        .count();
    assert_eq!(pings, 1, "one PING outstanding at a time (SPEC 7.3)");
    p.stall(Side::Agent, false);
    p.run();
    assert!(
        p.events(Side::Server)
            .iter()
            .any(|e| matches!(e, Event::PingAnswered { .. })),
        "the application's PING is still answered"
    );
}

#[test]
fn a_tunnel_lost_after_both_fins_crossed_leaves_the_unread_bytes_readable() {
    let mut p = Pair::established(config(1000), config(1000));
    let id = open_accepted(&mut p);
    p.agent.send(id, Bytes::from_static(b"all of it")).unwrap();
    p.agent.finish(id).unwrap();
    p.server.finish(id).unwrap();
    p.run();
    // Everything crossed; the server's application has not read yet when the tunnel goes.
    p.drop_tunnel();
    let events = p.events(Side::Server);
    assert!(
        !events.iter().any(|e| matches!(e, Event::Reset { .. })),
        "a complete stream does not fail: {events:?}"
    );
    assert_eq!(p.server.stream_state(id), Some(StreamState::Closed));
    assert_eq!(p.server.recv(id, 3).unwrap().unwrap(), &b"all"[..]);
    assert_eq!(p.server.recv(id, 100).unwrap().unwrap(), &b" of it"[..]);
    assert_eq!(p.server.recv(id, 100), Ok(None));
}

#[test]
fn a_tunnel_lost_before_this_ends_fin_went_out_fails_the_stream() {
    let mut p = Pair::established(config(1000), config(1000));
    let id = open_accepted(&mut p);
    p.agent.send(id, Bytes::from_static(b"partial")).unwrap();
    p.agent.finish(id).unwrap();
    p.run();
    p.drop_tunnel();
    assert!(matches!(
        p.server.recv(id, 100),
        Err(ApiError::Stream(e)) if e.code == ErrorCode::CONNECTION_LOST
    ));
}
