//! Keeps the crate seams where DESIGN.md's "Layout" puts them, so they cannot erode silently:
//! - the consensus core (`src/raft/`) and the peer transport (`src/transport/`) take their
//!   vocabulary from the leaf crate `raftkv-types`, never from the sled-linked `raftkv-storage`
//!   (neither by name nor through the `raftkv::storage` alias);
//! - `raftkv-types` stays a leaf: serde, bincode, bytes (an entry's shared payload) and
//!   thiserror only;
//! - bincode is used in one module, `types/src/codec.rs`.
//!
//! These read the source tree, so they check what `cargo check` cannot: a path that would
//! compile (the storage crate re-exports the same types) but crosses the seam.

use std::path::{Path, PathBuf};

/// The workspace root (the `raftkv` package's manifest directory).
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`, sorted, skipping build output.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        let entries =
            std::fs::read_dir(&next).unwrap_or_else(|e| panic!("read_dir {}: {e}", next.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                if path.file_name().is_some_and(|name| name != "target") {
                    pending.push(path);
                }
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// `file:line: text` for each line of the `.rs` files under `dirs` containing any of `needles`.
fn lines_mentioning(dirs: &[&str], needles: &[&str]) -> Vec<String> {
    let mut hits = Vec::new();
    for dir in dirs {
        for file in rust_files(&root().join(dir)) {
            let text = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
            for (number, line) in text.lines().enumerate() {
                if needles.iter().any(|needle| line.contains(needle)) {
                    let relative = file.strip_prefix(root()).unwrap_or(&file);
                    hits.push(format!(
                        "{}:{}: {}",
                        relative.display(),
                        number + 1,
                        line.trim()
                    ));
                }
            }
        }
    }
    hits
}

#[test]
fn raft_and_transport_do_not_use_the_storage_crate() {
    let hits = lines_mentioning(
        &["src/raft", "src/transport"],
        &[
            "raftkv_storage",
            "raftkv-storage",
            "crate::storage",
            "storage::",
        ],
    );
    assert!(
        hits.is_empty(),
        "src/raft and src/transport must import from raftkv_types, not the storage crate:\n{}",
        hits.join("\n")
    );
}

#[test]
fn types_crate_is_a_leaf() {
    let manifest_path = root().join("types/Cargo.toml");
    let manifest: toml::Table = std::fs::read_to_string(&manifest_path)
        .expect("read types/Cargo.toml")
        .parse()
        .expect("parse types/Cargo.toml");
    let dependencies = manifest
        .get("dependencies")
        .and_then(|d| d.as_table())
        .expect("types/Cargo.toml has [dependencies]");
    let mut names: Vec<&str> = dependencies.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["bincode", "bytes", "serde", "thiserror"]);
}

#[test]
fn bincode_is_used_in_one_module() {
    // Spelled in two halves so that this file does not match itself.
    let needles = [concat!("bin", "code::"), concat!("use bin", "code")];
    let hits = lines_mentioning(
        &[
            "src", "storage", "types", "tools", "benches", "tests", "examples", "fuzz",
        ],
        &needles,
    );
    assert!(!hits.is_empty(), "the codec module itself must be found");
    let outside: Vec<&String> = hits
        .iter()
        .filter(|hit| !hit.starts_with("types/src/codec.rs:"))
        .collect();
    assert!(
        outside.is_empty(),
        "bincode may be used only in types/src/codec.rs:\n{outside:?}"
    );
}
