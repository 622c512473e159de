//! Connected agents, and routing a destination to one of them (docs/ARCHITECTURE.md).

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ipnet::IpNet;
use tether_proto::frame::Identifier;

use crate::tunnel::Tunnel;

/// A routing strategy, tried in the order given (Konnectivity's `--proxy-strategies`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// An agent whose identifiers (host, ipv4, ipv6, cidr) match the destination host.
    DestHost,
    /// An agent that announced the default route.
    DefaultRoute,
    /// Any agent, balanced.
    Default,
}

impl FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Strategy, String> {
        match s.trim() {
            "destHost" => Ok(Strategy::DestHost),
            "defaultRoute" => Ok(Strategy::DefaultRoute),
            "default" => Ok(Strategy::Default),
            other => Err(format!(
                "unknown proxy strategy {other:?} (destHost, defaultRoute, default)"
            )),
        }
    }
}

/// Parses `destHost,default`.
pub fn parse_strategies(s: &str) -> Result<Vec<Strategy>, String> {
    let list: Vec<Strategy> = s
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    if list.is_empty() {
        // No strategy would route nothing: every dial a 503.
        return Err("no strategy given (destHost, defaultRoute, default)".into());
    }
    Ok(list)
}

struct Entry {
    conn: u64,
    /// Shared, so a dial that logs it costs a reference count, not an allocation.
    agent_id: Arc<str>,
    identifiers: Vec<Identifier>,
    tunnel: Tunnel,
}

/// The agents connected to this server.
#[derive(Default)]
pub struct Registry {
    agents: Mutex<Vec<Entry>>,
    next_conn: AtomicU64,
    turn: AtomicUsize,
}

fn matches_host(id: &Identifier, host: &str, ip: Option<IpAddr>) -> bool {
    match id {
        Identifier::Host(h) => h.eq_ignore_ascii_case(host),
        Identifier::Ipv4(a) => ip == Some(IpAddr::V4(*a)),
        Identifier::Ipv6(a) => ip == Some(IpAddr::V6(*a)),
        //= SPEC §3.4.1
        //# a receiver uses the network they name (`10.1.0.0/16`) and MUST NOT treat the host
        //# bits as an error.
        Identifier::Cidr(addr, prefix) => match (IpNet::new(*addr, *prefix), ip) {
            (Ok(net), Some(ip)) => net.trunc().contains(&ip),
            _ => false,
        },
        Identifier::DefaultRoute | Identifier::Unknown(..) => false,
    }
}

impl Registry {
    /// Adds an agent's tunnel; returns its registration number.
    pub fn add(&self, agent_id: String, identifiers: Vec<Identifier>, tunnel: Tunnel) -> u64 {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut a) = self.agents.lock() {
            a.push(Entry {
                conn,
                agent_id: agent_id.into(),
                identifiers,
                tunnel,
            });
        }
        conn
    }

    /// What a new tunnel of `agent_id` displaces (docs/SECURITY.md): the usable tunnels of
    /// the id beyond the newest `cap`, to drain (routing skips a draining tunnel), and every
    /// tunnel of the id beyond the newest `2·cap`, draining or not, to close at once, so a
    /// peer that ignores GOAWAY cannot pile tunnels up. Ids compare without ASCII case, as a
    /// certificate's DNS names do.
    pub fn over_cap(&self, agent_id: &str, cap: usize) -> (Vec<Tunnel>, Vec<Tunnel>) {
        let Ok(a) = self.agents.lock() else {
            return (Vec::new(), Vec::new());
        };
        let cap = cap.max(1);
        let mine: Vec<&Entry> = a
            .iter()
            .filter(|e| e.agent_id.eq_ignore_ascii_case(agent_id))
            .collect();
        let usable: Vec<&&Entry> = mine.iter().filter(|e| e.tunnel.is_usable()).collect();
        let drain = usable[..usable.len().saturating_sub(cap)]
            .iter()
            .map(|e| e.tunnel.clone())
            .collect();
        let close = mine[..mine.len().saturating_sub(2 * cap)]
            .iter()
            .map(|e| e.tunnel.clone())
            .collect();
        (drain, close)
    }

    /// Removes a registration (its tunnel ended).
    pub fn remove(&self, conn: u64) {
        if let Ok(mut a) = self.agents.lock() {
            a.retain(|e| e.conn != conn);
        }
    }

    /// Agents registered.
    pub fn len(&self) -> usize {
        self.agents.lock().map(|a| a.len()).unwrap_or(0)
    }

    /// Whether no agent is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Per agent id: its tunnels and the streams open on them.
    pub fn per_agent(&self) -> Vec<(String, usize, usize)> {
        // Copied out under the lock; counted after it, so a scrape never holds up `route`.
        let entries: Vec<(String, Tunnel)> = self
            .agents
            .lock()
            .map(|a| {
                a.iter()
                    .map(|e| (e.agent_id.to_string(), e.tunnel.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let mut by_id: std::collections::HashMap<String, (usize, usize)> =
            std::collections::HashMap::new();
        for (id, tunnel) in entries {
            let row = by_id.entry(id).or_default();
            row.0 += 1;
            row.1 += tunnel.stream_count();
        }
        let mut out: Vec<(String, usize, usize)> =
            by_id.into_iter().map(|(id, (t, s))| (id, t, s)).collect();
        out.sort();
        out
    }

    /// The ids of the registered agents.
    pub fn agent_ids(&self) -> Vec<String> {
        self.agents
            .lock()
            .map(|a| a.iter().map(|e| e.agent_id.to_string()).collect())
            .unwrap_or_default()
    }

    /// The tunnel to use for `host`, by the first strategy that finds a usable agent; among
    /// several, the next in turn. With the agent's id, for logs.
    pub fn route(&self, host: &str, strategies: &[Strategy]) -> Option<(Tunnel, Arc<str>)> {
        let agents = self.agents.lock().ok()?;
        let ip = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok();
        for s in strategies {
            let candidates: Vec<&Entry> = agents
                .iter()
                .filter(|e| e.tunnel.is_usable())
                .filter(|e| match s {
                    Strategy::DestHost => e.identifiers.iter().any(|i| matches_host(i, host, ip)),
                    Strategy::DefaultRoute => e.identifiers.contains(&Identifier::DefaultRoute),
                    Strategy::Default => true,
                })
                .collect();
            if !candidates.is_empty() {
                let n = self.turn.fetch_add(1, Ordering::Relaxed);
                let e = candidates[n % candidates.len()];
                return Some((e.tunnel.clone(), e.agent_id.clone()));
            }
        }
        None
    }

    /// Every registered tunnel.
    pub fn tunnels(&self) -> Vec<Tunnel> {
        self.agents
            .lock()
            .map(|a| a.iter().map(|e| e.tunnel.clone()).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategies_parse_in_order_and_none_at_all_is_refused() {
        assert_eq!(
            parse_strategies("destHost, default").unwrap(),
            vec![Strategy::DestHost, Strategy::Default]
        );
        assert!(parse_strategies("").is_err(), "no strategy routes nothing");
        assert!(parse_strategies(" , ").is_err());
        assert!(parse_strategies("nearest").is_err());
    }
}
