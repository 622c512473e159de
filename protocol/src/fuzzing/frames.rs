//! Arbitrary frames, and the targets over the frame codec: decode, round trip, chunking.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::{Result, Unstructured};
use bytes::{Bytes, BytesMut};

use crate::codec::FrameCodec;
use crate::frame::*;

fn text(u: &mut Unstructured<'_>, max: usize) -> Result<String> {
    let s: String = u.arbitrary()?;
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Ok(s[..end].to_owned())
}

fn ascii(u: &mut Unstructured<'_>, max: usize) -> Result<String> {
    let n = u.int_in_range(1..=max)?;
    (0..n)
        .map(|_| Ok(char::from(u.int_in_range(0x21u8..=0x7e)?)))
        .collect()
}

fn settings(u: &mut Unstructured<'_>) -> Result<Settings> {
    let opt = |u: &mut Unstructured<'_>, lo: u32, hi: u32| -> Result<Option<u32>> {
        Ok(if u.arbitrary()? {
            Some(u.int_in_range(lo..=hi)?)
        } else {
            None
        })
    };
    let mut unknown = BTreeMap::new();
    for _ in 0..u.int_in_range(0..=3)? {
        unknown.insert(SettingId(u.int_in_range(6..=u16::MAX)?), u.arbitrary()?);
    }
    Ok(Settings {
        initial_window: opt(u, 1, MAX_WINDOW)?,
        max_frame_size: opt(u, MIN_MAX_FRAME_SIZE, MAX_PAYLOAD_LIMIT)?,
        max_concurrent_streams: opt(u, 0, u32::MAX)?,
        keepalive_interval: opt(u, 0, u32::MAX)?,
        drain_notice: opt(u, 0, 1)?,
        unknown: unknown.into_iter().collect(),
    })
}

fn identifier(u: &mut Unstructured<'_>) -> Result<Identifier> {
    Ok(match u.int_in_range(0..=6)? {
        0 => Identifier::Host(ascii(u, 40)?),
        1 => Identifier::Ipv4(Ipv4Addr::from(u.arbitrary::<[u8; 4]>()?)),
        2 => Identifier::Ipv6(Ipv6Addr::from(u.arbitrary::<[u8; 16]>()?)),
        3 => Identifier::Cidr(
            IpAddr::from(u.arbitrary::<[u8; 4]>()?),
            u.int_in_range(0..=32)?,
        ),
        4 => Identifier::Cidr(
            IpAddr::from(u.arbitrary::<[u8; 16]>()?),
            u.int_in_range(0..=128)?,
        ),
        5 => Identifier::DefaultRoute,
        _ => Identifier::Unknown(
            IdentifierKind(u.int_in_range(6..=u8::MAX)?),
            {
                let n = u.int_in_range(0..=8)?;
                u.bytes(n)?
            }
            .to_vec(),
        ),
    })
}

