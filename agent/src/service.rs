//! The agent service: the library's agent (`tether::agent`) with this application's dial
//! policy, counters and configuration.

use rustls::ClientConfig;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether::agent::Dialer;
use tether::reload::Reloadable;
use tether_ops::metrics::GaugeGuard;
use tether_proto::frame::{Dial, Identifier, Protocol};
use tether_proto::{Config, ErrorCode};
use tokio::sync::watch;

use crate::dialer::{self, Allowlist};
use crate::metrics::{self, AgentMetrics};

/// What an agent needs to run.
#[derive(Clone)]
pub struct AgentConfig {
    /// Server addresses, `host:port`; each is one server or a load balancer before several.
    pub servers: Vec<String>,
    /// The name the servers' certificate must carry; `None`: the host part of each address.
    pub server_name: Option<String>,
    /// TLS: the CA that signed the servers' certificate, and the agent's client certificate.
    /// Each connection takes the material in use when it starts (reloaded from its files).
    pub tls: Reloadable<ClientConfig>,
    /// How often the certificate files are re-read for changes.
    pub reload_interval: Duration,
    /// Overrides the servers' count with one read elsewhere (Kubernetes leases); `None`:
    /// the count each server announces.
    pub server_count: Option<watch::Receiver<u16>>,
    /// The agent id.
    pub agent_id: String,
    /// What the agent can reach (routing at the server).
    pub identifiers: Vec<Identifier>,
    /// A bearer token file, read at every connection (tokens rotate).
    pub token_path: Option<std::path::PathBuf>,
    /// Which destinations may be dialled.
    pub allowlist: Allowlist,
    /// How long a dial to a destination may take.
    pub dial_timeout: Duration,
    /// First reconnect delay; doubles up to `sync_interval_cap`, with jitter.
    pub sync_interval: Duration,
    /// Longest reconnect delay.
    pub sync_interval_cap: Duration,
    /// Session settings (windows, keepalive, and the handshake deadline, which covers the TCP
    /// connect, TLS and WELCOME together).
    pub session: Config,
    /// With `server_count`: keep the larger of it and what the servers announce
    /// (Konnectivity's `--server-count-source max`) instead of it alone.
    pub server_count_max: bool,
    /// Where this agent counts what it does (`/metrics`).
    pub metrics: Arc<AgentMetrics>,
    /// How long a stream whose destination has finished sending may wait for the server's
    /// credit without moving a byte (`tether::pump::LINGER`).
    pub linger: Duration,
}

impl AgentConfig {
    /// A configuration with the defaults the binary uses: `servers` over `tls`, no
    /// identifiers, no token, everything allowed, a 10 s dial timeout, reconnects from 1 s
    /// doubling to 10 s.
    pub fn new(
        servers: Vec<String>,
        tls: impl Into<Reloadable<ClientConfig>>,
        agent_id: impl Into<String>,
    ) -> AgentConfig {
        let t = tether::agent::AgentConfig::new(servers, tls, agent_id);
        AgentConfig {
            servers: t.servers,
            server_name: t.server_name,
            tls: t.tls,
            reload_interval: t.reload_interval,
            server_count: t.server_count,
            agent_id: t.agent_id,
            identifiers: t.identifiers,
            token_path: t.token_path,
            allowlist: Allowlist::default(),
            dial_timeout: Duration::from_secs(10),
            sync_interval: t.sync_interval,
            sync_interval_cap: t.sync_interval_cap,
            session: t.session,
            server_count_max: t.server_count_max,
            metrics: Arc::new(AgentMetrics::new()),
            linger: t.linger,
        }
    }
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("servers", &self.servers)
            .field("agent_id", &self.agent_id)
            .field("identifiers", &self.identifiers)
            .field("allowlist", &self.allowlist)
            .finish_non_exhaustive()
    }
}

/// The agent's dial policy: TCP only, destinations on the allowlist (names resolved once,
/// every address checked, exactly a checked address dialled), within the dial timeout;
/// counted by result.
struct PolicyDialer {
    allowlist: Allowlist,
    timeout: Duration,
    metrics: Arc<AgentMetrics>,
}

impl Dialer for PolicyDialer {
    type Conn = metrics::Endpoint;

