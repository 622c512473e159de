//! The agent: dials out to the servers over TLS, serves their dials (docs/ARCHITECTURE.md).

pub mod dialer;
mod metrics;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tether_proto::frame::{Identifier, Protocol, Token};
use tether_proto::session::AgentIdentity;
use tether_proto::{Config, ErrorCode, Session, Time};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsConnector;
use tracing::Instrument;

pub use dialer::Allowlist;
pub use metrics::AgentMetrics;

use crate::pump::pump;
use crate::reload::Reloadable;
use crate::tunnel::{Handshake, Incoming, Start, Tunnel, handshake_deadline};

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
        AgentConfig {
            servers,
            server_name: None,
            tls: tls.into(),
            reload_interval: Duration::from_secs(5),
            server_count: None,
            agent_id: agent_id.into(),
            identifiers: Vec::new(),
            token_path: None,
            allowlist: Allowlist::default(),
            dial_timeout: Duration::from_secs(10),
            sync_interval: Duration::from_secs(1),
            sync_interval_cap: Duration::from_secs(10),
            session: Config::default(),
            server_count_max: false,
            metrics: Arc::new(AgentMetrics::new()),
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

/// A running agent.
pub struct Agent {
    shutdown: watch::Sender<bool>,
    tunnels: Arc<Mutex<Vec<Tunnel>>>,
    /// One loop per server address, and the TLS reloader: none ends before a drain unless it
    /// fails. The loops end by themselves once the agent drains or is dropped.
    tasks: crate::Named,
    reload: Option<tokio::task::AbortHandle>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(t) = &self.reload {
            t.abort();
        }
    }
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
        let (shutdown, rx) = watch::channel(false);
        let tunnels = Arc::new(Mutex::new(Vec::new()));
        // Tunnels by server id, across every address: the servers are counted once, however
        // many addresses lead to them.
        let by_server = Arc::new(Mutex::new(HashMap::new()));
        let config = Arc::new(config);
        let mut tasks = crate::Named::new();
        for addr in config.servers.clone() {
            let span = tracing::info_span!("server", %addr, server_id = tracing::field::Empty);
            let shared = Shared {
                all: tunnels.clone(),
                by_server: by_server.clone(),
            };
            let name = format!("the connection loop for {addr}");
            let task = manage(config.clone(), addr, rx.clone(), shared).instrument(span);
            tasks.push((name, tokio::spawn(task)));
        }
        let reload = config.tls.watch(config.reload_interval);
        let abort = reload.as_ref().map(tokio::task::JoinHandle::abort_handle);
        tasks.extend(reload.map(|t| ("the TLS reloader".to_owned(), t)));
        Agent {
            shutdown,
            tunnels,
            tasks,
            reload: abort,
        }
    }

    /// Waits until one of the agent's own tasks ends before a drain, and says which and why.
    /// They end early only by failing (a panic, which tokio catches in the task, so the agent
    /// would run on without a server's connection loop); the binary then shuts down with an
    /// error, to be restarted. Never ready while all run. See [`crate::Server::failed`].
    pub async fn failed(&mut self) -> String {
        crate::first_to_end(&mut self.tasks).await
    }

    /// Serves `/healthz`, `/readyz` (ready while a tunnel is open) and `/metrics` on `addr`;
    /// the task ends when it is aborted.
    pub async fn serve_health(
        &self,
        addr: std::net::SocketAddr,
        metrics: Arc<AgentMetrics>,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let l = tokio::net::TcpListener::bind(addr).await?;
        let tunnels = self.tunnels.clone();
        let answer = move |path: &str| -> crate::metrics::Answer {
            let open = tunnels
                .lock()
                .map(|t| t.iter().filter(|t| t.is_usable()).count())
                .unwrap_or(0);
            match path {
                "/healthz" => (200, "OK", "text/plain", "ok\n".into()),
                "/readyz" | "/ready" if open > 0 => (200, "OK", "text/plain", "ready\n".into()),
                "/readyz" | "/ready" => (
                    503,
                    "Service Unavailable",
                    "text/plain",
                    "no tunnel to a server\n".into(),
                ),
                "/metrics" => (200, "OK", crate::metrics::OPENMETRICS, metrics.render()),
                _ => (404, "Not Found", "text/plain", "not found\n".into()),
            }
        };
        Ok(tokio::spawn(crate::metrics::serve(l, Arc::new(answer))))
    }

    /// Tunnels currently open.
    pub fn connected(&self) -> usize {
        self.tunnels
            .lock()
            .map(|t| t.iter().filter(|t| t.is_usable()).count())
            .unwrap_or(0)
    }

    /// Waits until at least `n` tunnels are open, at most `timeout`.
    pub async fn wait_connected(&self, n: usize, timeout: Duration) -> bool {
        crate::wait_until(timeout, || self.connected() >= n).await
    }

    /// Drains (SIGTERM): no reconnects, GOAWAY on every tunnel, waits for their streams to
    /// finish, at most `grace`; then closes what is left.
    pub async fn drain(&self, grace: Duration) {
        let _ = self.shutdown.send(true);
        let tunnels: Vec<Tunnel> = self.tunnels.lock().map(|t| t.clone()).unwrap_or_default();
        for t in &tunnels {
            t.go_away("agent shutting down");
        }
        let all = futures_all(tunnels.iter().map(|t| t.closed()));
        if tokio::time::timeout(grace, all).await.is_err() {
            for t in &tunnels {
                t.close(ErrorCode::NO_ERROR, "agent shut down");
            }
        }
    }
}

