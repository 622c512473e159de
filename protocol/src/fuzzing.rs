//! Entry points for the fuzz targets in `fuzz/` (and the replay test that feeds them every
//! committed corpus and regression file on stable). Each panics on a broken property.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::{Result, Unstructured};
use bytes::{Bytes, BytesMut};

use crate::Time;
use crate::codec::FrameCodec;
use crate::error::CloseReason;
use crate::frame::*;
use crate::session::{Config, Event, Session, StreamState};
use crate::testing::{Carry, Pair, Side, test_agent_identity, test_server_identity};

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
        unknown.insert(SettingId(u.int_in_range(5..=u16::MAX)?), u.arbitrary()?);
    }
    Ok(Settings {
        initial_window: opt(u, 1, MAX_WINDOW)?,
        max_frame_size: opt(u, MIN_MAX_FRAME_SIZE, MAX_PAYLOAD_LIMIT)?,
        max_concurrent_streams: opt(u, 0, u32::MAX)?,
        keepalive_interval: opt(u, 0, u32::MAX)?,
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
    Ok(match u.int_in_range(0..=9)? {
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
        _ => Frame::Unknown(Unknown {
            kind: FrameKind(u.int_in_range(0x0a..=u8::MAX)?),
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

/// Target `session_ops`: arbitrary inbound frames, commands and timeouts applied to one session;
/// no panic, and `check_invariants()` holds after every step.
pub fn session_ops(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let _ = run_session_ops(&mut u);
}

fn fuzz_config(u: &mut Unstructured<'_>) -> Result<Config> {
    let c = Config {
        initial_window: u.int_in_range(1..=100_000)?,
        max_frame_size: u.int_in_range(MIN_MAX_FRAME_SIZE..=70_000)?,
        max_concurrent_streams: u.int_in_range(0..=4)?,
        keepalive_interval_ms: u.int_in_range(0..=2000)?,
        keepalive_timeout_ms: u.int_in_range(1..=5000)?,
        handshake_timeout_ms: u.int_in_range(0..=5000)?,
        stream_id_limit: u.int_in_range(1..=40)?,
        ..Config::default()
    };
    // This end's own caps, derived from bytes already taken so that corpus files keep their
    // meaning: a send buffer below or above the peer's window, an open limit of 1 to 4, a copy
    // threshold of 1 byte to 4 KiB.
    Ok(Config {
        max_send_window: 1 + c.initial_window / 2,
        max_open_streams: 1 + c.stream_id_limit % 4,
        recv_copy_below: 1 + c.max_frame_size % 4096,
        ..c
    })
}

fn run_session_ops(u: &mut Unstructured<'_>) -> Result<()> {
    let server_cfg = fuzz_config(u)?;
    let agent_cfg = fuzz_config(u)?;
    let as_server: bool = u.arbitrary()?;
    let mut s = if u.arbitrary()? {
        // Start established, so that stream frames reach the stream machinery.
        let mut p = Pair::new(server_cfg, agent_cfg);
        p.run();
        let _ = p.server.accept_hello(p.now);
        p.run();
        if as_server { p.server } else { p.agent }
    } else if as_server {
        Session::server(server_cfg, test_server_identity(), Time::from_millis(0))
            .map_err(|_| arbitrary::Error::IncorrectFormat)?
    } else {
        Session::agent(agent_cfg, test_agent_identity(), Time::from_millis(0))
            .map_err(|_| arbitrary::Error::IncorrectFormat)?
    };
    let mut now = Time::from_millis(0);
    for _ in 0..512 {
        if u.is_empty() {
            break;
        }
        let id = StreamId(u.int_in_range(1..=12)?);
        match u.int_in_range(0..=19)? {
            0..=4 => {
                let f = arbitrary_frame_with(u, &mut |u| Ok(StreamId(u.int_in_range(1..=12)?)))?;
                let before = Before::of(&s, &f);
                s.handle_frame(now, f);
                before.check(&s);
            }
            5 => {
                let mut buf = BytesMut::from({
                    let n = u.int_in_range(0..=64)?;
                    u.bytes(n)?
                });
                let was_closed = s.is_closed();
                s.handle_bytes(now, &mut buf);
                if let (false, Some(CloseReason::Violation(e))) = (was_closed, s.close_reason()) {
                    let parse = [ErrorCode::MALFORMED_FRAME, ErrorCode::FRAME_TOO_LARGE];
                    assert!(
                        parse.contains(&e.code)
                            || e.frame.is_some_and(|k| codes_for(k).contains(&e.code)),
                        "bytes closed the session with {e:?}, which SPEC 8 does not allow"
                    );
                }
            }
            6 => {
                let _ = s.open(Protocol::TCP, "h", 1);
            }
            7 => {
                let _ = s.accept(id);
            }
            8 => {
                let _ = s.reject(id, ErrorCode::DIAL_REFUSED, "no");
            }
            9 => {
                let n = u.int_in_range(0..=5000)?;
                let _ = s.send(id, Bytes::from(vec![1u8; n]));
            }
            10 => {
                let _ = s.finish(id);
            }
            11 => {
                let _ = s.reset(id, ErrorCode(u.arbitrary()?), "r");
            }
            12 => {
                let n = u.arbitrary()?;
                let _ = s.release(id, n);
            }
            13 => {
                let _ = s.ping(now);
            }
            14 => {
                let _ = if u.arbitrary()? {
                    s.go_away("bye")
                } else {
                    s.close(ErrorCode(u.arbitrary()?), "close")
                };
            }
            15 => {
                now = now.plus_ms(u.int_in_range(0..=3000)?);
                s.handle_timeout(now);
                assert!(
                    s.poll_timeout().is_none_or(|t| t > now),
                    "handle_timeout(now) leaves no timer due at now"
                );
            }
            18 => {
                let max = u.int_in_range(1..=5000)?;
                let _ = s.recv(id, max);
            }
            19 => {
                let _ = s.abandon(id);
            }
            16 => {
                let wants = s.wants_transmit();
                if s.poll_frame().is_some() {
                    assert!(wants, "a frame was ready while wants_transmit() said no");
                    while s.poll_frame().is_some() {}
                }
                while s.poll_event().is_some() {}
            }
            _ => {
                if u.ratio(1, 8)? {
                    s.handle_transport_closed();
                }
            }
        }
        assert_eq!(s.check_invariants(), Ok(()));
    }
    Ok(())
}

/// The GOAWAY codes SPEC §4, §5.4, §6.3 and §8.2 allow when a frame of `kind` breaks a rule;
/// GOAWAY and unknown kinds never do. (FRAME_TOO_LARGE is allowed for any kind: a frame handed
/// over whole may still exceed what this end announced.)
fn codes_for(kind: FrameKind) -> &'static [ErrorCode] {
    const PROTOCOL: ErrorCode = ErrorCode::PROTOCOL_ERROR;
    match kind {
        FrameKind::HELLO | FrameKind::WELCOME => &[PROTOCOL, ErrorCode::VERSION_MISMATCH],
        FrameKind::DIAL => &[PROTOCOL, ErrorCode::ENHANCE_YOUR_CALM],
        FrameKind::DIAL_OK | FrameKind::RESET | FrameKind::PING => &[PROTOCOL],
        FrameKind::DATA => &[
            PROTOCOL,
            ErrorCode::STREAM_CLOSED,
            ErrorCode::FLOW_CONTROL_ERROR,
        ],
        FrameKind::WINDOW => &[PROTOCOL, ErrorCode::FLOW_CONTROL_ERROR],
        // SPEC 7.4: only a NO_ERROR GOAWAY that disowns an accepted stream (checked below).
        FrameKind::GOAWAY => &[PROTOCOL],
        _ => &[],
    }
}

/// What one inbound frame met, for checking the session's answer against the SPEC's table.
struct Before {
    kind: FrameKind,
    closed: bool,
    /// The stream had the peer's FIN already and the frame is DATA (SPEC 5.4: STREAM_CLOSED).
    data_after_fin: bool,
    /// The frame is a NO_ERROR GOAWAY whose last stream is below a stream of this end that
    /// the peer accepted (SPEC 7.4: PROTOCOL_ERROR).
    goaway_disowns: bool,
}

impl Before {
    fn of(s: &Session, f: &Frame) -> Before {
        let state = s.stream_state(f.stream());
        let established = |id| {
            matches!(
                s.stream_state(id),
                Some(
                    StreamState::Open
                        | StreamState::HalfClosedLocal
                        | StreamState::HalfClosedRemote
                        | StreamState::Closing
                )
            )
        };
        let goaway_disowns = matches!(f, Frame::GoAway(g) if g.code == ErrorCode::NO_ERROR
            && s.stream_ids().any(|id| s.role().opens(id) && id > g.last_stream && established(id)));
        Before {
            goaway_disowns,
            kind: f.kind(),
            closed: s.is_closed(),
            data_after_fin: matches!(f, Frame::Data(d) if d.payload.len() <= s.max_inbound_payload() as usize)
                && matches!(
                    state,
                    Some(StreamState::HalfClosedRemote | StreamState::Closing)
                ),
        }
    }

    fn check(&self, s: &Session) {
        let Some(CloseReason::Violation(e)) = s.close_reason() else {
            return;
        };
        if self.closed {
            return;
        }
        assert_eq!(e.frame, Some(self.kind), "{e:?} blames another kind");
        if e.code == ErrorCode::FRAME_TOO_LARGE {
            return;
        }
        assert!(
            codes_for(self.kind).contains(&e.code),
            "{:?} closed the session with {e:?}, which SPEC 5.4/6.3/7.4/8.2 does not allow",
            self.kind
        );
        if self.data_after_fin {
            assert_eq!(e.code, ErrorCode::STREAM_CLOSED, "DATA after FIN: {e:?}");
        }
        if self.kind == FrameKind::GOAWAY {
            assert!(
                self.goaway_disowns,
                "GOAWAY refused though it disowned nothing: {e:?}"
            );
        }
    }
}

/// Target `session_pair`: two sessions through the pair harness with arbitrary commands, chunk
/// splits, stalls and a possible tunnel drop. What each end received on each stream is a prefix
/// of what the other sent, and once both applications finish everything, nothing leaks.
pub fn session_pair(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let _ = run_session_pair(&mut u);
}

#[derive(Default)]
struct Tally {
    sent: BTreeMap<(Side, StreamId), Vec<u8>>,
    received: BTreeMap<(Side, StreamId), Vec<u8>>,
    pending: Vec<(Side, StreamId)>,
    /// `recv` returned the peer's FIN.
    fin: BTreeSet<(Side, StreamId)>,
    /// `finish` succeeded.
    finished: BTreeSet<(Side, StreamId)>,
    /// Reset, refused or failed, at either end, by anyone.
    reset: BTreeSet<StreamId>,
    /// An application PING of this side waits for its answer.
    ping_waiting: BTreeSet<Side>,
    /// Some `go_away` succeeded.
    drained: bool,
    dropped: bool,
}

impl Tally {
    fn absorb(&mut self, p: &mut Pair) {
        for side in [Side::Server, Side::Agent] {
            for e in p.events(side) {
                match e {
                    Event::Readable { stream } => {
                        let got = self.received.entry((side, stream)).or_default();
                        loop {
                            match p.session(side).recv(stream, 1500) {
                                Ok(Some(data)) => got.extend_from_slice(&data),
                                Ok(None) => {
                                    self.fin.insert((side, stream));
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                    }
                    Event::DialRequested { stream, .. } => self.pending.push((side, stream)),
                    Event::DialFailed { stream, .. } | Event::Reset { stream, .. } => {
                        self.reset.insert(stream);
                    }
                    Event::PingAnswered { .. } => {
                        self.ping_waiting.remove(&side);
                    }
                    _ => {}
                }
            }
        }
        for ((side, stream), got) in &self.received {
            let sent = self
                .sent
                .get(&(side.peer(), *stream))
                .map_or(&[][..], |v| &v[..]);
            assert!(
                sent.starts_with(got),
                "{side:?} stream {stream}: received bytes are not a prefix of what was sent"
            );
        }
        assert_eq!(p.server.check_invariants(), Ok(()));
        assert_eq!(p.agent.check_invariants(), Ok(()));
    }
}

fn run_session_pair(u: &mut Unstructured<'_>) -> Result<()> {
    let mut cfg = fuzz_config(u)?;
    cfg.keepalive_interval_ms = 0;
    cfg.max_concurrent_streams = cfg.max_concurrent_streams.max(1);
    cfg.stream_id_limit = 1_000;
    let mut p = Pair::established(cfg.clone(), cfg);
    if u.arbitrary()? {
        let sizes: Vec<usize> = (0..u.int_in_range(1..=4)?)
            .map(|_| Ok(usize::from(u.int_in_range(1u16..=3000)?)))
            .collect::<Result<_>>()?;
        p.carry = Carry::Bytes(sizes);
    }
    let mut t = Tally::default();
    let mut counter = 0u8;
    for _ in 0..256 {
        if u.is_empty() {
            break;
        }
        let side = if u.arbitrary()? {
            Side::Server
        } else {
            Side::Agent
        };
        let id = StreamId(u.int_in_range(1..=10)?);
        match u.int_in_range(0..=12)? {
            0 => {
                let _ = p.session(side).open(Protocol::TCP, "dest", 80);
            }
            1 => {
                if let Some(i) = (!t.pending.is_empty())
                    .then(|| u.choose_index(t.pending.len()))
                    .transpose()?
                {
                    let (s, id) = t.pending.swap_remove(i);
                    let _ = if u.arbitrary()? {
                        p.session(s).accept(id)
                    } else {
                        p.session(s).reject(id, ErrorCode::DIAL_REFUSED, "no")
                    };
                }
            }
            2 | 3 => {
                counter = counter.wrapping_add(1);
                let len = u.int_in_range(1..=4000)?;
                let bytes = Bytes::from(vec![counter; len]);
                if let Ok(n) = p.session(side).send(id, bytes.clone()) {
                    t.sent
                        .entry((side, id))
                        .or_default()
                        .extend_from_slice(&bytes[..n]);
                }
            }
            4 => {
                if p.session(side).finish(id).is_ok() {
                    t.finished.insert((side, id));
                }
            }
            5 => {
                if p.session(side)
                    .reset(id, ErrorCode::CANCEL, "cancel")
                    .is_ok()
                {
                    t.reset.insert(id);
                }
            }
            6 => {
                let n = p.session(side).unreleased(id);
                let _ = p.session(side).release(id, n);
            }
            12 => {
                let now = p.now;
                if p.session(side).ping(now).is_ok() {
                    t.ping_waiting.insert(side);
                }
            }
            7 => p.stall(side, u.arbitrary()?),
            8 => {
                p.step();
            }
            9 => {
                p.run();
            }
            10 => {
                if u.ratio(1, 16)? {
                    p.drop_tunnel();
                    t.dropped = true;
                }
            }
            _ => {
                t.drained |= p.session(side).go_away("drain").is_ok();
            }
        }
        t.absorb(&mut p);
    }
    // Both applications now finish everything they have: accept, release, finish.
    p.stall(Side::Server, false);
    p.stall(Side::Agent, false);
    for _ in 0..10_000 {
        p.run();
        t.absorb(&mut p);
        let mut acted = false;
        for (side, id) in core::mem::take(&mut t.pending) {
            acted |= p.session(side).accept(id).is_ok();
        }
        for side in [Side::Server, Side::Agent] {
            let ids: Vec<StreamId> = p.session(side).stream_ids().collect();
            for id in ids {
                let s = p.session(side);
                let n = s.unreleased(id);
                if n > 0 {
                    acted |= s.release(id, n).is_ok();
                }
                if s.queued(id) == 0 && s.finish(id).is_ok() {
                    t.finished.insert((side, id));
                    acted = true;
                }
                // A stream that is over is let go of, as a dropped handle would.
                if matches!(
                    s.stream_state(id),
                    Some(StreamState::Closed | StreamState::Failed)
                ) {
                    acted |= s.abandon(id).is_ok();
                }
            }
        }
        if !acted && !p.in_flight() {
            break;
        }
    }
    p.run();
    t.absorb(&mut p);
    for side in [Side::Server, Side::Agent] {
        let s = p.session(side);
        assert_eq!(s.stream_count(), 0, "{side:?}: a stream leaked: {s:?}");
        assert_eq!(
            s.stream_ids().count(),
            0,
            "{side:?}: a closed stream was kept after it was abandoned: {s:?}"
        );
        // Honest ends never call each other's frames a violation, whatever was done to the
        // tunnel.
        assert!(
            !matches!(s.close_reason(), Some(CloseReason::Violation(_))),
            "{side:?} closed with {:?} between honest ends",
            s.close_reason()
        );
    }
    if !t.dropped {
        // Progress: every stream both applications finished and nobody reset arrived whole,
        // in order, with its FIN, at both ends.
        for &(side, id) in &t.finished {
            if t.reset.contains(&id) {
                continue;
            }
            let peer = side.peer();
            let sent = t.sent.get(&(side, id)).map_or(&[][..], |v| &v[..]);
            let got = t.received.get(&(peer, id)).map_or(&[][..], |v| &v[..]);
            assert_eq!(got, sent, "{peer:?} stream {id}: not every byte arrived");
            assert!(
                t.fin.contains(&(peer, id)),
                "{peer:?} stream {id}: FIN never read"
            );
        }
        for side in [Side::Server, Side::Agent] {
            // Every application PING on a session that is still open was answered.
            if !p.session(side).is_closed() {
                assert!(
                    !t.ping_waiting.contains(&side),
                    "{side:?}: a PING went unanswered"
                );
            }
            // A drain, once started, completes at both ends when the streams are done.
            if t.drained {
                assert_eq!(
                    p.session(side).close_reason(),
                    Some(&CloseReason::Drained),
                    "{side:?}: the drain did not complete"
                );
            }
        }
    } else {
        for side in [Side::Server, Side::Agent] {
            assert!(
                matches!(
                    p.session(side).close_reason(),
                    Some(CloseReason::TransportLost | CloseReason::Drained)
                ),
                "{side:?} after the tunnel dropped: {:?}",
                p.session(side).close_reason()
            );
        }
    }
    Ok(())
}
