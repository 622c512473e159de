//! The quickstart: a throwaway CA, a tether server and agent, and a small HTTP backend, all on
//! loopback; a page fetched through the tunnel over HTTP CONNECT, 256 MiB moved through it and
//! directly (throughput of both), then the `curl` line to try by hand. Serves until Ctrl-C;
//! `--once` exits after the self-check.
//!
//! `cargo run --release --example quickstart [-- --once]`
#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tether::tls::{self, testpki::Ca};
use tether_agent::{Agent, AgentConfig, Allowlist};
use tether_proto::frame::Identifier;
use tether_server::client::connect::ClientStream;
use tether_server::{Server, ServerConfig, Strategy};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PAGE: &str = "<html><body><h1>Hello from behind the tunnel</h1></body></html>\n";
const BULK: u64 = 256 * 1024 * 1024;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// An HTTP/1.1 backend: `GET /` answers a page; `GET /bulk` streams BULK bytes.
async fn backend() -> Result<SocketAddr, Error> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut buf = vec![0u8; 4096];
                let mut have = 0;
                while !buf[..have].windows(4).any(|w| w == b"\r\n\r\n") && have < buf.len() {
                    match s.read(&mut buf[have..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => have += n,
                    }
                }
                let head = String::from_utf8_lossy(&buf[..have]).into_owned();
                if head.starts_with("GET /bulk") {
                    let _ = s
                        .write_all(
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {BULK}\r\n\r\n").as_bytes(),
                        )
                        .await;
                    let chunk = vec![0x5au8; 256 * 1024];
                    let mut left = BULK;
                    while left > 0 {
                        let n = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
                        if s.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                } else {
                    let _ = s
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\r\n{PAGE}",
                                PAGE.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// GET `path` from `backend` over `s` (already tunnelled, or direct); returns the body length
/// and the body when it is small.
async fn get<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    backend: SocketAddr,
    path: &str,
) -> Result<(u64, String), Error> {
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {backend}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 {
            return Err("connection closed in the response head".into());
        }
        head.push(byte[0]);
    }
    let mut total = 0u64;
    let mut small = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if small.len() < 4096 {
            small.extend_from_slice(&buf[..n.min(4096)]);
        }
    }
    Ok((total, String::from_utf8_lossy(&small).into_owned()))
}

/// Opens a tunnelled connection to `backend` through the server's CONNECT frontend.
async fn connect(frontend: SocketAddr, backend: SocketAddr) -> Result<ClientStream, Error> {
    Ok(tether_server::client::connect::client(frontend, &backend.to_string()).await?)
}

fn rate(bytes: u64, secs: f64) -> String {
    format!("{:.0} MiB/s", bytes as f64 / secs / (1024.0 * 1024.0))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let once = std::env::args().any(|a| a == "--once");
    tether_ops::cli::init_logging("warn");

    // 1. A throwaway CA: a server certificate and an agent client certificate (mTLS).
    let ca = Ca::new("tether quickstart CA");
    let server_pem = ca.leaf("tether-server", &["localhost", "127.0.0.1"]);
    let agent_pem = ca.leaf("quickstart-agent", &["quickstart-agent"]);

    // 2. The server: agents on one port, HTTP CONNECT on another, health on a third.
    let agent_tls = tls::server_config(
        server_pem.cert.as_bytes(),
        server_pem.key.as_bytes(),
        Some(ca.pem.cert.as_bytes()),
    )?;
    let server = Server::start(ServerConfig {
        server_id: "quickstart-server".into(),
        strategies: vec![Strategy::DestHost, Strategy::Default],
        health_addr: Some("127.0.0.1:0".parse()?),
        connect_addr: Some("127.0.0.1:0".parse()?),
        ..ServerConfig::new("127.0.0.1:0".parse()?, agent_tls)
    })
    .await?;

    // 3. The agent dials out to the server over mTLS.
    let agent_tls = tls::client_config(
        ca.pem.cert.as_bytes(),
        Some((agent_pem.cert.as_bytes(), agent_pem.key.as_bytes())),
    )?;
    let agent = Agent::start(AgentConfig {
        server_name: Some("localhost".into()),
        identifiers: vec![
            Identifier::Host("quickstart-agent".into()),
            Identifier::DefaultRoute,
        ],
        allowlist: Allowlist::parse("127.0.0.0/8")?,
        sync_interval: Duration::from_millis(200),
        ..AgentConfig::new(
            vec![server.agent_addr.to_string()],
            agent_tls,
            "quickstart-agent",
        )
    });
    if !server.wait_agents(1, Duration::from_secs(10)).await {
        return Err("the agent did not connect".into());
    }
    let _ = agent.connected();
    let backend = backend().await?;
    let frontend = server.connect_addr.ok_or("no CONNECT frontend")?;
    println!("tether quickstart");
    println!(
        "  server: agents on {}, HTTP CONNECT on {frontend}, health on {}",
        server.agent_addr,
        server.health_addr.ok_or("no health")?
    );
    println!("  agent:  connected over mTLS; backend on {backend}");

    // 4. A page through the tunnel.
    let (_, page) = get(connect(frontend, backend).await?, backend, "/").await?;
    if !page.contains("Hello from behind the tunnel") {
        return Err(format!("unexpected page: {page}").into());
    }
    println!("  fetched through the tunnel: {}", page.trim());

    // 5. 256 MiB directly and through the tunnel, in the same run.
    let start = Instant::now();
    let (direct_bytes, _) = get(TcpStream::connect(backend).await?, backend, "/bulk").await?;
    let direct = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let (tunnel_bytes, _) = get(connect(frontend, backend).await?, backend, "/bulk").await?;
    let tunnelled = start.elapsed().as_secs_f64();
    if direct_bytes != BULK || tunnel_bytes != BULK {
        return Err(format!(
            "moved {tunnel_bytes} through the tunnel and {direct_bytes} directly, wanted {BULK}"
        )
        .into());
    }
    println!(
        "  256 MiB through the tunnel: {} ({:.2} s); directly: {} ({:.2} s); ratio {:.0} %",
        rate(BULK, tunnelled),
        tunnelled,
        rate(BULK, direct),
        direct,
        100.0 * direct / tunnelled
    );
    println!();
    println!("Try it by hand:");
    println!("  curl -p -x http://{frontend} http://{backend}/");
    if once {
        agent.drain(Duration::from_secs(1)).await;
        server.shutdown(Duration::from_secs(1)).await;
        return Ok(());
    }
    println!("Serving until Ctrl-C.");
    tether_ops::cli::shutdown_signal().await;
    agent.drain(Duration::from_secs(2)).await;
    server.shutdown(Duration::from_secs(2)).await;
    Ok(())
}
