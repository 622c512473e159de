//! The HTTP CONNECT frontend over real loopback sockets and real TLS.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn connect_over_tcp_in_kube_apiservers_dialect_reaches_the_backend() {
    let pki = Pki::new();
    let (server, agent) = server_and_agent(&pki).await;
    let backend = echo_backend().await;
    let (status, head, mut s) =
        connect_tcp(server.connect_addr.unwrap(), &backend.to_string()).await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(
        head, "HTTP/1.1 200 Connection established\r\n\r\n",
        "nothing but the status line and CRLFCRLF"
    );
    s.write_all(b"ping through the tunnel").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(
        read_to_end(&mut s).await.unwrap(),
        b"ping through the tunnel"
    );
    drop(s);
    at_rest(&server, &[&agent]).await;
}

#[tokio::test]
async fn bytes_sent_right_after_the_request_head_are_not_lost() {
    let pki = Pki::new();
    let (server, agent) = server_and_agent(&pki).await;
    let backend = echo_backend().await;
    let mut s = TcpStream::connect(server.connect_addr.unwrap())
        .await
        .unwrap();
    let req = format!("CONNECT {backend} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nearly bytes");
    s.write_all(req.as_bytes()).await.unwrap();
    s.shutdown().await.unwrap();
    let (head, _) = read_head(&mut s).await;
    assert_eq!(status_of(&head), 200);
    assert_eq!(read_to_end(&mut s).await.unwrap(), b"early bytes");
    drop(s);
    at_rest(&server, &[&agent]).await;
}

#[tokio::test]
async fn connect_over_mtls_needs_a_client_certificate_signed_by_the_ca() {
    let pki = Pki::new();
    let mut cfg = server_config(&pki);
    cfg.connect_tls = Some(
        tether::tls::server_config(
            pki.server.cert.as_bytes(),
            pki.server.key.as_bytes(),
            Some(pki.ca_pem()),
        )
        .unwrap()
        .into(),
    );
    let server = tether_server::Server::start(cfg).await.unwrap();
    let agent = tether_agent::Agent::start(agent_config(&pki, server.agent_addr, "agent-1"));
    assert!(server.wait_agents(1, WAIT).await);
    let backend = echo_backend().await;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();

    // With a client certificate: tunnelled.
    let with_cert = tether::tls::client_config(
        pki.ca_pem(),
        Some((pki.client.cert.as_bytes(), pki.client.key.as_bytes())),
    )
    .unwrap();
    let tcp = TcpStream::connect(server.connect_addr.unwrap())
        .await
        .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(with_cert)
        .connect(name.clone(), tcp)
        .await
        .unwrap();
    let (head, _) = connect_request(&mut tls, &backend.to_string()).await;
    assert_eq!(status_of(&head), 200, "{head}");
    tls.write_all(b"over mTLS").await.unwrap();
    let mut got = [0u8; 9];
    tokio::time::timeout(WAIT, tls.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"over mTLS");
    drop(tls);

    // Without one: no CONNECT is ever answered.
    let without = tether::tls::client_config(pki.ca_pem(), None).unwrap();
    let tcp = TcpStream::connect(server.connect_addr.unwrap())
        .await
        .unwrap();
    let refused = async {
        let mut tls = tokio_rustls::TlsConnector::from(without)
            .connect(name, tcp)
            .await?;
        tls.write_all(format!("CONNECT {backend} HTTP/1.1\r\n\r\n").as_bytes())
            .await?;
        let mut buf = [0u8; 1];
        tls.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(())
    };
    assert!(tokio::time::timeout(WAIT, refused).await.unwrap().is_err());
    at_rest(&server, &[&agent]).await;
}

