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
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::core::ServerCore;
use crate::dial::span;
use crate::metrics::Frontend;

pub mod authority;
mod call;
// Generated and committed as generated (a test compares it with the .proto's output), so
// rustfmt leaves it alone.
#[allow(missing_docs, unreachable_pub, clippy::all)]
#[rustfmt::skip]
pub mod konnectivity;
mod reader;
mod sender;

pub use sender::data_head;

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

    /// The budget's semaphore and its size, for the metrics' gauge of bytes held.
    pub(crate) fn budget(&self) -> (Arc<Semaphore>, usize) {
        (self.budget.clone(), self.budget.available_permits())
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
                let span = span("uds", Frontend::Grpc);
                let (core, grpc) = (core.clone(), grpc.clone());
                tokio::spawn(
                    async move { call::call_main(&core, &grpc, req, respond).await }
                        .instrument(span),
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
pub(crate) fn trailers_only(respond: &mut SendResponse<Bytes>, code: u32, message: &str) {
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

/// Whether `e` is the client's own RST_STREAM(CANCEL).
fn cancelled_by_client(e: &h2::Error) -> bool {
    e.is_remote() && e.reason() == Some(h2::Reason::CANCEL)
}

/// gRPC status codes used here.
pub(crate) mod code {
    pub(crate) const OK: u32 = 0;
    /// The client cancelled the call (RST_STREAM with CANCEL): how a Go client ends a call it
    /// no longer needs, not a failure.
    pub(super) const CANCELLED: u32 = 1;
    pub(crate) const INVALID_ARGUMENT: u32 = 3;
    pub(super) const DEADLINE_EXCEEDED: u32 = 4;
    pub(super) const RESOURCE_EXHAUSTED: u32 = 8;
    pub(crate) const UNIMPLEMENTED: u32 = 12;
    pub(crate) const UNAVAILABLE: u32 = 14;
    pub(crate) const UNAUTHENTICATED: u32 = 16;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(
            percent_encode("503 no agent: 100%\n"),
            "503 no agent: 100%25%0A"
        );
    }
}
