//! The tunnel driver: one framed TLS stream joined to one [`Session`] (DESIGN §9, STYLE 10).
//!
//! The session decides; this module only moves bytes. Two tasks share the session behind a
//! mutex that is never held across an `.await`:
//!
//! - the **reader** reads whatever the transport has, feeds it to `handle_bytes`, and hands
//!   the events to the streams. It never waits for the writer.
//! - the **writer** fires due timers, takes every frame the session has ready, and writes them
//!   with one vectored write: small frames are coalesced into one buffer, DATA payloads go out
//!   as the very `Bytes` the application gave (rustls copies them once, into TLS records).
//!
//! Per-stream buffers hold only what the session delivered, so they are bounded by the window
//! the session enforces; credit goes back only when the stream's consumer releases it.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tether_proto::frame::{Dial, Hello, Protocol, Welcome};
use tether_proto::session::Time;
use tether_proto::{CloseReason, ErrorCode, Event, Frame, Session, StreamError, StreamId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::buffer::{Chunks, Recycled};
use crate::stream::TetherStream;

/// Free space the reader wants before each read, and the size of its allocations: DATA
/// payloads are slices of them, so one is reused once every payload read into it is gone.
const READ_MIN: usize = 64 * 1024;
const READ_BLOCK: usize = 512 * 1024;
/// Older read allocations the reader keeps for reuse.
const READ_SPARES: usize = 2;
/// A read shorter than this lets the reader's spare allocations go.
const QUIET_READ: usize = 4096;
/// Bytes of frames gathered into one vectored write, at most.
const WRITE_BATCH: usize = 512 * 1024;
/// DATA payloads at least this long go out as their own slice instead of being copied.
const ZERO_COPY_MIN: usize = 2048;

/// A dial from the peer, waiting for this end to accept or reject it.
pub struct Incoming {
    /// The stream; usable once accepted.
    pub stream: TetherStream,
    /// Where the peer wants it to go.
    pub dial: Dial,
}

impl Incoming {
    /// Accepts: DIAL_OK goes out and the stream is established.
    pub fn accept(self) -> TetherStream {
        {
            let mut sh = self.stream.tunnel.lock();
            let _ = sh.session.accept(self.stream.id);
        }
        self.stream.tunnel.wake_writer();
        self.stream
    }

    /// Rejects with `code` (a `DIAL_*` code) and a short reason.
    pub fn reject(self, code: ErrorCode, reason: &str) {
        self.stream.reset(code, reason);
    }
}

/// One stream's buffers at this end of the tunnel.
#[derive(Default)]
pub(crate) struct Slot {
    /// Delivered, not yet read by the stream's consumer.
    pub(crate) recv: VecDeque<Bytes>,
    /// The peer finished its direction.
    pub(crate) fin: bool,
    /// The stream ended abnormally.
    pub(crate) error: Option<StreamError>,
    pub(crate) read_waker: Option<Waker>,
    pub(crate) write_waker: Option<Waker>,
}

impl Slot {
    fn wake(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }
}

pub(crate) struct Shared {
    pub(crate) session: Session,
    pub(crate) slots: HashMap<StreamId, Slot>,
    dials: HashMap<StreamId, oneshot::Sender<Result<(), StreamError>>>,
    incoming: Option<mpsc::UnboundedSender<Incoming>>,
    pub(crate) closed: Option<CloseReason>,
}

pub(crate) struct Inner {
    state: Mutex<Shared>,
    writer: Notify,
    closed: Notify,
    epoch: Instant,
    label: String,
}

/// A running tunnel: a handle that opens streams and watches the session.
#[derive(Clone)]
pub struct Tunnel {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tunnel({})", self.inner.label)
    }
}

/// Why a dial through a tunnel failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialError {
    /// The acceptor refused or failed it, or the tunnel ended (see the code).
    Failed(StreamError),
    /// No answer within the dial timeout; the dial was cancelled.
    Timeout,
    /// The session would not open a stream now (closed, draining, at its limit).
    Unavailable(tether_proto::ApiError),
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DialError::Failed(e) => write!(f, "dial failed: {e}"),
            DialError::Timeout => f.write_str("dial timed out"),
            DialError::Unavailable(e) => write!(f, "tunnel unavailable: {e}"),
        }
    }
}

impl std::error::Error for DialError {}

