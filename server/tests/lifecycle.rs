//! A server embedded as a library opens only what it is asked to, and a dropped one leaves
//! nothing behind: every port free, every socket file gone, every tunnel closed.
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

/// Binds `addr` again, waiting (bounded) for whatever held it to be dropped.
async fn bind_again(addr: SocketAddr) -> bool {
    for _ in 0..200 {
        if tokio::net::TcpListener::bind(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn a_server_from_the_defaults_opens_its_agent_port_and_nothing_else() {
    let pki = Pki::new();
    let tls = tether::tls::server_config(
        pki.server.cert.as_bytes(),
        pki.server.key.as_bytes(),
        Some(pki.ca_pem()),
    )
    .unwrap();
    let cfg = tether_server::ServerConfig::new("127.0.0.1:0".parse().unwrap(), tls);
    let server = tether_server::Server::start(cfg).await.unwrap();
    assert_eq!(
        server.connect_addr, None,
        "no CONNECT frontend unless asked"
    );
    assert_eq!(server.health_addr, None);
    assert_eq!(server.uds_path, None);
    assert_eq!(server.grpc_uds_path, None);
    assert_ne!(server.agent_addr.port(), 0);
    at_rest(&server, &[]).await;
}

#[tokio::test]
async fn a_dropped_server_frees_every_port_and_socket_file_and_closes_its_tunnels() {
    let pki = Pki::new();
    let dir = tempdir("lifecycle");
    let (uds, grpc) = (dir.join("connect.socket"), dir.join("grpc.socket"));
    let mut cfg = server_config(&pki);
    cfg.uds_path = Some(uds.clone());
    cfg.grpc_uds_path = Some(grpc.clone());
    let server = tether_server::Server::start(cfg).await.unwrap();
    let agent = tether_agent::Agent::start(agent_config(&pki, server.agent_addr, "agent-1"));
    assert!(server.wait_agents(1, WAIT).await);
    assert!(uds.exists() && grpc.exists());
    let ports = [
        server.agent_addr,
        server.connect_addr.unwrap(),
        server.health_addr.unwrap(),
    ];
    // No resting-state check: the test is about what the server leaves once dropped.
    drop(server);
    for addr in ports {
        assert!(
            bind_again(addr).await,
            "{addr} is bound again after the drop"
        );
    }
    assert!(!uds.exists(), "the CONNECT socket file is gone");
    assert!(!grpc.exists(), "the gRPC socket file is gone");
    assert!(
        eventually(WAIT, || agent.connected() == 0).await,
        "the agent saw its tunnel close"
    );
}

#[tokio::test]
async fn a_unix_socket_gets_mode_0770_and_nothing_is_left_beside_it() {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::new();
    let dir = tempdir("uds-mode");
    let path = dir.join("connect.socket");
    let mut cfg = server_config(&pki);
    cfg.uds_path = Some(path.clone());
    let server = tether_server::Server::start(cfg).await.unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o770);
    let beside: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(beside, vec![std::ffi::OsString::from("connect.socket")]);
    at_rest(&server, &[]).await;
    drop(server);
}

#[tokio::test]
async fn a_unix_socket_path_at_the_kernels_limit_still_binds() {
    // 107 bytes, the most a Unix socket path can have, with a file name of 12 characters or
    // more: the private directory it is bound in first must not push it over.
    let pki = Pki::new();
    let dir = tempdir("uds-long");
    let base = dir.as_os_str().len();
    assert!(base < 80, "{base}");
    let sub = dir.join("d".repeat(107 - base - "/".len() - "/konnectivity.sock".len()));
    std::fs::create_dir(&sub).unwrap();
    let path = sub.join("konnectivity.sock");
    assert_eq!(path.as_os_str().len(), 107, "{}", path.display());
    let mut cfg = server_config(&pki);
    cfg.uds_path = Some(path.clone());
    let server = tether_server::Server::start(cfg).await.unwrap();
    assert!(tokio::net::UnixStream::connect(&path).await.is_ok());
    at_rest(&server, &[]).await;
    drop(server);
}
