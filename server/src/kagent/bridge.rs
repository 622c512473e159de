//! A Konnectivity agent's call as a tether agent: the far end of an in-memory tunnel whose
//! dials go out as DIAL_REQ, and whose streams are the agent's connections.
//!
//! Per packet, as Konnectivity's agent (`pkg/agent/client.go`) and server use them:
//!
//! - a dial is DIAL_REQ with a `random` of this call's own (a counter: only this server
//!   dials on it); DIAL_RSP with that `random` accepts (its `connectID`, unique among this
//!   call's live connections) or refuses (its `error`, Go's words) the tether stream;
//! - a successful DIAL_RSP that no dial waits for (its dial was given up, or it is bogus)
//!   gets CLOSE_REQ at once: the agent ignores DIAL_CLS; so does DATA for a connection this
//!   end does not know and did not just close, as Konnectivity's server does;
//! - DATA carries bytes both ways; node-to-client bytes wait for their stream within one
//!   budget for the call, each message counted at its whole size (past it the call is not
//!   read: these agents have no per-stream flow control, so one slow stream stalls the
//!   agent's others, as on Konnectivity's own server). A budget that stays full for the stall
//!   limit resets the stream holding the most of it, so one client that reads nothing cannot
//!   stop the agent for ever (the agent's own read loop waits on its sends: stalled long
//!   enough, it stops reading, and every stream's uploads with it); client-to-node bytes leave
//!   their stream only as the agent's HTTP/2 window takes them, so tether's credit holds
//!   them back;
//! - the agent has no half-close (`relay`);
//! - DRAIN (a stopping agent) is a DRAINING notice: new dials go to other agents when there
//!   are any, and to this one while it is up when there are not.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use prometheus_client::metrics::gauge::Gauge;
use prost::Message as _;
use tether::tunnel::{Handshake, Start};
use tether::{Incoming, Tunnel};
use tether_proto::session::AgentIdentity;
use tether_proto::{ErrorCode, Session, Time};
use tokio::io::DuplexStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tracing::Instrument;

use super::KonnectivityAgents;
use crate::grpc::konnectivity::{self, Packet, PacketType, packet::Payload};
use crate::grpc::{code, trailers_only};

/// Bytes the in-memory transport holds each way.
pub(super) const DUPLEX: usize = 256 * 1024;
/// Client-to-node DATA packets waiting for the agent's window, over the call.
const OUT_MESSAGES: usize = 64;
/// What a queued DATA costs the budget at least, however short (its bookkeeping).
const DATA_OVERHEAD: usize = 256;
/// DIAL_REQ and CLOSE_REQ waiting for the agent's window; past it new dials are refused and
/// further CLOSE_REQs dropped (an agent that reads nothing).
pub(super) const MAX_CONTROL: usize = 4096;
/// Connections this end closed lately, whose DATA still in flight is dropped without another
/// CLOSE_REQ.
const RECENTLY_CLOSED: usize = 1024;

/// The call, as `serve` hands it over.
pub(super) struct Call<'a> {
    pub(super) identity: AgentIdentity,
    pub(super) far: DuplexStream,
    pub(super) body: RecvStream,
    pub(super) respond: SendResponse<Bytes>,
    pub(super) limits: &'a KonnectivityAgents,
    pub(super) deadline: tokio::time::Instant,
    pub(super) metrics: &'a crate::metrics::Metrics,
    /// Serves one dial through the agent (`relay::dial`), in a task of its own.
    pub(super) dial: DialFn,
}

/// What serves one dial through the agent.
pub(super) type DialFn =
    fn(Arc<Ctx>, Incoming) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Node-to-client, for one connection.
pub(super) enum Down {
    /// Bytes, holding their share of the budget until their stream takes them.
    Data(Bytes, Held),
    /// The agent's CLOSE_RSP, with its error (empty: a clean end).
    Closed(String),
}

