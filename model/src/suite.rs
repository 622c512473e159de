//! The configurations the default `check` runs. Each one is small enough to be explored
//! completely, says which examples (`sometimes` properties) it must reach, and pins its state
//! count; together they cover streams, flow control, the session's life and a hostile peer.
//! A configuration that cannot be complete is not in the suite.

use crate::properties::*;
use crate::rogue::Misbehavior;
use crate::state::Bounds;

/// One configuration of the suite.
#[derive(Debug, Clone)]
pub struct Configuration {
    /// Its name (`check --config NAME`).
    pub name: &'static str,
    /// What it is for.
    pub about: &'static str,
    /// The bounds.
    pub bounds: Bounds,
    /// The examples it must reach; a complete run that misses one fails.
    pub claims: Vec<&'static str>,
    /// The states a run of it may visit before it stops incomplete (exit 2): about four times
    /// what a correct run visits (docs/MODEL.md, "Bounds"), so a session bug that makes the
    /// state space grow without end gets a verdict in seconds, not a CI timeout.
    pub max_states: usize,
}

/// Streams: two at once from each end, half-close both ways, reject.
pub fn streams() -> Configuration {
    Configuration {
        name: "streams",
        about: "two streams from each end live at once, half-close both ways, accept or reject",
        bounds: Bounds {
            server_opens: 2,
            agent_opens: 2,
            server_max_streams: 2,
            agent_max_streams: 2,
            chunks: 0,
            reply_chunks: 0,
            resets: 0,
            goaways: 0,
            drop: false,
            ..Bounds::tiny()
        },
        claims: vec![COMPLETES, TWO_LIVE_EACH],
        max_states: 13_000_000,
    }
}

/// Cancels and resets: an open at the peer's limit, a cancel crossing DIAL_OK, a reset
/// crossing a FIN, an application that walks away.
pub fn cancel() -> Configuration {
    Configuration {
        name: "cancel",
        about: "a second open at the peer's limit of one, two bytes through a 1-byte window, \
                cancel and reset against every state, an application that walks away (the drop \
                policy), tunnel loss",
        bounds: Bounds {
            server_opens: 2,
            agent_opens: 0,
            agent_max_streams: 1,
            chunks: 2,
            reply_chunks: 0,
            resets: 1,
            goaways: 0,
            drop: true,
            ..Bounds::tiny()
        },
        claims: vec![
            COMPLETES,
            OPEN_AT_LIMIT,
            CANCEL_CROSSES_DIAL_OK,
            WINDOW_REOPENS,
            RESET_CROSSES_FIN,
            WALKS_AWAY,
            DROP_FAILS_DIAL,
        ],
        max_states: 4_500_000,
    }
}

/// Flow control: a window larger than a chunk, chunks larger than a frame, a writer that
/// batches so several chunks queue.
pub fn flow() -> Configuration {
    Configuration {
        name: "flow",
        about: "window 2,048 > chunk 1,536 > MAX_FRAME_SIZE 1,024 from the opener: frame \
                splitting, several chunks queued, exhaustion and reopening, a batching writer",
        bounds: Bounds {
            window: 2048,
            chunks: 2,
            reply_chunks: 0,
            chunk_size: 1536,
            resets: 1,
            goaways: 0,
            drop: false,
            batching: true,
            ..Bounds::tiny()
        },
        claims: vec![
            COMPLETES,
            WINDOW_REOPENS,
            CHUNKS_QUEUED,
            SPLIT,
            RESET_CROSSES_FIN,
        ],
        max_states: 4_000_000,
    }
}

/// A sender whose own send buffer (1,024) is below a chunk (1,536) and the peer's window
/// (4,096, more than the stream carries): sends cut short by the buffer, not the window,
/// resume only when queued bytes have gone out, and no WINDOW ever comes to mask a lost
/// `Writable`: the liveness check sees one as a hang (SPEC 6.2, 10).
pub fn sendbuf() -> Configuration {
    Configuration {
        name: "sendbuf",
        about: "send buffer 1,024 < chunk 1,536, two chunks < window 4,096, a batching writer: \
                sends held back by this end's own buffer, resumed as it drains",
        bounds: Bounds {
            window: 4096,
            send_buffer: 1024,
            ..flow().bounds
        },
        claims: vec![COMPLETES, SEND_BUFFER_FULL, RESET_CROSSES_FIN],
        max_states: 2_000_000,
    }
}

