//! The adversarial suite (docs/SECURITY.md): a scripted hostile agent built on tether-proto,
//! over real TLS, against the real `tether-server` binary where memory is the question and the
//! library server where a refusal is. Each test asserts the bound or the refusal, not just
//! that nothing panicked.
//!
//! `TETHER_SERVER_BIN` and `TETHER_AGENT_BIN` run the binary tests against other builds (an
//! older commit's, to measure the figure before a fix); each test prints what it measured.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::*;
use rustls_pki_types::ServerName;
use tether_agent::{Agent, Allowlist};
use tether_proto::frame::{
    Data, DialOk, Frame, Hello, Identifier, MAX_WINDOW, PROTOCOL_VERSION, Ping, Reset, Settings,
    StreamId, Token,
};
use tether_proto::{ErrorCode, FrameCodec};
use tether_server::{IdRule, IdentityPolicy, Server, Tokens};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ----- a hostile agent, frame by frame -----

/// An agent that speaks the protocol by hand: it sends exactly the frames a test scripts.
struct Rogue {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    rx: BytesMut,
    codec: FrameCodec,
}

/// What a rogue says in its HELLO.
struct Claim<'a> {
    id: &'a str,
    identifiers: Vec<Identifier>,
    settings: Settings,
    token: Option<&'a str>,
}

impl<'a> Claim<'a> {
    fn id(id: &'a str) -> Claim<'a> {
        Claim {
            id,
            identifiers: vec![Identifier::Host(id.into())],
            settings: Settings::default(),
            token: None,
        }
    }
}

impl Rogue {
    /// TLS with a certificate for `cert_name` (common name and DNS name), then HELLO.
    async fn connect(addr: SocketAddr, pki: &Pki, cert_name: &str, claim: Claim<'_>) -> Rogue {
        let cert = pki.ca.leaf(cert_name, &[cert_name]);
        let tls = tether::tls::client_config(
            pki.ca_pem(),
            Some((cert.cert.as_bytes(), cert.key.as_bytes())),
        )
        .unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let mut r = Rogue {
            tls,
            rx: BytesMut::new(),
            codec: FrameCodec::with_max_payload(16 * 1024 * 1024),
        };
        let hello = Hello {
            versions: vec![PROTOCOL_VERSION],
            agent_id: claim.id.into(),
            identifiers: claim.identifiers,
            settings: claim.settings,
            token: claim.token.map(|t| Token::new(t).unwrap()),
        };
        r.send(&[Frame::Hello(hello)]).await;
        r
    }

    /// Connects as `agent-1` announcing `settings`, and expects the WELCOME.
    async fn welcomed(addr: SocketAddr, pki: &Pki, settings: Settings) -> Rogue {
        let claim = Claim {
            settings,
            ..Claim::id("agent-1")
        };
        let mut r = Rogue::connect(addr, pki, "agent-1", claim).await;
        r.answer().await.expect("welcome");
        r
    }

    async fn send(&mut self, frames: &[Frame]) {
        let mut out = BytesMut::new();
        for f in frames {
            f.encode(&mut out);
        }
        self.tls.write_all(&out).await.unwrap();
    }

