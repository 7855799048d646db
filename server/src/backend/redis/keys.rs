//! Names and encodings the Redis broker shares with every other node: the key
//! layout, the pub/sub payload, and the parsing of `HERALD_REDIS_URL`.
//!
//! Key layout, for a prefix `P` and a channel `C`:
//!
//! | name | type | what |
//! |---|---|---|
//! | `P{C}:m` | hash | `e` = epoch, `o` = last offset; `x` = when publish.lua last refreshed the TTLs; created by the first publish only; expires `meta_ttl` after the last use, at most an eighth of the shorter TTL later (TTLs are refreshed once per eighth, see publish.lua) |
//! | `P{C}:h` | stream | history; entry id `<offset>-0`, fields `d` = data, `t` = ms (Redis clock), `f` = publisher (when known); trimmed by count and age every 16th offset, so it holds at most history size + 15 entries, of which reads return the last history size; expires `history_ttl` after the last publish, at most an eighth of the shorter TTL later |
//! | `P{C}:c` | pub/sub channel | publications of `C` (sharded pub/sub in a cluster) |
//! | `Ppresence:{C}` | hash | `<node>\|<user>` = that user's connections to `C` on that node |
//! | `Pnodes` | hash | node id = `<heartbeat ms>\|<NodeInfo JSON>` |
//! | `P{#control}:c` | pub/sub channel | server API user commands, to every node (JSON) |
//! | `Pcontrol-reply:<id>` | hash | node id = sessions a user command affected there; expires in 10 s |
//! | `Prevocations` | hash | user = `<before>\|<until>`; expires with the last revocation |
//! | `Pprobe:<node>:{T}` | pub/sub channel | liveness probes of one node, one per Redis shard |
//! | `P{C}:r` | hash | delivery receipts of a personal channel: `e` = epoch, `a` = acked offset, `p` = reported (unacked) up to; expires `meta_ttl` after the last write |
//! | `P{#receipts}:due` | sorted set | personal channels to check for unacked messages, score = when (Redis clock, ms) |
//! | `P{#receipts}:claimed` | sorted set | channels a node's sweeper is checking, score = when the claim runs out |
//! | `P{#webhook}:…` | (several) | the webhook event log and presence state, all in one slot: see `webhook.lua` |
//!
//! The hash tag `{C}` puts every key of a channel and its sharded pub/sub channel in
//! one cluster slot, which is what lets one Lua script touch them all. Channel names
//! cannot contain braces (see `herald_protocol`), and the prefix has its braces
//! replaced, so the first `{…}` of a name is always the channel.
//!
//! Reads never create a channel's keys: a channel without `P{C}:m` reads as offset 0
//! with the empty epoch, so subscribing to a channel never published to leaves nothing
//! in Redis (its presence hash is removed with the last user, see `presence_update.lua`).
//!
//! The stream id is the offset (`<offset>-0`): offsets only grow within an epoch, and
//! the stream is deleted whenever a new epoch starts, so ids stay increasing, and a
//! read "after offset N" is a plain `XRANGE <N+1>-0 +` (from the last history size
//! offsets at most). Age is kept in field `t`.
//!
//! Publishing is `publish.lua`, one call for every message of one cluster slot that is
//! queued at the time (`coalesce`): per call `TIME`, per channel `HMGET` / `HSET` of
//! `P{C}:m`, per message `XADD` and (S)`PUBLISH`, every 16th offset of a channel one
//! `XRANGE` of the stream head and one `XTRIM`, and once per eighth of the shorter TTL
//! a `PEXPIRE` of each key.

use std::fmt;

use fred::types::config::{Config, Server, ServerConfig};
use herald_protocol::channel::validate_user;

/// Where the broker's Redis is, parsed from the configured URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Topology {
    /// One Redis (`redis://host:port[/db]`): classic PUBLISH / SUBSCRIBE.
    Single,
    /// Redis Cluster (`redis-cluster://host:port[,host:port…]`): sharded pub/sub.
    Cluster,
    /// A primary with replicas found through Redis Sentinel
    /// (`redis-sentinel://host:port[,host:port…]/service-name`): classic pub/sub on the
    /// current primary, which fred finds again after a failover. The scripts check the
    /// primary's replication id, see [`SENTINEL_FLAG`].
    Sentinel,
}

