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
        let mut response = Response::default();
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
            if let Some(done) = response.feed(&chunk[..n])? {
                return Ok(done);
            }
        }
        response.end(clean_close)
    }
}

/// A response read as it arrives: the head parsed once it is whole, the body framed (by
/// length, by chunks, or by the close) as its bytes come, each byte looked at a bounded
/// number of times, however the response is cut into reads.
#[derive(Debug, Default)]
struct Response {
    /// Bytes not consumed yet: the head while it is partial, a chunk's size line or trailer.
    pending: Vec<u8>,
    /// Where the search for the head's end goes on from.
    searched: usize,
    body: Vec<u8>,
    status: u16,
    framing: Framing,
    /// Bytes looked at so far (input waiting to be framed, counted at every read): what the
    /// test of linear cost holds.
    #[cfg(test)]
    examined: usize,
}

#[derive(Debug, Default, PartialEq, Eq)]
enum Framing {
    /// The head is not whole yet.
    #[default]
    Head,
    /// `n` more bytes of body.
    Length(usize),
    /// A chunk's size line next.
    ChunkSize,
    /// `n` more bytes of a chunk's data, then its CRLF.
    ChunkData(usize),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// The body is everything up to the close.
    Close,
    /// The response is complete; what follows is ignored.
    Done,
}

/// The largest response head read.
const MAX_HEAD: usize = 64 * 1024;

impl Response {
    /// Takes `input`; the status and body once the response is complete.
    fn feed(&mut self, input: &[u8]) -> Result<Option<(u16, Vec<u8>)>, KubeError> {
        let too_big = || KubeError::Transport(format!("response over {MAX_RESPONSE} bytes"));
        self.pending.extend_from_slice(input);
        #[cfg(test)]
        {
            self.examined += self.pending.len();
        }
        let mut at = 0;
        let done = loop {
            let rest = &self.pending[at..];
            match self.framing {
                Framing::Done => {
                    at = self.pending.len();
                    break None;
                }
                Framing::Head => {
                    // Only look for the end of the head where it was not looked for before.
                    let from = self.searched.saturating_sub(3);
                    match rest[from..].windows(4).position(|w| w == b"\r\n\r\n") {
                        Some(i) => {
                            let end = from + i + 4;
                            (self.status, self.framing) = head(&rest[..end])?;
                            at += end;
                        }
                        None if rest.len() > MAX_HEAD => {
                            return Err(KubeError::Transport("response head too long".into()));
                        }
                        None => {
                            self.searched = rest.len();
                            break None;
                        }
                    }
                }
                Framing::Length(0) => break Some(()),
                Framing::Length(n) => {
                    let k = n.min(rest.len());
                    self.body.extend_from_slice(&rest[..k]);
                    at += k;
                    self.framing = Framing::Length(n - k);
                    if k == 0 {
                        break None;
                    }
                }
                Framing::Close => {
                    if self.body.len() + rest.len() > MAX_RESPONSE {
                        return Err(too_big());
                    }
                    self.body.extend_from_slice(rest);
                    at += rest.len();
                    break None;
                }
                Framing::ChunkSize => match httparse::parse_chunk_size(rest) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        let size = usize::try_from(size).unwrap_or(usize::MAX);
                        if size > MAX_RESPONSE || self.body.len() + size > MAX_RESPONSE {
                            return Err(too_big());
                        }
                        at += used;
                        if size == 0 {
                            break Some(());
                        }
                        self.framing = Framing::ChunkData(size);
                    }
                    Ok(httparse::Status::Partial) if rest.len() > 1024 => {
                        return Err(KubeError::Transport("bad chunk size".into()));
                    }
                    Ok(httparse::Status::Partial) => break None,
                    Err(_) => return Err(KubeError::Transport("bad chunk size".into())),
                },
                Framing::ChunkData(n) => {
                    let k = n.min(rest.len());
                    self.body.extend_from_slice(&rest[..k]);
                    at += k;
                    self.framing = if k == n {
                        Framing::ChunkEnd
                    } else {
                        Framing::ChunkData(n - k)
                    };
                    if k == 0 {
                        break None;
                    }
                }
                Framing::ChunkEnd => {
                    if rest.len() < 2 {
                        break None;
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(KubeError::Transport("bad chunk end".into()));
                    }
                    at += 2;
                    self.framing = Framing::ChunkSize;
                }
            }
        };
        self.pending.drain(..at);
        if self.pending.len() > MAX_HEAD {
            return Err(too_big());
        }
        if done.is_some() {
            self.framing = Framing::Done;
            self.pending = Vec::new();
        }
        Ok(done.map(|()| (self.status, std::mem::take(&mut self.body))))
    }

    /// The connection ended: a body delimited by the close is complete if the close was
    /// clean; anything else is cut short.
    fn end(mut self, clean_close: bool) -> Result<(u16, Vec<u8>), KubeError> {
        if let Some(done) = self.feed(&[])? {
            return Ok(done);
        }
        match self.framing {
            Framing::Close if clean_close => Ok((self.status, self.body)),
            _ => Err(KubeError::Transport("response cut short".into())),
        }
    }
}

