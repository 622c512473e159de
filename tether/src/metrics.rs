//! Metrics both binaries export: stream bytes and errors counted by the tunnels, the standard
//! `process_*` metrics, and the small HTTP server for `/healthz`, `/readyz`, `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use tether_proto::ErrorCode;
use tether_proto::error::Initiator;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

/// Slots for the error codes this end knows (0x00..=0x0f and 0x100..=0x104, SPEC 8), and one
/// for any other, so a peer that picks codes at will cannot grow a label set
/// (docs/SECURITY.md).
const SLOTS: usize = 16 + 5 + 1;

fn slot(code: ErrorCode) -> usize {
    match code.0 {
        c @ 0..=0x0f => c as usize,
        c @ 0x100..=0x104 => 16 + (c - 0x100) as usize,
        _ => SLOTS - 1,
    }
}

fn slot_name(i: usize) -> &'static str {
    let n = u32::try_from(i).unwrap_or(u32::MAX);
    let code = match i {
        0..=15 => ErrorCode(n),
        16..=20 => ErrorCode(0x100 + n - 16),
        _ => return "other",
    };
    code.name().unwrap_or("other")
}

/// Counters the tunnels of one process share: payload bytes each way and stream errors by
/// code and by who started them. Plain atomics; encoded at scrape time.
#[derive(Debug)]
pub struct TunnelStats {
    sent: AtomicU64,
    received: AtomicU64,
    /// `[local | peer][code index, or the last slot for an unknown code]`.
    errors: [[AtomicU64; SLOTS]; 2],
}

