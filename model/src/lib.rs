//! tether-model: stateright models that drive tether-proto's real [`Session`].
//!
//! The model holds two real sessions, a server end and an agent end, each wrapped in an actor
//! ([`End`]) that plays a small nondeterministic application around it, joined by an ordered
//! network (two FIFO queues of frames, because the tunnel is TCP). Every step calls the real
//! `Session` methods; the checker hashes the real `Session` values. Nothing of the protocol is
//! re-implemented here: the model only decides *what happens next* and checks properties.
//!
//! [`suite`] names the configurations the default `check` runs, each complete, each with the
//! `sometimes` properties it must reach; verdicts are exit codes.
//!
//! ```
//! use stateright::{Checker, Model};
//! use tether_model::{Bounds, TunnelModel};
//!
//! // One stream, no faults: seconds in a debug build.
//! let bounds = Bounds { resets: 0, goaways: 0, drop: false, ..Bounds::tiny() };
//! let checker = TunnelModel::new(bounds).checker().spawn_dfs().join();
//! assert!(checker.is_done());
//! checker.assert_no_discovery("invariants hold at both ends (SPEC 10)");
//! checker.assert_no_discovery("every stream ends exactly once (SPEC 5.2)");
//! ```

pub mod properties;
pub mod rogue;
pub mod suite;

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use stateright::{Model, Property};
use tether_proto::frame::{Frame, MIN_MAX_FRAME_SIZE, Protocol, StreamId};
use tether_proto::testing::{test_agent_identity, test_server_identity};
use tether_proto::{
    ApiError, CloseReason, Config, ErrorCode, Event, Initiator, Role, Session, StreamState, Time,
};

