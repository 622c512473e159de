//! Running in a cluster, tested without one: service-account agents reviewed by a local
//! HTTPS server that speaks the real TokenReview JSON, server leases counted, and the flags of
//! Konnectivity's manifests accepted. Every wait is bounded.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use clap::Parser;
use common::fakekube::{FakeKube, Review};
use common::*;
use serde_json::json;
use std::sync::Arc;

use tether_agent::cli::AgentArgs;
use tether_agent::{Agent, AgentConfig, AgentMetrics};
use tether_ops::kube::{Client, KubeConfig};
use tether_ops::lease::{LeaseController, LeaseSettings, count_leases, micro_time, parse_labels};
use tether_proto::frame::Identifier;
use tether_server::cli::ServerArgs;

const SA: &str = "system:serviceaccount:kube-system:konnectivity-agent";

/// The server's certificate and key in `dir`, for flags.
fn server_files(pki: &Pki, dir: &Path) -> (String, String) {
    let (c, k) = (dir.join("server.crt"), dir.join("server.key"));
    std::fs::write(&c, &pki.server.cert).unwrap();
    std::fs::write(&k, &pki.server.key).unwrap();
    (c.display().to_string(), k.display().to_string())
}

/// An agent that authenticates with a token only (no client certificate), as Konnectivity's
/// service-account agents do; with its own metrics, to see why it is refused.
fn token_agent(
    pki: &Pki,
    server: std::net::SocketAddr,
    id: &str,
    dir: &Path,
    token: &str,
) -> (Agent, Arc<AgentMetrics>) {
    token_agent_claiming(pki, server, id, dir, token, vec![])
}

fn token_agent_claiming(
    pki: &Pki,
    server: std::net::SocketAddr,
    id: &str,
    dir: &Path,
    token: &str,
    claims: Vec<Identifier>,
) -> (Agent, Arc<AgentMetrics>) {
    let path = dir.join(format!("token-{id}-{token}"));
    std::fs::write(&path, token).unwrap();
    let metrics = Arc::new(AgentMetrics::new());
    let mut cfg = AgentConfig {
        tls: tether::tls::client_config(pki.ca_pem(), None)
            .unwrap()
            .into(),
        token_path: Some(path),
        metrics: metrics.clone(),
        ..agent_config(pki, server, id)
    };
    cfg.identifiers.extend(claims);
    (Agent::start(cfg), metrics)
}

/// Whether `m` has counted a tunnel refused as unauthorized.
fn unauthorized(m: &AgentMetrics) -> bool {
    m.render()
        .contains("tether_agent_connect_failures_total{reason=\"unauthorized\"}")
}

async fn reviewing_server(pki: &Pki, kube: &FakeKube, dir: &Path) -> tether_server::cli::Running {
    reviewing_server_with(pki, kube, dir, &[]).await
}

