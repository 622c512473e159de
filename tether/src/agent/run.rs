//! [`Agent`]: one connection loop per server address, each keeping the agent's tunnels to as
//! many distinct servers as the server count says.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether_proto::ErrorCode;
use tokio::sync::watch;
use tracing::Instrument;

use super::connect::connect_once;
use super::serve::serve_dials;
use super::{AgentConfig, Dialer};
use crate::stats::AgentStats;
use crate::tasks::Tasks;
use crate::tunnel::Tunnel;

/// The tunnels an agent holds, shared with whoever watches them (a readiness endpoint).
#[derive(Debug, Clone, Default)]
pub struct TunnelSet(Arc<Mutex<Vec<Tunnel>>>);

impl TunnelSet {
    /// The tunnels open or draining now.
    pub fn all(&self) -> Vec<Tunnel> {
        self.0.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Tunnels open and not draining now.
    pub fn usable(&self) -> usize {
        self.0
            .lock()
            .map(|t| t.iter().filter(|t| t.is_usable()).count())
            .unwrap_or(0)
    }
}

/// A running agent. Dropping it stops its loops and closes its tunnels; [`Agent::drain`]
/// first lets their streams finish.
pub struct Agent {
    shutdown: watch::Sender<bool>,
    tunnels: TunnelSet,
    stats: Arc<AgentStats>,
    /// One loop per server address, and the TLS reloader: none ends before a drain unless it
    /// fails. The loops end by themselves once the agent drains or is dropped.
    tasks: Tasks,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for t in self.tunnels() {
            t.close(ErrorCode::NO_ERROR, "agent stopped");
        }
    }
}

impl Agent {
    /// Starts connecting to every server, serving their dials through `dialer`; returns at
    /// once.
    pub fn start<D: Dialer>(config: AgentConfig, dialer: D) -> Agent {
        let (shutdown, rx) = watch::channel(false);
        let tunnels = TunnelSet::default();
        // Tunnels by server id, across every address: the servers are counted once, however
        // many addresses lead to them.
        let by_server = Arc::new(Mutex::new(HashMap::new()));
        let stats = config.stats.clone();
        let config = Arc::new(config);
        let dialer = Arc::new(dialer);
        let mut tasks = Tasks::new();
        for addr in config.servers.clone() {
            let span = tracing::info_span!("server", %addr, server_id = tracing::field::Empty);
            let shared = Shared {
                all: tunnels.0.clone(),
                by_server: by_server.clone(),
            };
            let task = manage(
                config.clone(),
                dialer.clone(),
                addr.clone(),
                rx.clone(),
                shared,
            )
            .instrument(span);
            tasks.push(
                format!("the connection loop for {addr}"),
                tokio::spawn(task),
            );
        }
        tasks.push_some("the TLS reloader", config.tls.watch(config.reload_interval));
        Agent {
            shutdown,
            tunnels,
            stats,
            tasks,
        }
    }

    /// Waits until one of the agent's own tasks ends before a drain, and says which and why.
    /// They end early only by failing (a panic, which tokio catches in the task, so the agent
    /// would run on without a server's connection loop). Never ready while all run.
    pub async fn failed(&mut self) -> String {
        self.tasks.first_to_end().await
    }

    /// What the agent has counted.
    pub fn stats(&self) -> &Arc<AgentStats> {
        &self.stats
    }

    /// The tunnels open or draining now.
    pub fn tunnels(&self) -> Vec<Tunnel> {
        self.tunnels.all()
    }

    /// The agent's tunnels, as a handle that outlives this borrow.
    pub fn tunnel_set(&self) -> TunnelSet {
        self.tunnels.clone()
    }

    /// Tunnels currently open (not draining).
    pub fn connected(&self) -> usize {
        self.tunnels.usable()
    }

    /// Waits until at least `n` tunnels are open, at most `timeout`.
    pub async fn wait_connected(&self, n: usize, timeout: Duration) -> bool {
        crate::tasks::wait_until(timeout, || self.connected() >= n).await
    }

