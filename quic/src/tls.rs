//! TLS material for QUIC and for TLS over TCP: the server's certificate chain and key, the
//! rustls and quinn-proto server configurations built from them, and a client configuration that
//! trusts one certificate (for tests and development clients).
//!
//! Every configuration uses rustls' `ring` provider explicitly, so it does not matter whether
//! another crate in the process also enables `aws-lc-rs`. Every configuration offers one ALPN
//! protocol, [`ALPN`]; a peer that offers none of ours fails the handshake.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The ALPN protocol id of the Tern protocol, offered by servers and clients alike.
pub const ALPN: &[u8] = b"tern/1";

/// File name of the development certificate inside `<data_dir>/tls/`.
pub const CERT_FILE: &str = "cert.pem";
/// File name of the development private key inside `<data_dir>/tls/`.
pub const KEY_FILE: &str = "key.pem";

/// Names the development certificate is valid for.
const DEV_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Why TLS material could not be loaded, generated or turned into a configuration. Each variant
/// names the file it is about.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(
        "{present} exists but {missing} does not; restore it, or remove {present} to generate \
         a new self-signed pair"
    )]
    Incomplete { present: PathBuf, missing: PathBuf },
    #[error("certificate {cert} and key {key} do not belong together: {message}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
}

/// A certificate chain (end-entity first) and its private key, checked to belong together.
pub struct TlsIdentity {
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_path: PathBuf,
    generated: bool,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("TlsIdentity")
            .field("certificates", &self.cert_chain.len())
            .field("cert_path", &self.cert_path)
            .field("generated", &self.generated)
            .finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// The certificate chain, end-entity certificate first.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.cert_chain
    }

    /// The file the certificate chain came from (or was written to).
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// Whether [`load_or_generate`] created this identity just now (worth a log line: clients
    /// must be given the new certificate).
    pub fn generated(&self) -> bool {
        self.generated
    }
}

/// The crypto provider every configuration here is built with.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads a PEM certificate chain and a PEM private key (PKCS#8, PKCS#1 or SEC1) and checks that
/// the key belongs to the first certificate.
pub fn load(cert_path: &Path, key_path: &Path) -> Result<TlsIdentity, TlsError> {
    let cert_chain = read_certs(cert_path)?;
    let key_pem = read(key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Invalid {
        path: key_path.to_owned(),
        message: format!("no usable PEM private key ({e})"),
    })?;
    let provider = provider();
    // Parse the key on its own first so that a corrupt key is reported against the key file.
    provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError::Invalid {
            path: key_path.to_owned(),
            message: format!("not a usable private key ({e})"),
        })?;
    rustls::sign::CertifiedKey::from_der(cert_chain.clone(), key.clone_key(), &provider).map_err(
        |e| TlsError::Mismatch {
            cert: cert_path.to_owned(),
            key: key_path.to_owned(),
            message: e.to_string(),
        },
    )?;
    Ok(TlsIdentity {
        cert_chain,
        key,
        cert_path: cert_path.to_owned(),
        generated: false,
    })
}

/// The paths `load_or_generate` uses: `<data_dir>/tls/cert.pem` and `<data_dir>/tls/key.pem`.
pub fn dev_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = data_dir.join("tls");
    (dir.join(CERT_FILE), dir.join(KEY_FILE))
}

/// For development: loads `<data_dir>/tls/cert.pem` and `<data_dir>/tls/key.pem` if both
/// exist; if neither exists, generates a self-signed certificate for `localhost`, `127.0.0.1`
/// and `::1`, writes both files (the key with mode 0600, the directory 0700) and returns it.
///
/// If only one of the two exists this is an error rather than a silent overwrite: the other
/// may be a real key someone put there.
pub fn load_or_generate(data_dir: &Path) -> Result<TlsIdentity, TlsError> {
    let (cert_path, key_path) = dev_paths(data_dir);
    match (exists(&cert_path)?, exists(&key_path)?) {
        (true, true) => return load(&cert_path, &key_path),
        (true, false) => {
            return Err(TlsError::Incomplete {
                present: cert_path,
                missing: key_path,
            });
        }
        (false, true) => {
            return Err(TlsError::Incomplete {
                present: key_path,
                missing: cert_path,
            });
        }
        (false, false) => {}
    }
    let names: Vec<String> = DEV_NAMES.iter().map(|s| s.to_string()).collect();
    let generated =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    let dir = cert_path.parent().unwrap_or(data_dir);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| TlsError::Write {
            path: dir.to_owned(),
            source,
        })?;
    // Key first: a crash between the two writes leaves a key without a certificate, which the
    // next start reports instead of silently replacing.
    write_atomically(
        &key_path,
        generated.signing_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_atomically(&cert_path, generated.cert.pem().as_bytes(), 0o644)?;
    let mut identity = load(&cert_path, &key_path)?;
    identity.generated = true;
    Ok(identity)
}

/// A self-signed identity for `localhost`, `127.0.0.1` and `::1` that is never written to
/// disk (for tests and fuzzing).
pub fn generate_in_memory() -> Result<TlsIdentity, TlsError> {
    let names: Vec<String> = DEV_NAMES.iter().map(|s| s.to_string()).collect();
    let generated =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    Ok(TlsIdentity {
        cert_chain: vec![generated.cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into()),
        cert_path: PathBuf::new(),
        generated: true,
    })
}

