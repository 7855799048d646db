//! Channel names, user ids and the permission patterns of token claims.
//!
//! A channel name is 1–256 bytes of `[A-Za-z0-9_.:@=-]`; a user id is 1–128 bytes of
//! `[A-Za-z0-9_.@-]`. The personal channel of user `alice` is `user:alice`, and only
//! alice may subscribe to it, whatever her claims say.

use std::fmt;

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 256;
/// Longest user id, in bytes.
pub const MAX_USER_LEN: usize = 128;
/// Prefix of personal channels.
pub const USER_PREFIX: &str = "user:";

/// Why a channel name or user id was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameError {
    /// Empty.
    Empty,
    /// Longer than the limit.
    TooLong,
    /// Has a byte outside the allowed set.
    BadCharacter,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameError::Empty => "is empty",
            NameError::TooLong => "is too long",
            NameError::BadCharacter => "has a character outside the allowed set",
        })
    }
}

impl std::error::Error for NameError {}

fn check(name: &str, max: usize, allowed: impl Fn(u8) -> bool) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > max {
        return Err(NameError::TooLong);
    }
    if !name.bytes().all(allowed) {
        return Err(NameError::BadCharacter);
    }
    Ok(())
}

/// Checks a channel name: 1–256 bytes of `[A-Za-z0-9_.:@=-]`.
pub fn validate_channel(name: &str) -> Result<(), NameError> {
    check(name, MAX_CHANNEL_LEN, |b| {
        b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'=' | b'-')
    })
}

/// Checks a user id: 1–128 bytes of `[A-Za-z0-9_.@-]`.
pub fn validate_user(user: &str) -> Result<(), NameError> {
    check(user, MAX_USER_LEN, |b| {
        b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'-')
    })
}

/// The personal channel of a user: `user:<id>`.
pub fn user_channel(user: &str) -> String {
    format!("{USER_PREFIX}{user}")
}

/// If `channel` is a personal channel, the user it belongs to.
pub fn personal_channel_owner(channel: &str) -> Option<&str> {
    channel.strip_prefix(USER_PREFIX)
}

/// The namespace of a channel: the part before the first `:` (the whole name if none).
pub fn namespace(channel: &str) -> &str {
    channel.split(':').next().unwrap_or(channel)
}

/// Whether a claim pattern allows a channel.
///
/// A pattern is an exact name, or a prefix followed by a single trailing `*`
/// (`"room:*"` allows `room:1` and `room:a:b`). A `*` anywhere else is an ordinary
/// byte, and since no channel name contains `*`, such a pattern matches nothing: there
/// is no other wildcard to escape into.
pub fn pattern_allows(pattern: &str, channel: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) if !prefix.contains('*') => channel.starts_with(prefix),
        Some(_) => false,
        None => pattern == channel,
    }
}

/// Whether any pattern of a claim list allows a channel.
pub fn any_pattern_allows<S: AsRef<str>>(patterns: &[S], channel: &str) -> bool {
    patterns.iter().any(|p| pattern_allows(p.as_ref(), channel))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn channel_names() {
        assert!(validate_channel("room:42").is_ok());
        assert!(validate_channel("a.b_c-d@e=f:g").is_ok());
        assert_eq!(validate_channel(""), Err(NameError::Empty));
        assert_eq!(validate_channel("room 1"), Err(NameError::BadCharacter));
        assert_eq!(validate_channel("room*"), Err(NameError::BadCharacter));
        assert_eq!(validate_channel("é"), Err(NameError::BadCharacter));
        assert!(validate_channel(&"a".repeat(256)).is_ok());
        assert_eq!(validate_channel(&"a".repeat(257)), Err(NameError::TooLong));
    }

    #[test]
    fn users() {
        assert!(validate_user("alice@example.com").is_ok());
        assert_eq!(validate_user("a:b"), Err(NameError::BadCharacter));
        assert_eq!(validate_user(&"u".repeat(129)), Err(NameError::TooLong));
        assert_eq!(user_channel("bob"), "user:bob");
        assert_eq!(personal_channel_owner("user:bob"), Some("bob"));
        assert_eq!(personal_channel_owner("room:1"), None);
        assert_eq!(namespace("room:1:x"), "room");
        assert_eq!(namespace("lobby"), "lobby");
    }

    #[test]
    fn patterns() {
        assert!(pattern_allows("room:*", "room:1"));
        assert!(pattern_allows("room:*", "room:a:b"));
        assert!(!pattern_allows("room:*", "roomy"));
        assert!(pattern_allows("news", "news"));
        assert!(!pattern_allows("news", "news2"));
        assert!(pattern_allows("*", "anything"));
        // No escapes: only one trailing star is a wildcard.
        assert!(!pattern_allows("room*:*", "room1:x"));
        assert!(!pattern_allows("**", "x"));
        assert!(!pattern_allows("room:*x", "room:1x"));
        assert!(!pattern_allows("", "x"));
    }

    proptest! {
        #[test]
        fn valid_names_only_use_the_alphabet(s in ".{0,300}") {
            if validate_channel(&s).is_ok() {
                prop_assert!(!s.is_empty() && s.len() <= 256);
                prop_assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.:@=-".contains(&b)));
            }
        }

        #[test]
        fn alphabet_names_are_valid(s in "[A-Za-z0-9_.:@=-]{1,256}") {
            prop_assert!(validate_channel(&s).is_ok());
        }

        #[test]
        fn star_patterns_are_prefixes(prefix in "[a-z:]{0,10}", rest in "[a-z0-9]{0,10}") {
            let channel = format!("{prefix}{rest}");
            let pattern = format!("{prefix}*");
            prop_assert!(pattern_allows(&pattern, &channel));
        }
    }
}