#[cfg(unix)]
#[tokio::test]
async fn connect_over_the_unix_socket_reaches_the_backend() {
    let pki = Pki::new();
    let dir = std::env::temp_dir().join(format!("tether-uds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("konnectivity.sock");
    let mut cfg = server_config(&pki);
    cfg.uds_path = Some(path.clone());
    let server = tether_server::Server::start(cfg).await.unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o770, "owner and group only");
    let agent = tether_agent::Agent::start(agent_config(&pki, server.agent_addr, "agent-1"));
    assert!(server.wait_agents(1, WAIT).await);
    let backend = echo_backend().await;
    let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
    let (head, _) = connect_request(&mut s, &backend.to_string()).await;
    assert_eq!(status_of(&head), 200, "{head}");
    s.write_all(b"via uds").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut s).await.unwrap(), b"via uds");
    drop(s);
    at_rest(&server, &[&agent]).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn half_close_passes_through_in_both_directions() {
    let pki = Pki::new();
    let (server, agent) = server_and_agent(&pki).await;
    // A backend that reads the whole request, then answers, then closes.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut req = Vec::new();
        s.read_to_end(&mut req).await.unwrap();
        s.write_all(format!("got {} bytes", req.len()).as_bytes())
            .await
            .unwrap();
        s.shutdown().await.unwrap();
    });
    let (status, _, mut s) = connect_tcp(server.connect_addr.unwrap(), &backend.to_string()).await;
    assert_eq!(status, 200);
    s.write_all(&[7u8; 100_000]).await.unwrap();
    // The client half-closes; the backend sees EOF while the other direction stays open.
    s.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut s).await.unwrap(), b"got 100000 bytes");
    drop(s);
    at_rest(&server, &[&agent]).await;
}

async fn status_for(server: &tether_server::Server, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(server.connect_addr.unwrap())
        .await
        .unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    (status_of(&text), text)
}

#[tokio::test]
async fn every_failure_maps_to_a_clear_status_with_a_reason() {
    let pki = Pki::new();
    let server = tether_server::Server::start(server_config(&pki))
        .await
        .unwrap();

    // No agent yet: 503.
    let (status, text) = status_for(
        &server,
        "CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    )
    .await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("no agent"), "{text}");
    let metrics = server.core().render_metrics();
    assert!(
        metrics.contains("tether_dials_total{result=\"no_agent\"} 1"),
        "a dial with no agent is counted: {metrics}"
    );

    let mut cfg = agent_config(&pki, server.agent_addr, "agent-1");
    cfg.allowlist = tether_agent::Allowlist::parse("127.0.0.1").unwrap();
    cfg.dial_timeout = Duration::from_millis(300);
    let agent = tether_agent::Agent::start(cfg);
    assert!(server.wait_agents(1, WAIT).await);

    // Refused by the destination: 502.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (status, text) = status_for(&server, &format!("CONNECT {closed} HTTP/1.1\r\n\r\n")).await;
    assert_eq!(status, 502, "{text}");
    // The OS's words as Go's net package writes them, which clients match on, after tether's
    // code; never Rust's "Connection refused (os error 111)".
    assert!(
        text.contains(&format!(
            "DIAL_REFUSED: dial tcp {closed}: connect: connection refused"
        )),
        "{text}"
    );
    assert!(!text.contains("os error"), "{text}");

    // Not on the agent's allowlist: 403.
    let (status, text) = status_for(&server, "CONNECT 127.0.0.2:80 HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, 403, "{text}");

    // Malformed, no port, wrong method.
    let (status, _) = status_for(&server, "CONNECT \u{1}\u{2} HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, 400);
    let (status, text) = status_for(&server, "CONNECT 127.0.0.1 HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("no port"), "{text}");
    let (status, text) = status_for(&server, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, 405, "{text}");
    assert!(text.contains("Allow: CONNECT"), "{text}");

    // A destination that never answers the SYN: the agent's dial times out, 504.
    let full = tokio::net::TcpSocket::new_v4().unwrap();
    full.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let full_addr = full.local_addr().unwrap();
    let _listener = full.listen(0).unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(full_addr)).await
        {
            fillers.push(s);
        }
    }
    let (status, text) =
        status_for(&server, &format!("CONNECT {full_addr} HTTP/1.1\r\n\r\n")).await;
    assert_eq!(status, 504, "{text}");
    drop(fillers);
    at_rest(&server, &[&agent]).await;
}

#[tokio::test]
async fn a_slow_request_head_gets_408_and_an_oversized_one_431() {
    let pki = Pki::new();
    let (server, agent) = server_and_agent(&pki).await;
    let mut s = TcpStream::connect(server.connect_addr.unwrap())
        .await
        .unwrap();
    s.write_all(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n")
        .await
        .unwrap();
    let out = read_to_end(&mut s).await.unwrap();
    assert_eq!(status_of(&String::from_utf8_lossy(&out)), 408);
    let mut s = TcpStream::connect(server.connect_addr.unwrap())
        .await
        .unwrap();
    let big = format!(
        "CONNECT 127.0.0.1:1 HTTP/1.1\r\nX-Pad: {}\r\n",
        "a".repeat(20_000)
    );
    let _ = s.write_all(big.as_bytes()).await;
    let out = read_to_end(&mut s).await.unwrap_or_default();
    assert_eq!(status_of(&String::from_utf8_lossy(&out)), 431);
    drop(s);
    at_rest(&server, &[&agent]).await;
}

#[tokio::test]
async fn health_ready_and_metrics_answer() {
    let pki = Pki::new();
    let (server, agent) = server_and_agent(&pki).await;
    let get = |path: &'static str| {
        let addr = server.health_addr.unwrap();
        async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            String::from_utf8(read_to_end(&mut s).await.unwrap()).unwrap()
        }
    };
    assert_eq!(status_of(&get("/healthz").await), 200);
    assert_eq!(status_of(&get("/readyz").await), 200);
    let metrics = get("/metrics").await;
    assert!(metrics.contains("tether_agents 1"), "{metrics}");
    at_rest(&server, &[&agent]).await;
}

