//! The tunnel driver: one framed TLS stream joined to one [`Session`] (docs/ARCHITECTURE.md).
//!
//! The session decides; this module only moves bytes and time. Two tasks share the session
//! behind a mutex that is never held across an `.await`:
//!
//! - the **reader** reads whatever the transport has, feeds it to `handle_bytes`, and wakes
//!   whoever the session's events concern. It never waits for the writer.
//! - the **writer** fires due timers (the handshake deadline, keepalive, all of them), takes
//!   every frame the session has ready, and writes them with one vectored write: small frames
//!   are coalesced into one buffer, DATA payloads go out as the very `Bytes` the application
//!   gave (rustls copies them once, into TLS records).
//!
//! The driver starts before the handshake: HELLO, WELCOME and the handshake deadline go
//! through the same loop as every other frame and timer. Received bytes wait in the session's
//! per-stream buffers, bounded by the window it enforces; this module holds no stream state,
//! only the wakers of the tasks waiting on a stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use tether_proto::frame::{Dial, Hello, Protocol, Welcome};
use tether_proto::{ApiError, CloseReason, ErrorCode, Event, Session, StreamId, Time};
use tether_proto::{StreamError, StreamState};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::Instrument;

mod driver;
mod ops;
mod stream;

pub use stream::{Gone, Incoming, RecvHalf, SendHalf, TetherStream};

/// Decides an agent's HELLO at the server end (SPEC 4.2), at once or later.
pub type HelloPolicy = Box<dyn Fn(&Hello) -> Verdict + Send>;

/// A policy's answer to a HELLO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// WELCOME goes out.
    Accept,
    /// GOAWAY with this code and reason, then close.
    Refuse(ErrorCode, String),
    /// The caller decides (an API call, say): the handshake reports the HELLO at once
    /// ([`Handshake::Hello`]) and [`Tunnel::decide_hello`] answers it, within the session's
    /// handshake deadline.
    Later,
}

/// A finished handshake: the agent's HELLO (server end) or the server's WELCOME (agent end).
#[derive(Debug, Clone)]
pub enum Handshake {
    /// Server end: the HELLO the policy accepted or, after [`Verdict::Later`], the one to decide.
    Hello(Hello),
    /// Agent end: the server's WELCOME.
    Welcome(Welcome),
}

/// The end of a handshake in progress: [`Handshaking::done`] waits for it.
#[derive(Debug)]
pub struct Handshaking(oneshot::Receiver<Result<Handshake, CloseReason>>);

impl Handshaking {
    /// Waits until the session is established (or has closed: refused, timed out, broken).
    /// The deadline is the session's own handshake timer, fired by the tunnel's writer.
    pub async fn done(self) -> Result<Handshake, CloseReason> {
        self.0.await.unwrap_or(Err(CloseReason::TransportLost))
    }
}

/// The tasks waiting on one stream.
#[derive(Default)]
struct Wakers {
    read: Option<Waker>,
    write: Option<Waker>,
}

impl Wakers {
    fn wake(&mut self) {
        if let Some(w) = self.read.take() {
            w.wake();
        }
        if let Some(w) = self.write.take() {
            w.wake();
        }
    }
}

/// The handshake's pending result: the HELLO seen so far, and who waits.
struct PendingHandshake {
    hello: Option<Hello>,
    tx: oneshot::Sender<Result<Handshake, CloseReason>>,
}

struct Shared {
    session: Session,
    wakers: HashMap<StreamId, Wakers>,
    /// Where the peer's dials go. Dropping the sender under the lock is safe: dials still
    /// queued stay with the receiver, which drops them (and so takes the lock) on its own.
    incoming: Option<mpsc::UnboundedSender<Incoming>>,
    policy: Option<HelloPolicy>,
    handshake: Option<PendingHandshake>,
}

struct Inner {
    state: Mutex<Shared>,
    writer: Notify,
    closed: Notify,
    epoch: Instant,
    label: String,
    stats: Option<Arc<crate::stats::TunnelStats>>,
    linger: Duration,
}

/// A running tunnel: a handle that opens streams and watches the session.
#[derive(Clone)]
pub struct Tunnel {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tunnel({})", self.inner.label)
    }
}

