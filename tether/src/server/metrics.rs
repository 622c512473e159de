//! `/healthz`, `/readyz` and `/metrics` (prometheus-client).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

use super::{ServerCore, respond};

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    agents: Gauge,
    refused: Counter,
    handshakes: Gauge,
    dials: Family<Vec<(String, String)>, Counter>,
    connects: Family<Vec<(String, String)>, Counter>,
    failed: Family<Vec<(String, String)>, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tether");
        let agents = Gauge::default();
        let refused = Counter::default();
        let handshakes = Gauge::default();
        registry.register(
            "agent_handshakes",
            "Agent connections in their TLS handshake or HELLO now (capped by max_handshakes)",
            handshakes.clone(),
        );
        let dials = Family::default();
        let connects = Family::default();
        let failed = Family::default();
        registry.register("agents", "Agent tunnels connected", agents.clone());
        registry.register(
            "agents_refused",
            "Agent connections refused (TLS, auth, handshake)",
            refused.clone(),
        );
        registry.register("dials", "Dials through tunnels, by result", dials.clone());
        registry.register(
            "connect_requests",
            "HTTP CONNECT requests, by status",
            connects.clone(),
        );
        registry.register(
            "connect_streams_failed",
            "CONNECT streams that ended with an error after the 200, by frontend",
            failed.clone(),
        );
        Metrics {
            handshakes,
            failed,
            registry,
            agents,
            refused,
            dials,
            connects,
        }
    }

    pub(crate) fn agents(&self, n: usize) {
        self.agents.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// One more (`true`) or one fewer agent connection in its handshake.
    pub(crate) fn handshaking(&self, more: bool) {
        if more {
            self.handshakes.inc();
        } else {
            self.handshakes.dec();
        }
    }

    pub(crate) fn agent_refused(&self) {
        self.refused.inc();
    }

    /// Counts a dial by its result: `ok`, `no_agent`, `timeout`, `unavailable`, an error
    /// code's name, or `other` for a code this server does not know, so an agent that picks
    /// codes at will cannot grow the label set (docs/SECURITY.md).
    pub(crate) fn dial(&self, result: &str) {
        self.dials
            .get_or_create(&vec![("result".to_owned(), result.to_owned())])
            .inc();
    }

    pub(crate) fn stream_failed(&self, frontend: super::connect::Frontend) {
        self.failed
            .get_or_create(&vec![("frontend".to_owned(), frontend.name().to_owned())])
            .inc();
    }

    pub(crate) fn connect(&self, status: u16) {
        self.connects
            .get_or_create(&vec![("status".to_owned(), status.to_string())])
            .inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

pub(crate) async fn serve_health(core: Arc<ServerCore>, l: TcpListener) {
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let core = core.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await
            else {
                return;
            };
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            let path = match req.parse(&buf[..n]) {
                Ok(_) => req.path.unwrap_or("/").to_owned(),
                Err(_) => String::new(),
            };
            match path.as_str() {
                "/healthz" => respond(&mut s, 200, "OK", "text/plain", "ok\n").await,
                "/readyz" if !core.registry.is_empty() => {
                    respond(&mut s, 200, "OK", "text/plain", "ready\n").await;
                }
                "/readyz" => {
                    respond(
                        &mut s,
                        503,
                        "Service Unavailable",
                        "text/plain",
                        "no agent connected\n",
                    )
                    .await;
                }
                "/metrics" => {
                    let body = core.metrics.render();
                    respond(
                        &mut s,
                        200,
                        "OK",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        &body,
                    )
                    .await;
                }
                _ => respond(&mut s, 404, "Not Found", "text/plain", "not found\n").await,
            }
        });
    }
}
