//! Konnectivity's own agents (`proxy-agent`, its `AgentService`) on the agent port, beside
//! tether's, so a cluster moves server first (docs/OPERATIONS.md, "Order of the switch").
//!
//! A connection whose TLS handshake offers ALPN `h2` is handed over by the listener
//! (`tether::listen::Handover`). Its one gRPC call, `/AgentService/Connect`, is translated
//! to a tether tunnel over an in-memory transport: the far end of that transport is a tether
//! agent session speaking for the Konnectivity agent ([`bridge`]), the near end goes through
//! the listener's own way in (`TunnelPath::serve`), so the HELLO built from the call's
//! metadata is authenticated, checked against the identity rules and registered exactly as a
//! tether agent's. Routing, draining, the frontends and the metrics see one kind of tunnel.
//!
//! What the server bounds for such an agent (docs/SECURITY.md, "Konnectivity agents"): the
//! handshake (h2 preface and the call's headers) under the listener's handshake slot and
//! deadline; the largest message; the node-to-client bytes waiting for their streams
//! ([`KonnectivityAgents::buffer`], beyond which the agent's whole call waits: these agents
//! have no per-stream flow control); the client-to-node messages waiting for the agent's
//! window; dials answered late. A silent agent is found by HTTP/2 PINGs.

mod bridge;
mod relay;

use std::time::Duration;

use bytes::Bytes;
use tether::listen::{Admission, Handover};
use tether_proto::frame::{Identifier, Token};
use tether_proto::session::AgentIdentity;

use crate::grpc::{code, trailers_only};
use crate::metrics::Metrics;

/// The method Konnectivity's agents call (the .proto has no package).
pub(crate) const CONNECT_PATH: &str = "/AgentService/Connect";

/// What the server allows Konnectivity's agents (`ServerConfig::konnectivity_agents`).
#[derive(Debug, Clone)]
pub struct KonnectivityAgents {
    /// Node-to-client bytes an agent's streams may hold before the streams take them; beyond
    /// it the server stops reading the agent (HTTP/2 flow control then stops the agent, all
    /// its streams at once).
    pub buffer: usize,
    /// The largest message an agent may send (its DATA carry 4 KiB).
    pub max_message: usize,
    /// How often a silent agent is sent an HTTP/2 PING; one unanswered for twice as long
    /// ends its tunnel.
    pub keepalive: Duration,
    /// How long the buffer may stay full before the stream holding the most of it is reset
    /// (its client reads nothing, and every other stream of the agent waits on it).
    pub stall_limit: Duration,
}

impl Default for KonnectivityAgents {
    fn default() -> Self {
        KonnectivityAgents {
            buffer: 4 * 1024 * 1024,
            max_message: 1024 * 1024,
            keepalive: Duration::from_secs(10),
            stall_limit: tether::pump::LINGER,
        }
    }
}

/// The HTTP/2 window the server grants an agent's call and connection (agent to server):
/// what it may have in flight beyond [`KonnectivityAgents::buffer`].
const WINDOW: u32 = 1024 * 1024;
/// The largest header block an agent may send (its metadata and a token).
const MAX_HEADERS: u32 = 16 * 1024;

