//! The configurations the default `check` runs. Each one is small enough to be explored
//! completely, says which examples (`sometimes` properties) it must reach, and pins its state
//! count; together they cover streams, flow control, the session's life and a hostile peer.
//! A configuration that cannot be complete is not in the suite.

use crate::properties::*;
use crate::{Bounds, Misbehavior};

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
    }
}

/// PINGs: the application's and the keepalive timer's, answered or timed out.
pub fn ping() -> Configuration {
    Configuration {
        name: "ping",
        about: "an application PING from either end beside the keepalive timer's, their \
                answers, the keepalive deadline, tunnel loss",
        bounds: Bounds {
            server_opens: 1,
            agent_opens: 0,
            chunks: 0,
            reply_chunks: 0,
            resets: 0,
            pings: 1,
            goaways: 0,
            drop: true,
            timers: 2,
            keepalive: true,
            ..Bounds::tiny()
        },
        claims: vec![COMPLETES, PING_ANSWERED, KEEPALIVE_PING, KEEPALIVE_EXPIRES],
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
    }
}

/// The default suite, in the order `check` runs it.
pub fn default_suite() -> Vec<Configuration> {
    vec![streams(), cancel(), flow(), session(), ping(), hostile()]
}