/// A valid frame, any kind. `stream` picks the id of stream frames.
pub fn arbitrary_frame_with(
    u: &mut Unstructured<'_>,
    stream: &mut dyn FnMut(&mut Unstructured<'_>) -> Result<StreamId>,
) -> Result<Frame> {
    Ok(match u.int_in_range(0..=10)? {
        0 => {
            let mut versions: Vec<u16> = (0..u.int_in_range(1..=4)?)
                .map(|_| u.arbitrary())
                .collect::<Result<_>>()?;
            versions.sort_unstable();
            versions.dedup();
            Frame::Hello(Hello {
                versions,
                agent_id: ascii(u, 30)?,
                identifiers: (0..u.int_in_range(0..=4)?)
                    .map(|_| identifier(u))
                    .collect::<Result<_>>()?,
                settings: settings(u)?,
                token: if u.arbitrary()? {
                    Token::new(ascii(u, 64)?).ok()
                } else {
                    None
                },
            })
        }
        1 => Frame::Welcome(Welcome {
            version: u.arbitrary()?,
            server_id: ascii(u, 30)?,
            server_count: u.int_in_range(1..=u16::MAX)?,
            settings: settings(u)?,
        }),
        2 => Frame::Dial(Dial {
            stream: stream(u)?,
            protocol: Protocol(u.arbitrary()?),
            host: ascii(u, 40)?,
            port: u.int_in_range(1..=u16::MAX)?,
        }),
        3 => Frame::DialOk(DialOk { stream: stream(u)? }),
        4 => Frame::Data(Data {
            stream: stream(u)?,
            fin: u.arbitrary()?,
            payload: Bytes::copy_from_slice({
                let n = u.int_in_range(0..=64)?;
                u.bytes(n)?
            }),
        }),
        5 => Frame::Window(WindowUpdate {
            stream: stream(u)?,
            increment: u.int_in_range(1..=MAX_WINDOW)?,
        }),
        6 => Frame::Reset(Reset {
            stream: stream(u)?,
            code: ErrorCode(u.arbitrary()?),
            reason: text(u, 40)?,
        }),
        7 => Frame::Ping(Ping {
            ack: u.arbitrary()?,
            payload: u.arbitrary()?,
        }),
        8 => Frame::GoAway(GoAway {
            last_stream: StreamId(u.int_in_range(0..=MAX_STREAM_ID)?),
            code: ErrorCode(u.arbitrary()?),
            reason: text(u, 40)?,
        }),
        9 => Frame::Draining,
        _ => Frame::Unknown(Unknown {
            kind: FrameKind(u.int_in_range(0x0b..=u8::MAX)?),
            flags: u.arbitrary()?,
            stream: StreamId(u.int_in_range(0..=MAX_STREAM_ID)?),
            payload: Bytes::copy_from_slice({
                let n = u.int_in_range(0..=16)?;
                u.bytes(n)?
            }),
        }),
    })
}

/// A valid frame of any kind, stream ids over the whole range.
pub fn arbitrary_frame(u: &mut Unstructured<'_>) -> Result<Frame> {
    arbitrary_frame_with(u, &mut |u| Ok(StreamId(u.int_in_range(1..=MAX_STREAM_ID)?)))
}

/// Target `frame_decode`: arbitrary bytes through the streaming decoder never panic; no frame
/// that decodes carries a payload over the decoder's limit; every frame re-encodes to exactly
/// the bytes it came from, and those are the bytes SPEC §3 lays out for it.
pub fn frame_decode(data: &[u8]) {
    const LIMIT: u32 = 4096;
    let mut codec = FrameCodec::with_max_payload(LIMIT);
    let mut buf = BytesMut::from(data);
    let mut at = 0;
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        let used = data.len() - at - buf.len();
        assert!(
            frame.payload_len() <= LIMIT as usize,
            "decoded a payload over the limit: {frame}"
        );
        assert_eq!(used, HEADER_LEN + frame.payload_len(), "{frame}");
        let mut again = BytesMut::new();
        frame.encode(&mut again);
        assert_eq!(&again[..], &data[at..at + used], "re-encoding {frame}");
        if let Some(spec) = spec_bytes(&frame) {
            assert_eq!(&spec[..], &data[at..at + used], "SPEC layout of {frame}");
        }
        at += used;
    }
}

