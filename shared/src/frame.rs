//! The JSON frames of the WebSocket protocol.
//!
//! Client commands are parsed in two steps, because the protocol treats two kinds of bad
//! input differently: a frame that is not a command at all (not JSON, not an object, no
//! known `type`) closes the connection with 4400, while a well-formed command with a bad
//! argument gets an error reply and the connection stays open. [`ClientCommand::parse`]
//! returns [`ParseError::NotACommand`] or [`ParseError::BadArgument`] accordingly.
//!
//! `data` stays raw JSON text ([`RawValue`]) from the client to every recipient: it is
//! validated once on the way in and never re-encoded.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::channel::validate_channel;
use crate::codes::ErrorCode;
use crate::depth::MAX_DATA_DEPTH;
use crate::StreamPosition;

/// A command from the client.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientCommand {
    /// The first frame: authenticate and resume channels.
    Hello {
        /// The client's JWT.
        token: String,
        /// Channels to re-subscribe with the last position seen.
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        resume: BTreeMap<String, StreamPosition>,
    },
    /// Subscribe to a channel, optionally recovering from a position.
    Subscribe {
        /// Echoed in the reply.
        id: u64,
        /// The channel.
        channel: String,
        /// Recover every message after this position.
        #[serde(skip_serializing_if = "Option::is_none")]
        since: Option<StreamPosition>,
    },
    /// Leave a channel.
    Unsubscribe {
        /// Echoed in the reply.
        id: u64,
        /// The channel.
        channel: String,
    },
    /// Publish to a channel from the client (needs the `publish` claim).
    Publish {
        /// Echoed in the reply.
        id: u64,
        /// The channel.
        channel: String,
        /// Any JSON value.
        data: Box<RawValue>,
        /// v1.1: an ephemeral message (typing indicators, "is viewing" markers): no
        /// offset, not stored, delivered only to the sessions subscribed at that moment,
        /// never recovered. Absent (and omitted when serialized) means `false`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        ephemeral: bool,
    },
    /// Who is in a channel.
    Presence {
        /// Echoed in the reply.
        id: u64,
        /// The channel.
        channel: String,
    },
    /// Answer to a server `ping`.
    Pong,
    /// Swap the session's token for a fresh one of the same user (v1.1).
    Refresh {
        /// Echoed in the reply.
        id: u64,
        /// The new JWT.
        token: String,
    },
    /// Acknowledge every message of the own personal channel up to `offset` (v1.1),
    /// cumulatively. With an `id` it gets a reply; without one only errors are answered.
    Ack {
        /// Echoed in the reply, when given.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// The session's own personal channel `user:<sub>`.
        channel: String,
        /// The last offset handed to the application.
        offset: u64,
        /// The epoch of that offset (an addition: an ack of another epoch than the
        /// session's current one is refused instead of acking the wrong messages).
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
    },
}

/// Why a client frame was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Not a command at all: the connection is closed with 4400.
    NotACommand(String),
    /// A known command with a bad or missing argument: answer with a `bad_request` reply.
    BadArgument {
        /// The command's id, when it had a valid one.
        id: Option<u64>,
        /// What is wrong, for humans.
        message: String,
    },
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::NotACommand(m) => write!(f, "not a command: {m}"),
            ParseError::BadArgument { message, .. } => write!(f, "bad argument: {message}"),
        }
    }
}

impl std::error::Error for ParseError {}

/// `Some(raw)` even for `null`, so that `"data": null` is a value and not a missing field.
fn some_raw<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// Every field any command may have; unknown fields are ignored (additions are allowed).
#[derive(Deserialize)]
struct RawCommand<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    token: Option<Value>,
    #[serde(default)]
    resume: Option<Value>,
    #[serde(default)]
    channel: Option<Value>,
    #[serde(default)]
    since: Option<Value>,
    #[serde(default, deserialize_with = "some_raw")]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    ephemeral: Option<Value>,
    #[serde(default)]
    offset: Option<Value>,
    #[serde(default)]
    epoch: Option<Value>,
}

