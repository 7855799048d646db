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
#[derive(Debug, Default)]
struct Scan {
    /// Its `mod NAME;` declarations (not the test-only ones).
    children: Vec<Child>,
    /// Its paths, outside test-only items.
    refs: Vec<Ref>,
}

/// A `mod NAME;` declaration.
#[derive(Debug)]
struct Child {
    name: String,
    /// The inline modules (`mod x { ... }`) it is in, outermost first.
    inline: Vec<String>,
    /// Its `#[path = "..."]`, if any.
    path: Option<String>,
}

/// One path in a file.
#[derive(Debug)]
struct Ref {
    /// The inline modules it is in, outermost first.
    scope: Vec<String>,
    /// As written, from its first segment: `["super", "memory", "new_epoch"]`.
    segments: Vec<String>,
    line: usize,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    /// A leaf of a `use` tree: the name it binds (`None` for `as _`), whether a glob.
    Use { binding: Option<String>, glob: bool },
    /// A path in code.
    Code,
}

/// A token of Rust source. Comments are dropped; literals keep only what the scan needs.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    /// An identifier or keyword (`r#x` is `x`; `$crate` and macro variables keep `$`).
    Ident(String),
    /// `::`.
    PathSep,
    /// Any other punctuation character.
    Punct(char),
    /// A string literal's text, unescaped only as far as `#[path]` needs.
    Str(String),
    /// A number, character or lifetime.
    Lit,
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    line: usize,
}

fn is_ident_start(c: char) -> bool {
    c == '_' || c.is_alphabetic()
}

fn is_ident_char(c: char) -> bool {
    c == '_' || c.is_alphanumeric()
}

/// Splits `text` into tokens, dropping whitespace and comments (nested block comments
/// too) and keeping literals whole, so nothing inside a comment or string is read as
/// code.
fn tokenize(text: &str) -> Vec<Token> {
    let c: Vec<char> = text.chars().collect();
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let mut out = Vec::new();
    let mut i = 0;
    let mut line = 1;
    while i < c.len() {
        let ch = c[i];
        let start_line = line;
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if c[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if ch == '"' {
            let (s, end) = quoted(&c, i + 1, &mut line);
            out.push(Token {
                tok: Tok::Str(s),
                line: start_line,
            });
            i = end;
        } else if ch == '\'' {
            i = char_or_lifetime(&c, i);
            out.push(Token {
                tok: Tok::Lit,
                line,
            });
        } else if is_ident_start(ch) {
            let begin = i;
            while i < c.len() && is_ident_char(c[i]) {
                i += 1;
            }
            let word: String = c[begin..i].iter().collect();
            let next = at(i);
            let raw_string = next == '"'
                || (next == '#'
                    && (i + 1..c.len()).find(|&j| c[j] != '#').map(|j| c[j]) == Some('"'));
            if matches!(word.as_str(), "b" | "c") && next == '"' {
                let (s, end) = quoted(&c, i + 1, &mut line);
                out.push(Token {
                    tok: Tok::Str(s),
                    line: start_line,
                });
                i = end;
            } else if matches!(word.as_str(), "r" | "br" | "cr") && raw_string {
                let hashes = (i..c.len()).take_while(|&j| c[j] == '#').count();
                let mut j = i + hashes + 1;
                let body = j;
                loop {
                    if j >= c.len() {
                        break;
                    }
                    if c[j] == '"' && (1..=hashes).all(|k| at(j + k) == '#') {
                        break;
                    }
                    if c[j] == '\n' {
                        line += 1;
                    }
                    j += 1;
                }
                out.push(Token {
                    tok: Tok::Str(c[body..j.min(c.len())].iter().collect()),
                    line: start_line,
                });
                i = (j + 1 + hashes).min(c.len());
            } else if word == "r" && next == '#' && is_ident_start(at(i + 1)) {
                let begin = i + 1;
                i = begin;
                while i < c.len() && is_ident_char(c[i]) {
                    i += 1;
                }
                out.push(Token {
                    tok: Tok::Ident(c[begin..i].iter().collect()),
                    line,
                });
            } else if word == "b" && next == '\'' {
                i = char_or_lifetime(&c, i);
                out.push(Token {
                    tok: Tok::Lit,
                    line,
                });
            } else {
                out.push(Token {
                    tok: Tok::Ident(word),
                    line,
                });
            }
        } else if ch.is_ascii_digit() {
            while i < c.len()
                && (is_ident_char(c[i]) || (c[i] == '.' && at(i + 1).is_ascii_digit()))
            {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Lit,
                line,
            });
        } else if ch == ':' && at(i + 1) == ':' {
            out.push(Token {
                tok: Tok::PathSep,
                line,
            });
            i += 2;
        } else if ch == '$' && is_ident_start(at(i + 1)) {
            let begin = i;
            i += 1;
            while i < c.len() && is_ident_char(c[i]) {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Ident(c[begin..i].iter().collect()),
                line,
            });
        } else {
            out.push(Token {
                tok: Tok::Punct(ch),
                line,
            });
            i += 1;
        }
    }
    out
}

