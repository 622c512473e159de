//! Connected agents, and routing a destination to one of them (docs/ARCHITECTURE.md).

use std::collections::HashMap;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use ipnet::IpNet;
use tether_proto::frame::Identifier;

use tether::Tunnel;

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

impl Strategy {
    /// The name `--proxy-strategies` takes.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::DestHost => "destHost",
            Strategy::DefaultRoute => "defaultRoute",
            Strategy::Default => "default",
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
    /// Shared, so a dial that logs it costs a reference count, not an allocation.
    agent_id: Arc<str>,
    identifiers: Vec<Identifier>,
    tunnel: Tunnel,
    /// Who proved these claims, when its ipv4/ipv6 claims are its alone (`add_exclusive`).
    holder: Option<Arc<str>>,
}

/// Registrations by what their agents announced: the positions (registration numbers) of
/// the agents that announced each name, address, range and the default route.
#[derive(Default)]
struct Routes {
    /// `host` identifiers, ASCII-lowercased.
    by_host: HashMap<Box<str>, Vec<u64>>,
    /// `ipv4` and `ipv6` identifiers.
    by_ip: HashMap<IpAddr, Vec<u64>>,
    /// `cidr` identifiers (few: one per agent that announces a range), scanned.
    cidrs: Vec<(IpNet, u64)>,
    /// Agents that announced the default route.
    default_route: Vec<u64>,
}

/// Each identifier's place in [`Routes`], for adding a registration and taking it out again.
enum Slot {
    Host(Box<str>),
    Ip(IpAddr),
    Cidr(IpNet),
    DefaultRoute,
}

fn slot(id: &Identifier) -> Option<Slot> {
    match id {
        Identifier::Host(h) => Some(Slot::Host(h.to_ascii_lowercase().into())),
        Identifier::Ipv4(a) => Some(Slot::Ip(IpAddr::V4(*a))),
        Identifier::Ipv6(a) => Some(Slot::Ip(IpAddr::V6(*a))),
        //= SPEC §3.4.1
        //# a receiver uses the network they name (`10.1.0.0/16`) and MUST NOT treat the host
        //# bits as an error.
        Identifier::Cidr(addr, prefix) => IpNet::new(*addr, *prefix)
            .ok()
            .map(|n| Slot::Cidr(n.trunc())),
        Identifier::DefaultRoute => Some(Slot::DefaultRoute),
        Identifier::Unknown(..) => None,
    }
}

impl Routes {
    fn add(&mut self, conn: u64, ids: &[Identifier]) {
        for s in ids.iter().filter_map(slot) {
            match s {
                Slot::Host(h) => self.by_host.entry(h).or_default().push(conn),
                Slot::Ip(ip) => self.by_ip.entry(ip).or_default().push(conn),
                Slot::Cidr(net) => self.cidrs.push((net, conn)),
                Slot::DefaultRoute => self.default_route.push(conn),
            }
        }
    }

    fn remove(&mut self, conn: u64, ids: &[Identifier]) {
        fn take<K: std::hash::Hash + Eq>(m: &mut HashMap<K, Vec<u64>>, k: K, conn: u64) {
            if let std::collections::hash_map::Entry::Occupied(mut e) = m.entry(k) {
                e.get_mut().retain(|c| *c != conn);
                if e.get().is_empty() {
                    e.remove();
                }
            }
        }
        for s in ids.iter().filter_map(slot) {
            match s {
                Slot::Host(h) => take(&mut self.by_host, h, conn),
                Slot::Ip(ip) => take(&mut self.by_ip, ip, conn),
                Slot::Cidr(_) => self.cidrs.retain(|(_, c)| *c != conn),
                Slot::DefaultRoute => self.default_route.retain(|c| *c != conn),
            }
        }
    }
}

/// The registered agents, indexed for routing.
#[derive(Default)]
struct Index {
    entries: HashMap<u64, Entry>,
    /// Registration numbers, oldest first (the order `default` turns through).
    order: Vec<u64>,
    routes: Routes,
}

