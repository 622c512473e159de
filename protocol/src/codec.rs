//! Streaming frame codec (SPEC 3.1, 3.6).
//!
//! Decoding is streaming: a partial frame asks for more bytes and consumes nothing. The payload
//! length is checked against the limit as soon as the header is complete, before any byte of the
//! payload is buffered or any memory reserved for it. DATA payloads are `Bytes` slices of the
//! read buffer.

use bytes::{Buf, BytesMut};
use nom::IResult;
use nom::number::streaming::{be_u8, be_u32};

use crate::error::DecodeError;
use crate::frame::Frame;
use crate::frame::{
    FrameKind, HANDSHAKE_MAX_PAYLOAD, HEADER_LEN, Header, MAX_PAYLOAD_LIMIT, StreamId,
};

/// Decodes frames from a byte buffer and encodes them into one.
///
/// The payload limit starts at [`HANDSHAKE_MAX_PAYLOAD`] and is raised by the session to the
/// MAX_FRAME_SIZE it announced once the handshake is done.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FrameCodec {
    max_payload: u32,
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec {
            max_payload: HANDSHAKE_MAX_PAYLOAD,
        }
    }
}

fn header(i: &[u8]) -> IResult<&[u8], Header, ()> {
    let (i, kind) = be_u8(i)?;
    let (i, flags) = be_u8(i)?;
    let (i, stream) = be_u32(i)?;
    let (i, len) = be_u32(i)?;
    Ok((
        i,
        Header {
            kind: FrameKind(kind),
            flags,
            stream: StreamId(stream),
            len,
        },
    ))
}

impl FrameCodec {
    /// A codec with the given payload limit (clamped to [`MAX_PAYLOAD_LIMIT`]).
    pub fn with_max_payload(max_payload: u32) -> Self {
        FrameCodec {
            max_payload: max_payload.min(MAX_PAYLOAD_LIMIT),
        }
    }

    /// The largest payload the decoder accepts.
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// Changes the largest payload the decoder accepts (clamped to [`MAX_PAYLOAD_LIMIT`]).
    pub fn set_max_payload(&mut self, max_payload: u32) {
        self.max_payload = max_payload.min(MAX_PAYLOAD_LIMIT);
    }

    /// Reads the header at the front of `src`, if it is complete, and checks its length.
    /// Consumes nothing.
    pub fn peek_header(&self, src: &[u8]) -> Result<Option<Header>, DecodeError> {
        let Ok((_, h)) = header(src) else {
            return Ok(None);
        };
        //= SPEC §3.6
        //# A receiver MUST check the length as soon as the 10 header bytes are in, before it
        //# buffers or allocates anything for the payload
        if h.len > self.max_payload {
            return Err(DecodeError::TooLarge {
                kind: h.kind,
                len: h.len,
                max: self.max_payload,
            });
        }
        Ok(Some(h))
    }

    /// Decodes one frame from the front of `src`.
    ///
    /// `Ok(None)`: not a whole frame yet; nothing was consumed (capacity for the rest of the
    /// frame may be reserved, bounded by the limit). `Err`: the tunnel must close; what was
    /// consumed is unspecified.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        let Some(h) = self.peek_header(src)? else {
            return Ok(None);
        };
        let total = HEADER_LEN + h.len as usize;
        //= SPEC §3.6
        //# A decoder that has a partial frame MUST NOT consume any of it.
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let mut whole = src.split_to(total).freeze();
        whole.advance(HEADER_LEN);
        Frame::decode(h, whole).map(Some)
    }

    /// Appends `frame`, header and payload, to `dst`.
    pub fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) {
        dst.reserve(frame.encoded_len());
        frame.encode(dst);
    }
}

#[cfg(feature = "tokio-codec")]
mod tokio_impls {
    use bytes::BytesMut;

    use super::FrameCodec;
    use crate::error::DecodeError;
    use crate::frame::Frame;

    /// What `Framed` can fail with: the bytes, or the transport under them.
    #[derive(Debug)]
    pub enum CodecError {
        /// The peer's bytes do not parse.
        Decode(DecodeError),
        /// The transport failed.
        Io(std::io::Error),
    }

    impl From<std::io::Error> for CodecError {
        fn from(e: std::io::Error) -> Self {
            CodecError::Io(e)
        }
    }

    impl From<DecodeError> for CodecError {
        fn from(e: DecodeError) -> Self {
            CodecError::Decode(e)
        }
    }

    impl core::fmt::Display for CodecError {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            match self {
                CodecError::Decode(e) => e.fmt(f),
                CodecError::Io(e) => e.fmt(f),
            }
        }
    }

    impl std::error::Error for CodecError {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            match self {
                CodecError::Decode(e) => Some(e),
                CodecError::Io(e) => Some(e),
            }
        }
    }

    impl tokio_util::codec::Decoder for FrameCodec {
        type Item = Frame;
        type Error = CodecError;

        fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
            Ok(FrameCodec::decode(self, src)?)
        }
    }

    impl tokio_util::codec::Encoder<&Frame> for FrameCodec {
        type Error = CodecError;

        fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
            FrameCodec::encode(self, frame, dst);
            Ok(())
        }
    }

    impl tokio_util::codec::Encoder<Frame> for FrameCodec {
        type Error = CodecError;

        fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
            FrameCodec::encode(self, &frame, dst);
            Ok(())
        }
    }
}

#[cfg(feature = "tokio-codec")]
pub use tokio_impls::CodecError;
