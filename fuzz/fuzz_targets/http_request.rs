//! cargo-fuzz entry for `http_request`: the body is `raftkv::fuzz_targets::http_request`, shared with the corpus
//! replay test (`tests/fuzz_corpus.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| raftkv::fuzz_targets::http_request(data));
