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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The largest response body read from the API server: a Lease list of a few hundred
/// servers, with room to spare. A longer one is an error, not an allocation.
pub const MAX_RESPONSE: usize = 4 * 1024 * 1024;

const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// How to reach and authenticate to the API server.
#[derive(Clone)]
pub struct KubeConfig {
    /// Host (name or address) and port of the API server.
    pub host: String,
    /// Port.
    pub port: u16,
    /// The name its certificate must carry.
    pub server_name: String,
    /// TLS (the cluster CA, and a client certificate when the user has one).
    pub tls: Arc<ClientConfig>,
    /// The bearer token, if any.
    pub auth: Auth,
    /// The namespace of the context (or of the pod, in cluster).
    pub namespace: Option<String>,
}

impl std::fmt::Debug for KubeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// A bearer token, given or read from a file at every call.
#[derive(Clone)]
pub enum Auth {
    /// No token (a client certificate, or nothing).
    None,
    /// A fixed token.
    Token(String),
    /// A file read at every call.
    TokenFile(PathBuf),
}

#[derive(Deserialize, Default)]
struct Kubeconfig {
    #[serde(default)]
    clusters: Vec<Named<Cluster>>,
    #[serde(default)]
    users: Vec<Named<User>>,
    #[serde(default)]
    contexts: Vec<Named<Context>>,
    #[serde(rename = "current-context", default)]
    current_context: String,
}

#[derive(Deserialize)]
struct Named<T> {
    name: String,
    #[serde(alias = "cluster", alias = "user", alias = "context")]
    value: Option<T>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
struct Cluster {
    server: String,
    certificate_authority: Option<PathBuf>,
    certificate_authority_data: Option<String>,
    tls_server_name: Option<String>,
    #[serde(default)]
    insecure_skip_tls_verify: bool,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
struct User {
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<PathBuf>,
    client_certificate: Option<PathBuf>,
    client_certificate_data: Option<String>,
    client_key: Option<PathBuf>,
    client_key_data: Option<String>,
    exec: Option<serde_yaml_ng::Value>,
    #[serde(rename = "auth-provider")]
    auth_provider: Option<serde_yaml_ng::Value>,
}

#[derive(Deserialize, Default)]
struct Context {
    cluster: String,
    #[serde(default)]
    user: String,
    namespace: Option<String>,
}

fn pick<'a, T>(list: &'a [Named<T>], name: &str, what: &str) -> Result<&'a T, String> {
    list.iter()
        .find(|n| n.name == name)
        .and_then(|n| n.value.as_ref())
        .ok_or_else(|| format!("no {what} named {name:?}"))
}

/// Inline `*-data` (base64) or a file, relative to the kubeconfig's directory.
fn material(
    data: Option<&String>,
    file: Option<&PathBuf>,
    dir: &Path,
    what: &str,
) -> Result<Option<Vec<u8>>, String> {
    use base64::Engine;
    if let Some(d) = data {
        let b = base64::engine::general_purpose::STANDARD
            .decode(d.trim())
            .map_err(|e| format!("{what}-data is not base64: {e}"))?;
        return Ok(Some(b));
    }
    match file {
        Some(f) => {
            let p = dir.join(f);
            std::fs::read(&p)
                .map(Some)
                .map_err(|e| format!("{what} {}: {e}", p.display()))
        }
        None => Ok(None),
    }
}

