//! The `:authority` shim: lets h2 serve kube-apiserver's gRPC client, which names the Unix
//! socket's path as its authority.
//!
//! grpc-go dials the socket with the path as its target, so every request carries
//! `:authority` = the path, percent-encoded by current grpc-go (`%2Fetc%2F...`) and raw by
//! older releases (`/etc/...`). Neither is an RFC 3986 authority, and h2 resets such a stream
//! with PROTOCOL_ERROR before the application sees it (hyperium/h2#442). This shim sits
//! between the socket and h2 on the client-to-server side and re-encodes every header block:
//! it decodes HPACK with the client's dynamic table (loona-hpack), drops an `:authority` that
//! h2 would refuse (the check is h2's own: [`http::uri::Authority`]), keeps everything else
//! as it was, and writes the block again as literals without indexing, so h2's decoder holds
//! no table that could disagree with the client's. Every other frame passes through
//! unchanged (DATA without a copy, see [`Rewrite`]). Why a shim and not a patched h2:
//! docs/ARCHITECTURE.md, "The gRPC frontend".
//!
//! Bounds (docs/SECURITY.md): a header block is at most [`MAX_BLOCK`] bytes over all its
//! frames, and the dynamic table at most [`TABLE_SIZE`], the size h2 advertises; anything
//! outside them, or any HPACK error, ends the connection, as h2 itself would (a connection
//! error, RFC 9113 4.3).

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest frame payload accepted: HTTP/2's default SETTINGS_MAX_FRAME_SIZE, which the
/// h2 server behind the shim keeps (it is never raised).
pub const MAX_FRAME: usize = 16_384;
/// The largest header block (HEADERS and its CONTINUATIONs, encoded).
pub const MAX_BLOCK: usize = 64 * 1024;
/// The HPACK dynamic table size: HTTP/2's default SETTINGS_HEADER_TABLE_SIZE, which the h2
/// server keeps, so the client may use exactly this much.
pub const TABLE_SIZE: usize = 4096;
/// The largest decoded header list (names, values and 32 bytes each, RFC 9113 6.5.2): what
/// the h2 server behind the shim accepts. Checked while decoding, so a small block of
/// references to a large table entry cannot expand into a large one.
pub const MAX_LIST: usize = 16 * 1024;

const PREFACE_LEN: usize = 24;
/// Bytes read from the socket at once while a frame header or header block is collected.
const READ_CHUNK: usize = 16 * 1024 + 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Why the shim ended a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewriteError(pub &'static str);

impl std::fmt::Display for RewriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP/2 header shim: {}", self.0)
    }
}

impl std::error::Error for RewriteError {}

