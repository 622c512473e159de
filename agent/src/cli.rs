//! `tether-agent`'s flags, and the agent they describe.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use tether::tasks::Tasks;
use tether::tls::ClientFiles;
use tether_ops::cli::{LogArgs, TunnelArgs, konnectivity_notice, parse_duration};
use tether_ops::kube::{Client, KubeConfig};

use crate::dialer::Allowlist;
use crate::metrics::AgentMetrics;
use crate::service::{Agent, AgentConfig};

/// Where the agent's server count comes from (Konnectivity's `--server-count-source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CountSource {
    /// Leases when --count-server-leases is on, else what the servers announce.
    Default,
    /// The larger of the two.
    Max,
}

/// The tether agent: dials out to the tether servers and connects their streams to local
/// destinations. Flags follow the Konnectivity agent's names where the meaning is the same;
/// Konnectivity flags with no meaning here are accepted with a notice (docs/OPERATIONS.md).
/// Logs: --log-level, -v, --log-format, or RUST_LOG.
#[derive(Parser, Debug, Clone)]
#[command(name = "tether-agent", version)]
pub struct AgentArgs {
    /// Server host (or a load balancer before several servers).
    #[arg(long, default_value = "127.0.0.1")]
    pub proxy_server_host: String,
    /// Server port.
    #[arg(long, default_value_t = 8091)]
    pub proxy_server_port: u16,
    /// More servers, `host:port`, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub extra_proxy_servers: Vec<String>,
    /// The name the server certificate must carry (default: --proxy-server-host).
    #[arg(long)]
    pub proxy_server_name: Option<String>,
    /// CA that signed the servers' certificate (reloaded when it changes).
    #[arg(long)]
    pub ca_cert: PathBuf,
    /// Client certificate presented to the servers (mTLS; reloaded when it changes).
    #[arg(long, requires = "agent_key")]
    pub agent_cert: Option<PathBuf>,
    /// Key for --agent-cert.
    #[arg(long)]
    pub agent_key: Option<PathBuf>,
    /// ALPN protocols offered to the servers, comma-separated (to share a port with other
    /// TLS services behind one address).
    #[arg(long, value_delimiter = ',')]
    pub alpn_proto: Vec<String>,
    /// This agent's id (default: the host name). In Kubernetes, the node name.
    #[arg(long, env = "PROXY_AGENT_ID")]
    pub agent_id: Option<String>,
    /// What this agent serves: `ipv4=..&ipv6=..&host=..&cidr=..&default-route=true`.
    #[arg(long, default_value = "")]
    pub agent_identifiers: String,
    /// First reconnect delay (doubles up to --sync-interval-cap, with jitter).
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub sync_interval: Duration,
    /// Longest reconnect delay.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub sync_interval_cap: Duration,
    /// A file holding a bearer token sent to the servers, read at every connection (a
    /// projected service-account token rotates).
    #[arg(long)]
    pub service_account_token_path: Option<PathBuf>,
    /// Destinations that may be dialled, comma-separated: `10.0.0.0/8:10250`, `*.svc:443`,
    /// `node-1`, `*:22`. Empty: everything (logged). Loopback, link-local, metadata and
    /// unspecified addresses, asked for or resolved from a name, only where an IP rule inside
    /// their range names them (`127.0.0.1:8080`; `0.0.0.0/0` does not).
    #[arg(long, default_value = "")]
    pub allowed_destinations: String,
    /// How long a dial to a destination may take.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub dial_timeout: Duration,
    /// Address of the health server.
    #[arg(long, value_parser = tether_ops::cli::parse_bind, default_value = "0.0.0.0")]
    pub health_server_host: IpAddr,
    /// Port for /healthz, /readyz (ready while a tunnel is open) and /metrics; 0 (the
    /// default) disables them. Konnectivity's manifests use 8093 or 8134.
    #[arg(long, default_value_t = 0)]
    pub health_server_port: u16,
    /// Address of the admin server.
    #[arg(long, value_parser = tether_ops::cli::parse_bind, default_value = "127.0.0.1")]
    pub admin_bind_address: IpAddr,
    /// Port for /metrics (and /healthz, /readyz) apart from the health port; 0 (the default)
    /// disables it.
    #[arg(long, default_value_t = 0)]
    pub admin_server_port: u16,
    /// Count the servers from their Kubernetes leases instead of trusting the count they
    /// announce.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = tether_ops::cli::parse_go_bool)]
    pub count_server_leases: bool,
    /// Namespace of the server leases.
    #[arg(long, default_value = "kube-system")]
    pub lease_namespace: String,
    /// Label selector of the server leases.
    #[arg(
        long,
        alias = "lease-label",
        alias = "server-lease-selector",
        default_value = "k8s-app=konnectivity-server"
    )]
    pub lease_label_selector: String,
    /// How the lease count and the announced count combine.
    #[arg(long, value_enum, default_value = "default")]
    pub server_count_source: CountSource,
    /// How often the leases are counted.
    #[arg(long, value_parser = parse_duration, default_value = "15s")]
    pub lease_count_interval: Duration,
    /// kubeconfig for the API server (lease counting); without it, the pod's in-cluster
    /// service account.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// How often certificate files are checked for changes.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub reload_interval: Duration,
    /// Tunnel settings both binaries share.
    #[command(flatten)]
    pub tunnel: TunnelArgs,
    /// Runtime worker threads: 1 everything on the main thread (an agent serves few tunnels; one
    /// thread costs the node least), 0 one per core.
    #[arg(long, default_value_t = 1)]
    pub worker_threads: usize,
    /// Logging, and klog's flags.
    #[command(flatten)]
    pub log: LogArgs,
    /// Konnectivity's flags that tether accepts with a notice.
    #[command(flatten)]
    pub konnectivity: KonnectivityAgentArgs,
}

