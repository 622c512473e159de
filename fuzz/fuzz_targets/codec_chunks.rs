#![no_main]
// See fuzz/README.md: what tether_proto::fuzzing::codec_chunks asserts.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_proto::fuzzing::codec_chunks(data));
