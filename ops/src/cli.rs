//! The flags and helpers both binaries share: logging, tunnel settings, shutdown signals,
//! parsers, the runtime. Each binary's own flag set lives in its crate's `cli` module, so a test
//! can run any argument list (a Kubernetes manifest's, say) through the very parsers the
//! binary uses (clap's `try_parse_from`).

/// How logs are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line, with the span fields (tunnel, agent id, stream).
    Json,
}

/// Logging flags, and klog's flags from Konnectivity's manifests, which are accepted with a
/// notice of what tether does instead.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Logging")]
pub struct LogArgs {
    /// Log level: error, warn, info, debug, trace, or per target (`tether=debug,info`).
    /// RUST_LOG, when set, wins over it and over -v.
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// klog verbosity, as in Konnectivity's manifests: 0-1 info, 2-4 debug, 5 and more trace.
    #[arg(short = 'v', long = "v", value_name = "N")]
    pub verbosity: Option<u8>,
    /// Log line format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// klog: tether always logs to stderr (accepted, no effect).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", hide = true)]
    logtostderr: Option<String>,
    /// klog (accepted, no effect).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", hide = true)]
    alsologtostderr: Option<String>,
    /// klog: tether logs to stderr only; the container runtime keeps the file.
    #[arg(long, hide = true)]
    log_file: Option<String>,
    /// klog (accepted, no effect).
    #[arg(long, hide = true)]
    log_dir: Option<String>,
    /// klog (accepted, no effect).
    #[arg(long, hide = true)]
    log_file_max_size: Option<String>,
    /// klog (accepted, no effect).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", hide = true)]
    add_dir_header: Option<String>,
    /// klog (accepted, no effect).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", hide = true)]
    skip_headers: Option<String>,
    /// klog (accepted, no effect).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", hide = true)]
    skip_log_headers: Option<String>,
    /// klog (accepted, no effect).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", hide = true)]
    one_output: Option<String>,
    /// klog (accepted, no effect).
    #[arg(long, hide = true)]
    stderrthreshold: Option<String>,
    /// klog: use --log-level with per-target levels instead.
    #[arg(long, hide = true)]
    vmodule: Option<String>,
    /// klog (accepted, no effect).
    #[arg(long, hide = true)]
    log_backtrace_at: Option<String>,
}

impl LogArgs {
    /// The filter these flags ask for (RUST_LOG wins when set).
    pub fn filter(&self) -> String {
        std::env::var("RUST_LOG").unwrap_or_else(|_| self.level())
    }

    /// The filter the flags alone ask for.
    pub fn level(&self) -> String {
        match self.verbosity {
            Some(0 | 1) => "info".into(),
            Some(2..=4) => "debug".into(),
            Some(_) => "trace".into(),
            None => self.log_level.clone(),
        }
    }

    /// klog flags given, each with what tether does instead, for one notice line each.
    pub fn notices(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut say = |given: bool, flag: &str, instead: &str| {
            if given {
                out.push(format!("--{flag} is a klog flag: {instead}"));
            }
        };
        let stderr = "tether logs to stderr only (the container runtime keeps the log)";
        say(self.logtostderr.is_some(), "logtostderr", stderr);
        say(self.alsologtostderr.is_some(), "alsologtostderr", stderr);
        say(self.log_file.is_some(), "log-file", stderr);
        say(self.log_dir.is_some(), "log-dir", stderr);
        say(
            self.log_file_max_size.is_some(),
            "log-file-max-size",
            stderr,
        );
        say(self.skip_log_headers.is_some(), "skip-log-headers", stderr);
        say(
            self.stderrthreshold.is_some(),
            "stderrthreshold",
            "every level at or above --log-level goes to stderr",
        );
        say(
            self.one_output.is_some(),
            "one-output",
            "each event is written once",
        );
        let fmt = "the line format is --log-format text|json";
        say(self.add_dir_header.is_some(), "add-dir-header", fmt);
        say(self.skip_headers.is_some(), "skip-headers", fmt);
        say(
            self.vmodule.is_some(),
            "vmodule",
            "per-target levels go in --log-level (`tether::agent=debug,info`)",
        );
        say(
            self.log_backtrace_at.is_some(),
            "log-backtrace-at",
            "not supported; ignored",
        );
        out
    }
}

