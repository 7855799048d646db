//! How deeply a JSON text nests arrays and objects.
//!
//! `data` travels as raw JSON text from a publisher to every recipient and is never
//! parsed into a tree on the node, so the node itself does not mind deep nesting. The
//! recipients do: browsers and most JSON libraries parse recursively (serde_json stops
//! at 128 levels, some stacks overflow far earlier), so one message nested 20,000 levels
//! deep could crash every subscriber of a channel. Data nested deeper than
//! [`MAX_DATA_DEPTH`] is therefore refused at the entry (a `bad_request` reply on the
//! socket, 400 on the HTTP API).

/// The deepest nesting of arrays and objects accepted in published `data`. 64 is far
/// beyond any real payload (a social app's events nest a handful of levels) and well
/// inside what every common JSON parser handles.
pub const MAX_DATA_DEPTH: usize = 64;

/// The deepest nesting of `[` and `{` in `json`, counted outside strings (escapes
/// honoured). `1` for `[]` or `{}`, `0` for a scalar.
///
/// The text is assumed to be valid JSON (the caller parsed it already); on other text
/// the answer is still defined (brackets are counted, never matched) and never panics.
pub fn nesting_depth(json: &str) -> usize {
    let mut depth = 0usize;
    let mut deepest = 0usize;
    scan(json, |d| {
        depth = d;
        deepest = deepest.max(depth);
        true
    });
    deepest
}

/// Whether `json` nests arrays and objects deeper than `max`; stops at the first level
/// over it, so a hostile text costs no more than reading up to that point.
pub fn nests_deeper_than(json: &str, max: usize) -> bool {
    let mut over = false;
    scan(json, |d| {
        over = d > max;
        !over
    });
    over
}

/// Walks `json`, calling `on_depth` with the new depth at every opening and closing
/// bracket outside strings; stops when it returns false.
fn scan(json: &str, mut on_depth: impl FnMut(usize) -> bool) {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    // Bytes, not chars: every byte that matters is ASCII, and a UTF-8 continuation byte
    // is never an ASCII byte.
    for &b in json.as_bytes() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if !on_depth(depth) {
                    return;
                }
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                if !on_depth(depth) {
                    return;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    fn depth_of(v: &Value) -> usize {
        match v {
            Value::Array(a) => 1 + a.iter().map(depth_of).max().unwrap_or(0),
            Value::Object(o) => 1 + o.values().map(depth_of).max().unwrap_or(0),
            _ => 0,
        }
    }

    #[test]
    fn counts_brackets_outside_strings() {
        assert_eq!(nesting_depth("1"), 0);
        assert_eq!(nesting_depth("\"[[[\""), 0);
        assert_eq!(nesting_depth("[]"), 1);
        assert_eq!(nesting_depth("{\"a\":[1,{\"b\":[]}]}"), 4);
        assert_eq!(nesting_depth(r#"["\"[[[", {"k\\": [[]]}]"#), 4);
        assert_eq!(
            nesting_depth(r#"["\\", [1]]"#),
            2,
            "an escaped backslash ends"
        );
        assert_eq!(nesting_depth("[\"é[\", [\"ü\"]]"), 2);
    }

    #[test]
    fn the_limit_is_inclusive() {
        let at = format!("{}{}", "[".repeat(64), "]".repeat(64));
        let over = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert!(!nests_deeper_than(&at, MAX_DATA_DEPTH));
        assert!(nests_deeper_than(&over, MAX_DATA_DEPTH));
        let deep = "[".repeat(20_000);
        assert!(nests_deeper_than(&deep, MAX_DATA_DEPTH));
        assert_eq!(nesting_depth(&deep), 20_000);
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            // Strings full of the characters that matter: brackets, quotes, backslashes.
            "[\\[\\]{}\"\\\\a-z é]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(12, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[\\[\\]{}\"\\\\a-z]{0,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn agrees_with_serde_json(v in json_value()) {
            let compact = serde_json::to_string(&v).unwrap();
            let pretty = serde_json::to_string_pretty(&v).unwrap();
            let want = depth_of(&v);
            prop_assert_eq!(nesting_depth(&compact), want);
            prop_assert_eq!(nesting_depth(&pretty), want);
            for max in [0, want.saturating_sub(1), want, want + 1] {
                prop_assert_eq!(nests_deeper_than(&compact, max), want > max);
            }
        }

        #[test]
        fn never_panics(s in ".{0,200}") {
            let _ = nesting_depth(&s);
            let _ = nests_deeper_than(&s, 3);
        }
    }
}
