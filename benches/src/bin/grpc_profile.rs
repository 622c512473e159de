//! Load for profiling the gRPC frontend: a `tether-server` (CONNECT and gRPC on Unix sockets)
//! and a `tether-agent`, and the report's client moving bytes through one of them in a loop
//! while `perf record -p <pid>` watches the process it prints.
//!
//! `cargo run -p tether-bench --release --bin grpc_profile -- [grpc|connect] [down|up] SECONDS`
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use tether_bench::procs::{Error, binaries};
use tether_bench::{Pki, Via, backend, konnectivity as k, throughput};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let grpc = args.get(1).is_none_or(|a| a == "grpc");
    let download = args.get(2).is_none_or(|a| a == "down");
    let seconds: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(20);
    // TETHER_BIN_DIR: binaries built elsewhere (to compare two builds).
    let bin = match std::env::var_os("TETHER_BIN_DIR") {
        Some(d) => d.into(),
        None => binaries()?,
    };
    let dir = std::env::temp_dir().join(format!("tether-grpc-profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let pki = Pki::default();
    let files = pki.files(&dir, "")?;
    let (connect, grpc_uds) = (dir.join("connect.socket"), dir.join("grpc.socket"));
    let (server, port) = k::server_with(
        &bin.join("tether-server"),
        &files,
        &connect,
        "http-connect",
        &[format!("--grpc-uds-name={}", grpc_uds.display())],
    )?;
    let agent = k::tether_agent(&bin, &files, port)?;
    let backend = backend().await?;
    let via = if grpc {
        Via::GrpcUds(grpc_uds, "gRPC")
    } else {
        Via::ConnectUds(connect, "CONNECT")
    };
    for _ in 0..200 {
        if via.open(backend).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("server pid {} agent pid {}", server.pid(), agent.pid());
    let start = Instant::now();
    let mut moved = 0u64;
    while start.elapsed() < Duration::from_secs(seconds) {
        throughput(&via, backend, download, 1, 256 << 20).await?;
        moved += 256 << 20;
    }
    println!(
        "{} MiB/s",
        moved as f64 / start.elapsed().as_secs_f64() / (1 << 20) as f64
    );
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
