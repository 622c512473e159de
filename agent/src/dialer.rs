//! The agent's side of a dial: the destination allowlist and connecting with a timeout.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use tether::agent::{dial_code, os_words};
use tether_proto::ErrorCode;
use tokio::net::TcpStream;

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostRule {
    Any,
    Exact(String),
    Suffix(String),
    Net(IpNet),
}

/// One allowlist entry: a host pattern and an optional port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    host: HostRule,
    port: Option<u16>,
}

impl std::str::FromStr for Rule {
    type Err = String;

    /// `10.0.0.0/8`, `10.0.0.0/8:10250`, `node-1`, `*.svc.cluster.local:443`, `*:22`,
    /// `[fd00::/8]:443` (or `[fd00::]/8:443`), `fd00::/8` (an IPv6 net without a port).
    fn from_str(s: &str) -> Result<Rule, String> {
        let s = s.trim();
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or("unclosed '['")?;
            // `[fd00::]/8:22` and `[fd00::/8]:22` both name a net and a port.
            let (prefix, after) = match after.strip_prefix('/') {
                Some(p) => p
                    .split_once(':')
                    .map_or((Some(p), ""), |(n, rest)| (Some(n), rest)),
                None => (None, after.strip_prefix(':').unwrap_or(after)),
            };
            let host = match prefix {
                Some(n) => format!("{h}/{n}"),
                None => h.to_owned(),
            };
            let port = (!after.is_empty()).then(|| after.to_owned());
            (host, port)
        } else if s.matches(':').count() == 1 {
            let (h, p) = s.split_once(':').unwrap_or((s, ""));
            (h.to_owned(), Some(p.to_owned()))
        } else {
            (s.to_owned(), None)
        };
        let port = match port.as_deref() {
            None | Some("*") => None,
            Some(p) => Some(p.parse::<u16>().map_err(|_| format!("bad port in {s:?}"))?),
        };
        let host = if host == "*" {
            HostRule::Any
        } else if let Some(suffix) = host.strip_prefix("*.") {
            HostRule::Suffix(format!(".{}", suffix.to_ascii_lowercase()))
        } else if host.contains('/') {
            HostRule::Net(host.parse().map_err(|_| format!("bad CIDR in {s:?}"))?)
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            HostRule::Net(IpNet::from(ip))
        } else if host.is_empty() {
            return Err(format!("empty host in {s:?}"));
        } else {
            HostRule::Exact(host.to_ascii_lowercase())
        };
        Ok(Rule { host, port })
    }
}

/// Which destinations an agent dials.
///
/// A destination is allowed when a rule matches it: a name rule (`node-1`, `*.svc`, `*`)
/// matches the name asked for, an IP rule (`10.0.0.0/8`) the address. Names are resolved once
/// and every address is checked again before it is dialled, and exactly the checked address is
/// dialled: loopback, link-local (169.254.0.0/16 with the cloud metadata address, fe80::/10),
/// the other cloud metadata addresses and unspecified addresses are refused unless an IP rule
/// inside that range names them (`127.0.0.1`, not `0.0.0.0/0`), whatever a name rule, `*` or
/// the empty allowlist says, so a name that resolves to the agent's own host or to the
/// metadata service is not a way in. An empty allowlist allows every other destination
/// (Konnectivity's default), logged at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    rules: Vec<Rule>,
}

/// An IPv4 address written as IPv4-mapped IPv6 (`::ffff:a.b.c.d`) is that IPv4 address, for
/// every check.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Cloud metadata services outside the link-local range: AWS's IPv6 endpoint and Alibaba's.
const METADATA: [IpAddr; 2] = [
    IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
    IpAddr::V4(std::net::Ipv4Addr::new(100, 100, 100, 200)),
];

/// Which sensitive range `ip` is in, if any: its own host (loopback), the link-local range
/// with the cloud metadata address 169.254.169.254, another metadata address
/// (`fd00:ec2::254`, `100.100.100.200`), or unspecified.
fn sensitive_range(ip: IpAddr) -> Option<u8> {
    let ip = canonical(ip);
    if let Some(i) = METADATA.iter().position(|m| *m == ip) {
        return u8::try_from(i).ok().map(|i| 10 + i);
    }
    let (loopback, link_local, unspecified) = match ip {
        IpAddr::V4(a) => (a.is_loopback(), a.is_link_local(), a.is_unspecified()),
        IpAddr::V6(a) => (
            a.is_loopback(),
            a.is_unicast_link_local(),
            a.is_unspecified(),
        ),
    };
    [loopback, link_local, unspecified]
        .iter()
        .position(|b| *b)
        .and_then(|i| u8::try_from(i).ok())
}

