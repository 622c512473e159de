//! A Konnectivity agent's call as a tether agent: the far end of an in-memory tunnel whose
//! dials go out as DIAL_REQ, and whose streams are the agent's connections.
//!
//! Per packet, as Konnectivity's agent (`pkg/agent/client.go`) and server use them:
//!
//! - a dial is DIAL_REQ with a `random` of this call's own (a counter: only this server
//!   dials on it); DIAL_RSP with that `random` accepts (its `connectID`, unique among this
//!   call's live connections) or refuses (its `error`, Go's words) the tether stream;
//! - a dial the opener gives up before DIAL_RSP is remembered, and a late successful
//!   DIAL_RSP gets CLOSE_REQ: the agent ignores DIAL_CLS;
//! - DATA carries bytes both ways; node-to-client bytes wait for their stream within one
//!   budget for the call (past it the call is not read: these agents have no per-stream
//!   flow control, so one slow stream stalls the agent's others, as on Konnectivity's own
//!   server); client-to-node bytes leave their stream only as the agent's HTTP/2 window takes
//!   them, so tether's credit holds them back;
//! - the agent has no half-close: a client's FIN becomes CLOSE_REQ (behind the bytes before
//!   it), which closes the node's connection, as Konnectivity's own server does; the agent's
//!   CLOSE_RSP (sent when the node's connection ends, or answering CLOSE_REQ) is the stream's
//!   FIN, or its reset when it carries an error; a stream that ends otherwise (the client
//!   reset it, the tunnel went) sends CLOSE_REQ;
//! - DRAIN (a stopping agent) is a DRAINING notice: new dials go to other agents when there
//!   are any, and to this one while it is up when there are not.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use prometheus_client::metrics::gauge::Gauge;
use prost::Message as _;
use tether::tunnel::{Handshake, Start};
use tether::{Incoming, TetherStream, Tunnel};
use tether_proto::session::AgentIdentity;
use tether_proto::{ErrorCode, Session, Time};
use tokio::io::DuplexStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tracing::Instrument;

use super::KonnectivityAgents;
use crate::grpc::konnectivity::{self, Packet, PacketType, packet::Payload};
use crate::grpc::{code, data_head, trailers_only};

/// Bytes the in-memory transport holds each way.
pub(super) const DUPLEX: usize = 256 * 1024;
/// Client-to-node bytes in one DATA packet, at most.
const MAX_UP: usize = 32 * 1024;
/// Client-to-node DATA packets waiting for the agent's window, over the call.
const OUT_MESSAGES: usize = 64;
/// What a queued DATA costs the budget at least, however short (its bookkeeping).
const DATA_OVERHEAD: usize = 256;
/// How long a stream whose client finished waits for each next packet from the agent after
/// its CLOSE_REQ.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// Dials given up before their DIAL_RSP, remembered so a late success gets CLOSE_REQ.
const MAX_ABANDONED: usize = 4096;

/// The call, as `serve` hands it over.
pub(super) struct Call<'a> {
    pub(super) identity: AgentIdentity,
    pub(super) far: DuplexStream,
    pub(super) body: RecvStream,
    pub(super) respond: SendResponse<Bytes>,
    pub(super) limits: &'a KonnectivityAgents,
    pub(super) deadline: tokio::time::Instant,
    pub(super) metrics: &'a crate::metrics::Metrics,
}

/// Node-to-client, for one connection.
enum Down {
    /// Bytes, holding their share of the budget until their stream takes them.
    Data(Bytes, Held),
    /// The agent's CLOSE_RSP, with its error (empty: a clean end).
    Closed(String),
}

/// A share of the call's budget, shown in `tether_konnectivity_agent_bytes_held` while held.
struct Held {
    _permit: OwnedSemaphorePermit,
    gauge: Gauge,
    n: i64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gauge.dec_by(self.n);
    }
}

/// A dial's answer: its connection and where its bytes arrive, or the agent's error.
type Answer = Result<(i64, mpsc::UnboundedReceiver<Down>), String>;

#[derive(Default)]
struct Shared {
    next_random: i64,
    pending: HashMap<i64, oneshot::Sender<Answer>>,
    abandoned: VecDeque<i64>,
    conns: HashMap<i64, mpsc::UnboundedSender<Down>>,
}

