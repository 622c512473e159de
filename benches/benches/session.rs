//! The in-memory pair moving bytes over 1 and 64 streams, beside memcpy of the same amount.
#![allow(missing_docs)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tether_proto::Config;
use tether_proto::testing::{Carry, Pair, transfer};

fn pair(c: &mut Criterion) {
    let total = if tether_bench::full_run() {
        64 << 20
    } else {
        1 << 20
    };
    let config = Config {
        keepalive_interval_ms: 0,
        ..Config::default()
    };
    let mut g = c.benchmark_group("session/pair");
    g.throughput(Throughput::Bytes(total as u64));
    g.sample_size(10);
    for streams in [1usize, 64] {
        g.bench_function(format!("{streams} stream(s), frames"), |b| {
            b.iter(|| {
                let mut p = Pair::established(config.clone(), config.clone());
                assert_eq!(transfer(&mut p, total, streams), total / streams * streams);
            });
        });
        g.bench_function(format!("{streams} stream(s), encoded bytes"), |b| {
            b.iter(|| {
                let mut p = Pair::established(config.clone(), config.clone());
                p.carry = Carry::Bytes(vec![64 * 1024]);
                assert_eq!(transfer(&mut p, total, streams), total / streams * streams);
            });
        });
    }
    g.bench_function("memcpy", |b| {
        let src = vec![1u8; total];
        let mut dst = vec![0u8; total];
        b.iter(|| dst.copy_from_slice(std::hint::black_box(&src)));
    });
    g.finish();
}

criterion_group!(benches, pair);
criterion_main!(benches);
