//! End-to-end tests of the `wal-inspect` binary on WALs written through the real `Wal` API,
//! then damaged by hand: clean, torn tail, flipped bytes, missing directories, `--json` and
//! `--entries` ranges, and the 100 MB needle-in-a-haystack case.

use raftkv_storage::vfs::StdFs;
use raftkv_storage::wal::scan::{ScanOptions, ScannedSegment};
use raftkv_storage::wal::{scan_dir, Wal, WalOptions};
use raftkv_storage::{Entry, EntryKind, HardState};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_wal-inspect");

fn inspect(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "--- stdout\n{}--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{}", text(out)))
}

fn payload(index: u64, bytes: usize) -> Vec<u8> {
    if bytes == 0 {
        return Vec::new();
    }
    // Deterministic, not all text: the first bytes say which entry this is.
    let mut p = format!("entry-{index}:").into_bytes();
    p.resize(bytes, (index % 251) as u8);
    p
}

/// Writes entries 1..=n (term 1 up to n/2, then 2) in batches, with a hard state per batch.
fn build_wal(dir: &Path, opts: WalOptions, n: u64, batch: u64, bytes: usize) {
    let mut wal = Wal::open(dir, opts).unwrap();
    let mut next = 1;
    while next <= n {
        let hi = (next + batch - 1).min(n);
        let entries: Vec<Entry> = (next..=hi)
            .map(|index| Entry {
                index,
                term: if index <= n / 2 { 1 } else { 2 },
                kind: EntryKind::Normal,
                payload: payload(index, bytes).into(),
            })
            .collect();
        let hs = HardState {
            term: entries.last().unwrap().term,
            vote: Some(1),
            commit: next - 1,
        };
        wal.append(&entries, Some(&hs)).unwrap();
        next = hi + 1;
    }
}

fn small_opts() -> WalOptions {
    WalOptions {
        segment_bytes_max: 16 << 10,
        ..WalOptions::default()
    }
}

/// The file and offset of entry `index`'s record.
fn locate(dir: &Path, index: u64) -> (PathBuf, u64, u32) {
    let scan = scan_dir(
        &StdFs,
        dir,
        ScanOptions {
            record_bytes_max: WalOptions::default().record_bytes_max,
        },
    )
    .unwrap();
    assert!(scan.corruption.is_none() && scan.torn_tail.is_none());
    let loc = scan.log.locs[(index - scan.log.first_index) as usize];
    let seg: &ScannedSegment = scan
        .segments
        .iter()
        .find(|s| s.header.seq == loc.seq)
        .unwrap();
    (seg.path.clone(), loc.offset, loc.len)
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    files.sort();
    files
}

