//! The tunnel's two tasks: the reader feeds the session what the transport has; the writer
//! fires timers and writes what the session has ready, vectored.

use std::future::Future;
use std::time::Duration;

use bytes::BytesMut;
use tether_proto::{Frame, Time};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Tunnel;
use crate::buffer::{Chunks, Quiet, Recycled};

/// Free space the reader wants before each read, and the size of its allocations: DATA
/// payloads are slices of them, so one is reused once every payload read into it is gone.
const READ_MIN: usize = 64 * 1024;
pub(super) const READ_BLOCK: usize = 512 * 1024;
/// Older read allocations the reader keeps for reuse.
const READ_SPARES: usize = 2;
/// A read shorter than this is a quiet tunnel's (keepalives, a few dials, window updates):
/// the reader then lets its spare allocations go, and allocates next a buffer of this size.
const QUIET_READ: usize = 4096;
/// Bytes of frames gathered into one vectored write, at most.
const WRITE_BATCH: usize = 512 * 1024;
/// DATA payloads at least this long go out as their own slice instead of being copied.
const ZERO_COPY_MIN: usize = 2048;

pub(super) async fn reader<R: AsyncRead + Unpin>(tunnel: Tunnel, mut r: R) {
    let mut buf = Recycled::new(0, READ_SPARES);
    // Whether the last read was small: a buffer allocated next is then 4 KiB, not a block.
    let mut quiet = true;
    // A busy tunnel reads into 512 KiB blocks and keeps them (and its spares) between reads,
    // so they are reused instead of faulted in afresh; a quiet one holds none while it waits
    // (`Quiet`): thousands of idle tunnels hold no read buffer, no block fills page by page
    // with keepalives over the hours, and a tunnel that stopped after a burst lets go of its
    // block a second later.
    let mut idle = Quiet::default();
    loop {
        if !buf.get().is_empty() {
            let done = tunnel.drive(|sh, now| {
                sh.session.handle_bytes(now, buf.get());
                sh.session.is_closed()
            });
            if done {
                return;
            }
        }
        let read = std::future::poll_fn(|cx| {
            if quiet {
                buf.reserve(QUIET_READ, QUIET_READ);
            } else {
                buf.reserve(READ_MIN, READ_BLOCK);
            }
            let r = std::pin::pin!(r.read_buf(buf.get())).poll(cx);
            if r.is_pending() && idle.poll_idle(cx) {
                // Nothing was read into the buffer (a pending read leaves it alone); a
                // partial frame keeps it. The next poll takes a fresh, small one.
                buf.release();
                quiet = true;
            }
            r
        });
        match read.await {
            Ok(0) | Err(_) => {
                tunnel.drive(|sh, _| sh.session.handle_transport_closed());
                return;
            }
            Ok(n) => {
                quiet = n < QUIET_READ;
                if quiet {
                    buf.shed();
                } else {
                    idle.busy();
                }
            }
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

/// How a batch write ended.
enum Written {
    All,
    TransportFailed,
    /// A timer fired during the write and closed the session (a keepalive deadline).
    SessionClosed,
}

/// Writes `batch`, firing the session's timers whenever they fall due meanwhile. A peer that
/// stops reading blocks the write; time must still move (SPEC 7.3): the keepalive PING is
/// queued on time and its deadline ends the session if nothing arrives from the peer either.
async fn write_while_timers_run<W: AsyncWrite + Unpin>(
    tunnel: &Tunnel,
    w: &mut W,
    batch: &mut Chunks,
    mut deadline: Option<Time>,
) -> Written {
    loop {
        let due = async {
            match deadline {
                Some(t) => tokio::time::sleep_until(tunnel.inner.instant(t).into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            written = w.write_all_buf(batch) => {
                return match written {
                    Ok(()) => Written::All,
                    Err(_) => Written::TransportFailed,
                };
            }
            () = due => {
                let (next, closed) = tunnel.drive(|sh, now| {
                    if sh.session.poll_timeout().is_some_and(|t| t <= now) {
                        sh.session.handle_timeout(now);
                    }
                    (sh.session.poll_timeout(), sh.session.is_closed())
                });
                if closed {
                    return Written::SessionClosed;
                }
                deadline = next;
            }
        }
    }
}

pub(super) async fn writer<W: AsyncWrite + Unpin>(
    tunnel: Tunnel,
    mut w: W,
    reading: tokio::task::AbortHandle,
) {
    let inner = &tunnel.inner;
    let mut out = Outgoing::default();
    loop {
        // A fired timer, or handing out the last GOAWAY of a drain, may close the session:
        // `drive` dispatches its events (the close, above all) here, not whenever the reader
        // next wakes.
        let (deadline, finished) = tunnel.drive(|sh, now| {
            if sh.session.poll_timeout().is_some_and(|t| t <= now) {
                sh.session.handle_timeout(now);
            }
            while out.len < WRITE_BATCH {
                let Some(f) = sh.session.poll_frame() else {
                    break;
                };
                out.push(&f);
            }
            (sh.session.poll_timeout(), sh.session.is_finished())
        });
        if out.len > 0 {
            match write_while_timers_run(&tunnel, &mut w, out.seal(), deadline).await {
                Written::All => continue,
                Written::TransportFailed => break,
                Written::SessionClosed => {
                    // The peer does not read: the final GOAWAY cannot reach it either.
                    reading.abort();
                    return;
                }
            }
        }
        if w.flush().await.is_err() {
            break;
        }
        if finished {
            // Bounded: a peer that stops reading must not hold the socket open.
            if tokio::time::timeout(Duration::from_secs(5), w.shutdown())
                .await
                .is_err()
            {
                tracing::debug!(tunnel = %inner.label, "transport shutdown timed out");
            }
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
    tunnel.drive(|sh, _| sh.session.handle_transport_closed());
    reading.abort();
}
