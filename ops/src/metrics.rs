//! Metrics both binaries export: stream bytes and errors counted by the tunnels, the standard
//! `process_*` metrics, and the small HTTP server for `/healthz`, `/readyz`, `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use tether::stats::TunnelStats;
use tether_proto::error::Initiator;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// Dial latency buckets, in seconds: 0.5 ms to 25 s.
pub const DIAL_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 25.0,
];

/// A gauge raised while the guard lives: lowered on every path out, cancellation included.
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    /// Raises `g` until the guard is dropped.
    pub fn up(g: &Gauge) -> GaugeGuard {
        g.inc();
        GaugeGuard(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A counter or gauge value read from an atomic, as prometheus-client encodes it.
fn const_counter(n: u64) -> ConstCounter<u64> {
    ConstCounter::new(n)
}

/// A gauge value from a count.
pub fn gauge_of(n: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
}

/// `stream_bytes_total{direction}` and `stream_errors_total{code, by}`: the counters every
/// tunnel of the process shares ([`TunnelStats`]), read at scrape time.
#[derive(Debug)]
pub struct TunnelCollector(pub Arc<TunnelStats>);

impl Collector for TunnelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        {
            let mut m = encoder.encode_descriptor(
                "stream_bytes",
                "Stream payload bytes through the tunnels, by direction (sent to or received from the peer)",
                None,
                MetricType::Counter,
            )?;
            let (sent, received) = self.0.bytes();
            for (dir, v) in [("sent", sent), ("received", received)] {
                let labels = [("direction", dir)];
                const_counter(v).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "stream_errors",
            "Streams that ended with an error (reset, failed dial, lost tunnel), by code and by who ended them",
            None,
            MetricType::Counter,
        )?;
        for (code, by, n) in self.0.stream_errors() {
            let who = match by {
                Initiator::Local => "local",
                Initiator::Peer => "peer",
            };
            let labels = [("code", code), ("by", who)];
            const_counter(n).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// `reloads_total{material, result}`: changes of certificate, key, CA and token files,
/// applied (`replaced`) or refused (`kept`, the old material stays); alert on `kept`.
pub struct ReloadCollector(pub Vec<Arc<dyn tether::reload::ReloadStats>>);

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
                respond(&mut s, status, text, ctype, &body).await;
            })
            .await;
        });
    }
}

/// Writes a small HTTP/1.1 response and closes.
pub async fn respond<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    status: u16,
    text: &str,
    content_type: &str,
    body: &str,
) {
    let head = format!(
        "HTTP/1.1 {status} {text}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(body.as_bytes()).await;
    let _ = s.shutdown().await;
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
    fn stream_errors_are_exported_by_code_and_initiator_with_unknown_codes_as_other() {
        let s = Arc::new(TunnelStats::default());
        s.stream_error(tether_proto::ErrorCode::CANCEL, Initiator::Peer);
        s.stream_error(tether_proto::ErrorCode(0x7777), Initiator::Peer);
        s.stream_error(tether_proto::ErrorCode(0x7778), Initiator::Local);
        s.sent(5);
        let mut r = prometheus_client::registry::Registry::with_prefix("tether");
        r.register_collector(Box::new(TunnelCollector(s)));
        let text = render(&[&r]);
        for line in [
            "tether_stream_errors_total{code=\"CANCEL\",by=\"peer\"} 1",
            "tether_stream_errors_total{code=\"other\",by=\"peer\"} 1",
            "tether_stream_errors_total{code=\"other\",by=\"local\"} 1",
            "tether_stream_bytes_total{direction=\"sent\"} 5",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
