//! [`ServerConfig`]: what a server needs to run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tether::reload::Reloadable;
use tether_proto::Config;

use crate::connect::ClientAdmission;
use crate::grpc::GrpcLimits;
use crate::identity::{IdentityPolicy, Tokens};
use crate::registry::Strategy;
use crate::review::TokenReviewer;

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
    /// rate, NaN or infinity: no limit; a rate under [`MIN_AGENT_ACCEPT_RATE`](tether::listen::MIN_AGENT_ACCEPT_RATE) is taken as
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
    /// How long a dial may take before the client gets 504; zero: no deadline of the
    /// server's (as Konnectivity's `--backend-dial-timeout=0`), the agent's own bounds it.
    pub dial_timeout: Duration,
    /// Session settings (windows, keepalive, and the handshake deadline, which covers an
    /// agent's TLS handshake and HELLO together).
    pub session: Config,
    /// HTTP CONNECT on TCP; `None` (the default): off. It is unauthenticated unless
    /// `connect_tls` asks for client certificates.
    pub connect_addr: Option<SocketAddr>,
    /// TLS for the CONNECT frontend (with a client CA: mTLS required).
    pub connect_tls: Option<Reloadable<rustls::ServerConfig>>,
    /// What the CONNECT frontend on TCP bounds before a client is through its request head:
    /// connections at once, and (TLS) the accept pace.
    pub client_admission: ClientAdmission,
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
    pub grpc_limits: GrpcLimits,
    /// Users (uids) allowed to connect to the Unix sockets; `None`: any user the socket's
    /// mode (0770) lets in.
    pub uds_peer_uids: Option<Vec<u32>>,
    /// `/healthz`, `/readyz`, `/metrics` on TCP.
    pub health_addr: Option<SocketAddr>,
    /// How long a CONNECT client may take from its connection to the end of its request head,
    /// TLS handshake included (one budget).
    pub header_timeout: Duration,
    /// With `--address-identifiers node`: how often a tunnel's address claims are checked
    /// against its Node again; one whose node no longer has a claimed address is closed
    /// (docs/SECURITY.md, "Address claims"). Zero: only at the handshake.
    pub address_recheck: Duration,
    /// How long a stream whose client has finished sending (a FIN on CONNECT, CLOSE_REQ on
    /// gRPC) may wait for the agent's credit without moving a byte before it is reset
    /// (docs/SECURITY.md, "Nothing stranded").
    pub linger: Duration,
    /// Konnectivity's own agents (`proxy-agent`) on the agent port, beside tether's, told
    /// apart by ALPN `h2` (docs/OPERATIONS.md, "Order of the switch"); `None`: refused.
    pub konnectivity_agents: Option<crate::kagent::KonnectivityAgents>,
}

impl ServerConfig {
    /// A configuration with the defaults the binary uses: agents on `agent_addr` with
    /// `agent_tls`, no tokens, strategy `default`, a 10 s dial timeout, and no other
    /// listener: no CONNECT frontend, no Unix socket, no health endpoint until asked for.
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
            connect_addr: None,
            connect_tls: None,
            client_admission: ClientAdmission {
                max_pending: 1024,
                tls_rate: 0.0,
                tls_burst: 1024,
            },
            reload_interval: Duration::from_secs(5),
            delete_existing_uds: true,
            uds_path: None,
            grpc_uds_path: None,
            grpc_limits: GrpcLimits::default(),
            uds_peer_uids: None,
            health_addr: None,
            header_timeout: Duration::from_secs(10),
            linger: tether::pump::LINGER,
            address_recheck: Duration::from_secs(300),
            konnectivity_agents: Some(crate::kagent::KonnectivityAgents::default()),
        }
    }
}
