//! No import cycles between modules, in blkrep and in the CLI.
//!
//! The dependency graph links sibling modules: a path `crate::a::b::X` or `super::b::X`
//! written in `a::c` (or anywhere below it) is an edge `a::c -> a::b`. `use` groups count
//! item by item (`use super::{b, d}` is two edges). Comments, string and character literals,
//! and test-only code (the item after `#[cfg(test)]`, such as a `mod tests`) are left out;
//! modules are found from the crate root by their `mod` declarations, inline ones included.
//!
//! Any strongly connected component of more than one module is a cycle: two siblings that
//! depend on each other, or a longer ring. The test prints the edges that make it up, each
//! with the file, line and path that caused it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// A module path below the crate root (`[]` is the root).
type ModPath = Vec<String>;

/// A `crate::`/`super::` path as written, before it is resolved.
#[derive(Debug)]
struct Written {
    /// The module the path is written in.
    module: ModPath,
    /// Its segments, from `crate` or `super` on, a use group flattened.
    segments: Vec<String>,
    /// Where: `file:line`.
    at: String,
}

/// The edges between sibling modules, each with why (`file:line path`).
type Graph = BTreeMap<String, BTreeMap<String, Vec<String>>>;

// ---------------------------------------------------------------------------------------------
// Reading source

