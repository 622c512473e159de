//! The gRPC frontend: Konnectivity's `ProxyService` on a Unix socket, for kube-apiserver's
//! EgressSelectorConfiguration `proxyProtocol: GRPC`. docs/GRPC.md is its contract.
//!
//! One `Proxy` call carries one dial: DIAL_REQ, DIAL_RSP, DATA both ways, CLOSE_REQ and
//! CLOSE_RSP. The dial goes through the same path as a CONNECT (`connect::open`); only
//! the framing differs. HTTP/2 flow control is tied to the tether stream's both ways:
//!
//! - client to node: a message's bytes are accepted from h2 (its window released) only
//!   within the frontend's byte budget, and the next message is not read before the last
//!   one's bytes are in the tether stream, which takes them only against the agent's credit;
//! - node to client: bytes leave the tether stream (its credit returns to the agent) only as
//!   h2 grants send capacity, which the client's window limits. A client that stops reading
//!   stops its agent's stream and no other.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::RecvStream;
use h2::server::SendResponse;
use prost::Message as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use super::ServerCore;
use super::connect::{self, Frontend};
use crate::buffer::Chunks;
use crate::pump::Moved;
use crate::stream::TetherStream;

pub mod authority;
#[cfg(feature = "test-util")]
pub mod client;
// Generated and committed as generated (a test compares it with the .proto's output), so
// rustfmt leaves it alone.
#[allow(missing_docs, unreachable_pub, clippy::all)]
#[rustfmt::skip]
pub mod konnectivity;

use konnectivity::{Packet, PacketType, packet::Payload};

/// The method path (the .proto has no package).
pub const PROXY_PATH: &str = "/ProxyService/Proxy";
/// The HTTP/2 stream window the server grants each call (client to node).
pub const STREAM_WINDOW: u32 = 256 * 1024;
/// The HTTP/2 connection window (client to node, all calls of one connection).
pub const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// Calls one client connection may have open at once.
pub const MAX_CALLS: u32 = 10_000;
/// h2's allowance for small DATA frames received and not yet read, over a connection (each
/// frame under 256 bytes uses 256 less its length until it is read): four per call at
/// [`MAX_CALLS`]. h2's default, half the connection window, would end a channel whose calls
/// each wait on a slow node with a few small messages unread.
pub const DATA_FRAME_BUDGET: usize = MAX_CALLS as usize * 4 * 256;
/// Bytes of node-to-client data in one DATA packet, at most.
pub const MAX_DOWN: usize = 64 * 1024;
/// How long a call may take to send its DIAL_REQ.
pub const FIRST_PACKET: Duration = Duration::from_secs(10);
/// How long a message may take to arrive once its prefix is read (it holds its share of the
/// budget meanwhile).
pub const MESSAGE_DEADLINE: Duration = Duration::from_secs(10);
/// How long DIAL_RSP or CLOSE_RSP may wait for the client's window.
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(10);
/// After CLOSE_REQ, how long the node side may take to finish before its stream is reset.
pub const CLOSE_LINGER: Duration = Duration::from_secs(10);

/// What the gRPC frontend bounds (docs/SECURITY.md).
#[derive(Debug, Clone)]
pub struct GrpcLimits {
    /// The largest message a client may send (grpc-go's default receive limit: 4 MiB).
    pub max_message: usize,
    /// Bytes of client messages being collected, over all calls and connections; a message
    /// waits for its share before its bytes are accepted.
    pub budget: usize,
    /// How long a message may take to arrive once its prefix is read (it holds its share
    /// of the budget meanwhile): [`MESSAGE_DEADLINE`].
    pub message_deadline: Duration,
}

impl Default for GrpcLimits {
    fn default() -> Self {
        GrpcLimits {
            max_message: 4 * 1024 * 1024,
            budget: 256 * 1024 * 1024,
            message_deadline: MESSAGE_DEADLINE,
        }
    }
}