/// A client-to-node DATA packet: its framing, then its bytes as they are.
struct Up {
    head: Bytes,
    body: Bytes,
}

/// What the call's tasks share.
struct Ctx {
    shared: Mutex<Shared>,
    /// DATA toward the agent, bounded.
    out: mpsc::Sender<Up>,
    /// DIAL_REQ and CLOSE_REQ toward the agent: at most one of each per stream, and one per
    /// late answer remembered.
    ctl: mpsc::UnboundedSender<Bytes>,
    budget: Arc<Semaphore>,
    buffer: usize,
    held: Gauge,
}

/// Runs the call as a tether agent over `far` until the agent or the tunnel goes.
pub(super) async fn run(call: Call<'_>) {
    let Call {
        identity,
        far,
        body,
        mut respond,
        limits,
        deadline,
        metrics,
    } = call;
    let config = tether_proto::Config {
        // In memory: the agent's liveness is its HTTP/2 connection's (PINGs).
        keepalive_interval_ms: 0,
        ..tether_proto::Config::default()
    };
    let session = match Session::agent(config, identity, Time::from_millis(0)) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "Konnectivity agent's metadata is not a valid agent");
            return trailers_only(&mut respond, code::INVALID_ARGUMENT, &e.to_string());
        }
    };
    let (dials_tx, mut dials) = mpsc::unbounded_channel();
    let start = Start {
        incoming: Some(dials_tx),
        policy: None,
        epoch: Instant::now(),
        label: "konnectivity-agent".into(),
        stats: None,
        linger: tether::pump::LINGER,
    };
    let (tunnel, handshaking) = Tunnel::spawn(far, session, start);
    let _close = CloseOnDrop(tunnel.clone());
    let welcome = match tokio::time::timeout_at(deadline, handshaking.done()).await {
        Ok(Ok(Handshake::Welcome(w))) => w,
        Ok(Ok(Handshake::Hello(_))) => return,
        Ok(Err(reason)) => {
            return trailers_only(&mut respond, code::UNAUTHENTICATED, &reason.to_string());
        }
        Err(_) => {
            return trailers_only(&mut respond, code::UNAVAILABLE, "not admitted in time");
        }
    };
    // The agent waits for these headers without a timeout: they go at once.
    let resp = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .header("serverid", welcome.server_id)
        .header("servercount", welcome.server_count.to_string())
        .body(())
        .expect("valid headers");
    let send = match respond.send_response(resp, false) {
        Ok(s) => s,
        Err(e) => return tracing::info!(error = %e, "Konnectivity agent left before its answer"),
    };
    tracing::info!(kind = "konnectivity", "agent's call answered");
    let _counted = metrics.konnectivity_agent();
    let (out, out_rx) = mpsc::channel(OUT_MESSAGES);
    let (ctl, ctl_rx) = mpsc::unbounded_channel();
    let ctx = Arc::new(Ctx {
        shared: Mutex::new(Shared::default()),
        out,
        ctl,
        budget: Arc::new(Semaphore::new(limits.buffer)),
        buffer: limits.buffer,
        held: metrics.konnectivity_held(),
    });
    let dialing = async {
        while let Some(incoming) = dials.recv().await {
            let d = incoming.dial();
            let span = tracing::info_span!("stream", stream = %incoming.stream_id(), host = %d.host, port = d.port);
            tokio::spawn(dial(ctx.clone(), incoming).instrument(span));
        }
    };
    let why = tokio::select! {
        r = write(send, ctl_rx, out_rx) => r,
        r = read(body, &ctx, &tunnel, limits.max_message) => r,
        () = dialing => "the tunnel ended".into(),
        reason = tunnel.closed() => format!("the tunnel ended: {reason}"),
    };
    tracing::info!(reason = %why, "Konnectivity agent's call over");
    // Dials waiting for an answer and streams waiting for bytes end with the tunnel.
    let mut sh = ctx.lock();
    sh.pending.clear();
    sh.conns.clear();
}

struct CloseOnDrop(Tunnel);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0
            .close(ErrorCode::NO_ERROR, "the Konnectivity agent's call ended");
    }
}

impl Ctx {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn control(&self, p: &Packet) {
        let _ = self.ctl.send(frame(p));
    }

