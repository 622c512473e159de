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

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

mod rewriter;

pub use rewriter::Rewriter;

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
            if polled.is_pending() && at == 0 {
                // Nothing held and nothing arriving (an idle call's channel): the read buffer
                // goes until bytes come, instead of staying for the channel's life.
                this.input = BytesMut::new();
            }
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
