//! Agents and tunnels over real loopback sockets and real TLS.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use tether_agent::Agent;
use tether_proto::frame::Identifier;
use tether_server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_streams_arrive_whole_and_in_order() {
    let pki = Pki::new();
    let (server, agent) = server_and_agent(&pki).await;
    let backend = echo_backend().await;
    let frontend = server.connect_addr.unwrap();
    let mut tasks = Vec::new();
    for n in 0..200usize {
        tasks.push(tokio::spawn(async move {
            let data = pattern(n as u64, 20_000 + (n * 997) % 40_000);
            let (status, head, s) = connect_tcp(frontend, &backend.to_string()).await;
            assert_eq!(status, 200, "{head}");
            let (mut r, mut w) = s.into_split();
            let send = data.clone();
            let writer = tokio::spawn(async move {
                w.write_all(&send).await.unwrap();
                w.shutdown().await.unwrap();
            });
            let mut got = Vec::new();
            tokio::time::timeout(WAIT, r.read_to_end(&mut got))
                .await
                .unwrap()
                .unwrap();
            writer.await.unwrap();
            assert_eq!(got.len(), data.len(), "stream {n}: length");
            assert!(got == data, "stream {n}: bytes differ");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    at_rest(&server, &[&agent]).await;
}

#[tokio::test]
async fn a_silently_dead_agent_fails_its_streams_within_the_keepalive_deadline_and_leaves_no_state()
{
    let pki = Pki::new();
    let mut cfg = server_config(&pki);
    cfg.session = session(100);
    let server = Server::start(cfg).await.unwrap();
    let fwd = forwarder(server.agent_addr).await;
    let mut acfg = agent_config(&pki, fwd.addr, "agent-1");
    acfg.session = session(100);
    acfg.sync_interval = Duration::from_secs(60);
    acfg.sync_interval_cap = Duration::from_secs(60);
    let agent = Agent::start(acfg);
    assert!(server.wait_agents(1, WAIT).await);
    let backend = echo_backend().await;
    let (status, _, mut s) = connect_tcp(server.connect_addr.unwrap(), &backend.to_string()).await;
    assert_eq!(status, 200);
    s.write_all(b"before").await.unwrap();
    let mut got = [0u8; 6];
    s.read_exact(&mut got).await.unwrap();
    let tunnel = server.core().registry.tunnels().pop().expect("one tunnel");
    // The agent goes silent mid-transfer: no FIN, no RST, nothing.
    fwd.frozen.store(true, Ordering::SeqCst);
    s.write_all(b"lost in the void").await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(
        read.is_err(),
        "the client sees an error, not a clean end: {read:?}"
    );
    // It was the keepalive deadline that found the dead agent (not some other close).
    assert_eq!(
        tokio::time::timeout(WAIT, tunnel.closed()).await.unwrap(),
        tether_proto::CloseReason::KeepaliveTimeout
    );
    assert!(
        server.wait_agents_at_most(0, WAIT).await,
        "the server forgot the agent"
    );
    drop(s);
    at_rest(&server, &[&agent]).await;
}

#[tokio::test]
async fn an_agent_with_the_wrong_ca_or_no_client_certificate_gets_no_session() {
    let pki = Pki::new();
    let server = Server::start(server_config(&pki)).await.unwrap();
    // No client certificate.
    let mut cfg = agent_config(&pki, server.agent_addr, "no-cert");
    cfg.tls = tether::tls::client_config(pki.ca_pem(), None)
        .unwrap()
        .into();
    let a = Agent::start(cfg);
    // A certificate from another CA.
    let other = tether::tls::testpki::Ca::new("someone else");
    let rogue = other.leaf("rogue", &["rogue"]);
    let mut cfg = agent_config(&pki, server.agent_addr, "rogue");
    cfg.tls = tether::tls::client_config(
        pki.ca_pem(),
        Some((rogue.cert.as_bytes(), rogue.key.as_bytes())),
    )
    .unwrap()
    .into();
    let b = Agent::start(cfg);
    assert!(
        !server.wait_agents(1, Duration::from_millis(800)).await,
        "no agent registered"
    );
    assert!(
        server
            .core()
            .render_metrics()
            .contains("tether_agents_refused_total{reason=\"tls\"}"),
        "refusals are counted"
    );
    at_rest(&server, &[&a, &b]).await;
}

#[tokio::test]
async fn a_bad_token_is_refused_and_a_good_one_accepted() {
    let pki = Pki::new();
    let mut cfg = server_config(&pki);
    cfg.tokens = Some(tether_server::Tokens::new([("s3cret".into(), "good".into())]).into());
    let server = Server::start(cfg).await.unwrap();
    let dir = std::env::temp_dir().join(format!("tether-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad");
    std::fs::write(&bad, "wrong\n").unwrap();
    let mut cfg = agent_config(&pki, server.agent_addr, "bad");
    cfg.token_path = Some(bad);
    let bad = Agent::start(cfg);
    assert!(!server.wait_agents(1, Duration::from_millis(500)).await);
    let good = dir.join("good");
    std::fs::write(&good, "s3cret\n").unwrap();
    let mut cfg = agent_config(&pki, server.agent_addr, "good");
    cfg.token_path = Some(good);
    let good = Agent::start(cfg);
    assert!(server.wait_agents(1, WAIT).await);
    assert_eq!(server.core().registry.agent_ids(), vec!["good".to_owned()]);
    let _ = std::fs::remove_dir_all(dir);
    at_rest(&server, &[&bad, &good]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_does_not_stop_a_large_transfer_on_another_stream() {
    let pki = Pki::new();
    let (server, agent) = server_and_agent(&pki).await;
    // A backend that sends a lot and never reads, and one that sinks everything it gets.
    let source = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let source_addr = source.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = source.accept().await.unwrap();
        let chunk = vec![1u8; 64 * 1024];
        while s.write_all(&chunk).await.is_ok() {}
    });
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = sink.accept().await.unwrap();
        let mut n = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k as u64,
            }
        }
        s.write_all(n.to_string().as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
    });
    // The stalled stream: its client never reads.
    let (status, _, stalled) =
        connect_tcp(server.connect_addr.unwrap(), &source_addr.to_string()).await;
    assert_eq!(status, 200);
    let (status, _, mut busy) =
        connect_tcp(server.connect_addr.unwrap(), &sink_addr.to_string()).await;
    assert_eq!(status, 200);
    let total = 64 * 1024 * 1024u64;
    let chunk = vec![2u8; 256 * 1024];
    let upload = async {
        for _ in 0..total / chunk.len() as u64 {
            busy.write_all(&chunk).await.unwrap();
        }
        busy.shutdown().await.unwrap();
        read_to_end(&mut busy).await.unwrap()
    };
    let reply = tokio::time::timeout(Duration::from_secs(60), upload)
        .await
        .expect("the transfer finished");
    assert_eq!(String::from_utf8(reply).unwrap(), total.to_string());
    drop(stalled);
    drop(busy);
    at_rest(&server, &[&agent]).await;
}

#[tokio::test]
async fn dest_host_routing_sends_each_destination_to_the_agent_that_serves_it() {
    let pki = Pki::new();
    let mut cfg = server_config(&pki);
    cfg.strategies = vec![tether_server::Strategy::DestHost];
    let server = Server::start(cfg).await.unwrap();
    // Each agent answers with its own name, whatever the destination port.
    let mut agents = Vec::new();
    let mut backends = Vec::new();
    for (name, ip) in [("node-a", "127.0.0.1"), ("node-b", "127.0.0.2")] {
        let l = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let _ = s.write_all(name.as_bytes()).await;
                let _ = s.shutdown().await;
            }
        });
        let mut acfg = agent_config(&pki, server.agent_addr, name);
        acfg.identifiers = vec![
            Identifier::Host(name.into()),
            Identifier::Ipv4(ip.parse().unwrap()),
        ];
        agents.push(Agent::start(acfg));
        backends.push((name, ip, port));
    }
    assert!(server.wait_agents(2, WAIT).await);
    for (name, ip, port) in &backends {
        for _ in 0..3 {
            let (status, head, mut s) =
                connect_tcp(server.connect_addr.unwrap(), &format!("{ip}:{port}")).await;
            assert_eq!(status, 200, "{head}");
            assert_eq!(read_to_end(&mut s).await.unwrap(), name.as_bytes());
        }
    }
    // No agent claims this one, and there is no fallback strategy: 503.
    let (status, _, _) = connect_tcp(server.connect_addr.unwrap(), "127.0.0.3:1").await;
    assert_eq!(status, 503);
    at_rest(&server, &agents.iter().collect::<Vec<_>>()).await;
}