/// The frontend's shared state: its limits, the byte budget, and connect ids.
pub struct Grpc {
    limits: GrpcLimits,
    budget: Arc<Semaphore>,
    next_id: AtomicI64,
}

impl Grpc {
    /// A frontend with `limits`.
    pub fn new(limits: GrpcLimits) -> Grpc {
        let max = limits.max_message.min(limits.budget).max(1);
        Grpc {
            budget: Arc::new(Semaphore::new(limits.budget.max(max))),
            limits: GrpcLimits {
                max_message: max,
                ..limits
            },
            next_id: AtomicI64::new(1),
        }
    }

    /// Bytes of the budget free now (for tests and metrics).
    pub fn budget_free(&self) -> usize {
        self.budget.available_permits()
    }
}

/// Serves one client connection (kube-apiserver's gRPC channel) to its end.
pub async fn serve<S>(core: Arc<ServerCore>, grpc: Arc<Grpc>, conn: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_CALLS)
        .max_header_list_size(16 * 1024)
        .max_frame_size(u32::try_from(authority::MAX_FRAME).expect("16 KiB"))
        .max_send_buffer_size(MAX_DOWN + 64)
        .data_frame_budget(DATA_FRAME_BUDGET);
    let handshake = builder.handshake::<_, Bytes>(authority::Rewrite::new(conn));
    let mut h2 = match tokio::time::timeout(FIRST_PACKET, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::info!(error = %e, "gRPC client handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!("gRPC client handshake timed out");
            return;
        }
    };
    while let Some(call) = h2.accept().await {
        match call {
            Ok((req, respond)) => {
                let span = connect::span("uds", Frontend::Grpc);
                let (core, grpc) = (core.clone(), grpc.clone());
                tokio::spawn(
                    async move { call_main(&core, &grpc, req, respond).await }.instrument(span),
                );
            }
            Err(e) => {
                tracing::info!(error = %e, "gRPC client connection ended");
                return;
            }
        }
    }
}

/// A gRPC status for a call that ends without a dial (RFC: grpc's PROTOCOL-HTTP2.md).
fn trailers_only(respond: &mut SendResponse<Bytes>, code: u32, message: &str) {
    let resp = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .header("grpc-status", code.to_string())
        .header("grpc-message", percent_encode(message))
        .body(())
        .expect("static response");
    let _ = respond.send_response(resp, true);
}

/// grpc-message is percent-encoded (PROTOCOL-HTTP2.md): everything outside printable ASCII,
/// and `%`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// gRPC status codes used here.
mod code {
    pub(super) const OK: u32 = 0;
    pub(super) const INVALID_ARGUMENT: u32 = 3;
    pub(super) const DEADLINE_EXCEEDED: u32 = 4;
    pub(super) const RESOURCE_EXHAUSTED: u32 = 8;
    pub(super) const UNIMPLEMENTED: u32 = 12;
    pub(super) const UNAVAILABLE: u32 = 14;
}

/// One call: the dial, then the relay. The dial's state is boxed and gone once it is
/// answered, so an established call's task holds only the relay's (an idle call's memory,
/// docs/BENCHMARKS.md).
async fn call_main(
    core: &ServerCore,
    grpc: &Grpc,
    req: http::Request<RecvStream>,
    respond: SendResponse<Bytes>,
) {
    let Some(mut call) = Box::pin(dial_call(core, grpc, req, respond)).await else {
        return;
    };
    // By reference: a value moved into a future keeps its old slot in the caller's, so
    // moving the call's parts in would hold them twice for the call's whole life.
    let result = relay_bytes(
        &call.stream,
        &mut call.reader,
        &mut call.out,
        call.connect_id,
    )
    .await;
    // The stream and the call's halves go before the relay is logged and counted as done.
    let Established {
        relay,
        stream,
        reader,
        out,
        ..
    } = call;
    drop((stream, reader, out));
    relay.done(result);
}

/// A call whose dial succeeded and whose DIAL_RSP went out.
struct Established<'a> {
    relay: connect::Relay<'a>,
    stream: TetherStream,
    reader: Reader,
    out: Sender,
    connect_id: i64,
}

