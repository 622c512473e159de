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

pub(super) async fn accept<A: Admission + 'static>(
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
    async fn serve<A: Admission + 'static>(self, admission: Arc<A>) {
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
        let deadline = handshake_deadline(&session, epoch);
        let tls = tls_handshake(acceptor, &cfg.handover_alpn, tcp);
        let tls = match deadline {
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
        let peer = Peer {
            addr: peer,
            certificates,
        };
        let path = TunnelPath {
            cfg,
            stats,
            session,
            epoch,
            slot,
        };
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        match alpn {
            Some(alpn) if path.cfg.handover_alpn.contains(&alpn) => {
                let handover = Handover {
                    deadline: deadline
                        .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600)),
                    tls,
                    peer,
                    alpn,
                    path,
                };
                // Boxed: a hand-over's future (another protocol's whole connection) would
                // otherwise size every tunnel's task.
                Box::pin(admission.hand_over(handover)).await;
            }
            _ => path.serve(tls, peer, &*admission).await,
        }
    }
}

/// The TLS handshake; when the listener hands some protocols over, a ClientHello offering one
/// of them (by ALPN) is answered with that one selected, and any other without ALPN, as
/// without hand-overs.
async fn tls_handshake(
    acceptor: TlsAcceptor,
    handover_alpn: &[Vec<u8>],
    tcp: TcpStream,
) -> std::io::Result<AgentTls> {
    let io = crate::tls::tunnel_transport(tcp);
    if handover_alpn.is_empty() {
        return acceptor.accept(io).await;
    }
    let start =
        tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await?;
    let offered = start
        .client_hello()
        .alpn()
        .and_then(|mut names| names.find(|n| handover_alpn.iter().any(|h| h == n)))
        .map(<[u8]>::to_vec);
    let config = acceptor.config().clone();
    let config = match offered {
        Some(name) => {
            let mut c = Arc::unwrap_or_clone(config);
            c.alpn_protocols = vec![name];
            Arc::new(c)
        }
        None => config,
    };
    start.into_stream(config).await
}

/// An agent connection over TLS, as the listener accepts it.
pub type AgentTls = tokio_rustls::server::TlsStream<crate::tls::ReadAhead<TcpStream>>;

/// A connection whose TLS handshake selected a protocol the listener hands over
/// ([`ListenConfig::handover_alpn`]): another kind of agent, whose protocol the caller
/// translates. It still holds its place among the connections in their handshake, and its
/// deadline, until it becomes a tunnel through [`TunnelPath::serve`] or is dropped.
pub struct Handover {
    /// The connection, TLS done.
    pub tls: AgentTls,
    /// What the connection proved.
    pub peer: Peer,
    /// The protocol TLS selected.
    pub alpn: Vec<u8>,
    /// When the handshake budget (TLS and the first exchange, as for a HELLO) runs out.
    pub deadline: tokio::time::Instant,
    /// The rest of a tunnel's way in.
    pub path: TunnelPath,
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover")
            .field("peer", &self.peer)
            .field("alpn", &String::from_utf8_lossy(&self.alpn))
            .finish_non_exhaustive()
    }
}

/// What remains of an accepted connection's way to becoming a tunnel once TLS is done: the
/// session (its handshake deadline running since the first byte), and the handshake slot.
pub struct TunnelPath {
    cfg: Arc<ListenConfig>,
    stats: Arc<ListenerStats>,
    session: Session,
    epoch: Instant,
    slot: HandshakeSlot,
}

impl TunnelPath {
    /// Runs the tunnel over `io` exactly as over an agent's TLS connection: the HELLO that
    /// arrives on it under the session's handshake deadline, `admission`'s decision against
    /// what `peer` proved, then its service for the tunnel's life. A hand-over's `io` is one
    /// end of an in-memory transport whose other end speaks for the foreign agent.
    pub async fn serve<A, IO>(self, io: IO, peer: Peer, admission: &A)
    where
        A: Admission,
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        let TunnelPath {
            cfg,
            stats,
            session,
            epoch,
            slot,
        } = self;
        let start = Start {
            incoming: None,
            // SPEC 4.2: the protocol carries the id, identifiers and token; the server decides,
            // against what the connection proved (docs/SECURITY.md), once any API call is back.
            policy: Some(Box::new(|_| Verdict::Later)),
            epoch,
            label: format!("server<-{}", peer.addr),
            stats: Some(stats.tunnels.clone()),
            linger: cfg.linger,
        };
        let (tunnel, handshaking) = Tunnel::spawn(io, session, start);
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
