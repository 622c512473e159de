//! [`Socket`]: the local end a pump joins to a stream, as much as the pump needs of it beyond
//! reading and writing: aborting it, and seeing its peer go without reading it.

use std::future::Future;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, Interest, Ready};

use crate::tunnel::Gone;

/// How often a peer with bytes waiting to be read is looked at again: an end behind bytes not
/// yet read cannot be seen without reading them, and a parked upload does not read.
const LOOK_AGAIN: Duration = Duration::from_millis(500);
/// How often a peer that has finished sending is looked at for a failure: a readable end
/// wakes nobody when an error joins it, and what finds a vanished peer (a TCP keepalive)
/// takes tens of seconds anyway.
const LOOK_AFTER_END: Duration = Duration::from_secs(5);

/// A local socket a pump joins to a stream.
pub trait Socket: AsyncRead + AsyncWrite + Unpin {
    /// Makes the next close an abort, so the peer sees an error (a TCP RST), not a clean end:
    /// a stream that fails must never look like a complete one (docs/SECURITY.md).
    fn abort_on_close(&self);

    /// Whether the peer has gone, seen without reading: `Ready(Some(..))` once it has
    /// finished sending (a FIN) or failed (a reset, an error); `Ready(None)` while bytes wait
    /// to be read (an end behind them is not visible yet: ask again later); `Pending` while
    /// nothing has happened, `cx` to be woken when something does. The default never knows.
    fn poll_peer(&self, cx: &mut Context<'_>) -> Poll<Option<Gone>> {
        let _ = cx;
        Poll::Pending
    }
}

/// TCP keepalives on a relay's socket: a peer that vanished (a host gone, a process whose
/// socket its kernel has since forgotten) is found within about a minute of silence, as an
/// error the pump sees (see [`crate::pump::pump`]), instead of holding its stream for ever.
pub fn keep_alive(s: &tokio::net::TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let ka = ka.with_retries(3);
    let _ = socket2::SockRef::from(s).set_tcp_keepalive(&ka);
}

/// What readiness says of a peer: gone, or `None` (bytes wait) when known at once.
fn gone_from(ready: std::io::Result<Ready>) -> Option<Option<Gone>> {
    match ready {
        Err(e) => Some(Some(Gone::Failed(e.to_string()))),
        Ok(r) if r.is_error() => Some(Some(Gone::Failed("the peer reset the connection".into()))),
        Ok(r) if r.is_read_closed() => Some(Some(Gone::Finished)),
        Ok(r) if r.is_readable() => Some(None),
        Ok(_) => None,
    }
}

/// [`Socket::poll_peer`] for a tokio socket: its readiness, read without waiting (the bits the
/// reactor has seen accumulate while nobody reads), else a wait for the next event.
macro_rules! poll_peer_of {
    ($s:expr, $cx:expr) => {{
        let s = $s;
        let now = {
            let ready = std::pin::pin!(s.ready(Interest::READABLE | Interest::ERROR));
            match ready.poll(&mut Context::from_waker(Waker::noop())) {
                Poll::Ready(r) => gone_from(r),
                Poll::Pending => None,
            }
        };
        match now {
            Some(known) => Poll::Ready(known),
            None => match s.poll_read_ready($cx) {
                Poll::Ready(Ok(())) => Poll::Ready(None),
                Poll::Ready(Err(e)) => Poll::Ready(Some(Gone::Failed(e.to_string()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }};
}

impl Socket for tokio::net::TcpStream {
    fn abort_on_close(&self) {
        let _ = self.set_zero_linger();
    }

    fn poll_peer(&self, cx: &mut Context<'_>) -> Poll<Option<Gone>> {
        poll_peer_of!(self, cx)
    }
}

impl Socket for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    fn abort_on_close(&self) {
        self.get_ref().0.abort_on_close();
    }

    /// The TCP connection's: a close_notify comes with the FIN, and a FIN or a reset is seen
    /// beneath TLS whether or not rustls has read it.
    fn poll_peer(&self, cx: &mut Context<'_>) -> Poll<Option<Gone>> {
        self.get_ref().0.poll_peer(cx)
    }
}

#[cfg(unix)]
impl Socket for tokio::net::UnixStream {
    /// A Unix socket has no RST. What the platform offers: shutting down this end's reading
    /// makes the client's next write fail (EPIPE), and closing with bytes the client sent
    /// still unread makes its next read fail (ECONNRESET, Linux). A client that had sent
    /// everything and only reads sees a plain end of stream: the server logs and counts every
    /// failed stream (docs/SECURITY.md).
    fn abort_on_close(&self) {
        let _ = socket2::SockRef::from(self).shutdown(std::net::Shutdown::Read);
    }

    fn poll_peer(&self, cx: &mut Context<'_>) -> Poll<Option<Gone>> {
        poll_peer_of!(self, cx)
    }
}

/// Resolves when the peer of the socket behind `lock` has gone (see [`Socket::poll_peer`]),
/// looking again every half second while bytes wait to be read.
pub(super) async fn peer_gone<S: Socket + Send>(lock: &Mutex<S>) -> Gone {
    let mut later: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| {
        loop {
            if let Some(t) = &mut later {
                if t.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                later = None;
            }
            let seen = lock.lock().unwrap_or_else(|e| e.into_inner()).poll_peer(cx);
            match seen {
                Poll::Ready(Some(gone)) => return Poll::Ready(gone),
                Poll::Ready(None) => later = Some(Box::pin(tokio::time::sleep(LOOK_AGAIN))),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await
}

/// Resolves, with why, if the peer of the socket behind `lock`, which has finished sending,
/// fails: a reset, or an error such as a TCP keepalive that found it gone. Never otherwise.
pub(super) async fn peer_failed<S: Socket>(lock: &Mutex<S>) -> String {
    loop {
        let seen = std::future::poll_fn(|cx| {
            match lock.lock().unwrap_or_else(|e| e.into_inner()).poll_peer(cx) {
                Poll::Ready(Some(Gone::Failed(why))) => Poll::Ready(Some(why)),
                Poll::Ready(_) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        if let Some(why) = seen {
            return why;
        }
        tokio::time::sleep(LOOK_AFTER_END).await;
    }
}
