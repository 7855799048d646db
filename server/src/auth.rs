//! Authentication: client tokens (JWT) and the server API key, and dev mode's keys.
//!
//! Tokens are verified strictly: the algorithm is pinned to the configured key's (so
//! `alg: none`, unknown algorithms and HS256-signed-with-the-public-key are refused),
//! `exp` and `sub` are required, `nbf` is honoured, and there is no leeway. The API key
//! is compared in constant time on SHA-256 digests, so neither its content nor its
//! length leaks through timing.

use std::net::SocketAddr;
use std::path::Path;

use herald_protocol::channel::{any_pattern_allows, personal_channel_owner, validate_user};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Config;

/// The claims Herald reads from a client token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Not valid before, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at, seconds since the Unix epoch. Revocations compare it; a verified
    /// token always has it (see [`TokenVerifier::verify`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Patterns of channels the user may subscribe to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<String>>,
    /// Patterns of channels the user may publish to from the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<Vec<String>>,
}

impl Claims {
    /// Whether the user may subscribe to (and see presence of) `channel`. A personal
    /// channel is its owner's alone, whatever the patterns say.
    pub fn may_subscribe(&self, channel: &str) -> bool {
        match personal_channel_owner(channel) {
            Some(owner) => owner == self.sub,
            None => self
                .channels
                .as_deref()
                .is_some_and(|p| any_pattern_allows(p, channel)),
        }
    }

    /// When the token was issued (unix seconds); 0 if unknown (never after `verify`).
    pub fn issued_at(&self) -> u64 {
        self.iat.unwrap_or(0)
    }

    /// Whether the user may publish to `channel` from the client.
    pub fn may_publish(&self, channel: &str) -> bool {
        self.publish
            .as_deref()
            .is_some_and(|p| any_pattern_allows(p, channel))
    }
}

/// Why a token was refused. The client sees only "unauthorized" (4401); the detail is
/// logged at debug level, never the token itself.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token in hello.
    #[error("missing token")]
    Missing,
    /// Longer than the configured limit.
    #[error("token too large")]
    TooLarge,
    /// Signature, algorithm, expiry or claims failed verification.
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    /// `sub` is not a valid user id.
    #[error("invalid sub: {0}")]
    BadSubject(herald_protocol::channel::NameError),
    /// `exp` lies further ahead than the longest token lifetime the node accepts.
    #[error("token lifetime over the limit of {0} s")]
    TooLong(u64),
    /// `iat` lies more than [`MAX_IAT_SKEW_SECS`] in the future (often milliseconds
    /// instead of seconds). Such a token would escape every revocation.
    #[error("token issued in the future (iat {0})")]
    IssuedInFuture(u64),
}

/// How far `iat` may lie ahead of the node's clock (clock skew between the backend
/// that issues tokens and the node), in seconds. A revocation refuses tokens issued
/// before its `before`; a token claiming to be issued later than that is never
/// refused, so a future `iat` beyond a small skew is refused outright.
pub const MAX_IAT_SKEW_SECS: u64 = 60;

/// The default longest token lifetime (`HERALD_MAX_TOKEN_LIFETIME_SECS`): a day.
pub const DEFAULT_MAX_LIFETIME_SECS: u64 = 86_400;

/// Checks a token's lifetime against `max` seconds at `now` and returns its issue time.
///
/// Revocations refuse tokens issued before a time and are kept for `max` seconds, so
/// no token may live longer than `max`: with `iat`, `exp - iat ≤ max`; without `iat`,
/// the token counts as issued at `exp - max` (the earliest time a token of the allowed
/// lifetime could have been issued), and `exp ≤ now + max` keeps that in the past.
/// An `iat` more than [`MAX_IAT_SKEW_SECS`] ahead of `now` is refused: it would put
/// the token out of reach of every revocation.
pub fn issued_at(exp: u64, iat: Option<u64>, now: u64, max: u64) -> Result<u64, AuthError> {
    if exp > now.saturating_add(max) {
        return Err(AuthError::TooLong(max));
    }
    match iat {
        Some(iat) if iat > now.saturating_add(MAX_IAT_SKEW_SECS) => {
            Err(AuthError::IssuedInFuture(iat))
        }
        Some(iat) if exp.saturating_sub(iat) > max => Err(AuthError::TooLong(max)),
        Some(iat) => Ok(iat),
        None => Ok(exp.saturating_sub(max)),
    }
}

/// How long before a token's expiry the session sends `expiring`: the configured
/// notice, but at most half of what is left, so that a short-lived token is not
/// announced as expiring the moment it is accepted.
pub fn expiry_notice_ms(remaining_ms: u64, notice_ms: u64) -> u64 {
    notice_ms.min(remaining_ms / 2)
}

