//! The HTTP CONNECT frontend kube-apiserver's EgressSelectorConfiguration speaks; docs/CONNECT.md is its contract.
//!
//! `CONNECT host:port HTTP/1.1`, target taken from the request-target authority (never the
//! Host header, which kube-apiserver sets to `127.0.0.1`). Success is exactly
//! `HTTP/1.1 200 Connection established\r\n\r\n`, then tunnel bytes. Every failure is a status
//! with a one-line reason.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tether::listen::AcceptPacer;
use tether::pump::{Socket, pump};
use tether::reload::Reloadable;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::core::ServerCore;
use crate::dial::{open, span};
use crate::http::{HttpError, answer, err, parse_authority};
use crate::metrics::Frontend;

/// The largest request head accepted.
pub const MAX_HEAD: usize = 16 * 1024;

/// A CONNECT target (host, port) and the length of the request head that named it.
pub type Head = ((String, u16), usize);

/// Parses a request head at the front of `buf`: `Ok(None)` if it is not complete yet,
/// otherwise the CONNECT target and the head's length. Pure, so it can be fuzzed.
///
/// Strict where httparse is lenient (RFC 9112 2.2 allows either): an empty line before the
/// request line, or a line ended by a bare LF, is a 400.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, HttpError> {
    if buf.first().is_some_and(|b| matches!(b, b'\r' | b'\n')) {
        return Err(err(400, "empty line before the request line"));
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            if len > MAX_HEAD {
                return Err(err(431, "request head over 16 KiB"));
            }
            if req.version != Some(1) {
                return Err(err(400, "only HTTP/1.1 CONNECT is served"));
            }
            let head = &buf[..len];
            if head
                .iter()
                .enumerate()
                .any(|(i, b)| *b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
            {
                return Err(err(400, "a line of the request head ends in a bare LF"));
            }
            let method = req.method.unwrap_or_default();
            if method != "CONNECT" {
                return Err(err(405, format!("method {method} is not CONNECT")));
            }
            // The target is the request-target authority, never the Host header.
            Ok(Some((parse_authority(req.path.unwrap_or_default())?, len)))
        }
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            Err(err(431, "request head over 16 KiB"))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(err(400, format!("malformed request: {e}"))),
    }
}

#[cfg(feature = "test-util")]
/// The fuzz target `connect_head`: no input panics the parser; a complete head is parsed
/// the same from exactly its own bytes; a target has a valid host and a non-zero port.
pub fn fuzz_head(data: &[u8]) {
    match parse_head(data) {
        Ok(Some(((host, port), len))) => {
            assert!(len <= data.len());
            assert!(port != 0 && !host.is_empty() && host.len() <= 255);
            assert!(host.bytes().all(|b| b.is_ascii_graphic()));
            assert!(
                !data[..len]
                    .windows(2)
                    .any(|w| w[1] == b'\n' && w[0] != b'\r')
            );
            assert!(len <= MAX_HEAD);
            let again = parse_head(&data[..len]).expect("the head alone parses");
            assert_eq!(again, Some(((host, port), len)));
        }
        Ok(None) => assert!(data.len() < MAX_HEAD),
        Err(e) => assert!((400..500).contains(&e.status), "{e:?}"),
    }
}

/// Reads and parses the request head by `deadline`; returns the target and any bytes read
/// past the head.
pub async fn read_request<S: AsyncRead + Unpin>(
    conn: &mut S,
    deadline: tokio::time::Instant,
) -> Result<((String, u16), Bytes), HttpError> {
    let mut buf = BytesMut::with_capacity(1024);
    let read = async {
        loop {
            if let Some((target, len)) = parse_head(&buf)? {
                // Bytes after the head (a client that did not wait for the 200) go first into
                // the tunnel; none is an empty `Bytes` that keeps no buffer alive.
                let first = if buf.len() > len {
                    buf.split_off(len).freeze()
                } else {
                    Bytes::new()
                };
                return Ok((target, first));
            }
            buf.reserve(1024);
            match conn.read_buf(&mut buf).await {
                Ok(0) => return Err(err(400, "connection closed before the request head ended")),
                Ok(_) => {}
                Err(e) => return Err(err(400, format!("reading the request: {e}"))),
            }
        }
    };
    tokio::time::timeout_at(deadline, read)
        .await
        .unwrap_or_else(|_| Err(err(408, "request head not received in time")))
}