impl Default for TunnelStats {
    fn default() -> Self {
        TunnelStats {
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            errors: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }
}

impl TunnelStats {
    pub(crate) fn sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn received(&self, n: usize) {
        self.received.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn stream_error(&self, code: ErrorCode, by: Initiator) {
        let i = slot(code);
        let who = usize::from(by == Initiator::Peer);
        self.errors[who][i].fetch_add(1, Ordering::Relaxed);
    }

    /// Payload bytes sent and received on every stream so far.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }
}

impl Collector for TunnelStats {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        {
            let mut m = encoder.encode_descriptor(
                "stream_bytes",
                "Stream payload bytes through the tunnels, by direction (sent to or received from the peer)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (dir, v) in [("sent", &self.sent), ("received", &self.received)] {
                let labels = [("direction", dir)];
                ConstCounter::new(v.load(Ordering::Relaxed)).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "stream_errors",
            "Streams that ended with an error (reset, failed dial, lost tunnel), by code and by who ended them",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (who, row) in ["local", "peer"].into_iter().zip(&self.errors) {
            for (i, v) in row.iter().enumerate() {
                let n = v.load(Ordering::Relaxed);
                if n == 0 {
                    continue;
                }
                let code = slot_name(i);
                let labels = [("code", code), ("by", who)];
                ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// `reloads_total{material, result}`: changes of certificate, key, CA and token files,
/// applied (`replaced`) or refused (`kept`, the old material stays); alert on `kept`.
pub struct ReloadCollector(pub Vec<Arc<dyn crate::reload::ReloadStats>>);

impl std::fmt::Debug for ReloadCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReloadCollector")
    }
}

impl Collector for ReloadCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        if self.0.is_empty() {
            return Ok(());
        }
        let mut m = encoder.encode_descriptor(
            "reloads",
            "Changes of certificate, key, CA and token files: applied (replaced) or not loaded (kept: the old material stays)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for s in &self.0 {
            let (replaced, kept) = s.counts();
            for (result, n) in [("replaced", replaced), ("kept", kept)] {
                let labels = [("material", s.name()), ("result", result)];
                ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The standard process metrics (`process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, `process_virtual_memory_bytes`, `process_open_fds`,
/// `process_max_fds`, `process_start_time_seconds`), read from `/proc/self` at scrape time.
/// Elsewhere than Linux, none.
#[derive(Debug, Default)]
pub struct ProcessCollector;

#[derive(Debug, Default, PartialEq)]
struct ProcStat {
    cpu_seconds: f64,
    virtual_bytes: u64,
    resident_bytes: u64,
    start_time_seconds: f64,
    open_fds: u64,
    max_fds: u64,
}

/// Clock ticks per second and page size: Linux's values on every architecture tether runs on
/// (the core forbids the `unsafe` that `sysconf` needs).
const TICKS: f64 = 100.0;
const PAGE: u64 = 4096;

fn proc_stat() -> Option<ProcStat> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    // Field numbers (proc(5)) minus 3: utime 14, stime 15, starttime 22, vsize 23, rss 24.
    let (utime, stime, start, vsize, rss) = (num(11)?, num(12)?, num(19)?, num(20)?, num(21)?);
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())?;
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        })
        .unwrap_or(0);
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    Some(ProcStat {
        cpu_seconds: (utime + stime) as f64 / TICKS,
        virtual_bytes: vsize,
        resident_bytes: rss * PAGE,
        start_time_seconds: boot as f64 + start as f64 / TICKS,
        open_fds,
        max_fds,
    })
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::MetricType;
        let Some(p) = proc_stat() else {
            return Ok(());
        };
        let c = ConstCounter::new(p.cpu_seconds);
        c.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            MetricType::Counter,
        )?)?;
        let gauges: [(&str, &str, f64); 5] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                p.resident_bytes as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                p.virtual_bytes as f64,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                p.open_fds as f64,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                p.max_fds as f64,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                p.start_time_seconds,
            ),
        ];
        for (name, help, v) in gauges {
            ConstGauge::new(v).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        Ok(())
    }
}

/// The content type of `/metrics`.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What a health endpoint answers for a path: status, reason, content type, body.
pub type Answer = (u16, &'static str, &'static str, String);

/// Connections a health server serves at once; more wait in the listen backlog.
pub const MAX_HEALTH_CONNECTIONS: usize = 256;

/// Serves `/healthz`, `/readyz`, `/metrics` (whatever `answer` says for a path) on `l`: one
/// small request per connection, at most [`MAX_HEALTH_CONNECTIONS`] at once, each whole
/// exchange (reading the request, writing the answer) within 10 s, so a client that never
/// reads its `/metrics` holds nothing for long (docs/SECURITY.md).
pub async fn serve<F>(l: TcpListener, answer: Arc<F>)
where
    F: Fn(&str) -> Answer + Send + Sync + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HEALTH_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((mut s, _)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(Duration::from_secs(10), async move {
                let mut buf = [0u8; 2048];
                let Ok(n) = s.read(&mut buf).await else {
                    return;
                };
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut req = httparse::Request::new(&mut headers);
                let path = match req.parse(&buf[..n]) {
                    Ok(_) => req.path.unwrap_or("/").to_owned(),
                    Err(_) => String::new(),
                };
                let (status, text, ctype, body) = answer(&path);
                crate::server::respond(&mut s, status, text, ctype, &body).await;
            })
            .await;
        });
    }
}

/// The text exposition of `registries`, one after the other, with one end marker.
pub fn render(registries: &[&prometheus_client::registry::Registry]) -> String {
    let mut out = String::new();
    for r in registries {
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, r);
    }
    let _ = prometheus_client::encoding::text::encode_eof(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn process_metrics_read_this_process() {
        let p = proc_stat().expect("/proc/self");
        assert!(p.resident_bytes > 1024 * 1024, "{p:?}");
        assert!(p.open_fds > 0 && p.max_fds >= p.open_fds, "{p:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(p.start_time_seconds <= now + 1.0 && p.start_time_seconds > now - 86_400.0 * 365.0);
    }

    #[test]
    fn unknown_codes_share_one_label() {
        let s = TunnelStats::default();
        s.stream_error(ErrorCode::CANCEL, Initiator::Peer);
        s.stream_error(ErrorCode(0x7777), Initiator::Peer);
        s.stream_error(ErrorCode(0x7778), Initiator::Local);
        let mut r = prometheus_client::registry::Registry::with_prefix("tether");
        r.register_collector(Box::new(Arc::new(s)));
        let text = render(&[&r]);
        assert!(
            text.contains("tether_stream_errors_total{code=\"CANCEL\",by=\"peer\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tether_stream_errors_total{code=\"other\",by=\"peer\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tether_stream_errors_total{code=\"other\",by=\"local\"} 1"),
            "{text}"
        );
    }
}
