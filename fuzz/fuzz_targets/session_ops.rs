#![no_main]
// See fuzz/README.md: what tether_proto::fuzzing::session_ops asserts.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_proto::fuzzing::session_ops(data));