async fn futures_all<F: std::future::Future>(fs: impl Iterator<Item = F>) {
    for f in fs {
        f.await;
    }
}

/// What the address loops of one agent share.
struct Shared {
    /// Every open tunnel (drain, health).
    all: Arc<Mutex<Vec<Tunnel>>>,
    /// Tunnels by server id, over every address.
    by_server: Arc<Mutex<HashMap<String, Tunnel>>>,
}

/// Dials one server address until the agent holds tunnels to as many distinct server ids as
/// the server count says, over all its addresses; reconnects with exponential backoff and
/// jitter. An address that leads to a server already held backs off the same way, so a list
/// of direct server addresses does not churn duplicate tunnels.
async fn manage(
    cfg: Arc<AgentConfig>,
    addr: String,
    mut shutdown: watch::Receiver<bool>,
    shared: Shared,
) {
    let Shared { all, by_server } = shared;
    let mut backoff = cfg.sync_interval;
    let mut want = 1usize;
    // The count the last server reached announced (Konnectivity's `--server-count-source`).
    let mut announced = 1usize;
    loop {
        if *shutdown.borrow() {
            return;
        }
        cfg.metrics.syncs.inc();
        let held = by_server
            .lock()
            .map(|mut m| {
                m.retain(|_, t| t.close_reason().is_none());
                m.len()
            })
            .unwrap_or(0);
        // A count read from the cluster (leases) outranks what the servers announce, once
        // it is known (0: no list has succeeded, or no lease is valid).
        if let Some(count) = &cfg.server_count {
            let leases = usize::from(*count.borrow());
            want = match (leases, cfg.server_count_max) {
                (0, _) => announced,
                (n, true) => n.max(announced),
                (n, false) => n,
            };
        }
        cfg.metrics
            .server_count
            .set(i64::try_from(want).unwrap_or(i64::MAX));
        let open = all
            .lock()
            .map(|mut list| {
                list.retain(|t| t.close_reason().is_none());
                list.len()
            })
            .unwrap_or(0);
        cfg.metrics
            .tunnels
            .set(i64::try_from(open).unwrap_or(i64::MAX));
        if held >= want {
            tokio::select! {
                // The agent's handle is gone (dropped without a drain): stop too.
                r = shutdown.changed() => if r.is_err() { return; },
                () = tokio::time::sleep(cfg.sync_interval.max(Duration::from_millis(50))) => {}
            }
            continue;
        }
        match connect_once(&cfg, &addr).await {
            Ok((tunnel, server_id, count)) => {
                announced = usize::from(count.max(1));
                if cfg.server_count.is_none() {
                    want = usize::from(count.max(1));
                }
                let new = match by_server.lock() {
                    Ok(mut m) => match m.entry(server_id) {
                        std::collections::hash_map::Entry::Occupied(_) => false,
                        std::collections::hash_map::Entry::Vacant(slot) => {
                            tracing::Span::current()
                                .record("server_id", tracing::field::display(slot.key()));
                            slot.insert(tunnel.clone());
                            true
                        }
                    },
                    Err(_) => false,
                };
                if new {
                    tracing::info!(server_count = count, "tunnel established");
                    if let Ok(mut list) = all.lock() {
                        list.push(tunnel);
                    }
                    backoff = cfg.sync_interval;
                } else {
                    // A load balancer sent us to a server we already have, or this address is
                    // one we already reached through another.
                    cfg.metrics.duplicates.inc();
                    tunnel.go_away("already connected to this server");
                    tokio::select! {
                        r = shutdown.changed() => if r.is_err() { return; },
                        () = tokio::time::sleep(jitter(backoff)) => {}
                    }
                    backoff = (backoff * 2).min(cfg.sync_interval_cap);
                }
            }
            Err(e) => {
                tracing::warn!(%addr, error = %e, retry_in = ?backoff, "connecting to the server failed");
                tokio::select! {
                    r = shutdown.changed() => if r.is_err() { return; },
                    () = tokio::time::sleep(jitter(backoff)) => {}
                }
                backoff = (backoff * 2).min(cfg.sync_interval_cap);
            }
        }
    }
}

