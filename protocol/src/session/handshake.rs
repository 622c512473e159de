//! The handshake (SPEC 4): HELLO from the agent, WELCOME (or a refusing GOAWAY) from the
//! server, version negotiation, and the deadline that covers it all.

use super::Event;
use super::keepalive::Timer;
use super::{
    AgentIdentity, Config, Role, ServerIdentity, Session, SessionPhase, protocol_error, violation,
};
use crate::Time;
use crate::error::{ApiError, ProtocolError};
use crate::frame::{ErrorCode, Frame, FrameKind, HANDSHAKE_MAX_PAYLOAD, Hello, Welcome};

impl Session {
    /// The agent end of a new tunnel; its HELLO is the first frame out (SPEC 4.1). The
    /// handshake deadline starts `now`.
    pub fn agent(config: Config, identity: AgentIdentity, now: Time) -> Result<Session, ApiError> {
        config.validate()?;
        let hello = Hello {
            versions: config.versions.clone(),
            agent_id: identity.agent_id,
            identifiers: identity.identifiers,
            settings: config.settings(),
            token: identity.token,
        };
        hello.validate().map_err(ApiError::InvalidFrame)?;
        //= SPEC §3.6
        //# HELLO and WELCOME MUST fit in 16384 bytes.
        if hello.encoded_len() > HANDSHAKE_MAX_PAYLOAD as usize {
            return Err(ApiError::InvalidFrame(
                "HELLO over the handshake payload limit",
            ));
        }
        let mut s = Session::new(Role::Agent, config, SessionPhase::AwaitWelcome, now);
        //= SPEC §4.1
        //# The agent's first frame MUST be HELLO.
        s.handshake_out = Some(Frame::Hello(hello));
        Ok(s)
    }

    /// The server end of a new tunnel; it waits for HELLO (SPEC 4.1). The handshake deadline
    /// starts `now`.
    pub fn server(
        config: Config,
        identity: ServerIdentity,
        now: Time,
    ) -> Result<Session, ApiError> {
        config.validate()?;
        let probe = Welcome {
            version: crate::frame::PROTOCOL_VERSION,
            server_id: identity.server_id.clone(),
            server_count: identity.server_count,
            settings: config.settings(),
        };
        probe.validate().map_err(ApiError::InvalidFrame)?;
        let mut s = Session::new(Role::Server, config, SessionPhase::AwaitHello, now);
        s.server_identity = Some(identity);
        Ok(s)
    }

    //= SPEC §4.2
    //# which MUST either accept (WELCOME goes out) or refuse (GOAWAY with a code such as
    //# `UNAUTHORIZED`, then close).
    /// Server end: accepts the agent's HELLO and queues WELCOME (SPEC 4.2). Whether the
    /// agent's credentials are good is the caller's decision.
    pub fn accept_hello(&mut self, now: Time) -> Result<(), ApiError> {
        if self.phase != SessionPhase::AwaitDecision {
            return Err(ApiError::NoHelloPending);
        }
        let identity = self
            .server_identity
            .clone()
            .ok_or(ApiError::NoHelloPending)?;
        self.handshake_out = Some(Frame::Welcome(Welcome {
            version: self.version,
            server_id: identity.server_id,
            server_count: identity.server_count,
            settings: self.config.settings(),
        }));
        self.establish(now, None);
        self.debug_check();
        Ok(())
    }

    /// Server end: refuses the agent (bad credentials, say) with a GOAWAY and closes.
    pub fn refuse_hello(&mut self, code: ErrorCode, reason: &str) -> Result<(), ApiError> {
        if self.phase != SessionPhase::AwaitDecision {
            return Err(ApiError::NoHelloPending);
        }
        self.close(code, reason)
    }

    pub(super) fn on_hello(&mut self, hello: Hello) -> Result<(), ProtocolError> {
        // SPEC 4.3: the server picks the highest version both speak.
        //= SPEC §4.3
        //# If there is none, it MUST close with GOAWAY `VERSION_MISMATCH`.
        let Some(version) = hello
            .versions
            .iter()
            .rev()
            .find(|v| self.config.versions.contains(v))
        else {
            return Err(violation(
                ErrorCode::VERSION_MISMATCH,
                FrameKind::HELLO,
                "no protocol version in common",
            ));
        };
        self.version = *version;
        self.peer = hello.settings.clone();
        self.phase = SessionPhase::AwaitDecision;
        self.events.push_back(Event::HelloReceived(hello));
        Ok(())
    }

    pub(super) fn on_welcome(&mut self, now: Time, welcome: Welcome) -> Result<(), ProtocolError> {
        //= SPEC §4.3
        //# An agent that receives a WELCOME with a version it did not offer MUST close with
        //# GOAWAY `VERSION_MISMATCH`.
        if !self.config.versions.contains(&welcome.version) {
            return Err(violation(
                ErrorCode::VERSION_MISMATCH,
                FrameKind::WELCOME,
                "WELCOME chose a version that was not offered",
            ));
        }
        self.version = welcome.version;
        self.peer = welcome.settings.clone();
        self.establish(now, Some(welcome));
        Ok(())
    }

    /// A frame other than the one the handshake expects (SPEC 4.1).
    pub(super) fn out_of_handshake(&self, kind: FrameKind) -> ProtocolError {
        let reason = match self.phase {
            SessionPhase::AwaitHello => "first frame is not HELLO",
            SessionPhase::AwaitWelcome => "frame before WELCOME",
            _ => "frame after HELLO before WELCOME",
        };
        protocol_error(kind, reason)
    }

    fn establish(&mut self, now: Time, welcome: Option<Welcome>) {
        self.phase = SessionPhase::Open;
        self.timers.stop(Timer::Handshake);
        //= SPEC §3.6
        //# From the moment an end sends WELCOME (server) or receives WELCOME (agent), it MUST
        //# refuse any frame whose payload exceeds the MAX_FRAME_SIZE it announced.
        self.codec.set_max_payload(self.config.max_frame_size);
        let interval = self.keepalive_interval();
        if interval > 0 {
            self.timers.set(Timer::NextPing, now.plus_ms(interval));
        }
        self.events.push_back(Event::Established {
            version: self.version,
            peer_settings: self.peer.clone(),
            welcome,
        });
    }
}
