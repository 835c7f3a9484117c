//! End-to-end tests of `raftkv check disk`: output shape, `--json` fields, `--keep`, cleanup
//! and errors. Speed is never asserted: only that the figures exist and are consistent.

use raftkv::storage::vfs::StdFs;
use raftkv::storage::wal::scan::ScanOptions;
use raftkv::storage::wal::{scan_dir, Wal, WalOptions};
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_raftkv");

fn raftkv(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "--- status {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const MEASUREMENT_FIELDS: &[&str] = &[
    "entries",
    "writes",
    "bytes",
    "elapsed_ms",
    "entries_per_s",
    "mb_per_s",
    "write_sync_p50_us",
    "write_sync_p99_us",
    "write_p50_us",
    "other_p50_us",
    "fdatasync_p50_us",
    "fdatasync_p99_us",
    "fdatasync_max_us",
];

#[test]
fn json_report_has_every_figure_and_nothing_is_left_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("check");
    let out = raftkv(&[
        "check",
        "disk",
        "--dir",
        s(&dir),
        "--entries",
        "100",
        "--batch",
        "16",
        "--value-size",
        "40",
        "--fallocated",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["entries"], 100);
    assert_eq!(v["batch"], 16);
    assert_eq!(v["value_bytes"], 40);
    assert_eq!(v["batch_bytes"], 16 * (29 + 40));
    assert_eq!(v["kept"], false);
    for name in ["wal", "raw", "raw_fallocated"] {
        let m = &v[name];
        assert_eq!(m["name"], name);
        for field in MEASUREMENT_FIELDS {
            let x = m[field]
                .as_f64()
                .unwrap_or_else(|| panic!("{name}.{field}: {m}"));
            assert!(x.is_finite() && x >= 0.0, "{name}.{field} = {x}");
        }
        assert_eq!(m["entries"], 100);
        assert_eq!(m["writes"], 7, "ceil(100 / 16) batches");
        assert_eq!(m["bytes"], 100 * (29 + 40));
        let p50 = m["write_sync_p50_us"].as_f64().unwrap();
        assert!(p50 <= m["write_sync_p99_us"].as_f64().unwrap());
    }
    let ratio = v["ratio_wal_raw"].as_f64().unwrap();
    assert!(ratio.is_finite() && ratio > 0.0);
    assert!(!dir.exists(), "the check removes what it wrote");
}

#[test]
fn text_report_shows_both_runs_and_the_ratio() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("check");
    let out = raftkv(&[
        "check",
        "disk",
        "--dir",
        s(&dir),
        "--entries",
        "32",
        "--batch",
        "8",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(
        stdout.contains("32 entries of 256 bytes in batches of 8"),
        "{stdout}"
    );
    for label in ["entries/s", "MB/s", "fdatasync", "p50 us", "p99 us"] {
        assert!(stdout.contains(label), "{label}: {stdout}");
    }
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("wal ") || l.trim_start().starts_with("raw "))
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    for row in rows {
        assert_eq!(row.split_whitespace().count(), 7, "{row}");
    }
    assert!(stdout.contains("wal/raw throughput ratio: "), "{stdout}");
    assert!(!stdout.contains("raw_fallocated"), "{stdout}");
}

#[test]
fn keep_leaves_a_clean_wal_with_every_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    let out = raftkv(&[
        "check",
        "disk",
        "--dir",
        s(&dir),
        "--entries",
        "50",
        "--batch",
        "7",
        "--value-size",
        "10",
        "--keep",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("WAL kept in"), "{stdout}");
    let wal_dir = dir.join("wal");
    // What `wal-inspect --verify` checks: the read-only scan finds no damage at all.
    let scan = scan_dir(
        &StdFs,
        &wal_dir,
        ScanOptions {
            record_bytes_max: WalOptions::default().record_bytes_max,
        },
    )
    .unwrap();
    assert!(scan.corruption.is_none(), "{:?}", scan.corruption);
    assert!(scan.torn_tail.is_none(), "{:?}", scan.torn_tail);
    assert_eq!((scan.log.first_index, scan.log.last_index()), (1, 50));
    drop(scan);
    let wal = Wal::open(&wal_dir, WalOptions::default()).unwrap();
    let entries = wal.entries(1, 51, usize::MAX).unwrap();
    assert_eq!(entries.len(), 50);
    assert!(entries.iter().all(|e| e.payload.len() == 10 && e.term == 1));
    assert!(no_raw_files(&dir));
}

fn no_raw_files(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .unwrap()
        .all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".raw"))
}

#[test]
fn bad_flags_and_an_existing_wal_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let d = s(&dir);
    for (args, says) in [
        (vec!["--batch", "0"], "--batch must be at least 1"),
        (vec!["--entries", "0"], "--entries must be at least 1"),
        (
            vec!["--entries", "10", "--batch", "20"],
            "is larger than --entries",
        ),
        (
            vec!["--value-size", "100000000"],
            "exceeds the WAL's record limit",
        ),
    ] {
        let mut all = vec!["check", "disk", "--dir", d];
        all.extend(args);
        let out = raftkv(&all);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("invalid option") && err.contains(says),
            "{err}"
        );
        assert!(!dir.exists(), "nothing written for bad flags");
    }
    // Not a number, unknown flag, missing --dir: usage errors from the parser.
    for args in [
        vec!["check", "disk", "--dir", d, "--entries", "lots"],
        vec!["check", "disk", "--dir", d, "--fast"],
        vec!["check", "disk"],
    ] {
        let out = raftkv(&args);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(!out.stderr.is_empty());
    }
    // A WAL already there is never appended to or removed.
    let out = raftkv(&[
        "check",
        "disk",
        "--dir",
        d,
        "--entries",
        "4",
        "--batch",
        "2",
        "--keep",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = raftkv(&[
        "check",
        "disk",
        "--dir",
        d,
        "--entries",
        "4",
        "--batch",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds WAL segments"));
    let wal = Wal::open(&dir.join("wal"), WalOptions::default()).unwrap();
    assert_eq!(wal.last_index(), 4);
    drop(wal);
    // A --dir that is a file.
    let file = tmp.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let out = raftkv(&["check", "disk", "--dir", s(&file)]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("raftkv: error"));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}