/// Starts tracing logs on stderr as `args` ask.
pub fn init(args: &LogArgs) -> Result<(), String> {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let spec = args.filter();
    // `Targets` takes RUST_LOG's `level` and `target=level,...` forms without linking a regex
    // engine (an idle process maps less code).
    let filter: tracing_subscriber::filter::Targets = spec
        .parse()
        .map_err(|e| format!("--log-level {spec:?} (or RUST_LOG): {e}"))?;
    let registry = tracing_subscriber::registry().with(filter);
    let done = match args.log_format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    // Set already (a test, an embedding program): theirs stays.
    drop(done);
    Ok(())
}

/// Starts tracing logs on stderr; `RUST_LOG` overrides `default` (the examples' logging).
pub fn init_logging(default: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<tracing_subscriber::filter::Targets>().ok())
        .or_else(|| default.parse().ok())
        .unwrap_or_default();
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr),
        )
        .with(filter)
        .try_init();
}

/// A flag Konnectivity has that tether accepts for its manifests' sake, with what tether does
/// instead; the notice is logged once at startup when the flag is given.
pub fn konnectivity_notice(given: bool, flag: &str, instead: &str) -> Option<String> {
    given.then(|| format!("--{flag} (Konnectivity) is accepted: {instead}"))
}

/// Raises the soft limit on open files to the hard limit, as Go's runtime does at start: every
/// tunnel and every proxied connection is a descriptor. Logs the limit in effect.
pub fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::info!(open_files = n, "file descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the file descriptor limit"),
    }
}

/// Has jemalloc (the binaries' allocator) return freed pages to the kernel from its own
/// background threads, about 10 s after they are freed, instead of only when the process
/// next allocates: an idle server keeps nothing of a burst. Without them, the fleet runner
/// measured 73 to 117 KiB of server memory per tunnel at 1,000 agents once each had carried
/// 1 MiB and gone idle for 12 s, against 40 before; with them, 45 (docs/BENCHMARKS.md).
pub fn purge_in_background() {
    #[cfg(all(unix, not(target_env = "musl"), feature = "jemalloc"))]
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(error = %e, "could not start the allocator's background purging");
    }
}

/// Waits for SIGTERM (or Ctrl-C) or for `failed`, a task of the process that stopped early,
/// and logs which; the failure, if it was one. Either way the caller drains: a task that
/// fails ends the process, to be restarted, rather than leaving it up without that task.
pub async fn until_stopped(failed: impl std::future::Future<Output = String>) -> Option<String> {
    let failure = tokio::select! {
        () = shutdown_signal() => None,
        why = failed => Some(why),
    };
    match &failure {
        None => tracing::info!("shutting down: draining tunnels"),
        Some(why) => tracing::error!("{why}: shutting down, draining tunnels"),
    }
    failure
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Parses Konnectivity's `--agent-identifiers` (`ipv4=1.2.3.4&host=node-1&cidr=10.0.0.0/8&
/// default-route=true`; a key may repeat).
pub fn parse_identifiers(s: &str) -> Result<Vec<tether_proto::frame::Identifier>, String> {
    use std::net::IpAddr;
    use tether_proto::frame::Identifier;
    let mut out = Vec::new();
    for pair in s.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("identifier {pair:?} is not key=value"))?;
        let bad = |what: &str| format!("identifier {pair:?}: {what}");
        let id = match k {
            "host" => Identifier::Host(v.to_owned()),
            "ipv4" => Identifier::Ipv4(v.parse().map_err(|_| bad("not an IPv4 address"))?),
            "ipv6" => Identifier::Ipv6(v.parse().map_err(|_| bad("not an IPv6 address"))?),
            "cidr" => {
                let (a, p) = v.split_once('/').ok_or_else(|| bad("not addr/prefix"))?;
                let a: IpAddr = a.parse().map_err(|_| bad("bad address"))?;
                Identifier::Cidr(a, p.parse().map_err(|_| bad("bad prefix"))?)
            }
            "default-route" if v == "true" => Identifier::DefaultRoute,
            "default-route" => continue,
            _ => return Err(bad("unknown key (host, ipv4, ipv6, cidr, default-route)")),
        };
        id.validate().map_err(bad)?;
        out.push(id);
    }
    Ok(out)
}

