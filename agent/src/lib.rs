//! tether-agent: the node side of tether, as a library and the `tether-agent` binary.
//!
//! On top of `tether::agent` (tunnels to every server, reconnects, serving dials) it adds what a
//! node needs: the destination allowlist checked on the addresses actually dialled
//! ([`dialer`]), `/healthz`, `/readyz` and `/metrics` ([`metrics`]), and the flags of
//! Konnectivity's `proxy-agent` ([`cli`]).

pub mod cli;
pub mod dialer;
pub mod metrics;
mod service;

pub use dialer::Allowlist;
pub use metrics::AgentMetrics;
pub use service::{Agent, AgentConfig};
