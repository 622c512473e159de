//! Bad networks between an agent and its server, made for real: the `tether-agent` process
//! runs in a network namespace of its own, joined to the test's by a veth pair that carries
//! only the tunnel, and faults are put on that link (docs/FAULTS.md says which fault is made
//! how):
//!
//! - packet loss: an nftables rule in the agent's namespace, `numgen random mod 100 < N drop`,
//!   on the tunnel interface both ways (1 % and 10 %);
//! - a cut link: an nftables `drop` of everything on that interface (a 30 s blackhole, and a
//!   link that flaps: down 2 s, up 3 s, four times);
//! - a slow link: `tc qdisc tbf` at 20 Mbit/s on both ends of the pair;
//! - latency and jitter: the agent reaches the server through a relay in this test that holds
//!   every chunk 50 ± 10 ms, in order (the kernel here has no netem).
//!
//! Destinations are on a second veth pair with no fault; the client is this test, over the
//! server's CONNECT frontend on loopback. Every download is checked byte for byte, and after
//! each scenario both processes must come back to rest (no stream, dial or destination
//! connection held, no file descriptor more than with the tunnel alone).
//!
//! It needs root (network namespaces) and `nft` (Debian's nftables, which `.ci/run`
//! installs); without them it prints a notice and passes without running. The measurements
//! go to stderr and to `$CARGO_TARGET_TMPDIR/netfaults.txt`; `TETHER_NETFAULTS_LONG=1` makes
//! every transfer eight times larger (docs/FAULTS.md).

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// The longest any one transfer or wait of the suite may take before the scenario fails.
const LIMIT: Duration = Duration::from_secs(120);

/// Runs `cmd`, `Err` with its output if it fails.
fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    run(Command::new("ip").args(args))
}

/// A network namespace for the agent, with two veth pairs to the test's namespace: one for
/// the tunnel (the faults go there), one for destinations and the agent's health port.
struct Lab {
    ns: String,
    /// The tunnel link's interface inside the namespace, and its peer outside.
    tun_in: String,
    tun_out: String,
    /// This side of the tunnel link (the server listens here) and of the destination link.
    server_ip: Ipv4Addr,
    dest_ip: Ipv4Addr,
    /// The agent's address on the destination link (its health port).
    agent_ip: Ipv4Addr,
}