    fn close_request(&self, connect_id: i64) {
        self.control(&close_request(connect_id));
    }

    /// One packet from the agent. `Err` ends the call (the agent broke the protocol).
    async fn packet(&self, p: Packet, tunnel: &Tunnel) -> Result<(), String> {
        match PacketType::try_from(p.r#type) {
            Ok(PacketType::DialRsp) => {
                if let Some(Payload::DialResponse(r)) = p.payload {
                    self.dial_response(r)?;
                }
            }
            Ok(PacketType::Data) => {
                if let Some(Payload::Data(d)) = p.payload {
                    self.data(d).await;
                }
            }
            Ok(PacketType::CloseRsp) => {
                if let Some(Payload::CloseResponse(c)) = p.payload
                    && let Some(down) = self.lock().conns.remove(&c.connect_id)
                {
                    let _ = down.send(Down::Closed(c.error));
                }
            }
            Ok(PacketType::Drain) => {
                tracing::info!("Konnectivity agent is draining; new dials prefer other agents");
                tunnel.announce_draining();
            }
            other => tracing::debug!(kind = ?other, "packet from the agent ignored"),
        }
        Ok(())
    }

    fn dial_response(&self, r: konnectivity::DialResponse) -> Result<(), String> {
        let mut sh = self.lock();
        let ok = r.error.is_empty() && r.connect_id != 0;
        match sh.pending.remove(&r.random) {
            Some(tx) if ok => {
                if sh.conns.contains_key(&r.connect_id) {
                    return Err(format!(
                        "DIAL_RSP names connectID {}, which is live",
                        r.connect_id
                    ));
                }
                let (down, rx) = mpsc::unbounded_channel();
                sh.conns.insert(r.connect_id, down);
                if tx.send(Ok((r.connect_id, rx))).is_err() {
                    sh.conns.remove(&r.connect_id);
                    drop(sh);
                    self.close_request(r.connect_id);
                }
            }
            Some(tx) => {
                let error = if r.error.is_empty() {
                    "the agent answered without a connection".into()
                } else {
                    r.error
                };
                let _ = tx.send(Err(error));
            }
            None => {
                if let Some(i) = sh.abandoned.iter().position(|a| *a == r.random) {
                    sh.abandoned.remove(i);
                    drop(sh);
                    if ok {
                        // A dial given up, connected after all: the agent ignores DIAL_CLS.
                        self.close_request(r.connect_id);
                    }
                }
            }
        }
        Ok(())
    }

    async fn data(&self, d: konnectivity::Data) {
        if d.data.is_empty() {
            return;
        }
        let Some(down) = self.lock().conns.get(&d.connect_id).cloned() else {
            // After CLOSE_REQ, before the agent saw it: nobody waits for these bytes.
            return;
        };
        let cost = d.data.len().max(DATA_OVERHEAD).min(self.buffer);
        let permits = u32::try_from(cost).unwrap_or(u32::MAX);
        let Ok(permit) = self.budget.clone().acquire_many_owned(permits).await else {
            return;
        };
        let n = i64::from(permits);
        self.held.inc_by(n);
        let held = Held {
            _permit: permit,
            gauge: self.held.clone(),
            n,
        };
        let _ = down.send(Down::Data(d.data, held));
    }
}

/// Packets from the agent, each at most `max` bytes, until it ends its call or breaks the
/// protocol. Its HTTP/2 window is given back as its bytes are read, and none is read while
/// a DATA waits for the budget.
async fn read(mut body: RecvStream, ctx: &Ctx, tunnel: &Tunnel, max: usize) -> String {
    let mut buf = BytesMut::new();
    loop {
        while buf.len() < 5 {
            if let Err(e) = fill(&mut body, &mut buf).await {
                return e;
            }
        }
        if buf[0] != 0 {
            return "a compressed message, and no compression was agreed".into();
        }
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if len > max {
            return format!("a message of {len} bytes, over the limit of {max}");
        }
        while buf.len() < 5 + len {
            if let Err(e) = fill(&mut body, &mut buf).await {
                return e;
            }
        }
        // Its own allocation: what a queued DATA keeps alive is its own size.
        let msg = Bytes::copy_from_slice(&buf[5..5 + len]);
        buf.advance(5 + len);
        let packet = match Packet::decode(msg) {
            Ok(p) => p,
            Err(e) => return format!("a message that is not a Packet: {e}"),
        };
        if let Err(e) = ctx.packet(packet, tunnel).await {
            return e;
        }
    }
}

