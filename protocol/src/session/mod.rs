//! The session: one end of a tunnel (SPEC 4–7).
//!
//! A [`Session`] is driven from outside and does no I/O:
//!
//! - **input**: [`Session::handle_bytes`] (bytes read from the tunnel) or
//!   [`Session::handle_frame`] (a decoded frame), [`Session::handle_timeout`] when the time from
//!   [`Session::poll_timeout`] has come, [`Session::handle_transport_closed`] when the transport
//!   ends;
//! - **commands**: [`Session::open`], [`Session::accept`], [`Session::reject`],
//!   [`Session::send`], [`Session::finish`], [`Session::recv`], [`Session::release`],
//!   [`Session::reset`], [`Session::abandon`], [`Session::ping`], [`Session::go_away`],
//!   [`Session::close`], and at the server end [`Session::accept_hello`] /
//!   [`Session::refuse_hello`];
//! - **output**: [`Session::poll_frame`] (frames to write, in order), [`Session::poll_event`]
//!   (what the application must know), [`Session::poll_timeout`] (when to call back).
//!
//! After any input or command, poll all three until they return `None`: any call may queue
//! frames, events, or move the deadline. Polling produces nothing but one thing: taking DATA
//! with [`Session::poll_frame`] may free room in a stream's send buffer and queue its
//! `Writable` event (SPEC 6.2). So poll events after frames: a caller that drains frames, then
//! events, then the deadline after each call has seen everything.
//!
//! The state has owners, each in its own file: the stream table (`streams.rs`), one
//! stream's halves and buffers (`stream.rs`), keepalive and the timer table
//! (`keepalive.rs`), the handshake (`handshake.rs`), the application's commands
//! (`commands.rs`), inbound frames (`inbound.rs`), how streams and the session end
//! (`close.rs`), the configuration (`config.rs`) and the invariants (`invariants.rs`). This
//! file keeps the driver surface and the dispatch.

mod close;
mod commands;
mod config;
mod event;
mod handshake;
mod inbound;
mod invariants;
mod keepalive;
mod stream;
mod streams;
mod window;

use std::collections::VecDeque;

use bytes::BytesMut;

pub use config::{AgentIdentity, Config, Role, ServerIdentity};
pub use event::Event;
pub use stream::StreamState;

use self::keepalive::{Keepalive, Timer, TimerTable};
use self::stream::{Phase, SendState, len32};
use self::streams::Streams;
use crate::Time;
use crate::codec::FrameCodec;
use crate::error::{ApiError, CloseReason, ProtocolError};
use crate::frame::{
    DialOk, ErrorCode, Frame, FrameKind, GoAway, HANDSHAKE_MAX_PAYLOAD, HEADER_LEN,
    MIN_KEEPALIVE_INTERVAL_MS, Ping, Reset, Settings, StreamId, WindowUpdate,
};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum SessionPhase {
    /// Server: waiting for HELLO.
    AwaitHello,
    /// Server: HELLO arrived; the application decides.
    AwaitDecision,
    /// Agent: HELLO queued or sent; waiting for WELCOME.
    AwaitWelcome,
    /// Handshake done.
    Open,
    /// Ended; `goaway` is the last frame still to go out, if any.
    Closed {
        reason: CloseReason,
        goaway: Option<GoAway>,
    },
}

/// The graceful drain (SPEC 7.4), as one state.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Drain {
    /// No GOAWAY either way.
    Running,
    /// This end's GOAWAY is queued; `peer`: the peer's arrived too.
    Queued { goaway: GoAway, peer: bool },
    /// This end's GOAWAY has gone out; `peer`: the peer's arrived too.
    Sent { peer: bool },
}

/// One end of a tunnel: handshake, streams, flow control, keepalive and drain (SPEC 4–7).
///
/// A plain value: `Clone + Eq + Hash + Debug`, no clock, no randomness, no I/O.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Session {
    role: Role,
    config: Config,
    server_identity: Option<ServerIdentity>,
    phase: SessionPhase,
    version: u16,
    peer: Settings,
    codec: FrameCodec,
    streams: Streams,
    /// HELLO or WELCOME, to go out first.
    handshake_out: Option<Frame>,
    drain: Drain,
    notice: Notice,
    keepalive: Keepalive,
    timers: TimerTable,
    events: VecDeque<Event>,
}

