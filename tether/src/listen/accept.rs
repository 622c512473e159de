//! The accept loop and one connection's life: TLS and HELLO under the session's handshake
//! deadline, the caller's decision, then the caller's service of the tunnel.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tether_proto::session::ServerIdentity;
use tether_proto::{ErrorCode, Session, Time};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use super::pacer::AcceptPacer;
use super::{Admission, Admitted, ListenConfig, Peer, Refusal};
use crate::stats::{ListenerStats, RefusalKind};
use crate::tunnel::{Handshake, Start, Tunnel, Verdict, handshake_deadline, session_config};

/// The connections a listener accepted and still serves, so dropping it ends them.
#[derive(Default)]
pub(super) struct Conns {
    next: AtomicU64,
    live: Mutex<HashMap<u64, AbortHandle>>,
}

impl Conns {
    /// Spawns `task` as connection number n; it is forgotten again when it ends.
    fn spawn(self: &Arc<Self>, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let conns = self.clone();
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        // Registered under the lock before the task can end and forget itself.
        let handle = tokio::spawn(async move {
            let _gone = Forget(conns, n);
            task.await;
        });
        live.insert(n, handle.abort_handle());
    }

    pub(super) fn abort_all(&self) {
        let live = std::mem::take(&mut *self.live.lock().unwrap_or_else(|e| e.into_inner()));
        for h in live.into_values() {
            h.abort();
        }
    }
}

/// Takes a connection out of [`Conns`] when its task ends, however it ends.
struct Forget(Arc<Conns>, u64);

impl Drop for Forget {
    fn drop(&mut self) {
        self.0
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.1);
    }
}

/// A place among the connections in their handshake; given back when dropped.
struct HandshakeSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    stats: Arc<ListenerStats>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.stats.handshake_ended();
    }
}

/// Closes a tunnel when dropped: the caller's service returned, or the listener was dropped.
struct CloseOnDrop(Tunnel);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0
            .close(ErrorCode::NO_ERROR, "the server let go of the tunnel");
    }
}

pub(super) async fn accept<A: Admission>(
    l: TcpListener,
    cfg: Arc<ListenConfig>,
    admission: Arc<A>,
    stats: Arc<ListenerStats>,
    conns: Arc<Conns>,
) {
    // Unauthenticated connections cost a task, a TLS state and a session each: at most
    // `max_handshakes` at once; the rest wait in the kernel's backlog (docs/SECURITY.md).
    let handshakes = Arc::new(tokio::sync::Semaphore::new(cfg.max_handshakes.max(1)));
    let mut pacer = AcceptPacer::new(cfg.accept_rate, cfg.accept_burst);
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else {
            return;
        };
        pacer.pace().await;
        let Ok((tcp, peer)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        stats.handshake_started();
        let slot = HandshakeSlot {
            _permit: permit,
            stats: stats.clone(),
        };
        // The material in use when the handshake starts; a reload changes later ones only.
        let acceptor = TlsAcceptor::from(cfg.tls.get());
        // One span per tunnel: every line it logs names the peer and, once known, the agent.
        let span = tracing::info_span!("tunnel", %peer, agent_id = tracing::field::Empty);
        let conn = Conn {
            cfg: cfg.clone(),
            stats: stats.clone(),
            acceptor,
            tcp,
            peer,
            slot,
        };
        conns.spawn(conn.serve(admission.clone()).instrument(span));
    }
}

/// One accepted connection, before its TLS handshake.
struct Conn {
    cfg: Arc<ListenConfig>,
    stats: Arc<ListenerStats>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    slot: HandshakeSlot,
}

