//! The server: accepts agent tunnels over TLS, routes dials to them, and serves the HTTP
//! CONNECT frontend (TCP, optional TLS/mTLS, and a Unix socket) and health and metrics.

pub mod connect;
pub mod grpc;
pub mod identity;
mod metrics;
pub mod registry;
pub mod review;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_proto::session::ServerIdentity;
use tether_proto::{Config, ErrorCode, Session, Time};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

pub use identity::{AddressClaims, HostClaims, IdRule, IdentityPolicy, Tokens};
pub(crate) use metrics::GaugeGuard;
use metrics::Refusal;
pub use metrics::{DIAL_BUCKETS, Metrics};
pub use registry::{Registry, Strategy, parse_strategies};
pub use review::TokenReviewer;

use crate::reload::Reloadable;
use crate::stream::TetherStream;
use crate::tunnel::{
    DialError, Handshake, Start, Tunnel, Verdict, handshake_deadline, session_config,
};

/// What a server needs to run.
#[derive(Clone)]
pub struct ServerConfig {
    /// Where agents connect.
    pub agent_addr: SocketAddr,
    /// TLS for agents; with a client CA, agents must present a certificate it signed. New
    /// handshakes take the material in use when they start (reloaded from its files).
    pub agent_tls: Reloadable<rustls::ServerConfig>,
    /// Accepted bearer tokens and the agent id each is bound to; `None`: no token needed (rely
    /// on client certificates or a TokenReview).
    pub tokens: Option<Reloadable<Tokens>>,
    /// Kubernetes service-account tokens, reviewed by the API server; `None`: no review.
    pub token_review: Option<Arc<TokenReviewer>>,
    /// How agent ids and identifiers are bound to credentials.
    pub identity: IdentityPolicy,
    /// Tunnels one agent id may hold to this server at once; a newer one replaces the oldest.
    pub max_tunnels_per_agent: usize,
    /// Agent connections that may be in their TLS handshake or HELLO at once; more wait in
    /// the listen backlog.
    pub max_handshakes: usize,
    /// Agent connections accepted per second at most, after a burst of
    /// `agent_accept_burst`, so a reconnect storm is taken at a steady rate. 0, a negative
    /// rate, NaN or infinity: no limit; a rate under [`MIN_AGENT_ACCEPT_RATE`] is taken as
    /// that.
    pub agent_accept_rate: f64,
    /// Agent connections accepted at once before the rate applies.
    pub agent_accept_burst: u32,
    /// This server's id (sent in WELCOME).
    pub server_id: String,
    /// How many servers the agents should connect to (HA).
    pub server_count: u16,
    /// A live count of servers (Kubernetes leases); new tunnels are told the larger of it and
    /// `server_count`.
    pub server_count_source: Option<tokio::sync::watch::Receiver<u16>>,
    /// Routing strategies, in order.
    pub strategies: Vec<Strategy>,
    /// How long a dial may take before the client gets 504.
    pub dial_timeout: Duration,
    /// Session settings (windows, keepalive, and the handshake deadline, which covers an
    /// agent's TLS handshake and HELLO together).
    pub session: Config,
    /// HTTP CONNECT on TCP.
    pub connect_addr: Option<SocketAddr>,
    /// TLS for the CONNECT frontend (with a client CA: mTLS required).
    pub connect_tls: Option<Reloadable<rustls::ServerConfig>>,
    /// How often certificate, key, CA and token files are re-read for changes.
    pub reload_interval: Duration,
    /// Replace a Unix socket file that no server answers on (a stale one); one that answers
    /// is never replaced.
    pub delete_existing_uds: bool,
    /// HTTP CONNECT on a Unix socket.
    pub uds_path: Option<PathBuf>,
    /// Konnectivity's gRPC ProxyService on a Unix socket (kube-apiserver's GRPC egress).
    pub grpc_uds_path: Option<PathBuf>,
    /// What the gRPC frontend bounds.
    pub grpc_limits: grpc::GrpcLimits,
    /// Users (uids) allowed to connect to the Unix sockets; `None`: any user the socket's
    /// mode (0770) lets in.
    pub uds_peer_uids: Option<Vec<u32>>,
    /// `/healthz`, `/readyz`, `/metrics` on TCP.
    pub health_addr: Option<SocketAddr>,
    /// How long a CONNECT client may take from its connection to the end of its request head,
    /// TLS handshake included (one budget).
    pub header_timeout: Duration,
}

