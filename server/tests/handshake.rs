//! The handshake deadline over real TLS (SPEC 4.4): one budget per tunnel, the session's own
//! timer, and a GOAWAY HANDSHAKE_TIMEOUT from whichever end gives up, once TLS is up.

mod common;

use std::sync::Arc;

use bytes::BytesMut;
use common::*;
use rustls_pki_types::ServerName;
use tether_agent::Agent;
use tether_proto::{ErrorCode, Frame, FrameCodec};
use tether_server::Server;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, TcpStream};

/// Everything the peer sends until it closes, decoded.
async fn frames_until_eof<S: AsyncRead + Unpin>(s: &mut S) -> Vec<Frame> {
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .expect("the peer closes on its own")
        .expect("a clean close after the GOAWAY");
    let mut codec = FrameCodec::with_max_payload(16_384);
    let mut buf = BytesMut::from(&raw[..]);
    let mut out = Vec::new();
    while let Some(f) = codec.decode(&mut buf).expect("well-formed frames") {
        out.push(f);
    }
    out
}

fn short_handshake() -> tether_proto::Config {
    tether_proto::Config {
        handshake_timeout_ms: 300,
        ..session(0)
    }
}

#[tokio::test]
async fn a_silent_agent_gets_goaway_handshake_timeout_from_the_server() {
    let pki = Pki::new();
    let mut cfg = server_config(&pki);
    cfg.session = short_handshake();
    let server = Server::start(cfg).await.unwrap();
    let tls = tether::tls::client_config(
        pki.ca_pem(),
        Some((pki.agent.cert.as_bytes(), pki.agent.key.as_bytes())),
    )
    .unwrap();
    let tcp = TcpStream::connect(server.agent_addr).await.unwrap();
    let mut s = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    // TLS is up; the agent never says HELLO.
    let frames = frames_until_eof(&mut s).await;
    assert!(
        matches!(&frames[..], [Frame::GoAway(g)] if g.code == ErrorCode::HANDSHAKE_TIMEOUT),
        "{frames:?}"
    );
    assert_eq!(server.agents(), 0);
    drop(s);
    at_rest(&server, &[]).await;
}

#[tokio::test]
async fn a_server_that_never_welcomes_gets_goaway_handshake_timeout_from_the_agent() {
    let pki = Pki::new();
    let tls = tether::tls::server_config(
        pki.server.cert.as_bytes(),
        pki.server.key.as_bytes(),
        Some(pki.ca_pem()),
    )
    .unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let mut acfg = agent_config(&pki, addr, "agent-1");
    acfg.session = short_handshake();
    acfg.sync_interval = std::time::Duration::from_secs(60);
    acfg.sync_interval_cap = std::time::Duration::from_secs(60);
    let _agent = Agent::start(acfg);
    let (tcp, _) = tokio::time::timeout(WAIT, l.accept())
        .await
        .unwrap()
        .unwrap();
    let mut s = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls))
        .accept(tcp)
        .await
        .unwrap();
    // A server that reads HELLO and answers nothing.
    let frames = frames_until_eof(&mut s).await;
    assert!(
        matches!(
            &frames[..],
            [Frame::Hello(_), Frame::GoAway(g)] if g.code == ErrorCode::HANDSHAKE_TIMEOUT
        ),
        "{frames:?}"
    );
}

#[tokio::test]
async fn a_client_that_never_finishes_tls_is_dropped_at_the_same_deadline() {
    let pki = Pki::new();
    let mut cfg = server_config(&pki);
    cfg.session = short_handshake();
    let server = Server::start(cfg).await.unwrap();
    // Plain TCP, no TLS ClientHello: nothing can be said back, the connection just ends.
    let mut tcp = TcpStream::connect(server.agent_addr).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(WAIT, tcp.read_to_end(&mut got))
        .await
        .expect("the server closes the connection by itself");
    assert!(got.is_empty(), "{read:?} {got:?}");
    assert!(
        server
            .core()
            .render_metrics()
            .contains("tether_agents_refused_total{reason=\"timeout\"} 1"),
        "{}",
        server.core().render_metrics()
    );
    drop(tcp);
    at_rest(&server, &[]).await;
}
