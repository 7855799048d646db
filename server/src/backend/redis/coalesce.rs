//! Coalesced publishing: publishes that arrive together share one script call per
//! Redis slot.
//!
//! Each slot (with one Redis or Sentinel: the one Redis, a single lane) has a queue.
//! A publish joins its lane's queue; when no call of that lane is in flight, a flush
//! task starts at once and sends what is queued as one `publish.lua` call. Whatever
//! queues up while that call is in flight goes in the next call, and the task ends when
//! the queue is empty. So there is no timer and no added latency when idle (a lone
//! publish is sent straight away), while under load one call carries many
//! messages: the per-call cost in Redis (reading the request, starting the script,
//! `TIME`, the reply, the syscalls) and on the node is shared.
//!
//! Guarantees are those of one publish each: a call is one atomic script; messages of
//! one channel get offsets in queue order (the order of the `publish` calls, or the
//! order inside a batch); a call's keys are in one cluster slot. A call that fails
//! (connection lost, timeout) fails every message in it with the same error, as a
//! failed single publish did: the caller cannot know whether it ran.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use fred::error::ErrorKind;
use fred::interfaces::EventInterface;
use fred::types::{Key, Value};
use herald_protocol::StreamPosition;
use tokio::sync::oneshot;

use super::{broker_error, scripts, wait_replicas, BackendError, Inner};

/// Most messages in one script call. As many as one API batch may hold, so that a
/// batch whose messages share a slot is one call; it also bounds how long one call
/// keeps Redis busy (about six commands per message).
pub(crate) const MAX_CALL_MESSAGES: usize = 1000;
/// Most bytes of data in one call (at least one message is always taken): bounds the
/// request, the script's memory and its run time, whatever `max_publish_bytes` is.
pub(crate) const MAX_CALL_BYTES: usize = 1 << 20;

/// The answer to one queued message.
pub(crate) type Answer = Result<StreamPosition, BackendError>;

/// One message waiting for a call.
pub(crate) struct Outgoing {
    /// The herald channel.
    pub channel: String,
    /// The JSON data, shared (never copied again once queued).
    pub data: Value,
    /// The publisher's user id, or the empty string.
    pub from: Value,
    /// Where its answer goes.
    pub done: oneshot::Sender<Answer>,
}

impl Outgoing {
    fn len(&self) -> usize {
        self.data.as_bytes().map_or(0, <[u8]>::len)
    }
}

/// The queues of every lane with a call in flight. A lane is in the map exactly while
/// its flush task runs (possibly with an empty queue: the call in flight is all).
#[derive(Default)]
pub(crate) struct Lanes {
    lanes: Mutex<HashMap<u16, VecDeque<Outgoing>>>,
}

impl Lanes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u16, VecDeque<Outgoing>>> {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues messages, in order, each on its lane. Returns the lanes that had no call
    /// in flight: the caller starts a flush task for each.
    pub(crate) fn enqueue(&self, messages: impl IntoIterator<Item = (u16, Outgoing)>) -> Vec<u16> {
        let mut start = Vec::new();
        let mut lanes = self.lock();
        for (lane, message) in messages {
            let queue = lanes.entry(lane).or_insert_with(|| {
                start.push(lane);
                VecDeque::new()
            });
            queue.push_back(message);
        }
        start
    }

    /// The next call's messages of `lane`, oldest first, within the call bounds; `None`
    /// when the queue is empty, which also ends the lane's flush (atomically with the
    /// check, so a message queued later starts a new one).
    pub(crate) fn take(&self, lane: u16) -> Option<Vec<Outgoing>> {
        let mut lanes = self.lock();
        let queue = lanes.get_mut(&lane)?;
        if queue.is_empty() {
            lanes.remove(&lane);
            return None;
        }
        let mut bytes = 0;
        let mut batch = Vec::with_capacity(queue.len().min(MAX_CALL_MESSAGES));
        while let Some(next) = queue.front() {
            let len = next.len();
            if !batch.is_empty()
                && (batch.len() >= MAX_CALL_MESSAGES || bytes + len > MAX_CALL_BYTES)
            {
                break;
            }
            bytes += len;
            batch.extend(queue.pop_front());
        }
        Some(batch)
    }
}

/// Groups message indexes by channel: channels in order of first appearance, each
/// with its messages' indexes in order. The script numbers a channel's messages in
/// this order.
pub(crate) fn group_by_channel<'a>(
    channels: impl IntoIterator<Item = &'a str>,
) -> Vec<(&'a str, Vec<usize>)> {
    let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, channel) in channels.into_iter().enumerate() {
        let g = *index.entry(channel).or_insert_with(|| {
            groups.push((channel, Vec::new()));
            groups.len() - 1
        });
        groups[g].1.push(i);
    }
    groups
}

