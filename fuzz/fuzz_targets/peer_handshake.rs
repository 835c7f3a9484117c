//! cargo-fuzz entry for `peer_handshake`: the body is `raftkv::fuzz_targets::peer_handshake`, shared with the corpus
//! replay test (`tests/fuzz_corpus.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| raftkv::fuzz_targets::peer_handshake(data));
