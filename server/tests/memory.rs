//! What an idle stream costs in memory: the heap that the server (its CONNECT frontend on a
//! Unix socket) and the agent hold for each, counted by jemalloc's own statistics. The bound
//! is ARCHITECTURE.md's ("Memory, per stream and per tunnel"); the fleet runner measures the
//! same in RSS at 100,000 streams (docs/BENCHMARKS.md).
//!
//! Each test runs again in a child process of this binary with jemalloc's thread caches off
//! (`_RJEM_MALLOC_CONF=tcache:false`), so that what is counted as allocated is what the code
//! holds, not what the threads keep cached.
mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Bytes allocated and not yet freed, process-wide.
fn allocated() -> usize {
    tikv_jemalloc_ctl::epoch::advance().expect("jemalloc statistics");
    tikv_jemalloc_ctl::stats::allocated::read().expect("jemalloc statistics")
}

/// The heap an idle stream may hold, server and agent together.
const BOUND: usize = 6 * 1024;
/// After a burst: the streams' buffers go (the queues' slots the burst grew stay, about
/// 1 KiB), but the tunnels' own, which a burst grows and which are per tunnel (up to a few
/// MiB), are counted too, and their size at any moment depends on timing. So this bound is
/// coarse: it catches a stream that keeps its burst's buffers (249 KiB to 1 MiB each), not a
/// few hundred bytes; the idle test above is the exact one.
const BOUND_AFTER_BURST: usize = 128 * 1024;