/// Why a stream could not be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialError {
    /// No connected agent serves the destination.
    NoAgent,
    /// No answer within the dial timeout; the dial was cancelled.
    Timeout,
    /// The session would not open a stream now (closed, draining, at its limit).
    Unavailable(ApiError),
    /// The acceptor refused or failed it, or the tunnel ended (see the code).
    Failed(StreamError),
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DialError::NoAgent => f.write_str("no agent for this destination"),
            DialError::Timeout => f.write_str("dial timed out"),
            DialError::Unavailable(e) => write!(f, "tunnel unavailable: {e}"),
            DialError::Failed(e) => write!(f, "dial failed: {e}"),
        }
    }
}

impl std::error::Error for DialError {}

impl Inner {
    fn now(&self) -> Time {
        Time::from_millis(u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    fn instant(&self, t: Time) -> Instant {
        at(self.epoch, t)
    }
}

/// The instant of session time `t` on a clock whose zero is `epoch`.
fn at(epoch: Instant, t: Time) -> Instant {
    epoch + Duration::from_millis(t.as_millis())
}

/// How to start a tunnel: besides the transport and the session, who gets the peer's dials,
/// who decides a HELLO, the session's clock zero, and a name for logs.
pub struct Start {
    /// Dials from the peer go here; `None`: they are refused with DIAL_FORBIDDEN.
    pub incoming: Option<mpsc::UnboundedSender<Incoming>>,
    /// Server end: what decides the agent's HELLO; `None`: every HELLO is accepted.
    pub policy: Option<HelloPolicy>,
    /// The instant the session's `Time` counts from (the session was made at `Time` 0).
    pub epoch: Instant,
    /// A name for logs.
    pub label: String,
    /// Counters shared with the other tunnels of this process (bytes, stream errors).
    pub stats: Option<Arc<crate::stats::TunnelStats>>,
    /// How long a stream whose sending side has finished may wait for credit without moving
    /// a byte before it is reset ([`crate::pump::LINGER`]; see [`SendHalf::send_watching`]).
    pub linger: Duration,
}

/// `config` as a tunnel runs it: DATA payloads under an eighth of the reader's allocation are
/// copied into their stream's buffer, so a stream's unread bytes keep at most 8 times their
/// size alive however a peer sizes its frames (SPEC 10, docs/SECURITY.md).
pub fn session_config(config: &tether_proto::Config) -> tether_proto::Config {
    let floor = u32::try_from(driver::READ_BLOCK / 8).unwrap_or(u32::MAX);
    tether_proto::Config {
        recv_copy_below: config.recv_copy_below.max(floor),
        ..config.clone()
    }
}

/// When the handshake deadline of `session` falls, as an instant of `epoch`'s clock: the TLS
/// handshake that comes before the tunnel runs under it too (one budget).
pub fn handshake_deadline(session: &Session, epoch: Instant) -> Option<tokio::time::Instant> {
    session.poll_timeout().map(|t| at(epoch, t).into())
}

impl Tunnel {
    /// Starts the reader and writer tasks over `io` (TLS already done) with a fresh `session`,
    /// which handshakes through them. Returns the tunnel and its handshake's outcome.
    pub fn spawn<IO>(io: IO, session: Session, start: Start) -> (Tunnel, Handshaking)
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let inner = Arc::new(Inner {
            state: Mutex::new(Shared {
                session,
                wakers: HashMap::new(),
                incoming: start.incoming,
                policy: start.policy,
                handshake: Some(PendingHandshake { hello: None, tx }),
            }),
            writer: Notify::new(),
            closed: Notify::new(),
            epoch: start.epoch,
            label: start.label,
            stats: start.stats,
            linger: start.linger,
        });
        let tunnel = Tunnel { inner };
        let (r, w) = tokio::io::split(io);
        // The driver's tasks log in the span of whoever started the tunnel (its peer, agent).
        let span = tracing::Span::current();
        let reading = tokio::spawn(driver::reader(tunnel.clone(), r).instrument(span.clone()));
        // The writer ends the reader when the session is over: a dead peer may never send the
        // EOF that would end it, and its socket must not outlive the session.
        tokio::spawn(driver::writer(tunnel.clone(), w, reading.abort_handle()).instrument(span));
        (tunnel, Handshaking(rx))
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the shared state under the lock, then acts on every event it caused
    /// ([`dispatch`]), and wakes the writer when `f` made a frame due or ended the session (a
    /// read that completes a drain closes the session, and only the writer closes the
    /// transport). Every input and command goes through here, so no event waits for the next
    /// one.
    ///
    /// The writer is woken on the transition only: while a frame is already due, whoever made
    /// it due has woken the writer, which polls until nothing is left, so a second wake would
    /// only cost it a spurious turn (and, across worker threads, a context switch).
    fn drive<R>(&self, f: impl FnOnce(&mut Shared, Time) -> R) -> R {
        let due = |s: &Session| s.wants_transmit() || s.is_finished();
        let (r, wake) = {
            let mut sh = self.lock();
            let before = due(&sh.session);
            let r = f(&mut sh, self.inner.now());
            dispatch(&mut sh, self);
            (r, !before && due(&sh.session))
        };
        if wake {
            self.wake_writer();
        }
        r
    }

    fn wake_writer(&self) {
        self.inner.writer.notify_one();
    }

    /// Server end: answers the HELLO a [`Verdict::Later`] policy left open. `Err` if there is
    /// none to answer any more (the handshake deadline passed, the agent left).
    pub fn decide_hello(&self, verdict: Result<(), (ErrorCode, String)>) -> Result<(), ApiError> {
        self.drive(|sh, now| match verdict {
            Ok(()) => sh.session.accept_hello(now),
            Err((code, reason)) => sh.session.refuse_hello(code, &reason),
        })
    }

    /// How long a stream whose sending side has finished may wait for credit without moving
    /// a byte ([`Start::linger`]).
    pub fn linger(&self) -> Duration {
        self.inner.linger
    }

    /// A name for logs.
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    /// Opens a stream to `host:port` and waits for the acceptor's answer, at most `timeout`.
    pub async fn dial(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<TetherStream, DialError> {
        let id = self.drive(|sh, _| {
            let id = sh.session.open(Protocol::TCP, host, port)?;
            sh.wakers.insert(id, Wakers::default());
            Ok(id)
        });
        let id = id.map_err(DialError::Unavailable)?;
        let stream = TetherStream::new(self.clone(), id);
        let answer = std::future::poll_fn(|cx| {
            self.drive(|sh, _| match sh.session.stream_state(id) {
                Some(StreamState::Dialing) => {
                    sh.park_reader(id, cx);
                    Poll::Pending
                }
                _ => Poll::Ready(sh.session.stream_error(id)),
            })
        });
        match tokio::time::timeout(timeout, answer).await {
            Ok(None) => Ok(stream),
            Ok(Some(e)) => Err(DialError::Failed(e)),
            Err(_) => {
                // SPEC 5.5: a cancelled dial is a RESET; a crossing DIAL_OK is discarded.
                stream.reset(ErrorCode::CANCEL, "dial timed out");
                Err(DialError::Timeout)
            }
        }
    }

    /// Starts a graceful drain (GOAWAY); the tunnel closes when its streams are done.
    pub fn go_away(&self, reason: &str) {
        if let Err(e) = self.drive(|sh, _| sh.session.go_away(reason)) {
            tracing::debug!(tunnel = %self.inner.label, error = %e, "no drain");
        }
    }

    /// Closes at once with a GOAWAY carrying `code`.
    pub fn close(&self, code: ErrorCode, reason: &str) {
        if let Err(e) = self.drive(|sh, _| sh.session.close(code, reason)) {
            tracing::debug!(tunnel = %self.inner.label, error = %e, "close");
        }
    }

    /// Why the session ended, once it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.lock().session.close_reason().cloned()
    }

    /// Whether the session is open and not draining.
    pub fn is_usable(&self) -> bool {
        self.lock().session.is_usable()
    }

    /// Whether the peer announced it will drain soon (DRAINING, SPEC 7.4): still usable, but
    /// new streams belong on another tunnel when there is one.
    pub fn peer_will_drain(&self) -> bool {
        self.lock().session.peer_will_drain()
    }

    /// Announces a drain to come (DRAINING, SPEC 7.4): the peer is told to open new streams
    /// elsewhere when it can; this end still accepts them until [`Tunnel::go_away`]. `false`
    /// when the peer does not take the notice, or the tunnel is draining or closed.
    pub fn announce_draining(&self) -> bool {
        self.drive(|sh, _| sh.session.announce_draining())
            .unwrap_or(false)
    }

    /// Live streams in the session.
    pub fn stream_count(&self) -> usize {
        self.lock().session.stream_count()
    }

    /// Streams in the session's table: the live ones, and closed ones a handle still holds.
    pub fn streams_held(&self) -> usize {
        self.lock().session.stream_ids().count()
    }

    /// Waits until the session has ended.
    pub async fn closed(&self) -> CloseReason {
        loop {
            let notified = self.inner.closed.notified();
            if let Some(r) = self.close_reason() {
                return r;
            }
            notified.await;
        }
    }
}

/// Acts on the session's events: decides a HELLO by the policy, hands dials to `incoming`,
/// and wakes whoever waits on a stream. Called with the lock held, after any input.
fn dispatch(sh: &mut Shared, tunnel: &Tunnel) {
    let label = &tunnel.inner.label;
    while let Some(e) = sh.session.poll_event() {
        match e {
            Event::Readable { stream } => {
                if let Some(w) = sh.wakers.get_mut(&stream).and_then(|w| w.read.take()) {
                    w.wake();
                }
            }
            Event::Writable { stream } => {
                if let Some(w) = sh.wakers.get_mut(&stream).and_then(|w| w.write.take()) {
                    w.wake();
                }
            }
            Event::DialSucceeded { stream } => {
                if let Some(w) = sh.wakers.get_mut(&stream) {
                    w.wake();
                }
            }
            Event::DialFailed { stream, error } | Event::Reset { stream, error } => {
                if let Some(s) = &tunnel.inner.stats {
                    s.stream_error(error.code, error.by);
                }
                if let Some(w) = sh.wakers.get_mut(&stream) {
                    w.wake();
                }
            }
            Event::DialRequested { stream, dial } => offer(sh, tunnel, stream, dial),
            Event::HelloReceived(hello) => {
                let verdict = sh
                    .policy
                    .as_ref()
                    .map_or(Verdict::Accept, |decide| decide(&hello));
                let decided = match verdict {
                    Verdict::Accept => sh.session.accept_hello(tunnel.inner.now()),
                    Verdict::Refuse(code, reason) => {
                        tracing::warn!(tunnel = %label, agent_id = %hello.agent_id.escape_debug(), %code, %reason, "agent refused");
                        sh.session.refuse_hello(code, &reason)
                    }
                    Verdict::Later => {
                        sh.policy = None;
                        if let Some(p) = sh.handshake.take() {
                            drop(p.tx.send(Ok(Handshake::Hello(hello))));
                        }
                        continue;
                    }
                };
                if let Err(e) = decided {
                    tracing::error!(tunnel = %label, error = %e, "deciding the HELLO failed");
                }
                if let Some(p) = &mut sh.handshake {
                    p.hello = Some(hello);
                }
            }
            Event::Established { welcome, .. } => {
                sh.policy = None;
                if let Some(p) = sh.handshake.take() {
                    let done = match (p.hello, welcome) {
                        (Some(h), _) => Ok(Handshake::Hello(h)),
                        (None, Some(w)) => Ok(Handshake::Welcome(w)),
                        (None, None) => Err(CloseReason::TransportLost),
                    };
                    // Nobody waiting for the handshake is not an error: the tunnel runs on.
                    drop(p.tx.send(done));
                }
            }
            Event::GoingAway { reason, .. } => {
                tracing::info!(tunnel = %label, %reason, "peer is going away");
            }
            Event::Closed(reason) => {
                if reason.is_graceful() {
                    tracing::info!(tunnel = %label, %reason, "tunnel closed");
                } else {
                    tracing::warn!(tunnel = %label, %reason, "tunnel closed");
                }
                if let Some(p) = sh.handshake.take() {
                    drop(p.tx.send(Err(reason.clone())));
                }
                sh.wakers.values_mut().for_each(Wakers::wake);
                sh.incoming = None;
                tunnel.inner.closed.notify_waiters();
            }
            _ => {}
        }
    }
}

/// Hands a peer's dial to the application, or rejects it when there is none.
fn offer(sh: &mut Shared, tunnel: &Tunnel, stream: StreamId, dial: Dial) {
    if let Some(tx) = &sh.incoming {
        let incoming = Incoming {
            stream: TetherStream::new(tunnel.clone(), stream),
            dial,
        };
        match tx.send(incoming) {
            Ok(()) => {
                sh.wakers.insert(stream, Wakers::default());
                return;
            }
            // The receiver is gone: forget the handle without taking the lock its drop takes.
            Err(e) => e.0.stream.forget(),
        }
    }
    // Rejected and let go of at once: no handle will ever hold it (SPEC 5.6).
    let refused = sh
        .session
        .reject(
            stream,
            ErrorCode::DIAL_FORBIDDEN,
            "this end accepts no dials",
        )
        .and_then(|()| sh.session.abandon(stream));
    if let Err(e) = refused {
        tracing::error!(tunnel = %tunnel.inner.label, %stream, error = %e, "refusing a dial failed");
    }
}
