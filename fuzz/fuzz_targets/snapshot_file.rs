//! cargo-fuzz entry for `snapshot_file`: the body is `raftkv::fuzz_targets::snapshot_file`, shared with the corpus
//! replay test (`tests/fuzz_corpus.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| raftkv::fuzz_targets::snapshot_file(data));
