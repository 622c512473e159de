//! tether-model: stateright models that drive tether-proto's real [`Session`].
//!
//! The model holds two real sessions, a server end and an agent end, each wrapped in an actor
//! ([`End`]) that plays a small nondeterministic application around it, joined by an ordered
//! network (two FIFO queues of frames, because the tunnel is TCP). Every step calls the real
//! `Session` methods; the checker hashes the real `Session` values. Nothing of the protocol is
//! re-implemented here: the model only decides *what happens next* and checks properties.
//!
//! ```
//! use stateright::{Checker, Model};
//! use tether_model::{Bounds, TunnelModel};
//!
//! // One stream, no faults: seconds in a debug build. `cargo run -p tether-model --release
//! // -- check` runs the configurations that reach every property.
//! let bounds = Bounds { resets: 0, goaways: 0, drop: false, ..Bounds::tiny() };
//! let checker = TunnelModel::new(bounds).checker().spawn_bfs().join();
//! assert!(checker.is_done());
//! checker.assert_no_discovery("invariants hold at both ends (SPEC 10)");
//! checker.assert_no_discovery("every stream ends exactly once (SPEC 5.2)");
//! ```

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use stateright::{Model, Property};
use tether_proto::frame::{Data, Dial, Frame, Protocol, StreamId};
use tether_proto::testing::Pair;
use tether_proto::{
    ApiError, CloseReason, Config, ErrorCode, Event, Initiator, Session, StreamState, Time,
};

/// A way the agent end breaks the protocol on purpose (SPEC 5.4, 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Misbehavior {
    /// Sends one DATA frame larger than the window it was given.
    IgnoresWindow,
    /// Sends a DIAL with a stream id it already used.
    ReusesStreamId,
    /// Sends DATA on a stream after its own FIN.
    DataAfterFin,
}

/// The bounds of one model configuration.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Bounds {
    /// Streams the server end may open.
    pub server_opens: u8,
    /// Streams the agent end may open.
    pub agent_opens: u8,
    /// INITIAL_WINDOW of both ends, in bytes.
    pub window: u32,
    /// Chunks each end sends on each stream before it may finish.
    pub chunks: u8,
    /// Bytes per chunk.
    pub chunk_size: u8,
    /// MAX_CONCURRENT_STREAMS of both ends.
    pub max_streams: u32,
    /// Resets each end's application may do.
    pub resets: u8,
    /// PINGs each end's application may send.
    pub pings: u8,
    /// GOAWAYs each end's application may start.
    pub goaways: u8,
    /// Whether the tunnel may drop (both ends see it).
    pub drop: bool,
    /// Whether a keepalive deadline may expire before the answer arrives.
    pub keepalive_expiry: bool,
    /// A misbehaving agent end, if any.
    pub misbehave: Option<Misbehavior>,
}

impl Bounds {
    /// The smallest interesting configuration: one stream, a 1-byte window, one chunk, a reset,
    /// tunnel loss. Seconds in a debug build.
    pub fn tiny() -> Bounds {
        Bounds {
            server_opens: 1,
            agent_opens: 0,
            window: 1,
            chunks: 1,
            chunk_size: 1,
            max_streams: 2,
            resets: 1,
            pings: 0,
            goaways: 1,
            drop: true,
            keepalive_expiry: false,
            misbehave: None,
        }
    }

    /// The release-check configuration: two streams (one each way), a window of 2 bytes that
    /// two chunks exhaust, half-close, cancel, a ping with its deadline, drain, tunnel loss.
    pub fn standard() -> Bounds {
        Bounds {
            server_opens: 1,
            agent_opens: 1,
            window: 2,
            chunks: 2,
            chunk_size: 1,
            max_streams: 2,
            resets: 1,
            pings: 1,
            goaways: 1,
            drop: true,
            keepalive_expiry: true,
            misbehave: None,
        }
    }

    fn config(&self) -> Config {
        Config {
            initial_window: self.window,
            max_frame_size: 1024,
            max_concurrent_streams: self.max_streams,
            keepalive_interval_ms: 0,
            keepalive_timeout_ms: 1000,
            handshake_timeout_ms: 0,
            ..Config::default()
        }
    }

    fn total(&self) -> usize {
        usize::from(self.chunks) * usize::from(self.chunk_size)
    }
}