impl Index {
    /// The first of `ips` that a usable tunnel of a holder other than `holder` claims as its
    /// own, with that tunnel's agent id. A draining tunnel is not counted: routing skips it.
    fn claimed_by_other(&self, ips: &[IpAddr], holder: &str) -> Option<(IpAddr, Arc<str>)> {
        ips.iter().find_map(|ip| {
            self.routes.by_ip.get(ip)?.iter().find_map(|c| {
                let e = self.entries.get(c)?;
                let other = e.holder.as_deref().is_some_and(|h| h != holder);
                (other && e.tunnel.is_usable()).then(|| (*ip, e.agent_id.clone()))
            })
        })
    }

    /// The `turn`-th usable registration among `candidates`, without allocating: usable ones
    /// are counted, then the chosen one found. Those whose agent announced a drain to come
    /// (DRAINING, SPEC 7.4) only when no other is usable, as Konnectivity falls back to a
    /// draining agent: a node served by one agent stays reachable while that agent restarts.
    fn pick(&self, candidates: impl Iterator<Item = u64> + Clone, turn: usize) -> Option<&Entry> {
        for noticed in [false, true] {
            let usable = |c: u64| {
                self.entries
                    .get(&c)
                    .filter(|e| e.tunnel.is_usable() && e.tunnel.peer_will_drain() == noticed)
            };
            let n = candidates.clone().filter_map(usable).count();
            if n > 0 {
                return candidates.filter_map(usable).nth(turn % n);
            }
        }
        None
    }
}

/// Candidates for `host` by `destHost`: the agents that announced it as a name, as an
/// address, or a range holding the address (each once per identifier it matched).
fn dest_host_candidates<'a>(
    ix: &'a Routes,
    host: &str,
    ip: Option<IpAddr>,
) -> impl Iterator<Item = u64> + Clone + 'a {
    let by_ip = ip.and_then(|ip| ix.by_ip.get(&ip)).map(Vec::as_slice);
    let by_cidr = ix
        .cidrs
        .iter()
        .filter(move |(net, _)| ip.is_some_and(|ip| net.contains(&ip)))
        .map(|(_, c)| *c);
    // Names are stored lowercased; a host that is already lowercase (the usual case) is looked
    // up without allocating.
    let by_host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        ix.by_host.get(host.to_ascii_lowercase().as_str())
    } else {
        ix.by_host.get(host)
    }
    .map(Vec::as_slice);
    by_host
        .unwrap_or_default()
        .iter()
        .chain(by_ip.unwrap_or_default())
        .copied()
        .chain(by_cidr)
}

/// The agents connected to this server.
///
/// A dial takes the read lock, which dials share, for a hash lookup and a look at the
/// matching agents: the cost does not grow with the number of agents, and nothing is
/// allocated. A registration or its removal takes the write lock for work in proportion to
/// its own identifiers (and, to leave the turn order, a scan of that list).
#[derive(Default)]
pub struct Registry {
    index: RwLock<Index>,
    next_conn: AtomicU64,
    turn: AtomicUsize,
}

impl Registry {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an agent's tunnel; returns its registration number.
    pub fn add(&self, agent_id: String, identifiers: Vec<Identifier>, tunnel: Tunnel) -> u64 {
        let mut ix = self.write();
        self.insert(&mut ix, agent_id, identifiers, tunnel, None)
    }

    /// Adds an agent's tunnel whose ipv4 and ipv6 claims `holder` proved (docs/SECURITY.md,
    /// "Address claims"), unless a usable tunnel of another holder claims one of them: then
    /// nothing is added, and the address and that tunnel's agent id come back. The check and
    /// the addition are one step, so two agents admitted at once cannot both get an address.
    pub fn add_exclusive(
        &self,
        agent_id: String,
        holder: Arc<str>,
        identifiers: Vec<Identifier>,
        tunnel: Tunnel,
    ) -> Result<u64, (IpAddr, Arc<str>)> {
        let ips = crate::identity::claimed_ips(&identifiers);
        let mut ix = self.write();
        if let Some(held) = ix.claimed_by_other(&ips, &holder) {
            return Err(held);
        }
        Ok(self.insert(&mut ix, agent_id, identifiers, tunnel, Some(holder)))
    }

    /// The first of `ips` that a usable tunnel of a holder other than `holder` claims as its
    /// own (see [`Registry::add_exclusive`]), with that tunnel's agent id.
    pub fn claimed_by_other(&self, ips: &[IpAddr], holder: &str) -> Option<(IpAddr, Arc<str>)> {
        self.read().claimed_by_other(ips, holder)
    }

