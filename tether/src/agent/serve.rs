//! Serving a server's dials: the caller's [`Dialer`] connects (or refuses), the stream is
//! accepted once the destination is connected, and bytes flow both ways until both directions
//! end.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_proto::ErrorCode;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::Dialer;
use crate::pump::pump;
use crate::tunnel::Incoming;

/// Serves every dial arriving on one tunnel, each in a task of its own.
pub(super) async fn serve_dials<D: Dialer>(
    dialer: Arc<D>,
    mut rx: mpsc::UnboundedReceiver<Incoming>,
) {
    while let Some(incoming) = rx.recv().await {
        // One span per stream, inside its tunnel's.
        let d = incoming.dial();
        let span = tracing::info_span!("stream", stream = %incoming.stream_id(), host = %d.host, port = d.port);
        tokio::spawn(serve_dial(dialer.clone(), incoming).instrument(span));
    }
}

async fn serve_dial<D: Dialer>(dialer: Arc<D>, mut incoming: Incoming) {
    let started = Instant::now();
    // SPEC 5.5: the opener may give up while the connect is in flight (its own dial timeout,
    // a client gone); the connect is dropped at once, closing its socket. The dial's state is
    // gone before the stream's bytes flow: an idle stream's task holds only the pump's.
    let dialed = {
        let dial = incoming.dial().clone();
        tokio::select! {
            r = dialer.dial(&dial) => Some(r),
            () = incoming.cancelled() => None,
        }
    };
    let socket = match dialed {
        Some(Ok(s)) => s,
        Some(Err((code, reason))) => {
            tracing::info!(%code, %reason, "dial failed");
            incoming.reject(code, &reason);
            return;
        }
        None => {
            tracing::debug!("dial cancelled by the opener while connecting");
            return;
        }
    };
    let stream = match incoming.accept() {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "dial given up before it was accepted");
            return;
        }
    };
    tracing::info!(dial_ms = started.elapsed().as_millis(), "dial connected");
    let result = pump(stream, socket, bytes::Bytes::new()).await;
    let seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(moved) => tracing::info!(up = moved.up, down = moved.down, seconds, "stream done"),
        Err(e) => tracing::info!(seconds, error = %e, "stream ended with an error"),
    }
}

/// Connects to `host:port` over TCP within `timeout`, with no policy of its own (a
/// [`Dialer`] decides what may be dialled before calling it). Failures map to the RESET codes
/// of SPEC 8.1: refused `DIAL_REFUSED`, timed out `DIAL_TIMEOUT`, anything else (a name that
/// does not resolve, an unreachable network) `DIAL_UNREACHABLE`.
pub async fn connect_tcp(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, (ErrorCode, String)> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match tokio::time::timeout(timeout, TcpStream::connect((bare, port))).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            crate::pump::keep_alive(&s);
            Ok(s)
        }
        Ok(Err(e)) => Err((
            dial_code(&e),
            format!("dial tcp {host}:{port}: connect: {}", os_words(&e)),
        )),
        Err(_) => Err((
            ErrorCode::DIAL_TIMEOUT,
            format!("dial tcp {host}:{port}: i/o timeout"),
        )),
    }
}

/// The RESET code for a failed connect (SPEC 8.1).
pub fn dial_code(e: &io::Error) -> ErrorCode {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ErrorCode::DIAL_REFUSED,
        io::ErrorKind::TimedOut => ErrorCode::DIAL_TIMEOUT,
        _ => ErrorCode::DIAL_UNREACHABLE,
    }
}

/// An OS error in the words clients match on, as Go's `net` package writes them (and
/// Konnectivity's agent passes on): `connection refused`, not `Connection refused (os error
/// 111)`; a name that does not resolve is `no such host`.
pub fn os_words(e: &io::Error) -> String {
    let text = e.to_string();
    // getaddrinfo's EAI_NONAME and EAI_NODATA, in glibc's words.
    if text.contains("Name or service not known") || text.contains("No address associated") {
        return "no such host".into();
    }
    let text = match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => &text[..i],
        _ => text.as_str(),
    };
    let text = text
        .strip_prefix("failed to lookup address information: ")
        .unwrap_or(text);
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_read_as_gos_net_package_writes_them() {
        let refused = io::Error::from_raw_os_error(111);
        assert_eq!(os_words(&refused), "connection refused");
        let unreachable = io::Error::from_raw_os_error(113);
        assert_eq!(os_words(&unreachable), "no route to host");
        let lookup =
            io::Error::other("failed to lookup address information: Name or service not known");
        assert_eq!(os_words(&lookup), "no such host");
        let again = io::Error::other(
            "failed to lookup address information: Temporary failure in name resolution",
        );
        assert_eq!(os_words(&again), "temporary failure in name resolution");
    }
}
