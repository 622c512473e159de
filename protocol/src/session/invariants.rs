//! The session's invariants, as sentences. Checked after every transition in debug
//! builds, and by the model checker and the fuzz targets through the same function.

use super::keepalive::Timer;
use super::stream::{Phase, SendState};
use super::{Session, SessionPhase};
use crate::frame::{MAX_STREAM_ID, MAX_WINDOW, MIN_MAX_FRAME_SIZE};

impl Session {
    /// Checks every invariant of the session; `Err` names the one broken, as a sentence.
    pub fn check_invariants(&self) -> Result<(), &'static str> {
        let local_initial = self.config.initial_window;
        let peer_initial = self.peer.initial_window();
        let threshold = self.window_threshold();
        let established = self.is_established();
        let (mut local, mut peer) = (0u32, 0u32);
        let mut scheduled = 0usize;
        for (id, s) in self.streams.iter() {
            if id.0 == 0 || id.0 > MAX_STREAM_ID {
                return Err("stream ids are between 1 and 2^31-1");
            }
            if self.role.opens(id) && id.0 >= self.streams.next_local {
                return Err("a local stream id is below the next local id");
            }
            if !self.role.opens(id) && id.0 > self.streams.last_peer {
                return Err("a peer stream id is at most the last peer id");
            }
            if s.scheduled {
                scheduled += 1;
            } else if s.has_work(threshold) {
                return Err("every stream with a frame to send is scheduled");
            }
            if !s.is_live() {
                if s.abandoned || !s.announced {
                    return Err("a closed stream stays only while its application holds it");
                }
                if s.scheduled || s.send.queued > 0 {
                    return Err("a closed stream holds nothing but its outcome");
                }
                if s.recv.buf.len() > 0 && s.phase != Phase::Closed(None) {
                    return Err("only a stream that ended cleanly keeps its unread bytes");
                }
                continue;
            }
            if !established {
                return Err("live streams exist only while the session is open");
            }
            if self.role.opens(id) {
                local += 1;
                if s.phase == Phase::Pending || s.dial_ok_queued {
                    return Err("only the acceptor has pending dials and queues DIAL_OK");
                }
                if !s.announced {
                    return Err("the application knows every stream it opened");
                }
            } else {
                peer += 1;
                if matches!(s.phase, Phase::Dialing(_)) {
                    return Err("only the opener dials");
                }
            }
            if s.send.window.available() > peer_initial {
                return Err("a send window never exceeds the peer's initial window");
            }
            if s.send.queued > peer_initial - s.send.window.available() {
                return Err("queued bytes are part of the unacknowledged bytes");
            }
            if s.send.queued > self.config.max_send_window {
                return Err("a stream never holds more to send than this end's own cap");
            }
            let sum: usize = s.send.queue.iter().map(bytes::Bytes::len).sum();
            if sum != s.send.queued as usize {
                return Err("queued is the total length of the send queue");
            }
            if s.send.queued > 0 && s.phase != Phase::Established {
                return Err("only established streams queue bytes");
            }
            if s.send.state == SendState::Finished && s.send.queued > 0 {
                return Err("nothing is queued after FIN went out");
            }
            let recv_total = u64::from(s.recv.window.available())
                + u64::from(s.recv.buf.len())
                + u64::from(s.recv.unreleased)
                + u64::from(s.recv.pending);
            if recv_total != u64::from(local_initial) {
                return Err(
                    "receive window + buffered + unreleased + pending equals the initial window",
                );
            }
            if s.recv.buf.len() > 0 && s.phase != Phase::Established {
                return Err("only established streams buffer received bytes");
            }
            if s.recv.buf.chunk_count()
                > 2 * (local_initial / self.config.recv_copy_below) as usize + 2
            {
                return Err("a receive buffer holds O(window / 1 KiB) slices, whatever the frames");
            }
            if s.is_done() {
                return Err("a stream with both halves finished is closed");
            }
        }
        if local != self.streams.local_live || peer != self.streams.peer_live {
            return Err("the live-stream counters match the table");
        }
        if established && local > self.open_limit() {
            return Err("this end never opens more streams than the peer allows");
        }
        if peer > self.config.max_concurrent_streams {
            return Err("the peer never has more streams here than this end allows");
        }
        if scheduled != self.streams.ready.len() {
            return Err("the ready ring holds exactly the scheduled streams");
        }
        if self
            .streams
            .ready
            .iter()
            .any(|id| self.streams.get(*id).is_none())
        {
            return Err("the ready ring holds only streams in the table");
        }
        if self.streams.refusals.len() > self.config.max_concurrent_streams as usize + 1 {
            return Err("refusals are bounded by the concurrent stream limit");
        }
        if self.is_closed() {
            if !self.streams.ready.is_empty() || !self.streams.refusals.is_empty() {
                return Err("a closed session has nothing queued but its GOAWAY");
            }
            if self.poll_timeout().is_some() {
                return Err("a closed session has no timer");
            }
        }
        if established && self.timers.is_set(Timer::Handshake) {
            return Err("the handshake deadline ends with the handshake");
        }
        if self.keepalive.outstanding.is_some() != self.timers.is_set(Timer::KeepaliveDeadline) {
            return Err("a PING is outstanding exactly while its deadline runs");
        }
        if matches!(
            self.phase,
            SessionPhase::AwaitHello | SessionPhase::AwaitWelcome
        ) && self.is_draining()
        {
            return Err("only an open session drains");
        }
        if local_initial > MAX_WINDOW
            || self.codec.max_payload() < MIN_MAX_FRAME_SIZE.min(self.config.max_frame_size)
        {
            return Err("settings are in range");
        }
        Ok(())
    }
}
