//! What an idle stream costs in memory: the heap that the server (its CONNECT frontend on a
//! Unix socket) and the agent hold for each, counted by jemalloc's own statistics. The bound
//! is ARCHITECTURE.md's ("Memory per stream"); the fleet runner measures the same in RSS at
//! 100,000 streams (docs/BENCHMARKS.md).
mod common;

use std::io::{Read, Write};

use common::*;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Bytes allocated and not yet freed, process-wide.
fn allocated() -> usize {
    tikv_jemalloc_ctl::epoch::advance().expect("jemalloc statistics");
    tikv_jemalloc_ctl::stats::allocated::read().expect("jemalloc statistics")
}

/// Streams held at once: four descriptors each in this process (client, server, agent,
/// backend), within the smallest usual open file limit (1024).
const STREAMS: usize = 200;

/// The heap an idle stream may hold, server and agent together.
const BOUND: usize = 6 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_holds_no_read_buffers() {
    let pki = Pki::new();
    let dir = tempdir("memory");
    let path = dir.join("connect.socket");
    let mut cfg = server_config(&pki);
    cfg.uds_path = Some(path.clone());
    let server = tether::Server::start(cfg).await.unwrap();
    let _agent = tether::Agent::start(agent_config(&pki, server.agent_addr, "agent-1"));
    assert!(server.wait_agents(1, WAIT).await);
    // The backend and the clients are plain blocking sockets on threads: they allocate
    // nothing per stream but the slot that holds them.
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = backend.local_addr().unwrap();
    let backends = std::thread::spawn(move || {
        let mut held = Vec::with_capacity(STREAMS);
        for s in backend.incoming().take(STREAMS) {
            let mut s = s.unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).unwrap();
            s.write_all(&b).unwrap();
            held.push(s);
        }
        held
    });
    // Warm up: what the first streams allocate once (tables, caches) is not per stream.
    let open = move |n: usize| {
        let path = path.clone();
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            let mut c = std::os::unix::net::UnixStream::connect(&path).unwrap();
            c.set_read_timeout(Some(WAIT)).unwrap();
            write!(c, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
            let mut head = [0u8; 39];
            c.read_exact(&mut head).unwrap();
            assert!(head.starts_with(b"HTTP/1.1 200 "), "{head:?}");
            // A byte each way, so both ends have read something and are idle after it.
            c.write_all(b"x").unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).unwrap();
            held.push(c);
        }
        held
    };
    let open2 = open.clone();
    let warm = tokio::task::spawn_blocking(move || open2(STREAMS / 4))
        .await
        .unwrap();
    settle().await;
    let before = allocated();
    let held = tokio::task::spawn_blocking(move || open(STREAMS - STREAMS / 4))
        .await
        .unwrap();
    settle().await;
    let per_stream = allocated().saturating_sub(before) / held.len();
    eprintln!("heap per idle stream, server and agent: {per_stream} bytes");
    assert!(
        per_stream <= BOUND,
        "an idle stream holds {per_stream} bytes of heap, over the {BOUND}-byte bound"
    );
    drop((warm, held));
    let _ = backends.join();
}

/// Lets every task run past what it does after the last byte (bounded: 50 rounds).
async fn settle() {
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