    /// Announces a drain to come (Konnectivity's first SIGTERM): no reconnects, and DRAINING
    /// on every tunnel (SPEC 7.4), so servers route new dials to other agents when they have
    /// one and still to this one when not; dials are served as before until [`Agent::drain`].
    /// The tunnels that took the notice.
    pub fn announce_draining(&self) -> usize {
        let _ = self.shutdown.send(true);
        self.tunnels()
            .iter()
            .filter(|t| t.announce_draining())
            .count()
    }

    /// Drains (SIGTERM): no reconnects, GOAWAY on every tunnel, waits for their streams to
    /// finish, at most `grace`; then closes what is left.
    pub async fn drain(&self, grace: Duration) {
        let _ = self.shutdown.send(true);
        let tunnels = self.tunnels();
        for t in &tunnels {
            t.go_away("agent shutting down");
        }
        let all = async {
            for t in &tunnels {
                t.closed().await;
            }
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            for t in &tunnels {
                t.close(ErrorCode::NO_ERROR, "agent shut down");
            }
        }
    }
}

/// What the address loops of one agent share.
struct Shared {
    /// Every open tunnel (drain, health).
    all: Arc<Mutex<Vec<Tunnel>>>,
    /// Tunnels by server id, over every address.
    by_server: Arc<Mutex<HashMap<String, Tunnel>>>,
}

/// What one connection attempt came to, for [`Retry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// A server not held yet.
    New,
    /// A server already held (a load balancer sent the agent there again, or another address
    /// leads to it).
    Known,
    /// No tunnel.
    Failed,
}

/// When an address's next connection attempt goes (before jitter). A failure backs off
/// exponentially from the sync interval to its cap. Landing on a known server is not a
/// failure: behind a round-robin balancer the next attempt likely reaches another server, so
/// the first `3 × servers wanted` in a row go at the sync pace; only past them (an address
/// that always leads to the same server, one of several direct addresses while another server
/// is down) do they back off like failures, so such a list does not churn duplicate tunnels.
#[derive(Debug, Clone, Copy)]
struct Retry {
    sync: Duration,
    cap: Duration,
    backoff: Duration,
    known_in_a_row: usize,
}

impl Retry {
    fn new(sync: Duration, cap: Duration) -> Retry {
        Retry {
            sync,
            cap,
            backoff: sync,
            known_in_a_row: 0,
        }
    }

    /// The wait after `attempt`, with `want` servers wanted.
    fn after(&mut self, attempt: Attempt, want: usize) -> Duration {
        match attempt {
            Attempt::New => {
                self.backoff = self.sync;
                self.known_in_a_row = 0;
                Duration::ZERO
            }
            Attempt::Known if self.known_in_a_row < want.saturating_mul(3) => {
                self.known_in_a_row += 1;
                self.sync
            }
            Attempt::Known | Attempt::Failed => {
                if attempt == Attempt::Failed {
                    self.known_in_a_row = 0;
                }
                let wait = self.backoff;
                self.backoff = (self.backoff * 2).min(self.cap);
                wait
            }
        }
    }
}

