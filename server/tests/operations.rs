//! The operator's view: certificates, CAs and tokens rotated on disk while traffic flows, the
//! Unix socket that a second server must not take over, and the agent's health server. Both
//! binaries' flag parsers build what runs here. Every wait is bounded.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use common::*;
use tether::tls::testpki::{Ca, Pem};
use tether_agent::cli::AgentArgs;
use tether_server::cli::ServerArgs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Replaces `path` the way kubelet and cert-manager do: a new file renamed over the old.
fn rotate(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The certificate the server presents on `port` now, seen by a client that trusts `ca` and
/// presents `client` (the agent port asks for one).
async fn presented(port: u16, ca: &str, client: &Pem) -> Option<Vec<u8>> {
    let cfg = tether::tls::client_config(
        ca.as_bytes(),
        Some((client.cert.as_bytes(), client.key.as_bytes())),
    )
    .ok()?;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
    )
    .await
    .ok()?
    .ok()?;
    let der = tls.get_ref().1.peer_certificates()?.first()?.to_vec();
    Some(der)
}

fn der(pem: &Pem) -> Vec<u8> {
    tether::tls::certs_from_pem(pem.cert.as_bytes()).unwrap()[0].to_vec()
}

fn refused_tls(server: &tether_server::Server) -> u64 {
    server
        .core()
        .render_metrics()
        .lines()
        .find_map(|l| l.strip_prefix("tether_agents_refused_total{reason=\"tls\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_every_file_mid_transfer_keeps_the_transfer_and_the_next_connection_uses_the_new_material()
 {
    let dir = tempdir("rotate");
    let ca1 = Ca::new("ca-1");
    let server_v1 = ca1.leaf("tether-server", &["localhost"]);
    let agent_v1 = ca1.leaf("agent-1", &["agent-1"]);
    let f = |n: &str| dir.join(n);
    let s = |p: PathBuf| p.display().to_string();
    std::fs::write(f("server.crt"), &server_v1.cert).unwrap();
    std::fs::write(f("server.key"), &server_v1.key).unwrap();
    std::fs::write(f("agents-ca.crt"), &ca1.pem.cert).unwrap();
    std::fs::write(f("tokens"), "tok-1 agent-1\n").unwrap();
    std::fs::write(f("agent.crt"), &agent_v1.cert).unwrap();
    std::fs::write(f("agent.key"), &agent_v1.key).unwrap();
    std::fs::write(f("server-ca.crt"), &ca1.pem.cert).unwrap();
    std::fs::write(f("agent-token"), "tok-1").unwrap();
    let socket = f("konnectivity-server.socket");
    let server = ServerArgs::try_parse_from([
        "tether-server",
        "--cluster-cert",
        &s(f("server.crt")),
        "--cluster-key",
        &s(f("server.key")),
        "--cluster-ca-cert",
        &s(f("agents-ca.crt")),
        "--agent-tokens-file",
        &s(f("tokens")),
        "--agent-bind-address",
        "127.0.0.1",
        "--agent-port",
        "0",
        "--uds-name",
        &s(socket.clone()),
        "--health-port",
        "0",
        "--reload-interval",
        "50ms",
    ])
    .unwrap()
    .start()
    .await
    .unwrap();
    let port = server.server.agent_addr.port();
    let agent = AgentArgs::try_parse_from([
        "tether-agent",
        "--ca-cert",
        &s(f("server-ca.crt")),
        "--agent-cert",
        &s(f("agent.crt")),
        "--agent-key",
        &s(f("agent.key")),
        "--service-account-token-path",
        &s(f("agent-token")),
        "--agent-id",
        "agent-1",
        "--proxy-server-host",
        "127.0.0.1",
        "--proxy-server-port",
        &port.to_string(),
        "--proxy-server-name",
        "localhost",
        "--allowed-destinations",
        "127.0.0.0/8",
        "--sync-interval",
        "50ms",
        "--sync-interval-cap",
        "200ms",
        "--reload-interval",
        "50ms",
    ])
    .unwrap()
    .start()
    .await
    .unwrap();
    let srv = &server.server;
    assert!(srv.wait_agents(1, WAIT).await, "the agent connected");

    // 8 MiB through the Unix socket, echoed back.
    let backend = echo_backend().await;
    let mut conn = UnixStream::connect(&socket).await.unwrap();
    let (head, _) = connect_request(&mut conn, &backend.to_string()).await;
    assert_eq!(status_of(&head), 200, "{head}");
    let (mut r, mut w) = conn.into_split();
    let data = Arc::new(pattern(7, 8 << 20));
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for piece in sent.chunks(64 * 1024) {
            w.write_all(piece).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut back = vec![0u8; 1 << 20];
    r.read_exact(&mut back).await.unwrap();

    // Mid-transfer, every file is replaced: a server certificate from a new CA (and the
    // agent's trust moved to it), an agent certificate from a CA the server does not trust
    // yet, new tokens on both ends.
    let ca2 = Ca::new("ca-2");
    let ca3 = Ca::new("ca-3");
    let server_v2 = ca2.leaf("tether-server", &["localhost"]);
    let agent_v2 = ca3.leaf("agent-1", &["agent-1"]);
    rotate(&f("server.key"), &server_v2.key);
    rotate(&f("server.crt"), &server_v2.cert);
    rotate(&f("server-ca.crt"), &ca2.pem.cert);
    rotate(&f("agent.crt"), &agent_v2.cert);
    rotate(&f("agent.key"), &agent_v2.key);
    rotate(&f("tokens"), "tok-2 agent-1\n");
    rotate(&f("agent-token"), "tok-2");

    let mut rest = Vec::new();
    tokio::time::timeout(WAIT * 3, r.read_to_end(&mut rest))
        .await
        .expect("the transfer finishes")
        .unwrap();
    writer.await.unwrap();
    back.extend_from_slice(&rest);
    assert!(
        back == *data,
        "the transfer arrived intact across the rotation"
    );
    assert_eq!(srv.agents(), 1, "the live tunnel was not dropped");

    // New handshakes present the new certificate.
    let probe = ca1.leaf("probe", &["probe"]);
    let seen = eventually_some(WAIT, || presented(port, &ca2.pem.cert, &probe)).await;
    assert_eq!(
        seen,
        Some(der(&server_v2)),
        "the agent port presents the rotated certificate"
    );

    // The next tunnel carries the agent's new certificate, which the server does not trust.
    let before = refused_tls(srv);
    for t in srv.core().registry.tunnels() {
        t.close(tether_proto::ErrorCode::NO_ERROR, "test: reconnect");
    }
    assert!(
        eventually(WAIT, || refused_tls(srv) > before).await,
        "the agent's new certificate is refused until its CA is trusted"
    );
    assert_eq!(srv.agents(), 0);
    // Trusting its CA on the server lets it in, with the new token.
    rotate(
        &f("agents-ca.crt"),
        &format!("{}{}", ca1.pem.cert, ca3.pem.cert),
    );
    assert!(
        srv.wait_agents(1, WAIT).await,
        "new CA, new certificate, new token"
    );

    // A corrupt file changes nothing, and the refusal is counted for alerts.
    let kept = |srv: &tether_server::Server| {
        srv.core()
            .render_metrics()
            .lines()
            .find_map(|l| {
                l.strip_prefix("tether_reloads_total{material=\"agent TLS (--cluster-cert, --cluster-key, --cluster-ca-cert)\",result=\"kept\"} ")
            })
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = kept(srv);
    rotate(
        &f("server.crt"),
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n",
    );
    assert!(
        eventually(WAIT, || kept(srv) > before).await,
        "the corrupt file was read and refused: {}",
        srv.core().render_metrics()
    );
    assert_eq!(
        presented(port, &ca2.pem.cert, &probe).await,
        Some(der(&server_v2)),
        "a corrupt certificate is not loaded"
    );
    assert_eq!(srv.agents(), 1);
    agent.shutdown(Duration::from_secs(1)).await;
    server.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_second_server_never_takes_over_a_live_socket_and_replaces_only_a_stale_one() {
    let pki = Pki::new();
    let dir = tempdir("uds");
    let socket = dir.join("konnectivity-server.socket");
    let mut cfg = server_config(&pki);
    cfg.uds_path = Some(socket.clone());
    cfg.connect_addr = None;
    cfg.health_addr = None;
    let first = tether_server::Server::start(cfg.clone()).await.unwrap();
    let second = tether_server::Server::start(cfg.clone()).await;
    let err = second.err().expect("a live socket is refused").to_string();
    assert!(err.contains("another server is serving"), "{err}");
    assert!(
        err.contains(&socket.display().to_string()),
        "names the socket: {err}"
    );
    UnixStream::connect(&socket)
        .await
        .expect("the first server still serves its socket");

    // A stale socket file (its server gone without unlinking it): refused without
    // --delete-existing-uds-file, replaced with it.
    let std_listener = std::os::unix::net::UnixListener::bind(dir.join("stale.socket")).unwrap();
    drop(std_listener);
    let mut stale = cfg.clone();
    stale.uds_path = Some(dir.join("stale.socket"));
    stale.delete_existing_uds = false;
    let err = tether_server::Server::start(stale.clone())
        .await
        .err()
        .expect("a stale file is kept when told so")
        .to_string();
    assert!(err.contains("stale"), "{err}");
    stale.delete_existing_uds = true;
    let third = tether_server::Server::start(stale).await.unwrap();
    UnixStream::connect(dir.join("stale.socket"))
        .await
        .expect("the stale socket was replaced");
    // A missing directory is named.
    let mut missing = cfg.clone();
    missing.uds_path = Some(dir.join("no-such-dir/s.socket"));
    let err = tether_server::Server::start(missing)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no-such-dir"), "{err}");
    third.shutdown(Duration::from_millis(100)).await;
    first.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn startup_errors_name_the_flag_the_file_or_the_address() {
    let dir = tempdir("errors");
    let key = dir.join("empty.key");
    std::fs::write(&key, "").unwrap();
    let pki = Pki::new();
    let cert = dir.join("server.crt");
    std::fs::write(&cert, &pki.server.cert).unwrap();
    let args = |extra: &[&str]| {
        let mut v = vec![
            "tether-server".to_owned(),
            "--cluster-cert".into(),
            cert.display().to_string(),
            "--cluster-key".into(),
            key.display().to_string(),
            "--health-port".into(),
            "0".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        ServerArgs::try_parse_from(v).unwrap()
    };
    let e = args(&[]).config().err().unwrap();
    assert!(
        e.contains("empty.key") && e.contains("--cluster-key"),
        "{e}"
    );
    std::fs::write(&key, &pki.server.key).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let e = args(&["--agent-bind-address", "127.0.0.1", "--agent-port", &port])
        .start()
        .await
        .err()
        .unwrap();
    assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    let e = args(&["--mode", "grpc"]).config().err().unwrap();
    assert!(e.contains("--mode"), "{e}");
    let e = args(&["--agent-tokens-file", "/nonexistent/tokens"])
        .config()
        .err()
        .unwrap();
    assert!(e.contains("/nonexistent/tokens"), "{e}");
}

#[tokio::test]
async fn the_agent_serves_health_readiness_and_metrics_of_its_own() {
    let pki = Pki::new();
    let dir = tempdir("agent-health");
    let ca = dir.join("ca.crt");
    std::fs::write(&ca, pki.ca_pem()).unwrap();
    let cert = pki.ca.leaf("agent-1", &["agent-1"]);
    std::fs::write(dir.join("a.crt"), &cert.cert).unwrap();
    std::fs::write(dir.join("a.key"), &cert.key).unwrap();
    let health = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let health_port = health.local_addr().unwrap().port();
    drop(health);
    let server = tether_server::Server::start(server_config(&pki))
        .await
        .unwrap();
    let mut agent = AgentArgs::try_parse_from([
        "tether-agent",
        "--ca-cert",
        ca.to_str().unwrap(),
        "--agent-cert",
        dir.join("a.crt").to_str().unwrap(),
        "--agent-key",
        dir.join("a.key").to_str().unwrap(),
        "--agent-id",
        "agent-1",
        "--proxy-server-host",
        "127.0.0.1",
        "--proxy-server-port",
        &server.agent_addr.port().to_string(),
        "--proxy-server-name",
        "localhost",
        "--health-server-host",
        "127.0.0.1",
        "--health-server-port",
        &health_port.to_string(),
        "--sync-interval",
        "50ms",
    ])
    .unwrap()
    .start()
    .await
    .unwrap();
    assert!(server.wait_agents(1, WAIT).await);
    let get = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", health_port))
            .await
            .unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        String::from_utf8(read_to_end(&mut s).await.unwrap()).unwrap()
    };
    assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(
        get("/readyz").await.starts_with("HTTP/1.1 200"),
        "ready with a tunnel"
    );
    let metrics = get("/metrics").await;
    for name in [
        "tether_agent_tunnels 1",
        "tether_agent_known_server_count 1",
        "process_resident_memory_bytes",
        "tether_agent_dial_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(name), "{name} in:\n{metrics}");
    }
    server.shutdown(Duration::from_millis(100)).await;
    assert!(
        eventually(WAIT, || agent.agent.connected() == 0).await,
        "the tunnel is gone"
    );
    let ready = get("/readyz").await;
    assert!(
        ready.starts_with("HTTP/1.1 503"),
        "not ready without a tunnel: {ready}"
    );
    // Without its server, the agent runs on, retrying: no task of its has stopped. A zero
    // timeout polls once.
    if let Ok(why) = tokio::time::timeout(Duration::ZERO, agent.failed()).await {
        panic!("the agent failed: {why}");
    }
}

/// Reads `child`'s stderr until a line satisfies `want` (at most `limit`), returning it.
async fn line_where(
    child: &mut Killed,
    limit: Duration,
    want: impl Fn(&str) -> bool + Send + 'static,
) -> Option<String> {
    use std::io::BufRead;
    let err = child.0.stderr.take()?;
    let found = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(err)
            .lines()
            .take(10_000)
            .map_while(Result::ok)
            .find(|l| want(l))
    });
    tokio::time::timeout(limit, found).await.ok()?.ok()?
}

/// Names of `pid`'s threads.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|n| n.trim().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The test PKI's server certificate, key and CA written into `dir`, as paths.
fn server_files(pki: &Pki, dir: &Path) -> (String, String, String) {
    let w = |n: &str, t: &str| {
        std::fs::write(dir.join(n), t).unwrap();
        dir.join(n).display().to_string()
    };
    (
        w("s.crt", &pki.server.cert),
        w("s.key", &pki.server.key),
        w("ca.crt", &pki.ca.pem.cert),
    )
}

/// `tether-server` with `files` and agents on 127.0.0.1:`agent_port`, CONNECT and health off.
fn server_binary(files: &(String, String, String), agent_port: &str) -> std::process::Command {
    let (sc, sk, ca) = files;
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_tether-server"));
    c.args([
        "--cluster-cert",
        sc,
        "--cluster-key",
        sk,
        "--cluster-ca-cert",
        ca,
    ])
    .args([
        "--agent-bind-address",
        "127.0.0.1",
        "--agent-port",
        agent_port,
    ])
    .args(["--server-port", "0", "--health-port", "0"]);
    c
}

#[tokio::test]
async fn both_binaries_have_the_allocator_return_freed_memory_in_the_background() {
    let pki = Pki::new();
    let files = server_files(&pki, &tempdir("purge"));
    let port = free_port().to_string();
    let server = Killed(
        server_binary(&files, &port)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let agent = Killed(
        std::process::Command::new(common::agent_bin())
            .args(["--ca-cert", &files.2, "--proxy-server-port", &port])
            .args(["--agent-id", "node-1", "--proxy-server-name", "localhost"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    // jemalloc names its purging threads; they start with the process's first allocations.
    for (name, p) in [("tether-server", &server), ("tether-agent", &agent)] {
        let pid = p.0.id();
        assert!(
            eventually(WAIT, || thread_names(pid)
                .iter()
                .any(|n| n.starts_with("jemalloc_bg_thd")))
            .await,
            "{name} has no allocator background thread: {:?}",
            thread_names(pid)
        );
    }
}

#[tokio::test]
async fn json_logs_carry_the_tunnel_span_with_the_peer_and_the_agent_id() {
    let pki = Pki::new();
    let dir = tempdir("json-logs");
    let files = server_files(&pki, &dir);
    let ca = files.2.clone();
    let agent_cert = pki.ca.leaf("node-7", &["node-7"]);
    let w = |n: &str, t: &str| {
        std::fs::write(dir.join(n), t).unwrap();
        dir.join(n).display().to_string()
    };
    let (ac, ak) = (w("a.crt", &agent_cert.cert), w("a.key", &agent_cert.key));
    let port = free_port().to_string();
    let mut server = Killed(
        server_binary(&files, &port)
            .args(["--log-format", "json"])
            .env_remove("RUST_LOG")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let _agent = Killed(
        std::process::Command::new(common::agent_bin())
            .args(["--ca-cert", &ca, "--agent-cert", &ac, "--agent-key", &ak])
            .args(["--agent-id", "node-7", "--proxy-server-name", "localhost"])
            .args(["--proxy-server-port", &port, "--sync-interval", "100ms"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let line = line_where(&mut server, WAIT, |l| l.contains("agent connected"))
        .await
        .expect("the server logs the agent's tunnel");
    let v: serde_json::Value = serde_json::from_str(&line).expect("one JSON object per line");
    assert_eq!(v["span"]["name"], "tunnel", "{line}");
    assert_eq!(v["span"]["agent_id"], "node-7", "{line}");
    assert!(
        v["span"]["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{line}"
    );
}

#[tokio::test]
async fn the_connect_frontends_certificate_is_reloaded_for_new_clients() {
    let pki = Pki::new();
    let (_dir, cert, key, server) = frontend_with_tls_files(&pki, "frontend", false).await;
    let port = server.connect_addr.unwrap().port();
    let probe = pki.ca.leaf("probe", &["probe"]);
    assert_eq!(
        presented(port, &pki.ca.pem.cert, &probe).await,
        Some(der(&pki.server))
    );
    let ca2 = Ca::new("frontend ca-2");
    let v2 = ca2.leaf("tether-server", &["localhost"]);
    rotate(&key, &v2.key);
    rotate(&cert, &v2.cert);
    let seen = eventually_some(WAIT, || presented(port, &ca2.pem.cert, &probe)).await;
    assert_eq!(
        seen,
        Some(der(&v2)),
        "new CONNECT clients get the new certificate"
    );
    server.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn idle_connections_cannot_hold_the_health_port_for_ever() {
    let pki = Pki::new();
    let server = tether_server::Server::start(server_config(&pki))
        .await
        .unwrap();
    let health = server.health_addr.unwrap();
    // More silent connections than the health server serves at once.
    let mut idle = Vec::new();
    for _ in 0..tether_ops::metrics::MAX_HEALTH_CONNECTIONS + 16 {
        idle.push(tokio::net::TcpStream::connect(health).await.unwrap());
    }
    // A probe behind them is answered once their 10 s are up: none holds a slot for ever.
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(health).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        out
    };
    let answer = tokio::time::timeout(Duration::from_secs(30), probe)
        .await
        .expect("the probe is answered");
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    drop(idle);
    server.shutdown(Duration::from_millis(100)).await;
}

/// A server whose CONNECT frontend's TLS certificate and key are files (re-read every 50 ms),
/// with session tickets if `resumable`: the directory, the two files, the server.
async fn frontend_with_tls_files(
    pki: &Pki,
    tag: &str,
    resumable: bool,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
    tether_server::Server,
) {
    let dir = tempdir(tag);
    let (cert, key) = (dir.join("front.crt"), dir.join("front.key"));
    std::fs::write(&cert, &pki.server.cert).unwrap();
    std::fs::write(&key, &pki.server.key).unwrap();
    let files = tether::tls::ServerFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: None,
    };
    let mut cfg = server_config(pki);
    cfg.connect_tls = Some(
        if resumable {
            files.load_resumable("CONNECT TLS")
        } else {
            files.load("CONNECT TLS")
        }
        .unwrap(),
    );
    cfg.reload_interval = Duration::from_millis(50);
    let server = tether_server::Server::start(cfg).await.unwrap();
    (dir, cert, key, server)
}

/// A TLS handshake to the CONNECT frontend with `client`; whether it resumed a session.
async fn handshake_resumed(port: u16, client: &std::sync::Arc<rustls::ClientConfig>) -> bool {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(client.clone())
        .connect(name, tcp)
        .await
        .unwrap();
    // TLS 1.3 tickets come after the handshake: a request the frontend refuses at once
    // (405) is answered after them, and reading the answer takes them in.
    let mut tls = tls;
    let _ = tokio::io::AsyncWriteExt::write_all(&mut tls, b"GET / HTTP/1.1\r\n\r\n").await;
    let _ = tokio::time::timeout(WAIT, read_to_end(&mut tls)).await;
    tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
}

#[tokio::test]
async fn a_connect_client_that_keeps_its_session_resumes_until_the_frontend_reloads() {
    let pki = Pki::new();
    let (dir, cert, key, server) = frontend_with_tls_files(&pki, "resume", true).await;
    let port = server.connect_addr.unwrap().port();
    // More clients than a server-side session cache holds (rustls keeps 256): with tickets,
    // the sessions live with the clients, and every one of them resumes.
    let clients: Vec<_> = (0..300)
        .map(|_| tether::tls::client_config(pki.ca_pem(), None).unwrap())
        .collect();
    for c in &clients {
        assert!(
            !handshake_resumed(port, c).await,
            "a first handshake is full"
        );
    }
    let mut resumed = 0;
    for c in &clients {
        resumed += usize::from(handshake_resumed(port, c).await);
    }
    assert_eq!(resumed, clients.len(), "clients that resumed");
    let client = &clients[0];
    // A reload (a new certificate here) takes a new ticket key: older sessions are not
    // resumed, so nothing agreed under the old material outlives it.
    let v2 = pki.ca.leaf("tether-server", &["localhost"]);
    std::fs::write(dir.join("c.tmp"), &v2.cert).unwrap();
    std::fs::write(dir.join("k.tmp"), &v2.key).unwrap();
    std::fs::rename(dir.join("k.tmp"), &key).unwrap();
    std::fs::rename(dir.join("c.tmp"), &cert).unwrap();
    // The reload is an event the server counts: wait for it, then the next handshake is full.
    let reloaded = eventually(WAIT, || {
        server.core().render_metrics().lines().any(|l| {
            l.starts_with("tether_reloads_total{material=\"CONNECT TLS\",result=\"replaced\"}")
                && !l.ends_with(" 0")
        })
    })
    .await;
    assert!(reloaded, "{}", server.core().render_metrics());
    assert!(
        !handshake_resumed(port, client).await,
        "sessions from before the reload were still resumed"
    );
    server.shutdown(Duration::from_millis(100)).await;
}

/// The binaries end with an error when a task of theirs stops early (`Server::failed`,
/// `Agent::failed`; the panic path is unit-tested beside `Server::failed`). An agent's tasks
/// stop only once it drains, a server's only at shutdown.
#[tokio::test]
async fn an_agents_tasks_run_until_it_drains_and_then_each_says_it_stopped() {
    let pki = Pki::new();
    let mut server = tether_server::Server::start(server_config(&pki))
        .await
        .unwrap();
    let mut agent = tether_agent::Agent::start(agent_config(&pki, server.agent_addr, "agent-1"));
    assert!(server.wait_agents(1, WAIT).await);
    assert!(agent.wait_connected(1, WAIT).await);
    // Running: neither has failed. A zero timeout polls once: a task that had ended would
    // be ready at once.
    let now = Duration::ZERO;
    if let Ok(why) = tokio::time::timeout(now, server.failed()).await {
        panic!("the server failed: {why}");
    }
    if let Ok(why) = tokio::time::timeout(now, agent.failed()).await {
        panic!("the agent failed: {why}");
    }
    agent.drain(Duration::ZERO).await;
    let why = tokio::time::timeout(WAIT, agent.failed())
        .await
        .expect("the connection loop ends once the agent drains");
    assert_eq!(
        why,
        format!("the connection loop for {} stopped", server.agent_addr)
    );
}

#[test]
fn konnectivitys_server_flag_values_mean_what_they_mean_there() {
    let pki = Pki::new();
    let dir = tempdir("knp-flags");
    let (sc, sk, ca) = server_files(&pki, &dir);
    let parse = |extra: &[&str]| {
        let mut argv = vec![
            "tether-server",
            "--cluster-cert",
            &sc,
            "--cluster-key",
            &sk,
            "--cluster-ca-cert",
            &ca,
        ];
        argv.extend_from_slice(extra);
        ServerArgs::try_parse_from(argv)
    };
    // Go's durations and booleans, as Konnectivity's --help prints them and manifests set them.
    let a = parse(&[
        "--backend-dial-timeout=0",
        "--keepalive-time=1h0m0s",
        "--enable-lease-controller=false",
        "--delete-existing-uds-file=1",
        "--server-id=",
    ])
    .unwrap();
    let c = a.config().unwrap();
    // 0: no deadline of the server's (the agent's own ends the dial).
    assert_eq!(c.dial_timeout, Duration::ZERO);
    assert_eq!(c.session.keepalive_interval_ms, 3_600_000);
    assert!(c.delete_existing_uds);
    // An empty id is no id: a random one, as Konnectivity gives an empty PROXY_SERVER_ID.
    assert_eq!(c.server_id.len(), 32, "{:?}", c.server_id);
    for (flag, on) in [
        ("--enable-lease-controller=true", true),
        ("--enable-lease-controller=True", true),
        ("--enable-lease-controller", true),
        ("--enable-lease-controller=false", false),
    ] {
        assert_eq!(
            parse(&[flag]).unwrap().enable_lease_controller,
            on,
            "{flag}"
        );
    }
    assert!(!a.enable_lease_controller);
    // 0 keepalive: the default, with a notice; never a tunnel without keepalive.
    let z = parse(&["--keepalive-time=0"]).unwrap();
    assert_eq!(z.config().unwrap().session.keepalive_interval_ms, 10_000);
    assert!(z.notices().iter().any(|n| n.contains("--keepalive-time 0")));
}
