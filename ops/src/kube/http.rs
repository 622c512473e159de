//! One API call: an HTTP/1.1 exchange over its own TLS connection, the response framed by
//! length or by chunks, within a bound on its size.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::config::{Auth, KubeConfig};

use tokio_rustls::TlsConnector;

/// The largest response body read from the API server: a Lease list of a few hundred
/// servers, with room to spare. A longer one is an error, not an allocation.
pub const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// Why an API call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeError {
    /// No answer in time.
    Timeout,
    /// Connecting, TLS, or the HTTP exchange failed.
    Transport(String),
    /// The API server answered with this status (and the start of its message).
    Status(u16, String),
    /// The body is not what the API promises.
    Decode(String),
}

impl std::fmt::Display for KubeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KubeError::Timeout => f.write_str("the API server did not answer in time"),
            KubeError::Transport(e) => write!(f, "API server unreachable: {e}"),
            KubeError::Status(s, m) => write!(f, "API server answered {s}: {m}"),
            KubeError::Decode(e) => write!(f, "API server response does not decode: {e}"),
        }
    }
}

impl std::error::Error for KubeError {}

/// A client for the API server.
#[derive(Clone, Debug)]
pub struct Client {
    config: Arc<KubeConfig>,
    timeout: Duration,
}

impl Client {
    /// A client whose every call ends within `timeout`.
    pub fn new(config: KubeConfig, timeout: Duration) -> Client {
        Client {
            config: Arc::new(config),
            timeout,
        }
    }

    /// The configuration's namespace, if it has one.
    pub fn namespace(&self) -> Option<&str> {
        self.config.namespace.as_deref()
    }

    /// `method path` with an optional JSON body; the status and body of the answer.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), KubeError> {
        tokio::time::timeout(self.timeout, self.exchange(method, path, body))
            .await
            .map_err(|_| KubeError::Timeout)?
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), KubeError> {
        let c = &self.config;
        let t = |e: &dyn std::fmt::Display| KubeError::Transport(e.to_string());
        let token = match &c.auth {
            Auth::None => None,
            Auth::Token(t) => Some(t.clone()),
            Auth::TokenFile(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| KubeError::Transport(format!("{}: {e}", p.display())))?
                    .trim()
                    .to_owned(),
            ),
        };
        let name = ServerName::try_from(c.server_name.clone()).map_err(|e| t(&e))?;
        let tcp = TcpStream::connect((c.host.as_str(), c.port))
            .await
            .map_err(|e| KubeError::Transport(format!("{}:{}: {e}", c.host, c.port)))?;
        let mut tls = TlsConnector::from(c.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| t(&e))?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}:{}\r\nUser-Agent: tether/{}\r\nAccept: application/json\r\nConnection: close\r\n",
            c.server_name,
            c.port,
            env!("CARGO_PKG_VERSION")
        );
        if let Some(tok) = token {
            req.push_str(&format!("Authorization: Bearer {tok}\r\n"));
        }
        let body = body.unwrap_or_default();
        if !body.is_empty() || method != "GET" {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        tls.write_all(req.as_bytes()).await.map_err(|e| t(&e))?;
        tls.write_all(body).await.map_err(|e| t(&e))?;
        tls.flush().await.map_err(|e| t(&e))?;
        let mut raw = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        // Whether the server ended with TLS close_notify: only then may a body that runs to
        // the close be complete (without it, a truncation is indistinguishable).
        let clean_close;
        loop {
            let n = match tls.read(&mut chunk).await {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    clean_close = false;
                    break;
                }
                Err(e) => return Err(t(&e)),
            };
            if n == 0 {
                clean_close = true;
                break;
            }
            if raw.len() + n > MAX_RESPONSE + 64 * 1024 {
                return Err(KubeError::Transport(format!(
                    "response over {MAX_RESPONSE} bytes"
                )));
            }
            raw.extend_from_slice(&chunk[..n]);
            if let Some(done) = parse_response(&raw)? {
                return Ok(done);
            }
        }
        if let Some(done) = parse_response(&raw)? {
            return Ok(done);
        }
        match close_delimited(&raw) {
            Some(done) if clean_close => Ok(done),
            _ => Err(KubeError::Transport("response cut short".into())),
        }
    }
}

/// The status and body of a complete response in `raw`; `None` while it is incomplete.
fn parse_response(raw: &[u8]) -> Result<Option<(u16, Vec<u8>)>, KubeError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(KubeError::Transport(format!("bad HTTP response: {e}"))),
    };
    let status = resp.code.unwrap_or(0);
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let rest = &raw[head..];
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        return dechunk(rest).map(|b| b.map(|b| (status, b)));
    }
    match header("content-length") {
        Some(len) => {
            let len: usize = len
                .trim()
                .parse()
                .map_err(|_| KubeError::Transport("bad Content-Length".into()))?;
            if len > MAX_RESPONSE {
                return Err(KubeError::Transport(format!(
                    "response over {MAX_RESPONSE} bytes"
                )));
            }
            Ok((rest.len() >= len).then(|| (status, rest[..len].to_vec())))
        }
        // Delimited by the close: complete only at EOF, which the caller knows.
        None => Ok(None),
    }
}

/// A response with neither a length nor chunks: its body is everything to the close.
fn close_delimited(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => Some((resp.code.unwrap_or(0), raw[n..].to_vec())),
        _ => None,
    }
}

/// The body of a complete chunked encoding; `None` while it is incomplete.
fn dechunk(mut rest: &[u8]) -> Result<Option<Vec<u8>>, KubeError> {
    let mut body = Vec::new();
    loop {
        let (used, size) = match httparse::parse_chunk_size(rest) {
            Ok(httparse::Status::Complete(x)) => x,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(KubeError::Transport("bad chunk size".into())),
        };
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        if size > MAX_RESPONSE || body.len() + size > MAX_RESPONSE {
            return Err(KubeError::Transport(format!(
                "response over {MAX_RESPONSE} bytes"
            )));
        }
        rest = &rest[used..];
        if size == 0 {
            return Ok(Some(body));
        }
        if rest.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_framed_by_length_by_chunks_or_not_yet() {
        let r = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_response(r).unwrap(), Some((201, b"{}".to_vec())));
        assert_eq!(parse_response(&r[..r.len() - 1]).unwrap(), None);
        let c = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(c).unwrap(), Some((200, b"abcde".to_vec())));
        assert_eq!(parse_response(&c[..c.len() - 8]).unwrap(), None);
        let huge = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_RESPONSE + 1
        );
        assert!(parse_response(huge.as_bytes()).is_err());
    }
}
