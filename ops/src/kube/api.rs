//! The calls tether makes: TokenReview create, the Node's addresses, and Leases.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::http::{Client, KubeError};

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

/// `coordination.k8s.io/v1` Lease: the fields tether reads and writes, and every other field
/// as it was read (a renewal is a read, a change of tether's fields, and a write of the whole
/// object: nothing tether does not model is lost).
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
    /// Every other field, kept as read so an update writes it back unchanged.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
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
    /// Every other field (annotations, owner references, managed fields, ...), kept as read
    /// so an update writes it back unchanged.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
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
    /// Every other field (`leaseTransitions`, `preferredHolder`, `strategy`, ...), kept as read
    /// so an update writes it back unchanged.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
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
    fn a_lease_read_changed_and_written_keeps_the_fields_tether_does_not_model() {
        let read = br#"{"apiVersion":"coordination.k8s.io/v1","kind":"Lease",
            "metadata":{"name":"konnectivity-proxy-server-a","namespace":"kube-system",
              "resourceVersion":"7","annotations":{"team":"infra"},
              "ownerReferences":[{"kind":"Pod","name":"p","uid":"u","apiVersion":"v1"}]},
            "spec":{"holderIdentity":"a","leaseDurationSeconds":30,"leaseTransitions":4,
              "preferredHolder":"b"}}"#;
        let mut lease: Lease = serde_json::from_slice(read).unwrap();
        lease.spec.renew_time = Some("2026-12-07T00:00:00.000000Z".into());
        let written: serde_json::Value =
            serde_json::from_slice(&serde_json::to_vec(&lease).unwrap()).unwrap();
        assert_eq!(written["metadata"]["annotations"]["team"], "infra");
        assert_eq!(written["metadata"]["ownerReferences"][0]["uid"], "u");
        assert_eq!(written["spec"]["leaseTransitions"], 4);
        assert_eq!(written["spec"]["preferredHolder"], "b");
        assert_eq!(written["spec"]["renewTime"], "2026-12-07T00:00:00.000000Z");
        assert_eq!(written["metadata"]["resourceVersion"], "7");
    }

    #[test]
    fn selectors_are_escaped_for_the_query() {
        assert_eq!(
            query_escape("k8s-app=konnectivity-server,a in (b)"),
            "k8s-app%3Dkonnectivity-server%2Ca%20in%20%28b%29"
        );
    }
}
