//! The fleet runner: how a server's cost grows with its agents. One real `tether-server`
//! process; N agents from the library in this process, each with its own TLS tunnel, agent id
//! (`agent-i`) and identifiers (`host=agent-i`, `ipv4=127.1.x.y`), and each before its own
//! backend listening on its own loopback address. For each N it measures the server's memory
//! per idle tunnel, its CPU per idle tunnel per second (keepalives), the dial rate and
//! latency through the CONNECT frontend (Unix socket) with `destHost` routing to agents
//! chosen at random, the server's memory per tunnel again once every tunnel has carried a
//! 1 MiB download and gone idle, and the time for all N to come back after the server is
//! killed and restarted (the reconnect storm, paced by `--agent-accept-rate`). Prints
//! markdown and writes SVG plots (docs/BENCHMARKS.md).
//!
//! Then, at the largest N, it holds many idle streams at once, through the gRPC frontend (many
//! calls on a few channels) and through CONNECT (one connection each), and reports the
//! memory they cost the server and the agents. A process may hold 20,000 descriptors here, so
//! for this phase the agents run in child processes of this binary (`--role agents`), a slice
//! each, with their backends in others (`--role backends`): every process stays within its
//! open file limit, and the agents' memory is theirs alone.
//!
//! `cargo run -p tether-bench --release --bin fleet [-- --agents 1,10,100,1000,5000]
//! [--streams 100000] [--streams-only] [--plots DIR] [--perf DIR] [--quick]`
//!
//! `--perf DIR` profiles each N's first dial round with `perf record` (the server process and
//! this one), writing `fleet-{server,runner}-N.{data,txt}` there, and prints each round's CPU
//! per dial at both.
#![allow(clippy::print_stdout)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether::agent::{Agent, AgentConfig, AgentMetrics, Allowlist};
use tether::tls;
use tether_bench::procs::{
    Error, Proc, anon_kib, binaries, cpu_seconds, free_port, metric, rss_kib,
};
use tether_bench::{Pki, backend_on, connect_request, quantile};
use tether_proto::frame::Identifier;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};

/// jemalloc, as in the binaries, so that the agents' memory is what `tether-agent`'s would be.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Streams one agent process (or one backend process) holds at most: each is a descriptor,
/// and the open file limit may be as low as 20,000.
const STREAMS_PER_PROCESS: usize = 12_000;
/// gRPC calls per channel, below the server's `MAX_CALLS`.
const CALLS_PER_CHANNEL: usize = 9_000;

/// Agent i's loopback address: 127.1.0.1, 127.1.0.2, ... (every 127/8 address is local).
fn ip_of(i: usize) -> Ipv4Addr {
    let i = u32::try_from(i).unwrap_or(u32::MAX);
    Ipv4Addr::new(
        127,
        1,
        u8::try_from(i / 250).unwrap_or(255),
        u8::try_from(i % 250 + 1).unwrap_or(255),
    )
}

struct Setup {
    bin: PathBuf,
    dir: PathBuf,
    agent_port: u16,
    health_port: u16,
    socket: PathBuf,
    backend_port: u16,
    accept_rate: u32,
}