/// Dials one server address until the agent holds tunnels to as many distinct server ids as
/// the server count says, over all its addresses; reconnects as [`Retry`] says, with jitter.
async fn manage<D: Dialer>(
    cfg: Arc<AgentConfig>,
    dialer: Arc<D>,
    addr: String,
    mut shutdown: watch::Receiver<bool>,
    shared: Shared,
) {
    let Shared { all, by_server } = shared;
    let mut retry = Retry::new(cfg.sync_interval, cfg.sync_interval_cap);
    let mut want = 1usize;
    // The count the last server reached announced (Konnectivity's `--server-count-source`).
    let mut announced = 1usize;
    loop {
        if *shutdown.borrow() {
            return;
        }
        cfg.stats.sync();
        let held = by_server
            .lock()
            .map(|mut m| {
                m.retain(|_, t| t.close_reason().is_none());
                m.len()
            })
            .unwrap_or(0);
        // A count read from the cluster (leases) outranks what the servers announce, once
        // it is known (0: no list has succeeded, or no lease is valid).
        if let Some(count) = &cfg.server_count {
            let leases = usize::from(*count.borrow());
            want = match (leases, cfg.server_count_max) {
                (0, _) => announced,
                (n, true) => n.max(announced),
                (n, false) => n,
            };
        }
        cfg.stats.set_server_count(want);
        let open = all
            .lock()
            .map(|mut list| {
                list.retain(|t| t.close_reason().is_none());
                list.len()
            })
            .unwrap_or(0);
        cfg.stats.set_tunnels(open);
        if held >= want {
            tokio::select! {
                // The agent's handle is gone (dropped without a drain): stop too.
                r = shutdown.changed() => if r.is_err() { return; },
                () = tokio::time::sleep(cfg.sync_interval.max(Duration::from_millis(50))) => {}
            }
            continue;
        }
        match connect_once(&cfg, &addr).await {
            Ok((tunnel, server_id, count, dials)) => {
                tokio::spawn(
                    serve_dials(dialer.clone(), dials).instrument(tracing::Span::current()),
                );
                announced = usize::from(count.max(1));
                if cfg.server_count.is_none() {
                    want = usize::from(count.max(1));
                }
                let new = match by_server.lock() {
                    Ok(mut m) => match m.entry(server_id) {
                        std::collections::hash_map::Entry::Occupied(_) => false,
                        std::collections::hash_map::Entry::Vacant(slot) => {
                            tracing::Span::current()
                                .record("server_id", tracing::field::display(slot.key()));
                            slot.insert(tunnel.clone());
                            true
                        }
                    },
                    Err(_) => false,
                };
                if new {
                    tracing::info!(server_count = count, "tunnel established");
                    if let Ok(mut list) = all.lock() {
                        list.push(tunnel);
                    }
                    retry.after(Attempt::New, want);
                } else {
                    // A load balancer sent us to a server we already have, or this address is
                    // one we already reached through another.
                    cfg.stats.duplicate();
                    tunnel.go_away("already connected to this server");
                    let wait = retry.after(Attempt::Known, want);
                    tokio::select! {
                        r = shutdown.changed() => if r.is_err() { return; },
                        () = tokio::time::sleep(jitter(wait)) => {}
                    }
                }
            }
            Err(e) => {
                let wait = retry.after(Attempt::Failed, want);
                tracing::warn!(%addr, error = %e, retry_in = ?wait, "connecting to the server failed");
                tokio::select! {
                    r = shutdown.changed() => if r.is_err() { return; },
                    () = tokio::time::sleep(jitter(wait)) => {}
                }
            }
        }
    }
}

fn jitter(d: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // Up to +50%, so that agents restarted together do not reconnect in step. The standard
    // library's hasher keys are random per process (and move on with every hasher): enough
    // to spread reconnects without a random-number crate.
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    Duration::from_millis(ms.saturating_add(r % (ms / 2 + 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    const CAP: Duration = Duration::from_secs(10);

    #[test]
    fn landing_on_a_known_server_retries_at_the_sync_pace_and_a_failure_backs_off() {
        let mut r = Retry::new(S, CAP);
        // Three servers wanted: nine known landings in a row at the sync pace...
        for _ in 0..9 {
            assert_eq!(r.after(Attempt::Known, 3), S);
        }
        // ...then they back off as failures do, so one address that always leads to the
        // same server does not churn.
        let waits: Vec<u64> = (0..5)
            .map(|_| r.after(Attempt::Known, 3).as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 10]);
        // A new server resets both.
        assert_eq!(r.after(Attempt::New, 3), Duration::ZERO);
        assert_eq!(r.after(Attempt::Known, 3), S);
        // Failures back off at once, and a failure restarts the known count.
        let waits: Vec<u64> = (0..5)
            .map(|_| r.after(Attempt::Failed, 3).as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 10]);
        assert_eq!(
            r.after(Attempt::Known, 3),
            S,
            "known landings are not failures"
        );
    }
}
