//! Writes every fuzz target's seeds (`raftkv::fuzz_targets::seeds`) as files under a corpus
//! directory, `<dir>/<target>/seed-<n>`, for `cargo fuzz run` to start from:
//!
//! ```text
//! cargo run --release --example fuzz_seeds -- fuzz/corpus
//! ```

use anyhow::Context;
use raftkv::fuzz_targets::{seeds::seeds, TARGETS};
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: fuzz_seeds <corpus-dir>")?,
    );
    for (target, _) in TARGETS {
        let target_dir = dir.join(target);
        std::fs::create_dir_all(&target_dir)
            .with_context(|| format!("creating {}", target_dir.display()))?;
        let inputs = seeds(target);
        for (i, input) in inputs.iter().enumerate() {
            let path = target_dir.join(format!("seed-{i}"));
            std::fs::write(&path, input).with_context(|| format!("writing {}", path.display()))?;
        }
        println!(
            "{target}: {} seeds in {}",
            inputs.len(),
            target_dir.display()
        );
    }
    Ok(())
}
