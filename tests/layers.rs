//! The code is held to the floors of ARCHITECTURE.md: every `crate::`,
//! `super::`, `self::` (and, in the binary, `kiln::`) path of every file
//! under src/ is read, and an import of a module on the same floor or
//! above, a module missing from the table, or a circle of files fails.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The repository: `$KILN_TEST_DATA` (the unprivileged run's world-readable
/// copy), else the crate directory.
fn repo() -> PathBuf {
    std::env::var_os("KILN_TEST_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// A module path inside the crate, e.g. `["source", "disk", "chain"]`.
type ModPath = Vec<String>;

/// The floors block of ARCHITECTURE.md: top-level module -> floor.
fn floors(doc: &str) -> BTreeMap<String, u32> {
    let start = doc
        .find("```layers")
        .expect("ARCHITECTURE.md has a ```layers block");
    let body = &doc[start + "```layers".len()..];
    let end = body.find("```").expect("the layers block is closed");
    let mut map = BTreeMap::new();
    for line in body[..end].lines().filter(|l| !l.trim().is_empty()) {
        let mut words = line.split_whitespace();
        let floor: u32 = words
            .next()
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("a layers line starts with its floor: {line:?}"));
        for m in words {
            assert!(
                map.insert(m.to_string(), floor).is_none(),
                "{m} is on two floors"
            );
        }
    }
    map
}

/// Source text without comments, string and char literals (so paths in
/// docs and messages are not read as imports) and without inline
/// `#[cfg(test)] mod name { ... }` blocks (tests may reach anywhere).
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == b'r'
            && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#'))
            && (i == 0 || !is_ident(b[i - 1]))
        {
            // Raw string r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == b'"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&b'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            let close = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..]
                    .iter()
                    .position(|&x| x == b'\'')
                    .map(|p| i + 2 + p)
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 2)
            } else {
                None
            };
            match close {
                Some(end) => {
                    out.push_str("' '");
                    i = end + 1;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            out.push(c as char);
            i += 1;
        }
    }
    strip_test_blocks(&out)
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

fn strip_test_blocks(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "#[cfg(test)]".len()..];
        let t = after.trim_start();
        let brace = t.find('{');
        let semi = t.find(';');
        let is_block = t.starts_with("mod ")
            && matches!((brace, semi), (Some(b), s) if s.is_none_or(|s| b < s));
        if !is_block {
            rest = after;
            continue;
        }
        let open = after.len() - t.len() + brace.unwrap_or(0);
        let mut depth = 0;
        let mut end = after.len();
        for (k, ch) in after[open..].char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + k + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

#[derive(Debug, PartialEq)]
enum Tok {
    Ident(String),
    Colons,
    Open,
    Close,
    Comma,
    Other,
}

fn tokens(code: &str) -> Vec<Tok> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if is_ident(c) {
            let s = i;
            while i < b.len() && is_ident(b[i]) {
                i += 1;
            }
            out.push(Tok::Ident(code[s..i].to_string()));
            continue;
        }
        match c {
            b':' if b.get(i + 1) == Some(&b':') => {
                out.push(Tok::Colons);
                i += 2;
                continue;
            }
            b'{' => out.push(Tok::Open),
            b'}' => out.push(Tok::Close),
            b',' => out.push(Tok::Comma),
            c if c.is_ascii_whitespace() => {}
            _ => out.push(Tok::Other),
        }
        i += 1;
    }
    out
}

/// Every path in the code, with `use a::{b, c::d}` groups expanded.
fn paths(code: &str) -> Vec<Vec<String>> {
    let toks = tokens(code);
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let starts = matches!(&toks[i], Tok::Ident(_))
            && toks.get(i + 1) == Some(&Tok::Colons)
            && (i == 0 || toks[i - 1] != Tok::Colons);
        if starts {
            i = path_at(&toks, i, Vec::new(), &mut out);
        } else {
            i += 1;
        }
    }
    out
}

