//! [`TunnelModel`]: every step the applications, the network and a misbehaving agent may take,
//! each a call into the real sessions.

use std::collections::VecDeque;

use bytes::Bytes;
use stateright::Model;
use tether_proto::frame::{Frame, Protocol, StreamId};
use tether_proto::{ApiError, CloseReason, ErrorCode, Event, Initiator, StreamState, Time};

use crate::attack;
use crate::rogue::{self, Verdict};
use crate::state::*;

/// The model: bounds in, states of two real sessions out.
#[derive(Debug, Clone)]
pub struct TunnelModel {
    /// The configuration.
    pub bounds: Bounds,
}

fn chunk_byte(end: usize, id: StreamId, k: usize) -> u8 {
    // Distinct per end, stream and position, so a misdelivered byte shows.
    let end = u8::from(end == 1);
    let stream = (id.0 & 0x7).to_le_bytes()[0];
    let k = k.to_le_bytes()[0] & 0xf;
    end << 7 | stream << 4 | k
}

/// Steps of delivery alone after which the sessions must have stopped talking.
const SETTLE_STEPS: usize = 256;

impl TunnelModel {
    /// A model with these bounds.
    pub fn new(bounds: Bounds) -> TunnelModel {
        TunnelModel { bounds }
    }

    /// The actions of the applications and of the misbehaving agent (not deliveries, flushes,
    /// timers or faults).
    pub fn app_actions(&self, state: &ModelState, out: &mut Vec<Action>) {
        let b = &self.bounds;
        for (i, end) in state.ends.iter().enumerate() {
            let s = &end.session;
            if s.is_closed() {
                // Only reading what a complete stream still holds is left to do.
                for (id, st) in &end.streams {
                    if st.readable && !st.ended() {
                        out.push(Action::Read(i, *id));
                    }
                }
                continue;
            }
            if i == 0 && end.hello_pending {
                out.push(Action::Welcome);
                out.push(Action::Refuse);
            }
            if !s.is_established() {
                continue;
            }
            if end.opens_left > 0 {
                out.push(Action::Open(i));
            }
            if end.pings_left > 0 {
                out.push(Action::Ping(i));
            }
            if end.goaways_left > 0 {
                out.push(Action::GoAway(i));
            }
            if end.notices_left > 0 {
                out.push(Action::Notice(i));
            }
            for (id, st) in &end.streams {
                let id = *id;
                match st.phase {
                    AppPhase::Pending => {
                        out.push(Action::Accept(i, id));
                        out.push(Action::Reject(i, id));
                    }
                    AppPhase::Open => {
                        let total = b.total(s.role(), id);
                        if st.sent.len() < total && !st.blocked {
                            out.push(Action::Send(i, id));
                        }
                        if st.sent.len() == total && !st.finished {
                            out.push(Action::Finish(i, id));
                        }
                    }
                    AppPhase::Dialing | AppPhase::Ended(_) => {}
                }
                if !st.ended() && end.resets_left > 0 {
                    out.push(Action::Reset(i, id));
                    out.push(Action::Abandon(i, id));
                }
                if st.readable && !st.ended() {
                    out.push(Action::Read(i, id));
                }
                if s.unreleased(id) > 0 {
                    out.push(Action::Release(i, id));
                }
            }
        }
        if !state.rogue_done && !state.dropped {
            for m in &b.rogue {
                if attack::bytes(*m, state, b.server_max_streams).is_some() {
                    out.push(Action::Rogue(*m));
                }
            }
        }
    }

    /// Whether no step that moves the run toward its end is enabled (see
    /// [`Action::is_progress`]): nothing in flight, nothing to flush, no application step a
    /// healthy stream or handshake waits for.
    pub fn is_quiescent(&self, state: &ModelState) -> bool {
        let mut acts = Vec::new();
        self.actions(state, &mut acts);
        !acts.iter().any(Action::is_progress)
    }