async fn fill(body: &mut RecvStream, buf: &mut BytesMut) -> Result<(), String> {
    match body.data().await {
        Some(Ok(chunk)) => {
            buf.extend_from_slice(&chunk);
            let _ = body.flow_control().release_capacity(chunk.len());
            Ok(())
        }
        Some(Err(e)) => Err(format!("the agent's call failed: {e}")),
        None => Err("the agent ended its call".into()),
    }
}

/// Packets to the agent, control first, each byte sent only as its window allows.
async fn write(
    mut send: SendStream<Bytes>,
    mut ctl: mpsc::UnboundedReceiver<Bytes>,
    mut out: mpsc::Receiver<Up>,
) -> String {
    loop {
        let (head, body) = tokio::select! {
            biased;
            Some(m) = ctl.recv() => (m, Bytes::new()),
            Some(u) = out.recv() => (u.head, u.body),
            else => return "nothing more to send".into(),
        };
        for b in [head, body] {
            if let Err(e) = send_all(&mut send, b).await {
                return format!("sending to the agent failed: {e}");
            }
        }
    }
}

async fn send_all(send: &mut SendStream<Bytes>, mut buf: Bytes) -> Result<(), String> {
    while !buf.is_empty() {
        send.reserve_capacity(buf.len());
        let n = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(n)) => n.min(buf.len()),
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("the call is closed".into()),
        };
        if n > 0 {
            send.send_data(buf.split_to(n), false)
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// A packet with its gRPC framing.
fn frame(p: &Packet) -> Bytes {
    let len = p.encoded_len();
    let mut b = BytesMut::with_capacity(5 + len);
    b.put_u8(0);
    b.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    p.encode(&mut b).expect("capacity reserved");
    b.freeze()
}

/// `host:port` as Go's `net.JoinHostPort` writes it (an IPv6 address in brackets).
fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The RESET code for the agent's dial error, from Go's words.
fn dial_error_code(error: &str) -> ErrorCode {
    if error.contains("connection refused") {
        ErrorCode::DIAL_REFUSED
    } else if error.contains("i/o timeout") || error.contains("timed out") {
        ErrorCode::DIAL_TIMEOUT
    } else {
        ErrorCode::DIAL_UNREACHABLE
    }
}

/// One dial from the server: DIAL_REQ, the agent's answer, then the connection's bytes.
async fn dial(ctx: Arc<Ctx>, mut incoming: Incoming) {
    let d = incoming.dial();
    let address = join_host_port(&d.host, d.port);
    let (tx, mut rx) = oneshot::channel();
    let random = {
        let mut sh = ctx.lock();
        sh.next_random += 1;
        let r = sh.next_random;
        sh.pending.insert(r, tx);
        r
    };
    ctx.control(&Packet {
        r#type: PacketType::DialReq as i32,
        payload: Some(Payload::DialRequest(konnectivity::DialRequest {
            protocol: "tcp".into(),
            address,
            random,
        })),
    });
    let answer = tokio::select! {
        a = &mut rx => a.ok(),
        () = incoming.cancelled() => None,
    };
    let Some(answer) = answer else {
        let mut sh = ctx.lock();
        if sh.pending.remove(&random).is_some() {
            sh.abandoned.push_back(random);
            if sh.abandoned.len() > MAX_ABANDONED {
                sh.abandoned.pop_front();
            }
        } else if let Ok(Ok((id, _))) = rx.try_recv() {
            // Answered as it was given up.
            sh.conns.remove(&id);
            drop(sh);
            ctx.close_request(id);
        }
        return tracing::debug!("dial given up before the agent answered");
    };
    match answer {
        Ok((id, down)) => match incoming.accept() {
            Ok(stream) => relay(&ctx, id, stream, down).await,
            Err(e) => {
                tracing::debug!(error = %e, "dial given up as the agent answered");
                ctx.lock().conns.remove(&id);
                ctx.close_request(id);
            }
        },
        Err(error) => {
            tracing::info!(%error, "dial failed");
            incoming.reject(dial_error_code(&error), &error);
        }
    }
}

/// A live connection: CLOSE_REQ when its stream ends before the agent's CLOSE_RSP, unless
/// one was sent already.
struct Live<'a> {
    ctx: &'a Ctx,
    id: i64,
    requested: AtomicBool,
}

