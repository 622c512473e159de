//! The HTTP CONNECT frontend kube-apiserver's EgressSelectorConfiguration speaks; docs/CONNECT.md is its contract.
//!
//! `CONNECT host:port HTTP/1.1`, target taken from the request-target authority (never the
//! Host header, which kube-apiserver sets to `127.0.0.1`). Success is exactly
//! `HTTP/1.1 200 Connection established\r\n\r\n`, then tunnel bytes. Every failure is a status
//! with a one-line reason.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::ServerCore;
use crate::pump::{Abort, pump};
use crate::stream::TetherStream;
use crate::tunnel::DialError;

/// The largest request head accepted.
pub const MAX_HEAD: usize = 16 * 1024;

/// An HTTP error answer: status and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    /// Status code.
    pub status: u16,
    /// One line for the client and the log.
    pub reason: String,
}

fn err(status: u16, reason: impl Into<String>) -> HttpError {
    HttpError {
        status,
        reason: reason.into(),
    }
}

fn status_text(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// Splits an authority-form request target (RFC 9110 9.3.6): `host:port` or `[v6]:port`.
/// Strict: the host is a DNS-style name (letters, digits, `-`, `.`, `_`), an IPv4 address or
/// a bracketed IPv6 address; the port is 1 to 65535 in plain decimal (no sign, no leading
/// zero).
pub fn parse_authority(target: &str) -> Result<(String, u16), HttpError> {
    let (host, port) = if let Some(rest) = target.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| err(400, "request target has an unclosed '['"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| err(400, "request target has no port"))?;
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(err(
                400,
                "request target has a bracketed host that is not IPv6",
            ));
        }
        (h, port)
    } else {
        let (h, port) = target
            .rsplit_once(':')
            .ok_or_else(|| err(400, "request target has no port"))?;
        let name_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_');
        if !h.bytes().all(name_char) {
            return Err(err(400, "request target host is not a name or an address"));
        }
        (h, port)
    };
    if host.is_empty() || host.len() > 255 {
        return Err(err(400, "request target host is empty or over 255 bytes"));
    }
    let decimal = !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && !port.starts_with('0');
    let port: u16 = port
        .parse()
        .ok()
        .filter(|_| decimal)
        .ok_or_else(|| err(400, "request target port is not 1-65535 in plain decimal"))?;
    Ok((host.to_owned(), port))
}

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

pub(crate) async fn answer<S: AsyncWrite + Unpin>(conn: &mut S, e: &HttpError) {
    let body = format!("{}\n", e.reason);
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
        e.status,
        status_text(e.status),
        body.len(),
        if e.status == 405 {
            "Allow: CONNECT\r\n"
        } else {
            ""
        },
    );
    let _ = conn.write_all(head.as_bytes()).await;
    let _ = conn.write_all(body.as_bytes()).await;
    let _ = conn.shutdown().await;
}

/// Serves one CONNECT client connection to its end. `deadline` is the one budget for the
/// connection's TLS handshake (if any) and its request head together.
pub async fn serve<S>(
    core: &ServerCore,
    mut conn: S,
    frontend: Frontend,
    deadline: tokio::time::Instant,
) where
    S: AsyncRead + AsyncWrite + Unpin + Abort,
{
    let ((host, port), first) = match read_request(&mut conn, deadline).await {
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
    open: super::metrics::GaugeGuard,
}

impl Relay<'_> {
    /// The stream, for the frontend's relaying (once).
    pub(crate) fn stream(&mut self) -> TetherStream {
        self.stream.take().expect("the stream is taken once")
    }

    /// Logs and counts how the relaying ended: bytes each way, or the error. A failure is
    /// never silent, whatever the client could be told.
    pub(crate) fn done(self, result: std::io::Result<crate::pump::Moved>) {
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

/// A client connection through the CONNECT frontend: the TCP stream, with any tunnel bytes
/// that arrived together with the response head served first.
#[derive(Debug)]
pub struct ClientStream {
    stream: tokio::net::TcpStream,
    early: Bytes,
}

impl ClientStream {
    /// The TCP connection to the frontend.
    pub fn get_ref(&self) -> &tokio::net::TcpStream {
        &self.stream
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.early.is_empty() {
            let n = self.early.len().min(buf.remaining());
            buf.put_slice(&self.early.split_to(n));
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A CONNECT client: opens a TCP connection to `frontend`, asks for `target` (`host:port`)
/// the way kube-apiserver does, and returns the connection once the tunnel is up. A refusal is
/// an error carrying the server's status line.
pub async fn client(frontend: std::net::SocketAddr, target: &str) -> std::io::Result<ClientStream> {
    let mut stream = tokio::net::TcpStream::connect(frontend).await?;
    stream.set_nodelay(true)?;
    stream
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await?;
    let mut buf = BytesMut::with_capacity(256);
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD || stream.read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::other("the server closed the CONNECT"));
        }
    };
    if !buf.starts_with(b"HTTP/1.1 200 ") {
        let line = String::from_utf8_lossy(&buf[..end]);
        return Err(std::io::Error::other(format!(
            "CONNECT refused: {}",
            line.lines().next().unwrap_or_default()
        )));
    }
    let early = buf.split_off(end).freeze();
    Ok(ClientStream { stream, early })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_parse_with_ipv6_brackets_and_refuse_a_missing_port() {
        assert_eq!(
            parse_authority("10.0.0.1:10250").unwrap(),
            ("10.0.0.1".into(), 10250)
        );
        assert_eq!(parse_authority("[::1]:443").unwrap(), ("::1".into(), 443));
        assert_eq!(parse_authority("node-1:22").unwrap(), ("node-1".into(), 22));
        assert_eq!(parse_authority("node-1").unwrap_err().status, 400);
        assert_eq!(parse_authority("node-1:0").unwrap_err().status, 400);
        assert_eq!(parse_authority(":80").unwrap_err().status, 400);
        assert_eq!(parse_authority("[::1]").unwrap_err().status, 400);
    }

    #[test]
    fn ports_and_hosts_outside_plain_syntax_are_a_400() {
        for bad in [
            "node:+19010",
            "node:019010",
            "node:19010 ",
            "node:65536",
            "node:",
            "a/b:80",
            "user@node:80",
            "[not-v6]:80",
            "[::1]:+1",
        ] {
            assert_eq!(parse_authority(bad).unwrap_err().status, 400, "{bad}");
        }
        assert_eq!(parse_authority("node_1.x:65535").unwrap().1, 65535);
    }

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
