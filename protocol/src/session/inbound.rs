//! Frames from the peer once the session is open (SPEC 5–7): each either changes state,
//! is ignored as the spec says, or is a protocol error that closes the session.

use super::Event;
use super::keepalive::Timer;
use super::stream::{Phase, RecvState, SendState, Stream, len32};
use super::{Session, protocol_error, violation};
use crate::Time;
use crate::error::{Initiator, ProtocolError, StreamError};
use crate::frame::{Data, Dial, ErrorCode, FrameKind, GoAway, Reset, StreamId, WindowUpdate};

impl Session {
    pub(super) fn on_dial(&mut self, d: Dial) -> Result<(), ProtocolError> {
        let id = d.stream;
        if self.role.opens(id) {
            return Err(protocol_error(
                FrameKind::DIAL,
                "DIAL with this end's stream id parity",
            ));
        }
        if id.0 <= self.streams.last_peer {
            return Err(protocol_error(FrameKind::DIAL, "DIAL reuses a stream id"));
        }
        if self.peer_went_away() {
            return Err(protocol_error(
                FrameKind::DIAL,
                "DIAL after the peer's GOAWAY",
            ));
        }
        self.streams.last_peer = id.0;
        let limit = self.config.max_concurrent_streams;
        if self.is_draining() || self.streams.peer_live >= limit {
            // SPEC 5.4: refused with a RESET the peer can tell apart; bounded (SPEC 10).
            if self.streams.refusals.len() > limit as usize {
                return Err(violation(
                    ErrorCode::ENHANCE_YOUR_CALM,
                    FrameKind::DIAL,
                    "too many refused dials queued",
                ));
            }
            let reason = if self.is_draining() {
                "session is draining"
            } else {
                "concurrent stream limit reached"
            };
            self.streams.refusals.push_back((id, reason));
            return Ok(());
        }
        let stream = Stream::new(
            Phase::Pending,
            self.peer.initial_window(),
            self.config.initial_window,
            false,
        );
        self.streams.insert(id, stream);
        self.events.push_back(Event::DialRequested {
            stream: id,
            dial: d,
        });
        Ok(())
    }

    pub(super) fn on_dial_ok(&mut self, id: StreamId) -> Result<(), ProtocolError> {
        let kind = FrameKind::DIAL_OK;
        let Some(id) = self.streams.lookup(kind, id)? else {
            return Ok(());
        };
        if !self.role.opens(id) {
            return Err(protocol_error(kind, "DIAL_OK for a stream the peer opened"));
        }
        let Some(s) = self.streams.get_mut(id) else {
            return Ok(());
        };
        match s.phase {
            Phase::Dialing(None) => {
                s.phase = Phase::Established;
                self.events.push_back(Event::DialSucceeded { stream: id });
                Ok(())
            }
            // SPEC 5.5: a DIAL_OK that crosses our RESET is discarded.
            Phase::Resetting { .. } => Ok(()),
            _ => Err(protocol_error(kind, "DIAL_OK for an established stream")),
        }
    }

    pub(super) fn on_data(&mut self, d: Data) -> Result<(), ProtocolError> {
        let kind = FrameKind::DATA;
        let copy_below = self.config.recv_copy_below;
        let Some(id) = self.streams.lookup(kind, d.stream)? else {
            return Ok(());
        };
        let Some(s) = self.streams.get_mut(id) else {
            return Ok(());
        };
        match s.phase {
            Phase::Resetting { .. } => return Ok(()),
            Phase::Established if !s.dial_ok_queued => {}
            _ => return Err(protocol_error(kind, "DATA before DIAL_OK")),
        }
        if s.recv.state != RecvState::Open {
            return Err(violation(ErrorCode::STREAM_CLOSED, kind, "DATA after FIN"));
        }
        let len = len32(&d.payload);
        //= SPEC §6.3
        //# A receiver MUST treat DATA that exceeds the window it has granted as a
        //# `FLOW_CONTROL_ERROR`.
        s.recv.window.consume(len).map_err(|_| {
            violation(
                ErrorCode::FLOW_CONTROL_ERROR,
                kind,
                "DATA beyond the window",
            )
        })?;
        s.recv.buf.push(d.payload, copy_below);
        if d.fin {
            s.recv.state = RecvState::FinReceived;
        }
        // SPEC 7.2: one Readable per stream until the application calls recv.
        if (len > 0 || d.fin) && !s.recv.notified {
            s.recv.notified = true;
            self.events.push_back(Event::Readable { stream: id });
        }
        Ok(())
    }

