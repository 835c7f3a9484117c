//! Exhaustive damage tests for the WAL: cut the file at every byte offset of its last records,
//! flip every bit of a small WAL, zero every 4 KiB block of a larger one.
//!
//! Each damaged WAL must either open with a prefix of the entries written — exactly the fully
//! written ones when the damage is a cut tail — or refuse with an error that names the damaged
//! file and an offset at or before the damage. It must never yield a wrong entry.
//!
//! The disk is simulated ([`SimFs`]) so tens of thousands of reopenings take seconds.

use raftkv_storage::vfs::{SimFs, Vfs};
use raftkv_storage::wal::{scan, Wal, WalError, WalOptions};
use raftkv_storage::{Entry, EntryKind, HardState, Membership, SnapshotMeta};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn dir() -> PathBuf {
    PathBuf::from("/n/wal")
}

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        kind: if index.is_multiple_of(7) {
            EntryKind::Noop
        } else {
            EntryKind::Normal
        },
        payload: format!("set key-{index} value-{}", index * term)
            .into_bytes()
            .into(),
    }
}

/// A disk image: every file's path and bytes.
type Image = Vec<(PathBuf, Vec<u8>)>;

fn image(fs: &SimFs) -> Image {
    fs.list_dir(&dir())
        .unwrap()
        .into_iter()
        .map(|name| {
            let path = dir().join(name);
            let bytes = fs.read(&path).unwrap();
            (path, bytes)
        })
        .collect()
}

fn restore(img: &Image) -> SimFs {
    let fs = SimFs::new();
    for (path, bytes) in img {
        let f = fs.open(path, true).unwrap();
        f.write_all_at(bytes, 0).unwrap();
        f.sync_data().unwrap();
    }
    fs.sync_dir(&dir()).unwrap();
    fs
}

/// Writes a WAL with a mix of records over several segments; returns its image and entries.
fn build(opts: WalOptions, last_index: u64) -> (Image, Vec<Entry>) {
    let fs = SimFs::new();
    let mut wal = Wal::open_with(Arc::new(fs.clone()), &dir(), opts).unwrap();
    let mut term = 1;
    let mut index = 1;
    while index <= last_index {
        if index % 11 == 0 {
            term += 1;
        }
        let n = (index % 3) + 1;
        let batch: Vec<Entry> = (index..(index + n).min(last_index + 1))
            .map(|i| entry(i, term))
            .collect();
        let hs = HardState {
            term,
            vote: Some(1 + term % 3),
            commit: index.saturating_sub(2),
        };
        wal.append(&batch, (index % 2 == 0).then_some(&hs)).unwrap();
        index += batch.len() as u64;
        if index == last_index / 2 {
            wal.record_snapshot(&SnapshotMeta {
                index: index - 3,
                term: wal.term(index - 3).unwrap(),
                membership: Membership::with_voters([1, 2, 3]),
            })
            .unwrap();
        }
    }
    let all = wal.entries(1, last_index + 1, usize::MAX).unwrap();
    drop(wal);
    (image(&fs), all)
}

fn open(fs: &SimFs, opts: WalOptions) -> Result<Wal, WalError> {
    Wal::open_with(Arc::new(fs.clone()), &dir(), opts)
}

fn read_all(wal: &Wal) -> Vec<Entry> {
    if wal.last_index() < wal.first_index() {
        return Vec::new();
    }
    wal.entries(wal.first_index(), wal.last_index() + 1, usize::MAX)
        .unwrap()
}

/// The damage contract: a prefix, or a located refusal.
///
/// A refusal names the damaged file at or before the damage, or — when the damage removed
/// the last records of a sealed segment — that file at the end of its surviving records.
fn check(
    what: &str,
    result: Result<Wal, WalError>,
    want: &[Entry],
    damaged_file: &Path,
    damage_offset: u64,
) -> Option<usize> {
    match result {
        Ok(wal) => {
            let got = read_all(&wal);
            assert!(got.len() <= want.len(), "{what}: more entries than written");
            assert_eq!(&got[..], &want[..got.len()], "{what}: not a prefix");
            Some(got.len())
        }
        Err(WalError::Corrupt(c)) => {
            assert_eq!(c.file, damaged_file, "{what}: wrong file in {c}");
            assert!(
                c.offset <= damage_offset,
                "{what}: error offset {} after the damage at {damage_offset}: {c}",
                c.offset
            );
            None
        }
        Err(other) => panic!("{what}: unexpected error {other}"),
    }
}

fn small_opts() -> WalOptions {
    WalOptions {
        segment_bytes_max: 1024,
        record_bytes_max: 4096,
        preallocate: true,
        prepare_ahead: false,
    }
}