/// Serves a connection that offered `h2`: Konnectivity's agent, until it or its tunnel ends.
/// `admission` decides and serves the tunnel it becomes, as for a tether agent's.
pub(crate) async fn serve<A: Admission>(
    h: Handover,
    admission: &A,
    limits: &KonnectivityAgents,
    metrics: &Metrics,
) {
    let Handover {
        tls,
        peer,
        deadline,
        path,
        ..
    } = h;
    let handshake = async {
        let mut conn = h2::server::Builder::new()
            .initial_window_size(WINDOW)
            .initial_connection_window_size(WINDOW)
            .max_concurrent_streams(1)
            .max_header_list_size(MAX_HEADERS)
            .handshake::<_, Bytes>(tls)
            .await?;
        let first = conn.accept().await;
        Ok::<_, h2::Error>((conn, first))
    };
    let (mut conn, first) = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok((conn, Some(Ok(first))))) => (conn, first),
        Ok(Ok((_, None))) => return tracing::info!("Konnectivity agent left before its call"),
        Ok(Ok((_, Some(Err(e))))) | Ok(Err(e)) => {
            return tracing::warn!(error = %e, "Konnectivity agent's HTTP/2 handshake failed");
        }
        Err(_) => {
            return tracing::warn!(
                "Konnectivity agent's call not made within the handshake deadline"
            );
        }
    };
    let (req, mut respond) = first;
    let identity = match call_identity(&req) {
        Ok(id) => id,
        Err((status, reason)) => {
            tracing::warn!(%reason, "Konnectivity agent's call refused");
            trailers_only(&mut respond, status, &reason);
            conn.graceful_shutdown();
            let closing = std::future::poll_fn(|cx| conn.poll_closed(cx));
            let _ = tokio::time::timeout(CLOSING, closing).await;
            return;
        }
    };
    tracing::Span::current().record(
        "agent_id",
        tracing::field::display(identity.agent_id.escape_debug()),
    );
    let body = req.into_body();
    let (near, far) = tokio::io::duplex(bridge::DUPLEX);
    let bridged = bridge::run(bridge::Call {
        identity,
        far,
        body,
        respond,
        limits,
        deadline,
        metrics,
        dial: |ctx, incoming| Box::pin(relay::dial(ctx, incoming)),
    });
    // The tunnel's service and the bridge end together: the bridge closes its end when the
    // call goes, and ends when the tunnel does (a refusal included, whose reason it sends).
    let both = async {
        tokio::join!(path.serve(near, peer, admission), bridged);
    };
    tokio::select! {
        () = both => {}
        () = keep_alive(&mut conn, limits.keepalive) => {}
    }
    // What was sent (trailers, a refusal) reaches the agent before the connection closes.
    conn.graceful_shutdown();
    let closing = std::future::poll_fn(|cx| conn.poll_closed(cx));
    let _ = tokio::time::timeout(CLOSING, closing).await;
}

/// How long a finished call's connection may take to close.
const CLOSING: Duration = Duration::from_secs(2);

/// Drives the agent's HTTP/2 connection (refusing any second call) and pings it while it is
/// quiet; returns when it is gone or does not answer a ping within twice `every`.
async fn keep_alive<T>(conn: &mut h2::server::Connection<T, Bytes>, every: Duration)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut pp = conn.ping_pong();
    let drive = async {
        while let Some(r) = conn.accept().await {
            match r {
                Ok((_, mut respond)) => respond.send_reset(h2::Reason::REFUSED_STREAM),
                Err(e) => {
                    return tracing::info!(error = %e, "Konnectivity agent's connection ended");
                }
            }
        }
    };
    let ping = async {
        let Some(pp) = pp.as_mut() else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(every).await;
            match tokio::time::timeout(every * 2, pp.ping(h2::Ping::opaque())).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return tracing::info!(error = %e, "Konnectivity agent's ping failed"),
                Err(_) => {
                    return tracing::warn!(after = ?every * 2, "Konnectivity agent did not answer a ping; ending its tunnel");
                }
            }
        }
    };
    tokio::select! {
        () = drive => {}
        () = ping => {}
    }
}