impl ClientCommand {
    /// Parses one text frame. See the module doc for the two kinds of error.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let raw: RawCommand<'_> =
            serde_json::from_str(text).map_err(|e| ParseError::NotACommand(e.to_string()))?;
        let kind = raw.kind.as_ref();
        if !matches!(
            kind,
            "hello"
                | "subscribe"
                | "unsubscribe"
                | "publish"
                | "presence"
                | "pong"
                | "refresh"
                | "ack"
        ) {
            return Err(ParseError::NotACommand(format!("unknown type {kind:?}")));
        }
        match kind {
            "pong" => Ok(ClientCommand::Pong),
            "hello" => parse_hello(raw),
            "ack" => parse_ack(raw),
            _ => {
                let id = match raw.id.as_ref().map(Value::as_u64) {
                    Some(Some(id)) => id,
                    _ => return Err(bad(None, "`id` must be a non-negative integer")),
                };
                if kind == "refresh" {
                    return match raw.token {
                        Some(Value::String(token)) if !token.is_empty() => {
                            Ok(ClientCommand::Refresh { id, token })
                        }
                        Some(Value::String(_)) | None | Some(Value::Null) => {
                            Err(bad(Some(id), "`token` is missing"))
                        }
                        Some(_) => Err(bad(Some(id), "`token` must be a string")),
                    };
                }
                let channel = channel_arg(id, raw.channel)?;
                match kind {
                    "subscribe" => {
                        let since = match raw.since {
                            None | Some(Value::Null) => None,
                            Some(v) => Some(position_arg(id, v, "since")?),
                        };
                        Ok(ClientCommand::Subscribe { id, channel, since })
                    }
                    "unsubscribe" => Ok(ClientCommand::Unsubscribe { id, channel }),
                    "presence" => Ok(ClientCommand::Presence { id, channel }),
                    _ => {
                        let data = raw.data.ok_or_else(|| bad(Some(id), "`data` is missing"))?;
                        if crate::depth::nests_deeper_than(data.get(), MAX_DATA_DEPTH) {
                            return Err(bad(
                                Some(id),
                                format!("`data` nests deeper than {MAX_DATA_DEPTH} levels"),
                            ));
                        }
                        let ephemeral = match raw.ephemeral {
                            None | Some(Value::Null) => false,
                            Some(Value::Bool(b)) => b,
                            Some(_) => {
                                return Err(bad(Some(id), "`ephemeral` must be true or false"))
                            }
                        };
                        Ok(ClientCommand::Publish {
                            id,
                            channel,
                            data,
                            ephemeral,
                        })
                    }
                }
            }
        }
    }

    /// The command as a JSON text frame.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("commands always serialize")
    }
}

fn bad(id: Option<u64>, message: impl Into<String>) -> ParseError {
    ParseError::BadArgument {
        id,
        message: message.into(),
    }
}

fn channel_arg(id: u64, channel: Option<Value>) -> Result<String, ParseError> {
    match channel {
        Some(Value::String(c)) => {
            validate_channel(&c).map_err(|e| bad(Some(id), format!("channel name {e}")))?;
            Ok(c)
        }
        Some(_) => Err(bad(Some(id), "`channel` must be a string")),
        None => Err(bad(Some(id), "`channel` is missing")),
    }
}

fn position_arg(id: u64, v: Value, what: &str) -> Result<StreamPosition, ParseError> {
    serde_json::from_value(v).map_err(|e| bad(Some(id), format!("`{what}`: {e}")))
}

/// `ack`: the `id` is optional (auto-acks need no answer); `offset` is required.
fn parse_ack(raw: RawCommand<'_>) -> Result<ClientCommand, ParseError> {
    let id = match raw.id {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(id) => Some(id),
            None => return Err(bad(None, "`id` must be a non-negative integer")),
        },
    };
    let channel = match raw.channel {
        Some(Value::String(c)) => {
            validate_channel(&c).map_err(|e| bad(id, format!("channel name {e}")))?;
            c
        }
        Some(_) => return Err(bad(id, "`channel` must be a string")),
        None => return Err(bad(id, "`channel` is missing")),
    };
    let offset = match raw.offset.as_ref().map(Value::as_u64) {
        Some(Some(o)) => o,
        Some(None) => return Err(bad(id, "`offset` must be a non-negative integer")),
        None => return Err(bad(id, "`offset` is missing")),
    };
    let epoch = match raw.epoch {
        None | Some(Value::Null) => None,
        Some(Value::String(e)) if e.len() <= MAX_EPOCH_BYTES => Some(e),
        Some(_) => {
            return Err(bad(
                id,
                format!("`epoch` must be a string of at most {MAX_EPOCH_BYTES} bytes"),
            ))
        }
    };
    Ok(ClientCommand::Ack {
        id,
        channel,
        offset,
        epoch,
    })
}

