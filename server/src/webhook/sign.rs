//! The `Herald-Signature` header: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`
//! with `HERALD_WEBHOOK_SECRET` (docs/protocol.md). The timestamp is signed with the
//! body, so a receiver that rejects old timestamps rejects replays.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header's name.
pub const HEADER: &str = "Herald-Signature";

/// Why a signature header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// Not `t=<digits>,v1=<hex>`.
    #[error("malformed signature header")]
    Malformed,
    /// The timestamp is further from now than the tolerance.
    #[error("signature timestamp outside the tolerance")]
    Stale,
    /// The MAC does not match.
    #[error("signature mismatch")]
    Mismatch,
}

fn mac(secret: &[u8], t: u64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes a key of any length; `new_from_slice` cannot fail for it.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The header value for `body` sent at `t` (unix seconds).
pub fn header(secret: &[u8], t: u64, body: &[u8]) -> String {
    let tag = mac(secret, t, body).finalize().into_bytes();
    format!("t={t},v1={}", hex(&tag))
}

/// Checks a header against `body`: well formed, `t` within `tolerance_secs` of `now`,
/// and the MAC equal (compared in constant time). What a receiver does; Herald uses it
/// in its tests and documents the same steps in docs/backend.md.
pub fn verify(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now: u64,
    tolerance_secs: u64,
) -> Result<(), SignatureError> {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<u64>().ok(),
            Some(("v1", v)) => v1 = unhex(v),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return Err(SignatureError::Malformed);
    };
    if t.abs_diff(now) > tolerance_secs {
        return Err(SignatureError::Stale);
    }
    mac(secret, t, body)
        .verify_slice(&v1)
        .map_err(|_| SignatureError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        // python3 -c 'import hmac,hashlib;print(hmac.new(b"secret",b"1700000000.{}",hashlib.sha256).hexdigest())'
        assert_eq!(
            header(b"secret", 1_700_000_000, b"{}"),
            "t=1700000000,v1=b8569b78799ff9e3cbff0fc2d63a33a2b57f3282abd07c37ae5e8e7d79a5f163"
        );
    }

    #[test]
    fn verifies_and_refuses() {
        let body = br#"{"events":[]}"#;
        let h = header(b"k", 100, body);
        assert_eq!(verify(b"k", &h, body, 100, 300), Ok(()));
        assert_eq!(verify(b"k", &h, body, 350, 300), Ok(()));
        assert_eq!(verify(b"k", &h, body, 401, 300), Err(SignatureError::Stale));
        assert_eq!(
            verify(b"x", &h, body, 100, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"k", &h, b"{}", 100, 300),
            Err(SignatureError::Mismatch)
        );
        for bad in [
            "",
            "t=100",
            "v1=00",
            "t=x,v1=00",
            "t=100,v1=zz",
            "t=100,v1=0",
        ] {
            assert_eq!(
                verify(b"k", bad, body, 100, 300),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
    }
}
