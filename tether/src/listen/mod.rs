//! The server end of tunnels: a [`Listener`] accepts agents over TLS, runs each one's handshake
//! under the session's deadline, asks the caller's [`Admission`] whether the HELLO is allowed,
//! and hands every admitted tunnel to it for the tunnel's life.
//!
//! What the listener bounds by itself (docs/SECURITY.md): connections in their TLS handshake or
//! HELLO at once (`max_handshakes`; the rest wait in the kernel's backlog), the accept rate after
//! a burst, and the time from the first byte to an established session (one budget for TLS and
//! HELLO, the session's handshake deadline). Who an agent is, what it may claim and where its
//! tunnel goes are the caller's.
//!
//! ```no_run
//! # async fn example(tls: std::sync::Arc<rustls::ServerConfig>) -> std::io::Result<()> {
//! use std::sync::Arc;
//! use tether::listen::{Admission, Admitted, ListenConfig, Listener, Peer, Refusal};
//! use tether_proto::frame::Hello;
//!
//! struct Anyone;
//!
//! impl Admission for Anyone {
//!     type Grant = ();
//!     async fn admit(&self, _: &Hello, _: &Peer) -> Result<(), Refusal> {
//!         Ok(()) // the client certificate was checked by TLS
//!     }
//!     async fn serve(&self, agent: Admitted, (): ()) {
//!         let mut s = agent.tunnel.dial("10.0.0.7", 10250, std::time::Duration::from_secs(5)).await;
//!         agent.tunnel.closed().await;
//!     }
//! }
//!
//! let listener = Listener::bind("0.0.0.0:8091".parse().unwrap(), ListenConfig::new(tls), Arc::new(Anyone)).await?;
//! # Ok(())
//! # }
//! ```

mod accept;
mod pacer;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use tether_proto::Config;
use tether_proto::frame::Hello;
use tokio::sync::watch;

pub use accept::{AgentTls, Handover, TunnelPath};
pub use pacer::{AcceptPacer, MIN_AGENT_ACCEPT_RATE};

use crate::reload::Reloadable;
use crate::stats::{ListenerStats, RefusalKind};
use crate::tasks::Tasks;
use crate::tunnel::Tunnel;

/// How a listener accepts agents.
#[derive(Clone)]
pub struct ListenConfig {
    /// TLS for agents; with a client CA, agents must present a certificate it signed. Each
    /// handshake takes the material in use when it starts (reloaded from its files).
    pub tls: Reloadable<rustls::ServerConfig>,
    /// Session settings (windows, keepalive, and the handshake deadline, which covers an
    /// agent's TLS handshake and HELLO together; it must not be 0).
    pub session: Config,
    /// This server's id, sent in WELCOME.
    pub server_id: String,
    /// How many servers the agents should connect to (HA), sent in WELCOME.
    pub server_count: u16,
    /// A live count of servers (Kubernetes leases, say); WELCOME carries the larger of it and
    /// `server_count`.
    pub server_count_source: Option<watch::Receiver<u16>>,
    /// Agent connections that may be in their TLS handshake or HELLO at once; more wait in the
    /// listen backlog.
    pub max_handshakes: usize,
    /// Agent connections accepted per second at most, after a burst of `accept_burst`. 0, a
    /// negative rate, NaN or infinity: no limit; a rate under [`MIN_AGENT_ACCEPT_RATE`] is
    /// taken as that.
    pub accept_rate: f64,
    /// Agent connections accepted at once before the rate applies.
    pub accept_burst: u32,
    /// Where the listener and its tunnels count (handshakes, refusals, bytes, stream errors).
    pub stats: Arc<ListenerStats>,
    /// How long a stream whose sending side has finished may wait for credit without moving
    /// a byte before it is reset ([`crate::pump::LINGER`]).
    pub linger: std::time::Duration,
    /// ALPN protocol names whose connections are handed to [`Admission::hand_over`] once TLS
    /// is done (`h2` for Konnectivity's gRPC agents, say). A client offering one of them gets
    /// it selected; any other is answered without ALPN, as when this is empty (the default).
    pub handover_alpn: Vec<Vec<u8>>,
}

impl ListenConfig {
    /// Agents over `tls`, with the session defaults, server id `tether-server`, a server count
    /// of 1, 256 handshakes at once and no accept pacing.
    pub fn new(tls: impl Into<Reloadable<rustls::ServerConfig>>) -> ListenConfig {
        ListenConfig {
            tls: tls.into(),
            session: Config::default(),
            server_id: "tether-server".into(),
            server_count: 1,
            server_count_source: None,
            max_handshakes: 256,
            accept_rate: 0.0,
            accept_burst: 256,
            stats: Arc::new(ListenerStats::default()),
            linger: crate::pump::LINGER,
            handover_alpn: Vec::new(),
        }
    }
}

