//! Konnectivity's own `proxy-agent` against tether's server (issue 28): built from source by
//! `../shared/konnectivity/build.sh target/konnectivity` (`.ci/run` does), found there or in
//! `KONNECTIVITY_BIN`. Without the binaries every test here prints that it is skipped, and
//! why, and passes: `.ci/run` builds them, so CI runs these for real.

mod common;

use std::time::Duration;

use common::konnectivity::{Auth, KonnAgent, konnectivity};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A server started with `cfg` and one Konnectivity agent (`node-1`, mTLS, serving `ip`,
/// with `extra` flags), registered.
async fn one_agent(
    bin: &std::path::Path,
    pki: &Pki,
    cfg: tether_server::ServerConfig,
    ip: &str,
    extra: &[&str],
) -> (tether_server::Server, KonnAgent) {
    let server = tether_server::Server::start(cfg).await.unwrap();
    let agent = KonnAgent::start(bin, pki, server.agent_addr, "node-1", ip, Auth::Cert, extra);
    assert!(
        server.wait_agents(1, WAIT).await,
        "the Konnectivity agent registered"
    );
    (server, agent)
}

/// CONNECTs to `target` through the server's CONNECT frontend.
async fn connect(
    server: &tether_server::Server,
    target: &str,
) -> (u16, String, tokio::net::TcpStream) {
    connect_tcp(server.connect_addr.expect("a CONNECT frontend"), target).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn konnectivity_agent_with_mtls_serves_dials_through_tether_server() {
    let Some(bin) = konnectivity() else { return };
    let pki = Pki::new();
    // Konnectivity's default id is a random UUID, which proves nothing: the tunnel is
    // registered under the name its certificate proves, which its host= claim must match.
    let (server, _agent) = one_agent(
        &bin,
        &pki,
        server_config(&pki),
        "127.0.0.2",
        &["--agent-id=5d0c8f6e-3b1a-4c2e-9f0a-7e6d5c4b3a21"],
    )
    .await;
    assert_eq!(server.core().registry.agent_ids(), vec!["node-1"]);

    // 64 MiB each way through an echo, every byte checked; the client closes once it has
    // them all (the agent has no half-close: a FIN closes the node's connection).
    let echo = echo_backend_on([127, 0, 0, 2]).await;
    let (status, head, mut s) = connect(&server, &echo.to_string()).await;
    assert_eq!(status, 200, "{head}");
    const N: usize = 64 << 20;
    let data = pattern(7, N);
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&data).await.unwrap();
    };
    let recv = async {
        let mut got = vec![0u8; N];
        r.read_exact(&mut got).await.unwrap();
        got
    };
    let ((), got) =
        tokio::time::timeout(Duration::from_secs(120), async { tokio::join!(send, recv) })
            .await
            .expect("64 MiB each way in time");
    assert!(got == data, "the bytes came back intact");
    drop(s);

    // A closed port is an error, in Go's words.
    let closed = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let (status, head, mut s) = connect(&server, &format!("127.0.0.2:{port}")).await;
    assert_eq!(status, 502, "{head}");
    let body = String::from_utf8_lossy(&read_to_end(&mut s).await.unwrap()).into_owned();
    assert!(body.contains("connect: connection refused"), "{head}{body}");

    at_rest(&server, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_given_up_before_the_agent_answers_leaves_no_connection_at_the_destination() {
    let Some(bin) = konnectivity() else { return };
    let pki = Pki::new();
    let mut cfg = server_config(&pki);
    cfg.dial_timeout = Duration::from_millis(300);
    let (server, _agent) = one_agent(&bin, &pki, cfg, "127.0.0.2", &[]).await;

    // A destination whose backlog is full: the agent's connect waits in SYN_SENT.
    let hole = tokio::net::TcpSocket::new_v4().unwrap();
    hole.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let hole = hole.listen(1).unwrap();
    let addr = hole.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(100),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            fillers.push(s.local_addr().unwrap());
        }
    }
    let (status, head, _) = connect(&server, &addr.to_string()).await;
    assert_eq!(status, 504, "the server gave up on the dial: {head}");

    // Now the destination takes connections: the agent's connect completes, its DIAL_RSP
    // comes after the dial was given up, and the server must close what it opened.
    let mut closed_by_agent = 0;
    let accepting = async {
        loop {
            let (mut s, peer) = hole.accept().await.unwrap();
            if fillers.contains(&peer) {
                continue;
            }
            let mut b = [0u8; 1];
            let n = tokio::time::timeout(WAIT, s.read(&mut b))
                .await
                .expect("the agent closes the late connection");
            assert!(
                matches!(n, Ok(0) | Err(_)),
                "nothing is sent on a given-up dial"
            );
            closed_by_agent += 1;
            return;
        }
    };
    tokio::time::timeout(Duration::from_secs(8), accepting)
        .await
        .expect("the agent's connect completed within its 5 s dial timeout");
    assert_eq!(closed_by_agent, 1);
    at_rest(&server, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_konnectivity_agent_killed_fails_its_streams_visibly_and_they_are_counted() {
    let Some(bin) = konnectivity() else { return };
    let pki = Pki::new();
    let (server, mut agent) = one_agent(&bin, &pki, server_config(&pki), "127.0.0.2", &[]).await;
    let echo = echo_backend_on([127, 0, 0, 2]).await;
    let (status, head, mut s) = connect(&server, &echo.to_string()).await;
    assert_eq!(status, 200, "{head}");
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut b))
        .await
        .unwrap()
        .unwrap();
    let failed = series(
        &server,
        "tether_connect_streams_failed_total{frontend=\"tcp\"}",
    );

    agent.proc.0.kill().unwrap();
    let _ = agent.proc.0.wait();
    let end = tokio::time::timeout(WAIT, s.read(&mut b))
        .await
        .expect("the stream ends");
    assert!(
        end.is_err(),
        "a stream cut by its agent's death is an error, never a clean end: {end:?}"
    );
    assert!(
        server.wait_agents_at_most(0, WAIT).await,
        "the agent is gone from routing"
    );
    assert!(
        eventually(WAIT, || series(
            &server,
            "tether_connect_streams_failed_total{frontend=\"tcp\"}"
        ) > failed)
        .await,
        "the failed stream is counted"
    );
    at_rest(&server, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_konnectivity_agent_finishes_its_streams_while_new_dials_go_to_another() {
    let Some(bin) = konnectivity() else { return };
    let pki = Pki::new();
    let (server, old) = one_agent(&bin, &pki, server_config(&pki), "127.0.0.2", &[]).await;
    let echo = echo_backend_on([127, 0, 0, 2]).await;
    let (status, head, mut open) = connect(&server, &echo.to_string()).await;
    assert_eq!(status, 200, "{head}");

    // A second agent for the same node (a surge rollout), then SIGTERM to the first.
    let _new = KonnAgent::start(
        &bin,
        &pki,
        server.agent_addr,
        "node-1b",
        "127.0.0.2",
        Auth::Cert,
        &[],
    );
    assert!(server.wait_agents(2, WAIT).await);
    old.signal("-TERM");
    let drained = "tether_open_streams{agent_id=\"node-1\"}";
    // New dials go to the agent that is not draining, once the DRAIN has arrived.
    let mut held = Vec::new();
    let moved = eventually_some(WAIT, || {
        let server = &server;
        async move {
            let (status, _, s) = connect(server, &echo.to_string()).await;
            assert_eq!(status, 200);
            let on_new = series(server, "tether_open_streams{agent_id=\"node-1b\"}");
            (on_new >= 1.0).then_some(s)
        }
    })
    .await;
    held.push(moved.expect("a dial served by the agent that is not draining"));
    for _ in 0..5 {
        let (status, _, s) = connect(&server, &echo.to_string()).await;
        assert_eq!(status, 200);
        held.push(s);
    }
    assert!(
        eventually(WAIT, || series(&server, drained) == 1.0).await,
        "no new stream on the draining agent: {}",
        series(&server, drained)
    );
    // The stream it already had still works.
    open.write_all(b"still here").await.unwrap();
    let mut b = [0u8; 10];
    tokio::time::timeout(WAIT, open.read_exact(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&b, b"still here");
    drop((open, held));
    at_rest(&server, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn konnectivitys_test_client_reaches_its_test_server_through_its_agent_and_tether() {
    let Some(bin) = konnectivity() else { return };
    let pki = Pki::new();
    let dir = tempdir("konn-client");
    let (connect_uds, grpc_uds) = (dir.join("connect.socket"), dir.join("grpc.socket"));
    let mut cfg = server_config(&pki);
    cfg.uds_path = Some(connect_uds.clone());
    cfg.grpc_uds_path = Some(grpc_uds.clone());
    // Konnectivity's test server listens on 127.0.0.1 only: this agent serves that address.
    let (server, _agent) = one_agent(&bin, &pki, cfg, "127.0.0.1", &[]).await;
    let port = free_port();
    let _backend = Killed(
        std::process::Command::new(bin.join("test-server"))
            .arg(format!("--server-port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(
        eventually(WAIT, || std::net::TcpStream::connect(("127.0.0.1", port))
            .is_ok())
        .await,
        "the test server listens"
    );
    for (mode, uds) in [("grpc", &grpc_uds), ("http-connect", &connect_uds)] {
        let args = [
            format!("--mode={mode}"),
            format!("--proxy-uds={}", uds.display()),
            "--proxy-host=".into(),
            "--proxy-port=0".into(),
            "--request-host=127.0.0.1".into(),
            format!("--request-port={port}"),
            "--request-path=success".into(),
            "--test-requests=3".into(),
        ];
        let client = bin.join("test-client");
        let run = tokio::task::spawn_blocking(move || {
            std::process::Command::new(client).args(args).output()
        });
        let out = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("test-client ends")
            .unwrap()
            .unwrap();
        assert!(
            out.status.success(),
            "test-client --mode={mode}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    at_rest(&server, &[]).await;
}

/// What the rollout's client saw.
#[derive(Default, Debug)]
struct Seen {
    dials: u64,
    failed: Vec<String>,
}

/// One dial to `node`'s echo with a 1 KiB round trip; `Err` says what failed.
async fn dial_once(
    connect_addr: std::net::SocketAddr,
    echo: std::net::SocketAddr,
) -> Result<(), String> {
    let once = async {
        let (status, head, mut s) = connect_tcp(connect_addr, &echo.to_string()).await;
        if status != 200 {
            return Err(format!(
                "{echo}: {}",
                head.lines().next().unwrap_or_default()
            ));
        }
        let data = pattern(u64::from(echo.port()), 1024);
        s.write_all(&data)
            .await
            .map_err(|e| format!("{echo}: write: {e}"))?;
        let mut got = vec![0u8; 1024];
        s.read_exact(&mut got)
            .await
            .map_err(|e| format!("{echo}: read: {e}"))?;
        if got != data {
            return Err(format!("{echo}: bytes differ"));
        }
        Ok(())
    };
    tokio::time::timeout(WAIT, once)
        .await
        .unwrap_or_else(|_| Err(format!("{echo}: timed out")))
}

/// A stream held open on `echo`, echoing a few bytes every 50 ms until `stop`; whether it
/// was interrupted.
async fn held_stream(
    connect_addr: std::net::SocketAddr,
    echo: std::net::SocketAddr,
    stop: tokio::sync::watch::Receiver<bool>,
) -> bool {
    let (status, _, mut s) = connect_tcp(connect_addr, &echo.to_string()).await;
    assert_eq!(status, 200);
    for _ in 0..10_000 {
        if *stop.borrow() {
            return false;
        }
        let mut b = [0u8; 4];
        let ok = s.write_all(b"beat").await.is_ok()
            && matches!(
                tokio::time::timeout(WAIT, s.read_exact(&mut b)).await,
                Ok(Ok(_))
            );
        if !ok {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Issue 28, item 3: three nodes served by Konnectivity agents are moved, one at a time, to
/// tether agents in a surge rollout (the new agent up, then the old one SIGTERM, then, after
/// its grace, SIGKILL as the kubelet does), while a client dials every node without pause.
/// Routing is by destination only (`destHost`), so each dial must reach its own node's agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_surge_rollout_from_konnectivity_agents_to_tether_agents_fails_no_dial() {
    // Konnectivity's default agent id is a random UUID: another id than the tether agent's.
    rollout("distinct agent ids").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_surge_rollout_where_both_agents_use_the_node_name_as_id_fails_no_dial() {
    // `--agent-id=$(NODE_NAME)` on both: the newer tunnel of an id replaces the older.
    rollout("the node name as both agents' id").await;
}

async fn rollout(ids: &str) {
    let Some(bin) = konnectivity() else { return };
    let same_ids = ids.starts_with("the node name");
    let pki = Pki::new();
    let mut cfg = server_config(&pki);
    cfg.strategies = vec![tether_server::Strategy::DestHost];
    let server = tether_server::Server::start(cfg).await.unwrap();
    let connect_addr = server.connect_addr.unwrap();
    let nodes: Vec<(String, [u8; 4])> = (2..=4u8)
        .map(|i| (format!("node-{i}"), [127, 0, 0, i]))
        .collect();
    let mut echoes = Vec::new();
    let mut old = Vec::new();
    for (name, ip) in &nodes {
        echoes.push(echo_backend_on(*ip).await);
        let ip = std::net::Ipv4Addr::from(*ip).to_string();
        old.push(Some(KonnAgent::start(
            &bin,
            &pki,
            server.agent_addr,
            &if same_ids {
                name.clone()
            } else {
                format!("konnectivity-{name}")
            },
            &ip,
            Auth::Cert,
            &[],
        )));
    }
    assert!(
        server.wait_agents(3, WAIT).await,
        "three Konnectivity agents"
    );

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let held: Vec<_> = echoes
        .iter()
        .map(|e| tokio::spawn(held_stream(connect_addr, *e, stop.clone())))
        .collect();
    let client = {
        let (echoes, stop) = (echoes.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen = Seen::default();
            while !*stop.borrow() && seen.dials < 100_000 {
                for e in &echoes {
                    seen.dials += 1;
                    if let Err(why) = dial_once(connect_addr, *e).await {
                        seen.failed.push(why);
                    }
                }
            }
            seen
        })
    };

    let started = std::time::Instant::now();
    let mut new = Vec::new();
    for (i, (name, ip)) in nodes.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        // maxSurge: the new pod first; Ready once its tunnel is up.
        let mut cfg = agent_config(&pki, server.agent_addr, name);
        cfg.identifiers
            .push(tether_proto::frame::Identifier::Ipv4((*ip).into()));
        new.push(tether_agent::Agent::start(cfg));
        assert!(
            server.wait_agents(4, WAIT).await,
            "{name}'s tether agent is up"
        );
        // Then the old pod: SIGTERM (its DRAIN), and SIGKILL once its grace is over.
        let k = old[i].take().unwrap();
        k.signal("-TERM");
        // The pod's grace (terminationGracePeriodSeconds), not a wait for anything.
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(k);
        assert!(
            server.wait_agents_at_most(3, WAIT).await,
            "{name}'s Konnectivity agent is gone"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let took = started.elapsed();
    stop_tx.send(true).unwrap();
    let seen = client.await.unwrap();
    let mut interrupted = 0;
    for h in held {
        interrupted += usize::from(h.await.unwrap());
    }
    let report = format!(
        "rollout ({ids}): 3 nodes moved from Konnectivity agents to tether agents in {:.1} s; {} dials, {} failed; {interrupted} of 3 streams held across it interrupted (each was on an old agent, ended by its SIGKILL){}",
        took.as_secs_f64(),
        seen.dials,
        seen.failed.len(),
        if seen.failed.is_empty() {
            String::new()
        } else {
            format!("; failures: {:?}", &seen.failed[..seen.failed.len().min(5)])
        }
    );
    eprintln!("{report}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tmp");
    let _ = std::fs::create_dir_all(&out);
    let file = out.join(format!(
        "rollout-{}.txt",
        if same_ids { "same-ids" } else { "distinct-ids" }
    ));
    let _ = std::fs::write(file, format!("{report}\n"));
    assert!(seen.dials > 30, "the client kept dialling: {report}");
    assert!(seen.failed.is_empty(), "{report}");
    let agents: Vec<&tether_agent::Agent> = new.iter().collect();
    at_rest(&server, &agents).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_only_konnectivity_agent_of_a_node_keeps_serving_it_after_its_drain() {
    let Some(bin) = konnectivity() else { return };
    let pki = Pki::new();
    let (server, agent) = one_agent(&bin, &pki, server_config(&pki), "127.0.0.2", &[]).await;
    let echo = echo_backend_on([127, 0, 0, 2]).await;
    agent.signal("-TERM");
    // Once the DRAIN has arrived (the tunnel is marked), dials still go to it: no other
    // agent serves the node.
    assert!(
        eventually(WAIT, || server
            .core()
            .registry
            .draining_soon()
            .contains(&"node-1".to_owned()))
        .await,
        "the DRAIN arrived"
    );
    for _ in 0..5 {
        assert!(dial_once(server.connect_addr.unwrap(), echo).await.is_ok());
    }
    at_rest(&server, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_konnectivity_agent_behind_a_balancer_holds_one_tunnel_to_each_server() {
    let Some(bin) = konnectivity() else { return };
    let pki = Pki::new();
    let mut servers = Vec::new();
    for i in 1..=2 {
        let cfg = tether_server::ServerConfig {
            server_id: format!("server-{i}"),
            server_count: 2,
            ..server_config(&pki)
        };
        servers.push(tether_server::Server::start(cfg).await.unwrap());
    }
    let lb = balancer(servers.iter().map(|s| s.agent_addr).collect()).await;
    let _agent = KonnAgent::start(&bin, &pki, lb.addr, "node-1", "127.0.0.2", Auth::Cert, &[]);
    for s in &servers {
        assert!(
            s.wait_agents(1, WAIT).await,
            "the agent reached every server"
        );
    }
    // One usable tunnel at each (servercount 2): a second call to a server it has is closed
    // by the agent before it counts (KONNECTIVITY_SETTLE), so none is registered twice.
    for s in &servers {
        assert_eq!(
            s.core().registry.usable_of("node-1"),
            1,
            "one tunnel at each server"
        );
    }
}
