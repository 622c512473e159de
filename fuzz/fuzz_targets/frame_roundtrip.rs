#![no_main]
// See fuzz/README.md: what tether_proto::fuzzing::frame_roundtrip asserts.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_proto::fuzzing::frame_roundtrip(data));