impl Lab {
    fn make() -> Result<Lab, String> {
        let pid = std::process::id();
        let k = u8::try_from(200 + pid % 50).unwrap_or(200);
        let lab = Lab {
            ns: format!("tnf{pid}"),
            tun_in: format!("tnf{pid}a"),
            tun_out: format!("tnf{pid}b"),
            server_ip: Ipv4Addr::new(10, k, 0, 1),
            dest_ip: Ipv4Addr::new(10, k, 1, 1),
            agent_ip: Ipv4Addr::new(10, k, 1, 2),
        };
        ip(&["netns", "add", &lab.ns])?;
        // From here on, Drop takes the namespace (and the veth pairs with it) away.
        let (dest_in, dest_out) = (format!("tnf{pid}c"), format!("tnf{pid}d"));
        let ns = lab.ns.as_str();
        let link = |inside: &str, outside: &str, here: Ipv4Addr, there: Ipv4Addr| {
            ip(&[
                "link", "add", outside, "type", "veth", "peer", "name", inside, "netns", ns,
            ])?;
            ip(&["addr", "add", &format!("{here}/30"), "dev", outside])?;
            ip(&["link", "set", outside, "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{there}/30"),
                "dev",
                inside,
            ])?;
            ip(&["-n", ns, "link", "set", inside, "up"])
        };
        let tun_agent = Ipv4Addr::new(10, k, 0, 2);
        link(&lab.tun_in, &lab.tun_out, lab.server_ip, tun_agent)?;
        link(&dest_in, &dest_out, lab.dest_ip, lab.agent_ip)?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        lab.nft("add table inet tnf")?;
        Ok(lab)
    }

    /// Runs an nft command inside the namespace.
    fn nft(&self, rule: &str) -> Result<(), String> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft"])
            .args(rule.split_whitespace()))
    }

    /// Drops what `matching` selects on the tunnel interface, both ways (replacing any fault
    /// of an earlier call); `None` clears it.
    fn drop_packets(&self, matching: Option<&str>) {
        let _ = self.nft("delete chain inet tnf out");
        let _ = self.nft("delete chain inet tnf in");
        let Some(m) = matching else { return };
        let i = &self.tun_in;
        for (chain, hook, dir) in [("out", "output", "oifname"), ("in", "input", "iifname")] {
            self.nft(&format!(
                "add chain inet tnf {chain} {{ type filter hook {hook} priority 0 ; }}"
            ))
            .unwrap();
            self.nft(&format!("add rule inet tnf {chain} {dir} {i} {m} drop"))
                .unwrap();
        }
    }

    /// Shapes both ends of the tunnel link with tbf at `rate` (`None`: no shaping).
    fn shape(&self, rate: Option<&str>) {
        let tc = |inside: bool, args: &[&str]| {
            let mut c = Command::new(if inside { "ip" } else { "tc" });
            if inside {
                c.args(["netns", "exec", &self.ns, "tc"]);
            }
            run(c.args(args))
        };
        for (inside, dev) in [(true, &self.tun_in), (false, &self.tun_out)] {
            let _ = tc(inside, &["qdisc", "del", "dev", dev, "root"]);
            if let Some(rate) = rate {
                let tbf = [
                    "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "32kb",
                    "latency", "100ms",
                ];
                tc(inside, &tbf).unwrap();
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The veth pairs go with the namespace that holds one end of each.
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// Whether this machine can run the suite; the reason if not.
fn can_run() -> Result<(), String> {
    if !std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    }) {
        return Err("not root: network namespaces cannot be made".into());
    }
    for tool in ["ip", "tc", "nft"] {
        if Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            return Err(format!("`{tool}` is not installed"));
        }
    }
    Ok(())
}

