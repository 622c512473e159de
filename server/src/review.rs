//! Agents authenticated by Kubernetes service-account tokens (TokenReview), as Konnectivity's
//! `--agent-namespace`, `--agent-service-account` and `--authentication-audience` do.
//!
//! The server sends the agent's bearer token to `authentication.k8s.io/v1` TokenReview with
//! the audience, and accepts it only when the API server says it is authenticated, for that
//! audience, as `system:serviceaccount:<namespace>:<name>`. The review's pod and node names
//! (the token's `authentication.kubernetes.io/pod-name` and `node-name` extras) are what the
//! agent id is bound to (docs/SECURITY.md).
//!
//! Bounds this end chooses: positive reviews are cached for `cache_ttl` (10 s by default) and
//! at most `CACHE_ENTRIES` tokens; at most `MAX_IN_FLIGHT` reviews run at once (a reconnect
//! storm waits its turn inside each agent's handshake deadline instead of opening thousands of
//! connections to the API server); each review ends within the client's timeout. A review
//! that fails or times out refuses that agent only.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use tether_ops::kube::{Client, ReviewError, Reviewed};

/// Most tokens whose positive review is cached.
pub const CACHE_ENTRIES: usize = 4096;
/// Most reviews in flight at once.
pub const MAX_IN_FLIGHT: usize = 32;

/// Reviews agents' tokens against the API server.
pub struct TokenReviewer {
    client: Client,
    audience: String,
    username: String,
    cache_ttl: Duration,
    cache: Mutex<HashMap<String, (Instant, Reviewed)>>,
    in_flight: Semaphore,
    node_addresses: bool,
    timeout: Duration,
}

impl std::fmt::Debug for TokenReviewer {
    // The cache's keys are bearer tokens: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("audience", &self.audience)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    /// Tokens must be for `audience` and belong to the service account `namespace/name`.
    /// A review, its wait for a turn included, ends within `timeout`.
    pub fn new(
        client: Client,
        audience: impl Into<String>,
        namespace: &str,
        service_account: &str,
        cache_ttl: Duration,
        timeout: Duration,
    ) -> TokenReviewer {
        TokenReviewer {
            client,
            audience: audience.into(),
            username: format!("system:serviceaccount:{namespace}:{service_account}"),
            cache_ttl,
            cache: Mutex::new(HashMap::new()),
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
            node_addresses: false,
            timeout,
        }
    }

    /// Also reads the addresses of the node each token was issued for (`--address-identifiers
    /// node`).
    pub fn with_node_addresses(mut self) -> TokenReviewer {
        self.node_addresses = true;
        self
    }

    /// The user name a token must review as.
    pub fn username(&self) -> &str {
        &self.username
    }

    /// What `token` proves, from the cache or the API server, within the review timeout
    /// (waiting for a turn among the reviews in flight included).
    pub async fn review(&self, token: &str) -> Result<Reviewed, ReviewError> {
        if let Some(r) = self.cached(token) {
            return Ok(r);
        }
        tokio::time::timeout(self.timeout, self.review_now(token))
            .await
            .map_err(|_| ReviewError::Failed(tether_ops::kube::KubeError::Timeout))?
    }

    async fn review_now(&self, token: &str) -> Result<Reviewed, ReviewError> {
        let _permit = self.in_flight.acquire().await;
        // Another review of the same token may have finished while this one waited.
        if let Some(r) = self.cached(token) {
            return Ok(r);
        }
        let mut r = self
            .client
            .review_token(token, &self.audience, &self.username)
            .await?;
        if self.node_addresses
            && let Some(node) = &r.node_name
        {
            r.node_addresses = self
                .client
                .node_addresses(node)
                .await
                .map_err(ReviewError::Failed)?;
        }
        if !self.cache_ttl.is_zero() {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if cache.len() >= CACHE_ENTRIES {
                cache.retain(|_, (at, _)| now.duration_since(*at) < self.cache_ttl);
            }
            if cache.len() < CACHE_ENTRIES {
                cache.insert(token.to_owned(), (now, r.clone()));
            }
        }
        Ok(r)
    }

    /// The addresses of Node `node` as the API server has them now (never cached), within the
    /// review timeout and in turn with the reviews in flight: what a tunnel's node-bound
    /// address claims are checked against again while it lives.
    pub async fn node_addresses(
        &self,
        node: &str,
    ) -> Result<Vec<std::net::IpAddr>, tether_ops::kube::KubeError> {
        let fetch = async {
            let _permit = self.in_flight.acquire().await;
            self.client.node_addresses(node).await
        };
        tokio::time::timeout(self.timeout, fetch)
            .await
            .map_err(|_| tether_ops::kube::KubeError::Timeout)?
    }

    /// Forgets the cached reviews of tokens issued for `node`, whose addresses are stale: the
    /// next handshake of its agent is reviewed, and its addresses read, afresh.
    pub fn forget_node(&self, node: &str) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|_, (_, r)| r.node_name.as_deref() != Some(node));
    }

    fn cached(&self, token: &str) -> Option<Reviewed> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(token) {
            Some((at, r)) if at.elapsed() < self.cache_ttl => Some(r.clone()),
            Some(_) => {
                cache.remove(token);
                None
            }
            None => None,
        }
    }
}