fn split_server(server: &str) -> Result<(String, u16), String> {
    let rest = server
        .strip_prefix("https://")
        .ok_or_else(|| format!("server {server:?}: only https:// API servers are supported"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6
            .split_once(']')
            .ok_or_else(|| format!("server {server:?}: bad IPv6 address"))?;
        let port = match p.strip_prefix(':') {
            Some(p) => p
                .parse()
                .map_err(|_| format!("server {server:?}: bad port"))?,
            None => 443,
        };
        return Ok((h.to_owned(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Ok((
            h.to_owned(),
            p.parse()
                .map_err(|_| format!("server {server:?}: bad port"))?,
        )),
        None => Ok((authority.to_owned(), 443)),
    }
}

impl KubeConfig {
    /// From a kubeconfig file (its current context), or in cluster when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<KubeConfig, String> {
        match path {
            Some(p) => KubeConfig::from_kubeconfig(p).map_err(|e| format!("{}: {e}", p.display())),
            None => KubeConfig::in_cluster(),
        }
    }

    /// From a kubeconfig file.
    pub fn from_kubeconfig(path: &Path) -> Result<KubeConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let kc: Kubeconfig = serde_yaml_ng::from_str(&text).map_err(|e| e.to_string())?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let ctx_name = if kc.current_context.is_empty() {
            kc.contexts
                .first()
                .map(|c| c.name.clone())
                .ok_or("no current-context and no context")?
        } else {
            kc.current_context.clone()
        };
        let ctx = pick(&kc.contexts, &ctx_name, "context")?;
        let cluster = pick(&kc.clusters, &ctx.cluster, "cluster")?;
        let default_user = User::default();
        let user = if ctx.user.is_empty() {
            &default_user
        } else {
            pick(&kc.users, &ctx.user, "user")?
        };
        if cluster.insecure_skip_tls_verify {
            return Err("insecure-skip-tls-verify is not supported: give the cluster's CA".into());
        }
        if user.exec.is_some() || user.auth_provider.is_some() {
            return Err(
                "exec and auth-provider credentials are not supported: use a token, a tokenFile or a client certificate".into(),
            );
        }
        let (host, port) = split_server(&cluster.server)?;
        let ca = material(
            cluster.certificate_authority_data.as_ref(),
            cluster.certificate_authority.as_ref(),
            dir,
            "certificate-authority",
        )?
        .ok_or("the cluster has no certificate-authority")?;
        let cert = material(
            user.client_certificate_data.as_ref(),
            user.client_certificate.as_ref(),
            dir,
            "client-certificate",
        )?;
        let key = material(
            user.client_key_data.as_ref(),
            user.client_key.as_ref(),
            dir,
            "client-key",
        )?;
        let pair = match (&cert, &key) {
            (Some(c), Some(k)) => Some((&c[..], &k[..])),
            (None, None) => None,
            _ => return Err("the user has a client certificate or key, not both".into()),
        };
        let tls = crate::tls::client_config(&ca, pair).map_err(|e| e.to_string())?;
        let auth = match (&user.token, &user.token_file) {
            (Some(t), _) => Auth::Token(t.trim().to_owned()),
            (None, Some(f)) => Auth::TokenFile(dir.join(f)),
            (None, None) => Auth::None,
        };
        Ok(KubeConfig {
            server_name: cluster
                .tls_server_name
                .clone()
                .unwrap_or_else(|| host.clone()),
            host,
            port,
            tls,
            auth,
            namespace: ctx.namespace.clone(),
        })
    }

    /// From the pod's service account: `KUBERNETES_SERVICE_HOST`, `KUBERNETES_SERVICE_PORT`,
    /// and the token, CA and namespace mounted under
    /// `/var/run/secrets/kubernetes.io/serviceaccount`.
    pub fn in_cluster() -> Result<KubeConfig, String> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
            "no --kubeconfig and not in a cluster (KUBERNETES_SERVICE_HOST is not set)".to_owned()
        })?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT")
            .unwrap_or_else(|_| "443".into())
            .parse()
            .map_err(|_| "KUBERNETES_SERVICE_PORT is not a port".to_owned())?;
        let dir = Path::new(SA_DIR);
        let ca = std::fs::read(dir.join("ca.crt"))
            .map_err(|e| format!("{}/ca.crt: {e}", dir.display()))?;
        let tls = crate::tls::client_config(&ca, None).map_err(|e| e.to_string())?;
        Ok(KubeConfig {
            // The API server's certificate names the service, not the address it is reached at.
            server_name: "kubernetes.default.svc".into(),
            host,
            port,
            tls,
            auth: Auth::TokenFile(dir.join("token")),
            namespace: std::fs::read_to_string(dir.join("namespace"))
                .ok()
                .map(|n| n.trim().to_owned()),
        })
    }
}

