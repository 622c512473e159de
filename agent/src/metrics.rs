//! The agent's `/healthz`, `/readyz` and `/metrics` (its health server; Konnectivity's
//! `--health-server-port`). Names and their Konnectivity counterparts: docs/OPERATIONS.md,
//! "Read the metrics".

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tether::Gone;
use tether::pump::Socket;
use tether::stats::AgentStats;
use tether_ops::metrics::{
    DIAL_BUCKETS, GaugeGuard, OPENMETRICS, ProcessCollector, TunnelCollector, gauge_of,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

type Labels = Vec<(String, String)>;

/// The agent's metrics.
pub struct AgentMetrics {
    registry: Registry,
    pub(crate) dial_seconds: Histogram,
    dials: Family<Labels, Counter>,
    /// Konnectivity's `endpoint_dial_failure_total{reason}`: `timeout` or `unknown`.
    knp_dial_failures: Family<Labels, Counter>,
    pub(crate) open_endpoints: Gauge,
    /// What the agent's tunnels and connection loops count (the library's counters).
    pub stats: Arc<AgentStats>,
    /// The agent's tunnels, once it runs: the streams open on them are counted at scrape time.
    tunnels: Arc<std::sync::OnceLock<tether::agent::TunnelSet>>,
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
            dial_seconds: Histogram::new(DIAL_BUCKETS),
            dials: Family::default(),
            knp_dial_failures: Family::default(),
            open_endpoints: Gauge::default(),
            stats: Arc::new(AgentStats::default()),
            tunnels: Arc::default(),
        };
        let r = root.sub_registry_with_prefix("tether_agent");
        r.register_collector(Box::new(Loops(m.stats.clone(), m.tunnels.clone())));
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
            "endpoint_connections",
            "Connections to destinations open now",
            m.open_endpoints.clone(),
        );
        r.register_collector(Box::new(TunnelCollector(m.stats.tunnel.clone())));
        // Konnectivity's names for the same things (pkg/agent/metrics), for its dashboards.
        let k = root.sub_registry_with_prefix("konnectivity_network_proxy_agent");
        k.register_collector(Box::new(KnpLoops(m.stats.clone())));
        k.register_with_unit(
            "dial_duration",
            "Time to connect to a destination (successful dials)",
            prometheus_client::registry::Unit::Seconds,
            m.dial_seconds.clone(),
        );
        k.register(
            "endpoint_dial_failure",
            "Failed dials of destinations, by reason (timeout, unknown)",
            m.knp_dial_failures.clone(),
        );
        k.register(
            "open_endpoint_connections",
            "Connections to destinations open now",
            m.open_endpoints.clone(),
        );
        AgentMetrics {
            registry: root,
            ..m
        }
    }

    /// Counts the reloads of `materials` under `tether_agent_reloads_total`.
    pub fn watch_reloads(&mut self, materials: Vec<Arc<dyn tether::reload::ReloadStats>>) {
        self.registry
            .sub_registry_with_prefix("tether_agent")
            .register_collector(Box::new(tether_ops::metrics::ReloadCollector(materials)));
    }

    /// Counts a dial by its result: `ok` or an error code's name (codes this agent chose).
    pub(crate) fn dial(&self, result: &str) {
        self.dials
            .get_or_create(&vec![("result".to_owned(), result.to_owned())])
            .inc();
        let reason = match result {
            "ok" => return,
            "DIAL_TIMEOUT" => "timeout",
            _ => "unknown",
        };
        self.knp_dial_failures
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }

    /// Counts the streams open on `tunnels` at scrape time (`tether_agent_open_streams`).
    pub(crate) fn watch_tunnels(&self, tunnels: tether::agent::TunnelSet) {
        let _ = self.tunnels.set(tunnels);
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        tether_ops::metrics::render(&[&self.registry])
    }
}