pub use rogue::{Answer, Misbehavior, Verdict};

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
            drop: true,
            timers: 0,
            keepalive: false,
            handshake: false,
            batching: false,
            send_buffer: 0,
            rogue: Vec::new(),
        }
    }

    fn config(&self, role: Role) -> Config {
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
    fn total(&self, role: Role, id: StreamId) -> usize {
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
    fn new(phase: AppPhase) -> AppStream {
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

    fn reset_here(&self) -> bool {
        matches!(
            self.phase,
            AppPhase::Ended(Outcome::ResetLocally | Outcome::Abandoned)
        )
    }

    /// Open here, and the peer knows it (the DIAL_OK went out, or this end opened it).
    fn may_send_data(&self) -> bool {
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

/// The model: bounds in, states of two real sessions out.
#[derive(Debug, Clone)]
pub struct TunnelModel {
    /// The configuration.
    pub bounds: Bounds,
}

fn chunk_byte(end: usize, id: StreamId, k: usize) -> u8 {
    // Distinct per end, stream and position, so a misdelivered byte shows.
    let end = u8::from(end == 1);
    let stream = (id.0 & 0x7).to_le_bytes()[0];
    let k = k.to_le_bytes()[0] & 0xf;
    end << 7 | stream << 4 | k
}

/// Steps of delivery alone after which the sessions must have stopped talking.
const SETTLE_STEPS: usize = 256;

impl TunnelModel {
    /// A model with these bounds.
    pub fn new(bounds: Bounds) -> TunnelModel {
        TunnelModel { bounds }
    }

    /// The actions of the applications and of the misbehaving agent (not deliveries, flushes,
    /// timers or faults).
    pub fn app_actions(&self, state: &ModelState, out: &mut Vec<Action>) {
        let b = &self.bounds;
        for (i, end) in state.ends.iter().enumerate() {
            let s = &end.session;
            if s.is_closed() {
                // Only reading what a complete stream still holds is left to do.
                for (id, st) in &end.streams {
                    if st.readable && !st.ended() {
                        out.push(Action::Read(i, *id));
                    }
                }
                continue;
            }
            if i == 0 && end.hello_pending {
                out.push(Action::Welcome);
                out.push(Action::Refuse);
            }
            if !s.is_established() {
                continue;
            }
            if end.opens_left > 0 {
                out.push(Action::Open(i));
            }
            if end.pings_left > 0 {
                out.push(Action::Ping(i));
            }
            if end.goaways_left > 0 {
                out.push(Action::GoAway(i));
            }
            for (id, st) in &end.streams {
                let id = *id;
                match st.phase {
                    AppPhase::Pending => {
                        out.push(Action::Accept(i, id));
                        out.push(Action::Reject(i, id));
                    }
                    AppPhase::Open => {
                        let total = b.total(s.role(), id);
                        if st.sent.len() < total && !st.blocked {
                            out.push(Action::Send(i, id));
                        }
                        if st.sent.len() == total && !st.finished {
                            out.push(Action::Finish(i, id));
                        }
                    }
                    AppPhase::Dialing | AppPhase::Ended(_) => {}
                }
                if !st.ended() && end.resets_left > 0 {
                    out.push(Action::Reset(i, id));
                    out.push(Action::Abandon(i, id));
                }
                if st.readable && !st.ended() {
                    out.push(Action::Read(i, id));
                }
                if s.unreleased(id) > 0 {
                    out.push(Action::Release(i, id));
                }
            }
        }
        if !state.rogue_done && !state.dropped {
            for m in &b.rogue {
                if rogue::bytes(*m, state, b.server_max_streams).is_some() {
                    out.push(Action::Rogue(*m));
                }
            }
        }
    }

    /// Whether no step that moves the run toward its end is enabled (see
    /// [`Action::is_progress`]): nothing in flight, nothing to flush, no application step a
    /// healthy stream or handshake waits for.
    pub fn is_quiescent(&self, state: &ModelState) -> bool {
        let mut acts = Vec::new();
        self.actions(state, &mut acts);
        !acts.iter().any(Action::is_progress)
    }

    /// Moves every frame end `i` has to send onto the wire, observing them.
    fn transmit(&self, state: &mut ModelState, i: usize) {
        let chunk = usize::from(self.bounds.chunk_size);
        while let Some(f) = state.ends[i].session.poll_frame() {
            let end = &mut state.ends[i];
            match &f {
                Frame::Hello(_) => end.hello_sent = true,
                Frame::Dial(d) => {
                    if d.stream.0 <= end.last_dial {
                        end.seen.id_reused = true;
                    }
                    end.last_dial = d.stream.0;
                    if let Some(st) = end.streams.get_mut(&d.stream) {
                        st.dial_on_wire = true;
                    }
                }
                Frame::DialOk(d) => {
                    if let Some(st) = end.streams.get_mut(&d.stream) {
                        st.dial_ok_on_wire = true;
                    }
                }
                Frame::Data(d) => {
                    let max = end.session.peer_settings().max_frame_size() as usize;
                    let queued = end.session.queued(d.stream) as usize;
                    if let Some(st) = end.streams.get_mut(&d.stream) {
                        st.fin_on_wire |= d.fin;
                        // More of a chunk follows a full frame: the session split it.
                        end.seen.split |= d.payload.len() == max && queued > 0 && chunk > max;
                    }
                }
                Frame::Window(w) => {
                    // Credit end i returned to the peer, for the peer's in-flight check.
                    if let Some(st) = state.ends[1 - i].streams.get_mut(&w.stream) {
                        st.credited += u64::from(w.increment);
                    }
                }
                Frame::Ping(p) if !p.ack => {
                    end.ping_unanswered = true;
                    end.pings_sent = end.pings_sent.saturating_add(1);
                    let asked = self.bounds.pings - end.pings_left;
                    end.seen.keepalive_ping |= end.pings_sent > asked;
                }
                Frame::GoAway(_) => end.goaway_sent = true,
                _ => {}
            }
            if !state.dropped {
                state.wire[1 - i].push_back(Wire::Frame(f));
            }
        }
    }

    /// Hands every event to the application of each end.
    fn react(state: &mut ModelState) {
        for end in state.ends.iter_mut() {
            while let Some(e) = end.session.poll_event() {
                let open_streams = end.streams.values().any(|s| s.phase == AppPhase::Open);
                let finish = |end: &mut End, id: StreamId, outcome: Outcome| {
                    let st = end
                        .streams
                        .entry(id)
                        .or_insert_with(|| AppStream::new(AppPhase::Dialing));
                    if st.ended() {
                        end.seen.double_end = true;
                    }
                    st.phase = AppPhase::Ended(outcome);
                };
                match e {
                    Event::HelloReceived(_) => end.hello_pending = true,
                    Event::DialRequested { stream, .. } => {
                        end.streams
                            .insert(stream, AppStream::new(AppPhase::Pending));
                    }
                    Event::DialSucceeded { stream } => {
                        if let Some(st) = end.streams.get_mut(&stream) {
                            st.phase = AppPhase::Open;
                        }
                    }
                    Event::DialFailed { stream, error } => {
                        finish(end, stream, Outcome::DialFailed(error.code, error.by));
                    }
                    Event::Reset { stream, error } => {
                        // The model's own resets say "cancel"; any other CANCEL from the peer
                        // is the core's drop policy at work.
                        if error.code == ErrorCode::CANCEL
                            && error.by == Initiator::Peer
                            && error.reason != "cancel"
                        {
                            end.seen.reset_by_walkaway = true;
                        }
                        finish(end, stream, Outcome::Reset(error.code, error.by));
                    }
                    Event::Readable { stream } => match end.streams.get_mut(&stream) {
                        Some(st) if !st.ended() => st.readable = true,
                        // No event after the application's own reset or abandon.
                        _ => end.seen.double_end = true,
                    },
                    Event::Writable { stream } => {
                        if let Some(st) = end.streams.get_mut(&stream) {
                            st.reopened |= st.exhausted;
                            st.blocked = false;
                        }
                    }
                    Event::PingAnswered { .. } => end.seen.ping_answered = true,
                    Event::GoingAway { .. } => end.seen.goaway_with_open_stream |= open_streams,
                    // The session's end wakes every reader: a complete stream may still hold
                    // bytes and its FIN to read.
                    Event::Closed(_) => {
                        for st in end.streams.values_mut().filter(|st| !st.ended()) {
                            st.readable = true;
                        }
                    }
                    _ => {}
                }
            }
            // A stream that is over only waits for its handle: the application drops it.
            let session = &mut end.session;
            for (id, st) in end.streams.iter_mut() {
                match session.stream_state(*id) {
                    Some(StreamState::Closed) => {
                        if st.phase == AppPhase::Open && st.finished && st.got_fin {
                            st.phase = AppPhase::Ended(Outcome::Completed);
                        }
                        // Dropped once read to the end (a stream complete when its session
                        // ended may still hold bytes to read).
                        if st.ended() {
                            let dropped = session.abandon(*id);
                            debug_assert!(dropped.is_ok(), "a closed stream can be abandoned");
                        }
                    }
                    Some(StreamState::Failed) => {
                        let dropped = session.abandon(*id);
                        debug_assert!(dropped.is_ok(), "a failed stream can be abandoned");
                    }
                    _ => {}
                }
            }
            let live = end
                .streams
                .iter()
                .filter(|(id, st)| end.session.role().opens(**id) && !st.ended())
                .count();
            end.seen.two_live |= live >= 2;
        }
    }

    /// Whether delivering and flushing alone, from `state`, stops within [`SETTLE_STEPS`]:
    /// two sessions left to themselves must fall silent.
    fn settles(&self, state: &ModelState) -> bool {
        let mut s = state.clone();
        for step in 0..SETTLE_STEPS {
            let wants = |s: &ModelState, i: usize| s.ends[i].session.wants_transmit();
            let action = if !s.wire[step % 2].is_empty() {
                Action::Deliver(step % 2)
            } else if !s.wire[1 - step % 2].is_empty() {
                Action::Deliver(1 - step % 2)
            } else if self.bounds.batching && !s.dropped && (wants(&s, 0) || wants(&s, 1)) {
                Action::Flush(usize::from(!wants(&s, 0)))
            } else {
                return true;
            };
            match self.step(&s, action) {
                Some(next) => s = next,
                None => return true,
            }
        }
        false
    }

    /// The step itself, without the settling check.
    fn step(&self, last: &ModelState, action: Action) -> Option<ModelState> {
        let mut state = last.clone();
        let now = Time::from_millis(state.now);
        let chunk = usize::from(self.bounds.chunk_size);
        match action {
            Action::Open(i) => {
                let end = &mut state.ends[i];
                end.opens_left -= 1;
                // A refused open (limit, drain) uses the budget too, so every path ends.
                match end.session.open(Protocol::TCP, "dest", 80) {
                    Ok(id) => {
                        end.streams.insert(id, AppStream::new(AppPhase::Dialing));
                    }
                    Err(ApiError::StreamLimit) => end.seen.open_at_limit = true,
                    Err(_) => {}
                }
            }
            Action::Accept(i, id) => {
                let end = &mut state.ends[i];
                end.session.accept(id).ok()?;
                end.streams.get_mut(&id)?.phase = AppPhase::Open;
            }
            Action::Reject(i, id) => {
                let end = &mut state.ends[i];
                end.session
                    .reject(id, ErrorCode::DIAL_REFUSED, "refused")
                    .ok()?;
                end.streams.get_mut(&id)?.phase = AppPhase::Ended(Outcome::ResetLocally);
            }
            Action::Send(i, id) => {
                let end = &mut state.ends[i];
                let total = self.bounds.total(end.session.role(), id);
                let st = end.streams.get(&id)?;
                let k = st.sent.len() / chunk;
                let want = chunk - st.sent.len() % chunk;
                let bytes =
                    Bytes::from(vec![chunk_byte(i, id, k); want.min(total - st.sent.len())]);
                let n = end.session.send(id, bytes.clone()).ok()?;
                let capacity = end.session.send_capacity(id);
                end.seen.send_buffer_full |= n < bytes.len() && end.session.send_window(id) > 0;
                end.seen.chunks_queued |= end.session.queued(id) as usize > chunk;
                let st = end.streams.get_mut(&id)?;
                st.sent.extend_from_slice(&bytes[..n]);
                st.exhausted |= capacity == 0;
                st.blocked = n < bytes.len() || capacity == 0;
            }
            Action::Finish(i, id) => {
                let end = &mut state.ends[i];
                end.session.finish(id).ok()?;
                end.streams.get_mut(&id)?.finished = true;
            }
            Action::Reset(i, id) => {
                let end = &mut state.ends[i];
                end.resets_left -= 1;
                end.session.reset(id, ErrorCode::CANCEL, "cancel").ok()?;
                let st = end.streams.get_mut(&id)?;
                st.cancelled = st.phase == AppPhase::Dialing;
                st.phase = AppPhase::Ended(Outcome::ResetLocally);
            }
            Action::Abandon(i, id) => {
                let end = &mut state.ends[i];
                end.resets_left -= 1;
                end.session.abandon(id).ok()?;
                end.streams.get_mut(&id)?.phase = AppPhase::Ended(Outcome::Abandoned);
            }
            Action::Read(i, id) => {
                let end = &mut state.ends[i];
                let got = end.session.recv(id, chunk);
                let st = end.streams.get_mut(&id)?;
                match got {
                    Ok(Some(data)) => st.received.extend_from_slice(&data),
                    Ok(None) => {
                        st.readable = false;
                        st.got_fin = true;
                    }
                    // WouldBlock, or a reset whose own event ends the stream for the
                    // application.
                    Err(_) => st.readable = false,
                }
            }
            Action::Release(i, id) => {
                let s = &mut state.ends[i].session;
                let n = s.unreleased(id).min(u32::from(self.bounds.chunk_size));
                s.release(id, n).ok()?;
            }
            Action::Ping(i) => {
                let end = &mut state.ends[i];
                end.pings_left -= 1;
                end.session.ping(now).ok()?;
            }
            Action::GoAway(i) => {
                let end = &mut state.ends[i];
                end.goaways_left -= 1;
                end.drain_started = true;
                // Refused once the session is closed: the budget is spent all the same.
                if end.session.go_away("drain").is_err() {
                    debug_assert!(end.session.is_closed(), "go_away fails only when closed");
                }
            }
            Action::Welcome => {
                let end = &mut state.ends[0];
                end.hello_pending = false;
                end.session.accept_hello(now).ok()?;
            }
            Action::Refuse => {
                let end = &mut state.ends[0];
                end.hello_pending = false;
                end.session
                    .refuse_hello(ErrorCode::UNAUTHORIZED, "not this agent")
                    .ok()?;
            }
            Action::Flush(i) => {
                if !state.ends[i].session.wants_transmit() {
                    return None;
                }
                self.transmit(&mut state, i);
            }
            Action::Deliver(i) => match state.wire[i].pop_front()? {
                Wire::Frame(f) => {
                    match &f {
                        Frame::Ping(p) if p.ack => {
                            let end = &mut state.ends[i];
                            end.ping_unanswered = false;
                            end.answers = end.answers.saturating_add(1);
                        }
                        Frame::Dial(d) if i == 0 => {
                            state.agent_id_seen = state.agent_id_seen.max(d.stream.0);
                        }
                        _ => {}
                    }
                    state.ends[i].session.handle_frame(now, f);
                }
                Wire::Rogue(m, bytes) => {
                    let server = &mut state.ends[0].session;
                    let target = rogue::target(&bytes);
                    let expected = rogue::expected(m, server, target, state.agent_id_seen);
                    let was_closed = server.is_closed();
                    server.handle_bytes(now, &mut bytes::BytesMut::from(&bytes[..]));
                    state.verdict = Some(Verdict {
                        misbehavior: m,
                        expected,
                        actual: rogue::actual(server, was_closed),
                    });
                }
            },
            Action::Timeout(i) => {
                let end = &mut state.ends[i];
                let t = end.session.poll_timeout()?;
                end.timers_left -= 1;
                state.now = state.now.max(t.as_millis());
                let was_closed = end.session.is_closed();
                end.session.handle_timeout(t);
                // SPEC 7.3: the keepalive deadline runs only while a PING is unanswered (one
                // still in the session's queue counts: the writer may not have run yet).
                if !was_closed
                    && end.session.close_reason() == Some(&CloseReason::KeepaliveTimeout)
                    && !end.ping_unanswered
                    && !self.bounds.batching
                {
                    end.seen.keepalive_without_ping = true;
                }
            }
            Action::Drop => {
                state.dropped = true;
                state.wire = [VecDeque::new(), VecDeque::new()];
                for end in state.ends.iter_mut() {
                    end.session.handle_transport_closed();
                }
            }
            Action::Rogue(m) => {
                let bytes = rogue::bytes(m, &state, self.bounds.server_max_streams)?;
                state.rogue_done = true;
                state.wire[0].push_back(Wire::Rogue(m, bytes));
            }
        }
        if !self.bounds.batching {
            self.transmit(&mut state, 0);
            self.transmit(&mut state, 1);
        }
        Self::react(&mut state);
        if !self.bounds.batching {
            // Reacting (dropping a finished stream's handle) can make frames too.
            self.transmit(&mut state, 0);
            self.transmit(&mut state, 1);
        }
        Some(state)
    }
}

impl Model for TunnelModel {
    type State = ModelState;
    type Action = Action;

    fn init_states(&self) -> Vec<ModelState> {
        let b = &self.bounds;
        let end = |session: Session, opens: u8| End {
            session,
            opens_left: opens,
            resets_left: b.resets,
            pings_left: b.pings,
            goaways_left: b.goaways,
            timers_left: b.timers,
            hello_pending: false,
            hello_sent: false,
            streams: BTreeMap::new(),
            last_dial: 0,
            goaway_sent: false,
            drain_started: false,
            ping_unanswered: false,
            pings_sent: 0,
            answers: 0,
            seen: Seen::default(),
        };
        let start = |agent_versions: Vec<u16>| {
            let now = Time::from_millis(0);
            let mut agent_config = b.config(Role::Agent);
            agent_config.versions = agent_versions;
            let server = Session::server(b.config(Role::Server), test_server_identity(), now)
                .unwrap_or_else(|e| panic!("server config: {e}"));
            let agent = Session::agent(agent_config, test_agent_identity(), now)
                .unwrap_or_else(|e| panic!("agent config: {e}"));
            ModelState {
                ends: [end(server, b.server_opens), end(agent, b.agent_opens)],
                wire: [VecDeque::new(), VecDeque::new()],
                dropped: false,
                now: 0,
                agent_id_seen: 0,
                rogue_done: false,
                verdict: None,
                endless: false,
            }
        };
        if b.handshake {
            let mut states = vec![start(vec![1]), start(vec![2])];
            if !b.batching {
                for s in &mut states {
                    self.transmit(s, 1);
                }
            }
            states
        } else {
            // Already open: the handshake ran (and was checked) elsewhere.
            let mut s = start(vec![1]);
            let pair = tether_proto::testing::Pair::established(
                b.config(Role::Server),
                b.config(Role::Agent),
            );
            s.ends[0].session = pair.server;
            s.ends[1].session = pair.agent;
            s.ends[1].hello_sent = true;
            vec![s]
        }
    }

    fn actions(&self, state: &ModelState, actions: &mut Vec<Action>) {
        // A run that went endless has been reported (an `always` property); nothing follows.
        if state.endless {
            return;
        }
        self.app_actions(state, actions);
        for i in 0..2 {
            if !state.wire[i].is_empty() {
                actions.push(Action::Deliver(i));
            }
            let end = &state.ends[i];
            if self.bounds.batching && !state.dropped && end.session.wants_transmit() {
                actions.push(Action::Flush(i));
            }
            if end.timers_left > 0
                && !end.session.is_closed()
                && end.session.poll_timeout().is_some()
            {
                actions.push(Action::Timeout(i));
            }
        }
        if self.bounds.drop && !state.dropped {
            actions.push(Action::Drop);
        }
    }

    fn next_state(&self, last: &ModelState, action: Action) -> Option<ModelState> {
        let input = action.is_input();
        let mut state = self.step(last, action)?;
        // Liveness: after every input, the two sessions left alone must fall silent. An
        // endless exchange (a PING answered with a PING, a WINDOW answered with a WINDOW) is
        // a violation with a path, not a state space that grows until memory runs out.
        if input && !state.endless && !self.settles(&state) {
            state.endless = true;
        }
        Some(state)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        properties::all()
    }
}