async fn reviewing_server_with(
    pki: &Pki,
    kube: &FakeKube,
    dir: &Path,
    extra: &[&str],
) -> tether_server::cli::Running {
    let (cert, key) = server_files(pki, dir);
    let kubeconfig = kube.kubeconfig(dir);
    let mut argv: Vec<String> = [
        "tether-server",
        "--cluster-cert",
        &cert,
        "--cluster-key",
        &key,
        "--agent-bind-address",
        "127.0.0.1",
        "--agent-port",
        "0",
        "--server-port",
        "0",
        "--health-port",
        "0",
        "--agent-namespace",
        "kube-system",
        "--agent-service-account",
        "konnectivity-agent",
        "--authentication-audience",
        "system:konnectivity-server",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--token-review-timeout",
        "1s",
        "--handshake-timeout",
        "5s",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    argv.extend(extra.iter().map(|s| (*s).to_owned()));
    ServerArgs::try_parse_from(argv)
        .unwrap()
        .start()
        .await
        .unwrap()
}

fn ok(node: &str) -> Review {
    Review::Ok {
        username: SA.into(),
        pod: Some(format!("konnectivity-agent-{node}")),
        node: Some(node.into()),
    }
}

fn refused(server: &tether_server::Server) -> String {
    server
        .core()
        .render_metrics()
        .lines()
        .find(|l| l.starts_with("tether_agents_refused_total{reason=\"unauthorized\"}"))
        .unwrap_or("none")
        .to_owned()
}

#[tokio::test]
async fn service_account_tokens_are_reviewed_and_bind_the_agent_to_its_node() {
    let pki = Pki::new();
    let kube = FakeKube::start().await;
    kube.review("good-1", ok("node-1"));
    kube.review(
        "other-sa",
        Review::Ok {
            username: "system:serviceaccount:default:intruder".into(),
            pod: Some("p".into()),
            node: Some("node-3".into()),
        },
    );
    kube.review("expired", Review::No("token has expired".into()));
    let dir = tempdir("review");
    let running = reviewing_server(&pki, &kube, &dir).await;
    let server = &running.server;

    let (good, _) = token_agent(&pki, server.agent_addr, "node-1", &dir, "good-1");
    assert!(
        server.wait_agents(1, WAIT).await,
        "the reviewed agent is in"
    );
    assert_eq!(server.core().registry.agent_ids(), vec!["node-1"]);

    // A good token used to claim another node; another service account; a token the API
    // server does not authenticate; a token it has never seen. Each agent sees itself refused.
    let refused_agents = [
        token_agent(&pki, server.agent_addr, "node-2", &dir, "good-1"),
        token_agent(&pki, server.agent_addr, "node-3", &dir, "other-sa"),
        token_agent(&pki, server.agent_addr, "node-4", &dir, "expired"),
        token_agent(&pki, server.agent_addr, "node-5", &dir, "nobody"),
    ];
    for (i, (_, m)) in refused_agents.iter().enumerate() {
        let seen = eventually(WAIT, || unauthorized(m)).await;
        assert!(seen, "agent {i} is refused as unauthorized: {}", m.render());
    }
    assert_eq!(server.core().registry.agent_ids(), vec!["node-1"]);
    assert!(refused(server) != "none", "the server counts them");
    let mut agents = vec![&good];
    agents.extend(refused_agents.iter().map(|(a, _)| a));
    at_rest(server, &agents).await;
}

#[tokio::test]
async fn a_slow_or_failing_api_server_refuses_that_agent_and_never_blocks_the_others() {
    let pki = Pki::new();
    let kube = FakeKube::start().await;
    kube.review("slow", Review::Slow);
    kube.review("fail", Review::Fail);
    kube.review("good-1", ok("node-1"));
    let dir = tempdir("slow");
    let running = reviewing_server(&pki, &kube, &dir).await;
    let server = &running.server;
    // More agents whose reviews hang than reviews may run at once, and one whose review
    // fails, first.
    let slow: Vec<(Agent, Arc<AgentMetrics>)> = (0..tether_server::review::MAX_IN_FLIGHT + 8)
        .map(|i| token_agent(&pki, server.agent_addr, &format!("slow-{i}"), &dir, "slow"))
        .collect();
    let (fail, fail_metrics) = token_agent(&pki, server.agent_addr, "node-9", &dir, "fail");
    let (good, _) = token_agent(&pki, server.agent_addr, "node-1", &dir, "good-1");
    assert!(
        server.wait_agents(1, WAIT).await,
        "the good agent gets in while others hang"
    );
    assert_eq!(server.core().registry.agent_ids(), vec!["node-1"]);
    // The hung reviews end at --token-review-timeout (1 s), queued ones included, as
    // refusals, well before the handshake deadline (5 s); the failing one is refused too.
    assert!(eventually(WAIT, || unauthorized(&fail_metrics)).await);
    for (i, (_, m)) in slow.iter().enumerate() {
        assert!(
            eventually(WAIT, || unauthorized(m)).await,
            "slow agent {i}: {}",
            m.render()
        );
    }
    // Nothing is left holding a handshake slot once they are all refused.
    let slots = |s: &tether_server::Server| {
        s.core()
            .render_metrics()
            .lines()
            .find_map(|l| l.strip_prefix("tether_agent_handshakes "))
            .and_then(|v| v.trim().parse::<i64>().ok())
            .unwrap_or(-1)
    };
    drop(slow);
    assert!(
        eventually(WAIT, || slots(server) == 0).await,
        "handshake slots freed: {}",
        slots(server)
    );
    at_rest(server, &[&fail, &good]).await;
}

#[tokio::test]
async fn positive_reviews_are_cached_and_the_agent_rereads_its_rotated_token() {
    let pki = Pki::new();
    let kube = FakeKube::start().await;
    kube.review("token-v1", ok("node-1"));
    kube.review("token-v2", ok("node-1"));
    let dir = tempdir("cache");
    let running = reviewing_server(&pki, &kube, &dir).await;
    let server = &running.server;
    let token_file = dir.join("projected-token");
    std::fs::write(&token_file, "token-v1").unwrap();
    let cfg = AgentConfig {
        tls: tether::tls::client_config(pki.ca_pem(), None)
            .unwrap()
            .into(),
        token_path: Some(token_file.clone()),
        ..agent_config(&pki, server.agent_addr, "node-1")
    };
    let agent = Agent::start(cfg);
    assert!(server.wait_agents(1, WAIT).await);
    assert_eq!(kube.review_calls(), 1);
    // The tunnel drops; the agent comes back with the same token: the cached review serves.
    for t in server.core().registry.tunnels() {
        t.close(tether_proto::ErrorCode::NO_ERROR, "test: reconnect");
    }
    assert!(server.wait_agents_at_most(0, WAIT).await);
    assert!(server.wait_agents(1, WAIT).await);
    assert_eq!(
        kube.review_calls(),
        1,
        "a cached review is not asked for again"
    );
    // kubelet rotates the projected token; the next connection carries the new one.
    std::fs::write(&token_file, "token-v2").unwrap();
    for t in server.core().registry.tunnels() {
        t.close(tether_proto::ErrorCode::NO_ERROR, "test: reconnect");
    }
    assert!(server.wait_agents_at_most(0, WAIT).await);
    assert!(server.wait_agents(1, WAIT).await);
    assert_eq!(kube.review_calls(), 2, "the rotated token was reviewed");
    at_rest(server, &[&agent]).await;
}

fn settings(holder: &str) -> LeaseSettings {
    LeaseSettings {
        namespace: "kube-system".into(),
        holder: holder.into(),
        labels: parse_labels("k8s-app=konnectivity-server").unwrap(),
        duration: Duration::from_secs(30),
        renew_every: Duration::from_millis(100),
    }
}

#[tokio::test]
async fn server_leases_are_held_counted_collected_and_released() {
    let kube = FakeKube::start().await;
    let dir = tempdir("lease");
    let client = || {
        Client::new(
            KubeConfig::from_kubeconfig(&kube.kubeconfig(&dir)).unwrap(),
            Duration::from_secs(5),
        )
    };
    // A server that died an hour ago, and a lease of something else.
    let hour_ago = micro_time(SystemTime::now() - Duration::from_secs(3600));
    kube.put_lease(
        "konnectivity-proxy-server-dead",
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": "konnectivity-proxy-server-dead", "namespace": "kube-system",
                            "labels": {"k8s-app": "konnectivity-server"}, "resourceVersion": "1"},
               "spec": {"holderIdentity": "dead", "leaseDurationSeconds": 30, "renewTime": hour_ago}}),
    );
    kube.put_lease(
        "kube-scheduler",
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": "kube-scheduler", "namespace": "kube-system", "resourceVersion": "2"},
               "spec": {"holderIdentity": "x", "leaseDurationSeconds": 15, "renewTime": micro_time(SystemTime::now())}}),
    );
    let (a, mut count_a) = LeaseController::start(client(), settings("a"), 1);
    let (b, _) = LeaseController::start(client(), settings("b"), 1);
    let (task, mut agents_count) = count_leases(
        client(),
        "kube-system".into(),
        "k8s-app=konnectivity-server".into(),
        Duration::from_millis(100),
    );
    let two = tokio::time::timeout(WAIT, agents_count.wait_for(|c| *c == 2))
        .await
        .is_ok();
    assert!(two, "the agent counts two live servers");
    let seen = tokio::time::timeout(WAIT, count_a.wait_for(|c| *c == 2))
        .await
        .is_ok();
    assert!(seen, "the servers count each other");
    let names = kube.lease_names();
    assert!(
        !names.contains(&"konnectivity-proxy-server-dead".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"kube-scheduler".to_owned()),
        "other leases are left alone"
    );
    assert!(
        names.contains(&"konnectivity-proxy-server-a".to_owned()),
        "{names:?}"
    );
    // A drained server gives its lease up at once.
    b.release().await;
    let one = tokio::time::timeout(WAIT, agents_count.wait_for(|c| *c == 1))
        .await
        .is_ok();
    assert!(one, "the agent counts one server after a release");
    drop(a);
    task.abort();
}

