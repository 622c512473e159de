//! tether-bench: the workloads shared by the criterion groups (`benches/`) and the report
//! runner (`src/bin/report.rs`): a loopback backend, three ways to reach it (direct TCP,
//! through tether's HTTP CONNECT frontend and TLS tunnel, through yamux over the same kind of
//! TLS connection), and throughput and dial-latency measurements over any of them.

pub mod konnectivity;
pub mod procs;
pub mod relays;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::poll_fn;
use tether::tls::{self, testpki::Ca, testpki::Pem};
use tether_agent::{Agent, AgentConfig, Allowlist};
use tether_server::{Server, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util_compat::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

/// A throwaway PKI.
pub struct Pki {
    /// The CA.
    pub ca: Ca,
    /// The server's certificate (localhost, 127.0.0.1).
    pub server: Pem,
    /// The agent's client certificate.
    pub agent: Pem,
}

impl Default for Pki {
    fn default() -> Self {
        let ca = Ca::new("tether bench CA");
        let server = ca.leaf("tether-server", &["localhost", "127.0.0.1"]);
        let agent = ca.leaf("bench-agent", &["bench-agent"]);
        Pki { ca, server, agent }
    }
}

impl Pki {
    /// The PKI as PEM files in `dir`, each name starting with `prefix`, for processes started
    /// with file flags.
    pub fn files(&self, dir: &std::path::Path, prefix: &str) -> io::Result<konnectivity::Files> {
        let write = |name: &str, body: &str| -> io::Result<std::path::PathBuf> {
            let p = dir.join(format!("{prefix}{name}"));
            std::fs::write(&p, body)?;
            Ok(p)
        };
        Ok(konnectivity::Files {
            ca: write("ca.pem", &self.ca.pem.cert)?,
            server_cert: write("server.pem", &self.server.cert)?,
            server_key: write("server-key.pem", &self.server.key)?,
            agent_cert: write("agent.pem", &self.agent.cert)?,
            agent_key: write("agent-key.pem", &self.agent.key)?,
        })
    }
}

/// A stream to the backend, whichever way it goes.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The backend: the client sends a command byte and a big-endian u64 `n`.
/// `D`: the backend sends `n` bytes and closes; `U`: it reads `n` bytes and answers `!`;
/// `E`: it echoes until EOF.
pub async fn backend() -> io::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(serve_backend(s));
        }
    });
    Ok(addr)
}

/// Serves the backend's protocol on `l` (an address of the caller's choosing).
pub fn backend_on(l: TcpListener) {
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(serve_backend(s));
        }
    });
}

async fn serve_backend(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut cmd = [0u8; 9];
    s.read_exact(&mut cmd).await?;
    let n = u64::from_be_bytes(cmd[1..].try_into().unwrap_or_default());
    match cmd[0] {
        b'D' => {
            let chunk = vec![0x5au8; 256 * 1024];
            let mut left = n;
            while left > 0 {
                let k = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
                s.write_all(&chunk[..k]).await?;
                left -= k as u64;
            }
            s.shutdown().await
        }
        b'U' => {
            drain(&mut s, n).await?;
            s.write_all(b"!").await?;
            s.shutdown().await
        }
        _ => {
            let (mut r, mut w) = s.split();
            tokio::io::copy(&mut r, &mut w).await?;
            w.shutdown().await
        }
    }
}

async fn drain<S: AsyncRead + Unpin>(s: &mut S, n: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = n;
    while left > 0 {
        let k = s.read(&mut buf).await?;
        if k == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short stream"));
        }
        left = left.saturating_sub(k as u64);
    }
    Ok(())
}