/// Reads one path (or group) starting at `i` below `prefix`; returns the
/// index after it.
fn path_at(
    toks: &[Tok],
    mut i: usize,
    mut prefix: Vec<String>,
    out: &mut Vec<Vec<String>>,
) -> usize {
    loop {
        match toks.get(i) {
            Some(Tok::Ident(s)) => {
                prefix.push(s.clone());
                i += 1;
                if toks.get(i) == Some(&Tok::Colons) {
                    i += 1;
                    continue;
                }
                out.push(prefix);
                return i;
            }
            Some(Tok::Open) => {
                i += 1;
                loop {
                    match toks.get(i) {
                        Some(Tok::Close) => return i + 1,
                        Some(Tok::Comma) => i += 1,
                        Some(Tok::Ident(_)) | Some(Tok::Open) => {
                            i = path_at(toks, i, prefix.clone(), out);
                        }
                        None => return i,
                        Some(_) => i += 1,
                    }
                }
            }
            _ => {
                if !prefix.is_empty() {
                    out.push(prefix);
                }
                return i;
            }
        }
    }
}

/// One source file: its module path and the module paths it names. The
/// binary's files (`main.rs`, `cli/`) have paths below `<bin>`.
struct File {
    rel: String,
    module: ModPath,
    refs: BTreeSet<ModPath>,
}

const BIN: &str = "<bin>";

impl File {
    /// The floor-table module the file belongs to (`cli` for the binary).
    fn top(&self) -> Option<&str> {
        match self.module.first().map(String::as_str) {
            Some(BIN) => Some("cli"),
            other => other,
        }
    }
}

/// Reads the crate under `src`: library files and the binary's files.
fn read_crate(src: &Path) -> Vec<File> {
    let mut rels = Vec::new();
    walk(src, src, &mut rels);
    let texts: Vec<(String, String)> = rels
        .into_iter()
        .map(|rel| {
            let text = fs::read_to_string(src.join(&rel)).expect("read a source file");
            (rel, text)
        })
        .collect();
    parse_files(&texts)
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in fs::read_dir(dir).expect("read src/") {
        let e = e.expect("read a src/ entry");
        let p = e.path();
        if p.is_dir() {
            walk(root, &p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let rel = p.strip_prefix(root).expect("under src/");
            out.push(rel.to_string_lossy().into_owned());
        }
    }
}

/// `a/b.rs` and `a/b/mod.rs` are module `a::b`; `lib.rs` is the library's
/// root and `main.rs` (with `cli/`) the binary's.
fn module_of(rel: &str) -> ModPath {
    let mut parts: ModPath = Vec::new();
    if rel == "main.rs" || rel.starts_with("cli/") {
        parts.push(BIN.to_string());
    }
    if rel != "lib.rs" && rel != "main.rs" {
        parts.extend(rel.trim_end_matches(".rs").split('/').map(str::to_string));
        if parts.last().is_some_and(|p| p == "mod") {
            parts.pop();
        }
    }
    parts
}

fn parse_files(texts: &[(String, String)]) -> Vec<File> {
    let mut files = Vec::new();
    for (rel, text) in texts {
        let module = module_of(rel);
        let binary = module.first().is_some_and(|m| m == BIN);
        let code = code_only(text);
        let toks = tokens(&code);
        // `mod name;` declares a child the file may name without `self::`.
        let children: BTreeSet<String> = toks
            .windows(3)
            .filter_map(|w| match w {
                [Tok::Ident(m), Tok::Ident(name), Tok::Other] if m == "mod" => Some(name.clone()),
                _ => None,
            })
            .collect();
        let mut refs = BTreeSet::new();
        for p in paths(&code) {
            let mut target: ModPath = Vec::new();
            let rest = match p[0].as_str() {
                "crate" => {
                    if binary {
                        target.push(BIN.to_string());
                    }
                    &p[1..]
                }
                "kiln" if binary => &p[1..],
                "self" | "super" => {
                    target = module.clone();
                    let mut k = 0;
                    while p.get(k).is_some_and(|s| s == "super") {
                        target.pop();
                        k += 1;
                    }
                    if p.get(k).is_some_and(|s| s == "self") {
                        k += 1;
                    }
                    &p[k..]
                }
                name if children.contains(name) => {
                    target = module.clone();
                    &p[..]
                }
                _ => continue,
            };
            target.extend(rest.iter().cloned());
            refs.insert(target);
        }
        files.push(File {
            rel: rel.clone(),
            module,
            refs,
        });
    }
    files
}

/// The file a module path lands in: the longest prefix that is a file's
/// module (an item path like `store::Store` lands in `store/mod.rs`).
fn resolve<'a>(modules: &'a BTreeMap<ModPath, usize>, path: &[String]) -> Option<&'a usize> {
    (0..=path.len())
        .rev()
        .find_map(|n| modules.get(&path[..n].to_vec()))
}

