//! `tether-model check` runs the checker and prints a table; `tether-model explore` serves
//! stateright's Explorer on 127.0.0.1.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use stateright::{Checker, Expectation, Model};
use tether_model::{Bounds, Misbehavior, TunnelModel};

#[derive(Parser)]
#[command(about = "Model-check tether-proto's real Session with stateright")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Explore the state space and print each property's verdict.
    Check {
        #[command(flatten)]
        bounds: BoundArgs,
        /// Stop after visiting this many states (no run is open-ended).
        #[arg(long, default_value_t = 5_000_000)]
        max_states: usize,
        /// Do not explore past this depth.
        #[arg(long, default_value_t = 200)]
        max_depth: usize,
        /// Checker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Depth-first (less memory) instead of breadth-first (shortest paths).
        #[arg(long)]
        dfs: bool,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 1800)]
        timeout_secs: u64,
    },
    /// Serve stateright's Explorer (a web UI to walk the states) on 127.0.0.1.
    Explore {
        #[command(flatten)]
        bounds: BoundArgs,
        /// Port on 127.0.0.1.
        #[arg(long, default_value_t = 3000)]
        port: u16,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Rogue {
    IgnoresWindow,
    ReusesStreamId,
    DataAfterFin,
}

#[derive(Args)]
struct BoundArgs {
    /// Start from the tiny configuration instead of the standard one.
    #[arg(long)]
    tiny: bool,
    /// Streams the server end opens.
    #[arg(long)]
    server_opens: Option<u8>,
    /// Streams the agent end opens.
    #[arg(long)]
    agent_opens: Option<u8>,
    /// INITIAL_WINDOW of both ends.
    #[arg(long)]
    window: Option<u32>,
    /// Chunks per stream and direction.
    #[arg(long)]
    chunks: Option<u8>,
    /// Bytes per chunk.
    #[arg(long)]
    chunk_size: Option<u8>,
    /// MAX_CONCURRENT_STREAMS of both ends.
    #[arg(long)]
    max_streams: Option<u32>,
    /// Resets per end.
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
    /// Allow keepalive deadlines to expire (true/false).
    #[arg(long)]
    keepalive_expiry: Option<bool>,
    /// Make the agent end misbehave.
    #[arg(long, value_enum)]
    misbehave: Option<Rogue>,
}

impl BoundArgs {
    fn bounds(&self) -> Bounds {
        let mut b = if self.tiny {
            Bounds::tiny()
        } else {
            Bounds::standard()
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { b.$f = v; } )* };
        }
        set!(
            server_opens,
            agent_opens,
            window,
            chunks,
            chunk_size,
            max_streams,
            resets,
            pings,
            goaways,
            drop,
            keepalive_expiry
        );
        b.misbehave = self.misbehave.map(|m| match m {
            Rogue::IgnoresWindow => Misbehavior::IgnoresWindow,
            Rogue::ReusesStreamId => Misbehavior::ReusesStreamId,
            Rogue::DataAfterFin => Misbehavior::DataAfterFin,
        });
        b
    }
}

fn main() {
    match Cli::parse().command {
        Command::Check {
            bounds,
            max_states,
            max_depth,
            threads,
            dfs,
            timeout_secs,
        } => check(
            bounds.bounds(),
            max_states,
            max_depth,
            threads,
            dfs,
            timeout_secs,
        ),
        Command::Explore { bounds, port } => {
            let addr = format!("127.0.0.1:{port}");
            println!("Explorer on http://{addr} for {:?}", bounds.bounds());
            let _checker = TunnelModel::new(bounds.bounds())
                .checker()
                .serve(addr.as_str());
            // The Explorer runs on its own threads until the process is stopped (Ctrl-C).
            loop {
                std::thread::park();
            }
        }
    }
}

fn check(b: Bounds, max_states: usize, max_depth: usize, threads: usize, dfs: bool, secs: u64) {
    let model = TunnelModel::new(b.clone());
    let builder = model
        .checker()
        .threads(threads)
        .target_state_count(max_states)
        .target_max_depth(max_depth)
        .timeout(Duration::from_secs(secs));
    let start = Instant::now();
    if dfs {
        report(&b, max_states, builder.spawn_dfs().join(), start);
    } else {
        report(&b, max_states, builder.spawn_bfs().join(), start);
    }
}

fn report(b: &Bounds, max_states: usize, checker: impl Checker<TunnelModel>, start: Instant) {
    let elapsed = start.elapsed();
    let properties = checker.model().properties();
    println!("| configuration | {b:?} |");
    println!("| --- | --- |");
    println!("| unique states | {} |", checker.unique_state_count());
    println!("| states visited | {} |", checker.state_count());
    println!("| max depth | {} |", checker.max_depth());
    println!("| time | {:.1} s |", elapsed.as_secs_f64());
    println!(
        "| complete | {} |",
        if checker.state_count() < max_states {
            "yes: every reachable state explored"
        } else {
            "no: stopped at --max-states"
        }
    );
    println!();
    println!("| property | kind | verdict |");
    println!("| --- | --- | --- |");
    let mut paths = Vec::new();
    for p in &properties {
        let found = checker.discovery(p.name);
        let (kind, verdict) = match (&p.expectation, &found) {
            (Expectation::Always, None) => ("always", "holds"),
            (Expectation::Always, Some(_)) => ("always", "VIOLATED"),
            (Expectation::Sometimes, Some(_)) => ("sometimes", "discovered"),
            (Expectation::Sometimes, None) => ("sometimes", "NOT discovered"),
            (Expectation::Eventually, None) => ("eventually", "holds"),
            (Expectation::Eventually, Some(_)) => ("eventually", "VIOLATED"),
        };
        println!("| {} | {kind} | {verdict} |", p.name);
        if let (Expectation::Always, Some(path)) = (&p.expectation, found) {
            paths.push((p.name, path.into_actions()));
        }
    }
    for (name, actions) in paths {
        println!("\nviolation of \"{name}\": {actions:?}");
    }
}