impl Drop for Live<'_> {
    fn drop(&mut self) {
        let gone = self.ctx.lock().conns.remove(&self.id).is_some();
        if gone && !self.requested.load(Ordering::Relaxed) {
            self.ctx.close_request(self.id);
        }
    }
}

/// Bytes both ways between the stream and the agent's connection `id`.
async fn relay(ctx: &Ctx, id: i64, stream: TetherStream, mut down: mpsc::UnboundedReceiver<Down>) {
    let live = Live {
        ctx,
        id,
        requested: AtomicBool::new(false),
    };
    let (mut recv, mut send) = stream.into_split();
    let node_closed = AtomicBool::new(false);
    let gone = || io::Error::other("the Konnectivity agent's call ended");
    let up = async {
        while let Some(mut b) = recv.recv_chunk().await? {
            let n = b.len();
            // After the node's end, nobody reads: the bytes are dropped.
            while !b.is_empty() && !node_closed.load(Ordering::Relaxed) {
                let piece = b.split_to(b.len().min(MAX_UP));
                let head = data_head(id, piece.len());
                ctx.out
                    .send(Up { head, body: piece })
                    .await
                    .map_err(|_| gone())?;
            }
            recv.release(n);
        }
        // The agent has no half-close: the client's FIN closes the node's connection, as on
        // Konnectivity's own server. CLOSE_REQ goes behind the DATA before it; what the agent
        // read from the node before closing still comes, then its CLOSE_RSP.
        if !node_closed.load(Ordering::Relaxed) {
            live.requested.store(true, Ordering::Relaxed);
            let head = frame(&close_request(id));
            ctx.out
                .send(Up {
                    head,
                    body: Bytes::new(),
                })
                .await
                .map_err(|_| gone())?;
        }
        Ok::<_, io::Error>(())
    };
    let down = async {
        loop {
            let next = down.recv();
            // An agent that takes CLOSE_REQ and neither sends nor closes holds the stream
            // for at most this long without a byte.
            let d = if live.requested.load(Ordering::Relaxed) {
                tokio::time::timeout(CLOSE_WAIT, next)
                    .await
                    .map_err(|_| io::Error::other("the agent did not answer CLOSE_REQ"))?
            } else {
                next.await
            };
            match d.ok_or_else(gone)? {
                Down::Data(b, permit) => {
                    send.send_bytes(b).await?;
                    drop(permit);
                }
                Down::Closed(error) => {
                    node_closed.store(true, Ordering::Relaxed);
                    if error.is_empty() {
                        send.finish()?;
                    } else {
                        send.reset(ErrorCode::ABORTED, &error);
                    }
                    return Ok(());
                }
            }
        }
    };
    match tokio::try_join!(up, down) {
        Ok(_) => tracing::debug!("stream done"),
        Err(e) => tracing::debug!(error = %e, "stream ended"),
    }
}

fn close_request(connect_id: i64) -> Packet {
    Packet {
        r#type: PacketType::CloseReq as i32,
        payload: Some(Payload::CloseRequest(konnectivity::CloseRequest {
            connect_id,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_errors_read_as_go_writes_them() {
        assert_eq!(join_host_port("10.0.0.7", 10250), "10.0.0.7:10250");
        assert_eq!(join_host_port("::1", 80), "[::1]:80");
        assert_eq!(join_host_port("[::1]", 80), "[::1]:80");
        assert_eq!(
            dial_error_code("dial tcp 127.0.0.1:1: connect: connection refused"),
            ErrorCode::DIAL_REFUSED
        );
        assert_eq!(
            dial_error_code("dial tcp 10.0.0.9:80: i/o timeout"),
            ErrorCode::DIAL_TIMEOUT
        );
        assert_eq!(
            dial_error_code("dial tcp: lookup nowhere: no such host"),
            ErrorCode::DIAL_UNREACHABLE
        );
    }
}
