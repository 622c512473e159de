//! Tunnels joined in memory, for tests and benchmarks (feature `test-util`).

use std::time::Duration;

use tether_proto::testing::{test_agent_identity, test_server_identity};
use tether_proto::{Session, Time};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::tunnel::{Handshake, Incoming, Start, TetherStream, Tunnel};

/// How long a test waits for anything.
const WAIT: Duration = Duration::from_secs(10);

/// The in-memory tunnels' session settings: no keepalives.
pub fn tunnel_config() -> tether_proto::Config {
    tether_proto::Config {
        keepalive_interval_ms: 0,
        ..tether_proto::Config::default()
    }
}

/// A server tunnel and an agent tunnel joined in memory (`tokio::io::duplex`, no TLS),
/// handshake done; the agent's dials go to the returned receiver.
pub async fn tunnel_pair() -> (Tunnel, Tunnel, mpsc::UnboundedReceiver<Incoming>) {
    let (a, b) = tokio::io::duplex(1 << 20);
    tunnel_pair_on(a, b).await
}

/// [`tunnel_pair`] over a given transport: the server's end `a`, the agent's `b`.
pub async fn tunnel_pair_on<T>(a: T, b: T) -> (Tunnel, Tunnel, mpsc::UnboundedReceiver<Incoming>)
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let epoch = std::time::Instant::now();
    let server = Session::server(
        tunnel_config(),
        test_server_identity(),
        Time::from_millis(0),
    )
    .expect("server session");
    let agent = Session::agent(tunnel_config(), test_agent_identity(), Time::from_millis(0))
        .expect("agent session");
    let (tx, rx) = mpsc::unbounded_channel();
    let start = |incoming, label: &str| Start {
        incoming,
        policy: None,
        epoch,
        label: label.into(),
        stats: None,
        linger: crate::pump::LINGER,
    };
    let (s, s_hs) = Tunnel::spawn(a, server, start(None, "server"));
    let (g, g_hs) = Tunnel::spawn(b, agent, start(Some(tx), "agent"));
    assert!(matches!(s_hs.done().await, Ok(Handshake::Hello(_))));
    assert!(matches!(g_hs.done().await, Ok(Handshake::Welcome(_))));
    (s, g, rx)
}

/// The server dials through the agent and the agent's application accepts: the agent's end
/// (`near`) and the server's end (`far`) of one stream.
pub async fn tunnel_stream(
    server: &Tunnel,
    dials: &mut mpsc::UnboundedReceiver<Incoming>,
) -> (TetherStream, TetherStream) {
    let server = server.clone();
    let dialing = tokio::spawn(async move { server.dial("dest", 80, WAIT).await });
    let incoming = tokio::time::timeout(WAIT, dials.recv())
        .await
        .expect("a dial in time")
        .expect("the tunnel is up");
    assert_eq!(
        (incoming.dial().host.as_str(), incoming.dial().port),
        ("dest", 80)
    );
    let near = incoming.accept().expect("accepted");
    (near, dialing.await.expect("dial task").expect("dialled"))
}
