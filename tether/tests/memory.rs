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
    tether::Server,
    tether::Agent,
    impl Fn(usize) -> Vec<std::os::unix::net::UnixStream> + Clone + Send + 'static,
) {
    let pki = Pki::new();
    let dir = tempdir("memory");
    let path = dir.join("connect.socket");
    let mut cfg = server_config(&pki);
    cfg.uds_path = Some(path.clone());
    let server = tether::Server::start(cfg).await.unwrap();
    let agent = tether::Agent::start(agent_config(&pki, server.agent_addr, "agent-1"));
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
    let per_stream = allocated().saturating_sub(before) / held.len();
    eprintln!("heap per idle stream, server and agent: {per_stream} bytes");
    assert!(
        per_stream <= BOUND,
        "an idle stream holds {per_stream} bytes of heap, over the {BOUND}-byte bound"
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
    // Signed: the tunnels' buffers may have shrunk by more than the streams hold.
    let n = isize::try_from(held.len()).unwrap();
    let mut per_stream = isize::MAX;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        per_stream = (isize::try_from(allocated()).unwrap() - isize::try_from(before).unwrap()) / n;
        if per_stream <= BOUND_AFTER_BURST as isize {
            break;
        }
    }
    eprintln!("heap per stream quiet after a burst, server and agent: {per_stream} bytes");
    assert!(
        per_stream <= BOUND_AFTER_BURST as isize,
        "a stream quiet after a burst holds {per_stream} bytes of heap, over the {BOUND_AFTER_BURST}-byte bound"
    );
    drop(held);
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