/// A way to reach the backend.
#[derive(Clone)]
pub enum Via {
    /// Straight TCP.
    Direct,
    /// Through a tether server's HTTP CONNECT frontend at this address.
    Tether(SocketAddr),
    /// Through a tether server and agent in this process, opened with the library's
    /// [`Server::dial`] (no HTTP CONNECT hop): the same shape as [`Via::Yamux`].
    Dial(Arc<Server>),
    /// Through yamux over TLS; every stream is forwarded to the backend.
    Yamux(YamuxClient),
    /// Through a tether server's HTTP CONNECT frontend over TLS at this address, as a client
    /// with this configuration connects (`true`: it keeps sessions and resumes them).
    TetherTls(SocketAddr, Arc<tokio_rustls::rustls::ClientConfig>, bool),
    /// Through a tether server's gRPC frontend on this Unix socket, as kube-apiserver's
    /// GRPC egress opens it: a new channel (connection) per dial, one `Proxy` call on it.
    Grpc(std::path::PathBuf),
    /// Through an HTTP CONNECT frontend on this Unix socket (tether's or Konnectivity's
    /// `--uds-name`), named for tables.
    ConnectUds(std::path::PathBuf, &'static str),
    /// Through a gRPC ProxyService on this Unix socket (tether's or Konnectivity's), named
    /// for tables: a new channel per dial, as kube-apiserver opens them.
    GrpcUds(std::path::PathBuf, &'static str),
    /// Through a port that forwards every connection to the backend (ssh -R, socat): no
    /// request, the connection is the stream. Named for tables.
    Forward(SocketAddr, &'static str),
}

impl Via {
    /// A name for tables.
    pub fn name(&self) -> &'static str {
        match self {
            Via::Direct => "direct TCP",
            Via::Tether(_) => "tether",
            Via::Dial(_) => "tether (dial API)",
            Via::Yamux(_) => "yamux",
            Via::Grpc(_) => "tether gRPC",
            Via::TetherTls(_, _, true) => "tether TLS, resuming",
            Via::TetherTls(_, _, false) => "tether TLS, full handshakes",
            Via::ConnectUds(_, name) | Via::GrpcUds(_, name) | Via::Forward(_, name) => name,
        }
    }

    /// Opens a stream to `backend`.
    pub async fn open(&self, backend: SocketAddr) -> io::Result<Box<dyn Io>> {
        match self {
            Via::Direct => {
                let s = TcpStream::connect(backend).await?;
                s.set_nodelay(true)?;
                Ok(Box::new(s))
            }
            Via::Tether(frontend) => Ok(Box::new(
                tether_server::client::connect::client(*frontend, &backend.to_string()).await?,
            )),
            Via::Dial(server) => Ok(Box::new(
                server
                    .dial(&backend.ip().to_string(), backend.port())
                    .await
                    .map_err(|e| io::Error::other(e.to_string()))?,
            )),
            Via::Yamux(c) => c.open().await,
            Via::Grpc(path) => grpc_open(path, backend).await,
            Via::TetherTls(frontend, config, _) => {
                tls_connect(*frontend, config.clone(), backend).await
            }
            Via::GrpcUds(path, _) => grpc_open(path, backend).await,
            Via::Forward(addr, _) => {
                let s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                Ok(Box::new(s))
            }
            Via::ConnectUds(path, _) => {
                let mut s = tokio::net::UnixStream::connect(path).await?;
                connect_request(&mut s, backend).await?;
                Ok(Box::new(s))
            }
        }
    }
}

/// Asks for `target` on a CONNECT frontend connection, as kube-apiserver does, and reads
/// the answer's head byte by byte (so nothing after it is taken); `Err` unless it is a 200.
pub async fn connect_request<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    target: SocketAddr,
) -> io::Result<()> {
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await?;
    s.flush().await?;
    let mut head = Vec::with_capacity(64);
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await? == 0 || head.len() > 1024 {
            return Err(io::Error::other("the frontend closed the CONNECT"));
        }
        head.push(b[0]);
    }
    if !head.starts_with(b"HTTP/1.1 200") {
        return Err(io::Error::other(
            String::from_utf8_lossy(&head).into_owned(),
        ));
    }
    Ok(())
}

/// A CONNECT over TLS: handshake (resumed if the configuration keeps sessions and has one),
/// request, response head; then the TLS stream.
async fn tls_connect(
    frontend: SocketAddr,
    config: Arc<tokio_rustls::rustls::ClientConfig>,
    backend: SocketAddr,
) -> io::Result<Box<dyn Io>> {
    let tcp = TcpStream::connect(frontend).await?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from("localhost").map_err(io::Error::other)?;
    let mut s = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    connect_request(&mut s, backend).await?;
    Ok(Box::new(s))
}

/// TLS client configurations for the CONNECT frontend: one that resumes sessions (rustls's
/// default in-memory cache) and one that always makes a full handshake.
pub fn frontend_clients(
    pki: &Pki,
) -> io::Result<(
    Arc<tokio_rustls::rustls::ClientConfig>,
    Arc<tokio_rustls::rustls::ClientConfig>,
)> {
    let resuming = tls::client_config(pki.ca.pem.cert.as_bytes(), None)?;
    let mut fresh = (*resuming).clone();
    fresh.resumption = tokio_rustls::rustls::client::Resumption::disabled();
    Ok((resuming, Arc::new(fresh)))
}

