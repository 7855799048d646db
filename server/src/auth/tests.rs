//! Tests of token verification, keys and dev mode.

use super::*;

fn claims(sub: &str) -> Claims {
    Claims {
        sub: sub.into(),
        exp: now_secs() + 60,
        nbf: None,
        iat: None,
        channels: Some(vec!["room:*".into(), "news".into()]),
        publish: Some(vec!["room:*".into()]),
    }
}

#[test]
fn permissions() {
    let c = claims("alice");
    assert!(c.may_subscribe("user:alice"));
    assert!(!c.may_subscribe("user:bob"));
    assert!(c.may_subscribe("room:1") && c.may_subscribe("news"));
    assert!(!c.may_subscribe("news2") && !c.may_subscribe("admin"));
    assert!(c.may_publish("room:1") && !c.may_publish("news"));
    let star = Claims {
        channels: Some(vec!["*".into()]),
        ..claims("alice")
    };
    assert!(
        !star.may_subscribe("user:bob"),
        "personal channels stay private"
    );
}

#[test]
fn hs256_round_trip_and_refusals() {
    let signer = TokenSigner::hs256(b"secret");
    let verifier = TokenVerifier::hs256(b"secret", 8192);
    assert_eq!(
        verifier.verify(&signer.sign(&claims("alice"))).unwrap().sub,
        "alice"
    );
    let expired = Claims {
        exp: now_secs() - 1,
        ..claims("alice")
    };
    assert!(verifier.verify(&signer.sign(&expired)).is_err());
    let early = Claims {
        nbf: Some(now_secs() + 60),
        ..claims("alice")
    };
    assert!(verifier.verify(&signer.sign(&early)).is_err());
    let other = TokenSigner::hs256(b"other");
    assert!(verifier.verify(&other.sign(&claims("alice"))).is_err());
    assert!(matches!(
        verifier.verify(&signer.sign(&claims("a b"))),
        Err(AuthError::BadSubject(_))
    ));
    assert!(matches!(verifier.verify(""), Err(AuthError::Missing)));
    assert!(matches!(
        verifier.verify(&"a".repeat(9000)),
        Err(AuthError::TooLarge)
    ));
}

#[test]
fn lifetime_bound_and_issue_time() {
    let day = 86_400;
    // With iat: the lifetime is exp - iat.
    assert_eq!(
        issued_at(1_000 + day, Some(1_000), 1_000, day).unwrap(),
        1_000
    );
    assert!(issued_at(1_000 + day + 1, Some(1_000), 1_000, day).is_err());
    // Without iat: counted as issued at exp - max.
    assert_eq!(issued_at(5_000, None, 4_000, day).unwrap(), 0);
    assert_eq!(issued_at(4_000 + day, None, 4_000, day).unwrap(), 4_000);
    // Never further ahead than max, whatever iat claims.
    assert!(issued_at(4_000 + day + 1, None, 4_000, day).is_err());
    assert!(issued_at(4_000 + day + 1, Some(4_000 + 10), 4_000, day).is_err());
    // A future `iat` within the clock skew is taken; beyond it (or in milliseconds,
    // a classic mistake) it is refused, since no revocation could ever reach it.
    let skew = MAX_IAT_SKEW_SECS;
    assert_eq!(
        issued_at(4_000 + 600, Some(4_000 + skew), 4_000, day).unwrap(),
        4_000 + skew
    );
    assert!(matches!(
        issued_at(4_000 + 600, Some(4_000 + skew + 1), 4_000, day),
        Err(AuthError::IssuedInFuture(_))
    ));
    assert!(matches!(
        issued_at(4_000 + 600, Some(4_000_000), 4_000, day),
        Err(AuthError::IssuedInFuture(_))
    ));
    let verifier = TokenVerifier::hs256(b"secret", 8192).with_max_lifetime(60);
    let signer = TokenSigner::hs256(b"secret");
    let long = Claims {
        exp: now_secs() + 3_600,
        ..claims("alice")
    };
    assert!(matches!(
        verifier.verify(&signer.sign(&long)),
        Err(AuthError::TooLong(60))
    ));
    let ok = verifier.verify(&signer.sign(&claims("alice"))).unwrap();
    assert!(ok.iat.is_some(), "a verified token has an issue time");
}

#[test]
fn expiry_notice() {
    assert_eq!(expiry_notice_ms(3_600_000, 60_000), 60_000);
    assert_eq!(expiry_notice_ms(4_000, 60_000), 2_000);
    assert_eq!(expiry_notice_ms(0, 60_000), 0);
}

#[test]
fn api_key_compare() {
    let k = ApiKey::new("s3cret");
    assert!(k.matches("s3cret"));
    assert!(!k.matches("s3cre"));
    assert!(!k.matches(""));
}

const LONG_SECRET: &str = "a-test-secret-of-thirty-two-byte";
const LONG_API_KEY: &str = "a-test-api-key-of-thirty-two-byt";

fn listening_on(listen: &str) -> Config {
    Config {
        listen: listen.parse().unwrap(),
        ..Config::default()
    }
}