fn jitter(d: Duration) -> Duration {
    // Up to +50%, so that agents restarted together do not reconnect in step.
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(ms + rand::rng().random_range(0..=ms / 2))
}

async fn connect_once(
    cfg: &Arc<AgentConfig>,
    addr: &str,
) -> Result<(Tunnel, String, u16), Box<dyn std::error::Error + Send + Sync>> {
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = cfg.server_name.clone().unwrap_or_else(|| host.to_owned());
    let server_name = ServerName::try_from(name)?;
    let epoch = Instant::now();
    // Each failure is counted by the stage it happened in (a fixed label set).
    let failed = |stage: &'static str| {
        cfg.metrics.connect_failed(stage);
        stage
    };
    let token = match &cfg.token_path {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| format!("{}: {e}", p.display()))
                .and_then(|t| Token::new(t.trim()).map_err(|e| format!("token file: {e}")))
                .inspect_err(|_| {
                    failed("token");
                })?,
        ),
        None => None,
    };
    let identity = AgentIdentity {
        agent_id: cfg.agent_id.clone(),
        identifiers: cfg.identifiers.clone(),
        token,
    };
    // The session exists before the first byte: its handshake deadline is the one budget for
    // TCP, TLS and WELCOME together (SPEC 4.4).
    let session = Session::agent(
        crate::tunnel::session_config(&cfg.session),
        identity,
        Time::from_millis(0),
    )?;
    let setup = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| (failed("tcp"), e))?;
        let _ = tcp.set_nodelay(true);
        let mut tls = TlsConnector::from(cfg.tls.get())
            .connect(server_name, crate::tls::tunnel_transport(tcp))
            .await
            .map_err(|e| (failed("tls"), e))?;
        tls.get_mut()
            .1
            .set_buffer_limit(Some(crate::tls::TUNNEL_SEND_BUFFER));
        Ok::<_, (&str, std::io::Error)>(tls)
    };
    let setup = async {
        match handshake_deadline(&session, epoch) {
            Some(deadline) => match tokio::time::timeout_at(deadline, setup).await {
                Ok(r) => r,
                Err(_) => Err((
                    failed("timeout"),
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
                )),
            },
            None => setup.await,
        }
    };
    let tls = setup.await.map_err(|(_, e)| e)?;
    let (tx, rx) = mpsc::unbounded_channel();
    let start = Start {
        incoming: Some(tx),
        policy: None,
        epoch,
        label: format!("agent->{addr}"),
        stats: Some(cfg.metrics.stats.clone()),
    };
    let (tunnel, handshaking) = Tunnel::spawn(tls, session, start);
    let welcome = match handshaking.done().await {
        Ok(Handshake::Welcome(w)) => w,
        Ok(Handshake::Hello(_)) => {
            failed("handshake");
            return Err("the server end sent HELLO".into());
        }
        Err(reason) => {
            failed(match reason.code() {
                ErrorCode::UNAUTHORIZED => "unauthorized",
                ErrorCode::HANDSHAKE_TIMEOUT => "timeout",
                _ => "handshake",
            });
            return Err(reason.into());
        }
    };
    tokio::spawn(serve_dials(cfg.clone(), rx).instrument(tracing::Span::current()));
    Ok((tunnel, welcome.server_id, welcome.server_count))
}

