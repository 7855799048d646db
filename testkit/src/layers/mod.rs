//! The import graph of a crate's modules, read from its source files, and its cycles.
//!
//! [`import_graph`] reads a crate's `src/` folder: starting at `lib.rs` and `main.rs`, it
//! follows `mod NAME;` declarations (`NAME.rs` or `NAME/mod.rs`, or a
//! `#[path = "..."]` attribute's file), so every file the compiler would read is one
//! module: `a/b.rs` and `a/b/mod.rs` are `crate::a::b`, `lib.rs` and `main.rs` are
//! `crate`. Each file's text is tokenized (comments, doc comments, string and character
//! literals are dropped) and every path that names a module of the crate is a
//! reference:
//!
//! - `use` declarations, grouped and over several lines as well
//!   (`use crate::{a::X, b::{self, Y}};`), from `crate::`, `super::` (any number),
//!   `self::`, a child module's name, or a name an earlier `use` bound to a module;
//! - paths in code, anywhere in the file: `crate::auth::now_secs()`,
//!   `super::memory::new_epoch()`, `fanout::spread()`.
//!
//! A path stands for the longest prefix of it that is a module with a file:
//! `crate::broker::memory::Foo` is `crate::broker::memory` when that file exists,
//! `crate::broker` otherwise. Inline modules (`mod inner { ... }`) belong to their file.
//!
//! The graph has an edge A → B for the references of file A to module B, except:
//!
//! - references to A itself or to one of A's ancestors (a child module that adds an
//!   `impl Parent` block imports its parent; that is layering, not a cycle);
//! - references from and to the crate root (`lib.rs`/`main.rs` wire the modules together);
//! - anything in an item under `#[cfg(test)]` (`#[cfg(test)] mod tests { ... }`, a
//!   `#[cfg(test)] mod tests;` file, a test-only `use` or `fn`): tests import freely.
//!
//! A parent's references to its own descendants are edges like any other. [`cycles`]
//! returns the strongly connected components of more than one module (Tarjan): each is a
//! set of modules that import one another in a loop, and [`Graph::report`] lists the
//! edges inside each one with the file and line of a reference that makes it.
//!
//! This is a reading of the text, not of the compiler's name resolution: a glob import
//! binds the glob's child modules, macros are read as plain tokens, and names bound by
//! `use` are tracked per file, not per block.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use tokens::*;

/// Where one reference is: a file and a line.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Site {
    /// The file, from the source folder's name: `src/a/b.rs`.
    pub file: PathBuf,
    /// The line, from 1.
    pub line: usize,
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// The modules of one crate and the references between them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Graph {
    /// Every module with a file of its own, by name (`crate::a::b`), with its file
    /// (`src/a/b.rs`). The crate root, `crate`, is among them.
    pub modules: BTreeMap<String, PathBuf>,
    /// The edges, `(from, to)`, each with every place that makes it: at least one, in
    /// file and line order, so the first is an example for a message.
    pub edges: BTreeMap<(String, String), Vec<Site>>,
}

impl Graph {
    /// The places that make the edge `from` → `to`, if there is one.
    pub fn edge(&self, from: &str, to: &str) -> Option<&[Site]> {
        self.edges
            .get(&(from.to_string(), to.to_string()))
            .map(Vec::as_slice)
    }

    /// The edges whose two ends are both among `modules` (one of [`cycles`]'s
    /// results, say), in name order, each with the places that make it.
    pub fn edges_within<'a>(
        &'a self,
        modules: &'a [String],
    ) -> impl Iterator<Item = (&'a str, &'a str, &'a [Site])> + 'a {
        self.edges
            .iter()
            .filter(move |((from, to), _)| modules.contains(from) && modules.contains(to))
            .map(|((from, to), sites)| (from.as_str(), to.as_str(), sites.as_slice()))
    }

    /// A readable account of `cycles` (from [`cycles`]): for each one its modules, one
    /// shortest loop through them, and every edge inside it as
    /// `crate::a -> crate::b (src/a.rs:12)`, with how many other places make that edge.
    pub fn report(&self, cycles: &[Vec<String>]) -> String {
        let mut out = String::new();
        for (i, cycle) in cycles.iter().enumerate() {
            out.push_str(&format!(
                "cycle {} of {}, {} modules: {}\n",
                i + 1,
                cycles.len(),
                cycle.len(),
                cycle.join(", ")
            ));
            if let Some(path) = self.shortest_loop(cycle) {
                out.push_str(&format!("  loop: {}\n", path.join(" -> ")));
            }
            for (from, to, sites) in self.edges_within(cycle) {
                let more = match sites.len() {
                    1 => String::new(),
                    n => format!(", +{} more", n - 1),
                };
                out.push_str(&format!("  {from} -> {to} ({}{more})\n", sites[0]));
            }
        }
        out
    }

    /// A shortest path from the first module of `cycle` back to itself, through the
    /// cycle's edges only: `[a, b, c, a]`.
    fn shortest_loop(&self, cycle: &[String]) -> Option<Vec<String>> {
        let start = cycle.first()?;
        let mut previous: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = VecDeque::from([start.as_str()]);
        while let Some(at) = queue.pop_front() {
            for (from, to, _) in self.edges_within(cycle) {
                if from != at {
                    continue;
                }
                if to == start {
                    let mut path = vec![start.clone()];
                    let mut node = at;
                    while node != start {
                        path.push(node.to_string());
                        node = previous[node];
                    }
                    path.push(start.clone());
                    path.reverse();
                    return Some(path);
                }
                if !previous.contains_key(to) {
                    previous.insert(to, at);
                    queue.push_back(to);
                }
            }
        }
        None
    }
}