#[test]
fn cut_at_every_byte_of_the_last_three_records() {
    let opts = WalOptions {
        preallocate: false,
        prepare_ahead: false,
        ..small_opts()
    };
    let (img, want) = build(opts, 60);
    let (last_path, last_bytes) = img.last().unwrap().clone();
    let scan = scan::scan_dir(
        &restore(&img),
        &dir(),
        scan::ScanOptions {
            record_bytes_max: opts.record_bytes_max,
        },
    )
    .unwrap();
    let seq = scan.segments.last().unwrap().header.seq;
    let last_locs: Vec<_> = scan.log.locs.iter().filter(|l| l.seq == seq).collect();
    assert!(last_locs.len() >= 3, "the last segment needs 3 entries");
    let start = last_locs[last_locs.len() - 3].offset as usize;
    assert_eq!(
        last_bytes.len() as u64,
        scan.segments.last().unwrap().used_bytes
    );
    for zero_fill in [false, true] {
        for cut in start..last_bytes.len() {
            let mut img = img.clone();
            let bytes = &mut img.last_mut().unwrap().1;
            if zero_fill {
                bytes[cut..].iter_mut().for_each(|b| *b = 0);
            } else {
                bytes.truncate(cut);
            }
            let fs = restore(&img);
            let what = format!("cut at {cut} (zero fill {zero_fill})");
            let whole = scan
                .log
                .locs
                .iter()
                .filter(|l| l.seq < seq || l.offset + u64::from(l.len) <= cut as u64)
                .count();
            let got = check(&what, open(&fs, opts), &want, &last_path, cut as u64)
                .unwrap_or_else(|| panic!("{what}: a cut tail must open"));
            assert_eq!(got, whole, "{what}: exactly the fully written entries");
            // And it reopens cleanly, the tail now gone for good.
            let again = open(&fs, opts).unwrap();
            assert_eq!(read_all(&again).len(), whole, "{what}: second open");
            assert!(
                again.recovery_report().torn_tail.is_none(),
                "{what}: cut twice"
            );
        }
    }
}

#[test]
fn flip_every_bit_of_a_small_wal() {
    let opts = small_opts();
    let (img, want) = build(opts, 45);
    assert!(img.len() >= 3, "want several segments, got {}", img.len());
    let last_file = img.last().unwrap().0.clone();
    let mut opened = 0;
    let mut refused = 0;
    for (file_no, (path, bytes)) in img.iter().enumerate() {
        for pos in 0..bytes.len() {
            for bit in 0..8 {
                let mut img = img.clone();
                img[file_no].1[pos] ^= 1 << bit;
                let fs = restore(&img);
                let what = format!("flip bit {bit} of byte {pos} in {}", path.display());
                match check(&what, open(&fs, opts), &want, path, pos as u64) {
                    Some(n) => {
                        opened += 1;
                        assert_eq!(
                            path, &last_file,
                            "{what}: damage outside the last segment must refuse"
                        );
                        if n < want.len() {
                            let broken = fs
                                .list_dir(&dir())
                                .unwrap()
                                .into_iter()
                                .filter(|n| n.ends_with(".broken"))
                                .count();
                            assert_eq!(broken, 1, "{what}: a cut tail is copied aside");
                        }
                    }
                    None => refused += 1,
                }
            }
        }
    }
    assert!(
        opened > 0 && refused > 0,
        "opened {opened}, refused {refused}"
    );
}

#[test]
fn zero_every_4k_block_of_a_larger_wal() {
    let opts = WalOptions {
        segment_bytes_max: 16 << 10,
        record_bytes_max: 4096,
        preallocate: true,
        prepare_ahead: false,
    };
    let (img, want) = build(opts, 1200);
    assert!(img.len() >= 4);
    for (file_no, (path, bytes)) in img.iter().enumerate() {
        for block in (0..bytes.len()).step_by(512) {
            let end = (block + 4096).min(bytes.len());
            // The damage starts at the first byte the zeroing actually changes.
            let Some(first_changed) = bytes[block..end].iter().position(|b| *b != 0) else {
                continue;
            };
            let mut img = img.clone();
            img[file_no].1[block..end].iter_mut().for_each(|b| *b = 0);
            let fs = restore(&img);
            let what = format!("zero {block}..{end} of {}", path.display());
            let damage = (block + first_changed) as u64;
            if let Some(n) = check(&what, open(&fs, opts), &want, path, damage) {
                assert_eq!(
                    file_no,
                    img.len() - 1,
                    "{what}: only the last segment can lose a tail"
                );
                assert!(
                    n < want.len(),
                    "{what}: entries were zeroed, yet all of them opened"
                );
            }
        }
    }
}