impl From<RewriteError> for io::Error {
    fn from(e: RewriteError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// A header block being collected: its stream, the HEADERS flags to write again, and its
/// priority fields if any.
struct Open {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
}

/// The sans-IO rewriter: bytes from the client in, bytes for h2 out.
pub struct Rewriter {
    decoder: loona_hpack::Decoder<'static>,
    /// Bytes that pass unchanged before the next frame header: the preface, then each
    /// non-header frame's payload.
    pass: usize,
    block: BytesMut,
    open: Option<Open>,
    /// Authorities dropped so far (for the log and the tests).
    dropped: u64,
    /// A client's rewriter (tests and benchmarks): every `:authority` becomes this, and
    /// blocks are encoded with a dynamic table (incremental indexing), as grpc-go does.
    client: Option<(Vec<u8>, loona_hpack::Encoder<'static>)>,
}

impl Default for Rewriter {
    fn default() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Rewriter {
            decoder,
            pass: PREFACE_LEN,
            block: BytesMut::new(),
            open: None,
            dropped: 0,
            client: None,
        }
    }
}

impl Rewriter {
    /// A client's rewriter, for a test client in kube-apiserver's dialect: every
    /// `:authority` h2's client writes is replaced by `authority` (a socket path, say), and
    /// blocks are encoded again with a dynamic table of [`TABLE_SIZE`].
    pub fn client(authority: &[u8]) -> Rewriter {
        Rewriter {
            client: Some((authority.to_vec(), loona_hpack::Encoder::new())),
            ..Rewriter::default()
        }
    }

    /// A rewriter past the connection preface (for tests and the fuzz target).
    #[cfg(any(test, feature = "test-util"))]
    pub fn without_preface() -> Rewriter {
        Rewriter {
            pass: 0,
            ..Rewriter::default()
        }
    }

    /// Bytes that may next go from the client to h2 unchanged, without being looked at.
    pub fn passthrough(&self) -> usize {
        self.pass
    }

    /// `n` bytes went through unchanged (at most [`Rewriter::passthrough`]).
    pub fn passed(&mut self, n: usize) {
        self.pass -= n.min(self.pass);
    }

    /// [`Rewriter::process`], moving passthrough bytes from `input` to `out` as well, until
    /// `input` holds only part of a frame.
    pub fn process_all(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<(), RewriteError> {
        loop {
            let n = self.pass.min(input.len());
            out.extend_from_slice(&input[..n]);
            input.advance(n);
            self.pass -= n;
            if self.pass > 0 {
                return Ok(());
            }
            self.process(input, out)?;
            if self.pass == 0 {
                return Ok(());
            }
        }
    }

    /// Authorities dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Consumes whole frames from `input`, appending what h2 should read to `out`, until a
    /// frame's payload may pass unchanged (then [`Rewriter::passthrough`] is non-zero and the
    /// caller moves those bytes) or `input` holds only part of a frame.
    pub fn process(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<(), RewriteError> {
        loop {
            if self.pass > 0 {
                return Ok(());
            }
            if input.len() < 9 {
                return Ok(());
            }
            let len =
                usize::from(input[0]) << 16 | usize::from(input[1]) << 8 | usize::from(input[2]);
            let (kind, flags) = (input[3], input[4]);
            let stream = u32::from_be_bytes([input[5], input[6], input[7], input[8]]) & 0x7fff_ffff;
            if len > MAX_FRAME {
                return Err(RewriteError(
                    "a frame is over the 16 KiB maximum frame size",
                ));
            }
            if self.open.is_some() && kind != CONTINUATION {
                return Err(RewriteError(
                    "a header block is interrupted by another frame",
                ));
            }
            if kind != HEADERS && kind != CONTINUATION {
                out.extend_from_slice(&input[..9]);
                input.advance(9);
                self.pass = len;
                continue;
            }
            if input.len() < 9 + len {
                // Room for the whole frame, so a caller that reads until it grows makes progress.
                input.reserve(9 + len - input.len());
                return Ok(());
            }
            let frame = input.split_to(9 + len);
            let payload = &frame[9..];
            let fragment = if kind == HEADERS {
                if stream == 0 {
                    return Err(RewriteError("HEADERS on stream 0"));
                }
                let mut at = 0;
                let pad = if flags & PADDED != 0 {
                    at = 1;
                    usize::from(
                        *payload
                            .first()
                            .ok_or(RewriteError("padded HEADERS too short"))?,
                    )
                } else {
                    0
                };
                let priority = if flags & PRIORITY != 0 {
                    let p: [u8; 5] = payload
                        .get(at..at + 5)
                        .and_then(|p| p.try_into().ok())
                        .ok_or(RewriteError("HEADERS too short for its priority"))?;
                    at += 5;
                    Some(p)
                } else {
                    None
                };
                if at + pad > payload.len() {
                    return Err(RewriteError("HEADERS padding is longer than the frame"));
                }
                self.open = Some(Open {
                    stream,
                    end_stream: flags & END_STREAM != 0,
                    priority,
                });
                &payload[at..payload.len() - pad]
            } else {
                match &self.open {
                    Some(o) if o.stream == stream => {}
                    _ => return Err(RewriteError("CONTINUATION outside its header block")),
                }
                payload
            };
            if self.block.len() + fragment.len() > MAX_BLOCK {
                return Err(RewriteError("a header block is over 64 KiB"));
            }
            self.block.extend_from_slice(fragment);
            if flags & END_HEADERS != 0 {
                self.finish_block(out)?;
            }
        }
    }

    /// Decodes the collected block and writes it again for h2.
    fn finish_block(&mut self, out: &mut BytesMut) -> Result<(), RewriteError> {
        let open = self.open.take().expect("a block is open");
        let mut encoded = BytesMut::with_capacity(self.block.len() * 2 + 64);
        let mut dropped = 0;
        let mut list = 0usize;
        let mut kept = Vec::new();
        let client = self.client.as_ref().map(|(a, _)| a.clone());
        self.decoder
            .decode_with_cb(&self.block, |name: Cow<'_, [u8]>, value: Cow<'_, [u8]>| {
                list += name.len() + value.len() + 32;
                if list > MAX_LIST {
                    return;
                }
                if &*name == b":authority" {
                    if let Some(a) = &client {
                        kept.push((name.into_owned(), a.clone()));
                        return;
                    }
                    if http::uri::Authority::try_from(&*value).is_err() {
                        dropped += 1;
                        return;
                    }
                }
                if client.is_some() {
                    kept.push((name.into_owned(), value.into_owned()));
                    return;
                }
                // Literal header field without indexing, new name (RFC 7541 6.2.2), no Huffman.
                encoded.put_u8(0);
                put_string(&mut encoded, &name);
                put_string(&mut encoded, &value);
            })
            .map_err(|_| RewriteError("the header block does not decode (HPACK)"))?;
        if list > MAX_LIST {
            return Err(RewriteError("a header list is over 16 KiB decoded"));
        }
        if let Some((_, enc)) = &mut self.client {
            encoded.extend_from_slice(&enc.encode(kept.iter().map(|(n, v)| (&n[..], &v[..]))));
        }
        self.block.clear();
        self.dropped += dropped;
        if dropped > 0 {
            tracing::debug!(
                stream = open.stream,
                "dropped an :authority h2 would refuse"
            );
        }
        // HEADERS (with its priority fields), then CONTINUATIONs, each within MAX_FRAME.
        let mut first = true;
        let mut rest = &encoded[..];
        loop {
            let room = MAX_FRAME
                - if first && open.priority.is_some() {
                    5
                } else {
                    0
                };
            let n = rest.len().min(room);
            let last = n == rest.len();
            let (kind, mut flags) = if first {
                let mut f = if open.end_stream { END_STREAM } else { 0 };
                if open.priority.is_some() {
                    f |= PRIORITY;
                }
                (HEADERS, f)
            } else {
                (CONTINUATION, 0)
            };
            if last {
                flags |= END_HEADERS;
            }
            let prio = if first { open.priority } else { None };
            let len = n + prio.map_or(0, |p| p.len());
            out.put_uint(len as u64, 3);
            out.put_u8(kind);
            out.put_u8(flags);
            out.put_u32(open.stream);
            if let Some(p) = prio {
                out.extend_from_slice(&p);
            }
            out.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            first = false;
            if last {
                return Ok(());
            }
        }
    }
}

/// An HPACK string literal without Huffman coding: a 7-bit-prefix length, then the bytes.
fn put_string(out: &mut BytesMut, s: &[u8]) {
    out.extend_from_slice(&loona_hpack::encoder::encode_integer(s.len(), 7));
    out.extend_from_slice(s);
}

/// A socket as h2 should see it: header blocks rewritten by [`Rewriter`], everything else as
/// it came. Payload bytes that pass unchanged are read straight into h2's buffer when no
/// rewritten bytes wait, so DATA costs no extra copy. Writes go to the socket unchanged.
pub struct Rewrite<S> {
    inner: S,
    rewriter: Rewriter,
    input: BytesMut,
    out: BytesMut,
}

impl<S> Rewrite<S> {
    /// Wraps the client's connection.
    pub fn new(inner: S) -> Self {
        Rewrite {
            inner,
            rewriter: Rewriter::default(),
            input: BytesMut::new(),
            out: BytesMut::new(),
        }
    }

    /// The client's connection.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewrite<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out.split_to(n));
                return Poll::Ready(Ok(()));
            }
            let pass = this.rewriter.passthrough();
            if pass > 0 && !this.input.is_empty() {
                let n = pass.min(this.input.len()).min(buf.remaining());
                buf.put_slice(&this.input[..n]);
                this.input.advance(n);
                this.rewriter.passed(n);
                return Poll::Ready(Ok(()));
            }
            if pass > 0 {
                // Payload straight from the socket into h2's buffer, no copy of ours.
                if pass >= buf.remaining() {
                    let before = buf.filled().len();
                    ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                    this.rewriter.passed(buf.filled().len() - before);
                } else {
                    let mut sub = ReadBuf::new(buf.initialize_unfilled_to(pass));
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut sub))?;
                    let n = sub.filled().len();
                    buf.advance(n);
                    this.rewriter.passed(n);
                }
                return Poll::Ready(Ok(()));
            }
            this.rewriter.process(&mut this.input, &mut this.out)?;
            if !this.out.is_empty() || this.rewriter.passthrough() > 0 {
                continue;
            }
            // Part of a frame: read more (a whole header frame fits in the reserve).
            let at = this.input.len();
            this.input
                .resize(at + READ_CHUNK.max(this.input.capacity() - at), 0);
            let mut rb = ReadBuf::new(&mut this.input[at..]);
            let polled = Pin::new(&mut this.inner).poll_read(cx, &mut rb);
            let n = rb.filled().len();
            this.input.truncate(at + n);
            ready!(polled)?;
            if n == 0 {
                // The client left; a frame cut short is simply not delivered (h2 sees the end).
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewrite<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(feature = "test-util")]
/// The fuzz target `grpc_authority`: no input panics the rewriter or grows its table past
/// [`TABLE_SIZE`]; every frame it writes is within [`MAX_FRAME`], and what it writes decodes
/// again (with an empty table: no indexing) to headers none of which is an `:authority` h2
/// would refuse.
pub fn fuzz_rewrite(data: &[u8]) {
    let mut r = Rewriter::without_preface();
    let mut input = BytesMut::new();
    let mut out = BytesMut::new();
    // Fed in two pieces, so a frame split across reads is exercised too.
    let cut = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    for piece in [&data[..cut], &data[cut..]] {
        input.extend_from_slice(piece);
        if r.process_all(&mut input, &mut out).is_err() {
            return;
        }
    }
    let mut check = loona_hpack::Decoder::new();
    check.set_max_allowed_table_size(0);
    let mut at = &out[..];
    let mut block = Vec::new();
    let mut skip = 0usize;
    while at.len() >= 9 {
        let len = usize::from(at[0]) << 16 | usize::from(at[1]) << 8 | usize::from(at[2]);
        assert!(len <= MAX_FRAME, "a written frame is over the maximum size");
        let (kind, flags) = (at[3], at[4]);
        let end = (9 + len).min(at.len());
        if kind == HEADERS || kind == CONTINUATION {
            assert_eq!(end, 9 + len, "a written header frame is whole");
            let from = 9 + if kind == HEADERS && flags & PRIORITY != 0 {
                5
            } else {
                0
            };
            block.extend_from_slice(&at[from..end]);
            if flags & END_HEADERS != 0 {
                check
                    .decode_with_cb(&block, |n, v| {
                        assert!(
                            &*n != b":authority" || http::uri::Authority::try_from(&*v).is_ok()
                        );
                    })
                    .expect("a written block decodes without a table");
                block.clear();
            }
        }
        skip += end;
        at = &at[end..];
    }
    let _ = skip;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes()[1..]);
        f.push(kind);
        f.push(flags);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn encode(headers: &[(&[u8], &[u8])], enc: &mut loona_hpack::Encoder<'_>) -> Vec<u8> {
        enc.encode(headers.iter().copied())
    }

    fn decode_all(out: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut d = loona_hpack::Decoder::new();
        let mut at = out;
        let mut block = Vec::new();
        let mut all = Vec::new();
        while at.len() >= 9 {
            let len = usize::from(at[2]) | usize::from(at[1]) << 8;
            if at[3] == HEADERS || at[3] == CONTINUATION {
                let from = if at[4] & PRIORITY != 0 && at[3] == HEADERS {
                    14
                } else {
                    9
                };
                block.extend_from_slice(&at[from..9 + len]);
                if at[4] & END_HEADERS != 0 {
                    all.extend(d.decode(&block).unwrap());
                    block.clear();
                }
            }
            at = &at[9 + len..];
        }
        all
    }

    #[test]
    fn a_socket_path_authority_is_dropped_and_every_other_header_kept() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = BytesMut::from(&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..]);
        for authority in [
            &b"%2Fetc%2Fkubernetes%2Fkonnectivity-server%2Fkonnectivity-server.socket"[..],
            b"/etc/kubernetes/konnectivity-server/konnectivity-server.socket",
            b"localhost",
        ] {
            let block = encode(
                &[
                    (b":method", b"POST"),
                    (b":scheme", b"http"),
                    (b":path", b"/ProxyService/Proxy"),
                    (b":authority", authority),
                    (b"content-type", b"application/grpc"),
                    (b"te", b"trailers"),
                ],
                &mut enc,
            );
            input.extend_from_slice(&frame(HEADERS, END_HEADERS, 1, &block));
            input.extend_from_slice(&frame(0x0, 0, 1, b"0123456789"));
        }
        let mut r = Rewriter::default();
        let mut out = BytesMut::new();
        r.process_all(&mut input, &mut out).unwrap();
        assert!(input.is_empty());
        assert_eq!(r.dropped(), 2);
        let headers = decode_all(&out[24..]);
        let authorities: Vec<_> = headers.iter().filter(|(n, _)| n == b":authority").collect();
        assert_eq!(
            authorities,
            [&(b":authority".to_vec(), b"localhost".to_vec())]
        );
        assert_eq!(headers.iter().filter(|(n, _)| n == b":path").count(), 3);
        assert_eq!(
            headers
                .iter()
                .filter(|(n, v)| n == b"te" && v == b"trailers")
                .count(),
            3
        );
        // DATA passes byte for byte.
        assert_eq!(out.windows(10).filter(|w| w == b"0123456789").count(), 3);
    }

    #[test]
    fn padding_priority_and_continuations_are_understood() {
        let mut enc = loona_hpack::Encoder::new();
        let block = encode(
            &[
                (b":method", b"POST"),
                (b":authority", b"/a/path"),
                (b":path", b"/x"),
            ],
            &mut enc,
        );
        let (a, b) = block.split_at(3);
        let mut first = vec![2u8]; // pad length
        first.extend_from_slice(&[0x80, 0, 0, 3, 16]); // priority
        first.extend_from_slice(a);
        first.extend_from_slice(&[0, 0]);
        let mut input = BytesMut::new();
        input.extend_from_slice(&frame(HEADERS, PADDED | PRIORITY | END_STREAM, 3, &first));
        input.extend_from_slice(&frame(CONTINUATION, END_HEADERS, 3, b));
        let mut r = Rewriter::without_preface();
        let mut out = BytesMut::new();
        r.process_all(&mut input, &mut out).unwrap();
        assert_eq!(out[3], HEADERS);
        assert_eq!(out[4], PRIORITY | END_STREAM | END_HEADERS);
        assert_eq!(&out[9..14], &[0x80, 0, 0, 3, 16]);
        let headers = decode_all(&out);
        assert_eq!(headers.len(), 2);
    }

    #[test]
    fn hostile_header_blocks_end_the_connection() {
        let mut r = Rewriter::without_preface();
        let mut out = BytesMut::new();
        // A table size update past the advertised size.
        let mut input =
            BytesMut::from(&frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe1, 0xff, 0x03, 0x82])[..]);
        assert!(r.process_all(&mut input, &mut out).is_err());
        // A block that never ends grows to 64 KiB, not more.
        let mut r = Rewriter::without_preface();
        let mut input = BytesMut::from(&frame(HEADERS, 0, 1, &[0x82])[..]);
        let mut refused = false;
        for _ in 0..10 {
            input.extend_from_slice(&frame(CONTINUATION, 0, 1, &[0x40; MAX_FRAME]));
            if r.process_all(&mut input, &mut out).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused && r.block.len() <= MAX_BLOCK);
        // A small block of references to one large table entry: refused as it decodes.
        let mut r = Rewriter::without_preface();
        let mut enc_len = loona_hpack::encoder::encode_integer(4000, 7);
        enc_len[0] &= 0x7f;
        let mut first = vec![0x40, 1, b'x'];
        first.extend_from_slice(&enc_len);
        first.extend(std::iter::repeat_n(b'v', 4000));
        let mut input = BytesMut::from(&frame(HEADERS, END_HEADERS, 1, &first)[..]);
        r.process_all(&mut input, &mut out).unwrap();
        let mut input = BytesMut::from(&frame(HEADERS, END_HEADERS, 3, &[0xbe; 4000])[..]);
        let before = out.len();
        assert!(r.process_all(&mut input, &mut out).is_err());
        assert_eq!(out.len(), before, "nothing of it was written");
        // An oversized frame, before its payload is read.
        let mut r = Rewriter::without_preface();
        let mut input = BytesMut::from(&[0x01, 0x00, 0x00, 0x0, 0, 0, 0, 0, 1][..]);
        assert!(r.process_all(&mut input, &mut out).is_err());
        // A header block interrupted by DATA.
        let mut r = Rewriter::without_preface();
        let mut input = BytesMut::from(&frame(HEADERS, 0, 1, &[0x82])[..]);
        input.extend_from_slice(&frame(0, 0, 1, b"x"));
        assert!(r.process_all(&mut input, &mut out).is_err());
    }

    #[test]
    fn a_block_split_over_continuations_is_joined_and_written_within_the_maximum() {
        let mut enc = loona_hpack::Encoder::new();
        let big = vec![b'v'; 16_000];
        let block = encode(&[(b":authority", b"/sock"), (b"x-big", &big)], &mut enc);
        let mut input = BytesMut::new();
        let (a, b) = block.split_at(10_000);
        input.extend_from_slice(&frame(HEADERS, 0, 1, a));
        input.extend_from_slice(&frame(CONTINUATION, END_HEADERS, 1, b));
        let mut r = Rewriter::without_preface();
        let mut out = BytesMut::new();
        r.process_all(&mut input, &mut out).unwrap();
        let headers = decode_all(&out);
        assert_eq!(headers, [(b"x-big".to_vec(), big)]);
        fuzz_check(&out);
    }

    fn fuzz_check(out: &[u8]) {
        let mut at = out;
        while at.len() >= 9 {
            let len = usize::from(at[0]) << 16 | usize::from(at[1]) << 8 | usize::from(at[2]);
            assert!(len <= MAX_FRAME);
            at = &at[9 + len..];
        }
        assert!(at.is_empty());
    }
}
