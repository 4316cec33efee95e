//! Login tokens: `base64url(payload) "." base64url(HMAC-SHA256(secret, payload))`, where the
//! payload is the JSON object `{"v":1,"sub":"<user>","exp":<unix seconds>,"dev":"<device>"?}`.
//! Byte-exact description in docs/PROTOCOL.md ("Tokens").

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tern_protocol::ErrorCode;

type HmacSha256 = Hmac<Sha256>;

/// The server secret that signs tokens. Never logged.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// The secret's text (for comparing an API request's bearer secret).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn new(bytes: impl Into<Vec<u8>>) -> Secret {
        Secret(bytes.into())
    }

    /// Reads `<data_dir>/secret`, creating it with 32 random bytes (hex) on first start.
    ///
    /// Creation is atomic and race-free: the secret is written to a private temporary file and
    /// hard-linked into place, so when the server and `tern-gateway token` start at the same
    /// moment, both end up with the one secret that won.
    pub fn load_or_create(data_dir: &Path) -> std::io::Result<Secret> {
        Secret::load_or_create_named(data_dir, "secret")
    }

    /// [`Secret::load_or_create`] for the file `<data_dir>/<name>` (the admin API's secret is
    /// `api_secret`).
    pub fn load_or_create_named(data_dir: &Path, name: &str) -> std::io::Result<Secret> {
        let path = data_dir.join(name);
        match read_secret(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => return other,
        }
        std::fs::create_dir_all(data_dir)?;
        let bytes: [u8; 32] = rand::random();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let tmp = data_dir.join(format!(
            ".{name}.{}.{:016x}.tmp",
            std::process::id(),
            rand::random::<u64>()
        ));
        write_private(&tmp, hex.as_bytes())?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(Secret(hex.into_bytes())),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_secret(&path),
            Err(e) => Err(e),
        }
    }
}

fn read_secret(path: &Path) -> std::io::Result<Secret> {
    let s = std::fs::read_to_string(path)?;
    let s = s.trim();
    if s.len() < 32 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} holds fewer than 32 characters", path.display()),
        ));
    }
    Ok(Secret(s.as_bytes().to_vec()))
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub v: u32,
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
    /// When it was issued (ms since the epoch; 0 for tokens minted before this claim existed).
    /// A revocation of the user's tokens refuses every token issued at or before it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub iat_ms: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token signature is wrong")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token version {0} is not supported")]
    Version(u32),
    #[error("token user id is not valid")]
    BadUser,
}

impl TokenError {
    pub fn code(&self) -> ErrorCode {
        match self {
            TokenError::Expired => ErrorCode::TokenExpired,
            _ => ErrorCode::TokenInvalid,
        }
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A valid user or device id: 1..=64 bytes of UTF-8 without control characters.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && !id.chars().any(char::is_control)
}

pub fn mint(secret: &Secret, claims: &Claims) -> String {
    let payload = serde_json::to_vec(claims).expect("claims serialize");
    let mut mac = HmacSha256::new_from_slice(&secret.0).expect("hmac accepts any key length");
    mac.update(&payload);
    let sig = mac.finalize().into_bytes();
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(&payload),
        URL_SAFE_NO_PAD.encode(sig)
    )
}

/// Checks signature first (constant time), then version, user id and expiry against `now`.
pub fn verify(secret: &Secret, token: &str, now: u64) -> Result<Claims, TokenError> {
    let (p, s) = token.split_once('.').ok_or(TokenError::Malformed)?;
    let payload = URL_SAFE_NO_PAD
        .decode(p)
        .map_err(|_| TokenError::Malformed)?;
    let sig = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| TokenError::Malformed)?;
    let mut mac = HmacSha256::new_from_slice(&secret.0).expect("hmac accepts any key length");
    mac.update(&payload);
    mac.verify_slice(&sig)
        .map_err(|_| TokenError::BadSignature)?;
    let claims: Claims = serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed)?;
    if claims.v != 1 {
        return Err(TokenError::Version(claims.v));
    }
    if !valid_id(&claims.sub) {
        return Err(TokenError::BadUser);
    }
    if claims.exp <= now {
        return Err(TokenError::Expired);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            v: 1,
            sub: "alice".into(),
            exp,
            dev: None,
            iat_ms: 0,
        }
    }

    #[test]
    fn round_trip() {
        let s = Secret::new(b"0123456789abcdef0123456789abcdef".to_vec());
        let t = mint(&s, &claims(2000));
        assert_eq!(verify(&s, &t, 1999).unwrap(), claims(2000));
    }

    #[test]
    fn expired_and_wrong_secret_and_garbage() {
        let s = Secret::new(b"0123456789abcdef0123456789abcdef".to_vec());
        let other = Secret::new(b"X123456789abcdef0123456789abcdef".to_vec());
        let t = mint(&s, &claims(2000));
        assert_eq!(verify(&s, &t, 2000), Err(TokenError::Expired));
        assert_eq!(verify(&other, &t, 1), Err(TokenError::BadSignature));
        assert_eq!(verify(&s, "nodot", 1), Err(TokenError::Malformed));
        assert_eq!(verify(&s, "a.b", 1), Err(TokenError::Malformed));
        assert_eq!(verify(&s, "YWJj.AAAA", 1), Err(TokenError::BadSignature));
        // A tampered payload with the old signature fails the signature check.
        let (_, sig) = t.split_once('.').unwrap();
        let forged = mint(&other, &claims(9999));
        let (p2, _) = forged.split_once('.').unwrap();
        assert_eq!(
            verify(&s, &format!("{p2}.{sig}"), 1),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn secret_is_created_once_and_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let a = Secret::load_or_create(dir.path()).unwrap();
        let b = Secret::load_or_create(dir.path()).unwrap();
        assert_eq!(a.0, b.0);
        assert_eq!(a.0.len(), 64);
        // Racing creators agree on one secret.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let p = path.clone();
                std::thread::spawn(move || Secret::load_or_create(&p).unwrap().0)
            })
            .collect();
        let all: Vec<Vec<u8>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(all.iter().all(|s| s == &all[0]));
        let leftovers = std::fs::read_dir(&path).unwrap().count();
        assert_eq!(leftovers, 1, "only the secret file remains");
    }
}