/// Each message's position from the script's answer (`{first offset, epoch}` per
/// group), for `count` messages grouped as `groups`.
pub(crate) fn positions(
    answer: &[Value],
    groups: &[(&str, Vec<usize>)],
    count: usize,
) -> Result<Vec<StreamPosition>, BackendError> {
    let bad = || BackendError::Internal("unexpected publish script answer".into());
    if answer.len() != groups.len() * 2 {
        return Err(bad());
    }
    let mut out = vec![StreamPosition::new(0, ""); count];
    for ((_, members), pair) in groups.iter().zip(answer.chunks_exact(2)) {
        let first = pair[0].as_u64().ok_or_else(bad)?;
        let epoch = pair[1].as_string().ok_or_else(bad)?;
        for (k, &i) in members.iter().enumerate() {
            *out.get_mut(i).ok_or_else(bad)? = StreamPosition::new(first + k as u64, &epoch);
        }
    }
    Ok(out)
}

/// The arguments every call starts with, built once per broker: cloning them clones
/// reference-counted handles.
pub(crate) struct Constants {
    head: [Value; 5],
}

impl Constants {
    /// From the broker's settings: history size, history ttl, meta ttl, the publish
    /// command and the replication id flag (see `publish.lua`).
    pub(crate) fn new(values: [String; 5]) -> Self {
        Self {
            head: values.map(Value::from),
        }
    }
}

/// Runs the lane's flush: one call per turn until the queue is empty.
pub(super) async fn flush(inner: Arc<Inner>, lane: u16) {
    while let Some(batch) = inner.lanes.take(lane) {
        match call_again_if_redirected(&inner, &batch).await {
            Ok(positions) => {
                for (message, position) in batch.into_iter().zip(positions) {
                    let _ = message.done.send(Ok(position));
                }
            }
            Err(e) => {
                for message in batch {
                    let _ = message.done.send(Err(e.clone()));
                }
            }
        }
    }
}

/// How one call failed.
enum CallError {
    /// Redis Cluster redirected the call (MOVED: the slot moved; ASK: it is moving and
    /// the keys are gone) and the client did not follow: a publish is written once
    /// (see `build_client`). It did not run.
    Redirected(BackendError),
    Other(BackendError),
}

/// [`call`], and once more when Redis redirected it: it did not run, and after a
/// MOVED the client has synced its slot map, so the next call goes to the new owner.
/// During a migration (ASK) the second call is redirected too, and the messages fail:
/// the publisher gets an error, as for any publish Redis did not take.
async fn call_again_if_redirected(
    inner: &Inner,
    batch: &[Outgoing],
) -> Result<Vec<StreamPosition>, BackendError> {
    match call(inner, batch).await {
        Ok(positions) => Ok(positions),
        Err(CallError::Redirected(_)) => match call(inner, batch).await {
            Ok(positions) => Ok(positions),
            Err(CallError::Redirected(e) | CallError::Other(e)) => Err(e),
        },
        Err(CallError::Other(e)) => Err(e),
    }
}