#[tokio::test]
async fn the_agent_reconnects_after_a_server_restart() {
    let pki = Pki::new();
    let mut cfg = server_config(&pki);
    let server = Server::start(cfg.clone()).await.unwrap();
    let addr = server.agent_addr;
    let agent = Agent::start(agent_config(&pki, addr, "agent-1"));
    assert!(server.wait_agents(1, WAIT).await);
    server.shutdown(Duration::from_millis(500)).await;
    // The same port, a new server: shutdown returns once the listeners are closed.
    cfg.agent_addr = addr;
    let server = Server::start(cfg).await.expect("the port is free again");
    assert!(server.wait_agents(1, WAIT).await, "the agent came back");
    let backend = echo_backend().await;
    let (status, _, _) = connect_tcp(server.connect_addr.unwrap(), &backend.to_string()).await;
    assert_eq!(status, 200);
    at_rest(&server, &[&agent]).await;
}

#[tokio::test]
async fn the_library_dial_api_gives_an_async_stream_with_half_close() {
    let pki = Pki::new();
    let (server, agent) = server_and_agent(&pki).await;
    let backend = echo_backend().await;
    let mut s = server.dial("127.0.0.1", backend.port()).await.unwrap();
    s.write_all(b"embedded").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"embedded");
    // A refused destination is a typed error, not a stream.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    match server.dial("127.0.0.1", closed.port()).await {
        Err(tether::DialError::Failed(e)) => {
            assert_eq!(e.code, tether_proto::ErrorCode::DIAL_REFUSED)
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    drop(s);
    at_rest(&server, &[&agent]).await;
}

