//! `--perf`: profiles of a dial round, by area.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use tether_bench::procs::Error;

/// `perf record` (cpu-clock samples, user space) on one process until stopped: where a dial
/// round's CPU goes, for `--perf DIR`.
pub(crate) struct Perf {
    pub(crate) child: std::process::Child,
    pub(crate) out: PathBuf,
}

impl Perf {
    pub(crate) fn start(pid: u32, out: PathBuf) -> Option<Perf> {
        let child = Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-F", "1999", "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| eprintln!("perf record: {e}"))
            .ok()?;
        Some(Perf { child, out })
    }

    /// Stops the recording (SIGINT, so perf writes its file), writes the flat profile beside
    /// it (`.txt`) and returns the share of the samples in each of [`AREAS`].
    pub(crate) fn stop(mut self) -> Result<Vec<f64>, Error> {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        self.child.wait()?;
        let report = Command::new("perf")
            .args(["report", "--stdio", "--no-children", "--sort", "symbol"])
            .args(["--percent-limit", "0", "-i"])
            .arg(&self.out)
            .stderr(Stdio::null())
            .output()?;
        let text = String::from_utf8_lossy(&report.stdout);
        std::fs::write(self.out.with_extension("txt"), text.as_bytes())?;
        let mut shares = vec![0.0; AREAS.len()];
        // Lines such as `    12.34%  [k] finish_task_switch`.
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let (Some(pct), Some(kind)) = (words.next(), words.next()) else {
                continue;
            };
            let Some(pct) = pct.strip_suffix('%').and_then(|p| p.parse::<f64>().ok()) else {
                continue;
            };
            let symbol: String = words.collect::<Vec<_>>().join(" ");
            shares[area(kind, &symbol)] += pct;
        }
        Ok(shares)
    }
}

/// Where a profile's samples fall, for `--perf`.
pub(crate) const AREAS: [&str; 7] = [
    "kernel",
    "TLS (rustls, aws-lc)",
    "tokio",
    "tether",
    "tracing",
    "allocator",
    "other",
];

/// The index in [`AREAS`] of a sample in `symbol` (`kind` is perf's `[k]` or `[.]`).
pub(crate) fn area(kind: &str, symbol: &str) -> usize {
    let has = |s: &str| symbol.contains(s);
    if kind == "[k]" {
        0
    } else if has("aws_lc") || has("rustls") {
        1
    } else if has("tracing") {
        4
    } else if has("rjem") || has("jemalloc") || has("malloc") {
        5
    } else if has("tokio::") {
        2
    } else if has("tether") {
        3
    } else {
        6
    }
}