async fn serve_dials(cfg: Arc<AgentConfig>, mut rx: mpsc::UnboundedReceiver<Incoming>) {
    while let Some(incoming) = rx.recv().await {
        // One span per stream, inside its tunnel's.
        let d = incoming.dial();
        let span = tracing::info_span!("stream", stream = %incoming.stream_id(), host = %d.host, port = d.port);
        tokio::spawn(serve_dial(cfg.clone(), incoming).instrument(span));
    }
}

async fn serve_dial(cfg: Arc<AgentConfig>, incoming: Incoming) {
    let (host, port) = (incoming.dial().host.clone(), incoming.dial().port);
    if incoming.dial().protocol != Protocol::TCP {
        cfg.metrics.dial("DIAL_UNSUPPORTED");
        incoming.reject(ErrorCode::DIAL_UNSUPPORTED, "only TCP is supported");
        return;
    }
    if !cfg.allowlist.allows(&host, port) {
        cfg.metrics.dial("DIAL_FORBIDDEN");
        tracing::warn!("dial refused: destination not on the allowlist");
        incoming.reject(
            ErrorCode::DIAL_FORBIDDEN,
            "destination not on the agent's allowlist",
        );
        return;
    }
    let started = Instant::now();
    // SPEC 5.5: the opener may give up while the connect is in flight (its own dial timeout,
    // a client gone); the connect is dropped at once, closing its socket.
    let connected = tokio::select! {
        r = dialer::connect(&cfg.allowlist, &host, port, cfg.dial_timeout) => r,
        () = incoming.cancelled() => {
            tracing::debug!("dial cancelled by the opener while connecting");
            return;
        }
    };
    let m = &cfg.metrics;
    match connected {
        Ok(socket) => {
            m.dial_seconds.observe(started.elapsed().as_secs_f64());
            m.dial("ok");
            match incoming.accept() {
                Ok(stream) => {
                    tracing::info!(dial_ms = started.elapsed().as_millis(), "dial connected");
                    let open = crate::server::GaugeGuard::up(&m.open_endpoints);
                    let result = pump(stream, socket, bytes::Bytes::new()).await;
                    drop(open);
                    let seconds = started.elapsed().as_secs_f64();
                    match result {
                        Ok(moved) => {
                            tracing::info!(up = moved.up, down = moved.down, seconds, "stream done")
                        }
                        Err(e) => {
                            tracing::info!(seconds, error = %e, "stream ended with an error")
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "dial given up before it was accepted")
                }
            }
        }
        Err((code, reason)) => {
            m.dial(code.name().unwrap_or("other"));
            tracing::info!(%code, %reason, "dial failed");
            incoming.reject(code, &reason);
        }
    }
}
