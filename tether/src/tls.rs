//! rustls configurations from PEM (files or bytes), with the aws-lc-rs provider.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::reload::Reloadable;

/// The crypto provider tether uses everywhere: aws-lc-rs, preferring AES-128-GCM.
///
/// Every byte of a tunnel is sealed by one end and opened by the other, so the cipher is a
/// large share of a tunnel's CPU time. AES-128-GCM does 10 AES rounds to AES-256-GCM's 14 and
/// is what TLS 1.3 requires every implementation to offer (RFC 8446 §9.1; Go, and with it
/// Konnectivity, prefers it too). AES-256-GCM and ChaCha20-Poly1305 stay available.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::CipherSuite as C;
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites.sort_by_key(|s| {
        let aes128 = matches!(
            s.suite(),
            C::TLS13_AES_128_GCM_SHA256
                | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        );
        (
            s.version().version != rustls::ProtocolVersion::TLSv1_3,
            !aes128,
        )
    });
    Arc::new(p)
}

/// Encrypted bytes rustls may hold for a tunnel before the writer must flush them: rustls's
/// default, 64 KiB, splits each of the writer's batches (up to 512 KiB) into eight writes.
pub const TUNNEL_SEND_BUFFER: usize = 1024 * 1024;

/// Bytes a busy tunnel's TCP connection reads at once, beneath TLS.
const TUNNEL_READ_BUFFER: usize = 128 * 1024;
/// A read shorter than this is a quiet tunnel's (keepalives, a few dials).
const QUIET_READ: usize = 4096;

/// A tunnel's TCP connection, read in large pieces while it is busy: rustls reads its records
/// 4 KiB at a time, which on a busy tunnel is four `recv` calls per 16 KiB record. Reading
/// ahead into one buffer turns those into one call per 128 KiB, for one copy of cache-hot
/// bytes.
pub fn tunnel_transport<IO: AsyncRead + Unpin>(io: IO) -> ReadAhead<IO> {
    ReadAhead {
        io,
        buf: BytesMut::new(),
        busy: false,
        idle: crate::buffer::Quiet::default(),
    }
}

/// [`tunnel_transport`]: reads ahead only while the connection is busy, and holds no buffer
/// once it is idle. A quiet connection's reads go straight into the caller's buffer; one
/// that fills it turns the read-ahead on; a read ahead shorter than 4 KiB turns it off again.
/// A read that has to wait lets the buffer go at once if no read of 4 KiB or more came in
/// the last second, else when that second is up (`buffer::Quiet`, as the tunnel's reader):
/// a busy tunnel keeps and reuses its buffer, thousands of idle tunnels hold none, and a
/// tunnel that carried a transfer does not keep 128 KiB of touched pages for the rest of its
/// life. Writes pass through.
#[derive(Debug)]
pub struct ReadAhead<IO> {
    io: IO,
    buf: BytesMut,
    busy: bool,
    idle: crate::buffer::Quiet,
}

impl<IO> ReadAhead<IO> {
    /// A read waits: lets the (empty) buffer go if the connection has gone quiet.
    fn wait(&mut self, cx: &mut Context<'_>) {
        if self.buf.capacity() > 0 && self.idle.poll_idle(cx) {
            self.buf = BytesMut::new();
            self.busy = false;
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for ReadAhead<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.buf.is_empty() {
            let asked = out.remaining();
            if !me.busy || asked >= TUNNEL_READ_BUFFER {
                let before = out.filled().len();
                if Pin::new(&mut me.io).poll_read(cx, out)?.is_pending() {
                    me.wait(cx);
                    return Poll::Pending;
                }
                let n = out.filled().len() - before;
                me.busy = n > 0 && n == asked;
                if me.busy {
                    me.idle.busy();
                }
                return Poll::Ready(Ok(()));
            }
            // Reclaims the drained buffer in place; allocates only when it was let go.
            me.buf.reserve(TUNNEL_READ_BUFFER);
            let Poll::Ready(n) = std::pin::pin!(me.io.read_buf(&mut me.buf)).poll(cx)? else {
                me.wait(cx);
                return Poll::Pending;
            };
            if n < QUIET_READ {
                me.busy = false;
            } else {
                me.idle.busy();
            }
        }
        let k = out.remaining().min(me.buf.len());
        out.put_slice(&me.buf[..k]);
        me.buf.advance(k);
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for ReadAhead<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

fn invalid(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {e}"))
}

/// Certificates from PEM bytes.
pub fn certs_from_pem(pem: &[u8]) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("certificate PEM", e))?;
    if certs.is_empty() {
        return Err(invalid("certificate PEM", "no certificate found"));
    }
    Ok(certs)
}

/// A private key from PEM bytes.
pub fn key_from_pem(pem: &[u8]) -> io::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| invalid("private key PEM", e))
}

/// Reads a PEM file, naming it in the error.
pub fn read_pem(path: &Path) -> io::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

fn roots(ca_pem: &[u8]) -> io::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem)? {
        roots.add(cert).map_err(|e| invalid("CA certificate", e))?;
    }
    Ok(roots)
}