/// Whether `ip` is one an agent never dials unless an IP rule inside its range names it (see
/// [`Allowlist`]).
pub fn is_sensitive(ip: IpAddr) -> bool {
    sensitive_range(ip).is_some()
}

/// Whether a rule's net lies inside the one sensitive range of `ip`: `127.0.0.1` or
/// `169.254.0.0/16` name sensitive addresses explicitly, `0.0.0.0/0` or `::/0` do not.
fn names_sensitive(net: &IpNet, ip: IpAddr) -> bool {
    let range = sensitive_range(ip);
    range.is_some()
        && sensitive_range(net.network()) == range
        && sensitive_range(net.broadcast()) == range
}

impl Allowlist {
    /// From rules; empty allows everything but sensitive addresses (see [`is_sensitive`]).
    pub fn new(rules: Vec<Rule>) -> Allowlist {
        Allowlist { rules }
    }

    /// Parses comma-separated rules.
    pub fn parse(spec: &str) -> Result<Allowlist, String> {
        let rules = spec
            .split(',')
            .filter(|r| !r.trim().is_empty())
            .map(str::parse)
            .collect::<Result<Vec<Rule>, String>>()?;
        Ok(Allowlist { rules })
    }

    /// Whether every destination but the sensitive addresses is allowed.
    pub fn allows_all(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether the name or address `host` may be dialled on `port`, before resolution. An IP
    /// literal is checked in full here; a name's addresses are checked by
    /// [`Allowlist::allows_addr`] once resolved.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return self.allows_addr(ip, port);
        }
        if self.rules.is_empty() {
            return true;
        }
        let lower = host.to_ascii_lowercase();
        self.rules.iter().any(|r| {
            r.port.is_none_or(|p| p == port)
                && match &r.host {
                    HostRule::Any => true,
                    HostRule::Exact(h) => *h == lower,
                    HostRule::Suffix(s) => lower.ends_with(s.as_str()),
                    HostRule::Net(_) => false,
                }
        })
    }

    /// Whether the address `ip` (an IP literal asked for, or what an allowed name resolved to)
    /// may be dialled on `port`: a sensitive address only when an IP rule names it; any other
    /// when the list is empty, or a `*` rule or an IP rule allows it, or it came from a name
    /// already allowed (`resolved_from_name`).
    fn allows_ip(&self, ip: IpAddr, port: u16, resolved_from_name: bool) -> bool {
        let ip = canonical(ip);
        let named_by = |explicit: bool| {
            self.rules.iter().any(|r| {
                r.port.is_none_or(|p| p == port)
                    && matches!(&r.host, HostRule::Net(n)
                        if n.contains(&ip) && (!explicit || names_sensitive(n, ip)))
            })
        };
        if is_sensitive(ip) {
            // Only a rule inside the sensitive range itself names it.
            return named_by(true);
        }
        let named = named_by(false);
        named
            || self.rules.is_empty()
            || resolved_from_name
            || self
                .rules
                .iter()
                .any(|r| r.port.is_none_or(|p| p == port) && r.host == HostRule::Any)
    }

    /// Whether an IP literal may be dialled on `port`.
    pub fn allows_addr(&self, ip: IpAddr, port: u16) -> bool {
        self.allows_ip(ip, port, false)
    }
}

impl fmt::Display for Allowlist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rules.is_empty() {
            f.write_str("*")?;
        } else {
            write!(f, "{} rule(s)", self.rules.len())?;
        }
        f.write_str(
            "; loopback, link-local and unspecified addresses only where an IP rule names them",
        )
    }
}

