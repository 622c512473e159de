//! Moves bytes between a local socket and a tunnel stream, both ways, with half-close.

use std::future::Future;
use std::io;

use bytes::{Buf, Bytes};
use tether_proto::ErrorCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::buffer::{Chunks, Quiet, Recycled};
use crate::tunnel::TetherStream;

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

/// A local socket that can be aborted so its peer sees an error (a TCP RST), not a clean
/// end: a stream that fails must never look like a complete one (docs/SECURITY.md). A Unix socket
/// offers less; see its implementation.
pub trait Abort {
    /// Makes the next close an abort.
    fn abort_on_close(&self);
}

impl Abort for tokio::net::TcpStream {
    fn abort_on_close(&self) {
        let _ = self.set_zero_linger();
    }
}

impl Abort for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    fn abort_on_close(&self) {
        self.get_ref().0.abort_on_close();
    }
}

#[cfg(unix)]
impl Abort for tokio::net::UnixStream {
    /// A Unix socket has no RST. What the platform offers: shutting down this end's reading
    /// makes the client's next write fail (EPIPE), and closing with bytes the client sent
    /// still unread makes its next read fail (ECONNRESET, Linux). A client that had sent
    /// everything and only reads sees a plain end of stream: the server logs and counts every
    /// failed stream (docs/SECURITY.md).
    fn abort_on_close(&self) {
        let _ = socket2::SockRef::from(self).shutdown(std::net::Shutdown::Read);
    }
}

/// Joins `socket` and `stream` until both directions have ended; on an error, `socket` is
/// aborted (see [`Abort`]) before it is dropped. `first` is sent before
/// anything read from the socket (bytes that arrived with a CONNECT request, say).
///
/// - socket EOF → FIN on the stream; the stream's FIN → `shutdown` of the socket's write side;
/// - tunnel bytes are released (credit returned) only after they were written to the socket,
///   so a slow socket slows its own sender and no other stream (SPEC 6.3);
/// - a socket error resets the stream with `ABORTED`; a stream error ends the pump.
pub async fn pump<S>(stream: TetherStream, mut socket: S, first: Bytes) -> io::Result<Moved>
where
    S: AsyncRead + AsyncWrite + Unpin + Abort,
{
    let result = pump_inner(&stream, &mut socket, first).await;
    if result.is_err() {
        socket.abort_on_close();
    }
    result
}

async fn pump_inner<S>(stream: &TetherStream, socket: &mut S, first: Bytes) -> io::Result<Moved>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(socket);
    // Each direction in one future of its own.
    let (rx, tx) = (stream.h(), stream.h());
    let up = async {
        let mut total = first.len() as u64;
        if !first.is_empty() {
            tx.send_bytes(first).await?;
        }
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
            tx.send_bytes(buf.get().split().freeze()).await?;
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
            if let Err(e) = wr.write_all_buf(&mut out).await {
                rx.reset(ErrorCode::ABORTED, "local socket write failed");
                return Err(e);
            }
            total += n as u64;
            rx.release(n);
        }
        wr.shutdown().await?;
        Ok::<u64, io::Error>(total)
    };
    let (up, down) = tokio::try_join!(up, down)?;
    Ok(Moved { up, down })
}
