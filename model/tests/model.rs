//! The model in small configurations, asserted in full; one test per misbehaving peer; the
//! suite's own consistency; and the `check` binary's verdicts as exit codes.

use std::process::Command;

use stateright::{Checker, Model};
use tether_model::properties::ALWAYS;
use tether_model::suite;
use tether_model::{Answer, Bounds, Misbehavior, TunnelModel};

/// Small enough for a debug build: one stream with a byte each way, a reset or walk-away, a
/// drain, tunnel loss.
fn small() -> Bounds {
    Bounds {
        reply_chunks: 0,
        ..Bounds::tiny()
    }
}

#[test]
fn the_small_configuration_holds_every_property_and_reaches_its_examples() {
    let checker = TunnelModel::new(small()).checker().spawn_dfs().join();
    assert!(checker.is_done());
    for name in ALWAYS {
        assert!(
            checker.discovery(name).is_none(),
            "{name}: {:?}",
            checker.discovery(name).map(|p| p.into_actions())
        );
    }
    for name in [
        tether_model::properties::COMPLETES,
        tether_model::properties::CANCEL_CROSSES_DIAL_OK,
        tether_model::properties::RESET_CROSSES_FIN,
        tether_model::properties::DROP_FAILS_DIAL,
        tether_model::properties::SERVER_DRAINS,
        tether_model::properties::WALKS_AWAY,
    ] {
        assert!(checker.discovery(name).is_some(), "{name} was not reached");
    }
    // Pinned: a change in this count means the explored behaviour changed; look at why.
    assert_eq!(checker.unique_state_count(), 99_001, "unique states");
}

fn rogue(m: Misbehavior) -> Bounds {
    Bounds {
        rogue: vec![m],
        ..suite::hostile().bounds
    }
}

/// The hostile configuration restricted to one misbehaviour: the honest end answers it as the
/// SPEC demands in every state where it can happen, and keeps its invariants.
fn honest_end_detects(m: Misbehavior) {
    let checker = TunnelModel::new(rogue(m)).checker().spawn_dfs().join();
    assert!(checker.is_done());
    for name in ALWAYS {
        assert!(
            checker.discovery(name).is_none(),
            "{m:?}: {name}: {:?}",
            checker.discovery(name).map(|p| p.into_actions())
        );
    }
    let path = checker
        .discovery(m.detected())
        .unwrap_or_else(|| panic!("{m:?}: the server end never detected the misbehaviour"));
    let verdict = path.last_state().verdict.expect("a verdict");
    assert_eq!(verdict.actual, Answer::Closes(m.code()), "{m:?}");
}

macro_rules! detects {
    ($($test:ident: $m:ident,)*) => {$(
        #[test]
        fn $test() {
            honest_end_detects(Misbehavior::$m);
        }
    )*};
}

detects! {
    a_frame_before_welcome_is_a_protocol_error: FrameBeforeWelcome,
    a_hello_in_an_open_session_is_a_protocol_error: HelloInOpenSession,
    a_dial_with_the_receivers_parity_is_a_protocol_error: DialWithWrongParity,
    a_reused_stream_id_is_a_protocol_error: ReusesStreamId,
    a_dial_after_goaway_is_a_protocol_error: DialAfterGoAway,
    a_flood_of_refused_dials_is_enhance_your_calm: DialFlood,
    a_frame_for_an_unopened_stream_is_a_protocol_error: FrameForUnopenedStream,
    dial_ok_for_a_stream_the_peer_opened_is_a_protocol_error: DialOkForOwnStream,
    a_second_dial_ok_is_a_protocol_error: SecondDialOk,
    data_before_dial_ok_is_a_protocol_error: DataBeforeAccept,
    data_after_fin_is_stream_closed: DataAfterFin,
    data_beyond_the_window_is_a_flow_control_error: IgnoresWindow,
    a_window_over_grant_is_a_flow_control_error: OverGrants,
    a_malformed_frame_is_malformed_frame: Malformed,
    a_frame_over_max_frame_size_is_frame_too_large: TooLarge,
}