impl ServerConfig {
    /// A configuration with the defaults the binary uses: agents on `agent_addr` with
    /// `agent_tls`, no tokens, strategy `default`, a 10 s dial timeout, CONNECT on
    /// 127.0.0.1 (an ephemeral port), no Unix socket, no health endpoint.
    pub fn new(
        agent_addr: SocketAddr,
        agent_tls: impl Into<Reloadable<rustls::ServerConfig>>,
    ) -> ServerConfig {
        ServerConfig {
            agent_addr,
            agent_tls: agent_tls.into(),
            tokens: None,
            token_review: None,
            identity: IdentityPolicy::default(),
            max_tunnels_per_agent: 1,
            max_handshakes: 256,
            agent_accept_rate: 0.0,
            agent_accept_burst: 256,
            server_id: "tether-server".into(),
            server_count: 1,
            server_count_source: None,
            strategies: vec![Strategy::Default],
            dial_timeout: Duration::from_secs(10),
            session: Config::default(),
            connect_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            connect_tls: None,
            reload_interval: Duration::from_secs(5),
            delete_existing_uds: true,
            uds_path: None,
            grpc_uds_path: None,
            grpc_limits: grpc::GrpcLimits::default(),
            uds_peer_uids: None,
            health_addr: None,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// The state every listener shares.
pub struct ServerCore {
    /// Connected agents.
    pub registry: Registry,
    /// Counters and gauges for `/metrics`.
    pub metrics: Metrics,
    strategies: Vec<Strategy>,
    dial_timeout: Duration,
    pub(crate) header_timeout: Duration,
}

impl ServerCore {
    /// `/metrics` as of now.
    pub fn render_metrics(&self) -> String {
        self.metrics.render(&self.registry)
    }

    /// Opens a stream to `host:port` through an agent chosen by the routing strategies.
    pub async fn dial(&self, host: &str, port: u16) -> Result<TetherStream, DialError> {
        self.dial_via(host, port).await.map(|(s, _)| s)
    }

    /// [`ServerCore::dial`], with the id of the agent that serves the stream.
    pub async fn dial_via(
        &self,
        host: &str,
        port: u16,
    ) -> Result<(TetherStream, Arc<str>), DialError> {
        let Some((tunnel, agent_id)) = self.registry.route(host, &self.strategies) else {
            self.metrics.dial("no_agent", None);
            return Err(DialError::NoAgent);
        };
        let started = Instant::now();
        // Counted down however the dial ends, a caller giving up on it included.
        let pending = self.metrics.pending_dial();
        let result = tunnel.dial(host, port, self.dial_timeout).await;
        drop(pending);
        let seconds = result.is_ok().then(|| started.elapsed().as_secs_f64());
        self.metrics.dial(
            match &result {
                Ok(_) => "ok",
                Err(DialError::NoAgent) => "no_agent",
                Err(DialError::Timeout) => "timeout",
                Err(DialError::Unavailable(_)) => "unavailable",
                Err(DialError::Failed(e)) => e.code.name().unwrap_or("other"),
            },
            seconds,
        );
        result.map(|s| (s, agent_id))
    }
}

/// A running server.
pub struct Server {
    core: Arc<ServerCore>,
    /// Where agents connect (the bound address).
    pub agent_addr: SocketAddr,
    /// Where CONNECT clients connect over TCP, if enabled.
    pub connect_addr: Option<SocketAddr>,
    /// The Unix socket, if enabled.
    pub uds_path: Option<PathBuf>,
    /// The gRPC Unix socket, if enabled.
    pub grpc_uds_path: Option<PathBuf>,
    /// Where `/healthz`, `/readyz` and `/metrics` are served, if enabled.
    pub health_addr: Option<SocketAddr>,
    /// The socket files' devices and inodes, to unlink them at shutdown only if they are
    /// still ours.
    uds_ids: Vec<(PathBuf, (u64, u64))>,
    /// The server's own tasks, by what they serve; none ends until shutdown unless it fails.
    tasks: crate::Named,
}

/// Tasks aborted when dropped (a start that fails half way leaves nothing running).
struct AbortOnDrop(crate::Named);

impl AbortOnDrop {
    fn push(&mut self, name: &str, task: Option<tokio::task::JoinHandle<()>>) {
        self.0.extend(task.map(|t| (name.to_owned(), t)));
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for (_, t) in &self.0 {
            t.abort();
        }
    }
}

impl Server {
    /// Binds every listener and starts serving.
    pub async fn start(config: ServerConfig) -> io::Result<Server> {
        if config.session.handshake_timeout_ms == 0 {
            // Slots for handshakes are capped: without a deadline, silent connections would
            // hold them for ever (docs/SECURITY.md).
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the agent port needs a handshake deadline (handshake timeout 0)",
            ));
        }
        if config.tokens.is_none() {
            tracing::info!("no agent tokens configured: agents are authenticated by TLS only");
        }
        let mut metrics = Metrics::new();
        metrics.watch_reloads(
            [
                config.agent_tls.stats(),
                config.connect_tls.as_ref().and_then(Reloadable::stats),
                config.tokens.as_ref().and_then(Reloadable::stats),
            ]
            .into_iter()
            .flatten()
            .collect(),
        );
        let core = Arc::new(ServerCore {
            registry: Registry::default(),
            metrics,
            strategies: config.strategies.clone(),
            dial_timeout: config.dial_timeout,
            header_timeout: config.header_timeout,
        });
        // Whatever was started is stopped again if a later listener cannot bind.
        let mut tasks = AbortOnDrop(Vec::new());
        let every = config.reload_interval;
        tasks.push("the agent TLS reloader", config.agent_tls.watch(every));
        tasks.push(
            "the CONNECT TLS reloader",
            config.connect_tls.as_ref().and_then(|t| t.watch(every)),
        );
        tasks.push(
            "the tokens file reloader",
            config.tokens.as_ref().and_then(|t| t.watch(every)),
        );
        let agents = TcpListener::bind(config.agent_addr)
            .await
            .map_err(|e| named(e, format!("agent port {}", config.agent_addr)))?;
        let agent_addr = agents.local_addr()?;
        tasks.push(
            "the agent listener",
            Some(tokio::spawn(accept_agents(
                core.clone(),
                agents,
                Arc::new(config.clone()),
            ))),
        );
        let mut connect_addr = None;
        if let Some(addr) = config.connect_addr {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| named(e, format!("CONNECT frontend {addr}")))?;
            connect_addr = Some(l.local_addr()?);
            tasks.push(
                "the CONNECT listener",
                Some(tokio::spawn(accept_connect_tcp(
                    core.clone(),
                    l,
                    config.connect_tls.clone(),
                ))),
            );
        }
        let mut uds_ids = Vec::new();
        #[cfg(unix)]
        {
            let peers: Option<Arc<[u32]>> = config.uds_peer_uids.as_deref().map(Arc::from);
            if let Some(path) = &config.uds_path {
                let l = bind_uds(path, config.delete_existing_uds)
                    .await
                    .map_err(|e| named(e, format!("Unix socket {}", path.display())))?;
                uds_ids.extend(file_id(path).map(|id| (path.clone(), id)));
                tasks.push(
                    "the CONNECT Unix socket listener",
                    Some(tokio::spawn(accept_uds(
                        core.clone(),
                        l,
                        peers.clone(),
                        None,
                    ))),
                );
            }
            if let Some(path) = &config.grpc_uds_path {
                let l = bind_uds(path, config.delete_existing_uds)
                    .await
                    .map_err(|e| named(e, format!("gRPC Unix socket {}", path.display())))?;
                uds_ids.extend(file_id(path).map(|id| (path.clone(), id)));
                let grpc = Arc::new(grpc::Grpc::new(config.grpc_limits.clone()));
                tasks.push(
                    "the gRPC Unix socket listener",
                    Some(tokio::spawn(accept_uds(core.clone(), l, peers, Some(grpc)))),
                );
            }
        }
        let mut health_addr = None;
        if let Some(addr) = config.health_addr {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| named(e, format!("health port {addr}")))?;
            health_addr = Some(l.local_addr()?);
            tasks.push(
                "the health port",
                Some(tokio::spawn(metrics::serve_health(core.clone(), l))),
            );
        }
        tracing::info!(%agent_addr, ?connect_addr, uds = ?config.uds_path, grpc_uds = ?config.grpc_uds_path, ?health_addr, "server listening");
        Ok(Server {
            core,
            agent_addr,
            connect_addr,
            uds_path: config.uds_path,
            grpc_uds_path: config.grpc_uds_path,
            uds_ids,
            health_addr,
            tasks: std::mem::take(&mut tasks.0),
        })
    }

    /// Serves `/healthz`, `/readyz` and `/metrics` on one more address (the admin port); the
    /// task ends when it is aborted.
    pub async fn serve_health_on(
        &self,
        addr: SocketAddr,
    ) -> io::Result<tokio::task::JoinHandle<()>> {
        let l = TcpListener::bind(addr).await?;
        Ok(tokio::spawn(metrics::serve_health(self.core.clone(), l)))
    }

    /// The library API: a stream to `host:port` through an agent.
    pub async fn dial(&self, host: &str, port: u16) -> Result<TetherStream, DialError> {
        self.core.dial(host, port).await
    }

    /// The shared state (registry, metrics).
    pub fn core(&self) -> &Arc<ServerCore> {
        &self.core
    }

    /// Agents connected now.
    pub fn agents(&self) -> usize {
        self.core.registry.len()
    }

    /// Waits until at least `n` agents are connected, at most `timeout`.
    pub async fn wait_agents(&self, n: usize, timeout: Duration) -> bool {
        crate::wait_until(timeout, || self.agents() >= n).await
    }

    /// Waits until at most `n` agents are connected, at most `timeout`.
    pub async fn wait_agents_at_most(&self, n: usize, timeout: Duration) -> bool {
        crate::wait_until(timeout, || self.agents() <= n).await
    }

    /// Waits until one of the server's own tasks (a listener, a reloader, the health port)
    /// ends, and says which and why. They end only by failing: a panic, which tokio catches
    /// in the task, so the process would run on without, say, its agent listener. The
    /// binary then shuts down with an error, to be restarted. Never ready while all run.
    pub async fn failed(&mut self) -> String {
        crate::first_to_end(&mut self.tasks).await
    }

    /// Stops accepting and closes every tunnel (GOAWAY), after at most `grace` of draining.
    /// Every listener is closed when it returns, so its address can be bound again.
    pub async fn shutdown(self, grace: Duration) {
        for (_, t) in self.tasks {
            t.abort();
            // The listener is dropped with the task; a cancelled task's result is no error.
            if let Err(e) = t.await
                && !e.is_cancelled()
            {
                tracing::warn!(error = %e, "a listener task failed");
            }
        }
        let tunnels = self.core.registry.tunnels();
        for t in &tunnels {
            t.go_away("server shutting down");
        }
        let _ = tokio::time::timeout(grace, async {
            for t in &tunnels {
                t.closed().await;
            }
        })
        .await;
        for t in &tunnels {
            t.close(ErrorCode::NO_ERROR, "server shut down");
        }
        // Another server may own the name now (it replaced a file it found stale): only
        // this server's own socket is removed.
        #[cfg(unix)]
        for (p, id) in &self.uds_ids {
            if file_id(p) == Some(*id) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// The lowest agent accept rate, per second: one connection every 100 s. A lower rate is
/// taken as this one, so the pacer's intervals and debt stay far inside the clock's range.
pub const MIN_AGENT_ACCEPT_RATE: f64 = 0.01;

/// Spaces out accepted agent connections: at most `burst` at once, then `rate` per second
/// (a token bucket); a rate of 0 does not pace.
pub(crate) struct AcceptPacer {
    every: Option<Duration>,
    burst: u32,
    /// When the bucket is full again: each accept moves it one interval on.
    full_at: tokio::time::Instant,
}

impl AcceptPacer {
    pub(crate) fn new(rate: f64, burst: u32) -> AcceptPacer {
        AcceptPacer {
            // At most 100 s, so `every * (burst - 1)` is at most about 4e11 s: no overflow.
            every: (rate > 0.0 && rate.is_finite())
                .then(|| Duration::from_secs_f64(1.0 / rate.max(MIN_AGENT_ACCEPT_RATE))),
            burst: burst.max(1),
            full_at: tokio::time::Instant::now(),
        }
    }

    /// Waits until one more connection may be accepted, and counts it.
    pub(crate) async fn pace(&mut self) {
        let Some(every) = self.every else {
            return;
        };
        let now = tokio::time::Instant::now();
        // An empty bucket is `burst` intervals of debt; a full one is none.
        let full_at = self.full_at.max(now);
        let allowed_debt = every * (self.burst - 1);
        if full_at > now + allowed_debt {
            tokio::time::sleep_until(full_at - allowed_debt).await;
        }
        self.full_at = full_at + every;
    }
}

/// Binds the CONNECT Unix socket with mode 0770 (owner and group, as Konnectivity's server
/// sets it): bound under a temporary name, given its mode, then renamed into place, so no
/// client can connect while it has the umask's mode.
///
/// A socket file already at `path` is replaced only if nothing answers on it (a stale file
/// a crashed server left) and `delete_existing` allows it; a live server's socket is never
/// taken over.
#[cfg(unix)]
async fn bind_uds(
    path: &std::path::Path,
    delete_existing: bool,
) -> io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ));
        }
        let probe = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::UnixStream::connect(path),
        )
        .await;
        // Only a refused connection proves nobody listens: a busy server (a full backlog,
        // EAGAIN), a slow one or a socket we may not open is left alone.
        match probe {
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Ok(Ok(_)) | Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another server is serving on this socket",
                ));
            }
            Ok(Err(e)) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot tell whether a server serves this socket: {e}"),
                ));
            }
        }
        if !delete_existing {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a stale socket file is in the way (--delete-existing-uds-file replaces it)",
            ));
        }
        tracing::info!(path = %path.display(), "replacing a stale socket file nobody serves");
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("directory {} does not exist", dir.display()),
        ));
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let l = tokio::net::UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o770))?;
    // A hard link fails if the name exists: of two servers starting together, the second
    // gets an error instead of silently replacing the first's socket.
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    linked.map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => io::Error::new(
            io::ErrorKind::AddrInUse,
            "another server took this socket while this one started",
        ),
        _ => e,
    })?;
    Ok(l)
}