#[tokio::test]
async fn konnectivitys_manifest_flags_are_accepted_with_a_notice() {
    let server = ServerArgs::try_parse_from([
        "proxy-server",
        "--logtostderr=true",
        "--log-file=/var/log/konnectivity-server.log",
        "--alsologtostderr",
        "--log-file-max-size=0",
        "--v=4",
        "--uds-name=/etc/kubernetes/konnectivity-server/konnectivity-server.socket",
        "--delete-existing-uds-file",
        "--cluster-cert=/etc/kubernetes/pki/apiserver.crt",
        "--cluster-key=/etc/kubernetes/pki/apiserver.key",
        "--mode=http-connect",
        "--server-port=0",
        "--agent-port=8132",
        "--admin-port=8133",
        "--health-port=8134",
        "--agent-namespace=kube-system",
        "--agent-service-account=konnectivity-agent",
        "--kubeconfig=/etc/kubernetes/konnectivity-server.conf",
        "--authentication-audience=system:konnectivity-server",
        "--keepalive-time=1h",
        "--enable-profiling",
        "--xfr-channel-size=10",
        "--agent-bind-address=",
    ])
    .unwrap();
    assert!(
        server.agent_bind_address.is_unspecified(),
        "empty: every interface"
    );
    assert_eq!(server.log.level(), "debug", "--v=4 is debug");
    let n = server.notices();
    assert!(n.iter().any(|n| n.contains("--logtostderr")), "{n:?}");
    assert!(n.iter().any(|n| n.contains("--enable-profiling")), "{n:?}");
    let agent = AgentArgs::try_parse_from([
        "proxy-agent",
        "--logtostderr=true",
        "--ca-cert=/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
        "--proxy-server-host=konnectivity-server.kube-system",
        "--proxy-server-port=8132",
        "--admin-server-port=8133",
        "--health-server-port=8134",
        "--service-account-token-path=/var/run/secrets/tokens/konnectivity-agent-token",
        "--agent-identifiers=host=node-1",
        "--sync-forever",
        "--probe-interval=1s",
    ])
    .unwrap();
    assert_eq!(agent.health_server_port, 8134);
    assert!(agent.notices().iter().any(|n| n.contains("--sync-forever")));
    // A flag neither binary has is still an error.
    assert!(
        ServerArgs::try_parse_from(["s", "--cluster-cert=a", "--cluster-key=b", "--no-such-flag"])
            .is_err()
    );
}

