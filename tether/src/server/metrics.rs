//! `/healthz`, `/readyz` and `/metrics` (prometheus-client). Names and their Konnectivity
//! counterparts: docs/OPERATIONS.md, "Read the metrics".

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::ServerCore;
use crate::metrics::{OPENMETRICS, ProcessCollector, TunnelStats};

type Labels = Vec<(String, String)>;

/// Dial latency buckets, in seconds: 0.5 ms to 25 s.
pub const DIAL_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 25.0,
];

/// Why an agent connection was refused (a fixed set of label values).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refusal {
    /// The TLS handshake failed (bad or missing client certificate, wrong CA, not TLS).
    Tls,
    /// TLS and HELLO did not finish within the handshake deadline.
    Timeout,
    /// The session's handshake failed (bad HELLO, version mismatch, the agent left).
    Handshake,
    /// The credential does not allow the HELLO (token, id, identifiers).
    Unauthorized,
    /// The client certificate does not parse.
    Certificate,
}

impl Refusal {
    fn name(self) -> &'static str {
        match self {
            Refusal::Tls => "tls",
            Refusal::Timeout => "timeout",
            Refusal::Handshake => "handshake",
            Refusal::Unauthorized => "unauthorized",
            Refusal::Certificate => "certificate",
        }
    }
}

/// A gauge raised while the guard lives: lowered on every path out, cancellation included.
pub(crate) struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub(crate) fn up(g: &Gauge) -> GaugeGuard {
        g.inc();
        GaugeGuard(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    agents: Gauge,
    refused: Family<Labels, Counter>,
    handshakes: Gauge,
    dials: Family<Labels, Counter>,
    dial_seconds: Histogram,
    pending_dials: Gauge,
    connects: Family<Labels, Counter>,
    open_connects: Family<Labels, Gauge>,
    failed: Family<Labels, Counter>,
    /// Bytes and stream errors, counted by every tunnel of this server.
    pub(crate) stats: Arc<TunnelStats>,
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
        let stats = Arc::new(TunnelStats::default());
        let m = Metrics {
            registry: Registry::default(),
            agents: Gauge::default(),
            refused: Family::default(),
            handshakes: Gauge::default(),
            dials: Family::default(),
            dial_seconds: Histogram::new(DIAL_BUCKETS),
            pending_dials: Gauge::default(),
            connects: Family::default(),
            open_connects: Family::default(),
            failed: Family::default(),
            stats,
        };
        let r = root.sub_registry_with_prefix("tether");
        r.register(
            "agent_handshakes",
            "Agent connections in their TLS handshake or HELLO now (capped by max_handshakes)",
            m.handshakes.clone(),
        );
        r.register("agents", "Agent tunnels connected", m.agents.clone());
        r.register(
            "agents_refused",
            "Agent connections refused, by reason (tls, timeout, handshake, unauthorized, certificate)",
            m.refused.clone(),
        );
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
            "connect_streams_failed",
            "CONNECT streams that ended with an error after the 200, by frontend",
            m.failed.clone(),
        );
        r.register_collector(Box::new(m.stats.clone()));
        Metrics {
            registry: root,
            ..m
        }
    }

    pub(crate) fn agents(&self, n: usize) {
        self.agents.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts the reloads of `materials` under `tether_reloads_total`.
    pub fn watch_reloads(&mut self, materials: Vec<Arc<dyn crate::reload::ReloadStats>>) {
        self.registry
            .sub_registry_with_prefix("tether")
            .register_collector(Box::new(crate::metrics::ReloadCollector(materials)));
    }

    /// One more (`true`) or one fewer agent connection in its handshake.
    pub(crate) fn handshaking(&self, more: bool) {
        if more {
            self.handshakes.inc();
        } else {
            self.handshakes.dec();
        }
    }

    pub(crate) fn agent_refused(&self, why: Refusal) {
        self.refused
            .get_or_create(&vec![("reason".to_owned(), why.name().to_owned())])
            .inc();
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
    }

    /// One more dial waiting for its agent, until the guard is dropped.
    pub(crate) fn pending_dial(&self) -> GaugeGuard {
        GaugeGuard::up(&self.pending_dials)
    }

    pub(crate) fn stream_failed(&self, frontend: super::connect::Frontend) {
        self.failed
            .get_or_create(&vec![("frontend".to_owned(), frontend.name().to_owned())])
            .inc();
    }

    /// One more CONNECT stream open on `frontend`, until the guard is dropped.
    pub(crate) fn stream_open(&self, frontend: super::connect::Frontend) -> GaugeGuard {
        let g = self
            .open_connects
            .get_or_create(&vec![("frontend".to_owned(), frontend.name().to_owned())])
            .clone();
        GaugeGuard::up(&g)
    }

    pub(crate) fn connect(&self, status: u16) {
        self.connects
            .get_or_create(&vec![("status".to_owned(), status.to_string())])
            .inc();
    }

    /// The text exposition, with the per-agent gauges of `core`'s registry as of now.
    pub fn render(&self, agents: &super::Registry) -> String {
        let mut now = Registry::with_prefix("tether");
        now.register_collector(Box::new(PerAgent(agents.per_agent())));
        crate::metrics::render(&[&self.registry, &now])
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

pub(crate) async fn serve_health(core: Arc<ServerCore>, l: TcpListener) {
    let answer = move |path: &str| -> crate::metrics::Answer {
        match path {
            "/healthz" => (200, "OK", "text/plain", "ok\n".into()),
            "/readyz" | "/ready" if !core.registry.is_empty() => {
                (200, "OK", "text/plain", "ready\n".into())
            }
            "/readyz" | "/ready" => (
                503,
                "Service Unavailable",
                "text/plain",
                "no agent connected\n".into(),
            ),
            "/metrics" => (200, "OK", OPENMETRICS, core.metrics.render(&core.registry)),
            _ => (404, "Not Found", "text/plain", "not found\n".into()),
        }
    };
    crate::metrics::serve(l, Arc::new(answer)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids_with_quotes_or_backslashes_cannot_break_the_exposition() {
        let mut r = Registry::with_prefix("tether");
        r.register_collector(Box::new(PerAgent(vec![(r#"a"b\c"#.to_owned(), 1, 2)])));
        let text = crate::metrics::render(&[&r]);
        assert!(
            text.contains(r#"tether_tunnels{agent_id="a\"b\\c"} 1"#),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
