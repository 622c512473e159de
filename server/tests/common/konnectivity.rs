//! Konnectivity's own binaries, built from source by `../shared/konnectivity/build.sh
//! target/konnectivity` (`.ci/run` does), found there or in `KONNECTIVITY_BIN`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{Killed, Pki, free_port, tempdir};

/// Where Konnectivity's binaries are, if they are built.
pub fn konnectivity() -> Option<PathBuf> {
    let dir = std::env::var_os("KONNECTIVITY_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/konnectivity"),
        PathBuf::from,
    );
    if dir.join("proxy-agent").exists() {
        return Some(dir);
    }
    super::notice(&format!(
        "SKIPPED: Konnectivity's binaries are not in {} (run ../shared/konnectivity/build.sh target/konnectivity, as .ci/run does)",
        dir.display()
    ));
    None
}

/// How a Konnectivity agent authenticates.
pub enum Auth<'a> {
    /// A client certificate of its own, for its id (mTLS).
    Cert,
    /// A service-account token (no client certificate).
    Token(&'a str),
}

/// A Konnectivity `proxy-agent`, id `id`, killed when dropped.
pub struct KonnAgent {
    pub proc: Killed,
}

impl KonnAgent {
    /// `ip`: the loopback address this "node" serves (its `ipv4` identifier).
    pub fn start(
        bin: &Path,
        pki: &Pki,
        server: std::net::SocketAddr,
        id: &str,
        ip: &str,
        auth: Auth<'_>,
        extra: &[&str],
    ) -> KonnAgent {
        let dir = tempdir("konn-agent");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, pki.ca_pem()).unwrap();
        let auth_flags = match auth {
            Auth::Cert => {
                let cert = pki.ca.leaf(id, &[id]);
                let (crt, key) = (dir.join("agent.pem"), dir.join("agent.key"));
                std::fs::write(&crt, cert.cert.as_bytes()).unwrap();
                std::fs::write(&key, cert.key.as_bytes()).unwrap();
                vec![
                    format!("--agent-cert={}", crt.display()),
                    format!("--agent-key={}", key.display()),
                ]
            }
            Auth::Token(token) => {
                let path = dir.join("token");
                std::fs::write(&path, token).unwrap();
                vec![format!("--service-account-token-path={}", path.display())]
            }
        };
        let (health, admin) = (free_port(), free_port());
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let proc = Command::new(bin.join("proxy-agent"))
            .args([
                "--proxy-server-host=127.0.0.1".to_owned(),
                format!("--proxy-server-port={}", server.port()),
                format!("--ca-cert={}", ca.display()),
                format!("--agent-id={id}"),
                format!("--agent-identifiers=host={id}&ipv4={ip}"),
                format!("--health-server-port={health}"),
                format!("--admin-server-port={admin}"),
                "--health-server-host=127.0.0.1".to_owned(),
                "--admin-bind-address=127.0.0.1".to_owned(),
                "--sync-interval=200ms".to_owned(),
                "--sync-interval-cap=1s".to_owned(),
                "--probe-interval=200ms".to_owned(),
                "-v=2".to_owned(),
            ])
            .args(auth_flags)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("proxy-agent starts");
        eprintln!(
            "proxy-agent {id}: log in {}",
            dir.join("agent.log").display()
        );
        KonnAgent { proc: Killed(proc) }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.proc.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }
}
