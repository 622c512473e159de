//! The library as a proxy embeds it: a listener and an agent from `tether` alone, over real TLS
//! on loopback. Dropping either stops what it started; the caller's policies decide who
//! connects and what is dialled; a stream's halves serve one task each.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether::Tunnel;
use tether::agent::{Agent, AgentConfig, Dialer};
use tether::listen::{Admission, Admitted, ListenConfig, Listener, Peer, Refusal};
use tether::stats::{RefusalKind, Stage};
use tether::tls::{self, testpki::Ca};
use tether_proto::ErrorCode;
use tether_proto::frame::{Dial, Hello};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(10);

/// Admits agents whose id is not `refused`, and keeps their tunnels by id.
#[derive(Default)]
struct Keep {
    tunnels: Mutex<HashMap<String, Tunnel>>,
}

impl Admission for Keep {
    type Grant = ();

    async fn admit(&self, hello: &Hello, _: &Peer) -> Result<(), Refusal> {
        if hello.agent_id == "refused" {
            return Err(Refusal::unauthorized("not this one"));
        }
        Ok(())
    }

    async fn serve(&self, agent: Admitted, (): ()) {
        let id = agent.hello.agent_id.clone();
        self.tunnels
            .lock()
            .unwrap()
            .insert(id.clone(), agent.tunnel.clone());
        agent.tunnel.closed().await;
        self.tunnels.lock().unwrap().remove(&id);
    }
}

impl Keep {
    fn tunnel(&self, id: &str) -> Option<Tunnel> {
        self.tunnels.lock().unwrap().get(id).cloned()
    }
}

/// Dials loopback on one port only.
struct Only(u16);

impl Dialer for Only {
    type Conn = TcpStream;

    async fn dial(&self, d: &Dial) -> Result<TcpStream, (ErrorCode, String)> {
        if d.port != self.0 {
            return Err((ErrorCode::DIAL_FORBIDDEN, "not that port".into()));
        }
        tether::agent::connect_tcp("127.0.0.1", d.port, WAIT).await
    }
}

struct Ends {
    listener: Listener,
    keep: Arc<Keep>,
    agent: Agent,
}

async fn ends(agent_id: &str, port: u16) -> Ends {
    let ca = Ca::new("embedding test CA");
    let server = ca.leaf("server", &["localhost"]);
    let client = ca.leaf(agent_id, &[agent_id]);
    let server_tls = tls::server_config(
        server.cert.as_bytes(),
        server.key.as_bytes(),
        Some(ca.pem.cert.as_bytes()),
    )
    .unwrap();
    let keep = Arc::new(Keep::default());
    let listener = Listener::bind(
        "127.0.0.1:0".parse().unwrap(),
        ListenConfig::new(server_tls),
        keep.clone(),
    )
    .await
    .unwrap();
    let client_tls = tls::client_config(
        ca.pem.cert.as_bytes(),
        Some((client.cert.as_bytes(), client.key.as_bytes())),
    )
    .unwrap();
    let mut config = AgentConfig::new(
        vec![listener.local_addr().to_string()],
        client_tls,
        agent_id,
    );
    config.server_name = Some("localhost".into());
    config.sync_interval = Duration::from_millis(50);
    let agent = Agent::start(config, Only(port));
    Ends {
        listener,
        keep,
        agent,
    }
}

/// An echo backend on loopback.
async fn echo() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    port
}

#[tokio::test]
async fn a_stream_through_the_embedded_ends_carries_bytes_and_the_dialers_refusal_keeps_its_code() {
    let port = echo().await;
    let e = ends("node-1", port).await;
    assert!(e.agent.wait_connected(1, WAIT).await);
    let tunnel = e.keep.tunnel("node-1").expect("admitted and kept");
    let mut s = tunnel.dial("127.0.0.1", port, WAIT).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, b"hello");
    match tunnel.dial("127.0.0.1", port + 1, WAIT).await {
        Err(tether::DialError::Failed(e)) => assert_eq!(e.code, ErrorCode::DIAL_FORBIDDEN),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_admissions_refusal_is_the_agents_unauthorized_and_counted() {
    let e = ends("refused", 1).await;
    let unauthorized = || {
        e.agent
            .stats()
            .connect_failures()
            .into_iter()
            .find(|(s, _)| *s == Stage::Unauthorized)
            .map_or(0, |(_, n)| n)
    };
    assert!(
        tether::tasks::wait_until(WAIT, || unauthorized() > 0).await,
        "the agent counts its refusal as unauthorized"
    );
    assert_eq!(e.agent.connected(), 0);
    let refused = e.listener.stats().refused();
    assert!(
        refused
            .iter()
            .any(|(k, n)| *k == RefusalKind::Unauthorized && *n > 0),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_dropped_listener_frees_its_port_and_closes_its_tunnels() {
    let e = ends("node-1", 1).await;
    assert!(e.agent.wait_connected(1, WAIT).await);
    let tunnel = e.keep.tunnel("node-1").unwrap();
    let addr = e.listener.local_addr();
    drop(e.listener);
    tokio::time::timeout(WAIT, tunnel.closed())
        .await
        .expect("the server's end of the tunnel is closed");
    // The port is free again once the aborted accept loop has been dropped (bounded).
    let mut bound = None;
    for _ in 0..200 {
        if let Ok(l) = TcpListener::bind(addr).await {
            bound = Some(l);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(bound.is_some(), "{addr} is bound again after the drop");
    assert!(
        tether::tasks::wait_until(WAIT, || e.agent.connected() == 0).await,
        "the agent saw its tunnel end"
    );
}

#[tokio::test]
async fn a_dropped_agent_closes_its_tunnels() {
    let e = ends("node-1", 1).await;
    assert!(e.agent.wait_connected(1, WAIT).await);
    let tunnel = e.keep.tunnel("node-1").unwrap();
    drop(e.agent);
    tokio::time::timeout(WAIT, tunnel.closed())
        .await
        .expect("the server saw the agent's tunnel close");
}

#[tokio::test]
async fn each_half_of_a_stream_serves_a_task_of_its_own() {
    let port = echo().await;
    let e = ends("node-1", port).await;
    assert!(e.agent.wait_connected(1, WAIT).await);
    let tunnel = e.keep.tunnel("node-1").unwrap();
    let s = tunnel.dial("127.0.0.1", port, WAIT).await.unwrap();
    let (mut rx, mut tx) = s.into_split();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for c in sent.chunks(10_000) {
            tx.write_all(c).await.unwrap();
        }
        tx.shutdown().await.unwrap();
    });
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        rx.read_to_end(&mut got).await.unwrap();
        got
    });
    writer.await.unwrap();
    let got = tokio::time::timeout(WAIT, reader).await.unwrap().unwrap();
    assert_eq!(
        got, data,
        "every byte, in order, through both halves at once"
    );
    assert!(
        tether::tasks::wait_until(WAIT, || tunnel.streams_held() == 0).await,
        "both halves dropped: the stream is let go at the server end"
    );
}
