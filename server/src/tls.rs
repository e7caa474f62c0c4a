//! Certificates: load a PEM chain and key, or create (once) and reuse a development certificate —
//! a self-signed leaf for `localhost` and `127.0.0.1` written under the working directory so bots
//! started from the same directory trust it with no flags.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct CertKey {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
}

/// File name of the development certificate inside the dev-cert directory.
pub const DEV_CERT_FILE: &str = "cert.pem";
/// File name of the development key inside the dev-cert directory.
pub const DEV_KEY_FILE: &str = "key.pem";

/// Reads a PEM certificate chain and private key. Errors name the file at fault.
pub fn load_pem(cert: &Path, key: &Path) -> anyhow::Result<CertKey> {
    let cert_bytes = std::fs::read(cert)
        .with_context(|| format!("cannot read certificate file {}", cert.display()))?;
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_bytes.as_slice())
        .collect::<Result<_, _>>()
        .with_context(|| format!("certificate file {} is not valid PEM", cert.display()))?;
    if chain.is_empty() {
        bail!("certificate file {} holds no certificate", cert.display());
    }
    let key_bytes =
        std::fs::read(key).with_context(|| format!("cannot read key file {}", key.display()))?;
    let key_der = rustls_pemfile::private_key(&mut key_bytes.as_slice())
        .with_context(|| format!("key file {} is not valid PEM", key.display()))?
        .with_context(|| format!("key file {} holds no private key", key.display()))?;
    // Check the pair now, so a mismatch is reported with both file names.
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key_der.clone_key())
        .map_err(|e| {
            anyhow::anyhow!(
                "key file {} is not a usable private key: {e}",
                key.display()
            )
        })?;
    rustls::sign::CertifiedKey::new(chain.clone(), signing)
        .keys_match()
        .map_err(|e| {
            anyhow::anyhow!(
                "key file {} does not match certificate file {}: {e}",
                key.display(),
                cert.display()
            )
        })?;
    Ok(CertKey {
        chain,
        key: key_der,
    })
}

/// Paths of the development certificate and key under `dir`.
#[must_use]
pub fn dev_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join(DEV_CERT_FILE), dir.join(DEV_KEY_FILE))
}

/// Loads the development certificate from `dir`, generating it first if it is not there.
pub fn load_or_create_dev_cert(dir: &Path) -> anyhow::Result<CertKey> {
    let (cert, key) = dev_paths(dir);
    if cert.exists() && key.exists() {
        return load_pem(&cert, &key);
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create certificate directory {}", dir.display()))?;
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .context("cannot generate a development certificate")?;
    std::fs::write(&key, ck.signing_key.serialize_pem())
        .with_context(|| format!("cannot write {}", key.display()))?;
    std::fs::write(&cert, ck.cert.pem())
        .with_context(|| format!("cannot write {}", cert.display()))?;
    tracing::info!(
        "wrote a development certificate to {} (trusted by bots started here)",
        cert.display()
    );
    load_pem(&cert, &key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_cert_is_created_once_then_reused() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = std::env::temp_dir().join(format!("qt-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = load_or_create_dev_cert(&dir).unwrap_or_else(|e| panic!("{e:#}"));
        let b = load_or_create_dev_cert(&dir).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(a.chain, b.chain);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_naming_both_files() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let a = std::env::temp_dir().join(format!("qt-tls-a-{}", std::process::id()));
        let b = std::env::temp_dir().join(format!("qt-tls-b-{}", std::process::id()));
        let _ = (std::fs::remove_dir_all(&a), std::fs::remove_dir_all(&b));
        let _ = load_or_create_dev_cert(&a);
        let _ = load_or_create_dev_cert(&b);
        let e = load_pem(&dev_paths(&a).0, &dev_paths(&b).1)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(
            e.contains("does not match") && e.contains("qt-tls-a") && e.contains("qt-tls-b"),
            "{e}"
        );
        let _ = (std::fs::remove_dir_all(&a), std::fs::remove_dir_all(&b));
    }

    #[test]
    fn bad_files_name_themselves() {
        let dir = std::env::temp_dir().join(format!("qt-tls-bad-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let c = dir.join("c.pem");
        let _ = std::fs::write(&c, "not pem");
        let e = load_pem(&c, &dir.join("k.pem"))
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(e.contains("c.pem"), "{e}");
        let e = load_pem(&dir.join("missing.pem"), &c)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(e.contains("missing.pem"), "{e}");
    }
}
