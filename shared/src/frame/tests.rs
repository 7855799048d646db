//! Tests of the frames' parsing and encoding.

use super::*;
use proptest::prelude::*;

fn not_a_command(text: &str) {
    assert!(
        matches!(ClientCommand::parse(text), Err(ParseError::NotACommand(_))),
        "{text}"
    );
}

fn bad_argument(text: &str, want_id: Option<u64>) {
    match ClientCommand::parse(text) {
        Err(ParseError::BadArgument { id, .. }) => assert_eq!(id, want_id, "{text}"),
        other => panic!("{text}: {other:?}"),
    }
}

#[test]
fn commands_parse() {
    let c = ClientCommand::parse(
        r#"{"type":"hello","token":"t","resume":{"room:1":{"offset":3,"epoch":"e"}}}"#,
    )
    .unwrap();
    match c {
        ClientCommand::Hello { token, resume } => {
            assert_eq!(token, "t");
            assert_eq!(resume["room:1"], StreamPosition::new(3, "e"));
        }
        other => panic!("{other:?}"),
    }
    let c = ClientCommand::parse(r#"{"type":"publish","id":3,"channel":"a","data":{"x":[1,2]}}"#)
        .unwrap();
    match c {
        ClientCommand::Publish {
            id,
            channel,
            data,
            ephemeral,
        } => {
            assert_eq!(
                (id, channel.as_str(), data.get(), ephemeral),
                (3, "a", r#"{"x":[1,2]}"#, false)
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        ClientCommand::parse(r#"{"type":"publish","id":3,"channel":"a","data":null}"#),
        Ok(ClientCommand::Publish { .. })
    ));
    assert!(matches!(
        ClientCommand::parse(r#"{"type":"pong"}"#),
        Ok(ClientCommand::Pong)
    ));
    match ClientCommand::parse(r#"{"type":"refresh","id":9,"token":"a.b.c"}"#).unwrap() {
        ClientCommand::Refresh { id, token } => assert_eq!((id, token.as_str()), (9, "a.b.c")),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        ClientCommand::parse(
            r#"{"type":"subscribe","id":1,"channel":"r","since":{"offset":1,"epoch":"e"},"extra":1}"#
        ),
        Ok(ClientCommand::Subscribe { since: Some(_), .. })
    ));
}

#[test]
fn not_commands_close() {
    not_a_command("not json");
    not_a_command("[1,2]");
    not_a_command("42");
    not_a_command(r#"{"id":1}"#);
    not_a_command(r#"{"type":"shutdown","id":1}"#);
    not_a_command(r#"{"type":7}"#);
    not_a_command(&format!("{}{}", "[".repeat(200), "]".repeat(200)));
    not_a_command(r#"{"type":"hello","token":5}"#);
}

#[test]
fn bad_arguments_reply() {
    bad_argument(r#"{"type":"subscribe","id":1}"#, Some(1));
    bad_argument(
        r#"{"type":"subscribe","id":1,"channel":"bad name"}"#,
        Some(1),
    );
    bad_argument(r#"{"type":"subscribe","id":1,"channel":7}"#, Some(1));
    bad_argument(r#"{"type":"subscribe","channel":"a"}"#, None);
    bad_argument(r#"{"type":"subscribe","id":-1,"channel":"a"}"#, None);
    bad_argument(
        r#"{"type":"subscribe","id":1,"channel":"a","since":{"offset":"x"}}"#,
        Some(1),
    );
    bad_argument(r#"{"type":"publish","id":2,"channel":"a"}"#, Some(2));
    bad_argument(r#"{"type":"presence","id":4,"channel":""}"#, Some(4));
    bad_argument(r#"{"type":"refresh","id":5}"#, Some(5));
    bad_argument(r#"{"type":"refresh","id":5,"token":""}"#, Some(5));
    bad_argument(r#"{"type":"refresh","id":5,"token":7}"#, Some(5));
    bad_argument(r#"{"type":"refresh","token":"t"}"#, None);
    bad_argument(r#"{"type":"ack","channel":"user:a"}"#, None);
    bad_argument(r#"{"type":"ack","id":3,"channel":"user:a"}"#, Some(3));
    bad_argument(
        r#"{"type":"ack","id":3,"channel":"user:a","offset":-1}"#,
        Some(3),
    );
    bad_argument(
        r#"{"type":"ack","id":3,"channel":"user:a","offset":"1"}"#,
        Some(3),
    );
    bad_argument(r#"{"type":"ack","id":3,"offset":1}"#, Some(3));
    bad_argument(
        r#"{"type":"ack","id":-3,"channel":"user:a","offset":1}"#,
        None,
    );
    bad_argument(
        r#"{"type":"ack","id":3,"channel":"user:a","offset":1,"epoch":5}"#,
        Some(3),
    );
    let long = "e".repeat(MAX_EPOCH_BYTES + 1);
    bad_argument(
        &format!(r#"{{"type":"ack","channel":"user:a","offset":1,"epoch":"{long}"}}"#),
        None,
    );
}

#[test]
fn acks_parse() {
    match ClientCommand::parse(r#"{"type":"ack","channel":"user:alice","offset":17}"#) {
        Ok(ClientCommand::Ack {
            id: None,
            channel,
            offset: 17,
            epoch: None,
        }) => assert_eq!(channel, "user:alice"),
        other => panic!("{other:?}"),
    }
    let text = r#"{"type":"ack","id":4,"channel":"user:a","offset":2,"epoch":"e1"}"#;
    let c = ClientCommand::parse(text).unwrap();
    assert!(matches!(
        &c,
        ClientCommand::Ack { id: Some(4), offset: 2, epoch: Some(e), .. } if e == "e1"
    ));
    assert_eq!(c.to_json(), text);
}

#[test]
fn data_nested_too_deep_is_a_bad_argument() {
    let publish = |depth: usize| {
        let data = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        format!(r#"{{"type":"publish","id":6,"channel":"a","data":{data}}}"#)
    };
    assert!(matches!(
        ClientCommand::parse(&publish(MAX_DATA_DEPTH)),
        Ok(ClientCommand::Publish { .. })
    ));
    bad_argument(&publish(MAX_DATA_DEPTH + 1), Some(6));
    bad_argument(&publish(20_000), Some(6));
}

#[test]
fn message_encoding_round_trips() {
    let text = encode_message("room:1", 18, "e1", None, r#"{"text":"hi \"there\""}"#);
    assert!(!text.contains("from"), "no `from` key without a publisher");
    match ServerFrame::parse(&text).unwrap() {
        ServerFrame::Message(m) => {
            assert_eq!(
                (m.channel.as_str(), m.offset, m.epoch.as_str()),
                ("room:1", 18, "e1")
            );
            assert_eq!(m.from, None);
            assert_eq!(m.data.get(), r#"{"text":"hi \"there\""}"#);
        }
        other => panic!("{other:?}"),
    }
    let text = encode_message("room:1", 1, "", Some("alice@x.io"), "null");
    assert_eq!(
        text,
        r#"{"type":"message","channel":"room:1","offset":1,"epoch":"","from":"alice@x.io","data":null}"#
    );
    match ServerFrame::parse(&text).unwrap() {
        ServerFrame::Message(m) => {
            assert_eq!(m.from.as_deref(), Some("alice@x.io"));
            assert_eq!(m.epoch, "");
            // Serde writes the same frame as the hand-written encoder.
            assert_eq!(ServerFrame::Message(m).to_json(), text);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn server_frames_round_trip() {
    let frames = [
        ServerFrame::Ping,
        ServerFrame::Resync(Resync {
            channel: "a".into(),
            offset: 4,
            epoch: "e".into(),
        }),
        ServerFrame::Reconnect(Reconnect {
            reason: "draining".into(),
            after_ms: 5,
        }),
        ServerFrame::Expiring(Expiring { in_ms: 60_000 }),
        ServerFrame::Subscribed(Subscribed {
            channel: "room:1".into(),
            offset: 3,
            epoch: "e".into(),
        }),
        ServerFrame::Unsubscribed(Unsubscribed {
            channel: "room:1".into(),
            reason: "server".into(),
        }),
        ServerFrame::Reply(Reply {
            id: Some(1),
            result: None,
            error: Some(ErrorBody::new(ErrorCode::Forbidden, "no")),
        }),
    ];
    for f in frames {
        let text = f.to_json();
        let back = ServerFrame::parse(&text).unwrap();
        assert_eq!(back.to_json(), text);
    }
    assert_eq!(ServerFrame::Ping.to_json(), r#"{"type":"ping"}"#);
}

#[test]
fn ephemeral_publish_parses_and_round_trips() {
    let text =
        r#"{"type":"publish","id":7,"channel":"room:1","data":{"typing":true},"ephemeral":true}"#;
    let c = ClientCommand::parse(text).unwrap();
    assert!(matches!(
        &c,
        ClientCommand::Publish {
            id: 7,
            ephemeral: true,
            ..
        }
    ));
    assert_eq!(c.to_json(), text);
    for absent in [
        r#"{"type":"publish","id":7,"channel":"a","data":1}"#,
        r#"{"type":"publish","id":7,"channel":"a","data":1,"ephemeral":null}"#,
        r#"{"type":"publish","id":7,"channel":"a","data":1,"ephemeral":false}"#,
    ] {
        let c = ClientCommand::parse(absent).unwrap();
        assert!(
            matches!(
                c,
                ClientCommand::Publish {
                    ephemeral: false,
                    ..
                }
            ),
            "{absent}"
        );
        // v1 form on the wire: no `ephemeral` key when false.
        assert!(!c.to_json().contains("ephemeral"));
    }
    for wrong in [r#""yes""#, "1", "{}", "[]"] {
        bad_argument(
            &format!(r#"{{"type":"publish","id":8,"channel":"a","data":1,"ephemeral":{wrong}}}"#),
            Some(8),
        );
    }
}

#[test]
fn ephemeral_frames_encode_and_parse_apart_from_messages() {
    let text = encode_ephemeral("room:1", Some("alice"), r#"{"typing":true}"#);
    assert_eq!(
        text,
        r#"{"type":"message","channel":"room:1","ephemeral":true,"from":"alice","data":{"typing":true}}"#
    );
    match ServerFrame::parse(&text).unwrap() {
        ServerFrame::Ephemeral(e) => {
            assert_eq!(
                (e.channel.as_str(), e.from.as_deref()),
                ("room:1", Some("alice"))
            );
            assert!(e.ephemeral);
            assert_eq!(e.data.get(), r#"{"typing":true}"#);
            assert_eq!(ServerFrame::Ephemeral(e).to_json(), text);
        }
        other => panic!("{other:?}"),
    }
    let text = encode_ephemeral("a", None, "null");
    assert_eq!(
        text,
        r#"{"type":"message","channel":"a","ephemeral":true,"data":null}"#
    );
    assert!(matches!(
        ServerFrame::parse(&text),
        Ok(ServerFrame::Ephemeral(_))
    ));
    // Wrong shapes are errors (clients skip them), never a message without offset.
    for bad in [
        r#"{"type":"message","channel":"a","ephemeral":"yes","offset":1,"epoch":"e","data":1}"#,
        r#"{"type":"message","channel":7,"ephemeral":true,"data":1}"#,
        r#"{"type":"message","channel":"a","ephemeral":true}"#,
    ] {
        assert!(ServerFrame::parse(bad).is_err(), "{bad}");
    }
    // `"ephemeral":false` is an ordinary message (it must then have its offset).
    let text =
        r#"{"type":"message","channel":"a","offset":1,"epoch":"e","ephemeral":false,"data":1}"#;
    assert!(matches!(
        ServerFrame::parse(text),
        Ok(ServerFrame::Message(_))
    ));
}

proptest! {
    #[test]
    fn parse_never_panics(s in ".{0,200}") {
        let _ = ClientCommand::parse(&s);
    }

    #[test]
    fn mutated_commands_never_panic(
        base in prop::sample::select(vec![
            r#"{"type":"subscribe","id":1,"channel":"room:1","since":{"offset":3,"epoch":"e"}}"#,
            r#"{"type":"publish","id":2,"channel":"room:1","data":{"a":[1,2,{"b":null}]}}"#,
            r#"{"type":"hello","token":"x.y.z","resume":{"room:1":{"offset":1,"epoch":"e"}}}"#,
        ]),
        pos in 0usize..100, byte in any::<u8>(),
    ) {
        let mut bytes = base.as_bytes().to_vec();
        let i = pos % bytes.len();
        bytes[i] = byte;
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let _ = ClientCommand::parse(text);
        }
    }

    #[test]
    fn huge_numbers_are_bad_arguments(n in "[1-9][0-9]{20,39}") {
        let text = format!(r#"{{"type":"subscribe","id":{n},"channel":"a"}}"#);
        let is_bad_argument = matches!(ClientCommand::parse(&text), Err(ParseError::BadArgument { .. }));
        prop_assert!(is_bad_argument);
    }
}
