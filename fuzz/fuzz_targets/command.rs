//! cargo-fuzz entry for `command`: the body is `raftkv::fuzz_targets::command`, shared with the corpus
//! replay test (`tests/fuzz_corpus.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| raftkv::fuzz_targets::command(data));