/// The scripts' "check the replication id" argument: `1` in Sentinel mode, empty
/// otherwise.
///
/// Replication is asynchronous, so a promoted replica may lack the last writes of the
/// old primary: offsets that clients already saw may be handed out again, for other
/// messages. A promoted replica always gets a new replication id (`master_replid`), so
/// with this flag the publish and history scripts read the current id (`INFO
/// replication`, inside the script, so it is always the id of the Redis that runs it)
/// and store it in the channel's meta hash (field `r`). A channel last written under
/// another id starts a new epoch: its history is dropped and offsets restart at 1, and
/// the hub sends `resync` / `recovered: false` to clients at the old epoch. Only in
/// Sentinel mode: a single Redis restarted from its AOF also gets a new id, and keeps
/// its epochs (its data is what it wrote).
pub(crate) const SENTINEL_FLAG: &str = "1";

impl Topology {
    /// The scripts' replication id argument for this topology, see [`SENTINEL_FLAG`].
    pub(crate) fn replid_flag(&self) -> &'static str {
        match self {
            Topology::Sentinel => SENTINEL_FLAG,
            Topology::Single | Topology::Cluster => "",
        }
    }

    /// The command that publishes to a channel: sharded in a cluster.
    pub(crate) fn publish_command(&self) -> &'static str {
        match self {
            Topology::Single | Topology::Sentinel => "PUBLISH",
            Topology::Cluster => "SPUBLISH",
        }
    }
}

/// A `HERALD_REDIS_URL` that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadUrl(pub String);

impl fmt::Display for BadUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses `redis://host:port[/db]`, `redis-cluster://host:port[,host:port…]` or
/// `redis-sentinel://host:port[,host:port…]/service-name[/db]` into a fred config.
/// fred's own URL syntax lists extra nodes as `?node=` and the service as a query
/// parameter; ours is a comma list and a path, so those forms are parsed here. Both take
/// `user:password@` or `password@` before the hosts, like `redis://`; in Sentinel mode
/// the sentinels are authenticated with the same credentials as the Redis servers.
pub(crate) fn parse_url(url: &str) -> Result<(Config, Topology), BadUrl> {
    if let Some(rest) = url.strip_prefix("redis-cluster://") {
        let (auth, hosts) = split_auth(rest);
        let servers = parse_hosts(hosts.trim_end_matches('/'), "cluster node")?;
        let mut config = Config {
            server: ServerConfig::new_clustered(servers),
            ..Config::default()
        };
        apply_auth(&mut config, auth);
        Ok((config, Topology::Cluster))
    } else if let Some(rest) = url.strip_prefix("redis-sentinel://") {
        let (auth, rest) = split_auth(rest);
        let (hosts, path) = rest
            .split_once('/')
            .ok_or_else(|| BadUrl("a sentinel URL needs /service-name after the hosts".into()))?;
        let (service, database) = match path.trim_end_matches('/').split_once('/') {
            Some((service, db)) => {
                let db: u8 = db
                    .parse()
                    .map_err(|_| BadUrl(format!("bad database `{db}` in sentinel URL")))?;
                (service, Some(db))
            }
            None => (path.trim_end_matches('/'), None),
        };
        if service.is_empty() {
            return Err(BadUrl(
                "a sentinel URL needs /service-name after the hosts".into(),
            ));
        }
        let servers = parse_hosts(hosts, "sentinel")?;
        let mut config = Config {
            server: ServerConfig::Sentinel {
                hosts: servers
                    .into_iter()
                    .map(|(h, p)| Server::new(h, p))
                    .collect(),
                service_name: service.to_owned(),
            },
            database,
            ..Config::default()
        };
        apply_auth(&mut config, auth);
        Ok((config, Topology::Sentinel))
    } else if url.starts_with("redis://") {
        let config = Config::from_url_centralized(url).map_err(|e| BadUrl(e.to_string()))?;
        Ok((config, Topology::Single))
    } else {
        Err(BadUrl(
            "expected redis://host:port[/db], redis-cluster://host:port[,host:port…] or \
             redis-sentinel://host:port[,host:port…]/service-name"
                .into(),
        ))
    }
}