/// What is wrong with the crate against the floors: one line a problem.
fn check(files: &[File], floors: &BTreeMap<String, u32>) -> Vec<String> {
    let mut problems = Vec::new();
    let modules: BTreeMap<ModPath, usize> = files
        .iter()
        .enumerate()
        .map(|(i, f)| (f.module.clone(), i))
        .collect();
    let tops: BTreeSet<String> = files
        .iter()
        .filter_map(|f| f.top().map(str::to_string))
        .collect();
    for t in &tops {
        if !floors.contains_key(t) {
            problems.push(format!("module {t} is on no floor of ARCHITECTURE.md"));
        }
    }
    for m in floors.keys() {
        if !tops.contains(m) {
            problems.push(format!(
                "ARCHITECTURE.md names {m}, which src/ does not have"
            ));
        }
    }
    let mut edges: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); files.len()];
    for (i, f) in files.iter().enumerate() {
        for r in &f.refs {
            let Some(&j) = resolve(&modules, r) else {
                continue;
            };
            let to = &files[j];
            let (Some(from_top), Some(to_top)) = (f.top(), to.top()) else {
                continue; // lib.rs is the crate's face, on no floor
            };
            if j == i {
                continue;
            }
            if from_top != to_top {
                if let (Some(a), Some(b)) = (floors.get(from_top), floors.get(to_top)) {
                    if b >= a {
                        problems.push(format!(
                            "src/{} (floor {a}, {from_top}) imports {} (floor {b}, {to_top})",
                            f.rel,
                            r.join("::")
                        ));
                    }
                }
            }
            // A file's use of its own folder's face (an ancestor module) is
            // containment, not an edge of a circle.
            if f.module.starts_with(&to.module) {
                continue;
            }
            edges[i].insert(j);
        }
    }
    for circle in circles(&edges) {
        let names: Vec<String> = circle
            .iter()
            .map(|&i| format!("src/{}", files[i].rel))
            .collect();
        problems.push(format!(
            "files import each other in a circle: {}",
            names.join(", ")
        ));
    }
    problems
}

