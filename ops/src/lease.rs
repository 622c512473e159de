//! Counting servers with Kubernetes Leases (`coordination.k8s.io/v1`), as Konnectivity does:
//! each server holds a lease named `konnectivity-proxy-server-<server-id>` in
//! `--lease-namespace` with `--lease-label`, renews it every `renew_every` (15 s) for
//! `duration` (30 s), deletes expired leases of the same label (any server's: a crashed one
//! cannot), and gives its own up on shutdown. Agents (and servers) count the leases that are
//! still valid: `renewTime` (else `acquireTime`) plus `leaseDurationSeconds` after now.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::kube::{Client, Lease, LeaseSpec, ObjectMeta};

/// Parses `k=v,k2=v2` (Konnectivity's `--lease-label`).
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    if s.trim().is_empty() {
        return Err("empty string provided".into());
    }
    let mut out = BTreeMap::new();
    for pair in s.split(',') {
        let (k, v) = pair
            .split_once('=')
            .filter(|(k, v)| !k.trim().is_empty() && !v.contains('='))
            .ok_or_else(|| format!("invalid label format: {pair:?} (k=v,k2=v2)"))?;
        out.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    Ok(out)
}

/// The selector that matches `labels` exactly.
pub fn selector(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Seconds since the epoch as `MicroTime` (`2026-12-01T16:00:00.000000Z`).
pub fn micro_time(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(i64::try_from(days).unwrap_or(0));
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Parses RFC 3339 as the API server writes it (`Z` or an offset, optional fraction).
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if !s.is_ascii()
        || b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    let mut micros = 0i64;
    if let Some(f) = rest.strip_prefix('.') {
        let digits = f.bytes().take_while(u8::is_ascii_digit).count();
        let frac = &f[..digits];
        let padded: String = frac.chars().chain(std::iter::repeat('0')).take(6).collect();
        micros = padded.parse().ok()?;
        rest = &f[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) && &o[3..4] == ":" => {
            let v = o[1..3].parse::<i64>().ok()? * 3600 + o[4..6].parse::<i64>().ok()? * 60;
            if o.starts_with('+') { v } else { -v }
        }
        _ => return None,
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se - offset;
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros.unsigned_abs()))
}

// Howard Hinnant's civil calendar algorithms.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// Whether `lease` is still held at `now`.
pub fn is_valid(lease: &Lease, now: SystemTime) -> bool {
    let s = &lease.spec;
    let Some(renewed) = s
        .renew_time
        .as_deref()
        .or(s.acquire_time.as_deref())
        .and_then(parse_time)
    else {
        return false;
    };
    let Some(secs) = s.lease_duration_seconds.and_then(|d| u64::try_from(d).ok()) else {
        return false;
    };
    renewed
        .checked_add(Duration::from_secs(secs))
        .is_some_and(|until| until > now)
}

/// The most servers a count of leases may say there are: whoever can write leases in the
/// namespace cannot send every agent chasing thousands of servers (docs/SECURITY.md).
pub const MAX_SERVER_COUNT: u16 = 64;

/// Valid leases among `leases`, at most [`MAX_SERVER_COUNT`]; 0 when none is valid (the
/// count is unknown: the caller keeps what it had).
pub fn count_valid(leases: &[Lease], now: SystemTime) -> u16 {
    let n = leases.iter().filter(|l| is_valid(l, now)).count();
    u16::try_from(n).unwrap_or(u16::MAX).min(MAX_SERVER_COUNT)
}

/// Where and how a server holds its lease.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// Namespace of the leases.
    pub namespace: String,
    /// This server's id (the holder, and the lease name's suffix).
    pub holder: String,
    /// Labels on the lease, and the selector the leases are counted and collected by.
    pub labels: BTreeMap<String, String>,
    /// How long a renewal holds.
    pub duration: Duration,
    /// How often it is renewed, expired leases collected, and the live ones counted.
    pub renew_every: Duration,
}

impl LeaseSettings {
    /// The lease's name (Konnectivity's: `konnectivity-proxy-server-<server-id>`).
    pub fn name(&self) -> String {
        format!("konnectivity-proxy-server-{}", self.holder)
    }
}

