//! Routing cost against the number of agents: `Registry::route` for a destination that one
//! agent among N announced (`destHost`), and for any agent (`default`). Real tunnels (in-memory
//! pairs, handshaken) so `is_usable` is the real check. The cost must not grow with N
//! (docs/BENCHMARKS.md, "How cost grows").
#![allow(missing_docs)]

use std::net::Ipv4Addr;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tether::tunnel::{Start, Tunnel};
use tether_proto::frame::Identifier;
use tether_proto::testing::{test_agent_identity, test_server_identity};
use tether_proto::{Config, Session, Time};
use tether_server::{Registry, Strategy};

fn ip_of(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x7f01_0000u32 + u32::try_from(i).unwrap_or(0) + 1)
}

/// `n` server-end tunnels, each joined in memory to an agent end and handshaken, registered
/// with the identifiers `host=agent-i` and `ipv4=ip_of(i)`.
async fn registry(n: usize) -> (Registry, Vec<Tunnel>) {
    let config = Config {
        keepalive_interval_ms: 0,
        ..Config::default()
    };
    let registry = Registry::default();
    let mut agents = Vec::with_capacity(n);
    let epoch = Instant::now();
    let start = |label: &str| Start {
        incoming: None,
        policy: None,
        epoch,
        label: label.into(),
        stats: None,
        linger: tether::pump::LINGER,
    };
    for i in 0..n {
        let (a, b) = tokio::io::duplex(4096);
        let server = Session::server(config.clone(), test_server_identity(), Time::from_millis(0))
            .expect("session");
        let agent = Session::agent(config.clone(), test_agent_identity(), Time::from_millis(0))
            .expect("session");
        let (s, s_hs) = Tunnel::spawn(a, server, start("server"));
        let (g, g_hs) = Tunnel::spawn(b, agent, start("agent"));
        let _ = s_hs.done().await;
        let _ = g_hs.done().await;
        registry.add(
            format!("agent-{i}"),
            vec![
                Identifier::Host(format!("agent-{i}")),
                Identifier::Ipv4(ip_of(i)),
            ],
            s,
        );
        agents.push(g);
    }
    (registry, agents)
}

fn route(c: &mut Criterion) {
    let sizes: &[usize] = if tether_bench::full_run() {
        &[1, 100, 1000, 5000]
    } else {
        &[1, 100]
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("registry/route");
    for &n in sizes {
        let (registry, _agents) = rt.block_on(registry(n));
        assert_eq!(registry.len(), n);
        let hosts: Vec<String> = (0..256).map(|k| ip_of(k * 7919 % n).to_string()).collect();
        let mut k = 0usize;
        g.bench_with_input(BenchmarkId::new("destHost", n), &n, |b, _| {
            b.iter(|| {
                k = k.wrapping_add(1);
                let host = &hosts[k % hosts.len()];
                registry
                    .route(host, &[Strategy::DestHost])
                    .expect("the agent that announced it")
            });
        });
        g.bench_with_input(BenchmarkId::new("default", n), &n, |b, _| {
            b.iter(|| {
                registry
                    .route("elsewhere", &[Strategy::Default])
                    .expect("any agent")
            });
        });
    }
    g.finish();
}

criterion_group!(benches, route);
criterion_main!(benches);
