//! `/healthz`, `/readyz` and `/metrics` (prometheus-client). Names and their Konnectivity
//! counterparts: docs/OPERATIONS.md, "Read the metrics".

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tether::stats::ListenerStats;
use tether_ops::metrics::{
    DIAL_BUCKETS, GaugeGuard, ProcessCollector, ReloadCollector, TunnelCollector, gauge_of,
};

use crate::registry::Registry as Agents;

type Labels = Vec<(String, String)>;

/// Which frontend a CONNECT client came in on (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frontend {
    /// Plain TCP.
    Tcp,
    /// TCP with TLS.
    Tls,
    /// The Unix socket.
    Uds,
    /// gRPC (Konnectivity's ProxyService) on a Unix socket.
    Grpc,
}

impl Frontend {
    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Frontend::Tcp => "tcp",
            Frontend::Tls => "tls",
            Frontend::Uds => "uds",
            Frontend::Grpc => "grpc",
        }
    }
}

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    agents: Gauge,
    dials: Family<Labels, Counter>,
    dial_seconds: Histogram,
    pending_dials: Gauge,
    connects: Family<Labels, Counter>,
    open_connects: Family<Labels, Gauge>,
    client_heads: Family<Labels, Gauge>,
    failed: Family<Labels, Counter>,
    /// What the agent listener and its tunnels count (the library's counters).
    pub(crate) listener: Arc<ListenerStats>,
    /// The gRPC frontend's byte budget and its size, once the frontend is up.
    grpc_budget: Arc<std::sync::OnceLock<(Arc<tokio::sync::Semaphore>, usize)>>,
    /// Konnectivity's series (docs/OPERATIONS.md, "Konnectivity's metric names").
    knp: Knp,
    /// Konnectivity's own agents connected (`proxy-agent`, among `agents`).
    konn_agents: Gauge,
    /// Node-to-client bytes Konnectivity agents' streams hold, waiting for their streams.
    konn_held: Gauge,
}

/// The series of Konnectivity's `pkg/server/metrics` that tether has a meaning for, beside
/// tether's own (`konnectivity_network_proxy_server_*`).
#[derive(Default)]
struct Knp {
    /// Streams open after the dial, every frontend (`established_connections`).
    established: Gauge,
    /// CONNECT client connections being served (`http_connections`).
    http: Gauge,
    /// gRPC calls being served (`grpc_connections{service_method="Proxy"}`).
    grpc_calls: Family<Labels, Gauge>,
    /// Dial failures by Konnectivity's reasons (`dial_failure_count`), in
    /// [`KNP_DIAL_FAILURES`]' order.
    dial_failures: Arc<[std::sync::atomic::AtomicU64; 5]>,
}

/// Konnectivity's `dial_failure_count` reasons that tether has a meaning for.
const KNP_DIAL_FAILURES: [&str; 5] = [
    "no_agent",
    "error_response",
    "backend_dial_timeout",
    "backend_close",
    "frontend_close",
];

/// `konnectivity_network_proxy_server_dial_failure_count`, under Konnectivity's exact name: a
/// counter in OpenMetrics must end in `_total`, so it is written untyped (`unknown`), as
/// dashboards that match the name expect it.
#[derive(Debug)]
struct KnpDialFailures(Arc<[std::sync::atomic::AtomicU64; 5]>);

impl Collector for KnpDialFailures {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut m = encoder.encode_descriptor(
            "dial_failure_count",
            "Dial failures, by Konnectivity's reasons (a counter, written untyped to keep Konnectivity's name)",
            None,
            MetricType::Unknown,
        )?;
        for (reason, n) in KNP_DIAL_FAILURES.iter().zip(self.0.iter()) {
            let n = n.load(std::sync::atomic::Ordering::Relaxed);
            ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
                .encode(m.encode_family(&[("reason", *reason)])?)?;
        }
        Ok(())
    }
}