/// A server's lease, renewed while it runs.
pub struct LeaseController {
    client: Client,
    settings: LeaseSettings,
    /// The renewal loop; taken once it has ended ([`LeaseController::failed`]).
    task: Option<tokio::task::JoinHandle<()>>,
}

impl LeaseController {
    /// Starts renewing, collecting and counting; the receiver sees the count of valid leases
    /// (`initial` until the first count).
    pub fn start(
        client: Client,
        settings: LeaseSettings,
        initial: u16,
    ) -> (LeaseController, watch::Receiver<u16>) {
        let (tx, rx) = watch::channel(initial);
        let task = tokio::spawn(run(client.clone(), settings.clone(), tx));
        (
            LeaseController {
                client,
                settings,
                task: Some(task),
            },
            rx,
        )
    }

    /// Waits until the renewal loop ends before [`LeaseController::release`], which it does
    /// only by failing (a panic); says why. Never ready while it runs, nor once it has ended.
    pub async fn failed(&mut self) -> String {
        let Some(t) = self.task.as_mut() else {
            return std::future::pending().await;
        };
        let result = t.await;
        self.task = None;
        match result {
            Ok(()) => "the lease controller stopped".into(),
            Err(e) => format!("the lease controller stopped: {e}"),
        }
    }

    /// Stops renewing (and waits until a renewal in flight is gone, so it cannot bring the
    /// lease back), then deletes this server's lease, so the others stop counting it at once
    /// instead of after its duration. At most 5 s: a drain must not wait on the API server.
    pub async fn release(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
        let name = self.settings.name();
        let delete = self
            .client
            .delete_lease(&self.settings.namespace, &name, None);
        match tokio::time::timeout(Duration::from_secs(5), delete).await {
            Ok(Ok(())) => tracing::info!(lease = %name, "server lease released"),
            Ok(Err(e)) => {
                tracing::warn!(lease = %name, error = %e, "could not release the server lease")
            }
            Err(_) => tracing::warn!(lease = %name, "releasing the server lease timed out"),
        }
    }
}

