#![no_main]
// See fuzz/README.md: what tether_proto::fuzzing::session_pair asserts.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_proto::fuzzing::session_pair(data));
