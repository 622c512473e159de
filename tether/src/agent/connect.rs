//! One tunnel to one server address: TCP, TLS and the session's handshake, under the
//! session's handshake deadline.

use std::sync::Arc;
use std::time::Instant;

use rustls_pki_types::ServerName;
use tether_proto::frame::Token;
use tether_proto::session::AgentIdentity;
use tether_proto::{ErrorCode, Session, Time};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

use super::AgentConfig;
use crate::stats::Stage;
use crate::tunnel::{Handshake, Incoming, Start, Tunnel, handshake_deadline, session_config};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Brings up one tunnel to `addr`: the tunnel, the server's id and count, and where its dials
/// arrive. Each failure is counted by the stage it happened in.
pub(super) async fn connect_once(
    cfg: &Arc<AgentConfig>,
    addr: &str,
) -> Result<(Tunnel, String, u16, mpsc::UnboundedReceiver<Incoming>), Error> {
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = cfg.server_name.clone().unwrap_or_else(|| host.to_owned());
    let server_name = ServerName::try_from(name)?;
    let epoch = Instant::now();
    // Each failure is counted by the stage it happened in (a fixed label set).
    let failed = |stage: Stage| {
        cfg.stats.failed(stage);
        stage.name()
    };
    let token = match &cfg.token_path {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| format!("{}: {e}", p.display()))
                .and_then(|t| Token::new(t.trim()).map_err(|e| format!("token file: {e}")))
                .inspect_err(|_| {
                    failed(Stage::Token);
                })?,
        ),
        None => None,
    };
    let identity = AgentIdentity {
        agent_id: cfg.agent_id.clone(),
        identifiers: cfg.identifiers.clone(),
        token,
    };
    // The session exists before the first byte: its handshake deadline is the one budget for
    // TCP, TLS and WELCOME together (SPEC 4.4).
    let session = Session::agent(session_config(&cfg.session), identity, Time::from_millis(0))?;
    let setup = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| (failed(Stage::Tcp), e))?;
        let _ = tcp.set_nodelay(true);
        let mut tls = TlsConnector::from(cfg.tls.get())
            .connect(server_name, crate::tls::tunnel_transport(tcp))
            .await
            .map_err(|e| (failed(Stage::Tls), e))?;
        tls.get_mut()
            .1
            .set_buffer_limit(Some(crate::tls::TUNNEL_SEND_BUFFER));
        Ok::<_, (&str, std::io::Error)>(tls)
    };
    let setup = async {
        match handshake_deadline(&session, epoch) {
            Some(deadline) => match tokio::time::timeout_at(deadline, setup).await {
                Ok(r) => r,
                Err(_) => Err((
                    failed(Stage::Timeout),
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
                )),
            },
            None => setup.await,
        }
    };
    let tls = setup.await.map_err(|(_, e)| e)?;
    let (tx, rx) = mpsc::unbounded_channel();
    let start = Start {
        incoming: Some(tx),
        policy: None,
        epoch,
        label: format!("agent->{addr}"),
        stats: Some(cfg.stats.tunnel.clone()),
        linger: cfg.linger,
    };
    let (tunnel, handshaking) = Tunnel::spawn(tls, session, start);
    let welcome = match handshaking.done().await {
        Ok(Handshake::Welcome(w)) => w,
        Ok(Handshake::Hello(_)) => {
            failed(Stage::Handshake);
            return Err("the server end sent HELLO".into());
        }
        Err(reason) => {
            failed(match reason.code() {
                ErrorCode::UNAUTHORIZED => Stage::Unauthorized,
                ErrorCode::HANDSHAKE_TIMEOUT => Stage::Timeout,
                _ => Stage::Handshake,
            });
            return Err(reason.into());
        }
    };
    Ok((tunnel, welcome.server_id, welcome.server_count, rx))
}