/// Reads a response head: the status and how the body is framed.
fn head(head: &[u8]) -> Result<(u16, Framing), KubeError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(KubeError::Transport("bad HTTP response head".into()));
        }
        Err(e) => return Err(KubeError::Transport(format!("bad HTTP response: {e}"))),
    }
    let status = resp.code.unwrap_or(0);
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let framing = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        Framing::ChunkSize
    } else if let Some(len) = header("content-length") {
        let len: usize = len
            .trim()
            .parse()
            .map_err(|_| KubeError::Transport("bad Content-Length".into()))?;
        if len > MAX_RESPONSE {
            return Err(KubeError::Transport(format!(
                "response over {MAX_RESPONSE} bytes"
            )));
        }
        Framing::Length(len)
    } else {
        // Delimited by the close: complete only at EOF.
        Framing::Close
    };
    Ok((status, framing))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `raw` cut at every `step` bytes; the answer once complete.
    fn fed(raw: &[u8], step: usize) -> Result<Option<(u16, Vec<u8>)>, KubeError> {
        let mut r = Response::default();
        for piece in raw.chunks(step.max(1)) {
            if let Some(done) = r.feed(piece)? {
                return Ok(Some(done));
            }
        }
        Ok(None)
    }

    #[test]
    fn responses_are_framed_by_length_by_chunks_or_not_yet_however_they_are_cut() {
        let r = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}";
        let c = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        for step in [1, 2, 3, 7, 1000] {
            assert_eq!(fed(r, step).unwrap(), Some((201, b"{}".to_vec())), "{step}");
            assert_eq!(fed(&r[..r.len() - 1], step).unwrap(), None);
            assert_eq!(
                fed(c, step).unwrap(),
                Some((200, b"abcde".to_vec())),
                "{step}"
            );
            assert_eq!(fed(&c[..c.len() - 8], step).unwrap(), None);
        }
        let huge = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_RESPONSE + 1
        );
        assert!(fed(huge.as_bytes(), 5).is_err());
    }

    #[test]
    fn a_body_to_the_close_is_whole_only_at_a_clean_close() {
        let raw = b"HTTP/1.1 200 OK\r\n\r\n{\"a\":1}";
        let mut r = Response::default();
        assert_eq!(r.feed(raw).unwrap(), None);
        assert_eq!(r.end(true).unwrap(), (200, b"{\"a\":1}".to_vec()));
        let mut r = Response::default();
        assert_eq!(r.feed(raw).unwrap(), None);
        assert!(r.end(false).is_err(), "a truncation is not a body");
    }

    #[test]
    fn a_response_read_a_byte_at_a_time_is_looked_at_in_proportion_to_its_length() {
        // A 1 MiB chunked body fed a byte at a time: the old parser re-read the whole
        // response after every read (quadratic: about 5e11 bytes looked at here).
        let body = vec![b'x'; 1 << 20];
        let mut raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for c in body.chunks(100) {
            raw.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            raw.extend_from_slice(c);
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"0\r\n\r\n");
        let mut r = Response::default();
        let mut got = None;
        for b in raw.chunks(1) {
            if let Some(done) = r.feed(b).unwrap() {
                assert!(got.is_none(), "one answer");
                got = Some(done);
            }
        }
        let (status, got) = got.expect("the whole response");
        assert_eq!(status, 200);
        assert!(
            got == body,
            "{} bytes of body, {} sent",
            got.len(),
            body.len()
        );
        assert!(
            r.examined <= 8 * raw.len(),
            "{} bytes looked at for {}",
            r.examined,
            raw.len()
        );
    }
}
