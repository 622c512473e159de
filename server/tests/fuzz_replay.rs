//! Replays the committed fuzz inputs of the adapter's targets (`connect_head`,
//! `grpc_authority`) on stable, so a past crash cannot return.

#[test]
fn connect_head_corpus_and_regressions_pass() {
    replay("connect_head", tether_server::connect::fuzz_head);
}

#[test]
fn grpc_authority_corpus_and_regressions_pass() {
    replay(
        "grpc_authority",
        tether_server::grpc::authority::fuzz_rewrite,
    );
}

fn replay(target: &str, check: fn(&[u8])) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for f in entries.flatten().map(|e| e.path()) {
            if f.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            let data = std::fs::read(&f).unwrap();
            let ok = std::panic::catch_unwind(|| check(&data));
            assert!(ok.is_ok(), "{} fails again", f.display());
            n += 1;
        }
    }
    assert!(n > 0);
}