/// The identity of the socket file at `path` (device and inode), to unlink it at shutdown
/// only if it is still this server's.
#[cfg(unix)]
fn file_id(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

async fn accept_agents(core: Arc<ServerCore>, l: TcpListener, cfg: Arc<ServerConfig>) {
    // Unauthenticated connections cost a task, a TLS state and a session each: at most
    // `max_handshakes` at once; the rest wait in the kernel's backlog (docs/SECURITY.md).
    let handshakes = Arc::new(tokio::sync::Semaphore::new(cfg.max_handshakes.max(1)));
    let mut pacer = AcceptPacer::new(cfg.agent_accept_rate, cfg.agent_accept_burst);
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else {
            return;
        };
        // A reconnect storm (every agent at once after a restart) is taken at a steady rate;
        // the rest wait in the kernel's backlog, or retry.
        pacer.pace().await;
        let Ok((tcp, peer)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        core.metrics.handshaking(true);
        let slot = HandshakeSlot {
            _permit: permit,
            core: core.clone(),
        };
        // The material in use when the handshake starts; a reload changes later ones only.
        let acceptor = TlsAcceptor::from(cfg.agent_tls.get());
        // One span per tunnel: every line it logs names the peer and, once known, the agent.
        let span = tracing::info_span!("tunnel", %peer, agent_id = tracing::field::Empty);
        tokio::spawn(
            serve_agent(core.clone(), cfg.clone(), acceptor, (tcp, peer), slot).instrument(span),
        );
    }
}

/// How long a tunnel replaced by a newer one of the same agent may drain before it is closed.
const REPLACED_GRACE: Duration = Duration::from_secs(10);

/// A place among the connections in their handshake; given back when dropped.
struct HandshakeSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    core: Arc<ServerCore>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.core.metrics.handshaking(false);
    }
}