/// How a stream ended, as one end's application saw it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Both FINs exchanged.
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

/// One stream from one end's application.
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
    /// The application reset it while it was dialing (a cancel).
    pub cancelled: bool,
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
            cancelled: false,
        }
    }

    fn ended(&self) -> bool {
        matches!(self.phase, AppPhase::Ended(_))
    }
}

/// One actor: a real session and the application around it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct End {
    /// The real session.
    pub session: Session,
    /// Opens left.
    pub opens_left: u8,
    /// Resets left.
    pub resets_left: u8,
    /// Pings left.
    pub pings_left: u8,
    /// GOAWAYs left.
    pub goaways_left: u8,
    /// Every stream this application learned of, by id.
    pub streams: BTreeMap<StreamId, AppStream>,
    /// The highest DIAL id this end put on the wire.
    pub last_dial: u32,
    /// A DIAL id went out that was not above the previous one.
    pub id_reused: bool,
    /// A stream got a second final outcome.
    pub double_end: bool,
    /// A GOAWAY arrived while a stream was open here.
    pub goaway_with_open_stream: bool,
}

/// The whole model state.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelState {
    /// `ends[0]` is the server end, `ends[1]` the agent end.
    pub ends: [End; 2],
    /// `wire[i]`: frames on their way to `ends[i]`, in order.
    pub wire: [VecDeque<Frame>; 2],
    /// The tunnel dropped.
    pub dropped: bool,
    /// The logical clock: moves only when a timer fires.
    pub now: u64,
    /// The misbehaving agent has done its one bad deed.
    pub rogue_done: bool,
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
    /// End releases one consumed byte.
    Release(usize, StreamId),
    /// End sends a PING.
    Ping(usize),
    /// End starts a drain.
    GoAway(usize),
    /// The next frame in flight to the end arrives.
    Deliver(usize),
    /// The end's timer fires (a keepalive deadline expires).
    Timeout(usize),
    /// The tunnel drops.
    Drop,
    /// The misbehaving agent sends its bad frame.
    Rogue,
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

impl TunnelModel {
    /// A model with these bounds.
    pub fn new(bounds: Bounds) -> TunnelModel {
        TunnelModel { bounds }
    }

    /// The actions of the applications (not deliveries, not faults).
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
                        if st.sent.len() < b.total() && s.send_capacity(id) > 0 {
                            out.push(Action::Send(i, id));
                        }
                        if st.sent.len() == b.total() && !st.finished {
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
        if self.bounds.misbehave.is_some() && !state.rogue_done && self.rogue_frame(state).is_some()
        {
            out.push(Action::Rogue);
        }
    }

    /// Whether nothing is in flight and no application action is left.
    pub fn is_quiescent(&self, state: &ModelState) -> bool {
        if state.wire.iter().any(|w| !w.is_empty()) {
            return false;
        }
        let mut acts = Vec::new();
        self.app_actions(state, &mut acts);
        acts.is_empty()
    }

    /// The bad frame the misbehaving agent would send now, if it can.
    fn rogue_frame(&self, state: &ModelState) -> Option<Frame> {
        let agent = &state.ends[1];
        if agent.session.is_closed() || state.dropped {
            return None;
        }
        match self.bounds.misbehave? {
            Misbehavior::IgnoresWindow => agent
                .streams
                .iter()
                .find(|(id, st)| {
                    st.phase == AppPhase::Open
                        && matches!(
                            agent.session.stream_state(**id),
                            Some(StreamState::Open | StreamState::HalfClosedRemote)
                        )
                })
                .map(|(id, _)| {
                    Frame::Data(Data {
                        stream: *id,
                        fin: false,
                        payload: Bytes::from(vec![0xffu8; self.bounds.window as usize + 1]),
                    })
                }),
            Misbehavior::ReusesStreamId => (agent.last_dial > 0).then(|| {
                Frame::Dial(Dial {
                    stream: StreamId(agent.last_dial),
                    protocol: Protocol::TCP,
                    host: "again".into(),
                    port: 1,
                })
            }),
            Misbehavior::DataAfterFin => agent
                .streams
                .iter()
                .find(|(_, st)| {
                    st.finished
                        && !matches!(
                            st.phase,
                            AppPhase::Ended(Outcome::Reset(..) | Outcome::ResetLocally)
                        )
                })
                .map(|(id, _)| {
                    Frame::Data(Data {
                        stream: *id,
                        fin: false,
                        payload: Bytes::from_static(&[0xfe]),
                    })
                }),
        }
    }

