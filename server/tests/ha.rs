//! High availability as Kubernetes runs it: three `tether-server` processes with
//! `--server-count 3` behind one address (a round-robin TCP load balancer: HAProxy when
//! `TETHER_HAPROXY` names it, as in `.ci/run`, else the test's own), and `tether-agent`
//! processes that reach all three through it. One replica is
//! killed (SIGKILL) under load: only the streams it carried fail, and visibly; dials go on
//! through the other two at once; the agents restore the third tunnel when it returns.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const AGENTS: [&str; 2] = ["agent-1", "agent-2"];

/// The ports one replica listens on; fixed, so a killed replica comes back where the
/// balancer and its clients expect it.
#[derive(Clone, Copy)]
struct Ports {
    agent: u16,
    connect: u16,
    health: u16,
}

/// Writes `text` to `dir/name` and gives its path as an argument.
fn file(dir: &Path, name: &str, text: &str) -> String {
    std::fs::write(dir.join(name), text).unwrap();
    dir.join(name).display().to_string()
}

/// A child's stderr, kept in `dir` for a failing run to be read.
fn log(dir: &Path, name: &str) -> Stdio {
    std::fs::File::create(dir.join(format!("{name}.log")))
        .unwrap()
        .into()
}

/// The files every process reads, written once before the first starts: a file rewritten
/// while a started process reads it is an empty file to that process.
struct Files {
    server_cert: String,
    server_key: String,
    ca: String,
}

impl Files {
    fn new(dir: &Path, pki: &Pki) -> Files {
        Files {
            server_cert: file(dir, "server.crt", &pki.server.cert),
            server_key: file(dir, "server.key", &pki.server.key),
            ca: file(dir, "ca.crt", &pki.ca.pem.cert),
        }
    }
}

/// Replica `i` as the binary, with its `--server-id`, `--server-count 3` and the rest defaults
/// (so `--max-tunnels-per-agent` is 3, as the flag's documentation asks).
fn replica(dir: &Path, f: &Files, i: usize, p: Ports) -> Killed {
    let (cert, key, ca) = (&f.server_cert, &f.server_key, &f.ca);
    let id = format!("server-{i}");
    Killed(
        Command::new(env!("CARGO_BIN_EXE_tether-server"))
            .args(["--cluster-cert", cert, "--cluster-key", key])
            .args(["--cluster-ca-cert", ca])
            .args(["--server-id", &id, "--server-count", "3"])
            .args(["--agent-bind-address", "127.0.0.1"])
            .args(["--agent-port", &p.agent.to_string()])
            .args(["--server-bind-address", "127.0.0.1"])
            .args(["--server-port", &p.connect.to_string()])
            .args(["--health-bind-address", "127.0.0.1"])
            .args(["--health-port", &p.health.to_string()])
            .args(["--proxy-strategies", "default"])
            .env_remove("RUST_LOG")
            .stderr(log(dir, &id))
            .spawn()
            .unwrap(),
    )
}

/// The agents' `--sync-interval` and `--sync-interval-cap`: 100ms and 1s, or
/// `TETHER_HA_SYNC=1s,10s` (the defaults) to measure the time to full coverage as shipped.
fn sync_flags() -> (String, String) {
    let v = std::env::var("TETHER_HA_SYNC").unwrap_or_else(|_| "100ms,1s".into());
    let (a, b) = v.split_once(',').expect("TETHER_HA_SYNC=<interval>,<cap>");
    (a.into(), b.into())
}

/// Agent `id` as the binary, reaching the servers through `lb`, allowed to dial `backend`.
fn agent(
    dir: &Path,
    pki: &Pki,
    f: &Files,
    id: &str,
    lb: SocketAddr,
    backend: SocketAddr,
    health: u16,
) -> Killed {
    let sync = sync_flags();
    let leaf = pki.ca.leaf(id, &[id]);
    let (cert, key, ca) = (
        file(dir, &format!("{id}.crt"), &leaf.cert),
        file(dir, &format!("{id}.key"), &leaf.key),
        &f.ca,
    );
    Killed(
        Command::new(common::agent_bin())
            .args(["--ca-cert", ca, "--agent-cert", &cert, "--agent-key", &key])
            .args(["--agent-id", id, "--proxy-server-name", "localhost"])
            .args(["--proxy-server-host", "127.0.0.1"])
            .args(["--proxy-server-port", &lb.port().to_string()])
            .args(["--allowed-destinations", &backend.to_string()])
            .args(["--sync-interval", &sync.0, "--sync-interval-cap", &sync.1])
            .args(["--health-server-host", "127.0.0.1"])
            .args(["--health-server-port", &health.to_string()])
            .env_remove("RUST_LOG")
            .stderr(log(dir, id))
            .spawn()
            .unwrap(),
    )
}