/// Who the call says the agent is: metadata `agentid` (exactly one), `agentidentifiers`
/// (at most one, URL query form) and `authorization: Bearer <token>` (at most one), as a
/// tether agent's HELLO would carry them. What they may claim is decided by the admission.
fn call_identity(req: &http::Request<h2::RecvStream>) -> Result<AgentIdentity, (u32, String)> {
    if req.uri().path() != CONNECT_PATH {
        return Err((
            code::UNIMPLEMENTED,
            format!(
                "unknown method {} (this port serves {CONNECT_PATH})",
                req.uri().path()
            ),
        ));
    }
    let invalid = |m: String| (code::INVALID_ARGUMENT, m);
    let one = |name: &str, required: bool| -> Result<Option<String>, (u32, String)> {
        let mut values = req.headers().get_all(name).iter();
        match (values.next(), values.next()) {
            (None, _) if required => Err(invalid(format!(
                "metadata {name}: expected one value, got none"
            ))),
            (None, _) => Ok(None),
            (Some(_), Some(_)) => Err(invalid(format!(
                "metadata {name}: expected one value, got several"
            ))),
            (Some(v), None) => v
                .to_str()
                .map(|s| Some(s.to_owned()))
                .map_err(|_| invalid(format!("metadata {name} is not text"))),
        }
    };
    let agent_id = one("agentid", true)?.unwrap_or_default();
    let identifiers = parse_identifiers(&one("agentidentifiers", false)?.unwrap_or_default());
    let token = match one("authorization", false)? {
        None => None,
        Some(v) => {
            let t = v.strip_prefix("Bearer ").ok_or_else(|| {
                (
                    code::UNAUTHENTICATED,
                    "authorization metadata is not \"Bearer <token>\"".to_owned(),
                )
            })?;
            Some(Token::new(t.trim()).map_err(|e| (code::UNAUTHENTICATED, format!("token: {e}")))?)
        }
    };
    Ok(AgentIdentity {
        agent_id,
        identifiers,
        token,
    })
}

/// Konnectivity's `agentidentifiers` as its server reads them (`url.ParseQuery`): keys
/// `host`, `ipv4`, `ipv6`, `cidr` (each may repeat) and `default-route` (Go's `ParseBool` of
/// its first value). Unknown keys are skipped, as there; so is a value tether cannot read (an
/// address that is not one), with a warning, where Konnectivity keeps a string that never
/// matches: either way it routes nothing.
fn parse_identifiers(query: &str) -> Vec<Identifier> {
    let mut out = Vec::new();
    let mut default_route_seen = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (url_unescape(k), url_unescape(v));
        let id = match k.as_str() {
            "host" => Some(Identifier::Host(v.clone())),
            "ipv4" => v.parse().ok().map(Identifier::Ipv4),
            "ipv6" => v.parse().ok().map(Identifier::Ipv6),
            "cidr" => v
                .split_once('/')
                .and_then(|(a, p)| Some(Identifier::Cidr(a.parse().ok()?, p.parse().ok()?))),
            "default-route" => {
                let first = !std::mem::replace(&mut default_route_seen, true);
                let yes = matches!(v.as_str(), "1" | "t" | "T" | "TRUE" | "true" | "True");
                if first && yes {
                    out.push(Identifier::DefaultRoute);
                }
                continue;
            }
            _ => continue,
        };
        match id.filter(|id| id.validate().is_ok()) {
            Some(id) if out.len() < tether_proto::frame::MAX_IDENTIFIERS => out.push(id),
            Some(_) => {
                tracing::warn!(identifier = %pair, "more identifiers than a tunnel carries; skipped")
            }
            None => tracing::warn!(identifier = %pair, "agent identifier not understood; skipped"),
        }
    }
    out
}

/// `application/x-www-form-urlencoded` unescaping: `+` is a space, `%XX` a byte; a bad
/// escape is kept as it is.
fn url_unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| char::from(c).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_read_as_konnectivitys_server_reads_them() {
        let ids = parse_identifiers(
            "host=node-1&ipv4=10.0.0.7&ipv6=fd00%3A%3A7&cidr=10.1.0.0%2F16&default-route=true&uid=x&ipv4=bad",
        );
        assert_eq!(
            ids,
            vec![
                Identifier::Host("node-1".into()),
                Identifier::Ipv4("10.0.0.7".parse().unwrap()),
                Identifier::Ipv6("fd00::7".parse().unwrap()),
                Identifier::Cidr("10.1.0.0".parse().unwrap(), 16),
                Identifier::DefaultRoute,
            ]
        );
        assert!(parse_identifiers("default-route=false&default-route=true").is_empty());
        assert_eq!(
            parse_identifiers("host=node%2D1&host=x%2"),
            vec![
                Identifier::Host("node-1".into()),
                Identifier::Host("x%2".into())
            ]
        );
        // `+` is a space, and a space is no host name.
        assert!(parse_identifiers("host=a+b").is_empty());
    }
}
