//! The path both frontends share, between their own request parsing and their own relaying:
//! [`open`] dials through the routing and the registry, [`Relay::done`] logs and counts how the
//! relaying ended, and [`span`] names the client in every line logged about it.

use tether::{DialError, TetherStream};

use crate::core::ServerCore;
use crate::http::{HttpError, err};
use crate::metrics::Frontend;

/// The path every frontend shares, between its own request parsing and its own relaying:
/// [`open`] dials through the routing and the registry, counts the answer (by the status a
/// CONNECT client would see, so both frontends fill the same series) and names the stream in
/// the client's span; [`Relay::done`] logs and counts how the relaying ended.
pub(crate) struct Opened {
    stream: TetherStream,
    started: std::time::Instant,
}

/// Dials `host:port` for a frontend client. `Err` is the answer the client gets, already
/// logged and counted.
pub(crate) async fn open(core: &ServerCore, host: &str, port: u16) -> Result<Opened, HttpError> {
    let started = std::time::Instant::now();
    let (stream, agent_id) = match core.dial_via(host, port).await {
        Ok(s) => s,
        Err(f) => {
            let e = failure_to_http(&f);
            tracing::info!(%host, port, status = e.status, reason = %e.reason, "dial failed");
            core.metrics.connect(e.status);
            return Err(e);
        }
    };
    core.metrics.connect(200);
    let span = tracing::Span::current();
    span.record("agent_id", tracing::field::display(&agent_id));
    span.record("stream", tracing::field::display(stream.id()));
    span.record(
        "dest",
        tracing::field::display(format_args!("{host}:{port}")),
    );
    tracing::info!(
        dial_ms = started.elapsed().as_millis(),
        "stream established"
    );
    Ok(Opened { stream, started })
}

impl Opened {
    /// The client was told the stream is open: relaying starts (the stream counts as open on
    /// `frontend` until [`Relay::done`]).
    pub(crate) fn relay(self, core: &ServerCore, frontend: Frontend) -> Relay<'_> {
        Relay {
            open: core.metrics.stream_open(frontend),
            core,
            frontend,
            stream: Some(self.stream),
            started: self.started,
        }
    }
}

/// A stream being relayed for a frontend client.
pub(crate) struct Relay<'a> {
    core: &'a ServerCore,
    frontend: Frontend,
    stream: Option<TetherStream>,
    started: std::time::Instant,
    open: [tether_ops::metrics::GaugeGuard; 2],
}

impl Relay<'_> {
    /// The stream, for the frontend's relaying (once).
    pub(crate) fn stream(&mut self) -> TetherStream {
        self.stream.take().expect("the stream is taken once")
    }

    /// Logs and counts how the relaying ended: bytes each way, or the error. A failure is
    /// never silent, whatever the client could be told.
    pub(crate) fn done(self, result: std::io::Result<tether::pump::Moved>) {
        let secs = self.started.elapsed().as_secs_f64();
        drop(self.open);
        match result {
            Ok(moved) => {
                tracing::info!(
                    up = moved.up,
                    down = moved.down,
                    seconds = secs,
                    "stream done"
                );
            }
            Err(e) => {
                // On a Unix socket the client may see a plain end of stream (docs/SECURITY.md):
                // the failure is always logged and counted.
                self.core.metrics.stream_failed(self.frontend);
                tracing::warn!(seconds = secs, error = %e, "stream failed");
            }
        }
    }
}

impl Relay<'_> {
    /// Logs a relaying its client cancelled (a gRPC call reset with CANCEL: how a Go client
    /// ends a call it no longer needs). Not a failure: not counted as one.
    pub(crate) fn cancelled(self, why: &std::io::Error) {
        let secs = self.started.elapsed().as_secs_f64();
        drop(self.open);
        tracing::info!(seconds = secs, reason = %why, "stream cancelled by its client");
    }
}

/// The span of one CONNECT client: its peer and frontend, then the stream's agent, id and
/// destination once dialled. Every line about the client is logged inside it.
pub(crate) fn span(peer: &str, frontend: Frontend) -> tracing::Span {
    tracing::info_span!(
        "connect",
        %peer,
        frontend = frontend.name(),
        agent_id = tracing::field::Empty,
        stream = tracing::field::Empty,
        dest = tracing::field::Empty,
    )
}

/// The status for a failed dial (docs/CONNECT.md): no agent 503, forbidden 403, refused or
/// unreachable 502, timeout 504.
pub fn failure_to_http(f: &DialError) -> HttpError {
    use tether_proto::ErrorCode as C;
    match f {
        DialError::NoAgent => err(503, "no agent connected for this destination"),
        DialError::Timeout => err(504, "dial timed out"),
        DialError::Unavailable(reason) => err(503, format!("no usable tunnel: {reason}")),
        DialError::Failed(e) => {
            let status = match e.code {
                C::DIAL_FORBIDDEN => 403,
                C::DIAL_TIMEOUT => 504,
                C::REFUSED_STREAM => 503,
                _ => 502,
            };
            err(status, format!("{}: {}", e.code, e.reason))
        }
    }
}