/// The one address the agents reach the replicas through, a real TCP balancer on loopback:
/// HAProxy when `TETHER_HAPROXY` names its binary (`.ci/run` installs it from Debian's
/// packages and runs this test with it too), else the test's own round-robin balancer.
struct Front {
    addr: SocketAddr,
    _haproxy: Option<Killed>,
}

async fn front(dir: &Path, replicas: &[Ports]) -> Front {
    let backends: Vec<SocketAddr> = replicas
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], p.agent)))
        .collect();
    let Some(bin) = std::env::var_os("TETHER_HAPROXY").filter(|b| !b.is_empty()) else {
        return Front {
            addr: balancer(backends).await.addr,
            _haproxy: None,
        };
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], fixed_port()));
    // As a Service before the replicas: TCP, round robin; a replica whose `/healthz` fails
    // two checks 200 ms apart is taken out (one that refuses a connection before that is
    // skipped: the retry is redispatched) and put back at its first good check; tunnels live
    // for hours, so no idle timeout cuts them. docs/OPERATIONS.md has the production form.
    let servers: String = backends
        .iter()
        .enumerate()
        .zip(replicas)
        .map(|((i, b), p)| format!("  server server-{i} {b} check port {}\n", p.health))
        .collect();
    let cfg = format!(
        "\
global
  log stderr format short local0 info
  maxconn 1000
defaults
  mode tcp
  log global
  option tcplog
  timeout connect 1s
  timeout client 1h
  timeout server 1h
  retries 2
  option redispatch 1
frontend agents
  bind {addr}
  default_backend replicas
backend replicas
  balance roundrobin
  option httpchk GET /healthz
  timeout check 1s
  default-server inter 200ms fall 2 rise 1
{servers}"
    );
    let path = file(dir, "haproxy.cfg", &cfg);
    let child = Killed(
        Command::new(&bin)
            .args(["-db", "-f", &path])
            .stdout(Stdio::null())
            .stderr(log(dir, "haproxy"))
            .spawn()
            .unwrap_or_else(|e| panic!("TETHER_HAPROXY={bin:?} does not start: {e}")),
    );
    // Listening yet? The probe passes through to a replica as a TLS handshake that ends at
    // once: one `agent TLS handshake failed` in that replica's log.
    let listening = eventually_some(WAIT, || async move {
        TcpStream::connect(addr).await.ok().map(|_| ())
    })
    .await;
    assert!(
        listening.is_some(),
        "HAProxy does not listen on {addr} (logs in {})",
        dir.display()
    );
    Front {
        addr,
        _haproxy: Some(child),
    }
}

/// Waits until every port in `ports` reports `want` for the metric `name`.
async fn all_read(ports: &[u16], name: &str, want: f64) -> bool {
    for &port in ports {
        let seen = eventually_some(WAIT * 2, || async move {
            (metric(port, name).await? == want).then_some(())
        })
        .await;
        if seen.is_none() {
            return false;
        }
    }
    true
}

/// The sum of the metric `name` over `ports`.
async fn sum(ports: &[u16], name: &str) -> Option<f64> {
    let mut total = 0.0;
    for &port in ports {
        total += metric(port, name).await?;
    }
    Some(total)
}

/// An echo stream through the CONNECT frontend on `port` that has moved one round trip.
async fn echo_stream(port: u16, backend: SocketAddr) -> TcpStream {
    let frontend = SocketAddr::from(([127, 0, 0, 1], port));
    let (status, head, mut s) = connect_tcp(frontend, &backend.to_string()).await;
    assert_eq!(status, 200, "{head}");
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.unwrap();
    s
}