/// The session's life: handshake (welcome, refusal, version mismatch, deadline), keepalive,
/// drains from either end, tunnel loss.
pub fn session() -> Configuration {
    Configuration {
        name: "session",
        about: "HELLO/WELCOME, refusal, version mismatch, handshake deadline, keepalive PING \
                and deadline, GOAWAY from either end, tunnel loss",
        bounds: Bounds {
            server_opens: 1,
            agent_opens: 0,
            chunks: 0,
            reply_chunks: 0,
            resets: 0,
            goaways: 1,
            drop: true,
            timers: 2,
            keepalive: true,
            handshake: true,
            ..Bounds::tiny()
        },
        claims: vec![
            WELCOMED,
            REFUSED,
            VERSION_MISMATCH,
            HANDSHAKE_EXPIRES,
            KEEPALIVE_PING,
            KEEPALIVE_EXPIRES,
            SERVER_DRAINS,
            AGENT_DRAINS,
            DROP_FAILS_DIAL,
        ],
        max_states: 10_000_000,
    }
}

/// The DRAINING notice (SPEC 7.4): either end announces a drain to come, streams still open
/// on its tunnel, then it drains.
pub fn notice() -> Configuration {
    Configuration {
        name: "notice",
        about: "DRAINING from either end before its GOAWAY, a dial accepted after it, drains, \
                tunnel loss",
        bounds: Bounds {
            server_opens: 1,
            agent_opens: 0,
            resets: 0,
            notices: 1,
            goaways: 1,
            ..Bounds::tiny()
        },
        claims: vec![COMPLETES, DIALLED_AFTER_NOTICE, AGENT_DRAINS, SERVER_DRAINS],
        max_states: 10_500_000,
    }
}

/// PINGs: the application's and the keepalive timer's, answered or timed out.
pub fn ping() -> Configuration {
    Configuration {
        name: "ping",
        about: "an application PING from either end beside the keepalive timer's, their \
                answers, the keepalive deadline, tunnel loss",
        bounds: Bounds {
            pings: 1,
            goaways: 0,
            handshake: false,
            ..session().bounds
        },
        claims: vec![COMPLETES, PING_ANSWERED, KEEPALIVE_PING, KEEPALIVE_EXPIRES],
        max_states: 6_500_000,
    }
}

/// A hostile agent: every misbehaviour class, once per run, against an honest server.
pub fn hostile() -> Configuration {
    Configuration {
        name: "hostile",
        about: "the agent commits any one of the SPEC's misbehaviours; the server must answer \
                each with the SPEC's code and keep its invariants",
        bounds: Bounds {
            server_opens: 1,
            agent_opens: 1,
            server_max_streams: 1,
            agent_max_streams: 1,
            chunks: 0,
            reply_chunks: 0,
            resets: 0,
            goaways: 1,
            drop: false,
            handshake: true,
            rogue: Misbehavior::ALL.to_vec(),
            ..Bounds::tiny()
        },
        claims: Misbehavior::ALL.iter().map(|m| m.detected()).collect(),
        max_states: 11_500_000,
    }
}

/// The default suite, in the order `check` runs it.
pub fn default_suite() -> Vec<Configuration> {
    vec![
        streams(),
        cancel(),
        flow(),
        sendbuf(),
        session(),
        notice(),
        ping(),
        hostile(),
    ]
}

/// Bigger configurations for a long (nightly-style) run and for the record in docs/MODEL.md:
/// `check --long`. Each still completes, in tens of minutes rather than seconds.
pub fn long_suite() -> Vec<Configuration> {
    let mut streams = streams();
    streams.name = "streams-long";
    streams.bounds.resets = 1;
    streams
        .claims
        .extend([CANCEL_CROSSES_DIAL_OK, WALKS_AWAY, RESET_CROSSES_FIN]);
    let mut flow = flow();
    flow.name = "flow-long";
    flow.bounds.reply_chunks = 1;
    let mut session = session();
    session.name = "session-long";
    session.bounds.pings = 1;
    session.claims.push(PING_ANSWERED);
    let mut hostile = hostile();
    hostile.name = "hostile-long";
    hostile.bounds.chunks = 1;
    hostile.bounds.reply_chunks = 1;
    let mut long = vec![streams, flow, session, hostile];
    // Bigger bounds than the default suite's: up to `--max-states` (200,000,000).
    for c in &mut long {
        c.max_states = usize::MAX;
    }
    long
}

