//! kube-apiserver's GRPC egress mode against a real server, agent and backends, with a client
//! that behaves as kube-apiserver's Konnectivity client over grpc-go does (the socket path as
//! `:authority`, one `Proxy` call per dial, DIAL_CLS, CLOSE_REQ and its 10 s wait).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use tether_agent::{Agent, Allowlist};
use tether_server::client::grpc::{AuthorityStyle, DialFailure, GrpcClient};
use tether_server::grpc::GrpcLimits;
use tether_server::{Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn grpc_config(pki: &Pki, tag: &str) -> (ServerConfig, PathBuf) {
    let dir = tempdir(tag);
    let path = dir.join("konnectivity-server.socket");
    let mut cfg = server_config(pki);
    cfg.grpc_uds_path = Some(path.clone());
    (cfg, path)
}

async fn grpc_server_and_agent(pki: &Pki, tag: &str) -> (Server, Agent, PathBuf) {
    grpc_server_and_agent_limited(pki, tag, GrpcLimits::default()).await
}

async fn grpc_server_and_agent_limited(
    pki: &Pki,
    tag: &str,
    limits: GrpcLimits,
) -> (Server, Agent, PathBuf) {
    let (mut cfg, path) = grpc_config(pki, tag);
    cfg.grpc_limits = limits;
    let server = Server::start(cfg).await.unwrap();
    let agent = Agent::start(agent_config(pki, server.agent_addr, "agent-1"));
    assert!(server.wait_agents(1, WAIT).await, "the agent connected");
    (server, agent, path)
}

fn metric(server: &Server, series: &str) -> f64 {
    server
        .core()
        .render_metrics()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_mib_each_way_arrive_intact_whatever_the_client_puts_in_authority() {
    let pki = Pki::new();
    let (server, agent, path) = grpc_server_and_agent(&pki, "grpc-8mib").await;
    let echo = echo_backend().await;
    for style in [
        AuthorityStyle::PercentEncoded,
        AuthorityStyle::Raw,
        AuthorityStyle::Localhost,
    ] {
        let client = GrpcClient::connect(&path, style).await.unwrap();
        // Two calls on one channel: the second call's :authority is an index into the
        // client's HPACK table, which the shim must follow.
        for round in 0..2u64 {
            let mut call = client
                .dial(&echo.to_string())
                .await
                .unwrap_or_else(|e| panic!("{style:?}: {e}"));
            assert_ne!(call.connect_id(), 0);
            let data = Bytes::from(pattern(round, 8 * 1024 * 1024));
            let (mut got, mut sent) = (Vec::with_capacity(data.len()), 0);
            // Write in grpc-go's 32 KiB pieces while reading the echo back.
            while got.len() < data.len() {
                if sent < data.len() {
                    let end = (sent + 32 * 1024).min(data.len());
                    call.write(data.slice(sent..end)).await.unwrap();
                    sent = end;
                    if sent - got.len() < 1024 * 1024 {
                        continue;
                    }
                }
                let chunk = tokio::time::timeout(WAIT, call.read())
                    .await
                    .expect("echo in time")
                    .unwrap()
                    .expect("data before CLOSE_RSP");
                got.extend_from_slice(&chunk);
            }
            assert!(got == data[..], "{style:?}: the echo differs");
            call.close().await.expect("CLOSE_RSP within 10 s");
        }
    }
    assert!(
        eventually(WAIT, || metric(
            &server,
            "tether_connect_streams{frontend=\"grpc\"}"
        ) == 0.0)
        .await
    );
    assert_eq!(
        metric(
            &server,
            "tether_connect_streams_failed_total{frontend=\"grpc\"}"
        ),
        0.0
    );
    at_rest(&server, &[&agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_to_a_closed_port_gets_an_error_dial_response() {
    let pki = Pki::new();
    let (server, agent, path) = grpc_server_and_agent(&pki, "grpc-refused").await;
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let client = GrpcClient::connect(&path, AuthorityStyle::PercentEncoded)
        .await
        .unwrap();
    match client.dial(&closed.to_string()).await {
        Err(DialFailure::Refused(e)) => assert!(e.contains("502"), "{e}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a closed port dialled"),
    }
    // A bad address and another protocol are refused with a reason, not a broken call.
    match client.dial("no-port-here").await {
        Err(DialFailure::Refused(e)) => assert!(e.contains("port"), "{e}"),
        other => panic!("{:?}", other.err()),
    }
    // The channel is still good.
    let echo = echo_backend().await;
    let mut call = client.dial(&echo.to_string()).await.unwrap();
    call.write(Bytes::from_static(b"ping")).await.unwrap();
    assert_eq!(&call.read().await.unwrap().unwrap()[..], b"ping");
    drop(call);
    drop(client);
    at_rest(&server, &[&agent]).await;
}

/// A server with a gRPC socket and one agent whose only destination is a black hole, so
/// every dial stays pending for 60 s; the socket, the hole's port and the hole itself.
async fn server_with_a_slow_destination(
    pki: &Pki,
    tag: &str,
) -> (Server, Agent, PathBuf, u16, BlackHole) {
    let (mut cfg, path) = grpc_config(pki, tag);
    cfg.dial_timeout = Duration::from_secs(60);
    let server = Server::start(cfg).await.unwrap();
    let hole = black_hole().await;
    let port = hole.port;
    let mut acfg = agent_config(pki, server.agent_addr, "agent-1");
    acfg.allowlist = Allowlist::parse(&format!("127.0.0.1:{port}")).unwrap();
    acfg.dial_timeout = Duration::from_secs(60);
    let agent = Agent::start(acfg);
    assert!(server.wait_agents(1, WAIT).await);
    (server, agent, path, port, hole)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_cls_during_a_slow_dial_cancels_it_at_the_agent() {
    let pki = Pki::new();
    let (server, agent, path, port, _hole) =
        server_with_a_slow_destination(&pki, "grpc-cancel").await;
    let client = GrpcClient::connect(&path, AuthorityStyle::PercentEncoded)
        .await
        .unwrap();
    let mut call = client
        .start_dial(&format!("127.0.0.1:{port}"), 42)
        .await
        .unwrap();
    assert!(
        eventually(WAIT, || syn_sent_to(port) >= 1).await,
        "the agent's connect is in flight"
    );
    assert_eq!(metric(&server, "tether_pending_dials"), 1.0);
    call.cancel_dial().await.unwrap();
    // The agent lets go of its connect, the server of its pending dial, long before any
    // timeout (60 s here), and the call ends without a DIAL_RSP.
    assert!(
        eventually(WAIT, || syn_sent_to(port) == 0).await,
        "the agent still connects for a cancelled dial"
    );
    assert!(eventually(WAIT, || metric(&server, "tether_pending_dials") == 0.0).await);
    let next = tokio::time::timeout(WAIT, call.next_packet())
        .await
        .unwrap();
    assert!(matches!(next, Ok(None)), "{next:?}");
    assert_eq!(
        metric(&server, "tether_dials_total{result=\"cancelled\"}"),
        1.0
    );
    drop(call);
    drop(client);
    at_rest(&server, &[&agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_dials_fail_at_once_when_the_agent_goes() {
    let pki = Pki::new();
    let (server, agent, path, port, _hole) =
        server_with_a_slow_destination(&pki, "grpc-agent-gone-dial").await;
    let client = GrpcClient::connect(&path, AuthorityStyle::Raw)
        .await
        .unwrap();
    let mut call = client
        .start_dial(&format!("127.0.0.1:{port}"), 7)
        .await
        .unwrap();
    assert!(eventually(WAIT, || syn_sent_to(port) >= 1).await);
    agent.drain(Duration::ZERO).await;
    // An error DIAL_RSP now, not after a 30 s backstop (the dial itself could take 60 s).
    match tokio::time::timeout(WAIT, call.dial_response()).await {
        Ok(Err(DialFailure::Refused(e))) => assert!(!e.is_empty()),
        Ok(other) => panic!("{:?}", other.err()),
        Err(_) => panic!("no DIAL_RSP after the agent left"),
    }
    drop(call);
    drop(client);
    at_rest(&server, &[&agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_lost_mid_stream_gives_close_rsp_with_an_error() {
    let pki = Pki::new();
    let (server, agent, path) = grpc_server_and_agent(&pki, "grpc-agent-gone").await;
    let echo = echo_backend().await;
    let client = GrpcClient::connect(&path, AuthorityStyle::PercentEncoded)
        .await
        .unwrap();
    let mut call = client.dial(&echo.to_string()).await.unwrap();
    call.write(Bytes::from_static(b"before")).await.unwrap();
    assert_eq!(&call.read().await.unwrap().unwrap()[..], b"before");
    agent.drain(Duration::ZERO).await;
    let end = tokio::time::timeout(WAIT, call.read())
        .await
        .expect("CLOSE_RSP in time");
    let e = end.expect_err("the loss is an error, not a clean end");
    assert!(e.to_string().contains("CLOSE_RSP"), "{e}");
    assert!(
        eventually(WAIT, || metric(
            &server,
            "tether_connect_streams_failed_total{frontend=\"grpc\"}"
        ) == 1.0)
        .await
    );
    drop(call);
    drop(client);
    at_rest(&server, &[&agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_holds_its_stream_to_the_windows() {
    const OFFERED: usize = 64 * 1024 * 1024;
    let pki = Pki::new();
    let (server, agent, path) = grpc_server_and_agent(&pki, "grpc-slow-reader").await;
    // A backend that writes as fast as it may and counts what the kernel took.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let w = written.clone();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let block = pattern(9, 64 * 1024);
        while w.load(std::sync::atomic::Ordering::SeqCst) < OFFERED {
            if s.write_all(&block).await.is_err() {
                return;
            }
            w.fetch_add(block.len(), std::sync::atomic::Ordering::SeqCst);
        }
        let _ = s.shutdown().await;
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    });
    let client = GrpcClient::connect(&path, AuthorityStyle::PercentEncoded)
        .await
        .unwrap();
    let mut call = client.dial(&addr.to_string()).await.unwrap();
    // The client reads nothing. The backend stops once the windows (the client's HTTP/2
    // window, the tether stream's) and the kernel's socket buffers are full: nothing else
    // holds bytes for it.
    let load = || written.load(std::sync::atomic::Ordering::SeqCst);
    let mut last = usize::MAX;
    let mut still = 0;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = load();
        still = if now == last { still + 1 } else { 0 };
        last = now;
        if still >= 10 {
            break;
        }
    }
    eprintln!(
        "a client reading nothing: the backend wrote {} KiB of {} KiB offered",
        load() / 1024,
        OFFERED / 1024
    );
    assert!(still >= 10, "the backend never stopped: {} bytes", load());
    assert!(
        load() < 24 * 1024 * 1024,
        "{} bytes left the backend for a client that reads nothing",
        load()
    );
    // Reading again resumes the stream, every byte in order.
    let mut got = 0usize;
    let expect = pattern(9, 64 * 1024);
    while let Some(chunk) = tokio::time::timeout(WAIT, call.read())
        .await
        .unwrap()
        .unwrap()
    {
        for (i, b) in chunk.iter().enumerate() {
            assert_eq!(*b, expect[(got + i) % expect.len()]);
        }
        got += chunk.len();
    }
    assert_eq!(got, OFFERED);
    drop(call);
    drop(client);
    at_rest(&server, &[&agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_calls_at_once_on_one_channel() {
    let pki = Pki::new();
    let (server, agent, path) = grpc_server_and_agent(&pki, "grpc-hundred").await;
    let echo = echo_backend().await;
    let client = GrpcClient::connect(&path, AuthorityStyle::PercentEncoded)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..100u64 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut call = client.dial(&echo.to_string()).await.unwrap();
            let data = pattern(i, 64 * 1024);
            call.write(Bytes::from(data.clone())).await.unwrap();
            let mut got = Vec::new();
            while got.len() < data.len() {
                got.extend_from_slice(&call.read().await.unwrap().unwrap());
            }
            assert!(got == data);
            call.close().await.unwrap();
            call.connect_id()
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(tokio::time::timeout(WAIT * 3, t).await.unwrap().unwrap());
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 100, "every call has its own connectID");
    drop(client);
    at_rest(&server, &[&agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_limit_ends_its_call_and_frees_its_budget() {
    let pki = Pki::new();
    let limits = GrpcLimits {
        max_message: 64 * 1024,
        budget: 256 * 1024,
        ..GrpcLimits::default()
    };
    let (server, agent, path) = grpc_server_and_agent_limited(&pki, "grpc-limit", limits).await;
    let echo = echo_backend().await;
    let client = GrpcClient::connect(&path, AuthorityStyle::PercentEncoded)
        .await
        .unwrap();
    let mut call = client.dial(&echo.to_string()).await.unwrap();
    call.write(Bytes::from(vec![7u8; 100 * 1024]))
        .await
        .unwrap();
    // CLOSE_RSP names the failure: it never looks like a clean close.
    let end = tokio::time::timeout(WAIT, call.read()).await.unwrap();
    let e = end.expect_err("a failure, not a clean close");
    assert!(e.to_string().contains("over the 65536 byte limit"), "{e}");
    // Calls within the limit still work.
    let mut call = client.dial(&echo.to_string()).await.unwrap();
    call.write(Bytes::from(vec![7u8; 60 * 1024])).await.unwrap();
    let mut got = 0;
    while got < 60 * 1024 {
        got += call.read().await.unwrap().unwrap().len();
    }
    drop(call);
    drop(client);
    at_rest(&server, &[&agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_stops_arriving_loses_its_call_and_frees_its_budget() {
    let pki = Pki::new();
    // The budget holds one message: while the silent call holds it, no other can arrive.
    let limits = GrpcLimits {
        max_message: 64 * 1024,
        budget: 64 * 1024,
        message_deadline: Duration::from_millis(300),
    };
    let (server, agent, path) = grpc_server_and_agent_limited(&pki, "grpc-deadline", limits).await;
    let echo = echo_backend().await;
    let client = GrpcClient::connect(&path, AuthorityStyle::PercentEncoded)
        .await
        .unwrap();
    let mut silent = client.dial(&echo.to_string()).await.unwrap();
    // A prefix announcing 60 KiB, ten bytes of it, and then nothing.
    let mut head = vec![0u8];
    head.extend_from_slice(&(60u32 * 1024).to_be_bytes());
    head.extend_from_slice(&[0u8; 10]);
    silent.send_raw(Bytes::from(head)).await.unwrap();
    let mut other = client.dial(&echo.to_string()).await.unwrap();
    other
        .write(Bytes::from(vec![5u8; 60 * 1024]))
        .await
        .unwrap();
    // The silent call ends, with a reason, and its share of the budget lets the other's
    // message in.
    let end = tokio::time::timeout(WAIT, silent.read())
        .await
        .expect("the silent call ends");
    let e = end.expect_err("a failure, not a clean close");
    assert!(e.to_string().contains("no byte of it within"), "{e}");
    // The other call's bytes come back.
    grpc_read(&mut other, 60 * 1024).await;
    drop(silent);
    drop(other);
    drop(client);
    at_rest(&server, &[&agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_connect_serve_side_by_side_and_only_allowed_users_get_in() {
    use std::os::unix::fs::MetadataExt;
    let pki = Pki::new();
    let (mut cfg, grpc_path) = grpc_config(&pki, "grpc-both");
    let connect_path = grpc_path.with_file_name("connect.socket");
    cfg.uds_path = Some(connect_path.clone());
    let me = std::fs::metadata(grpc_path.parent().unwrap())
        .unwrap()
        .uid();
    cfg.uds_peer_uids = Some(vec![me]);
    let server = Server::start(cfg).await.unwrap();
    let _agent = Agent::start(agent_config(&pki, server.agent_addr, "agent-1"));
    assert!(server.wait_agents(1, WAIT).await);
    let echo = echo_backend().await;
    let client = GrpcClient::connect(&grpc_path, AuthorityStyle::PercentEncoded)
        .await
        .unwrap();
    let mut call = client.dial(&echo.to_string()).await.unwrap();
    call.write(Bytes::from_static(b"grpc")).await.unwrap();
    assert_eq!(&call.read().await.unwrap().unwrap()[..], b"grpc");
    let mut s = tokio::net::UnixStream::connect(&connect_path)
        .await
        .unwrap();
    let (head, _) = connect_request(&mut s, &echo.to_string()).await;
    assert_eq!(status_of(&head), 200, "{head}");
    server.shutdown(Duration::from_secs(1)).await;
    assert!(
        !grpc_path.exists() && !connect_path.exists(),
        "both sockets removed"
    );

    // Another user: refused on both sockets.
    let (mut cfg, grpc_path) = grpc_config(&pki, "grpc-uid");
    let connect_path = grpc_path.with_file_name("connect.socket");
    cfg.uds_path = Some(connect_path.clone());
    cfg.uds_peer_uids = Some(vec![me.wrapping_add(1)]);
    let server = Server::start(cfg).await.unwrap();
    let mut s = tokio::net::UnixStream::connect(&connect_path)
        .await
        .unwrap();
    // The refusal comes before any request is read.
    let (head, _) = read_head(&mut s).await;
    assert_eq!(status_of(&head), 403, "{head}");
    let refused = match GrpcClient::connect(&grpc_path, AuthorityStyle::Raw).await {
        Err(_) => true,
        Ok(c) => c.dial(&echo.to_string()).await.is_err(),
    };
    assert!(refused, "a user not listed got a gRPC call through");
    drop(s);
    at_rest(&server, &[]).await;
    drop(server);
}

/// Messages packed many to a frame, and a large one whose last frame carries the start of
/// the next, reach the node whole and in order (the reader keeps what follows a message in
/// its buffer, and copies it only after a large message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_messages_packed_in_frames_and_a_large_one_between_arrive_in_order() {
    use prost::Message as _;
    use tether_server::grpc::konnectivity::{self, Packet, PacketType, packet::Payload};
    let pki = Pki::new();
    let (server, agent, path) = grpc_server_and_agent(&pki, "grpc-packed").await;
    let echo = echo_backend().await;
    let client = GrpcClient::connect(&path, AuthorityStyle::PercentEncoded)
        .await
        .unwrap();
    let mut call = client.dial(&echo.to_string()).await.unwrap();
    let data = pattern(7, 300 * 16 + 100 * 1024 + 200 * 16);
    let (mut wire, mut at) = (Vec::new(), 0);
    for len in std::iter::repeat_n(16, 300)
        .chain([100 * 1024])
        .chain(std::iter::repeat_n(16, 200))
    {
        let p = Packet {
            r#type: PacketType::Data as i32,
            payload: Some(Payload::Data(konnectivity::Data {
                connect_id: call.connect_id(),
                error: String::new(),
                data: Bytes::copy_from_slice(&data[at..at + len]),
            })),
        };
        at += len;
        wire.push(0u8);
        wire.extend_from_slice(&u32::try_from(p.encoded_len()).unwrap().to_be_bytes());
        p.encode(&mut wire).unwrap();
    }
    call.send_raw(Bytes::from(wire)).await.unwrap();
    let got = grpc_read(&mut call, data.len()).await;
    assert!(got == data, "the echo differs");
    drop(call);
    drop(client);
    at_rest(&server, &[&agent]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_its_client_cancels_after_use_is_not_counted_as_a_failure() {
    let pki = Pki::new();
    let (server, agent, path) = grpc_server_and_agent(&pki, "grpc-cancel-after-use").await;
    let client = GrpcClient::connect(&path, AuthorityStyle::PercentEncoded)
        .await
        .unwrap();
    let echo = echo_backend().await;
    for _ in 0..3 {
        let mut call = client.dial(&echo.to_string()).await.unwrap();
        call.write(Bytes::from_static(b"ping")).await.unwrap();
        assert_eq!(&call.read().await.unwrap().unwrap()[..], b"ping");
        // Go's client, its context done: RST_STREAM(CANCEL), no CLOSE_REQ.
        drop(call);
    }
    at_rest(&server, &[&agent]).await;
    assert_eq!(
        metric(
            &server,
            "tether_connect_streams_failed_total{frontend=\"grpc\"}"
        ),
        0.0,
        "{}",
        server.core().render_metrics()
    );
    drop(client);
}
