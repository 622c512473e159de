//! The model's state: the two ends (a real `Session` each, and the application around it), the
//! wire between them, and the bounds of a configuration.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use tether_proto::frame::{Frame, MIN_MAX_FRAME_SIZE, StreamId};
use tether_proto::{Config, ErrorCode, Initiator, Role, Session};

use crate::rogue::{Misbehavior, Verdict};

/// The bounds of one model configuration.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Bounds {
    /// Streams the server end may open.
    pub server_opens: u8,
    /// Streams the agent end may open.
    pub agent_opens: u8,
    /// MAX_CONCURRENT_STREAMS the server announces: agent-opened streams it admits at once.
    pub server_max_streams: u32,
    /// MAX_CONCURRENT_STREAMS the agent announces: server-opened streams it admits at once.
    pub agent_max_streams: u32,
    /// INITIAL_WINDOW of both ends, in bytes.
    pub window: u32,
    /// Chunks the opener of a stream sends on it before it may finish.
    pub chunks: u8,
    /// Chunks the acceptor of a stream sends on it before it may finish.
    pub reply_chunks: u8,
    /// Bytes per chunk (over MAX_FRAME_SIZE, 1,024, a chunk goes out in several frames).
    pub chunk_size: u16,
    /// Resets (or walk-aways) each end's application may do.
    pub resets: u8,
    /// PINGs each end's application may send.
    pub pings: u8,
    /// GOAWAYs each end's application may start.
    pub goaways: u8,
    /// DRAINING notices each end's application may announce (SPEC 7.4).
    pub notices: u8,
    /// Whether the tunnel may drop (both ends see it).
    pub drop: bool,
    /// Timer firings per end (keepalive and handshake deadlines, keepalive PINGs).
    pub timers: u8,
    /// Whether the ends announce a keepalive interval (PINGs from the timer).
    pub keepalive: bool,
    /// Whether the model starts before HELLO: the server's application accepts or refuses
    /// the agent, a second initial state offers a version the server does not speak, and the
    /// handshake deadline is armed.
    pub handshake: bool,
    /// Whether frames leave a session only on a `Flush` step (a writer that batches), so
    /// several chunks can queue on a stream; otherwise every step flushes.
    pub batching: bool,
    /// Each end's own send buffer (`max_send_window`), in bytes; 0 leaves the default, which
    /// is above any window here (SPEC 6.2: a sender holds at most this much unsent).
    pub send_buffer: u32,
    /// The misbehaviours the agent end may commit (one per run); empty for an honest agent.
    pub rogue: Vec<Misbehavior>,
}

impl Bounds {
    /// The smallest interesting configuration: one stream, a 1-byte window, one chunk, a reset,
    /// a drain, tunnel loss. Seconds in a debug build.
    pub fn tiny() -> Bounds {
        Bounds {
            server_opens: 1,
            agent_opens: 0,
            server_max_streams: 2,
            agent_max_streams: 2,
            window: 1,
            chunks: 1,
            reply_chunks: 1,
            chunk_size: 1,
            resets: 1,
            pings: 0,
            goaways: 1,
            notices: 0,
            drop: true,
            timers: 0,
            keepalive: false,
            handshake: false,
            batching: false,
            send_buffer: 0,
            rogue: Vec::new(),
        }
    }

    pub(crate) fn config(&self, role: Role) -> Config {
        Config {
            initial_window: self.window,
            max_frame_size: MIN_MAX_FRAME_SIZE,
            max_concurrent_streams: match role {
                Role::Server => self.server_max_streams,
                Role::Agent => self.agent_max_streams,
            },
            keepalive_interval_ms: if self.keepalive { 1000 } else { 0 },
            keepalive_timeout_ms: 500,
            handshake_timeout_ms: if self.handshake { 3000 } else { 0 },
            max_send_window: match self.send_buffer {
                0 => Config::default().max_send_window,
                n => n,
            },
            ..Config::default()
        }
    }

    /// The bytes end `role` sends on stream `id` in all.
    pub(crate) fn total(&self, role: Role, id: StreamId) -> usize {
        let chunks = if role.opens(id) {
            self.chunks
        } else {
            self.reply_chunks
        };
        usize::from(chunks) * usize::from(self.chunk_size)
    }

    /// How many frames may be in flight in one direction before the model calls it a flood.
    pub fn max_in_flight(&self) -> usize {
        let streams = usize::from(self.server_opens) + usize::from(self.agent_opens);
        let frames_per_chunk = usize::from(self.chunk_size).div_ceil(1024).max(1);
        let chunks = usize::from(self.chunks) + usize::from(self.reply_chunks);
        let per_stream = 4 + 2 * chunks * (frames_per_chunk + 1);
        let rogue = 2 * self.server_max_streams as usize + 2;
        streams * per_stream + rogue + 8
    }
}

