//! cargo-fuzz entry for `peer_frame`: the body is `raftkv::fuzz_targets::peer_frame`, shared with the corpus
//! replay test (`tests/fuzz_corpus.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| raftkv::fuzz_targets::peer_frame(data));