/// Reads a `"`-quoted literal whose text starts at `i`: its text (with `\\` and `\"`
/// unescaped) and the index after the closing quote. Counts the newlines in it.
fn quoted(c: &[char], mut i: usize, line: &mut usize) -> (String, usize) {
    let mut s = String::new();
    while i < c.len() && c[i] != '"' {
        if c[i] == '\\' && i + 1 < c.len() {
            i += 1;
        }
        if c[i] == '\n' {
            *line += 1;
        }
        s.push(c[i]);
        i += 1;
    }
    (s, (i + 1).min(c.len()))
}

/// Skips the character literal (`'x'`, `'\n'`, `'\u{1F600}'`, `b'x'`) or lifetime
/// (`'a`, `'static`) at `i`, returning the index after it.
fn char_or_lifetime(c: &[char], mut i: usize) -> usize {
    if c[i] == 'b' {
        i += 1;
    }
    let at = |j: usize| c.get(j).copied().unwrap_or('\0');
    if at(i + 1) == '\\' {
        let mut j = i + 3; // past the quote, the backslash and the escaped character
        while j < c.len() && c[j] != '\'' && c[j] != '\n' {
            j += 1;
        }
        (j + 1).min(c.len())
    } else if at(i + 2) == '\'' {
        i + 3
    } else {
        let mut j = i + 1;
        while j < c.len() && is_ident_char(c[j]) {
            j += 1;
        }
        j
    }
}

/// The keywords an item can start with, after its attributes and visibility.
const ITEM_KEYWORDS: &[&str] = &[
    "mod",
    "fn",
    "use",
    "impl",
    "const",
    "static",
    "struct",
    "enum",
    "union",
    "type",
    "trait",
    "macro_rules",
    "async",
    "unsafe",
    "extern",
];

fn ident(t: &[Token], i: usize) -> Option<&str> {
    match t.get(i).map(|t| &t.tok) {
        Some(Tok::Ident(s)) => Some(s),
        _ => None,
    }
}

fn punct(t: &[Token], i: usize, p: char) -> bool {
    matches!(t.get(i).map(|t| &t.tok), Some(Tok::Punct(c)) if *c == p)
}

fn path_sep(t: &[Token], i: usize) -> bool {
    matches!(t.get(i).map(|t| &t.tok), Some(Tok::PathSep))
}

