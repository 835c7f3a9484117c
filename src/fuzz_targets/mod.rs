//! Fuzz target bodies, shared by the `cargo fuzz` targets in `fuzz/` (nightly, libFuzzer) and
//! the corpus replay test `tests/fuzz_corpus.rs` (stable, part of `cargo test`), so both run
//! exactly the same code on the same bytes.
//!
//! Each body takes arbitrary bytes, feeds them to one decoder that meets outside bytes, and
//! panics only on a defect: a panic inside the decoder, a hang, or a decoded value that does
//! not survive its own encoder. Decoders behind a checksum are unreachable for random bytes,
//! so the bodies whose format has one read the first input byte as a mode: with bit 0 set they
//! repair every checksum (and length field that must match the input) before decoding, which
//! lets the fuzzer reach the payload parsers.
//!
//! Not part of the API (hence `#[doc(hidden)]`): it exists for the fuzzers and the replay test.

mod command;
mod handshake;
mod http;
mod peer;
pub mod seeds;
mod snapshot;
mod wal;

pub use command::command;
pub use handshake::peer_handshake;
pub use http::http_request;
pub use peer::peer_frame;
pub use snapshot::snapshot_file;
pub use wal::wal_record;

/// A fuzz target body: arbitrary bytes in, a panic only on a defect.
pub type TargetFn = fn(&[u8]);

/// Every target, by the name of its `fuzz/fuzz_targets/<name>.rs` and `fuzz/corpus/<name>/`.
pub const TARGETS: &[(&str, TargetFn)] = &[
    ("wal_record", wal_record),
    ("command", command),
    ("snapshot_file", snapshot_file),
    ("peer_frame", peer_frame),
    ("peer_handshake", peer_handshake),
    ("http_request", http_request),
];

/// Whether `data` asks for checksums to be repaired (bit 0 of the mode byte), and the rest.
fn split_mode(data: &[u8]) -> Option<(bool, &[u8])> {
    let (&mode, rest) = data.split_first()?;
    Some((mode & 1 == 1, rest))
}

/// One current-thread runtime per thread, reused across iterations (building one per input
/// would dominate the fuzzer's time).
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("invariant: a current-thread runtime can be built");
    }
    RUNTIME.with(|rt| rt.block_on(future))
}
