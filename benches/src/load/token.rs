//! Mints login tokens the way `tern-gateway token` does (docs/PROTOCOL.md, "Tokens"), from the
//! gateway's `<data-dir>/secret`, so a run with thousands of users spawns no processes.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The gateway's signing secret.
pub struct Minter {
    secret: Vec<u8>,
    exp: u64,
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Minter(..)")
    }
}

impl Minter {
    /// Reads `<data_dir>/secret` (trimmed, as the gateway does). Tokens live for a day.
    pub fn from_data_dir(data_dir: &Path) -> Result<Minter, String> {
        let path = data_dir.join("secret");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "cannot read {}: {e} (start the gateway once with this --data-dir)",
                path.display()
            )
        })?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok(Minter {
            secret: text.trim().as_bytes().to_vec(),
            exp: now + 24 * 3600,
        })
    }

    /// A token for `user`. User ids made by the generator are ASCII letters, digits and `-`, so
    /// the JSON needs no escaping.
    pub fn mint(&self, user: &str) -> String {
        debug_assert!(user.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        let payload = format!(r#"{{"v":1,"sub":"{user}","exp":{}}}"#, self.exp);
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes any key length");
        mac.update(payload.as_bytes());
        let sig = mac.finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(sig)
        )
    }
}
