//! `tether-model check` runs the suite (or one configuration) and prints a table per run;
//! its exit code is the verdict. `tether-model explore` serves stateright's Explorer.
#![allow(clippy::print_stdout)]

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use stateright::{Expectation, Model};
use tether_model::suite::{self, Configuration, Limits, Verdict};
use tether_model::{Bounds, Misbehavior, TunnelModel};

#[derive(Parser)]
#[command(about = "Model-check tether-proto's real Session with stateright")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Explore the state space and print each property's verdict. With no configuration
    /// given, runs the whole default suite. Exit code: 0 every verdict good; 1 an `always`
    /// property violated, or a claimed example not reached in a complete run; 2 a run that
    /// stopped before it was complete (unless --allow-incomplete).
    Check {
        /// Run only this configuration of the suite.
        #[arg(long, value_enum)]
        config: Option<Named>,
        /// A configuration of your own: start from the suite's CONFIG (or the tiny one) and
        /// change what the bound flags say. It claims no examples.
        #[command(flatten)]
        bounds: BoundArgs,
        /// Stop after visiting this many states (no run is open-ended). Default: each suite
        /// configuration's own bound, about four times what a correct run visits; 200,000,000
        /// for the long suite and a configuration of your own.
        #[arg(long)]
        max_states: Option<usize>,
        /// Checker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Breadth-first (shortest paths, more memory) instead of depth-first.
        #[arg(long)]
        bfs: bool,
        /// Give up after this many seconds (per configuration). Default: 600 for the default
        /// suite (a correct run of any of its configurations takes seconds), 3600 otherwise.
        #[arg(long)]
        timeout_secs: Option<u64>,
        /// Exit 0 even when a run stops before it is complete (for exploratory big runs).
        #[arg(long)]
        allow_incomplete: bool,
        /// Run the long suite (bigger bounds; tens of minutes each) instead of the default.
        #[arg(long, conflicts_with = "config")]
        long: bool,
        /// Also claim this example (a `sometimes` property, by name): a complete run that does
        /// not reach it fails. Repeatable.
        #[arg(long)]
        claim: Vec<String>,
    },
    /// Serve stateright's Explorer (a web UI to walk the states) on 127.0.0.1.
    Explore {
        /// Which configuration.
        #[arg(long, value_enum, default_value = "streams")]
        config: Named,
        #[command(flatten)]
        bounds: BoundArgs,
        /// Port on 127.0.0.1.
        #[arg(long, default_value_t = 3000)]
        port: u16,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Named {
    Streams,
    Cancel,
    Flow,
    Sendbuf,
    Session,
    Notice,
    Ping,
    Hostile,
}

impl Named {
    fn configuration(self) -> Configuration {
        match self {
            Named::Streams => suite::streams(),
            Named::Cancel => suite::cancel(),
            Named::Flow => suite::flow(),
            Named::Sendbuf => suite::sendbuf(),
            Named::Session => suite::session(),
            Named::Notice => suite::notice(),
            Named::Ping => suite::ping(),
            Named::Hostile => suite::hostile(),
        }
    }
}

#[derive(Args)]
struct BoundArgs {
    /// Streams the server end opens.
    #[arg(long)]
    server_opens: Option<u8>,
    /// Streams the agent end opens.
    #[arg(long)]
    agent_opens: Option<u8>,
    /// MAX_CONCURRENT_STREAMS the server announces.
    #[arg(long)]
    server_max_streams: Option<u32>,
    /// MAX_CONCURRENT_STREAMS the agent announces.
    #[arg(long)]
    agent_max_streams: Option<u32>,
    /// INITIAL_WINDOW of both ends.
    #[arg(long)]
    window: Option<u32>,
    /// Chunks the opener of a stream sends.
    #[arg(long)]
    chunks: Option<u8>,
    /// Chunks the acceptor of a stream sends.
    #[arg(long)]
    reply_chunks: Option<u8>,
    /// Bytes per chunk.
    #[arg(long)]
    chunk_size: Option<u16>,
    /// Resets (or walk-aways) per end.
    #[arg(long)]
    resets: Option<u8>,
    /// Pings per end.
    #[arg(long)]
    pings: Option<u8>,
    /// GOAWAYs per end.
    #[arg(long)]
    goaways: Option<u8>,
    /// Allow the tunnel to drop (true/false).
    #[arg(long)]
    drop: Option<bool>,
    /// Timer firings per end.
    #[arg(long)]
    timers: Option<u8>,
    /// Keepalive interval announced (true/false).
    #[arg(long)]
    keepalive: Option<bool>,
    /// Start before HELLO (true/false).
    #[arg(long)]
    handshake: Option<bool>,
    /// Flush only on a step of its own (true/false).
    #[arg(long)]
    batching: Option<bool>,
    /// Make the agent end misbehave in this way (repeatable).
    #[arg(long, value_enum)]
    rogue: Vec<Misbehavior>,
    /// Let the agent end misbehave in every way.
    #[arg(long)]
    rogue_all: bool,
}

impl BoundArgs {
    fn changes_anything(&self) -> bool {
        let o = [
            self.server_opens.is_some(),
            self.agent_opens.is_some(),
            self.server_max_streams.is_some(),
            self.agent_max_streams.is_some(),
            self.window.is_some(),
            self.chunks.is_some(),
            self.reply_chunks.is_some(),
            self.chunk_size.is_some(),
            self.resets.is_some(),
            self.pings.is_some(),
            self.goaways.is_some(),
            self.drop.is_some(),
            self.timers.is_some(),
            self.keepalive.is_some(),
            self.handshake.is_some(),
            self.batching.is_some(),
            !self.rogue.is_empty(),
            self.rogue_all,
        ];
        o.into_iter().any(|x| x)
    }

    fn apply(&self, mut b: Bounds) -> Bounds {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { b.$f = v; } )* };
        }
        set!(
            server_opens,
            agent_opens,
            server_max_streams,
            agent_max_streams,
            window,
            chunks,
            reply_chunks,
            chunk_size,
            resets,
            pings,
            goaways,
            drop,
            timers,
            keepalive,
            handshake,
            batching
        );
        if self.rogue_all {
            b.rogue = Misbehavior::ALL.to_vec();
        } else if !self.rogue.is_empty() {
            b.rogue.clone_from(&self.rogue);
            b.rogue.sort();
            b.rogue.dedup();
        }
        b
    }
}

