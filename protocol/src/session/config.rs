//! What a session is configured with: its role, its limits and deadlines, and who each end
//! says it is in the handshake.

use crate::error::ApiError;
use crate::frame::{Identifier, MAX_STREAM_ID, PROTOCOL_VERSION, Settings, StreamId, Token};

/// Which end of the tunnel a session is (SPEC 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The control-plane end: accepts the tunnel, opens odd stream ids.
    Server,
    /// The node end: dials the tunnel, opens even stream ids.
    Agent,
}

impl Role {
    /// The first stream id this end opens (SPEC 5.1).
    pub fn first_stream_id(self) -> u32 {
        match self {
            Role::Server => 1,
            Role::Agent => 2,
        }
    }

    /// Whether `id` is one this end opens.
    pub fn opens(self, id: StreamId) -> bool {
        id.0 % 2 == self.first_stream_id() % 2
    }
}

/// Local configuration of a session. The first four fields are announced as settings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Config {
    /// INITIAL_WINDOW announced: what the peer may send on a stream before credit returns.
    pub initial_window: u32,
    /// MAX_FRAME_SIZE announced: the largest payload this end accepts.
    pub max_frame_size: u32,
    /// MAX_CONCURRENT_STREAMS announced: how many streams the peer may have open here.
    pub max_concurrent_streams: u32,
    /// Keepalive interval in ms (0: none). The tunnel uses the smaller non-zero of both ends'.
    pub keepalive_interval_ms: u64,
    /// How long to wait, with a PING outstanding, for any frame before the tunnel is dead.
    pub keepalive_timeout_ms: u64,
    /// How long the handshake may take, from the session's creation (0: no limit). The one
    /// handshake deadline of a tunnel: the adapter's TLS handshake runs under it too.
    pub handshake_timeout_ms: u64,
    /// Versions this end speaks.
    pub versions: Vec<u16>,
    /// The highest stream id this end will open; at it, the session drains (SPEC 5.1). Local
    /// policy, at most 2^31-1.
    pub stream_id_limit: u32,
    /// The most bytes this end holds unsent on one stream, whatever INITIAL_WINDOW the peer
    /// announces (SPEC 6.2, 10); the send window itself still follows the peer's value. At
    /// least 1.
    pub max_send_window: u32,
    /// The most streams this end opens at once, whatever MAX_CONCURRENT_STREAMS the peer
    /// announces (SPEC 5.7, 10).
    pub max_open_streams: u32,
    /// DATA payloads shorter than this are copied into the stream's receive buffer; longer ones
    /// are kept as the very slices they arrived as. A slice keeps its whole allocation alive,
    /// so an adapter that reads into allocations of `B` bytes sets this to `B / 8`: then what
    /// a stream's unread bytes keep alive is at most 8 times what they are, whatever sizes the
    /// peer chooses for its frames (SPEC 10). At least 1.
    pub recv_copy_below: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            initial_window: Settings::DEFAULT_INITIAL_WINDOW,
            max_frame_size: Settings::DEFAULT_MAX_FRAME_SIZE,
            max_concurrent_streams: Settings::DEFAULT_MAX_CONCURRENT_STREAMS,
            keepalive_interval_ms: 10_000,
            keepalive_timeout_ms: 20_000,
            handshake_timeout_ms: 10_000,
            versions: vec![PROTOCOL_VERSION],
            stream_id_limit: MAX_STREAM_ID,
            max_send_window: Settings::DEFAULT_INITIAL_WINDOW,
            max_open_streams: Settings::DEFAULT_MAX_CONCURRENT_STREAMS,
            recv_copy_below: 1024,
        }
    }
}

impl Config {
    /// The settings this configuration announces.
    pub fn settings(&self) -> Settings {
        Settings {
            initial_window: Some(self.initial_window),
            max_frame_size: Some(self.max_frame_size),
            max_concurrent_streams: Some(self.max_concurrent_streams),
            keepalive_interval: Some(u32::try_from(self.keepalive_interval_ms).unwrap_or(u32::MAX)),
            // This implementation takes DRAINING notices (SPEC 7.4).
            drain_notice: Some(1),
            unknown: Vec::new(),
        }
    }

    pub(super) fn validate(&self) -> Result<(), ApiError> {
        self.settings()
            .validate()
            .map_err(ApiError::InvalidConfig)?;
        if self.versions.is_empty() || self.versions.windows(2).any(|w| w[0] >= w[1]) {
            return Err(ApiError::InvalidConfig(
                "versions must be non-empty and strictly ascending",
            ));
        }
        // SPEC 9: version 0 is reserved; no end speaks it.
        if self.versions.contains(&0) {
            return Err(ApiError::InvalidConfig("version 0 is reserved"));
        }
        if self.stream_id_limit > MAX_STREAM_ID {
            return Err(ApiError::InvalidConfig("stream id limit over 2^31-1"));
        }
        if self.max_send_window == 0 || self.recv_copy_below == 0 || self.max_open_streams == 0 {
            return Err(ApiError::InvalidConfig(
                "max send window, max open streams and recv copy threshold must be at least 1",
            ));
        }
        if self.keepalive_interval_ms > 0 && self.keepalive_timeout_ms == 0 {
            return Err(ApiError::InvalidConfig(
                "keepalive needs a non-zero timeout",
            ));
        }
        Ok(())
    }
}

/// Who an agent is, sent in its HELLO.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AgentIdentity {
    /// The agent id.
    pub agent_id: String,
    /// What it can reach.
    pub identifiers: Vec<Identifier>,
    /// An optional bearer token.
    pub token: Option<Token>,
}

/// Who a server is, sent in its WELCOME.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerIdentity {
    /// The server id.
    pub server_id: String,
    /// How many servers the agent should connect to.
    pub server_count: u16,
}