/// Konnectivity's `dial_failure_count` reason for a tether dial result; `None` for a success.
pub fn konnectivity_dial_failure(result: &str) -> Option<&'static str> {
    match result {
        "ok" => None,
        "no_agent" => Some("no_agent"),
        "timeout" => Some("backend_dial_timeout"),
        "cancelled" => Some("frontend_close"),
        // The tunnel went before the agent answered.
        "unavailable" => Some("backend_close"),
        // Every RESET code the agent sent back.
        _ => Some("error_response"),
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        let m = Metrics {
            registry: Registry::default(),
            agents: Gauge::default(),
            dials: Family::default(),
            dial_seconds: Histogram::new(DIAL_BUCKETS),
            pending_dials: Gauge::default(),
            connects: Family::default(),
            open_connects: Family::default(),
            client_heads: Family::default(),
            failed: Family::default(),
            listener: Arc::new(ListenerStats::default()),
            grpc_budget: Arc::default(),
            knp: Knp::default(),
            konn_agents: Gauge::default(),
            konn_held: Gauge::default(),
        };
        let r = root.sub_registry_with_prefix("tether");
        r.register_collector(Box::new(Handshakes(m.listener.clone())));
        r.register("agents", "Agent tunnels connected", m.agents.clone());
        r.register(
            "konnectivity_agents",
            "Konnectivity's own agents (proxy-agent) connected, among tether_agents",
            m.konn_agents.clone(),
        );
        r.register(
            "konnectivity_agent_bytes_held",
            "Node-to-client bytes from Konnectivity agents waiting for their streams, all agents (each agent at most its --konnectivity-agent-buffer)",
            m.konn_held.clone(),
        );
        r.register_collector(Box::new(Refused(m.listener.clone())));
        r.register("dials", "Dials through tunnels, by result", m.dials.clone());
        r.register_with_unit(
            "dial_duration",
            "Time from a dial's start to the agent's answer (successful dials)",
            prometheus_client::registry::Unit::Seconds,
            m.dial_seconds.clone(),
        );
        r.register(
            "pending_dials",
            "Dials sent to agents and not answered yet",
            m.pending_dials.clone(),
        );
        r.register(
            "connect_requests",
            "HTTP CONNECT requests, by status",
            m.connects.clone(),
        );
        r.register(
            "connect_streams",
            "CONNECT streams open now (after the 200), by frontend",
            m.open_connects.clone(),
        );
        r.register(
            "connect_pending_heads",
            "CONNECT client connections in their TLS handshake or request head now, by frontend",
            m.client_heads.clone(),
        );
        r.register(
            "connect_streams_failed",
            "CONNECT streams that ended with an error after the 200, by frontend",
            m.failed.clone(),
        );
        r.register_collector(Box::new(TunnelCollector(m.listener.tunnels.clone())));
        r.register_collector(Box::new(GrpcBudget(m.grpc_budget.clone())));
        // Konnectivity's names for the same things, for its dashboards and tests.
        let k = root.sub_registry_with_prefix("konnectivity_network_proxy_server");
        k.register(
            "ready_backend_connections",
            "Agent tunnels connected (tether_agents)",
            m.agents.clone(),
        );
        k.register(
            "pending_backend_dials",
            "Dials sent to agents and not answered yet (tether_pending_dials)",
            m.pending_dials.clone(),
        );
        k.register(
            "established_connections",
            "Streams open after the dial, every frontend (the sum of tether_connect_streams)",
            m.knp.established.clone(),
        );
        k.register(
            "http_connections",
            "HTTP CONNECT client connections being served",
            m.knp.http.clone(),
        );
        k.register(
            "grpc_connections",
            "gRPC calls being served, by service method (Proxy)",
            m.knp.grpc_calls.clone(),
        );
        k.register_collector(Box::new(KnpDialFailures(m.knp.dial_failures.clone())));
        k.register_with_unit(
            "dial_duration",
            "Time from a dial's start to the agent's answer (successful dials)",
            prometheus_client::registry::Unit::Seconds,
            m.dial_seconds.clone(),
        );
        Metrics {
            registry: root,
            ..m
        }
    }

    pub(crate) fn agents(&self, n: usize) {
        self.agents.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts the reloads of `materials` under `tether_reloads_total`.
    pub fn watch_reloads(&mut self, materials: Vec<Arc<dyn tether::reload::ReloadStats>>) {
        self.registry
            .sub_registry_with_prefix("tether")
            .register_collector(Box::new(ReloadCollector(materials)));
    }

    /// Exports the gRPC frontend's byte budget (`tether_grpc_message_bytes_held`).
    pub(crate) fn watch_grpc_budget(&self, budget: (Arc<tokio::sync::Semaphore>, usize)) {
        let _ = self.grpc_budget.set(budget);
    }

    /// Counts a dial by its result: `ok`, `no_agent`, `timeout`, `unavailable`, an error
    /// code's name, or `other` for a code this server does not know, so an agent that picks
    /// codes at will cannot grow the label set (docs/SECURITY.md).
    pub(crate) fn dial(&self, result: &str, seconds: Option<f64>) {
        self.dials
            .get_or_create(&vec![("result".to_owned(), result.to_owned())])
            .inc();
        if let Some(s) = seconds {
            self.dial_seconds.observe(s);
        }
        if let Some(reason) = konnectivity_dial_failure(result)
            && let Some(i) = KNP_DIAL_FAILURES.iter().position(|r| *r == reason)
        {
            self.knp.dial_failures[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// One more CONNECT client connection being served, until the guard is dropped.
    pub(crate) fn http_connection(&self) -> GaugeGuard {
        GaugeGuard::up(&self.knp.http)
    }

    /// One more gRPC call being served, until the guard is dropped.
    pub(crate) fn grpc_call(&self) -> GaugeGuard {
        let g = self
            .knp
            .grpc_calls
            .get_or_create(&vec![("service_method".to_owned(), "Proxy".to_owned())])
            .clone();
        GaugeGuard::up(&g)
    }

    /// One more Konnectivity agent connected, until the guard is dropped.
    pub(crate) fn konnectivity_agent(&self) -> GaugeGuard {
        GaugeGuard::up(&self.konn_agents)
    }

    /// The gauge of bytes Konnectivity agents' streams hold.
    pub(crate) fn konnectivity_held(&self) -> Gauge {
        self.konn_held.clone()
    }

    /// One more dial waiting for its agent, until the guard is dropped.
    pub(crate) fn pending_dial(&self) -> GaugeGuard {
        GaugeGuard::up(&self.pending_dials)
    }

    pub(crate) fn stream_failed(&self, frontend: Frontend) {
        self.failed
            .get_or_create(&vec![("frontend".to_owned(), frontend.name().to_owned())])
            .inc();
    }

    /// One more CONNECT stream open on `frontend`, until the guards are dropped.
    pub(crate) fn stream_open(&self, frontend: Frontend) -> [GaugeGuard; 2] {
        let g = self
            .open_connects
            .get_or_create(&vec![("frontend".to_owned(), frontend.name().to_owned())])
            .clone();
        [GaugeGuard::up(&g), GaugeGuard::up(&self.knp.established)]
    }

    /// One more CONNECT client before the end of its request head on `frontend`, until the
    /// guard is dropped.
    pub(crate) fn client_head(&self, frontend: Frontend) -> GaugeGuard {
        let g = self
            .client_heads
            .get_or_create(&vec![("frontend".to_owned(), frontend.name().to_owned())])
            .clone();
        GaugeGuard::up(&g)
    }

    pub(crate) fn connect(&self, status: u16) {
        self.connects
            .get_or_create(&vec![("status".to_owned(), status.to_string())])
            .inc();
    }

    /// The text exposition, with the per-agent gauges of `core`'s registry as of now, and
    /// Konnectivity's agents per routing strategy in use.
    pub fn render(&self, agents: &Agents, strategies: &[crate::registry::Strategy]) -> String {
        let mut now = Registry::with_prefix("tether");
        now.register_collector(Box::new(PerAgent(agents.per_agent())));
        let mut knp = Registry::with_prefix("konnectivity_network_proxy_server");
        let ready: Family<Labels, Gauge> = Family::default();
        for s in strategies {
            ready
                .get_or_create(&vec![("proxy_strategy".to_owned(), s.name().to_owned())])
                .set(i64::try_from(agents.usable_by(*s)).unwrap_or(i64::MAX));
        }
        knp.register(
            "ready_backends",
            "Agents usable by each routing strategy in use",
            ready,
        );
        tether_ops::metrics::render(&[&self.registry, &now, &knp])
    }
}

/// Tunnels and open streams per connected agent, read at scrape time. One series per
/// connected agent id: bounded by the agents this server admits (--max-tunnels-per-agent,
/// identity rules), and gone when the agent goes.
#[derive(Debug)]
struct PerAgent(Vec<(String, usize, usize)>);

impl Collector for PerAgent {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        for (name, help, pick) in [
            (
                "tunnels",
                "Tunnels each connected agent holds to this server, by agent id",
                1usize,
            ),
            (
                "open_streams",
                "Streams open on each connected agent's tunnels, by agent id",
                2,
            ),
        ] {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (id, tunnels, streams) in &self.0 {
                let v = if pick == 1 { *tunnels } else { *streams };
                // prometheus-client writes label values as given: an agent id with a quote or
                // a backslash would break the whole exposition.
                let id = escape_label(id);
                let labels = [("agent_id", id.as_str())];
                ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
                    .encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// A label value as the text format wants it: `\\`, `\"` and `\n` escaped.
fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// `agent_handshakes`: agent connections in their handshake now, read from the listener.
#[derive(Debug)]
struct Handshakes(Arc<ListenerStats>);

impl Collector for Handshakes {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        gauge_of(self.0.handshaking()).encode(encoder.encode_descriptor(
            "agent_handshakes",
            "Agent connections in their TLS handshake or HELLO now (capped by max_handshakes)",
            None,
            MetricType::Gauge,
        )?)
    }
}

/// `grpc_message_bytes_held`: bytes of client messages the gRPC frontend holds now, out of
/// its budget (resting value 0).
#[derive(Debug)]
struct GrpcBudget(Arc<std::sync::OnceLock<(Arc<tokio::sync::Semaphore>, usize)>>);

impl Collector for GrpcBudget {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some((budget, size)) = self.0.get() else {
            return Ok(());
        };
        let held = size.saturating_sub(budget.available_permits());
        gauge_of(held as u64).encode(encoder.encode_descriptor(
            "grpc_message_bytes_held",
            "Bytes of client messages the gRPC frontend holds now, out of --grpc-buffer-budget",
            None,
            MetricType::Gauge,
        )?)
    }
}

/// `agents_refused_total{reason}`: agent connections refused, by kind (a fixed set).
#[derive(Debug)]
struct Refused(Arc<ListenerStats>);

impl Collector for Refused {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut m = encoder.encode_descriptor(
            "agents_refused",
            "Agent connections refused, by reason (tls, timeout, handshake, unauthorized, certificate)",
            None,
            MetricType::Counter,
        )?;
        for (kind, n) in self.0.refused() {
            if n > 0 {
                let labels = [("reason", kind.name())];
                ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids_with_quotes_or_backslashes_cannot_break_the_exposition() {
        let mut r = Registry::with_prefix("tether");
        r.register_collector(Box::new(PerAgent(vec![(r#"a"b\c"#.to_owned(), 1, 2)])));
        let text = tether_ops::metrics::render(&[&r]);
        assert!(
            text.contains(r#"tether_tunnels{agent_id="a\"b\\c"} 1"#),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