/// The DRAINING notice (SPEC 7.4): this end's, to send once, and the peer's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
struct Notice {
    /// Queued, not sent yet.
    out: bool,
    /// Sent (or queued): never again.
    given: bool,
    /// The peer sent one.
    peer: bool,
}

fn violation(code: ErrorCode, kind: FrameKind, reason: &'static str) -> ProtocolError {
    ProtocolError::new(code, kind, reason)
}

fn protocol_error(kind: FrameKind, reason: &'static str) -> ProtocolError {
    violation(ErrorCode::PROTOCOL_ERROR, kind, reason)
}

impl Session {
    fn new(role: Role, config: Config, phase: SessionPhase, now: Time) -> Session {
        let mut timers = TimerTable::default();
        if config.handshake_timeout_ms > 0 {
            timers.set(Timer::Handshake, now.plus_ms(config.handshake_timeout_ms));
        }
        Session {
            role,
            config,
            server_identity: None,
            phase,
            version: 0,
            peer: Settings::default(),
            //= SPEC §3.6
            //# Until the handshake is done (§4), a receiver MUST accept payloads up to 16384
            //# bytes and MUST refuse longer ones
            codec: FrameCodec::with_max_payload(HANDSHAKE_MAX_PAYLOAD),
            streams: Streams::new(role),
            handshake_out: None,
            drain: Drain::Running,
            notice: Notice::default(),
            keepalive: Keepalive::default(),
            timers,
            events: VecDeque::new(),
        }
    }

    // ----- queries -----

    /// Which end this is.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Whether the handshake is done and the session not closed.
    pub fn is_established(&self) -> bool {
        self.phase == SessionPhase::Open
    }