/// Runs the test `name` in a child process with jemalloc's thread caches off; `true` in the
/// parent (which then has nothing more to do), `false` in the child.
fn in_child(name: &str) -> bool {
    if std::env::var_os("TETHER_MEMORY_CHILD").is_some() {
        return false;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("TETHER_MEMORY_CHILD", "1")
        .env("_RJEM_MALLOC_CONF", "tcache:false")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    assert!(out.status.success(), "the measurement failed");
    assert!(text.contains("1 passed"), "the child ran the test");
    true
}

/// A server with the CONNECT frontend on a Unix socket and one agent; `open(n)` opens `n`
/// streams to a backend, each with `burst` bytes each way and then a byte each way, and
/// returns them held idle. The backend and the clients are plain blocking sockets on
/// threads: they allocate nothing per stream but the slot that holds them.
async fn fleet(
    burst: usize,
) -> (
    tether_server::Server,
    tether_agent::Agent,
    impl Fn(usize) -> Vec<std::os::unix::net::UnixStream> + Clone + Send + 'static,
) {
    let pki = Pki::new();
    let dir = tempdir("memory");
    let path = dir.join("connect.socket");
    let mut cfg = server_config(&pki);
    cfg.uds_path = Some(path.clone());
    let server = tether_server::Server::start(cfg).await.unwrap();
    let agent = tether_agent::Agent::start(agent_config(&pki, server.agent_addr, "agent-1"));
    assert!(server.wait_agents(1, WAIT).await);
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = backend.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        // Ends with the test process.
        for s in backend.incoming() {
            let Ok(mut s) = s else { return };
            let mut b = vec![0u8; burst + 1];
            if s.read_exact(&mut b).is_err() || s.write_all(&b).is_err() {
                return;
            }
            held.push(s);
        }
    });
    let open = move |n: usize| {
        let mut held = Vec::with_capacity(n);
        let data = vec![7u8; burst + 1];
        for _ in 0..n {
            let mut c = std::os::unix::net::UnixStream::connect(&path).unwrap();
            c.set_read_timeout(Some(WAIT)).unwrap();
            write!(c, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
            let mut head = [0u8; 39];
            c.read_exact(&mut head).unwrap();
            assert!(head.starts_with(b"HTTP/1.1 200 "), "{head:?}");
            c.write_all(&data).unwrap();
            let mut back = vec![0u8; burst + 1];
            c.read_exact(&mut back).unwrap();
            held.push(c);
        }
        held
    };
    (server, agent, open)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_holds_no_read_buffers() {
    if in_child("an_idle_stream_holds_no_read_buffers") {
        return;
    }
    // Four descriptors a stream in this process (client, server, agent, backend): within the
    // smallest usual open file limit (1024).
    const STREAMS: usize = 200;
    let (_server, _agent, open) = fleet(0).await;
    // Warm up: what the first streams allocate once (tables, caches) is not per stream.
    let o = open.clone();
    let warm = tokio::task::spawn_blocking(move || o(STREAMS / 4))
        .await
        .unwrap();
    settle().await;
    let before = allocated();
    let held = tokio::task::spawn_blocking(move || open(STREAMS - STREAMS / 4))
        .await
        .unwrap();
    settle().await;
    held_within(
        before,
        held.len(),
        BOUND,
        "an idle stream, server and agent",
    );
    drop((warm, held));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_goes_quiet_after_a_burst_lets_go_of_its_buffers() {
    if in_child("a_stream_that_goes_quiet_after_a_burst_lets_go_of_its_buffers") {
        return;
    }
    // 1 MiB each way grows both pumps' reads to their largest (256 KiB, in 512 KiB blocks).
    const STREAMS: usize = 32;
    const BURST: usize = 1 << 20;
    let (_server, _agent, open) = fleet(BURST).await;
    // No warm-up: what the bursts grow in the tunnels (their read blocks and write batches,
    // per tunnel, at most a few MiB) counts against the streams here, within the bound.
    settle().await;
    let before = allocated();
    let held = tokio::task::spawn_blocking(move || open(STREAMS))
        .await
        .unwrap();
    // Once quiet for QUIET_AFTER, each stream is back under the idle bound; bounded wait.
    quiet_within(
        before,
        held.len(),
        BOUND_AFTER_BURST,
        "a stream quiet after a burst, server and agent",
    )
    .await;
    drop(held);
}

/// The heap an idle tunnel may hold, server end and agent end together, with the library
/// agent that holds it: at each end the TLS connection (rustls's state and its 4 KiB record
/// buffer), the session and the tunnel's two tasks, and no read buffer beneath TLS (128 KiB
/// each) nor read block above it (512 KiB each). Measured in a debug build: 86 KiB, of which
/// 27 KiB is the agent instance itself (its TLS client configuration, metrics and tasks; as
/// much with no tunnel at all); 348 KiB when the 128 KiB read-ahead buffers were kept for life.
const TUNNEL_BOUND: usize = 96 * 1024;

/// Agents `ids`, each with its own tunnel to `server` and its own address (`ipv4=127.3.0.i`,
/// routed by destHost), all connected; each carries one stream that moves `burst` bytes from
/// a backend on its address and ends, so both ends' readers have read.
async fn tunnels(
    pki: &Pki,
    server: &tether_server::Server,
    ids: std::ops::Range<usize>,
    burst: usize,
) -> Vec<tether_agent::Agent> {
    let mut agents = Vec::new();
    let base = server.agents();
    for i in ids {
        let ip = std::net::Ipv4Addr::new(127, 3, 0, u8::try_from(i + 1).unwrap());
        let backend = std::net::TcpListener::bind((ip, 0)).unwrap();
        let target = backend.local_addr().unwrap();
        // Serves one connection, then ends.
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = backend.accept() {
                let _ = s.write_all(&vec![1u8; burst]);
            }
        });
        let mut cfg = agent_config(pki, server.agent_addr, &format!("agent-{i}"));
        cfg.identifiers = vec![tether_proto::frame::Identifier::Ipv4(ip)];
        agents.push(tether_agent::Agent::start(cfg));
        assert!(server.wait_agents(base + agents.len(), WAIT).await);
        let (status, head, mut s) =
            connect_tcp(server.connect_addr.unwrap(), &target.to_string()).await;
        assert_eq!(status, 200, "{head}");
        assert_eq!(read_to_end(&mut s).await.unwrap().len(), burst);
    }
    agents
}

