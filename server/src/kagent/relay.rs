//! One dial through a Konnectivity agent, and its bytes: DIAL_REQ, the agent's answer, then
//! the stream's bytes both ways until it ends.
//!
//! The agent has no half-close. A client's FIN becomes CLOSE_REQ (behind the bytes before
//! it), which closes the node's connection, as Konnectivity's own server does; when the
//! client sent bytes within [`FIN_GRACE`] of its FIN, it waits that long first, because the
//! agent closes the node's connection on CLOSE_REQ without writing the bytes it still queues
//! for it (a client that sent nothing lately has nothing queued there, and does not wait: a
//! stream held open for a grace is a stream slot taken). The agent's CLOSE_RSP (sent when the node's
//! connection ends, or answering CLOSE_REQ) is the stream's FIN, or its reset when it carries
//! an error; client bytes after it reset the stream (nobody reads them). A stream that ends
//! otherwise (the client reset it, the tunnel went, the budget's stall limit) sends CLOSE_REQ.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tether::{Incoming, TetherStream};
use tether_proto::ErrorCode;
use tokio::sync::Notify;

use super::bridge::{Ctx, Down, Inbox, Up, close_request, frame};
use crate::grpc::data_head;

/// Client-to-node bytes in one DATA packet, at most.
const MAX_UP: usize = 32 * 1024;
/// How long a stream whose client finished waits for each next packet from the agent after
/// its CLOSE_REQ.
const CLOSE_WAIT: Duration = Duration::from_secs(30);
/// How long a client's FIN that follows its last bytes closely waits before it becomes
/// CLOSE_REQ, unless the node closes first.
pub(super) const FIN_GRACE: Duration = Duration::from_millis(100);

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
pub(super) async fn dial(ctx: Arc<Ctx>, mut incoming: Incoming) {
    let d = incoming.dial();
    let Some((random, mut rx)) = ctx.begin_dial(join_host_port(&d.host, d.port)) else {
        tracing::warn!("dial refused: the Konnectivity agent has not read the dials before it");
        return incoming.reject(
            ErrorCode::DIAL_UNREACHABLE,
            "the Konnectivity agent reads nothing",
        );
    };
    let answer = tokio::select! {
        a = &mut rx => a.ok(),
        () = incoming.cancelled() => None,
    };
    let Some(answer) = answer else {
        // Given up before the answer: a late success gets CLOSE_REQ when it comes; one that
        // crossed this is closed now.
        let mut sh = ctx.lock();
        sh.pending_remove(random);
        if let Ok(Ok((id, _))) = rx.try_recv() {
            sh.close(id);
            drop(sh);
            ctx.close_request(id);
        }
        return tracing::debug!("dial given up before the agent answered");
    };
    match answer {
        Ok((id, inbox)) => match incoming.accept() {
            Ok(stream) => relay(&ctx, id, stream, inbox).await,
            Err(e) => {
                tracing::debug!(error = %e, "dial given up as the agent answered");
                ctx.lock().close(id);
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
        let live = self.ctx.lock().close(self.id);
        if live && !self.requested.load(Ordering::Relaxed) {
            self.ctx.close_request(self.id);
        }
    }
}

/// Bytes both ways between the stream and the agent's connection `id`.
async fn relay(ctx: &Ctx, id: i64, stream: TetherStream, inbox: Inbox) {
    let Inbox { mut down, abort } = inbox;
    let live = Live {
        ctx,
        id,
        requested: AtomicBool::new(false),
    };
    let (mut recv, mut send) = stream.into_split();
    let node_closed = AtomicBool::new(false);
    // Wakes the way down when CLOSE_REQ went out (its waits are bounded from then on), and
    // the way up when the node closed (a FIN waiting for its grace need not wait).
    let (asked, closed) = (Notify::new(), Notify::new());
    let gone = || io::Error::other("the Konnectivity agent's call ended");
    let mut last_up: Option<std::time::Instant> = None;
    let up = async {
        while let Some(mut b) = recv.recv_chunk().await? {
            if node_closed.load(Ordering::Relaxed) {
                return Err(io::Error::other(
                    "bytes after the node closed its connection",
                ));
            }
            let n = b.len();
            while !b.is_empty() {
                let piece = b.split_to(b.len().min(MAX_UP));
                let head = data_head(id, piece.len());
                ctx.out
                    .send(Up { head, body: piece })
                    .await
                    .map_err(|_| gone())?;
            }
            recv.release(n);
            last_up = Some(std::time::Instant::now());
        }
        // The client's FIN: CLOSE_REQ, after the grace if its last bytes were recent, unless
        // the node closed meanwhile.
        let grace = last_up.map_or(Duration::ZERO, |t| FIN_GRACE.saturating_sub(t.elapsed()));
        if !node_closed.load(Ordering::Relaxed) && !grace.is_zero() {
            let _ = tokio::time::timeout(grace, closed.notified()).await;
        }
        if !node_closed.load(Ordering::Relaxed) {
            live.requested.store(true, Ordering::Relaxed);
            asked.notify_one();
            let head = frame(&close_request(id));
            ctx.out
                .send(Up {
                    head,
                    body: bytes::Bytes::new(),
                })
                .await
                .map_err(|_| gone())?;
        }
        Ok::<_, io::Error>(())
    };
    let reset =
        || io::Error::other("reset: its bytes held the Konnectivity agent's buffer too long");
    let down_way = async {
        loop {
            let bounded = live.requested.load(Ordering::Relaxed);
            let next = async {
                if bounded {
                    // An agent that takes CLOSE_REQ and neither sends nor closes holds the
                    // stream for at most this long without a packet.
                    tokio::time::timeout(CLOSE_WAIT, down.recv())
                        .await
                        .map_err(|_| io::Error::other("the agent did not answer CLOSE_REQ"))
                } else {
                    Ok(down.recv().await)
                }
            };
            let d = tokio::select! {
                biased;
                () = abort.notified() => {
                    send.reset(ErrorCode::ABORTED, "the stream held the Konnectivity agent's buffer while its client read nothing");
                    return Err(reset());
                }
                () = asked.notified(), if !bounded => continue,
                d = next => d?,
            };
            match d.ok_or_else(gone)? {
                Down::Data(b, held) => {
                    tokio::select! {
                        biased;
                        () = abort.notified() => {
                            send.reset(ErrorCode::ABORTED, "the stream held the Konnectivity agent's buffer while its client read nothing");
                            return Err(reset());
                        }
                        r = send.send_bytes(b) => r?,
                    }
                    drop(held);
                }
                Down::Closed(error) => {
                    node_closed.store(true, Ordering::Relaxed);
                    closed.notify_one();
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
    match tokio::try_join!(up, down_way) {
        Ok(_) => tracing::debug!("stream done"),
        Err(e) => tracing::debug!(error = %e, "stream ended"),
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