/// Reads the crate whose source folder is `src` (it must hold `lib.rs` or `main.rs`)
/// into its module graph: see the [module documentation](self) for what is a module and
/// what is an edge.
pub fn import_graph(src: &Path) -> io::Result<Graph> {
    let label = PathBuf::from(src.file_name().unwrap_or("src".as_ref()));
    let mut files: Vec<ModuleFile> = Vec::new();
    let mut seen: BTreeSet<Vec<String>> = BTreeSet::new();
    let mut queue: VecDeque<(Vec<String>, PathBuf, bool)> = VecDeque::new();
    for root in ["lib.rs", "main.rs"] {
        let path = src.join(root);
        if path.is_file() {
            queue.push_back((vec!["crate".to_string()], path, true));
        }
    }
    if queue.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no lib.rs or main.rs in {}", src.display()),
        ));
    }
    while let Some((module, path, mod_rs)) = queue.pop_front() {
        let text = fs::read_to_string(&path)?;
        let scan = scan(&tokenize(&text));
        let dir = path.parent().unwrap_or(Path::new("")).to_path_buf();
        for child in &scan.children {
            let mut name = module.clone();
            name.extend(child.inline.iter().cloned());
            name.push(child.name.clone());
            // A non-mod-rs file `a/b.rs` keeps its children in `a/b/`.
            let mut base = dir.clone();
            if !mod_rs && (child.path.is_none() || !child.inline.is_empty()) {
                if let Some(stem) = path.file_stem() {
                    base.push(stem);
                }
            }
            if child.path.is_none() || !child.inline.is_empty() {
                base.extend(child.inline.iter());
            }
            let found = match &child.path {
                // A file named by `#[path]` keeps its children beside it, like a mod.rs.
                Some(p) => Some((base.join(p), true)).filter(|(f, _)| f.is_file()),
                None => {
                    let flat = base.join(format!("{}.rs", child.name));
                    let nested = base.join(&child.name).join("mod.rs");
                    if flat.is_file() {
                        Some((flat, false))
                    } else if nested.is_file() {
                        Some((nested, true))
                    } else {
                        None
                    }
                }
            };
            // A missing file does not compile either; there is nothing to read.
            if let Some((file, child_mod_rs)) = found {
                if !seen.contains(&name) {
                    queue.push_back((name, file, child_mod_rs));
                }
            }
        }
        if seen.insert(module.clone()) {
            let rel = path.strip_prefix(src).unwrap_or(&path);
            files.push(ModuleFile {
                module,
                file: label.join(rel),
                scan,
            });
        } else if let Some(existing) = files.iter_mut().find(|f| f.module == module) {
            // lib.rs and main.rs are both `crate`: one root with both files' references
            // (edges from the root are dropped anyway).
            existing.scan.refs.extend(scan.refs);
        }
    }

    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| f.module.clone()).collect();
    let mut graph = Graph {
        modules: files
            .iter()
            .map(|f| (f.module.join("::"), f.file.clone()))
            .collect(),
        edges: BTreeMap::new(),
    };
    for file in &files {
        if file.module.len() == 1 {
            continue; // the crate root: wiring, not a layer
        }
        let aliases = aliases(file, &modules);
        for r in &file.scan.refs {
            let mut scope = file.module.clone();
            scope.extend(r.scope.iter().cloned());
            let Some(path) = absolute(&scope, &r.segments, &modules, &aliases) else {
                continue;
            };
            let target = longest_module(&path, &modules);
            if target.len() == 1 || file.module.starts_with(target) {
                continue; // the root, the file itself, or one of its ancestors
            }
            let sites = graph
                .edges
                .entry((file.module.join("::"), target.join("::")))
                .or_default();
            let site = Site {
                file: file.file.clone(),
                line: r.line,
            };
            if let Err(at) = sites.binary_search(&site) {
                sites.insert(at, site);
            }
        }
    }
    Ok(graph)
}

