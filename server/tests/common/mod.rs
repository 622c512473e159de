//! Shared pieces of the integration tests: a throwaway PKI, a server and agents on loopback,
//! backends, and a CONNECT client in kube-apiserver's dialect. Every loop is bounded.
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod fakekube;
pub mod konnectivity;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tether::tls::{self, testpki::Ca};
use tether_agent::{Agent, AgentConfig};
use tether_proto::frame::Identifier;
use tether_server::{Server, ServerConfig, Strategy};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const WAIT: Duration = Duration::from_secs(10);

/// A line on the test run's own stderr, shown whether or not the test passes: `eprintln!` is
/// captured by the test harness and shown only for a failure, and a skipped test must say so.
pub fn notice(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The `tether-agent` binary: `TETHER_AGENT_BIN`, or the one `cargo test --workspace` built
/// beside this test (the agent's own crate has a test of its binary, so cargo builds it).
pub fn agent_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("TETHER_AGENT_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("the test's own path");
    let dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target/<profile>/deps");
    let p = dir.join(format!("tether-agent{}", std::env::consts::EXE_SUFFIX));
    assert!(
        p.exists(),
        "{} is not built: run the tests with `cargo test --workspace` (or `cargo build -p tether-agent` first)",
        p.display()
    );
    p
}

/// Reads `n` bytes from a gRPC call, each read within [`WAIT`]; panics on CLOSE_RSP first.
pub async fn grpc_read(call: &mut tether_server::client::grpc::Call, n: usize) -> Vec<u8> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let chunk = tokio::time::timeout(WAIT, call.read())
            .await
            .expect("the bytes in time")
            .unwrap()
            .expect("data before CLOSE_RSP");
        got.extend_from_slice(&chunk);
    }
    got
}

pub struct Pki {
    pub ca: Ca,
    pub server: tls::testpki::Pem,
    pub agent: tls::testpki::Pem,
    pub client: tls::testpki::Pem,
}

impl Pki {
    pub fn new() -> Pki {
        let ca = Ca::new("tether test CA");
        let server = ca.leaf("tether-server", &["localhost", "127.0.0.1"]);
        let agent = ca.leaf("agent-1", &["agent-1"]);
        let client = ca.leaf("kube-apiserver", &["kube-apiserver"]);
        Pki {
            ca,
            server,
            agent,
            client,
        }
    }

    pub fn ca_pem(&self) -> &[u8] {
        self.ca.pem.cert.as_bytes()
    }
}

pub fn session(keepalive_ms: u64) -> tether_proto::Config {
    tether_proto::Config {
        keepalive_interval_ms: keepalive_ms,
        keepalive_timeout_ms: keepalive_ms.max(1) * 3,
        handshake_timeout_ms: 5_000,
        ..tether_proto::Config::default()
    }
}

pub fn server_config(pki: &Pki) -> ServerConfig {
    let agent_tls = tls::server_config(
        pki.server.cert.as_bytes(),
        pki.server.key.as_bytes(),
        Some(pki.ca_pem()),
    )
    .unwrap();
    ServerConfig {
        server_id: "server-1".into(),
        strategies: vec![Strategy::DestHost, Strategy::Default],
        dial_timeout: Duration::from_secs(5),
        session: session(0),
        health_addr: Some("127.0.0.1:0".parse().unwrap()),
        header_timeout: Duration::from_secs(2),
        connect_addr: Some("127.0.0.1:0".parse().unwrap()),
        ..ServerConfig::new("127.0.0.1:0".parse().unwrap(), agent_tls)
    }
}

