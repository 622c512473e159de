//! The misbehaving agent: every class of peer misbehaviour SPEC §4.1, §5.4, §6.3 and §8.2 name,
//! as a frame (or raw bytes) the agent end may put on the wire once, and the answer the SPEC
//! demands of the honest server end.
//!
//! The expected answer is worked out from the SPEC's tables and the honest end's public state
//! at the moment the bytes arrive (a frame for a stream the honest end already closed is
//! ignored, §5.4), never from the session's private fields.

use bytes::{Bytes, BytesMut};
use tether_proto::frame::{Data, Dial, ErrorCode, Frame, HEADER_LEN, Header, Protocol, StreamId};
use tether_proto::{CloseReason, Role, Session, StreamState};

/// A way the agent end breaks the protocol on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Misbehavior {
    /// A PING after HELLO, before WELCOME (SPEC 4.1): `PROTOCOL_ERROR`.
    FrameBeforeWelcome,
    /// A second HELLO in the open session (SPEC 4.1): `PROTOCOL_ERROR`.
    HelloInOpenSession,
    /// A DIAL with the server's parity (SPEC 5.4): `PROTOCOL_ERROR`.
    DialWithWrongParity,
    /// A DIAL with an id it already used (SPEC 5.4): `PROTOCOL_ERROR`.
    ReusesStreamId,
    /// A DIAL after its own GOAWAY (SPEC 5.4): `PROTOCOL_ERROR`.
    DialAfterGoAway,
    /// More DIALs at once than the server admits plus MAX_CONCURRENT_STREAMS + 1 refusals
    /// (SPEC 5.4, 10): `ENHANCE_YOUR_CALM`. One DIAL over the limit is refused on the way.
    DialFlood,
    /// DATA for an id nobody opened (SPEC 5.4): `PROTOCOL_ERROR`.
    FrameForUnopenedStream,
    /// DIAL_OK for a stream the agent itself opened (SPEC 5.4): `PROTOCOL_ERROR`.
    DialOkForOwnStream,
    /// A second DIAL_OK (SPEC 5.4): `PROTOCOL_ERROR`.
    SecondDialOk,
    /// DATA on a stream it has not accepted (SPEC 5.4): `PROTOCOL_ERROR`.
    DataBeforeAccept,
    /// DATA after its own FIN (SPEC 5.4): `STREAM_CLOSED`.
    DataAfterFin,
    /// DATA beyond the window it was given (SPEC 6.3): `FLOW_CONTROL_ERROR`.
    IgnoresWindow,
    /// A WINDOW that returns more credit than was sent (SPEC 6.3): `FLOW_CONTROL_ERROR`.
    OverGrants,
    /// A frame whose payload does not parse (SPEC 8.2): `MALFORMED_FRAME`.
    Malformed,
    /// A header announcing a payload over MAX_FRAME_SIZE (SPEC 3.6): `FRAME_TOO_LARGE`.
    TooLarge,
}

impl Misbehavior {
    /// Every class, in a fixed order.
    pub const ALL: [Misbehavior; 15] = [
        Misbehavior::FrameBeforeWelcome,
        Misbehavior::HelloInOpenSession,
        Misbehavior::DialWithWrongParity,
        Misbehavior::ReusesStreamId,
        Misbehavior::DialAfterGoAway,
        Misbehavior::DialFlood,
        Misbehavior::FrameForUnopenedStream,
        Misbehavior::DialOkForOwnStream,
        Misbehavior::SecondDialOk,
        Misbehavior::DataBeforeAccept,
        Misbehavior::DataAfterFin,
        Misbehavior::IgnoresWindow,
        Misbehavior::OverGrants,
        Misbehavior::Malformed,
        Misbehavior::TooLarge,
    ];

    /// The code the SPEC demands when the honest end meets it on a live stream or session.
    pub fn code(self) -> ErrorCode {
        match self {
            Misbehavior::DialFlood => ErrorCode::ENHANCE_YOUR_CALM,
            Misbehavior::DataAfterFin => ErrorCode::STREAM_CLOSED,
            Misbehavior::IgnoresWindow | Misbehavior::OverGrants => ErrorCode::FLOW_CONTROL_ERROR,
            Misbehavior::Malformed => ErrorCode::MALFORMED_FRAME,
            Misbehavior::TooLarge => ErrorCode::FRAME_TOO_LARGE,
            _ => ErrorCode::PROTOCOL_ERROR,
        }
    }

