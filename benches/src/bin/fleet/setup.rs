//! The fleet's pieces: a server process, agents in this process, their backends, and the
//! dials and transfers that load them.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_agent::{AgentConfig, AgentMetrics, Allowlist};
use tether_bench::connect_request;
use tether_bench::procs::{Error, Proc, metric};
use tether_proto::frame::Identifier;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Streams one agent process (or one backend process) holds at most: each is a descriptor,
/// and the open file limit may be as low as 20,000.
pub(crate) const STREAMS_PER_PROCESS: usize = 12_000;
/// gRPC calls per channel, below the server's `MAX_CALLS`.
pub(crate) const CALLS_PER_CHANNEL: usize = 9_000;

/// Agent i's loopback address: 127.1.0.1, 127.1.0.2, ... (every 127/8 address is local).
pub(crate) fn ip_of(i: usize) -> Ipv4Addr {
    let i = u32::try_from(i).unwrap_or(u32::MAX);
    Ipv4Addr::new(
        127,
        1,
        u8::try_from(i / 250).unwrap_or(255),
        u8::try_from(i % 250 + 1).unwrap_or(255),
    )
}

pub(crate) struct Setup {
    pub(crate) bin: PathBuf,
    pub(crate) dir: PathBuf,
    pub(crate) agent_port: u16,
    pub(crate) health_port: u16,
    pub(crate) socket: PathBuf,
    pub(crate) backend_port: u16,
    pub(crate) accept_rate: u32,
}

impl Setup {
    pub(crate) fn health(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.health_port))
    }

    pub(crate) fn grpc_socket(&self) -> PathBuf {
        self.dir.join("grpc.socket")
    }

    /// Agent `i`'s configuration: its own id, identifiers and loopback address.
    pub(crate) fn agent(
        &self,
        i: usize,
        tls: &Arc<rustls::ClientConfig>,
        metrics: &Arc<AgentMetrics>,
    ) -> AgentConfig {
        let mut c = AgentConfig::new(
            vec![format!("127.0.0.1:{}", self.agent_port)],
            tls.clone(),
            format!("agent-{i}"),
        );
        c.server_name = Some("localhost".into());
        c.identifiers = vec![
            Identifier::Host(format!("agent-{i}")),
            Identifier::Ipv4(ip_of(i)),
        ];
        c.token_path = Some(self.dir.join("token"));
        c.allowlist = Allowlist::parse("127.0.0.0/8").expect("static allowlist");
        c.metrics = metrics.clone();
        c
    }

    /// Starts this binary as a child with `--role role` for agents `from..to`.
    pub(crate) fn start_role(
        &self,
        role: &str,
        from: usize,
        to: usize,
        backend_port: u16,
    ) -> Result<Proc, Error> {
        Ok(Proc {
            child: Command::new(std::env::current_exe()?)
                .args(["--role", role])
                .args(["--from", &from.to_string(), "--to", &to.to_string()])
                .args(["--agent-port", &self.agent_port.to_string()])
                .args(["--backend-port", &backend_port.to_string()])
                .arg("--dir")
                .arg(&self.dir)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?,
        })
    }

    pub(crate) fn start_server(&self) -> Result<Proc, Error> {
        let _ = std::fs::remove_file(&self.socket);
        Ok(Proc {
            child: Command::new(self.bin.join("tether-server"))
                .args(["--agent-bind-address", "127.0.0.1"])
                .args(["--agent-port", &self.agent_port.to_string()])
                .args(["--health-port", &self.health_port.to_string()])
                .arg("--uds-name")
                .arg(&self.socket)
                .arg("--grpc-uds-name")
                .arg(self.grpc_socket())
                .arg("--cluster-cert")
                .arg(self.dir.join("server.pem"))
                .arg("--cluster-key")
                .arg(self.dir.join("server-key.pem"))
                .arg("--agent-tokens-file")
                .arg(self.dir.join("tokens"))
                .args(["--proxy-strategies", "destHost,default"])
                .args(["--agent-accept-rate", &self.accept_rate.to_string()])
                .args(["--max-pending-handshakes", "256"])
                .env("RUST_LOG", "error")
                .stdout(Stdio::null())
                .spawn()?,
        })
    }

    /// Waits until the server answers on its health port.
    pub(crate) async fn wait_up(&self) -> bool {
        for _ in 0..500 {
            if metric(self.health(), "tether_agents").await.is_some() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Waits until `n` agents are connected, at most `limit`; returns the time it took and
    /// the most agents that connected within any one second.
    pub(crate) async fn wait_agents(&self, n: usize, limit: Duration) -> Option<(Duration, f64)> {
        let start = Instant::now();
        let mut samples: Vec<(Instant, f64)> = Vec::new();
        while start.elapsed() < limit {
            let now = metric(self.health(), "tether_agents").await.unwrap_or(0.0);
            samples.push((Instant::now(), now));
            if now >= n as f64 {
                let mut peak = 0.0f64;
                for (i, (t, c)) in samples.iter().enumerate() {
                    let before = samples[..i]
                        .iter()
                        .rev()
                        .find(|(u, _)| t.duration_since(*u) >= Duration::from_secs(1))
                        .map_or(0.0, |(_, c0)| *c0);
                    peak = peak.max(c - before);
                }
                return Some((start.elapsed(), peak));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

/// One CONNECT through the Unix socket to `target`; returns the stream after the 200.
pub(crate) async fn connect(socket: &Path, target: SocketAddr) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(socket).await?;
    connect_request(&mut s, target).await?;
    Ok(s)
}

/// Bytes each agent's tunnel carries in the "used" measurement.
pub(crate) const USED_BYTES: u64 = 1 << 20;

/// A download of [`USED_BYTES`] through every one of the `n` agents, 16 at a time: each
/// tunnel has then carried a transfer, as a node's tunnel has once any `kubectl logs` went
/// through it.
pub(crate) async fn use_every_tunnel(
    socket: &Path,
    n: usize,
    backend_port: u16,
) -> Result<(), Error> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (socket, next) = (socket.to_path_buf(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, std::io::Error>(());
                }
                let mut s = connect(&socket, SocketAddr::from((ip_of(i), backend_port))).await?;
                let mut cmd = [0u8; 9];
                cmd[0] = b'D';
                cmd[1..].copy_from_slice(&USED_BYTES.to_be_bytes());
                s.write_all(&cmd).await?;
                let got = tokio::io::copy(&mut s, &mut tokio::io::sink()).await?;
                if got != USED_BYTES {
                    return Err(std::io::Error::other(format!("agent {i}: {got} bytes")));
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// `count` dials, `concurrency` at a time, each to an agent chosen at random, timed from the
/// connection to the first echoed byte; returns the sorted latencies and the dials per second.
pub(crate) async fn dials(
    socket: &Path,
    n: usize,
    backend_port: u16,
    concurrency: usize,
    count: usize,
) -> Result<(Vec<Duration>, f64), Error> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let socket = socket.to_path_buf();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(count / concurrency);
            for _ in 0..count / concurrency {
                let i = rand::random_range(0..n);
                let t = Instant::now();
                let mut s = connect(&socket, SocketAddr::from((ip_of(i), backend_port))).await?;
                s.write_all(b"E\0\0\0\0\0\0\0\0x").await?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await?;
                out.push(t.elapsed());
            }
            Ok::<_, std::io::Error>(out)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let rate = all.len() as f64 / start.elapsed().as_secs_f64();
    all.sort();
    Ok((all, rate))
}