/// `src` with comments and string and character literals blanked out (newlines kept).
fn blank(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let at = |j: usize| c.get(j).copied();
    // Blank c[from..to], keeping newlines.
    let push_blank = |out: &mut String, from: usize, to: usize| {
        for &ch in &c[from..to.min(c.len())] {
            out.push(if ch == '\n' { '\n' } else { ' ' });
        }
    };
    while i < c.len() {
        let start = i;
        if c[i] == '/' && at(i + 1) == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && at(i + 1) == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == Some('*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == Some('/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c[i] == 'r'
            && (at(i + 1) == Some('"') || at(i + 1) == Some('#'))
            && (i == 0 || !ident(c[i - 1]) || (c[i - 1] == 'b' && (i < 2 || !ident(c[i - 2]))))
        {
            // A raw string: r"..." or r#"..."#.
            let mut j = i + 1;
            while c.get(j) == Some(&'#') {
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            let hashes = j - i - 1;
            i = j + 1;
            while i < c.len() && !(c[i] == '"' && (1..=hashes).all(|k| at(i + k) == Some('#'))) {
                i += 1;
            }
            i += 1 + hashes;
        } else if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c[i] == '\'' && (at(i + 1) == Some('\\') || at(i + 2) == Some('\'')) {
            // A character literal ('{', '\n', '\''), not a lifetime.
            i += 2;
            while i < c.len() && c[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else {
            out.push(c[i]);
            i += 1;
            continue;
        }
        push_blank(&mut out, start, i);
    }
    out
}

/// A token of blanked source: an identifier or one punctuation character (`::` is one).
#[derive(Debug, Clone, PartialEq)]
struct Token {
    text: String,
    line: usize,
}

fn tokens(blanked: &str) -> Vec<Token> {
    let mut out = Vec::new();
    for (n, line) in blanked.lines().enumerate() {
        let c: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < c.len() {
            let start = i;
            if c[i].is_alphanumeric() || c[i] == '_' {
                while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                    i += 1;
                }
            } else if c[i] == ':' && c.get(i + 1) == Some(&':') {
                i += 2;
            } else if c[i].is_whitespace() {
                i += 1;
                continue;
            } else {
                i += 1;
            }
            out.push(Token {
                text: c[start..i].iter().collect(),
                line: n + 1,
            });
        }
    }
    out
}

/// What one file says: the `mod` declarations (name, inline modules around it) of
/// non-test code, and its `crate::`/`super::` paths.
#[derive(Debug, Default)]
struct FileScan {
    /// `mod x;`: (inline modules it is declared in, x).
    children: Vec<(Vec<String>, String)>,
    /// `mod x { ... }`: (inline modules around it, x).
    inline: Vec<(Vec<String>, String)>,
    /// (inline modules it is written in, segments, line).
    paths: Vec<(Vec<String>, Vec<String>, usize)>,
}

/// Index just past the item starting at `i`: its attributes, then up to a `;` outside any
/// brackets or through its first `{ ... }` block.
fn skip_item(t: &[Token], mut i: usize) -> usize {
    let mut depth = 0i32;
    while i < t.len() {
        match t[i].text.as_str() {
            "(" | "[" => depth += 1,
            ")" | "]" => depth -= 1,
            ";" if depth == 0 => return i + 1,
            "{" if depth == 0 => return matching(t, i) + 1,
            _ => {}
        }
        i += 1;
    }
    i
}

/// Index of the `}` closing the `{` at `open`.
fn matching(t: &[Token], open: usize) -> usize {
    let mut depth = 0;
    for (k, tok) in t.iter().enumerate().skip(open) {
        match tok.text.as_str() {
            "{" => depth += 1,
            "}" => {
                depth -= 1;
                if depth == 0 {
                    return k;
                }
            }
            _ => {}
        }
    }
    t.len()
}

fn is_cfg_test(t: &[Token], i: usize) -> bool {
    let want = ["#", "[", "cfg", "(", "test", ")", "]"];
    t.len() >= i + want.len() && want.iter().zip(&t[i..]).all(|(w, tok)| tok.text == *w)
}

fn is_ident(s: &str) -> bool {
    s.chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
}

/// Parse the use tree after `prefix` at `t[i]` (just past a `::`); push every full path.
/// Returns the index just past the tree.
fn use_tree(t: &[Token], mut i: usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let mut path = prefix;
    loop {
        match t.get(i).map(|tok| tok.text.as_str()) {
            Some("{") => {
                i += 1;
                while i < t.len() && t[i].text != "}" {
                    if t[i].text == "," {
                        i += 1;
                        continue;
                    }
                    i = use_tree(t, i, path.clone(), out);
                }
                return i + 1;
            }
            Some(s) if is_ident(s) && s != "as" => {
                path.push(s.to_string());
                i += 1;
                if t.get(i).map(|tok| tok.text.as_str()) == Some("::") {
                    i += 1;
                    continue;
                }
            }
            _ => {}
        }
        if t.get(i).map(|tok| tok.text.as_str()) == Some("as") {
            i += 2;
        }
        out.push(path);
        return i;
    }
}

fn scan(src: &str) -> FileScan {
    let t = tokens(&blank(src));
    let mut scan = FileScan::default();
    // Inline modules we are in: (name, brace depth inside it).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0;
    let mut i = 0;
    let names = |inline: &[(String, usize)]| inline.iter().map(|(n, _)| n.clone()).collect();
    while i < t.len() {
        if is_cfg_test(&t, i) {
            i = skip_item(&t, i + 7);
            continue;
        }
        let text = t[i].text.as_str();
        let next = |k: usize| t.get(i + k).map(|tok| tok.text.as_str());
        match text {
            "{" => depth += 1,
            "}" => {
                depth -= 1;
                if inline.last().is_some_and(|(_, d)| *d > depth) {
                    inline.pop();
                }
            }
            "mod" if next(1).is_some_and(is_ident) && next(2) == Some(";") => {
                scan.children.push((names(&inline), t[i + 1].text.clone()));
            }
            "mod" if next(1).is_some_and(is_ident) && next(2) == Some("{") => {
                scan.inline.push((names(&inline), t[i + 1].text.clone()));
                inline.push((t[i + 1].text.clone(), depth + 1));
                depth += 1;
                i += 3;
                continue;
            }
            "crate" | "super" if next(1) == Some("::") && (i == 0 || t[i - 1].text != "::") => {
                let mut paths = Vec::new();
                let end = use_tree(&t, i, Vec::new(), &mut paths);
                for p in paths {
                    scan.paths.push((names(&inline), p, t[i].line));
                }
                i = end;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    scan
}

// ---------------------------------------------------------------------------------------------
// The graph

/// Every module of the crate whose root file is `root`, with the paths written in it.
fn read_crate(root: &Path, base: &Path) -> (BTreeSet<ModPath>, Vec<Written>) {
    let mut modules = BTreeSet::new();
    let mut written = Vec::new();
    let mut todo = vec![(root.to_path_buf(), ModPath::new())];
    while let Some((file, module)) = todo.pop() {
        let src = fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let shown = file
            .strip_prefix(base)
            .unwrap_or(&file)
            .display()
            .to_string();
        let owns_dir = module.is_empty() || file.file_name().is_some_and(|n| n == "mod.rs");
        let dir = if owns_dir {
            file.parent().unwrap().to_path_buf()
        } else {
            file.with_extension("")
        };
        let s = scan(&src);
        modules.insert(module.clone());
        let within = |inner: &[String]| [module.clone(), inner.to_vec()].concat();
        for (inner, name) in &s.inline {
            modules.insert([within(inner), vec![name.clone()]].concat());
        }
        for (inner, name) in &s.children {
            let d: PathBuf = inner.iter().fold(dir.clone(), |d, n| d.join(n));
            let file = [d.join(format!("{name}.rs")), d.join(name).join("mod.rs")]
                .into_iter()
                .find(|f| f.exists())
                .unwrap_or_else(|| panic!("{shown}: no file for `mod {name};`"));
            todo.push((file, [within(inner), vec![name.clone()]].concat()));
        }
        for (inner, segments, line) in s.paths {
            written.push(Written {
                module: within(&inner),
                at: format!("{shown}:{line} {}", segments.join("::")),
                segments,
            });
        }
    }
    (modules, written)
}

/// The module a written path names the items of, as a full path below the root.
fn resolve(w: &Written) -> ModPath {
    let mut target = w.module.clone();
    for (k, seg) in w.segments.iter().enumerate() {
        match seg.as_str() {
            "crate" if k == 0 => target.clear(),
            "super" => {
                target.pop();
            }
            "self" => {}
            _ => target.push(seg.clone()),
        }
    }
    target
}

/// The sibling-module graph of the crate whose root file is `root`.
fn graph(root: &Path, base: &Path) -> Graph {
    let (modules, written) = read_crate(root, base);
    let mut g = Graph::new();
    for w in &written {
        let target = resolve(w);
        let k = w
            .module
            .iter()
            .zip(&target)
            .take_while(|(a, b)| a == b)
            .count();
        if k < w.module.len() && k < target.len() && modules.contains(&target[..=k]) {
            let (from, to) = (w.module[..=k].join("::"), target[..=k].join("::"));
            g.entry(from)
                .or_default()
                .entry(to)
                .or_default()
                .push(w.at.clone());
        }
    }
    g
}

/// The strongly connected components of more than one module (Tarjan).
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    struct Tarjan<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        found: Vec<Vec<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            let g = self.g;
            for w in g.get(v).into_iter().flat_map(|e| e.keys()) {
                if !self.index.contains_key(w.as_str()) {
                    self.visit(w);
                    let low = self.low[w.as_str()].min(self.low[v]);
                    self.low.insert(v, low);
                } else if self.stack.contains(&w.as_str()) {
                    let low = self.index[w.as_str()].min(self.low[v]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let at = self.stack.iter().rposition(|&x| x == v).unwrap();
                let scc: Vec<String> = self.stack.drain(at..).map(String::from).collect();
                if scc.len() > 1 {
                    self.found.push(scc);
                }
            }
        }
    }
    let mut t = Tarjan {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        found: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    for scc in &mut t.found {
        scc.sort();
    }
    t.found
}

/// The cycles of `g`, each with the edges inside it and why each edge exists.
fn report(g: &Graph) -> String {
    let mut out = String::new();
    for scc in cycles(g) {
        out += &format!("cycle among {}:\n", scc.join(", "));
        for from in &scc {
            for (to, why) in g[from].iter().filter(|(to, _)| scc.contains(to)) {
                out += &format!("  {from} -> {to}\n");
                for w in why {
                    out += &format!("      {w}\n");
                }
            }
        }
    }
    out
}

fn assert_acyclic(root: &str) {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let g = graph(&base.join(root), &base);
    assert!(g.len() > 1, "{root}: no module dependencies found");
    let cycles = report(&g);
    assert!(cycles.is_empty(), "{root} has import cycles:\n{cycles}");
}

#[test]
fn blkrep_modules_have_no_import_cycle() {
    assert_acyclic("blkrep/src/lib.rs");
}

#[test]
fn cli_modules_have_no_import_cycle() {
    assert_acyclic("cli/src/main.rs");
}

#[test]
fn the_checker_finds_cycles_and_only_cycles() {
    let dir = tempfile::tempdir().unwrap();
    let files = [
        (
            "lib.rs",
            "mod a;\nmod b;\nmod c;\npub mod d;\n#[cfg(test)]\nmod e;\n",
        ),
        // a -> b -> c -> a: a ring of three, through a use group and an expression path
        // (`Item` is no module: no edge).
        ("a.rs", "use crate::b::Thing;\npub fn g() {}\n"),
        (
            "b.rs",
            "use super::{c::{self, f}, Item};\npub struct Thing;\n",
        ),
        ("c.rs", "pub fn f() {\n    crate::a::g()\n}\n"),
        // d -> a only: in no cycle. Its other mentions of b are not dependencies.
        (
            "d/mod.rs",
            "// use crate::b;\npub const S: &str = \"crate::b\";\nmod inner {\n    \
             use super::super::a;\n}\n#[cfg(test)]\nmod tests {\n    use crate::b;\n}\n",
        ),
        // Test-only: its edge to d does not count.
        ("e.rs", "use crate::d;\n"),
    ];
    for (name, src) in files {
        let path = dir.path().join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, src).unwrap();
    }
    let g = graph(&dir.path().join("lib.rs"), dir.path());
    assert_eq!(cycles(&g), vec![vec!["a", "b", "c"]], "{g:#?}");
    let d: Vec<&str> = g["d"].keys().map(String::as_str).collect();
    assert_eq!(d, ["a"], "{g:#?}");
    assert!(!g.contains_key("e"), "{g:#?}");
    let r = report(&g);
    assert!(r.contains("  b -> c\n      b.rs:1 super::c::self\n"), "{r}");
    assert!(r.contains("  c -> a\n      c.rs:2 crate::a::g\n"), "{r}");
    assert!(!r.contains("-> d"), "{r}");
}
