//! The report's peers: Konnectivity (its agent against its server and tether's; both of its
//! modes), OpenSSH's `-R` and a socat relay, each beside tether, measured in turns.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tether_bench::procs::{Error, Proc, cpu_seconds, rss_kib, tree_cpu_seconds};
use tether_bench::{Pki, Via, dial_latency, quantile, throughput};
use tokio::io::AsyncWriteExt;

use crate::{GIB, mibs};

/// Waits (at most 10 s) until a CONNECT through `uds` reaches `backend`.
async fn serving(uds: &Path, backend: SocketAddr) -> bool {
    opens(&Via::ConnectUds(uds.to_path_buf(), "probe"), backend).await
}

/// Konnectivity's own agent against Konnectivity's server and against tether's, beside
/// tether's agent against tether's server (issue 28): the same flags, HTTP CONNECT on a Unix
/// socket for all three, measured in turns.
pub(crate) async fn konnectivity_agent_section(
    bin: &Path,
    dir: &Path,
    pki: &Pki,
    backend: SocketAddr,
    quick: bool,
) -> Result<(), Error> {
    use tether_bench::konnectivity as k;
    println!("\n## Konnectivity's agent against Konnectivity's server and tether's\n");
    let kbin = match k::binaries() {
        Ok(d) => d,
        Err(why) => {
            println!("Skipped: {why}.");
            return Ok(());
        }
    };
    let files = pki.files(dir, "konn-")?;
    let mut setups = Vec::new();
    for (name, server_bin, konn_agent) in [
        (
            "Konnectivity server + Konnectivity agent",
            kbin.join("proxy-server"),
            true,
        ),
        (
            "tether server + Konnectivity agent",
            bin.join("tether-server"),
            true,
        ),
        (
            "tether server + tether agent",
            bin.join("tether-server"),
            false,
        ),
    ] {
        let d = dir.join(format!("konn-{}", setups.len()));
        std::fs::create_dir_all(&d)?;
        let uds = d.join("connect.socket");
        let (server, port) = k::server(&server_bin, &files, &uds)?;
        let agent = if konn_agent {
            k::agent(&kbin, &files, port)?
        } else {
            k::tether_agent(bin, &files, port)?
        };
        if !serving(&uds, backend).await {
            return Err(format!("{name}: no dial went through in 10 s").into());
        }
        let via = Via::ConnectUds(uds, name);
        setups.push((server, agent, via));
    }
    let total: u64 = if quick { 64 << 20 } else { 256 << 20 };
    println!(
        "| measure | {} | {} | {} |",
        setups[0].2.name(),
        setups[1].2.name(),
        setups[2].2.name()
    );
    println!("| --- | --- | --- | --- |");
    for (download, dir_name) in [(true, "download"), (false, "upload")] {
        for streams in [1usize, 16] {
            let mut best = [Duration::MAX; 3];
            for _ in 0..3 {
                for (i, (_, _, via)) in setups.iter().enumerate() {
                    best[i] =
                        best[i].min(throughput(via, backend, download, streams, total).await?);
                }
            }
            let r: Vec<f64> = best.iter().map(|b| mibs(total, *b)).collect();
            println!(
                "| {dir_name}, {streams} stream{}, MiB/s | {:.0} | {:.0} ({:.2}×) | {:.0} ({:.2}×) |",
                if streams == 1 { "" } else { "s" },
                r[0],
                r[1],
                r[1] / r[0],
                r[2],
                r[2] / r[0]
            );
        }
    }
    let gib: u64 = if quick { 128 << 20 } else { 512 << 20 };
    let mut cpu = [0.0f64; 3];
    for (i, (server, agent, via)) in setups.iter().enumerate() {
        let before = cpu_seconds(server.pid())? + cpu_seconds(agent.pid())?;
        throughput(via, backend, true, 4, gib).await?;
        cpu[i] =
            (cpu_seconds(server.pid())? + cpu_seconds(agent.pid())? - before) * GIB / gib as f64;
    }
    println!(
        "| server + agent CPU per GiB down, s | {:.2} | {:.2} ({:.2}×) | {:.2} ({:.2}×) |",
        cpu[0],
        cpu[1],
        cpu[1] / cpu[0],
        cpu[2],
        cpu[2] / cpu[0]
    );
    let (one, many) = if quick { (200, 1280) } else { (1000, 6400) };
    let mut p50 = [0.0f64; 3];
    let mut rate = [0.0f64; 3];
    for (i, (_, _, via)) in setups.iter().enumerate() {
        p50[i] = quantile(&dial_latency(via, backend, 1, one).await?, 500).as_secs_f64() * 1e6;
        let start = Instant::now();
        let n = dial_latency(via, backend, 64, many).await?.len();
        rate[i] = n as f64 / start.elapsed().as_secs_f64();
    }
    println!(
        "| dial p50, concurrency 1 | {:.0} µs | {:.0} µs ({:.2}×) | {:.0} µs ({:.2}×) |",
        p50[0],
        p50[1],
        p50[1] / p50[0],
        p50[2],
        p50[2] / p50[0]
    );
    println!(
        "| dials/s, concurrency 64 | {:.0} | {:.0} ({:.2}×) | {:.0} ({:.2}×) |",
        rate[0],
        rate[1],
        rate[1] / rate[0],
        rate[2],
        rate[2] / rate[0]
    );
    // Head-of-line: a download beside a stream whose client never reads. Through an agent
    // without per-stream flow control, the stalled stream's bytes fill the server's buffer
    // and the download stops with them.
    let hol_total: u64 = 64 << 20;
    let limit = Duration::from_secs(if quick { 10 } else { 20 });
    let mut cells = Vec::new();
    for (_, _, via) in &setups {
        let alone = throughput(via, backend, true, 1, hol_total).await?;
        let mut stalled = via.open(backend).await?;
        let mut cmd = [0u8; 9];
        cmd[0] = b'D';
        cmd[1..].copy_from_slice(&(1u64 << 40).to_be_bytes());
        stalled.write_all(&cmd).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let beside =
            tokio::time::timeout(limit, throughput(via, backend, true, 1, hol_total)).await;
        drop(stalled);
        cells.push(match beside {
            Ok(Ok(d)) => format!(
                "{:.0} of {:.0} MiB/s alone ({:.0} %)",
                mibs(hol_total, d),
                mibs(hol_total, alone),
                100.0 * alone.as_secs_f64() / d.as_secs_f64()
            ),
            Ok(Err(e)) => format!(
                "failed: {}",
                e.to_string().lines().next().unwrap_or_default()
            ),
            Err(_) => format!(
                "stalled: 64 MiB not moved in {} s ({:.0} MiB/s alone)",
                limit.as_secs(),
                mibs(hol_total, alone)
            ),
        });
        // The stalled stream's bytes drain before the next setup runs.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "| a download beside a stalled stream | {} | {} | {} |",
        cells[0], cells[1], cells[2]
    );
    Ok(())
}

