//! The modules of the server and of the client form layers: no import cycles
//! (`herald_testkit::layers`, and the crate documentation's "Import cycles").
//!
//! `HERALD_IMPORT_CYCLES_ROOT` checks another tree with the same layout instead of this
//! workspace, such as an extracted commit:
//! `git archive HEAD server/src client/src | tar -x -C /tmp/head-src`, then
//! `HERALD_IMPORT_CYCLES_ROOT=/tmp/head-src cargo test -p herald-testkit --test import_cycles`.

use std::path::{Path, PathBuf};

use herald_testkit::layers;

/// Fails with every cycle of `<root>/<krate>/src`, each with its edges and their places.
fn assert_no_cycles(krate: &str) {
    let root = std::env::var_os("HERALD_IMPORT_CYCLES_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    let src = root.join(krate).join("src");
    let graph =
        layers::import_graph(&src).unwrap_or_else(|e| panic!("cannot read {}: {e}", src.display()));
    // A wrong folder would read as a crate without cycles.
    assert!(
        graph.modules.len() > 3,
        "{} has only {:?}",
        src.display(),
        graph.modules.keys()
    );
    let cycles = layers::cycles(&graph);
    assert!(
        cycles.is_empty(),
        "{krate}/src has {} import cycle(s); break each by removing some of its edges \
         (file:line of one reference each):\n{}",
        cycles.len(),
        graph.report(&cycles)
    );
}

#[test]
fn server_modules_have_no_import_cycles() {
    assert_no_cycles("server");
}

#[test]
fn client_modules_have_no_import_cycles() {
    assert_no_cycles("client");
}

/// The server's top-level modules, in the order of the layers of `server/src/lib.rs`'s
/// crate doc: leaves, the backend, pure rules, node services, verbs, transports. A module
/// imports only from modules before it (or from inside itself).
const SERVER_ORDER: &[&str] = &[
    "config",
    "clock",
    "metrics",
    "backend",
    "continuity",
    "limits",
    "auth",
    "mailbox",
    "hub",
    "users",
    "presence",
    "receipts",
    "webhook",
    "registry",
    "cutoff",
    "events",
    "publish",
    "membership",
    "node",
    "listener",
    "api",
    "ws",
    "web",
];

/// The top-level module of `crate::a::b` (`a`), or `None` for the crate root.
fn top(module: &str) -> Option<&str> {
    module.strip_prefix("crate::")?.split("::").next()
}

#[test]
fn server_modules_import_only_downward() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../server/src");
    let graph = layers::import_graph(&src).expect("server/src");
    let rank = |m: &str| SERVER_ORDER.iter().position(|t| *t == m);
    let mut upward = Vec::new();
    for ((from, to), sites) in &graph.edges {
        let (Some(f), Some(t)) = (top(from), top(to)) else {
            continue;
        };
        if f == t {
            continue;
        }
        let (Some(rf), Some(rt)) = (rank(f), rank(t)) else {
            upward.push(format!(
                "{from} -> {to}: a module missing from SERVER_ORDER"
            ));
            continue;
        };
        if rt > rf {
            upward.push(format!("{from} -> {to} ({})", sites[0]));
        }
    }
    assert!(
        upward.is_empty(),
        "imports against the layer order of server/src/lib.rs:\n{}",
        upward.join("\n")
    );
    // Every top-level module is placed, so a new one must be given its layer.
    for m in graph.modules.keys().filter_map(|m| top(m)) {
        assert!(rank(m).is_some(), "{m} is not in SERVER_ORDER");
    }
}