/// A server with the CONNECT frontend on TCP, routing by destHost only.
async fn tunnel_server(pki: &Pki) -> tether_server::Server {
    let mut cfg = server_config(pki);
    cfg.connect_addr = Some("127.0.0.1:0".parse().unwrap());
    cfg.strategies = vec![tether_server::Strategy::DestHost];
    tether_server::Server::start(cfg).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_holds_no_read_block() {
    if in_child("an_idle_tunnel_holds_no_read_block") {
        return;
    }
    const TUNNELS: usize = 40;
    let pki = Pki::new();
    let server = tunnel_server(&pki).await;
    let warm = tunnels(&pki, &server, 0..4, 100).await;
    tokio::time::sleep(tether::QUIET_AFTER * 2).await;
    settle().await;
    let before = allocated();
    let held = tunnels(&pki, &server, 4..4 + TUNNELS, 100).await;
    // Past the readers' quiet time: a handshake read that filled 4 KiB would keep its
    // read-ahead for that long.
    tokio::time::sleep(tether::QUIET_AFTER * 2).await;
    settle().await;
    held_within(
        before,
        TUNNELS,
        TUNNEL_BOUND,
        "an idle tunnel, server and agent",
    );
    drop((warm, held));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_quiet_after_a_burst_lets_go_of_its_read_buffers() {
    if in_child("a_tunnel_quiet_after_a_burst_lets_go_of_its_read_buffers") {
        return;
    }
    // 1 MiB through each tunnel grows the server's reader to its 512 KiB blocks and its
    // read-ahead beneath TLS to 128 KiB. Both let go of them once a read has waited
    // `pump::QUIET_AFTER` (1 s) after the last big one. No keepalives: no later read must
    // be needed for either.
    const TUNNELS: usize = 8;
    let pki = Pki::new();
    let server = tunnel_server(&pki).await;
    let warm = tunnels(&pki, &server, 0..2, 100).await;
    tokio::time::sleep(tether::QUIET_AFTER * 2).await;
    settle().await;
    let before = allocated();
    let held = tunnels(&pki, &server, 2..2 + TUNNELS, 1 << 20).await;
    // Within about a second, each tunnel is back under the idle bound; bounded.
    quiet_within(
        before,
        TUNNELS,
        TUNNEL_BOUND,
        "a tunnel quiet after a burst, server and agent",
    )
    .await;
    drop((warm, held));
}

/// The heap a tunnel pair (both ends, no TLS, over loopback TCP) may hold once quiet after a
/// burst: the two sessions and their tasks, and neither reader's 512 KiB block.
const PAIR_BOUND: usize = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_reader_lets_go_of_its_blocks_a_second_after_its_last_big_read() {
    if in_child("a_tunnel_reader_lets_go_of_its_blocks_a_second_after_its_last_big_read") {
        return;
    }
    // 1 MiB from the server's end of a stream to the agent's application, which reads it all;
    // then nothing more crosses (no keepalives), so nothing but the reader's own timer can
    // free the agent's block: its last read was a big one.
    async fn burst() -> impl Sized {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = tokio::join!(
            l.accept(),
            tokio::net::TcpStream::connect(l.local_addr().unwrap())
        );
        let (server, agent, mut dials) = tunnel_pair_on(a.unwrap().0, b.unwrap()).await;
        let (mut near, mut far) = tunnel_stream(&server, &mut dials).await;
        let data = vec![1u8; 1 << 20];
        let mut got = vec![0u8; data.len()];
        let (w, r) = tokio::join!(
            async { far.write_all(&data).await },
            tokio::time::timeout(WAIT, near.read_exact(&mut got))
        );
        w.unwrap();
        r.unwrap().unwrap();
        (server, agent, dials, near, far)
    }
    const PAIRS: usize = 8;
    let warm = burst().await;
    // Past the warm pair's own quiet time.
    tokio::time::sleep(tether::QUIET_AFTER * 2).await;
    settle().await;
    let before = allocated();
    let mut held = Vec::new();
    for _ in 0..PAIRS {
        held.push(burst().await);
    }
    // `pump::QUIET_AFTER` (1 s) after the last big read, each pair is back under the bound.
    quiet_within(
        before,
        PAIRS,
        PAIR_BOUND,
        "a tunnel pair quiet after a burst",
    )
    .await;
    drop((warm, held));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_grpc_call_keeps_nothing_of_its_last_large_message() {
    if in_child("an_idle_grpc_call_keeps_nothing_of_its_last_large_message") {
        return;
    }
    use tether_server::client::grpc::{AuthorityStyle, GrpcClient};
    const CALLS: usize = 8;
    const MESSAGE: usize = 1024 * 1024;
    let (_server, _agent, path, echo) = grpc_server("memory-grpc").await;
    let client = GrpcClient::connect(&path, AuthorityStyle::PercentEncoded)
        .await
        .unwrap();
    // Each call sends one 1 MiB message, reads its echo, and stays open and idle.
    let open = |n: usize| {
        let (client, echo) = (&client, &echo);
        async move {
            let mut calls = Vec::new();
            for _ in 0..n {
                let mut call = client.dial(echo).await.unwrap();
                call.write(bytes::Bytes::from(vec![7u8; MESSAGE]))
                    .await
                    .unwrap();
                grpc_read(&mut call, MESSAGE).await;
                calls.push(call);
            }
            calls
        }
    };
    // No warm-up, as for CONNECT streams above: what the first call and the bursts grow in
    // the channel and the tunnel counts against the calls here, within the coarse bound.
    settle().await;
    let before = allocated();
    let held = open(CALLS).await;
    // With the message's allocation kept, each call holds 1 MiB or more.
    quiet_within(
        before,
        CALLS,
        BOUND_AFTER_BURST,
        "an idle gRPC call after a 1 MiB message",
    )
    .await;
    drop(held);
}

/// A server with the gRPC frontend on a Unix socket and one agent, connected, and an echo
/// backend: the server, the agent, the socket's path and the backend's address.
async fn grpc_server(
    tag: &str,
) -> (
    tether_server::Server,
    tether_agent::Agent,
    std::path::PathBuf,
    String,
) {
    let pki = Pki::new();
    let path = tempdir(tag).join("grpc.socket");
    let mut cfg = server_config(&pki);
    cfg.grpc_uds_path = Some(path.clone());
    let server = tether_server::Server::start(cfg).await.unwrap();
    let agent = tether_agent::Agent::start(agent_config(&pki, server.agent_addr, "agent-1"));
    assert!(server.wait_agents(1, WAIT).await);
    (server, agent, path, echo_backend().await.to_string())
}

/// The heap grown since `before`, per item of `n`. Signed: what the items share (the
/// tunnels' buffers) may have shrunk by more than they hold.
fn each_since(before: usize, n: usize) -> isize {
    (isize::try_from(allocated()).unwrap() - isize::try_from(before).unwrap())
        / isize::try_from(n).unwrap()
}

/// Fails the test if the heap grown since `before`, over `n` items, is over `bound` bytes
/// each now.
fn held_within(before: usize, n: usize, bound: usize, what: &str) {
    let each = each_since(before, n);
    eprintln!("heap held by {what}: {each} bytes");
    assert!(
        each <= bound as isize,
        "{what} holds {each} bytes of heap, over the {bound}-byte bound"
    );
}

/// Waits (every 100 ms, at most 10 s) until the heap grown since `before`, over `n` items,
/// is within `bound` bytes each, then checks it with [`held_within`].
async fn quiet_within(before: usize, n: usize, bound: usize, what: &str) {
    for _ in 0..100 {
        if each_since(before, n) <= bound as isize {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    held_within(before, n, bound, what);
}

/// Waits until the tasks are done with what follows the last byte: the heap reads the same
/// three times running, 20 ms apart (bounded: 500 rounds).
async fn settle() {
    let (mut last, mut same) = (allocated(), 0);
    for _ in 0..500 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = allocated();
        same = if now.abs_diff(last) < 1024 {
            same + 1
        } else {
            0
        };
        last = now;
        if same == 3 {
            return;
        }
    }
}

/// The heap one idle gRPC call holds on a channel of its own (kube-apiserver's single-use
/// tunnels), server and client together: h2's connection state at both ends (about 90 KiB
/// measured), and nothing of the server's `:authority` shim, whose 16 KiB read buffer goes
/// while no bytes arrive (with it kept: 110 KiB).
const CHANNEL_BOUND: usize = 100 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_grpc_channel_holds_no_read_buffer_of_the_authority_shim() {
    if in_child("an_idle_grpc_channel_holds_no_read_buffer_of_the_authority_shim") {
        return;
    }
    use tether_server::client::grpc::{AuthorityStyle, GrpcClient};
    const CHANNELS: usize = 64;
    let (_server, _agent, path, echo) = grpc_server("memory-grpc-channels").await;
    let open = || {
        let (path, echo) = (&path, &echo);
        async move {
            let client = GrpcClient::connect(path, AuthorityStyle::PercentEncoded)
                .await
                .unwrap();
            let mut call = client.dial(echo).await.unwrap();
            call.write(bytes::Bytes::from_static(b"ping"))
                .await
                .unwrap();
            grpc_read(&mut call, 4).await;
            (client, call)
        }
    };
    // One channel first, so what the first one grows once (pools, tables) is not counted.
    let warm = open().await;
    settle().await;
    let before = allocated();
    let mut held = Vec::new();
    for _ in 0..CHANNELS {
        held.push(open().await);
    }
    settle().await;
    held_within(
        before,
        CHANNELS,
        CHANNEL_BOUND,
        "an idle gRPC call on its own channel",
    );
    drop((warm, held));
}