/// Splits `[auth@]rest` at the last `@` (a password may contain `@`).
fn split_auth(rest: &str) -> (Option<&str>, &str) {
    match rest.rsplit_once('@') {
        Some((auth, hosts)) => (Some(auth), hosts),
        None => (None, rest),
    }
}

/// Parses `host:port[,host:port…]`; `what` names a host in errors.
fn parse_hosts(hosts: &str, what: &str) -> Result<Vec<(String, u16)>, BadUrl> {
    let mut servers = Vec::new();
    for host in hosts.split(',') {
        let (name, port) = host
            .rsplit_once(':')
            .ok_or_else(|| BadUrl(format!("{what} `{host}` needs host:port")))?;
        let port: u16 = port
            .parse()
            .map_err(|_| BadUrl(format!("bad port in {what} `{host}`")))?;
        let name = name.trim_start_matches('[').trim_end_matches(']');
        if name.is_empty() {
            return Err(BadUrl(format!("{what} `{host}` needs a host")));
        }
        servers.push((name.to_owned(), port));
    }
    Ok(servers)
}

/// Sets `user:password` or `password` credentials.
fn apply_auth(config: &mut Config, auth: Option<&str>) {
    if let Some(auth) = auth {
        let (user, pass) = match auth.split_once(':') {
            Some((user, pass)) => (Some(user.to_owned()).filter(|u| !u.is_empty()), pass),
            None => (None, auth),
        };
        config.username = user;
        config.password = Some(pass.to_owned());
    }
}

/// Builds every Redis name the broker uses from the prefix.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
    /// This node's id, as it answers user commands.
    node_id: String,
    /// `P` + `probe:` + node id + `:`, what every probe channel of this node starts with.
    probe_prefix: String,
}

impl Keys {
    /// Names under `prefix` for node `node_id`. Braces in either are replaced with
    /// parentheses: a brace would change which part of a name is the hash tag.
    pub(crate) fn new(prefix: &str, node_id: &str) -> Self {
        let clean = |s: &str| s.replace('{', "(").replace('}', ")");
        let prefix = clean(prefix);
        let probe_prefix = format!("{prefix}probe:{}:", clean(node_id));
        Self {
            prefix,
            node_id: node_id.to_owned(),
            probe_prefix,
        }
    }

    /// This node's id.
    pub(crate) fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The channel's meta hash (epoch and offset).
    pub(crate) fn meta(&self, channel: &str) -> String {
        format!("{}{{{channel}}}:m", self.prefix)
    }

    /// The channel's history stream.
    pub(crate) fn history(&self, channel: &str) -> String {
        format!("{}{{{channel}}}:h", self.prefix)
    }

    /// The channel's pub/sub channel.
    pub(crate) fn pubsub(&self, channel: &str) -> String {
        format!("{}{{{channel}}}:c", self.prefix)
    }

    /// The channel's delivery receipts hash (see `receipts.rs`).
    pub(crate) fn receipts(&self, channel: &str) -> String {
        format!("{}{{{channel}}}:r", self.prefix)
    }

    /// The set of personal channels due for the unacked check (its own slot).
    pub(crate) fn receipts_due(&self) -> String {
        format!("{}{{#receipts}}:due", self.prefix)
    }

    /// The set of channels claimed by a sweeper (the due set's slot).
    pub(crate) fn receipts_claimed(&self) -> String {
        format!("{}{{#receipts}}:claimed", self.prefix)
    }

    /// The channel's presence hash.
    pub(crate) fn presence(&self, channel: &str) -> String {
        format!("{}presence:{{{channel}}}", self.prefix)
    }