/// Parses a bind address; empty means every interface, as in Konnectivity's flags.
pub fn parse_bind(s: &str) -> Result<std::net::IpAddr, String> {
    if s.trim().is_empty() {
        return Ok(std::net::IpAddr::from([0, 0, 0, 0]));
    }
    s.trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an IP address (empty: every interface)"))
}

/// Parses a duration flag in Go's `time.ParseDuration` grammar, as Konnectivity's flags take
/// them (`10s`, `500ms`, `1h0m0s` as its `--help` prints, `1m30s`, `300us`, `+5s`): one or more
/// decimal numbers each with a unit (`ns`, `us`, `µs`, `μs`, `ms`, `s`, `m`, `h`), or `0`; also
/// a bare number of seconds (`10`). Negative durations and ones over a year are refused.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("bad duration {s:?} (Go's syntax: 10s, 500ms, 1h30m, 300us)");
    let body = s.trim();
    let body = body.strip_prefix('+').unwrap_or(body);
    if body.starts_with('-') {
        return Err(format!("duration {s:?} is negative"));
    }
    if body.is_empty() {
        return Err(bad());
    }
    // A bare number: seconds (tether's own form; `0` is Go's too).
    if let Ok(n) = body.parse::<f64>() {
        return from_secs(n, s);
    }
    let mut secs = 0.0f64;
    let mut rest = body;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(bad)?;
        let (num, tail) = rest.split_at(num_end);
        let n: f64 = num.parse().map_err(|_| bad())?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => {
                return Err(format!(
                    "bad duration unit {unit:?} in {s:?} (ns, us, ms, s, m, h)"
                ));
            }
        };
        secs += n * scale;
        rest = tail;
    }
    from_secs(secs, s)
}

fn from_secs(secs: f64, s: &str) -> Result<std::time::Duration, String> {
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("bad duration {s:?}"));
    }
    // A bound this end chooses, so no deadline computed from a flag can overflow a clock.
    if secs > MAX_DURATION_SECS {
        return Err(format!("duration {s:?} is longer than a year (8760h)"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// The longest duration a flag takes: a year.
const MAX_DURATION_SECS: f64 = 365.0 * 24.0 * 3600.0;

/// Parses `--agent-accept-rate`: connections per second, 0 (no limit) or from
/// [`tether::listen::MIN_AGENT_ACCEPT_RATE`] on.
pub fn parse_accept_rate(s: &str) -> Result<f64, String> {
    let min = tether::listen::MIN_AGENT_ACCEPT_RATE;
    match s.trim().parse::<f64>() {
        Ok(r) if r == 0.0 || (r.is_finite() && r >= min) => Ok(r),
        _ => Err(format!(
            "{s:?} is not a rate: connections per second, 0 (no limit) or at least {min}"
        )),
    }
}

/// `--keepalive-time`'s default, and what 0 means.
pub const DEFAULT_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(10);

/// Parses a boolean flag value as Go's `strconv.ParseBool` does (Konnectivity's flags):
/// `1`, `t`, `T`, `TRUE`, `true`, `True`, and the same for false.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (true, false, 1, 0)")),
    }
}

/// Flags both binaries share: keepalive, window, drain.
#[derive(clap::Args, Debug, Clone)]
pub struct TunnelArgs {
    /// Keepalive interval on the tunnels; 0: the default, 10s (as Konnectivity's agent
    /// takes 0; a tunnel never goes without keepalive).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub keepalive_time: std::time::Duration,
    /// How long without any frame, once a keepalive PING is out, before a tunnel is dead.
    #[arg(long, value_parser = parse_duration, default_value = "20s")]
    pub keepalive_timeout: std::time::Duration,
    /// Per-stream window in bytes.
    #[arg(long, default_value_t = 256 * 1024)]
    pub stream_window: u32,
    /// How long a tunnel may take from the TCP connection to an established session (TCP,
    /// TLS, HELLO and WELCOME together); past it the session sends GOAWAY HANDSHAKE_TIMEOUT.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub handshake_timeout: std::time::Duration,
    /// How long to drain on SIGTERM (Konnectivity's --graceful-shutdown-timeout).
    #[arg(long, alias = "graceful-shutdown-timeout", value_parser = parse_duration, default_value = "10s")]
    pub drain_grace: std::time::Duration,
}

/// A tokio runtime with `threads` workers: 1 runs everything on the calling thread (no task
/// ever hops threads, the least CPU and memory per byte), 0 one worker per core.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    b.enable_all().build()
}

