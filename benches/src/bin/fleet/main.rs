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

mod perf;
mod plot;
mod setup;
mod streams;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether::tls;
use tether_agent::{Agent, AgentMetrics};
use tether_bench::procs::{Error, binaries, cpu_seconds, free_port, rss_kib};
use tether_bench::{Pki, backend_on, quantile};
use tokio::net::TcpListener;

use perf::*;
use plot::*;
use setup::*;
use streams::*;

/// jemalloc, as in the binaries, so that the agents' memory is what `tether-agent`'s would be.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

pub(crate) struct Row {
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Error> {
    // As the binaries do, so the agents' memory here is what tether-agent's would be.
    tether_ops::cli::purge_in_background();
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