    /// The node registry hash.
    pub(crate) fn nodes(&self) -> String {
        format!("{}nodes", self.prefix)
    }

    /// The revocations hash: user = `<before>|<until>` (unix seconds).
    pub(crate) fn revocations(&self) -> String {
        format!("{}revocations", self.prefix)
    }

    /// The hash where nodes answer user command `id` (node id = sessions affected).
    pub(crate) fn control_reply(&self, id: &str) -> String {
        format!("{}control-reply:{id}", self.prefix)
    }

    /// What every webhook key starts with: `P{#webhook}:`. One hash tag, so the
    /// webhook scripts run atomically on Redis Cluster too.
    pub(crate) fn webhook(&self) -> String {
        format!("{}{{#webhook}}:", self.prefix)
    }

    /// The herald channel of a pub/sub channel name, if it is one of ours.
    pub(crate) fn channel_of<'a>(&self, pubsub: &'a str) -> Option<&'a str> {
        pubsub
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('{')?
            .strip_suffix("}:c")
    }

    /// A probe channel of this node whose hash tag is `tag`.
    pub(crate) fn probe(&self, tag: &str) -> String {
        format!("{}{{{tag}}}", self.probe_prefix)
    }

    /// Whether a pub/sub channel is one of this node's probe channels.
    pub(crate) fn is_probe(&self, pubsub: &str) -> bool {
        pubsub.starts_with(self.probe_prefix.as_str())
    }
}

/// The internal channel that carries server API user commands to every node. `#` is
/// not allowed in channel names, so no client channel can collide with it.
pub(crate) const CONTROL: &str = "#control";

/// The field of a presence hash for `user` on `node`.
pub(crate) fn presence_field(node: &str, user: &str) -> String {
    format!("{node}|{user}")
}

/// Splits a presence field into (node, user). User ids cannot contain `|`, so the
/// last `|` is the separator even if a node id contains one.
pub(crate) fn split_presence_field(field: &str) -> Option<(&str, &str)> {
    field.rsplit_once('|')
}

/// A publication as it travels over pub/sub: `<offset>:<epoch>:<data>`, or
/// `<offset>:<epoch>:<from>:<data>` when it has a publisher.
///
/// Text, not JSON: the data is already JSON text and is passed through untouched,
/// epochs are alphanumeric, and the offset is decimal, so the first two `:` delimit
/// the fields. Redis builds it in the publish script, Rust only parses it.
///
/// The publisher field is recognised without a marker, and unambiguously: a user id
/// is 1–128 bytes of `[A-Za-z0-9_.@-]` (no `:`), while JSON data never starts with such
/// a run followed by `:` (an object, array or string starts with `{`, `[` or `"`; a
/// number or literal contains no `:` and nothing may follow it). Messages without a
/// publisher keep the v1 form, so nodes of both versions read them during a rolling
/// upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Payload<'a> {
    /// The message's offset.
    pub offset: u64,
    /// The channel's epoch.
    pub epoch: &'a str,
    /// The publisher, when known.
    pub from: Option<&'a str>,
    /// The JSON data.
    pub data: &'a str,
}

/// Parses a pub/sub payload; `None` if it is not one.
pub(crate) fn parse_payload(text: &str) -> Option<Payload<'_>> {
    let (offset, rest) = text.split_once(':')?;
    let (epoch, rest) = rest.split_once(':')?;
    let (from, data) = match rest.split_once(':') {
        Some((from, data)) if validate_user(from).is_ok() => (Some(from), data),
        _ => (None, rest),
    };
    Some(Payload {
        offset: offset.parse().ok()?,
        epoch,
        from,
        data,
    })
}

/// The marker that starts an ephemeral message's pub/sub payload: `e:<data>`, or
/// `e:<from>:<data>` with a publisher. An ordinary payload starts with a decimal
/// offset, so the two cannot be confused; a node that predates ephemeral messages
/// fails to parse the offset and drops it (a warning), which is what an ephemeral
/// message may suffer anyway.
pub(crate) const EPHEMERAL_MARK: &str = "e:";