/// A share of the call's budget, shown in `tether_konnectivity_agent_bytes_held` and in its
/// stream's count while held.
pub(super) struct Held {
    _permit: OwnedSemaphorePermit,
    gauge: Gauge,
    stream: Arc<AtomicUsize>,
    n: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gauge.dec_by(i64::try_from(self.n).unwrap_or(i64::MAX));
        self.stream.fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// What a relay receives: its bytes and end, and the signal that it must reset (it held the
/// budget too long).
pub(super) struct Inbox {
    pub(super) down: mpsc::UnboundedReceiver<Down>,
    pub(super) abort: Arc<Notify>,
}

/// A dial's answer: its connection and its inbox, or the agent's error.
pub(super) type Answer = Result<(i64, Inbox), String>;

/// A live connection, as the reader sees it.
struct Conn {
    down: mpsc::UnboundedSender<Down>,
    held: Arc<AtomicUsize>,
    abort: Arc<Notify>,
}

#[derive(Default)]
pub(super) struct Shared {
    next_random: i64,
    pending: HashMap<i64, oneshot::Sender<Answer>>,
    conns: HashMap<i64, Conn>,
    closed: (VecDeque<i64>, HashSet<i64>),
}

impl Shared {
    /// Forgets a dial given up before its answer.
    pub(super) fn pending_remove(&mut self, random: i64) {
        self.pending.remove(&random);
    }