    /// The next frame from the server; `None` at its end (or after `WAIT`).
    async fn next(&mut self) -> Option<Frame> {
        for _ in 0..1_000_000 {
            if let Some(f) = self.codec.decode(&mut self.rx).expect("well-formed frames") {
                return Some(f);
            }
            match tokio::time::timeout(WAIT, self.tls.read_buf(&mut self.rx)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
        None
    }

    /// The server's answer to the HELLO: `Ok` for WELCOME, `Err` with the GOAWAY's code and
    /// reason.
    async fn answer(&mut self) -> Result<(), (ErrorCode, String)> {
        match self.next().await {
            Some(Frame::Welcome(_)) => Ok(()),
            Some(Frame::GoAway(g)) => Err((g.code, g.reason)),
            other => panic!("no answer to HELLO: {other:?}"),
        }
    }

    /// Sends a PING and waits for its answer, which comes after everything sent before it was
    /// processed. Other frames are skipped; `false` if the tunnel ended first.
    async fn round_trip(&mut self) -> bool {
        self.send(&[Frame::Ping(Ping {
            ack: false,
            payload: 7,
        })])
        .await;
        for _ in 0..10_000 {
            match self.next().await {
                Some(Frame::Ping(p)) if p.ack && p.payload == 7 => return true,
                Some(Frame::Ping(p)) if !p.ack => {
                    self.send(&[Frame::Ping(Ping {
                        ack: true,
                        payload: p.payload,
                    })])
                    .await;
                }
                Some(_) => {}
                None => return false,
            }
        }
        false
    }

    /// The next DIAL, accepted; other frames (PINGs) are skipped.
    async fn accept_dial(&mut self) -> StreamId {
        for _ in 0..1000 {
            match self.next().await {
                Some(Frame::Dial(d)) => {
                    self.send(&[Frame::DialOk(DialOk { stream: d.stream })])
                        .await;
                    return d.stream;
                }
                Some(_) => {}
                None => panic!("the server closed before dialling"),
            }
        }
        panic!("no DIAL");
    }
}

// ----- the real binaries -----

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Resident memory, KiB (Linux).
    fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).expect("/proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn bin(var: &str, built: &str) -> PathBuf {
    std::env::var_os(var).map_or_else(|| PathBuf::from(built), PathBuf::from)
}

/// The PKI as files, in a directory of its own.
struct Files {
    dir: PathBuf,
}

impl Files {
    fn new(pki: &Pki, tag: &str) -> Files {
        let dir = std::env::temp_dir().join(format!("tether-hostile-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let agent = pki.ca.leaf("agent-1", &["agent-1"]);
        for (name, body) in [
            ("ca.pem", &pki.ca.pem.cert),
            ("server.pem", &pki.server.cert),
            ("server-key.pem", &pki.server.key),
            ("agent.pem", &agent.cert),
            ("agent-key.pem", &agent.key),
        ] {
            std::fs::write(dir.join(name), body).unwrap();
        }
        Files { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct ServerBin {
    proc: Proc,
    agents: SocketAddr,
    connect: SocketAddr,
    health: SocketAddr,
}

async fn wait_port(addr: SocketAddr) {
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on {addr}");
}

/// `tether-server` (or `TETHER_SERVER_BIN`) with agents on 127.0.0.1:`agents`, health on
/// `health`, and the PKI of `files`.
fn server_command(files: &Files, agents: u16, health: u16) -> Command {
    let mut c = Command::new(bin(
        "TETHER_SERVER_BIN",
        env!("CARGO_BIN_EXE_tether-server"),
    ));
    c.args(["--agent-bind-address", "127.0.0.1", "--agent-port"])
        .arg(agents.to_string())
        .arg("--health-port")
        .arg(health.to_string())
        .arg("--cluster-cert")
        .arg(files.path("server.pem"))
        .arg("--cluster-key")
        .arg(files.path("server-key.pem"))
        .arg("--cluster-ca-cert")
        .arg(files.path("ca.pem"))
        .stdout(Stdio::null());
    c
}

async fn server_bin(files: &Files, extra: &[&str]) -> ServerBin {
    let (a, c, h) = (free_port(), free_port(), free_port());
    let child = server_command(files, a, h)
        .arg("--server-port")
        .arg(c.to_string())
        .args(extra)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .expect("tether-server starts");
    let s = ServerBin {
        proc: Proc(child),
        agents: SocketAddr::from(([127, 0, 0, 1], a)),
        connect: SocketAddr::from(([127, 0, 0, 1], c)),
        health: SocketAddr::from(([127, 0, 0, 1], h)),
    };
    wait_port(s.health).await;
    s
}

/// No keepalive: a rogue busy writing a long script answers no PING, and a loaded machine may
/// take longer than the keepalive deadline to carry it.
const QUIET: &[&str] = &["--keepalive-time", "0"];

/// One counter's value from `/metrics` (0 if absent).
async fn metric(health: SocketAddr, series: &str) -> u64 {
    let mut s = TcpStream::connect(health).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let body = String::from_utf8(read_to_end(&mut s).await.unwrap()).unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0)
}

// ----- 1. memory follows this end's limits, not the peer's announcements -----

/// A CONNECT client that got its 200 from `frontend` for `target`.
async fn connected_client(frontend: SocketAddr, target: &str) -> TcpStream {
    let (status, head, s) = connect_tcp(frontend, target).await;
    assert_eq!(status, 200, "{head}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_announced_window_and_no_reads_cost_the_server_only_its_own_send_buffer() {
    let pki = Pki::new();
    let files = Files::new(&pki, "window");
    let server = server_bin(&files, QUIET).await;
    let settings = Settings {
        initial_window: Some(MAX_WINDOW),
        ..Settings::default()
    };
    let mut rogue = Rogue::welcomed(server.agents, &pki, settings).await;
    let frontend = server.connect;
    let client = tokio::spawn(async move { connected_client(frontend, "10.0.0.1:80").await });
    rogue.accept_dial().await;
    let mut client = client.await.unwrap();
    let before = server.proc.rss_kib();
    // The rogue never reads again. The client uploads until the server stops taking bytes:
    // a 1 MiB write that makes no progress for 2 s (at most 1 GiB).
    let chunk = vec![0x5a; 1 << 20];
    let mut sent = 0usize;
    let mut blocked = false;
    while sent < 1024 && !blocked {
        match tokio::time::timeout(Duration::from_secs(2), client.write_all(&chunk)).await {
            Ok(Ok(())) => sent += 1,
            Ok(Err(e)) => panic!("upload failed: {e}"),
            Err(_) => blocked = true,
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let grown = server.proc.rss_kib().saturating_sub(before);
    eprintln!("huge window, no reads: client pushed {sent} MiB; server RSS grew {grown} KiB");
    // The bound: the stream's send buffer (256 KiB), the pump's read buffer (512 KiB), TLS's
    // buffered records (1 MiB) and the writer's batch (512 KiB), with room for the allocator.
    assert!(
        grown < 32 * 1024,
        "server grew {grown} KiB for one stream (client pushed {sent} MiB)"
    );
    assert!(
        blocked,
        "the server stopped taking bytes (back-pressure reached)"
    );
    drop(rogue);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_frames_to_clients_that_do_not_read_cost_the_server_o_window_memory() {
    const STREAMS: usize = 16;
    const WINDOW: usize = 256 * 1024;
    let pki = Pki::new();
    let files = Files::new(&pki, "tiny");
    let server = server_bin(&files, QUIET).await;
    let mut rogue = Rogue::welcomed(server.agents, &pki, Settings::default()).await;
    let mut clients = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..STREAMS {
        let client = tokio::spawn(client_that_does_not_read(server.connect));
        ids.push(rogue.accept_dial().await);
        clients.push(client.await.unwrap());
    }
    let before = server.proc.rss_kib();
    // A full window of 1-byte DATA frames on every stream: 4 Mi frames.
    let one = Bytes::from_static(b"x");
    for _ in 0..WINDOW / 4096 {
        let mut out = BytesMut::with_capacity(STREAMS * 4096 * 11);
        for id in &ids {
            for _ in 0..4096 {
                Frame::Data(Data {
                    stream: *id,
                    fin: false,
                    payload: one.clone(),
                })
                .encode(&mut out);
            }
        }
        rogue.tls.write_all(&out).await.unwrap();
    }
    assert!(
        rogue.round_trip().await,
        "the server took every frame within the windows"
    );
    let grown = server.proc.rss_kib().saturating_sub(before);
    eprintln!(
        "1-byte frames: {STREAMS} streams x {WINDOW} frames; server RSS grew {grown} KiB ({} KiB per stream)",
        grown / STREAMS as u64
    );
    // O(window): 256 KiB of bytes per stream, copied compactly, 4 MiB in all; the bound leaves
    // room for the allocator's slack. 42 bytes per frame would be 168 MiB.
    assert!(
        grown < 24 * 1024,
        "server grew {grown} KiB for {STREAMS} windows of 1-byte frames"
    );
    drop(clients);
}

/// A CONNECT client with a tiny receive buffer that never reads after its 200: the kernel
/// holds little, the server's session the rest.
async fn client_that_does_not_read(frontend: SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(frontend).await.unwrap();
    let (head, _) = connect_request(&mut s, "10.0.0.1:80").await;
    assert_eq!(status_of(&head), 200, "{head}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_payloads_cannot_pin_whole_read_buffers() {
    const FRAMES: usize = 256;
    let pki = Pki::new();
    let files = Files::new(&pki, "pin");
    let server = server_bin(&files, QUIET).await;
    let mut rogue = Rogue::welcomed(server.agents, &pki, Settings::default()).await;
    let client = tokio::spawn(client_that_does_not_read(server.connect));
    let id = rogue.accept_dial().await;
    let client = client.await.unwrap();
    let before = server.proc.rss_kib();
    // A full window of 1 KiB DATA frames, each followed by 540 KB of frames of an unknown kind
    // (ignored, SPEC 3.2): every payload lands in a read buffer of its own.
    let padding = Frame::Unknown(tether_proto::frame::Unknown {
        kind: tether_proto::frame::FrameKind(0x40),
        flags: 0,
        stream: StreamId(0),
        payload: Bytes::from(vec![0u8; 60_000]),
    });
    let data = Frame::Data(Data {
        stream: id,
        fin: false,
        payload: Bytes::from(vec![1u8; 1024]),
    });
    for _ in 0..FRAMES {
        let mut out = BytesMut::new();
        data.encode(&mut out);
        for _ in 0..9 {
            padding.encode(&mut out);
        }
        rogue.tls.write_all(&out).await.unwrap();
    }
    assert!(rogue.round_trip().await, "the server took every frame");
    let grown = server.proc.rss_kib().saturating_sub(before);
    eprintln!("1 KiB payloads among padding: {FRAMES} frames; server RSS grew {grown} KiB");
    // The bytes are 256 KiB; held as slices they would keep 256 read buffers (128 MiB) alive.
    assert!(
        grown < 8 * 1024,
        "server grew {grown} KiB for 256 KiB of payload"
    );
    drop(client);
}

#[tokio::test]
async fn a_peer_that_allows_unlimited_streams_gets_no_more_than_the_servers_own_limit() {
    let pki = Pki::new();
    let mut cfg = server_config(&pki);
    cfg.session.max_open_streams = 3;
    cfg.dial_timeout = Duration::from_secs(2);
    let server = Server::start(cfg).await.unwrap();
    let settings = Settings {
        max_concurrent_streams: Some(u32::MAX),
        ..Settings::default()
    };
    let mut rogue = Rogue::welcomed(server.agent_addr, &pki, settings).await;
    assert!(server.wait_agents(1, WAIT).await);
    // Ten dials the rogue never answers: three reach it, the rest are refused at once.
    let frontend = server.connect_addr.unwrap();
    let mut refused = 0;
    let mut pending = Vec::new();
    for _ in 0..10 {
        let mut s = TcpStream::connect(frontend).await.unwrap();
        s.write_all(b"CONNECT 10.0.0.1:80 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        pending.push(s);
    }
    let mut dials = 0;
    for _ in 0..3 {
        match rogue.next().await {
            Some(Frame::Dial(_)) => dials += 1,
            other => panic!("{other:?}"),
        }
    }
    // The three the rogue holds time out (504).
    let mut timed_out = 0;
    for s in &mut pending {
        match status_of(&read_head(s).await.0) {
            503 => refused += 1,
            504 => timed_out += 1,
            other => panic!("status {other}"),
        }
    }
    assert_eq!((dials, refused, timed_out), (3, 7, 3));
    drop(pending);
    at_rest(&server, &[]).await;
}

#[tokio::test]
async fn a_one_millisecond_keepalive_interval_gets_at_most_one_ping_a_second() {
    let pki = Pki::new();
    let server = Server::start(server_config(&pki)).await.unwrap();
    let settings = Settings {
        keepalive_interval: Some(1),
        ..Settings::default()
    };
    let mut rogue = Rogue::welcomed(server.agent_addr, &pki, settings).await;
    // Answer every PING at once for 2.5 s; count them.
    let mut pings = 0;
    let end = tokio::time::Instant::now() + Duration::from_millis(2500);
    while let Ok(Some(f)) = tokio::time::timeout_at(end, rogue.next()).await {
        if let Frame::Ping(p) = f
            && !p.ack
        {
            pings += 1;
            rogue
                .send(&[Frame::Ping(Ping {
                    ack: true,
                    payload: p.payload,
                })])
                .await;
        }
    }
    // The floor is 1000 ms: two in 2.5 s (a loaded machine sends fewer, never more).
    assert!(pings <= 2, "{pings} PINGs in 2.5 s");
    at_rest(&server, &[]).await;
}

// ----- 3. identity is bound to the credential -----

/// A library server and one agent `id` whose allowlist is `rules(port)`, with `port` an echo
/// backend's on 127.0.0.1; connected.
async fn with_agent(pki: &Pki, id: &str, rules: impl Fn(u16) -> String) -> (Server, Agent, u16) {
    let server = Server::start(server_config(pki)).await.unwrap();
    let port = echo_backend().await.port();
    let mut cfg = agent_config(pki, server.agent_addr, id);
    cfg.allowlist = Allowlist::parse(&rules(port)).unwrap();
    let agent = Agent::start(cfg);
    assert!(server.wait_agents(1, WAIT).await);
    (server, agent, port)
}

async fn registered_ids(server: &Server) -> Vec<String> {
    let mut ids = server.core().registry.agent_ids();
    ids.sort();
    ids
}

#[tokio::test]
async fn a_second_certificate_cannot_take_another_agents_id_or_host_name() {
    let pki = Pki::new();
    // The victim serves the name `localhost` (its id, its certificate, its host identifier).
    let (server, victim, port) = with_agent(&pki, "localhost", |port| {
        format!("localhost:{port}, 127.0.0.1:{port}")
    })
    .await;
    // The thief's certificate is for `node-2`: it may not say it is `localhost`...
    let mut thief = Rogue::connect(server.agent_addr, &pki, "node-2", Claim::id("localhost")).await;
    let (code, reason) = thief.answer().await.unwrap_err();
    assert_eq!(code, ErrorCode::UNAUTHORIZED);
    assert!(reason.contains("--agent-id-rule"), "{reason}");
    // ...nor claim the name as a host identifier under its own id.
    let claim = Claim {
        identifiers: vec![Identifier::Host("localhost".into())],
        ..Claim::id("node-2")
    };
    let mut thief = Rogue::connect(server.agent_addr, &pki, "node-2", claim).await;
    let (code, reason) = thief.answer().await.unwrap_err();
    assert_eq!(code, ErrorCode::UNAUTHORIZED);
    assert!(reason.contains("--host-identifiers"), "{reason}");
    // Honest about itself, it is accepted, and takes none of the victim's traffic: every
    // CONNECT for `localhost` reaches the victim (a rogue that never answers would be a 504).
    let mut honest = Rogue::connect(server.agent_addr, &pki, "node-2", Claim::id("node-2")).await;
    honest.answer().await.expect("welcome");
    assert!(server.wait_agents(2, WAIT).await);
    for n in 0..20u8 {
        let (status, head, mut s) =
            connect_tcp(server.connect_addr.unwrap(), &format!("localhost:{port}")).await;
        assert_eq!(status, 200, "CONNECT {n}: {head}");
        s.write_all(&[n]).await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(read_to_end(&mut s).await.unwrap(), vec![n]);
    }
    assert_eq!(
        registered_ids(&server).await,
        vec!["localhost".to_owned(), "node-2".to_owned()]
    );
    at_rest(&server, &[&victim]).await;
}

#[tokio::test]
async fn a_token_bound_to_another_agent_id_is_refused() {
    let pki = Pki::new();
    let mut cfg = server_config(&pki);
    // Tokens alone: no client certificates asked for.
    cfg.agent_tls =
        tether::tls::server_config(pki.server.cert.as_bytes(), pki.server.key.as_bytes(), None)
            .unwrap()
            .into();
    cfg.tokens = Some(
        Tokens::new([
            ("victim-token".into(), "node-1".into()),
            ("thief-token".into(), "node-2".into()),
        ])
        .into(),
    );
    let server = Server::start(cfg).await.unwrap();
    let steal = Claim {
        token: Some("thief-token"),
        ..Claim::id("node-1")
    };
    let mut thief = Rogue::connect(server.agent_addr, &pki, "node-2", steal).await;
    let (code, reason) = thief.answer().await.unwrap_err();
    assert_eq!(code, ErrorCode::UNAUTHORIZED);
    assert!(reason.contains("token"), "{reason}");
    let own = Claim {
        token: Some("thief-token"),
        ..Claim::id("node-2")
    };
    let mut honest = Rogue::connect(server.agent_addr, &pki, "node-2", own).await;
    honest
        .answer()
        .await
        .expect("its own id with its own token");
    at_rest(&server, &[]).await;
}

#[tokio::test]
async fn a_new_tunnel_with_an_id_already_present_replaces_the_oldest_beyond_the_cap() {
    let pki = Pki::new();
    let mut cfg = server_config(&pki);
    cfg.max_tunnels_per_agent = 2;
    let server = Server::start(cfg).await.unwrap();
    let mut tunnels = Vec::new();
    for n in 0..6 {
        // Ids compare without ASCII case, as the certificate's DNS name does: `NODE-1` is
        // `node-1`, and counts against the same cap.
        let id = if n % 2 == 0 { "node-1" } else { "NODE-1" };
        let mut r = Rogue::connect(server.agent_addr, &pki, "node-1", Claim::id(id)).await;
        r.answer().await.expect("welcome");
        tunnels.push(r);
    }
    // The four oldest were told to go: each got GOAWAY (a drain, NO_ERROR).
    for (n, r) in tunnels.iter_mut().enumerate().take(4) {
        let mut told = false;
        for _ in 0..10 {
            match r.next().await {
                Some(Frame::GoAway(g)) => {
                    told = g.reason.contains("replaced");
                    break;
                }
                Some(_) => {}
                None => break,
            }
        }
        assert!(told, "tunnel {n} was replaced");
    }
    let usable = server
        .core()
        .registry
        .tunnels()
        .iter()
        .filter(|t| t.is_usable())
        .count();
    assert_eq!(usable, 2);
    // The rogues never answer the GOAWAY. Beyond twice the cap, tunnels are closed at once
    // (well before the drain's 10 s grace)...
    assert!(
        server.wait_agents_at_most(4, Duration::from_secs(4)).await,
        "{} tunnels still registered",
        server.agents()
    );
    // ...and a replaced tunnel whose drain never ends is closed after the grace.
    assert!(
        server.wait_agents_at_most(2, Duration::from_secs(15)).await,
        "{} tunnels still registered after the grace",
        server.agents()
    );
    at_rest(&server, &[]).await;
}

#[tokio::test]
async fn a_server_without_a_handshake_deadline_does_not_start() {
    let pki = Pki::new();
    let mut cfg = server_config(&pki);
    cfg.session.handshake_timeout_ms = 0;
    let e = Server::start(cfg).await.err().expect("refused");
    assert!(e.to_string().contains("handshake deadline"), "{e}");
}

#[tokio::test]
async fn an_agent_id_with_control_characters_is_refused_whatever_the_rule() {
    let pki = Pki::new();
    let mut cfg = server_config(&pki);
    cfg.identity = IdentityPolicy {
        id_rule: IdRule::Any,
        ..IdentityPolicy::default()
    };
    let server = Server::start(cfg).await.unwrap();
    let claim = Claim {
        identifiers: vec![],
        ..Claim::id("node-1\n2026-12-01T00:00:00Z INFO agent connected agent_id=admin")
    };
    let mut r = Rogue::connect(server.agent_addr, &pki, "node-1", claim).await;
    let (code, reason) = r.answer().await.unwrap_err();
    assert_eq!(code, ErrorCode::UNAUTHORIZED);
    assert!(reason.contains("control"), "{reason}");
    assert!(registered_ids(&server).await.is_empty());
    at_rest(&server, &[]).await;
}

#[tokio::test]
async fn a_refusal_whose_reason_is_over_255_bytes_still_goes_out_at_once() {
    // A host claim of 220 bytes: the refusal names it, and is longer than a frame's reason.
    let pki = Pki::new();
    let server = Server::start(server_config(&pki)).await.unwrap();
    let long = "h".repeat(220);
    let claim = Claim {
        identifiers: vec![Identifier::Host(long.clone())],
        ..Claim::id("node-1")
    };
    let mut r = Rogue::connect(server.agent_addr, &pki, "node-1", claim).await;
    let (code, reason) = r.answer().await.unwrap_err();
    assert_eq!(code, ErrorCode::UNAUTHORIZED, "{reason}");
    // Not HANDSHAKE_TIMEOUT at the deadline: the refusal itself, cut to the frame's limit.
    assert!(reason.len() <= 255 && reason.contains("hhhh"), "{reason}");
    let refused = server.core().render_metrics();
    assert!(
        refused.contains("tether_agents_refused_total{reason=\"unauthorized\"} 1"),
        "{refused}"
    );
    assert!(!refused.contains("reason=\"timeout\""), "{refused}");
    at_rest(&server, &[]).await;
}

// ----- 8. a bounded label set -----

#[tokio::test]
async fn reset_codes_an_agent_picks_do_not_grow_the_metrics_label_set() {
    let pki = Pki::new();
    let server = Server::start(server_config(&pki)).await.unwrap();
    let mut rogue = Rogue::welcomed(server.agent_addr, &pki, Settings::default()).await;
    assert!(server.wait_agents(1, WAIT).await);
    let frontend = server.connect_addr.unwrap();
    for n in 0..40u32 {
        let client = tokio::spawn(async move { connect_tcp(frontend, "10.0.0.1:80").await.0 });
        let id = loop {
            match rogue.next().await {
                Some(Frame::Dial(d)) => break d.stream,
                Some(_) => {}
                None => panic!("tunnel closed"),
            }
        };
        rogue
            .send(&[Frame::Reset(Reset {
                stream: id,
                code: ErrorCode(0x7000 + n),
                reason: "made up".into(),
            })])
            .await;
        assert_eq!(client.await.unwrap(), 502);
    }
    let series = server
        .core()
        .render_metrics()
        .lines()
        .filter(|l| l.starts_with("tether_dials_total{"))
        .count();
    assert_eq!(series, 1, "40 made-up codes are one `other` series");
    at_rest(&server, &[]).await;
}

// ----- 4. a stream that fails never looks complete -----

/// What became of one proxied stream.
#[derive(Debug, Default, Clone, Copy)]
struct Outcomes {
    intact: usize,
    failed: usize,
    short: usize,
}

/// Runs `n` echo streams of `size` bytes each way through `connect` (which opens one
/// client connection with its 200 read), calls `kill` once `kill_after` bytes have come back
/// in all, and sorts every stream: intact, failed visibly, or short with a clean end.
async fn transfer_and_kill<C, F, S>(
    n: usize,
    size: usize,
    kill_after: usize,
    connect: C,
    kill: impl FnOnce() + Send + 'static,
) -> Outcomes
where
    C: Fn() -> F,
    F: std::future::Future<Output = Option<S>> + Send + 'static,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let back = Arc::new(AtomicUsize::new(0));
    let (killed_tx, killed_rx) = tokio::sync::oneshot::channel::<()>();
    let watcher = {
        let back = back.clone();
        tokio::spawn(async move {
            for _ in 0..6000 {
                if back.load(Ordering::Relaxed) >= kill_after {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            kill();
            let _ = killed_tx.send(());
        })
    };
    let mut tasks = Vec::new();
    for i in 0..n {
        let conn = connect();
        let back = back.clone();
        tasks.push(tokio::spawn(async move {
            // A CONNECT refused once the agent is gone is a visible failure.
            let Some(s) = conn.await else {
                return 1;
            };
            let (mut r, mut w) = tokio::io::split(s);
            let data = pattern(i as u64, size);
            let expect = data.clone();
            let writer = tokio::spawn(async move {
                for c in data.chunks(64 * 1024) {
                    w.write_all(c).await?;
                }
                w.shutdown().await?;
                Ok::<_, std::io::Error>(w)
            });
            let mut got = Vec::with_capacity(size);
            let mut buf = vec![0u8; 64 * 1024];
            let read = loop {
                match tokio::time::timeout(Duration::from_secs(20), r.read(&mut buf)).await {
                    Ok(Ok(0)) => break Ok(()),
                    Ok(Ok(k)) => {
                        got.extend_from_slice(&buf[..k]);
                        back.fetch_add(k, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => break Err(e),
                    Err(_) => break Err(std::io::Error::other("read timed out")),
                }
            };
            let wrote = writer.await.unwrap();
            match (read, wrote) {
                (Ok(()), _) if got == expect => 0,
                (Ok(()), Ok(_)) => 2,
                _ => 1,
            }
        }));
    }
    let mut out = Outcomes::default();
    for t in tasks {
        match t.await.unwrap() {
            0 => out.intact += 1,
            1 => out.failed += 1,
            _ => out.short += 1,
        }
    }
    let _ = killed_rx.await;
    let _ = watcher.await;
    out
}

async fn agent_bin(files: &Files, server: &ServerBin, backend: SocketAddr) -> Proc {
    let child = Command::new(common::agent_bin())
        .args(["--proxy-server-host", "127.0.0.1", "--proxy-server-port"])
        .arg(server.agents.port().to_string())
        .args(["--proxy-server-name", "localhost", "--agent-id", "agent-1"])
        .arg("--ca-cert")
        .arg(files.path("ca.pem"))
        .arg("--agent-cert")
        .arg(files.path("agent.pem"))
        .arg("--agent-key")
        .arg(files.path("agent-key.pem"))
        .arg("--allowed-destinations")
        .arg(backend.to_string())
        .args(["--sync-interval", "100ms"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tether-agent starts");
    Proc(child)
}

async fn wait_ready(health: SocketAddr) {
    for _ in 0..200 {
        if let Ok(mut s) = TcpStream::connect(health).await {
            let _ = s
                .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await;
            if let Ok(b) = read_to_end(&mut s).await
                && b.starts_with(b"HTTP/1.1 200")
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no agent became ready");
}

const KILL_STREAMS: usize = 40;
const KILL_SIZE: usize = 2 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_transfer_leaves_no_stream_short_and_clean_on_tcp() {
    let pki = Pki::new();
    let files = Files::new(&pki, "kill-tcp");
    let server = server_bin(&files, &[]).await;
    let backend = echo_backend().await;
    let agent = agent_bin(&files, &server, backend).await;
    wait_ready(server.health).await;
    let frontend = server.connect;
    let target = backend.to_string();
    let mut agent = agent;
    let out = transfer_and_kill(
        KILL_STREAMS,
        KILL_SIZE,
        KILL_STREAMS * KILL_SIZE / 4,
        move || {
            let target = target.clone();
            async move {
                let (status, _, s) = connect_tcp(frontend, &target).await;
                (status == 200).then_some(s)
            }
        },
        move || {
            let _ = agent.0.kill();
            let _ = agent.0.wait();
        },
    )
    .await;
    eprintln!("kill -9 mid-transfer, TCP: {out:?}");
    assert_eq!(out.short, 0, "{out:?}");
    assert!(out.failed > 0, "the kill came mid-transfer: {out:?}");
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_transfer_fails_every_unix_socket_stream_visibly() {
    let pki = Pki::new();
    let files = Files::new(&pki, "kill-uds");
    let uds = files.path("connect.sock");
    let server = server_bin(&files, &["--uds-name", uds.to_str().unwrap()]).await;
    let backend = echo_backend().await;
    let agent = agent_bin(&files, &server, backend).await;
    wait_ready(server.health).await;
    let target = backend.to_string();
    let mut agent = agent;
    let path = uds.clone();
    let out = transfer_and_kill(
        KILL_STREAMS,
        KILL_SIZE,
        KILL_STREAMS * KILL_SIZE / 4,
        move || {
            let (target, path) = (target.clone(), path.clone());
            async move {
                let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
                let (head, _) = connect_request(&mut s, &target).await;
                (status_of(&head) == 200).then_some(s)
            }
        },
        move || {
            let _ = agent.0.kill();
            let _ = agent.0.wait();
        },
    )
    .await;
    // The server counts a stream once its pump has ended, just after the client saw the end:
    // wait for the count to settle (bounded).
    let series = "tether_connect_streams_failed_total{frontend=\"uds\"}";
    let want = (out.failed + out.short) as u64;
    let mut counted = metric(server.health, series).await;
    for _ in 0..100 {
        if counted >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        counted = metric(server.health, series).await;
    }
    eprintln!(
        "kill -9 mid-transfer, Unix socket: {out:?}; counted as failed by the server: {counted}"
    );
    assert!(
        out.failed + out.short > 0,
        "the kill came mid-transfer: {out:?}"
    );
    // A Unix socket has no RST: a client that had sent everything may see a plain end
    // (docs/SECURITY.md). Every such stream, and every other that failed, is counted.
    assert_eq!(counted, (out.failed + out.short) as u64, "{out:?}");
}

// ----- 5, 6. what an agent dials -----

#[tokio::test]
async fn a_name_rule_that_resolves_to_loopback_does_not_reach_loopback() {
    let pki = Pki::new();
    let (server, agent, port) =
        with_agent(&pki, "agent-1", |port| format!("localhost:{port}")).await;
    let frontend = server.connect_addr.unwrap();
    let (status, head, mut s) = connect_tcp(frontend, &format!("localhost:{port}")).await;
    assert_eq!(status, 403, "{head}");
    let body = String::from_utf8(read_to_end(&mut s).await.unwrap()).unwrap();
    assert!(
        body.contains("DIAL_FORBIDDEN") && body.contains("127.0.0.1"),
        "{body}"
    );
    // The literal address, not on the list either.
    let (status, _, _) = connect_tcp(frontend, &format!("127.0.0.1:{port}")).await;
    assert_eq!(status, 403);
    drop(s);
    at_rest(&server, &[&agent]).await;
}

#[tokio::test]
async fn an_ip_rule_that_names_loopback_lets_a_name_resolving_to_it_through() {
    let pki = Pki::new();
    let (server, agent, port) = with_agent(&pki, "agent-1", |port| {
        format!("localhost:{port}, 127.0.0.1:{port}")
    })
    .await;
    let (status, head, mut s) =
        connect_tcp(server.connect_addr.unwrap(), &format!("localhost:{port}")).await;
    assert_eq!(status, 200, "{head}");
    s.write_all(b"ping").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut s).await.unwrap(), b"ping");
    drop(s);
    at_rest(&server, &[&agent]).await;
}

#[tokio::test]
async fn an_empty_allowlist_refuses_the_agents_own_loopback() {
    let pki = Pki::new();
    let (server, agent, port) = with_agent(&pki, "agent-1", |_| String::new()).await;
    let target = format!("127.0.0.1:{port}");
    let (status, head, _) = connect_tcp(server.connect_addr.unwrap(), &target).await;
    assert_eq!(status, 403, "{head}");
    at_rest(&server, &[&agent]).await;
}

#[cfg(unix)]
#[tokio::test]
async fn with_only_a_unix_socket_the_tcp_frontend_stays_closed() {
    let pki = Pki::new();
    let files = Files::new(&pki, "uds-only");
    let uds = files.path("only.sock");
    let child = server_command(&files, free_port(), free_port())
        .arg("--uds-name")
        .arg(&uds)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut server = Proc(child);
    let stderr = server.0.stderr.take().unwrap();
    // The log up to the line that says where the server listens (bounded: the reader ends at
    // that line, or at the server's exit, which the test forces after 10 s at most).
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut log = String::new();
        for line in std::io::BufReader::new(stderr).lines().take(1000) {
            let Ok(line) = line else { break };
            log.push_str(&line);
            log.push('\n');
            if line.contains("server listening") {
                break;
            }
        }
        log
    });
    for _ in 0..200 {
        if reader.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = server.0.kill();
    let _ = server.0.wait();
    let log = reader.join().unwrap();
    assert!(log.contains("server listening"), "{log}");
    assert!(log.contains("connect_addr=None"), "{log}");
    assert!(
        log.contains("open_files="),
        "the raised fd limit is logged: {log}"
    );
}

// ----- 7. a cancelled dial holds no socket at the agent -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_drops_its_connect_when_the_server_gives_up_on_the_dial() {
    const DIALS: usize = 30;
    let pki = Pki::new();
    let mut cfg = server_config(&pki);
    cfg.dial_timeout = Duration::from_secs(3);
    let server = Server::start(cfg).await.unwrap();
    // A black hole: connects to it stay in SYN_SENT.
    let hole = black_hole().await;
    let port = hole.port;
    let mut acfg = agent_config(&pki, server.agent_addr, "agent-1");
    acfg.allowlist = Allowlist::parse(&format!("127.0.0.1:{port}")).unwrap();
    acfg.dial_timeout = Duration::from_secs(30);
    let agent = Agent::start(acfg);
    assert!(server.wait_agents(1, WAIT).await);
    let frontend = server.connect_addr.unwrap();
    let target = format!("127.0.0.1:{port}");
    let mut clients = Vec::new();
    for _ in 0..DIALS {
        let target = target.clone();
        clients.push(tokio::spawn(async move {
            connect_tcp(frontend, &target).await.0
        }));
    }
    // While the dials are pending, the agent's connects hang in SYN_SENT (the hole works).
    let in_flight = tether_wait(Duration::from_secs(3), || syn_sent_to(port) >= DIALS).await;
    assert!(in_flight, "only {} connects in flight", syn_sent_to(port));
    for c in clients {
        assert_eq!(c.await.unwrap(), 504);
    }
    let gone = tether_wait(Duration::from_secs(5), || syn_sent_to(port) == 0).await;
    eprintln!(
        "cancelled dials: {} of {DIALS} connects still in flight 5 s after the server gave up",
        syn_sent_to(port)
    );
    assert!(
        gone,
        "the agent still holds {} connects for dials the server gave up on",
        syn_sent_to(port)
    );
    at_rest(&server, &[&agent]).await;
    drop(hole);
}

async fn tether_wait(timeout: Duration, ready: impl Fn() -> bool) -> bool {
    let end = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < end {
        if ready() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ready()
}

// ----- 8. the agent port and the CONNECT frontend under slow clients -----

#[tokio::test]
async fn the_tls_handshake_and_the_request_head_share_one_budget() {
    let pki = Pki::new();
    let mut cfg = server_config(&pki);
    cfg.header_timeout = Duration::from_millis(2000);
    cfg.connect_tls = Some(
        tether::tls::server_config(pki.server.cert.as_bytes(), pki.server.key.as_bytes(), None)
            .unwrap()
            .into(),
    );
    let server = Server::start(cfg).await.unwrap();
    let tcp = TcpStream::connect(server.connect_addr.unwrap())
        .await
        .unwrap();
    // 1.2 s before TLS, 1.2 s more before the head ends: each under the budget, together
    // over it.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let tls = tether::tls::client_config(pki.ca_pem(), None).unwrap();
    let connected = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await;
    // On a machine so loaded that TLS itself outlasts the budget, the server has already
    // closed: that too is the one budget at work.
    let Ok(mut s) = connected else {
        return;
    };
    s.write_all(b"CONNECT 10.0.0.1:80 HTTP/1.1\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let _ = s.write_all(b"Host: x\r\n\r\n").await;
    let (head, _) = read_head(&mut s).await;
    assert_eq!(status_of(&head), 408, "{head}");
    drop(s);
    at_rest(&server, &[]).await;
}

#[tokio::test]
async fn connect_clients_on_tls_are_capped_while_they_handshake_or_send_their_head() {
    let pki = Pki::new();
    let mut cfg = server_config(&pki);
    cfg.header_timeout = Duration::from_millis(600);
    cfg.client_admission.max_pending = 2;
    cfg.connect_tls = Some(
        tether::tls::server_config(pki.server.cert.as_bytes(), pki.server.key.as_bytes(), None)
            .unwrap()
            .into(),
    );
    let server = Server::start(cfg).await.unwrap();
    let agent = Agent::start(agent_config(&pki, server.agent_addr, "agent-1"));
    assert!(server.wait_agents(1, WAIT).await);
    let addr = server.connect_addr.unwrap();
    // Eight silent connections: two at a time are taken into a handshake, the rest wait in
    // the backlog until a slot frees (each taken one ends at its deadline).
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    let gauge = || {
        server
            .core()
            .render_metrics()
            .lines()
            .find_map(|l| l.strip_prefix("tether_connect_pending_heads{frontend=\"tls\"} "))
            .and_then(|v| v.trim().parse::<i64>().ok())
            .unwrap_or(0)
    };
    let mut most = 0;
    for _ in 0..150 {
        most = most.max(gauge());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(most, 2, "at most two at once, and the cap was reached");
    // Every silent one is closed in turn; an honest client then gets its tunnel.
    let backend = echo_backend().await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tether::tls::client_config(pki.ca_pem(), None).unwrap();
    let mut s = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    s.write_all(format!("CONNECT {backend} HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (head, _) = read_head(&mut s).await;
    assert_eq!(status_of(&head), 200, "{head}");
    assert_eq!(gauge(), 0, "a client through its head holds no slot");
    drop(s);
    drop(silent);
    at_rest(&server, &[&agent]).await;
}

#[tokio::test]
async fn unauthenticated_connections_on_the_agent_port_are_capped_while_they_handshake() {
    let pki = Pki::new();
    let mut cfg = server_config(&pki);
    cfg.max_handshakes = 2;
    cfg.session.handshake_timeout_ms = 600;
    let server = Server::start(cfg).await.unwrap();
    // Eight silent connections: two at a time are taken into a handshake, the rest wait in
    // the backlog until a slot frees (each taken one ends at its deadline).
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(TcpStream::connect(server.agent_addr).await.unwrap());
    }
    let gauge = || {
        server
            .core()
            .render_metrics()
            .lines()
            .find_map(|l| l.strip_prefix("tether_agent_handshakes "))
            .and_then(|v| v.trim().parse::<i64>().ok())
            .unwrap_or(-1)
    };
    let mut most = 0;
    for _ in 0..150 {
        most = most.max(gauge());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        most, 2,
        "at most two handshakes at once, and the cap was reached"
    );
    // Every silent one is closed in turn; an honest agent then gets in.
    let agent = Agent::start(agent_config(&pki, server.agent_addr, "agent-1"));
    assert!(server.wait_agents(1, WAIT).await);
    drop(silent);
    at_rest(&server, &[&agent]).await;
}
