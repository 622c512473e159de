//! Embedding tether with this crate alone: a server that accepts agents and dials through
//! them, and an agent with a dial policy of its own, both in this process on loopback with a
//! throwaway CA. No HTTP frontend, no Kubernetes, no metrics format: the program decides who
//! may connect, where a stream goes and what an agent may dial.
//!
//! `cargo run -p tether --example embed --features test-util`
#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether::Tunnel;
use tether::agent::{Agent, AgentConfig, Dialer};
use tether::listen::{Admission, Admitted, ListenConfig, Listener, Peer, Refusal};
use tether::tls::{self, testpki::Ca};
use tether_proto::ErrorCode;
use tether_proto::frame::{Dial, Hello};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The server's policy: an agent is admitted if its client certificate (verified by TLS
/// against the CA) names the id it claims; its tunnel is kept by agent id while it lives.
#[derive(Default)]
struct ByCertificate {
    tunnels: Mutex<HashMap<String, Tunnel>>,
}

impl Admission for ByCertificate {
    type Grant = ();

    async fn admit(&self, hello: &Hello, peer: &Peer) -> Result<(), Refusal> {
        // A real server parses the certificate (x509-parser); this example checks that the
        // claimed id appears in it, which is enough to show where the decision goes.
        let cert = peer
            .certificates
            .first()
            .ok_or_else(|| Refusal::unauthorized("a client certificate is required"))?;
        let named = cert
            .windows(hello.agent_id.len())
            .any(|w| w == hello.agent_id.as_bytes());
        if named {
            Ok(())
        } else {
            Err(Refusal::unauthorized(
                "the certificate does not name this agent id",
            ))
        }
    }

    async fn serve(&self, agent: Admitted, (): ()) {
        let id = agent.hello.agent_id.clone();
        println!("server: agent {id} connected from {}", agent.peer.addr);
        self.lock().insert(id.clone(), agent.tunnel.clone());
        let reason = agent.tunnel.closed().await;
        self.lock().remove(&id);
        println!("server: agent {id} left ({reason})");
    }
}

impl ByCertificate {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tunnel>> {
        self.tunnels.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tunnel(&self, agent_id: &str) -> Option<Tunnel> {
        self.lock().get(agent_id).cloned()
    }
}

/// The agent's policy: only loopback destinations on one port, anything else refused with a
/// reason the server's caller sees.
struct OnlyPort(u16);

impl Dialer for OnlyPort {
    type Conn = TcpStream;

    async fn dial(&self, d: &Dial) -> Result<TcpStream, (ErrorCode, String)> {
        if d.host != "127.0.0.1" || d.port != self.0 {
            return Err((
                ErrorCode::DIAL_FORBIDDEN,
                format!("this agent dials 127.0.0.1:{} only", self.0),
            ));
        }
        tether::agent::connect_tcp(&d.host, d.port, Duration::from_secs(5)).await
    }
}

/// A backend that answers each connection with a greeting and the bytes it received.
async fn backend() -> Result<u16, Error> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got).await;
                let _ = s
                    .write_all(b"hello from behind the tunnel, you sent: ")
                    .await;
                let _ = s.write_all(&got).await;
            });
        }
    });
    Ok(port)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let ca = Ca::new("embed example CA");
    let server_pem = ca.leaf("server", &["localhost"]);
    let agent_pem = ca.leaf("node-1", &["node-1"]);
    let ca_pem = ca.pem.cert.as_bytes();

    // The server end: agents must present a certificate signed by the CA.
    let server_tls = tls::server_config(
        server_pem.cert.as_bytes(),
        server_pem.key.as_bytes(),
        Some(ca_pem),
    )?;
    let policy = Arc::new(ByCertificate::default());
    let listener = Listener::bind(
        "127.0.0.1:0".parse()?,
        ListenConfig::new(server_tls),
        policy.clone(),
    )
    .await?;
    println!("server: agents connect to {}", listener.local_addr());

    // The agent end, with its own dial policy.
    let port = backend().await?;
    let agent_tls = tls::client_config(
        ca_pem,
        Some((agent_pem.cert.as_bytes(), agent_pem.key.as_bytes())),
    )?;
    let mut config = AgentConfig::new(vec![listener.local_addr().to_string()], agent_tls, "node-1");
    config.server_name = Some("localhost".into());
    let agent = Agent::start(config, OnlyPort(port));
    if !agent.wait_connected(1, Duration::from_secs(10)).await {
        return Err("the agent did not connect".into());
    }
    let tunnel = policy.tunnel("node-1").ok_or("no tunnel for node-1")?;

    // A stream through the agent: AsyncRead + AsyncWrite, shutdown is a half-close.
    let mut stream = tunnel
        .dial("127.0.0.1", port, Duration::from_secs(5))
        .await?;
    stream.write_all(b"ping").await?;
    stream.shutdown().await?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await?;
    println!("client: {reply}");

    // The agent's policy refuses anything else, and the refusal says why.
    match tunnel.dial("10.0.0.1", 22, Duration::from_secs(5)).await {
        Err(e) => println!("client: 10.0.0.1:22 refused: {e}"),
        Ok(_) => return Err("the agent's policy let 10.0.0.1:22 through".into()),
    }

    // Dropping the agent closes its tunnel; dropping the listener frees its port.
    drop(agent);
    drop(listener);
    Ok(())
}
