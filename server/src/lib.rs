//! tether-server: the control-plane side of tether, as a library and the `tether-server`
//! binary.
//!
//! On top of `tether::listen` (agent tunnels over TLS, handshakes under a deadline) it adds
//! what a Kubernetes control plane needs: who an agent is and what it may claim ([`identity`],
//! TokenReview in [`review`]), routing by destination ([`registry`]), the frontends
//! kube-apiserver speaks, HTTP CONNECT ([`connect`]) and Konnectivity's gRPC ProxyService
//! ([`grpc`]) on TCP, TLS and Unix sockets, `/healthz`, `/readyz` and `/metrics` ([`metrics`]),
//! and the flags of Konnectivity's `proxy-server` ([`cli`]). docs/ARCHITECTURE.md draws the
//! modules.

mod agents;
pub mod cli;
#[cfg(feature = "test-util")]
pub mod client;
mod config;
pub mod connect;
mod core;
mod dial;
pub mod grpc;
pub mod http;
pub mod identity;
mod kagent;
pub mod metrics;
pub mod registry;
pub mod review;
mod server;
#[cfg(unix)]
mod uds;

pub use config::ServerConfig;
pub use core::ServerCore;
pub use dial::failure_to_http;
pub use identity::{AddressClaims, HostClaims, IdRule, IdentityPolicy, Tokens};
pub use kagent::KonnectivityAgents;
pub use metrics::{Frontend, Metrics};
pub use registry::{Registry, Strategy, parse_strategies};
pub use review::TokenReviewer;
pub use server::Server;