/// A relay between the agent and the server that holds every chunk `delay ± jitter` (in
/// milliseconds, changeable while it runs), keeping each direction's order.
struct Relay {
    addr: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    jitter_ms: Arc<AtomicU64>,
    _task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(listen: Ipv4Addr, to: SocketAddr) -> Relay {
        let l = TcpListener::bind((listen, 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        let delay_ms = Arc::new(AtomicU64::new(0));
        let jitter_ms = Arc::new(AtomicU64::new(0));
        let (d, j) = (delay_ms.clone(), jitter_ms.clone());
        let task = tokio::spawn(async move {
            while let Ok((a, _)) = l.accept().await {
                let (d, j) = (d.clone(), j.clone());
                tokio::spawn(async move {
                    let Ok(b) = TcpStream::connect(to).await else {
                        return;
                    };
                    let _ = a.set_nodelay(true);
                    let _ = b.set_nodelay(true);
                    let (ar, aw) = a.into_split();
                    let (br, bw) = b.into_split();
                    tokio::join!(delayed(ar, bw, d.clone(), j.clone()), delayed(br, aw, d, j));
                });
            }
        });
        Relay {
            addr,
            delay_ms,
            jitter_ms,
            _task: task,
        }
    }

    fn set(&self, delay_ms: u64, jitter_ms: u64) {
        self.delay_ms.store(delay_ms, Ordering::Relaxed);
        self.jitter_ms.store(jitter_ms, Ordering::Relaxed);
    }
}

/// Copies `r` to `w`, each chunk held until its time; at most 256 chunks in flight.
async fn delayed(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    delay: Arc<AtomicU64>,
    jitter: Arc<AtomicU64>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(256);
    let reader = async move {
        let mut last = Instant::now();
        loop {
            let mut buf = vec![0u8; 64 * 1024];
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf.truncate(n);
            let (d, j) = (
                delay.load(Ordering::Relaxed),
                jitter.load(Ordering::Relaxed),
            );
            let ms = if j == 0 {
                d
            } else {
                (d + rand::random_range(0..=2 * j)).saturating_sub(j)
            };
            // In order: never before the chunk ahead of it.
            last = last.max(Instant::now() + Duration::from_millis(ms));
            if tx.send((last, buf)).await.is_err() {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((at, buf)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if w.write_all(&buf).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// The byte at `i` of the pattern seeded with `seed`.
fn pattern(seed: u64, i: u64) -> u8 {
    let mut x = seed ^ (i / 8).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 29;
    x.to_le_bytes()[usize::try_from(i % 8).unwrap()]
}

/// A destination: `D` + length (u64) + seed (u64) sends that many pattern bytes and closes;
/// `E` echoes.
async fn destination(ip: Ipv4Addr) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut mode = [0u8; 1];
                if s.read_exact(&mut mode).await.is_err() {
                    return;
                }
                if mode[0] == b'E' {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    return;
                }
                let mut head = [0u8; 16];
                if s.read_exact(&mut head).await.is_err() {
                    return;
                }
                let len = u64::from_le_bytes(head[..8].try_into().unwrap());
                let seed = u64::from_le_bytes(head[8..].try_into().unwrap());
                let mut i = 0u64;
                let mut buf = vec![0u8; 64 * 1024];
                while i < len {
                    let n = usize::try_from((len - i).min(64 * 1024)).unwrap();
                    for (k, b) in buf[..n].iter_mut().enumerate() {
                        *b = pattern(seed, i + k as u64);
                    }
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    i += n as u64;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// How a download ended.
#[derive(Debug)]
enum Download {
    /// Every byte, in order, then a clean end, in this time.
    Whole(Duration),
    /// An error (a reset, say) after this many good bytes: visible, never mistaken for an end.
    Failed(u64, String),
}

/// Downloads `len` pattern bytes from `dest` through the CONNECT frontend at `front`; checks
/// every byte. `progress` counts the bytes received. A wrong byte, or a clean end before the
/// last byte, fails the test: that is the one outcome a tunnel must never give.
async fn download(
    front: SocketAddr,
    dest: SocketAddr,
    len: u64,
    progress: Arc<AtomicU64>,
) -> Download {
    let start = Instant::now();
    let (status, head, mut s) = connect_tcp(front, &dest.to_string()).await;
    if status != 200 {
        return Download::Failed(0, head);
    }
    let seed: u64 = rand::random();
    let mut req = vec![b'D'];
    req.extend_from_slice(&len.to_le_bytes());
    req.extend_from_slice(&seed.to_le_bytes());
    if let Err(e) = s.write_all(&req).await {
        return Download::Failed(0, e.to_string());
    }
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                for (k, b) in buf[..n].iter().enumerate() {
                    let at = got + k as u64;
                    assert_eq!(*b, pattern(seed, at), "byte {at} of {len} is wrong");
                }
                got += n as u64;
                progress.store(got, Ordering::Relaxed);
            }
            Err(e) => return Download::Failed(got, e.to_string()),
        }
    }
    assert_eq!(got, len, "a clean end after {got} of {len} bytes");
    Download::Whole(start.elapsed())
}

/// The time a 1 KiB echo takes through the tunnel: CONNECT, then one round trip.
async fn echo_round_trip(front: SocketAddr, dest: SocketAddr) -> (Duration, Duration) {
    try_echo(front, dest).await.unwrap()
}

/// [`echo_round_trip`], with its failure as a value, within `LIMIT`.
async fn try_echo(front: SocketAddr, dest: SocketAddr) -> Result<(Duration, Duration), String> {
    let echo = async {
        let start = Instant::now();
        let mut s = TcpStream::connect(front).await.map_err(|e| e.to_string())?;
        // No Nagle: the 1 KiB must not wait for the ACK of the mode byte.
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        let (head, _) = connect_request(&mut s, &dest.to_string()).await;
        if status_of(&head) != 200 {
            return Err(head);
        }
        let dialled = start.elapsed();
        let msg = [7u8; 1024];
        let t = Instant::now();
        s.write_all(b"E").await.map_err(|e| e.to_string())?;
        s.write_all(&msg).await.map_err(|e| e.to_string())?;
        let mut back = [0u8; 1024];
        s.read_exact(&mut back).await.map_err(|e| e.to_string())?;
        assert_eq!(back, msg, "the echo came back changed");
        Ok((dialled, t.elapsed()))
    };
    tokio::time::timeout(LIMIT, echo)
        .await
        .map_err(|_| "no echo in time".to_owned())?
}

/// A metric's value at `health`.
async fn metric_at(health: SocketAddr, name: &str) -> Option<f64> {
    let text = http_get_at(health, "/metrics").await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits (every 100 ms, at most `limit`) until `name` reads `want` at `health`; the time.
async fn until_metric(health: SocketAddr, name: &str, want: f64, limit: Duration) -> Duration {
    let start = Instant::now();
    while start.elapsed() < limit {
        if metric_at(health, name).await == Some(want) {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{name} at {health} is not {want} after {limit:?}");
}

fn mib_s(bytes: u64, t: Duration) -> f64 {
    #[allow(clippy::cast_precision_loss)] // MiB figures for a report
    let mib = bytes as f64 / (1024.0 * 1024.0);
    mib / t.as_secs_f64()
}

/// The suite's state: both processes, where to reach them, what they hold at rest.
struct Rig {
    front: SocketAddr,
    dest: SocketAddr,
    rest: Vec<(SocketAddr, u32, usize)>,
    report: Vec<String>,
}

impl Rig {
    async fn whole(&self, len: u64) -> Duration {
        match tokio::time::timeout(LIMIT, download(self.front, self.dest, len, Arc::default()))
            .await
            .expect("the download ends in time")
        {
            Download::Whole(t) => t,
            Download::Failed(got, e) => panic!("failed after {got} of {len} bytes: {e}"),
        }
    }

    async fn at_rest(&self) {
        processes_at_rest(&self.rest).await;
    }

    fn line(&mut self, l: String) {
        eprintln!("netfaults: {l}");
        self.report.push(l);
    }
}

/// Both processes and the relay, once the agent's tunnel is up; `None` (with a printed notice)
/// where this machine cannot make the lab.
struct Setup {
    rig: Rig,
    relay: Relay,
    server_health: SocketAddr,
    agent_health: SocketAddr,
    dir: std::path::PathBuf,
    // Dropped in this order: the agent, the server, then the namespace.
    _agent: Killed,
    _server: Killed,
    lab: Lab,
}

async fn start() -> Option<Setup> {
    if let Err(why) = can_run() {
        common::notice(&format!("netfaults: SKIPPED, {why} (docs/FAULTS.md)"));
        return None;
    }
    let lab = match Lab::make() {
        Ok(l) => l,
        Err(e) => {
            common::notice(&format!(
                "netfaults: SKIPPED, no network namespace can be made here: {e}"
            ));
            return None;
        }
    };
    let pki = Pki::new();
    let dir = tempdir("netfaults");
    let w = |n: &str, t: &str| {
        std::fs::write(dir.join(n), t).unwrap();
        dir.join(n).display().to_string()
    };
    let (sc, sk, ca) = (
        w("s.crt", &pki.server.cert),
        w("s.key", &pki.server.key),
        w("ca.crt", &pki.ca.pem.cert),
    );
    let leaf = pki.ca.leaf("node-1", &["node-1"]);
    let (ac, ak) = (w("a.crt", &leaf.cert), w("a.key", &leaf.key));
    let (agent_port, connect_port, health_port) = (fixed_port(), fixed_port(), fixed_port());
    let log = |n: &str| -> Stdio { std::fs::File::create(dir.join(n)).unwrap().into() };
    let server = Killed(
        Command::new(env!("CARGO_BIN_EXE_tether-server"))
            .args(["--cluster-cert", &sc, "--cluster-key", &sk])
            .args(["--cluster-ca-cert", &ca])
            .args(["--agent-bind-address", &lab.server_ip.to_string()])
            .args(["--agent-port", &agent_port.to_string()])
            .args(["--server-bind-address", "127.0.0.1"])
            .args(["--server-port", &connect_port.to_string()])
            .args(["--health-bind-address", "127.0.0.1"])
            .args(["--health-port", &health_port.to_string()])
            .args(["--proxy-strategies", "default"])
            .env_remove("RUST_LOG")
            .stderr(log("server.log"))
            .spawn()
            .unwrap(),
    );
    let server_health = SocketAddr::from(([127, 0, 0, 1], health_port));
    let relay = Relay::start(lab.server_ip, SocketAddr::from((lab.server_ip, agent_port))).await;
    let dest = destination(lab.dest_ip).await;
    let agent_health_port = fixed_port();
    let agent = Killed(
        Command::new("ip")
            .args(["netns", "exec", &lab.ns])
            .arg(agent_bin())
            .args(["--ca-cert", &ca, "--agent-cert", &ac, "--agent-key", &ak])
            .args(["--agent-id", "node-1", "--proxy-server-name", "localhost"])
            .args(["--proxy-server-host", &lab.server_ip.to_string()])
            .args(["--proxy-server-port", &relay.addr.port().to_string()])
            .args(["--allowed-destinations", &dest.to_string()])
            .args(["--health-server-host", &lab.agent_ip.to_string()])
            .args(["--health-server-port", &agent_health_port.to_string()])
            .env_remove("RUST_LOG")
            .stderr(log("agent.log"))
            .spawn()
            .unwrap(),
    );
    let agent_health = SocketAddr::from((lab.agent_ip, agent_health_port));
    until_metric(server_health, "tether_agents", 1.0, LIMIT).await;
    until_metric(agent_health, "tether_agent_tunnels", 1.0, LIMIT).await;
    let (server_pid, agent_pid) = (server.0.id(), agent.0.id());
    let rig = Rig {
        front: SocketAddr::from(([127, 0, 0, 1], connect_port)),
        dest,
        rest: vec![
            (server_health, server_pid, open_fds(server_pid)),
            (agent_health, agent_pid, open_fds(agent_pid)),
        ],
        report: Vec::new(),
    };
    Some(Setup {
        rig,
        relay,
        server_health,
        agent_health,
        dir,
        _agent: agent,
        _server: server,
        lab,
    })
}

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_networks_between_agent_and_server() {
    let Some(setup) = start().await else {
        return;
    };
    let scale: u64 = if std::env::var_os("TETHER_NETFAULTS_LONG").is_some() {
        8
    } else {
        1
    };
    let Setup {
        mut rig,
        relay,
        server_health,
        agent_health,
        dir,
        ref lab,
        ..
    } = setup;
    rig.line(format!(
        "logs in {}; transfers x{scale}; every download checked byte for byte",
        dir.display()
    ));

    // Baseline: the same path with no fault, after a warm-up (first connections, buffers).
    rig.whole(4 * MIB).await;
    let big = 32 * MIB * scale;
    let t = rig.whole(big).await;
    let base = mib_s(big, t);
    let (dial, rtt) = echo_round_trip(rig.front, rig.dest).await;
    rig.line(format!(
        "no fault: {} MiB in {:.2} s = {base:.1} MiB/s; dial {:.1} ms, 1 KiB echo {:.2} ms",
        big / MIB,
        t.as_secs_f64(),
        dial.as_secs_f64() * 1e3,
        rtt.as_secs_f64() * 1e3
    ));
    rig.at_rest().await;

    // Loss, both ways.
    for (pct, len) in [(1u64, 16 * MIB * scale), (10, 2 * MIB * scale)] {
        lab.drop_packets(Some(&format!("numgen random mod 100 < {pct}")));
        let t = rig.whole(len).await;
        let (dial, rtt) = echo_round_trip(rig.front, rig.dest).await;
        lab.drop_packets(None);
        let rate = mib_s(len, t);
        rig.line(format!(
            "{pct} % loss: {} MiB in {:.2} s = {rate:.2} MiB/s ({:.3}x no fault); dial {:.1} ms, echo {:.1} ms; intact",
            len / MIB,
            t.as_secs_f64(),
            rate / base,
            dial.as_secs_f64() * 1e3,
            rtt.as_secs_f64() * 1e3
        ));
        rig.at_rest().await;
    }

    // A slow link: 20 Mbit/s both ways. A small exchange beside a bulk download.
    lab.shape(Some("20mbit"));
    let len = 8 * MIB * scale;
    let (front, dest) = (rig.front, rig.dest);
    let bulk = tokio::spawn(download(front, dest, len, Arc::default()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (dial, rtt) = echo_round_trip(rig.front, rig.dest).await;
    let t = match tokio::time::timeout(LIMIT, bulk).await.unwrap().unwrap() {
        Download::Whole(t) => t,
        Download::Failed(g, e) => panic!("shaped download failed after {g}: {e}"),
    };
    lab.shape(None);
    rig.line(format!(
        "tbf 20 Mbit/s: {} MiB in {:.2} s = {:.2} MiB/s (the link: 2.38); beside it, dial {:.1} ms, 1 KiB echo {:.1} ms",
        len / MIB,
        t.as_secs_f64(),
        mib_s(len, t),
        dial.as_secs_f64() * 1e3,
        rtt.as_secs_f64() * 1e3
    ));
    rig.at_rest().await;

    // Latency and jitter: 50 ± 10 ms each way through the relay.
    relay.set(50, 10);
    let mut dials = Vec::new();
    for _ in 0..9 {
        dials.push(echo_round_trip(rig.front, rig.dest).await.0);
    }
    dials.sort();
    let len = 4 * MIB * scale;
    let t = rig.whole(len).await;
    relay.set(0, 0);
    rig.line(format!(
        "50 ± 10 ms each way: dial median {:.0} ms; {} MiB in {:.2} s = {:.2} MiB/s (one 256 KiB stream window per ~100 ms round trip)",
        dials[4].as_secs_f64() * 1e3,
        len / MIB,
        t.as_secs_f64(),
        mib_s(len, t)
    ));
    rig.at_rest().await;

    // A flapping link: down 2 s, up 3 s, four times, under one download that spans them all
    // (on a 20 Mbit/s link, so it does). TCP rides it out; the keepalive (a PING after 10 s,
    // dead 20 s later) does not call the tunnel dead.
    lab.shape(Some("20mbit"));
    let len = 40 * MIB;
    let progress = Arc::new(AtomicU64::new(0));
    let flapped = tokio::spawn(download(rig.front, rig.dest, len, progress.clone()));
    let mut at_flaps = Vec::new();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        at_flaps.push(progress.load(Ordering::Relaxed));
        lab.drop_packets(Some(""));
        tokio::time::sleep(Duration::from_secs(2)).await;
        lab.drop_packets(None);
    }
    assert!(
        at_flaps[3] < len,
        "the download was over before the last flap: {at_flaps:?}"
    );
    let t = match tokio::time::timeout(LIMIT, flapped).await.unwrap().unwrap() {
        Download::Whole(t) => t,
        Download::Failed(g, e) => panic!("download across the flaps failed after {g}: {e}"),
    };
    lab.shape(None);
    assert_eq!(
        metric_at(server_health, "tether_agents").await,
        Some(1.0),
        "the tunnel outlived the flaps"
    );
    rig.line(format!(
        "flapping (2 s down / 3 s up, x4, 20 Mbit/s): {} MiB whole in {:.2} s across all four ({} MiB in at the last); the tunnel stayed up",
        len / MIB,
        t.as_secs_f64(),
        at_flaps[3] / MIB
    ));
    rig.at_rest().await;

    // A 30 s blackhole under a download: both ends find the tunnel dead by keepalive, the
    // stream fails visibly, and the agent is back soon after the link.
    let progress = Arc::new(AtomicU64::new(0));
    let cut = tokio::spawn(download(rig.front, rig.dest, 1 << 40, progress.clone()));
    let started = Instant::now();
    while progress.load(Ordering::Relaxed) < MIB && started.elapsed() < LIMIT {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lab.drop_packets(Some(""));
    let down = Instant::now();
    let (server_saw, agent_saw) = tokio::join!(
        until_metric(server_health, "tether_agents", 0.0, Duration::from_secs(60)),
        until_metric(
            agent_health,
            "tether_agent_tunnels",
            0.0,
            Duration::from_secs(60)
        ),
    );
    let outcome = tokio::time::timeout(LIMIT, cut).await.unwrap().unwrap();
    let failed_after = down.elapsed();
    let Download::Failed(got, why) = outcome else {
        panic!("an endless download ended whole");
    };
    tokio::time::sleep_until(down + Duration::from_secs(30)).await;
    lab.drop_packets(None);
    let (server_back, agent_back) = tokio::join!(
        until_metric(server_health, "tether_agents", 1.0, LIMIT),
        until_metric(agent_health, "tether_agent_tunnels", 1.0, LIMIT),
    );
    let t = rig.whole(4 * MIB).await;
    rig.line(format!(
        "30 s blackhole: dead tunnel found by the server after {:.1} s, by the agent after {:.1} s; the stream failed after {:.1} s ({} MiB in, {why}); back {:.1} s (server) / {:.1} s (agent) after the link; then 4 MiB in {:.2} s",
        server_saw.as_secs_f64(),
        agent_saw.as_secs_f64(),
        failed_after.as_secs_f64(),
        got / MIB,
        server_back.as_secs_f64(),
        agent_back.as_secs_f64(),
        t.as_secs_f64()
    ));
    // The restored tunnel is a new connection: the same number of fds as the first.
    rig.at_rest().await;

    let report = rig.report.join("\n") + "\n";
    let _ = std::fs::write(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("netfaults.txt"),
        report,
    );
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A process's resident memory, in KiB (`/proc/<pid>/status`).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// The soak (not in CI; docs/FAULTS.md): `TETHER_SOAK_SECS` (3600) of mixed load, downloads
/// of 64 KiB to 8 MiB and dials with a 1 KiB echo from four clients, under a fault that
/// changes every minute (none, 1 % loss, 20 Mbit/s, 50 ± 10 ms, 10 % loss, a link down 2 s
/// in every 10). At the end of each minute the load stops, both processes must come back to
/// rest, and their RSS and fds are sampled. Every byte is checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "an hour: cargo test -p tether-server --release --test netfaults -- --ignored soak --nocapture"]
async fn soak() {
    use std::sync::atomic::AtomicBool;
    let Some(setup) = start().await else {
        return;
    };
    let secs: u64 = std::env::var("TETHER_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3600);
    let Setup {
        mut rig,
        relay,
        dir,
        ref lab,
        ..
    } = setup;
    let pids: Vec<u32> = rig.rest.iter().map(|r| r.1).collect();
    let faults = [
        "none",
        "1 % loss",
        "20 Mbit/s",
        "50 ± 10 ms",
        "10 % loss",
        "flapping",
    ];
    let began = Instant::now();
    let mut first_rss = None;
    let mut most_rss = [0u64; 2];
    let (mut total, mut dials, mut failed) = (0u64, 0u64, 0u64);
    for minute in 0.. {
        if began.elapsed() >= Duration::from_secs(secs) {
            break;
        }
        let fault = faults[minute % faults.len()];
        match fault {
            "1 % loss" => lab.drop_packets(Some("numgen random mod 100 < 1")),
            "10 % loss" => lab.drop_packets(Some("numgen random mod 100 < 10")),
            "20 Mbit/s" => lab.shape(Some("20mbit")),
            "50 ± 10 ms" => relay.set(50, 10),
            _ => {}
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flapping = (fault == "flapping").then(|| {
            let stop = stop.clone();
            let ns = lab.ns.clone();
            let dev = lab.tun_in.clone();
            tokio::spawn(async move {
                let nft = |rule: &str| {
                    let _ = run(Command::new("ip")
                        .args(["netns", "exec", &ns, "nft"])
                        .args(rule.split_whitespace()));
                };
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_secs(8)).await;
                    nft("add chain inet tnf flap { type filter hook output priority 0 ; }");
                    nft(&format!("add rule inet tnf flap oifname {dev} drop"));
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    nft("delete chain inet tnf flap");
                }
            })
        });
        let load =
            Duration::from_secs(50.min(secs.saturating_sub(began.elapsed().as_secs()).max(1)));
        let mut workers = Vec::new();
        for w in 0..4u64 {
            let (front, dest, stop) = (rig.front, rig.dest, stop.clone());
            workers.push(tokio::spawn(async move {
                let (mut bytes, mut dials, mut failed) = (0u64, 0u64, 0u64);
                let mut k = w;
                while !stop.load(Ordering::Relaxed) {
                    k = k.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    let len = (64 * 1024) << ((k >> 60) & 7);
                    let got =
                        tokio::time::timeout(LIMIT, download(front, dest, len, Arc::default()))
                            .await;
                    match got {
                        Ok(Download::Whole(_)) => bytes += len,
                        _ => failed += 1,
                    }
                    if try_echo(front, dest).await.is_err() {
                        failed += 1;
                    }
                    dials += 2;
                }
                (bytes, dials, failed)
            }));
        }
        tokio::time::sleep(load).await;
        stop.store(true, Ordering::Relaxed);
        let (mut b, mut d, mut f) = (0, 0, 0);
        for w in workers {
            let (wb, wd, wf) = w.await.unwrap();
            (b, d, f) = (b + wb, d + wd, f + wf);
        }
        if let Some(t) = flapping {
            t.await.unwrap();
        }
        lab.drop_packets(None);
        lab.shape(None);
        relay.set(0, 0);
        rig.at_rest().await;
        let rss: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
        let fds: Vec<usize> = pids.iter().map(|p| open_fds(*p)).collect();
        first_rss.get_or_insert(rss.clone());
        most_rss = [most_rss[0].max(rss[0]), most_rss[1].max(rss[1])];
        (total, dials, failed) = (total + b, dials + d, failed + f);
        rig.line(format!(
            "minute {minute:>3} {fault:<11} {:>6} MiB, {d:>5} dials, {f} failed; at rest; RSS server {} KiB agent {} KiB; fds {} / {}",
            b / MIB,
            rss[0],
            rss[1],
            fds[0],
            fds[1]
        ));
    }
    let first = first_rss.unwrap_or_default();
    rig.line(format!(
        "soak: {:.0} min, {} MiB, {dials} dials, {failed} failed (a flap or 10 % loss can outlast a dial); RSS server {} -> most {} KiB, agent {} -> most {} KiB; at rest after every minute",
        began.elapsed().as_secs_f64() / 60.0,
        total / MIB,
        first.first().unwrap_or(&0),
        most_rss[0],
        first.get(1).unwrap_or(&0),
        most_rss[1]
    ));
    let report = rig.report.join("\n") + "\n";
    let _ = std::fs::write(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("soak.txt"),
        report,
    );
    let _ = std::fs::remove_dir_all(&dir);
}
