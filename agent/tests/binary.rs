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

/// Runs the agent with `args` (and a CA file that does not exist): its exit code and stderr.
fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = agent()
        .args(["--ca-cert", "/nonexistent/ca.pem"])
        .args(args)
        .output()
        .expect("the binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn konnectivitys_flag_values_mean_what_they_mean_there_or_are_refused_with_a_reason() {
    // A cap under the first interval: refused, as Konnectivity does; 0 would be a storm.
    let (code, err) = run(&["--sync-interval", "5s", "--sync-interval-cap", "1s"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--sync-interval") && err.contains("--sync-interval-cap"),
        "{err}"
    );
    let (code, err) = run(&["--sync-interval", "0"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--sync-interval must be above 0"), "{err}");
    let (code, err) = run(&["--proxy-server-port", "0"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--proxy-server-port"), "{err}");
    // An empty name among ALPN protocols cannot go on the wire.
    let (code, err) = run(&["--alpn-proto=x,"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--alpn-proto"), "{err}");
    // h2 would make a tether server read the tunnel as Konnectivity's gRPC agent.
    let (code, err) = run(&["--alpn-proto=tether,h2"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("h2 is how tether's server tells"), "{err}");
    // Taken as Konnectivity takes them: Go's durations and booleans, an empty ALPN list, an
    // empty agent id from the environment. These get as far as the (missing) CA file.
    for args in [
        &["--sync-interval", "1m0s", "--sync-interval-cap", "1h0m0s"][..],
        &["--keepalive-time", "0"],
        &["--count-server-leases=true"],
        &["--count-server-leases=false"],
        &["--count-server-leases"],
        &["--alpn-proto="],
    ] {
        let (code, err) = run(args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains("--ca-cert"), "{args:?}: {err}");
    }
    let out = agent()
        .args(["--ca-cert", "/nonexistent/ca.pem"])
        .env("PROXY_AGENT_ID", "")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--ca-cert"),
        "{out:?}"
    );
}
