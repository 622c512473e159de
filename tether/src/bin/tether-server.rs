//! tether-server: flags into configuration, nothing more.

/// jemalloc keeps freed pages for reuse (for 10 s by default), where glibc's malloc returns the
/// large read buffers of a busy tunnel to the kernel and faults them in again: that was a
/// tenth of the CPU time per byte (docs/BENCHMARKS.md).
#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tether::server::{
    AddressClaims, HostClaims, IdRule, IdentityPolicy, Server, ServerConfig, Tokens,
    parse_strategies,
};
use tether::{cli, tls};

/// The tether server: accepts agent tunnels and serves HTTP CONNECT to the nodes behind them.
/// Flags follow the Konnectivity server's names where the meaning is the same.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Frontend mode; only `http-connect` is supported (Konnectivity's `grpc` mode is not).
    #[arg(long, default_value = "http-connect")]
    mode: String,
    /// Serve the CONNECT frontend on this Unix socket. With it, the TCP frontend is off unless
    /// --server-port is given.
    #[arg(long)]
    uds_name: Option<PathBuf>,
    /// Address of the CONNECT frontend on TCP.
    #[arg(long, default_value = "127.0.0.1")]
    server_bind_address: IpAddr,
    /// Port of the CONNECT frontend on TCP (8090 when --uds-name is not set; 0 disables it).
    #[arg(long)]
    server_port: Option<u16>,
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
    /// File of accepted agent bearer tokens: `<token> <agent-id>` per line (`*` for any id;
    /// `#` comments). A token is good only for the agent id it names.
    #[arg(long)]
    agent_tokens_file: Option<PathBuf>,
    /// How an agent's id is bound to its credential: `credential` (the client certificate's
    /// common name or a DNS name, and the id its token names) or `any` (for fleets that share
    /// one credential).
    #[arg(long, default_value = "credential")]
    agent_id_rule: IdRule,
    /// Which `host=` identifiers an agent may claim: `own` (only its agent id) or `any`.
    #[arg(long, default_value = "own")]
    host_identifiers: HostClaims,
    /// Which ipv4/ipv6/cidr/default-route identifiers an agent may claim: `any`, `cert` (ipv4
    /// and ipv6 in its client certificate only) or `none`.
    #[arg(long, default_value = "any")]
    address_identifiers: AddressClaims,
    /// Tunnels one agent id may hold to this server at once (default: --server-count); a
    /// newer tunnel replaces the oldest.
    #[arg(long)]
    max_tunnels_per_agent: Option<usize>,
    /// Agent connections that may be in their TLS handshake or HELLO at once.
    #[arg(long, default_value_t = 256)]
    max_pending_handshakes: usize,
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
    cli::raise_fd_limit();
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
            Tokens::parse(&std::fs::read_to_string(p)?)
                .map_err(|e| format!("{}: {e}", p.display()))?,
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
        identity: IdentityPolicy {
            id_rule: a.agent_id_rule,
            host_claims: a.host_identifiers,
            address_claims: a.address_identifiers,
        },
        max_tunnels_per_agent: a
            .max_tunnels_per_agent
            .unwrap_or(usize::from(a.server_count.max(1))),
        max_handshakes: a.max_pending_handshakes,
        server_id: a.server_id,
        server_count: a.server_count,
        strategies: parse_strategies(&a.proxy_strategies)?,
        dial_timeout: a.backend_dial_timeout,
        session: a.tunnel.session(),
        // With --uds-name alone the TCP frontend stays off: it is unauthenticated.
        connect_addr: match (a.server_port, &a.uds_name) {
            (Some(0), _) | (None, Some(_)) => None,
            (Some(port), _) => Some(SocketAddr::new(a.server_bind_address, port)),
            (None, None) => Some(SocketAddr::new(a.server_bind_address, 8090)),
        },
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
