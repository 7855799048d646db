//! Recovery exactness (docs/protocol.md "Recovery and the delivery guarantee"): `since` and
//! `resume` deliver every missed message exactly once, in order, before live ones; a
//! wrong epoch or a position older than the history answers `recovered: false` with the
//! current position; and a client that reconnects again and again while messages are
//! published concurrently sees every offset exactly once, in order.

#[path = "support/client.rs"]
mod client;
#[path = "support/node.rs"]
mod node;
#[path = "support/panics.rs"]
mod panics;

use panics::{assert_no_server_panic, watch_panics};
use std::time::Duration;

use client::Client;
use herald_server::Config;
use node::TestNode;
use serde_json::{json, Value};

async fn start(config: Config) -> TestNode {
    watch_panics();
    TestNode::start(config).await
}

async fn publish_n(n: &TestNode, channel: &str, range: std::ops::RangeInclusive<u64>) -> Value {
    let mut epoch = Value::Null;
    for i in range {
        let (status, body) = n.publish(json!({"channel": channel, "data": i})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["offset"], i,
            "offsets are 1, 2, 3 … without gaps: {body}"
        );
        epoch = body["epoch"].clone();
    }
    epoch
}

/// Reads the next `count` messages of `channel` and checks they are `from..`, in order,
/// with `data` equal to the offset.
async fn expect_offsets(c: &mut Client, channel: &str, from: u64, count: u64) {
    for i in from..from + count {
        let m = c.next_message().await;
        assert_eq!(m["type"], "message", "{m}");
        assert_eq!(m["channel"], channel, "{m}");
        assert_eq!(m["offset"], i, "{m}");
        assert_eq!(m["data"], i, "{m}");
    }
}

fn tok(n: &TestNode) -> String {
    n.token("alice", &["room:*"], &[])
}

#[tokio::test]
async fn subscribe_since_recovers_exactly_the_missed_messages() {
    let n = start(node::test_config()).await;
    let epoch = publish_n(&n, "room:1", 1..=5).await;
    let (mut a, _) = Client::hello(&n.ws_url(), &tok(&n), json!({})).await;
    let r = a
        .request(json!({"type": "subscribe", "channel": "room:1", "since": {"offset": 2, "epoch": epoch}}))
        .await;
    assert_eq!(
        r["result"],
        json!({"offset": 5, "epoch": epoch, "recovered": true}),
        "{r}"
    );
    expect_offsets(&mut a, "room:1", 3, 3).await;
    publish_n(&n, "room:1", 6..=6).await;
    expect_offsets(&mut a, "room:1", 6, 1).await;
    assert!(
        a.silent_for(Duration::from_millis(150)).await,
        "a duplicate or extra message"
    );

    // since = the latest offset: recovered, nothing to replay.
    let (mut b, _) = Client::hello(&n.ws_url(), &tok(&n), json!({})).await;
    let r = b
        .request(json!({"type": "subscribe", "channel": "room:1", "since": {"offset": 6, "epoch": epoch}}))
        .await;
    assert_eq!(
        r["result"],
        json!({"offset": 6, "epoch": epoch, "recovered": true}),
        "{r}"
    );
    assert!(b.silent_for(Duration::from_millis(150)).await);
    // since = 0 in the right epoch: everything in history.
    let (mut c, _) = Client::hello(&n.ws_url(), &tok(&n), json!({})).await;
    let r = c
        .request(json!({"type": "subscribe", "channel": "room:1", "since": {"offset": 0, "epoch": epoch}}))
        .await;
    assert_eq!(r["result"]["recovered"], true, "{r}");
    expect_offsets(&mut c, "room:1", 1, 6).await;
    // Subscribing without since: the current position, recovered false, no replay.
    let (mut d, _) = Client::hello(&n.ws_url(), &tok(&n), json!({})).await;
    let r = d
        .request(json!({"type": "subscribe", "channel": "room:1"}))
        .await;
    assert_eq!(r["result"]["offset"], 6, "{r}");
    assert_eq!(r["result"]["epoch"], epoch, "{r}");
    assert!(d.silent_for(Duration::from_millis(150)).await);
    assert_no_server_panic();
}