impl Conn {
    async fn serve<A: Admission>(self, admission: Arc<A>) {
        let Conn {
            cfg,
            stats,
            acceptor,
            tcp,
            peer,
            slot,
        } = self;
        // The session exists from the first byte: its handshake deadline is the one budget for
        // TLS and HELLO together (SPEC 4.4).
        let epoch = Instant::now();
        let identity = ServerIdentity {
            server_id: cfg.server_id.clone(),
            server_count: cfg
                .server_count_source
                .as_ref()
                .map_or(cfg.server_count, |c| (*c.borrow()).max(cfg.server_count)),
        };
        let session =
            match Session::server(session_config(&cfg.session), identity, Time::from_millis(0)) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "session configuration refused");
                    return;
                }
            };
        let tls = acceptor.accept(crate::tls::tunnel_transport(tcp));
        let tls = match handshake_deadline(&session, epoch) {
            Some(deadline) => tokio::time::timeout_at(deadline, tls).await,
            None => Ok(tls.await),
        };
        let mut tls = match tls {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "agent TLS handshake failed");
                stats.refuse(RefusalKind::Tls);
                return;
            }
            Err(_) => {
                // No TLS yet, so no GOAWAY can be sent: the connection just closes.
                tracing::warn!("agent TLS handshake timed out");
                stats.refuse(RefusalKind::Timeout);
                return;
            }
        };
        tls.get_mut()
            .1
            .set_buffer_limit(Some(crate::tls::TUNNEL_SEND_BUFFER));
        let certificates = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(<[_]>::to_vec)
            .unwrap_or_default();
        let start = Start {
            incoming: None,
            // SPEC 4.2: the protocol carries the id, identifiers and token; the server decides,
            // against what the connection proved (docs/SECURITY.md), once any API call is back.
            policy: Some(Box::new(|_| Verdict::Later)),
            epoch,
            label: format!("server<-{peer}"),
            stats: Some(stats.tunnels.clone()),
            linger: cfg.linger,
        };
        let (tunnel, handshaking) = Tunnel::spawn(tls, session, start);
        let hello = match handshaking.done().await {
            Ok(Handshake::Hello(h)) => h,
            Ok(Handshake::Welcome(_)) => return,
            Err(reason) => {
                tracing::warn!(%reason, "agent handshake failed");
                stats.refuse(if reason.code() == ErrorCode::HANDSHAKE_TIMEOUT {
                    RefusalKind::Timeout
                } else {
                    RefusalKind::Handshake
                });
                return;
            }
        };
        let peer = Peer {
            addr: peer,
            certificates,
        };
        // The decision races the agent leaving and the handshake deadline: a decision nobody
        // waits for any more must not keep its handshake slot.
        let deadline = tokio::time::Instant::from_std(
            epoch + Duration::from_millis(cfg.session.handshake_timeout_ms),
        );
        // Boxed: the decision's state (an API call's, say) is gone once it is made, instead of
        // sizing the task that lives as long as the tunnel.
        let verdict = tokio::select! {
            v = Box::pin(admission.admit(&hello, &peer)) => v,
            _ = tunnel.closed() => Err(Refusal::unauthorized("the agent left before it was decided")),
            () = tokio::time::sleep_until(deadline) => Err(Refusal::unauthorized("not decided within the handshake deadline")),
        };
        let decided = tunnel.decide_hello(
            verdict
                .as_ref()
                .map(|_| ())
                .map_err(|r| (ErrorCode::UNAUTHORIZED, r.wire.clone())),
        );
        if let Err(e) = decided {
            tracing::warn!(error = %e, "agent's handshake ended before it was decided");
            stats.refuse(RefusalKind::Timeout);
            return;
        }
        let grant = match verdict {
            Ok(grant) => grant,
            Err(r) => {
                tracing::warn!(agent_id = %hello.agent_id.escape_debug(), reason = %r.log, "agent refused");
                stats.refuse(r.kind);
                // The slot is given back once the session is over (the refusal closed it),
                // never while it could still hold a half-open connection.
                tunnel.closed().await;
                return;
            }
        };
        drop(slot);
        let _close = CloseOnDrop(tunnel.clone());
        admission
            .serve(
                Admitted {
                    tunnel,
                    hello,
                    peer,
                },
                grant,
            )
            .await;
    }
}
