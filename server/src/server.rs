//! [`Server`]: the agent listener, the frontends and the health port, started together and
//! stopped together.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tether::listen::{ListenConfig, Listener};
use tether::reload::Reloadable;
use tether::tasks::Tasks;
use tether::{DialError, TetherStream};
use tether_proto::ErrorCode;
use tokio::net::TcpListener;

use crate::agents::Agents;
use crate::config::ServerConfig;
use crate::connect;
use crate::core::ServerCore;
use crate::metrics::Metrics;
use crate::registry::Registry;

/// A running server. Dropping it stops every listener (their ports and socket files are
/// free again), and closes every tunnel; [`Server::shutdown`] first drains them.
pub struct Server {
    core: Arc<ServerCore>,
    listener: Listener,
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
    /// The server's own tasks, by what they serve; none ends until shutdown unless it fails.
    /// Declared before `uds_files`: the listeners go before their files are unlinked.
    tasks: Tasks,
    _socket_files: SocketFiles,
}

/// The Unix socket files a server bound, unlinked when it is dropped if they are still its
/// own: another server may own the name now (it replaced a file it found stale).
#[derive(Default)]
struct SocketFiles(Vec<(PathBuf, (u64, u64))>);

impl Drop for SocketFiles {
    fn drop(&mut self) {
        #[cfg(unix)]
        for (p, id) in &self.0 {
            if crate::uds::file_id(p) == Some(*id) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

impl Server {
    /// Binds every listener and starts serving. A listener that cannot bind stops the ones
    /// already started.
    pub async fn start(config: ServerConfig) -> io::Result<Server> {
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
            linger: config.linger,
        });
        let mut tasks = Tasks::new();
        let every = config.reload_interval;
        tasks.push_some("the agent TLS reloader", config.agent_tls.watch(every));
        tasks.push_some(
            "the CONNECT TLS reloader",
            config.connect_tls.as_ref().and_then(|t| t.watch(every)),
        );
        tasks.push_some(
            "the tokens file reloader",
            config.tokens.as_ref().and_then(|t| t.watch(every)),
        );
        let listen = ListenConfig {
            tls: config.agent_tls.clone(),
            session: config.session.clone(),
            server_id: config.server_id.clone(),
            server_count: config.server_count,
            server_count_source: config.server_count_source.clone(),
            max_handshakes: config.max_handshakes,
            accept_rate: config.agent_accept_rate,
            accept_burst: config.agent_accept_burst,
            stats: core.metrics.listener.clone(),
            linger: config.linger,
            handover_alpn: match config.konnectivity_agents {
                Some(_) => vec![b"h2".to_vec()],
                None => Vec::new(),
            },
        };
        let admission = Agents {
            core: core.clone(),
            tokens: config.tokens.clone(),
            token_review: config.token_review.clone(),
            identity: config.identity.clone(),
            max_tunnels_per_agent: config.max_tunnels_per_agent,
            address_recheck: config.address_recheck,
            konnectivity: config.konnectivity_agents.clone(),
        };
        let listener = Listener::bind(config.agent_addr, listen, Arc::new(admission))
            .await
            .map_err(|e| named(e, format!("agent port {}", config.agent_addr)))?;
        let agent_addr = listener.local_addr();
        let mut connect_addr = None;
        if let Some(addr) = config.connect_addr {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| named(e, format!("CONNECT frontend {addr}")))?;
            connect_addr = Some(l.local_addr()?);
            tasks.push(
                "the CONNECT listener",
                tokio::spawn(connect::accept_tcp(
                    core.clone(),
                    l,
                    config.connect_tls.clone(),
                    config.client_admission,
                )),
            );
        }
        let mut uds_files = SocketFiles::default();
        #[cfg(unix)]
        {
            let peers: Option<Arc<[u32]>> = config.uds_peer_uids.as_deref().map(Arc::from);
            let sockets = [
                (&config.uds_path, None, "Unix socket"),
                (
                    &config.grpc_uds_path,
                    Some(&config.grpc_limits),
                    "gRPC Unix socket",
                ),
            ];
            for (path, grpc, what) in sockets {
                let Some(path) = path else {
                    continue;
                };
                let l = crate::uds::bind(path, config.delete_existing_uds)
                    .await
                    .map_err(|e| named(e, format!("{what} {}", path.display())))?;
                uds_files
                    .0
                    .extend(crate::uds::file_id(path).map(|id| (path.clone(), id)));
                let grpc = grpc.map(|limits| Arc::new(crate::grpc::Grpc::new(limits.clone())));
                if let Some(g) = &grpc {
                    core.metrics.watch_grpc_budget(g.budget());
                }
                let name = match grpc {
                    Some(_) => "the gRPC Unix socket listener",
                    None => "the CONNECT Unix socket listener",
                };
                tasks.push(
                    name,
                    tokio::spawn(crate::uds::accept(core.clone(), l, peers.clone(), grpc)),
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
                tokio::spawn(serve_health(core.clone(), l)),
            );
        }
        tracing::info!(%agent_addr, ?connect_addr, uds = ?config.uds_path, grpc_uds = ?config.grpc_uds_path, ?health_addr, "server listening");
        Ok(Server {
            core,
            listener,
            agent_addr,
            connect_addr,
            uds_path: config.uds_path,
            grpc_uds_path: config.grpc_uds_path,
            health_addr,
            tasks,
            _socket_files: uds_files,
        })
    }

    /// Serves `/healthz`, `/readyz` and `/metrics` on one more address (the admin port); the
    /// task ends when it is aborted.
    pub async fn serve_health_on(
        &self,
        addr: SocketAddr,
    ) -> io::Result<tokio::task::JoinHandle<()>> {
        let l = TcpListener::bind(addr).await?;
        Ok(tokio::spawn(serve_health(self.core.clone(), l)))
    }

    /// The library API: a stream to `host:port` through an agent the routing strategies
    /// choose.
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
        tether::tasks::wait_until(timeout, || self.agents() >= n).await
    }