async fn serve_agent(
    core: Arc<ServerCore>,
    cfg: Arc<ServerConfig>,
    acceptor: TlsAcceptor,
    (tcp, peer): (TcpStream, SocketAddr),
    handshake_slot: HandshakeSlot,
) {
    // The session exists from the first byte: its handshake deadline is the one budget for
    // TLS and HELLO together (SPEC 4.4).
    let epoch = Instant::now();
    let identity = ServerIdentity {
        server_id: cfg.server_id.clone(),
        server_count: cfg
            .server_count_source
            .as_ref()
            .map_or(cfg.server_count, |c| (*c.borrow()).max(cfg.server_count)),
    };
    let session =
        match Session::server(session_config(&cfg.session), identity, Time::from_millis(0)) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "session configuration refused");
                return;
            }
        };
    let tls = acceptor.accept(crate::tls::tunnel_transport(tcp));
    let tls = match handshake_deadline(&session, epoch) {
        Some(deadline) => tokio::time::timeout_at(deadline, tls).await,
        None => Ok(tls.await),
    };
    let mut tls = match tls {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "agent TLS handshake failed");
            core.metrics.agent_refused(Refusal::Tls);
            return;
        }
        Err(_) => {
            // No TLS yet, so no GOAWAY can be sent: the connection just closes.
            tracing::warn!("agent TLS handshake timed out");
            core.metrics.agent_refused(Refusal::Timeout);
            return;
        }
    };
    tls.get_mut()
        .1
        .set_buffer_limit(Some(crate::tls::TUNNEL_SEND_BUFFER));
    // What the connection proved: the verified client certificate's names (mTLS).
    let credential = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        None => identity::Credential::default(),
        Some(der) => match identity::CertNames::from_der(der) {
            Ok(names) => identity::Credential {
                cert: Some(names),
                review: None,
            },
            Err(e) => {
                tracing::warn!(error = %e, "agent refused");
                core.metrics.agent_refused(Refusal::Certificate);
                return;
            }
        },
    };
    let start = Start {
        incoming: None,
        // SPEC 4.2: the protocol carries the id, identifiers and token; the server decides,
        // against what the connection proved (docs/SECURITY.md), once any API call is back.
        policy: Some(Box::new(|_| Verdict::Later)),
        epoch,
        label: format!("server<-{peer}"),
        stats: Some(core.metrics.stats.clone()),
    };
    let (tunnel, handshaking) = Tunnel::spawn(tls, session, start);
    let hello = match handshaking.done().await {
        Ok(Handshake::Hello(h)) => h,
        Ok(Handshake::Welcome(_)) => return,
        Err(reason) => {
            tracing::warn!(%reason, "agent handshake failed");
            core.metrics
                .agent_refused(if reason.code() == ErrorCode::HANDSHAKE_TIMEOUT {
                    Refusal::Timeout
                } else {
                    Refusal::Handshake
                });
            return;
        }
    };
    // The decision races the agent leaving and the handshake deadline: a review nobody waits
    // for any more must not keep its handshake slot.
    let deadline = handshake_deadline_of(epoch, &cfg);
    let verdict = tokio::select! {
        v = authenticate(&cfg, credential, &hello) => v,
        _ = tunnel.closed() => Err(Refused::quiet("the agent left before it was decided")),
        () = tokio::time::sleep_until(deadline) => Err(Refused::quiet("not decided within the handshake deadline")),
    };
    let refused = verdict.as_ref().err().cloned();
    if let Err(e) = tunnel.decide_hello(verdict.map_err(|r| (ErrorCode::UNAUTHORIZED, r.wire))) {
        tracing::warn!(error = %e, "agent's handshake ended before it was decided");
        core.metrics.agent_refused(Refusal::Timeout);
        return;
    }
    if let Some(Refused { log: reason, .. }) = refused {
        tracing::warn!(agent_id = %hello.agent_id.escape_debug(), %reason, "agent refused");
        core.metrics.agent_refused(Refusal::Unauthorized);
        return;
    }
    drop(handshake_slot);
    let agent_id = hello.agent_id.escape_debug().to_string();
    tracing::Span::current().record("agent_id", tracing::field::display(&agent_id));
    let conn = core.registry.add(
        hello.agent_id.clone(),
        hello.identifiers.clone(),
        tunnel.clone(),
    );
    let (drain, close) = core
        .registry
        .over_cap(&hello.agent_id, cfg.max_tunnels_per_agent);
    for old in drain {
        tracing::info!(replaced = %old.label(), "a newer tunnel of the agent replaces its oldest");
        old.go_away("replaced by a newer tunnel of the same agent");
        // A drain ends when the peer answers; one that does not is closed after a grace.
        tokio::spawn(async move {
            if tokio::time::timeout(REPLACED_GRACE, old.closed())
                .await
                .is_err()
            {
                old.close(
                    ErrorCode::NO_ERROR,
                    "replaced; the drain did not end in time",
                );
            }
        });
    }
    for old in close {
        old.close(
            ErrorCode::NO_ERROR,
            "replaced; too many tunnels of this agent",
        );
    }
    core.metrics.agents(core.registry.len());
    tracing::info!(identifiers = ?hello.identifiers, "agent connected");
    let reason = tunnel.closed().await;
    core.registry.remove(conn);
    core.metrics.agents(core.registry.len());
    tracing::info!(%reason, "agent disconnected");
}

