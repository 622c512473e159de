//! An agent told to stop (SIGTERM, as a DaemonSet rollout or a node drain does) keeps its node
//! reachable: it announces the drain (DRAINING, SPEC 7.4) and serves dials until a second
//! signal or its grace; the server sends new dials to other agents when it has one, and to the
//! draining one when it has none (Konnectivity's fallback to a draining backend).

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `signal` to process `pid`.
fn signal(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("kill runs")
        .success();
    assert!(ok, "kill -{signal} {pid}");
}

/// One echo through the CONNECT frontend; the status.
async fn echo_once(server: &tether_server::Server, backend: std::net::SocketAddr) -> u16 {
    let (status, _, mut s) = connect_tcp(server.connect_addr.unwrap(), &backend.to_string()).await;
    if status == 200 {
        s.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
    }
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigtermed_agent_keeps_its_node_reachable_and_others_are_preferred() {
    let pki = Pki::new();
    let dir = tempdir("drain-notice");
    let server = tether_server::Server::start(server_config(&pki))
        .await
        .unwrap();
    let backend = echo_backend().await;
    // Agent node-1: the binary, with a 3 s grace.
    let w = |n: &str, t: &str| {
        std::fs::write(dir.join(n), t).unwrap();
        dir.join(n).display().to_string()
    };
    let leaf = pki.ca.leaf("node-1", &["node-1"]);
    let (ca, cert, key) = (
        w("ca.crt", &pki.ca.pem.cert),
        w("a.crt", &leaf.cert),
        w("a.key", &leaf.key),
    );
    let one = Killed(
        Command::new(agent_bin())
            .args(["--ca-cert", &ca, "--agent-cert", &cert, "--agent-key", &key])
            .args(["--agent-id", "node-1", "--proxy-server-name", "localhost"])
            .args(["--proxy-server-host", "127.0.0.1"])
            .args(["--proxy-server-port", &server.agent_addr.port().to_string()])
            .args(["--allowed-destinations", &backend.to_string()])
            .args(["--drain-grace", "3s"])
            .env_remove("RUST_LOG")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Agent node-2, in process, with its own dial counter.
    let metrics = Arc::new(tether_agent::AgentMetrics::new());
    let two = tether_agent::Agent::start(tether_agent::AgentConfig {
        metrics: metrics.clone(),
        ..agent_config(&pki, server.agent_addr, "node-2")
    });
    assert!(server.wait_agents(2, WAIT).await);
    let dials_two = || {
        metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix("tether_agent_dials_total{result=\"ok\"} "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };

    // The first SIGTERM: node-1 announces its drain and goes on serving.
    signal(one.0.id(), "TERM");
    assert!(
        eventually(WAIT, || server.core().registry.draining_soon()
            == ["node-1"])
        .await,
        "the server heard node-1's notice"
    );
    // While node-2 is there, every new dial goes to it.
    let before = dials_two();
    for _ in 0..8 {
        assert_eq!(echo_once(&server, backend).await, 200);
    }
    assert_eq!(dials_two() - before, 8, "node-2 is preferred");
    // node-2 leaves: the draining node-1 is the only agent, and still carries dials.
    drop(two);
    assert!(eventually(WAIT, || server.core().registry.agent_ids() == ["node-1"]).await);
    for _ in 0..3 {
        assert_eq!(
            echo_once(&server, backend).await,
            200,
            "a draining agent is the fallback"
        );
    }
    at_rest(&server, &[]).await;
    // Its grace passes: GOAWAY, the agent exits, and then there is no agent at all.
    assert!(
        eventually(Duration::from_secs(15), || server
            .core()
            .registry
            .is_empty())
        .await,
        "node-1 drained after its grace"
    );
    assert_eq!(echo_once(&server, backend).await, 503);
    drop(one);
    let _ = std::fs::remove_dir_all(&dir);
}
