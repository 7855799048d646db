//! Client tokens signed locally with the cluster's HS256 secret, so that connecting does
//! not depend on `/dev/token` (dev mode) and costs the node only the verification.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde::Serialize;

/// Signs tokens for the load generator's users.
pub struct Signer {
    key: EncodingKey,
    header: Header,
    exp: u64,
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    channels: &'a [String],
}

impl Signer {
    /// A signer with the HS256 `secret`; tokens are valid for a day.
    pub fn new(secret: &str) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Self {
            key: EncodingKey::from_secret(secret.as_bytes()),
            header: Header::new(Algorithm::HS256),
            exp: now + 24 * 3600,
        }
    }

    /// A token for `user` that may subscribe to `channels` (its personal channel is
    /// always allowed).
    pub fn token(&self, user: &str, channels: &[String]) -> String {
        encode(
            &self.header,
            &Claims {
                sub: user,
                exp: self.exp,
                channels,
            },
            &self.key,
        )
        .expect("HS256 signing does not fail")
    }
}
