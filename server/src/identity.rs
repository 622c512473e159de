//! Who an agent may say it is (docs/SECURITY.md, "Agent identity"): the agent id and the
//! identifiers in its HELLO are checked against the credential the connection proved, a
//! client certificate or a bearer token, before the agent is routed to.
//!
//! - **The agent id** must be one the credential names: the certificate's common name or one
//!   of its DNS names, and the id the tokens file binds the token to. `--agent-id-rule any`
//!   drops the binding, for fleets that share one credential.
//! - **`host` identifiers** (destHost routing by name) may name only the agent id itself, so
//!   no agent can take the traffic for another node's name. `--host-identifiers any` relaxes it.
//! - **Address identifiers** (ipv4, ipv6, cidr, default-route) are accepted as Konnectivity
//!   accepts them; `--address-identifiers cert` binds ipv4/ipv6 to the certificate's IP
//!   addresses and refuses cidr and default-route, `none` refuses them all.
//! - An agent id with control characters is refused whatever the rule: it would forge lines in
//!   the server's log.

use std::collections::HashMap;
use std::net::IpAddr;
use std::str::FromStr;

use tether_proto::frame::{Hello, Identifier};

/// How the agent id is bound to the credential (`--agent-id-rule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdRule {
    /// The id must be one the credential names (the default).
    Credential,
    /// Any id is accepted from any authenticated agent.
    Any,
}

/// Which `host` identifiers an agent may claim (`--host-identifiers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostClaims {
    /// Only its own agent id (the default).
    Own,
    /// Any name.
    Any,
}

/// Which address identifiers an agent may claim (`--address-identifiers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClaims {
    /// Any ipv4, ipv6, cidr and default-route claim (the default, as Konnectivity).
    Any,
    /// ipv4 and ipv6 only if the client certificate carries the address; no cidr or
    /// default-route.
    Cert,
    /// ipv4 and ipv6 only if they are addresses of the Node the agent's service-account token
    /// was issued for (its `status.addresses`, read with the TokenReview); no cidr or
    /// default-route.
    Node,
    /// None.
    None,
}

macro_rules! flag_enum {
    ($t:ty, $flag:literal, { $($s:literal => $v:expr),+ $(,)? }) => {
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<$t, String> {
                match s {
                    $($s => Ok($v),)+
                    other => Err(format!(
                        concat!("--", $flag, " {:?}: one of ", $($s, " "),+), other
                    )),
                }
            }
        }
    };
}

flag_enum!(IdRule, "agent-id-rule", { "credential" => IdRule::Credential, "any" => IdRule::Any });
flag_enum!(HostClaims, "host-identifiers", { "own" => HostClaims::Own, "any" => HostClaims::Any });
flag_enum!(AddressClaims, "address-identifiers", {
    "any" => AddressClaims::Any, "cert" => AddressClaims::Cert, "node" => AddressClaims::Node,
    "none" => AddressClaims::None,
});

/// The identity rules a server applies to every HELLO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityPolicy {
    /// How the agent id is bound.
    pub id_rule: IdRule,
    /// Which host identifiers are allowed.
    pub host_claims: HostClaims,
    /// Which address identifiers are allowed.
    pub address_claims: AddressClaims,
}

impl Default for IdentityPolicy {
    fn default() -> Self {
        IdentityPolicy {
            id_rule: IdRule::Credential,
            host_claims: HostClaims::Own,
            address_claims: AddressClaims::Any,
        }
    }
}

/// The names a client certificate proves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertNames {
    /// Subject common names.
    pub common_names: Vec<String>,
    /// DNS subject alternative names.
    pub dns: Vec<String>,
    /// IP address subject alternative names.
    pub ips: Vec<IpAddr>,
}

impl CertNames {
    /// Reads the names out of a DER certificate (one rustls already verified).
    pub fn from_der(der: &[u8]) -> Result<CertNames, String> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("client certificate does not parse: {e}"))?;
        let mut names = CertNames {
            common_names: cert
                .subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
                .collect(),
            ..CertNames::default()
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    GeneralName::DNSName(d) => names.dns.push((*d).to_owned()),
                    GeneralName::IPAddress(b) => {
                        if let Ok(a) = <[u8; 4]>::try_from(*b) {
                            names.ips.push(IpAddr::from(a));
                        } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                            names.ips.push(IpAddr::from(a));
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(names)
    }

    fn names(&self, id: &str) -> bool {
        self.common_names.iter().any(|n| n == id)
            || self.dns.iter().any(|n| n.eq_ignore_ascii_case(id))
    }
}