#[tokio::test]
async fn a_name_that_does_not_resolve_reads_no_such_host_on_both_frontends() {
    let pki = Pki::new();
    let dir = tempdir("no-such-host");
    let mut cfg = server_config(&pki);
    cfg.grpc_uds_path = Some(dir.join("g.sock"));
    let server = tether_server::Server::start(cfg).await.unwrap();
    let host = "no-such-host.invalid";
    let mut acfg = agent_config(&pki, server.agent_addr, "agent-1");
    acfg.allowlist = tether_agent::Allowlist::parse(host).unwrap();
    let agent = tether_agent::Agent::start(acfg);
    assert!(server.wait_agents(1, WAIT).await);
    let (status, text) = status_for(&server, &format!("CONNECT {host}:80 HTTP/1.1\r\n\r\n")).await;
    assert_eq!(status, 502, "{text}");
    // A resolver that cannot be reached says so instead (a machine with no DNS at all).
    let words = |t: &str| {
        t.contains(&format!("dial tcp: lookup {host}: no such host"))
            || t.contains("temporary failure in name resolution")
    };
    assert!(words(&text), "{text}");
    assert!(!text.contains("failed to lookup"), "{text}");
    let client = tether_server::client::grpc::GrpcClient::connect(
        &dir.join("g.sock"),
        tether_server::client::grpc::AuthorityStyle::PercentEncoded,
    )
    .await
    .unwrap();
    match client.dial(&format!("{host}:80")).await {
        Err(e) => assert!(words(&e.to_string()), "{e}"),
        Ok(_) => panic!("{host} dialled"),
    }
    drop(client);
    at_rest(&server, &[&agent]).await;
}