impl Drop for LeaseController {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

async fn run(client: Client, s: LeaseSettings, count: watch::Sender<u16>) {
    let mut tick = tokio::time::interval(s.renew_every.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let name = s.name();
    let mut held = false;
    loop {
        tick.tick().await;
        match renew(&client, &s, &name).await {
            Ok(()) if !held => {
                held = true;
                tracing::info!(lease = %name, namespace = %s.namespace, "server lease held");
            }
            Ok(()) => {}
            Err(e) => {
                held = false;
                tracing::warn!(lease = %name, error = %e, "server lease renewal failed");
            }
        }
        match client.list_leases(&s.namespace, &selector(&s.labels)).await {
            Ok(leases) => {
                let now = SystemTime::now();
                for l in leases.iter().filter(|l| !is_valid(l, now)) {
                    // Only the version judged expired: a lease its server renewed since the
                    // list is left alone (409).
                    let version = l.metadata.resource_version.as_deref();
                    match client
                        .delete_lease(&s.namespace, &l.metadata.name, version)
                        .await
                    {
                        Ok(()) => {
                            tracing::info!(lease = %l.metadata.name, "expired server lease deleted")
                        }
                        Err(e) => {
                            tracing::warn!(lease = %l.metadata.name, error = %e, "could not delete an expired lease")
                        }
                    }
                }
                // This server's own lease is valid once renewed: never fewer than 1.
                let n = count_valid(&leases, now).max(1);
                count.send_if_modified(|c| std::mem::replace(c, n) != n);
            }
            Err(e) => {
                tracing::warn!(error = %e, "listing server leases failed; the last count stays")
            }
        }
    }
}

async fn renew(
    client: &Client,
    s: &LeaseSettings,
    name: &str,
) -> Result<(), crate::kube::KubeError> {
    let now = micro_time(SystemTime::now());
    let duration = i64::try_from(s.duration.as_secs()).unwrap_or(i64::MAX);
    match client.get_lease(&s.namespace, name).await? {
        Some(mut lease) => {
            lease.metadata.labels = s.labels.clone();
            lease.spec.holder_identity = Some(s.holder.clone());
            lease.spec.lease_duration_seconds = Some(duration);
            lease.spec.renew_time = Some(now);
            client.update_lease(&s.namespace, &lease).await?;
        }
        None => {
            let lease = Lease {
                api_version: "coordination.k8s.io/v1".into(),
                kind: "Lease".into(),
                metadata: ObjectMeta {
                    name: name.to_owned(),
                    namespace: Some(s.namespace.clone()),
                    labels: s.labels.clone(),
                    resource_version: None,
                    other: Default::default(),
                },
                spec: LeaseSpec {
                    holder_identity: Some(s.holder.clone()),
                    lease_duration_seconds: Some(duration),
                    renew_time: Some(now.clone()),
                    acquire_time: Some(now),
                    other: Default::default(),
                },
                other: Default::default(),
            };
            client.create_lease(&s.namespace, &lease).await?;
        }
    }
    Ok(())
}

/// An agent's count of servers from their leases, refreshed every `every`. 0 means unknown
/// (no list has succeeded yet, or no lease is valid): the agent then keeps to what the servers
/// announce. A failed list keeps the last good count.
pub fn count_leases(
    client: Client,
    namespace: String,
    selector: String,
    every: Duration,
) -> (tokio::task::JoinHandle<()>, watch::Receiver<u16>) {
    let (tx, rx) = watch::channel(0);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match client.list_leases(&namespace, &selector).await {
                Ok(leases) => {
                    let n = count_valid(&leases, SystemTime::now());
                    let was = *tx.borrow();
                    if was != n {
                        tracing::info!(was, now = n, "server count from leases changed");
                        let _ = tx.send(n);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, count = *tx.borrow(), "could not list server leases; the last count stays")
                }
            }
        }
    });
    (task, rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_times_round_trip_and_offsets_are_honoured() {
        let t = UNIX_EPOCH + Duration::from_micros(1_795_867_200_123_456);
        let s = micro_time(t);
        assert_eq!(s, "2026-11-28T12:00:00.123456Z");
        assert_eq!(parse_time(&s), Some(t));
        assert_eq!(
            parse_time("2026-11-28T13:00:00.123456+01:00"),
            Some(t),
            "an offset is subtracted"
        );
        assert_eq!(
            parse_time("2024-02-29T00:00:00Z"),
            Some(UNIX_EPOCH + Duration::from_secs(1_709_164_800))
        );
        assert_eq!(parse_time("yesterday"), None);
    }

    fn lease(renewed: Option<&str>, secs: Option<i64>) -> Lease {
        Lease {
            spec: LeaseSpec {
                renew_time: renewed.map(str::to_owned),
                lease_duration_seconds: secs,
                ..LeaseSpec::default()
            },
            ..Lease::default()
        }
    }

    #[test]
    fn a_lease_counts_until_its_renewal_plus_its_duration() {
        let now = UNIX_EPOCH + Duration::from_secs(1_795_867_200);
        let at = |s: u64| micro_time(UNIX_EPOCH + Duration::from_secs(1_795_867_200 - s));
        assert!(is_valid(&lease(Some(&at(29)), Some(30)), now));
        assert!(!is_valid(&lease(Some(&at(30)), Some(30)), now));
        assert!(!is_valid(&lease(None, Some(30)), now), "never renewed");
        assert!(!is_valid(&lease(Some(&at(1)), None), now), "no duration");
        let leases = [
            lease(Some(&at(1)), Some(30)),
            lease(Some(&at(5)), Some(30)),
            lease(Some(&at(60)), Some(30)),
        ];
        assert_eq!(count_valid(&leases, now), 2);
        assert_eq!(count_valid(&[], now), 0, "no valid lease: unknown");
        let many = vec![lease(Some(&at(1)), Some(30)); 1000];
        assert_eq!(count_valid(&many, now), MAX_SERVER_COUNT, "capped");
        // A duration that overflows the clock is no panic: such a lease does not count.
        assert!(!is_valid(&lease(Some(&at(1)), Some(i64::MAX)), now));
        assert_eq!(
            parse_time("2026-11-28T12:00:00+0é:00"),
            None,
            "non-ASCII is refused"
        );
    }

    #[test]
    fn labels_parse_as_konnectivity_parses_them() {
        let l = parse_labels("k8s-app=konnectivity-server, tier = cp").unwrap();
        assert_eq!(selector(&l), "k8s-app=konnectivity-server,tier=cp");
        assert!(parse_labels("").is_err());
        assert!(parse_labels("novalue").is_err());
    }
}
