//! Frames: the header, the wire enums and one type per frame kind (SPEC 3).
//!
//! Every frame is a fixed 10-byte header followed by its payload:
//!
//! ```text
//!  0        1        2                                  6                                  10
//! +--------+--------+----------------------------------+----------------------------------+
//! |  kind  | flags  |  stream id (u32, top bit = 0)    |  payload length (u32)            |
//! +--------+--------+----------------------------------+----------------------------------+
//! ```
//!
//! Each frame kind lives in its own file with `decode` (full validation, no trailing bytes) and
//! `encode` (canonical: decoding then encoding gives the same bytes).

mod data;
mod decode_error;
mod dial;
mod dial_ok;
mod goaway;
mod hello;
mod ping;
mod reset;
mod settings;
mod unknown;
mod welcome;
mod window;
pub(crate) mod wire;

use core::fmt;

use bytes::{BufMut, Bytes};

pub use data::{Data, FLAG_FIN};
pub use decode_error::DecodeError;
pub use dial::{Dial, Protocol};
pub use dial_ok::DialOk;
pub use goaway::GoAway;
pub use hello::{
    Hello, Identifier, IdentifierKind, MAX_IDENTIFIERS, MAX_TOKEN_LEN, MAX_VERSIONS, Token,
};
pub use ping::{FLAG_ACK, Ping};
pub use reset::Reset;
pub use settings::{
    MAX_SETTINGS, MIN_KEEPALIVE_INTERVAL_MS, MIN_MAX_FRAME_SIZE, SettingId, Settings,
};
pub use unknown::Unknown;
pub use welcome::Welcome;
pub use window::WindowUpdate;

/// Length of the fixed frame header in bytes (SPEC 3.1).
pub const HEADER_LEN: usize = 10;

/// The largest payload any frame may carry, whatever the settings say (SPEC 3.6).
pub const MAX_PAYLOAD_LIMIT: u32 = 16_777_215;

/// The payload limit before the handshake has set one: HELLO and WELCOME must fit (SPEC 3.6).
pub const HANDSHAKE_MAX_PAYLOAD: u32 = 16_384;

/// The largest stream id; the top bit of the field is reserved (SPEC 3.1).
pub const MAX_STREAM_ID: u32 = 0x7fff_ffff;

/// The largest flow-control window and WINDOW increment (SPEC 6.1).
pub const MAX_WINDOW: u32 = 0x7fff_ffff;

/// The protocol version this crate speaks (SPEC 9).
pub const PROTOCOL_VERSION: u16 = 1;

macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $name:ident($repr:ty) { $( $(#[$cmeta:meta])* $const:ident = $value:expr ),* $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
        pub struct $name(pub $repr);

        impl $name {
            $( $(#[$cmeta])* pub const $const: $name = $name($value); )*

            /// The constant's name, if this value has one.
            pub fn name(self) -> Option<&'static str> {
                match self {
                    $( Self::$const => Some(stringify!($const)), )*
                    _ => None,
                }
            }
        }

        impl core::fmt::Debug for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                match self.name() {
                    Some(name) => f.write_str(name),
                    None => write!(f, "{}({:#x})", stringify!($name), self.0),
                }
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                core::fmt::Debug::fmt(self, f)
            }
        }
    };
}
pub(crate) use wire_enum;

wire_enum! {
    /// A frame kind (SPEC 3.2). Unknown kinds print as hex and survive a round trip.
    FrameKind(u8) {
        /// Agent to server, first frame of a tunnel.
        HELLO = 0x01,
        /// Server to agent, the handshake's answer.
        WELCOME = 0x02,
        /// Opens a stream to a destination.
        DIAL = 0x03,
        /// The destination of a DIAL is connected.
        DIAL_OK = 0x04,
        /// Stream bytes; the FIN flag half-closes.
        DATA = 0x05,
        /// A flow-control credit increment.
        WINDOW = 0x06,
        /// Aborts a stream.
        RESET = 0x07,
        /// Keepalive and round-trip time.
        PING = 0x08,
        /// No new streams; the last word before a close.
        GOAWAY = 0x09,
        /// The sender will drain soon: open new streams elsewhere if you can (an extension
        /// sent only to a peer that announced DRAIN_NOTICE, SPEC 7.4).
        DRAINING = 0x0a,
    }
}