/// A rustls server configuration for TLS over TCP: TLS 1.2 and 1.3, ALPN `tern/1`, no client
/// certificates.
pub fn server_config(identity: &TlsIdentity) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// A quinn-proto server configuration: TLS 1.3 (as QUIC requires), ALPN `tern/1`, no 0-RTT, and
/// quinn-proto's default transport parameters. Adjust the transport with
/// [`quinn_proto::ServerConfig::transport_config`] before handing it to
/// [`QuicSetup`](crate::QuicSetup).
pub fn quic_server_config(identity: &TlsIdentity) -> Result<quinn_proto::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn_proto::crypto::rustls::QuicServerConfig::try_from(Arc::new(config))
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(quinn_proto::ServerConfig::with_crypto(Arc::new(crypto)))
}

/// A rustls client configuration with ALPN `tern/1` that trusts exactly the certificates in
/// the PEM file at `cert_path` (typically the self-signed development certificate). Usable by
/// a quinn client (`quinn::crypto::rustls::QuicClientConfig::try_from`) and by TLS over TCP.
pub fn client_config_trusting(cert_path: &Path) -> Result<rustls::ClientConfig, TlsError> {
    let certs = read_certs(cert_path)?;
    client_config_trusting_der(&certs).map_err(|e| match e {
        TlsError::Config(message) => TlsError::Invalid {
            path: cert_path.to_owned(),
            message,
        },
        other => other,
    })
}

/// Like [`client_config_trusting`], from DER certificates already in memory.
pub fn client_config_trusting_der(
    certs: &[CertificateDer<'static>],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert.clone())
            .map_err(|e| TlsError::Config(format!("cannot trust certificate: {e}")))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.to_owned(),
            message: format!("not a PEM certificate chain ({e})"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Invalid {
            path: path.to_owned(),
            message: "no PEM certificate in the file".into(),
        });
    }
    Ok(certs)
}

fn exists(path: &Path) -> Result<bool, TlsError> {
    path.try_exists().map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Writes `bytes` to a temporary file beside `path` with `mode`, syncs it, then renames it over
/// `path`, so a reader never sees half a key.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let err = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    // The umask may have narrowed `mode`; widening is not wanted either, so set it exactly.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_then_loads_the_same_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_generate(dir.path()).unwrap();
        assert!(first.generated());
        let (cert_path, key_path) = dev_paths(dir.path());
        assert_eq!(cert_path, dir.path().join("tls").join("cert.pem"));
        assert_eq!(key_path, dir.path().join("tls").join("key.pem"));
        let mode = fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = fs::metadata(dir.path().join("tls"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);

        let second = load_or_generate(dir.path()).unwrap();
        assert!(!second.generated());
        assert_eq!(first.cert_chain(), second.cert_chain());
        assert_eq!(first.cert_chain().len(), 1);
        assert_eq!(first.key.secret_der(), second.key.secret_der());
        // No temporary files left behind.
        let mut names: Vec<_> = fs::read_dir(dir.path().join("tls"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["cert.pem", "key.pem"]);

        // Every configuration builds from it.
        server_config(&second).unwrap();
        quic_server_config(&second).unwrap();
        let client = client_config_trusting(&cert_path).unwrap();
        assert_eq!(client.alpn_protocols, vec![b"tern/1".to_vec()]);
    }

    #[test]
    fn corrupt_key_names_the_key_file() {
        let dir = tempfile::tempdir().unwrap();
        load_or_generate(dir.path()).unwrap();
        let (_, key_path) = dev_paths(dir.path());
        // Valid PEM framing, garbage inside.
        fs::write(
            &key_path,
            "-----BEGIN PRIVATE KEY-----\nAAAAAAAAAAAAAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = load_or_generate(dir.path()).unwrap_err();
        assert!(
            matches!(&err, TlsError::Invalid { path, .. } if *path == key_path),
            "{err:?}"
        );
        assert!(err.to_string().contains(&*key_path.to_string_lossy()));

        // Not PEM at all.
        fs::write(&key_path, "this is not a key").unwrap();
        let err = load_or_generate(dir.path()).unwrap_err();
        assert!(
            matches!(&err, TlsError::Invalid { path, .. } if *path == key_path),
            "{err:?}"
        );
    }

    #[test]
    fn corrupt_certificate_names_the_certificate_file() {
        let dir = tempfile::tempdir().unwrap();
        load_or_generate(dir.path()).unwrap();
        let (cert_path, _) = dev_paths(dir.path());
        fs::write(&cert_path, "garbage").unwrap();
        let err = load_or_generate(dir.path()).unwrap_err();
        assert!(
            matches!(&err, TlsError::Invalid { path, .. } if *path == cert_path),
            "{err:?}"
        );
    }

    #[test]
    fn key_of_another_certificate_is_a_mismatch() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        load_or_generate(a.path()).unwrap();
        load_or_generate(b.path()).unwrap();
        let (cert_a, _) = dev_paths(a.path());
        let (_, key_b) = dev_paths(b.path());
        let err = load(&cert_a, &key_b).unwrap_err();
        assert!(matches!(err, TlsError::Mismatch { .. }), "{err:?}");
    }

    #[test]
    fn one_file_missing_is_reported_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        load_or_generate(dir.path()).unwrap();
        let (cert_path, key_path) = dev_paths(dir.path());
        let key_before = fs::read(&key_path).unwrap();
        fs::remove_file(&cert_path).unwrap();
        let err = load_or_generate(dir.path()).unwrap_err();
        assert!(
            matches!(&err, TlsError::Incomplete { present, missing }
                if *present == key_path && *missing == cert_path),
            "{err:?}"
        );
        assert_eq!(fs::read(&key_path).unwrap(), key_before);
    }
}
