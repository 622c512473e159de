//! The agent's `/healthz`, `/readyz` and `/metrics` (its health server; Konnectivity's
//! `--health-server-port`). Names and their Konnectivity counterparts: docs/OPERATIONS.md,
//! "Read the metrics".

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::metrics::{ProcessCollector, TunnelStats};

type Labels = Vec<(String, String)>;

/// The agent's metrics.
pub struct AgentMetrics {
    registry: Registry,
    pub(crate) tunnels: Gauge,
    pub(crate) server_count: Gauge,
    pub(crate) dial_seconds: Histogram,
    dials: Family<Labels, Counter>,
    connect_failures: Family<Labels, Counter>,
    pub(crate) open_endpoints: Gauge,
    pub(crate) syncs: Counter,
    pub(crate) duplicates: Counter,
    /// Bytes and stream errors, counted by every tunnel of this agent.
    pub(crate) stats: Arc<TunnelStats>,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentMetrics")
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// Registers every metric.
    pub fn new() -> AgentMetrics {
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        let m = AgentMetrics {
            registry: Registry::default(),
            tunnels: Gauge::default(),
            server_count: Gauge::default(),
            dial_seconds: Histogram::new(crate::server::DIAL_BUCKETS),
            dials: Family::default(),
            connect_failures: Family::default(),
            open_endpoints: Gauge::default(),
            syncs: Counter::default(),
            duplicates: Counter::default(),
            stats: Arc::new(TunnelStats::default()),
        };
        let r = root.sub_registry_with_prefix("tether_agent");
        r.register("tunnels", "Tunnels open to servers", m.tunnels.clone());
        r.register(
            "known_server_count",
            "Servers this agent keeps tunnels to (announced, or counted from leases)",
            m.server_count.clone(),
        );
        r.register_with_unit(
            "dial_duration",
            "Time to connect to a destination (successful dials)",
            prometheus_client::registry::Unit::Seconds,
            m.dial_seconds.clone(),
        );
        r.register(
            "dials",
            "Dials from servers, by result (ok or the error code sent back)",
            m.dials.clone(),
        );
        r.register(
            "connect_failures",
            "Tunnels to servers that failed to come up, by stage (tcp, tls, timeout, unauthorized, handshake, token)",
            m.connect_failures.clone(),
        );
        r.register(
            "syncs",
            "Turns of the loops that keep a tunnel to every server",
            m.syncs.clone(),
        );
        r.register(
            "duplicate_tunnels",
            "Tunnels closed at once because they reached a server the agent already holds",
            m.duplicates.clone(),
        );
        r.register(
            "endpoint_connections",
            "Connections to destinations open now",
            m.open_endpoints.clone(),
        );
        r.register_collector(Box::new(m.stats.clone()));
        AgentMetrics {
            registry: root,
            ..m
        }
    }

    /// Counts the reloads of `materials` under `tether_agent_reloads_total`.
    pub fn watch_reloads(&mut self, materials: Vec<Arc<dyn crate::reload::ReloadStats>>) {
        self.registry
            .sub_registry_with_prefix("tether_agent")
            .register_collector(Box::new(crate::metrics::ReloadCollector(materials)));
    }

    /// Counts a dial by its result: `ok` or an error code's name (codes this agent chose).
    pub(crate) fn dial(&self, result: &str) {
        self.dials
            .get_or_create(&vec![("result".to_owned(), result.to_owned())])
            .inc();
    }

    /// Counts a tunnel that did not come up, by the stage it failed in.
    pub(crate) fn connect_failed(&self, stage: &'static str) {
        self.connect_failures
            .get_or_create(&vec![("reason".to_owned(), stage.to_owned())])
            .inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        crate::metrics::render(&[&self.registry])
    }
}
