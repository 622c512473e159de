//! One call: DIAL_REQ, the dial, DIAL_RSP, then DATA both ways until CLOSE_REQ, CLOSE_RSP or
//! the end of either side.

use std::sync::atomic::Ordering;

use bytes::{Buf, Bytes};
use h2::RecvStream;
use h2::server::SendResponse;
use tether::pump::Moved;
use tether::{Chunks, Gone, TetherStream};

use super::konnectivity::{PacketType, packet::Payload};
use super::reader::{CallError, Reader};
use super::sender::Sender;
use super::{FIRST_PACKET, Grpc, MAX_DOWN, PROXY_PATH, code, trailers_only};
use crate::core::ServerCore;
use crate::dial::{self, Relay};
use crate::http::parse_authority;
use crate::metrics::Frontend;

/// One call: the dial, then the relay. The dial's state is boxed and gone once it is
/// answered, so an established call's task holds only the relay's (an idle call's memory,
/// docs/BENCHMARKS.md).
pub(super) async fn call_main(
    core: &ServerCore,
    grpc: &Grpc,
    req: http::Request<RecvStream>,
    respond: SendResponse<Bytes>,
) {
    let _call = core.metrics.grpc_call();
    let Some(mut call) = Box::pin(dial_call(core, grpc, req, respond)).await else {
        return;
    };
    // By reference: a value moved into a future keeps its old slot in the caller's, so
    // moving the call's parts in would hold them twice for the call's whole life.
    let result = relay_bytes(
        &mut call.stream,
        &mut call.reader,
        &call.out,
        call.connect_id,
        core.linger,
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
    match result {
        // The client cancelled the call (Go's client, done with it): its own end.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => relay.cancelled(&e),
        result => relay.done(result),
    }
}

/// A call whose dial succeeded and whose DIAL_RSP went out.
struct Established<'a> {
    relay: Relay<'a>,
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
    let out = Sender::new(send);
    let random = dial.random;
    let target = if dial.protocol != "tcp" {
        Err(format!(
            "protocol {:?} is not served (only tcp)",
            dial.protocol
        ))
    } else {
        parse_authority(&dial.address).map_err(|e| e.reason)
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
        opened = dial::open(core, &host, port) => opened,
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
    stream: &mut TetherStream,
    reader: &mut Reader,
    out: &Sender,
    connect_id: i64,
    linger: std::time::Duration,
) -> std::io::Result<Moved> {
    // How the client's side ended: `None` cleanly (CLOSE_REQ, DIAL_CLS or the end of its
    // side of the call), `Some` with the status and reason it broke.
    let (close_tx, mut close_rx) = tokio::sync::oneshot::channel::<Option<CallError>>();
    let (mut rx, mut tx) = stream.split();
    let up_total = std::sync::atomic::AtomicU64::new(0);
    // Whether a client message is part-way into the stream: if the node side ends then, the
    // message cannot be whole, and the node must not see a clean end after part of it.
    let mid_message = std::sync::atomic::AtomicBool::new(false);
    // Whether a send waiting for credit saw the client cancel the call.
    let cancel_seen = std::sync::atomic::AtomicBool::new(false);
    let (up, down) = {
        let up = async {
            let r: Result<(), CallError> = async {
                loop {
                    match reader.next().await? {
                        Some(p) => match (PacketType::try_from(p.r#type), p.payload) {
                            (Ok(PacketType::Data), Some(Payload::Data(d)))
                                if d.connect_id == connect_id =>
                            {
                                let n = d.data.len() as u64;
                                if !d.data.is_empty() {
                                    // While the agent's credit is awaited, the call is
                                    // watched: the client resetting it or its connection
                                    // going resets the stream at once; CLOSE_REQ (or the
                                    // end of its side) right behind leaves the send the
                                    // linger to move (tether::SendHalf::send_watching).
                                    let watch = watch_call(&mut *reader, out, &cancel_seen);
                                    mid_message.store(true, Ordering::Relaxed);
                                    Box::pin(tx.send_watching(d.data, watch)).await.map_err(
                                        |e| {
                                            let c = if cancel_seen.load(Ordering::Relaxed) {
                                                code::CANCELLED
                                            } else {
                                                code::UNAVAILABLE
                                            };
                                            (c, format!("stream failed: {e}"))
                                        },
                                    )?;
                                    mid_message.store(false, Ordering::Relaxed);
                                }
                                // Counted once sent, not once received.
                                up_total.fetch_add(n, Ordering::Relaxed);
                                reader.release();
                            }
                            (Ok(PacketType::CloseReq | PacketType::DialCls), _) => return Ok(()),
                            (t, _) => {
                                return Err((
                                    code::INVALID_ARGUMENT,
                                    format!(
                                        "unexpected packet {t:?} (or DATA for another connectID)"
                                    ),
                                ));
                            }
                        },
                        // The client ended its side of the call without CLOSE_REQ: the same.
                        None => return Ok(()),
                    }
                }
            }
            .await;
            match &r {
                // No more bytes from the client; the node side ends after the queued ones (not
                // reset, so nothing the client sent is lost).
                Ok(()) => {
                    let _ = tx.finish();
                }
                Err(e) => {
                    tracing::info!(reason = %e.1, "gRPC call: the client side failed, the stream is reset");
                    tx.reset(tether_proto::ErrorCode::CANCEL, "gRPC call failed");
                }
            }
            let _ = close_tx.send(r.clone().err());
            r.map_err(call_error)
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
                    more = rx.recv_chunks(&mut chunks, MAX_DOWN) => match more {
                        Ok(true) => {
                            let n = chunks.remaining();
                            if let Err(e) = Box::pin(out.data(connect_id, &mut chunks)).await {
                                rx.reset(tether_proto::ErrorCode::CANCEL, "gRPC client stopped");
                                let c = if Sender::is_client_cancel(&e) {
                                    code::CANCELLED
                                } else {
                                    code::UNAVAILABLE
                                };
                                break Err((c, e.to_string()));
                            }
                            total += n as u64;
                            rx.release(n);
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
                        while rx.recv_chunks(&mut chunks, MAX_DOWN).await? {
                            let n = chunks.remaining();
                            chunks.advance(n);
                            rx.release(n);
                        }
                        Ok::<(), std::io::Error>(())
                    };
                    let _ = Box::pin(tokio::time::timeout(linger, drain)).await;
                    Ok(total)
                }
                Err(e) => Err(call_error(e)),
            }
        };
        tokio::pin!(up, down);
        // The call is over when the node side is (CLOSE_RSP went out): Konnectivity has no
        // half-close, so the client's side ends with it. Until then the client's side may end
        // first (CLOSE_REQ), and the node side follows.
        tokio::select! {
            up = &mut up => (Some(up), down.await),
            down = &mut down => (None, down),
        }
    };
    let up = up.unwrap_or_else(|| {
        // The node side ended first: the client's side ends with it, cleanly unless a message
        // was part-way through.
        if mid_message.load(Ordering::Relaxed) {
            let why = "the node side ended while a client message was part-way through";
            tx.reset(tether_proto::ErrorCode::CANCEL, why);
            return Err(std::io::Error::other(why));
        }
        let _ = tx.finish();
        Ok(())
    });
    let down = down?;
    up?;
    Ok(Moved {
        up: up_total.load(Ordering::Relaxed),
        down,
    })
}

/// A call's failure as the relay's error: the client's cancel as `ConnectionAborted`, which
/// the call's end logs as the client's own end rather than counting it as a failure.
fn call_error((c, e): CallError) -> std::io::Error {
    if c == code::CANCELLED {
        std::io::Error::new(std::io::ErrorKind::ConnectionAborted, e)
    } else {
        std::io::Error::other(e)
    }
}

/// What a parked send on the way up watches: the client resetting the call (or its
/// connection going), and the packet after the one being sent.
async fn watch_call(
    reader: &mut Reader,
    out: &Sender,
    cancel_seen: &std::sync::atomic::AtomicBool,
) -> Gone {
    let ahead = async {
        match reader.ahead_finishes().await {
            Some(true) => Gone::Finished,
            Some(false) => {
                if reader.ahead_cancelled() {
                    cancel_seen.store(true, Ordering::Relaxed);
                }
                Gone::Failed("the call failed".into())
            }
            // More DATA behind: nothing to learn from the packets until this send is done.
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        gone = ahead => gone,
        (cancel, why) = out.reset() => {
            if cancel {
                cancel_seen.store(true, Ordering::Relaxed);
            }
            Gone::Failed(why)
        }
    }
}