/// An agent `id` with a certificate of its own, whose common name and DNS name are `id`
/// (the server binds agent ids to certificates).
pub fn agent_config(pki: &Pki, server: SocketAddr, id: &str) -> AgentConfig {
    let cert = pki.ca.leaf(id, &[id]);
    let tls = tls::client_config(
        pki.ca_pem(),
        Some((cert.cert.as_bytes(), cert.key.as_bytes())),
    )
    .unwrap();
    AgentConfig {
        server_name: Some("localhost".into()),
        identifiers: vec![Identifier::Host(id.into())],
        // Backends live on loopback, which an agent dials only where an IP rule names it.
        allowlist: tether_agent::Allowlist::parse("127.0.0.0/8, [::1]").unwrap(),
        dial_timeout: Duration::from_secs(2),
        sync_interval: Duration::from_millis(50),
        sync_interval_cap: Duration::from_millis(400),
        session: session(0),
        ..AgentConfig::new(vec![server.to_string()], tls, id)
    }
}

/// Polls `ready` every 20 ms until it holds, at most `limit`.
pub async fn eventually(limit: Duration, ready: impl Fn() -> bool) -> bool {
    let end = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < end {
        if ready() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ready()
}

/// Polls the async `probe` every 20 ms until it gives a value, at most `limit`.
pub async fn eventually_some<T, F, Fut>(limit: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fresh directory under the system's temporary directory.
pub fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "tether-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A server and one agent, connected.
pub async fn server_and_agent(pki: &Pki) -> (Server, Agent) {
    let server = Server::start(server_config(pki)).await.unwrap();
    let agent = Agent::start(agent_config(pki, server.agent_addr, "agent-1"));
    assert!(server.wait_agents(1, WAIT).await, "the agent connected");
    (server, agent)
}

/// A backend that echoes every byte back and half-closes when its client does.
pub async fn echo_backend() -> SocketAddr {
    echo_backend_on([127, 0, 0, 1]).await
}

/// [`echo_backend`] on a given loopback address (127.0.0.2 for a second "node", say).
pub async fn echo_backend_on(ip: [u8; 4]) -> SocketAddr {
    let l = TcpListener::bind((std::net::Ipv4Addr::from(ip), 0))
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Sends a CONNECT the way kube-apiserver does (`Host: 127.0.0.1`, target in the
/// request line) and returns the whole response head and what followed it.
pub async fn connect_request<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    target: &str,
) -> (String, Vec<u8>) {
    let req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: Go-http-client/1.1\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    read_head(s).await
}

pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    for _ in 0..65_536 {
        match tokio::time::timeout(WAIT, s.read(&mut byte)).await {
            Ok(Ok(1)) => buf.push(byte[0]),
            _ => break,
        }
        if buf.ends_with(b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    (head, Vec::new())
}

/// CONNECTs over TCP and returns the status code, the head, and the stream.
pub async fn connect_tcp(frontend: SocketAddr, target: &str) -> (u16, String, TcpStream) {
    let mut s = TcpStream::connect(frontend).await.unwrap();
    let (head, _) = connect_request(&mut s, target).await;
    (status_of(&head), head, s)
}

pub fn status_of(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Reads everything until EOF (bounded by WAIT).
pub async fn read_to_end<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "read timed out"))??;
    Ok(out)
}

/// Deterministic bytes for a stream numbered `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

pub fn arc<T>(t: T) -> Arc<T> {
    Arc::new(t)
}

/// A loopback TCP forwarder in front of `target` that can go silent (stop moving bytes while
/// keeping both connections open), as a dead network path or a frozen agent would.
pub struct Forwarder {
    pub addr: SocketAddr,
    pub frozen: Arc<std::sync::atomic::AtomicBool>,
}

pub async fn forwarder(target: SocketAddr) -> Forwarder {
    use std::sync::atomic::{AtomicBool, Ordering};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let frozen = Arc::new(AtomicBool::new(false));
    let f = frozen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((inbound, _)) = l.accept().await else {
                return;
            };
            let Ok(outbound) = TcpStream::connect(target).await else {
                continue;
            };
            let f = f.clone();
            tokio::spawn(async move {
                let (ir, iw) = inbound.into_split();
                let (or, ow) = outbound.into_split();
                let copy = |mut r: tokio::net::tcp::OwnedReadHalf,
                            mut w: tokio::net::tcp::OwnedWriteHalf,
                            f: Arc<AtomicBool>| async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match r.read(&mut buf).await {
                            Ok(0) | Err(_) => return (r, w),
                            Ok(n) => n,
                        };
                        if f.load(Ordering::SeqCst) {
                            // Silent: hold the connections, move nothing, for the test's life.
                            std::future::pending::<()>().await;
                        }
                        if w.write_all(&buf[..n]).await.is_err() {
                            return (r, w);
                        }
                    }
                };
                let a = tokio::spawn(copy(ir, ow, f.clone()));
                let b = tokio::spawn(copy(or, iw, f));
                let _ = tokio::join!(a, b);
            });
        }
    });
    Forwarder { addr, frozen }
}