/// Failures while loading keys at start.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The public key file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not an RSA, EC (P-256) or Ed25519 public key in PEM.
    #[error("{0} is not an RSA, EC or Ed25519 public key in PEM format")]
    Unsupported(String),
    /// Both a secret and a public key were configured: the algorithm would be ambiguous.
    #[error("configure HERALD_JWT_SECRET or HERALD_JWT_PUBLIC_KEY_FILE, not both")]
    Ambiguous,
    /// An empty secret or API key.
    #[error("{0} must not be empty")]
    Empty(&'static str),
    /// No key at all on an address other than loopback: implicit dev mode would hand
    /// tokens to anyone who can reach the node.
    #[error(
        "no keys configured and {listen} is not a loopback address: set HERALD_JWT_SECRET \
         (or HERALD_JWT_PUBLIC_KEY_FILE) and HERALD_API_KEY; dev mode without keys runs on \
         127.0.0.1 or ::1 only (HERALD_DEV=1 turns it on anywhere: never in production)"
    )]
    NoKeysOffLoopback {
        /// The listen address.
        listen: SocketAddr,
    },
    /// Outside dev mode one of the two keys is missing.
    #[error("{0} is not set: outside dev mode the node needs both a token key and an API key")]
    Missing(&'static str),
    /// Outside dev mode a secret or API key is shorter than [`MIN_KEY_BYTES`].
    #[error(
        "{name} is {len} bytes: outside dev mode it must be at least {MIN_KEY_BYTES} bytes \
         (e.g. `openssl rand -hex 32`)"
    )]
    TooShort {
        /// The setting.
        name: &'static str,
        /// Its length in bytes (never the key itself).
        len: usize,
    },
}

/// The shortest HS256 secret and API key accepted outside dev mode, in bytes: 256 bits,
/// the size of HS256's own output (RFC 7518 §3.2 asks for a key at least that long).
pub const MIN_KEY_BYTES: usize = 32;

/// The startup rules for keys and dev mode (docs/protocol.md): whether the node runs in
/// dev mode, or why it must not start. A pure function of the configuration, so
/// `herald` can check it before binding, and [`Keys::resolve`] applies the same rules.
///
/// - A secret or API key set to an empty string, or both a secret and a public key
///   file, is an error in any mode.
/// - Dev mode is on with `HERALD_DEV` true, on any address, or when no key at all is
///   configured and the node listens on a loopback address (127.0.0.0/8, ::1).
/// - No key at all on any other address (`0.0.0.0` included) is an error: a node
///   reachable from elsewhere never hands out tokens by accident.
/// - Outside dev mode both a token key and an API key are required, and an HS256 secret
///   and the API key must be at least [`MIN_KEY_BYTES`] long. Dev mode accepts short
///   keys (a dev cluster's keys are public anyway).
pub fn dev_mode(config: &Config) -> Result<bool, KeyError> {
    if config.jwt_secret.as_deref() == Some("") {
        return Err(KeyError::Empty("HERALD_JWT_SECRET"));
    }
    if config.api_key.as_deref() == Some("") {
        return Err(KeyError::Empty("HERALD_API_KEY"));
    }
    if config.jwt_secret.is_some() && config.jwt_public_key_file.is_some() {
        return Err(KeyError::Ambiguous);
    }
    let token_key = config.jwt_secret.is_some() || config.jwt_public_key_file.is_some();
    let any_key = token_key || config.api_key.is_some();
    if config.dev {
        return Ok(true);
    }
    if !any_key {
        return if config.listen.ip().is_loopback() {
            Ok(true)
        } else {
            Err(KeyError::NoKeysOffLoopback {
                listen: config.listen,
            })
        };
    }
    if !token_key {
        return Err(KeyError::Missing(
            "HERALD_JWT_SECRET (or HERALD_JWT_PUBLIC_KEY_FILE)",
        ));
    }
    let Some(api_key) = &config.api_key else {
        return Err(KeyError::Missing("HERALD_API_KEY"));
    };
    for (name, key) in [
        ("HERALD_JWT_SECRET", config.jwt_secret.as_deref()),
        ("HERALD_API_KEY", Some(api_key.as_str())),
    ] {
        if let Some(key) = key.filter(|k| k.len() < MIN_KEY_BYTES) {
            return Err(KeyError::TooShort {
                name,
                len: key.len(),
            });
        }
    }
    Ok(false)
}

/// Verifies client tokens with one key and one pinned algorithm.
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
    max_bytes: usize,
    max_lifetime_secs: u64,
}

impl TokenVerifier {
    /// A verifier for an HS256 secret.
    pub fn hs256(secret: &[u8], max_bytes: usize) -> Self {
        Self::new(
            DecodingKey::from_secret(secret),
            Algorithm::HS256,
            max_bytes,
        )
    }

