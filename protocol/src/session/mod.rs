//! The session: one end of a tunnel (SPEC 4–7).
//!
//! A [`Session`] is driven from outside and does no I/O:
//!
//! - **input**: [`Session::handle_bytes`] (bytes read from the tunnel) or
//!   [`Session::handle_frame`] (a decoded frame), [`Session::handle_timeout`] when the time from
//!   [`Session::poll_timeout`] has come, [`Session::handle_transport_closed`] when the transport
//!   ends;
//! - **commands**: [`Session::open`], [`Session::accept`], [`Session::reject`],
//!   [`Session::send`], [`Session::finish`], [`Session::reset`], [`Session::release`],
//!   [`Session::ping`], [`Session::go_away`], [`Session::close`], and at the server end
//!   [`Session::accept_hello`] / [`Session::refuse_hello`];
//! - **output**: [`Session::poll_frame`] (frames to write, in order), [`Session::poll_event`]
//!   (what the application must know), [`Session::poll_timeout`] (when to call back).
//!
//! After any input or command, poll all three until they return `None`: any call may queue
//! frames, events, or move the deadline. Nothing is produced by polling alone, so a caller that
//! drains the three after each call has seen everything.
//!
//! Time is a [`Time`] in milliseconds of a clock the caller chooses; the session only compares
//! and adds.

mod event;
mod stream;
mod window;

use std::collections::{BTreeMap, VecDeque};

use bytes::{Bytes, BytesMut};

pub use event::Event;
pub use stream::StreamState;
pub use window::{Window, WindowError};

use self::stream::{Phase, RecvState, SendState, Stream};
use crate::codec::FrameCodec;
use crate::error::{ApiError, CloseReason, Initiator, ProtocolError, StreamError};
use crate::frame::{
    Data, Dial, DialOk, ErrorCode, Frame, FrameKind, GoAway, HANDSHAKE_MAX_PAYLOAD, Hello,
    Identifier, MAX_STREAM_ID, MAX_WINDOW, MIN_MAX_FRAME_SIZE, PROTOCOL_VERSION, Ping, Protocol,
    Reset, Settings, StreamId, Token, Welcome, WindowUpdate,
};

/// A point in time, in milliseconds of the caller's monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time(pub u64);

impl Time {
    /// `ms` milliseconds after the clock's zero.
    pub fn from_millis(ms: u64) -> Time {
        Time(ms)
    }

    /// Milliseconds since the clock's zero.
    pub fn as_millis(self) -> u64 {
        self.0
    }

    /// `ms` milliseconds later (saturating).
    pub fn plus_ms(self, ms: u64) -> Time {
        Time(self.0.saturating_add(ms))
    }
}

/// Which end of the tunnel a session is (SPEC 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The control-plane end: accepts the tunnel, opens odd stream ids.
    Server,
    /// The node end: dials the tunnel, opens even stream ids.
    Agent,
}

impl Role {
    /// The first stream id this end opens (SPEC 5.1).
    pub fn first_stream_id(self) -> u32 {
        match self {
            Role::Server => 1,
            Role::Agent => 2,
        }
    }

    /// Whether `id` is one this end opens.
    pub fn opens(self, id: StreamId) -> bool {
        id.0 % 2 == self.first_stream_id() % 2
    }
}

/// Local configuration of a session. The first four fields are announced as settings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Config {
    /// INITIAL_WINDOW announced: what the peer may send on a stream before credit returns.
    pub initial_window: u32,
    /// MAX_FRAME_SIZE announced: the largest payload this end accepts.
    pub max_frame_size: u32,
    /// MAX_CONCURRENT_STREAMS announced: how many streams the peer may have open here.
    pub max_concurrent_streams: u32,
    /// Keepalive interval in ms (0: none). The tunnel uses the smaller non-zero of both ends'.
    pub keepalive_interval_ms: u64,
    /// How long to wait, with a PING outstanding, for any frame before the tunnel is dead.
    pub keepalive_timeout_ms: u64,
    /// How long the handshake may take (0: no limit).
    pub handshake_timeout_ms: u64,
    /// Versions this end speaks.
    pub versions: Vec<u16>,
    /// The highest stream id this end will open; at it, the session drains (SPEC 5.1). Local
    /// policy, at most 2^31-1.
    pub stream_id_limit: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            initial_window: Settings::DEFAULT_INITIAL_WINDOW,
            max_frame_size: Settings::DEFAULT_MAX_FRAME_SIZE,
            max_concurrent_streams: Settings::DEFAULT_MAX_CONCURRENT_STREAMS,
            keepalive_interval_ms: 10_000,
            keepalive_timeout_ms: 20_000,
            handshake_timeout_ms: 10_000,
            versions: vec![PROTOCOL_VERSION],
            stream_id_limit: MAX_STREAM_ID,
        }
    }
}

impl Config {
    /// The settings this configuration announces.
    pub fn settings(&self) -> Settings {
        Settings {
            initial_window: Some(self.initial_window),
            max_frame_size: Some(self.max_frame_size),
            max_concurrent_streams: Some(self.max_concurrent_streams),
            keepalive_interval: Some(u32::try_from(self.keepalive_interval_ms).unwrap_or(u32::MAX)),
            unknown: Vec::new(),
        }
    }

    fn validate(&self) -> Result<(), ApiError> {
        self.settings().validate().map_err(ApiError::Invalid)?;
        if self.versions.is_empty() || self.versions.windows(2).any(|w| w[0] >= w[1]) {
            return Err(ApiError::Invalid(
                "versions must be non-empty and strictly ascending",
            ));
        }
        if self.stream_id_limit > MAX_STREAM_ID {
            return Err(ApiError::Invalid("stream id limit over 2^31-1"));
        }
        if self.keepalive_interval_ms > 0 && self.keepalive_timeout_ms == 0 {
            return Err(ApiError::Invalid("keepalive needs a non-zero timeout"));
        }
        Ok(())
    }
}

