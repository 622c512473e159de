//! [`Rewriter`]: the sans-IO part of the shim, bytes from the client in, bytes for h2 out.

use std::borrow::Cow;

use bytes::{Buf, BufMut, BytesMut};

use super::{
    CONTINUATION, END_HEADERS, END_STREAM, HEADERS, MAX_BLOCK, MAX_FRAME, MAX_LIST, PADDED,
    PREFACE_LEN, PRIORITY, RewriteError, TABLE_SIZE,
};

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
