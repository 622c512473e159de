//! The golden vectors of docs/vectors: every frame kind and every class of malformed input.

use bytes::BytesMut;
use tether_proto::FrameCodec;

struct Vector {
    name: String,
    max: u32,
    bytes: Vec<u8>,
    frames: Vec<String>,
    error: Option<String>,
    reason: Option<String>,
    incomplete: bool,
}

fn load(file: &str) -> Vec<Vector> {
    let path = format!("{}/../docs/vectors/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let lines: Vec<&str> = block
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .collect();
        if lines.is_empty() {
            continue;
        }
        let mut v = Vector {
            name: String::new(),
            max: 65_536,
            bytes: Vec::new(),
            frames: Vec::new(),
            error: None,
            reason: None,
            incomplete: false,
        };
        for line in lines {
            let (key, value) = line.split_once(": ").unwrap_or((line, ""));
            match key {
                "name" => v.name = value.to_owned(),
                "note" => {}
                "max" => v.max = value.parse().expect("max is a number"),
                "hex" if value == "-" => {}
                "hex" => v.bytes = hex::decode(value).expect("hex"),
                "frame" => v.frames.push(value.to_owned()),
                "error" => v.error = Some(value.to_owned()),
                "reason" => v.reason = Some(value.to_owned()),
                "incomplete" => v.incomplete = true,
                other => panic!("unknown vector line {other:?}"),
            }
        }
        assert!(!v.name.is_empty(), "every vector has a name");
        out.push(v);
    }
    out
}

#[test]
fn every_valid_vector_decodes_to_its_frames_and_reencodes_byte_for_byte() {
    let vectors = load("valid.txt");
    assert!(vectors.len() >= 10);
    for v in vectors {
        let mut codec = FrameCodec::with_max_payload(v.max);
        let mut buf = BytesMut::from(&v.bytes[..]);
        let mut again = BytesMut::new();
        for expected in &v.frames {
            let frame = codec
                .decode(&mut buf)
                .unwrap_or_else(|e| panic!("{}: {e}", v.name))
                .unwrap_or_else(|| panic!("{}: incomplete", v.name));
            assert_eq!(&frame.to_string(), expected, "{}", v.name);
            codec.encode(&frame, &mut again);
        }
        assert!(buf.is_empty(), "{}: bytes left over", v.name);
        assert_eq!(&again[..], &v.bytes[..], "{}: re-encoding differs", v.name);
    }
}

#[test]
fn every_frame_kind_has_a_valid_vector() {
    let vectors = load("valid.txt");
    for kind in [
        "HELLO", "WELCOME", "DIAL", "DIAL_OK", "DATA", "WINDOW", "RESET", "PING", "GOAWAY",
        "UNKNOWN",
    ] {
        assert!(
            vectors
                .iter()
                .any(|v| v.frames.iter().any(|f| f.starts_with(&format!("{kind} ")))),
            "no vector for {kind}"
        );
    }
}

#[test]
fn every_malformed_vector_gives_its_stated_error() {
    let vectors = load("malformed.txt");
    assert!(vectors.len() >= 20);
    for v in vectors {
        let mut codec = FrameCodec::with_max_payload(v.max);
        let mut buf = BytesMut::from(&v.bytes[..]);
        let before = buf.len();
        let result = codec.decode(&mut buf);
        if v.incomplete {
            assert_eq!(result, Ok(None), "{}", v.name);
            assert_eq!(
                buf.len(),
                before,
                "{}: an incomplete frame consumes nothing",
                v.name
            );
            continue;
        }
        let err = result.expect_err(&v.name);
        assert_eq!(
            Some(format!("{} {}", err.code(), err.kind())),
            v.error,
            "{}",
            v.name
        );
        assert_eq!(Some(err.reason().to_owned()), v.reason, "{}", v.name);
    }
}
