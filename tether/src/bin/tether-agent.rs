//! tether-agent: flags into configuration, nothing more.

/// jemalloc, as in tether-server (docs/ARCHITECTURE.md, "Read buffers").
#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tether::agent::{Agent, AgentConfig, Allowlist};
use tether::{cli, tls};

/// The tether agent: dials out to the tether servers and connects their streams to local
/// destinations. Flags follow the Konnectivity agent's names where the meaning is the same.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Server host (or a load balancer before several servers).
    #[arg(long, default_value = "127.0.0.1")]
    proxy_server_host: String,
    /// Server port.
    #[arg(long, default_value_t = 8091)]
    proxy_server_port: u16,
    /// More servers, `host:port`, comma-separated.
    #[arg(long, value_delimiter = ',')]
    extra_proxy_servers: Vec<String>,
    /// The name the server certificate must carry (default: --proxy-server-host).
    #[arg(long)]
    proxy_server_name: Option<String>,
    /// CA that signed the servers' certificate.
    #[arg(long)]
    ca_cert: PathBuf,
    /// Client certificate presented to the servers (mTLS).
    #[arg(long, requires = "agent_key")]
    agent_cert: Option<PathBuf>,
    /// Key for --agent-cert.
    #[arg(long)]
    agent_key: Option<PathBuf>,
    /// This agent's id (default: the host name).
    #[arg(long)]
    agent_id: Option<String>,
    /// What this agent serves: `ipv4=..&ipv6=..&host=..&cidr=..&default-route=true`.
    #[arg(long, default_value = "")]
    agent_identifiers: String,
    /// First reconnect delay (doubles up to --sync-interval-cap, with jitter).
    #[arg(long, value_parser = cli::parse_duration, default_value = "1s")]
    sync_interval: Duration,
    /// Longest reconnect delay.
    #[arg(long, value_parser = cli::parse_duration, default_value = "10s")]
    sync_interval_cap: Duration,
    /// A file holding a bearer token sent to the servers (read at each connection).
    #[arg(long)]
    service_account_token_path: Option<PathBuf>,
    /// Destinations that may be dialled, comma-separated: `10.0.0.0/8:10250`, `*.svc:443`,
    /// `node-1`, `*:22`. Empty: everything (logged). Loopback, link-local, metadata and
    /// unspecified addresses, asked for or resolved from a name, only where an IP rule inside
    /// their range names them (`127.0.0.1:8080`; `0.0.0.0/0` does not).
    #[arg(long, default_value = "")]
    allowed_destinations: String,
    /// How long a dial to a destination may take.
    #[arg(long, value_parser = cli::parse_duration, default_value = "10s")]
    dial_timeout: Duration,
    #[command(flatten)]
    tunnel: cli::TunnelArgs,
    /// Runtime worker threads: 1 everything on the main thread (an agent serves few tunnels; one
    /// thread costs the node least), 0 one per core.
    #[arg(long, default_value_t = 1)]
    worker_threads: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = Args::parse();
    cli::init_logging("info");
    cli::raise_fd_limit();
    let client_cert = match (&a.agent_cert, &a.agent_key) {
        (Some(c), Some(k)) => Some((tls::read_pem(c)?, tls::read_pem(k)?)),
        _ => None,
    };
    let tls = tls::client_config(
        &tls::read_pem(&a.ca_cert)?,
        client_cert.as_ref().map(|(c, k)| (&c[..], &k[..])),
    )?;
    let agent_id = a.agent_id.unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "tether-agent".to_owned())
    });
    let mut servers = vec![format!("{}:{}", a.proxy_server_host, a.proxy_server_port)];
    servers.extend(a.extra_proxy_servers);
    let config = AgentConfig {
        servers,
        server_name: a.proxy_server_name,
        tls,
        agent_id,
        identifiers: cli::parse_identifiers(&a.agent_identifiers)?,
        token_path: a.service_account_token_path,
        allowlist: Allowlist::parse(&a.allowed_destinations)?,
        dial_timeout: a.dial_timeout,
        sync_interval: a.sync_interval,
        sync_interval_cap: a.sync_interval_cap,
        session: a.tunnel.session(),
    };
    let rt = cli::runtime(a.worker_threads)?;
    rt.block_on(async {
        let agent = Agent::start(config);
        cli::shutdown_signal().await;
        tracing::info!("shutting down: draining tunnels");
        agent.drain(a.tunnel.drain_grace).await;
    });
    Ok(())
}