async fn accept_connect_tcp(
    core: Arc<ServerCore>,
    l: TcpListener,
    tls: Option<Reloadable<rustls::ServerConfig>>,
) {
    loop {
        let Ok((tcp, peer)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        // One budget for the TLS handshake and the request head together.
        let deadline = tokio::time::Instant::now() + core.header_timeout;
        let core = core.clone();
        let acceptor = tls.as_ref().map(|t| TlsAcceptor::from(t.get()));
        // Two kinds of task, so a plain connection's task is not sized for a TLS one (a
        // rustls connection is over 1 KiB, and every idle connection would carry it).
        let peer = peer.to_string();
        let span = connect::span(
            &peer,
            if acceptor.is_some() {
                connect::Frontend::Tls
            } else {
                connect::Frontend::Tcp
            },
        );
        match acceptor {
            Some(a) => tokio::spawn(
                async move {
                    match tokio::time::timeout_at(deadline, a.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            connect::serve(&core, tls, connect::Frontend::Tls, deadline).await;
                        }
                        Ok(Err(e)) => {
                            tracing::info!(error = %e, "CONNECT client TLS failed")
                        }
                        Err(_) => tracing::info!("CONNECT client TLS timed out"),
                    }
                }
                .instrument(span),
            ),
            None => tokio::spawn(
                async move {
                    connect::serve(&core, tcp, connect::Frontend::Tcp, deadline).await;
                }
                .instrument(span),
            ),
        };
    }
}