/// Why an API call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeError {
    /// No answer in time.
    Timeout,
    /// Connecting, TLS, or the HTTP exchange failed.
    Transport(String),
    /// The API server answered with this status (and the start of its message).
    Status(u16, String),
    /// The body is not what the API promises.
    Decode(String),
}

impl std::fmt::Display for KubeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KubeError::Timeout => f.write_str("the API server did not answer in time"),
            KubeError::Transport(e) => write!(f, "API server unreachable: {e}"),
            KubeError::Status(s, m) => write!(f, "API server answered {s}: {m}"),
            KubeError::Decode(e) => write!(f, "API server response does not decode: {e}"),
        }
    }
}

impl std::error::Error for KubeError {}

/// A client for the API server.
#[derive(Clone, Debug)]
pub struct Client {
    config: Arc<KubeConfig>,
    timeout: Duration,
}

impl Client {
    /// A client whose every call ends within `timeout`.
    pub fn new(config: KubeConfig, timeout: Duration) -> Client {
        Client {
            config: Arc::new(config),
            timeout,
        }
    }

    /// The configuration's namespace, if it has one.
    pub fn namespace(&self) -> Option<&str> {
        self.config.namespace.as_deref()
    }

    /// `method path` with an optional JSON body; the status and body of the answer.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), KubeError> {
        tokio::time::timeout(self.timeout, self.exchange(method, path, body))
            .await
            .map_err(|_| KubeError::Timeout)?
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), KubeError> {
        let c = &self.config;
        let t = |e: &dyn std::fmt::Display| KubeError::Transport(e.to_string());
        let token = match &c.auth {
            Auth::None => None,
            Auth::Token(t) => Some(t.clone()),
            Auth::TokenFile(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| KubeError::Transport(format!("{}: {e}", p.display())))?
                    .trim()
                    .to_owned(),
            ),
        };
        let name = ServerName::try_from(c.server_name.clone()).map_err(|e| t(&e))?;
        let tcp = TcpStream::connect((c.host.as_str(), c.port))
            .await
            .map_err(|e| KubeError::Transport(format!("{}:{}: {e}", c.host, c.port)))?;
        let mut tls = TlsConnector::from(c.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| t(&e))?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}:{}\r\nUser-Agent: tether/{}\r\nAccept: application/json\r\nConnection: close\r\n",
            c.server_name,
            c.port,
            env!("CARGO_PKG_VERSION")
        );
        if let Some(tok) = token {
            req.push_str(&format!("Authorization: Bearer {tok}\r\n"));
        }
        let body = body.unwrap_or_default();
        if !body.is_empty() || method != "GET" {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        tls.write_all(req.as_bytes()).await.map_err(|e| t(&e))?;
        tls.write_all(body).await.map_err(|e| t(&e))?;
        tls.flush().await.map_err(|e| t(&e))?;
        let mut raw = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        // Whether the server ended with TLS close_notify: only then may a body that runs to
        // the close be complete (without it, a truncation is indistinguishable).
        let clean_close;
        loop {
            let n = match tls.read(&mut chunk).await {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    clean_close = false;
                    break;
                }
                Err(e) => return Err(t(&e)),
            };
            if n == 0 {
                clean_close = true;
                break;
            }
            if raw.len() + n > MAX_RESPONSE + 64 * 1024 {
                return Err(KubeError::Transport(format!(
                    "response over {MAX_RESPONSE} bytes"
                )));
            }
            raw.extend_from_slice(&chunk[..n]);
            if let Some(done) = parse_response(&raw)? {
                return Ok(done);
            }
        }
        if let Some(done) = parse_response(&raw)? {
            return Ok(done);
        }
        match close_delimited(&raw) {
            Some(done) if clean_close => Ok(done),
            _ => Err(KubeError::Transport("response cut short".into())),
        }
    }
}