/// One script call for `batch` (all in one slot).
async fn call(inner: &Inner, batch: &[Outgoing]) -> Result<Vec<StreamPosition>, CallError> {
    let client = inner.publisher().map_err(CallError::Other)?;
    // Subscribed before the script runs: any reconnect from here on shows up in it.
    let reconnects = inner.publisher.as_ref().map(|p| p.reconnect_rx());
    let groups = group_by_channel(batch.iter().map(|m| m.channel.as_str()));
    let mut keys = Vec::with_capacity(groups.len() * 2);
    let mut args = Vec::with_capacity(6 + groups.len() * 2 + batch.len() * 2);
    args.extend(inner.publish_constants.head.iter().cloned());
    args.push(Value::from(super::keys::new_epoch()));
    for (channel, members) in &groups {
        keys.push(Key::from(inner.keys.meta(channel)));
        keys.push(Key::from(inner.keys.history(channel)));
        args.push(Value::from(inner.keys.pubsub(channel)));
        args.push(Value::from(members.len() as i64));
        for &i in members {
            args.push(batch[i].from.clone());
            args.push(batch[i].data.clone());
        }
    }
    let answer: Vec<Value> =
        match scripts::run_values(client, &inner.scripts.publish, keys, args).await {
            Ok(answer) => answer,
            // The client's own routing errors: it gave up on a redirection, before the
            // script ran anywhere.
            Err(e) if *e.kind() == ErrorKind::Routing => {
                return Err(CallError::Redirected(broker_error(e)))
            }
            Err(e) => return Err(CallError::Other(broker_error(e))),
        };
    let positions = positions(&answer, &groups, batch.len()).map_err(CallError::Other)?;
    if let Some(reconnects) = reconnects {
        // One WAIT covers every write of the call.
        wait_replicas(inner, client, reconnects)
            .await
            .map_err(CallError::Other)?;
    }
    Ok(positions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outgoing(channel: &str, data: &str) -> (Outgoing, oneshot::Receiver<Answer>) {
        let (done, rx) = oneshot::channel();
        let message = Outgoing {
            channel: channel.into(),
            data: Value::from(data),
            from: Value::from(""),
            done,
        };
        (message, rx)
    }

    #[test]
    fn groups_keep_first_appearance_and_message_order() {
        let groups = group_by_channel(["a", "b", "a", "c", "b", "a"]);
        assert_eq!(
            groups,
            vec![("a", vec![0, 2, 5]), ("b", vec![1, 4]), ("c", vec![3])]
        );
        assert!(group_by_channel([]).is_empty());
    }

    #[test]
    fn positions_number_each_channel_from_its_first_offset() {
        let groups = group_by_channel(["a", "b", "a"]);
        let answer = vec![
            Value::from(7i64),
            Value::from("ea"),
            Value::from(1i64),
            Value::from("eb"),
        ];
        let p = positions(&answer, &groups, 3).unwrap();
        assert_eq!(
            p,
            vec![
                StreamPosition::new(7, "ea"),
                StreamPosition::new(1, "eb"),
                StreamPosition::new(8, "ea"),
            ]
        );
        assert!(positions(&answer[..2], &groups, 3).is_err());
        let bad = vec![
            Value::Null,
            Value::from("ea"),
            Value::from(1i64),
            Value::from("eb"),
        ];
        assert!(positions(&bad, &groups, 3).is_err());
    }

    #[test]
    fn a_lane_starts_once_and_ends_when_drained() {
        let lanes = Lanes::default();
        let (m1, _r1) = outgoing("a", "1");
        let (m2, _r2) = outgoing("b", "2");
        assert_eq!(lanes.enqueue([(3, m1), (3, m2)]), vec![3]);
        // In flight: more messages join the queue, nothing new starts.
        let (m3, _r3) = outgoing("a", "3");
        assert!(lanes.enqueue([(3, m3)]).is_empty());
        let batch = lanes.take(3).unwrap();
        let order: Vec<&str> = batch.iter().map(|m| m.channel.as_str()).collect();
        assert_eq!(order, vec!["a", "b", "a"]);
        // Empty queue: the flush ends and the next message starts a new one.
        assert!(lanes.take(3).is_none());
        assert!(lanes.take(3).is_none());
        let (m4, _r4) = outgoing("a", "4");
        assert_eq!(lanes.enqueue([(3, m4)]), vec![3]);
    }

    #[test]
    fn a_call_is_bounded_in_messages_and_bytes() {
        let lanes = Lanes::default();
        let mut rxs = Vec::new();
        let many = (0..MAX_CALL_MESSAGES + 5).map(|i| {
            let (m, rx) = outgoing("a", &i.to_string());
            rxs.push(rx);
            (0, m)
        });
        lanes.enqueue(many.collect::<Vec<_>>());
        assert_eq!(lanes.take(0).unwrap().len(), MAX_CALL_MESSAGES);
        assert_eq!(lanes.take(0).unwrap().len(), 5);
        assert!(lanes.take(0).is_none());

        let big = "x".repeat(MAX_CALL_BYTES / 2 + 1);
        let (m1, _r1) = outgoing("a", &big);
        let (m2, _r2) = outgoing("a", &big);
        let (m3, _r3) = outgoing("a", &"y".repeat(MAX_CALL_BYTES * 2));
        lanes.enqueue([(0, m1), (0, m2), (0, m3)]);
        assert_eq!(lanes.take(0).unwrap().len(), 1);
        assert_eq!(lanes.take(0).unwrap().len(), 1);
        // One message larger than the bound still goes, alone.
        assert_eq!(lanes.take(0).unwrap().len(), 1);
        assert!(lanes.take(0).is_none());
    }
}
