//! tether-proto: the sans-IO core of tether, an agent-initiated reverse tunnel.
//!
//! An agent on a node dials out to a server and keeps that connection (the tunnel) open; the
//! server then carries many TCP connections (streams) through it. This crate is the protocol
//! alone: frames and their [`codec`], and the [`Session`] state machine with stream states
//! and flow control. It does no I/O, reads no clock and draws no random number, so the same
//! value can be driven by tokio, a model checker or a fuzzer. The normative description is
//! `docs/SPEC.md`; comments cite its sections.
//!
//! The smallest use, decoding a frame:
//!
//! ```
//! use bytes::BytesMut;
//! use tether_proto::{Frame, FrameCodec, frame::{Data, StreamId}};
//!
//! let mut codec = FrameCodec::with_max_payload(65_536);
//! let mut buf = BytesMut::new();
//! let frame = Frame::Data(Data { stream: StreamId(1), fin: true, payload: "hi".into() });
//! codec.encode(&frame, &mut buf);
//! assert_eq!(codec.decode(&mut buf).unwrap(), Some(frame));
//! ```
#![forbid(unsafe_code)]

pub mod codec;
pub mod error;
pub mod frame;
#[cfg(feature = "arbitrary")]
pub mod fuzzing;
pub mod session;
#[cfg(feature = "testing")]
pub mod testing;
mod time;

pub use codec::FrameCodec;
pub use error::{ApiError, CloseReason, DecodeError, Initiator, ProtocolError, StreamError};
pub use frame::{ErrorCode, Frame, FrameKind, StreamId};
pub use session::{AgentIdentity, Config, Event, Role, ServerIdentity, Session, StreamState};
pub use time::Time;
