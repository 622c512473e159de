//! What a misbehaving agent puts on the wire for each [`Misbehavior`], read off the model's
//! state (the streams its application holds, its session's phase).

use bytes::{BufMut, Bytes, BytesMut};
use tether_proto::frame::{
    DialOk, Frame, FrameKind, HEADER_LEN, Header, Hello, Ping, StreamId, WindowUpdate,
};
use tether_proto::testing::test_agent_identity;
use tether_proto::{Config, Role};

use crate::rogue::*;
use crate::state::{AppPhase, AppStream, ModelState};

/// The bytes the agent would send for `m` now, if `m` can be done in this state.
pub fn bytes(m: Misbehavior, state: &ModelState, server_max_streams: u32) -> Option<Bytes> {
    let agent = &state.ends[1];
    let open = agent.session.is_established();
    // A stream of the agent's application, with what the rogue needs of it.
    let stream = |want: &dyn Fn(StreamId, &AppStream) -> bool| {
        agent
            .streams
            .iter()
            .find(|(id, st)| want(**id, st))
            .map(|(id, _)| *id)
    };
    let frames = match m {
        Misbehavior::FrameBeforeWelcome => {
            (!open && agent.hello_sent && !agent.session.is_closed()).then(|| {
                vec![Frame::Ping(Ping {
                    ack: false,
                    payload: 7,
                })]
            })?
        }
        Misbehavior::HelloInOpenSession => {
            let config = Config::default();
            let id = test_agent_identity();
            open.then(|| {
                vec![Frame::Hello(Hello {
                    versions: config.versions.clone(),
                    agent_id: id.agent_id,
                    identifiers: id.identifiers,
                    settings: config.settings(),
                    token: None,
                })]
            })?
        }
        Misbehavior::DialWithWrongParity => open.then(|| vec![dial(FRESH_SERVER_ID)])?,
        Misbehavior::ReusesStreamId => {
            (open && agent.last_dial > 0).then(|| vec![dial(agent.last_dial)])?
        }
        Misbehavior::DialAfterGoAway => {
            (open && agent.goaway_sent).then(|| vec![dial(FRESH_AGENT_ID)])?
        }
        Misbehavior::DialFlood => (open && !agent.goaway_sent).then(|| {
            (0..2 * server_max_streams + 2)
                .map(|k| dial(FRESH_AGENT_ID + 2 * k))
                .collect()
        })?,
        Misbehavior::FrameForUnopenedStream => {
            open.then(|| vec![data(StreamId(FRESH_AGENT_ID), 1)])?
        }
        Misbehavior::DialOkForOwnStream => {
            let id = stream(&|id, st| Role::Agent.opens(id) && st.dial_on_wire)?;
            vec![Frame::DialOk(DialOk { stream: id })]
        }
        Misbehavior::SecondDialOk => {
            let id = stream(&|_, st| st.dial_ok_on_wire)?;
            vec![Frame::DialOk(DialOk { stream: id })]
        }
        Misbehavior::DataBeforeAccept => {
            let id = stream(&|_, st| st.phase == AppPhase::Pending)?;
            vec![data(id, 1)]
        }
        Misbehavior::DataAfterFin => {
            let id = stream(&|_, st| st.fin_on_wire && !st.reset_here())?;
            vec![data(id, 1)]
        }
        Misbehavior::IgnoresWindow => {
            let window =
                usize::try_from(state.ends[0].session.local_settings().initial_window()).ok()?;
            // One frame, so the honest end cannot have buffered any of it before it sees the
            // overrun: a window this small is what the hostile configurations use.
            if window + 1 > tether_proto::frame::MIN_MAX_FRAME_SIZE as usize {
                return None;
            }
            let id = stream(&|_, st| st.may_send_data() && !st.fin_on_wire)?;
            vec![data(id, window + 1)]
        }
        Misbehavior::OverGrants => {
            let window = state.ends[0].session.local_settings().initial_window();
            let id = stream(&|_, st| st.may_send_data())?;
            vec![Frame::Window(WindowUpdate {
                stream: id,
                increment: window.saturating_add(1),
            })]
        }
        Misbehavior::Malformed => {
            if !open {
                return None;
            }
            // A WINDOW whose payload is 3 bytes, not 4.
            let mut b = BytesMut::new();
            Header {
                kind: FrameKind::WINDOW,
                flags: 0,
                stream: StreamId(2),
                len: 3,
            }
            .encode(&mut b);
            b.put_slice(&[0, 0, 1]);
            return Some(b.freeze());
        }
        Misbehavior::TooLarge => {
            if !open {
                return None;
            }
            let max = state.ends[0].session.local_settings().max_frame_size();
            let mut b = BytesMut::with_capacity(HEADER_LEN);
            Header {
                kind: FrameKind::DATA,
                flags: 0,
                stream: StreamId(2),
                len: max + 1,
            }
            .encode(&mut b);
            return Some(b.freeze());
        }
    };
    Some(encode(&frames))
}