/// What a connection proved before its HELLO: where it came from and the client certificate
/// chain TLS verified (empty without mTLS).
#[derive(Debug, Clone)]
pub struct Peer {
    /// The agent's address.
    pub addr: SocketAddr,
    /// The verified client certificate chain, the agent's own first.
    pub certificates: Vec<CertificateDer<'static>>,
}

/// An admitted agent: its tunnel, established, and what it said in its HELLO.
#[derive(Debug)]
pub struct Admitted {
    /// The tunnel.
    pub tunnel: Tunnel,
    /// The agent's HELLO (its id, identifiers and token).
    pub hello: Hello,
    /// What its connection proved.
    pub peer: Peer,
}

/// Why a HELLO is refused: what the agent's GOAWAY (UNAUTHORIZED) says, what the log says, and
/// the kind it is counted under.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// [`RefusalKind::Unauthorized`] or [`RefusalKind::Certificate`], usually.
    pub kind: RefusalKind,
    /// The reason the agent reads (it names the rule, nothing of the server's).
    pub wire: String,
    /// The reason the server logs.
    pub log: String,
}

impl Refusal {
    /// An unauthorized HELLO, with one reason for the agent and the log.
    pub fn unauthorized(reason: impl Into<String>) -> Refusal {
        let reason = reason.into();
        Refusal {
            kind: RefusalKind::Unauthorized,
            wire: reason.clone(),
            log: reason,
        }
    }
}

/// The caller's part in accepting agents.
pub trait Admission: Send + Sync {
    /// What a decision to admit hands to [`serve`](Admission::serve): who the agent proved
    /// to be, say, beyond its HELLO and certificates (`()` when nothing).
    type Grant: Send + 'static;

    /// Decides a HELLO against what the connection proved (an API call may be made: the wait
    /// is bounded by the session's handshake deadline, and dropped at once if the agent
    /// leaves). `Err` refuses it: GOAWAY UNAUTHORIZED with the refusal's wire reason.
    fn admit(
        &self,
        hello: &Hello,
        peer: &Peer,
    ) -> impl Future<Output = Result<Self::Grant, Refusal>> + Send;

    /// Runs for an admitted tunnel's life, in the connection's task: register it, wait for
    /// [`Tunnel::closed`], unregister. The tunnel is closed when this returns, and when the
    /// listener is dropped.
    fn serve(&self, agent: Admitted, grant: Self::Grant) -> impl Future<Output = ()> + Send;

    /// Serves a connection whose TLS handshake selected one of
    /// [`ListenConfig::handover_alpn`]: another kind of agent. The default closes it.
    /// To make it a tunnel, translate its protocol to tether's over an in-memory transport
    /// and pass one end to [`TunnelPath::serve`]: the HELLO arriving there is admitted and
    /// served as any agent's.
    fn hand_over(&self, conn: Handover) -> impl Future<Output = ()> + Send {
        async move {
            tracing::warn!(?conn, "no service for this protocol; closing");
        }
    }
}

/// A listening agent port. Dropping it stops accepting, ends every connection it accepted (a
/// tunnel still open is closed) and frees the port.
pub struct Listener {
    addr: SocketAddr,
    stats: Arc<ListenerStats>,
    accept: Tasks,
    conns: Arc<accept::Conns>,
}

impl Listener {
    /// Binds `addr` and starts accepting agents into `admission`.
    pub async fn bind<A: Admission + 'static>(
        addr: SocketAddr,
        config: ListenConfig,
        admission: Arc<A>,
    ) -> io::Result<Listener> {
        if config.session.handshake_timeout_ms == 0 {
            // Slots for handshakes are capped: without a deadline, silent connections would
            // hold them for ever (docs/SECURITY.md).
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the agent port needs a handshake deadline (handshake timeout 0)",
            ));
        }
        let l = tokio::net::TcpListener::bind(addr).await?;
        let addr = l.local_addr()?;
        let stats = config.stats.clone();
        let conns = Arc::new(accept::Conns::default());
        let mut tasks = Tasks::new();
        tasks.push(
            "the agent listener",
            tokio::spawn(accept::accept(
                l,
                Arc::new(config),
                admission,
                stats.clone(),
                conns.clone(),
            )),
        );
        Ok(Listener {
            addr,
            stats,
            accept: tasks,
            conns,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the listener and its tunnels have counted.
    pub fn stats(&self) -> &Arc<ListenerStats> {
        &self.stats
    }

    /// Waits until the accept loop ends, which it does only by failing (a panic), and says
    /// why. Never ready while it runs.
    pub async fn failed(&mut self) -> String {
        self.accept.first_to_end().await
    }

    /// Stops accepting and frees the port when it returns; the tunnels already admitted run
    /// on (a drain closes them; dropping the listener ends them).
    pub async fn stop_accepting(&mut self) {
        std::mem::take(&mut self.accept).stop().await;
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.conns.abort_all();
    }
}
