//! Many idle streams at once, with agents and backends in child processes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether::tls;
use tether_agent::{Agent, AgentMetrics};
use tether_bench::backend_on;
use tether_bench::procs::{Error, Proc, anon_kib, free_port};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::setup::*;

/// `--role agents|backends --from A --to B`: agents `A..B` (or their backends) in a child
/// process. Prints `ready` once started, and exits when the parent closes its stdin (or after
/// an hour at most).
pub(crate) async fn role(role: &str, arg: &dyn Fn(&str) -> Option<String>) -> Result<(), Error> {
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
pub(crate) async fn role_ready(p: &mut Proc) -> Result<(), Error> {
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
pub(crate) struct Held {
    pub(crate) count: usize,
    pub(crate) processes: usize,
    pub(crate) server: (u64, u64),
    pub(crate) agents: (u64, u64),
}

/// A fresh server and `n` agents in child processes (and their backends in others); opens
/// `count` streams to agents round-robin, through the gRPC frontend (many calls on each
/// channel) or CONNECT (a connection each), sends each a byte and holds them idle.
pub(crate) async fn hold_streams(
    setup: &Setup,
    n: usize,
    count: usize,
    grpc: bool,
) -> Result<Held, Error> {
    use tether_server::client::grpc::{AuthorityStyle, GrpcClient};
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