/// The value of the series `series` (name and labels, as written) in `text`.
fn series(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test]
async fn konnectivitys_metric_names_read_the_same_as_tethers_own() {
    let pki = Pki::new();
    let server = tether_server::Server::start(server_config(&pki))
        .await
        .unwrap();
    let metrics = std::sync::Arc::new(tether_agent::AgentMetrics::new());
    let agent = tether_agent::Agent::start(tether_agent::AgentConfig {
        metrics: metrics.clone(),
        ..agent_config(&pki, server.agent_addr, "agent-1")
    });
    assert!(server.wait_agents(1, WAIT).await);
    let backend = echo_backend().await;
    let (status, head, mut s) =
        connect_tcp(server.connect_addr.unwrap(), &backend.to_string()).await;
    assert_eq!(status, 200, "{head}");
    s.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (status, _) = status_for(&server, &format!("CONNECT {closed} HTTP/1.1\r\n\r\n")).await;
    assert_eq!(status, 502);

    let m = server.core().render_metrics();
    let k = "konnectivity_network_proxy_server_";
    for (theirs, ours) in [
        ("ready_backend_connections", "tether_agents"),
        (
            "ready_backends{proxy_strategy=\"default\"}",
            "tether_agents",
        ),
        ("pending_backend_dials", "tether_pending_dials"),
        (
            "established_connections",
            "tether_connect_streams{frontend=\"tcp\"}",
        ),
        (
            "http_connections",
            "tether_connect_streams{frontend=\"tcp\"}",
        ),
        (
            "dial_duration_seconds_count",
            "tether_dial_duration_seconds_count",
        ),
        (
            "dial_failure_count{reason=\"error_response\"}",
            "tether_dials_total{result=\"DIAL_REFUSED\"}",
        ),
    ] {
        let (a, b) = (series(&m, &format!("{k}{theirs}")), series(&m, ours));
        assert!(
            a.is_some() && a == b,
            "{theirs} {a:?} against {ours} {b:?}:\n{m}"
        );
    }
    assert_eq!(series(&m, "tether_agents"), Some(1.0));
    assert_eq!(
        series(&m, "tether_connect_streams{frontend=\"tcp\"}"),
        Some(1.0)
    );

    let a = metrics.render();
    let k = "konnectivity_network_proxy_agent_";
    for (theirs, ours) in [
        ("open_server_connections", "tether_agent_tunnels"),
        ("known_server_count", "tether_agent_known_server_count"),
        (
            "open_endpoint_connections",
            "tether_agent_endpoint_connections",
        ),
        (
            "dial_duration_seconds_count",
            "tether_agent_dial_duration_seconds_count",
        ),
        (
            "endpoint_dial_failure_total{reason=\"unknown\"}",
            "tether_agent_dials_total{result=\"DIAL_REFUSED\"}",
        ),
    ] {
        let (x, y) = (series(&a, &format!("{k}{theirs}")), series(&a, ours));
        assert!(
            x.is_some() && x == y,
            "{theirs} {x:?} against {ours} {y:?}:\n{a}"
        );
    }
    assert_eq!(series(&a, "tether_agent_endpoint_connections"), Some(1.0));
    drop(s);
    at_rest(&server, &[&agent]).await;
}

#[tokio::test]
async fn a_backend_dial_timeout_of_zero_leaves_the_deadline_to_the_agent() {
    // Konnectivity's --backend-dial-timeout=0 means no deadline of the server's.
    let pki = Pki::new();
    let mut cfg = server_config(&pki);
    cfg.dial_timeout = Duration::ZERO;
    let server = tether_server::Server::start(cfg).await.unwrap();
    let hole = black_hole().await;
    let mut acfg = agent_config(&pki, server.agent_addr, "agent-1");
    acfg.dial_timeout = Duration::from_millis(500);
    let agent = tether_agent::Agent::start(acfg);
    assert!(server.wait_agents(1, WAIT).await);
    let (status, text) = status_for(
        &server,
        &format!("CONNECT 127.0.0.1:{} HTTP/1.1\r\n\r\n", hole.port),
    )
    .await;
    assert_eq!(status, 504, "{text}");
    assert!(
        text.contains("DIAL_TIMEOUT: dial tcp"),
        "the agent's timeout, not the server's at once: {text}"
    );
    at_rest(&server, &[&agent]).await;
}