#[test]
fn dev_mode_rules() {
    assert_eq!(LONG_SECRET.len(), MIN_KEY_BYTES);
    assert_eq!(LONG_API_KEY.len(), MIN_KEY_BYTES);
    let keys = Keys::resolve(&Config::default()).unwrap();
    assert!(keys.dev && keys.dev_signer.is_some() && keys.generated.len() == 2);
    let config = Config {
        api_key: Some(LONG_API_KEY.into()),
        jwt_secret: Some(LONG_SECRET.into()),
        ..Config::default()
    };
    let keys = Keys::resolve(&config).unwrap();
    assert!(!keys.dev && keys.dev_signer.is_none() && keys.generated.is_empty());
    assert!(
        keys.dev_api_key.is_none(),
        "the clear key is kept in dev mode only"
    );
    let config = Config {
        api_key: Some("k".into()),
        jwt_secret: Some("s".into()),
        dev: true,
        ..Config::default()
    };
    let keys = Keys::resolve(&config).unwrap();
    assert!(keys.dev && keys.dev_signer.is_some() && keys.generated.is_empty());
    // Explicit dev mode with one key fills in the other.
    let config = Config {
        api_key: Some("k".into()),
        dev: true,
        ..listening_on("0.0.0.0:8080")
    };
    let keys = Keys::resolve(&config).unwrap();
    assert!(keys.dev && keys.dev_signer.is_some());
    assert_eq!(keys.generated, ["HERALD_JWT_SECRET"]);
}

#[test]
fn implicit_dev_mode_on_loopback_only() {
    for listen in ["127.0.0.1:8080", "127.1.2.3:0", "[::1]:8080"] {
        assert!(dev_mode(&listening_on(listen)).unwrap(), "{listen}");
    }
    for listen in [
        "0.0.0.0:8080",
        "[::]:8080",
        "10.0.0.1:8080",
        "[::ffff:127.0.0.1]:80",
    ] {
        let err = dev_mode(&listening_on(listen)).unwrap_err();
        assert!(
            matches!(err, KeyError::NoKeysOffLoopback { .. }),
            "{listen}: {err}"
        );
        let text = err.to_string();
        assert!(
            text.contains("HERALD_JWT_SECRET") && text.contains("HERALD_API_KEY"),
            "{text}"
        );
    }
    // HERALD_DEV=1 turns it on anywhere, with or without keys.
    let config = Config {
        dev: true,
        ..listening_on("0.0.0.0:8080")
    };
    assert!(dev_mode(&config).unwrap());
}

#[test]
fn outside_dev_mode_both_keys_are_required() {
    for listen in ["127.0.0.1:8080", "0.0.0.0:8080"] {
        let only_api = Config {
            api_key: Some(LONG_API_KEY.into()),
            ..listening_on(listen)
        };
        let err = dev_mode(&only_api).unwrap_err();
        assert!(matches!(err, KeyError::Missing(_)), "{err}");
        assert!(err.to_string().starts_with("HERALD_JWT_SECRET"), "{err}");
        let only_secret = Config {
            jwt_secret: Some(LONG_SECRET.into()),
            ..listening_on(listen)
        };
        let err = dev_mode(&only_secret).unwrap_err();
        assert!(matches!(err, KeyError::Missing("HERALD_API_KEY")), "{err}");
        let only_public_key = Config {
            jwt_public_key_file: Some("/nonexistent.pem".into()),
            ..listening_on(listen)
        };
        assert!(matches!(
            dev_mode(&only_public_key),
            Err(KeyError::Missing("HERALD_API_KEY"))
        ));
        let both = Config {
            jwt_public_key_file: Some("/nonexistent.pem".into()),
            api_key: Some(LONG_API_KEY.into()),
            ..listening_on(listen)
        };
        assert!(!dev_mode(&both).unwrap());
        // Keys::resolve applies the same rules.
        assert!(matches!(
            Keys::resolve(&only_api),
            Err(KeyError::Missing(_))
        ));
    }
}

#[test]
fn outside_dev_mode_short_keys_are_refused() {
    let short = "x".repeat(MIN_KEY_BYTES - 1);
    let config = |secret: &str, api_key: &str, dev: bool| Config {
        jwt_secret: Some(secret.into()),
        api_key: Some(api_key.into()),
        dev,
        ..Config::default()
    };
    let err = dev_mode(&config(&short, LONG_API_KEY, false)).unwrap_err();
    assert!(
        matches!(
            err,
            KeyError::TooShort {
                name: "HERALD_JWT_SECRET",
                len: 31
            }
        ),
        "{err}"
    );
    let err = dev_mode(&config(LONG_SECRET, &short, false)).unwrap_err();
    assert!(
        matches!(
            err,
            KeyError::TooShort {
                name: "HERALD_API_KEY",
                len: 31
            }
        ),
        "{err}"
    );
    assert!(
        !err.to_string().contains(&short),
        "the key is never printed"
    );
    // Bytes, not characters: 16 two-byte characters are 32 bytes.
    assert!(dev_mode(&config(&"é".repeat(16), LONG_API_KEY, false)).is_ok());
    assert!(dev_mode(&config(&"é".repeat(15), LONG_API_KEY, false)).is_err());
    // Dev mode takes short keys (deploy/cluster.env's are public anyway).
    assert!(dev_mode(&config("s", "k", true)).unwrap());
}

#[test]
fn empty_and_ambiguous_keys_are_refused_in_every_mode() {
    for dev in [false, true] {
        let empty_secret = Config {
            jwt_secret: Some(String::new()),
            dev,
            ..Config::default()
        };
        assert!(matches!(
            dev_mode(&empty_secret),
            Err(KeyError::Empty("HERALD_JWT_SECRET"))
        ));
        let empty_api = Config {
            api_key: Some(String::new()),
            dev,
            ..Config::default()
        };
        assert!(matches!(
            dev_mode(&empty_api),
            Err(KeyError::Empty("HERALD_API_KEY"))
        ));
        let both = Config {
            jwt_secret: Some(LONG_SECRET.into()),
            jwt_public_key_file: Some("/k.pem".into()),
            api_key: Some(LONG_API_KEY.into()),
            dev,
            ..Config::default()
        };
        assert!(matches!(dev_mode(&both), Err(KeyError::Ambiguous)));
    }
}
