//! The workspace's layers, held by the code itself (docs/ARCHITECTURE.md, "Crates and layers"):
//!
//! - crates depend downward only: `tether-proto` ← `tether` ← `tether-ops` ← the two
//!   applications, which never depend on each other;
//! - the library crate `tether` depends only on what a proxy embedding it needs;
//! - within each crate, no circle between modules: every reference from one module to another
//!   (`crate::…`, `super::…`, re-exports followed to where the item is defined) is lifted to
//!   the two sibling modules it runs between, and each set of siblings must form a DAG. A
//!   module and its own submodules are one unit (a parent and its parts may name each other);
//!   an item the crate root itself defines may not be used by a module (move it below both);
//! - no source file over 700 lines (generated code aside).
//!
//! `cargo test -p tether --test layers -- --nocapture` prints each crate's top-level graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path within a crate (`[]` is the crate root).
type Module = Vec<String>;

/// The workspace checked: this one, or `TETHER_LAYERS_ROOT` (another checkout, to see what
/// the check says of it).
fn workspace() -> PathBuf {
    std::env::var_os("TETHER_LAYERS_ROOT").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join(".."),
        PathBuf::from,
    )
}

/// The library crates whose modules are checked, by folder.
const CRATES: [&str; 7] = [
    "protocol", "tether", "ops", "server", "agent", "model", "benches",
];

/// Every `.rs` file of the library tree under `src/`, with its module path. Binary roots
/// (`src/main.rs`, `src/bin/`) are crates of their own and are left out.
fn files(src: &Path) -> BTreeMap<Module, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            let rel: Vec<String> = p
                .strip_prefix(src)
                .unwrap()
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if p.is_dir() {
                if rel != ["bin"] {
                    stack.push(p);
                }
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") || rel == ["main.rs"] {
                continue;
            }
            let mut m: Module = rel.clone();
            let last = m.pop().unwrap();
            match last.as_str() {
                "lib.rs" | "mod.rs" => {}
                f => m.push(f.trim_end_matches(".rs").to_owned()),
            }
            out.insert(m, std::fs::read_to_string(&p).unwrap());
        }
    }
    out
}

/// The code of a file without comments (doc links are not imports), string contents, or its
/// inline test module (by convention the file's end): a test's `super::` is the file's own
/// module, and a test may use what the crate offers.
fn code(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let lines: Vec<&str> = text.lines().collect();
    let end = (0..lines.len())
        .find(|&i| {
            lines[i].trim() == "#[cfg(test)]"
                && lines.get(i + 1).is_some_and(|l| {
                    let l = l.trim();
                    l.starts_with("mod ") && l.ends_with('{')
                })
        })
        .unwrap_or(lines.len());
    for line in &lines[..end] {
        let mut in_str = false;
        let mut prev = ' ';
        let mut kept = String::new();
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if !in_str && c == '/' && chars.get(i + 1) == Some(&'/') {
                break;
            }
            if c == '"' && prev != '\\' && !(prev == '\'' && chars.get(i + 1) == Some(&'\'')) {
                in_str = !in_str;
            } else if !in_str {
                kept.push(c);
            }
            prev = c;
            i += 1;
        }
        out.push_str(&kept);
        out.push('\n');
    }
    out
}

fn ident(s: &[u8], mut i: usize) -> (String, usize) {
    let start = i;
    while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'_') {
        i += 1;
    }
    (String::from_utf8_lossy(&s[start..i]).into_owned(), i)
}