    /// Whether the session has ended (a final GOAWAY may still be queued).
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, SessionPhase::Closed { .. })
    }

    /// Whether the session has ended and has nothing left to send: close the transport.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, SessionPhase::Closed { goaway: None, .. })
    }

    /// Why the session ended, once it has.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        match &self.phase {
            SessionPhase::Closed { reason, .. } => Some(reason),
            _ => None,
        }
    }

    /// Whether this end is draining (a GOAWAY was queued or received): no new streams.
    pub fn is_draining(&self) -> bool {
        self.drain != Drain::Running
    }

    /// Whether the session is established and may open streams (not draining).
    pub fn is_usable(&self) -> bool {
        self.is_established() && !self.is_draining()
    }

    /// Whether the peer announced it will drain soon (a DRAINING frame, SPEC 7.4): the session
    /// is still usable, but new streams should go to another tunnel when there is one.
    pub fn peer_will_drain(&self) -> bool {
        self.notice.peer
    }

    /// The negotiated version (0 before the handshake).
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The settings this end announces.
    pub fn local_settings(&self) -> Settings {
        self.config.settings()
    }

    /// The peer's settings (all defaults before the handshake).
    pub fn peer_settings(&self) -> &Settings {
        &self.peer
    }

    /// The payload limit the decoder applies now (SPEC 3.6). Callers that decode frames
    /// themselves must use it; [`Session::handle_frame`] treats a larger frame as the decoder
    /// would.
    pub fn max_inbound_payload(&self) -> u32 {
        self.codec.max_payload()
    }

    /// A stream's state; `None` if the application never learned of it or abandoned it.
    pub fn stream_state(&self, id: StreamId) -> Option<StreamState> {
        self.streams.get(id).map(stream::Stream::state)
    }

    /// Why a stream failed: the error `recv` and `send` report for a stream this end reset
    /// or that ended abnormally; `None` for a live or cleanly closed stream.
    pub fn stream_error(&self, id: StreamId) -> Option<crate::StreamError> {
        self.streams.get(id).and_then(stream::Stream::error)
    }

    /// How many bytes `send` would accept on `id` now: the credit left, at most the room
    /// left in this end's own send buffer.
    pub fn send_capacity(&self, id: StreamId) -> usize {
        match self.streams.get(id) {
            Some(s) if s.phase == Phase::Established && s.send.state == SendState::Open => {
                let room = self.config.max_send_window.saturating_sub(s.send.queued);
                s.send.window.available().min(room) as usize
            }
            _ => 0,
        }
    }

    /// The credit the peer has left this end on `id` (its send window), whatever this end's
    /// own send buffer holds.
    pub fn send_window(&self, id: StreamId) -> u32 {
        self.streams
            .get(id)
            .map_or(0, |s| s.send.window.available())
    }

    /// Live streams (not closed), both ends' together: what counts against
    /// MAX_CONCURRENT_STREAMS.
    pub fn stream_count(&self) -> usize {
        self.streams.live() as usize
    }

    /// Ids of every stream in the table, live or closed and not yet abandoned, ascending.
    pub fn stream_ids(&self) -> impl Iterator<Item = StreamId> + '_ {
        self.streams.iter().map(|(id, _)| id)
    }

    /// Bytes that arrived on `id` and wait for [`Session::recv`].
    pub fn buffered(&self, id: StreamId) -> u32 {
        self.streams.get(id).map_or(0, |s| s.recv.buf.len())
    }

    /// Bytes handed out by `recv` on `id` and not yet released.
    pub fn unreleased(&self, id: StreamId) -> u32 {
        self.streams.get(id).map_or(0, |s| s.recv.unreleased)
    }

    /// Bytes accepted by `send` on `id` and not yet framed.
    pub fn queued(&self, id: StreamId) -> u32 {
        self.streams.get(id).map_or(0, |s| s.send.queued)
    }

    /// Whether [`Session::poll_frame`] may have a frame now: a transport writer that is
    /// idle needs waking only when this holds (after a `release` that stayed under the
    /// WINDOW batch threshold, say, it does not). It may answer `true` when
    /// `poll_frame` then finds nothing, never `false` when a frame is ready.
    pub fn wants_transmit(&self) -> bool {
        match &self.phase {
            SessionPhase::Closed { goaway, .. } => goaway.is_some(),
            SessionPhase::Open => {
                self.handshake_out.is_some()
                    || matches!(self.drain, Drain::Queued { .. })
                    || self.keepalive.pong_out.is_some()
                    || self.keepalive.ping_out.is_some()
                    || self.notice.out
                    || !self.streams.refusals.is_empty()
                    || !self.streams.ready.is_empty()
            }
            _ => self.handshake_out.is_some(),
        }
    }

    /// Events waiting in the queue.
    pub fn pending_events(&self) -> usize {
        self.events.len()
    }

    fn window_threshold(&self) -> u32 {
        // SPEC 6.4: credit goes back in batches of at least half the window.
        (self.config.initial_window / 2).max(1)
    }

    /// How many streams this end may have open: the peer's MAX_CONCURRENT_STREAMS, capped by
    /// this end's own limit (SPEC 5.7, 10).
    pub(super) fn open_limit(&self) -> u32 {
        self.peer
            .max_concurrent_streams()
            .min(self.config.max_open_streams)
    }

    fn keepalive_interval(&self) -> u64 {
        let ours = self.config.keepalive_interval_ms;
        //= SPEC §3.5
        //# MUST raise a non-zero KEEPALIVE_INTERVAL below 1000 ms to 1000 ms
        // (SPEC 7.3), so a peer cannot make this end PING without pause.
        let theirs = match self.peer.keepalive_interval() {
            0 => 0,
            t => u64::from(t).max(MIN_KEEPALIVE_INTERVAL_MS),
        };
        match (ours, theirs) {
            (0, t) => t,
            (o, 0) => o,
            (o, t) => o.min(t),
        }
    }

    fn schedule(&mut self, id: StreamId) {
        let threshold = self.window_threshold();
        self.streams.schedule(id, threshold);
    }

    // ----- input -----

    /// Feeds bytes read from the tunnel. Decodes every whole frame and consumes it; a partial
    /// frame stays in `buf` for the next call. A malformed frame closes the session with a
    /// GOAWAY (SPEC 8.2) and clears `buf`.
    pub fn handle_bytes(&mut self, now: Time, buf: &mut BytesMut) {
        loop {
            if self.is_closed() {
                buf.clear();
                return;
            }
            match self.codec.decode(buf) {
                Ok(Some(frame)) => self.handle_decoded(now, frame),
                Ok(None) => return,
                //= SPEC §8.2
                //# the receiver MUST send GOAWAY with `MALFORMED_FRAME` or `FRAME_TOO_LARGE` and a
                //# reason, then close the tunnel
                //= SPEC §8.2
                //# It MUST NOT try to resynchronise.
                Err(e) => {
                    buf.clear();
                    self.fail(e.into());
                    self.debug_check();
                    return;
                }
            }
        }
    }

    /// Feeds one decoded frame. A frame whose payload is over
    /// [`Session::max_inbound_payload`] is refused as the decoder would refuse it
    /// (FRAME_TOO_LARGE, SPEC 3.6).
    pub fn handle_frame(&mut self, now: Time, frame: Frame) {
        let payload = frame.encoded_len().saturating_sub(HEADER_LEN);
        if !self.is_closed() && payload > self.codec.max_payload() as usize {
            self.fail(violation(
                ErrorCode::FRAME_TOO_LARGE,
                frame.kind(),
                "payload over the negotiated maximum",
            ));
            self.debug_check();
            return;
        }
        self.handle_decoded(now, frame);
    }

    /// A frame the codec decoded under the current limit: no size check needed again.
    fn handle_decoded(&mut self, now: Time, frame: Frame) {
        if self.is_closed() {
            return;
        }
        if self.timers.is_set(Timer::KeepaliveDeadline) {
            // SPEC 7.3: any frame shows the peer alive.
            self.timers.set(
                Timer::KeepaliveDeadline,
                now.plus_ms(self.config.keepalive_timeout_ms),
            );
        }
        if let Err(e) = self.on_frame(now, frame) {
            self.fail(e);
        }
        self.debug_check();
    }

    /// The transport under the tunnel ended (EOF or error). Every stream ends with an error
    /// (SPEC 7.5); a session already closed is unchanged.
    pub fn handle_transport_closed(&mut self) {
        self.shutdown(CloseReason::TransportLost, None);
        self.debug_check();
    }

    /// Call when the time from [`Session::poll_timeout`] has come (earlier is harmless).
    pub fn handle_timeout(&mut self, now: Time) {
        if self.is_closed() {
            return;
        }
        match self.timers.expired(now) {
            //= SPEC §4.4
            //# if the transport is up (TLS done), the end MUST close the session with GOAWAY
            //# `HANDSHAKE_TIMEOUT`
            Some(Timer::Handshake) => self.shutdown(
                CloseReason::HandshakeTimeout,
                Some((ErrorCode::HANDSHAKE_TIMEOUT, "handshake timed out")),
            ),
            //= SPEC §7.3
            //# MUST consider the tunnel dead: it closes the session with GOAWAY
            //# `KEEPALIVE_TIMEOUT`
            Some(Timer::KeepaliveDeadline) => self.shutdown(
                CloseReason::KeepaliveTimeout,
                Some((
                    ErrorCode::KEEPALIVE_TIMEOUT,
                    "no frame within the keepalive deadline",
                )),
            ),
            Some(Timer::NextPing) => {
                self.timers.stop(Timer::NextPing);
                // SPEC 7.3: at most one PING outstanding; an application's PING that is still
                // unanswered serves as the keepalive (its answer re-arms the timer).
                if self.keepalive.outstanding.is_none() {
                    self.send_ping(now, false);
                }
            }
            None => {}
        }
        self.debug_check();
    }

    /// When [`Session::handle_timeout`] must next be called, if ever.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Time> {
        self.timers.next()
    }

    // ----- output -----

    /// The next frame to write to the tunnel, in order. Control frames go first (GOAWAY, PING
    /// answers, refusals); streams take turns, one frame each (SPEC 7.6). Poll again after any
    /// input or command.
    #[must_use]
    pub fn poll_frame(&mut self) -> Option<Frame> {
        let f = self.next_frame();
        self.debug_check();
        f
    }

    /// Encodes every frame ready to go into `dst` (a convenience over [`Session::poll_frame`]
    /// that copies DATA payloads; the tokio adapter writes them vectored instead).
    pub fn poll_transmit(&mut self, dst: &mut BytesMut) -> usize {
        let mut n = 0;
        while let Some(f) = self.poll_frame() {
            dst.reserve(f.encoded_len());
            f.encode(dst);
            n += 1;
        }
        n
    }

    /// The next application event. Poll again after any input or command.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        let e = self.events.pop_front()?;
        if let Event::DialRequested { stream, .. } = &e
            && let Some(s) = self.streams.get_mut(*stream)
        {
            s.announced = true;
        }
        Some(e)
    }

    fn next_frame(&mut self) -> Option<Frame> {
        if let SessionPhase::Closed { goaway, .. } = &mut self.phase {
            return goaway.take().map(Frame::GoAway);
        }
        if let Some(f) = self.handshake_out.take() {
            return Some(f);
        }
        if let Drain::Queued { goaway, peer } = &self.drain {
            let f = Frame::GoAway(goaway.clone());
            self.drain = Drain::Sent { peer: *peer };
            self.maybe_drained();
            return Some(f);
        }
        //= SPEC §4.1
        //# It then MUST NOT send anything but GOAWAY until WELCOME arrives.
        //= SPEC §4.1
        //# The server MUST NOT send anything before it decides (§4.2)
        if !self.is_established() {
            return None;
        }
        if let Some(payload) = self.keepalive.pong_out.take() {
            return Some(Frame::Ping(Ping { ack: true, payload }));
        }
        if let Some(payload) = self.keepalive.ping_out.take() {
            return Some(Frame::Ping(Ping {
                ack: false,
                payload,
            }));
        }
        if std::mem::take(&mut self.notice.out) {
            return Some(Frame::Draining);
        }
        if let Some((stream, reason)) = self.streams.refusals.pop_front() {
            let f = Frame::Reset(Reset {
                stream,
                code: ErrorCode::REFUSED_STREAM,
                reason: reason.to_owned(),
            });
            self.maybe_drained();
            return Some(f);
        }
        while let Some(id) = self.streams.pop_ready() {
            if let Some(f) = self.stream_frame(id) {
                self.schedule(id);
                return Some(f);
            }
        }
        None
    }

    /// The next frame of stream `id`, which is in the table.
    fn stream_frame(&mut self, id: StreamId) -> Option<Frame> {
        let threshold = self.window_threshold();
        let max_payload = self.peer.max_frame_size() as usize;
        let local_initial = self.config.initial_window;
        let s = self.streams.get_mut(id)?;
        if let (Phase::Resetting { .. }, Some(error)) = (&s.phase, s.error()) {
            let f = Frame::Reset(Reset {
                stream: id,
                code: error.code,
                reason: error.reason.clone(),
            });
            self.end_stream(id, Some(error));
            return Some(f);
        }
        match &mut s.phase {
            Phase::Resetting { .. } => return None,
            Phase::Dialing(dial) => return dial.take().map(Frame::Dial),
            Phase::Pending | Phase::Closed(_) => return None,
            Phase::Established => {}
        }
        if s.dial_ok_queued {
            s.dial_ok_queued = false;
            return Some(Frame::DialOk(DialOk { stream: id }));
        }
        if s.wants_window_update(threshold) {
            let increment = s.recv.pending;
            let grown = s.recv.window.grow(increment, local_initial);
            debug_assert!(grown.is_ok(), "released credit fits the initial window");
            s.recv.pending = 0;
            return Some(Frame::Window(WindowUpdate {
                stream: id,
                increment,
            }));
        }
        if s.send.queued == 0 && s.send.state != SendState::Finishing {
            return None;
        }
        let payload = match s.send.queue.front_mut() {
            //= SPEC §3.6
            //# A sender MUST NOT send a payload longer than the peer's MAX_FRAME_SIZE.
            Some(front) if front.len() > max_payload => front.split_to(max_payload),
            Some(_) => s.send.queue.pop_front().unwrap_or_default(),
            None => bytes::Bytes::new(),
        };
        s.send.queued -= len32(&payload);
        // SPEC 6.2: a writer held back by this end's own send buffer (not the window) is told
        // once bytes have left it.
        if s.want_writable
            && s.send.state == SendState::Open
            && !s.send.window.is_exhausted()
            && s.send.queued < self.config.max_send_window
        {
            s.want_writable = false;
            self.events.push_back(Event::Writable { stream: id });
        }
        let fin = s.send.queue.is_empty() && s.send.state == SendState::Finishing;
        if fin {
            s.send.state = SendState::Finished;
        }
        if s.is_done() {
            self.end_stream(id, None);
        }
        Some(Frame::Data(crate::frame::Data {
            stream: id,
            fin,
            payload,
        }))
    }

    // ----- inbound dispatch -----

    fn on_frame(&mut self, now: Time, frame: Frame) -> Result<(), ProtocolError> {
        let kind = frame.kind();
        match (&self.phase, frame) {
            // SPEC 3.2: unknown kinds are ignored in every phase.
            (_, Frame::Unknown(_)) | (SessionPhase::Closed { .. }, _) => Ok(()),
            (SessionPhase::Open, frame) => self.on_open_frame(now, frame),
            (_, Frame::GoAway(g)) => {
                self.shutdown(
                    CloseReason::Peer {
                        code: g.code,
                        reason: g.reason,
                    },
                    None,
                );
                Ok(())
            }
            (SessionPhase::AwaitHello, Frame::Hello(h)) => self.on_hello(h),
            (SessionPhase::AwaitWelcome, Frame::Welcome(w)) => self.on_welcome(now, w),
            _ => Err(self.out_of_handshake(kind)),
        }
    }

    fn on_open_frame(&mut self, now: Time, frame: Frame) -> Result<(), ProtocolError> {
        match frame {
            Frame::Hello(_) | Frame::Welcome(_) => Err(protocol_error(
                frame.kind(),
                "handshake frame after the handshake",
            )),
            Frame::Ping(p) if p.ack => {
                self.on_pong(now, p.payload);
                Ok(())
            }
            Frame::Ping(p) => {
                //= SPEC §7.3
                //# A receiver MUST answer a PING with a PING carrying ACK and the same payload.
                // One answer is kept; a newer PING replaces an unsent answer.
                self.keepalive.pong_out = Some(p.payload);
                Ok(())
            }
            Frame::GoAway(g) => self.on_goaway(g),
            //= SPEC §7.4
            //# A receiver of DRAINING SHOULD open new streams on another tunnel when it has one
            Frame::Draining => {
                self.notice.peer = true;
                Ok(())
            }
            Frame::Dial(d) => self.on_dial(d),
            Frame::DialOk(d) => self.on_dial_ok(d.stream),
            Frame::Data(d) => self.on_data(d),
            Frame::Window(w) => self.on_window(w),
            Frame::Reset(r) => self.on_reset(r),
            Frame::Unknown(_) => Ok(()),
        }
    }

    fn check_open(&self) -> Result<(), ApiError> {
        match self.phase {
            SessionPhase::Open => Ok(()),
            SessionPhase::Closed { .. } => Err(ApiError::Closed),
            _ => Err(ApiError::NotOpen),
        }
    }

    #[inline]
    fn debug_check(&self) {
        #[cfg(debug_assertions)]
        if let Err(broken) = self.check_invariants() {
            panic!("session invariant broken: {broken}\n{self:#?}");
        }
    }
}

/// `reason` cut to what a frame carries: at most 255 bytes, at a character boundary. The one
/// place a reason is cut, so no command fails for a reason's length (SPEC 3.3).
//= SPEC §3.3
//# A sender cuts a longer reason to its first 255 bytes, at a character boundary; the length of
//# a reason is never a reason not to send the frame.
fn cut_reason(reason: &str) -> &str {
    let mut end = reason.len().min(255);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}
