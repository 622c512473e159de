//! `TunnelModel` as a stateright `Model`: its initial states, actions, steps and properties.

use std::collections::{BTreeMap, VecDeque};

use stateright::{Model, Property};
use tether_proto::testing::{test_agent_identity, test_server_identity};
use tether_proto::{Role, Session, Time};

use crate::properties;
use crate::state::*;
use crate::tunnel::TunnelModel;

impl Model for TunnelModel {
    type State = ModelState;
    type Action = Action;

    fn init_states(&self) -> Vec<ModelState> {
        let b = &self.bounds;
        let end = |session: Session, opens: u8| End {
            session,
            opens_left: opens,
            resets_left: b.resets,
            pings_left: b.pings,
            goaways_left: b.goaways,
            notices_left: b.notices,
            drainings_sent: 0,
            timers_left: b.timers,
            hello_pending: false,
            hello_sent: false,
            streams: BTreeMap::new(),
            last_dial: 0,
            goaway_sent: false,
            drain_started: false,
            ping_unanswered: false,
            pings_sent: 0,
            answers: 0,
            seen: Seen::default(),
        };
        let start = |agent_versions: Vec<u16>| {
            let now = Time::from_millis(0);
            let mut agent_config = b.config(Role::Agent);
            agent_config.versions = agent_versions;
            let server = Session::server(b.config(Role::Server), test_server_identity(), now)
                .unwrap_or_else(|e| panic!("server config: {e}"));
            let agent = Session::agent(agent_config, test_agent_identity(), now)
                .unwrap_or_else(|e| panic!("agent config: {e}"));
            ModelState {
                ends: [end(server, b.server_opens), end(agent, b.agent_opens)],
                wire: [VecDeque::new(), VecDeque::new()],
                dropped: false,
                now: 0,
                agent_id_seen: 0,
                rogue_done: false,
                verdict: None,
                endless: false,
            }
        };
        if b.handshake {
            let mut states = vec![start(vec![1]), start(vec![2])];
            if !b.batching {
                for s in &mut states {
                    self.transmit(s, 1);
                }
            }
            states
        } else {
            // Already open: the handshake ran (and was checked) elsewhere.
            let mut s = start(vec![1]);
            let pair = tether_proto::testing::Pair::established(
                b.config(Role::Server),
                b.config(Role::Agent),
            );
            s.ends[0].session = pair.server;
            s.ends[1].session = pair.agent;
            s.ends[1].hello_sent = true;
            vec![s]
        }
    }

    fn actions(&self, state: &ModelState, actions: &mut Vec<Action>) {
        // A run that went endless has been reported (an `always` property); nothing follows.
        if state.endless {
            return;
        }
        self.app_actions(state, actions);
        for i in 0..2 {
            if !state.wire[i].is_empty() {
                actions.push(Action::Deliver(i));
            }
            let end = &state.ends[i];
            if self.bounds.batching && !state.dropped && end.session.wants_transmit() {
                actions.push(Action::Flush(i));
            }
            if end.timers_left > 0
                && !end.session.is_closed()
                && end.session.poll_timeout().is_some()
            {
                actions.push(Action::Timeout(i));
            }
        }
        if self.bounds.drop && !state.dropped {
            actions.push(Action::Drop);
        }
    }

    fn next_state(&self, last: &ModelState, action: Action) -> Option<ModelState> {
        let input = action.is_input();
        let mut state = self.step(last, action)?;
        // Liveness: after every input, the two sessions left alone must fall silent. An
        // endless exchange (a PING answered with a PING, a WINDOW answered with a WINDOW) is
        // a violation with a path, not a state space that grows until memory runs out.
        if input && !state.endless && !self.settles(&state) {
            state.endless = true;
        }
        Some(state)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        properties::all()
    }
}
