//! The fault suite, in-process part (docs/SECURITY.md, "Nothing stranded"): third parties that
//! misbehave, a destination that never reads and clients that leave at each point of the
//! exchange, over TCP, TLS, the Unix socket and gRPC. After each scenario every stream, dial,
//! handshake slot and share of the gRPC budget must come back (`common::at_rest`), and the
//! agent must have let go of its connection to the destination.
//!
//! A TCP client's FIN behind bytes the server has not taken (a zero window) cannot reach the
//! server: its kernel keeps probing, gives up, and the server's keepalive then finds it gone
//! (about 90 s; docs/SECURITY.md). The quick suite leaves over TCP and TLS with a reset, and
//! with a FIN over the Unix socket, whose end is seen behind unread bytes at once.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tether_agent::Agent;
use tether_server::Server;
use tether_server::client::grpc::{AuthorityStyle, GrpcClient};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The linger the tests give a stream whose client has finished (the default is 10 s).
const LINGER: Duration = Duration::from_millis(500);
/// More than a window and the sockets' buffers hold: an upload this big must wait.
const BIG: usize = 64 << 20;

/// A destination that accepts and never reads; it keeps every connection it accepted.
struct Stalled {
    addr: SocketAddr,
    held: Arc<Mutex<Vec<TcpStream>>>,
}

async fn stalled() -> Stalled {
    // A small receive buffer (inherited by what it accepts): the destination takes little
    // before the agent's writes wait, so an upload waits at the server soon.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    sock.listen(64).unwrap();
    sock.set_nonblocking(true).unwrap();
    let l = TcpListener::from_std(sock.into()).unwrap();
    let addr = l.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            h.lock().unwrap().push(s);
        }
    });
    Stalled { addr, held }
}

impl Stalled {
    /// Whether the agent has let go of every connection it made here: each has seen its end
    /// (a FIN or a reset), behind the bytes it never read.
    fn all_let_go(&self) -> bool {
        let held = self.held.lock().unwrap();
        !held.is_empty()
            && held.iter().all(|s| {
                let ready = std::pin::pin!(
                    s.ready(tokio::io::Interest::READABLE | tokio::io::Interest::ERROR)
                );
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                matches!(
                    std::future::Future::poll(ready, &mut cx),
                    std::task::Poll::Ready(Ok(r)) if r.is_read_closed() || r.is_error()
                )
            })
    }
}

struct Setup {
    server: Server,
    agent: Agent,
    dir: std::path::PathBuf,
    dest: Stalled,
}

async fn setup(linger: Duration) -> Setup {
    let pki = Pki::new();
    let dir = tempdir("faults");
    let mut cfg = server_config(&pki);
    cfg.linger = linger;
    cfg.uds_path = Some(dir.join("connect.socket"));
    cfg.grpc_uds_path = Some(dir.join("grpc.socket"));
    let server = Server::start(cfg).await.unwrap();
    let agent = Agent::start(agent_config(&pki, server.agent_addr, "agent-1"));
    assert!(server.wait_agents(1, WAIT).await);
    let dest = stalled().await;
    Setup {
        server,
        agent,
        dir,
        dest,
    }
}

impl Setup {
    async fn at_rest(&self) {
        at_rest(&self.server, &[&self.agent]).await;
        assert!(
            eventually(WAIT, || self.dest.all_let_go()).await,
            "the agent let go of the destination's connections"
        );
    }
}

/// Writes until the upload waits (the destination reads nothing), bounded in time: the
/// stream's window, the tunnel's and the sockets' buffers are full then.
async fn fill<S: AsyncWrite + Unpin>(s: &mut S) {
    let data = vec![7u8; BIG];
    let wrote = tokio::time::timeout(Duration::from_secs(2), s.write_all(&data)).await;
    assert!(wrote.is_err(), "the upload should have waited: {wrote:?}");
}

/// A CONNECT client over the Unix socket, after the 200.
async fn uds_client(path: &std::path::Path, target: SocketAddr) -> tokio::net::UnixStream {
    let mut s = tokio::net::UnixStream::connect(path).await.unwrap();
    let (head, _) = connect_request(&mut s, &target.to_string()).await;
    assert_eq!(status_of(&head), 200, "{head}");
    s
}

/// A CONNECT client over TCP, after the 200.
async fn tcp_client(frontend: SocketAddr, target: SocketAddr) -> TcpStream {
    let (status, head, s) = connect_tcp(frontend, &target.to_string()).await;
    assert_eq!(status, 200, "{head}");
    s
}