wire_enum! {
    /// An error code carried by RESET and GOAWAY (SPEC 8).
    ErrorCode(u32) {
        /// Graceful: nothing went wrong.
        NO_ERROR = 0x00,
        /// The peer broke a rule of the protocol.
        PROTOCOL_ERROR = 0x01,
        /// A frame did not parse.
        MALFORMED_FRAME = 0x02,
        /// A frame's length was over the negotiated maximum.
        FRAME_TOO_LARGE = 0x03,
        /// The peer sent more than its window, or granted more than it received.
        FLOW_CONTROL_ERROR = 0x04,
        /// A frame arrived for a stream direction that was already finished.
        STREAM_CLOSED = 0x05,
        /// The stream was not processed; opening it again is safe.
        REFUSED_STREAM = 0x06,
        /// The stream is no longer wanted (a cancelled dial, an aborted transfer).
        CANCEL = 0x07,
        /// No protocol version in common.
        VERSION_MISMATCH = 0x08,
        /// The agent's credentials were refused.
        UNAUTHORIZED = 0x09,
        /// No frame arrived within the keepalive deadline.
        KEEPALIVE_TIMEOUT = 0x0a,
        /// The handshake did not complete in time.
        HANDSHAKE_TIMEOUT = 0x0b,
        /// The peer queued more control work than the limits allow.
        ENHANCE_YOUR_CALM = 0x0c,
        /// The sender failed on its own.
        INTERNAL_ERROR = 0x0d,
        /// Local only, never sent: the tunnel's transport was lost.
        CONNECTION_LOST = 0x0e,
        /// The local socket of an established stream failed.
        ABORTED = 0x0f,
        /// The destination refused the connection.
        DIAL_REFUSED = 0x100,
        /// Connecting to the destination timed out.
        DIAL_TIMEOUT = 0x101,
        /// The destination could not be reached or resolved.
        DIAL_UNREACHABLE = 0x102,
        /// The destination is not allowed by the acceptor's policy.
        DIAL_FORBIDDEN = 0x103,
        /// The DIAL's protocol is not supported.
        DIAL_UNSUPPORTED = 0x104,
    }
}

/// A stream id (SPEC 5.1). 0 names the session; the parity of a non-zero id tells who opened
/// it: odd ids are opened by the server end, even ids by the agent end.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct StreamId(pub u32);

impl StreamId {
    /// The session itself: frames that are not about one stream.
    pub const SESSION: StreamId = StreamId(0);

    /// Whether this is the session id 0.
    pub fn is_session(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The fixed frame header (SPEC 3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// What the payload is.
    pub kind: FrameKind,
    /// Kind-specific flag bits; undefined bits are zero.
    pub flags: u8,
    /// The stream, or 0 for the session.
    pub stream: StreamId,
    /// Payload length in bytes.
    pub len: u32,
}

impl Header {
    /// Parses a header from exactly [`HEADER_LEN`] bytes.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Header {
        Header {
            kind: FrameKind(b[0]),
            flags: b[1],
            stream: StreamId(u32::from_be_bytes([b[2], b[3], b[4], b[5]])),
            len: u32::from_be_bytes([b[6], b[7], b[8], b[9]]),
        }
    }

    /// Writes the header.
    pub fn encode(&self, dst: &mut impl BufMut) {
        dst.put_u8(self.kind.0);
        dst.put_u8(self.flags);
        dst.put_u32(self.stream.0);
        dst.put_u32(self.len);
    }

    /// The header as bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        let mut w = &mut out[..];
        self.encode(&mut w);
        out
    }
}

/// One frame (SPEC 3.2).
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Frame {
    /// HELLO, agent to server.
    Hello(Hello),
    /// WELCOME, server to agent.
    Welcome(Welcome),
    /// DIAL, opens a stream.
    Dial(Dial),
    /// DIAL_OK, the destination is connected.
    DialOk(DialOk),
    /// DATA, stream bytes.
    Data(Data),
    /// WINDOW, a credit increment.
    Window(WindowUpdate),
    /// RESET, aborts a stream.
    Reset(Reset),
    /// PING, keepalive.
    Ping(Ping),
    /// GOAWAY, drain or close.
    GoAway(GoAway),
    /// DRAINING: the sender will drain soon (SPEC 7.4).
    Draining,
    /// A kind this implementation does not know; ignored by the session (SPEC 3.2).
    Unknown(Unknown),
}

