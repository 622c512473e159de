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
//! The adapters move bytes and time; the session (`tether_proto::Session`) decides everything
//! else. See `docs/ARCHITECTURE.md`.
//!
//! The smallest use, embedding the server and dialling a node through whichever agent serves
//! it (the stream is `AsyncRead + AsyncWrite`; `shutdown` is a half-close):
//!
//! ```no_run
//! # async fn example(agent_tls: std::sync::Arc<rustls::ServerConfig>)
//! # -> Result<(), Box<dyn std::error::Error>> {
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! let config = tether::ServerConfig::new("0.0.0.0:8091".parse()?, agent_tls);
//! let server = tether::Server::start(config).await?;
//! let mut stream = server.dial("10.0.0.7", 10250).await?;
//! stream.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await?;
//! stream.shutdown().await?;
//! let mut reply = Vec::new();
//! stream.read_to_end(&mut reply).await?;
//! # Ok(())
//! # }
//! ```
//!
//! Features: `cli` (default) carries the binaries' flag parsing and logging; `test-util`
//! carries throwaway certificates (`tls::testpki`) and the CONNECT parser's fuzz entry point.

pub mod agent;
mod buffer;
#[cfg(feature = "cli")]
pub mod cli;
pub mod kube;
pub mod lease;
pub mod metrics;
pub mod pump;
pub mod reload;
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

/// Tasks that run until shutdown, each with what it serves.
pub(crate) type Named = Vec<(String, tokio::task::JoinHandle<()>)>;

/// Waits until one of `tasks` ends, removes it (a finished task is not polled again) and
/// says which and why: `"<name> stopped"`, with tokio's panic or cancellation message if it
/// failed. Never ready while all run, nor with none.
pub(crate) async fn first_to_end(tasks: &mut Named) -> String {
    let (i, result) = std::future::poll_fn(|cx| {
        for (i, (_, t)) in tasks.iter_mut().enumerate() {
            if let std::task::Poll::Ready(r) = std::pin::Pin::new(t).poll(cx) {
                return std::task::Poll::Ready((i, r));
            }
        }
        std::task::Poll::Pending
    })
    .await;
    let (name, _) = tasks.swap_remove(i);
    match result {
        Ok(()) => format!("{name} stopped"),
        Err(e) => format!("{name} stopped: {e}"),
    }
}
