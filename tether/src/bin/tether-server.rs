//! tether-server: flags into configuration, nothing more.

/// jemalloc keeps freed pages for reuse (for 10 s by default), where glibc's malloc returns the
/// large read buffers of a busy tunnel to the kernel and faults them in again: that was a
/// tenth of the CPU time per byte (docs/BENCHMARKS.md).
#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tether::server::{Server, ServerConfig, parse_strategies};
use tether::{cli, tls};

/// The tether server: accepts agent tunnels and serves HTTP CONNECT to the nodes behind them.
/// Flags follow the Konnectivity server's names where the meaning is the same.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Frontend mode; only `http-connect` is supported (Konnectivity's `grpc` mode is not).
    #[arg(long, default_value = "http-connect")]
    mode: String,
    /// Serve the CONNECT frontend on this Unix socket (instead of, or besides, TCP).
    #[arg(long)]
    uds_name: Option<PathBuf>,
    /// Address of the CONNECT frontend on TCP.
    #[arg(long, default_value = "127.0.0.1")]
    server_bind_address: IpAddr,
    /// Port of the CONNECT frontend on TCP; 0 disables it when --uds-name is set.
    #[arg(long, default_value_t = 8090)]
    server_port: u16,
    /// Certificate of the CONNECT frontend (enables TLS on it).
    #[arg(long, requires = "server_key")]
    server_cert: Option<PathBuf>,
    /// Key of the CONNECT frontend.
    #[arg(long)]
    server_key: Option<PathBuf>,
    /// CA that signs CONNECT clients' certificates (requires mTLS on the frontend).
    #[arg(long, requires = "server_cert")]
    server_ca_cert: Option<PathBuf>,
    /// Address agents connect to.
    #[arg(long, default_value = "0.0.0.0")]
    agent_bind_address: IpAddr,
    /// Port agents connect to.
    #[arg(long, default_value_t = 8091)]
    agent_port: u16,
    /// Certificate presented to agents.
    #[arg(long)]
    cluster_cert: PathBuf,
    /// Key for --cluster-cert.
    #[arg(long)]
    cluster_key: PathBuf,
    /// CA that signs agents' client certificates; when set, agents must present one.
    #[arg(long)]
    cluster_ca_cert: Option<PathBuf>,
    /// File of accepted agent bearer tokens, one per line (`#` comments).
    #[arg(long)]
    agent_tokens_file: Option<PathBuf>,
    /// This server's id, sent to agents.
    #[arg(long, default_value = "tether-server")]
    server_id: String,
    /// How many servers agents should connect to (HA).
    #[arg(long, default_value_t = 1)]
    server_count: u16,
    /// Routing strategies, in order: destHost, defaultRoute, default.
    #[arg(long, default_value = "default")]
    proxy_strategies: String,
    /// How long a dial to a node may take before the client gets 504.
    #[arg(long, value_parser = cli::parse_duration, default_value = "10s")]
    backend_dial_timeout: Duration,
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, default_value = "127.0.0.1")]
    health_bind_address: IpAddr,
    /// Port for /healthz, /readyz and /metrics; 0 disables them.
    #[arg(long, default_value_t = 8092)]
    health_port: u16,
    #[command(flatten)]
    tunnel: cli::TunnelArgs,
    /// Runtime worker threads: 0 one per core, 1 everything on the main thread.
    #[arg(long, default_value_t = 0)]
    worker_threads: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = Args::parse();
    cli::init_logging("info");
    if a.mode != "http-connect" {
        return Err(format!("--mode {}: only http-connect is supported", a.mode).into());
    }
    let agent_tls = tls::server_config(
        &tls::read_pem(&a.cluster_cert)?,
        &tls::read_pem(&a.cluster_key)?,
        a.cluster_ca_cert
            .as_deref()
            .map(tls::read_pem)
            .transpose()?
            .as_deref(),
    )?;
    let connect_tls = match (&a.server_cert, &a.server_key) {
        (Some(c), Some(k)) => Some(tls::server_config(
            &tls::read_pem(c)?,
            &tls::read_pem(k)?,
            a.server_ca_cert
                .as_deref()
                .map(tls::read_pem)
                .transpose()?
                .as_deref(),
        )?),
        _ => None,
    };
    let tokens = match &a.agent_tokens_file {
        Some(p) => Some(
            std::fs::read_to_string(p)?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect::<HashSet<_>>(),
        ),
        None => None,
    };
    if tokens.is_none() && a.cluster_ca_cert.is_none() {
        tracing::warn!(
            "neither --cluster-ca-cert nor --agent-tokens-file: any agent that completes TLS is accepted"
        );
    }
    let config = ServerConfig {
        agent_addr: SocketAddr::new(a.agent_bind_address, a.agent_port),
        agent_tls,
        tokens,
        server_id: a.server_id,
        server_count: a.server_count,
        strategies: parse_strategies(&a.proxy_strategies)?,
        dial_timeout: a.backend_dial_timeout,
        session: a.tunnel.session(),
        connect_addr: (a.server_port != 0 || a.uds_name.is_none())
            .then(|| SocketAddr::new(a.server_bind_address, a.server_port)),
        connect_tls,
        uds_path: a.uds_name,
        health_addr: (a.health_port != 0)
            .then(|| SocketAddr::new(a.health_bind_address, a.health_port)),
        header_timeout: Duration::from_secs(10),
    };
    let rt = cli::runtime(a.worker_threads)?;
    rt.block_on(async {
        let server = Server::start(config).await?;
        cli::shutdown_signal().await;
        tracing::info!("shutting down: draining tunnels");
        server.shutdown(a.tunnel.drain_grace).await;
        Ok(())
    })
}
