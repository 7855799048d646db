//! Unit tests of the configuration: defaults, parsing and the checks of each setting.

use super::*;

#[test]
fn pending_budget_must_be_at_least_one() {
    assert_eq!(parse_pending_budget("1"), Ok(1));
    assert_eq!(parse_pending_budget("1000"), Ok(1000));
    assert!(parse_pending_budget("0")
        .unwrap_err()
        .contains("at least 1"));
    for bad in ["", "-1", "x", " 5"] {
        assert!(parse_pending_budget(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn defaults_match_the_contract() {
    let c = Config::default();
    assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
    assert!(c.redis_url.is_none() && c.jwt_secret.is_none() && !c.dev);
    assert_eq!(c.history_size, 100);
    assert_eq!(c.history_ttl_secs, 300);
    assert_eq!(c.hello_timeout_ms, 10_000);
    assert_eq!(c.heartbeat_ms, 25_000);
    assert_eq!(c.max_frame_bytes, 65_536);
    assert_eq!(c.drain_ms, 10_000);
    assert_eq!(c.write_timeout_ms, 10_000);
    assert_eq!(c.max_recovery_bytes, 1_048_576);
    assert_eq!(c.max_ephemeral_per_sec, 10);
    assert_eq!(c.max_pending_handshakes, 1_000);
    assert_eq!(c.max_http_connections, 4_096);
    assert_eq!(c.max_connections_per_user, 32);
    assert_eq!(c.max_user_connects_per_min, 60);
    assert_eq!(c.user_connect_burst(), 64);
    assert_eq!(c.max_user_subscribes_per_sec, 100);
    assert_eq!(c.user_subscribe_burst(), 4_096);
    assert_eq!(c.max_tracked_users, 100_000);
    assert_eq!(c.ack_timeout_ms, 30_000);
}

#[test]
fn switch_words_are_strict() {
    for on in ["1", "true", "TRUE", "True", "yes", "YES", "on", "On"] {
        assert_eq!(parse_switch(on), Ok(true), "{on:?}");
    }
    for off in ["0", "false", "FALSE", "no", "No", "off", "Off", "OFF", ""] {
        assert_eq!(parse_switch(off), Ok(false), "{off:?}");
    }
    for bad in [
        "disabled", "none", "ture", "2", "y", "t", "enable", " on", "off ", " ",
    ] {
        assert!(parse_switch(bad).is_err(), "{bad:?} must be refused");
    }
}

#[test]
fn dev_flag_and_environment_values() {
    let parse = |args: &[&str]| Config::try_parse_from(args.iter().copied());
    assert!(parse(&["herald", "--dev"]).unwrap().dev);
    assert!(!parse(&["herald"]).unwrap().dev);
    // HERALD_DEV's value goes through `parse_switch` (tests/node_process.rs runs the
    // binary with each kind of value); the flag itself takes none.
    let cmd = <Config as clap::CommandFactory>::command();
    let arg = cmd.get_arguments().find(|a| a.get_id() == "dev").unwrap();
    assert_eq!(arg.get_env(), Some(std::ffi::OsStr::new("HERALD_DEV")));
}

#[test]
fn flags_parse() {
    let c = Config::parse_from([
        "herald",
        "--listen",
        "0.0.0.0:9000",
        "--allowed-origins",
        "https://a.example,https://b.example",
        "--dev",
    ]);
    assert_eq!(c.listen.port(), 9000);
    assert_eq!(c.allowed_origins.unwrap().len(), 2);
    assert!(c.dev);
}

#[test]
fn ack_timeout_range() {
    assert_eq!(parse_ack_timeout("0"), Ok(0));
    assert_eq!(parse_ack_timeout("30000"), Ok(30_000));
    assert_eq!(parse_ack_timeout("100"), Ok(100));
    assert_eq!(parse_ack_timeout("3600000"), Ok(3_600_000));
    for bad in ["99", "3600001", "-1", "x", ""] {
        assert!(parse_ack_timeout(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn user_bursts_fit_what_a_user_may_hold() {
    let c = Config {
        max_connections_per_user: 4,
        max_subscriptions: 6,
        max_user_connect_burst: 1,
        max_user_subscribe_burst: 1,
        ..Config::default()
    };
    assert_eq!(
        c.user_connect_burst(),
        4,
        "raised to the connections per user"
    );
    assert_eq!(c.user_subscribe_burst(), 24, "raised to their channels");
    let unlimited = Config {
        max_connections_per_user: 0,
        max_user_subscribe_burst: 10,
        ..Config::default()
    };
    assert_eq!(
        unlimited.user_subscribe_burst(),
        10,
        "nothing to raise it to"
    );
}
