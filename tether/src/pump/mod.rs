//! Moves bytes between a local socket and a tunnel stream, both ways, with half-close; and
//! watches the socket's peer all the while, so a stream is never left to a peer that has gone.

mod halves;
mod socket;

use std::future::Future;
use std::io;
use std::sync::Mutex;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes};
use tether_proto::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use socket::{Socket, keep_alive};

use crate::buffer::{Chunks, Quiet, Recycled};
use crate::tunnel::TetherStream;
use halves::{ReadSide, WriteSide};
use socket::{peer_failed, peer_gone};

/// How long a stream whose sending side has finished (a FIN from its socket, a CLOSE_REQ from
/// a gRPC caller) may wait for credit without moving a byte, before it is reset: nothing would
/// ever read what waits.
pub const LINGER: Duration = Duration::from_secs(10);

/// Smallest and largest read buffer: idle connections hold little, busy ones read in bulk.
const MIN_READ: usize = 1024;
const MAX_READ: usize = 256 * 1024;
/// Bytes of a stream's queue written to the socket with one call, at most.
const MAX_WRITE: usize = 256 * 1024;

/// Bytes moved by [`pump`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    /// From the socket into the tunnel.
    pub up: u64,
    /// From the tunnel to the socket.
    pub down: u64,
}

/// Joins `socket` and `stream` until both directions have ended; on an error, `socket` is
/// aborted (see [`Socket::abort_on_close`]) before it is dropped. `first` is sent before
/// anything read from the socket (bytes that arrived with a CONNECT request, say).
///
/// - socket EOF → FIN on the stream; the stream's FIN → `shutdown` of the socket's write side;
/// - tunnel bytes are released (credit returned) only after they were written to the socket,
///   so a slow socket slows its own sender and no other stream (SPEC 6.3);
/// - a socket error resets the stream with `ABORTED`; a stream error ends the pump;
/// - the socket's peer is watched while nothing reads it: while an upload waits for credit,
///   its peer failing resets the stream at once and its peer finishing leaves the upload
///   the tunnel's linger to move (see [`crate::SendHalf::send_watching`]); after its EOF, its peer failing
///   (a reset, a keepalive that found it gone) resets the stream, whatever the other
///   direction waits for.
pub fn pump<S>(
    stream: TetherStream,
    socket: S,
    first: Bytes,
) -> impl Future<Output = io::Result<Moved>>
where
    S: Socket + Send,
{
    // Both directions and the watch share the socket, each locking it for one poll at a time:
    // they are one task's futures, so the lock is never contended. Made here, so the pump's
    // future holds the socket once (an idle stream's task is mostly its pump).
    pump_shared(stream, Mutex::new(socket), first)
}

async fn pump_shared<S>(stream: TetherStream, socket: Mutex<S>, first: Bytes) -> io::Result<Moved>
where
    S: Socket + Send,
{
    let result = pump_inner(&stream, &socket, first).await;
    if result.is_err() {
        socket
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .abort_on_close();
    }
    result
}