    /// The `sometimes` property that says the honest end met this misbehaviour and named it.
    pub fn detected(self) -> &'static str {
        match self {
            Misbehavior::FrameBeforeWelcome => "the honest end detects a frame before WELCOME",
            Misbehavior::HelloInOpenSession => "the honest end detects a HELLO in an open session",
            Misbehavior::DialWithWrongParity => "the honest end detects a DIAL with its own parity",
            Misbehavior::ReusesStreamId => "the honest end detects a reused stream id",
            Misbehavior::DialAfterGoAway => "the honest end detects a DIAL after GOAWAY",
            Misbehavior::DialFlood => "the honest end detects a flood of DIALs over its limit",
            Misbehavior::FrameForUnopenedStream => {
                "the honest end detects a frame for an unopened stream"
            }
            Misbehavior::DialOkForOwnStream => {
                "the honest end detects DIAL_OK for a stream the peer opened"
            }
            Misbehavior::SecondDialOk => "the honest end detects a second DIAL_OK",
            Misbehavior::DataBeforeAccept => "the honest end detects DATA before DIAL_OK",
            Misbehavior::DataAfterFin => "the honest end detects DATA after FIN",
            Misbehavior::IgnoresWindow => "the honest end detects DATA beyond the window",
            Misbehavior::OverGrants => "the honest end detects a WINDOW over-grant",
            Misbehavior::Malformed => "the honest end detects a malformed frame",
            Misbehavior::TooLarge => "the honest end detects a frame over MAX_FRAME_SIZE",
        }
    }
}

/// What the honest end did, or must do, with the misbehaving bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Answer {
    /// Closed the session with GOAWAY and this code.
    Closes(ErrorCode),
    /// Went on: the frame was for a stream it had already closed (SPEC 5.4), or the session
    /// was already over.
    Ignores,
}

/// The misbehaving bytes delivered, what the SPEC demands, and what the honest end did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Verdict {
    /// What was sent.
    pub misbehavior: Misbehavior,
    /// What the SPEC demands.
    pub expected: Answer,
    /// What the honest end did.
    pub actual: Answer,
}

/// An id no honest end in the model reaches: the agent's parity, far above its opens.
pub(crate) const FRESH_AGENT_ID: u32 = 1000;
/// An id with the server's parity that the server never reaches.
pub(crate) const FRESH_SERVER_ID: u32 = 1001;

pub(crate) fn encode(frames: &[Frame]) -> Bytes {
    let mut b = BytesMut::new();
    for f in frames {
        f.encode(&mut b);
    }
    b.freeze()
}

pub(crate) fn data(stream: StreamId, len: usize) -> Frame {
    Frame::Data(Data {
        stream,
        fin: false,
        payload: Bytes::from(vec![0xfe; len]),
    })
}

pub(crate) fn dial(id: u32) -> Frame {
    Frame::Dial(Dial {
        stream: StreamId(id),
        protocol: Protocol::TCP,
        host: "rogue".into(),
        port: 1,
    })
}

/// What the SPEC demands of the honest end `server` when `m` arrives now. `seen_agent_id` is
/// the highest stream id the agent opened that has reached the server.
pub fn expected(
    m: Misbehavior,
    server: &Session,
    target: Option<StreamId>,
    seen_agent_id: u32,
) -> Answer {
    if server.is_closed() {
        return Answer::Ignores;
    }
    let state = target.and_then(|id| server.stream_state(id));
    let gone = matches!(
        state,
        Some(StreamState::Resetting | StreamState::Closed | StreamState::Failed)
    );
    match m {
        // Before WELCOME is on its way, anything but HELLO/GOAWAY is out of order; after it,
        // a PING is a PING.
        Misbehavior::FrameBeforeWelcome if server.is_established() => Answer::Ignores,
        // §5.4: frames for a stream this end already closed (or is resetting) are ignored; an
        // id the peer opened that is no longer in the table was closed, not unopened.
        Misbehavior::DialOkForOwnStream
        | Misbehavior::SecondDialOk
        | Misbehavior::DataBeforeAccept
        | Misbehavior::IgnoresWindow
        | Misbehavior::OverGrants
            if gone
                || (state.is_none()
                    && target
                        .is_some_and(|id| id.0 <= seen_agent_id || Role::Server.opens(id))) =>
        {
            Answer::Ignores
        }
        Misbehavior::DataAfterFin
            if !matches!(
                state,
                Some(StreamState::HalfClosedRemote | StreamState::Closing)
            ) =>
        {
            Answer::Ignores
        }
        m => Answer::Closes(m.code()),
    }
}

/// The stream a misbehaving frame names, if any.
pub fn target(bytes: &[u8]) -> Option<StreamId> {
    let head: &[u8; HEADER_LEN] = bytes.get(..HEADER_LEN)?.try_into().ok()?;
    let h = Header::parse(head);
    (h.stream.0 != 0).then_some(h.stream)
}

/// What the honest end did, from its close reason after the bytes.
pub fn actual(server: &Session, was_closed: bool) -> Answer {
    match server.close_reason() {
        Some(CloseReason::Violation(e)) if !was_closed => Answer::Closes(e.code),
        _ => Answer::Ignores,
    }
}
