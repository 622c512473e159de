//! A small typed client for the Kubernetes API calls tether makes: TokenReview create (agent
//! authentication), and Lease get, create, update, delete and list (server count in HA).
//!
//! Why not kube-rs: tether needs these few calls, not a general client. kube with rustls and
//! k8s-openapi adds hyper, tower, http and the whole generated API to the build (measured in
//! docs/OPERATIONS.md, "The Kubernetes client"); this module is HTTP/1.1 over the tokio-rustls
//! and httparse tether already links, with serde for the JSON. Each call opens one TLS
//! connection (`Connection: close`): the calls are rare (a review per new token, cached; a
//! lease renewal every few seconds), and no pool means no idle state to get wrong.
//!
//! Configuration comes from a kubeconfig file (`--kubeconfig`: its current context's cluster
//! and user: server, certificate-authority[-data], tls-server-name, token, tokenFile,
//! client-certificate[-data], client-key[-data]) or, without one, from the pod's in-cluster
//! service account (`KUBERNETES_SERVICE_HOST`/`_PORT`, the mounted token and CA). A token file
//! is read at every call: projected tokens rotate.

mod api;
mod config;
mod http;

pub use api::{Lease, LeaseSpec, ObjectMeta, ReviewError, Reviewed};
pub use config::{Auth, KubeConfig};
pub use http::{Client, KubeError, MAX_RESPONSE};