/// The status and body of a complete response in `raw`; `None` while it is incomplete.
fn parse_response(raw: &[u8]) -> Result<Option<(u16, Vec<u8>)>, KubeError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(KubeError::Transport(format!("bad HTTP response: {e}"))),
    };
    let status = resp.code.unwrap_or(0);
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let rest = &raw[head..];
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        return dechunk(rest).map(|b| b.map(|b| (status, b)));
    }
    match header("content-length") {
        Some(len) => {
            let len: usize = len
                .trim()
                .parse()
                .map_err(|_| KubeError::Transport("bad Content-Length".into()))?;
            if len > MAX_RESPONSE {
                return Err(KubeError::Transport(format!(
                    "response over {MAX_RESPONSE} bytes"
                )));
            }
            Ok((rest.len() >= len).then(|| (status, rest[..len].to_vec())))
        }
        // Delimited by the close: complete only at EOF, which the caller knows.
        None => Ok(None),
    }
}

/// A response with neither a length nor chunks: its body is everything to the close.
fn close_delimited(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => Some((resp.code.unwrap_or(0), raw[n..].to_vec())),
        _ => None,
    }
}

/// The body of a complete chunked encoding; `None` while it is incomplete.
fn dechunk(mut rest: &[u8]) -> Result<Option<Vec<u8>>, KubeError> {
    let mut body = Vec::new();
    loop {
        let (used, size) = match httparse::parse_chunk_size(rest) {
            Ok(httparse::Status::Complete(x)) => x,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(KubeError::Transport("bad chunk size".into())),
        };
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        if size > MAX_RESPONSE || body.len() + size > MAX_RESPONSE {
            return Err(KubeError::Transport(format!(
                "response over {MAX_RESPONSE} bytes"
            )));
        }
        rest = &rest[used..];
        if size == 0 {
            return Ok(Some(body));
        }
        if rest.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// `authentication.k8s.io/v1` TokenReview, as sent.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TokenReviewRequest<'a> {
    api_version: &'static str,
    kind: &'static str,
    spec: TokenReviewSpec<'a>,
}

#[derive(Serialize)]
struct TokenReviewSpec<'a> {
    token: &'a str,
    audiences: Vec<&'a str>,
}

#[derive(Deserialize)]
struct TokenReviewResponse {
    #[serde(default)]
    status: TokenReviewStatus,
}

#[derive(Deserialize, Default)]
struct TokenReviewStatus {
    #[serde(default)]
    authenticated: bool,
    #[serde(default)]
    user: UserInfo,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    error: String,
}

#[derive(Deserialize, Default)]
struct UserInfo {
    #[serde(default)]
    username: String,
    #[serde(default)]
    extra: BTreeMap<String, Vec<String>>,
}

/// What a TokenReview proved about a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    /// `system:serviceaccount:<namespace>:<name>`.
    pub username: String,
    /// The pod the token was issued for (`authentication.kubernetes.io/pod-name`).
    pub pod_name: Option<String>,
    /// The node of that pod (`authentication.kubernetes.io/node-name`).
    pub node_name: Option<String>,
    /// That node's addresses (its Node's `status.addresses`), when asked for.
    pub node_addresses: Vec<std::net::IpAddr>,
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReviewError {
    /// The API server said no (its reason, if any).
    Unauthenticated(String),
    /// Authenticated, but not as the expected service account, or not for our audience.
    Wrong(String),
    /// No verdict: the call failed or timed out.
    Failed(KubeError),
}

impl std::fmt::Display for ReviewError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReviewError::Unauthenticated(e) if e.is_empty() => {
                f.write_str("TokenReview: token not authenticated")
            }
            ReviewError::Unauthenticated(e) => write!(f, "TokenReview: not authenticated: {e}"),
            ReviewError::Wrong(e) => write!(f, "TokenReview: {e}"),
            ReviewError::Failed(e) => write!(f, "TokenReview failed: {e}"),
        }
    }
}

fn first(extra: &BTreeMap<String, Vec<String>>, key: &str) -> Option<String> {
    extra
        .get(key)
        .and_then(|v| v.first())
        .filter(|v| !v.is_empty())
        .cloned()
}

