//! tether: the tokio adapter of tether-proto's sans-IO session, for programs that embed an
//! agent-initiated reverse tunnel.
//!
//! An agent dials *out* to a server over TLS and keeps that connection (the tunnel) open; the
//! server then opens streams through it, each a TCP connection the agent makes on its side.
//! This crate moves the bytes and the time; the session (`tether_proto::Session`) decides
//! everything else. What it offers:
//!
//! - [`listen::Listener`]: the server end. Accepts agents over TLS, runs each handshake under
//!   the session's deadline, asks the caller's [`listen::Admission`] about each HELLO and hands
//!   it every admitted [`Tunnel`];
//! - [`agent::Agent`]: the agent end. Keeps tunnels to its servers, reconnects with backoff and
//!   jitter, and serves their dials through the caller's [`agent::Dialer`];
//! - [`Tunnel::dial`] and [`TetherStream`]: one stream as `AsyncRead + AsyncWrite` (shutdown is
//!   a half-close), with flow control that makes a slow reader slow its own stream only;
//!   [`pump::pump`] joins one to a socket;
//! - [`tls`]: rustls configurations (aws-lc-rs) from PEM files, reloaded when they change
//!   ([`reload`]); [`stats`]: counters to export however the caller exports.
//!
//! No HTTP, gRPC, Kubernetes or metrics format, and no allocator: the control-plane server and
//! the node agent built on this crate (`tether-server`, `tether-agent`) add those.
//!
//! The smallest use, a server that dials a node through the agent that connected first (the
//! stream is `AsyncRead + AsyncWrite`; `shutdown` is a half-close):
//!
//! ```no_run
//! # async fn example(agent_tls: std::sync::Arc<rustls::ServerConfig>)
//! # -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use tether::listen::{Admission, Admitted, ListenConfig, Listener, Peer, Refusal};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! /// Admits every agent TLS let in, and passes its tunnel on.
//! struct First(tokio::sync::mpsc::Sender<tether::Tunnel>);
//!
//! impl Admission for First {
//!     type Grant = ();
//!     async fn admit(&self, _: &tether_proto::frame::Hello, _: &Peer) -> Result<(), Refusal> {
//!         Ok(())
//!     }
//!     async fn serve(&self, agent: Admitted, (): ()) {
//!         let _ = self.0.send(agent.tunnel.clone()).await;
//!         agent.tunnel.closed().await;
//!     }
//! }
//!
//! let (tx, mut tunnels) = tokio::sync::mpsc::channel(1);
//! let config = ListenConfig::new(agent_tls);
//! let _listener = Listener::bind("0.0.0.0:8091".parse()?, config, Arc::new(First(tx))).await?;
//! let tunnel = tunnels.recv().await.ok_or("no agent")?;
//! let mut stream = tunnel.dial("10.0.0.7", 10250, std::time::Duration::from_secs(5)).await?;
//! stream.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await?;
//! stream.shutdown().await?;
//! let mut reply = Vec::new();
//! stream.read_to_end(&mut reply).await?;
//! # Ok(())
//! # }
//! ```
//!
//! `examples/embed.rs` runs both ends, with a dial policy of its own. Feature `test-util`
//! carries throwaway certificates (`tls::testpki`, rcgen) and tunnels joined in memory
//! ([`testing`]).

pub mod agent;
mod buffer;
pub mod listen;
pub mod pump;
pub mod reload;
pub mod stats;
pub mod tasks;
#[cfg(feature = "test-util")]
pub mod testing;
pub mod tls;
pub mod tunnel;

pub use buffer::{Chunks, QUIET_AFTER};
pub use tunnel::{DialError, Gone, Incoming, RecvHalf, SendHalf, TetherStream, Tunnel};