    pub(super) fn on_window(&mut self, w: WindowUpdate) -> Result<(), ProtocolError> {
        let kind = FrameKind::WINDOW;
        let Some(id) = self.streams.lookup(kind, w.stream)? else {
            return Ok(());
        };
        let initial = self.peer.initial_window();
        let send_cap = self.config.max_send_window;
        let Some(s) = self.streams.get_mut(id) else {
            return Ok(());
        };
        match s.phase {
            Phase::Resetting { .. } => return Ok(()),
            Phase::Established if !s.dial_ok_queued => {}
            _ => {
                return Err(protocol_error(
                    kind,
                    "WINDOW before the stream was established",
                ));
            }
        }
        //= SPEC §6.3
        //# A sender MUST treat a WINDOW whose increment exceeds the bytes it has *sent* on the
        //# stream and not yet had credited back as a `FLOW_CONTROL_ERROR`.
        // Bytes still queued here were taken from the window but never sent, so the peer
        // cannot have received them.
        let cap = initial - s.send.queued;
        s.send.window.grow(w.increment, cap).map_err(|_| {
            violation(
                ErrorCode::FLOW_CONTROL_ERROR,
                kind,
                "WINDOW grants more than was sent",
            )
        })?;
        // A writer held back by this end's send buffer waits for it to drain instead.
        if s.want_writable && s.send.state == SendState::Open && s.send.queued < send_cap {
            s.want_writable = false;
            self.events.push_back(Event::Writable { stream: id });
        }
        Ok(())
    }

    pub(super) fn on_reset(&mut self, r: Reset) -> Result<(), ProtocolError> {
        // SPEC 5.4: the peer gave up on a DIAL this end refused before the refusal went out.
        // The refusal is moot (the peer has closed the stream), and dropping it keeps the
        // queue bounded by what the peer has live: a peer that cancels and dials again in one
        // burst is not a flood.
        if let Some(at) = self
            .streams
            .refusals
            .iter()
            .position(|(id, _)| *id == r.stream)
        {
            self.streams.refusals.remove(at);
            self.maybe_drained();
            return Ok(());
        }
        let Some(id) = self.streams.lookup(FrameKind::RESET, r.stream)? else {
            return Ok(());
        };
        let Some(s) = self.streams.get(id) else {
            return Ok(());
        };
        // Both ends reset: each already knows; the stream keeps this end's own reason.
        let error = s.error().unwrap_or(StreamError {
            code: r.code,
            reason: r.reason,
            by: Initiator::Peer,
            session_closed: false,
        });
        self.end_stream(id, Some(error));
        Ok(())
    }

    pub(super) fn on_goaway(&mut self, g: GoAway) -> Result<(), ProtocolError> {
        //= SPEC §7.4
        //# after a `NO_ERROR` GOAWAY a receiver MUST accept another.
        if g.code != ErrorCode::NO_ERROR {
            self.shutdown(
                crate::CloseReason::Peer {
                    code: g.code,
                    reason: g.reason,
                },
                None,
            );
            return Ok(());
        }
        // SPEC 7.4: a second NO_ERROR GOAWAY changes nothing; its last_stream is ignored.
        if self.peer_went_away() {
            return Ok(());
        }
        //= SPEC §7.4
        //# A receiver that gets GOAWAY `NO_ERROR` whose last stream is below one of its own
        //# streams that the sender already accepted (its DIAL_OK arrived) MUST treat it as a
        //# `PROTOCOL_ERROR`
        let role = self.role;
        let disowned = self.streams.ids_where(|id, s| {
            role.opens(id) && id > g.last_stream && s.phase == Phase::Established
        });
        if !disowned.is_empty() {
            return Err(protocol_error(
                FrameKind::GOAWAY,
                "GOAWAY last stream is below a stream the peer accepted",
            ));
        }
        // SPEC 7.4: streams of this end above last_stream were not processed; they fail with
        // REFUSED_STREAM and may be opened again elsewhere.
        let role = self.role;
        let unprocessed = self
            .streams
            .ids_where(|id, s| role.opens(id) && id > g.last_stream && s.is_live());
        for id in unprocessed {
            self.end_stream(
                id,
                Some(StreamError {
                    code: ErrorCode::REFUSED_STREAM,
                    reason: "not processed before the peer's GOAWAY".into(),
                    by: Initiator::Peer,
                    session_closed: false,
                }),
            );
        }
        self.events.push_back(Event::GoingAway {
            last_stream: g.last_stream,
            reason: g.reason,
        });
        if !self.is_draining() {
            self.start_drain("answering GOAWAY");
        }
        self.note_peer_goaway();
        self.maybe_drained();
        Ok(())
    }

    pub(super) fn on_pong(&mut self, now: Time, payload: u64) {
        // An answer to nothing outstanding is ignored (SPEC 7.3).
        let Some(p) = self.keepalive.answered(payload) else {
            return;
        };
        self.timers.stop(Timer::KeepaliveDeadline);
        if p.by_app {
            self.events.push_back(Event::PingAnswered {
                rtt_ms: now.as_millis().saturating_sub(p.sent_at.as_millis()),
            });
        }
        let interval = self.keepalive_interval();
        if interval > 0 {
            self.timers.set(Timer::NextPing, now.plus_ms(interval));
        }
    }

    pub(super) fn send_ping(&mut self, now: Time, by_app: bool) {
        self.keepalive.send(now, by_app);
        self.timers.set(
            Timer::KeepaliveDeadline,
            now.plus_ms(self.config.keepalive_timeout_ms.max(1)),
        );
    }
}