#[tokio::test]
async fn resume_in_hello_recovers_several_channels_and_the_personal_one() {
    let n = start(node::test_config()).await;
    let (mut a, welcome) = Client::hello(&n.ws_url(), &tok(&n), json!({})).await;
    // Never published to yet: (0, ""); the first publish names the epoch.
    assert_eq!(
        welcome["subscriptions"]["user:alice"],
        json!({"offset": 0, "epoch": "", "recovered": false}),
        "{welcome}"
    );
    for ch in ["room:1", "room:2"] {
        a.request(json!({"type": "subscribe", "channel": ch})).await;
    }
    let e1 = publish_n(&n, "room:1", 1..=2).await;
    let e2 = publish_n(&n, "room:2", 1..=1).await;
    let personal_epoch = n.publish(json!({"user": "alice", "data": 1})).await.1["epoch"].clone();
    let mut last = std::collections::HashMap::new();
    for _ in 0..4 {
        let m = a.next_message().await;
        last.insert(
            m["channel"].as_str().unwrap().to_owned(),
            m["offset"].as_u64().unwrap(),
        );
    }
    assert_eq!(last["room:1"], 2);
    a.close().await;
    publish_n(&n, "room:1", 3..=4).await;
    publish_n(&n, "room:2", 2..=3).await;
    for i in 2..=3 {
        n.publish(json!({"user": "alice", "data": i})).await;
    }
    let resume = json!({
        "room:1": {"offset": 2, "epoch": e1},
        "room:2": {"offset": 1, "epoch": e2},
        "user:alice": {"offset": 1, "epoch": personal_epoch},
    });
    let (mut a, w) = Client::hello(&n.ws_url(), &tok(&n), resume).await;
    let subs = &w["subscriptions"];
    assert_eq!(
        subs["room:1"],
        json!({"offset": 4, "epoch": e1, "recovered": true}),
        "{w}"
    );
    assert_eq!(
        subs["room:2"],
        json!({"offset": 3, "epoch": e2, "recovered": true}),
        "{w}"
    );
    assert_eq!(
        subs["user:alice"],
        json!({"offset": 3, "epoch": personal_epoch, "recovered": true}),
        "{w}"
    );
    // Per channel: the missed messages in offset order, each once.
    let mut got: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for _ in 0..6 {
        let m = a.next_message().await;
        assert_eq!(m["type"], "message", "{m}");
        got.entry(m["channel"].as_str().unwrap().to_owned())
            .or_default()
            .push(m["offset"].as_u64().unwrap());
    }
    assert_eq!(got["room:1"], vec![3, 4]);
    assert_eq!(got["room:2"], vec![2, 3]);
    assert_eq!(got["user:alice"], vec![2, 3]);
    assert!(a.silent_for(Duration::from_millis(150)).await);
    // Live messages follow.
    publish_n(&n, "room:1", 5..=5).await;
    expect_offsets(&mut a, "room:1", 5, 1).await;
    assert_no_server_panic();
}

#[tokio::test]
async fn wrong_epoch_is_not_recovered_and_gives_the_current_position() {
    let n = start(node::test_config()).await;
    let epoch = publish_n(&n, "room:1", 1..=4).await;
    let resume = json!({"room:1": {"offset": 1, "epoch": "not-the-epoch"}});
    let (mut a, w) = Client::hello(&n.ws_url(), &tok(&n), resume).await;
    assert_eq!(
        w["subscriptions"]["room:1"],
        json!({"offset": 4, "epoch": epoch, "recovered": false}),
        "{w}"
    );
    assert!(
        a.silent_for(Duration::from_millis(150)).await,
        "nothing replayed"
    );
    publish_n(&n, "room:1", 5..=5).await;
    expect_offsets(&mut a, "room:1", 5, 1).await;
    // The same through subscribe. (Offset 0 would continue with any epoch: see
    // offset_zero_recovers_from_the_start_in_any_epoch in empty_channels.rs.)
    let (mut b, _) = Client::hello(&n.ws_url(), &tok(&n), json!({})).await;
    let r = b
        .request(json!({"type": "subscribe", "channel": "room:1", "since": {"offset": 2, "epoch": "nope"}}))
        .await;
    assert_eq!(
        r["result"],
        json!({"offset": 5, "epoch": epoch, "recovered": false}),
        "{r}"
    );
    assert!(b.silent_for(Duration::from_millis(150)).await);
    assert_no_server_panic();
}

#[tokio::test]
async fn a_position_older_than_the_history_is_not_recovered() {
    let n = start(Config {
        history_size: 5,
        ..node::test_config()
    })
    .await;
    let epoch = publish_n(&n, "room:1", 1..=10).await;
    // History holds 6..=10: from 5 is still complete, from 4 is not.
    let (mut a, w) = Client::hello(
        &n.ws_url(),
        &tok(&n),
        json!({"room:1": {"offset": 5, "epoch": epoch}}),
    )
    .await;
    assert_eq!(
        w["subscriptions"]["room:1"],
        json!({"offset": 10, "epoch": epoch, "recovered": true}),
        "{w}"
    );
    expect_offsets(&mut a, "room:1", 6, 5).await;
    for since in [0, 2, 4] {
        let (mut b, w) = Client::hello(
            &n.ws_url(),
            &tok(&n),
            json!({"room:1": {"offset": since, "epoch": epoch}}),
        )
        .await;
        assert_eq!(
            w["subscriptions"]["room:1"],
            json!({"offset": 10, "epoch": epoch, "recovered": false}),
            "since {since}: {w}"
        );
        assert!(
            b.silent_for(Duration::from_millis(100)).await,
            "since {since}: a partial replay"
        );
        b.close().await;
    }
    publish_n(&n, "room:1", 11..=11).await;
    expect_offsets(&mut a, "room:1", 11, 1).await;
    assert_no_server_panic();
}

