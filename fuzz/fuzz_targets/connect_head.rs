#![no_main]
// See fuzz/README.md: what tether_server::connect::fuzz_head asserts.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_server::connect::fuzz_head(data));