async fn leave_while_parked<S: AsyncRead + AsyncWrite + Unpin>(mut client: S, s: &Setup) {
    fill(&mut client).await;
    // The client leaves (FIN): what waits can never be delivered while the destination reads
    // nothing; after the linger the stream is reset at both ends.
    drop(client);
    s.at_rest().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_client_that_leaves_while_its_upload_waits_is_reclaimed_after_the_linger() {
    let s = setup(LINGER).await;
    let c = uds_client(&s.dir.join("connect.socket"), s.dest.addr).await;
    leave_while_parked(c, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_resets_while_its_upload_waits_is_reclaimed_at_once() {
    // A linger far longer than the wait below: the reset, not the linger, ends the stream.
    let s = setup(Duration::from_secs(3600)).await;
    let mut c = tcp_client(s.server.connect_addr.unwrap(), s.dest.addr).await;
    fill(&mut c).await;
    c.set_zero_linger().unwrap();
    drop(c);
    s.at_rest().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_resets_after_its_half_close_is_reclaimed_though_the_destination_is_silent() {
    let s = setup(Duration::from_secs(3600)).await;
    let mut c = tcp_client(s.server.connect_addr.unwrap(), s.dest.addr).await;
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    c.shutdown().await.unwrap();
    // The request is through and half-closed; the destination never answers. The client
    // gives up with a reset: nothing can take an answer any more.
    assert!(
        eventually(WAIT, || s.dest.held.lock().unwrap().len() == 1).await,
        "the dial reached the destination"
    );
    c.set_zero_linger().unwrap();
    drop(c);
    s.at_rest().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_that_resets_while_its_upload_waits_is_reclaimed_at_once() {
    let pki = Pki::new();
    let mut cfg = server_config(&pki);
    cfg.linger = Duration::from_secs(3600);
    cfg.connect_tls = Some(
        tether::tls::server_config(pki.server.cert.as_bytes(), pki.server.key.as_bytes(), None)
            .unwrap()
            .into(),
    );
    let server = Server::start(cfg).await.unwrap();
    let agent = Agent::start(agent_config(&pki, server.agent_addr, "agent-1"));
    assert!(server.wait_agents(1, WAIT).await);
    let dest = stalled().await;
    let tls = tether::tls::client_config(pki.ca_pem(), None).unwrap();
    let tcp = TcpStream::connect(server.connect_addr.unwrap())
        .await
        .unwrap();
    let mut c = tokio_rustls::TlsConnector::from(tls)
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (head, _) = connect_request(&mut c, &dest.addr.to_string()).await;
    assert_eq!(status_of(&head), 200, "{head}");
    fill(&mut c).await;
    c.get_ref().0.set_zero_linger().unwrap();
    drop(c);
    at_rest(&server, &[&agent]).await;
    assert!(eventually(WAIT, || dest.all_let_go()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_whose_client_resets_while_its_upload_waits_gives_its_budget_back() {
    let s = setup(Duration::from_secs(3600)).await;
    let client = GrpcClient::connect(&s.dir.join("grpc.socket"), AuthorityStyle::PercentEncoded)
        .await
        .unwrap();
    let mut call = client.dial(&s.dest.addr.to_string()).await.unwrap();
    // DATA until the call's window is full: the server holds a message it cannot send on.
    let chunk = bytes::Bytes::from(vec![7u8; 256 * 1024]);
    let wrote = tokio::time::timeout(Duration::from_secs(2), async {
        for _ in 0..64 {
            call.write(chunk.clone()).await?;
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
    assert!(wrote.is_err(), "the upload should have waited");
    // kube-apiserver's client gives up: its call is reset (here: the whole channel goes).
    drop(call);
    drop(client);
    s.at_rest().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_close_request_behind_a_waiting_message_ends_the_stream_after_the_linger() {
    let s = setup(LINGER).await;
    let client = GrpcClient::connect(&s.dir.join("grpc.socket"), AuthorityStyle::PercentEncoded)
        .await
        .unwrap();
    let mut call = client.dial(&s.dest.addr.to_string()).await.unwrap();
    // One message more than the stream's window and the sockets take: it waits at the server,
    // and the CLOSE_REQ behind it fits in the call's HTTP/2 window.
    let big = bytes::Bytes::from(vec![7u8; 3 << 20]);
    call.write(big).await.unwrap();
    let closed = tokio::time::timeout(WAIT, call.close()).await;
    assert!(closed.is_ok(), "CLOSE_RSP came back: {closed:?}");
    s.at_rest().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_ends_during_a_grpc_upload_never_sees_a_clean_end_after_part_of_a_message() {
    use tokio::io::AsyncReadExt;
    let s = setup(Duration::from_secs(3600)).await;
    // A node that takes 1 KiB, ends its side (FIN), and reads the rest only once told.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    sock.listen(4).unwrap();
    sock.set_nonblocking(true).unwrap();
    let l = TcpListener::from_std(sock.into()).unwrap();
    let node = l.local_addr().unwrap();
    let (go, resume) = tokio::sync::oneshot::channel::<()>();
    let seen = tokio::spawn(async move {
        let (mut c, _) = l.accept().await.unwrap();
        let mut first = vec![0u8; 1024];
        c.read_exact(&mut first).await.unwrap();
        c.shutdown().await.unwrap();
        let _ = resume.await;
        let mut rest = Vec::new();
        let end = tokio::time::timeout(WAIT, c.read_to_end(&mut rest)).await;
        (1024 + rest.len(), matches!(end, Ok(Ok(_))))
    });
    let client = GrpcClient::connect(&s.dir.join("grpc.socket"), AuthorityStyle::PercentEncoded)
        .await
        .unwrap();
    let mut call = client.dial(&node.to_string()).await.unwrap();
    const MESSAGE: usize = 1 << 20;
    call.write(bytes::Bytes::from(vec![7u8; MESSAGE]))
        .await
        .unwrap();
    // The node's end reaches the client as CLOSE_RSP, while the message is part-way through.
    let _ =
        tokio::time::timeout(WAIT, async { while let Ok(Some(_)) = call.read().await {} }).await;
    go.send(()).unwrap();
    let (got, clean) = tokio::time::timeout(WAIT, seen).await.unwrap().unwrap();
    assert!(
        got == MESSAGE || !clean,
        "the node saw a clean end after {got} of {MESSAGE} bytes"
    );
    at_rest(&s.server, &[&s.agent]).await;
}