    /// A verifier for a PEM public key; the key's type picks RS256, ES256 or EdDSA.
    pub fn from_public_key_file(path: &Path, max_bytes: usize) -> Result<Self, KeyError> {
        let pem = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let (key, alg) = if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
            (k, Algorithm::RS256)
        } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
            (k, Algorithm::ES256)
        } else if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
            (k, Algorithm::EdDSA)
        } else {
            return Err(KeyError::Unsupported(path.display().to_string()));
        };
        Ok(Self::new(key, alg, max_bytes))
    }

    fn new(key: DecodingKey, alg: Algorithm, max_bytes: usize) -> Self {
        let mut validation = Validation::new(alg);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.leeway = 0;
        Self {
            key,
            validation,
            max_bytes,
            max_lifetime_secs: DEFAULT_MAX_LIFETIME_SECS,
        }
    }

    /// Sets the longest token lifetime accepted (see [`issued_at`]).
    pub fn with_max_lifetime(mut self, secs: u64) -> Self {
        self.max_lifetime_secs = secs.max(1);
        self
    }

    /// The longest token lifetime accepted, in seconds.
    pub fn max_lifetime_secs(&self) -> u64 {
        self.max_lifetime_secs
    }

    /// The pinned algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.validation.algorithms[0]
    }

    /// Verifies a token and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > self.max_bytes {
            return Err(AuthError::TooLarge);
        }
        let mut claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)?.claims;
        validate_user(&claims.sub).map_err(AuthError::BadSubject)?;
        let iat = issued_at(claims.exp, claims.iat, now_secs(), self.max_lifetime_secs)?;
        claims.iat = Some(iat);
        Ok(claims)
    }
}

/// Signs HS256 tokens: dev mode's `/dev/token`, and tests.
pub struct TokenSigner {
    key: EncodingKey,
}

impl TokenSigner {
    /// A signer for an HS256 secret.
    pub fn hs256(secret: &[u8]) -> Self {
        Self {
            key: EncodingKey::from_secret(secret),
        }
    }

    /// Signs arbitrary claims.
    pub fn sign(&self, claims: &Claims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.key)
            .expect("HS256 signing cannot fail")
    }

    /// A dev token: valid for `ttl_secs`, may subscribe and publish anywhere (the
    /// personal channels of others stay closed).
    pub fn dev_token(&self, user: &str, ttl_secs: u64) -> String {
        let now = now_secs();
        self.sign(&Claims {
            sub: user.to_owned(),
            exp: now + ttl_secs,
            nbf: None,
            iat: Some(now),
            channels: Some(vec!["*".into()]),
            publish: Some(vec!["*".into()]),
        })
    }
}

/// Seconds since the Unix epoch.
pub use crate::clock::now_secs;

/// The server API key.
pub struct ApiKey {
    digest: [u8; 32],
}

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: &str) -> Self {
        Self {
            digest: Sha256::digest(key.as_bytes()).into(),
        }
    }

    /// Constant-time check of a presented key.
    pub fn matches(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        digest.ct_eq(&self.digest).into()
    }
}

/// Every key the node uses, after dev mode filled in what was missing.
pub struct Keys {
    /// Verifies client tokens.
    pub verifier: TokenVerifier,
    /// Signs dev tokens (dev mode with an HS256 secret only).
    pub dev_signer: Option<TokenSigner>,
    /// The server API key.
    pub api_key: ApiKey,
    /// The API key in clear, kept only in dev mode so it can be printed.
    pub dev_api_key: Option<String>,
    /// Whether dev mode is on.
    pub dev: bool,
    /// Which keys dev mode generated.
    pub generated: Vec<&'static str>,
}

fn random_key() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), 40)
}

impl Keys {
    /// Loads the configured keys after checking them with [`dev_mode`]. Dev mode
    /// generates whatever key is missing; outside it both keys are configured.
    pub fn resolve(config: &Config) -> Result<Self, KeyError> {
        let dev = dev_mode(config)?;
        let max = config.max_token_bytes;
        let mut generated = Vec::new();

        let (verifier, dev_signer) = match (&config.jwt_secret, &config.jwt_public_key_file) {
            (Some(_), Some(_)) => return Err(KeyError::Ambiguous),
            (Some(secret), None) => (
                TokenVerifier::hs256(secret.as_bytes(), max),
                dev.then(|| TokenSigner::hs256(secret.as_bytes())),
            ),
            (None, Some(path)) => (TokenVerifier::from_public_key_file(path, max)?, None),
            (None, None) => {
                // Only in dev mode (`dev_mode` refuses a missing token key otherwise).
                let secret = random_key();
                generated.push("HERALD_JWT_SECRET");
                (
                    TokenVerifier::hs256(secret.as_bytes(), max),
                    Some(TokenSigner::hs256(secret.as_bytes())),
                )
            }
        };
        let api_key_clear = match &config.api_key {
            Some(k) => k.clone(),
            None => {
                // Only in dev mode, as above.
                generated.push("HERALD_API_KEY");
                random_key()
            }
        };
        let verifier = verifier.with_max_lifetime(config.max_token_lifetime_secs);
        Ok(Self {
            verifier,
            dev_signer,
            api_key: ApiKey::new(&api_key_clear),
            dev_api_key: dev.then_some(api_key_clear),
            dev,
            generated,
        })
    }
}

#[cfg(test)]
mod tests;
