//! Tests of the hub over the memory backend: subscriptions, repair buffers, parallel fan-out, locks, the mailbox's droppable items.

use super::*;
use std::sync::atomic::Ordering;

use tokio::task::JoinHandle;
use tungstenite::Utf8Bytes;

use super::channel::RepairBuffer;
use super::fanout::PARALLEL_FANOUT;
use crate::backend::memory::MemoryBackend;
use crate::backend::settings::BackendSettings;
use crate::config::Config;
use crate::continuity::buffered_size;
use crate::mailbox::{EphemeralDelivery, Mailbox, Outbound, Refused};
use crate::users::Users;

fn hub() -> (Arc<Hub>, JoinHandle<()>) {
    hub_with(|hub| hub)
}

/// A hub on a memory broker, changed by `setup` before it starts.
fn hub_with(setup: impl FnOnce(Hub) -> Hub) -> (Arc<Hub>, JoinHandle<()>) {
    let settings = BackendSettings::from_config(&Config::default());
    let broker = Arc::new(MemoryBackend::new(settings.clone()));
    let events = broker.events().expect("events");
    let hub = Arc::new(setup(Hub::new(
        Arc::new(Metrics::new()),
        broker.clone(),
        broker,
        Duration::from_millis(10),
        100,
    )));
    // The users keep a backend of their own, so that dropping the hub drops the
    // hub's backend (and its event stream); they live as long as the test.
    let users: &'static Arc<Users> = Box::leak(Box::new(Arc::new(Users::new(Arc::new(
        MemoryBackend::new(settings),
    )))));
    let consumer = crate::events::consume(&hub, users, events);
    (hub, consumer)
}

/// Once the broker confirmed a channel's subscription, the entry keeps only that
/// fact (not the shared request, ~200 bytes per channel), and later joins return
/// without asking or waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_subscription_is_kept_as_a_fact() {
    let (hub, _consumer) = hub();
    let live = |hub: &Hub| {
        matches!(
            hub.shard("c").channels["c"].subscription,
            Subscription::Live
        )
    };
    hub.join("c", 1, Arc::new(Mailbox::new(10)))
        .await
        .expect("join");
    assert!(live(&hub));
    hub.join("c", 2, Arc::new(Mailbox::new(10)))
        .await
        .expect("join");
    assert!(live(&hub));
    assert_eq!(hub.shard("c").channels["c"].sessions.len(), 2);
    // The last session leaves and the entry is reaped: a new join asks again.
    hub.leave("c", 1);
    hub.leave("c", 2);
    tokio::time::sleep(Duration::from_millis(20)).await;
    hub.reap();
    assert!(!hub.shard("c").channels.contains_key("c"));
    hub.join("c", 3, Arc::new(Mailbox::new(10)))
        .await
        .expect("join");
    assert!(live(&hub));
}

/// A repair's buffer holds what its bounds allow; what it refuses is read from
/// history once the repair is done, even with no later message on the channel. So
/// the bound costs a history read, never a message: the session gets every offset
/// once, in order, and the budget is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_repair_buffer_loses_nothing() {
    // Ten publications of data "1" fill a channel's buffer.
    let one = buffered_size(&Publication {
        offset: 1,
        epoch: "e".into(),
        data: "1".into(),
        from: None,
    });
    let (hub, _consumer) = hub_with(|mut hub| {
        hub.repair_budget = Arc::new(RepairBudget {
            used: AtomicUsize::new(0),
            channel_limit: 10 * one,
            node_limit: 1 << 20,
        });
        hub
    });
    let a = Arc::new(Mailbox::new(1_000));
    hub.join("c", 1, Arc::clone(&a)).await.expect("join");
    let first = hub.streams.publish("c", "1", None).await.expect("publish");
    wait_until("first delivery", || a.queue().len() == 1).await;
    assert_eq!(offsets(&a), vec![1]);
    let received = || hub.metrics.broker_messages_received.get();

    // A repair from offset 1 is running: live publications are buffered.
    {
        let mut shard = hub.shard("c");
        let entry = shard.channels.get_mut("c").expect("entry");
        entry.repairing = Some(Box::new(RepairBuffer::new(&hub.repair_budget)));
    }
    for _ in 2..=11 {
        hub.streams.publish("c", "1", None).await.expect("publish");
    }
    wait_until("10 buffered", || received() == 11).await;
    // The repair's history read happens here: it sees offsets 2..=11.
    let history = hub.streams.history("c", 1, 100).await.expect("history");
    assert_eq!(history.position.offset, 11);
    // The buffer is full: 30 more are refused (and the session gets nothing yet).
    for _ in 12..=41 {
        hub.streams.publish("c", "1", None).await.expect("publish");
    }
    wait_until("all seen by the hub", || received() == 41).await;
    {
        let shard = hub.shard("c");
        let buffer = shard.channels["c"].repairing.as_ref().expect("repairing");
        assert_eq!(buffer.items.len(), 10, "bounded");
        assert!(buffer.overflowed);
        assert_eq!(hub.repair_budget.used.load(Ordering::Acquire), 10 * one);
    }
    assert_eq!(hub.metrics.repair_buffer_overflows.get(), 30);
    // Once one was refused, even one that would fit is refused: no hole.
    {
        let mut shard = hub.shard("c");
        let buffer = shard
            .channels
            .get_mut("c")
            .unwrap()
            .repairing
            .as_mut()
            .unwrap();
        assert!(!buffer.push(Publication {
            offset: 42,
            epoch: first.epoch.as_str().into(),
            data: "".into(),
            from: None,
        }));
    }
    assert!(
        a.try_next().is_none(),
        "nothing delivered during the repair"
    );

    // The repair ends with its (older) history; the check that follows repairs the
    // refused ones from history.
    Arc::clone(&hub).finish_repair(
        "c".into(),
        first.epoch.as_str().into(),
        1,
        None,
        Ok(history),
    );
    let mut got = Vec::new();
    wait_until("every offset", || {
        got.extend(offsets(&a));
        got.len() >= 40
    })
    .await;
    assert_eq!(got, (2..=41).collect::<Vec<_>>());
    assert_eq!(
        hub.repair_budget.used.load(Ordering::Acquire),
        0,
        "released"
    );
    assert!(hub.shard("c").channels["c"].repairing.is_none());
}

