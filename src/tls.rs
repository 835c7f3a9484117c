//! TLS material and rustls configurations, shared by the peer port and the client port.
//!
//! Why one module: both ports load PEM files given on the command line and build rustls
//! configurations from them, and both must fail the same way — before anything is touched,
//! with an error that names the file. Only the `ring` crypto provider is used (no cmake or
//! aws-lc build). Every file read is capped at [`PEM_FILE_BYTES_MAX`]: a path given by an
//! operator can still point at something huge or endless (`/dev/zero`).
//!
//! [`generate_dev_pki`] writes a throwaway CA and one certificate per node, for local
//! clusters (`raftkv cluster up --tls`) and tests; production clusters bring their own.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The largest PEM file read.
pub const PEM_FILE_BYTES_MAX: u64 = 1 << 20;

/// Why TLS material could not be loaded, built or generated.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is larger than {max} bytes; is it a PEM file?", max = PEM_FILE_BYTES_MAX)]
    TooLarge { path: PathBuf },
    #[error("{path} is not valid PEM: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{path} holds no certificate")]
    NoCertificates { path: PathBuf },
    #[error("{path}: unusable CA certificate: {source}")]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("cannot verify client certificates against {path}: {reason}")]
    Verifier { path: PathBuf, reason: String },
    #[error("certificate {cert} with key {key} is unusable: {source}")]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
    #[error("cannot generate certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Installs ring as the process's rustls provider (once; later calls do nothing), so every
/// rustls user in the process — reqwest included, built without a provider of its own —
/// finds one.
pub fn ensure_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read_capped(path: &Path) -> Result<Vec<u8>, TlsError> {
    use crate::small_file::{read_capped, SmallFileError};
    read_capped(path, PEM_FILE_BYTES_MAX).map_err(|e| match e {
        SmallFileError::Io(source) => TlsError::Read {
            path: path.to_path_buf(),
            source,
        },
        SmallFileError::TooLarge(_) => TlsError::TooLarge {
            path: path.to_path_buf(),
        },
    })
}

/// Every certificate in a PEM file (a chain: leaf first); at least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_capped(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_capped(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: ca.to_path_buf(),
            source,
        })?;
    }
    Ok(Arc::new(roots))
}

