//! The benchmark report: starts real `tether-server` and `tether-agent` processes on loopback
//! and measures, in one run, throughput beside direct TCP and yamux, dial latency, CPU per GiB
//! of each process, memory per idle tunnelled connection, and a stalled stream's effect on
//! another. Prints markdown for docs/BENCHMARKS.md.
//!
//! `cargo run -p tether-bench --release --bin report [-- --quick]`
#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tether_bench::procs::{
    Error, Proc, anon_kib, binaries, cpu_seconds, free_port, ready, rss_kib,
};
use tether_bench::{
    Pki, Via, backend, dial_latency, frontend_clients, quantile, tether_in_process, throughput,
    yamux_pair,
};
use tokio::io::AsyncWriteExt;

mod peers;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// A server and an agent process. With `tls_frontend`, the CONNECT frontend on TCP is TLS
/// (with session tickets, as the binary sets it up).
async fn start_tether(
    bin: &Path,
    dir: &Path,
    pki: &Pki,
    tls_frontend: bool,
) -> Result<(Proc, Proc, SocketAddr, PathBuf), Error> {
    let write = |name: &str, body: &str| -> Result<PathBuf, Error> {
        let p = dir.join(name);
        std::fs::write(&p, body)?;
        Ok(p)
    };
    let ca = write("ca.pem", &pki.ca.pem.cert)?;
    let scert = write("server.pem", &pki.server.cert)?;
    let skey = write("server-key.pem", &pki.server.key)?;
    let acert = write("agent.pem", &pki.agent.cert)?;
    let akey = write("agent-key.pem", &pki.agent.key)?;
    let (connect, agents, health) = (free_port()?, free_port()?, free_port()?);
    let server = Proc {
        child: Command::new(bin.join("tether-server"))
            .args([
                "--agent-bind-address",
                "127.0.0.1",
                "--agent-port",
                &agents.to_string(),
            ])
            .args([
                "--server-port",
                &connect.to_string(),
                "--health-port",
                &health.to_string(),
            ])
            .arg("--grpc-uds-name")
            .arg(dir.join("grpc.socket"))
            .args(if tls_frontend {
                vec![
                    "--server-cert".into(),
                    scert.clone().into_os_string(),
                    "--server-key".into(),
                    skey.clone().into_os_string(),
                ]
            } else {
                Vec::new()
            })
            .arg("--cluster-cert")
            .arg(&scert)
            .arg("--cluster-key")
            .arg(&skey)
            .arg("--cluster-ca-cert")
            .arg(&ca)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?,
    };
    let agent = Proc {
        child: Command::new(bin.join("tether-agent"))
            .args([
                "--proxy-server-host",
                "127.0.0.1",
                "--proxy-server-port",
                &agents.to_string(),
            ])
            .args([
                "--proxy-server-name",
                "localhost",
                "--agent-id",
                "bench-agent",
            ])
            .arg("--ca-cert")
            .arg(&ca)
            .arg("--agent-cert")
            .arg(&acert)
            .arg("--agent-key")
            .arg(&akey)
            .args([
                "--allowed-destinations",
                "127.0.0.0/8",
                "--sync-interval",
                "100ms",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?,
    };
    if !ready(SocketAddr::from(([127, 0, 0, 1], health))).await {
        return Err("the server never became ready".into());
    }
    Ok((
        server,
        agent,
        SocketAddr::from(([127, 0, 0, 1], connect)),
        dir.join("grpc.socket"),
    ))
}

pub(crate) fn mibs(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / (1024.0 * 1024.0)
}

/// Dial latency through each path, one at a time and 64 at a time (`many` dials then), as a
/// markdown table.
async fn dial_table(
    paths: &[Via],
    backend: SocketAddr,
    quick: bool,
    many: usize,
) -> Result<(), Error> {
    println!("| path | concurrency | dials | p50 | p99 | dials/s |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for via in paths {
        for (concurrency, count) in [
            (1usize, if quick { 200 } else { 2000 }),
            (64, if quick { 1280 } else { many }),
        ] {
            let start = Instant::now();
            let lat = dial_latency(via, backend, concurrency, count).await?;
            let rate = lat.len() as f64 / start.elapsed().as_secs_f64();
            println!(
                "| {} | {concurrency} | {} | {:.0} µs | {:.0} µs | {:.0} |",
                via.name(),
                lat.len(),
                quantile(&lat, 500).as_secs_f64() * 1e6,
                quantile(&lat, 990).as_secs_f64() * 1e6,
                rate
            );
        }
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--only throughput,cpu,dial,memory,hol`: run just those sections (for profiling).
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let run = |section: &str| {
        only.as_ref()
            .is_none_or(|o| o.split(',').any(|s| s == section))
    };
    // `--bin-dir DIR`: use the tether-server and tether-agent already built there (to compare
    // builds) instead of building them.
    let bin = match args.iter().position(|a| a == "--bin-dir") {
        Some(i) => PathBuf::from(args.get(i + 1).ok_or("--bin-dir needs a directory")?),
        None => binaries()?,
    };
    let dir = std::env::temp_dir().join(format!("tether-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let pki = Pki::default();
    let backend = backend().await?;
    let (server, agent, frontend, grpc_socket) = start_tether(&bin, &dir, &pki, false).await?;
    let yamux = yamux_pair(&pki, backend).await?;
    // Idle: before any transfer has grown the allocators' pools.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = rss_kib(server.pid())? + rss_kib(agent.pid())?;
    let idle_anon = anon_kib(server.pid())? + anon_kib(agent.pid())?;
    // tether and its agent in this process as well, reached through the library's dial API:
    // the same shape as the yamux path, for a like-for-like multiplexer comparison.
    let (embedded, _embedded_agent) = tether_in_process(&pki).await?;
    let paths = [
        Via::Direct,
        Via::Tether(frontend),
        Via::Dial(std::sync::Arc::new(embedded)),
        Via::Yamux(yamux),
        Via::Grpc(grpc_socket),
    ];
    let total: u64 = if quick { 64 << 20 } else { 512 << 20 };

    if run("throughput") {
        println!(
            "## Throughput (MiB/s; {} MiB per run, best of 3)\n",
            total >> 20
        );
        println!(
            "| direction | streams | direct TCP | tether | tether (dial API) | yamux | tether gRPC | tether / direct | dial API / yamux | gRPC / CONNECT |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        for (download, dir_name) in [(true, "download"), (false, "upload")] {
            for streams in [1usize, 16] {
                let mut rates = Vec::new();
                for via in &paths {
                    let mut best = Duration::MAX;
                    for _ in 0..3 {
                        best = best.min(throughput(via, backend, download, streams, total).await?);
                    }
                    rates.push(mibs(total, best));
                }
                println!(
                    "| {dir_name} | {streams} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} % | {:.2}× | {:.2}× |",
                    rates[0],
                    rates[1],
                    rates[2],
                    rates[3],
                    rates[4],
                    100.0 * rates[1] / rates[0],
                    rates[2] / rates[3],
                    rates[4] / rates[1]
                );
            }
        }
    }

    if run("cpu") {
        println!("\n## CPU per GiB moved (seconds of user + system time; median of 5 runs)\n");
        println!("| direction | tether-server | tether-agent | both |");
        println!("| --- | --- | --- | --- |");
        let gib: u64 = if quick { 256 << 20 } else { 1 << 30 };
        let per = GIB / gib as f64;
        for (download, dir_name) in [(true, "download"), (false, "upload")] {
            // Runs on a shared 2-core machine vary by ±15 %: the median of five, by total.
            let mut runs = Vec::new();
            for _ in 0..5 {
                let (s0, a0) = (cpu_seconds(server.pid())?, cpu_seconds(agent.pid())?);
                throughput(&paths[1], backend, download, 4, gib).await?;
                let (s1, a1) = (cpu_seconds(server.pid())?, cpu_seconds(agent.pid())?);
                runs.push(((s1 - s0) * per, (a1 - a0) * per));
            }
            runs.sort_by(|x, y| (x.0 + x.1).total_cmp(&(y.0 + y.1)));
            let (s, a) = runs[runs.len() / 2];
            println!("| {dir_name} | {s:.2} | {a:.2} | {:.2} |", s + a);
        }
    }

    if run("dial") {
        println!("\n## Dial latency (connect → first echoed byte)\n");
        dial_table(&paths, backend, quick, 12_800).await?;
    }

    if run("memory") {
        println!("\n## Memory\n");
        let before = rss_kib(server.pid())? + rss_kib(agent.pid())?;
        let n = 1000usize;
        let mut held = Vec::with_capacity(n);
        let mut loaded = Vec::new();
        // Measured at 500 and at 1000: the first figure depends on what the allocators kept
        // from the transfers above, the second half's is what one more connection costs.
        // (1000 is within the default MAX_CONCURRENT_STREAMS of 1024 per tunnel.)
        for _ in 0..2 {
            for _ in 0..n / 2 {
                let mut s = paths[1].open(backend).await?;
                s.write_all(b"E\0\0\0\0\0\0\0\0").await?;
                held.push(s);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            loaded.push(rss_kib(server.pid())? + rss_kib(agent.pid())?);
        }
        println!("| measure | value |");
        println!("| --- | --- |");
        println!(
            "| idle RSS, server + agent, at start | {:.1} MiB |",
            idle as f64 / 1024.0
        );
        println!(
            "| of which anonymous (heap, stacks; the rest is mapped code) | {:.1} MiB |",
            idle_anon as f64 / 1024.0
        );
        println!(
            "| RSS after the transfers above | {:.1} MiB |",
            before as f64 / 1024.0
        );
        println!(
            "| RSS with {n} idle tunnelled connections | {:.1} MiB |",
            loaded[1] as f64 / 1024.0
        );
        println!(
            "| per idle tunnelled connection ({n} held, minus the RSS before) | {:.1} KiB |",
            (loaded[1].saturating_sub(before)) as f64 / n as f64
        );
        println!(
            "| per idle tunnelled connection (from {} to {n} held) | {:.1} KiB |",
            n / 2,
            (loaded[1].saturating_sub(loaded[0])) as f64 / (n / 2) as f64
        );
        drop(held);
        // The same through the gRPC frontend (one channel per dial, as kube-apiserver opens
        // them): server + agent, and the report process is not counted.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_kib(server.pid())? + rss_kib(agent.pid())?;
        let mut held = Vec::with_capacity(n / 2);
        for _ in 0..n / 2 {
            let mut s = paths[4].open(backend).await?;
            s.write_all(b"E\0\0\0\0\0\0\0\0").await?;
            held.push(s);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = rss_kib(server.pid())? + rss_kib(agent.pid())?;
        println!(
            "| per idle gRPC call, each on its own channel ({} held, minus the RSS before) | {:.1} KiB |",
            n / 2,
            after.saturating_sub(before) as f64 / (n / 2) as f64
        );
        drop(held);
    }

    if run("tls") {
        println!(
            "\n## The TLS CONNECT frontend (session tickets; a client that resumes and one that does not)\n"
        );
        let tls_dir = dir.join("tls");
        std::fs::create_dir_all(&tls_dir)?;
        let (tls_server, _tls_agent, tls_frontend, _) =
            start_tether(&bin, &tls_dir, &pki, true).await?;
        let (resuming, fresh) = frontend_clients(&pki)?;
        let tls_paths = [
            paths[1].clone(),
            Via::TetherTls(tls_frontend, resuming, true),
            Via::TetherTls(tls_frontend, fresh, false),
        ];
        dial_table(&tls_paths, backend, quick, 6400).await?;
        // Memory: 500 idle connections through the TLS frontend, server only.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_kib(tls_server.pid())?;
        let mut held = Vec::with_capacity(500);
        for _ in 0..500 {
            let mut s = tls_paths[1].open(backend).await?;
            s.write_all(b"E\0\0\0\0\0\0\0\0").await?;
            s.flush().await?;
            held.push(s);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = rss_kib(tls_server.pid())?;
        println!(
            "\nServer memory per idle connection through the TLS frontend (500 held, minus the RSS before): {:.1} KiB",
            after.saturating_sub(before) as f64 / 500.0
        );
        drop(held);
    }

    if run("hol") {
        println!("\n## Head-of-line: one stalled stream beside a transfer (best of 5)\n");
        let mut alone = Duration::MAX;
        for _ in 0..5 {
            alone = alone.min(throughput(&paths[1], backend, true, 1, total).await?);
        }
        // A stream whose client never reads, with its window full.
        let mut stalled = paths[1].open(backend).await?;
        let mut cmd = [0u8; 9];
        cmd[0] = b'D';
        cmd[1..].copy_from_slice(&(1u64 << 40).to_be_bytes());
        stalled.write_all(&cmd).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut beside = Duration::MAX;
        for _ in 0..5 {
            beside = beside.min(throughput(&paths[1], backend, true, 1, total).await?);
        }
        drop(stalled);
        println!("| measure | MiB/s |");
        println!("| --- | --- |");
        println!("| one stream alone | {:.0} |", mibs(total, alone));
        println!(
            "| the same, beside a stalled stream | {:.0} ({:.0} %) |",
            mibs(total, beside),
            100.0 * alone.as_secs_f64() / beside.as_secs_f64()
        );
    }
    if run("peers") {
        peers::peers_section(&bin, &dir, &pki, backend, quick).await?;
    }
    if run("konnectivity-agent") {
        peers::konnectivity_agent_section(&bin, &dir, &pki, backend, quick).await?;
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
