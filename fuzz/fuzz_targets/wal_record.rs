//! cargo-fuzz entry for `wal_record`: the body is `raftkv::fuzz_targets::wal_record`, shared with the corpus
//! replay test (`tests/fuzz_corpus.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| raftkv::fuzz_targets::wal_record(data));
