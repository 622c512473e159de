//! How to reach and authenticate to the API server: a kubeconfig file or the pod's in-cluster
//! service account.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ClientConfig;
use serde::Deserialize;

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
        let tls = tether::tls::client_config(&ca, pair).map_err(|e| e.to_string())?;
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
        let tls = tether::tls::client_config(&ca, None).map_err(|e| e.to_string())?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
