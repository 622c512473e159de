//! How streams and the session end (SPEC 5.5, 7.4, 7.5): the one place a stream gets its
//! final event, the drain, and the shutdown that ends every stream with an error.

use super::stream::{Phase, Stream};
use super::{Drain, Event, Session, SessionPhase, cut_reason};
use crate::error::{CloseReason, Initiator, ProtocolError, StreamError};
use crate::frame::{ErrorCode, GoAway, StreamId};

impl Session {
    /// Ends a live stream: cleanly (`None`: both halves finished) or with `error`. The one
    /// place that decides the final event: a dial this end opened gets `DialFailed`, a stream
    /// the application knows gets `Reset`, a stream this end reset or abandoned gets nothing
    /// (its application asked for it, or let go), and a clean end gets nothing (`recv`
    /// returned the end).
    /// The entry then holds only the outcome until the application abandons it; a stream the
    /// application never learned of, or abandoned, leaves the table at once.
    pub(super) fn end_stream(&mut self, id: StreamId, outcome: Option<StreamError>) {
        let Some(s) = self.streams.get(id) else {
            return;
        };
        if !s.is_live() {
            return;
        }
        let event = match (&outcome, &s.phase) {
            _ if s.abandoned => None,
            (None, _) | (Some(_), Phase::Resetting { .. }) => None,
            (Some(error), Phase::Dialing(_)) => Some(Event::DialFailed {
                stream: id,
                error: error.clone(),
            }),
            (Some(error), _) if s.announced => Some(Event::Reset {
                stream: id,
                error: error.clone(),
            }),
            (Some(_), _) => None,
        };
        let keep = s.announced && !s.abandoned;
        if outcome.is_some() {
            self.purge_events(id);
        }
        if keep {
            self.streams.close(id, Phase::Closed(outcome));
        } else {
            self.streams.remove(id);
        }
        self.events.extend(event);
        self.maybe_drained();
    }

    pub(super) fn start_drain(&mut self, reason: &str) {
        //= SPEC §7.4
        //# The last-stream id MUST be at least every stream id the sender has accepted (sent
        //# DIAL_OK for): it is the highest id the peer opened
        self.drain = Drain::Queued {
            goaway: GoAway {
                last_stream: StreamId(self.streams.last_peer),
                code: ErrorCode::NO_ERROR,
                reason: cut_reason(reason).to_owned(),
            },
            peer: false,
        };
        // The GOAWAY says more than an unsent DRAINING notice would.
        self.notice.out = false;
        // SPEC 7.4: no DIAL goes out after this end's GOAWAY; dials not yet sent fail here.
        let unsent = self
            .streams
            .ids_where(|_, s| matches!(s.phase, Phase::Dialing(Some(_))));
        for id in unsent {
            self.end_stream(
                id,
                Some(StreamError {
                    code: ErrorCode::REFUSED_STREAM,
                    reason: "session is draining".into(),
                    by: Initiator::Local,
                    session_closed: false,
                }),
            );
        }
    }

    /// The peer's NO_ERROR GOAWAY arrived (this end's own is queued or sent by then).
    pub(super) fn note_peer_goaway(&mut self) {
        match &mut self.drain {
            Drain::Queued { peer, .. } | Drain::Sent { peer } => *peer = true,
            Drain::Running => debug_assert!(false, "answer a GOAWAY before noting it"),
        }
    }

    /// Whether the peer's NO_ERROR GOAWAY arrived.
    pub(super) fn peer_went_away(&self) -> bool {
        matches!(
            self.drain,
            Drain::Queued { peer: true, .. } | Drain::Sent { peer: true }
        )
    }

    /// Closes the session once a drain is complete (SPEC 7.4): both GOAWAYs exchanged, no
    /// live stream, no refusal left to send.
    pub(super) fn maybe_drained(&mut self) {
        if self.is_established()
            && self.drain == (Drain::Sent { peer: true })
            && self.streams.live() == 0
            && self.streams.refusals.is_empty()
        {
            self.shutdown(CloseReason::Drained, None);
        }
    }

    /// A protocol violation by the peer: GOAWAY with its code, then closed (SPEC 8.2).
    pub(super) fn fail(&mut self, e: ProtocolError) {
        self.shutdown(CloseReason::Violation(e), Some((e.code, e.reason)));
    }

    /// Ends the session: every live stream ends with an error, every queue is emptied, and at
    /// most one GOAWAY stays queued (SPEC 7.5).
    pub(super) fn shutdown(&mut self, reason: CloseReason, goaway: Option<(ErrorCode, &str)>) {
        if self.is_closed() {
            return;
        }
        let goaway = goaway.map(|(code, r)| GoAway {
            last_stream: StreamId(self.streams.last_peer),
            code,
            reason: cut_reason(r).to_owned(),
        });
        let error = StreamError::from(&reason);
        // Closed first, so that no stream's end can complete a drain on the way.
        self.phase = SessionPhase::Closed {
            reason: reason.clone(),
            goaway,
        };
        for id in self.streams.ids_where(|_, s| s.is_live()) {
            // SPEC 7.5: a stream whose FINs both crossed is complete; its application may
            // still read what arrived. Every other live stream fails.
            let complete = self.streams.get(id).is_some_and(Stream::is_complete);
            self.end_stream(id, (!complete).then(|| error.clone()));
        }
        self.streams.refusals.clear();
        self.handshake_out = None;
        self.keepalive.clear();
        self.timers.stop_all();
        self.events.push_back(Event::Closed(reason));
    }

    /// Drops the events of a stream that ended abnormally (SPEC 5.5): which bounds the event
    /// queue (SPEC 10).
    pub(super) fn purge_events(&mut self, id: StreamId) {
        self.events.retain(|e| e.stream() != Some(id));
    }
}