#[tokio::test]
async fn responses_framed_by_length_by_chunks_or_by_the_close_all_decode() {
    use common::fakekube::Framing;
    let kube = FakeKube::start().await;
    kube.review("good-1", ok("node-1"));
    kube.review(
        "elsewhere",
        Review::OtherAudience {
            username: SA.into(),
        },
    );
    let dir = tempdir("framing");
    let client = Client::new(
        KubeConfig::from_kubeconfig(&kube.kubeconfig(&dir)).unwrap(),
        Duration::from_secs(5),
    );
    for framing in [Framing::Chunked, Framing::Length, Framing::Close] {
        kube.framing(framing);
        let r = client
            .review_token("good-1", "system:konnectivity-server", SA)
            .await;
        assert_eq!(
            r.map(|r| r.node_name),
            Ok(Some("node-1".to_owned())),
            "{framing:?}"
        );
    }
    // Authenticated, but for another audience than the one asked for: refused.
    let wrong = client
        .review_token("elsewhere", "system:konnectivity-server", SA)
        .await;
    assert!(
        matches!(&wrong, Err(tether_ops::kube::ReviewError::Wrong(e)) if e.contains("audience")),
        "{wrong:?}"
    );
}

#[tokio::test]
async fn with_node_address_rules_an_agent_claims_only_its_own_nodes_addresses() {
    let pki = Pki::new();
    let kube = FakeKube::start().await;
    kube.review("t1", ok("node-1"));
    kube.review("t2", ok("node-2"));
    kube.node("node-1", &["10.0.0.5"]);
    kube.node("node-2", &["10.0.0.6"]);
    let dir = tempdir("node-addr");
    let running =
        reviewing_server_with(&pki, &kube, &dir, &["--address-identifiers", "node"]).await;
    let server = &running.server;
    let ip = |a: &str| Identifier::Ipv4(a.parse().unwrap());
    let (one, _) = token_agent_claiming(
        &pki,
        server.agent_addr,
        "node-1",
        &dir,
        "t1",
        vec![ip("10.0.0.5")],
    );
    assert!(server.wait_agents(1, WAIT).await, "its own node's address");
    // node-2's agent claims node-1's address, as a compromised node would to take its
    // kubelet traffic.
    let (two, m) = token_agent_claiming(
        &pki,
        server.agent_addr,
        "node-2",
        &dir,
        "t2",
        vec![ip("10.0.0.5")],
    );
    assert!(
        eventually(WAIT, || unauthorized(&m)).await,
        "{}",
        m.render()
    );
    assert_eq!(server.core().registry.agent_ids(), vec!["node-1"]);
    at_rest(server, &[&one, &two]).await;
}

