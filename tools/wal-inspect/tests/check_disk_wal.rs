//! `raftkv check disk --keep` leaves a WAL that `wal-inspect --verify` accepts as clean.

use raftkv::check_disk::{check_disk, CheckDiskOptions};
use std::process::Command;

#[test]
fn a_kept_check_disk_wal_verifies_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = CheckDiskOptions::new(tmp.path().join("node"));
    opts.entries = 90;
    opts.batch = 16;
    opts.value_bytes = 64;
    opts.keep = true;
    let report = check_disk(&opts).unwrap();
    assert!(report.kept);

    let dir = tmp.path().join("node");
    let out = Command::new(env!("CARGO_BIN_EXE_wal-inspect"))
        .arg(&dir)
        .args(["--verify", "--json"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verdict"], "clean");
    assert_eq!(
        (v["first_index"].as_u64(), v["last_index"].as_u64()),
        (Some(1), Some(90))
    );

    let out = Command::new(env!("CARGO_BIN_EXE_wal-inspect"))
        .arg(&dir)
        .args(["--entries", "88..", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["count"], 3);
    assert_eq!(v["entries"][2]["payload_bytes"], 64);
}
