//! A resilient test client: follows its personal channel (and others) across
//! reconnects, resuming from the last offset it saw, and records exactly what the
//! application would see, so tests can assert "every message once, in order".

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// What a follower saw, per channel.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Offsets delivered, in arrival order.
    pub offsets: Vec<u64>,
    /// (epoch, offset) of every delivered message, in arrival order.
    pub messages: Vec<(String, u64)>,
    /// Last position (offset, epoch).
    pub position: Option<(u64, String)>,
    /// Order violations: (last, got) where got != last + 1 without a resync before it.
    pub violations: Vec<(u64, u64)>,
    /// `resync` frames and `recovered: false` answers to a resume.
    pub discontinuities: u32,
}

/// Shared record of a follower.
#[derive(Debug, Default)]
pub struct Record {
    /// Per channel.
    pub channels: BTreeMap<String, Seen>,
    /// Completed hellos (1 = never reconnected).
    pub connects: u32,
    /// Close codes received.
    pub closes: Vec<u16>,
}

/// A running follower.
pub struct Follower {
    /// What it saw so far.
    pub record: Arc<Mutex<Record>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Follower {
    /// Starts following: connects to `urls[start]`, and on every disconnect to the next
    /// URL, resuming from its positions. `extra` channels are subscribed at first connect.
    pub fn start(urls: Vec<String>, token: String, extra: Vec<String>, start: usize) -> Follower {
        let record = Arc::new(Mutex::new(Record::default()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(urls, token, extra, start, record.clone(), stop.clone()));
        Follower { record, stop, task }
    }

    /// The offsets seen on a channel.
    pub fn offsets(&self, channel: &str) -> Vec<u64> {
        let r = self.record.lock().unwrap();
        r.channels
            .get(channel)
            .map(|s| s.offsets.clone())
            .unwrap_or_default()
    }

    /// Waits until the follower has `offset` on `channel`, within `wait`.
    pub async fn wait_for(&self, channel: &str, offset: u64, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let at = {
                let r = self.record.lock().unwrap();
                r.channels
                    .get(channel)
                    .and_then(|s| s.position.as_ref().map(|p| p.0))
            };
            if at.is_some_and(|o| o >= offset) {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops and returns the record.
    pub async fn stop(self) -> Record {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        let r = self.record.lock().unwrap();
        Record {
            channels: r.channels.clone(),
            connects: r.connects,
            closes: r.closes.clone(),
        }
    }
}

async fn run(
    urls: Vec<String>,
    token: String,
    extra: Vec<String>,
    start: usize,
    record: Arc<Mutex<Record>>,
    stop: CancellationToken,
) {
    let mut i = start;
    let mut first = true;
    while !stop.is_cancelled() {
        let url = &urls[i % urls.len()];
        i += 1;
        let connect = tokio::time::timeout(
            Duration::from_secs(3),
            tokio_tungstenite::connect_async(url.as_str()),
        )
        .await;
        let Ok(Ok((mut ws, _))) = connect else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let resume: BTreeMap<String, Value> = {
            let r = record.lock().unwrap();
            r.channels
                .iter()
                .filter_map(|(c, s)| {
                    s.position
                        .as_ref()
                        .map(|(o, e)| (c.clone(), json!({"offset": o, "epoch": e})))
                })
                .collect()
        };
        let hello = json!({"type": "hello", "token": token, "resume": resume});
        if ws
            .send(Message::Text(hello.to_string().into()))
            .await
            .is_err()
        {
            continue;
        }
        let mut subscribed_extra = !first;
        let mut next_id = 1u64;
        loop {
            let frame = tokio::select! {
                _ = stop.cancelled() => return,
                f = tokio::time::timeout(Duration::from_secs(10), ws.next()) => f,
            };
            let text = match frame {
                Ok(Some(Ok(Message::Text(t)))) => t,
                Ok(Some(Ok(Message::Close(f)))) => {
                    if let Some(f) = f {
                        record.lock().unwrap().closes.push(u16::from(f.code));
                    }
                    break;
                }
                Ok(Some(Ok(_))) => continue,
                _ => break,
            };
            let v: Value = serde_json::from_str(&text).unwrap();
            let mut to_send: Vec<String> = Vec::new();
            {
                let mut r = record.lock().unwrap();
                match v["type"].as_str().unwrap_or("") {
                    "welcome" => {
                        r.connects += 1;
                        first = false;
                        for (channel, sub) in v["subscriptions"].as_object().unwrap() {
                            let seen = r.channels.entry(channel.clone()).or_default();
                            let pos = (
                                sub["offset"].as_u64().unwrap(),
                                sub["epoch"].as_str().unwrap().to_owned(),
                            );
                            let had = seen.position.is_some();
                            if had && sub["recovered"] != true {
                                seen.discontinuities += 1;
                            }
                            // With recovered: true the missed messages follow; keep our position.
                            if !had || sub["recovered"] != true {
                                seen.position = Some(pos);
                            }
                        }
                        if !subscribed_extra {
                            subscribed_extra = true;
                            for c in &extra {
                                let cmd = json!({"type": "subscribe", "id": next_id, "channel": c});
                                next_id += 1;
                                to_send.push(cmd.to_string());
                            }
                        }
                    }
                    "reply" => {
                        if let Some(result) = v.get("result") {
                            if let Some(offset) = result.get("offset").and_then(Value::as_u64) {
                                // A subscribe reply: it names no channel; extra channels are
                                // subscribed in order, so match by id.
                                let idx = v["id"].as_u64().unwrap_or(0) as usize;
                                if idx >= 1 && idx <= extra.len() {
                                    let seen =
                                        r.channels.entry(extra[idx - 1].clone()).or_default();
                                    if seen.position.is_none() {
                                        seen.position = Some((
                                            offset,
                                            result["epoch"].as_str().unwrap().to_owned(),
                                        ));
                                    }
                                }
                            }
                        }
                    }
                    "message" => {
                        let channel = v["channel"].as_str().unwrap().to_owned();
                        let offset = v["offset"].as_u64().unwrap();
                        let epoch = v["epoch"].as_str().unwrap().to_owned();
                        let seen = r.channels.entry(channel).or_default();
                        if let Some((last, e)) = &seen.position {
                            if *e == epoch && offset != last + 1 {
                                seen.violations.push((*last, offset));
                            }
                        }
                        seen.offsets.push(offset);
                        seen.messages.push((epoch.clone(), offset));
                        seen.position = Some((offset, epoch));
                    }
                    "resync" => {
                        let seen = r
                            .channels
                            .entry(v["channel"].as_str().unwrap().to_owned())
                            .or_default();
                        seen.discontinuities += 1;
                        seen.position = Some((
                            v["offset"].as_u64().unwrap(),
                            v["epoch"].as_str().unwrap().to_owned(),
                        ));
                    }
                    "ping" => to_send.push(r#"{"type":"pong"}"#.to_owned()),
                    _ => {}
                }
            }
            for text in to_send {
                let _ = ws.send(Message::Text(text.into())).await;
            }
        }
        if !stop.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
