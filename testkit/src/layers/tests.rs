//! Tests of the import-cycle check on small crates made for the purpose.

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A crate in a fresh folder under the temporary directory, removed on drop.
struct TempCrate {
    dir: PathBuf,
}

impl TempCrate {
    /// Writes each `(path under src/, text)`.
    fn new(files: &[(&str, &str)]) -> TempCrate {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "herald-layers-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        for (path, text) in files {
            let file = dir.join("src").join(path);
            fs::create_dir_all(file.parent().unwrap()).unwrap();
            fs::write(&file, text).unwrap();
        }
        TempCrate { dir }
    }

    fn graph(&self) -> Graph {
        import_graph(&self.dir.join("src")).unwrap()
    }
}

impl Drop for TempCrate {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn names(list: &[&[&str]]) -> Vec<Vec<String>> {
    list.iter()
        .map(|c| c.iter().map(|s| s.to_string()).collect())
        .collect()
}

fn lines(graph: &Graph, from: &str, to: &str) -> Vec<usize> {
    graph
        .edge(from, to)
        .unwrap_or_else(|| panic!("no edge {from} -> {to} in {:?}", graph.edges))
        .iter()
        .map(|s| s.line)
        .collect()
}

#[test]
fn a_two_file_cycle_through_use_is_found() {
    let krate = TempCrate::new(&[
        ("lib.rs", "pub mod a;\npub mod b;\n"),
        ("a.rs", "use crate::b::X;\npub struct Y;\n"),
        ("b.rs", "pub struct X;\n\nuse crate::a::Y;\n"),
    ]);
    let graph = krate.graph();
    let found = cycles(&graph);
    assert_eq!(found, names(&[&["crate::a", "crate::b"]]));
    let report = graph.report(&found);
    assert!(
        report.contains("crate::a -> crate::b (src/a.rs:1)"),
        "{report}"
    );
    assert!(
        report.contains("crate::b -> crate::a (src/b.rs:3)"),
        "{report}"
    );
    assert!(
        report.contains("loop: crate::a -> crate::b -> crate::a"),
        "{report}"
    );
}

#[test]
fn a_cycle_through_super_and_inline_paths_is_found() {
    let krate = TempCrate::new(&[
        ("lib.rs", "pub mod a;\npub mod c;\n"),
        ("a/mod.rs", "pub mod b;\npub mod d;\n"),
        ("a/b.rs", "use super::d::h;\npub fn g() -> u8 { h() }\n"),
        ("a/d.rs", "pub fn h() -> u8 {\n    crate::c::f()\n}\n"),
        ("c.rs", "pub fn f() -> u8 { super::a::b::g() }\n"),
    ]);
    let graph = krate.graph();
    assert_eq!(
        cycles(&graph),
        names(&[&["crate::a::b", "crate::a::d", "crate::c"]])
    );
    assert_eq!(lines(&graph, "crate::a::b", "crate::a::d"), [1]);
    assert_eq!(lines(&graph, "crate::a::d", "crate::c"), [2]);
    assert_eq!(lines(&graph, "crate::c", "crate::a::b"), [1]);

    // super::super, and a name bound by `use` to a module.
    let krate = TempCrate::new(&[
        ("lib.rs", "pub mod a;\npub mod c;\n"),
        ("a/mod.rs", "pub mod b;\n"),
        ("a/b.rs", "pub fn g() -> u8 { super::super::c::f() }\n"),
        (
            "c.rs",
            "use crate::a::b;\npub fn f() -> u8 { 1 }\nfn k() -> u8 { b::g() }\n",
        ),
    ]);
    let graph = krate.graph();
    assert_eq!(cycles(&graph), names(&[&["crate::a::b", "crate::c"]]));
    assert_eq!(lines(&graph, "crate::c", "crate::a::b"), [1, 3]);
}

#[test]
fn grouped_multi_line_use_is_parsed() {
    let krate = TempCrate::new(&[
        ("lib.rs", "pub mod a;\npub mod b;\npub mod d;\n"),
        ("a.rs", "pub struct X;\nuse crate::d::W;\n"),
        ("b/mod.rs", "pub mod e;\npub struct Y;\npub struct Z;\n"),
        ("b/e.rs", "pub fn f() {}\n"),
        (
            "d.rs",
            "use crate::{\n    a::X,\n    b::{\n        self,\n        Y, Z,\n    },\n};\npub struct W;\nfn g() { b::e::f() }\n",
        ),
    ]);
    let graph = krate.graph();
    assert_eq!(cycles(&graph), names(&[&["crate::a", "crate::d"]]));
    assert_eq!(lines(&graph, "crate::d", "crate::a"), [2]);
    assert_eq!(lines(&graph, "crate::d", "crate::b"), [4, 5]);
    // `b::{self, ..}` binds `b`, so `b::e::f()` names crate::b::e.
    assert_eq!(lines(&graph, "crate::d", "crate::b::e"), [9]);
}

#[test]
fn comments_strings_and_test_items_are_ignored() {
    let b = r####"//! See crate::a::Y, and use crate::a::Y;
/// Uses [`crate::a::Y`].
pub struct X; // crate::a::Y
/* crate::a::Y /* nested crate::a::Y */ still a comment: crate::a::Y */
pub const S: &str = "crate::a::Y \" crate::a::Y";
pub const R: &str = r#"crate::a::Y " crate::a::Y"#;
pub const Q: char = '"';
pub const E: char = '\'';
pub fn f<'a>(x: &'a str) -> &'a str { let _ = b"use crate::a::Y;"; x }
pub fn g() { crate::c::k() }
#[cfg(test)]
mod tests {
use crate::a::Y;
fn t() { let _ = crate::a::Y; }
mod deeper { fn u() { super::super::super::a::f() } }
}
#[cfg(test)]
#[allow(unused)]
pub(crate) use crate::a::Y as Z;
#[cfg(test)]
fn helper() -> crate::a::Y { crate::a::Y }
#[cfg(test)]
mod more_tests;
pub fn h() { crate::c::k() }
"####;
    let krate = TempCrate::new(&[
        ("lib.rs", "pub mod a;\npub mod b;\npub mod c;\n"),
        ("a.rs", "use crate::b::X;\npub struct Y;\npub fn f() {}\n"),
        ("b.rs", b),
        ("b/more_tests.rs", "use crate::a::Y;\n"),
        ("c.rs", "pub fn k() {}\n"),
    ]);
    let graph = krate.graph();
    assert_eq!(cycles(&graph), Vec::<Vec<String>>::new());
    assert_eq!(graph.edge("crate::b", "crate::a"), None);
    assert!(!graph.modules.contains_key("crate::b::more_tests"));
    // The tokenizer is back in step after each literal: both calls to c count.
    assert_eq!(lines(&graph, "crate::b", "crate::c"), [10, 24]);
}