impl Inner {
    pub(crate) fn now(&self) -> Time {
        Time(u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    fn instant(&self, t: Time) -> Instant {
        self.epoch + Duration::from_millis(t.0)
    }
}

impl Tunnel {
    /// Starts the reader and writer tasks over `io`, whose handshake is done: `session` is
    /// established and `leftover` holds bytes already read past the handshake. Dials from the
    /// peer go to `incoming` (or are rejected when there is none).
    pub fn spawn<IO>(
        io: IO,
        session: Session,
        leftover: BytesMut,
        incoming: Option<mpsc::UnboundedSender<Incoming>>,
        epoch: Instant,
        label: String,
    ) -> Tunnel
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let inner = Arc::new(Inner {
            state: Mutex::new(Shared {
                session,
                slots: HashMap::new(),
                dials: HashMap::new(),
                incoming,
                closed: None,
            }),
            writer: Notify::new(),
            closed: Notify::new(),
            epoch,
            label,
        });
        let tunnel = Tunnel { inner };
        let (r, w) = tokio::io::split(io);
        let reading = tokio::spawn(reader(tunnel.clone(), r, leftover));
        // The writer ends the reader when the session is over: a dead peer may never send the
        // EOF that would end it, and its socket must not outlive the session.
        tokio::spawn(writer(tunnel.clone(), w, reading.abort_handle()));
        tunnel
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Shared> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn wake_writer(&self) {
        self.inner.writer.notify_one();
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
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut sh = self.lock();
            let id = sh
                .session
                .open(Protocol::TCP, host, port)
                .map_err(DialError::Unavailable)?;
            sh.slots.insert(id, Slot::default());
            sh.dials.insert(id, tx);
            id
        };
        self.wake_writer();
        let stream = TetherStream::new(self.clone(), id);
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(()))) => Ok(stream),
            Ok(Ok(Err(e))) => Err(DialError::Failed(e)),
            Ok(Err(_)) => Err(DialError::Failed(StreamError {
                code: ErrorCode::CONNECTION_LOST,
                reason: "tunnel closed".into(),
                by: tether_proto::Initiator::Peer,
                session_closed: true,
            })),
            Err(_) => {
                // SPEC 5.5: a cancelled dial is a RESET; a crossing DIAL_OK is discarded.
                stream.reset(ErrorCode::CANCEL, "dial timed out");
                Err(DialError::Timeout)
            }
        }
    }

    /// Starts a graceful drain (GOAWAY); the tunnel closes when its streams are done.
    pub fn go_away(&self, reason: &str) {
        let _ = self.lock().session.go_away(reason);
        self.wake_writer();
    }

    /// Closes at once with a GOAWAY carrying `code`.
    pub fn close(&self, code: ErrorCode, reason: &str) {
        {
            let mut sh = self.lock();
            let _ = sh.session.close(code, reason);
            dispatch(&mut sh, self);
        }
        self.wake_writer();
    }

    /// Why the session ended, once it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.lock().closed.clone()
    }

    /// Whether the session is open and not draining.
    pub fn is_usable(&self) -> bool {
        let sh = self.lock();
        sh.session.is_established() && !sh.session.is_draining()
    }

    /// Live streams in the session.
    pub fn stream_count(&self) -> usize {
        self.lock().session.stream_count()
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

/// Hands the session's events to the streams. Called with the lock held, after any input.
pub(crate) fn dispatch(sh: &mut Shared, tunnel: &Tunnel) {
    while let Some(e) = sh.session.poll_event() {
        match e {
            Event::Data { stream, data } => match sh.slots.get_mut(&stream) {
                Some(slot) => {
                    slot.recv.push_back(data);
                    slot.wake();
                }
                // Nobody reads this stream any more: return the credit at once.
                None => {
                    let _ = sh
                        .session
                        .release(stream, u32::try_from(data.len()).unwrap_or(0));
                }
            },
            Event::Finished { stream } => {
                if let Some(slot) = sh.slots.get_mut(&stream) {
                    slot.fin = true;
                    slot.wake();
                }
            }
            Event::Writable { stream } => {
                if let Some(slot) = sh.slots.get_mut(&stream) {
                    slot.wake();
                }
            }
            Event::Reset { stream, error } => {
                if let Some(slot) = sh.slots.get_mut(&stream) {
                    slot.error = Some(error);
                    slot.wake();
                }
            }
            Event::DialSucceeded { stream } => {
                if let Some(tx) = sh.dials.remove(&stream) {
                    let _ = tx.send(Ok(()));
                }
            }
            Event::DialFailed { stream, error } => {
                if let Some(slot) = sh.slots.get_mut(&stream) {
                    slot.error = Some(error.clone());
                }
                if let Some(tx) = sh.dials.remove(&stream) {
                    let _ = tx.send(Err(error));
                }
            }
            Event::DialRequested { stream, dial } => {
                let offered = match &sh.incoming {
                    Some(tx) => {
                        sh.slots.insert(stream, Slot::default());
                        let incoming = Incoming {
                            stream: TetherStream::new(tunnel.clone(), stream),
                            dial,
                        };
                        tx.send(incoming).map_err(|e| {
                            // The receiver is gone; forget the handle without touching the
                            // lock it would take on drop.
                            e.0.stream.forget();
                        })
                    }
                    None => Err(()),
                };
                if offered.is_err() {
                    sh.slots.remove(&stream);
                    let _ = sh.session.reject(
                        stream,
                        ErrorCode::DIAL_FORBIDDEN,
                        "this end accepts no dials",
                    );
                }
            }
            Event::GoingAway { reason, .. } => {
                tracing::info!(tunnel = %tunnel.inner.label, %reason, "peer is going away");
            }
            Event::Closed(reason) => {
                if reason.is_graceful() {
                    tracing::info!(tunnel = %tunnel.inner.label, %reason, "tunnel closed");
                } else {
                    tracing::warn!(tunnel = %tunnel.inner.label, %reason, "tunnel closed");
                }
                sh.closed = Some(reason.clone());
                for slot in sh.slots.values_mut() {
                    slot.wake();
                }
                for (_, tx) in sh.dials.drain() {
                    let _ = tx.send(Err(StreamError {
                        code: reason.code(),
                        reason: reason.to_string(),
                        by: reason.initiator(),
                        session_closed: true,
                    }));
                }
                sh.incoming = None;
                tunnel.inner.closed.notify_waiters();
            }
            Event::HelloReceived(_) | Event::Established { .. } | Event::PingAnswered { .. } => {}
        }
    }
}

async fn reader<R: AsyncRead + Unpin>(tunnel: Tunnel, mut r: R, leftover: BytesMut) {
    let inner = &tunnel.inner;
    let mut buf = Recycled::from(leftover, READ_SPARES);
    loop {
        if !buf.get().is_empty() {
            let mut sh = tunnel.lock();
            sh.session.handle_bytes(inner.now(), buf.get());
            dispatch(&mut sh, &tunnel);
            let done = sh.session.is_closed();
            drop(sh);
            tunnel.wake_writer();
            if done {
                return;
            }
        }
        buf.reserve(READ_MIN, READ_BLOCK);
        match r.read_buf(buf.get()).await {
            Ok(0) | Err(_) => {
                let mut sh = tunnel.lock();
                sh.session.handle_transport_closed();
                dispatch(&mut sh, &tunnel);
                drop(sh);
                tunnel.wake_writer();
                return;
            }
            // A small read is a quiet tunnel (keepalives, a few dials): it keeps no spare
            // 512 KiB blocks, so thousands of idle tunnels on a server hold one block each.
            Ok(n) if n < QUIET_READ => buf.shed(),
            Ok(_) => {}
        }
    }
}

/// Frames gathered for one vectored write: small ones coalesced, large payloads by reference.
#[derive(Default)]
struct Outgoing {
    chunks: Chunks,
    head: BytesMut,
    /// Bytes pushed since the last `seal`.
    len: usize,
}

impl Outgoing {
    fn push(&mut self, f: &Frame) {
        let header = f.header();
        header.encode(&mut self.head);
        match f.payload_bytes() {
            Some(p) if p.len() >= ZERO_COPY_MIN => {
                self.chunks.push(self.head.split().freeze());
                self.chunks.push(p.clone());
            }
            _ => f.encode_payload(&mut self.head),
        }
        self.len += f.encoded_len();
    }

    /// Ends a batch: everything pushed is in `chunks`.
    fn seal(&mut self) -> &mut Chunks {
        if !self.head.is_empty() {
            self.chunks.push(self.head.split().freeze());
        }
        self.len = 0;
        &mut self.chunks
    }
}

async fn writer<W: AsyncWrite + Unpin>(
    tunnel: Tunnel,
    mut w: W,
    reading: tokio::task::AbortHandle,
) {
    let inner = &tunnel.inner;
    let mut out = Outgoing::default();
    loop {
        let (deadline, finished) = {
            let mut sh = tunnel.lock();
            let now = inner.now();
            if sh.session.poll_timeout().is_some_and(|t| t <= now) {
                sh.session.handle_timeout(now);
                dispatch(&mut sh, &tunnel);
            }
            while out.len < WRITE_BATCH {
                let Some(f) = sh.session.poll_frame() else {
                    break;
                };
                out.push(&f);
            }
            // Handing out the last GOAWAY of a drain closes the session: its events (the
            // close, above all) are dispatched here, not whenever the reader next wakes.
            dispatch(&mut sh, &tunnel);
            (sh.session.poll_timeout(), sh.session.is_finished())
        };
        if out.len > 0 {
            if w.write_all_buf(out.seal()).await.is_err() {
                break;
            }
            continue;
        }
        if w.flush().await.is_err() {
            break;
        }
        if finished {
            let _ = tokio::time::timeout(Duration::from_secs(5), w.shutdown()).await;
            reading.abort();
            return;
        }
        let notified = inner.writer.notified();
        match deadline {
            Some(t) => {
                tokio::select! {
                    () = notified => {}
                    () = tokio::time::sleep_until(inner.instant(t).into()) => {}
                }
            }
            None => notified.await,
        }
    }
    // The transport failed under the writer.
    {
        let mut sh = tunnel.lock();
        sh.session.handle_transport_closed();
        dispatch(&mut sh, &tunnel);
    }
    reading.abort();
}

/// Why a handshake did not produce a session.
#[derive(Debug)]
pub enum HandshakeError {
    /// The transport failed.
    Io(io::Error),
    /// The session closed (refused, version mismatch, timeout, bad frames).
    Closed(CloseReason),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Io(e) => write!(f, "transport: {e}"),
            HandshakeError::Closed(r) => write!(f, "{r}"),
        }
    }
}