impl Frame {
    /// This frame's kind.
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Hello(_) => FrameKind::HELLO,
            Frame::Welcome(_) => FrameKind::WELCOME,
            Frame::Dial(_) => FrameKind::DIAL,
            Frame::DialOk(_) => FrameKind::DIAL_OK,
            Frame::Data(_) => FrameKind::DATA,
            Frame::Window(_) => FrameKind::WINDOW,
            Frame::Reset(_) => FrameKind::RESET,
            Frame::Ping(_) => FrameKind::PING,
            Frame::GoAway(_) => FrameKind::GOAWAY,
            Frame::Draining => FrameKind::DRAINING,
            Frame::Unknown(u) => u.kind,
        }
    }

    /// The stream this frame is about (0 for session frames).
    pub fn stream(&self) -> StreamId {
        match self {
            Frame::Dial(f) => f.stream,
            Frame::DialOk(f) => f.stream,
            Frame::Data(f) => f.stream,
            Frame::Window(f) => f.stream,
            Frame::Reset(f) => f.stream,
            Frame::Unknown(f) => f.stream,
            Frame::Hello(_)
            | Frame::Welcome(_)
            | Frame::Ping(_)
            | Frame::GoAway(_)
            | Frame::Draining => StreamId::SESSION,
        }
    }

    fn flags(&self) -> u8 {
        match self {
            Frame::Data(d) if d.fin => data::FLAG_FIN,
            Frame::Ping(p) if p.ack => ping::FLAG_ACK,
            Frame::Unknown(u) => u.flags,
            _ => 0,
        }
    }

    /// Payload length in bytes when encoded.
    pub fn payload_len(&self) -> usize {
        match self {
            Frame::Hello(f) => f.encoded_len(),
            Frame::Welcome(f) => f.encoded_len(),
            Frame::Dial(f) => f.encoded_len(),
            Frame::DialOk(_) => 0,
            Frame::Data(f) => f.payload.len(),
            Frame::Window(_) => 4,
            Frame::Reset(f) => f.encoded_len(),
            Frame::Ping(_) => 8,
            Frame::GoAway(f) => f.encoded_len(),
            Frame::Draining => 0,
            Frame::Unknown(f) => f.payload.len(),
        }
    }

    /// Total encoded length, header included.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload_len()
    }

    /// The header this frame encodes with.
    pub fn header(&self) -> Header {
        Header {
            kind: self.kind(),
            flags: self.flags(),
            stream: self.stream(),
            len: u32::try_from(self.payload_len()).unwrap_or(u32::MAX),
        }
    }

    /// Writes header and payload into `dst`.
    ///
    /// The frame must be valid (as every frame the decoder or the session produces is); a
    /// payload over [`MAX_PAYLOAD_LIMIT`] is the caller's bug.
    pub fn encode(&self, dst: &mut impl BufMut) {
        self.header().encode(dst);
        self.encode_payload(dst);
    }

    /// Writes only the payload (the header comes from [`Frame::header`]). For DATA and unknown
    /// frames prefer [`Frame::payload_bytes`], which hands the payload over without a copy.
    pub fn encode_payload(&self, dst: &mut impl BufMut) {
        match self {
            Frame::Hello(f) => f.encode(dst),
            Frame::Welcome(f) => f.encode(dst),
            Frame::Dial(f) => f.encode(dst),
            Frame::DialOk(_) => {}
            Frame::Data(f) => dst.put_slice(&f.payload),
            Frame::Window(f) => dst.put_u32(f.increment),
            Frame::Reset(f) => f.encode(dst),
            Frame::Ping(f) => dst.put_u64(f.payload),
            Frame::GoAway(f) => f.encode(dst),
            Frame::Draining => {}
            Frame::Unknown(f) => dst.put_slice(&f.payload),
        }
    }

    /// The payload as shared bytes, for frames whose payload is opaque bytes (DATA and unknown
    /// kinds): a vectored writer sends the header then these bytes without copying them.
    pub fn payload_bytes(&self) -> Option<&Bytes> {
        match self {
            Frame::Data(f) => Some(&f.payload),
            Frame::Unknown(f) => Some(&f.payload),
            _ => None,
        }
    }

    /// Decodes the payload of a frame whose header was already read and checked for length.
    /// `payload` is exactly `header.len` bytes; DATA and unknown payloads are slices of it.
    pub fn decode(header: Header, payload: Bytes) -> Result<Frame, DecodeError> {
        let kind = header.kind;
        let malformed = |reason| DecodeError::Malformed { kind, reason };
        //= SPEC §3.1
        //# a receiver MUST treat a frame with it set as malformed
        if header.stream.0 > MAX_STREAM_ID {
            return Err(malformed("reserved stream id bit is set"));
        }
        let wants_session = match kind {
            FrameKind::HELLO
            | FrameKind::WELCOME
            | FrameKind::PING
            | FrameKind::GOAWAY
            | FrameKind::DRAINING => Some(true),
            FrameKind::DIAL
            | FrameKind::DIAL_OK
            | FrameKind::DATA
            | FrameKind::WINDOW
            | FrameKind::RESET => Some(false),
            _ => None,
        };
        //= SPEC §3.1
        //# Session frames (HELLO, WELCOME, PING, GOAWAY) MUST use stream id 0; stream frames (DIAL,
        //# DIAL_OK, DATA, WINDOW, RESET) MUST use a non-zero stream id.
        match wants_session {
            Some(true) if !header.stream.is_session() => {
                return Err(malformed("session frame on a non-zero stream id"));
            }
            Some(false) if header.stream.is_session() => {
                return Err(malformed("stream frame on stream id 0"));
            }
            _ => {}
        }
        let allowed_flags = match kind {
            FrameKind::DATA => data::FLAG_FIN,
            FrameKind::PING => ping::FLAG_ACK,
            _ if wants_session.is_none() => 0xff,
            _ => 0,
        };
        if header.flags & !allowed_flags != 0 {
            //= SPEC §3.1
            //# a receiver MUST treat a frame of a known kind with an undefined flag bit set as
            //# malformed.
            return Err(malformed("undefined flag bits are set"));
        }
        let stream = header.stream;
        let p = &payload[..];
        let frame = match kind {
            FrameKind::HELLO => Hello::decode(p).map(Frame::Hello),
            FrameKind::WELCOME => Welcome::decode(p).map(Frame::Welcome),
            FrameKind::DIAL => Dial::decode(stream, p).map(Frame::Dial),
            FrameKind::DIAL_OK => DialOk::decode(stream, p).map(Frame::DialOk),
            FrameKind::DATA => Ok(Frame::Data(Data {
                stream,
                fin: header.flags & data::FLAG_FIN != 0,
                payload,
            })),
            FrameKind::WINDOW => WindowUpdate::decode(stream, p).map(Frame::Window),
            FrameKind::RESET => Reset::decode(stream, p).map(Frame::Reset),
            FrameKind::PING => Ping::decode(header.flags, p).map(Frame::Ping),
            FrameKind::GOAWAY => GoAway::decode(p).map(Frame::GoAway),
            FrameKind::DRAINING if p.is_empty() => Ok(Frame::Draining),
            FrameKind::DRAINING => Err("DRAINING carries no payload"),
            //= SPEC §3.2
            //# A frame of any other kind MUST be accepted by the decoder as long as its
            //# length is within the limit
            _ => Ok(Frame::Unknown(Unknown {
                kind,
                flags: header.flags,
                stream,
                payload,
            })),
        };
        frame.map_err(malformed)
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One line, `KIND key=value ...`: the form the test vectors state expected frames in
/// (`docs/vectors/README.md`). Tokens are shown by length only.
impl fmt::Display for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Frame::Hello(h) => h.describe(f),
            Frame::Welcome(w) => w.describe(f),
            Frame::Dial(d) => write!(
                f,
                "DIAL stream={} protocol={} host={} port={}",
                d.stream, d.protocol, d.host, d.port
            ),
            Frame::DialOk(d) => write!(f, "DIAL_OK stream={}", d.stream),
            Frame::Data(d) => write!(
                f,
                "DATA stream={} fin={} payload={}",
                d.stream,
                u8::from(d.fin),
                Hex(&d.payload)
            ),
            Frame::Window(w) => write!(f, "WINDOW stream={} increment={}", w.stream, w.increment),
            Frame::Reset(r) => write!(
                f,
                "RESET stream={} code={} reason={:?}",
                r.stream, r.code, r.reason
            ),
            Frame::Ping(p) => write!(
                f,
                "PING ack={} payload={:#018x}",
                u8::from(p.ack),
                p.payload
            ),
            Frame::GoAway(g) => write!(
                f,
                "GOAWAY last_stream={} code={} reason={:?}",
                g.last_stream, g.code, g.reason
            ),
            Frame::Draining => f.write_str("DRAINING"),
            Frame::Unknown(u) => write!(
                f,
                "UNKNOWN kind={:#04x} flags={:#04x} stream={} payload={}",
                u.kind.0,
                u.flags,
                u.stream,
                Hex(&u.payload)
            ),
        }
    }
}

/// Lower-case hex of a byte string, `-` when empty.
pub(crate) struct Hex<'a>(pub(crate) &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("-");
        }
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

macro_rules! from_frame {
    ($($variant:ident($ty:ty)),*) => {
        $( impl From<$ty> for Frame {
            fn from(f: $ty) -> Frame { Frame::$variant(f) }
        } )*
    };
}
from_frame!(
    Hello(Hello),
    Welcome(Welcome),
    Dial(Dial),
    DialOk(DialOk),
    Data(Data),
    Window(WindowUpdate),
    Reset(Reset),
    Ping(Ping),
    GoAway(GoAway),
    Unknown(Unknown)
);
