//! Encode and decode of DATA frames beside a plain memcpy of the same bytes.
#![allow(missing_docs)]

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tether_proto::FrameCodec;
use tether_proto::frame::{Data, Frame, StreamId};

fn frames(c: &mut Criterion) {
    let batch = 64usize;
    for size in [64usize, 16 * 1024, 64 * 1024] {
        let mut g = c.benchmark_group(format!("codec/data_{size}B"));
        g.throughput(Throughput::Bytes((size * batch) as u64));
        let payload = Bytes::from(vec![7u8; size]);
        let frame = Frame::Data(Data {
            stream: StreamId(1),
            fin: false,
            payload: payload.clone(),
        });
        let mut wire = BytesMut::new();
        for _ in 0..batch {
            frame.encode(&mut wire);
        }
        let wire = wire.freeze();
        let mut codec = FrameCodec::with_max_payload(1 << 20);

        // What tether's writer does: the header is encoded, the payload is passed by reference.
        g.bench_function("encode header (payload by reference)", |b| {
            let mut out = BytesMut::with_capacity(16 * batch);
            b.iter(|| {
                out.clear();
                for _ in 0..batch {
                    frame.header().encode(&mut out);
                    std::hint::black_box(frame.payload_bytes());
                }
            });
        });
        g.bench_function("encode with payload copy", |b| {
            let mut out = BytesMut::with_capacity(wire.len());
            b.iter(|| {
                out.clear();
                for _ in 0..batch {
                    codec.encode(&frame, &mut out);
                }
            });
        });
        g.bench_function("decode", |b| {
            b.iter_batched(
                || BytesMut::from(&wire[..]),
                |mut buf| {
                    let mut codec = FrameCodec::with_max_payload(1 << 20);
                    while let Ok(Some(f)) = codec.decode(&mut buf) {
                        std::hint::black_box(f);
                    }
                },
                BatchSize::LargeInput,
            );
        });
        g.bench_function("memcpy", |b| {
            let mut out = vec![0u8; wire.len()];
            b.iter(|| out.copy_from_slice(std::hint::black_box(&wire[..])));
        });
        g.finish();
    }
}

criterion_group!(benches, frames);
criterion_main!(benches);