impl Client {
    /// Reviews `token` for `audience` and checks it belongs to `username`
    /// (`system:serviceaccount:<ns>:<sa>`).
    pub async fn review_token(
        &self,
        token: &str,
        audience: &str,
        username: &str,
    ) -> Result<Reviewed, ReviewError> {
        let req = TokenReviewRequest {
            api_version: "authentication.k8s.io/v1",
            kind: "TokenReview",
            spec: TokenReviewSpec {
                token,
                audiences: vec![audience],
            },
        };
        let body = serde_json::to_vec(&req)
            .map_err(|e| ReviewError::Failed(KubeError::Decode(e.to_string())))?;
        let (status, body) = self
            .call(
                "POST",
                "/apis/authentication.k8s.io/v1/tokenreviews",
                Some(&body),
            )
            .await
            .map_err(ReviewError::Failed)?;
        if !(200..300).contains(&status) {
            return Err(ReviewError::Failed(KubeError::Status(
                status,
                message(&body),
            )));
        }
        let r: TokenReviewResponse = serde_json::from_slice(&body)
            .map_err(|e| ReviewError::Failed(KubeError::Decode(e.to_string())))?;
        let s = r.status;
        if !s.authenticated {
            return Err(ReviewError::Unauthenticated(s.error));
        }
        if !s.audiences.iter().any(|a| a == audience) {
            return Err(ReviewError::Wrong(format!(
                "token is not for audience {audience:?}"
            )));
        }
        if s.user.username != username {
            return Err(ReviewError::Wrong(format!(
                "token is for {:?}, not {username:?}",
                s.user.username
            )));
        }
        Ok(Reviewed {
            pod_name: first(&s.user.extra, "authentication.kubernetes.io/pod-name"),
            node_name: first(&s.user.extra, "authentication.kubernetes.io/node-name"),
            username: s.user.username,
            node_addresses: Vec::new(),
        })
    }

    /// The IP addresses of the Node `name` (`status.addresses`, InternalIP and ExternalIP;
    /// host names are skipped).
    pub async fn node_addresses(&self, name: &str) -> Result<Vec<std::net::IpAddr>, KubeError> {
        #[derive(Deserialize)]
        struct Node {
            #[serde(default)]
            status: NodeStatus,
        }
        #[derive(Deserialize, Default)]
        struct NodeStatus {
            #[serde(default)]
            addresses: Vec<NodeAddress>,
        }
        #[derive(Deserialize)]
        struct NodeAddress {
            address: String,
        }
        if name.is_empty() || name.contains(['/', '?', '#', '%']) {
            return Err(KubeError::Decode(format!("node name {name:?}")));
        }
        let node: Node = decode(
            self.call("GET", &format!("/api/v1/nodes/{name}"), None)
                .await?,
        )?;
        Ok(node
            .status
            .addresses
            .iter()
            .filter_map(|a| a.address.parse().ok())
            .collect())
    }
}

/// The `message` of a `Status` body, or the body's start.
fn message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Status {
        message: String,
    }
    serde_json::from_slice::<Status>(body)
        .map(|s| s.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned())
}

/// `coordination.k8s.io/v1` Lease, the fields tether reads and writes.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    /// `coordination.k8s.io/v1`.
    #[serde(default)]
    pub api_version: String,
    /// `Lease`.
    #[serde(default)]
    pub kind: String,
    /// Name, namespace, labels, resource version.
    pub metadata: ObjectMeta,
    /// Holder and times.
    #[serde(default)]
    pub spec: LeaseSpec,
}

/// The metadata tether uses.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Name.
    pub name: String,
    /// Namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// For optimistic concurrency on update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
}

/// The lease's spec.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
#[serde(rename_all = "camelCase")]
pub struct LeaseSpec {
    /// Who holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder_identity: Option<String>,
    /// How long a renewal holds, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_duration_seconds: Option<i64>,
    /// When it was last renewed (RFC 3339 with microseconds, `MicroTime`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_time: Option<String>,
    /// When it was acquired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acquire_time: Option<String>,
}

#[derive(Deserialize)]
struct LeaseList {
    #[serde(default)]
    items: Vec<Lease>,
}