/// A round-robin TCP load balancer on loopback in front of `backends`, as HAProxy in TCP mode
/// or a Kubernetes Service would stand before server replicas: each connection goes to the
/// next backend that accepts it (one that refuses is skipped, as a failed health check
/// would). Bytes are copied both ways until either side ends.
pub struct Balancer {
    pub addr: SocketAddr,
}

pub async fn balancer(backends: Vec<SocketAddr>) -> Balancer {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut turn = 0usize;
        loop {
            let Ok((mut inbound, _)) = l.accept().await else {
                return;
            };
            let mut outbound = None;
            for k in 0..backends.len() {
                let b = backends[(turn + k) % backends.len()];
                if let Ok(Ok(s)) =
                    tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(b)).await
                {
                    turn = (turn + k + 1) % backends.len();
                    outbound = Some(s);
                    break;
                }
            }
            let Some(mut outbound) = outbound else {
                continue;
            };
            tokio::spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    Balancer { addr }
}

/// A listener whose backlog is full and which never accepts, so connects to it stay in
/// SYN_SENT (a slow destination); dropped, it lets them go.
pub struct BlackHole {
    pub port: u16,
    _listener: tokio::net::TcpListener,
    _fillers: Vec<TcpStream>,
}

pub async fn black_hole() -> BlackHole {
    let hole = tokio::net::TcpSocket::new_v4().unwrap();
    hole.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let hole = hole.listen(1).unwrap();
    let port = hole.local_addr().unwrap().port();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(100),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        {
            fillers.push(s);
        }
    }
    BlackHole {
        port,
        _listener: hole,
        _fillers: fillers,
    }
}

/// Connections to `port` this process has in SYN_SENT (Linux `/proc/net/tcp`).
pub fn syn_sent_to(port: u16) -> usize {
    let needle = format!(":{port:04X} 02 ");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|t| t.lines().filter(|l| l.contains(&needle)).count())
        .sum()
}

/// A child process killed (SIGKILL) when dropped.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A loopback port free now and below the kernel's range for outgoing connections, so that
/// none of the test's own connections takes it while a process that must come back on it
/// (a killed replica) is down. Bounded: 1,000 tries.
pub fn fixed_port() -> u16 {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let floor = 10_000.min(low / 2);
    (0..1000)
        .map(|_| rand::random_range(floor..low))
        .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .expect("a free port below the ephemeral range")
}

/// `GET path` from an HTTP server on a loopback port; `None` if nothing answers within `WAIT`.
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    http_get_at(SocketAddr::from(([127, 0, 0, 1], port)), path).await
}

/// `GET path` from an HTTP server at `addr`; `None` if nothing answers within `WAIT`.
pub async fn http_get_at(addr: SocketAddr, path: &str) -> Option<String> {
    let get = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .ok()?;
        String::from_utf8(read_to_end(&mut s).await.ok()?).ok()
    };
    tokio::time::timeout(WAIT, get).await.ok()?
}