/// Refusals of `reason` the server counted.
fn refusals(server: &tether_server::Server, reason: &str) -> u64 {
    let prefix = format!("tether_agents_refused_total{{reason=\"{reason}\"}} ");
    server
        .core()
        .render_metrics()
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn an_address_two_nodes_claim_is_never_split_between_their_agents() {
    let pki = Pki::new();
    let kube = FakeKube::start().await;
    kube.review("t1", ok("node-1"));
    kube.review("t2", ok("node-2"));
    // node-2 wrote node-1's address into its own Node status, as a compromised kubelet can.
    kube.node("node-1", &["10.0.0.5"]);
    kube.node("node-2", &["10.0.0.6", "10.0.0.5"]);
    let dir = tempdir("addr-split");
    let running =
        reviewing_server_with(&pki, &kube, &dir, &["--address-identifiers", "node"]).await;
    let server = &running.server;
    let ip = |a: &str| Identifier::Ipv4(a.parse().unwrap());
    let one = token_agent_claiming(
        &pki,
        server.agent_addr,
        "node-1",
        &dir,
        "t1",
        vec![ip("10.0.0.5")],
    );
    assert!(server.wait_agents(1, WAIT).await);
    let (two, m) = token_agent_claiming(
        &pki,
        server.agent_addr,
        "node-2",
        &dir,
        "t2",
        vec![ip("10.0.0.6"), ip("10.0.0.5")],
    );
    assert!(
        eventually(WAIT, || refusals(server, "conflict") > 0).await,
        "{}",
        server.core().render_metrics()
    );
    assert!(unauthorized(&m), "{}", m.render());
    assert_eq!(server.core().registry.agent_ids(), vec!["node-1"]);
    for _ in 0..20 {
        let (_, to) = server
            .core()
            .registry
            .route("10.0.0.5", &[tether_server::Strategy::DestHost])
            .unwrap();
        assert_eq!(&*to, "node-1", "every dial to the address goes to its node");
    }
    // Once node-1's tunnel is gone, the address is free for the next holder.
    drop(one);
    assert!(
        eventually(WAIT, || server.core().registry.agent_ids() == ["node-2"]).await,
        "{:?}",
        server.core().registry.agent_ids()
    );
    at_rest(server, &[&two]).await;
}

#[tokio::test]
async fn a_tunnel_whose_node_no_longer_has_a_claimed_address_is_closed() {
    let pki = Pki::new();
    let kube = FakeKube::start().await;
    kube.review("t2", ok("node-2"));
    kube.node("node-2", &["10.0.0.6", "10.0.0.5"]);
    let dir = tempdir("addr-revert");
    let running = reviewing_server_with(
        &pki,
        &kube,
        &dir,
        &[
            "--address-identifiers",
            "node",
            "--address-recheck-interval",
            "200ms",
        ],
    )
    .await;
    let server = &running.server;
    let ip = |a: &str| Identifier::Ipv4(a.parse().unwrap());
    let (two, _m) = token_agent_claiming(
        &pki,
        server.agent_addr,
        "node-2",
        &dir,
        "t2",
        vec![ip("10.0.0.5")],
    );
    assert!(server.wait_agents(1, WAIT).await);
    // Checks that find the address still there keep the tunnel.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(server.core().registry.agent_ids(), vec!["node-2"]);
    assert_eq!(refusals(server, "revoked"), 0);
    // The node reverts its status after connecting: the next check closes the tunnel, and
    // its reconnects are refused (the claim is no longer proven).
    kube.node("node-2", &["10.0.0.6"]);
    assert!(
        eventually(WAIT, || refusals(server, "revoked") == 1).await,
        "{}",
        server.core().render_metrics()
    );
    assert!(
        eventually(WAIT, || server.core().registry.is_empty()).await,
        "{:?}",
        server.core().registry.agent_ids()
    );
    // Its reconnects are reviewed afresh (not from the cache of the first review), so they are
    // refused, never admitted again until the next check.
    assert!(
        eventually(WAIT, || refusals(server, "unauthorized") >= 1).await,
        "{}",
        server.core().render_metrics()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(refusals(server, "revoked"), 1);
    assert!(server.core().registry.is_empty());
    at_rest(server, &[&two]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn konnectivity_agents_with_service_account_tokens_are_reviewed_as_tether_agents() {
    use common::konnectivity::{Auth, KonnAgent, konnectivity};
    let Some(bin) = konnectivity() else { return };
    let pki = Pki::new();
    let kube = FakeKube::start().await;
    kube.review("k-good", ok("node-1"));
    kube.review("k-expired", Review::No("token has expired".into()));
    let dir = tempdir("konn-review");
    let running = reviewing_server(&pki, &kube, &dir).await;
    let server = &running.server;
    let _good = KonnAgent::start(
        &bin,
        &pki,
        server.agent_addr,
        "node-1",
        "127.0.0.2",
        Auth::Token("k-good"),
        &["--agent-id=2b7e1a90-6c4d-4f3b-8e2a-1d9c0b8a7f65"],
    );
    assert!(
        server.wait_agents(1, WAIT).await,
        "the reviewed Konnectivity agent is in"
    );
    assert_eq!(server.core().registry.agent_ids(), vec!["node-1"]);

    // A good token used to claim another node, and a token the API server refuses.
    let base = refusals(server, "unauthorized");
    let _stolen = KonnAgent::start(
        &bin,
        &pki,
        server.agent_addr,
        "node-2",
        "127.0.0.3",
        Auth::Token("k-good"),
        &[],
    );
    let _expired = KonnAgent::start(
        &bin,
        &pki,
        server.agent_addr,
        "node-3",
        "127.0.0.4",
        Auth::Token("k-expired"),
        &[],
    );
    let counted = |n: u64| refusals(server, "unauthorized") >= n;
    assert!(
        eventually(WAIT, || counted(base + 2)).await,
        "both refused and counted: {}",
        refused(server)
    );
    assert_eq!(server.core().registry.agent_ids(), vec!["node-1"]);

    // It serves dials.
    let echo = echo_backend_on([127, 0, 0, 2]).await;
    let mut s = server
        .dial("127.0.0.2", echo.port())
        .await
        .expect("dialled through the Konnectivity agent");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"hello").await.unwrap();
    let mut b = [0u8; 5];
    tokio::time::timeout(WAIT, s.read_exact(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&b, b"hello");
    drop(s);
    at_rest(server, &[]).await;
}
