#![no_main]
// See fuzz/README.md: what tether_server::grpc::authority::fuzz_rewrite asserts.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_server::grpc::authority::fuzz_rewrite(data));