/// How one configuration's run ended.
#[derive(PartialEq, Eq, PartialOrd, Ord, Clone, Copy)]
enum Overall {
    Good,
    Incomplete,
    Failed,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Check {
            config,
            bounds,
            max_states,
            threads,
            bfs,
            timeout_secs,
            allow_incomplete,
            long,
            claim,
        } => {
            let default_suite = config.is_none() && !long && !bounds.changes_anything();
            let mut extra = Vec::new();
            let properties = TunnelModel::new(Bounds::tiny()).properties();
            for name in &claim {
                match properties.iter().find(|p| p.name == name.as_str()) {
                    Some(p) if p.expectation == Expectation::Sometimes => extra.push(p.name),
                    _ => {
                        eprintln!("--claim: no example (sometimes property) is named {name:?}");
                        return ExitCode::from(2);
                    }
                }
            }
            let mut configurations = match (config, bounds.changes_anything()) {
                (None, false) if long => suite::long_suite(),
                (None, false) => suite::default_suite(),
                (Some(c), false) => vec![c.configuration()],
                (c, true) => {
                    let base = c.map_or_else(Bounds::tiny, |c| c.configuration().bounds);
                    vec![Configuration {
                        name: "custom",
                        about: "bounds from the command line; claims no examples",
                        bounds: bounds.apply(base),
                        claims: Vec::new(),
                        max_states: usize::MAX,
                    }]
                }
            };
            for c in &mut configurations {
                c.claims.extend(extra.iter().copied());
            }
            let start = Instant::now();
            let mut worst = Overall::Good;
            for c in &configurations {
                // Each configuration's own bound unless one is given; a configuration outside
                // the suite's bounds (long, custom, or changed) gets the open default.
                let limits = Limits {
                    max_states: max_states.unwrap_or(c.max_states.min(200_000_000)),
                    threads,
                    bfs,
                    timeout: Duration::from_secs(timeout_secs.unwrap_or(if default_suite {
                        600
                    } else {
                        3600
                    })),
                };
                worst = worst.max(check(c, limits));
            }
            println!(
                "\n{} configuration(s) in {:.1} s: {}",
                configurations.len(),
                start.elapsed().as_secs_f64(),
                match worst {
                    Overall::Good => "every verdict good",
                    Overall::Incomplete =>
                        "INCOMPLETE: a run stopped before it explored everything",
                    Overall::Failed => "FAILED",
                }
            );
            match worst {
                Overall::Good => ExitCode::SUCCESS,
                Overall::Incomplete if allow_incomplete => ExitCode::SUCCESS,
                Overall::Incomplete => ExitCode::from(2),
                Overall::Failed => ExitCode::from(1),
            }
        }
        Command::Explore {
            config,
            bounds,
            port,
        } => {
            let b = bounds.apply(config.configuration().bounds);
            let addr = format!("127.0.0.1:{port}");
            println!("Explorer on http://{addr} for {b:?}");
            let _checker = TunnelModel::new(b).checker().serve(addr.as_str());
            // The Explorer runs on its own threads until the process is stopped (Ctrl-C).
            loop {
                std::thread::park();
            }
        }
    }
}

fn check(c: &Configuration, limits: Limits) -> Overall {
    let r = suite::check(c, limits);
    println!("\n## {}: {}\n", c.name, c.about);
    println!("| configuration | {:?} |", c.bounds);
    println!("| --- | --- |");
    println!("| unique states | {} |", r.unique);
    println!("| states visited | {} |", r.visited);
    println!("| max depth | {} |", r.depth);
    println!("| time | {:.1} s |", r.elapsed.as_secs_f64());
    println!(
        "| complete | {} |",
        if r.complete {
            "yes: every reachable state explored"
        } else if !r.violations.is_empty() {
            "stopped at the first violation"
        } else {
            "NO: stopped at --max-states or --timeout-secs"
        }
    );
    println!();
    println!("| property | kind | verdict |");
    println!("| --- | --- | --- |");
    for (name, v) in &r.verdicts {
        let (kind, verdict) = match v {
            Verdict::Holds => ("always", "holds"),
            Verdict::Violated => ("always", "VIOLATED"),
            Verdict::Reached { claimed: true } => ("sometimes (claimed)", "reached"),
            Verdict::Reached { claimed: false } => ("sometimes", "reached"),
            Verdict::NotReached => ("sometimes (claimed)", "NOT REACHED (claimed)"),
            Verdict::Unknown => ("sometimes (claimed)", "not reached (run incomplete)"),
        };
        println!("| {name} | {kind} | {verdict} |");
    }
    for (name, actions) in &r.violations {
        println!("\nviolation of \"{name}\": {actions:?}");
    }
    if r.failed() {
        Overall::Failed
    } else if r.complete {
        Overall::Good
    } else {
        Overall::Incomplete
    }
}