impl Setup {
    fn health(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.health_port))
    }

    fn grpc_socket(&self) -> PathBuf {
        self.dir.join("grpc.socket")
    }

    /// Agent `i`'s configuration: its own id, identifiers and loopback address.
    fn agent(
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
    fn start_role(
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

    fn start_server(&self) -> Result<Proc, Error> {
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
    async fn wait_up(&self) -> bool {
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
    async fn wait_agents(&self, n: usize, limit: Duration) -> Option<(Duration, f64)> {
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
async fn connect(socket: &Path, target: SocketAddr) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(socket).await?;
    connect_request(&mut s, target).await?;
    Ok(s)
}

/// Bytes each agent's tunnel carries in the "used" measurement.
const USED_BYTES: u64 = 1 << 20;

/// A download of [`USED_BYTES`] through every one of the `n` agents, 16 at a time: each
/// tunnel has then carried a transfer, as a node's tunnel has once any `kubectl logs` went
/// through it.
async fn use_every_tunnel(socket: &Path, n: usize, backend_port: u16) -> Result<(), Error> {
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
async fn dials(
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

/// `perf record` (cpu-clock samples, user space) on one process until stopped: where a dial
/// round's CPU goes, for `--perf DIR`.
struct Perf {
    child: std::process::Child,
    out: PathBuf,
}

impl Perf {
    fn start(pid: u32, out: PathBuf) -> Option<Perf> {
        let child = Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-F", "1999", "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| eprintln!("perf record: {e}"))
            .ok()?;
        Some(Perf { child, out })
    }

    /// Stops the recording (SIGINT, so perf writes its file), writes the flat profile beside
    /// it (`.txt`) and returns the share of the samples in each of [`AREAS`].
    fn stop(mut self) -> Result<Vec<f64>, Error> {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        self.child.wait()?;
        let report = Command::new("perf")
            .args(["report", "--stdio", "--no-children", "--sort", "symbol"])
            .args(["--percent-limit", "0", "-i"])
            .arg(&self.out)
            .stderr(Stdio::null())
            .output()?;
        let text = String::from_utf8_lossy(&report.stdout);
        std::fs::write(self.out.with_extension("txt"), text.as_bytes())?;
        let mut shares = vec![0.0; AREAS.len()];
        // Lines such as `    12.34%  [k] finish_task_switch`.
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let (Some(pct), Some(kind)) = (words.next(), words.next()) else {
                continue;
            };
            let Some(pct) = pct.strip_suffix('%').and_then(|p| p.parse::<f64>().ok()) else {
                continue;
            };
            let symbol: String = words.collect::<Vec<_>>().join(" ");
            shares[area(kind, &symbol)] += pct;
        }
        Ok(shares)
    }
}

/// Where a profile's samples fall, for `--perf`.
const AREAS: [&str; 7] = [
    "kernel",
    "TLS (rustls, aws-lc)",
    "tokio",
    "tether",
    "tracing",
    "allocator",
    "other",
];

/// The index in [`AREAS`] of a sample in `symbol` (`kind` is perf's `[k]` or `[.]`).
fn area(kind: &str, symbol: &str) -> usize {
    let has = |s: &str| symbol.contains(s);
    if kind == "[k]" {
        0
    } else if has("aws_lc") || has("rustls") {
        1
    } else if has("tracing") {
        4
    } else if has("rjem") || has("jemalloc") || has("malloc") {
        5
    } else if has("tokio::") {
        2
    } else if has("tether") {
        3
    } else {
        6
    }
}

struct Row {
    n: usize,
    connect_s: f64,
    rss_mib: f64,
    per_tunnel_kib: f64,
    per_tunnel_fresh_kib: f64,
    per_tunnel_used_kib: f64,
    cpu_us_per_tunnel_s: f64,
    dial_rate: f64,
    cpu_us_per_dial: f64,
    p50_us: f64,
    p99_us: f64,
    storm_s: f64,
    storm_peak: f64,
}

fn svg(path: &Path, title: &str, y: &str, series: &[(&str, Vec<(f64, f64)>)]) -> Result<(), Error> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (640, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let xmax = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let ymax = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.1))
        .fold(0.0f64, f64::max)
        * 1.2
        + 1e-9;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d((1f64..xmax * 1.5).log_scale(), 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("agents (log scale)")
        .y_desc(y)
        .draw()?;
    for (k, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(k).mix(0.9);
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// `--role agents|backends --from A --to B`: agents `A..B` (or their backends) in a child
/// process. Prints `ready` once started, and exits when the parent closes its stdin (or after
/// an hour at most).
async fn role(role: &str, arg: &dyn Fn(&str) -> Option<String>) -> Result<(), Error> {
    let num = |name: &str| -> Result<usize, Error> {
        Ok(arg(name).ok_or(format!("{name} is required"))?.parse()?)
    };
    let (from, to) = (num("--from")?, num("--to")?);
    let dir = PathBuf::from(arg("--dir").ok_or("--dir is required")?);
    let backend_port = u16::try_from(num("--backend-port")?)?;
    let setup = Setup {
        bin: PathBuf::new(),
        agent_port: u16::try_from(num("--agent-port")?)?,
        health_port: 0,
        socket: PathBuf::new(),
        backend_port,
        accept_rate: 0,
        dir: dir.clone(),
    };
    let mut agents = Vec::new();
    match role {
        "backends" => {
            for i in from..to {
                backend_on(TcpListener::bind(SocketAddr::from((ip_of(i), backend_port))).await?);
            }
        }
        "agents" => {
            let tls = tls::client_config(&std::fs::read(dir.join("ca.pem"))?, None)?;
            let metrics = Arc::new(AgentMetrics::new());
            agents = (from..to)
                .map(|i| Agent::start(setup.agent(i, &tls, &metrics)))
                .collect();
        }
        other => return Err(format!("unknown role {other}").into()),
    }
    println!("ready");
    let parent_gone = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    });
    let _ = tokio::time::timeout(Duration::from_secs(3600), parent_gone).await;
    drop(agents);
    // Not waiting for the blocking stdin read: the hour may have passed with it still open.
    std::process::exit(0)
}

/// Waits (at most 60 s) for a child started by [`Setup::start_role`] to print `ready`.
async fn role_ready(p: &mut Proc) -> Result<(), Error> {
    let out = p.child.stdout.take().ok_or("no stdout")?;
    let line = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line);
            line
        }),
    )
    .await??;
    if line.trim() == "ready" {
        Ok(())
    } else {
        Err(format!("a fleet child did not start: {line:?}").into())
    }
}