    /// Moves every frame end `i` has to send onto the wire, observing them.
    pub(crate) fn transmit(&self, state: &mut ModelState, i: usize) {
        let chunk = usize::from(self.bounds.chunk_size);
        while let Some(f) = state.ends[i].session.poll_frame() {
            let end = &mut state.ends[i];
            match &f {
                Frame::Hello(_) => end.hello_sent = true,
                Frame::Dial(d) => {
                    if d.stream.0 <= end.last_dial {
                        end.seen.id_reused = true;
                    }
                    end.last_dial = d.stream.0;
                    if let Some(st) = end.streams.get_mut(&d.stream) {
                        st.dial_on_wire = true;
                    }
                }
                Frame::DialOk(d) => {
                    if let Some(st) = end.streams.get_mut(&d.stream) {
                        st.dial_ok_on_wire = true;
                    }
                }
                Frame::Data(d) => {
                    let max = end.session.peer_settings().max_frame_size() as usize;
                    let queued = end.session.queued(d.stream) as usize;
                    if let Some(st) = end.streams.get_mut(&d.stream) {
                        st.fin_on_wire |= d.fin;
                        // More of a chunk follows a full frame: the session split it.
                        end.seen.split |= d.payload.len() == max && queued > 0 && chunk > max;
                    }
                }
                Frame::Window(w) => {
                    // Credit end i returned to the peer, for the peer's in-flight check.
                    if let Some(st) = state.ends[1 - i].streams.get_mut(&w.stream) {
                        st.credited += u64::from(w.increment);
                    }
                }
                Frame::Ping(p) if !p.ack => {
                    end.ping_unanswered = true;
                    end.pings_sent = end.pings_sent.saturating_add(1);
                    let asked = self.bounds.pings - end.pings_left;
                    end.seen.keepalive_ping |= end.pings_sent > asked;
                }
                Frame::GoAway(_) => end.goaway_sent = true,
                Frame::Draining => {
                    end.drainings_sent = end.drainings_sent.saturating_add(1);
                    end.seen.draining_after_goaway |= end.goaway_sent;
                }
                _ => {}
            }
            if !state.dropped {
                state.wire[1 - i].push_back(Wire::Frame(f));
            }
        }
    }

    /// Hands every event to the application of each end.
    fn react(state: &mut ModelState) {
        for end in state.ends.iter_mut() {
            while let Some(e) = end.session.poll_event() {
                let open_streams = end.streams.values().any(|s| s.phase == AppPhase::Open);
                let finish = |end: &mut End, id: StreamId, outcome: Outcome| {
                    let st = end
                        .streams
                        .entry(id)
                        .or_insert_with(|| AppStream::new(AppPhase::Dialing));
                    if st.ended() {
                        end.seen.double_end = true;
                    }
                    st.phase = AppPhase::Ended(outcome);
                };
                match e {
                    Event::HelloReceived(_) => end.hello_pending = true,
                    Event::DialRequested { stream, .. } => {
                        end.streams
                            .insert(stream, AppStream::new(AppPhase::Pending));
                    }
                    Event::DialSucceeded { stream } => {
                        if let Some(st) = end.streams.get_mut(&stream) {
                            st.phase = AppPhase::Open;
                        }
                    }
                    Event::DialFailed { stream, error } => {
                        finish(end, stream, Outcome::DialFailed(error.code, error.by));
                    }
                    Event::Reset { stream, error } => {
                        // The model's own resets say "cancel"; any other CANCEL from the peer
                        // is the core's drop policy at work.
                        if error.code == ErrorCode::CANCEL
                            && error.by == Initiator::Peer
                            && error.reason != "cancel"
                        {
                            end.seen.reset_by_walkaway = true;
                        }
                        finish(end, stream, Outcome::Reset(error.code, error.by));
                    }
                    Event::Readable { stream } => match end.streams.get_mut(&stream) {
                        Some(st) if !st.ended() => st.readable = true,
                        // No event after the application's own reset or abandon.
                        _ => end.seen.double_end = true,
                    },
                    Event::Writable { stream } => {
                        if let Some(st) = end.streams.get_mut(&stream) {
                            st.reopened |= st.exhausted;
                            st.blocked = false;
                        }
                    }
                    Event::PingAnswered { .. } => end.seen.ping_answered = true,
                    Event::GoingAway { .. } => end.seen.goaway_with_open_stream |= open_streams,
                    // The session's end wakes every reader: a complete stream may still hold
                    // bytes and its FIN to read.
                    Event::Closed(_) => {
                        for st in end.streams.values_mut().filter(|st| !st.ended()) {
                            st.readable = true;
                        }
                    }
                    _ => {}
                }
            }
            // A stream that is over only waits for its handle: the application drops it.
            let session = &mut end.session;
            for (id, st) in end.streams.iter_mut() {
                match session.stream_state(*id) {
                    Some(StreamState::Closed) => {
                        if st.phase == AppPhase::Open && st.finished && st.got_fin {
                            st.phase = AppPhase::Ended(Outcome::Completed);
                        }
                        // Dropped once read to the end (a stream complete when its session
                        // ended may still hold bytes to read).
                        if st.ended() {
                            let dropped = session.abandon(*id);
                            debug_assert!(dropped.is_ok(), "a closed stream can be abandoned");
                        }
                    }
                    Some(StreamState::Failed) => {
                        let dropped = session.abandon(*id);
                        debug_assert!(dropped.is_ok(), "a failed stream can be abandoned");
                    }
                    _ => {}
                }
            }
            let live = end
                .streams
                .iter()
                .filter(|(id, st)| end.session.role().opens(**id) && !st.ended())
                .count();
            end.seen.two_live |= live >= 2;
        }
    }