/// Longest `epoch` an `ack` may carry: epochs are 8 characters; anything much longer
/// is not one and need not be kept.
pub const MAX_EPOCH_BYTES: usize = 64;

fn parse_hello(raw: RawCommand<'_>) -> Result<ClientCommand, ParseError> {
    // A hello without a token is an authentication failure (4401), which the server
    // decides; here a missing token is an empty one.
    let token = match raw.token {
        Some(Value::String(t)) => t,
        None | Some(Value::Null) => String::new(),
        Some(_) => return Err(ParseError::NotACommand("`token` must be a string".into())),
    };
    let resume = match raw.resume {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(v) => {
            let map: BTreeMap<String, StreamPosition> = serde_json::from_value(v)
                .map_err(|e| ParseError::NotACommand(format!("`resume`: {e}")))?;
            for channel in map.keys() {
                validate_channel(channel)
                    .map_err(|e| ParseError::NotACommand(format!("`resume`: channel name {e}")))?;
            }
            map
        }
    };
    Ok(ClientCommand::Hello { token, resume })
}

/// The body of an error reply or HTTP error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable text.
    pub message: String,
}

impl ErrorBody {
    /// An error body.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// The result of a subscription: where the client stands now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribeResult {
    /// Offset of the last message the client has (after the recovered ones).
    pub offset: u64,
    /// The channel's epoch.
    pub epoch: String,
    /// Whether every message after the given position is delivered.
    pub recovered: bool,
}

/// `welcome`: the answer to `hello`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Welcome {
    /// This connection's session id.
    pub session: String,
    /// The node the client is connected to.
    pub node: String,
    /// The authenticated user.
    pub user: String,
    /// The server pings after this much silence; send something at least every 2× this.
    pub heartbeat_ms: u64,
    /// Every channel subscribed at hello, with its position.
    pub subscriptions: BTreeMap<String, SubscribeResult>,
    /// Channels of `resume` that were refused, with why (an addition to the contract).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub errors: BTreeMap<String, ErrorBody>,
}

/// `reply`: the answer to a command with an `id`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    /// The command's id (absent when the command had no valid id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// The result, on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The error, on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// `message`: one publication on a channel.
#[derive(Debug, Serialize, Deserialize)]
pub struct MessageFrame {
    /// The channel.
    pub channel: String,
    /// The message's offset in the channel.
    pub offset: u64,
    /// The channel's epoch.
    pub epoch: String,
    /// Who published it (v1.1): the publisher's user id when it came from a socket, set
    /// by the server; for a server API publish, whatever the backend gave (often
    /// nothing). Absent when unknown: a message without `from` comes from the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The published JSON value.
    pub data: Box<RawValue>,
}

/// `message` with `"ephemeral":true` (v1.1): a message that has no offset and no
/// epoch, was not stored, and is never recovered. It is not part of the channel's
/// stream: clients hand it to the application apart from ordinary messages, without
/// ordering, deduplication or position tracking.
#[derive(Debug, Serialize, Deserialize)]
pub struct EphemeralFrame {
    /// The channel.
    pub channel: String,
    /// Always `true`: what tells this frame from an ordinary `message`.
    pub ephemeral: bool,
    /// Who published it, as in [`MessageFrame::from`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The published JSON value.
    pub data: Box<RawValue>,
}

/// `reconnect`: a planned close follows; reconnect after `after_ms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reconnect {
    /// Why, e.g. `draining`.
    pub reason: String,
    /// Wait this long before reconnecting, to spread the reconnects.
    pub after_ms: u64,
}

/// `resync`: continuity was lost; reload the channel's state and continue from here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resync {
    /// The channel.
    pub channel: String,
    /// Continue after this offset.
    pub offset: u64,
    /// In this epoch.
    pub epoch: String,
}

/// `expiring` (v1.1): the session's token expires in `in_ms` milliseconds; send
/// `refresh` before then, or the session is closed with 4401 "token expired".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expiring {
    /// Milliseconds until the token's `exp`.
    pub in_ms: u64,
}

/// `subscribed` (v1.1): the server added a channel to the session (server API).
/// Messages after `offset` follow, like after a `subscribe` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribed {
    /// The channel.
    pub channel: String,
    /// The channel's latest offset when the session joined.
    pub offset: u64,
    /// The channel's epoch.
    pub epoch: String,
}

