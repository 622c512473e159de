//! `tether-server`'s flags, and the server they describe.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use tether::reload::Reloadable;
use tether::tasks::Tasks;
use tether::tls::ServerFiles;
use tether_ops::cli::{LogArgs, TunnelArgs, konnectivity_notice, parse_duration};
use tether_ops::kube::{Client, KubeConfig};
use tether_ops::lease::{LeaseController, LeaseSettings, parse_labels};

use crate::config::ServerConfig;
use crate::identity::{AddressClaims, HostClaims, IdRule, IdentityPolicy, Tokens};
use crate::registry::parse_strategies;
use crate::review::TokenReviewer;
use crate::server::Server;

/// The tether server: accepts agent tunnels and serves HTTP CONNECT to the nodes behind them.
/// Flags follow the Konnectivity server's names where the meaning is the same; Konnectivity
/// flags with no meaning here are accepted with a notice (docs/OPERATIONS.md lists them all).
/// Logs: --log-level, -v, --log-format, or RUST_LOG.
#[derive(Parser, Debug, Clone)]
#[command(name = "tether-server", version)]
pub struct ServerArgs {
    /// Frontend of --uds-name: `http-connect` (kube-apiserver's EgressSelectorConfiguration
    /// proxyProtocol HTTPConnect) or `grpc` (proxyProtocol GRPC: Konnectivity's ProxyService,
    /// on the Unix socket only).
    #[arg(long, default_value = "http-connect", value_parser = ["http-connect", "grpc"])]
    pub mode: String,
    /// Serve the frontend --mode names on this Unix socket. With it, the TCP frontend is off
    /// unless --server-port is given.
    #[arg(long)]
    pub uds_name: Option<PathBuf>,
    /// Serve gRPC (ProxyService) on this Unix socket as well, beside CONNECT on --uds-name
    /// or TCP (both egress protocols at once).
    #[arg(long)]
    pub grpc_uds_name: Option<PathBuf>,
    /// Users (uids, comma-separated) allowed to connect to the Unix sockets; others are
    /// refused and logged. Empty: any user the socket's mode (0770) lets in.
    #[arg(long, value_delimiter = ',')]
    pub uds_allowed_uids: Vec<u32>,
    /// The largest gRPC message a client may send, in bytes (grpc-go's default limit).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub grpc_max_message_size: usize,
    /// Bytes of gRPC client messages held while they are collected, over all calls; a
    /// message waits for its share, so memory stays bounded whatever the clients send.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    pub grpc_buffer_budget: usize,
    /// Replace a socket file at --uds-name that no server answers on (a stale one). A socket a
    /// live server answers on is never replaced.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_parser = tether_ops::cli::parse_go_bool)]
    pub delete_existing_uds_file: bool,
    /// Address of the CONNECT frontend on TCP.
    #[arg(long, value_parser = tether_ops::cli::parse_bind, default_value = "127.0.0.1")]
    pub server_bind_address: IpAddr,
    /// Port of the CONNECT frontend on TCP (8090 when --uds-name is not set; 0 disables it).
    #[arg(long)]
    pub server_port: Option<u16>,
    /// Certificate of the CONNECT frontend (enables TLS on it; reloaded when it changes).
    #[arg(long, requires = "server_key")]
    pub server_cert: Option<PathBuf>,
    /// Key of the CONNECT frontend.
    #[arg(long)]
    pub server_key: Option<PathBuf>,
    /// CA that signs CONNECT clients' certificates (requires mTLS on the frontend).
    #[arg(long, requires = "server_cert")]
    pub server_ca_cert: Option<PathBuf>,
    /// Address agents connect to.
    #[arg(long, value_parser = tether_ops::cli::parse_bind, default_value = "0.0.0.0")]
    pub agent_bind_address: IpAddr,
    /// Port agents connect to.
    #[arg(long, default_value_t = 8091)]
    pub agent_port: u16,
    /// Certificate presented to agents (reloaded when it changes).
    #[arg(long)]
    pub cluster_cert: PathBuf,
    /// Key for --cluster-cert.
    #[arg(long)]
    pub cluster_key: PathBuf,
    /// CA that signs agents' client certificates; when set, agents must present one.
    #[arg(long)]
    pub cluster_ca_cert: Option<PathBuf>,
    /// File of accepted agent bearer tokens: `<token> <agent-id>` per line (`*` for any id;
    /// `#` comments). A token is good only for the agent id it names. Reloaded when it changes.
    #[arg(long, conflicts_with = "agent_namespace")]
    pub agent_tokens_file: Option<PathBuf>,
    /// Kubernetes authentication: agents' service-account tokens are reviewed (TokenReview)
    /// and must belong to this namespace (with --agent-service-account and
    /// --authentication-audience).
    #[arg(long, requires_all = ["agent_service_account", "authentication_audience"])]
    pub agent_namespace: Option<String>,
    /// Kubernetes authentication: the agents' service account.
    #[arg(long, requires = "agent_namespace")]
    pub agent_service_account: Option<String>,
    /// Kubernetes authentication: the audience agents' tokens must be issued for
    /// (Konnectivity's manifests use `system:konnectivity-server`).
    #[arg(long, requires = "agent_namespace")]
    pub authentication_audience: Option<String>,
    /// How long a positive TokenReview is trusted before the token is reviewed again.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub token_review_cache: Duration,
    /// How long a TokenReview may take; past it the agent is refused (UNAUTHORIZED).
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub token_review_timeout: Duration,
    /// kubeconfig for the API server (TokenReview, leases); without it, the pod's in-cluster
    /// service account.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// How an agent's id is bound to its credential: `credential` (the client certificate's
    /// common name or a DNS name, the id its token names, or the node or pod its
    /// service-account token was issued for) or `any` (for fleets that share one credential).
    #[arg(long, default_value = "credential")]
    pub agent_id_rule: IdRule,
    /// Which `host=` identifiers an agent may claim: `own` (only its agent id) or `any`.
    #[arg(long, default_value = "own")]
    pub host_identifiers: HostClaims,
    /// Which ipv4/ipv6/cidr/default-route identifiers an agent may claim: `any`, `cert` (ipv4
    /// and ipv6 in its client certificate only), `node` (ipv4 and ipv6 of the Node its
    /// reviewed service-account token was issued for) or `none`.
    #[arg(long, default_value = "any")]
    pub address_identifiers: AddressClaims,
    /// With --address-identifiers node: how often each tunnel's address claims are checked
    /// against its Node again (one GET per tunnel); a tunnel whose node no longer has a
    /// claimed address is closed. 0: only at the handshake.
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    pub address_recheck_interval: Duration,
    /// Also accept Konnectivity's own agents (`proxy-agent`, ALPN `h2`) on the agent port, with
    /// the same authentication and identity rules as tether's, so a cluster can switch its
    /// server first (docs/OPERATIONS.md).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = tether_ops::cli::parse_go_bool)]
    pub konnectivity_agents: bool,
    /// Node-to-client bytes one Konnectivity agent's streams may hold before the server stops
    /// reading that agent (it has no per-stream flow control: all its streams wait).
    #[arg(long, default_value_t = 4 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(65536..=1 << 30))]
    pub konnectivity_agent_buffer: u64,
    /// How long a Konnectivity agent's buffer may stay full before the stream holding the most
    /// of it (its client reads nothing) is reset, so the agent's other streams go on.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub konnectivity_agent_stall_limit: Duration,
    /// Tunnels one agent id may hold to this server at once (default: --server-count); a
    /// newer tunnel replaces the oldest.
    #[arg(long)]
    pub max_tunnels_per_agent: Option<usize>,
    /// Agent connections that may be in their TLS handshake or HELLO at once.
    #[arg(long, default_value_t = 256)]
    pub max_pending_handshakes: usize,
    /// Agent connections accepted per second at most, after a burst of
    /// --agent-accept-burst, so a reconnect storm after a restart is taken at a steady rate
    /// (0: no limit; otherwise at least 0.01). The rest wait in the listen backlog; agents
    /// back off with jitter.
    #[arg(long, value_parser = tether_ops::cli::parse_accept_rate, default_value_t = 1000.0)]
    pub agent_accept_rate: f64,
    /// Agent connections accepted at once before --agent-accept-rate applies.
    #[arg(long, default_value_t = 256)]
    pub agent_accept_burst: u32,
    /// CONNECT client connections on --server-port that may be in their TLS handshake or
    /// request head at once; the rest wait in the listen backlog.
    #[arg(long, default_value_t = 1024)]
    pub max_pending_client_heads: usize,
    /// TLS client connections on --server-port accepted per second at most, after a burst
    /// of --client-accept-burst (0: no limit; otherwise at least 0.01). Plain TCP is not
    /// paced.
    #[arg(long, value_parser = tether_ops::cli::parse_accept_rate, default_value_t = 5000.0)]
    pub client_accept_rate: f64,
    /// TLS client connections accepted at once before --client-accept-rate applies.
    #[arg(long, default_value_t = 1024)]
    pub client_accept_burst: u32,
    /// This server's id, sent to agents; unique per server in HA (default: a random id).
    #[arg(long, env = "PROXY_SERVER_ID")]
    pub server_id: Option<String>,
    /// How many servers agents should connect to (HA). With --enable-lease-controller, the
    /// count of live server leases when it is larger.
    #[arg(long, default_value_t = 1)]
    pub server_count: u16,
    /// Publish this server's Lease (and delete expired ones) so agents and servers count the
    /// live servers.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = tether_ops::cli::parse_go_bool)]
    pub enable_lease_controller: bool,
    /// Namespace of the server leases.
    #[arg(long, default_value = "kube-system")]
    pub lease_namespace: String,
    /// Labels of the server leases (`k=v,...`); also the selector they are counted by.
    #[arg(long, default_value = "k8s-app=konnectivity-server")]
    pub lease_label: String,
    /// How long a lease holds without renewal.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub lease_duration: Duration,
    /// How often the lease is renewed (and expired ones collected).
    #[arg(long, value_parser = parse_duration, default_value = "15s")]
    pub lease_renewal_interval: Duration,
    /// Routing strategies, in order: destHost, defaultRoute, default.
    #[arg(long, default_value = "default")]
    pub proxy_strategies: String,
    /// How long a dial to a node may take before the client gets 504; 0: no deadline of the
    /// server's (as in Konnectivity), the agent's --dial-timeout bounds it.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub backend_dial_timeout: Duration,
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, value_parser = tether_ops::cli::parse_bind, default_value = "127.0.0.1")]
    pub health_bind_address: IpAddr,
    /// Port for /healthz, /readyz and /metrics; 0 disables them.
    #[arg(long, default_value_t = 8092)]
    pub health_port: u16,
    /// Address of the admin port.
    #[arg(long, value_parser = tether_ops::cli::parse_bind, default_value = "127.0.0.1")]
    pub admin_bind_address: IpAddr,
    /// Port for /metrics (and /healthz, /readyz) apart from the health port, as
    /// Konnectivity's admin port; 0 (the default) disables it.
    #[arg(long, default_value_t = 0)]
    pub admin_port: u16,
    /// How often certificate, key, CA and token files are checked for changes.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub reload_interval: Duration,
    /// Tunnel settings both binaries share.
    #[command(flatten)]
    pub tunnel: TunnelArgs,
    /// Runtime worker threads: 0 one per core, 1 everything on the main thread.
    #[arg(long, default_value_t = 0)]
    pub worker_threads: usize,
    /// Logging, and klog's flags.
    #[command(flatten)]
    pub log: LogArgs,
    /// Konnectivity's flags that tether accepts with a notice.
    #[command(flatten)]
    pub konnectivity: KonnectivityServerArgs,
}