/// Resolves `host` once, keeps the addresses the allowlist allows, and connects to one of
/// exactly those, all within `timeout`; failures map to the RESET codes of SPEC 8.1. A name
/// whose every address is refused is `DIAL_FORBIDDEN`.
pub async fn connect(
    allowlist: &Allowlist,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, (ErrorCode, String)> {
    let attempt = async {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let (addrs, from_name) = match bare.parse::<IpAddr>() {
            Ok(ip) => (vec![SocketAddr::new(ip, port)], false),
            Err(_) => {
                let found = tokio::net::lookup_host((bare, port)).await.map_err(|e| {
                    (
                        ErrorCode::DIAL_UNREACHABLE,
                        format!("dial tcp: lookup {host}: {}", os_words(&e)),
                    )
                })?;
                (found.collect::<Vec<_>>(), true)
            }
        };
        let allowed: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|a| allowlist.allows_ip(a.ip(), port, from_name))
            .collect();
        if allowed.is_empty() {
            let shown: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
            return Err((
                ErrorCode::DIAL_FORBIDDEN,
                format!(
                    "{host} resolves only to addresses the allowlist refuses ({})",
                    shown.join(", ")
                ),
            ));
        }
        let mut last = None;
        for addr in allowed {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    tether::pump::keep_alive(&s);
                    return Ok(s);
                }
                Err(e) => last = Some((Some(addr), e)),
            }
        }
        let (addr, e) = last.unwrap_or_else(|| (None, io::Error::other("no address")));
        let addr = addr.map_or_else(|| format!("{host}:{port}"), |a: SocketAddr| a.to_string());
        Err((
            dial_code(&e),
            format!("dial tcp {addr}: connect: {}", os_words(&e)),
        ))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err((
            ErrorCode::DIAL_TIMEOUT,
            format!("dial tcp {host}:{port}: i/o timeout (no connection within {timeout:?})"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_allowlist_allows_everything_but_sensitive_addresses() {
        let a = Allowlist::default();
        assert!(a.allows("anything", 1));
        assert!(a.allows("10.0.0.1", 1));
        for ip in [
            "127.0.0.1",
            "127.9.9.9",
            "::1",
            "169.254.169.254",
            "fe80::1",
            "0.0.0.0",
            "::",
            "::ffff:127.0.0.1",
            "[::1]",
        ] {
            assert!(!a.allows(ip, 80), "{ip}");
        }
    }

    #[test]
    fn sensitive_addresses_need_an_ip_rule_that_names_them() {
        let a = Allowlist::parse("*, localhost:80").unwrap();
        assert!(
            !a.allows("127.0.0.1", 80),
            "a * rule does not name loopback"
        );
        assert!(
            !a.allows_ip("127.0.0.1".parse().unwrap(), 80, true),
            "nor does a name rule"
        );
        let wide = Allowlist::parse("::/0, 0.0.0.0/1").unwrap();
        assert!(
            !wide.allows("::ffff:169.254.169.254", 80),
            "mapped is the IPv4 address"
        );
        assert!(
            !wide.allows("fd00:ec2::254", 80),
            "AWS's IPv6 metadata endpoint"
        );
        assert!(
            !wide.allows("100.100.100.200", 80),
            "Alibaba's metadata endpoint"
        );
        let b = Allowlist::parse("127.0.0.1:80, 169.254.0.0/16:53").unwrap();
        assert!(b.allows("127.0.0.1", 80));
        assert!(!b.allows("127.0.0.1", 81));
        assert!(b.allows("169.254.169.254", 53));
    }

    #[test]
    fn rules_match_by_cidr_host_suffix_and_port() {
        let a = Allowlist::parse(
            "10.0.0.0/8:10250, *.svc.cluster.local:443, node-1, [fd00::]/8:22, [fe80::/10]:5, *:7",
        )
        .unwrap();
        assert!(a.allows("10.1.2.3", 10250));
        assert!(!a.allows("10.1.2.3", 22));
        assert!(!a.allows("11.1.2.3", 10250));
        assert!(a.allows("api.default.svc.cluster.local", 443));
        assert!(!a.allows("svc.cluster.local.evil", 443));
        assert!(a.allows("NODE-1", 9999));
        assert!(a.allows("fd00::1", 22));
        assert!(!a.allows("fd00::1", 23));
        assert!(a.allows("fe80::1", 5));
        assert!(a.allows("example.com", 7));
        assert!(!a.allows("example.com", 8));
    }

    #[test]
    fn bad_rules_are_refused_with_a_reason() {
        assert!(Allowlist::parse("10.0.0.0/99").is_err());
        assert!(Allowlist::parse("host:notaport").is_err());
    }
}
