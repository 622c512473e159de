//! The Unix socket frontends kube-apiserver uses (CONNECT or gRPC): bound with mode 0770 and
//! never taken over from a live server, and each client's user checked against an allowlist.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use crate::connect;
use crate::core::ServerCore;
use crate::dial::span;
use crate::grpc;
use crate::http::{HttpError, answer};
use crate::metrics::Frontend;

/// Binds the CONNECT Unix socket with mode 0770 (owner and group, as Konnectivity's server
/// sets it): bound under a temporary name, given its mode, then renamed into place, so no
/// client can connect while it has the umask's mode.
///
/// A socket file already at `path` is replaced only if nothing answers on it (a stale file
/// a crashed server left) and `delete_existing` allows it; a live server's socket is never
/// taken over.
#[cfg(unix)]
pub(crate) async fn bind(
    path: &std::path::Path,
    delete_existing: bool,
) -> io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ));
        }
        let probe = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::UnixStream::connect(path),
        )
        .await;
        // Only a refused connection proves nobody listens: a busy server (a full backlog,
        // EAGAIN), a slow one or a socket we may not open is left alone.
        match probe {
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Ok(Ok(_)) | Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another server is serving on this socket",
                ));
            }
            Ok(Err(e)) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot tell whether a server serves this socket: {e}"),
                ));
            }
        }
        if !delete_existing {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a stale socket file is in the way (--delete-existing-uds-file replaces it)",
            ));
        }
        tracing::info!(path = %path.display(), "replacing a stale socket file nobody serves");
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("directory {} does not exist", dir.display()),
        ));
    }
    // Bound first inside a directory of this process's own, made with mode 0700 under a
    // random name (so nobody can have prepared it, and nobody else can connect while the
    // socket still has the umask's mode), given its mode, then linked into place. The names
    // are short (`<dir>/.<8 hex>/s`), so any socket path of 12 characters or more in its
    // directory fits the kernel's 108-byte limit whenever the path itself does.
    let parent = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let private = (0..16)
        .find_map(|_| {
            let dir = parent.join(format!(".{:08x}", rand::random::<u32>()));
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .ok()
                .map(|()| dir)
        })
        .ok_or_else(|| io::Error::other("cannot make a private directory beside the socket"))?;
    let tmp = private.join("s");
    let bound = tokio::net::UnixListener::bind(&tmp).and_then(|l| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o770))?;
        // A hard link fails if the name exists: of two servers starting together, the
        // second gets an error instead of silently replacing the first's socket.
        std::fs::hard_link(&tmp, path)?;
        Ok(l)
    });
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    bound.map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => io::Error::new(
            io::ErrorKind::AddrInUse,
            "another server took this socket while this one started",
        ),
        _ => e,
    })
}

/// The identity of the socket file at `path` (device and inode), to unlink it at shutdown
/// only if it is still this server's.
#[cfg(unix)]
pub(crate) fn file_id(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Serves a Unix socket: CONNECT, or gRPC when `grpc` is given. With `peers`, a client
/// whose user is not listed is refused (a 403 on CONNECT; gRPC: the connection is closed).
#[cfg(unix)]
pub(crate) async fn accept(
    core: Arc<ServerCore>,
    l: tokio::net::UnixListener,
    peers: Option<Arc<[u32]>>,
    grpc: Option<Arc<grpc::Grpc>>,
) {
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let frontend = if grpc.is_some() {
            Frontend::Grpc
        } else {
            Frontend::Uds
        };
        let uid = s.peer_cred().map(|c| c.uid()).ok();
        let span = span(
            &uid.map_or_else(|| "uds".to_owned(), |u| format!("uds uid={u}")),
            frontend,
        );
        let core = core.clone();
        if let Some(allowed) = &peers
            && !uid.is_some_and(|u| allowed.contains(&u))
        {
            let _enter = span.enter();
            tracing::warn!(?uid, "Unix socket client refused: its user is not allowed");
            core.metrics.connect(403);
            if grpc.is_none() {
                let e = HttpError {
                    status: 403,
                    reason: "this user may not use the socket".into(),
                };
                tokio::spawn(async move { answer(&mut s, &e).await });
            }
            continue;
        }
        let deadline = tokio::time::Instant::now() + core.header_timeout;
        match &grpc {
            Some(g) => {
                tokio::spawn(grpc::serve(core, g.clone(), s).instrument(span));
            }
            None => {
                tokio::spawn(
                    async move {
                        connect::serve(&core, s, Frontend::Uds, deadline, None).await;
                    }
                    .instrument(span),
                );
            }
        }
    }
}
