//! An in-memory pair of sessions joined by a simulated tunnel, for tests, the model, the fuzz
//! targets and the benches (in the manner of quinn-proto's `Pair`).
//!
//! The tunnel is ordered like TCP. It can carry frames as values (no encoding: a DATA payload
//! arrives as the very `Bytes` that was sent) or as bytes cut into chunks of chosen sizes; it
//! can delay delivery (latency on a simulated clock), stop one side from reading, and drop.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use crate::Time;
use crate::codec::FrameCodec;
use crate::error::DecodeError;
use crate::frame::{Frame, Identifier};
use crate::session::{AgentIdentity, Config, Event, ServerIdentity, Session};

/// One end of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    /// The server end.
    Server,
    /// The agent end.
    Agent,
}

impl Side {
    /// The other end.
    pub fn peer(self) -> Side {
        match self {
            Side::Server => Side::Agent,
            Side::Agent => Side::Server,
        }
    }
}

/// How the simulated tunnel carries frames.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Carry {
    /// Frames as values: no encoding, payloads keep their identity.
    Frames,
    /// Encoded bytes, cut into chunks whose sizes cycle through the list (0 is read as 1).
    Bytes(Vec<usize>),
}

#[derive(Debug, Clone)]
enum Item {
    Frame(Frame),
    Bytes(Bytes),
}

/// One direction of the tunnel.
#[derive(Debug, Clone, Default)]
struct Link {
    in_flight: VecDeque<(Time, Item)>,
    rx: BytesMut,
    stalled: bool,
    cursor: usize,
}

/// Two sessions, a server and an agent, joined by a simulated tunnel.
#[derive(Debug, Clone)]
pub struct Pair {
    /// The server end.
    pub server: Session,
    /// The agent end.
    pub agent: Session,
    /// The simulated clock.
    pub now: Time,
    /// Delay between a frame leaving one end and reaching the other.
    pub latency_ms: u64,
    /// How the tunnel carries frames.
    pub carry: Carry,
    to_agent: Link,
    to_server: Link,
    dropped: bool,
    /// Frames each end sent, in order (server's, agent's), when `record` is on.
    pub sent: (Vec<Frame>, Vec<Frame>),
    /// Whether to record sent frames.
    pub record: bool,
}

/// The agent identity the pair uses.
pub fn test_agent_identity() -> AgentIdentity {
    AgentIdentity {
        agent_id: "agent-1".into(),
        identifiers: vec![Identifier::Host("node-1".into()), Identifier::DefaultRoute],
        token: None,
    }
}

/// The server identity the pair uses.
pub fn test_server_identity() -> ServerIdentity {
    ServerIdentity {
        server_id: "server-1".into(),
        server_count: 1,
    }
}

impl Pair {
    /// A new pair; nothing has moved yet.
    pub fn new(server: Config, agent: Config) -> Pair {
        let now = Time::from_millis(0);
        let server = Session::server(server, test_server_identity(), now)
            .unwrap_or_else(|e| panic!("server config: {e}"));
        let agent = Session::agent(agent, test_agent_identity(), now)
            .unwrap_or_else(|e| panic!("agent config: {e}"));
        Pair::from_sessions(server, agent)
    }

    /// A pair around two sessions made elsewhere.
    pub fn from_sessions(server: Session, agent: Session) -> Pair {
        Pair {
            server,
            agent,
            now: Time::from_millis(0),
            latency_ms: 0,
            carry: Carry::Frames,
            to_agent: Link::default(),
            to_server: Link::default(),
            dropped: false,
            sent: (Vec::new(), Vec::new()),
            record: false,
        }
    }

    /// A pair with both ends handshaken (the server accepts the HELLO); events drained.
    pub fn established(server: Config, agent: Config) -> Pair {
        let mut p = Pair::new(server, agent);
        p.handshake();
        p
    }

    /// Runs the handshake, accepting the agent; drains both ends' events.
    pub fn handshake(&mut self) {
        self.run();
        let hello = self
            .events(Side::Server)
            .into_iter()
            .any(|e| matches!(e, Event::HelloReceived(_)));
        assert!(hello, "the server end got a HELLO");
        self.server
            .accept_hello(self.now)
            .unwrap_or_else(|e| panic!("accept_hello: {e}"));
        self.run();
        self.events(Side::Agent);
        self.events(Side::Server);
        assert!(self.server.is_established() && self.agent.is_established());
    }