/// Konnectivity server flags with no meaning in tether, accepted so its manifests carry over.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KonnectivityServerArgs {
    #[arg(long, hide = true)]
    kubeconfig_qps: Option<String>,
    #[arg(long, hide = true)]
    kubeconfig_burst: Option<String>,
    #[arg(long, hide = true)]
    kube_api_content_type: Option<String>,
    #[arg(long, hide = true)]
    frontend_keepalive_time: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    enable_profiling: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    enable_contention_profiling: Option<String>,
    #[arg(long, hide = true)]
    cipher_suites: Option<String>,
    #[arg(long, hide = true)]
    tls_min_version: Option<String>,
    #[arg(long, hide = true)]
    xfr_channel_size: Option<String>,
    #[arg(long, hide = true)]
    frontend_write_channel_size: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    warn_on_channel_limit: Option<String>,
}

impl KonnectivityServerArgs {
    fn notices(&self) -> Vec<String> {
        let n = konnectivity_notice;
        [
            n(
                self.kubeconfig_qps.is_some() || self.kubeconfig_burst.is_some(),
                "kubeconfig-qps/--kubeconfig-burst",
                "at most 32 TokenReviews run at once, positive ones cached (--token-review-cache)",
            ),
            n(
                self.kube_api_content_type.is_some(),
                "kube-api-content-type",
                "tether's API calls are JSON",
            ),
            n(
                self.frontend_keepalive_time.is_some(),
                "frontend-keepalive-time",
                "CONNECT streams carry no keepalive; the tunnels' is --keepalive-time",
            ),
            n(
                self.enable_profiling.is_some() || self.enable_contention_profiling.is_some(),
                "enable-profiling",
                "no pprof; profile with perf (docs/BENCHMARKS.md)",
            ),
            n(
                self.cipher_suites.is_some() || self.tls_min_version.is_some(),
                "cipher-suites/--tls-min-version",
                "TLS 1.3 and 1.2 with rustls' AEAD suites only (no CBC, no TLS 1.0/1.1)",
            ),
            n(
                self.xfr_channel_size.is_some() || self.frontend_write_channel_size.is_some(),
                "xfr-channel-size",
                "buffering is per-stream flow control (--stream-window)",
            ),
            n(
                self.warn_on_channel_limit.is_some(),
                "warn-on-channel-limit",
                "no channel limits to warn about",
            ),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// A running server and the tasks beside it (the lease controller).
pub struct Running {
    /// The server.
    pub server: Server,
    lease: Option<LeaseController>,
    /// The admin port's server, if any.
    admin: Tasks,
}

impl Running {
    /// Waits until a task of the server's, its admin port's or its lease controller's ends
    /// early, and says which and why (see [`Server::failed`]).
    pub async fn failed(&mut self) -> String {
        let lease = async {
            match self.lease.as_mut() {
                Some(l) => l.failed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            why = self.server.failed() => why,
            why = self.admin.first_to_end() => why,
            why = lease => why,
        }
    }

    /// Gives up its lease first (agents and servers stop counting this server at once, and
    /// the renewal cannot bring it back while draining, as Konnectivity does), then drains:
    /// GOAWAY to every agent, at most `grace`.
    pub async fn shutdown(self, grace: Duration) {
        if let Some(l) = self.lease {
            l.release().await;
        }
        self.admin.stop().await;
        self.server.shutdown(grace).await;
    }
}

impl ServerArgs {
    /// Notices for every Konnectivity-only flag given.
    pub fn notices(&self) -> Vec<String> {
        let mut n = self.log.notices();
        n.extend(self.konnectivity.notices());
        n.extend(self.tunnel.notices());
        n
    }

    /// Checks the flags and reads every file they name; each error names its flag or file.
    pub fn config(&self) -> Result<ServerConfig, String> {
        if self.server_id.as_ref().is_some_and(|i| i.len() > 255) {
            return Err("--server-id is over 255 bytes".into());
        }
        let grpc_mode = self.mode == "grpc";
        if grpc_mode && self.uds_name.is_none() {
            return Err(
                "--mode grpc serves gRPC on the Unix socket only (kube-apiserver's GRPC egress): give --uds-name".into(),
            );
        }
        if grpc_mode && self.grpc_uds_name.is_some() {
            return Err(
                "--grpc-uds-name adds gRPC beside CONNECT; with --mode grpc, --uds-name is the gRPC socket".into(),
            );
        }
        if self.grpc_max_message_size == 0 || self.grpc_max_message_size > self.grpc_buffer_budget {
            return Err(
                "--grpc-max-message-size must be at least 1 and at most --grpc-buffer-budget"
                    .into(),
            );
        }
        let agent_tls = ServerFiles {
            cert: self.cluster_cert.clone(),
            key: self.cluster_key.clone(),
            client_ca: self.cluster_ca_cert.clone(),
        }
        .load("agent TLS (--cluster-cert, --cluster-key, --cluster-ca-cert)")?;
        let tcp_frontend = !matches!(
            (self.server_port, &self.uds_name),
            (Some(0), _) | (None, Some(_))
        );
        if self.server_cert.is_some() && !tcp_frontend {
            return Err(
                "--server-cert applies to the TCP frontend, which is off (--uds-name without --server-port, or --server-port 0)".into(),
            );
        }
        let connect_tls = match (&self.server_cert, &self.server_key) {
            (Some(c), Some(k)) => Some(
                ServerFiles {
                    cert: c.clone(),
                    key: k.clone(),
                    client_ca: self.server_ca_cert.clone(),
                }
                .load_resumable("CONNECT TLS (--server-cert, --server-key, --server-ca-cert)")?,
            ),
            _ => None,
        };
        let tokens = match &self.agent_tokens_file {
            Some(p) => Some(
                Reloadable::load("--agent-tokens-file", vec![p.clone()], move |b| {
                    Tokens::parse(&String::from_utf8_lossy(&b[0]))
                })
                .map_err(|e| format!("--agent-tokens-file {}: {e}", p.display()))?,
            ),
            None => None,
        };
        let token_review = match (
            &self.agent_namespace,
            &self.agent_service_account,
            &self.authentication_audience,
        ) {
            (Some(ns), Some(sa), Some(aud)) => {
                if self.cluster_ca_cert.is_some() {
                    tracing::info!(
                        "agents must present both a client certificate (--cluster-ca-cert) and a reviewed token"
                    );
                }
                let reviewer = TokenReviewer::new(
                    self.kube_client(self.token_review_timeout)?,
                    aud.clone(),
                    ns,
                    sa,
                    self.token_review_cache,
                    self.token_review_timeout,
                );
                Some(Arc::new(
                    if self.address_identifiers == AddressClaims::Node {
                        reviewer.with_node_addresses()
                    } else {
                        reviewer
                    },
                ))
            }
            _ => None,
        };
        if self.konnectivity_agent_stall_limit.is_zero() {
            return Err("--konnectivity-agent-stall-limit must be above 0: a buffer full for an instant would reset a stream".into());
        }
        if self.address_identifiers == AddressClaims::Node && token_review.is_none() {
            return Err(
                "--address-identifiers node needs Kubernetes authentication (--agent-namespace): the node comes from the token's review".into(),
            );
        }
        if tokens.is_none() && token_review.is_none() && self.cluster_ca_cert.is_none() {
            tracing::warn!(
                "neither --cluster-ca-cert, --agent-tokens-file nor --agent-namespace: any agent that completes TLS is accepted"
            );
        }
        let server_count = self.server_count.max(1);
        Ok(ServerConfig {
            agent_addr: SocketAddr::new(self.agent_bind_address, self.agent_port),
            agent_tls,
            tokens,
            token_review,
            identity: IdentityPolicy {
                id_rule: self.agent_id_rule,
                host_claims: self.host_identifiers,
                address_claims: self.address_identifiers,
            },
            max_tunnels_per_agent: self
                .max_tunnels_per_agent
                .unwrap_or(usize::from(server_count)),
            max_handshakes: self.max_pending_handshakes,
            agent_accept_rate: self.agent_accept_rate,
            agent_accept_burst: self.agent_accept_burst,
            // An empty id (PROXY_SERVER_ID set but empty, say) is no id: a random one, as
            // Konnectivity does.
            server_id: self
                .server_id
                .clone()
                .filter(|i| !i.is_empty())
                .unwrap_or_else(random_id),
            server_count,
            server_count_source: None,
            strategies: parse_strategies(&self.proxy_strategies)
                .map_err(|e| format!("--proxy-strategies: {e}"))?,
            dial_timeout: self.backend_dial_timeout,
            session: self.tunnel.session(),
            // With --uds-name alone the TCP frontend stays off: it is unauthenticated.
            connect_addr: match (self.server_port, &self.uds_name) {
                (Some(0), _) | (None, Some(_)) => None,
                (Some(port), _) => Some(SocketAddr::new(self.server_bind_address, port)),
                (None, None) => Some(SocketAddr::new(self.server_bind_address, 8090)),
            },
            connect_tls,
            client_admission: crate::connect::ClientAdmission {
                max_pending: self.max_pending_client_heads,
                tls_rate: self.client_accept_rate,
                tls_burst: self.client_accept_burst,
            },
            reload_interval: self.reload_interval,
            delete_existing_uds: self.delete_existing_uds_file,
            uds_path: self.uds_name.clone().filter(|_| !grpc_mode),
            grpc_uds_path: if grpc_mode {
                self.uds_name.clone()
            } else {
                self.grpc_uds_name.clone()
            },
            grpc_limits: crate::grpc::GrpcLimits {
                max_message: self.grpc_max_message_size,
                budget: self.grpc_buffer_budget,
                ..Default::default()
            },
            uds_peer_uids: (!self.uds_allowed_uids.is_empty())
                .then(|| self.uds_allowed_uids.clone()),
            health_addr: (self.health_port != 0)
                .then(|| SocketAddr::new(self.health_bind_address, self.health_port)),
            header_timeout: Duration::from_secs(10),
            address_recheck: self.address_recheck_interval,
            linger: tether::pump::LINGER,
            konnectivity_agents: self.konnectivity_agents.then(|| {
                crate::kagent::KonnectivityAgents {
                    buffer: usize::try_from(self.konnectivity_agent_buffer).unwrap_or(usize::MAX),
                    stall_limit: self.konnectivity_agent_stall_limit,
                    ..crate::kagent::KonnectivityAgents::default()
                }
            }),
        })
    }

    fn kube_client(&self, timeout: Duration) -> Result<Client, String> {
        let what = match &self.kubeconfig {
            Some(p) => format!("--kubeconfig {}", p.display()),
            None => "in-cluster config".into(),
        };
        let cfg =
            KubeConfig::load(self.kubeconfig.as_deref()).map_err(|e| format!("{what}: {e}"))?;
        Ok(Client::new(cfg, timeout))
    }

    /// Starts the server (and its lease controller) as the flags say.
    pub async fn start(&self) -> Result<Running, String> {
        let mut config = self.config()?;
        let lease = if self.enable_lease_controller {
            let labels =
                parse_labels(&self.lease_label).map_err(|e| format!("--lease-label: {e}"))?;
            let (controller, count) = LeaseController::start(
                self.kube_client(Duration::from_secs(10))?,
                LeaseSettings {
                    namespace: self.lease_namespace.clone(),
                    holder: config.server_id.clone(),
                    labels,
                    duration: self.lease_duration,
                    renew_every: self.lease_renewal_interval,
                },
                config.server_count,
            );
            config.server_count_source = Some(count);
            Some(controller)
        } else {
            None
        };
        let server = Server::start(config).await.map_err(|e| e.to_string())?;
        let mut admin = Tasks::new();
        if self.admin_port != 0 {
            let addr = SocketAddr::new(self.admin_bind_address, self.admin_port);
            let task = server
                .serve_health_on(addr)
                .await
                .map_err(|e| format!("--admin-port {addr}: {e}"))?;
            admin.push(format!("the admin port {addr}"), task);
        }
        Ok(Running {
            server,
            lease,
            admin,
        })
    }
}

/// A random id (Konnectivity's default server and agent ids are random UUIDs).
pub(crate) fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// `tether-server`'s main: parse, log, start, wait for SIGTERM (or a failed task), drain.
pub fn main() -> Result<(), String> {
    let a = ServerArgs::parse();
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
        running.shutdown(a.tunnel.drain_grace).await;
        failure.map_or(Ok(()), Err)
    })
}
