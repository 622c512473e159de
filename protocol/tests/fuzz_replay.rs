//! Replays every committed fuzz input (fuzz/corpus and fuzz/regressions) through the functions
//! the fuzz targets call, on stable, so no past crash can come back unnoticed.

use std::path::Path;

use tether_proto::fuzzing;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            if f.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            let data = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            let result = std::panic::catch_unwind(|| run(&data));
            assert!(result.is_ok(), "{target}: {} fails again", f.display());
            n += 1;
        }
    }
    n
}

#[test]
fn frame_decode_corpus_and_regressions_pass() {
    assert!(replay("frame_decode", fuzzing::frame_decode) > 0);
}

#[test]
fn frame_roundtrip_corpus_and_regressions_pass() {
    assert!(replay("frame_roundtrip", fuzzing::frame_roundtrip) > 0);
}

#[test]
fn codec_chunks_corpus_and_regressions_pass() {
    assert!(replay("codec_chunks", fuzzing::codec_chunks) > 0);
}

#[test]
fn session_ops_corpus_and_regressions_pass() {
    assert!(replay("session_ops", fuzzing::session_ops) > 0);
}

#[test]
fn session_pair_corpus_and_regressions_pass() {
    assert!(replay("session_pair", fuzzing::session_pair) > 0);
}