    async fn dial(&self, d: &Dial) -> Result<Self::Conn, (ErrorCode, String)> {
        let m = &self.metrics;
        let refuse = |code: ErrorCode, reason: String| {
            m.dial(code.name().unwrap_or("other"));
            Err((code, reason))
        };
        if d.protocol != Protocol::TCP {
            return refuse(ErrorCode::DIAL_UNSUPPORTED, "only TCP is supported".into());
        }
        if !self.allowlist.allows(&d.host, d.port) {
            tracing::warn!("dial refused: destination not on the allowlist");
            return refuse(
                ErrorCode::DIAL_FORBIDDEN,
                "destination not on the agent's allowlist".into(),
            );
        }
        let started = Instant::now();
        match dialer::connect(&self.allowlist, &d.host, d.port, self.timeout).await {
            Ok(socket) => {
                m.dial_seconds.observe(started.elapsed().as_secs_f64());
                m.dial("ok");
                Ok(metrics::Endpoint {
                    socket,
                    _open: GaugeGuard::up(&m.open_endpoints),
                })
            }
            Err((code, reason)) => refuse(code, reason),
        }
    }
}

/// A running agent: the library's, with this application's dial policy and metrics.
pub struct Agent {
    inner: tether::agent::Agent,
}

impl Agent {
    /// Starts connecting to every server; returns at once.
    pub fn start(config: AgentConfig) -> Agent {
        if config.allowlist.allows_all() {
            tracing::warn!(
                "no destination allowlist: every destination may be dialled but the agent's own loopback, link-local and unspecified addresses"
            );
        }
        tracing::info!(allowlist = %config.allowlist, "effective dial policy");
        let tunnels = tether::agent::AgentConfig {
            servers: config.servers,
            server_name: config.server_name,
            tls: config.tls,
            reload_interval: config.reload_interval,
            server_count: config.server_count,
            server_count_max: config.server_count_max,
            agent_id: config.agent_id,
            identifiers: config.identifiers,
            token_path: config.token_path,
            sync_interval: config.sync_interval,
            sync_interval_cap: config.sync_interval_cap,
            session: config.session,
            stats: config.metrics.stats.clone(),
            linger: config.linger,
        };
        let metrics = config.metrics.clone();
        let dialer = PolicyDialer {
            allowlist: config.allowlist,
            timeout: config.dial_timeout,
            metrics: config.metrics,
        };
        let inner = tether::agent::Agent::start(tunnels, dialer);
        metrics.watch_tunnels(inner.tunnel_set());
        Agent { inner }
    }

    /// Waits until one of the agent's own tasks ends before a drain, and says which and why
    /// (see `tether::agent::Agent::failed`).
    pub async fn failed(&mut self) -> String {
        self.inner.failed().await
    }

    /// Serves `/healthz`, `/readyz` (ready while a tunnel is open) and `/metrics` on `addr`;
    /// the task ends when it is aborted.
    pub async fn serve_health(
        &self,
        addr: std::net::SocketAddr,
        metrics: Arc<AgentMetrics>,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        metrics::serve_health(&self.inner, addr, metrics).await
    }

    /// Streams open on the agent's tunnels now, pending dials included.
    pub fn open_streams(&self) -> usize {
        self.inner
            .tunnels()
            .iter()
            .map(tether::Tunnel::stream_count)
            .sum()
    }

    /// Tunnels currently open.
    pub fn connected(&self) -> usize {
        self.inner.connected()
    }

    /// Waits until at least `n` tunnels are open, at most `timeout`.
    pub async fn wait_connected(&self, n: usize, timeout: Duration) -> bool {
        self.inner.wait_connected(n, timeout).await
    }

    /// Announces a drain to come (the first SIGTERM): no reconnects, DRAINING on every tunnel;
    /// dials are served until [`Agent::drain`]. The tunnels that took the notice.
    pub fn announce_draining(&self) -> usize {
        self.inner.announce_draining()
    }

    /// Drains (SIGTERM): no reconnects, GOAWAY on every tunnel, waits for their streams to
    /// finish, at most `grace`; then closes what is left.
    pub async fn drain(&self, grace: Duration) {
        self.inner.drain(grace).await;
    }
}
