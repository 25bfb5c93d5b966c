//! Client authentication: HS256 JWTs carrying the user (`sub`), the device and an expiry.
//!
//! App backends mint these with any JWT library and the shared secret (PROTOCOL.md, "Tokens");
//! `tern-server token` mints them for development and tests.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tern_protocol::ErrorCode;
use tern_protocol::ids::validate_id;

/// File, inside the data directory, holding the generated secret.
pub const SECRET_FILE: &str = "jwt.secret";

/// Device id used when a token names none.
pub const DEFAULT_DEVICE: &str = "default";

/// Seconds of clock skew tolerated on `exp`: phones' clocks drift, servers' should not.
const LEEWAY_SECS: u64 = 30;

/// Claims of a tern token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// The device id; absent means [`DEFAULT_DEVICE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Issued at, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

/// Who a valid token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub device: String,
}

/// Why a token was refused. Each maps to one protocol error code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    #[error("no token presented")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

impl AuthError {
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::Missing => ErrorCode::Unauthenticated,
            AuthError::Expired => ErrorCode::TokenExpired,
            AuthError::Invalid(_) => ErrorCode::TokenInvalid,
        }
    }
}

/// Why the secret could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: secret is shorter than 32 bytes")]
    TooShort { path: std::path::PathBuf },
}

/// Signs and verifies tokens with one HS256 secret.
pub struct Authenticator {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authenticator { .. }")
    }
}

impl Authenticator {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// Uses `configured`, else the secret in `data_dir`, generating it on first use.
    pub fn load_or_generate(
        configured: Option<&str>,
        data_dir: &Path,
    ) -> Result<Self, SecretError> {
        if let Some(secret) = configured {
            return Ok(Self::new(secret.as_bytes()));
        }
        let path = data_dir.join(SECRET_FILE);
        let io = |source| SecretError::Io {
            path: path.clone(),
            source,
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let secret = text.trim();
                if secret.len() < 32 {
                    return Err(SecretError::TooShort { path });
                }
                Ok(Self::new(secret.as_bytes()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(data_dir).map_err(io)?;
                let secret = generate_secret_file(data_dir, &path).map_err(io)?;
                Ok(Self::new(secret.as_bytes()))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Mints a token for `user` on `device`, valid for `ttl`.
    pub fn mint(&self, user: &str, device: &str, ttl: Duration) -> Result<String, AuthError> {
        validate_id(user).map_err(|e| AuthError::Invalid(format!("user id: {e}")))?;
        validate_id(device).map_err(|e| AuthError::Invalid(format!("device id: {e}")))?;
        let now = unix_now();
        let claims = Claims {
            sub: user.to_owned(),
            device: Some(device.to_owned()),
            exp: now.saturating_add(ttl.as_secs()),
            iat: Some(now),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }

    /// Checks a token's signature, algorithm, expiry and ids.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(e.to_string()),
            })?;
        let claims = data.claims;
        let device = claims.device.unwrap_or_else(|| DEFAULT_DEVICE.to_owned());
        validate_id(&claims.sub).map_err(|e| AuthError::Invalid(format!("sub: {e}")))?;
        validate_id(&device).map_err(|e| AuthError::Invalid(format!("device: {e}")))?;
        Ok(Identity {
            user: claims.sub,
            device,
        })
    }
}

/// Writes a new random secret to `path` unless another process got there first, and returns
/// the secret in the file. The secret is written completely to a private temporary file, then
/// hard-linked into place: linking fails if `path` exists, so two processes starting at once
/// (a server and `tern-server token`) agree on one secret and never read a partial file.
pub(crate) fn generate_secret_file(dir: &Path, path: &Path) -> std::io::Result<String> {
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let secret: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let name = path
        .file_name()
        .map_or_else(|| SECRET_FILE.into(), |n| n.to_string_lossy());
    let tmp = dir.join(format!(
        "{name}.{}.{}.tmp",
        std::process::id(),
        &secret[..8]
    ));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp)?;
    file.write_all(secret.as_bytes())?;
    file.sync_all()?;
    drop(file);
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(secret),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(std::fs::read_to_string(path)?.trim().to_owned())
        }
        Err(e) => Err(e),
    }
}

/// The secret in `dir/name`, generated on first use (64 hex characters).
pub fn load_or_create_secret(dir: &Path, name: &str) -> std::io::Result<String> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)?;
            generate_secret_file(dir, &path)
        }
        Err(e) => Err(e),
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify() {
        let auth = Authenticator::new(&[7u8; 32]);
        let token = auth
            .mint("alice", "phone", Duration::from_secs(60))
            .unwrap();
        let id = auth.verify(&token).unwrap();
        assert_eq!(
            id,
            Identity {
                user: "alice".into(),
                device: "phone".into()
            }
        );
    }

    #[test]
    fn refusals_are_typed() {
        let auth = Authenticator::new(&[7u8; 32]);
        let other = Authenticator::new(&[8u8; 32]);
        let token = other
            .mint("alice", "phone", Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            auth.verify(&token).unwrap_err().code(),
            ErrorCode::TokenInvalid
        );
        assert_eq!(
            auth.verify("").unwrap_err().code(),
            ErrorCode::Unauthenticated
        );
        assert_eq!(
            auth.verify("not.a.jwt").unwrap_err().code(),
            ErrorCode::TokenInvalid
        );
        let claims = Claims {
            sub: "alice".into(),
            device: None,
            exp: unix_now() - 3600,
            iat: None,
        };
        let expired =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &auth.encoding).unwrap();
        assert_eq!(
            auth.verify(&expired).unwrap_err().code(),
            ErrorCode::TokenExpired
        );
    }

    #[test]
    fn concurrent_first_starts_agree_on_one_secret() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().to_owned();
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let path = path.clone();
                    std::thread::spawn(move || {
                        Authenticator::load_or_generate(None, &path).unwrap()
                    })
                })
                .collect();
            let auths: Vec<Authenticator> =
                threads.into_iter().map(|t| t.join().unwrap()).collect();
            let token = auths[0]
                .mint("alice", "phone", Duration::from_secs(60))
                .unwrap();
            for auth in &auths {
                assert_eq!(auth.verify(&token).unwrap().user, "alice");
            }
        }
    }

    #[test]
    fn secret_is_generated_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authenticator::load_or_generate(None, dir.path()).unwrap();
        let b = Authenticator::load_or_generate(None, dir.path()).unwrap();
        let token = a
            .mint("bob", DEFAULT_DEVICE, Duration::from_secs(60))
            .unwrap();
        assert_eq!(b.verify(&token).unwrap().user, "bob");
    }
}