    fn insert(
        &self,
        ix: &mut Index,
        agent_id: String,
        identifiers: Vec<Identifier>,
        tunnel: Tunnel,
        holder: Option<Arc<str>>,
    ) -> u64 {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        ix.routes.add(conn, &identifiers);
        ix.order.push(conn);
        ix.entries.insert(
            conn,
            Entry {
                agent_id: agent_id.into(),
                identifiers,
                tunnel,
                holder,
            },
        );
        conn
    }

    /// Usable tunnels of `agent_id` (case-insensitive).
    pub fn usable_of(&self, agent_id: &str) -> usize {
        self.read()
            .entries
            .values()
            .filter(|e| e.agent_id.eq_ignore_ascii_case(agent_id) && e.tunnel.is_usable())
            .count()
    }

    /// What a new tunnel of `agent_id` displaces (docs/SECURITY.md): the usable tunnels of
    /// the id beyond the newest `cap`, to drain (routing skips a draining tunnel), and every
    /// tunnel of the id beyond the newest `2·cap`, draining or not, to close at once, so a
    /// peer that ignores GOAWAY cannot pile tunnels up. Ids compare without ASCII case, as a
    /// certificate's DNS names do.
    pub fn over_cap(&self, agent_id: &str, cap: usize) -> (Vec<Tunnel>, Vec<Tunnel>) {
        let ix = self.read();
        let cap = cap.max(1);
        // Oldest first: registration numbers grow.
        let mut mine: Vec<(u64, &Entry)> = ix
            .entries
            .iter()
            .filter(|(_, e)| e.agent_id.eq_ignore_ascii_case(agent_id))
            .map(|(c, e)| (*c, e))
            .collect();
        mine.sort_unstable_by_key(|(c, _)| *c);
        let usable: Vec<&Entry> = mine
            .iter()
            .map(|(_, e)| *e)
            .filter(|e| e.tunnel.is_usable())
            .collect();
        let drain = usable[..usable.len().saturating_sub(cap)]
            .iter()
            .map(|e| e.tunnel.clone())
            .collect();
        let close = mine[..mine.len().saturating_sub(cap.saturating_mul(2))]
            .iter()
            .map(|(_, e)| e.tunnel.clone())
            .collect();
        (drain, close)
    }

    /// Removes a registration (its tunnel ended).
    pub fn remove(&self, conn: u64) {
        let mut ix = self.write();
        let Some(e) = ix.entries.remove(&conn) else {
            return;
        };
        ix.routes.remove(conn, &e.identifiers);
        if let Some(at) = ix.order.iter().position(|c| *c == conn) {
            ix.order.remove(at);
        }
    }

    /// Agents registered.
    pub fn len(&self) -> usize {
        self.read().entries.len()
    }

    /// Whether no agent is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Per agent id: its tunnels and the streams open on them.
    pub fn per_agent(&self) -> Vec<(String, usize, usize)> {
        // Copied out under the lock; counted after it, so a scrape never holds up `route`.
        let entries: Vec<(Arc<str>, Tunnel)> = self
            .read()
            .entries
            .values()
            .map(|e| (e.agent_id.clone(), e.tunnel.clone()))
            .collect();
        let mut by_id: HashMap<Arc<str>, (usize, usize)> = HashMap::new();
        for (id, tunnel) in entries {
            let row = by_id.entry(id).or_default();
            row.0 += 1;
            row.1 += tunnel.stream_count();
        }
        let mut out: Vec<(String, usize, usize)> = by_id
            .into_iter()
            .map(|(id, (t, s))| (id.to_string(), t, s))
            .collect();
        out.sort();
        out
    }

    /// Usable tunnels `strategy` can route to: any (`default`), those that announced the
    /// default route (`defaultRoute`), those that announced a name, an address or a range
    /// (`destHost`).
    pub fn usable_by(&self, strategy: Strategy) -> usize {
        let ix = self.read();
        ix.entries
            .values()
            .filter(|e| e.tunnel.is_usable())
            .filter(|e| match strategy {
                Strategy::Default => true,
                Strategy::DefaultRoute => e.identifiers.contains(&Identifier::DefaultRoute),
                Strategy::DestHost => e
                    .identifiers
                    .iter()
                    .any(|i| !matches!(i, Identifier::DefaultRoute | Identifier::Unknown(..))),
            })
            .count()
    }

