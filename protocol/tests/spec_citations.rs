//! Citations of docs/SPEC.md that cannot rot (s2n-quic's habit): every `SPEC 6.3` (or
//! `SPEC §6.3`) in the sources must name a section that exists, and every quoted citation,
//!
//! ```text
//! //= SPEC §6.3
//! //# A receiver MUST treat DATA that exceeds the window it has granted as a
//! //# `FLOW_CONTROL_ERROR`.
//! ```
//!
//! must quote text that still stands in that section (or its subsections), whitespace
//! aside. And every MUST sentence of the SPEC must be covered by at least one quote.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the workspace")
        .to_path_buf()
}

/// Collapses whitespace and drops Markdown emphasis and code marks, so a quote matches its
/// section however either is wrapped.
fn normalize(s: &str) -> String {
    s.replace(['`', '*'], "")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Section number (`6.3`, `3.4.1`, `10`) to its text, subsections included.
fn sections(spec: &str) -> BTreeMap<String, String> {
    let mut heads: Vec<(String, usize)> = Vec::new();
    let mut offset = 0;
    for line in spec.split_inclusive('\n') {
        let t = line.trim_start_matches('#');
        if line.starts_with("##") && t.starts_with(' ') {
            let num: String = t
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let num = num.trim_end_matches('.').to_owned();
            if !num.is_empty() {
                heads.push((num, offset));
            }
        }
        offset += line.len();
    }
    let mut out = BTreeMap::new();
    for (i, (num, start)) in heads.iter().enumerate() {
        // A section runs to the next heading that is not one of its subsections.
        let end = heads[i + 1..]
            .iter()
            .find(|(n, _)| !n.starts_with(&format!("{num}.")))
            .map_or(spec.len(), |(_, o)| *o);
        out.insert(num.clone(), normalize(&spec[*start..end]));
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if p.is_dir() && name != "target" && !name.starts_with('.') {
            rust_files(&p, out);
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

/// Every section number cited after `SPEC` on `line` (`SPEC 6.3`, `SPEC §6.3`, `SPEC 3.4.1`).
fn cited_numbers(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("SPEC") {
        rest = &rest[i + 4..];
        let after = rest.trim_start_matches(' ').trim_start_matches('§');
        let num: String = after
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let num = num.trim_end_matches('.');
        if !num.is_empty() && rest.len() - after.len() <= " §".len() {
            out.push(num.to_owned());
        }
    }
    out
}

/// A quoted citation: where it is, the section, and the quoted text.
struct Quote {
    at: String,
    section: String,
    text: String,
}

/// The `//= SPEC §x` blocks of a file, each with its `//#` lines joined.
fn quotes(path: &Path, src: &str) -> Vec<Quote> {
    let mut out: Vec<Quote> = Vec::new();
    let mut open = false;
    for (n, line) in src.lines().enumerate() {
        let t = line.trim_start();
        if let Some(target) = t.strip_prefix("//= SPEC") {
            let section = target.trim().trim_start_matches('§').trim().to_owned();
            out.push(Quote {
                at: format!("{}:{}", path.display(), n + 1),
                section,
                text: String::new(),
            });
            open = true;
        } else if let (true, Some(text)) = (open, t.strip_prefix("//#")) {
            if let Some(q) = out.last_mut() {
                q.text.push(' ');
                q.text.push_str(text);
            }
        } else {
            open = false;
        }
    }
    out
}

/// The SPEC's sentences that carry a requirement (MUST or MUST NOT), normalized. A sentence
/// ends at `.` or `;` followed by a space and a capital or a list dash, so `§8.2` stays whole.
fn must_sentences(spec: &str) -> Vec<String> {
    // Prose only: headings and table rows are not sentences.
    let prose: Vec<&str> = spec
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim_start().starts_with('|'))
        .collect();
    let text = normalize(&prose.join("\n"));
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    for i in 0..b.len() {
        let ends = matches!(b[i], b'.' | b';')
            && b.get(i + 1) == Some(&b' ')
            && b.get(i + 2)
                .is_some_and(|c| c.is_ascii_uppercase() || *c == b'-' || *c == b'|');
        if ends || i + 1 == b.len() {
            out.push(text[start..=i].trim().to_owned());
            start = i + 1;
        }
    }
    out.retain(|s| s.contains("MUST") && !s.contains("RFC 2119"));
    out
}

#[test]
fn every_spec_citation_names_a_section_and_every_quote_still_stands_in_it() {
    let root = root();
    let spec = std::fs::read_to_string(root.join("docs/SPEC.md")).expect("docs/SPEC.md");
    let sections = sections(&spec);
    assert!(sections.contains_key("6.3") && sections.contains_key("10"));
    let mut files = Vec::new();
    for dir in [
        "protocol", "tether", "ops", "server", "agent", "model", "fuzz", "benches",
    ] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 20, "the sources were found");
    let mut wrong = Vec::new();
    let mut all_quotes = Vec::new();
    let mut cited = 0;
    for f in &files {
        let src = std::fs::read_to_string(f).expect("a source file");
        for (n, line) in src.lines().enumerate() {
            for num in cited_numbers(line) {
                cited += 1;
                if !sections.contains_key(&num) {
                    wrong.push(format!(
                        "{}:{}: SPEC {num} is no section",
                        f.display(),
                        n + 1
                    ));
                }
            }
        }
        for q in quotes(f, &src) {
            let text = normalize(&q.text);
            match sections.get(&q.section) {
                None => wrong.push(format!("{}: SPEC §{} is no section", q.at, q.section)),
                Some(_) if text.is_empty() => {
                    wrong.push(format!("{}: a `//=` citation without `//#` text", q.at));
                }
                Some(body) if !body.contains(&text) => wrong.push(format!(
                    "{}: the quote is not in SPEC §{} any more: {text:?}",
                    q.at, q.section
                )),
                Some(_) => all_quotes.push(text),
            }
        }
    }
    assert!(cited > 100, "citations were found ({cited})");
    assert!(
        wrong.is_empty(),
        "{} bad citation(s):\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    // The report: MUSTs no quoted citation covers.
    let musts = must_sentences(&spec);
    let uncited: Vec<&String> = musts
        .iter()
        .filter(|m| {
            !all_quotes
                .iter()
                .any(|q| m.contains(q.as_str()) || q.contains(m.as_str()))
        })
        .collect();
    eprintln!(
        "SPEC citations: {cited} by section number, {} quoted; {} of {} MUST sentences uncited",
        all_quotes.len(),
        uncited.len(),
        musts.len()
    );
    // Every MUST is cited now: a new one needs its quote in the code or a test that holds it.
    assert!(
        uncited.is_empty(),
        "MUST sentences no `//= SPEC` quote covers:\n{}",
        uncited
            .iter()
            .map(|m| format!("  {m}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn the_checker_finds_a_missing_section_and_a_stale_quote() {
    let spec = "## 6. Flow\n\n### 6.3 Receiver\n\nA receiver MUST treat DATA that exceeds \
                the window as a `FLOW_CONTROL_ERROR`.\n\n## 7. Session\n";
    let s = sections(spec);
    assert!(s.contains_key("6") && s.contains_key("6.3") && s.contains_key("7"));
    assert!(
        s["6"].contains("MUST treat DATA"),
        "a section holds its subsections"
    );
    assert!(!s.contains_key("6.4"));
    assert_eq!(
        cited_numbers("see SPEC 6.4 and SPEC §6.3."),
        vec!["6.4", "6.3"]
    );
    assert!(cited_numbers("SPECIFIC 6.3").is_empty());
    let src = "//= SPEC §6.3\n//# A receiver MUST treat DATA that exceeds\n//# the window as a\n\
               //# `FLOW_CONTROL_ERROR`.\nfn f() {}\n//= SPEC §6.3\n//# the window it has granted\n";
    let q = quotes(Path::new("x.rs"), src);
    assert_eq!(q.len(), 2);
    assert!(
        s["6.3"].contains(&normalize(&q[0].text)),
        "a wrapped quote matches"
    );
    assert!(
        !s["6.3"].contains(&normalize(&q[1].text)),
        "a stale quote does not"
    );
    assert_eq!(must_sentences(spec).len(), 1);
}