/// Serves a Unix socket: CONNECT, or gRPC when `grpc` is given. With `peers`, a client
/// whose user is not listed is refused (a 403 on CONNECT; gRPC: the connection is closed).
#[cfg(unix)]
async fn accept_uds(
    core: Arc<ServerCore>,
    l: tokio::net::UnixListener,
    peers: Option<Arc<[u32]>>,
    grpc: Option<Arc<grpc::Grpc>>,
) {
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let frontend = if grpc.is_some() {
            connect::Frontend::Grpc
        } else {
            connect::Frontend::Uds
        };
        let uid = s.peer_cred().map(|c| c.uid()).ok();
        let span = connect::span(
            &uid.map_or_else(|| "uds".to_owned(), |u| format!("uds uid={u}")),
            frontend,
        );
        let core = core.clone();
        if let Some(allowed) = &peers
            && !uid.is_some_and(|u| allowed.contains(&u))
        {
            let _enter = span.enter();
            tracing::warn!(?uid, "Unix socket client refused: its user is not allowed");
            core.metrics.connect(403);
            if grpc.is_none() {
                let e = connect::HttpError {
                    status: 403,
                    reason: "this user may not use the socket".into(),
                };
                tokio::spawn(async move { connect::answer(&mut s, &e).await });
            }
            continue;
        }
        let deadline = tokio::time::Instant::now() + core.header_timeout;
        match &grpc {
            Some(g) => {
                tokio::spawn(grpc::serve(core, g.clone(), s).instrument(span));
            }
            None => {
                tokio::spawn(
                    async move {
                        connect::serve(&core, s, connect::Frontend::Uds, deadline).await;
                    }
                    .instrument(span),
                );
            }
        }
    }
}