async fn pump_inner<S>(stream: &TetherStream, socket: &Mutex<S>, first: Bytes) -> io::Result<Moved>
where
    S: Socket + Send,
{
    // Each direction in one future of its own.
    let (rx, tx) = (stream.h(), stream.h());
    // Bytes that came before the socket's own (with a CONNECT request), first.
    let sent_first = first.len() as u64;
    if !first.is_empty() {
        tx.send_bytes(first).await?;
    }
    let (mut rd, mut wr) = (ReadSide(socket), WriteSide(socket));
    let up = async {
        let mut total = sent_first;
        let mut want = MIN_READ;
        let mut buf = Recycled::new(0, 1);
        // Whether the stream has gone quiet: the same one timer as the tunnel's reader,
        // armed once and moved only when it fires early, so a busy stream pays no timer
        // update per read.
        let mut idle = Quiet::default();
        loop {
            // At full speed an allocation holds two reads, so one can be sent while the next
            // is read; below it, one.
            // Memory is held only while bytes arrive (docs/ARCHITECTURE.md, "Read buffers"):
            // a read that must wait on a quiet stream (reading in the smallest pieces) lets
            // go of its buffer at once, and one that waits within [`QUIET_AFTER`] of a bigger
            // read (a stream that stopped right after a burst) lets go once that time is up,
            // and drops back to the smallest reads. The next poll takes a fresh buffer;
            // dropping a pending `read_buf` loses nothing.
            let read = std::future::poll_fn(|cx| {
                buf.reserve(want, if want == MAX_READ { 2 * want } else { want });
                let r = std::pin::pin!(rd.read_buf(buf.get())).poll(cx);
                if r.is_pending() && (want == MIN_READ || idle.poll_idle(cx)) {
                    want = MIN_READ;
                    buf.release();
                    idle = Quiet::default();
                }
                r
            });
            let n = match read.await {
                Ok(n) => n,
                Err(e) => {
                    tx.reset(ErrorCode::ABORTED, "local socket read failed");
                    return Err(e);
                }
            };
            if n == 0 {
                tx.finish()?;
                return Ok::<u64, io::Error>(total);
            }
            if n >= want {
                want = (want * 2).min(MAX_READ);
            } else if n < want / 4 && want > MIN_READ {
                // Quieter: read in smaller pieces, and hold no spare allocation when idle.
                want /= 2;
            }
            total += n as u64;
            tx.send_or_wait(buf.get().split().freeze(), || peer_gone(socket))
                .await?;
            // After the send, which may wait for credit: the quiet time counts from when the
            // stream could read again, not from a read that then waited on its peer.
            if want > MIN_READ {
                idle.busy();
            }
        }
    };
    let down = async {
        let mut total = 0u64;
        let mut out = Chunks::default();
        // Everything queued on the stream goes out in one vectored write.
        while rx.recv_chunks(&mut out, MAX_WRITE).await? {
            let n = out.remaining();
            // A socket that does not read must not hide the stream ending meanwhile: the
            // other side reset it (its client or destination gone), or the tunnel went.
            let written = {
                let mut write = std::pin::pin!(wr.write_all_buf(&mut out));
                std::future::poll_fn(|cx| match write.as_mut().poll(cx) {
                    Poll::Ready(w) => Poll::Ready(Ok(w)),
                    Poll::Pending => rx.poll_ended(cx).map(Err),
                })
                .await?
            };
            if let Err(e) = written {
                rx.reset(ErrorCode::ABORTED, "local socket write failed");
                return Err(e);
            }
            total += n as u64;
            rx.release(n);
        }
        wr.shutdown().await?;
        Ok::<u64, io::Error>(total)
    };
    // Both directions at once. Once one is done, the other goes on, watched: after the
    // socket's EOF, for its peer failing (a reset, or a keepalive that finds it gone), since
    // nothing would take what the stream still brings; after the stream's FIN, for the stream
    // ending (the other side reset it), since a socket that never sends must not hold it.
    let (mut up, mut down) = (std::pin::pin!(up), std::pin::pin!(down));
    let (mut up_done, mut down_done) = (None, None);
    let mut failed = None;
    std::future::poll_fn(|cx| {
        if up_done.is_none()
            && let Poll::Ready(r) = up.as_mut().poll(cx)
        {
            up_done = Some(r?);
        }
        if down_done.is_none()
            && let Poll::Ready(r) = down.as_mut().poll(cx)
        {
            down_done = Some(r?);
        }
        match (up_done, down_done) {
            (Some(up), Some(down)) => Poll::Ready(Ok(Moved { up, down })),
            (Some(_), None) => {
                let f = failed.get_or_insert_with(|| Box::pin(peer_failed(socket)));
                f.as_mut().poll(cx).map(|why| {
                    tx.reset(ErrorCode::CANCEL, &why);
                    Err(io::Error::new(io::ErrorKind::ConnectionAborted, why))
                })
            }
            (None, Some(_)) => rx.poll_ended(cx).map(Err),
            (None, None) => Poll::Pending,
        }
    })
    .await
}
