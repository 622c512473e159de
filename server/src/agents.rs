//! Who may become a tunnel, and what happens to one that does: the server's [`Admission`] for
//! the library's agent listener. A HELLO is checked against what its connection proved (the
//! client certificate) and, with Kubernetes authentication, what the API server says of its
//! token (docs/SECURITY.md); an admitted tunnel is registered for routing, displaces the
//! agent's oldest tunnels beyond its cap, and is unregistered when it ends.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tether::Tunnel;
use tether::listen::{Admission, Admitted, Handover, Peer, Refusal};
use tether::reload::Reloadable;
use tether::stats::RefusalKind;
use tether_proto::ErrorCode;
use tether_proto::frame::Hello;

use crate::core::ServerCore;
use crate::identity::{
    self, AddressClaims, CertNames, Credential, HostClaims, IdRule, IdentityPolicy, Tokens,
};
use crate::review::TokenReviewer;

/// How long a Konnectivity agent's new tunnel waits before it counts against its cap, when
/// the agent holds as many as allowed here already: the agent learns which server it reached
/// only from the call's answer, and closes a second call to a server it has at once.
const KONNECTIVITY_SETTLE: Duration = Duration::from_secs(1);

/// How long a tunnel replaced by a newer one of the same agent may drain before it is closed.
const REPLACED_GRACE: Duration = Duration::from_secs(10);

/// The server's admission of agents.
pub(crate) struct Agents {
    pub(crate) core: Arc<ServerCore>,
    pub(crate) tokens: Option<Reloadable<Tokens>>,
    pub(crate) token_review: Option<Arc<TokenReviewer>>,
    pub(crate) identity: IdentityPolicy,
    pub(crate) max_tunnels_per_agent: usize,
    /// How often node-bound address claims are checked again (zero: never).
    pub(crate) address_recheck: Duration,
    /// What Konnectivity's own agents are allowed (`None`: not served).
    pub(crate) konnectivity: Option<crate::kagent::KonnectivityAgents>,
}

/// What an admission proved, for the tunnel's life.
pub(crate) struct Grant {
    /// Who proved the ipv4/ipv6 claims, when they are the holder's alone (`--address-identifiers
    /// cert` or `node`).
    holder: Option<Arc<str>>,
    /// The node whose addresses the claims are, to check them again (`node`).
    node: Option<String>,
    /// The id the tunnel is registered under when it is not the HELLO's: a Konnectivity
    /// agent's own id (a random UUID by default) gives way to the name its credential proves.
    renamed: Option<String>,
    /// Konnectivity's agent (its call bridged in memory).
    konnectivity: bool,
}

impl Admission for Agents {
    type Grant = Grant;

    async fn admit(&self, hello: &Hello, peer: &Peer) -> Result<Grant, Refusal> {
        self.admit_as(hello, peer, false).await
    }

    async fn serve(&self, agent: Admitted, grant: Grant) {
        let Admitted {
            tunnel, mut hello, ..
        } = agent;
        if let Some(id) = grant.renamed.clone() {
            tracing::info!(said = %hello.agent_id.escape_debug(), registered = %id.escape_debug(), "a Konnectivity agent is registered under the name its credential proves");
            hello.agent_id = id;
        }
        let core = &self.core;
        let agent_id = hello.agent_id.escape_debug().to_string();
        tracing::Span::current().record("agent_id", tracing::field::display(&agent_id));
        if grant.konnectivity
            && core.registry.usable_of(&hello.agent_id) >= self.max_tunnels_per_agent.max(1)
        {
            tokio::select! {
                reason = tunnel.closed() => {
                    return tracing::debug!(%reason, "a Konnectivity agent's second call to this server, closed by the agent");
                }
                () = tokio::time::sleep(KONNECTIVITY_SETTLE) => {}
            }
        }
        // Checked again as one step with the registration: another agent of another holder
        // may have been admitted with the same address since.
        let _registered = match Registered::new(core, &hello, &tunnel, grant.holder.clone()) {
            Ok(r) => r,
            Err((ip, other)) => {
                let r = conflict((ip, other), grant.holder.as_deref().unwrap_or_default());
                tracing::warn!(reason = %r.log, "agent refused");
                core.metrics.listener.refuse(r.kind);
                tunnel.close(ErrorCode::UNAUTHORIZED, &r.wire);
                return;
            }
        };
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
        let recheck = async {
            match (&grant.node, &self.token_review) {
                // Boxed: an API call's state would otherwise size every tunnel's task.
                (Some(node), Some(reviewer)) if !self.address_recheck.is_zero() => {
                    Box::pin(self.recheck(reviewer, node, &hello, &tunnel)).await
                }
                _ => std::future::pending().await,
            }
        };
        let reason = tokio::select! {
            reason = tunnel.closed() => reason,
            () = recheck => tunnel.closed().await,
        };
        tracing::info!(%reason, "agent disconnected");
    }

    async fn hand_over(&self, conn: Handover) {
        match &self.konnectivity {
            Some(limits) => {
                let admission = KonnectivityAdmission(self);
                crate::kagent::serve(conn, &admission, limits, &self.core.metrics).await;
            }
            None => tracing::warn!(?conn, "a Konnectivity agent, and they are not served here"),
        }
    }
}

/// The admission of Konnectivity's agents: [`Agents`]' own, with the agent's id giving way to
/// the name its credential proves (docs/SECURITY.md, "Konnectivity's agents").
pub(crate) struct KonnectivityAdmission<'a>(pub(crate) &'a Agents);