    /// Whether delivering and flushing alone, from `state`, stops within [`SETTLE_STEPS`]:
    /// two sessions left to themselves must fall silent.
    pub(crate) fn settles(&self, state: &ModelState) -> bool {
        let mut s = state.clone();
        for step in 0..SETTLE_STEPS {
            let wants = |s: &ModelState, i: usize| s.ends[i].session.wants_transmit();
            let action = if !s.wire[step % 2].is_empty() {
                Action::Deliver(step % 2)
            } else if !s.wire[1 - step % 2].is_empty() {
                Action::Deliver(1 - step % 2)
            } else if self.bounds.batching && !s.dropped && (wants(&s, 0) || wants(&s, 1)) {
                Action::Flush(usize::from(!wants(&s, 0)))
            } else {
                return true;
            };
            match self.step(&s, action) {
                Some(next) => s = next,
                None => return true,
            }
        }
        false
    }

    /// The step itself, without the settling check.
    pub(crate) fn step(&self, last: &ModelState, action: Action) -> Option<ModelState> {
        let mut state = last.clone();
        let now = Time::from_millis(state.now);
        let chunk = usize::from(self.bounds.chunk_size);
        match action {
            Action::Open(i) => {
                let end = &mut state.ends[i];
                end.opens_left -= 1;
                // A refused open (limit, drain) uses the budget too, so every path ends.
                match end.session.open(Protocol::TCP, "dest", 80) {
                    Ok(id) => {
                        end.streams.insert(id, AppStream::new(AppPhase::Dialing));
                    }
                    Err(ApiError::StreamLimit) => end.seen.open_at_limit = true,
                    Err(_) => {}
                }
            }
            Action::Accept(i, id) => {
                let end = &mut state.ends[i];
                end.session.accept(id).ok()?;
                end.streams.get_mut(&id)?.phase = AppPhase::Open;
                end.seen.dialled_after_notice |= end.drainings_sent > 0 && !end.drain_started;
            }
            Action::Reject(i, id) => {
                let end = &mut state.ends[i];
                end.session
                    .reject(id, ErrorCode::DIAL_REFUSED, "refused")
                    .ok()?;
                end.streams.get_mut(&id)?.phase = AppPhase::Ended(Outcome::ResetLocally);
            }
            Action::Send(i, id) => {
                let end = &mut state.ends[i];
                let total = self.bounds.total(end.session.role(), id);
                let st = end.streams.get(&id)?;
                let k = st.sent.len() / chunk;
                let want = chunk - st.sent.len() % chunk;
                let bytes =
                    Bytes::from(vec![chunk_byte(i, id, k); want.min(total - st.sent.len())]);
                let n = end.session.send(id, bytes.clone()).ok()?;
                let capacity = end.session.send_capacity(id);
                end.seen.send_buffer_full |= n < bytes.len() && end.session.send_window(id) > 0;
                end.seen.chunks_queued |= end.session.queued(id) as usize > chunk;
                let st = end.streams.get_mut(&id)?;
                st.sent.extend_from_slice(&bytes[..n]);
                st.exhausted |= capacity == 0;
                st.blocked = n < bytes.len() || capacity == 0;
            }
            Action::Finish(i, id) => {
                let end = &mut state.ends[i];
                end.session.finish(id).ok()?;
                end.streams.get_mut(&id)?.finished = true;
            }
            Action::Reset(i, id) => {
                let end = &mut state.ends[i];
                end.resets_left -= 1;
                end.session.reset(id, ErrorCode::CANCEL, "cancel").ok()?;
                let st = end.streams.get_mut(&id)?;
                st.cancelled = st.phase == AppPhase::Dialing;
                st.phase = AppPhase::Ended(Outcome::ResetLocally);
            }
            Action::Abandon(i, id) => {
                let end = &mut state.ends[i];
                end.resets_left -= 1;
                end.session.abandon(id).ok()?;
                end.streams.get_mut(&id)?.phase = AppPhase::Ended(Outcome::Abandoned);
            }
            Action::Read(i, id) => {
                let end = &mut state.ends[i];
                let got = end.session.recv(id, chunk);
                let st = end.streams.get_mut(&id)?;
                match got {
                    Ok(Some(data)) => st.received.extend_from_slice(&data),
                    Ok(None) => {
                        st.readable = false;
                        st.got_fin = true;
                    }
                    // WouldBlock, or a reset whose own event ends the stream for the
                    // application.
                    Err(_) => st.readable = false,
                }
            }
            Action::Release(i, id) => {
                let s = &mut state.ends[i].session;
                let n = s.unreleased(id).min(u32::from(self.bounds.chunk_size));
                s.release(id, n).ok()?;
            }
            Action::Ping(i) => {
                let end = &mut state.ends[i];
                end.pings_left -= 1;
                end.session.ping(now).ok()?;
            }
            Action::GoAway(i) => {
                let end = &mut state.ends[i];
                end.goaways_left -= 1;
                end.drain_started = true;
                // Refused once the session is closed: the budget is spent all the same.
                if end.session.go_away("drain").is_err() {
                    debug_assert!(end.session.is_closed(), "go_away fails only when closed");
                }
            }
            Action::Notice(i) => {
                let end = &mut state.ends[i];
                end.notices_left -= 1;
                // Refused once the session is closed: the budget is spent all the same.
                let _ = end.session.announce_draining();
            }
            Action::Welcome => {
                let end = &mut state.ends[0];
                end.hello_pending = false;
                end.session.accept_hello(now).ok()?;
            }
            Action::Refuse => {
                let end = &mut state.ends[0];
                end.hello_pending = false;
                end.session
                    .refuse_hello(ErrorCode::UNAUTHORIZED, "not this agent")
                    .ok()?;
            }
            Action::Flush(i) => {
                if !state.ends[i].session.wants_transmit() {
                    return None;
                }
                self.transmit(&mut state, i);
            }
            Action::Deliver(i) => match state.wire[i].pop_front()? {
                Wire::Frame(f) => {
                    match &f {
                        Frame::Ping(p) if p.ack => {
                            let end = &mut state.ends[i];
                            end.ping_unanswered = false;
                            end.answers = end.answers.saturating_add(1);
                        }
                        Frame::Dial(d) if i == 0 => {
                            state.agent_id_seen = state.agent_id_seen.max(d.stream.0);
                        }
                        _ => {}
                    }
                    state.ends[i].session.handle_frame(now, f);
                }
                Wire::Rogue(m, bytes) => {
                    let server = &mut state.ends[0].session;
                    let target = rogue::target(&bytes);
                    let expected = rogue::expected(m, server, target, state.agent_id_seen);
                    let was_closed = server.is_closed();
                    server.handle_bytes(now, &mut bytes::BytesMut::from(&bytes[..]));
                    state.verdict = Some(Verdict {
                        misbehavior: m,
                        expected,
                        actual: rogue::actual(server, was_closed),
                    });
                }
            },
            Action::Timeout(i) => {
                let end = &mut state.ends[i];
                let t = end.session.poll_timeout()?;
                end.timers_left -= 1;
                state.now = state.now.max(t.as_millis());
                let was_closed = end.session.is_closed();
                end.session.handle_timeout(t);
                // SPEC 7.3: the keepalive deadline runs only while a PING is unanswered (one
                // still in the session's queue counts: the writer may not have run yet).
                if !was_closed
                    && end.session.close_reason() == Some(&CloseReason::KeepaliveTimeout)
                    && !end.ping_unanswered
                    && !self.bounds.batching
                {
                    end.seen.keepalive_without_ping = true;
                }
            }
            Action::Drop => {
                state.dropped = true;
                state.wire = [VecDeque::new(), VecDeque::new()];
                for end in state.ends.iter_mut() {
                    end.session.handle_transport_closed();
                }
            }
            Action::Rogue(m) => {
                let bytes = attack::bytes(m, &state, self.bounds.server_max_streams)?;
                state.rogue_done = true;
                state.wire[0].push_back(Wire::Rogue(m, bytes));
            }
        }
        if !self.bounds.batching {
            self.transmit(&mut state, 0);
            self.transmit(&mut state, 1);
        }
        Self::react(&mut state);
        if !self.bounds.batching {
            // Reacting (dropping a finished stream's handle) can make frames too.
            self.transmit(&mut state, 0);
            self.transmit(&mut state, 1);
        }
        Some(state)
    }
}
