//! The `snapshot_file` target: a snapshot file's bytes through the streaming reader and
//! verifier (`storage::snapshot::format::SnapshotFileReader`), which runs at startup, before
//! serving a snapshot to a follower, and on every snapshot a leader sends.
//!
//! Input: a mode byte (bit 0: repair every chunk CRC, the body CRC, the file length and the
//! header CRC, so chunk parsing and the end-of-file checks are reached; bits 1..: the chunk
//! size the file is re-written with), then the file's bytes.
//!
//! The same bytes also go through the backup reader (`storage::snapshot::backup`, which
//! `raftkv snapshot restore` and `wal-inspect` run on operator-supplied files): raw, as a
//! hostile envelope, and wrapped in a valid envelope by the backup writer, where they must
//! verify exactly when they verify alone, with the same contents.

use crate::storage::snapshot::backup::{self, BackupWriter};
use crate::storage::snapshot::format::{
    SnapshotFileReader, SnapshotFileWriter, SnapshotHeader, CHUNK_HEADER_BYTES, HEADER_BYTES,
};
use crate::storage::vfs::{SimFs, Vfs};
use crate::storage::SnapshotMeta;
use std::path::Path;
use std::sync::Arc;

/// A fully verified file's contents.
struct Contents {
    header: SnapshotHeader,
    meta: SnapshotMeta,
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Fuzz body: read and verify the file; one that verifies must re-write to a file that reads
/// back the same meta and pairs.
pub fn snapshot_file(data: &[u8]) {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let mut file = bytes.to_vec();
    if mode & 1 == 1 {
        repair(&mut file);
    }
    let vfs = SimFs::new();
    // Raw bytes as a backup: any verdict, never a panic.
    read_backup(&vfs, Path::new("/backup/raw.rkv"), Some(bytes));
    let alone = read_all(&vfs, Path::new("/snap/fuzz.snap"), &file);
    let wrapped = wrap(&vfs, &file);
    assert_eq!(
        wrapped.as_ref().map(|c| (&c.meta, &c.pairs)),
        alone.as_ref().map(|c| (&c.meta, &c.pairs)),
        "a snapshot verifies inside a backup exactly when it verifies alone"
    );
    let Some(read) = alone else {
        return;
    };
    let key_count = read.pairs.len() as u64;
    let kv_bytes: u64 = read
        .pairs
        .iter()
        .map(|(k, v)| (k.len() + v.len()) as u64)
        .sum();
    assert_eq!(
        key_count, read.header.key_count,
        "a verified file holds the keys it declares"
    );
    assert_eq!(
        kv_bytes, read.header.kv_bytes,
        "a verified file holds the bytes it declares"
    );
    assert!(
        read.pairs.windows(2).all(|w| w[0].0 < w[1].0),
        "verified keys strictly increase"
    );
    let chunk_target_bytes = usize::from(mode >> 1) * 16 + 1;
    let rewritten = rewrite(&vfs, &read, chunk_target_bytes);
    let again = match read_all(&vfs, Path::new("/snap/again.snap"), &rewritten) {
        Some(again) => again,
        None => panic!("a re-written verified snapshot does not verify"),
    };
    assert_eq!(again.meta, read.meta, "the meta survives a re-write");
    assert!(again.pairs == read.pairs, "the pairs survive a re-write");
}

/// Writes `bytes` to `path` and reads the file to the end; `None` if it does not verify.
fn read_all(vfs: &SimFs, path: &Path, bytes: &[u8]) -> Option<Contents> {
    let written = vfs.open(path, true).and_then(|f| f.write_all_at(bytes, 0));
    assert!(written.is_ok(), "the simulated disk has no faults set");
    let file = vfs.open_read(path).ok()?;
    let mut reader = SnapshotFileReader::open(file).ok()?;
    let header = reader.header().clone();
    let meta = reader.meta().clone();
    let mut pairs = Vec::new();
    while let Some((key, value)) = reader.next_pair().ok()? {
        pairs.push((key.to_vec(), value.to_vec()));
    }
    Some(Contents {
        header,
        meta,
        pairs,
    })
}

/// Reads the backup at `path` (first written with `bytes`, if given) to the end; `None` if it
/// does not verify.
fn read_backup(vfs: &SimFs, path: &Path, bytes: Option<&[u8]>) -> Option<Contents> {
    if let Some(bytes) = bytes {
        let written = vfs.open(path, true).and_then(|f| f.write_all_at(bytes, 0));
        assert!(written.is_ok(), "the simulated disk has no faults set");
    }
    let mut reader = backup::open(vfs, path).ok()?;
    let header = reader.snapshot_header().clone();
    let meta = reader.meta().clone();
    let mut pairs = Vec::new();
    while let Some((key, value)) = reader.next_pair().ok()? {
        pairs.push((key.to_vec(), value.to_vec()));
    }
    Some(Contents {
        header,
        meta,
        pairs,
    })
}

/// Streams `file` through the backup writer (which verifies what it wrote) and reads the
/// published backup; `None` if the writer refused it.
fn wrap(vfs: &SimFs, file: &[u8]) -> Option<Contents> {
    let path = Path::new("/backup/fuzz.rkv");
    let mut w = BackupWriter::create(Arc::new(vfs.clone()), path, "fuzz", 0, u64::MAX).ok()?;
    w.write(file).ok()?;
    w.finish().ok()?;
    match read_backup(vfs, path, None) {
        Some(contents) => Some(contents),
        None => panic!("a backup the writer verified does not read back"),
    }
}

/// Writes `contents` again with the real writer; returns the new file's bytes.
fn rewrite(vfs: &SimFs, contents: &Contents, chunk_target_bytes: usize) -> Vec<u8> {
    let path = Path::new("/snap/rewrite.snap");
    let written = vfs.open(path, true).and_then(|file| {
        let mut w = SnapshotFileWriter::new(file, contents.meta.clone(), chunk_target_bytes)?;
        for (key, value) in &contents.pairs {
            w.push(key, value)?;
        }
        w.finish()
    });
    match written {
        Ok(header) => {
            assert_eq!(header.key_count, contents.header.key_count);
            assert_eq!(header.kv_bytes, contents.header.kv_bytes);
        }
        Err(e) => panic!("re-writing a verified snapshot failed: {e}"),
    }
    match vfs.read(path) {
        Ok(bytes) => bytes,
        Err(e) => panic!("the simulated disk lost a file: {e}"),
    }
}

/// Makes every checksum and the file length in the header match the bytes.
fn repair(file: &mut [u8]) {
    let header_bytes = HEADER_BYTES as usize;
    if file.len() < header_bytes {
        return;
    }
    let mut at = header_bytes;
    while file.len() - at >= CHUNK_HEADER_BYTES {
        let len = u32_at(file, at + 4) as usize;
        if len > file.len() - at - CHUNK_HEADER_BYTES {
            break;
        }
        let end = at + CHUNK_HEADER_BYTES + len;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&file[at..at + 12]);
        crc.update(&file[at + CHUNK_HEADER_BYTES..end]);
        let sum = crc.finalize().to_le_bytes();
        file[at + 12..at + CHUNK_HEADER_BYTES].copy_from_slice(&sum);
        at = end;
    }
    let body = crc32fast::hash(&file[header_bytes..]).to_le_bytes();
    let file_bytes = (file.len() as u64).to_le_bytes();
    file[48..56].copy_from_slice(&file_bytes);
    file[56..60].copy_from_slice(&body);
    let head = crc32fast::hash(&file[0..60]).to_le_bytes();
    file[60..64].copy_from_slice(&head);
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