fn skip_ws(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && s[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// The paths of a use tree starting at `i` (`a::b`, `a::{b, c::d}`, `{a, b}`), each as
/// segments; and where it ends.
fn tree(s: &[u8], i: usize) -> (Vec<Vec<String>>, usize) {
    let i = skip_ws(s, i);
    if s.get(i) == Some(&b'{') {
        let mut paths = Vec::new();
        let mut j = i + 1;
        loop {
            j = skip_ws(s, j);
            match s.get(j) {
                None => return (paths, j),
                Some(b'}') => return (paths, j + 1),
                Some(b',') => j += 1,
                _ => {
                    let (mut sub, end) = tree(s, j);
                    paths.append(&mut sub);
                    // `as` renames and anything else up to the next `,` or `}`.
                    j = end;
                    while j < s.len() && s[j] != b',' && s[j] != b'}' {
                        j += 1;
                    }
                }
            }
        }
    }
    let (name, mut j) = ident(s, i);
    if name.is_empty() {
        return (Vec::new(), i + 1);
    }
    if s[j..].starts_with(b"::") {
        j += 2;
        let (subs, end) = tree(s, j);
        let paths = subs
            .into_iter()
            .map(|mut p| {
                p.insert(0, name.clone());
                p
            })
            .collect::<Vec<_>>();
        let paths = if paths.is_empty() {
            vec![vec![name]]
        } else {
            paths
        };
        return (paths, end);
    }
    (vec![vec![name]], j)
}

/// Every path a file names through `crate::` or `super::`, made absolute from `module`.
fn references(module: &Module, text: &str) -> Vec<Vec<String>> {
    let code = code(text);
    let s = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let word_start = i == 0 || !(s[i - 1].is_ascii_alphanumeric() || s[i - 1] == b'_');
        let rest = &s[i..];
        let (base, len): (Option<Module>, usize) = if word_start && rest.starts_with(b"crate::") {
            (Some(Vec::new()), 7)
        } else if word_start && rest.starts_with(b"super::") {
            let mut up = module.clone();
            up.pop();
            let mut n = 7;
            while s[i + n..].starts_with(b"super::") {
                up.pop();
                n += 7;
            }
            (Some(up), n)
        } else {
            (None, 1)
        };
        if let Some(base) = base {
            let (paths, end) = tree(s, i + len);
            for p in paths {
                let mut abs = base.clone();
                abs.extend(p.into_iter().filter(|x| x != "self"));
                out.push(abs);
            }
            i = end.max(i + 1);
        } else {
            i += len;
        }
    }
    out
}

/// `pub use` re-exports of a module: name → the path it comes from (absolute).
fn reexports(module: &Module, text: &str) -> BTreeMap<String, Vec<String>> {
    let code = code(text);
    let mut out = BTreeMap::new();
    for stmt in code.split(';') {
        let t = stmt.trim();
        let Some(rest) = ["pub use ", "pub(crate) use ", "pub(super) use "]
            .iter()
            .find_map(|p| t.strip_prefix(p))
        else {
            continue;
        };
        let rest = rest.trim_start();
        let (base, rest): (Module, &str) = if let Some(r) = rest.strip_prefix("crate::") {
            (Vec::new(), r)
        } else if let Some(r) = rest.strip_prefix("super::") {
            let mut up = module.clone();
            up.pop();
            (up, r)
        } else {
            // A child module's item (`pub use registry::Strategy`).
            (module.clone(), rest)
        };
        let (paths, _) = tree(rest.as_bytes(), 0);
        for p in paths {
            let mut abs = base.clone();
            abs.extend(p);
            if let Some(name) = abs.last() {
                out.insert(name.clone(), abs.clone());
            }
        }
    }
    out
}

/// The module a path leads to: the longest known module prefix, with re-exports followed to
/// the module that defines the item. `None` for a path to an item the root defines.
fn resolve(
    path: &[String],
    modules: &BTreeSet<Module>,
    exports: &BTreeMap<Module, BTreeMap<String, Vec<String>>>,
) -> Result<Module, String> {
    let mut path = path.to_vec();
    for _ in 0..8 {
        let mut m: Module = Vec::new();
        for seg in &path {
            let mut next = m.clone();
            next.push(seg.clone());
            if modules.contains(&next) {
                m = next;
            } else {
                break;
            }
        }
        let item = path.get(m.len());
        match item.and_then(|name| exports.get(&m).and_then(|e| e.get(name))) {
            Some(source) if source != &path[..m.len() + 1] => path = source.clone(),
            _ => {
                if m.is_empty() && item.is_some() {
                    return Err(path.join("::"));
                }
                return Ok(m);
            }
        }
    }
    Err(format!("re-exports of {} go round", path.join("::")))
}

/// One crate's modules: the sibling graphs (parent module → edges among its children) and
/// the uses of items the root defines.
struct Graph {
    siblings: BTreeMap<Module, BTreeSet<(String, String)>>,
    root_items: Vec<String>,
}

fn graph(files: &BTreeMap<Module, String>) -> Graph {
    let modules: BTreeSet<Module> = files.keys().cloned().collect();
    let exports: BTreeMap<Module, BTreeMap<String, Vec<String>>> = files
        .iter()
        .map(|(m, t)| (m.clone(), reexports(m, t)))
        .collect();
    let mut g = Graph {
        siblings: BTreeMap::new(),
        root_items: Vec::new(),
    };
    for (m, text) in files {
        for r in references(m, text) {
            let t = match resolve(&r, &modules, &exports) {
                Ok(t) => t,
                Err(item) => {
                    if !m.is_empty() {
                        g.root_items
                            .push(format!("{} uses the root's {item}", m.join("::")));
                    }
                    continue;
                }
            };
            let common = m.iter().zip(&t).take_while(|(a, b)| a == b).count();
            // A module and its own parts are one unit.
            if common == m.len() || common == t.len() {
                continue;
            }
            g.siblings
                .entry(m[..common].to_vec())
                .or_default()
                .insert((m[common].clone(), t[common].clone()));
        }
    }
    g
}

/// A circle in `edges`, if there is one, as the names around it.
fn circle(edges: &BTreeSet<(String, String)>) -> Option<Vec<String>> {
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (a, b) in edges {
        next.entry(a).or_default().push(b);
    }
    // 0 unseen, 1 on the path, 2 done.
    let mut state: BTreeMap<&str, u8> = BTreeMap::new();
    fn visit<'a>(
        n: &'a str,
        next: &BTreeMap<&'a str, Vec<&'a str>>,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        state.insert(n, 1);
        path.push(n);
        for &m in next.get(n).map(Vec::as_slice).unwrap_or_default() {
            match state.get(m).copied().unwrap_or(0) {
                1 => {
                    let at = path.iter().position(|x| *x == m).unwrap_or(0);
                    let mut c: Vec<String> = path[at..].iter().map(|s| s.to_string()).collect();
                    c.push(m.to_owned());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(m, next, state, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(n, 2);
        None
    }
    let nodes: Vec<&str> = next.keys().copied().collect();
    for n in nodes {
        if state.get(n).copied().unwrap_or(0) == 0
            && let Some(c) = visit(n, &next, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

/// What is wrong with one crate's module structure, if anything.
fn check_crate(files: &BTreeMap<Module, String>) -> Vec<String> {
    let g = graph(files);
    let mut problems = g.root_items;
    for (parent, edges) in &g.siblings {
        if let Some(c) = circle(edges) {
            let at = if parent.is_empty() {
                "the crate root".to_owned()
            } else {
                parent.join("::")
            };
            problems.push(format!(
                "modules in {at} import in a circle: {}",
                c.join(" -> ")
            ));
        }
    }
    problems
}

#[test]
fn no_module_of_any_crate_imports_in_a_circle() {
    let mut problems = Vec::new();
    for krate in CRATES {
        let src = workspace().join(krate).join("src");
        if !src.is_dir() {
            continue;
        }
        let files = files(&src);
        let g = graph(&files);
        let top: Vec<String> = g
            .siblings
            .get(&Vec::new())
            .map(|e| e.iter().map(|(a, b)| format!("{a} -> {b}")).collect())
            .unwrap_or_default();
        eprintln!("{krate}: {}", top.join(", "));
        problems.extend(
            check_crate(&files)
                .into_iter()
                .map(|p| format!("{krate}: {p}")),
        );
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The check has teeth: the circles the first split removed are found when planted back.
#[test]
fn a_planted_circle_or_root_item_is_found() {
    let planted = |pairs: &[(&[&str], &str)]| -> BTreeMap<Module, String> {
        pairs
            .iter()
            .map(|(m, t)| (m.iter().map(|s| s.to_string()).collect(), t.to_string()))
            .collect()
    };
    // `tunnel` and `stream` importing each other, one through a re-export.
    let files = planted(&[
        (
            &[],
            "pub mod stream;\npub mod tunnel;\npub use tunnel::Tunnel;",
        ),
        (
            &["tunnel"],
            "use crate::stream::{TetherStream, api_io_error};",
        ),
        (&["stream"], "use crate::Tunnel;"),
    ]);
    let p = check_crate(&files);
    assert!(
        p.iter()
            .any(|x| x.contains("circle") && x.contains("stream")),
        "{p:?}"
    );
    // Three siblings in a ring, deep in a module, one edge through `super::`.
    let files = planted(&[
        (&["grpc"], "mod a; mod b; mod c;"),
        (&["grpc", "a"], "use super::b::X;"),
        (&["grpc", "b"], "use crate::grpc::c::{self, Y};"),
        (&["grpc", "c"], "fn f() { super::a::g(); }"),
    ]);
    assert!(!check_crate(&files).is_empty());
    // A helper the root defines, used by a module.
    let files = planted(&[
        (&[], "mod agent; pub(crate) fn wait_until() {}"),
        (&["agent"], "fn f() { crate::wait_until(); }"),
    ]);
    assert!(!check_crate(&files).is_empty());
    // Parent and child naming each other, and comments, are not circles.
    let files = planted(&[
        (
            &["tunnel"],
            "mod driver; use driver::reader; // crate::x::y",
        ),
        (
            &["tunnel", "driver"],
            "use super::Tunnel; /// [`crate::nothing`]",
        ),
    ]);
    assert_eq!(check_crate(&files), Vec::<String>::new());
}

#[test]
fn no_source_file_is_over_700_lines() {
    let mut long = Vec::new();
    for krate in CRATES {
        let src = workspace().join(krate).join("src");
        if !src.is_dir() {
            continue;
        }
        let mut stack = vec![src];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                // Generated code (the committed protobuf messages) is not written by hand.
                let generated = text.lines().take(3).any(|l| l.contains("@generated"));
                let n = text.lines().count();
                if p.extension().is_some_and(|x| x == "rs") && !generated && n > 700 {
                    long.push(format!("{} ({n} lines)", p.display()));
                }
            }
        }
    }
    assert!(long.is_empty(), "split by owner: {}", long.join(", "));
}

/// The `[dependencies]` (and target-specific dependencies) of a crate's manifest: names only.
fn normal_dependencies(krate: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(workspace().join(krate).join("Cargo.toml")).unwrap();
    let mut out = BTreeSet::new();
    let mut normal = false;
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            normal = l == "[dependencies]"
                || (l.starts_with("[target.") && l.ends_with(".dependencies]"));
            continue;
        }
        if normal
            && let Some((name, _)) = l.split_once('=')
            && !l.starts_with('#')
        {
            let name = name.trim().trim_end_matches(".workspace").trim();
            if !name.is_empty() {
                out.insert(name.to_owned());
            }
        }
    }
    out
}

#[test]
fn the_library_depends_only_on_what_an_embedding_proxy_needs() {
    let deps = normal_dependencies("tether");
    let allowed = [
        "tether-proto",
        "bytes",
        "tokio",
        "tokio-rustls",
        "rustls",
        "rustls-pki-types",
        "tracing",
        "socket2",
        // Only with the `test-util` feature: throwaway certificates.
        "rcgen",
    ];
    let extra: Vec<&String> = deps
        .iter()
        .filter(|d| !allowed.contains(&d.as_str()))
        .collect();
    assert!(extra.is_empty(), "the library crate depends on {extra:?}");
}

#[test]
fn crates_depend_downward_only() {
    // Each crate's layer; a crate may depend on lower layers only, and the two applications
    // (one layer) never on each other.
    let layer = |k: &str| match k {
        "tether-proto" => 0,
        "tether" => 1,
        "tether-ops" => 2,
        "tether-server" | "tether-agent" => 3,
        _ => 4,
    };
    for (folder, name) in [
        ("protocol", "tether-proto"),
        ("tether", "tether"),
        ("ops", "tether-ops"),
        ("server", "tether-server"),
        ("agent", "tether-agent"),
    ] {
        for d in normal_dependencies(folder) {
            if d.starts_with("tether") {
                assert!(
                    layer(&d) < layer(name),
                    "{name} depends on {d}, which is not below it"
                );
            }
        }
    }
}