impl std::error::Error for HandshakeError {}

async fn flush_session<IO: AsyncWrite + Unpin>(io: &mut IO, s: &mut Session) -> io::Result<()> {
    let mut buf = BytesMut::new();
    s.poll_transmit(&mut buf);
    if !buf.is_empty() {
        io.write_all(&buf).await?;
        io.flush().await?;
    }
    Ok(())
}

/// Runs the handshake on `io` until `decide` has been consulted (server end) or WELCOME has
/// arrived (agent end). Returns the bytes read past the handshake.
async fn handshake<IO, F>(
    io: &mut IO,
    s: &mut Session,
    epoch: Instant,
    timeout: Duration,
    mut decide: F,
) -> Result<(BytesMut, Option<Hello>, Option<Welcome>), HandshakeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(&Hello) -> Result<(), (ErrorCode, String)>,
{
    let now = || Time(u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX));
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut hello = None;
    flush_session(io, s).await.map_err(HandshakeError::Io)?;
    loop {
        while let Some(e) = s.poll_event() {
            match e {
                Event::HelloReceived(h) => {
                    match decide(&h) {
                        Ok(()) => {
                            let _ = s.accept_hello(now());
                        }
                        Err((code, reason)) => {
                            let _ = s.refuse_hello(code, &reason);
                        }
                    }
                    hello = Some(h);
                }
                Event::Established { welcome, .. } => {
                    flush_session(io, s).await.map_err(HandshakeError::Io)?;
                    return Ok((buf, hello, welcome));
                }
                Event::Closed(r) => {
                    let _ = flush_session(io, s).await;
                    let _ = io.shutdown().await;
                    return Err(HandshakeError::Closed(r));
                }
                _ => {}
            }
        }
        flush_session(io, s).await.map_err(HandshakeError::Io)?;
        buf.reserve(16 * 1024);
        let read = tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await;
        match read {
            Ok(Ok(0)) => {
                s.handle_transport_closed();
            }
            Ok(Ok(_)) => s.handle_bytes(now(), &mut buf),
            Ok(Err(e)) => return Err(HandshakeError::Io(e)),
            Err(_) => {
                let _ = s.close(ErrorCode::HANDSHAKE_TIMEOUT, "handshake timed out");
                let _ = flush_session(io, s).await;
                return Err(HandshakeError::Closed(CloseReason::HandshakeTimeout));
            }
        }
    }
}

/// The agent end's handshake: HELLO out, WELCOME in.
pub async fn agent_handshake<IO: AsyncRead + AsyncWrite + Unpin>(
    io: &mut IO,
    s: &mut Session,
    epoch: Instant,
    timeout: Duration,
) -> Result<(BytesMut, Welcome), HandshakeError> {
    let (buf, _, welcome) = handshake(io, s, epoch, timeout, |_| Ok(())).await?;
    let welcome = welcome.ok_or(HandshakeError::Closed(CloseReason::HandshakeTimeout))?;
    Ok((buf, welcome))
}

/// The server end's handshake: HELLO in, `decide`, WELCOME (or a refusing GOAWAY) out.
pub async fn server_handshake<IO, F>(
    io: &mut IO,
    s: &mut Session,
    epoch: Instant,
    timeout: Duration,
    decide: F,
) -> Result<(BytesMut, Hello), HandshakeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(&Hello) -> Result<(), (ErrorCode, String)>,
{
    let (buf, hello, _) = handshake(io, s, epoch, timeout, decide).await?;
    let hello = hello.ok_or(HandshakeError::Closed(CloseReason::HandshakeTimeout))?;
    Ok((buf, hello))
}