    /// Moves every frame each end has to send onto the wire, observing them.
    fn transmit(state: &mut ModelState) {
        for i in 0..2 {
            while let Some(f) = state.ends[i].session.poll_frame() {
                match &f {
                    Frame::Dial(d) => {
                        let end = &mut state.ends[i];
                        if d.stream.0 <= end.last_dial {
                            end.id_reused = true;
                        }
                        end.last_dial = d.stream.0;
                    }
                    Frame::Window(w) => {
                        // Credit end i returned to the peer, for the peer's in-flight check.
                        if let Some(st) = state.ends[1 - i].streams.get_mut(&w.stream) {
                            st.credited += u64::from(w.increment);
                        }
                    }
                    _ => {}
                }
                if !state.dropped {
                    state.wire[1 - i].push_back(f);
                }
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
                        end.double_end = true;
                    }
                    st.phase = AppPhase::Ended(outcome);
                };
                match e {
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
                        finish(end, stream, Outcome::Reset(error.code, error.by));
                    }
                    Event::Readable { stream } => {
                        let st = end.streams.get_mut(&stream);
                        match st {
                            Some(st) if !st.ended() => st.readable = true,
                            // No event after the application's own reset or abandon.
                            _ => end.double_end = true,
                        }
                    }
                    Event::Writable { stream } => {
                        if let Some(st) = end.streams.get_mut(&stream) {
                            st.reopened |= st.exhausted;
                        }
                    }
                    Event::GoingAway { .. } => end.goaway_with_open_stream |= open_streams,
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
        }
    }
}

fn app_stream(end: &mut End, id: StreamId) -> Option<&mut AppStream> {
    end.streams.get_mut(&id)
}

impl Model for TunnelModel {
    type State = ModelState;
    type Action = Action;

    fn init_states(&self) -> Vec<ModelState> {
        let b = &self.bounds;
        let pair = Pair::established(b.config(), b.config());
        let end = |session: Session, opens: u8| End {
            session,
            opens_left: opens,
            resets_left: b.resets,
            pings_left: b.pings,
            goaways_left: b.goaways,
            streams: BTreeMap::new(),
            last_dial: 0,
            id_reused: false,
            double_end: false,
            goaway_with_open_stream: false,
        };
        vec![ModelState {
            ends: [
                end(pair.server, b.server_opens),
                end(pair.agent, b.agent_opens),
            ],
            wire: [VecDeque::new(), VecDeque::new()],
            dropped: false,
            now: 0,
            rogue_done: false,
        }]
    }

    fn actions(&self, state: &ModelState, actions: &mut Vec<Action>) {
        self.app_actions(state, actions);
        for i in 0..2 {
            if !state.wire[i].is_empty() {
                actions.push(Action::Deliver(i));
            }
            if self.bounds.keepalive_expiry
                && !state.ends[i].session.is_closed()
                && state.ends[i].session.poll_timeout().is_some()
            {
                actions.push(Action::Timeout(i));
            }
        }
        if self.bounds.drop && !state.dropped {
            actions.push(Action::Drop);
        }
    }

