//! Who may become a tunnel, and what happens to one that does: the server's [`Admission`] for
//! the library's agent listener. A HELLO is checked against what its connection proved (the
//! client certificate) and, with Kubernetes authentication, what the API server says of its
//! token (docs/SECURITY.md); an admitted tunnel is registered for routing, displaces the
//! agent's oldest tunnels beyond its cap, and is unregistered when it ends.

use std::sync::Arc;
use std::time::Duration;

use tether::Tunnel;
use tether::listen::{Admission, Admitted, Peer, Refusal};
use tether::reload::Reloadable;
use tether::stats::RefusalKind;
use tether_proto::ErrorCode;
use tether_proto::frame::Hello;

use crate::core::ServerCore;
use crate::identity::{self, AddressClaims, CertNames, Credential, IdentityPolicy, Tokens};
use crate::review::TokenReviewer;

/// How long a tunnel replaced by a newer one of the same agent may drain before it is closed.
const REPLACED_GRACE: Duration = Duration::from_secs(10);

/// The server's admission of agents.
pub(crate) struct Agents {
    pub(crate) core: Arc<ServerCore>,
    pub(crate) tokens: Option<Reloadable<Tokens>>,
    pub(crate) token_review: Option<Arc<TokenReviewer>>,
    pub(crate) identity: IdentityPolicy,
    pub(crate) max_tunnels_per_agent: usize,
}

impl Admission for Agents {
    async fn admit(&self, hello: &Hello, peer: &Peer) -> Result<(), Refusal> {
        // What the connection proved: the verified client certificate's names (mTLS).
        let credential = match peer.certificates.first() {
            None => Credential::default(),
            Some(der) => match CertNames::from_der(der) {
                Ok(names) => Credential {
                    cert: Some(names),
                    review: None,
                },
                Err(e) => {
                    return Err(Refusal {
                        kind: RefusalKind::Certificate,
                        wire: "the client certificate cannot be read".into(),
                        log: e,
                    });
                }
            },
        };
        self.authenticate(credential, hello).await
    }

    async fn serve(&self, agent: Admitted) {
        let Admitted { tunnel, hello, .. } = agent;
        let core = &self.core;
        let agent_id = hello.agent_id.escape_debug().to_string();
        tracing::Span::current().record("agent_id", tracing::field::display(&agent_id));
        let _registered = Registered::new(core, &hello, &tunnel);
        let (drain, close) = core
            .registry
            .over_cap(&hello.agent_id, self.max_tunnels_per_agent);
        for old in drain {
            tracing::info!(replaced = %old.label(), "a newer tunnel of the agent replaces its oldest");
            replace(old);
        }
        for old in close {
            old.close(
                ErrorCode::NO_ERROR,
                "replaced; too many tunnels of this agent",
            );
        }
        tracing::info!(identifiers = ?hello.identifiers, "agent connected");
        let reason = tunnel.closed().await;
        tracing::info!(%reason, "agent disconnected");
    }
}

/// Drains `old`, displaced by a newer tunnel of its agent: a drain ends when the peer answers;
/// one that does not is closed after a grace.
fn replace(old: Tunnel) {
    old.go_away("replaced by a newer tunnel of the same agent");
    tokio::spawn(async move {
        if tokio::time::timeout(REPLACED_GRACE, old.closed())
            .await
            .is_err()
        {
            old.close(
                ErrorCode::NO_ERROR,
                "replaced; the drain did not end in time",
            );
        }
    });
}

/// A tunnel's place in the registry, given up however its service ends (the tunnel closed,
/// or the server dropped).
struct Registered<'a> {
    core: &'a ServerCore,
    conn: u64,
}

impl<'a> Registered<'a> {
    fn new(core: &'a ServerCore, hello: &Hello, tunnel: &Tunnel) -> Registered<'a> {
        let conn = core.registry.add(
            hello.agent_id.clone(),
            hello.identifiers.clone(),
            tunnel.clone(),
        );
        core.metrics.agents(core.registry.len());
        Registered { core, conn }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.core.registry.remove(self.conn);
        self.core.metrics.agents(self.core.registry.len());
    }
}

impl Agents {
    /// Checks an agent's HELLO against what its connection proved and, with Kubernetes
    /// authentication, what the API server says of its token.
    async fn authenticate(&self, mut credential: Credential, hello: &Hello) -> Result<(), Refusal> {
        let tokens = self.tokens.as_ref().map(Reloadable::get);
        if let Some(reviewer) = &self.token_review {
            // What can be refused without the API server is, first: a peer with garbage costs
            // no API call. Address claims bound to the reviewed node wait for the review.
            let before_review = IdentityPolicy {
                address_claims: match self.identity.address_claims {
                    AddressClaims::Node => AddressClaims::Any,
                    other => other,
                },
                ..self.identity.clone()
            };
            identity::check(&before_review, tokens.as_deref(), &credential, hello)
                .map_err(Refusal::unauthorized)?;
            let token = hello
                .token
                .as_ref()
                .ok_or_else(|| Refusal::unauthorized("missing token"))?;
            let review = reviewer.review(token.expose()).await.map_err(|e| Refusal {
                kind: RefusalKind::Unauthorized,
                // The API server's words stay in this log: the peer is not authenticated yet.
                wire: match &e {
                    tether_ops::kube::ReviewError::Failed(_) => "token review failed".into(),
                    _ => "token not accepted".into(),
                },
                log: e.to_string(),
            })?;
            credential.review = Some(review);
        }
        identity::check(&self.identity, tokens.as_deref(), &credential, hello)
            .map_err(Refusal::unauthorized)
    }
}
