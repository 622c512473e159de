//! rustls configurations from PEM (files or bytes), with the aws-lc-rs provider.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The crypto provider tether uses everywhere.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
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

/// A throwaway CA and certificates, for tests and the quickstart (rcgen).
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