/// Whether a stream still echoes.
async fn still_echoes(s: &mut TcpStream) -> bool {
    if s.write_all(b"pong").await.is_err() {
        return false;
    }
    let mut b = [0u8; 4];
    matches!(
        tokio::time::timeout(WAIT, s.read_exact(&mut b)).await,
        Ok(Ok(_)) if &b == b"pong"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_killed_under_load_fails_only_its_streams_and_comes_back() {
    let pki = Pki::new();
    let dir: PathBuf = tempdir("ha");
    let files = Files::new(&dir, &pki);
    let ports: Vec<Ports> = (0..3)
        .map(|_| Ports {
            agent: fixed_port(),
            connect: fixed_port(),
            health: fixed_port(),
        })
        .collect();
    let mut servers: Vec<Option<Killed>> = (0..3)
        .map(|i| Some(replica(&dir, &files, i, ports[i])))
        .collect();
    let lb = front(&dir, &ports).await;
    let backend = echo_backend().await;
    let agent_health: Vec<u16> = AGENTS.iter().map(|_| fixed_port()).collect();
    let started = std::time::Instant::now();
    let _agents: Vec<Killed> = AGENTS
        .iter()
        .zip(&agent_health)
        .map(|(id, &h)| agent(&dir, &pki, &files, id, lb.addr, backend, h))
        .collect();
    let server_health: Vec<u16> = ports.iter().map(|p| p.health).collect();
    let logs = dir.display();
    // Through one address, every agent finds all three replicas.
    assert!(
        all_read(&server_health, "tether_agents", 2.0).await,
        "a replica lacks an agent (logs in {logs})"
    );
    assert!(
        all_read(&agent_health, "tether_agent_tunnels", 3.0).await,
        "an agent lacks a replica (logs in {logs})"
    );
    // A known server reached again through the balancer is retried at the sync pace, not
    // backed off (docs/OPERATIONS.md, "Behind a load balancer").
    eprintln!(
        "ha: both agents hold all three replicas {:.2} s after they started (sync {:?})",
        started.elapsed().as_secs_f64(),
        sync_flags()
    );
    // What each process holds at rest, tunnels up and nothing else.
    let pids: Vec<u32> = servers
        .iter()
        .flatten()
        .chain(&_agents)
        .map(|k| k.0.id())
        .collect();
    let fds_at_rest: Vec<usize> = pids.iter().map(|p| open_fds(*p)).collect();
    // Load: four open streams through each replica (as each kube-apiserver uses its own).
    let mut streams: Vec<(usize, TcpStream)> = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        for _ in 0..4 {
            streams.push((i, echo_stream(p.connect, backend).await));
        }
    }
    assert_eq!(
        sum(&agent_health, "tether_agent_endpoint_connections").await,
        Some(12.0)
    );
    // Replica 1's process dies, with no drain and no GOAWAY: the kernel closes its sockets.
    drop(servers[1].take());
    // Its streams fail, visibly (an error or a reset, not an echo); the others carry on.
    for (i, s) in &mut streams {
        let echoed = still_echoes(s).await;
        assert_eq!(echoed, *i != 1, "a stream through replica {i}");
    }
    // New dials through the two left succeed at once, with no wait for a reconnect.
    for p in [ports[0], ports[2]] {
        for _ in 0..10 {
            let mut s = echo_stream(p.connect, backend).await;
            assert!(still_echoes(&mut s).await);
        }
    }
    // The agents notice the lost tunnel and let go of the connections it carried (the four
    // of replica 1; the eight others are still open here), and nothing else.
    assert!(
        all_read(&agent_health, "tether_agent_tunnels", 2.0).await,
        "an agent still counts the dead replica (logs in {logs})"
    );
    let open = eventually_some(WAIT, || async {
        let n = sum(&agent_health, "tether_agent_endpoint_connections").await?;
        (n == 8.0).then_some(n)
    })
    .await;
    assert_eq!(
        open,
        Some(8.0),
        "the dead replica's streams linger at the agents"
    );
    // The replica returns on its ports; the agents find it through the balancer again.
    servers[1] = Some(replica(&dir, &files, 1, ports[1]));
    assert!(
        all_read(&[ports[1].health], "tether_agents", 2.0).await,
        "the agents did not come back to the restarted replica (logs in {logs})"
    );
    assert!(
        all_read(&agent_health, "tether_agent_tunnels", 3.0).await,
        "an agent did not restore its third tunnel (logs in {logs})"
    );
    let mut s = echo_stream(ports[1].connect, backend).await;
    assert!(still_echoes(&mut s).await);
    // Each replica settles at exactly one tunnel per agent: no duplicates piled up.
    assert!(
        all_read(&server_health, "tether_agents", 2.0).await,
        "a replica holds a duplicate tunnel (logs in {logs})"
    );
    // Once every client has left, every process is back at rest: no stream, dial or
    // destination connection held, no fd more than with its tunnels alone (the restarted
    // replica's own count taken now that its tunnels are back).
    drop((s, streams));
    let restarted = servers[1].as_ref().unwrap().0.id();
    let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let mut rest: Vec<(SocketAddr, u32, usize)> = server_health
        .iter()
        .chain(&agent_health)
        .zip(pids.iter().zip(&fds_at_rest))
        .map(|(port, (pid, fds))| (at(*port), *pid, *fds))
        .collect();
    rest[1] = (at(ports[1].health), restarted, open_fds(restarted));
    processes_at_rest(&rest).await;
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
}