/// How far one run may go.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Stop after visiting this many states.
    pub max_states: usize,
    /// Checker threads.
    pub threads: usize,
    /// Breadth-first instead of depth-first.
    pub bfs: bool,
    /// Give up after this long.
    pub timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_states: 10_500_000,
            threads: 2,
            bfs: false,
            timeout: std::time::Duration::from_secs(1800),
        }
    }
}

/// What one configuration's run found.
#[derive(Debug, Clone)]
pub struct Report {
    /// Unique states.
    pub unique: usize,
    /// States visited.
    pub visited: usize,
    /// Deepest path.
    pub depth: usize,
    /// Wall time.
    pub elapsed: std::time::Duration,
    /// Every reachable state was explored.
    pub complete: bool,
    /// Violated `always` properties, each with its path.
    pub violations: Vec<(&'static str, Vec<crate::state::Action>)>,
    /// Every property with its verdict: `always` (holds or not), then the examples reached
    /// or claimed.
    pub verdicts: Vec<(&'static str, Verdict)>,
}

/// One property's verdict in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// An `always` property held in every state explored.
    Holds,
    /// An `always` property failed.
    Violated,
    /// An example was reached (claimed or not).
    Reached {
        /// The configuration claims it.
        claimed: bool,
    },
    /// A claimed example was not reached in a complete run: a failure.
    NotReached,
    /// A claimed example was not reached, but the run was not complete.
    Unknown,
}

impl Report {
    /// Whether the run failed: a violation, or a claim not reached in a complete run.
    pub fn failed(&self) -> bool {
        self.verdicts
            .iter()
            .any(|(_, v)| matches!(v, Verdict::Violated | Verdict::NotReached))
    }
}

/// Runs one configuration to completion (or to `limits`) and judges it.
pub fn check(c: &Configuration, limits: Limits) -> Report {
    use stateright::{Checker, Expectation, HasDiscoveries, Model};
    let start = std::time::Instant::now();
    let builder = crate::tunnel::TunnelModel::new(c.bounds.clone())
        .checker()
        .threads(limits.threads)
        .target_state_count(limits.max_states)
        .timeout(limits.timeout)
        .finish_when(HasDiscoveries::AnyFailures);
    let judge = |checker: &dyn Checker<crate::tunnel::TunnelModel>| {
        let elapsed = start.elapsed();
        let properties = checker.model().properties();
        let mut violations = Vec::new();
        for p in &properties {
            if let (Expectation::Always, Some(path)) = (&p.expectation, checker.discovery(p.name)) {
                violations.push((p.name, path.into_actions()));
            }
        }
        let complete = checker.is_done()
            && checker.state_count() < limits.max_states
            && elapsed < limits.timeout
            && violations.is_empty();
        let mut verdicts = Vec::new();
        for p in &properties {
            let found = checker.discovery(p.name).is_some();
            let claimed = c.claims.contains(&p.name);
            let v = match (&p.expectation, found) {
                (Expectation::Sometimes, true) => Verdict::Reached { claimed },
                (Expectation::Sometimes, false) if !claimed => continue,
                (Expectation::Sometimes, false) if complete => Verdict::NotReached,
                (Expectation::Sometimes, false) => Verdict::Unknown,
                (_, false) => Verdict::Holds,
                (_, true) => Verdict::Violated,
            };
            verdicts.push((p.name, v));
        }
        Report {
            unique: checker.unique_state_count(),
            visited: checker.state_count(),
            depth: checker.max_depth(),
            elapsed,
            complete,
            violations,
            verdicts,
        }
    };
    if limits.bfs {
        let checker = builder.spawn_bfs().join();
        judge(&checker)
    } else {
        let checker = builder.spawn_dfs().join();
        judge(&checker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_configuration_of_the_default_suite_has_a_bound_of_its_own() {
        for c in default_suite() {
            assert!(
                c.max_states <= 20_000_000,
                "{}: a bound of {} states is no bound",
                c.name,
                c.max_states
            );
        }
    }
}