/// What a connection proved before its HELLO was read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credential {
    /// The verified client certificate's names, with mTLS.
    pub cert: Option<CertNames>,
    /// What a TokenReview proved about the agent's token, with Kubernetes authentication.
    pub review: Option<tether_ops::kube::Reviewed>,
}

impl Credential {
    /// Who the credential proves its holder to be, equal for two tunnels of one holder and
    /// different between holders: the node a reviewed token was issued for, else its pod, else
    /// its user; a client certificate's first common name, else its first DNS name. Without a
    /// credential, only the agent id remains (the agent's own word).
    pub fn principal(&self, agent_id: &str) -> String {
        if let Some(r) = &self.review {
            return match (&r.node_name, &r.pod_name) {
                (Some(node), _) => format!("node {node}"),
                (None, Some(pod)) => format!("pod {pod}"),
                (None, None) => format!("user {}", r.username),
            };
        }
        if let Some(c) = &self.cert
            && let Some(name) = c.common_names.first().or(c.dns.first())
        {
            return format!("certificate {name}");
        }
        format!("agent id {agent_id}")
    }
}

/// The name a credential proves its holder by, for an agent whose own id proves nothing
/// (Konnectivity's, a random UUID by default): the node a reviewed token was issued for, else
/// its pod; the id a tokens file binds the token to (unless `*`); a client certificate's
/// first common name, else its first DNS name. `None` when nothing proves a name.
pub fn proven_name(
    tokens: Option<&Tokens>,
    credential: &Credential,
    hello: &Hello,
) -> Option<String> {
    if let Some(r) = &credential.review
        && let Some(name) = r.node_name.clone().or_else(|| r.pod_name.clone())
    {
        return Some(name);
    }
    if let (Some(tokens), Some(token)) = (tokens, &hello.token)
        && let Some(bound) = tokens.id_for(token.expose())
        && bound != "*"
    {
        return Some(bound.to_owned());
    }
    let cert = credential.cert.as_ref()?;
    if cert.names(&hello.agent_id) {
        return None;
    }
    cert.common_names.first().or(cert.dns.first()).cloned()
}

/// The ipv4 and ipv6 addresses among `identifiers`.
pub fn claimed_ips(identifiers: &[Identifier]) -> Vec<IpAddr> {
    identifiers
        .iter()
        .filter_map(|i| match i {
            Identifier::Ipv4(a) => Some(IpAddr::V4(*a)),
            Identifier::Ipv6(a) => Some(IpAddr::V6(*a)),
            _ => None,
        })
        .collect()
}

/// Bearer tokens and the agent id each may be used with (`token agent-id` per line of the
/// tokens file; `*` for any id).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tokens(HashMap<String, String>);

impl Tokens {
    /// From `(token, agent id)` pairs.
    pub fn new(pairs: impl IntoIterator<Item = (String, String)>) -> Tokens {
        Tokens(pairs.into_iter().collect())
    }

    /// Parses a tokens file: one `token agent-id` per line, `#` comments, blank lines skipped.
    pub fn parse(text: &str) -> Result<Tokens, String> {
        let mut map = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some(t), Some(id), None) => {
                    map.insert(t.to_owned(), id.to_owned());
                }
                _ => {
                    return Err(format!(
                        "tokens file line {}: expected `<token> <agent-id>` (`*` for any id)",
                        n + 1
                    ));
                }
            }
        }
        if map.is_empty() {
            // An empty file (or one caught empty mid-rewrite) would refuse every agent.
            return Err("the tokens file has no token (remove --agent-tokens-file instead)".into());
        }
        Ok(Tokens(map))
    }

    /// The agent id `token` may be used with (`*`: any), if it is a known token.
    pub fn id_for(&self, token: &str) -> Option<&str> {
        self.0.get(token).map(String::as_str)
    }
}

