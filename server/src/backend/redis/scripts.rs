//! The broker's Lua scripts and how they are called.
//!
//! Each script runs as one atomic step on the Redis (or cluster shard) that owns its
//! keys. They are called with `EVALSHA`; after a Redis restart the script cache is
//! empty, so a `NOSCRIPT` answer is followed by one `EVAL` of the source, which also
//! caches it again.

use fred::clients::Client;
use fred::error::Error;
use fred::interfaces::LuaInterface;
use fred::types::scripts::Script;
use fred::types::{FromValue, Key, Value};

/// The broker's scripts, hashed once at start.
pub(crate) struct Scripts {
    /// Next offsets, history appends and publishes of a batch of messages (one or
    /// more channels of one cluster slot).
    pub publish: Script,
    /// History after an offset and the current position (with limit 0: the position
    /// alone). Creates nothing for a channel that has no keys.
    pub history: Script,
    /// One node's presence changes in one channel.
    pub presence_update: Script,
    /// Registry upsert with a heartbeat.
    pub register_node: Script,
    /// Live registry entries; drops stale ones.
    pub nodes: Script,
    /// Records a revocation.
    pub revoke: Script,
}

impl Scripts {
    /// Hashes the scripts (no I/O).
    pub(crate) fn new() -> Self {
        Self {
            publish: Script::from_lua(include_str!("publish.lua")),
            history: Script::from_lua(include_str!("history.lua")),
            presence_update: Script::from_lua(include_str!("presence_update.lua")),
            register_node: Script::from_lua(include_str!("register_node.lua")),
            nodes: Script::from_lua(include_str!("nodes.lua")),
            revoke: Script::from_lua(include_str!("revoke.lua")),
        }
    }
}

/// Runs `script` with `keys` (all in one cluster slot) and `args`.
pub(crate) async fn run<R: FromValue>(
    client: &Client,
    script: &Script,
    keys: Vec<String>,
    args: Vec<String>,
) -> Result<R, Error> {
    // The strings move into fred's reference-counted types: no copy of their text.
    let keys = keys.into_iter().map(Key::from).collect();
    let args = args.into_iter().map(Value::from).collect();
    run_values(client, script, keys, args).await
}

/// [`run`] with keys and arguments already in fred's types.
///
/// They are kept for the `EVAL` fallback: cloning them clones reference-counted
/// handles (`Bytes`), never the data, so a large payload is not copied per call.
pub(crate) async fn run_values<R: FromValue>(
    client: &Client,
    script: &Script,
    keys: Vec<Key>,
    args: Vec<Value>,
) -> Result<R, Error> {
    match client
        .evalsha(script.sha1().clone(), keys.clone(), args.clone())
        .await
    {
        Err(e) if e.details().starts_with("NOSCRIPT") => {
            // A NOSCRIPT answer means the script did not run, so running it once
            // more cannot apply it twice.
            let lua = script.lua().cloned().unwrap_or_default();
            client.eval(lua, keys, args).await
        }
        other => other,
    }
}
