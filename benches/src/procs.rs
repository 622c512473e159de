//! Child processes and what /proc says about them, for the report runners.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The runners' error type.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// A child process, killed when dropped.
pub struct Proc {
    /// The child process.
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A port free on 127.0.0.1 now.
pub fn free_port() -> Result<u16, Error> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64, Error> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    Ok(ticks / clock_ticks())
}

/// utime + stime + cutime + cstime of a process and of every live descendant, in seconds: the
/// whole cost of a server that forks per connection (sshd, socat), whose children that ended
/// and were waited for count in their parent's `cutime` and `cstime`.
pub fn tree_cpu_seconds(pid: u32) -> Result<f64, Error> {
    let stat = |p: u32| -> Option<(u32, f64)> {
        let s = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        let after = s.rsplit_once(')')?.1;
        let f: Vec<&str> = after.split_whitespace().collect();
        let ppid = f.get(1)?.parse().ok()?;
        let ticks: f64 = [11, 12, 13, 14]
            .iter()
            .filter_map(|i| f.get(*i)?.parse::<f64>().ok())
            .sum();
        Some((ppid, ticks))
    };
    let all: Vec<(u32, u32, f64)> = std::fs::read_dir("/proc")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| stat(p).map(|(pp, t)| (p, pp, t)))
        .collect();
    let mut tree = vec![pid];
    let mut ticks = 0.0;
    while let Some(p) = tree.pop() {
        for (child, parent, t) in &all {
            if *child == p {
                ticks += t;
            }
            if *parent == p {
                tree.push(*child);
            }
        }
    }
    Ok(ticks / clock_ticks())
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`).
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// A `Field:  123 kB` line of a /proc file, in KiB.
pub fn proc_kib(path: &str, field: &str) -> Result<u64, Error> {
    let text = std::fs::read_to_string(path)?;
    let line = text
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
        .ok_or_else(|| format!("no {field} in {path}"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64, Error> {
    proc_kib(&format!("/proc/{pid}/status"), "VmRSS")
}

/// Resident anonymous memory (heap, stacks) of a process, in KiB; the rest of its RSS is
/// mapped files (the binary's code, libc).
pub fn anon_kib(pid: u32) -> Result<u64, Error> {
    proc_kib(&format!("/proc/{pid}/smaps_rollup"), "Anonymous")
}

/// Builds the binaries in the profile this report was built in (release for the published
/// figures), next to it.
pub fn binaries() -> Result<PathBuf, Error> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().ok_or("no target dir")?.to_path_buf();
    let profile = dir
        .file_name()
        .and_then(|n| n.to_str())
        .map_or("release", |n| if n == "debug" { "dev" } else { n })
        .to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ok = Command::new(cargo)
        .args([
            "build",
            "--profile",
            &profile,
            "-p",
            "tether-server",
            "-p",
            "tether-agent",
            "--bins",
        ])
        .status()?
        .success();
    if !ok {
        return Err("building tether-server and tether-agent failed".into());
    }
    Ok(dir)
}

/// Waits (at most 10 s) until `health` answers `/readyz` with 200.
pub async fn ready(health: SocketAddr) -> bool {
    for _ in 0..500 {
        if let Ok(mut s) = TcpStream::connect(health).await {
            let _ = s
                .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await;
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            if out.starts_with(b"HTTP/1.1 200") {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// The value of a series (`tether_agents`, say) in `/metrics` at `health`; `None` if the
/// server does not answer.
pub async fn metric(health: SocketAddr, series: &str) -> Option<f64> {
    let mut s = TcpStream::connect(health).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&out);
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .or(Some(0.0))
}
