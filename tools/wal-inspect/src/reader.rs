//! One reader for both kinds of file `--snapshot FILE` takes: a node's snapshot file, or a
//! backup (`raftkv snapshot save`: a snapshot file inside a checksummed envelope naming the
//! cluster). The kind is told by the magic bytes. Both are the storage crate's own readers,
//! which verify every chunk as they stream and the whole file at the end; a backup's offsets
//! are offsets in the backup file.

use raftkv_storage::snapshot::backup::{has_backup_magic, BackupHeader, BackupReader};
use raftkv_storage::snapshot::format::{FormatError, PairRef, SnapshotFileReader, SnapshotHeader};
use raftkv_storage::vfs::VfsFile;
use raftkv_storage::SnapshotMeta;

/// A snapshot file or a backup, being read.
pub enum FileReader {
    Snapshot(SnapshotFileReader),
    Backup(BackupReader),
}

impl FileReader {
    /// Reads the headers (and a backup's envelope) and the meta chunk.
    pub fn open(file: Box<dyn VfsFile>) -> Result<FileReader, FormatError> {
        let backup = has_backup_magic(file.as_ref())
            .map_err(|source| FormatError::Io { offset: 0, source })?;
        if backup {
            Ok(FileReader::Backup(BackupReader::open(file)?))
        } else {
            Ok(FileReader::Snapshot(SnapshotFileReader::open(file)?))
        }
    }

    /// The snapshot's header.
    pub fn header(&self) -> &SnapshotHeader {
        match self {
            FileReader::Snapshot(r) => r.header(),
            FileReader::Backup(r) => r.snapshot_header(),
        }
    }

    /// The snapshot's index, term and membership.
    pub fn meta(&self) -> &SnapshotMeta {
        match self {
            FileReader::Snapshot(r) => r.meta(),
            FileReader::Backup(r) => r.meta(),
        }
    }

    /// A backup's envelope.
    pub fn backup(&self) -> Option<&BackupHeader> {
        match self {
            FileReader::Snapshot(_) => None,
            FileReader::Backup(r) => Some(r.header()),
        }
    }

    /// The next pair; `None` once the whole file verified.
    pub fn next_pair(&mut self) -> Result<Option<PairRef<'_>>, FormatError> {
        match self {
            FileReader::Snapshot(r) => r.next_pair(),
            FileReader::Backup(r) => r.next_pair(),
        }
    }
}