/// How a stream ended, as one end's application saw it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Both FINs exchanged and read.
    Completed,
    /// A dial this end opened failed.
    DialFailed(ErrorCode, Initiator),
    /// Reset (by either end, or by the session's end).
    Reset(ErrorCode, Initiator),
    /// This end's application reset it.
    ResetLocally,
    /// This end's application walked away from it (dropped its handle) while it was live.
    Abandoned,
}

/// Where a stream is, as one end's application sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AppPhase {
    /// Opened here, waiting for the answer.
    Dialing,
    /// Requested by the peer, not decided yet.
    Pending,
    /// Established.
    Open,
    /// Over.
    Ended(Outcome),
}

/// One stream from one end's application, and what the wire showed of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AppStream {
    /// Where it is.
    pub phase: AppPhase,
    /// Bytes `send` accepted, in order.
    pub sent: Vec<u8>,
    /// Bytes `recv` returned, in order.
    pub received: Vec<u8>,
    /// `finish` was called.
    pub finished: bool,
    /// A `Readable` arrived and `recv` has not yet come up empty.
    pub readable: bool,
    /// `recv` returned the end (the peer's FIN).
    pub got_fin: bool,
    /// Credit the peer returned in WINDOW frames it sent.
    pub credited: u64,
    /// The send window reached 0 at some point.
    pub exhausted: bool,
    /// After being exhausted, credit came back (`Writable`).
    pub reopened: bool,
    /// The last `send` was cut short or used the last credit: the application waits for
    /// `Writable` before it sends again, as the tunnel adapter does.
    pub blocked: bool,
    /// The application reset it while it was dialing (a cancel).
    pub cancelled: bool,
    /// This end's DIAL for it is on the wire.
    pub dial_on_wire: bool,
    /// This end's DIAL_OK for it is on the wire.
    pub dial_ok_on_wire: bool,
    /// This end's FIN for it is on the wire.
    pub fin_on_wire: bool,
}

impl AppStream {
    pub(crate) fn new(phase: AppPhase) -> AppStream {
        AppStream {
            phase,
            sent: Vec::new(),
            received: Vec::new(),
            finished: false,
            readable: false,
            got_fin: false,
            credited: 0,
            exhausted: false,
            reopened: false,
            blocked: false,
            cancelled: false,
            dial_on_wire: false,
            dial_ok_on_wire: false,
            fin_on_wire: false,
        }
    }

    /// Whether the application sees it over.
    pub fn ended(&self) -> bool {
        matches!(self.phase, AppPhase::Ended(_))
    }

    pub(crate) fn reset_here(&self) -> bool {
        matches!(
            self.phase,
            AppPhase::Ended(Outcome::ResetLocally | Outcome::Abandoned)
        )
    }

    /// Open here, and the peer knows it (the DIAL_OK went out, or this end opened it).
    pub(crate) fn may_send_data(&self) -> bool {
        self.phase == AppPhase::Open && (self.dial_on_wire || self.dial_ok_on_wire)
    }
}

/// One actor: a real session and the application around it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct End {
    /// The real session.
    pub session: Session,
    /// Opens left.
    pub opens_left: u8,
    /// Resets (and walk-aways) left.
    pub resets_left: u8,
    /// Pings left.
    pub pings_left: u8,
    /// GOAWAYs left.
    pub goaways_left: u8,
    /// DRAINING notices left.
    pub notices_left: u8,
    /// DRAINING frames this end put on the wire.
    pub drainings_sent: u8,
    /// Timer firings left.
    pub timers_left: u8,
    /// Server end: a HELLO waits for the application's decision.
    pub hello_pending: bool,
    /// Agent end: its HELLO is on the wire.
    pub hello_sent: bool,
    /// Every stream this application learned of, by id.
    pub streams: BTreeMap<StreamId, AppStream>,
    /// The highest DIAL id this end put on the wire.
    pub last_dial: u32,
    /// This end put a GOAWAY on the wire.
    pub goaway_sent: bool,
    /// This end's application started a drain.
    pub drain_started: bool,
    /// A PING of this end is on its way or unanswered (the keepalive deadline may run).
    pub ping_unanswered: bool,
    /// PINGs this end put on the wire.
    pub pings_sent: u8,
    /// PING answers (ACKs) delivered to this end.
    pub answers: u8,
    /// Facts about what happened at this end that properties look at.
    pub seen: Seen,
}

