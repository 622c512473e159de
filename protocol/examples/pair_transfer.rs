//! Moves bytes through two in-memory sessions and prints the rate, and times decoding of
//! 64 KiB DATA frames. A quick measurement; the criterion suite lives in `benches/`.
//!
//! `cargo run --release -p tether-proto --features testing --example pair_transfer -- [MiB]`
#![allow(clippy::print_stdout)]

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tether_proto::frame::{Data, Frame, StreamId};
use tether_proto::testing::{self, Carry, Pair};
use tether_proto::{Config, FrameCodec};

fn transfer(total: usize, streams: usize, carry: Carry) -> f64 {
    let config = Config {
        keepalive_interval_ms: 0,
        ..Config::default()
    };
    let mut p = Pair::established(config.clone(), config);
    p.carry = carry;
    let start = Instant::now();
    let received = testing::transfer(&mut p, total, streams);
    received as f64 / start.elapsed().as_secs_f64() / (1024.0 * 1024.0 * 1024.0)
}

fn decode_rate(frame_len: usize, total: usize) -> (f64, f64) {
    let frame = Frame::Data(Data {
        stream: StreamId(1),
        fin: false,
        payload: Bytes::from(vec![7u8; frame_len]),
    });
    let mut wire = BytesMut::new();
    let count = total / frame_len;
    for _ in 0..count {
        frame.encode(&mut wire);
    }
    let wire = wire.freeze();
    let mut codec = FrameCodec::with_max_payload(1 << 20);
    // The baseline: copying the same bytes into memory that is already mapped.
    let mut dst = vec![1u8; wire.len()];
    let start = Instant::now();
    dst.copy_from_slice(&wire);
    let copy = start.elapsed().as_secs_f64();
    std::hint::black_box(&dst);
    let mut buf = BytesMut::from(&wire[..]);
    let start = Instant::now();
    let mut n = 0;
    while let Some(f) = codec.decode(&mut buf).unwrap() {
        n += f.payload_len();
    }
    let decode = start.elapsed().as_secs_f64();
    let gib = n as f64 / (1024.0 * 1024.0 * 1024.0);
    (gib / decode, gib / copy)
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1024);
    let total = mib * 1024 * 1024;
    let (decode, memcpy) = decode_rate(64 * 1024, 1 << 30);
    println!(
        "decode 64 KiB DATA frames: {decode:.1} GiB/s (memcpy of the same bytes: {memcpy:.1} GiB/s)"
    );
    for streams in [1, 64] {
        let frames = transfer(total, streams, Carry::Frames);
        let bytes = transfer(total, streams, Carry::Bytes(vec![64 * 1024]));
        println!(
            "pair, {mib} MiB over {streams} stream(s): {frames:.2} GiB/s as frames, {bytes:.2} GiB/s encoded and decoded"
        );
    }
}
