//! Connect tokens (netcode.io-style): a player id, name, expiry and nonce, signed with HMAC-SHA256
//! under the server's secret. `quicktick-server token` issues them; with `auth = "required"` the server
//! admits only valid, unexpired, unused ones. Pure functions of their inputs (time is passed in).
//!
//! Format: `qt1.<hex body>.<hex tag>`, body = player_id u64 LE ‖ expires_unix u64 LE ‖ nonce 16 B ‖
//! name UTF-8; tag = HMAC-SHA256(secret, body).

use std::collections::HashMap;

use quicktick_shared::wire::{valid_name, RefuseReason};
use ring::hmac;

/// Token prefix (format version).
pub const PREFIX: &str = "qt1.";
/// Shortest secret accepted, bytes.
pub const MIN_SECRET: usize = 32;

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBody {
    /// The player's account id (issued by whoever runs the token service).
    pub player_id: u64,
    /// The name the player will have.
    pub name: String,
    /// Expiry, seconds since the Unix epoch.
    pub expires_unix: u64,
    /// Random, so each token admits one connection.
    pub nonce: [u8; 16],
}

/// The account id used for a name when no id is given: the first 8 bytes (little-endian) of the
/// SHA-256 of the name, so distinct names get distinct accounts (and the same name the same one).
#[must_use]
pub fn account_of_name(name: &str) -> u64 {
    let d = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    let mut b = [0u8; 8];
    for (dst, src) in b.iter_mut().zip(d.as_ref()) {
        *dst = *src;
    }
    u64::from_le_bytes(b)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| {
            s.get(2 * i..2 * i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect()
}

/// Parses a hex secret (at least [`MIN_SECRET`] bytes).
pub fn parse_secret(text: &str) -> Result<Vec<u8>, String> {
    let s = unhex(text.trim()).ok_or("the secret must be hex")?;
    if s.len() < MIN_SECRET {
        return Err(format!(
            "the secret must be at least {MIN_SECRET} bytes ({} hex digits)",
            2 * MIN_SECRET
        ));
    }
    Ok(s)
}

/// Signs a token.
#[must_use]
pub fn issue(secret: &[u8], body: &TokenBody) -> String {
    let mut b = Vec::with_capacity(32 + body.name.len());
    b.extend_from_slice(&body.player_id.to_le_bytes());
    b.extend_from_slice(&body.expires_unix.to_le_bytes());
    b.extend_from_slice(&body.nonce);
    b.extend_from_slice(body.name.as_bytes());
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), &b);
    format!("{PREFIX}{}.{}", hex(&b), hex(tag.as_ref()))
}

/// Checks a token's form, signature and expiry (not replay: see [`ReplayGuard`]).
pub fn verify(secret: &[u8], token: &str, now_unix: u64) -> Result<TokenBody, RefuseReason> {
    let rest = token
        .strip_prefix(PREFIX)
        .ok_or(RefuseReason::TokenInvalid)?;
    let (body_hex, tag_hex) = rest.split_once('.').ok_or(RefuseReason::TokenInvalid)?;
    let body = unhex(body_hex).ok_or(RefuseReason::TokenInvalid)?;
    let tag = unhex(tag_hex).ok_or(RefuseReason::TokenInvalid)?;
    hmac::verify(&hmac::Key::new(hmac::HMAC_SHA256, secret), &body, &tag)
        .map_err(|_| RefuseReason::TokenInvalid)?;
    let (id, rest) = body
        .split_first_chunk::<8>()
        .ok_or(RefuseReason::TokenInvalid)?;
    let (exp, rest) = rest
        .split_first_chunk::<8>()
        .ok_or(RefuseReason::TokenInvalid)?;
    let (nonce, name) = rest
        .split_first_chunk::<16>()
        .ok_or(RefuseReason::TokenInvalid)?;
    let name = String::from_utf8(name.to_vec()).map_err(|_| RefuseReason::TokenInvalid)?;
    if !valid_name(&name) {
        return Err(RefuseReason::TokenInvalid);
    }
    let body = TokenBody {
        player_id: u64::from_le_bytes(*id),
        name,
        expires_unix: u64::from_le_bytes(*exp),
        nonce: *nonce,
    };
    if body.expires_unix <= now_unix {
        return Err(RefuseReason::TokenExpired);
    }
    Ok(body)
}

/// Remembers the nonces of tokens already used until they expire, so none admits twice. Memory is
/// bounded by the tokens issued within one validity period.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    /// nonce → expiry (Unix seconds).
    seen: HashMap<[u8; 16], u64>,
}

impl ReplayGuard {
    /// Records a token's use; false if it was used before.
    pub fn first_use(&mut self, body: &TokenBody, now_unix: u64) -> bool {
        if self.seen.len() > 4096 {
            self.seen.retain(|_, exp| *exp > now_unix);
        }
        self.seen.insert(body.nonce, body.expires_unix).is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = &[7u8; 32];

    fn body(exp: u64) -> TokenBody {
        TokenBody {
            player_id: 42,
            name: "alice".into(),
            expires_unix: exp,
            nonce: [9; 16],
        }
    }

    #[test]
    fn valid_forged_expired_replayed() {
        let t = issue(SECRET, &body(1000));
        assert_eq!(verify(SECRET, &t, 999), Ok(body(1000)));
        assert_eq!(verify(SECRET, &t, 1000), Err(RefuseReason::TokenExpired));
        assert_eq!(
            verify(&[8u8; 32], &t, 10),
            Err(RefuseReason::TokenInvalid),
            "other secret"
        );
        let mut forged = t.clone();
        forged.replace_range(8..10, "ff");
        assert_eq!(
            verify(SECRET, &forged, 10),
            Err(RefuseReason::TokenInvalid),
            "tampered body"
        );
        for junk in ["", "qt1.", "qt1.zz.zz", "qt2.00.00", "qt1.00", "qt1.0.0"] {
            assert_eq!(
                verify(SECRET, junk, 10),
                Err(RefuseReason::TokenInvalid),
                "{junk:?}"
            );
        }
        let mut g = ReplayGuard::default();
        assert!(g.first_use(&body(1000), 10));
        assert!(!g.first_use(&body(1000), 11));
    }

    #[test]
    fn secrets_must_be_long_hex() {
        assert!(parse_secret(&"ab".repeat(32)).is_ok());
        assert!(parse_secret(&"ab".repeat(31)).is_err());
        assert!(parse_secret("not hex").is_err());
    }
}