/// A TLS server configuration: `cert_pem`/`key_pem` identify the server; with `client_ca_pem`,
/// clients must present a certificate signed by that CA (mTLS).
pub fn server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: Option<&[u8]>,
) -> io::Result<Arc<ServerConfig>> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| invalid("TLS versions", e))?;
    let builder = match client_ca_pem {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .map_err(|e| invalid("client CA", e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(certs_from_pem(cert_pem)?, key_from_pem(key_pem)?)
        .map_err(|e| invalid("server certificate", e))?;
    Ok(Arc::new(config))
}

/// A TLS client configuration that trusts `ca_pem` and, given a certificate and key, presents
/// them (mTLS).
pub fn client_config(
    ca_pem: &[u8],
    client_cert: Option<(&[u8], &[u8])>,
) -> io::Result<Arc<ClientConfig>> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| invalid("TLS versions", e))?
        .with_root_certificates(roots(ca_pem)?);
    let config = match client_cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(certs_from_pem(cert)?, key_from_pem(key)?)
            .map_err(|e| invalid("client certificate", e))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Where a TLS server's material lives: certificate, key, and the CA its clients' certificates
/// must chain to (mTLS), each a PEM file.
#[derive(Debug, Clone)]
pub struct ServerFiles {
    /// The certificate chain.
    pub cert: std::path::PathBuf,
    /// Its private key.
    pub key: std::path::PathBuf,
    /// The CA that signs clients' certificates; `None`: no client certificate asked for.
    pub client_ca: Option<std::path::PathBuf>,
}

impl ServerFiles {
    /// The server configuration built from the files, re-read when they change
    /// ([`crate::reload`]). Errors name the material and the file.
    pub fn load(&self, name: &str) -> Result<Reloadable<ServerConfig>, String> {
        self.load_with(name, false)
    }

    /// [`ServerFiles::load`] for a frontend that clients connect to again and again (the
    /// CONNECT frontend): with TLS 1.3 session tickets, so a client that keeps its session
    /// resumes instead of a full handshake. The ticket key lives in memory and is new with
    /// every load, so a reload (a new CA, say) ends every session made before it.
    pub fn load_resumable(&self, name: &str) -> Result<Reloadable<ServerConfig>, String> {
        self.load_with(name, true)
    }

    fn load_with(&self, name: &str, tickets: bool) -> Result<Reloadable<ServerConfig>, String> {
        let mut files = vec![self.cert.clone(), self.key.clone()];
        files.extend(self.client_ca.clone());
        let paths = files.clone();
        Reloadable::load(name, files, move |b| {
            let named = |i: usize, e: io::Error| format!("{}: {e}", paths[i].display());
            certs_from_pem(&b[0]).map_err(|e| named(0, e))?;
            key_from_pem(&b[1]).map_err(|e| named(1, e))?;
            if let Some(ca) = b.get(2) {
                roots(ca).map_err(|e| named(2, e))?;
            }

            let mut config = server_config(&b[0], &b[1], b.get(2).map(Vec::as_slice))
                .map(Arc::unwrap_or_clone)
                .map_err(|e| format!("{} and {}: {e}", paths[0].display(), paths[1].display()))?;
            if tickets {
                config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
                    .map_err(|e| format!("session tickets: {e}"))?;
            }
            Ok(config)
        })
    }
}

/// Where a TLS client's material lives: the CA that signs the servers' certificates and,
/// for mTLS, the client's own certificate and key, each a PEM file.
#[derive(Debug, Clone)]
pub struct ClientFiles {
    /// The CA the server's certificate must chain to.
    pub ca: std::path::PathBuf,
    /// The client certificate and its key (mTLS).
    pub cert_key: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// ALPN protocols to offer (none: no ALPN extension).
    pub alpn: Vec<String>,
}

impl ClientFiles {
    /// The client configuration built from the files, re-read when they change.
    pub fn load(&self, name: &str) -> Result<Reloadable<ClientConfig>, String> {
        let mut files = vec![self.ca.clone()];
        if let Some((c, k)) = &self.cert_key {
            files.extend([c.clone(), k.clone()]);
        }
        let paths = files.clone();
        let alpn: Vec<Vec<u8>> = self.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Reloadable::load(name, files, move |b| {
            let named = |i: usize, e: io::Error| format!("{}: {e}", paths[i].display());
            roots(&b[0]).map_err(|e| named(0, e))?;
            if b.len() == 3 {
                certs_from_pem(&b[1]).map_err(|e| named(1, e))?;
                key_from_pem(&b[2]).map_err(|e| named(2, e))?;
            }
            let pair = (b.len() == 3).then(|| (&b[1][..], &b[2][..]));
            client_config(&b[0], pair)
                .map(|c| {
                    let mut c = Arc::unwrap_or_clone(c);
                    c.alpn_protocols = alpn.clone();
                    c
                })
                .map_err(|e| match &paths[..] {
                    [_, c, k] => format!("{} and {}: {e}", c.display(), k.display()),
                    _ => e.to_string(),
                })
        })
    }
}

/// A throwaway CA and certificates, for tests and the quickstart (rcgen).
#[cfg(feature = "test-util")]
pub mod testpki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };

    /// A PEM certificate and its PEM key.
    #[derive(Debug, Clone)]
    pub struct Pem {
        /// The certificate.
        pub cert: String,
        /// The private key.
        pub key: String,
    }

    /// A certificate authority that signs leaf certificates.
    pub struct Ca {
        /// The CA's own certificate and key.
        pub pem: Pem,
        issuer: Issuer<'static, KeyPair>,
    }

    impl Ca {
        /// A new self-signed CA named `name`.
        pub fn new(name: &str) -> Ca {
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate().expect("key");
            let cert = params.self_signed(&key).expect("self-signed CA");
            let pem = Pem {
                cert: cert.pem(),
                key: key.serialize_pem(),
            };
            Ca {
                pem,
                issuer: Issuer::new(params, key),
            }
        }

        /// A leaf certificate for `names` (DNS names or IP addresses), signed by this CA.
        pub fn leaf(&self, common_name: &str, names: &[&str]) -> Pem {
            let mut params =
                CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                    .expect("params");
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            let key = KeyPair::generate().expect("key");
            let cert = params.signed_by(&key, &self.issuer).expect("signed leaf");
            Pem {
                cert: cert.pem(),
                key: key.serialize_pem(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testpki::Ca;
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// One `poll_read` of `ra` into `out` (as rustls asks: 4 KiB), with a waker that does
    /// nothing: `Some(bytes read)` or `None` if it waits.
    fn poll_once<IO: AsyncRead + Unpin>(ra: &mut ReadAhead<IO>, out: &mut [u8]) -> Option<usize> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut rb = ReadBuf::new(out);
        match Pin::new(ra).poll_read(&mut cx, &mut rb) {
            Poll::Ready(r) => {
                r.unwrap();
                Some(rb.filled().len())
            }
            Poll::Pending => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_read_ahead_keeps_every_byte_in_order_and_lets_its_buffer_go_once_idle() {
        let (mut w, r) = tokio::io::duplex(1 << 20);
        let mut ra = tunnel_transport(r);
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        w.write_all(&data).await.unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while got.len() < data.len() {
            let n = poll_once(&mut ra, &mut chunk).expect("bytes are waiting");
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data, "every byte, in order");
        assert!(
            ra.busy && ra.buf.capacity() > 0,
            "a busy connection reads ahead"
        );
        // A read that waits within a second of the last big read keeps the buffer for reuse.
        assert_eq!(poll_once(&mut ra, &mut chunk), None);
        assert!(ra.buf.capacity() > 0);
        // Past that second, the waiting read lets it go.
        tokio::time::advance(crate::buffer::QUIET_AFTER).await;
        assert_eq!(poll_once(&mut ra, &mut chunk), None);
        assert_eq!(ra.buf.capacity(), 0, "an idle connection holds no buffer");
        assert!(!ra.busy);
        // A quiet connection reads straight into the caller's buffer, then sees the end.
        w.write_all(b"tail").await.unwrap();
        drop(w);
        assert_eq!(poll_once(&mut ra, &mut chunk), Some(4));
        assert_eq!(&chunk[..4], b"tail");
        assert_eq!(ra.buf.capacity(), 0);
        assert_eq!(poll_once(&mut ra, &mut chunk), Some(0), "the end");
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_connection_never_takes_a_read_ahead_buffer() {
        let (mut w, r) = tokio::io::duplex(1 << 20);
        let mut ra = tunnel_transport(r);
        let mut chunk = [0u8; 4096];
        for i in 0..100u8 {
            // Keepalive-sized reads, with waits between them.
            w.write_all(&[i; 30]).await.unwrap();
            assert_eq!(poll_once(&mut ra, &mut chunk), Some(30));
            assert_eq!(chunk[0], i);
            assert_eq!(poll_once(&mut ra, &mut chunk), None);
            assert_eq!(ra.buf.capacity(), 0);
        }
    }

    #[test]
    fn tunnels_negotiate_aes_128_gcm() {
        let ca = Ca::new("test CA");
        let server = ca.leaf("server", &["localhost"]);
        let agent = ca.leaf("agent", &["agent"]);
        let sc = server_config(
            server.cert.as_bytes(),
            server.key.as_bytes(),
            Some(ca.pem.cert.as_bytes()),
        )
        .unwrap();
        let cc = client_config(
            ca.pem.cert.as_bytes(),
            Some((agent.cert.as_bytes(), agent.key.as_bytes())),
        )
        .unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut client = rustls::ClientConnection::new(cc, name).unwrap();
        let mut server = rustls::ServerConnection::new(sc).unwrap();
        // Hand the handshake across in memory, a bounded number of flights.
        for _ in 0..10 {
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            server.read_tls(&mut &wire[..]).unwrap();
            server.process_new_packets().unwrap();
            let mut wire = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut wire).unwrap();
            }
            client.read_tls(&mut &wire[..]).unwrap();
            client.process_new_packets().unwrap();
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
        }
        assert!(!server.is_handshaking());
        let suite = server.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    }
}