/// Checks an agent's HELLO against what its connection proved and, with Kubernetes
/// authentication, what the API server says of its token. `Err` is the refusal's reason.
async fn authenticate(
    cfg: &ServerConfig,
    mut credential: identity::Credential,
    hello: &tether_proto::frame::Hello,
) -> Result<(), Refused> {
    let tokens = cfg.tokens.as_ref().map(Reloadable::get);
    if let Some(reviewer) = &cfg.token_review {
        // What can be refused without the API server is, first: a peer with garbage costs
        // no API call.
        // Address claims bound to the reviewed node wait for the review.
        let before_review = IdentityPolicy {
            address_claims: match cfg.identity.address_claims {
                AddressClaims::Node => AddressClaims::Any,
                other => other,
            },
            ..cfg.identity.clone()
        };
        identity::check(&before_review, tokens.as_deref(), &credential, hello)
            .map_err(Refused::told)?;
        let token = hello
            .token
            .as_ref()
            .ok_or_else(|| Refused::told("missing token".into()))?;
        let review = reviewer.review(token.expose()).await.map_err(|e| Refused {
            // The API server's words stay in this log: the peer is not authenticated yet.
            wire: match &e {
                crate::kube::ReviewError::Failed(_) => "token review failed".into(),
                _ => "token not accepted".into(),
            },
            log: e.to_string(),
        })?;
        credential.review = Some(review);
    }
    identity::check(&cfg.identity, tokens.as_deref(), &credential, hello).map_err(Refused::told)
}

/// Why an agent was refused: what its GOAWAY says, and what the log says.
#[derive(Debug, Clone)]
struct Refused {
    wire: String,
    log: String,
}

impl Refused {
    /// A reason the agent may read (it names the rule and the flag, nothing of the server's).
    fn told(reason: String) -> Refused {
        Refused {
            wire: reason.clone(),
            log: reason,
        }
    }

