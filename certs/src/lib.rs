//! Development certificates for tern: a private CA and a server certificate it signs.
//!
//! These are for development and tests only. The CA key is generated on the machine and never
//! leaves it; production servers take real certificates with `--cert` and `--key`.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// Names the generated server certificate is valid for.
pub const DEV_SERVER_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// File names inside the certificate directory.
pub const CA_FILE: &str = "ca.pem";
pub const CERT_FILE: &str = "server.pem";
pub const KEY_FILE: &str = "server.key";

/// Why certificates could not be generated, read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{dir}: has some but not all of ca.pem, server.pem and server.key; remove them to regenerate"
    )]
    Partial { dir: PathBuf },
}

/// A development CA and a server certificate signed by it, all PEM.
#[derive(Debug, Clone)]
pub struct DevCerts {
    /// The CA certificate clients trust.
    pub ca_pem: String,
    /// The server certificate followed by the CA (the chain the server presents).
    pub chain_pem: String,
    /// The server's private key (PKCS#8).
    pub key_pem: String,
}

/// Paths of the certificate files in a directory.
#[derive(Debug, Clone)]
pub struct CertPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertPaths {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca: dir.join(CA_FILE),
            cert: dir.join(CERT_FILE),
            key: dir.join(KEY_FILE),
        }
    }
}

/// Generates a fresh CA and a server certificate for `names` (DNS names or IP addresses).
pub fn generate(names: &[&str]) -> Result<DevCerts, CertError> {
    let now = OffsetDateTime::now_utc();

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    // A subject distinct from the server's: with rcgen's default name both would be
    // "rcgen self signed cert", and strict verifiers (OpenSSL) then take the leaf for the root.
    ca_params.distinguished_name = name("tern development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = now - Duration::days(1);
    ca_params.not_after = now + Duration::days(3650);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate()?;
    let owned: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut params = CertificateParams::new(owned)?;
    params.distinguished_name = name("tern development server");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - Duration::days(1);
    // Within the 825-day ceiling Apple platforms enforce on server certificates.
    params.not_after = now + Duration::days(820);
    let server_cert = params.signed_by(&server_key, &issuer)?;

    Ok(DevCerts {
        ca_pem: ca_cert.pem(),
        chain_pem: format!("{}{}", server_cert.pem(), ca_cert.pem()),
        key_pem: server_key.serialize_pem(),
    })
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "tern development");
    dn
}

/// Uses the certificates in `dir`, generating them on first use.
///
/// Returns the paths and whether they were generated now.
pub fn load_or_generate(dir: &Path) -> Result<(CertPaths, bool), CertError> {
    let paths = CertPaths::in_dir(dir);
    let present = [&paths.ca, &paths.cert, &paths.key]
        .iter()
        .filter(|p| p.exists())
        .count();
    match present {
        3 => return Ok((paths, false)),
        0 => {}
        _ => {
            return Err(CertError::Partial {
                dir: dir.to_owned(),
            });
        }
    }
    let certs = generate(&DEV_SERVER_NAMES)?;
    fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_owned(),
        source,
    })?;
    write_file(&paths.key, &certs.key_pem, true)?;
    write_file(&paths.cert, &certs.chain_pem, false)?;
    // Written last: its presence means the set is complete.
    write_file(&paths.ca, &certs.ca_pem, false)?;
    Ok((paths, true))
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    let io = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, generated) = load_or_generate(dir.path()).unwrap();
        assert!(generated);
        let first = fs::read_to_string(&paths.ca).unwrap();
        let (_, generated) = load_or_generate(dir.path()).unwrap();
        assert!(!generated);
        assert_eq!(fs::read_to_string(&paths.ca).unwrap(), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&paths.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn partial_sets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(CA_FILE), "x").unwrap();
        assert!(matches!(
            load_or_generate(dir.path()),
            Err(CertError::Partial { .. })
        ));
    }
}