/// A gRPC dial as a byte stream: a task moves bytes between the call and one end of an
/// in-memory pipe, as kube-apiserver's Konnectivity client moves them between the call and
/// the `net.Conn` it hands out.
async fn grpc_open(path: &std::path::Path, backend: SocketAddr) -> io::Result<Box<dyn Io>> {
    use tether_server::client::grpc::{AuthorityStyle, GrpcClient};
    let client = GrpcClient::connect(path, AuthorityStyle::PercentEncoded).await?;
    let mut call = client
        .dial(&backend.to_string())
        .await
        .map_err(|e| io::Error::other(e.to_string()))?;
    let (mine, theirs) = tokio::io::duplex(256 * 1024);
    tokio::spawn(async move {
        let _channel = client;
        let (mut r, mut w) = tokio::io::split(theirs);
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            tokio::select! {
                n = r.read(&mut buf) => match n {
                    Ok(0) | Err(_) => {
                        let _ = call.close().await;
                        return;
                    }
                    Ok(n) => {
                        if call.write(bytes::Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                            return;
                        }
                    }
                },
                data = call.read() => match data {
                    Ok(Some(d)) => {
                        if w.write_all(&d).await.is_err() {
                            return;
                        }
                    }
                    _ => {
                        let _ = w.shutdown().await;
                        return;
                    }
                },
            }
        }
    });
    Ok(Box::new(mine))
}

/// Moves `total` bytes from the backend (`download`) or to it over `streams` parallel streams;
/// returns the wall time.
pub async fn throughput(
    via: &Via,
    backend: SocketAddr,
    download: bool,
    streams: usize,
    total: u64,
) -> io::Result<Duration> {
    let per = total / streams.max(1) as u64;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..streams.max(1) {
        let via = via.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = via.open(backend).await?;
            let mut cmd = [0u8; 9];
            cmd[0] = if download { b'D' } else { b'U' };
            cmd[1..].copy_from_slice(&per.to_be_bytes());
            s.write_all(&cmd).await?;
            if download {
                drain(&mut s, per).await?;
            } else {
                let chunk = vec![0xa5u8; 256 * 1024];
                let mut left = per;
                while left > 0 {
                    let k = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
                    s.write_all(&chunk[..k]).await?;
                    left -= k as u64;
                }
                let mut ok = [0u8; 1];
                s.read_exact(&mut ok).await?;
            }
            Ok::<(), io::Error>(())
        }));
    }
    for t in tasks {
        t.await.map_err(io::Error::other)??;
    }
    Ok(start.elapsed())
}

/// Opens `count` streams, `concurrency` at a time, each timed from connect to its first echoed
/// byte; returns the latencies sorted.
pub async fn dial_latency(
    via: &Via,
    backend: SocketAddr,
    concurrency: usize,
    count: usize,
) -> io::Result<Vec<Duration>> {
    let per = count / concurrency.max(1);
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let via = via.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(per);
            for _ in 0..per {
                let start = Instant::now();
                let mut s = via.open(backend).await?;
                s.write_all(b"E\0\0\0\0\0\0\0\0x").await?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await?;
                out.push(start.elapsed());
            }
            Ok::<_, io::Error>(out)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.map_err(io::Error::other)??);
    }
    all.sort();
    Ok(all)
}

/// The quantile of sorted latencies at `permille` (500: the median, 990: p99).
pub fn quantile(sorted: &[Duration], permille: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = (sorted.len() - 1) * permille.min(1000) / 1000;
    sorted[i]
}