    /// Takes connection `id` out (the stream ended here, or was reset); its late DATA is
    /// dropped quietly. `true` if it was live.
    pub(super) fn close(&mut self, id: i64) -> bool {
        let live = self.conns.remove(&id).is_some();
        if self.closed.1.insert(id) {
            self.closed.0.push_back(id);
            if self.closed.0.len() > RECENTLY_CLOSED
                && let Some(old) = self.closed.0.pop_front()
            {
                self.closed.1.remove(&old);
            }
        }
        live
    }
}

/// A client-to-node packet: its framing, then its bytes as they are.
pub(super) struct Up {
    pub(super) head: Bytes,
    pub(super) body: Bytes,
}

/// A control packet toward the agent.
enum Control {
    /// DIAL_REQ for this `random`: skipped if the dial was given up before it went out.
    Dial(i64, Bytes),
    /// CLOSE_REQ.
    Close(Bytes),
}

/// What the call's tasks share.
pub(super) struct Ctx {
    shared: Mutex<Shared>,
    /// DATA (and a FIN's CLOSE_REQ, behind them) toward the agent, bounded.
    pub(super) out: mpsc::Sender<Up>,
    /// DIAL_REQ and CLOSE_REQ toward the agent, at most [`MAX_CONTROL`] waiting.
    control: mpsc::UnboundedSender<Control>,
    control_queued: AtomicUsize,
    budget: Arc<Semaphore>,
    buffer: usize,
    held: Gauge,
    stall_limit: Duration,
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
        dial,
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
    let (control, control_rx) = mpsc::unbounded_channel();
    let ctx = Arc::new(Ctx {
        shared: Mutex::new(Shared::default()),
        out,
        control,
        control_queued: AtomicUsize::new(0),
        budget: Arc::new(Semaphore::new(limits.buffer)),
        buffer: limits.buffer,
        held: metrics.konnectivity_held(),
        stall_limit: limits.stall_limit,
    });
    let dialing = async {
        while let Some(incoming) = dials.recv().await {
            let d = incoming.dial();
            let span = tracing::info_span!("stream", stream = %incoming.stream_id(), host = %d.host, port = d.port);
            tokio::spawn(dial(ctx.clone(), incoming).instrument(span));
        }
    };
    let why = tokio::select! {
        r = write(send, &ctx, control_rx, out_rx) => r,
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
    pub(super) fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a control packet; `false` (dropped) when [`MAX_CONTROL`] wait already.
    fn control(&self, c: Control) -> bool {
        if self.control_queued.fetch_add(1, Ordering::Relaxed) >= MAX_CONTROL {
            self.control_queued.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        if self.control.send(c).is_err() {
            self.control_queued.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    pub(super) fn close_request(&self, connect_id: i64) {
        if !self.control(Control::Close(frame(&close_request(connect_id)))) {
            tracing::debug!(connect_id, "CLOSE_REQ dropped: the agent reads nothing");
        }
    }

    /// Sends DIAL_REQ for `address`; the answer comes on the receiver. `None` when the agent
    /// has not read the control packets before (it is refused at once, not queued).
    pub(super) fn begin_dial(&self, address: String) -> Option<(i64, oneshot::Receiver<Answer>)> {
        let (tx, rx) = oneshot::channel();
        let random = {
            let mut sh = self.lock();
            sh.next_random += 1;
            let r = sh.next_random;
            sh.pending.insert(r, tx);
            r
        };
        let req = frame(&Packet {
            r#type: PacketType::DialReq as i32,
            payload: Some(Payload::DialRequest(konnectivity::DialRequest {
                protocol: "tcp".into(),
                address,
                random,
            })),
        });
        if self.control(Control::Dial(random, req)) {
            Some((random, rx))
        } else {
            self.lock().pending.remove(&random);
            None
        }
    }

    /// One packet from the agent, `len` bytes long. `Err` ends the call (the agent broke
    /// the protocol).
    async fn packet(&self, p: Packet, len: usize, tunnel: &Tunnel) -> Result<(), String> {
        match PacketType::try_from(p.r#type) {
            Ok(PacketType::DialRsp) => {
                if let Some(Payload::DialResponse(r)) = p.payload {
                    self.dial_response(r)?;
                }
            }
            Ok(PacketType::Data) => {
                if let Some(Payload::Data(d)) = p.payload {
                    self.data(d, len).await;
                }
            }
            Ok(PacketType::CloseRsp) => {
                if let Some(Payload::CloseResponse(c)) = p.payload {
                    let conn = self.lock().conns.remove(&c.connect_id);
                    if let Some(conn) = conn {
                        let _ = conn.down.send(Down::Closed(c.error));
                    }
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
                let abort = Arc::new(Notify::new());
                let conn = Conn {
                    down,
                    held: Arc::new(AtomicUsize::new(0)),
                    abort: abort.clone(),
                };
                sh.conns.insert(r.connect_id, conn);
                sh.closed.1.remove(&r.connect_id);
                let inbox = Inbox { down: rx, abort };
                if tx.send(Ok((r.connect_id, inbox))).is_err() {
                    sh.close(r.connect_id);
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
            None if ok => {
                // A dial given up, connected after all, or a connection nobody asked for:
                // either way nobody will use it (the agent ignores DIAL_CLS).
                sh.close(r.connect_id);
                drop(sh);
                self.close_request(r.connect_id);
            }
            None => {}
        }
        Ok(())
    }

    async fn data(&self, d: konnectivity::Data, len: usize) {
        if d.data.is_empty() {
            return;
        }
        let cost = len.max(DATA_OVERHEAD).min(self.buffer);
        let permits = u32::try_from(cost).unwrap_or(u32::MAX);
        let permit = loop {
            let wait = self.budget.clone().acquire_many_owned(permits);
            match tokio::time::timeout(self.stall_limit, wait).await {
                Ok(Ok(p)) => break p,
                Ok(Err(_)) => return,
                Err(_) => self.reset_hog(),
            }
        };
        let mut sh = self.lock();
        let Some(conn) = sh.conns.get(&d.connect_id) else {
            let known = sh.closed.1.contains(&d.connect_id);
            if !known {
                // Data for a connection this end never had: the agent has one it should not.
                sh.close(d.connect_id);
                drop(sh);
                self.close_request(d.connect_id);
            }
            return;
        };
        conn.held.fetch_add(cost, Ordering::Relaxed);
        self.held.inc_by(i64::try_from(cost).unwrap_or(i64::MAX));
        let held = Held {
            _permit: permit,
            gauge: self.held.clone(),
            stream: conn.held.clone(),
            n: cost,
        };
        let _ = conn.down.send(Down::Data(d.data, held));
    }

    /// The budget stayed full for the stall limit: resets the stream holding the most of it
    /// (its client reads nothing), which frees its share.
    fn reset_hog(&self) {
        let mut sh = self.lock();
        let hog = sh
            .conns
            .iter()
            .max_by_key(|(_, c)| c.held.load(Ordering::Relaxed))
            .map(|(id, c)| (*id, c.held.load(Ordering::Relaxed), c.abort.clone()));
        let Some((id, held, abort)) = hog else {
            return;
        };
        sh.close(id);
        drop(sh);
        tracing::warn!(connect_id = id, held, after = ?self.stall_limit, "a stream's client read nothing while its bytes filled the Konnectivity agent's buffer; resetting it");
        abort.notify_one();
        self.close_request(id);
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
        if let Err(e) = ctx.packet(packet, 5 + len, tunnel).await {
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
    ctx: &Ctx,
    mut control: mpsc::UnboundedReceiver<Control>,
    mut out: mpsc::Receiver<Up>,
) -> String {
    loop {
        let (head, body) = tokio::select! {
            biased;
            Some(c) = control.recv() => {
                ctx.control_queued.fetch_sub(1, Ordering::Relaxed);
                match c {
                    // Given up before it went out: the agent never hears of it.
                    Control::Dial(random, _) if !ctx.lock().pending.contains_key(&random) => continue,
                    Control::Dial(_, b) | Control::Close(b) => (b, Bytes::new()),
                }
            }
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
pub(super) fn frame(p: &Packet) -> Bytes {
    let len = p.encoded_len();
    let mut b = BytesMut::with_capacity(5 + len);
    b.put_u8(0);
    b.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    p.encode(&mut b).expect("capacity reserved");
    b.freeze()
}

pub(super) fn close_request(connect_id: i64) -> Packet {
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

    fn ctx(buffer: usize) -> (Ctx, mpsc::UnboundedReceiver<Control>, mpsc::Receiver<Up>) {
        let (out, out_rx) = mpsc::channel(OUT_MESSAGES);
        let (control, control_rx) = mpsc::unbounded_channel();
        let ctx = Ctx {
            shared: Mutex::new(Shared::default()),
            out,
            control,
            control_queued: AtomicUsize::new(0),
            budget: Arc::new(Semaphore::new(buffer)),
            buffer,
            held: Gauge::default(),
            stall_limit: Duration::from_secs(30),
        };
        (ctx, control_rx, out_rx)
    }

    fn one_byte(connect_id: i64) -> konnectivity::Data {
        konnectivity::Data {
            connect_id,
            error: String::new(),
            data: Bytes::from_static(b"x"),
        }
    }

    fn answer(random: i64, connect_id: i64) -> konnectivity::DialResponse {
        konnectivity::DialResponse {
            error: String::new(),
            connect_id,
            random,
        }
    }

    #[tokio::test]
    async fn a_queued_data_is_counted_at_its_whole_message_however_little_data_it_carries() {
        let (ctx, _c, _o) = ctx(1 << 20);
        let (random, rx) = ctx.begin_dial("10.0.0.7:80".into()).unwrap();
        ctx.dial_response(answer(random, 1)).unwrap();
        let (_, _inbox) = rx.await.unwrap().unwrap();
        let d = one_byte(1);
        // One byte of data in a 60 KiB message (padding protobuf skips): the message's
        // allocation stays alive as long as the byte does.
        ctx.data(d, 60 * 1024).await;
        assert_eq!(ctx.budget.available_permits(), (1 << 20) - 60 * 1024);
        assert_eq!(ctx.held.get(), 60 * 1024);
    }

    #[tokio::test]
    async fn answers_nobody_waits_for_and_data_for_unknown_connections_get_close_req() {
        let (ctx, mut control, _o) = ctx(1 << 20);
        let closes = |control: &mut mpsc::UnboundedReceiver<Control>| {
            let mut n = 0;
            while let Ok(c) = control.try_recv() {
                n += usize::from(matches!(c, Control::Close(_)));
            }
            n
        };
        // A success for a dial never made, and DATA for a connection never opened.
        ctx.dial_response(answer(99, 5)).unwrap();
        ctx.data(one_byte(6), 64).await;
        assert_eq!(closes(&mut control), 2);
        // DATA still in flight for a connection closed here gets no second CLOSE_REQ.
        ctx.data(one_byte(6), 64).await;
        assert_eq!(closes(&mut control), 0);
        // A live connection named again by another DIAL_RSP breaks the protocol.
        let (random, rx) = ctx.begin_dial("10.0.0.7:80".into()).unwrap();
        ctx.dial_response(answer(random, 7)).unwrap();
        let _inbox = rx.await.unwrap().unwrap();
        let (random, _rx) = ctx.begin_dial("10.0.0.7:81".into()).unwrap();
        assert!(ctx.dial_response(answer(random, 7)).is_err());
    }

    #[test]
    fn control_packets_past_the_bound_are_refused_not_queued() {
        let (ctx, _control, _o) = ctx(1 << 20);
        for _ in 0..MAX_CONTROL {
            assert!(ctx.begin_dial("10.0.0.7:80".into()).is_some());
        }
        assert!(
            ctx.begin_dial("10.0.0.7:80".into()).is_none(),
            "a dial past the bound is refused"
        );
        assert_eq!(
            ctx.lock().pending.len(),
            MAX_CONTROL,
            "and leaves nothing behind"
        );
    }
}