    fn next_state(&self, last: &ModelState, action: Action) -> Option<ModelState> {
        let mut state = last.clone();
        let now = Time::from_millis(state.now);
        let total = self.bounds.total();
        let chunk = usize::from(self.bounds.chunk_size);
        match action {
            Action::Open(i) => {
                let end = &mut state.ends[i];
                end.opens_left -= 1;
                // A refused open (limit, drain) uses the budget too, so every path ends.
                if let Ok(id) = end.session.open(Protocol::TCP, "dest", 80) {
                    end.streams.insert(id, AppStream::new(AppPhase::Dialing));
                }
            }
            Action::Accept(i, id) => {
                let end = &mut state.ends[i];
                end.session.accept(id).ok()?;
                app_stream(end, id)?.phase = AppPhase::Open;
            }
            Action::Reject(i, id) => {
                let end = &mut state.ends[i];
                end.session
                    .reject(id, ErrorCode::DIAL_REFUSED, "refused")
                    .ok()?;
                app_stream(end, id)?.phase = AppPhase::Ended(Outcome::ResetLocally);
            }
            Action::Send(i, id) => {
                let end = &mut state.ends[i];
                let st = end.streams.get(&id)?;
                let k = st.sent.len() / chunk;
                let want = chunk - st.sent.len() % chunk;
                let bytes =
                    Bytes::from(vec![chunk_byte(i, id, k); want.min(total - st.sent.len())]);
                let n = end.session.send(id, bytes.clone()).ok()?;
                let capacity = end.session.send_capacity(id);
                let st = app_stream(end, id)?;
                st.sent.extend_from_slice(&bytes[..n]);
                st.exhausted |= capacity == 0;
            }
            Action::Finish(i, id) => {
                let end = &mut state.ends[i];
                end.session.finish(id).ok()?;
                app_stream(end, id)?.finished = true;
            }
            Action::Reset(i, id) => {
                let end = &mut state.ends[i];
                end.resets_left -= 1;
                end.session.reset(id, ErrorCode::CANCEL, "cancel").ok()?;
                let st = app_stream(end, id)?;
                st.cancelled = st.phase == AppPhase::Dialing;
                st.phase = AppPhase::Ended(Outcome::ResetLocally);
            }
            Action::Abandon(i, id) => {
                let end = &mut state.ends[i];
                end.resets_left -= 1;
                end.session.abandon(id).ok()?;
                app_stream(end, id)?.phase = AppPhase::Ended(Outcome::Abandoned);
            }
            Action::Read(i, id) => {
                let end = &mut state.ends[i];
                let got = end.session.recv(id, chunk);
                let st = app_stream(end, id)?;
                match got {
                    Ok(Some(data)) => st.received.extend_from_slice(&data),
                    Ok(None) => {
                        st.readable = false;
                        st.got_fin = true;
                    }
                    Err(ApiError::WouldBlock) => st.readable = false,
                    // A reset's own event ends the stream for the application.
                    Err(_) => st.readable = false,
                }
            }
            Action::Release(i, id) => {
                state.ends[i].session.release(id, 1).ok()?;
            }
            Action::Ping(i) => {
                let end = &mut state.ends[i];
                end.pings_left -= 1;
                end.session.ping(now).ok()?;
            }
            Action::GoAway(i) => {
                let end = &mut state.ends[i];
                end.goaways_left -= 1;
                // Refused once the session is closed: the budget is spent all the same.
                if end.session.go_away("drain").is_err() {
                    debug_assert!(end.session.is_closed(), "go_away fails only when closed");
                }
            }
            Action::Deliver(i) => {
                let f = state.wire[i].pop_front()?;
                state.ends[i].session.handle_frame(now, f);
            }
            Action::Timeout(i) => {
                let t = state.ends[i].session.poll_timeout()?;
                state.now = state.now.max(t.as_millis());
                state.ends[i].session.handle_timeout(t);
            }
            Action::Drop => {
                state.dropped = true;
                state.wire = [VecDeque::new(), VecDeque::new()];
                for end in state.ends.iter_mut() {
                    end.session.handle_transport_closed();
                }
            }
            Action::Rogue => {
                let f = self.rogue_frame(&state)?;
                state.rogue_done = true;
                state.wire[0].push_back(f);
            }
        }
        Self::transmit(&mut state);
        Self::react(&mut state);
        // Reacting can make more frames (none today, but keep the loop honest).
        Self::transmit(&mut state);
        Some(state)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            // ----- always -----
            Property::always(
                "invariants hold at both ends (SPEC 10)",
                |_: &TunnelModel, s: &ModelState| {
                    s.ends.iter().all(|e| e.session.check_invariants().is_ok())
                },
            ),
            Property::always(
                "received bytes are a prefix of what the peer sent on that stream (SPEC 5.3)",
                |_: &TunnelModel, s: &ModelState| {
                    (0..2).all(|i| {
                        s.ends[i].streams.iter().all(|(id, st)| {
                            let sent = s.ends[1 - i]
                                .streams
                                .get(id)
                                .map_or(&[][..], |p| &p.sent[..]);
                            sent.starts_with(&st.received)
                        })
                    })
                },
            ),
            Property::always(
                "unacknowledged bytes never exceed the window (SPEC 6.2)",
                |m: &TunnelModel, s: &ModelState| {
                    s.ends.iter().all(|e| {
                        e.streams.values().all(|st| {
                            st.sent.len() as u64 <= st.credited + u64::from(m.bounds.window)
                        })
                    })
                },
            ),
            Property::always(
                "stream ids are never reused (SPEC 5.1)",
                |_: &TunnelModel, s: &ModelState| s.ends.iter().all(|e| !e.id_reused),
            ),
            Property::always(
                "every stream ends exactly once (SPEC 5.2)",
                |_: &TunnelModel, s: &ModelState| s.ends.iter().all(|e| !e.double_end),
            ),
            Property::always(
                "no protocol error between honest ends (SPEC 8.2)",
                |_: &TunnelModel, s: &ModelState| {
                    s.ends.iter().all(|e| {
                        !matches!(e.session.close_reason(), Some(CloseReason::Violation(_)))
                    })
                },
            ),
            Property::always(
                "at quiescence every stream is closed at both ends and nothing is held (SPEC 5.2, 7.5)",
                |m: &TunnelModel, s: &ModelState| {
                    !m.is_quiescent(s)
                        || s.ends.iter().all(|e| {
                            e.session.stream_count() == 0
                                && e.session.stream_ids().next().is_none()
                                && e.session.pending_events() == 0
                                && e.streams.values().all(AppStream::ended)
                        })
                },
            ),
            // ----- sometimes -----
            Property::sometimes(
                "a stream completes both half-closes",
                |_: &TunnelModel, s: &ModelState| {
                    s.ends[0]
                        .streams
                        .values()
                        .any(|st| st.phase == AppPhase::Ended(Outcome::Completed))
                },
            ),
            Property::sometimes(
                "a dial is cancelled while its DIAL_OK is in flight",
                |_: &TunnelModel, s: &ModelState| {
                    (0..2).any(|i| {
                        s.ends[i].streams.iter().any(|(id, st)| {
                            st.cancelled
                                && s.wire[i]
                                    .iter()
                                    .any(|f| matches!(f, Frame::DialOk(d) if d.stream == *id))
                        })
                    })
                },
            ),
            Property::sometimes(
                "a window is exhausted and reopened",
                |_: &TunnelModel, s: &ModelState| {
                    s.ends
                        .iter()
                        .any(|e| e.streams.values().any(|st| st.reopened))
                },
            ),
            Property::sometimes(
                "a reset crosses a FIN",
                |_: &TunnelModel, s: &ModelState| {
                    (0..2).any(|i| {
                        s.wire[i].iter().any(|f| match f {
                            Frame::Data(d) if d.fin => s.wire[1 - i]
                                .iter()
                                .any(|g| matches!(g, Frame::Reset(r) if r.stream == d.stream)),
                            _ => false,
                        })
                    })
                },
            ),
            Property::sometimes(
                "the tunnel drops with a dial pending",
                |_: &TunnelModel, s: &ModelState| {
                    s.ends.iter().any(|e| {
                        e.streams.values().any(|st| {
                            matches!(
                                st.phase,
                                AppPhase::Ended(Outcome::DialFailed(ErrorCode::CONNECTION_LOST, _))
                            )
                        })
                    })
                },
            ),
            Property::sometimes(
                "a GOAWAY drains an open stream",
                |_: &TunnelModel, s: &ModelState| {
                    s.ends.iter().any(|e| {
                        e.goaway_with_open_stream
                            && e.session.close_reason() == Some(&CloseReason::Drained)
                            && e.streams
                                .values()
                                .any(|st| st.phase == AppPhase::Ended(Outcome::Completed))
                    })
                },
            ),
        ]
    }
}

/// The names of the properties that must be discovered (`sometimes`), for reports and tests.
pub const SOMETIMES: [&str; 6] = [
    "a stream completes both half-closes",
    "a dial is cancelled while its DIAL_OK is in flight",
    "a window is exhausted and reopened",
    "a reset crosses a FIN",
    "the tunnel drops with a dial pending",
    "a GOAWAY drains an open stream",
];