/// Checks `hello` against the credential and the tokens: `Err` is the refusal's reason, naming
/// the rule and the flag that relaxes it.
pub fn check(
    policy: &IdentityPolicy,
    tokens: Option<&Tokens>,
    credential: &Credential,
    hello: &Hello,
) -> Result<(), String> {
    let id = &hello.agent_id;
    if id.chars().any(char::is_control) {
        return Err("agent id has control characters".into());
    }
    let token_id = match tokens {
        None => None,
        Some(tokens) => {
            let token = hello
                .token
                .as_ref()
                .ok_or_else(|| "missing token".to_owned())?;
            Some(
                tokens
                    .id_for(token.expose())
                    .ok_or_else(|| "invalid token".to_owned())?,
            )
        }
    };
    if policy.id_rule == IdRule::Credential {
        if let Some(bound) = token_id
            && bound != "*"
            && bound != id
        {
            return Err(format!(
                "agent id {:?} is not the one its token is bound to (--agent-id-rule credential)",
                id.escape_debug().to_string()
            ));
        }
        if let Some(review) = &credential.review {
            // The node when the token names one (a pod's name is the pod creator's choice);
            // the pod otherwise.
            let names = match &review.node_name {
                Some(_) => [&review.node_name, &None],
                None => [&None, &review.pod_name],
            };
            if !names.iter().any(|n| n.as_deref() == Some(id.as_str())) {
                let reviewed: Vec<&str> = names.iter().filter_map(|n| n.as_deref()).collect();
                return Err(if reviewed.is_empty() {
                    format!(
                        "the TokenReview of {} names no pod or node to bind agent id {:?} to (--agent-id-rule credential; `any` relaxes it)",
                        review.username,
                        id.escape_debug().to_string()
                    )
                } else {
                    format!(
                        "agent id {:?} is neither the node nor the pod its token was issued for ({}; --agent-id-rule credential; `any` relaxes it)",
                        id.escape_debug().to_string(),
                        reviewed.join(", ")
                    )
                });
            }
        }
        if let Some(cert) = &credential.cert
            && !cert.names(id)
        {
            return Err(format!(
                "agent id {:?} is neither the client certificate's common name nor one of its DNS names (--agent-id-rule credential; `any` relaxes it)",
                id.escape_debug().to_string()
            ));
        }
    }
    for claim in &hello.identifiers {
        check_claim(policy, credential, id, claim)?;
    }
    Ok(())
}