/// Memory with many idle streams: RSS in KiB before and after opening them.
struct Held {
    count: usize,
    processes: usize,
    server: (u64, u64),
    agents: (u64, u64),
}

/// A fresh server and `n` agents in child processes (and their backends in others); opens
/// `count` streams to agents round-robin, through the gRPC frontend (many calls on each
/// channel) or CONNECT (a connection each), sends each a byte and holds them idle.
async fn hold_streams(setup: &Setup, n: usize, count: usize, grpc: bool) -> Result<Held, Error> {
    use tether::server::grpc::client::{AuthorityStyle, GrpcClient};
    // Each child holds a descriptor per stream and per agent (or backend) of its slice.
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    let per_process = usize::try_from(soft)
        .unwrap_or(usize::MAX)
        .saturating_sub(1000)
        .clamp(1, STREAMS_PER_PROCESS);
    let slices = count.div_ceil(per_process).max(1);
    if slices > n || count > n * 1000 {
        return Err(format!(
            "{count} streams need more than {n} agents here ({per_process} streams per process, at most 1,000 per tunnel)"
        )
        .into());
    }
    let bounds: Vec<(usize, usize)> = (0..slices)
        .map(|k| (k * n / slices, (k + 1) * n / slices))
        .collect();
    let backend_port = free_port()?;
    let mut backends = Vec::new();
    for &(a, b) in &bounds {
        let mut p = setup.start_role("backends", a, b, backend_port)?;
        role_ready(&mut p).await?;
        backends.push(p);
    }
    let server = setup.start_server()?;
    if !setup.wait_up().await {
        return Err("the server did not start".into());
    }
    let mut agents = Vec::new();
    for &(a, b) in &bounds {
        let mut p = setup.start_role("agents", a, b, backend_port)?;
        role_ready(&mut p).await?;
        agents.push(p);
    }
    if setup
        .wait_agents(n, Duration::from_secs(300))
        .await
        .is_none()
    {
        return Err(format!("{n} agents did not all connect").into());
    }
    // Anonymous memory (heap and stacks): summed RSS would count the binary's shared code
    // pages once per agent process.
    let rss_all =
        |ps: &[Proc]| -> Result<u64, Error> { ps.iter().map(|p| anon_kib(p.pid())).sum() };
    // Past jemalloc's decay of what connecting left behind (10 s).
    tokio::time::sleep(Duration::from_secs(12)).await;
    let before = (anon_kib(server.pid())?, rss_all(&agents)?);
    let target = move |k: usize| SocketAddr::from((ip_of(k % n), backend_port));
    let mut channels = Vec::new();
    if grpc {
        for _ in 0..count.div_ceil(CALLS_PER_CHANNEL) {
            channels
                .push(GrpcClient::connect(&setup.grpc_socket(), AuthorityStyle::Localhost).await?);
        }
    }
    let mut calls = Vec::new();
    let mut conns = Vec::new();
    let mut opening = tokio::task::JoinSet::new();
    let mut next = 0usize;
    let deadline = Instant::now() + Duration::from_secs(600);
    while calls.len() + conns.len() < count {
        if Instant::now() > deadline {
            return Err("opening the streams took over 600 s".into());
        }
        while opening.len() < 256 && next < count {
            let hello = bytes::Bytes::from_static(b"E\0\0\0\0\0\0\0\0");
            let addr = target(next);
            if grpc {
                let ch = channels[next % channels.len()].clone();
                opening.spawn(async move {
                    let mut call = ch
                        .dial(&addr.to_string())
                        .await
                        .map_err(|e| e.to_string())?;
                    call.write(hello).await.map_err(|e| e.to_string())?;
                    Ok::<_, String>((Some(call), None))
                });
            } else {
                let socket = setup.socket.clone();
                opening.spawn(async move {
                    let mut s = connect(&socket, addr).await.map_err(|e| e.to_string())?;
                    s.write_all(&hello).await.map_err(|e| e.to_string())?;
                    Ok((None, Some(s)))
                });
            }
            next += 1;
        }
        let joined = tokio::time::timeout_at(deadline.into(), opening.join_next())
            .await
            .map_err(|_| "opening the streams took over 600 s")?;
        match joined {
            Some(r) => match r?? {
                (Some(call), _) => calls.push(call),
                (_, Some(conn)) => conns.push(conn),
                _ => {}
            },
            None => break,
        }
    }
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = (anon_kib(server.pid())?, rss_all(&agents)?);
    drop((calls, conns, channels, agents, backends, server));
    Ok(Held {
        count,
        processes: slices,
        server: (before.0, after.0),
        agents: (before.1, after.1),
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Error> {
    // As the binaries do, so the agents' memory here is what tether-agent's would be.
    tether::cli::purge_in_background();
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if let Some(r) = arg("--role") {
        return role(&r, &arg).await;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let streams_only = args.iter().any(|a| a == "--streams-only");
    let sizes: Vec<usize> = arg("--agents")
        .unwrap_or_else(|| {
            if quick {
                "1,10,100".into()
            } else {
                "1,10,100,1000,5000".into()
            }
        })
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let streams: usize = arg("--streams")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(if quick { 2000 } else { 100_000 });
    let plots = arg("--plots").map(PathBuf::from).filter(|_| !streams_only);
    let perf_dir = arg("--perf").map(PathBuf::from);
    if let Some(d) = &perf_dir {
        std::fs::create_dir_all(d)?;
    }
    // The fleet's sockets are in this process and its children, which inherit the limit:
    // raise the hard limit where allowed (root), else the soft one to the hard.
    let want = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    if rlimit::setrlimit(rlimit::Resource::NOFILE, want, want).is_err()
        && let Err(e) = rlimit::increase_nofile_limit(u64::MAX)
    {
        eprintln!("could not raise the open file limit: {e}");
    }
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    eprintln!("open file limit: {soft}");

    let bin = match arg("--bin-dir") {
        Some(d) => PathBuf::from(d),
        None => binaries()?,
    };
    let dir = std::env::temp_dir().join(format!("tether-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let pki = Pki::default();
    std::fs::write(dir.join("server.pem"), &pki.server.cert)?;
    std::fs::write(dir.join("server-key.pem"), &pki.server.key)?;
    std::fs::write(dir.join("tokens"), "fleet-token *\n")?;
    std::fs::write(dir.join("token"), "fleet-token")?;
    std::fs::write(dir.join("ca.pem"), &pki.ca.pem.cert)?;
    let setup = Setup {
        bin,
        agent_port: free_port()?,
        health_port: free_port()?,
        socket: dir.join("connect.socket"),
        backend_port: free_port()?,
        accept_rate: 1000,
        dir: dir.clone(),
    };
    let client_tls = tls::client_config(pki.ca.pem.cert.as_bytes(), None)?;
    let metrics = Arc::new(AgentMetrics::new());
    let mut rows = Vec::new();
    let max_n = sizes.iter().copied().max().unwrap_or(1);
    // One backend per agent address, shared by every size.
    for i in (0..max_n).filter(|_| !streams_only) {
        let l = TcpListener::bind(SocketAddr::from((ip_of(i), setup.backend_port))).await?;
        backend_on(l);
    }
    println!(
        "| agents | all connected after start | server RSS | RSS per tunnel (2 s after / settled / after 1 MiB through each) | CPU per idle tunnel | dials/s | dial p50 | dial p99 | server CPU per dial | back after a restart | most agents back in 1 s |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for &n in sizes.iter().filter(|_| !streams_only) {
        let mut server = setup.start_server()?;
        if !setup.wait_up().await {
            return Err("the server did not start".into());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let base = rss_kib(server.pid())?;
        let started = Instant::now();
        let agents: Vec<Agent> = (0..n)
            .map(|i| Agent::start(setup.agent(i, &client_tls, &metrics)))
            .collect();
        let Some((connect_time, _)) = setup.wait_agents(n, Duration::from_secs(300)).await else {
            return Err(format!("{n} agents did not all connect").into());
        };
        let _ = started;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = rss_kib(server.pid())?;
        let idle = if quick { 5 } else { 15 };
        let c0 = cpu_seconds(server.pid())?;
        tokio::time::sleep(Duration::from_secs(idle)).await;
        let c1 = cpu_seconds(server.pid())?;
        // Again after the idle time: what the connection storm left in the allocator's
        // caches has decayed (jemalloc returns dirty pages after about 10 s).
        let settled = rss_kib(server.pid())?;
        // The best of two rounds: the machine is shared.
        let mut best: Option<(Vec<Duration>, f64, f64)> = None;
        for round in 0..2 {
            // The first round profiled, if asked: the server and this runner (the agents,
            // the dialling client and the backends).
            let perf: Vec<Perf> = match &perf_dir {
                Some(d) if round == 0 => [("server", server.pid()), ("runner", std::process::id())]
                    .into_iter()
                    .filter_map(|(who, pid)| {
                        Perf::start(pid, d.join(format!("fleet-{who}-{n}.data")))
                    })
                    .collect(),
                _ => Vec::new(),
            };
            if !perf.is_empty() {
                // perf attaches after it starts.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let runner_cpu = cpu_seconds(std::process::id())?;
            let cpu = cpu_seconds(server.pid())?;
            let (lat, rate) = dials(
                &setup.socket,
                n,
                setup.backend_port,
                16,
                if quick { 800 } else { 4000 },
            )
            .await?;
            // The server's own CPU per dial: what routing among n agents costs it, apart
            // from the machine the runner shares with it.
            // Less the keepalives of n idle tunnels over the round, measured just before.
            let keepalives = (c1 - c0) / idle as f64 * (lat.len() as f64 / rate);
            let cpu = ((cpu_seconds(server.pid())? - cpu - keepalives) / lat.len() as f64).max(0.0);
            let runner_cpu = (cpu_seconds(std::process::id())? - runner_cpu) / lat.len() as f64;
            for (who, p) in ["server", "runner"].into_iter().zip(perf) {
                let shares = p.stop()?;
                let row: Vec<String> = AREAS
                    .iter()
                    .zip(&shares)
                    .map(|(a, v)| format!("{a} {v:.1} %"))
                    .collect();
                eprintln!("{n} agents, {who} profile: {}", row.join(", "));
            }
            if perf_dir.is_some() {
                eprintln!(
                    "{n} agents, round {round}: {rate:.0} dials/s, server CPU {:.0} µs/dial, runner CPU {:.0} µs/dial",
                    cpu * 1e6,
                    runner_cpu * 1e6
                );
            }
            if best.as_ref().is_none_or(|b| rate > b.1) {
                best = Some((lat, rate, cpu));
            }
        }
        let (lat, rate, cpu_per_dial) = best.expect("two rounds ran");
        // Every tunnel carries a transfer, then all idle past the allocator's decay and the
        // tunnels' quiet time: what a used tunnel keeps.
        use_every_tunnel(&setup.socket, n, setup.backend_port).await?;
        tokio::time::sleep(Duration::from_secs(if quick { 5 } else { 12 })).await;
        let used = rss_kib(server.pid())?;
        eprintln!(
            "{n} agents, after use: RSS {used} KiB, of which lazily freed {} KiB",
            tether_bench::procs::proc_kib(
                &format!("/proc/{}/smaps_rollup", server.pid()),
                "LazyFree"
            )?
        );
        // The reconnect storm: the server dies and comes back on the same ports.
        drop(server);
        server = setup.start_server()?;
        let Some((storm, peak)) = setup.wait_agents(n, Duration::from_secs(300)).await else {
            return Err(format!("{n} agents did not all come back").into());
        };
        let row = Row {
            n,
            connect_s: connect_time.as_secs_f64(),
            rss_mib: settled as f64 / 1024.0,
            per_tunnel_kib: settled.saturating_sub(base) as f64 / n as f64,
            per_tunnel_fresh_kib: rss.saturating_sub(base) as f64 / n as f64,
            per_tunnel_used_kib: used.saturating_sub(base) as f64 / n as f64,
            cpu_us_per_tunnel_s: (c1 - c0) / idle as f64 / n as f64 * 1e6,
            dial_rate: rate,
            cpu_us_per_dial: cpu_per_dial * 1e6,
            p50_us: quantile(&lat, 500).as_secs_f64() * 1e6,
            p99_us: quantile(&lat, 990).as_secs_f64() * 1e6,
            storm_s: storm.as_secs_f64(),
            storm_peak: peak,
        };
        println!(
            "| {} | {:.1} s | {:.1} MiB | {:.1} / {:.1} / {:.1} KiB | {:.1} µs/s | {:.0} | {:.0} µs | {:.0} µs | {:.0} µs | {:.1} s | {:.0} |",
            row.n,
            row.connect_s,
            row.rss_mib,
            row.per_tunnel_fresh_kib,
            row.per_tunnel_kib,
            row.per_tunnel_used_kib,
            row.cpu_us_per_tunnel_s,
            row.dial_rate,
            row.p50_us,
            row.p99_us,
            row.cpu_us_per_dial,
            row.storm_s,
            row.storm_peak
        );
        rows.push(row);
        for a in &agents {
            a.drain(Duration::ZERO).await;
        }
        drop(agents);
        drop(server);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let Some(out) = plots {
        std::fs::create_dir_all(&out)?;
        let pts =
            |f: &dyn Fn(&Row) -> f64| rows.iter().map(|r| (r.n as f64, f(r))).collect::<Vec<_>>();
        // From 1,000 agents on: below that the fixed costs, spread over few tunnels, are most
        // of the figure.
        let at_scale = |f: &dyn Fn(&Row) -> f64| {
            rows.iter()
                .filter(|r| r.n >= 1000)
                .map(|r| (r.n as f64, f(r)))
                .collect::<Vec<_>>()
        };
        svg(
            &out.join("fleet-memory.svg"),
            "Server memory per agent tunnel, idle and used",
            "KiB per tunnel",
            &[
                ("idle", at_scale(&|r| r.per_tunnel_kib)),
                (
                    "idle after 1 MiB through each",
                    at_scale(&|r| r.per_tunnel_used_kib),
                ),
            ],
        )?;
        svg(
            &out.join("fleet-dial.svg"),
            "Dial latency through CONNECT, destHost to a random agent",
            "µs",
            &[
                ("p50", pts(&|r| r.p50_us)),
                ("p99", pts(&|r| r.p99_us)),
                ("server CPU per dial", pts(&|r| r.cpu_us_per_dial)),
            ],
        )?;
        svg(
            &out.join("fleet-reconnect.svg"),
            "All agents back after a server restart",
            "seconds",
            &[("reconnect storm", pts(&|r| r.storm_s))],
        )?;
        eprintln!("plots written to {}", out.display());
    }
    if streams > 0 {
        // CONNECT holds a descriptor in the server per stream, and the server holds one per
        // tunnel: as many as fit.
        let fit = usize::try_from(soft)
            .unwrap_or(usize::MAX)
            .saturating_sub(max_n + 500);
        println!(
            "\n| frontend | idle streams | agents (processes) | server before → after | server per stream | agents before → after | agents per stream | server + agents |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
        for (grpc, count) in [(true, streams), (false, streams.min(fit))] {
            let h = match hold_streams(&setup, max_n, count, grpc).await {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("holding {count} streams failed: {e}");
                    continue;
                }
            };
            let per = |b: u64, a: u64| a.saturating_sub(b) as f64 / h.count as f64;
            let mib = |k: u64| k as f64 / 1024.0;
            println!(
                "| {} | {} | {} ({}) | {:.1} → {:.1} MiB | {:.1} KiB | {:.1} → {:.1} MiB | {:.1} KiB | {:.2} GiB |",
                if grpc {
                    "gRPC (calls on 9,000-call channels)"
                } else {
                    "CONNECT (Unix socket)"
                },
                h.count,
                max_n,
                h.processes,
                mib(h.server.0),
                mib(h.server.1),
                per(h.server.0, h.server.1),
                mib(h.agents.0),
                mib(h.agents.1),
                per(h.agents.0, h.agents.1),
                (h.server.1 + h.agents.1) as f64 / 1024.0 / 1024.0,
            );
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