/// Serves one CONNECT client connection to its end. `deadline` is the one budget for the
/// connection's TLS handshake (if any) and its request head together; `slot`, the client's
/// place among the connections not through their request head yet, is given back with the
/// head.
pub async fn serve<S>(
    core: &ServerCore,
    mut conn: S,
    frontend: Frontend,
    deadline: tokio::time::Instant,
    slot: Option<HeadSlot>,
) where
    S: Socket + Send,
{
    let _connection = core.metrics.http_connection();
    let request = read_request(&mut conn, deadline).await;
    drop(slot);
    let ((host, port), first) = match request {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(status = e.status, reason = %e.reason, "CONNECT refused");
            core.metrics.connect(e.status);
            answer(&mut conn, &e).await;
            return;
        }
    };
    let opened = match open(core, &host, port).await {
        Ok(o) => o,
        Err(e) => {
            answer(&mut conn, &e).await;
            return;
        }
    };
    if conn
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    let mut relay = opened.relay(core, frontend);
    let result = pump(relay.stream(), conn, first).await;
    relay.done(result);
}

/// What a CONNECT listener on TCP bounds before a client is through its request head.
#[derive(Clone, Copy, Debug)]
pub struct ClientAdmission {
    /// Connections in their TLS handshake or request head at once; the rest wait in the
    /// listen backlog.
    pub max_pending: usize,
    /// TLS connections accepted per second at most after `burst` (0: no pacing). Plain TCP is
    /// not paced: its cost before the head is a buffer, which `max_pending` bounds.
    pub tls_rate: f64,
    /// TLS connections accepted at once before `tls_rate` applies.
    pub tls_burst: u32,
}

/// A client's place among the connections not through their request head yet.
pub struct HeadSlot {
    _permit: OwnedSemaphorePermit,
    _gauge: tether_ops::metrics::GaugeGuard,
}

/// Serves CONNECT on TCP (with TLS when `tls` is given) until aborted.
pub(crate) async fn accept_tcp(
    core: Arc<ServerCore>,
    l: TcpListener,
    tls: Option<Reloadable<rustls::ServerConfig>>,
    admission: ClientAdmission,
) {
    // Unauthenticated connections cost a task, a buffer and (TLS) a handshake each: at most
    // `max_pending` at once (docs/SECURITY.md, "Bounds").
    let pending = Arc::new(Semaphore::new(admission.max_pending.max(1)));
    let mut pacer = AcceptPacer::new(
        if tls.is_some() {
            admission.tls_rate
        } else {
            0.0
        },
        admission.tls_burst,
    );
    let frontend = if tls.is_some() {
        Frontend::Tls
    } else {
        Frontend::Tcp
    };
    loop {
        let Ok(slot) = pending.clone().acquire_owned().await else {
            return;
        };
        pacer.pace().await;
        let Ok((tcp, peer)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tether::pump::keep_alive(&tcp);
        let slot = HeadSlot {
            _permit: slot,
            _gauge: core.metrics.client_head(frontend),
        };
        // One budget for the TLS handshake and the request head together.
        let deadline = tokio::time::Instant::now() + core.header_timeout;
        let core = core.clone();
        let acceptor = tls.as_ref().map(|t| TlsAcceptor::from(t.get()));
        let span = span(&peer.to_string(), frontend);
        // Two kinds of task, so a plain connection's task is not sized for a TLS one (a
        // rustls connection is over 1 KiB, and every idle connection would carry it).
        match acceptor {
            Some(a) => tokio::spawn(
                async move {
                    match tokio::time::timeout_at(deadline, a.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            serve(&core, tls, Frontend::Tls, deadline, Some(slot)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::info!(error = %e, "CONNECT client TLS failed")
                        }
                        Err(_) => tracing::info!("CONNECT client TLS timed out"),
                    }
                }
                .instrument(span),
            ),
            None => tokio::spawn(
                async move {
                    serve(&core, tcp, Frontend::Tcp, deadline, Some(slot)).await;
                }
                .instrument(span),
            ),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_lf_and_leading_empty_lines_are_a_400() {
        let ok = b"CONNECT node:80 HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(parse_head(ok).unwrap().is_some());
        assert_eq!(
            parse_head(b"CONNECT node:80 HTTP/1.0\r\n\r\n")
                .unwrap_err()
                .status,
            400
        );
        let mut long = b"CONNECT node:80 HTTP/1.1\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_HEAD));
        long.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_head(&long).unwrap_err().status, 431);
        for bad in [
            &b"\r\nCONNECT node:80 HTTP/1.1\r\n\r\n"[..],
            b"\nCONNECT node:80 HTTP/1.1\r\n\r\n",
            b"CONNECT node:80 HTTP/1.1\nHost: x\n\n",
            b"CONNECT node:80 HTTP/1.1\r\nHost: x\n\r\n",
        ] {
            assert_eq!(parse_head(bad).unwrap_err().status, 400, "{bad:?}");
        }
    }
}