/// One path the peers section measures, and the processes that serve it.
struct Peer {
    via: Via,
    /// Server and agent (or their equivalents): whose CPU is the tunnel's.
    pids: Vec<u32>,
    /// The server's process, whose memory an idle stream costs.
    server: u32,
}

fn tree_cpu(pids: &[u32]) -> Result<f64, Error> {
    pids.iter().map(|p| tree_cpu_seconds(*p)).sum()
}

/// tether (CONNECT and gRPC, one server on two Unix sockets), Konnectivity (a server per mode,
/// its agent each), OpenSSH's `-R` and a socat relay: the same client, backend and sizes,
/// measured in turns (issue 29).
pub(crate) async fn peers_section(
    bin: &Path,
    dir: &Path,
    pki: &Pki,
    backend: SocketAddr,
    quick: bool,
) -> Result<(), Error> {
    use tether_bench::{konnectivity as k, relays};
    println!(
        "\n## tether beside the alternatives: Konnectivity in both modes, OpenSSH -R, socat\n"
    );
    let files = pki.files(dir, "peers-")?;
    let mut procs: Vec<Proc> = Vec::new();
    let mut peers = Vec::new();
    // tether: one server, CONNECT and gRPC each on a socket of its own.
    let (connect_uds, grpc_uds) = (
        dir.join("peers-tether-connect.socket"),
        dir.join("peers-tether-grpc.socket"),
    );
    let (server, port) = k::server_with(
        &bin.join("tether-server"),
        &files,
        &connect_uds,
        "http-connect",
        &[format!("--grpc-uds-name={}", grpc_uds.display())],
    )?;
    let agent = k::tether_agent(bin, &files, port)?;
    let pids = vec![server.pid(), agent.pid()];
    if !serving(&connect_uds, backend).await {
        return Err("tether: no dial went through in 10 s".into());
    }
    peers.push(Peer {
        via: Via::ConnectUds(connect_uds, "tether CONNECT"),
        pids: pids.clone(),
        server: server.pid(),
    });
    peers.push(Peer {
        via: Via::GrpcUds(grpc_uds, "tether gRPC"),
        pids,
        server: server.pid(),
    });
    procs.extend([server, agent]);
    match k::binaries() {
        Ok(kbin) => {
            for (mode, name) in [
                ("http-connect", "Konnectivity CONNECT"),
                ("grpc", "Konnectivity gRPC"),
            ] {
                let uds = dir.join(format!("peers-konnectivity-{mode}.socket"));
                let (server, port) =
                    k::server_with(&kbin.join("proxy-server"), &files, &uds, mode, &[])?;
                let agent = k::agent(&kbin, &files, port)?;
                let via = if mode == "grpc" {
                    Via::GrpcUds(uds, name)
                } else {
                    Via::ConnectUds(uds, name)
                };
                if !opens(&via, backend).await {
                    return Err(format!("{name}: no dial went through in 10 s").into());
                }
                peers.push(Peer {
                    via,
                    pids: vec![server.pid(), agent.pid()],
                    server: server.pid(),
                });
                procs.extend([server, agent]);
            }
        }
        Err(why) => println!("Konnectivity skipped: {why}.\n"),
    }
    let ssh_dir = dir.join("peers-ssh");
    std::fs::create_dir_all(&ssh_dir)?;
    match relays::ssh_reverse(&ssh_dir, backend).await {
        Ok((sshd, ssh, addr)) => {
            peers.push(Peer {
                via: Via::Forward(addr, "OpenSSH -R"),
                pids: vec![sshd.pid(), ssh.pid()],
                server: sshd.pid(),
            });
            procs.extend([sshd, ssh]);
        }
        Err(why) => println!("OpenSSH skipped: {why}.\n"),
    }
    match relays::socat(backend) {
        Ok((socat, addr)) if opens(&Via::Forward(addr, "socat"), backend).await => {
            peers.push(Peer {
                via: Via::Forward(addr, "socat relay"),
                pids: vec![socat.pid()],
                server: socat.pid(),
            });
            procs.push(socat);
        }
        Ok(_) => println!("socat skipped: it did not relay.\n"),
        Err(why) => println!("socat skipped: {why}.\n"),
    }

    let names: Vec<&str> = peers.iter().map(|p| p.via.name()).collect();
    println!("| measure | {} |", names.join(" | "));
    println!("|{}", " --- |".repeat(names.len() + 1));
    let row = |what: &str, cells: Vec<String>| println!("| {what} | {} |", cells.join(" | "));
    let total: u64 = if quick { 64 << 20 } else { 256 << 20 };
    for (download, dir_name) in [(true, "download"), (false, "upload")] {
        for streams in [1usize, 16] {
            let mut best = vec![Duration::MAX; peers.len()];
            for _ in 0..3 {
                for (i, p) in peers.iter().enumerate() {
                    let t = throughput(&p.via, backend, download, streams, total)
                        .await
                        .map_err(|e| format!("{} {dir_name} {streams}: {e}", p.via.name()))?;
                    best[i] = best[i].min(t);
                }
            }
            row(
                &format!(
                    "{dir_name}, {streams} stream{}, MiB/s",
                    if streams == 1 { "" } else { "s" }
                ),
                best.iter()
                    .map(|b| format!("{:.0}", mibs(total, *b)))
                    .collect(),
            );
        }
    }
    let gib: u64 = if quick { 128 << 20 } else { 512 << 20 };
    let me = std::process::id();
    for (download, dir_name) in [(true, "down"), (false, "up")] {
        let mut tunnel = Vec::new();
        let mut client = Vec::new();
        for p in &peers {
            let (t0, c0) = (tree_cpu(&p.pids)?, cpu_seconds(me)?);
            throughput(&p.via, backend, download, 4, gib).await?;
            let (t1, c1) = (tree_cpu(&p.pids)?, cpu_seconds(me)?);
            tunnel.push((t1 - t0) * GIB / gib as f64);
            client.push((c1 - c0) * GIB / gib as f64);
        }
        row(
            &format!("server + agent CPU per GiB {dir_name}, s"),
            tunnel.iter().map(|v| format!("{v:.2}")).collect(),
        );
        row(
            &format!("client + backend CPU per GiB {dir_name} (this process), s"),
            client.iter().map(|v| format!("{v:.2}")).collect(),
        );
    }
    let (one, many) = if quick { (300, 1920) } else { (1000, 6400) };
    let (mut p50, mut p99, mut rate, mut per_dial) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for p in &peers {
        let lat = dial_latency(&p.via, backend, 1, one).await?;
        p50.push(quantile(&lat, 500).as_secs_f64() * 1e6);
        p99.push(quantile(&lat, 990).as_secs_f64() * 1e6);
        let t0 = tree_cpu(&p.pids)?;
        let start = Instant::now();
        let n = dial_latency(&p.via, backend, 64, many).await?.len();
        rate.push(n as f64 / start.elapsed().as_secs_f64());
        per_dial.push((tree_cpu(&p.pids)? - t0) / n as f64 * 1e3);
    }
    row(
        "dial p50, concurrency 1, µs",
        p50.iter().map(|v| format!("{v:.0}")).collect(),
    );
    row(
        "dial p99, concurrency 1, µs",
        p99.iter().map(|v| format!("{v:.0}")).collect(),
    );
    row(
        "dials/s, concurrency 64",
        rate.iter().map(|v| format!("{v:.0}")).collect(),
    );
    row(
        "server + agent CPU per dial, ms",
        per_dial.iter().map(|v| format!("{v:.3}")).collect(),
    );
    // Memory: 500 idle streams held, the server's RSS before and after.
    let mut per_stream = Vec::new();
    for p in &peers {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = rss_kib(p.server)?;
        let mut held = Vec::with_capacity(500);
        for _ in 0..500 {
            let mut s = p.via.open(backend).await?;
            s.write_all(b"E\0\0\0\0\0\0\0\0").await?;
            held.push(s);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        per_stream.push(rss_kib(p.server)?.saturating_sub(before) as f64 / 500.0);
        drop(held);
    }
    row(
        "server memory per idle stream (500 held), KiB",
        per_stream.iter().map(|v| format!("{v:.1}")).collect(),
    );
    drop(procs);
    Ok(())
}

/// Waits (at most 10 s) until a stream through `via` reaches `backend`.
async fn opens(via: &Via, backend: SocketAddr) -> bool {
    for _ in 0..200 {
        if via.open(backend).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
