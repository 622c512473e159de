//! High availability as Kubernetes runs it: three server replicas with `--server-count 3`
//! behind one address (a round-robin TCP load balancer, as HAProxy or a Service), agents that
//! reach all three through it. One replica is killed under load: only the streams it carried
//! fail, and visibly; dials go on through the other two at once; the agents restore the third
//! tunnel when it returns.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tether::agent::Agent;
use tether::server::{Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn replica(pki: &Pki, id: &str, agent_addr: SocketAddr) -> ServerConfig {
    ServerConfig {
        server_id: id.into(),
        server_count: 3,
        // As the binary sets it: one tunnel per agent per replica, and room for the duplicate
        // an agent opens (and then closes) when the balancer sends it to a replica it holds.
        max_tunnels_per_agent: 3,
        agent_addr,
        ..server_config(pki)
    }
}

/// An echo stream through `frontend` that has moved one round trip.
async fn echo_stream(frontend: SocketAddr, backend: SocketAddr) -> TcpStream {
    let (status, head, mut s) = connect_tcp(frontend, &backend.to_string()).await;
    assert_eq!(status, 200, "{head}");
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.unwrap();
    s
}

/// Whether a stream still echoes.
async fn still_echoes(s: &mut TcpStream) -> bool {
    if s.write_all(b"pong").await.is_err() {
        return false;
    }
    let mut b = [0u8; 4];
    matches!(
        tokio::time::timeout(WAIT, s.read_exact(&mut b)).await,
        Ok(Ok(_)) if &b == b"pong"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_killed_under_load_fails_only_its_streams_and_comes_back() {
    let pki = Pki::new();
    // Fixed agent ports, so the killed replica comes back where the balancer expects it.
    let ports: Vec<SocketAddr> = (0..3)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        })
        .collect();
    let mut servers = Vec::new();
    for (i, addr) in ports.iter().enumerate() {
        servers.push(Some(
            Server::start(replica(&pki, &format!("server-{i}"), *addr))
                .await
                .unwrap(),
        ));
    }
    let lb = balancer(ports.clone()).await;
    let agents: Vec<Agent> = ["agent-1", "agent-2"]
        .iter()
        .map(|id| Agent::start(agent_config(&pki, lb.addr, id)))
        .collect();
    // Through one address, every agent finds all three replicas.
    for s in servers.iter().flatten() {
        assert!(s.wait_agents(2, WAIT * 2).await, "a replica lacks an agent");
    }
    for a in &agents {
        assert!(a.wait_connected(3, WAIT).await);
    }
    let backend = echo_backend().await;
    let frontends: Vec<SocketAddr> = servers
        .iter()
        .flatten()
        .map(|s| s.connect_addr.unwrap())
        .collect();
    // Load: four open streams through each replica (as each kube-apiserver uses its own).
    let mut streams: Vec<(usize, TcpStream)> = Vec::new();
    for (i, f) in frontends.iter().enumerate() {
        for _ in 0..4 {
            streams.push((i, echo_stream(*f, backend).await));
        }
    }
    // Replica 1 dies.
    servers[1].take().unwrap().shutdown(Duration::ZERO).await;
    // Its streams fail, visibly (an error or a reset, not an echo); the others carry on.
    for (i, s) in &mut streams {
        let echoed = still_echoes(s).await;
        assert_eq!(echoed, *i != 1, "a stream through replica {i}");
    }
    // New dials through the two left succeed at once, with no wait for a reconnect.
    for f in [frontends[0], frontends[2]] {
        for _ in 0..10 {
            let mut s = echo_stream(f, backend).await;
            assert!(still_echoes(&mut s).await);
        }
    }
    for a in &agents {
        assert!(a.wait_connected(2, WAIT).await);
    }
    // The replica returns on its port; the agents find it through the balancer again.
    servers[1] = Some(
        Server::start(replica(&pki, "server-1", ports[1]))
            .await
            .unwrap(),
    );
    assert!(
        servers[1].as_ref().unwrap().wait_agents(2, WAIT * 2).await,
        "the agents did not come back to the restarted replica"
    );
    for a in &agents {
        assert!(a.wait_connected(3, WAIT).await);
    }
    let back = servers[1].as_ref().unwrap().connect_addr.unwrap();
    let mut s = echo_stream(back, backend).await;
    assert!(still_echoes(&mut s).await);
    // Each replica settles at exactly one tunnel per agent: no duplicates piled up.
    for s in servers.iter().flatten() {
        assert!(eventually(WAIT, || s.agents() == 2).await, "{}", s.agents());
    }
}