/// The connection loops' counters ([`AgentStats`]) and the streams open on the agent's
/// tunnels, read at scrape time.
#[derive(Debug)]
struct Loops(
    Arc<AgentStats>,
    Arc<std::sync::OnceLock<tether::agent::TunnelSet>>,
);

impl Collector for Loops {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let streams = self.1.get().map_or(0, |t| {
            t.all()
                .iter()
                .map(tether::Tunnel::stream_count)
                .sum::<usize>()
        });
        for (name, help, v) in [
            ("tunnels", "Tunnels open to servers", s.tunnels()),
            (
                "open_streams",
                "Streams open on the agent's tunnels now, pending dials included",
                streams as u64,
            ),
            (
                "known_server_count",
                "Servers this agent keeps tunnels to (announced, or counted from leases)",
                s.server_count(),
            ),
        ] {
            gauge_of(v).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        {
            let mut m = encoder.encode_descriptor(
                "connect_failures",
                "Tunnels to servers that failed to come up, by stage (tcp, tls, timeout, unauthorized, handshake, token)",
                None,
                MetricType::Counter,
            )?;
            for (stage, n) in s.connect_failures() {
                if n > 0 {
                    let labels = [("reason", stage.name())];
                    ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        for (name, help, v) in [
            (
                "syncs",
                "Turns of the loops that keep a tunnel to every server",
                s.syncs(),
            ),
            (
                "duplicate_tunnels",
                "Tunnels closed at once because they reached a server the agent already holds",
                s.duplicates(),
            ),
        ] {
            ConstCounter::new(v).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        Ok(())
    }
}

/// Konnectivity's `open_server_connections` and `known_server_count`, from the loops'
/// counters.
#[derive(Debug)]
struct KnpLoops(Arc<AgentStats>);

impl Collector for KnpLoops {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        for (name, help, v) in [
            (
                "open_server_connections",
                "Tunnels open to servers (tether_agent_tunnels)",
                self.0.tunnels(),
            ),
            (
                "known_server_count",
                "Servers this agent keeps tunnels to (tether_agent_known_server_count)",
                self.0.server_count(),
            ),
        ] {
            gauge_of(v).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        Ok(())
    }
}

/// A connection to a destination, counted in `tether_agent_endpoint_connections` while open.
#[derive(Debug)]
pub struct Endpoint {
    pub(crate) socket: TcpStream,
    pub(crate) _open: GaugeGuard,
}

impl Socket for Endpoint {
    fn abort_on_close(&self) {
        self.socket.abort_on_close();
    }

    fn poll_peer(&self, cx: &mut Context<'_>) -> Poll<Option<Gone>> {
        self.socket.poll_peer(cx)
    }
}

impl AsyncRead for Endpoint {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().socket).poll_read(cx, buf)
    }
}

impl AsyncWrite for Endpoint {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().socket).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().socket).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.socket.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().socket).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().socket).poll_shutdown(cx)
    }
}

/// Serves `/healthz`, `/readyz` (ready while a tunnel is open) and `/metrics` on `addr`.
pub(crate) async fn serve_health(
    agent: &tether::agent::Agent,
    addr: std::net::SocketAddr,
    metrics: Arc<AgentMetrics>,
) -> io::Result<tokio::task::JoinHandle<()>> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    let tunnels = agent.tunnel_set();
    let answer = move |path: &str| -> tether_ops::metrics::Answer {
        let open = tunnels.usable();
        match path {
            "/healthz" => (200, "OK", "text/plain", "ok\n".into()),
            "/readyz" | "/ready" if open > 0 => (200, "OK", "text/plain", "ready\n".into()),
            "/readyz" | "/ready" => (
                503,
                "Service Unavailable",
                "text/plain",
                "no tunnel to a server\n".into(),
            ),
            "/metrics" => (200, "OK", OPENMETRICS, metrics.render()),
            _ => (404, "Not Found", "text/plain", "not found\n".into()),
        }
    };
    Ok(tokio::spawn(tether_ops::metrics::serve(
        l,
        Arc::new(answer),
    )))
}