#[tokio::test]
async fn a_position_beyond_the_latest_is_not_recovered() {
    let n = start(node::test_config()).await;
    let epoch = publish_n(&n, "room:1", 1..=3).await;
    let (mut a, w) = Client::hello(
        &n.ws_url(),
        &tok(&n),
        json!({"room:1": {"offset": 50, "epoch": epoch}}),
    )
    .await;
    assert_eq!(
        w["subscriptions"]["room:1"],
        json!({"offset": 3, "epoch": epoch, "recovered": false}),
        "{w}"
    );
    publish_n(&n, "room:1", 4..=4).await;
    expect_offsets(&mut a, "room:1", 4, 1).await;
    assert_no_server_panic();
}

/// The key test: a publisher publishes continuously over HTTP while a client disconnects
/// and reconnects with its last position again and again (alternating `resume` in hello
/// and `since` in subscribe, polite closes and dropped connections). Its concatenated
/// stream holds every offset exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishing_while_reconnecting_loses_and_duplicates_nothing() {
    const TOTAL: u64 = 2000;
    let n = start(Config {
        history_size: 5000,
        ..node::test_config()
    })
    .await;
    let token = tok(&n);
    let url = n.ws_url();
    // Subscribed before the first publish: the channel reads as (0, ""), and the first
    // message names the epoch (offset 0 continues with any epoch).
    let (mut c, _) = Client::hello(&url, &token, json!({})).await;
    let r = c
        .request(json!({"type": "subscribe", "channel": "room:live"}))
        .await;
    assert_eq!(r["result"]["offset"], 0, "{r}");
    assert_eq!(r["result"]["epoch"], "", "{r}");
    let mut epoch = r["result"]["epoch"].clone();

    let publisher = {
        let http = n.http();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            for i in 1..=TOTAL {
                let r = client
                    .post(format!("{http}/v1/publish"))
                    .bearer_auth(node::API_KEY)
                    .json(&json!({"channel": "room:live", "data": i}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 200);
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["offset"], i, "{body}");
            }
        })
    };

    let mut seen: Vec<u64> = Vec::with_capacity(TOTAL as usize);
    let mut round: u64 = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.last().copied().unwrap_or(0) < TOTAL {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stalled at {:?}",
            seen.last()
        );
        // Read a varying number of messages on this connection.
        let take = 37 + (round * 53) % 211;
        let mut got = 0;
        while got < take && seen.last().copied().unwrap_or(0) < TOTAL {
            let v = c
                .recv_wire(Duration::from_secs(10))
                .await
                .expect("a message");
            if v["type"] != "message" {
                continue;
            }
            assert_eq!(v["channel"], "room:live", "{v}");
            if seen.is_empty() {
                epoch = v["epoch"].clone();
                assert_ne!(epoch, "", "{v}");
            }
            assert_eq!(v["epoch"], epoch, "{v}");
            let offset = v["offset"].as_u64().unwrap();
            assert_eq!(v["data"], offset, "{v}");
            let expected = seen.last().copied().unwrap_or(0) + 1;
            assert_eq!(offset, expected, "round {round}: a gap or a duplicate");
            seen.push(offset);
            got += 1;
        }
        if seen.last().copied().unwrap_or(0) >= TOTAL {
            break;
        }
        // Leave: politely or by dropping the connection.
        if round % 3 == 2 {
            drop(c);
        } else {
            c.close().await;
        }
        round += 1;
        let last = seen.last().copied().unwrap_or(0);
        let position = json!({"offset": last, "epoch": epoch});
        if round.is_multiple_of(2) {
            let (c2, w) = Client::hello(&url, &token, json!({"room:live": position})).await;
            let sub = &w["subscriptions"]["room:live"];
            assert_eq!(sub["recovered"], true, "round {round}: {w}");
            assert!(sub["offset"].as_u64().unwrap() >= last, "{w}");
            c = c2;
        } else {
            let (mut c2, _) = Client::hello(&url, &token, json!({})).await;
            let r = c2
                .request(json!({"type": "subscribe", "channel": "room:live", "since": position}))
                .await;
            assert_eq!(r["result"]["recovered"], true, "round {round}: {r}");
            c = c2;
        }
    }
    tokio::time::timeout(Duration::from_secs(30), publisher)
        .await
        .expect("the publisher finishes")
        .expect("the publisher");
    assert_eq!(seen.len() as u64, TOTAL);
    assert_eq!(seen, (1..=TOTAL).collect::<Vec<_>>());
    assert!(
        round >= 5,
        "only {round} reconnects: the test did not exercise recovery"
    );
    assert!(
        c.silent_for(Duration::from_millis(200)).await,
        "a message after the last"
    );
    assert_no_server_panic();
}

