use super::*;
use crate::snapshot::format::SnapshotFileWriter;
use crate::types::Membership;
use crate::vfs::StdFs;

const CLUSTER: &str = "old-cluster";

fn meta(index: u64) -> SnapshotMeta {
    SnapshotMeta {
        index,
        term: 3,
        membership: Membership::with_voters([1, 2, 3]),
    }
}

/// The pairs of every test snapshot: `n` keys, one value larger than a chunk.
fn pairs(n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let value = if i == 7 {
                vec![0x5a; 700]
            } else {
                format!("value-{i}").into_bytes()
            };
            (format!("key-{i:04}").into_bytes(), value)
        })
        .collect()
}

/// A snapshot file at `index` with `n` pairs in small (256-byte) chunks, as bytes.
fn snapshot_bytes(dir: &Path, index: u64, n: usize) -> Vec<u8> {
    let path = dir.join(format!("snap-{index}"));
    let file = StdFs.open(&path, true).unwrap();
    let mut w = SnapshotFileWriter::new(file, meta(index), 256).unwrap();
    for (k, v) in pairs(n) {
        w.push(&k, &v).unwrap();
    }
    w.finish().unwrap();
    std::fs::read(&path).unwrap()
}

/// Streams `snapshot` into a backup at `path` in pieces of seeded sizes (1..=300 bytes).
fn save(path: &Path, snapshot: &[u8], seed: u64) -> Result<VerifiedBackup, BackupError> {
    let mut w = BackupWriter::create(Arc::new(StdFs), path, CLUSTER, 1_700_000_000_000, 1 << 30)?;
    let mut rng = seed | 1;
    let mut at = 0;
    while at < snapshot.len() {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let n = (1 + rng % 300) as usize;
        let end = (at + n).min(snapshot.len());
        w.write(&snapshot[at..end])?;
        at = end;
    }
    w.finish()
}

fn read_all(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut r = open(&StdFs, path).unwrap();
    let mut out = Vec::new();
    while let Some((k, v)) = r.next_pair().unwrap() {
        out.push((k.to_vec(), v.to_vec()));
    }
    out
}

/// The offset and reason `verify` reports for the file at `path`.
fn damage_of(path: &Path) -> (u64, String) {
    match verify(&StdFs, path) {
        Err(BackupError::Damaged {
            damage: FormatError::Corrupt { offset, what },
            ..
        }) => (offset, what),
        other => panic!("{} should be refused as damaged: {other:?}", path.display()),
    }
}

#[test]
fn a_streamed_backup_round_trips_with_its_cluster_id() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = snapshot_bytes(dir.path(), 42, 60);
    for seed in [1, 2, 3] {
        let path = dir.path().join(format!("b-{seed}.rkv"));
        let saved = save(&path, &snapshot, seed).unwrap();
        assert_eq!(saved.header.cluster_id, CLUSTER);
        assert_eq!((saved.header.index, saved.header.term), (42, 3));
        assert_eq!(saved.header.saved_at_unix_ms, 1_700_000_000_000);
        assert_eq!(saved.snapshot.key_count, 60);
        assert_eq!(saved.meta, meta(42));
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(saved.file_bytes(), len);
        assert_eq!(
            len,
            ENVELOPE_BYTES + CLUSTER.len() as u64 + snapshot.len() as u64
        );
        // The snapshot inside is the streamed file, byte for byte.
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            &bytes[saved.header.snapshot_offset() as usize..],
            &snapshot[..]
        );
        assert_eq!(read_all(&path), pairs(60), "seed {seed}");
        assert!(!dir.path().join(format!("b-{seed}.rkv.part")).exists());
        let file = StdFs.open_read(&path).unwrap();
        assert!(has_backup_magic(file.as_ref()).unwrap());
    }
}

#[test]
fn every_flipped_byte_is_refused_at_or_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = snapshot_bytes(dir.path(), 9, 40);
    let path = dir.path().join("b.rkv");
    let saved = save(&path, &snapshot, 7).unwrap();
    let good = std::fs::read(&path).unwrap();
    let base = saved.header.snapshot_offset() as usize;
    let damaged_path = dir.path().join("damaged.rkv");
    for at in 0..good.len() {
        let mut bad = good.clone();
        bad[at] ^= 0x10;
        std::fs::write(&damaged_path, &bad).unwrap();
        let (offset, what) = damage_of(&damaged_path);
        assert!(
            offset <= at as u64,
            "a flip at byte {at} is reported later, at {offset}: {what}"
        );
        if at >= base + HEADER_BYTES as usize {
            // Inside a chunk: located to that chunk (one 256-byte target, one 700-byte pair).
            assert!(what.contains("chunk"), "flip at {at}: {what}");
            assert!(
                at as u64 - offset < 1024,
                "flip at {at} reported at {offset}"
            );
        }
    }
}