    fn quiet(reason: &str) -> Refused {
        Refused::told(reason.into())
    }
}

/// When the handshake of a tunnel started at `epoch` must be done.
fn handshake_deadline_of(epoch: Instant, cfg: &ServerConfig) -> tokio::time::Instant {
    let budget = Duration::from_millis(cfg.session.handshake_timeout_ms);
    tokio::time::Instant::from_std(epoch + budget)
}

/// `e` with what it was about (a flag's file, an address) in front.
fn named(e: io::Error, what: String) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Writes a small HTTP/1.1 response and closes.
pub(crate) async fn respond<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    status: u16,
    text: &str,
    content_type: &str,
    body: &str,
) {
    let head = format!(
        "HTTP/1.1 {status} {text}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(body.as_bytes()).await;
    let _ = s.shutdown().await;
}

#[cfg(test)]
mod pacer_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn accepts_come_in_a_burst_then_at_the_rate() {
        let start = tokio::time::Instant::now();
        let mut p = AcceptPacer::new(10.0, 5);
        let mut at = Vec::new();
        for _ in 0..25 {
            p.pace().await;
            at.push(start.elapsed());
        }
        // The first five at once, then one every 100 ms.
        assert!(at[..5].iter().all(|t| t.is_zero()), "{at:?}");
        assert_eq!(at[5], Duration::from_millis(100));
        assert_eq!(at[24], Duration::from_millis(2000));
        // Idle for a while, the bucket fills up again, but no further than the burst.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let again = tokio::time::Instant::now();
        for _ in 0..6 {
            p.pace().await;
        }
        assert_eq!(again.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_under_the_floor_paces_at_the_floor_and_never_panics() {
        // 1e-20/s would be an interval no Duration holds; with the largest burst, the debt
        // would overflow one too. Both are taken at the floor: one every 100 s.
        for burst in [1, u32::MAX] {
            let start = tokio::time::Instant::now();
            let mut p = AcceptPacer::new(1e-20, burst);
            for _ in 0..3 {
                p.pace().await;
            }
            let waited = start.elapsed();
            let expected = if burst == 1 {
                Duration::from_secs(200)
            } else {
                Duration::ZERO
            };
            assert_eq!(waited, expected, "burst {burst}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_of_zero_does_not_pace() {
        let start = tokio::time::Instant::now();
        let mut p = AcceptPacer::new(0.0, 1);
        for _ in 0..1000 {
            p.pace().await;
        }
        assert!(start.elapsed().is_zero());
    }
}

#[cfg(test)]
mod failure_tests {
    use super::*;

    /// A server with only `tasks`: no listener is bound.
    fn server_with(tasks: Vec<(&str, tokio::task::JoinHandle<()>)>) -> Server {
        Server {
            core: Arc::new(ServerCore {
                registry: Registry::default(),
                metrics: Metrics::new(),
                strategies: vec![Strategy::Default],
                dial_timeout: Duration::from_secs(1),
                header_timeout: Duration::from_secs(1),
            }),
            agent_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            connect_addr: None,
            uds_path: None,
            grpc_uds_path: None,
            health_addr: None,
            uds_ids: Vec::new(),
            tasks: tasks.into_iter().map(|(n, t)| (n.to_owned(), t)).collect(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_whose_tasks_all_run_has_not_failed() {
        let mut s = server_with(vec![
            ("the agent listener", tokio::spawn(std::future::pending())),
            ("the health port", tokio::spawn(std::future::pending())),
        ]);
        let waited = tokio::time::timeout(Duration::from_secs(3600), s.failed()).await;
        assert!(waited.is_err(), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_is_named_with_its_panic() {
        let mut s = server_with(vec![
            ("the agent listener", tokio::spawn(std::future::pending())),
            (
                "the health port",
                tokio::spawn(async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    panic!("planted");
                }),
            ),
        ]);
        let why = s.failed().await;
        assert!(why.starts_with("the health port stopped: "), "{why}");
        assert!(why.contains("planted"), "{why}");
        // The rest still run, and are stopped at shutdown.
        assert_eq!(s.tasks.len(), 1);
        s.shutdown(Duration::ZERO).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_ends_is_named() {
        let mut s = server_with(vec![
            ("the agent listener", tokio::spawn(async {})),
            ("the health port", tokio::spawn(std::future::pending())),
        ]);
        assert_eq!(s.failed().await, "the agent listener stopped");
    }
}
