//! Replays the fuzz corpora on stable, in every `cargo test`: each file of
//! `fuzz/corpus/<target>/` (what `cargo fuzz` found and minimized), of
//! `fuzz/regressions/<target>/` (inputs that once crashed a target) and every generated seed
//! goes through the same target body the fuzzer runs (`raftkv::fuzz_targets`), which panics
//! on a defect. Each input must also finish within [`INPUT_MS_MAX`], so a hang fails here.

use raftkv::fuzz_targets::{seeds::seeds, TargetFn, TARGETS};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The longest one input may take (the slowest target, `http_request`, takes a few ms).
const INPUT_MS_MAX: u64 = 5_000;

fn run_one(target: &str, body: TargetFn, input: &[u8], origin: &str) {
    let started = Instant::now();
    let result = std::panic::catch_unwind(|| body(input));
    let elapsed = started.elapsed();
    assert!(result.is_ok(), "{target}: {origin} made the target panic");
    assert!(
        elapsed <= Duration::from_millis(INPUT_MS_MAX),
        "{target}: {origin} took {elapsed:?}, over {INPUT_MS_MAX} ms"
    );
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

#[test]
fn every_seed_passes_every_target_check() {
    for (target, body) in TARGETS {
        let inputs = seeds(target);
        assert!(!inputs.is_empty(), "{target} has no seeds");
        for (i, input) in inputs.iter().enumerate() {
            run_one(target, *body, input, &format!("seed {i}"));
        }
    }
}

#[test]
fn every_corpus_and_regression_file_passes() {
    for (target, body) in TARGETS {
        let corpus = files_in(&fuzz_dir().join("corpus").join(target));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{target} is missing or empty"
        );
        let regressions = files_in(&fuzz_dir().join("regressions").join(target));
        for path in corpus.iter().chain(&regressions) {
            let input = match std::fs::read(path) {
                Ok(input) => input,
                Err(e) => panic!("cannot read {}: {e}", path.display()),
            };
            run_one(target, *body, &input, &path.display().to_string());
        }
        println!(
            "{target}: {} corpus and {} regression inputs replayed",
            corpus.len(),
            regressions.len()
        );
    }
}