#[test]
fn a_child_referring_to_its_parent_is_not_a_cycle() {
    let krate = TempCrate::new(&[
        ("lib.rs", "pub mod hub;\n"),
        (
            "hub.rs",
            "pub mod fanout;\npub struct Hub;\npub fn go(h: &Hub) { fanout::spread(h) }\n",
        ),
        ("hub/fanout.rs", "pub mod deep;\nuse crate::hub::Hub;\nimpl Hub {\n    pub fn x(&self) { super::go(self) }\n}\npub fn spread(_: &Hub) { deep::f() }\n"),
        ("hub/fanout/deep.rs", "pub fn f() { crate::hub::go(&super::super::Hub) }\n"),
    ]);
    let graph = krate.graph();
    assert_eq!(cycles(&graph), Vec::<Vec<String>>::new());
    assert_eq!(lines(&graph, "crate::hub", "crate::hub::fanout"), [3]);
    assert_eq!(
        lines(&graph, "crate::hub::fanout", "crate::hub::fanout::deep"),
        [6]
    );
    let upward: Vec<_> = graph
        .edges
        .keys()
        .filter(|(from, to)| from.starts_with(to.as_str()))
        .collect();
    assert!(upward.is_empty(), "{upward:?}");
}

#[test]
fn a_layered_crate_has_no_cycles() {
    let krate = TempCrate::new(&[
        ("main.rs", "mod api;\nmod config;\nmod store;\nuse crate::api::serve;\nfn main() { serve() }\n"),
        ("config.rs", "pub struct Config;\n"),
        ("store/mod.rs", "pub mod memory;\npub trait Store {}\nuse crate::config::Config;\n"),
        ("store/memory.rs", "use super::Store;\nuse crate::config::Config;\npub struct Memory(Config);\nimpl Store for Memory {}\n"),
        ("api.rs", "use crate::{config::Config, store::{memory::Memory, Store}};\npub fn serve() {}\n"),
    ]);
    let graph = krate.graph();
    assert_eq!(cycles(&graph), Vec::<Vec<String>>::new());
    let edges: Vec<(&str, &str)> = graph
        .edges
        .keys()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        edges,
        [
            ("crate::api", "crate::config"),
            ("crate::api", "crate::store"),
            ("crate::api", "crate::store::memory"),
            ("crate::store", "crate::config"),
            ("crate::store::memory", "crate::config"),
        ]
    );
    assert_eq!(
        graph.modules.get("crate::store::memory"),
        Some(&PathBuf::from("src/store/memory.rs"))
    );
}

#[test]
fn paths_name_the_longest_existing_module() {
    let krate = TempCrate::new(&[
        ("lib.rs", "pub mod broker;\npub mod hub;\n"),
        ("broker/mod.rs", "pub mod memory;\npub mod redis { pub struct R; }\n"),
        ("broker/memory.rs", "pub struct Foo;\n"),
        (
            "hub.rs",
            "fn f() {\n    crate::broker::memory::Foo::new();\n    crate::broker::redis::R;\n    crate::broker::Broker::x();\n}\n",
        ),
    ]);
    let graph = krate.graph();
    assert_eq!(lines(&graph, "crate::hub", "crate::broker::memory"), [2]);
    assert_eq!(lines(&graph, "crate::hub", "crate::broker"), [3, 4]);
}

#[test]
fn path_attributes_are_followed() {
    let krate = TempCrate::new(&[
        (
            "lib.rs",
            "#[path = \"other/place.rs\"]\npub mod x;\npub mod y;\n",
        ),
        ("other/place.rs", "pub fn f() { crate::y::g() }\n"),
        ("y.rs", "pub fn g() { crate::x::f() }\n"),
    ]);
    let graph = krate.graph();
    assert_eq!(
        graph.modules.get("crate::x"),
        Some(&PathBuf::from("src/other/place.rs"))
    );
    assert_eq!(cycles(&graph), names(&[&["crate::x", "crate::y"]]));
}

#[test]
fn a_folder_without_a_crate_root_is_an_error() {
    let krate = TempCrate::new(&[("a.rs", "")]);
    let err = import_graph(&krate.dir.join("src")).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
}