/// Offsets queued in a session's mailbox for `channel`, in queue order.
fn offsets(handle: &Mailbox) -> Vec<u64> {
    let mut out = Vec::new();
    while let Some(item) = handle.try_next() {
        if let Outbound::Message(d) = item {
            out.push(d.offset);
        }
    }
    out
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A fan-out big enough to run in parallel chunks keeps every session's order: a
/// later message never overtakes an earlier one, and nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_fan_out_keeps_per_session_order() {
    let (hub, _consumer) = hub();
    let sessions: Vec<SessionHandle> = (0..3 * PARALLEL_FANOUT as u64)
        .map(|_| Arc::new(Mailbox::new(1_000)))
        .collect();
    for (id, handle) in sessions.iter().enumerate() {
        hub.join("big", id as u64, Arc::clone(handle))
            .await
            .expect("join");
    }
    // A small channel alongside, published in between.
    let small = Arc::new(Mailbox::new(1_000));
    hub.join("small", u64::MAX, Arc::clone(&small))
        .await
        .expect("join");
    const N: u64 = 60;
    for i in 0..N {
        hub.streams
            .publish("big", "1", None)
            .await
            .expect("publish");
        if i % 3 == 0 {
            hub.streams
                .publish("small", "1", None)
                .await
                .expect("publish");
        }
    }
    let last = &sessions[sessions.len() - 1];
    wait_until("every delivery", || last.queue().len() as u64 == N).await;
    // Every chunk of the last item is done before the drainer stops.
    wait_until("drained", || {
        sessions.iter().all(|s| s.queue().len() as u64 == N)
    })
    .await;
    for s in &sessions {
        assert_eq!(offsets(s), (1..=N).collect::<Vec<_>>());
    }
    assert_eq!(offsets(&small), (1..=N.div_ceil(3)).collect::<Vec<_>>());
}

/// Delivering offers outside the shard lock: while a channel's outlet is busy, the
/// shard (and so every other channel in it) stays free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_outlet_holds_no_shard_lock() {
    let (hub, _consumer) = hub();
    let a = Arc::new(Mailbox::new(10));
    hub.join("c", 1, Arc::clone(&a)).await.expect("join");
    assert!(hub.shard("c").channels["c"].outlet.is_none(), "made lazily");
    hub.streams.publish("c", "1", None).await.expect("publish");
    wait_until("first delivery", || a.queue().len() == 1).await;
    assert_eq!(offsets(&a), vec![1]);
    // Take the channel's outlet as if a drainer were mid-delivery.
    let outlet = hub.shard("c").channels["c"].outlet.clone().expect("outlet");
    outlet.lock().draining = true;
    hub.streams.publish("c", "2", None).await.expect("publish");
    // The publication is decided and queued; the shard lock is free meanwhile.
    wait_until("queued in the outlet", || outlet.lock().queue.len() == 1).await;
    assert!(hub.has_sessions("c"), "shard lock not held");
    assert!(
        a.try_next().is_none(),
        "not delivered while the outlet is busy"
    );
    // The busy drainer finishes its turn and delivers what was queued, in order.
    outlet.lock().draining = false;
    let pending = outlet.lock().queue.len();
    assert_eq!(pending, 1);
    outlet.lock().draining = true;
    hub.drain(outlet);
    assert_eq!(offsets(&a), vec![2]);
}

/// No reference cycle: dropping the hub drops the broker, which closes the event
/// stream, which ends the consumer task.
#[tokio::test]
async fn dropping_the_hub_ends_the_consumer() {
    let (hub, consumer) = hub();
    let a = Arc::new(Mailbox::new(10));
    hub.join("c", 1, Arc::clone(&a)).await.expect("join");
    drop(hub);
    tokio::time::timeout(Duration::from_secs(5), consumer)
        .await
        .expect("the consumer ends once the hub and its broker are gone")
        .expect("no panic");
}

fn ephemeral() -> Outbound {
    Outbound::Ephemeral(Arc::new(EphemeralDelivery {
        channel: "room:1".into(),
        frame: Utf8Bytes::from_static("{}"),
    }))
}

#[test]
fn droppable_items_fill_half_the_queue_and_never_close() {
    let queue = Mailbox::new(8);
    for _ in 0..4 {
        assert_eq!(queue.offer_droppable(ephemeral()), Ok(()));
    }
    assert_eq!(queue.offer_droppable(ephemeral()), Err(Refused::Full));
    // The other half stays for ordinary items.
    for _ in 0..4 {
        assert_eq!(queue.offer(ephemeral()), Ok(()));
    }
    assert_eq!(queue.offer(ephemeral()), Err(Refused::Full));
    // Refusing a droppable item asks for no close.
    assert_eq!(queue.code.load(Ordering::Acquire), 0);
    while queue.try_next().is_some() {}
    assert_eq!(queue.offer_droppable(ephemeral()), Ok(()));
    queue.end();
    assert_eq!(queue.offer_droppable(ephemeral()), Err(Refused::Gone));
    // A queue of one still takes one droppable item.
    let tiny = Mailbox::new(1);
    assert_eq!(tiny.offer_droppable(ephemeral()), Ok(()));
    assert_eq!(tiny.offer_droppable(ephemeral()), Err(Refused::Full));
}