/// Reads DIAL_REQ, dials and answers; `None` when the call ended there (answered, logged
/// and counted).
async fn dial_call<'a>(
    core: &'a ServerCore,
    grpc: &Grpc,
    req: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) -> Option<Established<'a>> {
    let grpc_content = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "application/grpc" || v.starts_with("application/grpc+proto"));
    if req.method() != http::Method::POST || req.uri().path() != PROXY_PATH || !grpc_content {
        tracing::info!(method = %req.method(), path = req.uri().path(), "gRPC call refused: not ProxyService/Proxy");
        trailers_only(
            &mut respond,
            code::UNIMPLEMENTED,
            "only /ProxyService/Proxy is served",
        );
        return None;
    }
    if req
        .headers()
        .get("grpc-encoding")
        .is_some_and(|v| v != "identity")
    {
        trailers_only(
            &mut respond,
            code::UNIMPLEMENTED,
            "compressed messages are not accepted",
        );
        return None;
    }
    let mut reader = Reader::new(req.into_body(), grpc);
    let first = match tokio::time::timeout(FIRST_PACKET, reader.next()).await {
        Ok(Ok(Some(p))) => p,
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => {
            tracing::info!(reason = %e.1, "gRPC call refused");
            trailers_only(&mut respond, e.0, &e.1);
            return None;
        }
        Err(_) => {
            trailers_only(&mut respond, code::DEADLINE_EXCEEDED, "no DIAL_REQ in time");
            return None;
        }
    };
    let Some(Payload::DialRequest(dial)) = first
        .payload
        .filter(|_| first.r#type == PacketType::DialReq as i32)
    else {
        tracing::info!(
            r#type = first.r#type,
            "gRPC call refused: the first packet is not DIAL_REQ"
        );
        trailers_only(
            &mut respond,
            code::INVALID_ARGUMENT,
            "the first packet must be DIAL_REQ",
        );
        return None;
    };
    let ok = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())
        .expect("static response");
    let Ok(send) = respond.send_response(ok, false) else {
        return None;
    };
    let mut out = Sender { send };
    let random = dial.random;
    let target = if dial.protocol != "tcp" {
        Err(format!(
            "protocol {:?} is not served (only tcp)",
            dial.protocol
        ))
    } else {
        connect::parse_authority(&dial.address).map_err(|e| e.reason)
    };
    let (host, port) = match target {
        Ok(t) => t,
        Err(reason) => {
            tracing::info!(address = %dial.address, %reason, "DIAL_REQ refused");
            core.metrics.connect(400);
            let _ = out.dial_response(random, 0, &reason).await;
            out.end();
            return None;
        }
    };
    // The dial races the client: DIAL_CLS, or the call's end, abandons it (the agent's
    // stream is reset at once; Konnectivity would wait for its 30 s backstop).
    let opened = tokio::select! {
        opened = connect::open(core, &host, port) => opened,
        packet = reader.next() => {
            match packet {
                Ok(Some(p)) if p.r#type == PacketType::DialCls as i32 => {
                    tracing::info!(%host, port, "dial cancelled by the client (DIAL_CLS)");
                }
                Ok(Some(p)) => {
                    tracing::info!(r#type = p.r#type, "gRPC call ended: a packet before DIAL_RSP");
                }
                Ok(None) => tracing::info!("gRPC client left during the dial"),
                Err(e) => {
                    tracing::info!(reason = %e.1, "gRPC call failed during the dial");
                    core.metrics.dial("cancelled", None);
                    out.end_with(e.0, &e.1);
                    return None;
                }
            }
            core.metrics.dial("cancelled", None);
            out.end();
            return None;
        }
    };
    let opened = match opened {
        Ok(o) => o,
        Err(e) => {
            let _ = out
                .dial_response(random, 0, &format!("{} {}", e.status, e.reason))
                .await;
            out.end();
            return None;
        }
    };
    let connect_id = grpc.next_id.fetch_add(1, Ordering::Relaxed);
    let mut relay = opened.relay(core, Frontend::Grpc);
    let stream = relay.stream();
    if out.dial_response(random, connect_id, "").await.is_err() {
        relay.done(Err(std::io::Error::other(
            "the client left before DIAL_RSP",
        )));
        return None;
    }
    Some(Established {
        relay,
        stream,
        reader,
        out,
        connect_id,
    })
}