/// A server configuration presenting `cert` (with `key`); with `client_ca`, every client
/// must present a certificate signed by that CA.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = load_certs(cert)?;
    let private_key = load_private_key(key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(load_roots(ca)?, provider())
                .build()
                .map_err(|e| TlsError::Verifier {
                    path: ca.to_path_buf(),
                    reason: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, private_key)
        .map_err(|source| TlsError::Identity {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            source,
        })?;
    Ok(Arc::new(config))
}

/// A client configuration trusting only the CA in `ca`; with `identity` (cert, key), it
/// presents that certificate to servers that ask for one.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = load_roots(ca)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_private_key(key)?)
            .map_err(|source| TlsError::Identity {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                source,
            })?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// A client configuration that trusts no CA at all: for an HTTP client on a system without CA
/// certificates (a `FROM scratch` container) that was given none. `http://` servers work;
/// every `https://` server is refused (unknown issuer) — the safe way to have no roots.
pub fn client_config_trusting_nothing() -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_root_certificates(Arc::new(RootCertStore::empty()))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Builds an HTTP client with the system's CA certificates, or — when `configure(builder)`
/// cannot be built because the system has none (a `FROM scratch` container) — with
/// [`client_config_trusting_nothing`]. Returns the client and whether it fell back. For clients
/// that were given no CA file of their own.
pub fn http_client_with_system_roots(
    configure: impl Fn(reqwest::ClientBuilder) -> reqwest::ClientBuilder,
) -> Result<(reqwest::Client, bool), reqwest::Error> {
    ensure_provider();
    let system = configure(reqwest::Client::builder()).build();
    let Err(no_roots) = system else {
        return system.map(|c| (c, false));
    };
    let Ok(nothing) = client_config_trusting_nothing() else {
        return Err(no_roots);
    };
    configure(reqwest::Client::builder())
        .tls_backend_preconfigured((*nothing).clone())
        .build()
        .map(|c| (c, true))
}

/// An HTTP client that trusts the CA in `ca_file`, or without one the system's CAs (none in a
/// `FROM scratch` container: see [`http_client_with_system_roots`]); `configure` sets the
/// caller's timeouts and headers. The one place the CLI client and the rejoining node choose
/// their roots.
pub fn http_client(
    ca_file: Option<&Path>,
    configure: impl Fn(reqwest::ClientBuilder) -> reqwest::ClientBuilder,
) -> Result<reqwest::Client, HttpClientError> {
    let built = match ca_file {
        Some(ca) => {
            let tls = client_config(ca, None)?;
            configure(reqwest::Client::builder())
                .tls_backend_preconfigured((*tls).clone())
                .build()
        }
        None => http_client_with_system_roots(configure).map(|(client, _)| client),
    };
    Ok(built?)
}

/// Why [`http_client`] could not build a client.
#[derive(Debug, thiserror::Error)]
pub enum HttpClientError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Build(#[from] reqwest::Error),
}

/// Files written by [`generate_dev_pki`].
#[derive(Clone, Debug)]
pub struct DevPki {
    /// The CA certificate (`ca.pem`); its key is not kept.
    pub ca_cert: PathBuf,
    /// Each node's certificate and key (`node<ID>.pem`, `node<ID>-key.pem`, mode 600).
    pub nodes: BTreeMap<u64, DevIdentity>,
}

/// One node's certificate and key files.
#[derive(Clone, Debug)]
pub struct DevIdentity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Writes a fresh CA and, per node, a certificate it signed, valid for `hosts` (IP addresses
/// or DNS names) as server and as client, into `dir` (created if missing). For local
/// clusters and tests only: the CA key is discarded, so nodes cannot be added later.
pub fn generate_dev_pki(dir: &Path, node_ids: &[u64], hosts: &[&str]) -> Result<DevPki, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "raftkv development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key)?;
    let ca_cert = dir.join("ca.pem");
    write_file(&ca_cert, ca.pem().as_bytes(), 0o644)?;
    let names: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    let mut nodes = BTreeMap::new();
    for &id in node_ids {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.clone())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("raftkv node {id}"));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        let identity = DevIdentity {
            cert: dir.join(format!("node{id}.pem")),
            key: dir.join(format!("node{id}-key.pem")),
        };
        write_file(&identity.cert, cert.pem().as_bytes(), 0o644)?;
        write_file(&identity.key, key.serialize_pem().as_bytes(), 0o600)?;
        nodes.insert(id, identity);
    }
    Ok(DevPki { ca_cert, nodes })
}

/// Writes `bytes` to `path` (replacing it), created with `mode` on Unix.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let write_err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(write_err)?;
    file.write_all(bytes).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_pki_loads_into_server_and_client_configs() {
        let dir = tempfile::tempdir().unwrap();
        let pki = generate_dev_pki(dir.path(), &[1, 2], &["127.0.0.1", "localhost"]).unwrap();
        assert_eq!(pki.nodes.len(), 2);
        assert_eq!(load_certs(&pki.ca_cert).unwrap().len(), 1);
        for id in [1, 2] {
            let n = &pki.nodes[&id];
            assert_eq!(load_certs(&n.cert).unwrap().len(), 1);
            load_private_key(&n.key).unwrap();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&n.key).unwrap().permissions().mode();
                assert_eq!(mode & 0o077, 0, "keys are private");
            }
            server_config(&n.cert, &n.key, Some(&pki.ca_cert)).unwrap();
            server_config(&n.cert, &n.key, None).unwrap();
            client_config(&pki.ca_cert, Some((&n.cert, &n.key))).unwrap();
        }
        client_config(&pki.ca_cert, None).unwrap();
        // A certificate with another node's key is refused, naming both files.
        let err = server_config(&pki.nodes[&1].cert, &pki.nodes[&2].key, None).unwrap_err();
        assert!(matches!(err, TlsError::Identity { .. }), "{err}");
    }

    #[test]
    fn bad_files_are_refused_with_their_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = load_certs(&missing).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no pem here\n").unwrap();
        let err = load_certs(&empty).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificates { .. }), "{err}");
        let err = load_private_key(&empty).unwrap_err();
        assert!(err.to_string().contains("empty.pem"), "{err}");
        let big = dir.path().join("big.pem");
        std::fs::write(&big, vec![b'x'; PEM_FILE_BYTES_MAX as usize + 1]).unwrap();
        let err = load_certs(&big).unwrap_err();
        assert!(matches!(err, TlsError::TooLarge { .. }), "{err}");
    }
}