/// Builds an ephemeral message's pub/sub payload (see [`EPHEMERAL_MARK`]). `from` is a
/// valid user id (no `:`), checked by the caller.
pub(crate) fn ephemeral_payload(from: Option<&str>, data: &str) -> String {
    match from {
        Some(from) => format!("{EPHEMERAL_MARK}{from}:{data}"),
        None => format!("{EPHEMERAL_MARK}{data}"),
    }
}

/// Parses an ephemeral payload into `(from, data)`; `None` if `text` is not one. The
/// publisher is recognised as in [`Payload`].
pub(crate) fn parse_ephemeral(text: &str) -> Option<(Option<&str>, &str)> {
    let rest = text.strip_prefix(EPHEMERAL_MARK)?;
    Some(match rest.split_once(':') {
        Some((from, data)) if validate_user(from).is_ok() => (Some(from), data),
        _ => (None, rest),
    })
}

/// A fresh random epoch, offered to the scripts, which use it only when a channel's
/// metadata is missing. The same alphabet as the memory broker's.
pub(crate) fn new_epoch() -> String {
    crate::backend::streams::new_epoch()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_share_the_channel_hash_tag() {
        let k = Keys::new("t1:", "node-1");
        assert_eq!(k.meta("room:1"), "t1:{room:1}:m");
        assert_eq!(k.history("room:1"), "t1:{room:1}:h");
        assert_eq!(k.pubsub("room:1"), "t1:{room:1}:c");
        assert_eq!(k.presence("room:1"), "t1:presence:{room:1}");
        assert_eq!(k.channel_of("t1:{room:1}:c"), Some("room:1"));
        assert_eq!(k.channel_of("t2:{room:1}:c"), None);
        assert!(k.is_probe(&k.probe("3")));
        assert_eq!(k.channel_of(&k.probe("3")), None);
        let slot = |s: &str| fred::util::redis_keyslot(s.as_bytes());
        assert_eq!(slot(&k.meta("a")), slot(&k.pubsub("a")));
        assert_eq!(slot(&k.history("a")), slot(&k.presence("a")));
        assert_eq!(slot(&k.receipts("user:a")), slot(&k.meta("user:a")));
        assert_eq!(slot(&k.receipts_due()), slot(&k.receipts_claimed()));
    }

    #[test]
    fn braces_in_the_prefix_cannot_steal_the_hash_tag() {
        let k = Keys::new("{x}", "n{1}");
        assert_eq!(k.meta("a"), "(x){a}:m");
        assert!(k.probe("t").ends_with("n(1):{t}"));
    }

    #[test]
    fn payload_round_trip() {
        let p = parse_payload(r#"17:e1Ab:{"a":"b:c"}"#).unwrap();
        assert_eq!(p.offset, 17);
        assert_eq!(p.epoch, "e1Ab");
        assert_eq!(p.from, None);
        assert_eq!(p.data, r#"{"a":"b:c"}"#);
        let p = parse_payload(r#"18:e1Ab:alice@x.io:{"a":"b:c"}"#).unwrap();
        assert_eq!((p.offset, p.from), (18, Some("alice@x.io")));
        assert_eq!(p.data, r#"{"a":"b:c"}"#);
        assert_eq!(parse_payload("3:e:bob:7").unwrap().data, "7");
        assert_eq!(parse_payload("3:e:-1.5e3").unwrap().data, "-1.5e3");
        assert_eq!(parse_payload(r#"3:e:"x:y""#).unwrap().from, None);
        assert!(parse_payload("x:e:1").is_none());
        assert!(parse_payload("12").is_none());
    }

    /// What the publish script builds, for the property tests.
    fn build_payload(offset: u64, epoch: &str, from: Option<&str>, data: &str) -> String {
        match from {
            Some(from) => format!("{offset}:{epoch}:{from}:{data}"),
            None => format!("{offset}:{epoch}:{data}"),
        }
    }

    fn json_data() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(serde_json::Value::from),
            "[a-z:@.\\\"]{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map("[a-z:]{1,6}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
        .prop_map(|v| v.to_string())
    }

    proptest::proptest! {
        #[test]
        fn payloads_parse_back(
            offset in 1u64..u64::MAX,
            epoch in "[A-Za-z0-9]{8}",
            from in proptest::option::of("[A-Za-z0-9_.@-]{1,128}"),
            data in json_data(),
        ) {
            let text = build_payload(offset, &epoch, from.as_deref(), &data);
            let p = parse_payload(&text).unwrap();
            proptest::prop_assert_eq!(p.offset, offset);
            proptest::prop_assert_eq!(p.epoch, epoch.as_str());
            proptest::prop_assert_eq!(p.from, from.as_deref());
            proptest::prop_assert_eq!(p.data, data.as_str());
        }
    }

    #[test]
    fn ephemeral_payloads_are_told_apart() {
        let text = ephemeral_payload(Some("alice@x.io"), r#"{"a":"b:c"}"#);
        assert_eq!(
            parse_ephemeral(&text),
            Some((Some("alice@x.io"), r#"{"a":"b:c"}"#))
        );
        assert!(
            parse_payload(&text).is_none(),
            "not an ordinary publication"
        );
        let text = ephemeral_payload(None, r#""x:y""#);
        assert_eq!(parse_ephemeral(&text), Some((None, r#""x:y""#)));
        assert_eq!(parse_ephemeral("e:7"), Some((None, "7")));
        assert_eq!(parse_ephemeral(r#"17:e1Ab:{"a":1}"#), None);
    }

    proptest::proptest! {
        #[test]
        fn ephemeral_payloads_parse_back(
            from in proptest::option::of("[A-Za-z0-9_.@-]{1,128}"),
            data in json_data(),
        ) {
            let text = ephemeral_payload(from.as_deref(), &data);
            proptest::prop_assert_eq!(parse_ephemeral(&text), Some((from.as_deref(), data.as_str())));
            proptest::prop_assert!(parse_payload(&text).is_none());
        }
    }

    #[test]
    fn presence_fields() {
        assert_eq!(
            split_presence_field(&presence_field("n|1", "bob")),
            Some(("n|1", "bob"))
        );
    }

    #[test]
    fn urls() {
        let (c, t) = parse_url("redis://127.0.0.1:6380/2").unwrap();
        assert_eq!(t, Topology::Single);
        assert_eq!(c.database, Some(2));
        let (c, t) = parse_url("redis-cluster://127.0.0.1:7000,127.0.0.1:7001").unwrap();
        assert_eq!(t, Topology::Cluster);
        assert_eq!(c.server.hosts().len(), 2);
        assert!(parse_url("redis-cluster://127.0.0.1").is_err());
        let (c, t) =
            parse_url("redis-sentinel://:s3cr@t@127.0.0.1:26379,[::1]:26380/mymaster").unwrap();
        assert_eq!(t, Topology::Sentinel);
        assert_eq!(c.password.as_deref(), Some("s3cr@t"));
        assert_eq!(c.username, None);
        match &c.server {
            ServerConfig::Sentinel {
                hosts,
                service_name,
            } => {
                assert_eq!(service_name, "mymaster");
                assert_eq!(hosts.len(), 2);
                assert_eq!(hosts[1].port, 26380);
            }
            other => panic!("not a sentinel config: {other:?}"),
        }
        let (c, _) = parse_url("redis-sentinel://u:p@h:1/svc/3/").unwrap();
        assert_eq!((c.username.as_deref(), c.database), (Some("u"), Some(3)));
        for bad in [
            "redis-sentinel://h:1",
            "redis-sentinel://h:1/",
            "redis-sentinel://h/svc",
            "redis-sentinel://h:x/svc",
            "redis-sentinel://:1/svc",
            "redis-sentinel://h:1/svc/db",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        assert!(parse_url("http://x").is_err());
        assert!(parse_url("redis://").is_err());
    }
}