/// The bytes SPEC §3.1–§3.4 give for `frame`, written out field by field here rather than by
/// the encoder under test; `None` for the kinds with nested payloads (HELLO, WELCOME, DIAL),
/// which the golden vectors pin instead.
fn spec_bytes(frame: &Frame) -> Option<Vec<u8>> {
    fn header(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(
            &u32::try_from(payload.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        out.extend_from_slice(payload);
    }
    fn str8(out: &mut Vec<u8>, s: &str) {
        out.push(u8::try_from(s.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(s.as_bytes());
    }
    let mut out = Vec::new();
    match frame {
        Frame::DialOk(d) => header(&mut out, 0x04, 0, d.stream.0, &[]),
        Frame::Data(d) => header(&mut out, 0x05, u8::from(d.fin), d.stream.0, &d.payload),
        Frame::Window(w) => header(&mut out, 0x06, 0, w.stream.0, &w.increment.to_be_bytes()),
        Frame::Reset(r) => {
            let mut p = r.code.0.to_be_bytes().to_vec();
            str8(&mut p, &r.reason);
            header(&mut out, 0x07, 0, r.stream.0, &p);
        }
        Frame::Ping(p) => header(&mut out, 0x08, u8::from(p.ack), 0, &p.payload.to_be_bytes()),
        Frame::GoAway(g) => {
            let mut p = g.last_stream.0.to_be_bytes().to_vec();
            p.extend_from_slice(&g.code.0.to_be_bytes());
            str8(&mut p, &g.reason);
            header(&mut out, 0x09, 0, 0, &p);
        }
        Frame::Draining => header(&mut out, 0x0a, 0, 0, &[]),
        Frame::Unknown(u) => header(&mut out, u.kind.0, u.flags, u.stream.0, &u.payload),
        Frame::Hello(_) | Frame::Welcome(_) | Frame::Dial(_) => return None,
    }
    Some(out)
}

/// Target `frame_roundtrip`: a valid frame encodes and decodes to itself.
pub fn frame_roundtrip(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(frame) = arbitrary_frame(&mut u) else {
        return;
    };
    let mut buf = BytesMut::new();
    frame.encode(&mut buf);
    assert_eq!(buf.len(), frame.encoded_len());
    // The exact bytes the SPEC lays out, written independently of the encoder, are what the
    // encoder wrote, and they decode to the frame.
    if let Some(spec) = spec_bytes(&frame) {
        assert_eq!(&buf[..], &spec[..], "encoder vs SPEC layout of {frame}");
        let mut codec = FrameCodec::with_max_payload(MAX_PAYLOAD_LIMIT);
        let mut exact = BytesMut::from(&spec[..]);
        assert_eq!(
            codec.decode(&mut exact).ok().flatten().as_ref(),
            Some(&frame)
        );
        assert!(exact.is_empty());
    }
    let mut codec = FrameCodec::with_max_payload(MAX_PAYLOAD_LIMIT);
    let back = codec.decode(&mut buf).expect("a valid frame decodes");
    assert_eq!(back.as_ref(), Some(&frame));
    assert!(buf.is_empty());
    // One byte short of the payload is not a frame yet; a limit one below the payload refuses
    // it before the payload arrives.
    let mut short = BytesMut::new();
    frame.encode(&mut short);
    short.truncate(short.len() - 1);
    let mut codec = FrameCodec::with_max_payload(MAX_PAYLOAD_LIMIT);
    assert_eq!(codec.decode(&mut short).ok().flatten(), None);
    if let Some(limit) = u32::try_from(frame.payload_len())
        .ok()
        .and_then(|n| n.checked_sub(1))
    {
        let mut head = BytesMut::from(&frame.header().to_bytes()[..]);
        let mut codec = FrameCodec::with_max_payload(limit);
        assert!(
            codec.decode(&mut head).is_err(),
            "a header over the limit is refused before its payload: {frame}"
        );
    }
}

/// Target `codec_chunks`: a byte stream cut into arbitrary chunks decodes to the same frames
/// (and the same error, if any) as the whole.
pub fn codec_chunks(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let cuts = usize::from(n % 16).min(rest.len());
    let (sizes, stream) = rest.split_at(cuts);
    let whole = crate::testing::decode_all(stream, 4096);
    let mut codec = FrameCodec::with_max_payload(4096);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut error = None;
    let mut at = 0;
    let mut k = 0;
    'feed: while at < stream.len() {
        let size = usize::from(sizes.get(k).copied().unwrap_or(255)).max(1);
        k = (k + 1) % sizes.len().max(1);
        let end = (at + size).min(stream.len());
        buf.extend_from_slice(&stream[at..end]);
        at = end;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    error = Some(e);
                    break 'feed;
                }
            }
        }
    }
    assert_eq!((frames, error), whole);
}