#[test]
fn damage_at_chosen_offsets_names_the_place() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = snapshot_bytes(dir.path(), 9, 40);
    let path = dir.path().join("b.rkv");
    let saved = save(&path, &snapshot, 7).unwrap();
    let good = std::fs::read(&path).unwrap();
    let base = saved.header.snapshot_offset();
    let damaged_path = dir.path().join("damaged.rkv");
    let cases: [(u64, u64, &str); 5] = [
        (0, 0, "bad magic"),
        (20, 0, "backup header CRC mismatch"),
        (ENVELOPE_BYTES + 2, 0, "backup header CRC mismatch"),
        (base + 3, base, "in the embedded snapshot: bad magic"),
        (
            base + HEADER_BYTES + 20,
            base + HEADER_BYTES,
            "chunk 0 CRC mismatch",
        ),
    ];
    for (at, want_offset, want_what) in cases {
        let mut bad = good.clone();
        bad[at as usize] ^= 0x01;
        std::fs::write(&damaged_path, &bad).unwrap();
        let (offset, what) = damage_of(&damaged_path);
        assert_eq!(offset, want_offset, "flip at {at}: {what}");
        assert!(what.contains(want_what), "flip at {at}: {what}");
    }
    // A flip in the last chunk: located past the middle of the file, to a chunk by number.
    let at = good.len() as u64 - 10;
    let mut bad = good.clone();
    bad[at as usize] ^= 0x01;
    std::fs::write(&damaged_path, &bad).unwrap();
    let (offset, what) = damage_of(&damaged_path);
    assert!(
        offset > good.len() as u64 / 2 && offset <= at,
        "{offset}: {what}"
    );
    assert!(what.contains("chunk"), "{what}");
}

#[test]
fn every_truncation_is_refused_at_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = snapshot_bytes(dir.path(), 9, 20);
    let path = dir.path().join("b.rkv");
    save(&path, &snapshot, 3).unwrap();
    let good = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.rkv");
    for len in 0..good.len() {
        std::fs::write(&cut, &good[..len]).unwrap();
        let (offset, what) = damage_of(&cut);
        assert_eq!(offset, len as u64, "truncated to {len}: {what}");
    }
    // And a byte too many.
    let mut long = good.clone();
    long.push(0);
    std::fs::write(&cut, &long).unwrap();
    let (offset, what) = damage_of(&cut);
    assert_eq!(offset, good.len() as u64, "{what}");
}

#[test]
fn a_bare_snapshot_file_is_not_a_backup() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = snapshot_bytes(dir.path(), 9, 5);
    let path = dir.path().join("snap.bin");
    std::fs::write(&path, &snapshot).unwrap();
    let (offset, what) = damage_of(&path);
    assert_eq!(offset, 0);
    assert!(what.contains("not a raftkv backup file"), "{what}");
    let file = StdFs.open_read(&path).unwrap();
    assert!(!has_backup_magic(file.as_ref()).unwrap());
}

#[test]
fn another_valid_snapshot_swapped_in_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = snapshot_bytes(dir.path(), 9, 20);
    // Same length, other index: every CRC of its own is right.
    let b = snapshot_bytes(dir.path(), 10, 20);
    assert_eq!(a.len(), b.len());
    let path = dir.path().join("b.rkv");
    let saved = save(&path, &a, 3).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let base = saved.header.snapshot_offset() as usize;
    bytes[base..].copy_from_slice(&b);
    std::fs::write(&path, &bytes).unwrap();
    let (offset, what) = damage_of(&path);
    assert_eq!(offset, base as u64);
    assert!(what.contains("backup header says index 9"), "{what}");
}

#[test]
fn a_cut_or_oversized_stream_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = snapshot_bytes(dir.path(), 9, 20);
    let path = dir.path().join("b.rkv");
    let part = dir.path().join("b.rkv.part");
    for len in [0, 10, 64, 200, snapshot.len() - 1] {
        let mut w = BackupWriter::create(Arc::new(StdFs), &path, CLUSTER, 0, 1 << 30).unwrap();
        w.write(&snapshot[..len]).unwrap();
        let err = w.finish().unwrap_err();
        assert!(matches!(err, BackupError::Damaged { .. }), "{len}: {err}");
        assert!(!path.exists() && !part.exists(), "cut at {len}");
    }
    let mut w = BackupWriter::create(Arc::new(StdFs), &path, CLUSTER, 0, 100).unwrap();
    let err = w.write(&snapshot).unwrap_err();
    assert!(err.to_string().contains("longer than the limit"), "{err}");
    drop(w);
    assert!(!path.exists() && !part.exists());
    // A failed save never touches an existing backup of the same name.
    save(&path, &snapshot, 1).unwrap();
    let before = std::fs::read(&path).unwrap();
    let mut w = BackupWriter::create(Arc::new(StdFs), &path, CLUSTER, 0, 1 << 30).unwrap();
    w.write(&snapshot[..100]).unwrap();
    assert!(w.finish().is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn cluster_ids_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.rkv");
    for bad in [String::new(), "x".repeat(CLUSTER_ID_BYTES_MAX + 1)] {
        let err = BackupWriter::create(Arc::new(StdFs), &path, &bad, 0, 1).err();
        assert!(matches!(err, Some(BackupError::Invalid(_))), "{err:?}");
    }
    assert!(check_cluster_id(&"x".repeat(CLUSTER_ID_BYTES_MAX)).is_ok());
}