/// `unsubscribed` (v1.1): the server removed a channel from the session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unsubscribed {
    /// The channel.
    pub channel: String,
    /// Why: `server` (the server API) or `permissions` (a refreshed token no longer
    /// allows it).
    pub reason: String,
}

/// A frame from the server.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`Reply`].
    Reply(Reply),
    /// See [`MessageFrame`].
    Message(MessageFrame),
    /// See [`EphemeralFrame`]: a `message` frame with `"ephemeral":true`.
    #[serde(rename = "message")]
    Ephemeral(EphemeralFrame),
    /// Heartbeat; answer with `pong`.
    Ping,
    /// See [`Reconnect`].
    Reconnect(Reconnect),
    /// See [`Resync`].
    Resync(Resync),
    /// See [`Expiring`].
    Expiring(Expiring),
    /// See [`Subscribed`].
    Subscribed(Subscribed),
    /// See [`Unsubscribed`].
    Unsubscribed(Unsubscribed),
}

#[derive(Deserialize)]
struct Tag<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    /// Only `message` frames have it; `true` marks an ephemeral one.
    #[serde(default)]
    ephemeral: bool,
}

impl ServerFrame {
    /// Parses a server frame (for clients). Two passes, because [`RawValue`] cannot sit
    /// inside a serde-tagged enum when deserializing.
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        let tag: Tag<'_> = serde_json::from_str(text)?;
        Ok(match tag.kind.as_ref() {
            "welcome" => ServerFrame::Welcome(serde_json::from_str(text)?),
            "reply" => ServerFrame::Reply(serde_json::from_str(text)?),
            "message" if tag.ephemeral => ServerFrame::Ephemeral(serde_json::from_str(text)?),
            "message" => ServerFrame::Message(serde_json::from_str(text)?),
            "ping" => ServerFrame::Ping,
            "reconnect" => ServerFrame::Reconnect(serde_json::from_str(text)?),
            "resync" => ServerFrame::Resync(serde_json::from_str(text)?),
            "expiring" => ServerFrame::Expiring(serde_json::from_str(text)?),
            "subscribed" => ServerFrame::Subscribed(serde_json::from_str(text)?),
            "unsubscribed" => ServerFrame::Unsubscribed(serde_json::from_str(text)?),
            other => {
                return Err(serde::de::Error::custom(format!(
                    "unknown frame type {other:?}"
                )))
            }
        })
    }

    /// The frame as JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialize")
    }
}

/// Encodes a `message` frame. `data` must be valid JSON text (it is copied verbatim);
/// `from` is the publisher (omitted when `None`). The hot path calls this once per
/// message per node and shares the bytes.
pub fn encode_message(
    channel: &str,
    offset: u64,
    epoch: &str,
    from: Option<&str>,
    data: &str,
) -> String {
    let from_len = from.map_or(0, |f| f.len() + 10);
    let mut out = String::with_capacity(64 + channel.len() + epoch.len() + from_len + data.len());
    out.push_str(r#"{"type":"message","channel":"#);
    push_json_str(&mut out, channel);
    out.push_str(r#","offset":"#);
    out.push_str(&offset.to_string());
    out.push_str(r#","epoch":"#);
    push_json_str(&mut out, epoch);
    if let Some(from) = from {
        out.push_str(r#","from":"#);
        push_json_str(&mut out, from);
    }
    out.push_str(r#","data":"#);
    out.push_str(data);
    out.push('}');
    out
}

/// Encodes an ephemeral `message` frame (see [`EphemeralFrame`]): no offset, no epoch.
/// `data` must be valid JSON text; `from` is omitted when `None`.
pub fn encode_ephemeral(channel: &str, from: Option<&str>, data: &str) -> String {
    let from_len = from.map_or(0, |f| f.len() + 10);
    let mut out = String::with_capacity(64 + channel.len() + from_len + data.len());
    out.push_str(r#"{"type":"message","channel":"#);
    push_json_str(&mut out, channel);
    out.push_str(r#","ephemeral":true"#);
    if let Some(from) = from {
        out.push_str(r#","from":"#);
        push_json_str(&mut out, from);
    }
    out.push_str(r#","data":"#);
    out.push_str(data);
    out.push('}');
    out
}

fn push_json_str(out: &mut String, s: &str) {
    out.push_str(&serde_json::to_string(s).expect("strings always serialize"));
}

#[cfg(test)]
mod tests;