    /// One end's session.
    pub fn session(&mut self, side: Side) -> &mut Session {
        match side {
            Side::Server => &mut self.server,
            Side::Agent => &mut self.agent,
        }
    }

    /// Drains one end's events.
    pub fn events(&mut self, side: Side) -> Vec<Event> {
        let s = self.session(side);
        core::iter::from_fn(|| s.poll_event()).collect()
    }

    /// Stops (`true`) or resumes (`false`) `side` reading from the tunnel: frames to it wait.
    pub fn stall(&mut self, side: Side, stalled: bool) {
        self.link_to(side).stalled = stalled;
    }

    /// Whether anything is still travelling in either direction.
    pub fn in_flight(&self) -> bool {
        !self.to_agent.in_flight.is_empty()
            || !self.to_server.in_flight.is_empty()
            || !self.to_agent.rx.is_empty()
            || !self.to_server.rx.is_empty()
    }

    fn link_to(&mut self, side: Side) -> &mut Link {
        match side {
            Side::Server => &mut self.to_server,
            Side::Agent => &mut self.to_agent,
        }
    }

    /// The tunnel drops: both ends see the transport end; everything in flight is lost.
    pub fn drop_tunnel(&mut self) {
        self.dropped = true;
        self.to_agent = Link::default();
        self.to_server = Link::default();
        self.server.handle_transport_closed();
        self.agent.handle_transport_closed();
    }

    /// Moves every frame each end has to send into the tunnel. Returns how many moved.
    pub fn transmit(&mut self) -> usize {
        let mut n = 0;
        for side in [Side::Server, Side::Agent] {
            let deliver_at = self.now.plus_ms(self.latency_ms);
            let wants = self.session(side).wants_transmit();
            let mut frames = Vec::new();
            while let Some(f) = self.session(side).poll_frame() {
                frames.push(f);
            }
            assert!(
                wants || frames.is_empty(),
                "a frame was ready while wants_transmit() said no"
            );
            n += frames.len();
            if self.record {
                let log = match side {
                    Side::Server => &mut self.sent.0,
                    Side::Agent => &mut self.sent.1,
                };
                log.extend(frames.iter().cloned());
            }
            if self.dropped || frames.is_empty() {
                continue;
            }
            let carry = self.carry.clone();
            let link = self.link_to(side.peer());
            match carry {
                Carry::Frames => link
                    .in_flight
                    .extend(frames.into_iter().map(|f| (deliver_at, Item::Frame(f)))),
                Carry::Bytes(sizes) => {
                    let mut buf = BytesMut::new();
                    for f in &frames {
                        f.encode(&mut buf);
                    }
                    let mut bytes = buf.freeze();
                    while !bytes.is_empty() {
                        let size = sizes
                            .get(link.cursor % sizes.len().max(1))
                            .copied()
                            .unwrap_or(usize::MAX)
                            .max(1);
                        link.cursor = link.cursor.wrapping_add(1);
                        let chunk = bytes.split_to(size.min(bytes.len()));
                        link.in_flight.push_back((deliver_at, Item::Bytes(chunk)));
                    }
                }
            }
        }
        n
    }

    /// Delivers what has arrived by now to ends that are reading. Returns how many items.
    pub fn deliver(&mut self) -> usize {
        let mut n = 0;
        for side in [Side::Server, Side::Agent] {
            let now = self.now;
            loop {
                let link = self.link_to(side);
                if link.stalled {
                    break;
                }
                let Some((at, _)) = link.in_flight.front() else {
                    break;
                };
                if *at > now {
                    break;
                }
                let Some((_, item)) = link.in_flight.pop_front() else {
                    break;
                };
                n += 1;
                match item {
                    Item::Frame(f) => self.session(side).handle_frame(now, f),
                    Item::Bytes(b) => {
                        let link = self.link_to(side);
                        link.rx.extend_from_slice(&b);
                        let mut rx = core::mem::take(&mut link.rx);
                        self.session(side).handle_bytes(now, &mut rx);
                        self.link_to(side).rx = rx;
                    }
                }
            }
        }
        n
    }