/// The index of the bracket closing the one at `open` (any of `()[]{}` count), or the
/// last token when it is never closed.
fn matching(t: &[Token], open: usize) -> usize {
    let mut depth = 0usize;
    for (i, token) in t.iter().enumerate().skip(open) {
        match token.tok {
            Tok::Punct('(' | '[' | '{') => depth += 1,
            Tok::Punct(')' | ']' | '}') => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    t.len().saturating_sub(1)
}

/// After `#[cfg(test)]` (ending before `i`): when an item follows (after more
/// attributes and a visibility), the index after that item (its `;`, or its first
/// `{ ... }` block); `None` when what follows is not an item (a field, a statement).
fn skip_test_item(t: &[Token], mut i: usize) -> Option<usize> {
    while punct(t, i, '#') && punct(t, i + 1, '[') {
        i = matching(t, i + 1) + 1;
    }
    if ident(t, i) == Some("pub") {
        i += 1;
        if punct(t, i, '(') {
            i = matching(t, i) + 1;
        }
    }
    if !ITEM_KEYWORDS.contains(&ident(t, i)?) {
        return None;
    }
    let mut depth = 0usize;
    while i < t.len() {
        match t[i].tok {
            Tok::Punct('(' | '[') => depth += 1,
            Tok::Punct(')' | ']') => depth = depth.saturating_sub(1),
            Tok::Punct('{') if depth == 0 => return Some(matching(t, i) + 1),
            Tok::Punct('{') => i = matching(t, i),
            Tok::Punct(';') if depth == 0 => return Some(i + 1),
            _ => {}
        }
        i += 1;
    }
    Some(i)
}

/// Finds a file's `mod` declarations and paths, skipping test-only items.
fn scan(t: &[Token]) -> Scan {
    let mut out = Scan::default();
    // Inline modules open around the current token: name, brace depth inside them.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut path_attr: Option<String> = None;
    let scope = |inline: &[(String, usize)]| -> Vec<String> {
        inline.iter().map(|(n, _)| n.clone()).collect()
    };
    let mut i = 0;
    while i < t.len() {
        match &t[i].tok {
            Tok::Punct('#') if punct(t, i + 1, '[') => {
                let end = matching(t, i + 1);
                let body = &t[i + 2..end.max(i + 2)];
                let body: Vec<&Tok> = body.iter().map(|t| &t.tok).collect();
                match body.as_slice() {
                    [Tok::Ident(cfg), Tok::Punct('('), Tok::Ident(test), Tok::Punct(')')]
                        if cfg == "cfg" && test == "test" =>
                    {
                        if let Some(after) = skip_test_item(t, end + 1) {
                            i = after;
                            path_attr = None;
                            continue;
                        }
                    }
                    [Tok::Ident(path), Tok::Punct('='), Tok::Str(file)] if path == "path" => {
                        path_attr = Some(file.clone());
                    }
                    _ => {}
                }
                i += 1;
            }
            Tok::Punct('{') => {
                depth += 1;
                path_attr = None;
                i += 1;
            }
            Tok::Punct('}') => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
                path_attr = None;
                i += 1;
            }
            Tok::Punct(';') => {
                path_attr = None;
                i += 1;
            }
            Tok::Ident(kw) if kw == "mod" && ident(t, i + 1).is_some() => {
                let name = ident(t, i + 1).unwrap_or_default().to_string();
                if punct(t, i + 2, ';') {
                    out.children.push(Child {
                        name,
                        inline: scope(&inline),
                        path: path_attr.take(),
                    });
                    i += 3;
                } else if punct(t, i + 2, '{') {
                    depth += 1;
                    inline.push((name, depth));
                    path_attr = None;
                    i += 3;
                } else {
                    i += 2;
                }
            }
            Tok::Ident(kw) if kw == "use" => {
                let mut leaves = Vec::new();
                let mut j = i + 1;
                if !path_sep(t, j) {
                    use_tree(t, &mut j, Vec::new(), &mut leaves);
                }
                while j < t.len() && !punct(t, j, ';') {
                    j += 1;
                }
                for (segments, line, binding, glob) in leaves {
                    out.refs.push(Ref {
                        scope: scope(&inline),
                        segments,
                        line,
                        kind: Kind::Use { binding, glob },
                    });
                }
                i = j + 1;
            }
            Tok::Ident(first)
                if path_sep(t, i + 1)
                    && ident(t, i + 2).is_some()
                    && !(i > 0 && (path_sep(t, i - 1) || punct(t, i - 1, '.'))) =>
            {
                let mut segments = vec![first.clone()];
                let mut j = i + 1;
                while path_sep(t, j) {
                    let Some(next) = ident(t, j + 1) else { break };
                    segments.push(next.to_string());
                    j += 2;
                }
                out.refs.push(Ref {
                    scope: scope(&inline),
                    segments,
                    line: t[j - 1].line,
                    kind: Kind::Code,
                });
                i = j;
            }
            _ => i += 1,
        }
    }
    out
}

/// A `use` tree's leaves: path, line, bound name, glob.
type Leaf = (Vec<String>, usize, Option<String>, bool);

/// Reads the `use` tree at `*i` (after `use`, or inside a group), adding each leaf,
/// under `prefix`, to `out`.
fn use_tree(t: &[Token], i: &mut usize, prefix: Vec<String>, out: &mut Vec<Leaf>) {
    if punct(t, *i, '{') {
        *i += 1;
        while *i < t.len() && !punct(t, *i, ';') {
            if punct(t, *i, '}') {
                *i += 1;
                return;
            }
            if punct(t, *i, ',') {
                *i += 1;
                continue;
            }
            let before = *i;
            use_tree(t, i, prefix.clone(), out);
            if *i == before {
                *i += 1;
            }
        }
        return;
    }
    if punct(t, *i, '*') {
        out.push((prefix, t[*i].line, None, true));
        *i += 1;
        return;
    }
    let Some(first) = ident(t, *i) else { return };
    let mut segments = prefix;
    segments.push(first.to_string());
    *i += 1;
    while path_sep(t, *i) {
        if let Some(next) = ident(t, *i + 1) {
            segments.push(next.to_string());
            *i += 2;
        } else {
            *i += 1;
            use_tree(t, i, segments, out);
            return;
        }
    }
    let line = t[*i - 1].line;
    if segments.len() > 1 && segments.last().is_some_and(|s| s == "self") {
        segments.pop();
    }
    let mut binding = segments.last().cloned();
    if ident(t, *i) == Some("as") {
        binding = ident(t, *i + 1).filter(|b| *b != "_").map(str::to_string);
        *i += 2;
    }
    out.push((segments, line, binding, false));
}

#[cfg(test)]
mod tests {
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
}
