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