/// What happened at one end, for the properties.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Seen {
    /// A DIAL id went out that was not above the previous one.
    pub id_reused: bool,
    /// A stream got a second final outcome, or an event after its end.
    pub double_end: bool,
    /// A GOAWAY arrived while a stream was open here.
    pub goaway_with_open_stream: bool,
    /// The keepalive deadline closed the session with no PING unanswered.
    pub keepalive_without_ping: bool,
    /// `open` failed because the peer's MAX_CONCURRENT_STREAMS was reached.
    pub open_at_limit: bool,
    /// Two streams this end opened were live at once.
    pub two_live: bool,
    /// Bytes of more than one chunk were queued on one stream at once.
    pub chunks_queued: bool,
    /// A DATA frame went out at MAX_FRAME_SIZE with more of its chunk behind it.
    pub split: bool,
    /// A `send` was cut short by this end's own send buffer while the window had room.
    pub send_buffer_full: bool,
    /// A PING went out that the application did not ask for (the keepalive timer's).
    pub keepalive_ping: bool,
    /// The application's PING was answered (`PingAnswered`).
    pub ping_answered: bool,
    /// The peer's application walked away from a stream this end still held: a RESET CANCEL
    /// that the peer's session sent on its own.
    pub reset_by_walkaway: bool,
    /// A DRAINING frame went out after this end's GOAWAY.
    pub draining_after_goaway: bool,
    /// This end accepted a dial after it announced a drain (and before its GOAWAY).
    pub dialled_after_notice: bool,
}

/// One item on the wire: a frame, or the misbehaving agent's bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Wire {
    /// A frame an honest session produced.
    Frame(Frame),
    /// Bytes of a misbehaviour, delivered through the decoder.
    Rogue(Misbehavior, Bytes),
}

/// The whole model state.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelState {
    /// `ends[0]` is the server end, `ends[1]` the agent end.
    pub ends: [End; 2],
    /// `wire[i]`: what is on its way to `ends[i]`, in order.
    pub wire: [VecDeque<Wire>; 2],
    /// The tunnel dropped.
    pub dropped: bool,
    /// The logical clock: moves only when a timer fires.
    pub now: u64,
    /// The highest agent-opened stream id whose DIAL reached the server.
    pub agent_id_seen: u32,
    /// The misbehaving agent has done its one bad deed.
    pub rogue_done: bool,
    /// How the honest end answered it.
    pub verdict: Option<Verdict>,
    /// After an input step, delivering what was in flight never settled: the ends kept
    /// answering each other with no application or timer input.
    pub endless: bool,
}

/// A step of the model.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// End opens a stream.
    Open(usize),
    /// End accepts a pending dial.
    Accept(usize, StreamId),
    /// End rejects a pending dial.
    Reject(usize, StreamId),
    /// End sends the rest of its current chunk, as far as the window allows.
    Send(usize, StreamId),
    /// End half-closes (after sending every chunk).
    Finish(usize, StreamId),
    /// End resets the stream.
    Reset(usize, StreamId),
    /// End's application drops its handle of a live stream (the core's drop policy).
    Abandon(usize, StreamId),
    /// End reads what arrived, one chunk at most.
    Read(usize, StreamId),
    /// End releases up to one chunk of consumed bytes.
    Release(usize, StreamId),
    /// End sends a PING.
    Ping(usize),
    /// End starts a drain.
    GoAway(usize),
    /// End announces a drain to come (DRAINING).
    Notice(usize),
    /// The server's application accepts the agent's HELLO.
    Welcome,
    /// The server's application refuses the agent's HELLO.
    Refuse,
    /// End's writer puts everything its session has queued on the wire.
    Flush(usize),
    /// The next item in flight to the end arrives.
    Deliver(usize),
    /// The end's next timer fires.
    Timeout(usize),
    /// The tunnel drops.
    Drop,
    /// The misbehaving agent sends its bad bytes.
    Rogue(Misbehavior),
}

impl Action {
    /// Whether the step moves the run toward its end: every stream's life and the handshake
    /// can be finished with these alone. A state where none is enabled must have nothing left
    /// hanging (the optional steps, opens, resets, pings, drains, timers, faults, cannot be
    /// what a healthy run waits for).
    pub fn is_progress(&self) -> bool {
        matches!(
            self,
            Action::Accept(..)
                | Action::Send(..)
                | Action::Finish(..)
                | Action::Read(..)
                | Action::Release(..)
                | Action::Welcome
                | Action::Flush(_)
                | Action::Deliver(_)
        )
    }

    /// Whether the step is input from outside the two sessions (an application, a timer, a
    /// fault); deliveries and flushes are the sessions talking among themselves.
    pub fn is_input(&self) -> bool {
        !matches!(self, Action::Flush(_) | Action::Deliver(_))
    }
}