/// The strongly connected components with more than one file (Tarjan).
fn circles(edges: &[BTreeSet<usize>]) -> Vec<Vec<usize>> {
    struct T<'a> {
        edges: &'a [BTreeSet<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        stack: Vec<usize>,
        on: Vec<bool>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    fn visit(t: &mut T, v: usize) {
        t.index[v] = Some(t.next);
        t.low[v] = t.next;
        t.next += 1;
        t.stack.push(v);
        t.on[v] = true;
        for &w in t.edges[v].iter() {
            match t.index[w] {
                None => {
                    visit(t, w);
                    t.low[v] = t.low[v].min(t.low[w]);
                }
                Some(iw) if t.on[w] => t.low[v] = t.low[v].min(iw),
                _ => {}
            }
        }
        if Some(t.low[v]) == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on[w] = false;
                comp.push(w);
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let n = edges.len();
    let mut t = T {
        edges,
        index: vec![None; n],
        low: vec![0; n],
        stack: Vec::new(),
        on: vec![false; n],
        next: 0,
        out: Vec::new(),
    };
    for v in 0..n {
        if t.index[v].is_none() {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn src_follows_the_floors_of_architecture_md() {
    let root = &repo();
    let doc = fs::read_to_string(root.join("ARCHITECTURE.md")).expect("read ARCHITECTURE.md");
    let floors = floors(&doc);
    let files = read_crate(&root.join("src"));
    assert!(files.len() > 50, "read {} files of src/", files.len());
    let problems = check(&files, &floors);
    assert!(
        problems.is_empty(),
        "against ARCHITECTURE.md:\n{}",
        problems.join("\n")
    );
}

/// The README's Layout table puts every module on its floor too.
#[test]
fn the_readme_layout_matches_the_floors() {
    let root = &repo();
    let doc = fs::read_to_string(root.join("ARCHITECTURE.md")).expect("read ARCHITECTURE.md");
    let readme = fs::read_to_string(root.join("README.md")).expect("read README.md");
    let at = readme
        .find("## Layout")
        .expect("README has a Layout section");
    let section = &readme[at..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |e| e + 3)];
    let mut rows: BTreeMap<String, u32> = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| ")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let Ok(floor) = cells[1].parse::<u32>() else {
            continue;
        };
        for m in cells[2].split(',') {
            rows.insert(m.trim().trim_matches('`').to_string(), floor);
        }
    }
    assert_eq!(
        rows,
        floors(&doc),
        "README's Layout table against ARCHITECTURE.md"
    );
}

#[test]
fn the_table_of_architecture_md_names_every_module_of_the_floors() {
    let root = &repo();
    let doc = fs::read_to_string(root.join("ARCHITECTURE.md")).expect("read ARCHITECTURE.md");
    for (module, floor) in floors(&doc) {
        let row = format!("| {floor} | `{module}`");
        assert!(
            doc.contains(&row),
            "ARCHITECTURE.md's table has no row {row:?}"
        );
    }
}

/// The check itself can fail: an upward import, one beside, a group
/// import, a circle of siblings and an unplaced module are each found,
/// while comments, strings and test blocks are not read as imports.
#[test]
fn the_check_finds_upward_imports_circles_and_unplaced_modules() {
    let floors = floors("```layers\n3 top\n2 mid other\n1 low\n```\n");
    let crate_of = |files: &[(&str, &str)]| {
        let texts: Vec<(String, String)> = files
            .iter()
            .map(|(r, t)| (r.to_string(), t.to_string()))
            .collect();
        check(&parse_files(&texts), &floors)
    };
    let fine = [
        ("lib.rs", "pub mod top; pub mod mid; pub mod other; pub mod low;"),
        ("top.rs", "use crate::mid::Thing; use crate::{low::X, other};"),
        ("mid/mod.rs", "mod a; mod b; pub use a::A; pub struct Thing;"),
        ("mid/a.rs", "use super::Thing; use super::b::B; pub struct A;"),
        ("mid/b.rs", "// use crate::top::Y;\nconst S: &str = \"crate::top::Y\"; pub struct B;\n#[cfg(test)]\nmod tests { use crate::top::Z; }"),
        ("other.rs", "use crate::low::X;"),
        ("low.rs", "pub struct X; fn f<'a>(c: char) -> bool { c == '{' }"),
    ];
    assert_eq!(crate_of(&fine), Vec::<String>::new());

    let mut up = fine;
    up[6] = ("low.rs", "use crate::{mid::{Thing}};");
    let p = crate_of(&up);
    assert!(
        p.iter()
            .any(|l| l.contains("src/low.rs (floor 1, low) imports mid::Thing (floor 2, mid)")),
        "{p:?}"
    );

    let mut beside = fine;
    beside[5] = ("other.rs", "fn f() -> crate::mid::Thing { todo!() }");
    let p = crate_of(&beside);
    assert!(
        p.iter()
            .any(|l| l.contains("src/other.rs (floor 2, other) imports mid::Thing")),
        "{p:?}"
    );

    let mut circle = fine;
    circle[4] = ("mid/b.rs", "use super::a::A; pub struct B;");
    let p = crate_of(&circle);
    assert!(
        p.iter().any(|l| l.contains("circle")
            && l.contains("src/mid/a.rs")
            && l.contains("src/mid/b.rs")),
        "{p:?}"
    );

    let mut unplaced = fine.to_vec();
    unplaced.push(("extra.rs", ""));
    let p = crate_of(&unplaced);
    assert!(
        p.iter().any(|l| l.contains("module extra is on no floor")),
        "{p:?}"
    );
}