/// The value of series `series` (its name and labels, exactly) in `server`'s metrics; 0 when
/// it is not there yet.
pub fn series(server: &Server, series: &str) -> f64 {
    server
        .core()
        .render_metrics()
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// The value of an unlabelled metric `name` on a loopback `/metrics` endpoint.
pub async fn metric(port: u16, name: &str) -> Option<f64> {
    let text = http_get(port, "/metrics").await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

// In-memory tunnels: the library's own test helpers.
#[allow(unused_imports)] // each test file uses some
pub use tether::testing::{tunnel_config, tunnel_pair, tunnel_pair_on, tunnel_stream};

/// What a server and its agents still hold of streams, dials, handshakes and the gRPC
/// frontend's budget: one line per gauge off its resting value, empty at rest.
pub fn held(server: &Server, agents: &[&Agent]) -> Vec<String> {
    let text = server.core().render_metrics();
    let mut out: Vec<String> = text
        .lines()
        .filter(|l| {
            [
                "tether_connect_streams{",
                "tether_connect_pending_heads{",
                "tether_pending_dials ",
                "tether_agent_handshakes ",
                "tether_grpc_message_bytes_held ",
                "tether_konnectivity_agent_bytes_held ",
                "tether_open_streams{",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .filter(|l| l.rsplit(' ').next().is_some_and(|v| v.trim() != "0"))
        .map(str::to_owned)
        .collect();
    for (i, a) in agents.iter().enumerate() {
        let n = a.open_streams();
        if n > 0 {
            out.push(format!("agent {i}: {n} streams open"));
        }
    }
    out
}

/// Waits (at most `WAIT`) until [`held`] is empty: every stream, dial, handshake slot and
/// share of the gRPC budget given back. Fails the test with what is still held.
pub async fn at_rest(server: &Server, agents: &[&Agent]) {
    if !eventually(WAIT, || held(server, agents).is_empty()).await {
        panic!("not at rest: {:?}", held(server, agents));
    }
}

/// The gauges of a server's or an agent's `/metrics` that are zero at rest: streams, dials,
/// handshakes, request heads, the gRPC budget, destination connections.
const AT_REST_ZERO: [&str; 9] = [
    "tether_connect_streams{",
    "tether_connect_pending_heads{",
    "tether_pending_dials ",
    "tether_agent_handshakes ",
    "tether_grpc_message_bytes_held ",
    "tether_konnectivity_agent_bytes_held ",
    "tether_open_streams{",
    "tether_agent_open_streams",
    "tether_agent_endpoint_connections ",
];

/// Open file descriptors of process `pid` (`/proc/<pid>/fd`).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// What a server or agent *process* still holds: its resting-zero gauges off zero (read
/// from its `/metrics` at `health`), and file descriptors over `fds_at_rest` (counted when it
/// had its tunnels and nothing else). Empty at rest.
pub async fn process_held(health: SocketAddr, pid: u32, fds_at_rest: usize) -> Vec<String> {
    let Some(text) = http_get_at(health, "/metrics").await else {
        return vec![format!("no /metrics at {health}")];
    };
    let mut out: Vec<String> = text
        .lines()
        .filter(|l| AT_REST_ZERO.iter().any(|p| l.starts_with(p)))
        .filter(|l| l.rsplit(' ').next().is_some_and(|v| v.trim() != "0"))
        .map(str::to_owned)
        .collect();
    let fds = open_fds(pid);
    if fds > fds_at_rest {
        out.push(format!("{fds} open fds, {fds_at_rest} at rest"));
    }
    out
}

/// Waits (at most `WAIT`) until [`process_held`] is empty for each `(health address, pid, fds
/// at rest)`; fails the test with what is still held.
pub async fn processes_at_rest(processes: &[(SocketAddr, u32, usize)]) {
    for &(health, pid, fds) in processes {
        let rest = eventually_some(WAIT, || async move {
            process_held(health, pid, fds)
                .await
                .is_empty()
                .then_some(())
        })
        .await;
        if rest.is_none() {
            panic!(
                "process {pid} not at rest: {:?}",
                process_held(health, pid, fds).await
            );
        }
    }
}