fn check_claim(
    policy: &IdentityPolicy,
    credential: &Credential,
    id: &str,
    claim: &Identifier,
) -> Result<(), String> {
    let refuse = |flag: &str| Err(format!("identifier {claim} is not allowed ({flag})"));
    match claim {
        Identifier::Host(h) => match policy.host_claims {
            HostClaims::Any => Ok(()),
            HostClaims::Own if h.eq_ignore_ascii_case(id) => Ok(()),
            HostClaims::Own => refuse("--host-identifiers own: only the agent id itself"),
        },
        Identifier::Unknown(..) => Ok(()),
        _ => match policy.address_claims {
            AddressClaims::Any => Ok(()),
            AddressClaims::None => refuse("--address-identifiers none"),
            AddressClaims::Cert => {
                let ip = match claim {
                    Identifier::Ipv4(a) => Some(IpAddr::V4(*a)),
                    Identifier::Ipv6(a) => Some(IpAddr::V6(*a)),
                    _ => None,
                };
                let ips = credential.cert.as_ref().map(|c| &c.ips[..]).unwrap_or(&[]);
                match ip {
                    Some(ip) if ips.contains(&ip) => Ok(()),
                    _ => refuse(
                        "--address-identifiers cert: only addresses in the client certificate",
                    ),
                }
            }
            AddressClaims::Node => {
                let ip = match claim {
                    Identifier::Ipv4(a) => Some(IpAddr::V4(*a)),
                    Identifier::Ipv6(a) => Some(IpAddr::V6(*a)),
                    _ => None,
                };
                let ips = credential
                    .review
                    .as_ref()
                    .map(|r| &r.node_addresses[..])
                    .unwrap_or(&[]);
                match ip {
                    Some(ip) if ips.contains(&ip) => Ok(()),
                    _ => refuse(
                        "--address-identifiers node: only addresses of the node the token was issued for",
                    ),
                }
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_proto::frame::{Settings, Token};

    fn hello(id: &str, identifiers: Vec<Identifier>, token: Option<&str>) -> Hello {
        Hello {
            versions: vec![1],
            agent_id: id.into(),
            identifiers,
            settings: Settings::default(),
            token: token.map(|t| Token::new(t).unwrap()),
        }
    }

    fn cert(cn: &str, dns: &[&str]) -> Credential {
        Credential {
            cert: Some(CertNames {
                common_names: vec![cn.into()],
                dns: dns.iter().map(|s| (*s).to_owned()).collect(),
                ips: vec!["10.0.0.7".parse().unwrap()],
            }),
            review: None,
        }
    }

    fn reviewed(node: Option<&str>, pod: Option<&str>) -> Credential {
        Credential {
            cert: None,
            review: Some(tether_ops::kube::Reviewed {
                username: "system:serviceaccount:kube-system:konnectivity-agent".into(),
                node_name: node.map(str::to_owned),
                pod_name: pod.map(str::to_owned),
                node_addresses: vec!["10.0.0.5".parse().unwrap()],
            }),
        }
    }

    #[test]
    fn a_principal_names_the_node_then_the_pod_then_the_certificate_then_only_the_agent_id() {
        assert_eq!(
            reviewed(Some("node-1"), Some("pod-x")).principal("a"),
            "node node-1"
        );
        assert_eq!(reviewed(None, Some("pod-x")).principal("a"), "pod pod-x");
        assert_eq!(cert("cn-1", &["dns-1"]).principal("a"), "certificate cn-1");
        assert_eq!(Credential::default().principal("a"), "agent id a");
    }

    #[test]
    fn node_address_claims_must_be_the_reviewed_nodes_own() {
        let p = IdentityPolicy {
            address_claims: AddressClaims::Node,
            ..IdentityPolicy::default()
        };
        let c = reviewed(Some("node-1"), None);
        let claim = |i: Identifier| check(&p, None, &c, &hello("node-1", vec![i], None));
        assert!(claim(Identifier::Ipv4("10.0.0.5".parse().unwrap())).is_ok());
        assert!(
            claim(Identifier::Ipv4("10.0.0.6".parse().unwrap())).is_err(),
            "another node's address"
        );
        assert!(claim(Identifier::Cidr("0.0.0.0".parse().unwrap(), 0)).is_err());
        assert!(claim(Identifier::DefaultRoute).is_err());
        let none = Credential::default();
        assert!(
            check(
                &p,
                None,
                &none,
                &hello(
                    "node-1",
                    vec![Identifier::Ipv4("10.0.0.5".parse().unwrap())],
                    None
                )
            )
            .is_err(),
            "no review, no node addresses"
        );
    }

    #[test]
    fn a_reviewed_token_binds_the_agent_id_to_its_node_or_else_its_pod() {
        let p = IdentityPolicy::default();
        let c = reviewed(Some("node-1"), Some("konnectivity-agent-x7k2p"));
        assert!(check(&p, None, &c, &hello("node-1", vec![], None)).is_ok());
        assert!(
            check(
                &p,
                None,
                &c,
                &hello("konnectivity-agent-x7k2p", vec![], None)
            )
            .is_err(),
            "with a node named, a pod's name (its creator's choice) is not an agent id"
        );
        let pod_only = reviewed(None, Some("konnectivity-agent-x7k2p"));
        assert!(
            check(
                &p,
                None,
                &pod_only,
                &hello("konnectivity-agent-x7k2p", vec![], None)
            )
            .is_ok()
        );
        let stolen = check(&p, None, &c, &hello("node-2", vec![], None)).unwrap_err();
        assert!(stolen.contains("node-1"), "{stolen}");
        let unbound = check(
            &p,
            None,
            &reviewed(None, None),
            &hello("node-1", vec![], None),
        );
        assert!(unbound.unwrap_err().contains("names no pod or node"));
        let any = IdentityPolicy {
            id_rule: IdRule::Any,
            ..IdentityPolicy::default()
        };
        assert!(check(&any, None, &c, &hello("node-2", vec![], None)).is_ok());
    }

    #[test]
    fn the_agent_id_must_be_the_certificates_common_name_or_a_dns_name() {
        let p = IdentityPolicy::default();
        let c = cert("node-1", &["node-1.example"]);
        assert!(check(&p, None, &c, &hello("node-1", vec![], None)).is_ok());
        assert!(check(&p, None, &c, &hello("NODE-1.example", vec![], None)).is_ok());
        let e = check(&p, None, &c, &hello("node-2", vec![], None)).unwrap_err();
        assert!(e.contains("--agent-id-rule"), "{e}");
        let any = IdentityPolicy {
            id_rule: IdRule::Any,
            ..p
        };
        assert!(check(&any, None, &c, &hello("node-2", vec![], None)).is_ok());
    }

    #[test]
    fn a_token_is_good_only_for_the_agent_id_it_is_bound_to() {
        let p = IdentityPolicy::default();
        let t = Tokens::parse("# fleet\ns3cret node-1\nshared *\n").unwrap();
        let none = Credential::default();
        assert!(
            check(
                &p,
                Some(&t),
                &none,
                &hello("node-1", vec![], Some("s3cret"))
            )
            .is_ok()
        );
        assert!(
            check(
                &p,
                Some(&t),
                &none,
                &hello("node-2", vec![], Some("s3cret"))
            )
            .is_err()
        );
        assert!(
            check(
                &p,
                Some(&t),
                &none,
                &hello("node-2", vec![], Some("shared"))
            )
            .is_ok()
        );
        assert!(check(&p, Some(&t), &none, &hello("node-1", vec![], Some("nope"))).is_err());
        assert!(check(&p, Some(&t), &none, &hello("node-1", vec![], None)).is_err());
        assert!(Tokens::parse("bare-token\n").is_err());
    }

    #[test]
    fn host_claims_name_only_the_agent_itself_and_address_claims_follow_the_policy() {
        let p = IdentityPolicy::default();
        let c = cert("node-1", &[]);
        let own = Identifier::Host("node-1".into());
        let other = Identifier::Host("node-2".into());
        let v4 = Identifier::Ipv4("10.0.0.7".parse().unwrap());
        let v4_other = Identifier::Ipv4("10.0.0.8".parse().unwrap());
        assert!(
            check(
                &p,
                None,
                &c,
                &hello("node-1", vec![own.clone(), v4.clone()], None)
            )
            .is_ok()
        );
        let e = check(&p, None, &c, &hello("node-1", vec![other.clone()], None)).unwrap_err();
        assert!(e.contains("--host-identifiers"), "{e}");
        let cert_bound = IdentityPolicy {
            address_claims: AddressClaims::Cert,
            ..p.clone()
        };
        assert!(
            check(
                &cert_bound,
                None,
                &c,
                &hello("node-1", vec![v4.clone()], None)
            )
            .is_ok()
        );
        assert!(
            check(
                &cert_bound,
                None,
                &c,
                &hello("node-1", vec![v4_other], None)
            )
            .is_err()
        );
        assert!(
            check(
                &cert_bound,
                None,
                &c,
                &hello("node-1", vec![Identifier::DefaultRoute], None)
            )
            .is_err()
        );
        let none = IdentityPolicy {
            address_claims: AddressClaims::None,
            ..p
        };
        assert!(check(&none, None, &c, &hello("node-1", vec![v4], None)).is_err());
    }

    #[test]
    fn an_agent_id_with_control_characters_is_refused_whatever_the_rule() {
        let p = IdentityPolicy {
            id_rule: IdRule::Any,
            ..IdentityPolicy::default()
        };
        let e = check(
            &p,
            None,
            &Credential::default(),
            &hello("a\nb", vec![], None),
        );
        assert!(e.unwrap_err().contains("control"));
    }

    #[test]
    fn names_come_out_of_a_real_certificate() {
        let ca = tether::tls::testpki::Ca::new("ca");
        let leaf = ca.leaf("node-1", &["node-1.example", "10.0.0.7"]);
        let der = tether::tls::certs_from_pem(leaf.cert.as_bytes()).unwrap();
        let names = CertNames::from_der(&der[0]).unwrap();
        assert_eq!(names.common_names, vec!["node-1".to_owned()]);
        assert_eq!(names.dns, vec!["node-1.example".to_owned()]);
        assert_eq!(names.ips, vec!["10.0.0.7".parse::<IpAddr>().unwrap()]);
    }
}