/// A tether server and agent in this process, on loopback, with mTLS.
pub async fn tether_in_process(pki: &Pki) -> io::Result<(Server, Agent)> {
    let server_tls = tls::server_config(
        pki.server.cert.as_bytes(),
        pki.server.key.as_bytes(),
        Some(pki.ca.pem.cert.as_bytes()),
    )?;
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let server = Server::start(ServerConfig {
        server_id: "bench-server".into(),
        connect_addr: Some(loopback),
        ..ServerConfig::new(loopback, server_tls)
    })
    .await?;
    let agent_tls = tls::client_config(
        pki.ca.pem.cert.as_bytes(),
        Some((pki.agent.cert.as_bytes(), pki.agent.key.as_bytes())),
    )?;
    let agent = Agent::start(AgentConfig {
        server_name: Some("localhost".into()),
        allowlist: Allowlist::parse("127.0.0.0/8").map_err(io::Error::other)?,
        sync_interval: Duration::from_millis(100),
        ..AgentConfig::new(
            vec![server.agent_addr.to_string()],
            agent_tls,
            "bench-agent",
        )
    });
    if !server.wait_agents(1, Duration::from_secs(10)).await {
        return Err(io::Error::other("the agent did not connect"));
    }
    Ok((server, agent))
}

/// The client end of a yamux connection over TLS.
#[derive(Clone)]
pub struct YamuxClient {
    open: mpsc::Sender<oneshot::Sender<yamux::Stream>>,
}

impl YamuxClient {
    async fn open(&self) -> io::Result<Box<dyn Io>> {
        let (tx, rx) = oneshot::channel();
        self.open
            .send(tx)
            .await
            .map_err(|_| io::Error::other("yamux connection gone"))?;
        let s = rx
            .await
            .map_err(|_| io::Error::other("yamux open failed"))?;
        Ok(Box::new(s.compat()))
    }
}

/// A yamux server (forwarding every stream to `backend`) and a client, over TLS like tether's
/// tunnel, on loopback.
pub async fn yamux_pair(pki: &Pki, backend: SocketAddr) -> io::Result<YamuxClient> {
    let server_tls = tls::server_config(
        pki.server.cert.as_bytes(),
        pki.server.key.as_bytes(),
        Some(pki.ca.pem.cert.as_bytes()),
    )?;
    let client_tls = tls::client_config(
        pki.ca.pem.cert.as_bytes(),
        Some((pki.agent.cert.as_bytes(), pki.agent.key.as_bytes())),
    )?;
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        let Ok((tcp, _)) = l.accept().await else {
            return;
        };
        let _ = tcp.set_nodelay(true);
        let Ok(tls) = tokio_rustls::TlsAcceptor::from(server_tls)
            .accept(tcp)
            .await
        else {
            return;
        };
        let mut conn =
            yamux::Connection::new(tls.compat(), yamux::Config::default(), yamux::Mode::Server);
        while let Some(Ok(stream)) = poll_fn(|cx| conn.poll_next_inbound(cx)).await {
            tokio::spawn(async move {
                let Ok(mut out) = TcpStream::connect(backend).await else {
                    return;
                };
                let _ = out.set_nodelay(true);
                let mut s = stream.compat();
                let _ = tokio::io::copy_bidirectional(&mut s, &mut out).await;
            });
        }
    });
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from("localhost").map_err(io::Error::other)?;
    let tls = tokio_rustls::TlsConnector::from(client_tls)
        .connect(name, tcp)
        .await?;
    let mut conn =
        yamux::Connection::new(tls.compat(), yamux::Config::default(), yamux::Mode::Client);
    let (tx, mut rx) = mpsc::channel::<oneshot::Sender<yamux::Stream>>(1024);
    tokio::spawn(async move {
        // yamux's connection only makes progress while it is polled: one task drives it.
        let mut waiting: Vec<oneshot::Sender<yamux::Stream>> = Vec::new();
        poll_fn(|cx| {
            while let std::task::Poll::Ready(Some(w)) = rx.poll_recv(cx) {
                waiting.push(w);
            }
            while !waiting.is_empty() {
                match conn.poll_new_outbound(cx) {
                    std::task::Poll::Ready(Ok(s)) => {
                        let _ = waiting.remove(0).send(s);
                    }
                    std::task::Poll::Ready(Err(_)) => return std::task::Poll::Ready(()),
                    std::task::Poll::Pending => break,
                }
            }
            loop {
                match conn.poll_next_inbound(cx) {
                    std::task::Poll::Ready(Some(Ok(_))) => {}
                    std::task::Poll::Ready(_) => return std::task::Poll::Ready(()),
                    std::task::Poll::Pending => return std::task::Poll::Pending,
                }
            }
        })
        .await;
    });
    Ok(YamuxClient { open: tx })
}

/// Whether criterion was started by `cargo bench` (full runs) rather than `cargo test` (each
/// benchmark once, with small sizes).
pub fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}