    /// One round: transmit, then deliver. Returns whether anything moved.
    pub fn step(&mut self) -> bool {
        let t = self.transmit();
        let d = self.deliver();
        t + d > 0
    }

    /// Steps until nothing moves (at most 1,000,000 rounds). Returns the rounds taken.
    pub fn run(&mut self) -> usize {
        for round in 0..1_000_000 {
            if !self.step() {
                return round;
            }
        }
        panic!("the pair did not settle in 1,000,000 rounds");
    }

    /// Moves the clock forward by `ms` and fires due timers at both ends.
    pub fn advance(&mut self, ms: u64) {
        self.now = self.now.plus_ms(ms);
        for side in [Side::Server, Side::Agent] {
            let now = self.now;
            let s = self.session(side);
            if s.poll_timeout().is_some_and(|t| t <= now) {
                s.handle_timeout(now);
            }
        }
    }

    /// The earliest time either end wants a timeout, or a frame in flight arrives at an end
    /// that is reading.
    pub fn next_wakeup(&self) -> Option<Time> {
        [
            self.server.poll_timeout(),
            self.agent.poll_timeout(),
            self.to_agent
                .in_flight
                .front()
                .filter(|_| !self.to_agent.stalled)
                .map(|(t, _)| *t),
            self.to_server
                .in_flight
                .front()
                .filter(|_| !self.to_server.stalled)
                .map(|(t, _)| *t),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Moves the clock to the next wakeup (if later than now), fires timers, and runs.
    pub fn advance_to_next(&mut self) -> bool {
        self.transmit();
        match self.next_wakeup() {
            Some(t) => {
                let by = t.as_millis().saturating_sub(self.now.as_millis());
                self.advance(by);
                self.run();
                true
            }
            None => false,
        }
    }
}

/// Moves `total` bytes from the server end to the agent end over `streams` streams, the
/// agent releasing credit as it consumes: the pair-transfer workload of the example and the
/// benches. Returns the bytes received.
pub fn transfer(pair: &mut Pair, total: usize, streams: usize) -> usize {
    use crate::frame::Protocol;
    let streams = streams.max(1);
    let mut ids = Vec::new();
    for _ in 0..streams {
        let id = pair
            .server
            .open(Protocol::TCP, "sink", 9)
            .unwrap_or_else(|e| panic!("open: {e}"));
        pair.run();
        pair.events(Side::Agent);
        pair.agent
            .accept(id)
            .unwrap_or_else(|e| panic!("accept: {e}"));
        pair.run();
        pair.events(Side::Server);
        ids.push(id);
    }
    let per_stream = total / streams;
    let chunk = Bytes::from(vec![0xa5u8; 256 * 1024]);
    let mut sent = vec![0usize; streams];
    let mut received = 0usize;
    while received < per_stream * streams {
        for (i, id) in ids.iter().enumerate() {
            while sent[i] < per_stream {
                let want = chunk.len().min(per_stream - sent[i]);
                match pair.server.send(*id, chunk.slice(..want)) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sent[i] += n,
                }
            }
        }
        if pair.run() == 0 && !pair.in_flight() {
            break;
        }
        while let Some(e) = pair.agent.poll_event() {
            if let Event::Readable { stream } = e {
                while let Ok(Some(data)) = pair.agent.recv(stream, usize::MAX) {
                    received += data.len();
                    pair.agent
                        .release(stream, u32::try_from(data.len()).unwrap_or(0))
                        .unwrap_or_else(|e| panic!("release: {e}"));
                }
            }
        }
        while pair.server.poll_event().is_some() {}
    }
    received
}

/// Decodes every whole frame of `bytes` with `max_payload` as the limit: the frames, and the
/// error that stopped decoding, if any. Leftover bytes of an incomplete frame are ignored.
pub fn decode_all(bytes: &[u8], max_payload: u32) -> (Vec<Frame>, Option<DecodeError>) {
    let mut codec = FrameCodec::with_max_payload(max_payload);
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    loop {
        match codec.decode(&mut buf) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => return (frames, None),
            Err(e) => return (frames, Some(e)),
        }
    }
}
