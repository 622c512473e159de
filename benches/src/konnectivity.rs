//! Konnectivity's own `proxy-server` and `proxy-agent` as the report's peers, built from source
//! by `../shared/konnectivity/build.sh target/konnectivity` (or found in `KONNECTIVITY_BIN`),
//! and started with the same flags as the tether binaries they are compared with.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::procs::{Error, Proc, free_port};

/// Where Konnectivity's binaries are, or why they are not there.
pub fn binaries() -> Result<PathBuf, String> {
    let dir = std::env::var_os("KONNECTIVITY_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/konnectivity"),
        PathBuf::from,
    );
    if dir.join("proxy-server").exists() && dir.join("proxy-agent").exists() {
        Ok(dir)
    } else {
        Err(format!(
            "Konnectivity's binaries are not in {} (../shared/konnectivity/build.sh target/konnectivity builds them)",
            dir.display()
        ))
    }
}

/// A PKI's files: CA, server certificate and key, agent certificate and key (PEM).
pub struct Files {
    /// The CA's certificate.
    pub ca: PathBuf,
    /// The server's certificate.
    pub server_cert: PathBuf,
    /// The server's key.
    pub server_key: PathBuf,
    /// The agent's certificate (id `bench-agent`).
    pub agent_cert: PathBuf,
    /// The agent's key.
    pub agent_key: PathBuf,
}

/// A proxy server, Konnectivity's or tether's (`server_bin`), with Konnectivity's flags: HTTP
/// CONNECT on the Unix socket `uds`, agents with mTLS on a free port. Returns the process
/// and its agent port.
pub fn server(server_bin: &Path, f: &Files, uds: &Path) -> Result<(Proc, u16), Error> {
    server_with(server_bin, f, uds, "http-connect", &[])
}

/// [`server`] in `mode` (`http-connect` or `grpc`, the protocol on `uds`), with `extra` flags.
pub fn server_with(
    server_bin: &Path,
    f: &Files,
    uds: &Path,
    mode: &str,
    extra: &[String],
) -> Result<(Proc, u16), Error> {
    let (ca, cert, key) = (&f.ca, &f.server_cert, &f.server_key);
    let (agents, admin, health) = (free_port()?, free_port()?, free_port()?);
    let child = Command::new(server_bin)
        .arg(format!("--mode={mode}"))
        .args(["--server-port=0", "--agent-bind-address=127.0.0.1"])
        .args(extra)
        .arg(format!("--uds-name={}", uds.display()))
        .arg(format!("--agent-port={agents}"))
        .arg(format!("--admin-port={admin}"))
        .arg(format!("--health-port={health}"))
        .arg(format!("--cluster-cert={}", cert.display()))
        .arg(format!("--cluster-key={}", key.display()))
        .arg(format!("--cluster-ca-cert={}", ca.display()))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok((Proc { child }, agents))
}

/// Konnectivity's `proxy-agent` with mTLS (the PKI's agent certificate, id `bench-agent`),
/// connected to the agent port `port`.
pub fn agent(bin: &Path, f: &Files, port: u16) -> Result<Proc, Error> {
    let (ca, cert, key) = (&f.ca, &f.agent_cert, &f.agent_key);
    let (health, admin) = (free_port()?, free_port()?);
    let child = Command::new(bin.join("proxy-agent"))
        .args(["--proxy-server-host=127.0.0.1", "--agent-id=bench-agent"])
        .arg(format!("--proxy-server-port={port}"))
        .arg(format!("--ca-cert={}", ca.display()))
        .arg(format!("--agent-cert={}", cert.display()))
        .arg(format!("--agent-key={}", key.display()))
        .arg(format!("--health-server-port={health}"))
        .arg(format!("--admin-server-port={admin}"))
        .args([
            "--health-server-host=127.0.0.1",
            "--admin-bind-address=127.0.0.1",
        ])
        .args(["--sync-interval=200ms", "--probe-interval=200ms"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(Proc { child })
}

/// tether's agent with the same certificate and id, connected to the agent port `port`.
pub fn tether_agent(bin: &Path, f: &Files, port: u16) -> Result<Proc, Error> {
    let (ca, cert, key) = (&f.ca, &f.agent_cert, &f.agent_key);
    let child = Command::new(bin.join("tether-agent"))
        .args([
            "--proxy-server-host=127.0.0.1",
            "--proxy-server-name=localhost",
            "--agent-id=bench-agent",
        ])
        .arg(format!("--proxy-server-port={port}"))
        .arg(format!("--ca-cert={}", ca.display()))
        .arg(format!("--agent-cert={}", cert.display()))
        .arg(format!("--agent-key={}", key.display()))
        .args([
            "--allowed-destinations=127.0.0.0/8",
            "--sync-interval=100ms",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(Proc { child })
}
