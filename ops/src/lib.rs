//! What tether's two applications share, below both (`tether-server`, `tether-agent`): the
//! Kubernetes API client and leases, the metrics exposition and the small health server, and
//! the flags, parsers and logging both binaries use. Nothing here is needed to embed a tunnel:
//! that is the `tether` crate alone.

pub mod cli;
pub mod kube;
pub mod lease;
pub mod metrics;
