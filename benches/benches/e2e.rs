//! End to end on loopback, TLS on the tunnel as deployed: direct TCP, tether (client → HTTP
//! CONNECT → server → TLS tunnel → agent → backend), tether through its dial API (no CONNECT
//! hop, the same shape as yamux) and yamux over the same kind of TLS connection, same payloads,
//! same run. Throughput (1 and 16 streams, up and down) and dial
//! latency (connect to first echoed byte).
#![allow(missing_docs)]

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tether_bench::{Pki, Via, backend, dial_latency, tether_in_process, throughput, yamux_pair};

fn e2e(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let pki = Pki::default();
    let (backend, server, _agent, yamux) = rt.block_on(async {
        let backend = backend().await.expect("backend");
        let (server, agent) = tether_in_process(&pki).await.expect("tether");
        let yamux = yamux_pair(&pki, backend).await.expect("yamux");
        (backend, server, agent, yamux)
    });
    let frontend = server.connect_addr.expect("frontend");
    let paths = [
        Via::Direct,
        Via::Tether(frontend),
        Via::Dial(std::sync::Arc::new(server)),
        Via::Yamux(yamux),
    ];
    let total: u64 = if tether_bench::full_run() {
        64 << 20
    } else {
        1 << 20
    };
    for (download, dir) in [(true, "download"), (false, "upload")] {
        for streams in [1usize, 16] {
            let mut g = c.benchmark_group(format!("e2e/{dir}/{streams}_streams"));
            g.throughput(Throughput::Bytes(total));
            g.sample_size(10);
            g.measurement_time(Duration::from_secs(if tether_bench::full_run() {
                8
            } else {
                1
            }));
            for via in &paths {
                g.bench_function(via.name(), |b| {
                    b.iter(|| {
                        rt.block_on(throughput(via, backend, download, streams, total))
                            .expect("transfer")
                    });
                });
            }
            g.finish();
        }
    }
    let mut g = c.benchmark_group("e2e/dial_to_first_byte");
    for via in &paths {
        g.bench_function(via.name(), |b| {
            b.iter(|| rt.block_on(dial_latency(via, backend, 1, 1)).expect("dial"));
        });
    }
    g.finish();
}

criterion_group!(benches, e2e);
criterion_main!(benches);