#[test]
fn every_misbehaviour_has_its_own_detection_property_and_the_hostile_run_claims_them_all() {
    let names: std::collections::BTreeSet<_> =
        Misbehavior::ALL.iter().map(|m| m.detected()).collect();
    assert_eq!(names.len(), Misbehavior::ALL.len());
    let hostile = suite::hostile();
    for m in Misbehavior::ALL {
        assert!(hostile.claims.contains(&m.detected()), "{m:?}");
        assert!(hostile.bounds.rogue.contains(&m), "{m:?}");
    }
}

#[test]
fn every_claim_of_the_suite_names_a_property_and_every_example_is_claimed_somewhere() {
    let model = TunnelModel::new(Bounds::tiny());
    let properties = model.properties();
    let names: Vec<_> = properties.iter().map(|p| p.name).collect();
    let suite = suite::default_suite();
    for c in &suite {
        for claim in &c.claims {
            assert!(names.contains(claim), "{}: {claim} is no property", c.name);
        }
    }
    for p in &properties {
        if p.expectation == stateright::Expectation::Sometimes {
            assert!(
                suite.iter().any(|c| c.claims.contains(&p.name)),
                "no configuration claims {}",
                p.name
            );
        }
    }
}

fn check(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tether-model"))
        .arg("check")
        .args(args)
        .output()
        .expect("tether-model runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn check_exits_zero_when_every_verdict_is_good() {
    let (code, out) = check(&["--config", "cancel", "--chunks", "0", "--drop", "false"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("yes: every reachable state explored"), "{out}");
}

#[test]
fn check_exits_one_when_a_claimed_example_is_not_reached_in_a_complete_run() {
    // No data flows, so no window can be exhausted: the claim cannot be met.
    let (code, out) = check(&[
        "--config",
        "cancel",
        "--chunks",
        "0",
        "--drop",
        "false",
        "--claim",
        tether_model::properties::WINDOW_REOPENS,
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("NOT REACHED (claimed)"), "{out}");
}

#[test]
fn check_exits_two_when_the_run_stops_before_it_is_complete() {
    let (code, out) = check(&["--config", "streams", "--max-states", "2000"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("INCOMPLETE"), "{out}");
    let (code, _) = check(&[
        "--config",
        "streams",
        "--max-states",
        "2000",
        "--allow-incomplete",
    ]);
    assert_eq!(code, Some(0));
}

/// The path the checker found when a lost tunnel failed streams whose FINs had both crossed:
/// the server's application had not read the agent's FIN yet, its stream was reset with
/// CONNECTION_LOST, and the application was left with a stream that never ended. Replayed
/// here; the session now ends such a stream cleanly and leaves its FIN readable (SPEC 7.5).
#[test]
fn a_stream_complete_when_the_tunnel_drops_still_reads_to_its_end() {
    use tether_model::{Action::*, AppPhase, Outcome};
    use tether_proto::frame::StreamId;
    let id = StreamId(1);
    let model = TunnelModel::new(Bounds {
        chunks: 2,
        reply_chunks: 2,
        ..Bounds::tiny()
    });
    let mut state = model.init_states().remove(0);
    let path = [
        Open(0),
        Deliver(1),
        Accept(1, id),
        Send(1, id),
        Deliver(0),
        Send(0, id),
        Deliver(0),
        Read(0, id),
        Release(0, id),
        Deliver(1),
        Read(1, id),
        Release(1, id),
        Deliver(0),
        Send(0, id),
        Finish(0, id),
        GoAway(0),
        Deliver(1),
        Send(1, id),
        Finish(1, id),
        Deliver(0),
        Read(0, id),
        Release(0, id),
        Deliver(0),
        Deliver(1),
        Read(1, id),
        Release(1, id),
        Deliver(0),
        Deliver(1),
        Read(1, id),
        Deliver(1),
        Deliver(0),
        Drop,
    ];
    for action in path {
        state = model
            .next_state(&state, action.clone())
            .unwrap_or_else(|| panic!("{action:?} is enabled on the path"));
    }
    // The server's application reads what is left: the FIN, and a clean end.
    for _ in 0..4 {
        if let Some(next) = model.next_state(&state, Read(0, id)) {
            state = next;
        }
    }
    assert_eq!(
        state.ends[0].streams[&id].phase,
        AppPhase::Ended(Outcome::Completed)
    );
    assert!(model.is_quiescent(&state));
    for end in &state.ends {
        assert_eq!(
            end.session.stream_ids().count(),
            0,
            "every handle was dropped"
        );
    }
}