#[tokio::test]
async fn an_agent_given_every_servers_address_holds_one_tunnel_to_each_and_opens_no_duplicates() {
    let pki = Pki::new();
    let config = |id: &str| tether_server::ServerConfig {
        server_id: id.into(),
        server_count: 2,
        max_tunnels_per_agent: 2,
        ..server_config(&pki)
    };
    let s1 = Server::start(config("server-1")).await.unwrap();
    let s2 = Server::start(config("server-2")).await.unwrap();
    let metrics = std::sync::Arc::new(tether_agent::AgentMetrics::new());
    let cfg = tether_agent::AgentConfig {
        servers: vec![s1.agent_addr.to_string(), s2.agent_addr.to_string()],
        metrics: metrics.clone(),
        ..agent_config(&pki, s1.agent_addr, "agent-1")
    };
    let agent = Agent::start(cfg);
    assert!(s1.wait_agents(1, WAIT).await && s2.wait_agents(1, WAIT).await);
    let count = |name: &str| {
        metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    // At start, a loop may dial its server again before the other loop's tunnel is up: that
    // one is closed at once. Once settled (twenty turns of the address loops: an event, not a
    // clock), twenty more turns open no duplicate: with both servers held over the two
    // addresses together, no loop dials a server it already has.
    let turns = |n: u64| {
        let start = count("tether_agent_syncs_total ");
        eventually(WAIT, move || {
            count("tether_agent_syncs_total ") >= start + n
        })
    };
    assert!(turns(20).await, "{}", metrics.render());
    let duplicates = count("tether_agent_duplicate_tunnels_total ");
    assert!(turns(20).await, "{}", metrics.render());
    assert_eq!(
        count("tether_agent_duplicate_tunnels_total "),
        duplicates,
        "{}",
        metrics.render()
    );
    assert_eq!((s1.agents(), s2.agents()), (1, 1));
    at_rest(&s1, &[&agent]).await;
    at_rest(&s2, &[&agent]).await;
}
