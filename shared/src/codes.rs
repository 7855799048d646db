//! Close codes (one table, as in docs/protocol.md "Close codes") and reply error codes.

use serde::{Deserialize, Serialize};

/// Why the server closes a WebSocket. The numeric value is the close code on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// A frame was larger than the configured limit. Do not auto-reconnect.
    TooLarge = 1009,
    /// Not a command (not JSON, unknown type, binary frame, hello missing). Do not auto-reconnect.
    BadRequest = 4400,
    /// Bad, expired or missing token. Reconnect with a new token.
    Unauthorized = 4401,
    /// Origin not allowed or user blocked. Do not auto-reconnect.
    Forbidden = 4403,
    /// No hello in time, or heartbeat missed. Reconnect with backoff.
    Timeout = 4408,
    /// The backend removed the user (v1.1). Do not auto-reconnect.
    Kicked = 4410,
    /// Too many connections or messages. Reconnect after backoff.
    TooMany = 4429,
    /// The node is draining or shutting down. Reconnect now, with jitter, and resume.
    Draining = 4503,
    /// The client did not read fast enough. Reconnect and resume.
    SlowConsumer = 4509,
}

impl CloseCode {
    /// Every close code, for tables and tests.
    pub const ALL: [CloseCode; 9] = [
        CloseCode::TooLarge,
        CloseCode::BadRequest,
        CloseCode::Unauthorized,
        CloseCode::Forbidden,
        CloseCode::Timeout,
        CloseCode::Kicked,
        CloseCode::TooMany,
        CloseCode::Draining,
        CloseCode::SlowConsumer,
    ];

    /// The numeric close code.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The close code for a number, if it is one of Herald's.
    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// The reason of a 4401 close when the session's token reached `exp` without a
    /// `refresh` (docs/protocol.md).
    pub const TOKEN_EXPIRED: &'static str = "token expired";

    /// The short reason sent in the close frame.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::TooLarge => "frame too large",
            CloseCode::BadRequest => "bad request",
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::Forbidden => "forbidden",
            CloseCode::Timeout => "timeout",
            CloseCode::Kicked => "kicked",
            CloseCode::TooMany => "too many connections or messages",
            CloseCode::Draining => "node draining",
            CloseCode::SlowConsumer => "slow consumer",
        }
    }

    /// Whether a client should reconnect on its own after this close.
    pub fn should_reconnect(self) -> bool {
        !matches!(
            self,
            CloseCode::TooLarge | CloseCode::BadRequest | CloseCode::Forbidden | CloseCode::Kicked
        )
    }
}

/// The `code` of an error reply (`{"type":"reply","error":{"code":…}}`) and of HTTP errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The command or body is malformed or has a bad argument.
    BadRequest,
    /// Not allowed by the token's claims or by the channel rules.
    Forbidden,
    /// The thing asked for does not exist.
    NotFound,
    /// Too many commands; slow down.
    RateLimited,
    /// The broker is unreachable; try again.
    Unavailable,
    /// A bug or unexpected failure on the server.
    Internal,
    /// Missing or wrong API key (HTTP only).
    Unauthorized,
    /// Body larger than the limit (HTTP only).
    TooLarge,
}

impl ErrorCode {
    /// The wire name, as in `"bad_request"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TooLarge => "too_large",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_round_trip() {
        for c in CloseCode::ALL {
            assert_eq!(CloseCode::from_code(c.code()), Some(c));
        }
        assert_eq!(CloseCode::from_code(1000), None);
    }

    #[test]
    fn error_code_names_match_serde() {
        for c in [
            ErrorCode::BadRequest,
            ErrorCode::RateLimited,
            ErrorCode::Unavailable,
        ] {
            assert_eq!(
                serde_json::to_string(&c).unwrap(),
                format!("\"{}\"", c.as_str())
            );
        }
    }
}