    /// The ids of the agents whose tunnels announced a drain to come (DRAINING, SPEC 7.4).
    pub fn draining_soon(&self) -> Vec<String> {
        let ix = self.read();
        ix.order
            .iter()
            .filter_map(|c| ix.entries.get(c))
            .filter(|e| e.tunnel.peer_will_drain())
            .map(|e| e.agent_id.to_string())
            .collect()
    }

    /// The ids of the registered agents.
    pub fn agent_ids(&self) -> Vec<String> {
        let ix = self.read();
        ix.order
            .iter()
            .filter_map(|c| ix.entries.get(c))
            .map(|e| e.agent_id.to_string())
            .collect()
    }

    /// The tunnel to use for `host`, by the first strategy that finds a usable agent; among
    /// several, the next in turn. With the agent's id, for logs. Costs a hash lookup and a
    /// look at the matching agents, whatever the number of agents; allocates nothing.
    pub fn route(&self, host: &str, strategies: &[Strategy]) -> Option<(Tunnel, Arc<str>)> {
        let ix = self.read();
        let ip = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok();
        for s in strategies {
            let turn = self.turn.fetch_add(1, Ordering::Relaxed);
            let found = match s {
                Strategy::DestHost => ix.pick(dest_host_candidates(&ix.routes, host, ip), turn),
                Strategy::DefaultRoute => ix.pick(ix.routes.default_route.iter().copied(), turn),
                Strategy::Default => {
                    // Any usable agent: from the one in turn onwards, the first usable, one
                    // that announced a drain only when no other is.
                    let n = ix.order.len();
                    let next = |noticed: bool| {
                        (0..n)
                            .filter_map(|k| ix.entries.get(&ix.order[(turn + k) % n]))
                            .find(|e| e.tunnel.is_usable() && e.tunnel.peer_will_drain() == noticed)
                    };
                    next(false).or_else(|| next(true))
                }
            };
            if let Some(e) = found {
                return Some((e.tunnel.clone(), e.agent_id.clone()));
            }
        }
        None
    }

