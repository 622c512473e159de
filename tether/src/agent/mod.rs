//! The agent end of tunnels: an [`Agent`] dials out to its servers over TLS, keeps one tunnel
//! to each (as many distinct servers as the server count says, over all its addresses),
//! reconnects with backoff and jitter, and serves the servers' dials through the caller's
//! [`Dialer`]: which destinations may be reached, and how, is the caller's policy.
//!
//! ```no_run
//! # fn example(tls: std::sync::Arc<rustls::ClientConfig>) {
//! use tether::agent::{Agent, AgentConfig, Dialer};
//! use tether_proto::{ErrorCode, frame::Dial};
//!
//! /// Dials only port 80, anywhere.
//! struct WebOnly;
//!
//! impl Dialer for WebOnly {
//!     type Conn = tokio::net::TcpStream;
//!     async fn dial(&self, d: &Dial) -> Result<Self::Conn, (ErrorCode, String)> {
//!         if d.port != 80 {
//!             return Err((ErrorCode::DIAL_FORBIDDEN, "only port 80".into()));
//!         }
//!         tether::agent::connect_tcp(&d.host, d.port, std::time::Duration::from_secs(5)).await
//!     }
//! }
//!
//! let agent = Agent::start(AgentConfig::new(vec!["server:8091".into()], tls, "node-1"), WebOnly);
//! # }
//! ```

mod connect;
mod run;
mod serve;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use tether_proto::frame::{Dial, Identifier};
use tether_proto::{Config, ErrorCode};
use tokio::sync::watch;

pub use run::{Agent, TunnelSet};
pub use serve::{connect_tcp, dial_code, os_words};

use crate::pump::Socket;
use crate::reload::Reloadable;
use crate::stats::AgentStats;

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
    /// With `server_count`: keep the larger of it and what the servers announce
    /// (Konnectivity's `--server-count-source max`) instead of it alone.
    pub server_count_max: bool,
    /// The agent id.
    pub agent_id: String,
    /// What the agent can reach (routing at the server).
    pub identifiers: Vec<Identifier>,
    /// A bearer token file, read at every connection (tokens rotate).
    pub token_path: Option<std::path::PathBuf>,
    /// First reconnect delay; doubles up to `sync_interval_cap`, with jitter.
    pub sync_interval: Duration,
    /// Longest reconnect delay.
    pub sync_interval_cap: Duration,
    /// Session settings (windows, keepalive, and the handshake deadline, which covers the TCP
    /// connect, TLS and WELCOME together).
    pub session: Config,
    /// Where the agent counts what it does.
    pub stats: Arc<AgentStats>,
    /// How long a stream whose destination has finished sending may wait for the server's
    /// credit without moving a byte (see `tether::pump::pump`).
    pub linger: Duration,
}

impl AgentConfig {
    /// `servers` over `tls` as `agent_id`, with no identifiers, no token, the session
    /// defaults, and reconnects from 1 s doubling to 10 s.
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
            server_count_max: false,
            agent_id: agent_id.into(),
            identifiers: Vec::new(),
            token_path: None,
            sync_interval: Duration::from_secs(1),
            sync_interval_cap: Duration::from_secs(10),
            session: Config::default(),
            stats: Arc::new(AgentStats::default()),
            linger: crate::pump::LINGER,
        }
    }
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("servers", &self.servers)
            .field("agent_id", &self.agent_id)
            .field("identifiers", &self.identifiers)
            .finish_non_exhaustive()
    }
}

/// The agent's dial policy: whether a server's dial may be served, and the connection that
/// serves it. The agent races the dial against the opener giving up (the connection is then
/// dropped), accepts the stream once it is connected, and pumps bytes both ways.
pub trait Dialer: Send + Sync + 'static {
    /// The connection to a destination.
    type Conn: Socket + Send + 'static;

    /// Connects to `dial`'s destination, or refuses with a RESET code (`DIAL_FORBIDDEN`,
    /// `DIAL_REFUSED`, ...) and a short reason.
    fn dial(
        &self,
        dial: &Dial,
    ) -> impl Future<Output = Result<Self::Conn, (ErrorCode, String)>> + Send;
}
