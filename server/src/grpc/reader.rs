//! Client messages, read from the call within the frontend's limits.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use h2::RecvStream;
use prost::Message as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::konnectivity::{Packet, PacketType};
use super::{Grpc, authority, code};

/// Client messages, framed (PROTOCOL-HTTP2.md: a compressed flag, a 4-byte length, the
/// message), each within [`GrpcLimits::max_message`] and the shared budget.
pub(super) struct Reader {
    body: RecvStream,
    buf: BytesMut,
    budget: Arc<Semaphore>,
    max_message: usize,
    /// [`GrpcLimits::message_deadline`].
    deadline: Duration,
    /// The budget held by the message last returned, until [`Reader::release`].
    held: Option<OwnedSemaphorePermit>,
    /// The packet read ahead of the one last returned ([`Reader::ahead_finishes`]), and its
    /// share of the budget. Boxed: an idle call has none.
    ahead: Option<Box<Result<Option<Packet>, CallError>>>,
    ahead_held: Option<OwnedSemaphorePermit>,
    done: bool,
}

/// A call that fails: its gRPC status and reason.
pub(super) type CallError = (u32, String);

impl Reader {
    pub(super) fn new(body: RecvStream, grpc: &Grpc) -> Reader {
        Reader {
            body,
            buf: BytesMut::new(),
            budget: grpc.budget.clone(),
            max_message: grpc.limits.max_message,
            deadline: grpc.limits.message_deadline,
            held: None,
            ahead: None,
            ahead_held: None,
            done: false,
        }
    }

    /// The last message's bytes are consumed: its budget is free again.
    pub(super) fn release(&mut self) {
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
                Some(Err(e)) if super::cancelled_by_client(&e) => {
                    return Err((
                        code::CANCELLED,
                        format!("the client cancelled the call: {e}"),
                    ));
                }
                Some(Err(e)) => return Err((code::OK, format!("the call was reset: {e}"))),
                None => self.done = true,
            }
        }
        Ok(true)
    }

    /// The next packet; `None` when the client ended its side of the call.
    pub(super) async fn next(&mut self) -> Result<Option<Packet>, CallError> {
        self.held = None;
        if let Some(ahead) = self.ahead.take() {
            self.held = self.ahead_held.take();
            return *ahead;
        }
        let (packet, permit) = self.read_packet().await?;
        self.held = permit;
        Ok(packet)
    }

    /// Whether the packet read ahead is the client's cancel of the call.
    pub(super) fn ahead_cancelled(&self) -> bool {
        matches!(self.ahead.as_deref(), Some(Err((c, _))) if *c == code::CANCELLED)
    }

    /// Whether the client has finished its side of the call, seen from the packet after the
    /// last one returned, which is read (within the budget) and kept for [`Reader::next`]:
    /// `Some(true)` for CLOSE_REQ, DIAL_CLS or the end of its side, `Some(false)` for a
    /// failure, `None` for anything else (one packet ahead at most: it waits then).
    pub(super) async fn ahead_finishes(&mut self) -> Option<bool> {
        if self.ahead.is_none() {
            let read = self.read_packet().await;
            self.ahead = Some(Box::new(read.map(|(p, permit)| {
                self.ahead_held = permit;
                p
            })));
        }
        match self.ahead.as_deref() {
            Some(Ok(None)) => Some(true),
            Some(Ok(Some(p)))
                if p.r#type == PacketType::CloseReq as i32
                    || p.r#type == PacketType::DialCls as i32 =>
            {
                Some(true)
            }
            Some(Err(_)) => Some(false),
            _ => None,
        }
    }

    /// Reads one packet, with its share of the budget.
    async fn read_packet(
        &mut self,
    ) -> Result<(Option<Packet>, Option<OwnedSemaphorePermit>), CallError> {
        // The prefix needs no budget: at most 5 bytes beyond a message already held.
        if !self.fill(5, None).await? {
            if self.buf.is_empty() {
                return Ok((None, None));
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
        Ok((Some(packet), Some(permit)))
    }
}
