#![no_main]
// See fuzz/README.md: what tether::server::connect::fuzz_head asserts.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tether::server::connect::fuzz_head(data));