/// The import cycles of `graph`: each strongly connected component of more than one
/// module, as its module names in order; the components in order of their first name.
/// Empty when the modules form layers.
pub fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    let names: Vec<&str> = graph
        .modules
        .keys()
        .map(String::as_str)
        .filter(|m| *m != "crate")
        .collect();
    let index: BTreeMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let mut next = vec![Vec::new(); names.len()];
    for (from, to) in graph.edges.keys() {
        if let (Some(&f), Some(&t)) = (index.get(from.as_str()), index.get(to.as_str())) {
            next[f].push(t);
        }
    }
    let mut tarjan = Tarjan {
        next: &next,
        index: vec![None; names.len()],
        low: vec![0; names.len()],
        on_stack: vec![false; names.len()],
        stack: Vec::new(),
        counter: 0,
        components: Vec::new(),
    };
    for v in 0..names.len() {
        if tarjan.index[v].is_none() {
            tarjan.visit(v);
        }
    }
    let mut out: Vec<Vec<String>> = tarjan
        .components
        .into_iter()
        .filter(|c| c.len() > 1)
        .map(|c| {
            let mut c: Vec<String> = c.into_iter().map(|i| names[i].to_string()).collect();
            c.sort();
            c
        })
        .collect();
    out.sort();
    out
}

/// Tarjan's strongly connected components over `next` (adjacency by index).
struct Tarjan<'a> {
    next: &'a [Vec<usize>],
    index: Vec<Option<usize>>,
    low: Vec<usize>,
    on_stack: Vec<bool>,
    stack: Vec<usize>,
    counter: usize,
    components: Vec<Vec<usize>>,
}

impl Tarjan<'_> {
    fn visit(&mut self, v: usize) {
        self.index[v] = Some(self.counter);
        self.low[v] = self.counter;
        self.counter += 1;
        self.stack.push(v);
        self.on_stack[v] = true;
        for &w in &self.next[v] {
            match self.index[w] {
                None => {
                    self.visit(w);
                    self.low[v] = self.low[v].min(self.low[w]);
                }
                Some(iw) if self.on_stack[w] => self.low[v] = self.low[v].min(iw),
                Some(_) => {}
            }
        }
        if Some(self.low[v]) == self.index[v] {
            let mut component = Vec::new();
            while let Some(w) = self.stack.pop() {
                self.on_stack[w] = false;
                component.push(w);
                if w == v {
                    break;
                }
            }
            self.components.push(component);
        }
    }
}

/// One file of the crate, scanned.
struct ModuleFile {
    /// Its module: `["crate", "a", "b"]`.
    module: Vec<String>,
    /// As in [`Site::file`].
    file: PathBuf,
    scan: Scan,
}

/// The names a file's `use` declarations bind to modules of the crate (`use
/// crate::broker;` binds `broker`; a glob binds the glob's child modules), followed
/// through one another.
fn aliases(file: &ModuleFile, modules: &BTreeSet<Vec<String>>) -> BTreeMap<String, Vec<String>> {
    let mut aliases: BTreeMap<String, Vec<String>> = BTreeMap::new();
    loop {
        let before = aliases.len();
        for r in &file.scan.refs {
            let Kind::Use { binding, glob } = &r.kind else {
                continue;
            };
            let mut scope = file.module.clone();
            scope.extend(r.scope.iter().cloned());
            let Some(path) = absolute(&scope, &r.segments, modules, &aliases) else {
                continue;
            };
            if !modules.contains(&path) {
                continue;
            }
            if *glob {
                for m in modules {
                    if m.len() == path.len() + 1 && m.starts_with(&path) {
                        let name = m[m.len() - 1].clone();
                        aliases.entry(name).or_insert_with(|| m.clone());
                    }
                }
            } else if let Some(name) = binding {
                aliases.entry(name.clone()).or_insert(path);
            }
        }
        if aliases.len() == before {
            return aliases;
        }
    }
}

/// The absolute path (from `crate`) that `segments`, written in module `scope`, names,
/// if it is a path into this crate.
fn absolute(
    scope: &[String],
    segments: &[String],
    modules: &BTreeSet<Vec<String>>,
    aliases: &BTreeMap<String, Vec<String>>,
) -> Option<Vec<String>> {
    let first = segments.first()?;
    let mut path: Vec<String> = match first.as_str() {
        "crate" | "$crate" => vec!["crate".to_string()],
        "self" => scope.to_vec(),
        "super" => {
            let supers = segments.iter().take_while(|s| *s == "super").count();
            if supers >= scope.len() {
                return None; // above the crate root
            }
            let mut path = scope[..scope.len() - supers].to_vec();
            path.extend(segments[supers..].iter().cloned());
            return Some(path);
        }
        name => {
            let mut child = scope.to_vec();
            child.push(name.to_string());
            if modules.iter().any(|m| m.starts_with(&child)) {
                scope.to_vec()
            } else if let Some(target) = aliases.get(name) {
                let mut path = target.clone();
                path.extend(segments[1..].iter().cloned());
                return Some(path);
            } else {
                return None; // another crate, or an item of this module
            }
        }
    };
    let skip = usize::from(first == "crate" || first == "$crate" || first == "self");
    path.extend(segments[skip..].iter().cloned());
    Some(path)
}

/// The longest prefix of `path` that is one of `modules` (at least `crate`).
fn longest_module<'a>(path: &'a [String], modules: &BTreeSet<Vec<String>>) -> &'a [String] {
    (1..=path.len())
        .rev()
        .map(|n| &path[..n])
        .find(|p| modules.contains(*p))
        .unwrap_or(&path[..1])
}

/// What one file declares and refers to.
mod tokens;

#[cfg(test)]
mod tests;
