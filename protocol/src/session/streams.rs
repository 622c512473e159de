//! The stream table: ids, the streams themselves, how many each end has live, and which have
//! a frame to send (SPEC 5.1, 5.4, 7.7). It never calls back into the session.

use std::collections::{BTreeMap, VecDeque};

use super::Role;
use super::stream::{Phase, Stream};
use crate::error::ProtocolError;
use crate::frame::{ErrorCode, FrameKind, StreamId};

/// Every stream of one session, and the bookkeeping that goes with them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Streams {
    role: Role,
    map: BTreeMap<StreamId, Stream>,
    /// The next id this end opens.
    pub(crate) next_local: u32,
    /// The highest id the peer opened (0: none).
    pub(crate) last_peer: u32,
    /// Live (not closed) streams this end opened.
    pub(crate) local_live: u32,
    /// Live (not closed) streams the peer opened.
    pub(crate) peer_live: u32,
    /// Streams with a frame to send, round robin; each at most once.
    pub(crate) ready: VecDeque<StreamId>,
    /// Peer dials refused without entering the table (SPEC 5.4), RESET still to send.
    pub(crate) refusals: VecDeque<(StreamId, &'static str)>,
}

impl Streams {
    pub(crate) fn new(role: Role) -> Streams {
        Streams {
            role,
            map: BTreeMap::new(),
            next_local: role.first_stream_id(),
            last_peer: 0,
            local_live: 0,
            peer_live: 0,
            ready: VecDeque::new(),
            refusals: VecDeque::new(),
        }
    }

    pub(crate) fn get(&self, id: StreamId) -> Option<&Stream> {
        self.map.get(&id)
    }

    pub(crate) fn get_mut(&mut self, id: StreamId) -> Option<&mut Stream> {
        self.map.get_mut(&id)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (StreamId, &Stream)> + '_ {
        self.map.iter().map(|(id, s)| (*id, s))
    }

    /// Ids of the entries matching `keep`, ascending.
    pub(crate) fn ids_where(&self, keep: impl Fn(StreamId, &Stream) -> bool) -> Vec<StreamId> {
        self.iter()
            .filter(|(id, s)| keep(*id, s))
            .map(|(id, _)| id)
            .collect()
    }

    /// Live streams, both ends' together.
    pub(crate) fn live(&self) -> u32 {
        self.local_live + self.peer_live
    }

    fn live_counter(&mut self, id: StreamId) -> &mut u32 {
        if self.role.opens(id) {
            &mut self.local_live
        } else {
            &mut self.peer_live
        }
    }

    /// Adds a live stream.
    pub(crate) fn insert(&mut self, id: StreamId, stream: Stream) {
        debug_assert!(stream.is_live(), "a stream enters the table live");
        *self.live_counter(id) += 1;
        self.map.insert(id, stream);
    }

    /// Marks a live stream closed: it stops counting and leaves the ready ring.
    pub(crate) fn close(&mut self, id: StreamId, outcome: Phase) {
        let Some(s) = self.map.get_mut(&id) else {
            return;
        };
        debug_assert!(matches!(outcome, Phase::Closed(_)), "close sets Closed");
        let was_live = s.is_live();
        s.phase = outcome;
        s.release_buffers();
        let scheduled = core::mem::replace(&mut s.scheduled, false);
        if was_live {
            *self.live_counter(id) -= 1;
        }
        if scheduled {
            self.ready.retain(|r| *r != id);
        }
    }

    /// Takes a stream out of the table.
    pub(crate) fn remove(&mut self, id: StreamId) -> Option<Stream> {
        let s = self.map.remove(&id)?;
        if s.scheduled {
            self.ready.retain(|r| *r != id);
        }
        if s.is_live() {
            *self.live_counter(id) -= 1;
        }
        Some(s)
    }

    /// Puts `id` in the ready ring if it has a frame to send and is not there yet.
    pub(crate) fn schedule(&mut self, id: StreamId, window_threshold: u32) {
        if let Some(s) = self.map.get_mut(&id)
            && !s.scheduled
            && s.has_work(window_threshold)
        {
            s.scheduled = true;
            self.ready.push_back(id);
        }
    }

    /// The next stream in the ready ring, taken out of it.
    pub(crate) fn pop_ready(&mut self) -> Option<StreamId> {
        while let Some(id) = self.ready.pop_front() {
            if let Some(s) = self.map.get_mut(&id) {
                s.scheduled = false;
                return Some(id);
            }
        }
        None
    }

    /// Finds the stream a frame is about (SPEC 5.4). `Ok(None)`: the stream is not in the
    /// table or is closed, and the frame is ignored; `Err`: the id was never opened.
    pub(crate) fn lookup(
        &self,
        kind: FrameKind,
        id: StreamId,
    ) -> Result<Option<StreamId>, ProtocolError> {
        let never = || {
            ProtocolError::new(
                ErrorCode::PROTOCOL_ERROR,
                kind,
                "frame for a stream that was never opened",
            )
        };
        if self.role.opens(id) {
            if id.0 >= self.next_local {
                return Err(never());
            }
        } else if id.0 > self.last_peer {
            return Err(never());
        }
        match self.map.get(&id) {
            None => Ok(None),
            Some(s) if matches!(s.phase, Phase::Dialing(Some(_))) => Err(never()),
            Some(s) if !s.is_live() => Ok(None),
            Some(_) => Ok(Some(id)),
        }
    }
}
