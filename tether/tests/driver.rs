//! The tunnel driver over an in-memory transport: two `Tunnel`s joined by `tokio::io::duplex`,
//! no TLS, so each test is about the driver alone. Every wait is bounded.

use std::time::{Duration, Instant};

use tether::testing::{tunnel_config as config, tunnel_pair as pair, tunnel_stream as connected};
use tether::tunnel::{Handshake, Start, Tunnel};
use tether_proto::testing::{test_agent_identity, test_server_identity};
use tether_proto::{CloseReason, Config, ErrorCode, Session, Time};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_dial_accepted_through_the_driver_carries_bytes_both_ways_with_half_close() {
    let (server, _agent, mut dials) = pair().await;
    let (mut near, mut far) = connected(&server, &mut dials).await;
    far.write_all(b"ping").await.unwrap();
    far.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, near.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"ping");
    near.write_all(b"pong").await.unwrap();
    near.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, far.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"pong");
}

#[tokio::test]
async fn an_unanswered_dial_that_is_dropped_is_rejected_with_cancel() {
    let (server, _agent, mut dials) = pair().await;
    let dialing = tokio::spawn(async move { server.dial("dest", 80, WAIT).await });
    let incoming = tokio::time::timeout(WAIT, dials.recv())
        .await
        .unwrap()
        .unwrap();
    drop(incoming);
    match tokio::time::timeout(WAIT, dialing).await.unwrap().unwrap() {
        Err(tether::DialError::Failed(e)) => assert_eq!(e.code, ErrorCode::CANCEL),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn a_drain_completed_by_a_read_closes_the_tunnel() {
    let (server, agent, mut dials) = pair().await;
    let (mut near, mut far) = connected(&server, &mut dials).await;
    // Both ends finish their direction and drain; the last step is the server reading the
    // agent's FIN, which completes the drain at the server end.
    near.shutdown().await.unwrap();
    far.shutdown().await.unwrap();
    agent.go_away("drain");
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, near.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(WAIT, far.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, server.closed()).await.unwrap(),
        CloseReason::Drained
    );
    assert_eq!(
        tokio::time::timeout(WAIT, agent.closed()).await.unwrap(),
        CloseReason::Drained
    );
}

#[tokio::test]
async fn dials_to_an_end_that_takes_none_are_refused_and_leave_nothing_held() {
    let (server, agent, _dials) = pair().await;
    for _ in 0..50 {
        match agent.dial("anything", 1, WAIT).await {
            Err(tether::DialError::Failed(e)) => assert_eq!(e.code, ErrorCode::DIAL_FORBIDDEN),
            other => panic!("{:?}", other.map(|_| ())),
        }
    }
    assert_eq!(server.streams_held(), 0, "a refused dial is not kept");
    assert_eq!(agent.streams_held(), 0);
}

#[tokio::test]
async fn a_reader_parked_on_a_stream_wakes_when_its_own_end_resets_it() {
    let (server, _agent, mut dials) = pair().await;
    let (_near, far) = connected(&server, &mut dials).await;
    let (mut rx, tx) = far.into_split();
    let reader = tokio::spawn(async move { rx.recv_chunk().await });
    // Let the reader park on the empty stream, then reset from this end: no event comes.
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    tx.reset(ErrorCode::CANCEL, "done here");
    let read = tokio::time::timeout(WAIT, reader)
        .await
        .expect("the parked reader was woken")
        .unwrap();
    assert!(read.is_err(), "{read:?}");
}

#[tokio::test]
async fn a_reader_slower_than_the_peers_drain_still_reads_every_byte_and_a_clean_end() {
    let (server, agent, mut dials) = pair().await;
    let (mut near, mut far) = connected(&server, &mut dials).await;
    // The agent's application answers and finishes; the server's application has finished
    // too, and reads; then the server drains. The agent's application has not read yet.
    near.write_all(b"answer").await.unwrap();
    near.shutdown().await.unwrap();
    far.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, far.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"answer");
    server.go_away("restart");
    // The server's drain completes without waiting for the agent's reader, and closes the
    // transport; the agent's unread stream was complete, so nothing is lost.
    tokio::time::timeout(WAIT, server.closed()).await.unwrap();
    tokio::time::timeout(WAIT, agent.closed()).await.unwrap();
    let mut rest = Vec::new();
    let read = near.read_to_end(&mut rest).await;
    assert!(read.is_ok(), "a clean end, not an error: {read:?}");
}

#[tokio::test]
async fn a_peer_that_neither_reads_nor_sends_is_found_dead_while_a_write_waits_on_it() {
    let (a, mut b) = tokio::io::duplex(64 * 1024);
    let cfg = Config {
        keepalive_interval_ms: 100,
        keepalive_timeout_ms: 300,
        ..config()
    };
    let session = Session::server(cfg, test_server_identity(), Time::from_millis(0)).unwrap();
    let (server, handshaking) = Tunnel::spawn(
        a,
        session,
        Start {
            incoming: None,
            policy: None,
            epoch: Instant::now(),
            label: "server".into(),
            stats: None,
            linger: tether::pump::LINGER,
        },
    );
    // A hand-driven agent: HELLO, WELCOME, accept the one dial, then silence both ways.
    let mut agent = Session::agent(config(), test_agent_identity(), Time::from_millis(0)).unwrap();
    let now = Time::from_millis(0);
    let mut wire = bytes::BytesMut::new();
    agent.poll_transmit(&mut wire);
    b.write_all(&wire).await.unwrap();
    let dialing = {
        let server = server.clone();
        tokio::spawn(async move {
            assert!(matches!(handshaking.done().await, Ok(Handshake::Hello(_))));
            server.dial("dest", 80, WAIT).await
        })
    };
    let mut inbound = bytes::BytesMut::new();
    let mut accepted = false;
    for _ in 0..100 {
        if accepted {
            break;
        }
        tokio::time::timeout(WAIT, b.read_buf(&mut inbound))
            .await
            .unwrap()
            .unwrap();
        agent.handle_bytes(now, &mut inbound);
        while let Some(e) = agent.poll_event() {
            if let tether_proto::Event::DialRequested { stream, .. } = e {
                agent.accept(stream).unwrap();
                accepted = true;
            }
        }
    }
    assert!(accepted, "the dial arrived");
    wire.clear();
    agent.poll_transmit(&mut wire);
    b.write_all(&wire).await.unwrap();
    let mut stream = dialing.await.unwrap().unwrap();
    // More than the in-memory pipe holds (but within the window): the writer blocks on it.
    stream
        .send_bytes(bytes::Bytes::from(vec![7u8; 200 * 1024]))
        .await
        .unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, server.closed())
            .await
            .expect("the keepalive deadline fired while the write was blocked"),
        CloseReason::KeepaliveTimeout
    );
    drop(b);
}
