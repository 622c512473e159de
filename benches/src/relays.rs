//! The other tools a user would pick for a reverse tunnel, as the report's peers: OpenSSH's
//! `ssh -R` (sshd on loopback, key authentication) and a socat relay. Each is found on `PATH`
//! (Debian's `openssh-server`, `openssh-client` and `socat`); `Err` says what is missing.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::procs::{Error, Proc, free_port};

/// Whether `bin` runs (it is installed).
fn have(bin: &str) -> bool {
    Command::new(bin)
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// `socat` forwarding each connection to a free loopback port to `backend` (a process that
/// relays, with no TLS and no multiplexing: the floor of what a relay costs). Returns it and
/// its address.
pub fn socat(backend: SocketAddr) -> Result<(Proc, SocketAddr), Error> {
    if !have("socat") {
        return Err("socat is not installed (Debian: socat)".into());
    }
    let port = free_port()?;
    let child = Command::new("socat")
        .arg(format!(
            "TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,nodelay,backlog=1024"
        ))
        .arg(format!("TCP:{backend},nodelay"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok((Proc { child }, SocketAddr::from(([127, 0, 0, 1], port))))
}

/// OpenSSH's reverse tunnel as a user sets it up: `sshd` on loopback (the "server", key
/// authentication, its own configuration in `dir`) and `ssh -N -R` from the "node", which
/// forwards a port the server listens on to `backend`. Returns sshd, ssh and the forwarded
/// address a client connects to.
pub async fn ssh_reverse(
    dir: &Path,
    backend: SocketAddr,
) -> Result<(Proc, Proc, SocketAddr), Error> {
    let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or("sshd is not installed (Debian: openssh-server)")?;
    if !have("ssh") {
        return Err("ssh is not installed (Debian: openssh-client)".into());
    }
    let keygen = |name: &str| -> Result<(), Error> {
        let ok = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(dir.join(name))
            .status()?
            .success();
        if ok {
            Ok(())
        } else {
            Err(format!("ssh-keygen {name} failed").into())
        }
    };
    keygen("host")?;
    keygen("id")?;
    std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys"))?;
    let (port, forwarded) = (free_port()?, free_port()?);
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nAllowTcpForwarding yes\nLogLevel ERROR\n",
            dir.join("host").display(),
            dir.join("sshd.pid").display(),
            dir.join("authorized_keys").display(),
        ),
    )?;
    // sshd wants its privilege-separation directory.
    let _ = std::fs::create_dir_all("/run/sshd");
    let server = Proc {
        child: Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    };
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let mut waited = 0;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if waited > 100 {
            return Err("sshd did not listen".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    let node = Proc {
        child: Command::new("ssh")
            .args(["-N", "-i"])
            .arg(dir.join("id"))
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ExitOnForwardFailure=yes",
                "-o",
                "LogLevel=ERROR",
                "-p",
                &port.to_string(),
                "-R",
                &format!("127.0.0.1:{forwarded}:{backend}"),
                &format!("{user}@127.0.0.1"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], forwarded));
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok((server, node, addr));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("ssh -R did not open its port in 10 s".into())
}
