//! tether-model: stateright models that drive tether-proto's real [`Session`](tether_proto::Session).
//!
//! The model holds two real sessions, a server end and an agent end, each wrapped in an actor
//! ([`End`]) that plays a small nondeterministic application around it, joined by an ordered
//! network (two FIFO queues of frames, because the tunnel is TCP). Every step calls the real
//! `Session` methods; the checker hashes the real `Session` values. Nothing of the protocol is
//! re-implemented here: the model only decides *what happens next* and checks properties.
//!
//! [`suite`] names the configurations the default `check` runs, each complete, each with the
//! `sometimes` properties it must reach; verdicts are exit codes.
//!
//! ```
//! use stateright::{Checker, Model};
//! use tether_model::{Bounds, TunnelModel};
//!
//! // One stream, no faults: seconds in a debug build.
//! let bounds = Bounds { resets: 0, goaways: 0, drop: false, ..Bounds::tiny() };
//! let checker = TunnelModel::new(bounds).checker().spawn_dfs().join();
//! assert!(checker.is_done());
//! checker.assert_no_discovery("invariants hold at both ends (SPEC 10)");
//! checker.assert_no_discovery("every stream ends exactly once (SPEC 5.2)");
//! ```

pub mod attack;
mod checker;
pub mod properties;
pub mod rogue;
pub mod state;
pub mod suite;
pub mod tunnel;

pub use rogue::{Answer, Misbehavior, Verdict};
pub use state::{Action, AppPhase, AppStream, Bounds, End, ModelState, Outcome, Seen, Wire};
pub use tunnel::TunnelModel;
