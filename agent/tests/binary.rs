//! The `tether-agent` binary itself: its exit codes and messages on bad flags and files. (The
//! server's tests also run this binary as a real process beside `tether-server`.)

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tether-agent"))
}

#[test]
fn a_missing_ca_file_is_refused_at_start_naming_the_flag_and_the_file() {
    let out = agent()
        .args(["--ca-cert", "/nonexistent/ca.pem", "--agent-id", "node-1"])
        .output()
        .expect("the binary runs");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ca-cert"), "{err}");
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");
}

#[test]
fn a_malformed_flag_value_is_a_usage_error() {
    let out = agent()
        .args(["--ca-cert", "ca.pem", "--dial-timeout", "soon"])
        .output()
        .expect("the binary runs");
    assert_eq!(out.status.code(), Some(2), "clap's usage error: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--dial-timeout"), "{err}");
}

#[test]
fn help_lists_the_konnectivity_flags_a_manifest_uses() {
    let out = agent().arg("--help").output().expect("the binary runs");
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--proxy-server-host",
        "--proxy-server-port",
        "--ca-cert",
        "--agent-id",
        "--agent-identifiers",
        "--service-account-token-path",
        "--health-server-port",
        "--allowed-destinations",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}
