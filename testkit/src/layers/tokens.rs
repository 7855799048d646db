//! The text side of the check: a small tokenizer (comments, strings and test items
//! left out) and the scan of one file for `mod` declarations and module paths.

#[derive(Debug, Default)]
pub(super) struct Scan {
    /// Its `mod NAME;` declarations (not the test-only ones).
    pub(super) children: Vec<Child>,
    /// Its paths, outside test-only items.
    pub(super) refs: Vec<Ref>,
}

/// A `mod NAME;` declaration.
#[derive(Debug)]
pub(super) struct Child {
    pub(super) name: String,
    /// The inline modules (`mod x { ... }`) it is in, outermost first.
    pub(super) inline: Vec<String>,
    /// Its `#[path = "..."]`, if any.
    pub(super) path: Option<String>,
}

/// One path in a file.
#[derive(Debug)]
pub(super) struct Ref {
    /// The inline modules it is in, outermost first.
    pub(super) scope: Vec<String>,
    /// As written, from its first segment: `["super", "memory", "new_epoch"]`.
    pub(super) segments: Vec<String>,
    pub(super) line: usize,
    pub(super) kind: Kind,
}

#[derive(Debug)]
pub(super) enum Kind {
    /// A leaf of a `use` tree: the name it binds (`None` for `as _`), whether a glob.
    Use { binding: Option<String>, glob: bool },
    /// A path in code.
    Code,
}

/// A token of Rust source. Comments are dropped; literals keep only what the scan needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Tok {
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
pub(super) struct Token {
    pub(super) tok: Tok,
    pub(super) line: usize,
}

pub(super) fn is_ident_start(c: char) -> bool {
    c == '_' || c.is_alphabetic()
}

pub(super) fn is_ident_char(c: char) -> bool {
    c == '_' || c.is_alphanumeric()
}

/// Splits `text` into tokens, dropping whitespace and comments (nested block comments
/// too) and keeping literals whole, so nothing inside a comment or string is read as
/// code.
pub(super) fn tokenize(text: &str) -> Vec<Token> {
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
pub(super) fn quoted(c: &[char], mut i: usize, line: &mut usize) -> (String, usize) {
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
pub(super) fn char_or_lifetime(c: &[char], mut i: usize) -> usize {
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
pub(super) const ITEM_KEYWORDS: &[&str] = &[
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

pub(super) fn ident(t: &[Token], i: usize) -> Option<&str> {
    match t.get(i).map(|t| &t.tok) {
        Some(Tok::Ident(s)) => Some(s),
        _ => None,
    }
}

pub(super) fn punct(t: &[Token], i: usize, p: char) -> bool {
    matches!(t.get(i).map(|t| &t.tok), Some(Tok::Punct(c)) if *c == p)
}

pub(super) fn path_sep(t: &[Token], i: usize) -> bool {
    matches!(t.get(i).map(|t| &t.tok), Some(Tok::PathSep))
}

/// The index of the bracket closing the one at `open` (any of `()[]{}` count), or the
/// last token when it is never closed.
pub(super) fn matching(t: &[Token], open: usize) -> usize {
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
pub(super) fn skip_test_item(t: &[Token], mut i: usize) -> Option<usize> {
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
pub(super) fn scan(t: &[Token]) -> Scan {
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
pub(super) type Leaf = (Vec<String>, usize, Option<String>, bool);

/// Reads the `use` tree at `*i` (after `use`, or inside a group), adding each leaf,
/// under `prefix`, to `out`.
pub(super) fn use_tree(t: &[Token], i: &mut usize, prefix: Vec<String>, out: &mut Vec<Leaf>) {
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
