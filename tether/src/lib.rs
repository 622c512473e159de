//! tether: tokio adapters around tether-proto's sans-IO session.
//!
//! - [`server::Server`]: accepts agent tunnels over TLS (mTLS and/or bearer tokens), routes
//!   dials to them, serves HTTP CONNECT (the protocol kube-apiserver's egress selector speaks)
//!   on TCP and a Unix socket, and `/healthz`, `/readyz`, `/metrics`.
//! - [`agent::Agent`]: dials out to the servers, serves their dials within an allowlist,
//!   reconnects with backoff and jitter.
//! - [`TetherStream`]: one tunneled connection as `AsyncRead + AsyncWrite`; from a running
//!   server, [`server::Server::dial`] gives one, so other proxies can embed tether without the
//!   HTTP frontend.
//!
//! The adapters move bytes; the session (`tether_proto::Session`) decides everything else.
//! See `docs/ARCHITECTURE.md`.

pub mod agent;
mod buffer;
pub mod cli;
pub mod pump;
pub mod server;
pub mod stream;
pub mod tls;
pub mod tunnel;

pub use agent::{Agent, AgentConfig};
pub use server::{Server, ServerConfig};
pub use stream::TetherStream;
pub use tunnel::{DialError, Tunnel};

/// Polls `ready` every 10 ms until it holds or `timeout` passes; whether it held.
pub(crate) async fn wait_until(timeout: std::time::Duration, ready: impl Fn() -> bool) -> bool {
    let end = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < end {
        if ready() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    ready()
}