/// Konnectivity agent flags with no meaning in tether, accepted so its manifests carry over.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KonnectivityAgentArgs {
    #[arg(long, hide = true)]
    probe_interval: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    sync_forever: Option<String>,
    #[arg(long, hide = true)]
    xfr_channel_size: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    warn_on_channel_limit: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    enable_profiling: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    enable_contention_profiling: Option<String>,
    #[arg(long, hide = true)]
    kube_api_content_type: Option<String>,
}

impl KonnectivityAgentArgs {
    fn notices(&self) -> Vec<String> {
        let n = konnectivity_notice;
        [
            n(
                self.probe_interval.is_some(),
                "probe-interval",
                "a tunnel is ready from its WELCOME until its GOAWAY; liveness is --keepalive-time",
            ),
            n(
                self.sync_forever.is_some(),
                "sync-forever",
                "the agent always keeps as many tunnels as there are servers",
            ),
            n(
                self.xfr_channel_size.is_some() || self.warn_on_channel_limit.is_some(),
                "xfr-channel-size",
                "buffering is per-stream flow control (--stream-window)",
            ),
            n(
                self.enable_profiling.is_some() || self.enable_contention_profiling.is_some(),
                "enable-profiling",
                "no pprof; profile with perf (docs/BENCHMARKS.md)",
            ),
            n(
                self.kube_api_content_type.is_some(),
                "kube-api-content-type",
                "tether's API calls are JSON",
            ),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// A running agent and the tasks beside it.
pub struct Running {
    /// The agent.
    pub agent: Agent,
    /// The lease counter, and the health and admin servers.
    tasks: Tasks,
}

impl Running {
    /// Waits until a task of the agent's, or one beside it, ends early, and says which and
    /// why (see [`Agent::failed`]).
    pub async fn failed(&mut self) -> String {
        tokio::select! {
            why = self.agent.failed() => why,
            why = self.tasks.first_to_end() => why,
        }
    }

    /// Announces a drain to come on every tunnel and keeps serving until a second SIGTERM (or
    /// Ctrl-C) or `grace` has passed.
    pub async fn announce_draining(&self, grace: Duration) {
        let n = self.agent.announce_draining();
        tracing::info!(
            tunnels = n,
            grace = ?grace,
            "draining soon: serving dials until a second signal or the grace"
        );
        tokio::select! {
            () = tether_ops::cli::shutdown_signal() => {}
            () = tokio::time::sleep(grace) => {}
        }
    }

    /// Drains every tunnel, at most `grace`.
    pub async fn shutdown(self, grace: Duration) {
        self.agent.drain(grace).await;
        self.tasks.stop().await;
    }
}

impl AgentArgs {
    /// Notices for every Konnectivity-only flag given.
    pub fn notices(&self) -> Vec<String> {
        let mut n = self.log.notices();
        n.extend(self.konnectivity.notices());
        n.extend(self.tunnel.notices());
        n
    }

    /// Checks the flags and reads every file they name; each error names its flag or file.
    pub fn config(&self) -> Result<AgentConfig, String> {
        // Konnectivity's rules: a cap under the first interval is refused. And 0 would
        // reconnect without a pause, a storm against the servers.
        if self.sync_interval.is_zero() {
            return Err(
                "--sync-interval must be above 0 (0 would reconnect without a pause)".into(),
            );
        }
        if self.sync_interval > self.sync_interval_cap {
            return Err(format!(
                "--sync-interval {:?} must not be above --sync-interval-cap {:?}",
                self.sync_interval, self.sync_interval_cap
            ));
        }
        if self.proxy_server_port == 0 {
            return Err("--proxy-server-port 0 is not a port a server listens on".into());
        }
        let files = ClientFiles {
            ca: self.ca_cert.clone(),
            cert_key: self.agent_cert.clone().zip(self.agent_key.clone()),
            alpn: alpn(&self.alpn_proto)?,
        };
        let tls = files.load("agent TLS (--ca-cert, --agent-cert, --agent-key)")?;
        let tls_stats = tls.clone();
        if let Some(p) = &self.service_account_token_path {
            std::fs::metadata(p)
                .map_err(|e| format!("--service-account-token-path {}: {e}", p.display()))?;
        }
        // An empty id (a PROXY_AGENT_ID set but empty, say) is no id: the default.
        let agent_id = self.agent_id.clone().filter(|i| !i.is_empty());
        if agent_id.as_ref().is_some_and(|i| i.len() > 255) {
            return Err("--agent-id is over 255 bytes".into());
        }
        let agent_id = agent_id.unwrap_or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_owned())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "tether-agent".to_owned())
        });
        let mut servers = vec![format!(
            "{}:{}",
            self.proxy_server_host, self.proxy_server_port
        )];
        servers.extend(self.extra_proxy_servers.iter().cloned());
        Ok(AgentConfig {
            servers,
            server_name: self.proxy_server_name.clone(),
            tls,
            reload_interval: self.reload_interval,
            server_count: None,
            server_count_max: self.server_count_source == CountSource::Max,
            agent_id,
            identifiers: tether_ops::cli::parse_identifiers(&self.agent_identifiers)
                .map_err(|e| format!("--agent-identifiers: {e}"))?,
            token_path: self.service_account_token_path.clone(),
            allowlist: Allowlist::parse(&self.allowed_destinations)
                .map_err(|e| format!("--allowed-destinations: {e}"))?,
            dial_timeout: self.dial_timeout,
            sync_interval: self.sync_interval,
            sync_interval_cap: self.sync_interval_cap,
            session: self.tunnel.session(),
            metrics: Arc::new({
                let mut m = AgentMetrics::new();
                m.watch_reloads(tls_stats.stats().into_iter().collect());
                m
            }),
            linger: tether::pump::LINGER,
        })
    }

    /// Starts the agent (its lease counter, health and admin servers) as the flags say.
    pub async fn start(&self) -> Result<Running, String> {
        let mut config = self.config()?;
        let mut tasks = Tasks::new();
        if self.count_server_leases {
            let what = match &self.kubeconfig {
                Some(p) => format!("--kubeconfig {}", p.display()),
                None => "in-cluster config".into(),
            };
            let kc =
                KubeConfig::load(self.kubeconfig.as_deref()).map_err(|e| format!("{what}: {e}"))?;
            let (task, count) = tether_ops::lease::count_leases(
                Client::new(kc, Duration::from_secs(10)),
                self.lease_namespace.clone(),
                self.lease_label_selector.clone(),
                self.lease_count_interval,
            );
            tasks.push("the server lease counter", task);
            config.server_count = Some(count);
        }
        let metrics = config.metrics.clone();
        let agent = Agent::start(config);
        for (port, host, flag) in [
            (
                self.health_server_port,
                self.health_server_host,
                "--health-server-port",
            ),
            (
                self.admin_server_port,
                self.admin_bind_address,
                "--admin-server-port",
            ),
        ] {
            if port != 0 {
                let addr = SocketAddr::new(host, port);
                match agent.serve_health(addr, metrics.clone()).await {
                    Ok(t) => tasks.push(format!("the {flag} server {addr}"), t),
                    // Nothing started stays running: the tasks and the agent stop when dropped.
                    Err(e) => return Err(format!("{flag} {addr}: {e}")),
                }
            }
        }
        Ok(Running { agent, tasks })
    }
}