impl Admission for KonnectivityAdmission<'_> {
    type Grant = Grant;

    async fn admit(&self, hello: &Hello, peer: &Peer) -> Result<Grant, Refusal> {
        self.0.admit_as(hello, peer, true).await
    }

    async fn serve(&self, agent: Admitted, grant: Grant) {
        self.0.serve(agent, grant).await;
    }
}

/// The refusal of a HELLO claiming `ip`, which a live tunnel of another holder (agent id
/// `other`) claims already: the address is never split between the two.
fn conflict((ip, other): (IpAddr, Arc<str>), holder: &str) -> Refusal {
    Refusal {
        kind: RefusalKind::Conflict,
        wire: format!("address {ip} is claimed by another agent's live tunnel"),
        log: format!(
            "address {ip} is claimed by the live tunnel of agent {:?}, with another credential than this one's ({holder})",
            other.escape_debug().to_string()
        ),
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
    /// Registers `tunnel`; with a `holder`, only if no live tunnel of another holder claims
    /// one of its addresses (else that address and the other tunnel's agent id).
    fn new(
        core: &'a ServerCore,
        hello: &Hello,
        tunnel: &Tunnel,
        holder: Option<Arc<str>>,
    ) -> Result<Registered<'a>, (IpAddr, Arc<str>)> {
        let (id, ids) = (hello.agent_id.clone(), hello.identifiers.clone());
        let conn = match holder {
            Some(h) => core.registry.add_exclusive(id, h, ids, tunnel.clone())?,
            None => core.registry.add(id, ids, tunnel.clone()),
        };
        core.metrics.agents(core.registry.len());
        Ok(Registered { core, conn })
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.core.registry.remove(self.conn);
        self.core.metrics.agents(self.core.registry.len());
    }
}

impl Agents {
    /// Decides a HELLO; `konnectivity`: one built from a Konnectivity agent's call, whose own
    /// id proves nothing and gives way to the name its credential proves.
    async fn admit_as(
        &self,
        hello: &Hello,
        peer: &Peer,
        konnectivity: bool,
    ) -> Result<Grant, Refusal> {
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
        let (credential, renamed) = self.authenticate(credential, hello, konnectivity).await?;
        let id = renamed.as_deref().unwrap_or(&hello.agent_id);
        let ips = identity::claimed_ips(&hello.identifiers);
        let proven = matches!(
            self.identity.address_claims,
            AddressClaims::Cert | AddressClaims::Node
        );
        let holder: Option<Arc<str>> =
            (proven && !ips.is_empty()).then(|| credential.principal(id).into());
        if let Some(h) = &holder
            && let Some(held) = self.core.registry.claimed_by_other(&ips, h)
        {
            return Err(conflict(held, h));
        }
        let node = match (&credential.review, self.identity.address_claims) {
            (Some(r), AddressClaims::Node) if !ips.is_empty() => r.node_name.clone(),
            _ => None,
        };
        Ok(Grant {
            holder,
            node,
            renamed,
            konnectivity,
        })
    }

    /// Checks the tunnel's node-bound address claims against its Node every
    /// `address_recheck`, and returns once it closed the tunnel because the node no longer has
    /// one of them. A check that gets no answer keeps the tunnel (the API server being down
    /// must not cut every node off) and is logged.
    async fn recheck(&self, reviewer: &TokenReviewer, node: &str, hello: &Hello, tunnel: &Tunnel) {
        let ips = identity::claimed_ips(&hello.identifiers);
        loop {
            tokio::time::sleep(self.address_recheck).await;
            let now = match reviewer.node_addresses(node).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(%node, error = %e, "node addresses not read; the claims stand until the next check");
                    continue;
                }
            };
            if let Some(gone) = ips.iter().find(|ip| !now.contains(ip)) {
                tracing::warn!(%node, address = %gone, "the node no longer has a claimed address; closing the tunnel");
                self.core.metrics.listener.refuse(RefusalKind::Revoked);
                reviewer.forget_node(node);
                tunnel.close(
                    ErrorCode::UNAUTHORIZED,
                    &format!("address {gone} is no longer an address of node {node}"),
                );
                return;
            }
        }
    }

    /// Checks an agent's HELLO against what its connection proved and, with Kubernetes
    /// authentication, what the API server says of its token; returns what was proved.
    async fn authenticate(
        &self,
        mut credential: Credential,
        hello: &Hello,
        konnectivity: bool,
    ) -> Result<(Credential, Option<String>), Refusal> {
        let tokens = self.tokens.as_ref().map(Reloadable::get);
        // A Konnectivity agent's id is checked once it is known what the credential proves.
        let deferred = konnectivity && self.identity.id_rule == IdRule::Credential;
        if let Some(reviewer) = &self.token_review {
            // What can be refused without the API server is, first: a peer with garbage costs
            // no API call. Address claims bound to the reviewed node wait for the review.
            let before_review = IdentityPolicy {
                address_claims: match self.identity.address_claims {
                    AddressClaims::Node => AddressClaims::Any,
                    other => other,
                },
                id_rule: if deferred {
                    IdRule::Any
                } else {
                    self.identity.id_rule
                },
                host_claims: if deferred {
                    HostClaims::Any
                } else {
                    self.identity.host_claims
                },
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
        let renamed = if deferred {
            identity::proven_name(tokens.as_deref(), &credential, hello)
                .filter(|name| *name != hello.agent_id)
        } else {
            None
        };
        match &renamed {
            Some(id) => {
                let as_proven = Hello {
                    agent_id: id.clone(),
                    ..hello.clone()
                };
                identity::check(&self.identity, tokens.as_deref(), &credential, &as_proven)
            }
            None => identity::check(&self.identity, tokens.as_deref(), &credential, hello),
        }
        .map_err(Refusal::unauthorized)?;
        Ok((credential, renamed))
    }
}