/// Who an agent is, sent in its HELLO.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AgentIdentity {
    /// The agent id.
    pub agent_id: String,
    /// What it can reach.
    pub identifiers: Vec<Identifier>,
    /// An optional bearer token.
    pub token: Option<Token>,
}

/// Who a server is, sent in its WELCOME.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerIdentity {
    /// The server id.
    pub server_id: String,
    /// How many servers the agent should connect to.
    pub server_count: u16,
}

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
    /// Ended; only a final GOAWAY may still go out.
    Closed(CloseReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct OutstandingPing {
    payload: u64,
    sent_at: Time,
    /// The application asked for it and wants `PingAnswered`.
    by_app: bool,
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
    local: Settings,
    peer: Settings,
    codec: FrameCodec,
    streams: BTreeMap<StreamId, Stream>,
    /// The next id this end opens.
    next_local: u32,
    /// The highest id the peer opened (0: none).
    last_peer: u32,
    local_opened: u32,
    peer_opened: u32,
    /// Streams with a frame to send, round robin; each at most once.
    ready: VecDeque<StreamId>,
    /// Peer dials refused without entering the table (SPEC 5.4), RESET still to send.
    refusals: VecDeque<(StreamId, &'static str)>,
    handshake_out: Option<Frame>,
    goaway_out: Option<GoAway>,
    /// This end queued a GOAWAY: it opens no streams and refuses new ones.
    draining: bool,
    /// This end's GOAWAY has been handed out by `poll_frame`.
    goaway_sent: bool,
    /// The peer's GOAWAY arrived.
    goaway_received: bool,
    pong_out: Option<u64>,
    ping_out: Option<u64>,
    ping: Option<OutstandingPing>,
    ping_wanted_by_app: bool,
    next_ping_payload: u64,
    ping_deadline: Option<Time>,
    next_ping: Option<Time>,
    handshake_deadline: Option<Time>,
    events: VecDeque<Event>,
}

fn violation(code: ErrorCode, kind: FrameKind, reason: &'static str) -> ProtocolError {
    ProtocolError::new(code, kind, reason)
}

fn protocol_error(kind: FrameKind, reason: &'static str) -> ProtocolError {
    violation(ErrorCode::PROTOCOL_ERROR, kind, reason)
}

impl Session {
    fn new(role: Role, config: Config, phase: SessionPhase, now: Time) -> Session {
        let handshake_deadline =
            (config.handshake_timeout_ms > 0).then(|| now.plus_ms(config.handshake_timeout_ms));
        Session {
            role,
            local: config.settings(),
            config,
            server_identity: None,
            phase,
            version: 0,
            peer: Settings::default(),
            codec: FrameCodec::with_max_payload(HANDSHAKE_MAX_PAYLOAD),
            streams: BTreeMap::new(),
            next_local: role.first_stream_id(),
            last_peer: 0,
            local_opened: 0,
            peer_opened: 0,
            ready: VecDeque::new(),
            refusals: VecDeque::new(),
            handshake_out: None,
            goaway_out: None,
            draining: false,
            goaway_sent: false,
            goaway_received: false,
            pong_out: None,
            ping_out: None,
            ping: None,
            ping_wanted_by_app: false,
            next_ping_payload: 1,
            ping_deadline: None,
            next_ping: None,
            handshake_deadline,
            events: VecDeque::new(),
        }
    }

    /// The agent end of a new tunnel; its HELLO is the first frame out (SPEC 4.1).
    pub fn agent(config: Config, identity: AgentIdentity, now: Time) -> Result<Session, ApiError> {
        config.validate()?;
        let hello = Hello {
            versions: config.versions.clone(),
            agent_id: identity.agent_id,
            identifiers: identity.identifiers,
            settings: config.settings(),
            token: identity.token,
        };
        hello.validate().map_err(ApiError::Invalid)?;
        if hello.encoded_len() > HANDSHAKE_MAX_PAYLOAD as usize {
            return Err(ApiError::Invalid("HELLO over the handshake payload limit"));
        }
        let mut s = Session::new(Role::Agent, config, SessionPhase::AwaitWelcome, now);
        s.handshake_out = Some(Frame::Hello(hello));
        Ok(s)
    }

    /// The server end of a new tunnel; it waits for HELLO (SPEC 4.1).
    pub fn server(
        config: Config,
        identity: ServerIdentity,
        now: Time,
    ) -> Result<Session, ApiError> {
        config.validate()?;
        let probe = Welcome {
            version: PROTOCOL_VERSION,
            server_id: identity.server_id.clone(),
            server_count: identity.server_count,
            settings: config.settings(),
        };
        probe.validate().map_err(ApiError::Invalid)?;
        let mut s = Session::new(Role::Server, config, SessionPhase::AwaitHello, now);
        s.server_identity = Some(identity);
        Ok(s)
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
        matches!(self.phase, SessionPhase::Closed(_))
    }

    /// Whether the session has ended and has nothing left to send: close the transport.
    pub fn is_finished(&self) -> bool {
        self.is_closed() && self.goaway_out.is_none()
    }

    /// Why the session ended, once it has.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        match &self.phase {
            SessionPhase::Closed(r) => Some(r),
            _ => None,
        }
    }

    /// Whether this end is draining (a GOAWAY was queued or received): no new streams.
    pub fn is_draining(&self) -> bool {
        self.draining || self.goaway_received
    }

    /// The negotiated version (0 before the handshake).
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The settings this end announced.
    pub fn local_settings(&self) -> &Settings {
        &self.local
    }

    /// The peer's settings (all defaults before the handshake).
    pub fn peer_settings(&self) -> &Settings {
        &self.peer
    }

    /// The payload limit the decoder applies now (SPEC 3.6). Callers that decode frames
    /// themselves must use it.
    pub fn max_inbound_payload(&self) -> u32 {
        self.codec.max_payload()
    }

    /// A stream's state; `None` once it is closed (or if it never existed).
    pub fn stream_state(&self, id: StreamId) -> Option<StreamState> {
        self.streams.get(&id).map(Stream::state)
    }

    /// How many bytes `send` would accept on `id` now.
    pub fn send_capacity(&self, id: StreamId) -> usize {
        match self.streams.get(&id) {
            Some(s) if s.phase == Phase::Established && s.send.state == SendState::Open => {
                s.send.window.available() as usize
            }
            _ => 0,
        }
    }

    /// Streams in the table (not yet closed), both ends' together.
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// Ids of the streams in the table, ascending.
    pub fn stream_ids(&self) -> impl Iterator<Item = StreamId> + '_ {
        self.streams.keys().copied()
    }

    /// Bytes delivered on `id` and not yet released (0 for a closed stream).
    pub fn unreleased(&self, id: StreamId) -> u32 {
        self.streams.get(&id).map_or(0, |s| s.recv.unreleased)
    }

    /// Bytes accepted by `send` on `id` and not yet framed.
    pub fn queued(&self, id: StreamId) -> u32 {
        self.streams.get(&id).map_or(0, |s| s.send.queued)
    }

    /// Whether [`Session::poll_frame`] may have a frame now: a transport writer that is
    /// idle needs waking only when this holds (after a `release` that stayed under the
    /// WINDOW batch threshold, say, it does not). It may answer `true` when
    /// `poll_frame` then finds nothing, never `false` when a frame is ready.
    pub fn wants_transmit(&self) -> bool {
        if self.is_closed() {
            return self.goaway_out.is_some();
        }
        self.handshake_out.is_some()
            || self.goaway_out.is_some()
            || (self.is_established()
                && (self.pong_out.is_some()
                    || self.ping_out.is_some()
                    || !self.refusals.is_empty()
                    || !self.ready.is_empty()))
    }

    /// Events waiting in the queue.
    pub fn pending_events(&self) -> usize {
        self.events.len()
    }

    fn window_threshold(&self) -> u32 {
        // SPEC 6.4: credit goes back in batches of at least half the window.
        (self.local.initial_window() / 2).max(1)
    }

    fn keepalive_interval(&self) -> u64 {
        let ours = self.config.keepalive_interval_ms;
        let theirs = u64::from(self.peer.keepalive_interval());
        match (ours, theirs) {
            (0, t) => t,
            (o, 0) => o,
            (o, t) => o.min(t),
        }
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
                Ok(Some(frame)) => self.handle_frame(now, frame),
                Ok(None) => return,
                Err(e) => {
                    buf.clear();
                    self.fail(e.into());
                    self.debug_check();
                    return;
                }
            }
        }
    }

    /// Feeds one decoded frame. The caller must have decoded it with
    /// [`Session::max_inbound_payload`] as the limit.
    pub fn handle_frame(&mut self, now: Time, frame: Frame) {
        if self.is_closed() {
            return;
        }
        if self.ping_deadline.is_some() {
            // SPEC 7.3: any frame shows the peer alive.
            self.ping_deadline = Some(now.plus_ms(self.config.keepalive_timeout_ms));
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
        if self.handshake_deadline.is_some_and(|d| now >= d) && !self.is_established() {
            self.shutdown(
                CloseReason::HandshakeTimeout,
                Some((ErrorCode::HANDSHAKE_TIMEOUT, "handshake timed out")),
            );
        } else if self.ping_deadline.is_some_and(|d| now >= d) {
            self.shutdown(
                CloseReason::KeepaliveTimeout,
                Some((
                    ErrorCode::KEEPALIVE_TIMEOUT,
                    "no frame within the keepalive deadline",
                )),
            );
        } else if self.next_ping.is_some_and(|t| now >= t) {
            self.next_ping = None;
            self.send_ping(now, false);
        }
        self.debug_check();
    }

    /// When [`Session::handle_timeout`] must next be called, if ever.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Time> {
        if self.is_closed() {
            return None;
        }
        let handshake = self.handshake_deadline.filter(|_| !self.is_established());
        [handshake, self.ping_deadline, self.next_ping]
            .into_iter()
            .flatten()
            .min()
    }

    // ----- output -----

    /// The next frame to write to the tunnel, in order. Control frames go first (GOAWAY, PING
    /// answers, refusals); streams take turns, one frame each (SPEC 7.7). Poll again after any
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
            && let Some(s) = self.streams.get_mut(stream)
        {
            s.announced = true;
        }
        Some(e)
    }

    fn next_frame(&mut self) -> Option<Frame> {
        if self.is_closed() {
            return self.goaway_out.take().map(Frame::GoAway);
        }
        if let Some(f) = self.handshake_out.take() {
            return Some(f);
        }
        if let Some(g) = self.goaway_out.take() {
            self.goaway_sent = true;
            self.maybe_drained();
            return Some(Frame::GoAway(g));
        }
        if !self.is_established() {
            return None;
        }
        if let Some(payload) = self.pong_out.take() {
            return Some(Frame::Ping(Ping { ack: true, payload }));
        }
        if let Some(payload) = self.ping_out.take() {
            return Some(Frame::Ping(Ping {
                ack: false,
                payload,
            }));
        }
        if let Some((stream, reason)) = self.refusals.pop_front() {
            let f = Frame::Reset(Reset {
                stream,
                code: ErrorCode::REFUSED_STREAM,
                reason: reason.to_owned(),
            });
            self.maybe_drained();
            return Some(f);
        }
        while let Some(id) = self.ready.pop_front() {
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            s.scheduled = false;
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
        let local_initial = self.local.initial_window();
        let s = self.streams.get_mut(&id)?;
        match &mut s.phase {
            Phase::Resetting { code, reason } => {
                let f = Frame::Reset(Reset {
                    stream: id,
                    code: *code,
                    reason: core::mem::take(reason),
                });
                self.remove_stream(id);
                return Some(f);
            }
            Phase::Dialing(dial) => return dial.take().map(Frame::Dial),
            Phase::Pending => return None,
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
            Some(front) if front.len() > max_payload => front.split_to(max_payload),
            Some(_) => s.send.queue.pop_front().unwrap_or_default(),
            None => Bytes::new(),
        };
        s.send.queued -= len32(&payload);
        let fin = s.send.queue.is_empty() && s.send.state == SendState::Finishing;
        if fin {
            s.send.state = SendState::Finished;
        }
        let done = s.is_done();
        if done {
            self.remove_stream(id);
        }
        Some(Frame::Data(Data {
            stream: id,
            fin,
            payload,
        }))
    }

    // ----- commands -----

    /// Server end: accepts the agent's HELLO and queues WELCOME (SPEC 4.2). Whether the
    /// agent's credentials are good is the caller's decision.
    pub fn accept_hello(&mut self, now: Time) -> Result<(), ApiError> {
        if self.phase != SessionPhase::AwaitDecision {
            return Err(ApiError::InvalidState("no HELLO awaiting a decision"));
        }
        let identity = self
            .server_identity
            .clone()
            .ok_or(ApiError::InvalidState("not a server end"))?;
        self.handshake_out = Some(Frame::Welcome(Welcome {
            version: self.version,
            server_id: identity.server_id,
            server_count: identity.server_count,
            settings: self.local.clone(),
        }));
        self.establish(now, None);
        self.debug_check();
        Ok(())
    }

    /// Server end: refuses the agent (bad credentials, say) with a GOAWAY and closes.
    pub fn refuse_hello(&mut self, code: ErrorCode, reason: &str) -> Result<(), ApiError> {
        if self.phase != SessionPhase::AwaitDecision {
            return Err(ApiError::InvalidState("no HELLO awaiting a decision"));
        }
        self.close(code, reason)
    }

    /// Opens a stream to `host:port` (SPEC 5.2): queues a DIAL and returns the new id.
    pub fn open(
        &mut self,
        protocol: Protocol,
        host: &str,
        port: u16,
    ) -> Result<StreamId, ApiError> {
        self.check_open()?;
        if self.is_draining() {
            return Err(ApiError::Draining);
        }
        if self.local_opened >= self.peer.max_concurrent_streams() {
            return Err(ApiError::StreamLimit);
        }
        if self.next_local > self.config.stream_id_limit {
            // SPEC 5.1: ids are never reused; a session out of ids drains.
            self.start_drain("stream ids exhausted");
            self.debug_check();
            return Err(ApiError::IdsExhausted);
        }
        let id = StreamId(self.next_local);
        let dial = Dial {
            stream: id,
            protocol,
            host: host.to_owned(),
            port,
        };
        dial.validate().map_err(ApiError::Invalid)?;
        self.next_local += 2;
        let stream = Stream::new(
            Phase::Dialing(Some(dial)),
            self.peer.initial_window(),
            self.local.initial_window(),
            true,
        );
        self.streams.insert(id, stream);
        self.local_opened += 1;
        self.schedule(id);
        self.debug_check();
        Ok(id)
    }

    /// Accepts a pending dial: queues DIAL_OK; data may flow (SPEC 5.2).
    pub fn accept(&mut self, id: StreamId) -> Result<(), ApiError> {
        self.check_open()?;
        let s = self.streams.get_mut(&id).ok_or(ApiError::UnknownStream)?;
        if s.phase != Phase::Pending {
            return Err(ApiError::InvalidState("accept needs a pending dial"));
        }
        s.phase = Phase::Established;
        s.dial_ok_queued = true;
        s.announced = true;
        self.schedule(id);
        self.debug_check();
        Ok(())
    }

    /// Rejects a pending dial with a RESET carrying `code` (a `DIAL_*` code, say).
    pub fn reject(&mut self, id: StreamId, code: ErrorCode, reason: &str) -> Result<(), ApiError> {
        self.check_open()?;
        match self.streams.get(&id) {
            Some(s) if s.phase == Phase::Pending => self.reset(id, code, reason),
            Some(_) => Err(ApiError::InvalidState("reject needs a pending dial")),
            None => Err(ApiError::UnknownStream),
        }
    }

    /// Queues bytes on an established stream; returns how many were taken, at most the credit
    /// left (SPEC 6.2). When the count is short or the window is now exhausted, a `Writable`
    /// event follows when credit returns. The bytes are not copied.
    pub fn send(&mut self, id: StreamId, data: Bytes) -> Result<usize, ApiError> {
        let s = self.sending_stream(id)?;
        let n = s.send.window.available().min(len32(&data));
        let short = (n as usize) < data.len();
        if n > 0 {
            s.send
                .window
                .consume(n)
                .map_err(|_| ApiError::Invalid("window"))?;
            s.send.queued += n;
            s.send.queue.push_back(data.slice(..n as usize));
        }
        // SPEC 6.2: a writer that was cut short, or that used the last of the window, is told
        // when credit returns.
        if short || s.send.window.is_exhausted() {
            s.want_writable = true;
        }
        if n > 0 {
            self.schedule(id);
        }
        self.debug_check();
        Ok(n as usize)
    }

    /// Half-closes this end's direction: FIN goes out after the queued bytes (SPEC 5.3).
    pub fn finish(&mut self, id: StreamId) -> Result<(), ApiError> {
        let s = self.sending_stream(id)?;
        s.send.state = SendState::Finishing;
        s.want_writable = false;
        self.schedule(id);
        self.debug_check();
        Ok(())
    }

    /// Aborts a stream in any state: a RESET with `code` goes out (or, for a DIAL not yet
    /// sent, nothing does) and the stream's queued bytes and undelivered events are dropped
    /// (SPEC 5.5). No event follows for it.
    pub fn reset(&mut self, id: StreamId, code: ErrorCode, reason: &str) -> Result<(), ApiError> {
        self.check_open()?;
        check_reason(reason)?;
        let s = self.streams.get_mut(&id).ok_or(ApiError::UnknownStream)?;
        match s.phase {
            Phase::Resetting { .. } => return Err(ApiError::InvalidState("already reset")),
            Phase::Dialing(Some(_)) => {
                // Never on the wire: the peer never learns of it (SPEC 5.1 allows the gap).
                self.purge_events(id);
                self.remove_stream(id);
            }
            _ => {
                s.phase = Phase::Resetting {
                    code,
                    reason: reason.to_owned(),
                };
                s.send.queue.clear();
                s.send.queued = 0;
                s.dial_ok_queued = false;
                s.want_writable = false;
                self.purge_events(id);
                self.schedule(id);
            }
        }
        self.debug_check();
        Ok(())
    }

    /// Returns `n` bytes of credit on `id`: the application has consumed them (written them
    /// on). WINDOW frames go out in batches (SPEC 6.4). Releasing on a closed stream does
    /// nothing.
    pub fn release(&mut self, id: StreamId, n: u32) -> Result<(), ApiError> {
        let Some(s) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        if n > s.recv.unreleased {
            return Err(ApiError::Invalid(
                "release of more bytes than were delivered",
            ));
        }
        s.recv.unreleased -= n;
        s.recv.pending += n;
        self.schedule(id);
        self.debug_check();
        Ok(())
    }

    /// Sends a PING; `PingAnswered` reports the round trip. At most one PING is outstanding:
    /// a second call while one is waits for the same answer.
    pub fn ping(&mut self, now: Time) -> Result<(), ApiError> {
        self.check_open()?;
        match &mut self.ping {
            Some(p) => p.by_app = true,
            None => self.send_ping(now, true),
        }
        self.debug_check();
        Ok(())
    }

    /// Starts a graceful drain (SPEC 7.4): a GOAWAY with NO_ERROR goes out, no new streams
    /// either way, existing streams finish, then the session closes with `Drained`.
    pub fn go_away(&mut self, reason: &str) -> Result<(), ApiError> {
        self.check_open()?;
        check_reason(reason)?;
        if !self.draining {
            self.start_drain(reason);
        }
        self.debug_check();
        Ok(())
    }

    /// Closes at once with a GOAWAY carrying `code`; every stream ends with an error.
    pub fn close(&mut self, code: ErrorCode, reason: &str) -> Result<(), ApiError> {
        if self.is_closed() {
            return Err(ApiError::Closed);
        }
        check_reason(reason)?;
        self.shutdown(
            CloseReason::Local {
                code,
                reason: reason.to_owned(),
            },
            Some((code, reason)),
        );
        self.debug_check();
        Ok(())
    }

    /// The stream `id` if it is established and this end may still send on it.
    fn sending_stream(&mut self, id: StreamId) -> Result<&mut Stream, ApiError> {
        self.check_open()?;
        let s = self.streams.get_mut(&id).ok_or(ApiError::UnknownStream)?;
        if s.phase != Phase::Established {
            return Err(ApiError::InvalidState("the stream is not established"));
        }
        if s.send.state != SendState::Open {
            return Err(ApiError::InvalidState(
                "this end already finished the stream",
            ));
        }
        Ok(s)
    }

    fn check_open(&self) -> Result<(), ApiError> {
        match self.phase {
            SessionPhase::Open => Ok(()),
            SessionPhase::Closed(_) => Err(ApiError::Closed),
            _ => Err(ApiError::NotOpen),
        }
    }

    // ----- inbound frames -----

    fn on_frame(&mut self, now: Time, frame: Frame) -> Result<(), ProtocolError> {
        let kind = frame.kind();
        match (&self.phase, frame) {
            // SPEC 3.2: unknown kinds are ignored in every phase.
            (_, Frame::Unknown(_)) | (SessionPhase::Closed(_), _) => Ok(()),
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
            (SessionPhase::AwaitHello, _) => Err(protocol_error(kind, "first frame is not HELLO")),
            (SessionPhase::AwaitWelcome, _) => Err(protocol_error(kind, "frame before WELCOME")),
            (SessionPhase::AwaitDecision, _) => {
                Err(protocol_error(kind, "frame after HELLO before WELCOME"))
            }
        }
    }

    fn on_hello(&mut self, hello: Hello) -> Result<(), ProtocolError> {
        // SPEC 9: the server picks the highest version both speak.
        let Some(version) = hello
            .versions
            .iter()
            .rev()
            .find(|v| self.config.versions.contains(v))
        else {
            return Err(violation(
                ErrorCode::VERSION_MISMATCH,
                FrameKind::HELLO,
                "no protocol version in common",
            ));
        };
        self.version = *version;
        self.peer = hello.settings.clone();
        self.phase = SessionPhase::AwaitDecision;
        self.events.push_back(Event::HelloReceived(hello));
        Ok(())
    }

    fn on_welcome(&mut self, now: Time, welcome: Welcome) -> Result<(), ProtocolError> {
        if !self.config.versions.contains(&welcome.version) {
            return Err(violation(
                ErrorCode::VERSION_MISMATCH,
                FrameKind::WELCOME,
                "WELCOME chose a version that was not offered",
            ));
        }
        self.version = welcome.version;
        self.peer = welcome.settings.clone();
        self.establish(now, Some(welcome));
        Ok(())
    }

    fn establish(&mut self, now: Time, welcome: Option<Welcome>) {
        self.phase = SessionPhase::Open;
        self.handshake_deadline = None;
        // SPEC 3.6: from here on, frames may be as large as this end announced.
        self.codec.set_max_payload(self.local.max_frame_size());
        let interval = self.keepalive_interval();
        self.next_ping = (interval > 0).then(|| now.plus_ms(interval));
        self.events.push_back(Event::Established {
            version: self.version,
            peer_settings: self.peer.clone(),
            welcome,
        });
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
                // SPEC 7.3: one answer is kept; a newer PING replaces an unsent answer.
                self.pong_out = Some(p.payload);
                Ok(())
            }
            Frame::GoAway(g) => {
                self.on_goaway(g);
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

    /// Finds the stream a frame is about (SPEC 5.4). `Ok(None)`: the stream is closed and the
    /// frame is ignored; `Err`: the id was never opened.
    fn lookup(&self, kind: FrameKind, id: StreamId) -> Result<Option<StreamId>, ProtocolError> {
        let never = || protocol_error(kind, "frame for a stream that was never opened");
        if self.role.opens(id) {
            if id.0 >= self.next_local {
                return Err(never());
            }
        } else if id.0 > self.last_peer {
            return Err(never());
        }
        match self.streams.get(&id) {
            None => Ok(None),
            Some(s) if matches!(s.phase, Phase::Dialing(Some(_))) => Err(never()),
            Some(_) => Ok(Some(id)),
        }
    }

    fn on_dial(&mut self, d: Dial) -> Result<(), ProtocolError> {
        let id = d.stream;
        if self.role.opens(id) {
            return Err(protocol_error(
                FrameKind::DIAL,
                "DIAL with this end's stream id parity",
            ));
        }
        if id.0 <= self.last_peer {
            return Err(protocol_error(FrameKind::DIAL, "DIAL reuses a stream id"));
        }
        if self.goaway_received {
            return Err(protocol_error(
                FrameKind::DIAL,
                "DIAL after the peer's GOAWAY",
            ));
        }
        self.last_peer = id.0;
        let limit = self.local.max_concurrent_streams();
        if self.draining || self.peer_opened >= limit {
            // SPEC 5.4: refused with a RESET the peer can tell apart; bounded (SPEC 10).
            if self.refusals.len() > limit as usize {
                return Err(violation(
                    ErrorCode::ENHANCE_YOUR_CALM,
                    FrameKind::DIAL,
                    "too many refused dials queued",
                ));
            }
            let reason = if self.draining {
                "session is draining"
            } else {
                "concurrent stream limit reached"
            };
            self.refusals.push_back((id, reason));
            return Ok(());
        }
        let stream = Stream::new(
            Phase::Pending,
            self.peer.initial_window(),
            self.local.initial_window(),
            false,
        );
        self.streams.insert(id, stream);
        self.peer_opened += 1;
        self.events.push_back(Event::DialRequested {
            stream: id,
            dial: d,
        });
        Ok(())
    }

    fn on_dial_ok(&mut self, id: StreamId) -> Result<(), ProtocolError> {
        let kind = FrameKind::DIAL_OK;
        let Some(id) = self.lookup(kind, id)? else {
            return Ok(());
        };
        if !self.role.opens(id) {
            return Err(protocol_error(kind, "DIAL_OK for a stream the peer opened"));
        }
        let Some(s) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        match s.phase {
            Phase::Dialing(None) => {
                s.phase = Phase::Established;
                self.events.push_back(Event::DialSucceeded { stream: id });
                Ok(())
            }
            // SPEC 5.5: a DIAL_OK that crosses our RESET is discarded.
            Phase::Resetting { .. } => Ok(()),
            _ => Err(protocol_error(kind, "DIAL_OK for an established stream")),
        }
    }

    fn on_data(&mut self, d: Data) -> Result<(), ProtocolError> {
        let kind = FrameKind::DATA;
        let Some(id) = self.lookup(kind, d.stream)? else {
            return Ok(());
        };
        let Some(s) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        match s.phase {
            Phase::Resetting { .. } => return Ok(()),
            Phase::Established if !s.dial_ok_queued => {}
            _ => return Err(protocol_error(kind, "DATA before DIAL_OK")),
        }
        if s.recv.state == RecvState::Finished {
            return Err(violation(ErrorCode::STREAM_CLOSED, kind, "DATA after FIN"));
        }
        let len = u32::try_from(d.payload.len()).unwrap_or(u32::MAX);
        // SPEC 6.3: a receiver treats an overrun as a protocol error.
        s.recv.window.consume(len).map_err(|_| {
            violation(
                ErrorCode::FLOW_CONTROL_ERROR,
                kind,
                "DATA beyond the window",
            )
        })?;
        s.recv.unreleased += len;
        if len > 0 {
            self.events.push_back(Event::Data {
                stream: id,
                data: d.payload,
            });
        }
        if d.fin {
            s.recv.state = RecvState::Finished;
            let done = s.is_done();
            self.events.push_back(Event::Finished { stream: id });
            if done {
                self.remove_stream(id);
            }
        }
        Ok(())
    }

    fn on_window(&mut self, w: WindowUpdate) -> Result<(), ProtocolError> {
        let kind = FrameKind::WINDOW;
        let Some(id) = self.lookup(kind, w.stream)? else {
            return Ok(());
        };
        let initial = self.peer.initial_window();
        let Some(s) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        match s.phase {
            Phase::Resetting { .. } => return Ok(()),
            Phase::Established if !s.dial_ok_queued => {}
            _ => {
                return Err(protocol_error(
                    kind,
                    "WINDOW before the stream was established",
                ));
            }
        }
        // SPEC 6.3: credit may only return bytes that were sent. Bytes still queued here were
        // taken from the window but never sent, so the peer cannot have received them.
        let cap = initial - s.send.queued;
        s.send.window.grow(w.increment, cap).map_err(|_| {
            violation(
                ErrorCode::FLOW_CONTROL_ERROR,
                kind,
                "WINDOW grants more than was sent",
            )
        })?;
        if s.want_writable && s.send.state == SendState::Open {
            s.want_writable = false;
            self.events.push_back(Event::Writable { stream: id });
        }
        Ok(())
    }

    fn on_reset(&mut self, r: Reset) -> Result<(), ProtocolError> {
        let Some(id) = self.lookup(FrameKind::RESET, r.stream)? else {
            return Ok(());
        };
        let Some(s) = self.streams.get(&id) else {
            return Ok(());
        };
        let error = StreamError {
            code: r.code,
            reason: r.reason,
            by: Initiator::Peer,
            session_closed: false,
        };
        let event = match s.phase {
            // Both ends reset: each already knows; nothing more to send.
            Phase::Resetting { .. } => None,
            Phase::Dialing(_) => Some(Event::DialFailed { stream: id, error }),
            _ if s.announced => Some(Event::Reset { stream: id, error }),
            _ => None,
        };
        self.purge_events(id);
        self.remove_stream(id);
        self.events.extend(event);
        Ok(())
    }

    fn on_goaway(&mut self, g: GoAway) {
        if g.code != ErrorCode::NO_ERROR {
            self.shutdown(
                CloseReason::Peer {
                    code: g.code,
                    reason: g.reason,
                },
                None,
            );
            return;
        }
        if self.goaway_received {
            return;
        }
        self.goaway_received = true;
        // SPEC 7.4: streams of this end above last_stream were not processed; they fail with
        // REFUSED_STREAM and may be opened again elsewhere.
        let unprocessed: Vec<StreamId> = self
            .streams
            .keys()
            .copied()
            .filter(|id| self.role.opens(*id) && *id > g.last_stream)
            .collect();
        for id in unprocessed {
            self.fail_local_stream(
                id,
                Initiator::Peer,
                "not processed before the peer's GOAWAY",
            );
        }
        self.events.push_back(Event::GoingAway {
            last_stream: g.last_stream,
            reason: g.reason,
        });
        if !self.draining {
            self.start_drain("answering GOAWAY");
        }
        self.maybe_drained();
    }

    fn on_pong(&mut self, now: Time, payload: u64) {
        match self.ping {
            Some(p) if p.payload == payload => {
                self.ping = None;
                self.ping_deadline = None;
                if p.by_app {
                    self.events.push_back(Event::PingAnswered {
                        rtt_ms: now.0.saturating_sub(p.sent_at.0),
                    });
                }
                let interval = self.keepalive_interval();
                self.next_ping = (interval > 0).then(|| now.plus_ms(interval));
            }
            // An answer to nothing outstanding is ignored (SPEC 7.3).
            _ => {}
        }
    }

    // ----- internals -----

    fn send_ping(&mut self, now: Time, by_app: bool) {
        let payload = self.next_ping_payload;
        self.next_ping_payload = self.next_ping_payload.wrapping_add(1);
        self.ping = Some(OutstandingPing {
            payload,
            sent_at: now,
            by_app: by_app || self.ping_wanted_by_app,
        });
        self.ping_wanted_by_app = false;
        self.ping_out = Some(payload);
        self.ping_deadline = Some(now.plus_ms(self.config.keepalive_timeout_ms.max(1)));
    }

    /// Fails a stream this end opened that the peer did not process (REFUSED_STREAM).
    fn fail_local_stream(&mut self, id: StreamId, by: Initiator, reason: &str) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        let error = StreamError {
            code: ErrorCode::REFUSED_STREAM,
            reason: reason.to_owned(),
            by,
            session_closed: false,
        };
        let event = match s.phase {
            Phase::Resetting { .. } => None,
            Phase::Dialing(_) => Some(Event::DialFailed { stream: id, error }),
            _ => Some(Event::Reset { stream: id, error }),
        };
        self.purge_events(id);
        self.remove_stream(id);
        self.events.extend(event);
    }

    fn start_drain(&mut self, reason: &str) {
        self.draining = true;
        self.goaway_out = Some(GoAway {
            last_stream: StreamId(self.last_peer),
            code: ErrorCode::NO_ERROR,
            reason: truncate_reason(reason),
        });
        // SPEC 7.4: no DIAL goes out after this end's GOAWAY; dials not yet sent fail here.
        let unsent: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(_, s)| matches!(s.phase, Phase::Dialing(Some(_))))
            .map(|(id, _)| *id)
            .collect();
        for id in unsent {
            self.fail_local_stream(id, Initiator::Local, "session is draining");
        }
    }

    /// Closes the session once a drain is complete (SPEC 7.4).
    fn maybe_drained(&mut self) {
        if self.is_established()
            && self.goaway_sent
            && self.goaway_received
            && self.streams.is_empty()
            && self.refusals.is_empty()
        {
            self.shutdown(CloseReason::Drained, None);
        }
    }

    /// A protocol violation by the peer: GOAWAY with its code, then closed (SPEC 8.2).
    fn fail(&mut self, e: ProtocolError) {
        self.shutdown(CloseReason::Violation(e), Some((e.code, e.reason)));
    }

    /// Ends the session: every stream gets its final event, every queue is emptied, and at
    /// most one GOAWAY stays queued (SPEC 7.5).
    fn shutdown(&mut self, reason: CloseReason, goaway: Option<(ErrorCode, &str)>) {
        if self.is_closed() {
            return;
        }
        let text = reason.to_string();
        let streams = core::mem::take(&mut self.streams);
        for (id, s) in streams {
            let error = StreamError {
                code: reason.code(),
                reason: text.clone(),
                by: reason.initiator(),
                session_closed: true,
            };
            self.purge_events(id);
            match s.phase {
                Phase::Resetting { .. } => {}
                Phase::Dialing(_) => self
                    .events
                    .push_back(Event::DialFailed { stream: id, error }),
                _ if s.announced => self.events.push_back(Event::Reset { stream: id, error }),
                _ => {}
            }
        }
        self.ready.clear();
        self.refusals.clear();
        self.local_opened = 0;
        self.peer_opened = 0;
        self.handshake_out = None;
        self.pong_out = None;
        self.ping_out = None;
        self.ping = None;
        self.ping_deadline = None;
        self.next_ping = None;
        self.handshake_deadline = None;
        self.goaway_out = goaway.map(|(code, r)| GoAway {
            last_stream: StreamId(self.last_peer),
            code,
            reason: truncate_reason(r),
        });
        self.events.push_back(Event::Closed(reason.clone()));
        self.phase = SessionPhase::Closed(reason);
    }

    fn schedule(&mut self, id: StreamId) {
        let threshold = self.window_threshold();
        if let Some(s) = self.streams.get_mut(&id)
            && !s.scheduled
            && s.has_work(threshold)
        {
            s.scheduled = true;
            self.ready.push_back(id);
        }
    }

    fn remove_stream(&mut self, id: StreamId) {
        if let Some(s) = self.streams.remove(&id) {
            if s.scheduled {
                self.ready.retain(|r| *r != id);
            }
            if self.role.opens(id) {
                self.local_opened -= 1;
            } else {
                self.peer_opened -= 1;
            }
        }
        self.maybe_drained();
    }

    /// Drops the events of a stream that ended abnormally (SPEC 5.5): its undelivered data is
    /// discarded, which bounds the event queue (SPEC 10).
    fn purge_events(&mut self, id: StreamId) {
        self.events.retain(|e| e.stream() != Some(id));
    }

    #[inline]
    fn debug_check(&self) {
        #[cfg(debug_assertions)]
        if let Err(broken) = self.check_invariants() {
            panic!("session invariant broken: {broken}\n{self:#?}");
        }
    }

    /// Checks every invariant of the session; `Err` names the one broken, as a sentence.
    ///
    /// Called after every transition in debug builds, and by the model checker and the fuzz
    /// targets.
    pub fn check_invariants(&self) -> Result<(), &'static str> {
        let local_initial = self.local.initial_window();
        let peer_initial = self.peer.initial_window();
        let threshold = self.window_threshold();
        if !self.is_established() && !self.streams.is_empty() {
            return Err("streams exist only while the session is open");
        }
        if self.is_closed() && (!self.ready.is_empty() || !self.refusals.is_empty()) {
            return Err("a closed session has nothing queued but its GOAWAY");
        }
        if self.next_local % 2 != self.role.first_stream_id() % 2 {
            return Err("the next local id has this end's parity");
        }
        let (mut local, mut peer) = (0u32, 0u32);
        let mut scheduled = 0usize;
        for (id, s) in &self.streams {
            if id.0 == 0 || id.0 > MAX_STREAM_ID {
                return Err("stream ids are between 1 and 2^31-1");
            }
            if self.role.opens(*id) {
                local += 1;
                if id.0 >= self.next_local {
                    return Err("a local stream id is below the next local id");
                }
                if s.phase == Phase::Pending || s.dial_ok_queued {
                    return Err("only the acceptor has pending dials and queues DIAL_OK");
                }
                if !s.announced {
                    return Err("the application knows every stream it opened");
                }
            } else {
                peer += 1;
                if id.0 > self.last_peer {
                    return Err("a peer stream id is at most the last peer id");
                }
                if matches!(s.phase, Phase::Dialing(_)) {
                    return Err("only the opener dials");
                }
            }
            if s.send.window.available() > peer_initial {
                return Err("a send window never exceeds the peer's initial window");
            }
            if s.send.queued > peer_initial - s.send.window.available() {
                return Err("queued bytes are part of the unacknowledged bytes");
            }
            let sum: usize = s.send.queue.iter().map(Bytes::len).sum();
            if sum != s.send.queued as usize {
                return Err("queued is the total length of the send queue");
            }
            if s.send.queued > 0 && s.phase != Phase::Established {
                return Err("only established streams queue bytes");
            }
            if s.send.state == SendState::Finished && s.send.queued > 0 {
                return Err("nothing is queued after FIN went out");
            }
            let recv_total = u64::from(s.recv.window.available())
                + u64::from(s.recv.unreleased)
                + u64::from(s.recv.pending);
            if recv_total != u64::from(local_initial) {
                return Err("receive window + unreleased + pending equals the initial window");
            }
            if s.is_done() {
                return Err("a stream with both halves finished is removed");
            }
            if s.scheduled {
                scheduled += 1;
            } else if s.has_work(threshold) {
                return Err("every stream with a frame to send is scheduled");
            }
        }
        if local != self.local_opened || peer != self.peer_opened {
            return Err("the open-stream counters match the table");
        }
        if self.is_established() && local > self.peer.max_concurrent_streams() {
            return Err("this end never opens more streams than the peer allows");
        }
        if peer > self.local.max_concurrent_streams() {
            return Err("the peer never has more streams here than this end allows");
        }
        if scheduled != self.ready.len() {
            return Err("the ready ring holds exactly the scheduled streams");
        }
        if self.ready.iter().any(|id| !self.streams.contains_key(id)) {
            return Err("the ready ring holds only streams in the table");
        }
        if self.refusals.len() > self.local.max_concurrent_streams() as usize + 1 {
            return Err("refusals are bounded by the concurrent stream limit");
        }
        if self.draining && !self.goaway_sent && self.goaway_out.is_none() && !self.is_closed() {
            return Err("a draining end has its GOAWAY queued or sent");
        }
        if self.local.initial_window() > MAX_WINDOW
            || self.codec.max_payload() < MIN_MAX_FRAME_SIZE.min(self.local.max_frame_size())
        {
            return Err("settings are in range");
        }
        Ok(())
    }
}

/// A payload length as `u32`; payloads are bounded far below 4 GiB (SPEC 3.6).
fn len32(b: &Bytes) -> u32 {
    u32::try_from(b.len()).unwrap_or(u32::MAX)
}

fn check_reason(reason: &str) -> Result<(), ApiError> {
    if reason.len() > 255 {
        return Err(ApiError::Invalid("reason over 255 bytes"));
    }
    Ok(())
}

/// Cuts `reason` to at most 255 bytes on a character boundary.
fn truncate_reason(reason: &str) -> String {
    let mut end = reason.len().min(255);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}