impl TunnelArgs {
    /// The keepalive interval in use: `--keepalive-time`, or the default for 0.
    pub fn keepalive(&self) -> std::time::Duration {
        match self.keepalive_time {
            std::time::Duration::ZERO => DEFAULT_KEEPALIVE,
            t => t,
        }
    }

    /// Notices for values taken with another meaning than they seem to have.
    pub fn notices(&self) -> Vec<String> {
        if self.keepalive_time.is_zero() {
            vec![format!(
                "--keepalive-time 0 means the default, {}s (as in Konnectivity): a tunnel never goes without keepalive",
                DEFAULT_KEEPALIVE.as_secs()
            )]
        } else {
            Vec::new()
        }
    }

    /// The session configuration these flags describe.
    pub fn session(&self) -> tether_proto::Config {
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        tether_proto::Config {
            initial_window: self.stream_window,
            // What this end holds to send per stream is its own choice, as large as what it
            // lets the peer send it, whatever window the peer announces (SPEC 6.2).
            max_send_window: self.stream_window,
            keepalive_interval_ms: ms(self.keepalive()),
            keepalive_timeout_ms: ms(self.keepalive_timeout),
            handshake_timeout_ms: ms(self.handshake_timeout),
            ..tether_proto::Config::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations_parse_with_their_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(
            parse_duration("8760h"),
            Ok(Duration::from_secs(365 * 24 * 3600))
        );
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn a_keepalive_time_of_zero_is_the_default_never_no_keepalive() {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            tunnel: TunnelArgs,
        }
        use clap::Parser;
        let zero = Flags::try_parse_from(["x", "--keepalive-time", "0"]).unwrap();
        assert_eq!(zero.tunnel.session().keepalive_interval_ms, 10_000);
        assert_eq!(zero.tunnel.notices().len(), 1);
        let set = Flags::try_parse_from(["x", "--keepalive-time", "30s"]).unwrap();
        assert_eq!(set.tunnel.session().keepalive_interval_ms, 30_000);
        assert!(set.tunnel.notices().is_empty());
    }

    #[test]
    fn booleans_read_as_gos_strconv_reads_them() {
        for t in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse_go_bool(t), Ok(true), "{t}");
        }
        for f in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(parse_go_bool(f), Ok(false), "{f}");
        }
        assert!(parse_go_bool("yes").is_err());
        assert!(parse_go_bool("").is_err());
    }

    #[test]
    fn durations_take_gos_syntax_as_konnectivitys_help_prints_it() {
        assert_eq!(parse_duration("1h0m0s"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("300us"), Ok(Duration::from_micros(300)));
        assert_eq!(parse_duration("300µs"), Ok(Duration::from_micros(300)));
        assert_eq!(parse_duration("100ns"), Ok(Duration::from_nanos(100)));
        assert_eq!(parse_duration("+5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "1h-5m", "5x", "h", "1..5s", "-0.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was taken");
        }
    }

    #[test]
    fn a_duration_over_a_year_or_out_of_range_is_refused_not_a_panic() {
        for bad in [
            "8761h",
            "99999999999999999999999",
            "1e30",
            "-1s",
            "NaN",
            "s",
            "10d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was taken");
        }
    }

    #[test]
    fn an_accept_rate_is_zero_or_at_least_the_floor() {
        assert_eq!(parse_accept_rate("0"), Ok(0.0));
        assert_eq!(parse_accept_rate("1000"), Ok(1000.0));
        assert_eq!(parse_accept_rate("0.01"), Ok(0.01));
        for bad in ["0.001", "1e-20", "-1", "NaN", "inf", "fast", ""] {
            assert!(parse_accept_rate(bad).is_err(), "{bad:?} was taken");
        }
    }
}