    /// Every registered tunnel.
    pub fn tunnels(&self) -> Vec<Tunnel> {
        self.read()
            .entries
            .values()
            .map(|e| e.tunnel.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_tunnel_cap_displaces_nothing_and_does_not_overflow() {
        let r = Registry::default();
        assert_eq!(
            r.over_cap("agent-1", usize::MAX).0.len(),
            0,
            "nothing registered, nothing displaced"
        );
    }

    #[cfg(feature = "test-util")]
    #[tokio::test]
    async fn an_exclusive_address_is_never_registered_for_two_holders() {
        let (a, _peer_a, _ia) = tether::testing::tunnel_pair().await;
        let (b, _peer_b, _ib) = tether::testing::tunnel_pair().await;
        let (c, _peer_c, _ic) = tether::testing::tunnel_pair().await;
        let ip = Identifier::Ipv4("10.0.0.5".parse().unwrap());
        let r = Registry::default();
        let first = r
            .add_exclusive(
                "node-1".into(),
                "node node-1".into(),
                vec![ip.clone()],
                a.clone(),
            )
            .unwrap();
        // Another holder: refused, and nothing of it is registered.
        let (held, by) = r
            .add_exclusive(
                "node-2".into(),
                "node node-2".into(),
                vec![ip.clone()],
                b.clone(),
            )
            .unwrap_err();
        assert_eq!((held.to_string().as_str(), &*by), ("10.0.0.5", "node-1"));
        assert_eq!(r.agent_ids(), vec!["node-1"]);
        // The same holder again (a reconnect): registered beside it.
        r.add_exclusive("node-1".into(), "node node-1".into(), vec![ip.clone()], c)
            .unwrap();
        // A draining holder no longer holds the address (routing skips it), a gone one either.
        r.remove(first);
        a.go_away("drain");
        let d = Registry::default();
        d.add_exclusive("node-1".into(), "node node-1".into(), vec![ip.clone()], a)
            .unwrap();
        assert!(
            d.add_exclusive("node-2".into(), "node node-2".into(), vec![ip], b)
                .is_ok(),
            "a draining tunnel does not hold its addresses"
        );
    }

    #[cfg(feature = "test-util")]
    #[tokio::test]
    async fn an_agent_that_announced_a_drain_is_routed_to_only_when_no_other_is_usable() {
        let (a, a_peer, _ia) = tether::testing::tunnel_pair().await;
        let (b, _b_peer, _ib) = tether::testing::tunnel_pair().await;
        // Agent A announces its drain; the server's end of its tunnel learns of it.
        assert!(a_peer.announce_draining());
        for _ in 0..2000 {
            if a.peer_will_drain() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert!(a.peer_will_drain() && a.is_usable());
        let r = Registry::default();
        let only_a = r.add("a".into(), vec![], a.clone());
        // Alone, the noticed agent still gets the dials.
        assert_eq!(&*r.route("x", &[Strategy::Default]).unwrap().1, "a");
        r.add("b".into(), vec![], b.clone());
        for _ in 0..10 {
            assert_eq!(
                &*r.route("x", &[Strategy::Default]).unwrap().1,
                "b",
                "another agent first"
            );
        }
        r.remove(only_a);
        assert_eq!(&*r.route("x", &[Strategy::Default]).unwrap().1, "b");
    }

    /// The reference: whether one identifier matches a destination, checked one by one.
    fn matches_host(id: &Identifier, host: &str, ip: Option<IpAddr>) -> bool {
        match id {
            Identifier::Host(h) => h.eq_ignore_ascii_case(host),
            Identifier::Ipv4(a) => ip == Some(IpAddr::V4(*a)),
            Identifier::Ipv6(a) => ip == Some(IpAddr::V6(*a)),
            Identifier::Cidr(addr, prefix) => match (IpNet::new(*addr, *prefix), ip) {
                (Ok(net), Some(ip)) => net.trunc().contains(&ip),
                _ => false,
            },
            Identifier::DefaultRoute | Identifier::Unknown(..) => false,
        }
    }

    /// The index finds exactly the agents a scan of every agent's identifiers finds.
    #[test]
    #[allow(clippy::cast_possible_truncation)] // small random numbers, under each type's range
    fn dest_host_lookups_find_exactly_what_a_scan_of_every_agent_finds() {
        use std::net::{Ipv4Addr, Ipv6Addr};
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let names = ["node-1", "Node-2", "node-3.example", "10.0.0.1"];
        for _ in 0..200 {
            let agents: Vec<Vec<Identifier>> = (0..next(12))
                .map(|_| {
                    (0..next(4))
                        .map(|_| match next(6) {
                            0 => Identifier::Host(names[next(4) as usize].into()),
                            1 => Identifier::Ipv4(Ipv4Addr::new(10, 0, 0, next(4) as u8)),
                            2 => Identifier::Ipv6(Ipv6Addr::new(
                                0xfd00,
                                0,
                                0,
                                0,
                                0,
                                0,
                                0,
                                next(3) as u16,
                            )),
                            3 => Identifier::Cidr(
                                std::net::IpAddr::V4(Ipv4Addr::new(10, 0, next(2) as u8, 7)),
                                [8, 16, 24, 32][next(4) as usize],
                            ),
                            4 => Identifier::DefaultRoute,
                            _ => Identifier::Host("NODE-1".into()),
                        })
                        .collect()
                })
                .collect();
            let mut routes = Routes::default();
            for (i, a) in agents.iter().enumerate() {
                routes.add(i as u64, a);
            }
            // Taking a registration out leaves the others as they were.
            let extra = vec![
                Identifier::Host("node-1".into()),
                Identifier::Ipv4(Ipv4Addr::new(10, 0, 0, 1)),
            ];
            routes.add(999, &extra);
            routes.remove(999, &extra);
            for host in [
                "node-1",
                "NODE-1",
                "node-2",
                "node-3.example",
                "10.0.0.1",
                "10.0.0.2",
                "10.0.1.9",
                "11.0.0.1",
                "fd00::1",
                "[fd00::2]",
                "other",
            ] {
                let ip = host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .ok();
                let mut found: Vec<u64> = dest_host_candidates(&routes, host, ip).collect();
                found.sort_unstable();
                found.dedup();
                let scan: Vec<u64> = (0..agents.len() as u64)
                    .filter(|i| {
                        agents[*i as usize]
                            .iter()
                            .any(|id| matches_host(id, host, ip))
                    })
                    .collect();
                assert_eq!(found, scan, "{host} in {agents:?}");
            }
        }
    }

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