/// Moves the bytes of one established call, both ways.
async fn relay_bytes(
    stream: &TetherStream,
    reader: &mut Reader,
    out: &mut Sender,
    connect_id: i64,
) -> std::io::Result<Moved> {
    // How the client's side ended: `None` cleanly (CLOSE_REQ, DIAL_CLS or the end of its
    // side of the call), `Some` with the status and reason it broke.
    let (close_tx, mut close_rx) = tokio::sync::oneshot::channel::<Option<CallError>>();
    let up_total = std::sync::atomic::AtomicU64::new(0);
    let up_inner = async {
        loop {
            match reader.next().await? {
                Some(p) => match (PacketType::try_from(p.r#type), p.payload) {
                    (Ok(PacketType::Data), Some(Payload::Data(d)))
                        if d.connect_id == connect_id =>
                    {
                        up_total.fetch_add(d.data.len() as u64, Ordering::Relaxed);
                        if !d.data.is_empty() {
                            Box::pin(stream.send_bytes(d.data))
                                .await
                                .map_err(|e| (code::UNAVAILABLE, format!("stream failed: {e}")))?;
                        }
                        reader.release();
                    }
                    (Ok(PacketType::CloseReq | PacketType::DialCls), _) => return Ok(()),
                    (t, _) => {
                        return Err((
                            code::INVALID_ARGUMENT,
                            format!("unexpected packet {t:?} (or DATA for another connectID)"),
                        ));
                    }
                },
                // The client ended its side of the call without CLOSE_REQ: the same.
                None => return Ok(()),
            }
        }
    };
    let up = async {
        let r: Result<(), CallError> = up_inner.await;
        match &r {
            // No more bytes from the client; the node side ends after the queued ones (not
            // reset, so nothing the client sent is lost).
            Ok(()) => {
                let _ = stream.finish();
            }
            Err(e) => {
                tracing::info!(reason = %e.1, "gRPC call: the client side failed, the stream is reset");
                stream.reset(tether_proto::ErrorCode::CANCEL, "gRPC call failed");
            }
        }
        let _ = close_tx.send(r.clone().err());
        r.map_err(|e| std::io::Error::other(e.1))
    };
    let down = async {
        let mut total = 0u64;
        let mut chunks = Chunks::default();
        let ended = loop {
            tokio::select! {
                biased;
                closed = &mut close_rx => match closed {
                    Ok(None) => break Ok(false),
                    Ok(Some(e)) => break Err(e),
                    Err(_) => break Err((code::UNAVAILABLE, "the call ended".into())),
                },
                more = stream.recv_chunks(&mut chunks, MAX_DOWN) => match more {
                    Ok(true) => {
                        let n = chunks.remaining();
                        if let Err(e) = Box::pin(out.data(connect_id, &mut chunks)).await {
                            stream.reset(tether_proto::ErrorCode::CANCEL, "gRPC client stopped");
                            break Err((code::UNAVAILABLE, e.to_string()));
                        }
                        total += n as u64;
                        stream.release(n);
                    }
                    Ok(false) => break Ok(true),
                    Err(e) => break Err((code::OK, format!("stream failed: {e}"))),
                }
            }
        };
        let (status, error) = match &ended {
            Ok(_) => (code::OK, String::new()),
            Err((c, e)) => (*c, e.clone()),
        };
        let _ = Box::pin(out.close_response(connect_id, &error)).await;
        out.end_with(status, &error);
        match ended {
            Ok(true) => Ok(total),
            Ok(false) => {
                // CLOSE_REQ: let the node side finish (its queued bytes, then its FIN) for a
                // while, reading and dropping what it still sends.
                let drain = async {
                    while stream.recv_chunks(&mut chunks, MAX_DOWN).await? {
                        let n = chunks.remaining();
                        chunks.advance(n);
                        stream.release(n);
                    }
                    Ok::<(), std::io::Error>(())
                };
                let _ = Box::pin(tokio::time::timeout(CLOSE_LINGER, drain)).await;
                Ok(total)
            }
            Err((_, e)) => Err(std::io::Error::other(e)),
        }
    };
    tokio::pin!(up, down);
    // The call is over when the node side is (CLOSE_RSP went out): Konnectivity has no
    // half-close, so the client's side ends with it. Until then the client's side may end
    // first (CLOSE_REQ), and the node side follows.
    let (up, down) = tokio::select! {
        up = &mut up => (up, down.await),
        down = &mut down => {
            let _ = stream.finish();
            (Ok(()), down)
        }
    };
    let down = down?;
    up?;
    Ok(Moved {
        up: up_total.load(Ordering::Relaxed),
        down,
    })
}

/// Client messages, framed (PROTOCOL-HTTP2.md: a compressed flag, a 4-byte length, the
/// message), each within [`GrpcLimits::max_message`] and the shared budget.
struct Reader {
    body: RecvStream,
    buf: BytesMut,
    budget: Arc<Semaphore>,
    max_message: usize,
    /// [`GrpcLimits::message_deadline`].
    deadline: Duration,
    /// The budget held by the message last returned, until [`Reader::release`].
    held: Option<OwnedSemaphorePermit>,
    done: bool,
}

type CallError = (u32, String);

impl Reader {
    fn new(body: RecvStream, grpc: &Grpc) -> Reader {
        Reader {
            body,
            buf: BytesMut::new(),
            budget: grpc.budget.clone(),
            max_message: grpc.limits.max_message,
            deadline: grpc.limits.message_deadline,
            held: None,
            done: false,
        }
    }

    /// The last message's bytes are consumed: its budget is free again.
    fn release(&mut self) {
        self.held = None;
    }

    /// Takes `n` more bytes from h2 into `buf` (returning their window to the client);
    /// with `stall`, the call fails when no byte comes for that long.
    async fn fill(&mut self, n: usize, stall: Option<Duration>) -> Result<bool, CallError> {
        while self.buf.len() < n {
            if self.done {
                return Ok(false);
            }
            let next = match stall {
                None => self.body.data().await,
                // Boxed: an idle call waits in the other arm, and holds no timer.
                Some(d) => Box::pin(tokio::time::timeout(d, self.body.data()))
                    .await
                    .map_err(|_| {
                        (
                            code::DEADLINE_EXCEEDED,
                            format!(
                                "a message stopped arriving: no byte of it within {} s",
                                d.as_secs_f64()
                            ),
                        )
                    })?,
            };
            match next {
                Some(Ok(chunk)) => {
                    let _ = self.body.flow_control().release_capacity(chunk.len());
                    if self.buf.is_empty() {
                        self.buf = BytesMut::from(chunk);
                    } else {
                        self.buf.extend_from_slice(&chunk);
                    }
                }
                Some(Err(e)) => return Err((code::OK, format!("the call was reset: {e}"))),
                None => self.done = true,
            }
        }
        Ok(true)
    }

    /// The next packet; `None` when the client ended its side of the call.
    async fn next(&mut self) -> Result<Option<Packet>, CallError> {
        self.held = None;
        // The prefix needs no budget: at most 5 bytes beyond a message already held.
        if !self.fill(5, None).await? {
            if self.buf.is_empty() {
                return Ok(None);
            }
            return Err((
                code::INVALID_ARGUMENT,
                "the call ended inside a message".into(),
            ));
        }
        if self.buf[0] != 0 {
            return Err((
                code::UNIMPLEMENTED,
                "compressed messages are not accepted".into(),
            ));
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.max_message {
            return Err((
                code::RESOURCE_EXHAUSTED,
                format!(
                    "a message of {len} bytes is over the {} byte limit",
                    self.max_message
                ),
            ));
        }
        // Bytes already taken from h2 beyond the prefix are within one h2 chunk of the
        // window; the message's own length is what is held against the budget.
        // Boxed, as the other states an idle call is never in (an idle call's memory).
        let permit = Box::pin(
            self.budget
                .clone()
                .acquire_many_owned(u32::try_from(len.max(1)).unwrap_or(u32::MAX)),
        )
        .await
        .map_err(|_| {
            (
                code::RESOURCE_EXHAUSTED,
                "the frontend is shutting down".into(),
            )
        })?;
        // A client that announces a message and stops sending it must not hold its share
        // for ever; one that sends slowly (or is starved by its channel's other calls) may.
        let filled = self.fill(5 + len, Some(self.deadline)).await;
        if !filled? {
            return Err((
                code::INVALID_ARGUMENT,
                "the call ended inside a message".into(),
            ));
        }
        self.buf.advance(5);
        let msg = self.buf.split_to(len).freeze();
        // What is left is the start of the next message; it must not keep a large message's
        // allocation alive while the call is idle. Nothing left: let go. After a message built
        // from several frames, copy the rest (less than one frame) to a buffer of its own.
        // After a small one, it shares one frame's allocation: copying it per message would
        // cost time quadratic in the messages a frame is packed with.
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        } else if len > authority::MAX_FRAME {
            self.buf = BytesMut::from(&self.buf[..]);
        }
        let packet = Packet::decode(msg).map_err(|e| {
            (
                code::INVALID_ARGUMENT,
                format!("a message does not decode: {e}"),
            )
        })?;
        self.held = Some(permit);
        Ok(Some(packet))
    }
}

/// Server messages onto the call, each byte sent only as h2 grants capacity (the client's
/// window).
struct Sender {
    send: h2::SendStream<Bytes>,
}

impl Sender {
    /// Sends `buf` as it gets capacity; `Err` when the client reset the call or left.
    async fn send_all(&mut self, mut buf: Bytes) -> std::io::Result<()> {
        while !buf.is_empty() {
            self.send.reserve_capacity(buf.len());
            let granted = std::future::poll_fn(|cx| self.send.poll_capacity(cx)).await;
            let n = match granted {
                Some(Ok(n)) => n.min(buf.len()),
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                None => return Err(std::io::Error::other("the gRPC call is closed")),
            };
            if n == 0 {
                continue;
            }
            self.send
                .send_data(buf.split_to(n), false)
                .map_err(std::io::Error::other)?;
        }
        Ok(())
    }

    /// One packet; a client that grants no window for it within [`ANSWER_DEADLINE`] loses
    /// the call (an answer never waits on a client for ever).
    async fn packet(&mut self, p: &Packet) -> std::io::Result<()> {
        let len = p.encoded_len();
        let mut b = BytesMut::with_capacity(5 + len);
        b.put_u8(0);
        b.put_u32(u32::try_from(len).expect("a packet under 4 GiB"));
        p.encode(&mut b).expect("capacity reserved");
        tokio::time::timeout(ANSWER_DEADLINE, self.send_all(b.freeze()))
            .await
            .unwrap_or_else(|_| {
                self.send.send_reset(h2::Reason::CANCEL);
                Err(std::io::Error::other(
                    "the client granted no window for an answer in 10 s",
                ))
            })
    }

    async fn dial_response(
        &mut self,
        random: i64,
        connect_id: i64,
        error: &str,
    ) -> std::io::Result<()> {
        self.packet(&Packet {
            r#type: PacketType::DialRsp as i32,
            payload: Some(Payload::DialResponse(konnectivity::DialResponse {
                error: error.into(),
                connect_id,
                random,
            })),
        })
        .await
    }

    async fn close_response(&mut self, connect_id: i64, error: &str) -> std::io::Result<()> {
        self.packet(&Packet {
            r#type: PacketType::CloseRsp as i32,
            payload: Some(Payload::CloseResponse(konnectivity::CloseResponse {
                error: error.into(),
                connect_id,
            })),
        })
        .await
    }

    /// One DATA packet carrying all of `chunks`, without copying them: the framing and the
    /// protobuf field headers go first, then the bytes as they are.
    async fn data(&mut self, connect_id: i64, chunks: &mut Chunks) -> std::io::Result<()> {
        let n = chunks.remaining();
        let head = data_head(connect_id, n);
        self.send_all(head).await?;
        while let Some(piece) = chunks.pop() {
            self.send_all(piece).await?;
        }
        Ok(())
    }

    /// Ends the call: trailers with status OK (the outcome is in the packets).
    fn end(&mut self) {
        self.end_with(code::OK, "");
    }

    /// Ends the call with `status` and, if not OK, its reason.
    fn end_with(&mut self, status: u32, message: &str) {
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", http::HeaderValue::from(status));
        if status != code::OK
            && let Ok(v) = http::HeaderValue::from_str(&percent_encode(message))
        {
            t.insert("grpc-message", v);
        }
        let _ = self.send.send_trailers(t);
    }
}

/// The gRPC prefix and protobuf headers of `Packet{type: DATA, data: Data{connectID, data}}`
/// whose `data` is `n` bytes that follow: what prost writes before those bytes (a test holds
/// the two equal).
pub fn data_head(connect_id: i64, n: usize) -> Bytes {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
    // Data: connectID (field 1, omitted when 0 as proto3 does), data (field 3, omitted when empty).
    let id_len = if connect_id != 0 {
        key_len(1) + encoded_len_varint(connect_id as u64)
    } else {
        0
    };
    let bytes_len = if n > 0 {
        key_len(3) + encoded_len_varint(n as u64) + n
    } else {
        0
    };
    let data_len = id_len + bytes_len;
    // Packet: type (field 1) = DATA, data (field 4).
    let packet_len = key_len(1)
        + encoded_len_varint(PacketType::Data as u64)
        + key_len(4)
        + encoded_len_varint(data_len as u64)
        + data_len;
    let mut b = BytesMut::with_capacity(32);
    b.put_u8(0);
    b.put_u32(u32::try_from(packet_len).expect("a packet under 4 GiB"));
    encode_key(1, WireType::Varint, &mut b);
    encode_varint(PacketType::Data as u64, &mut b);
    encode_key(4, WireType::LengthDelimited, &mut b);
    encode_varint(data_len as u64, &mut b);
    if connect_id != 0 {
        encode_key(1, WireType::Varint, &mut b);
        encode_varint(connect_id as u64, &mut b);
    }
    if n > 0 {
        encode_key(3, WireType::LengthDelimited, &mut b);
        encode_varint(n as u64, &mut b);
    }
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_head_and_its_bytes_are_what_prost_encodes() {
        for (id, n) in [
            (1i64, 1usize),
            (7, 0),
            (0, 5),
            (1 << 40, 70_000),
            (-3, 127),
            (300, 128),
        ] {
            let data = Bytes::from(vec![0xa5; n]);
            let p = Packet {
                r#type: PacketType::Data as i32,
                payload: Some(Payload::Data(konnectivity::Data {
                    connect_id: id,
                    error: String::new(),
                    data: data.clone(),
                })),
            };
            let mut want = BytesMut::new();
            want.put_u8(0);
            want.put_u32(u32::try_from(p.encoded_len()).unwrap());
            p.encode(&mut want).unwrap();
            let mut got = BytesMut::from(&data_head(id, n)[..]);
            got.extend_from_slice(&data);
            assert_eq!(got, want, "connect id {id}, {n} bytes");
        }
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(
            percent_encode("503 no agent: 100%\n"),
            "503 no agent: 100%25%0A"
        );
    }
}
