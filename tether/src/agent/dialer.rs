//! The agent's side of a dial: the destination allowlist and connecting with a timeout.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
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

/// Which destinations an agent dials. Empty: everything (Konnectivity's default), logged at
/// start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    rules: Vec<Rule>,
}

impl Allowlist {
    /// From rules; empty allows everything.
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

    /// Whether every destination is allowed.
    pub fn allows_all(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether `host:port` may be dialled.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        if self.rules.is_empty() {
            return true;
        }
        let lower = host.to_ascii_lowercase();
        let ip = host.parse::<IpAddr>().ok();
        self.rules.iter().any(|r| {
            r.port.is_none_or(|p| p == port)
                && match &r.host {
                    HostRule::Any => true,
                    HostRule::Exact(h) => *h == lower,
                    HostRule::Suffix(s) => lower.ends_with(s.as_str()),
                    HostRule::Net(n) => ip.is_some_and(|ip| n.contains(&ip)),
                }
        })
    }
}

impl fmt::Display for Allowlist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rules.is_empty() {
            return f.write_str("*");
        }
        write!(f, "{} rule(s)", self.rules.len())
    }
}

/// Connects to `host:port` within `timeout`, mapping failures to the RESET codes of SPEC 8.1.
pub async fn connect(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, (ErrorCode, String)> {
    match tokio::time::timeout(timeout, TcpStream::connect((host, port))).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err((dial_code(&e), e.to_string())),
        Err(_) => Err((
            ErrorCode::DIAL_TIMEOUT,
            format!("no connection within {timeout:?}"),
        )),
    }
}

fn dial_code(e: &io::Error) -> ErrorCode {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ErrorCode::DIAL_REFUSED,
        io::ErrorKind::TimedOut => ErrorCode::DIAL_TIMEOUT,
        _ => ErrorCode::DIAL_UNREACHABLE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_allowlist_allows_everything() {
        assert!(Allowlist::default().allows("anything", 1));
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