    /// Waits until at most `n` agents are connected, at most `timeout`.
    pub async fn wait_agents_at_most(&self, n: usize, timeout: Duration) -> bool {
        tether::tasks::wait_until(timeout, || self.agents() <= n).await
    }

    /// Waits until one of the server's own tasks (a listener, a reloader, the health port)
    /// ends, and says which and why. They end only by failing: a panic, which tokio catches
    /// in the task, so the process would run on without, say, its agent listener. The
    /// binary then shuts down with an error, to be restarted. Never ready while all run.
    pub async fn failed(&mut self) -> String {
        tokio::select! {
            why = self.listener.failed() => why,
            why = self.tasks.first_to_end() => why,
        }
    }

    /// Stops accepting and closes every tunnel (GOAWAY), after at most `grace` of draining.
    /// Every listener is closed when it returns, so its address can be bound again.
    pub async fn shutdown(mut self, grace: Duration) {
        self.listener.stop_accepting().await;
        std::mem::take(&mut self.tasks).stop().await;
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
    }
}

async fn serve_health(core: Arc<ServerCore>, l: TcpListener) {
    use tether_ops::metrics::{Answer, OPENMETRICS};
    let answer = move |path: &str| -> Answer {
        match path {
            "/healthz" => (200, "OK", "text/plain", "ok\n".into()),
            "/readyz" | "/ready" if !core.registry.is_empty() => {
                (200, "OK", "text/plain", "ready\n".into())
            }
            "/readyz" | "/ready" => (
                503,
                "Service Unavailable",
                "text/plain",
                "no agent connected\n".into(),
            ),
            "/metrics" => (200, "OK", OPENMETRICS, core.render_metrics()),
            _ => (404, "Not Found", "text/plain", "not found\n".into()),
        }
    };
    tether_ops::metrics::serve(l, Arc::new(answer)).await;
}

/// `e` with what it was about (a flag's file, an address) in front.
fn named(e: io::Error, what: String) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}