fn flip_byte(file: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], offset).unwrap();
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn clean_wal_verifies_and_summarizes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    build_wal(&dir, small_opts(), 300, 7, 100);
    assert!(segment_files(&dir).len() >= 3, "want several segments");

    let out = inspect(&[s(&dir), "--verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("CLEAN"), "{}", text(&out));

    // The data dir works as well as the wal dir.
    let out = inspect(&[s(tmp.path()), "--verify", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v = json(&out);
    assert_eq!(v["verdict"], "clean");
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["first_index"], 1);
    assert_eq!(v["last_index"], 300);
    assert!(v["corruption"].is_null() && v["torn_tail"].is_null());

    let out = inspect(&[s(&dir)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("entries 1..=300 (300 entries), last term 2"),
        "{t}"
    );
    assert!(t.contains("hard state: term 2, vote 1"), "{t}");

    let out = inspect(&[s(&dir), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v = json(&out);
    assert_eq!(v["verdict"], "clean");
    assert_eq!(v["log"]["entries"], 300);
    assert_eq!(v["hard_state"]["term"], 2);
    let segs = v["segments"].as_array().unwrap();
    assert_eq!(segs.len(), segment_files(&dir).len());
    assert_eq!(segs[0]["first_entry_index"], 1);
    assert_eq!(segs[segs.len() - 1]["last_entry_index"], 300);
    assert_eq!(segs[segs.len() - 1]["active"], true);
    let entries: u64 = segs
        .iter()
        .map(|s| s["record_counts"]["entry"].as_u64().unwrap())
        .sum();
    assert_eq!(entries, 300);
    for seg in segs {
        assert_eq!(seg["status"], "ok");
        assert_eq!(seg["record_counts"]["segment_header"], 1);
        assert!(seg["used_bytes"].as_u64().unwrap() <= seg["file_bytes"].as_u64().unwrap());
    }
}

#[test]
fn entries_lists_a_range_in_text_and_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    build_wal(&dir, small_opts(), 200, 10, 100);
    let mut wal = Wal::open(&dir, small_opts()).unwrap();
    let short = Entry {
        index: 201,
        term: 3,
        kind: EntryKind::Noop,
        payload: b"hello".to_vec().into(),
    };
    wal.append(&[short], None).unwrap();
    drop(wal);

    let out = inspect(&[s(&dir), "--entries", "195..=201"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1 + 7, "{stdout}");
    assert!(lines[1].trim_start().starts_with("195 "), "{stdout}");
    assert!(
        lines[7].contains("201") && lines[7].contains("noop") && lines[7].contains("\"hello\""),
        "{stdout}"
    );
    assert!(lines[1].contains("hex:656e7472792d3139353a"), "{stdout}");

    let out = inspect(&[s(&dir), "--entries", "10..13", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v = json(&out);
    assert_eq!(v["count"], 3);
    let es = v["entries"].as_array().unwrap();
    let indexes: Vec<u64> = es.iter().map(|e| e["index"].as_u64().unwrap()).collect();
    assert_eq!(indexes, vec![10, 11, 12]);
    assert_eq!(es[0]["term"], 1);
    assert_eq!(es[0]["kind"], "normal");
    assert_eq!(es[0]["payload_bytes"], 100);
    assert_eq!(es[0]["payload"]["format"], "hex");
    assert_eq!(es[0]["payload"]["truncated"], true);
    let (file, offset, _) = locate(&dir, 10);
    assert_eq!(es[0]["offset"], offset);
    assert_eq!(es[0]["file"], file.file_name().unwrap().to_str().unwrap());

    // No range: everything; a range past the end: nothing, not an error.
    let v = json(&inspect(&[s(&dir), "--entries", "--json"]));
    assert_eq!(v["count"], 201);
    let v = json(&inspect(&[s(&dir), "--entries", "500..", "--json"]));
    assert_eq!(v["count"], 0);
    assert_eq!(v["entries"].as_array().unwrap().len(), 0);

    let out = inspect(&[s(&dir), "--entries", "9..=3"]);
    // A usage error exits 1 like any error: 2 means a torn tail.
    assert_eq!(out.status.code(), Some(1), "usage error: {}", text(&out));
    assert!(text(&out).contains("empty"), "{}", text(&out));
}

#[test]
fn torn_tail_exits_2_and_says_what_opening_would_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    build_wal(&dir, small_opts(), 50, 5, 100);
    let (file, offset, len) = locate(&dir, 50);
    // The last write tore: from the middle of its last entry on (including the batch's hard
    // state record, which the WAL writes after the entries) nothing reached the disk.
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    let half = u64::from(len) / 2;
    let lost = half + 256; // the rest of the entry, the hard state record, and some zeros
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; lost as usize], offset + half).unwrap();
    drop(f);

    let out = inspect(&[s(&dir), "--verify"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("TORN TAIL") && t.contains(s(&file)), "{t}");
    assert!(t.contains(&format!("byte offset:     {offset} ")), "{t}");

    let out = inspect(&[s(&dir), "--verify", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let v = json(&out);
    assert_eq!(v["verdict"], "torn-tail");
    assert_eq!(v["torn_tail"]["file"], s(&file));
    assert_eq!(v["torn_tail"]["offset"], offset);
    assert_eq!(v["last_index"], 49);
    assert!(v["corruption"].is_null());

    // The summary exits with the same verdict and marks the segment.
    let out = inspect(&[s(&dir), "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let v = json(&out);
    let segs = v["segments"].as_array().unwrap();
    assert_eq!(segs[segs.len() - 1]["status"], "torn-tail");

    // Read-only: the file still holds the torn bytes, and opening then cuts exactly them.
    let wal = Wal::open(&dir, small_opts()).unwrap();
    assert_eq!(wal.last_index(), 49);
    let (torn, _) = wal.recovery_report().torn_tail.clone().unwrap();
    assert_eq!((torn.file, torn.offset), (file, offset));
}

#[test]
fn a_flipped_byte_mid_log_exits_1_naming_file_offset_and_index() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    build_wal(&dir, small_opts(), 400, 9, 100);
    let files = segment_files(&dir);
    assert!(files.len() >= 3, "{files:?}");
    // Damage each part of a record in turn: length, type, CRC, index field, payload.
    for within in [1u64, 4, 9, 14, 60] {
        let index = 222;
        let (file, offset, _) = locate(&dir, index);
        assert_ne!(&file, files.last().unwrap(), "want a middle segment");
        flip_byte(&file, offset + within);

        let out = inspect(&[s(&dir), "--verify"]);
        assert_eq!(out.status.code(), Some(1), "byte {within}: {}", text(&out));
        let t = text(&out);
        assert!(t.contains("CORRUPT") && t.contains(s(&file)), "{t}");
        assert!(t.contains(&format!("byte offset:     {offset} ")), "{t}");
        assert!(t.contains(&format!("index:           {index} ")), "{t}");

        let v = json(&inspect(&[s(&dir), "--verify", "--json"]));
        assert_eq!(v["verdict"], "corrupt", "byte {within}");
        assert_eq!(v["exit_code"], 1);
        assert_eq!(v["corruption"]["file"], s(&file));
        assert_eq!(v["corruption"]["offset"], offset);
        assert_eq!(v["corruption"]["index"], index);
        assert_eq!(v["corruption"]["last_good_index"], index - 1);
        assert!(!v["segments_not_checked"].as_array().unwrap().is_empty());

        let v = json(&inspect(&[s(&dir), "--json"]));
        let statuses: Vec<&str> = v["segments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["status"].as_str().unwrap())
            .collect();
        assert!(statuses.contains(&"corrupt") && statuses.contains(&"not-checked"));

        // Entries before the damage are still listed; the exit code says corrupt.
        let out = inspect(&[s(&dir), "--entries", "--json"]);
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(json(&out)["count"], index - 1);

        flip_byte(&file, offset + within);
        assert_eq!(inspect(&[s(&dir), "--verify"]).status.code(), Some(0));
    }
}

#[test]
fn damage_in_the_last_segment_followed_by_records_is_corruption() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let opts = WalOptions {
        segment_bytes_max: 1 << 20,
        ..WalOptions::default()
    };
    build_wal(&dir, opts, 100, 10, 50);
    let (file, offset, _) = locate(&dir, 90);
    flip_byte(&file, offset + 40);
    let out = inspect(&[s(&dir), "--verify", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let v = json(&out);
    assert_eq!(v["corruption"]["offset"], offset);
    assert_eq!(v["corruption"]["last_good_index"], 89);
}

#[test]
fn missing_or_empty_directories_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    for mode in [&[][..], &["--verify"][..], &["--entries"][..]] {
        let mut args = vec![s(&missing)];
        args.extend_from_slice(mode);
        let out = inspect(&args);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("is not a directory"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let out = inspect(&[s(tmp.path()), "--verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no WAL segment files"));
}

/// The "done when": one flipped byte in a ~100 MB WAL is pinpointed.
#[test]
fn verify_pinpoints_one_flipped_byte_in_a_100_mb_wal() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let opts = WalOptions {
        segment_bytes_max: 16 << 20,
        ..WalOptions::default()
    };
    // 24,500 entries of 4 KiB in batches of 1,000: ~101 MB in 7 segments.
    let n = 24_500;
    build_wal(&dir, opts, n, 1_000, 4096);
    let files = segment_files(&dir);
    let scan = scan_dir(
        &StdFs,
        &dir,
        ScanOptions {
            record_bytes_max: opts.record_bytes_max,
        },
    )
    .unwrap();
    let used: u64 = scan.segments.iter().map(|s| s.used_bytes).sum();
    drop(scan);
    assert!(files.len() >= 6, "{files:?}");
    assert!(used >= 100_000_000, "{used} bytes");
    // An entry in the middle segment, a byte in the middle of its payload.
    let index = 12_345;
    let (file, offset, len) = locate(&dir, index);
    assert_eq!(file, files[files.len() / 2], "the middle segment");
    flip_byte(&file, offset + u64::from(len) / 2);

    let out = inspect(&[s(&dir), "--verify"]);
    println!("{}", text(&out));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains(&format!("file:            {}", s(&file))), "{t}");
    assert!(t.contains(&format!("byte offset:     {offset} ")), "{t}");
    assert!(t.contains(&format!("index:           {index} ")), "{t}");
    assert!(t.contains("CRC mismatch"), "{t}");
}