/// Several subscribers on one channel with a publisher from a client: each sees every
/// offset once, in order (the delivery guarantee on a live channel).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_delivery_is_in_order_without_gaps_for_every_subscriber() {
    const TOTAL: u64 = 500;
    let n = start(Config {
        max_messages_per_sec: 100_000,
        ..node::test_config()
    })
    .await;
    let mut readers = Vec::new();
    for i in 0..4 {
        let tok = n.token(&format!("reader{i}"), &["room:*"], &[]);
        let (mut c, _) = Client::hello(&n.ws_url(), &tok, json!({})).await;
        c.request(json!({"type": "subscribe", "channel": "room:fan"}))
            .await;
        readers.push(tokio::spawn(async move {
            let mut offsets = Vec::new();
            while (offsets.len() as u64) < TOTAL {
                let m = c.next_message().await;
                offsets.push(m["offset"].as_u64().unwrap());
            }
            offsets
        }));
    }
    let (mut p, _) = Client::hello(&n.ws_url(), &n.token("pub", &[], &["room:*"]), json!({})).await;
    let (hp, http_n) = (n.http(), TOTAL / 2);
    let http_pub = tokio::spawn(async move {
        let client = reqwest::Client::new();
        for _ in 0..http_n {
            let r = client
                .post(format!("{hp}/v1/publish"))
                .bearer_auth(node::API_KEY)
                .json(&json!({"channel": "room:fan", "data": "h"}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
        }
    });
    for _ in 0..TOTAL - http_n {
        let r = p
            .request(json!({"type": "publish", "channel": "room:fan", "data": "c"}))
            .await;
        assert!(r["result"].is_object(), "{r}");
    }
    http_pub.await.unwrap();
    for r in readers {
        let offsets = tokio::time::timeout(Duration::from_secs(20), r)
            .await
            .expect("a reader finishes")
            .unwrap();
        assert_eq!(offsets, (1..=TOTAL).collect::<Vec<_>>());
    }
    assert_no_server_panic();
}

/// Leaving a channel and coming back with `since` recovers what was published meanwhile,
/// and a second subscribe to the same channel does not duplicate delivery.
#[tokio::test]
async fn unsubscribe_then_subscribe_since_recovers_and_double_subscribe_does_not_duplicate() {
    let n = start(node::test_config()).await;
    let (mut a, _) = Client::hello(&n.ws_url(), &tok(&n), json!({})).await;
    let r = a
        .request(json!({"type": "subscribe", "channel": "room:1"}))
        .await;
    assert_eq!(r["result"]["epoch"], "", "never published: {r}");
    let r = a
        .request(json!({"type": "subscribe", "channel": "room:1"}))
        .await;
    assert!(r["error"].is_object() || r["result"].is_object(), "{r}");
    let epoch = publish_n(&n, "room:1", 1..=2).await;
    expect_offsets(&mut a, "room:1", 1, 2).await;
    assert!(
        a.silent_for(Duration::from_millis(150)).await,
        "a duplicate"
    );
    let r = a
        .request(json!({"type": "unsubscribe", "channel": "room:1"}))
        .await;
    assert_eq!(r["result"], json!({}), "{r}");
    publish_n(&n, "room:1", 3..=5).await;
    assert!(
        a.silent_for(Duration::from_millis(150)).await,
        "delivered after unsubscribe"
    );
    let r = a
        .request(json!({"type": "subscribe", "channel": "room:1", "since": {"offset": 2, "epoch": epoch}}))
        .await;
    assert_eq!(
        r["result"],
        json!({"offset": 5, "epoch": epoch, "recovered": true}),
        "{r}"
    );
    expect_offsets(&mut a, "room:1", 3, 3).await;
    publish_n(&n, "room:1", 6..=6).await;
    expect_offsets(&mut a, "room:1", 6, 1).await;
    assert!(
        a.silent_for(Duration::from_millis(150)).await,
        "a duplicate"
    );
    assert_no_server_panic();
}