/// `tether-agent`'s main: parse, log, start, wait for SIGTERM (or a failed task), drain.
pub fn main() -> Result<(), String> {
    let a = AgentArgs::parse();
    tether_ops::cli::init(&a.log)?;
    for n in a.notices() {
        tracing::info!("{n}");
    }
    tether_ops::cli::raise_fd_limit();
    tether_ops::cli::purge_in_background();
    let rt =
        tether_ops::cli::runtime(a.worker_threads).map_err(|e| format!("tokio runtime: {e}"))?;
    rt.block_on(async {
        let mut running = a.start().await?;
        let failure = tether_ops::cli::until_stopped(running.failed()).await;
        if failure.is_none() {
            // As Konnectivity's agent: the first signal announces the drain and keeps serving
            // (servers send new dials elsewhere when they can, here when they cannot), until a
            // second signal or --drain-grace; then GOAWAY and the streams' own drain.
            running.announce_draining(a.tunnel.drain_grace).await;
        }
        running.shutdown(a.tunnel.drain_grace).await;
        failure.map_or(Ok(()), Err)
    })
}

/// `--alpn-proto` as offered: empty (`--alpn-proto=`) is none, as in Konnectivity; an empty
/// or over-long name among others is refused (TLS cannot carry it).
fn alpn(list: &[String]) -> Result<Vec<String>, String> {
    if list.iter().all(String::is_empty) {
        return Ok(Vec::new());
    }
    if let Some(bad) = list.iter().find(|p| p.is_empty() || p.len() > 255) {
        return Err(format!(
            "--alpn-proto: {bad:?} is not a protocol name (1 to 255 bytes)"
        ));
    }
    if list.iter().any(|p| p == "h2") {
        // docs/SPEC.md §1: a server reads an `h2` connection as Konnectivity's gRPC agent.
        return Err("--alpn-proto: h2 is how tether's server tells Konnectivity's gRPC agents apart; a tether agent must not offer it".into());
    }
    Ok(list.to_vec())
}
