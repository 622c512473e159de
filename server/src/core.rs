//! [`ServerCore`]: the state every listener and frontend shares (the registry of agents and
//! the metrics), and the one dial path through the routing strategies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tether::{DialError, TetherStream};

use crate::metrics::Metrics;
use crate::registry::{Registry, Strategy};

/// The state every listener shares.
pub struct ServerCore {
    /// Connected agents.
    pub registry: Registry,
    /// Counters and gauges for `/metrics`.
    pub metrics: Metrics,
    pub(crate) strategies: Vec<Strategy>,
    pub(crate) dial_timeout: Duration,
    pub(crate) header_timeout: Duration,
    /// How long a relayed stream whose client has finished sending may wait for credit
    /// without moving a byte (`tether::pump::LINGER`).
    pub(crate) linger: Duration,
}

impl ServerCore {
    /// `/metrics` as of now.
    pub fn render_metrics(&self) -> String {
        self.metrics.render(&self.registry, &self.strategies)
    }

    /// Opens a stream to `host:port` through an agent chosen by the routing strategies.
    pub async fn dial(&self, host: &str, port: u16) -> Result<TetherStream, DialError> {
        self.dial_via(host, port).await.map(|(s, _)| s)
    }

    /// [`ServerCore::dial`], with the id of the agent that serves the stream.
    pub async fn dial_via(
        &self,
        host: &str,
        port: u16,
    ) -> Result<(TetherStream, Arc<str>), DialError> {
        let Some((tunnel, agent_id)) = self.registry.route(host, &self.strategies) else {
            self.metrics.dial("no_agent", None);
            return Err(DialError::NoAgent);
        };
        let started = Instant::now();
        // Counted down however the dial ends, a caller giving up on it included.
        let pending = self.metrics.pending_dial();
        // Zero: no deadline of the server's (Konnectivity's meaning); the agent's own dial
        // timeout and the tunnel's keepalive still end the wait.
        let timeout = match self.dial_timeout {
            Duration::ZERO => Duration::MAX,
            t => t,
        };
        let result = tunnel.dial(host, port, timeout).await;
        drop(pending);
        let seconds = result.is_ok().then(|| started.elapsed().as_secs_f64());
        self.metrics.dial(
            match &result {
                Ok(_) => "ok",
                Err(DialError::NoAgent) => "no_agent",
                Err(DialError::Timeout) => "timeout",
                Err(DialError::Unavailable(_)) => "unavailable",
                Err(DialError::Failed(e)) => e.code.name().unwrap_or("other"),
            },
            seconds,
        );
        result.map(|s| (s, agent_id))
    }
}