fn decode<T: serde::de::DeserializeOwned>((status, body): (u16, Vec<u8>)) -> Result<T, KubeError> {
    if !(200..300).contains(&status) {
        return Err(KubeError::Status(status, message(&body)));
    }
    serde_json::from_slice(&body).map_err(|e| KubeError::Decode(e.to_string()))
}

/// Percent-encodes a label selector for a query string.
fn query_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Client {
    /// The leases in `namespace` that match `selector` (`key=value,...`).
    pub async fn list_leases(
        &self,
        namespace: &str,
        selector: &str,
    ) -> Result<Vec<Lease>, KubeError> {
        let path = format!(
            "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases?labelSelector={}",
            query_escape(selector)
        );
        let list: LeaseList = decode(self.call("GET", &path, None).await?)?;
        Ok(list.items)
    }

    /// The lease `name`, or `None` if there is none.
    pub async fn get_lease(&self, namespace: &str, name: &str) -> Result<Option<Lease>, KubeError> {
        let path = format!("/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}");
        let r = self.call("GET", &path, None).await?;
        if r.0 == 404 {
            return Ok(None);
        }
        decode(r).map(Some)
    }

    /// Creates `lease`.
    pub async fn create_lease(&self, namespace: &str, lease: &Lease) -> Result<Lease, KubeError> {
        let path = format!("/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases");
        let body = serde_json::to_vec(lease).map_err(|e| KubeError::Decode(e.to_string()))?;
        decode(self.call("POST", &path, Some(&body)).await?)
    }

    /// Replaces `lease` (its resource version must be current).
    pub async fn update_lease(&self, namespace: &str, lease: &Lease) -> Result<Lease, KubeError> {
        let path = format!(
            "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{}",
            lease.metadata.name
        );
        let body = serde_json::to_vec(lease).map_err(|e| KubeError::Decode(e.to_string()))?;
        decode(self.call("PUT", &path, Some(&body)).await?)
    }

    /// Deletes the lease `name` (gone already is fine); with `resource_version`, only if it is
    /// still that version (a lease renewed since it was read is left alone: 409).
    pub async fn delete_lease(
        &self,
        namespace: &str,
        name: &str,
        resource_version: Option<&str>,
    ) -> Result<(), KubeError> {
        let path = format!("/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}");
        let body = resource_version.map(|rv| {
            serde_json::json!({"kind": "DeleteOptions", "apiVersion": "v1",
                               "preconditions": {"resourceVersion": rv}})
            .to_string()
        });
        let (status, body) = self
            .call("DELETE", &path, body.as_deref().map(str::as_bytes))
            .await?;
        if (200..300).contains(&status) || status == 404 {
            Ok(())
        } else {
            Err(KubeError::Status(status, message(&body)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_framed_by_length_by_chunks_or_not_yet() {
        let r = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_response(r).unwrap(), Some((201, b"{}".to_vec())));
        assert_eq!(parse_response(&r[..r.len() - 1]).unwrap(), None);
        let c = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(c).unwrap(), Some((200, b"abcde".to_vec())));
        assert_eq!(parse_response(&c[..c.len() - 8]).unwrap(), None);
        let huge = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_RESPONSE + 1
        );
        assert!(parse_response(huge.as_bytes()).is_err());
    }

    #[test]
    fn server_urls_split_into_host_and_port() {
        assert_eq!(
            split_server("https://10.0.0.1:6443").unwrap(),
            ("10.0.0.1".into(), 6443)
        );
        assert_eq!(
            split_server("https://[::1]:6443/").unwrap(),
            ("::1".into(), 6443)
        );
        assert_eq!(
            split_server("https://api.example").unwrap(),
            ("api.example".into(), 443)
        );
        assert!(split_server("http://insecure:8080").is_err());
    }

    #[test]
    fn selectors_are_escaped_for_the_query() {
        assert_eq!(
            query_escape("k8s-app=konnectivity-server,a in (b)"),
            "k8s-app%3Dkonnectivity-server%2Ca%20in%20%28b%29"
        );
    }
}
