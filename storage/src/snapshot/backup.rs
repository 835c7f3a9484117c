//! Backup files: one snapshot file, byte for byte, inside a small checksummed envelope that
//! names the cluster it came from.
//!
//! A backup is what `GET /snapshot` streams (a snapshot file, [`super::format`]) plus what the
//! snapshot file does not say: the cluster id and when it was saved. The snapshot file is kept
//! exactly as the leader wrote it, so the snapshot reader (the code recovery and installs use)
//! verifies it unchanged, and node-internal snapshot files need no new format.
//!
//! ```text
//! envelope header (64 bytes, offset 0; integers little-endian)
//! offset  size  field
//!      0     8  magic "RKVBKUP1"
//!      8     4  format version u32 (1)
//!     12     4  cluster id length n u32 (1 ..= CLUSTER_ID_BYTES_MAX)
//!     16     8  snapshot index u64
//!     24     8  snapshot term u64
//!     32     8  snapshot file bytes u64
//!     40     8  saved at, milliseconds since the Unix epoch u64
//!     48     4  the embedded snapshot's own header CRC (its bytes 60..64)
//!     52     8  reserved, zero
//!     60     4  CRC-32 of bytes 0..60 ‖ the cluster id
//!     64     n  cluster id (UTF-8)
//!   64+n        the snapshot file, exactly `snapshot file bytes` long; nothing follows it
//! ```
//!
//! Checksummed end to end as a chain: the envelope CRC covers the embedded snapshot's header
//! CRC, which covers its body CRC, which covers every byte after the snapshot header; every
//! chunk also has its own CRC and sequence number, so damage is located (byte offset in the
//! backup file, chunk number) rather than only detected. The envelope is written last, over a
//! zeroed placeholder, so a file whose writer died never verifies.

use super::format::{
    corrupt, u32_at, u64_at, FormatError, PairRef, SnapshotFileReader, SnapshotHeader, HEADER_BYTES,
};
use crate::types::SnapshotMeta;
use crate::vfs::{FileBytes, Vfs, VfsFile};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The envelope's magic bytes.
pub const MAGIC: &[u8; 8] = b"RKVBKUP1";
/// The backup format version.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of the fixed part of the envelope.
pub const ENVELOPE_BYTES: u64 = 64;
/// The longest cluster id a backup carries.
pub const CLUSTER_ID_BYTES_MAX: usize = 1024;
/// The suffix of the file a backup is written to before it is verified and renamed.
pub const PART_SUFFIX: &str = ".part";

/// What a backup's envelope says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupHeader {
    pub cluster_id: String,
    pub index: u64,
    pub term: u64,
    pub snapshot_bytes: u64,
    pub saved_at_unix_ms: u64,
    /// The embedded snapshot file's header CRC, which commits to all of its bytes.
    pub snapshot_header_crc: u32,
}

impl BackupHeader {
    /// Where the embedded snapshot file starts.
    pub fn snapshot_offset(&self) -> u64 {
        ENVELOPE_BYTES + self.cluster_id.len() as u64
    }

    /// The whole backup file's length.
    pub fn file_bytes(&self) -> u64 {
        self.snapshot_offset().saturating_add(self.snapshot_bytes)
    }

    fn encode(&self) -> Vec<u8> {
        let id = self.cluster_id.as_bytes();
        let mut b = vec![0u8; ENVELOPE_BYTES as usize + id.len()];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(id.len() as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.index.to_le_bytes());
        b[24..32].copy_from_slice(&self.term.to_le_bytes());
        b[32..40].copy_from_slice(&self.snapshot_bytes.to_le_bytes());
        b[40..48].copy_from_slice(&self.saved_at_unix_ms.to_le_bytes());
        b[48..52].copy_from_slice(&self.snapshot_header_crc.to_le_bytes());
        b[64..].copy_from_slice(id);
        let crc = envelope_crc(&b[0..60], id);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

fn envelope_crc(fixed: &[u8], cluster_id: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(fixed);
    h.update(cluster_id);
    h.finalize()
}

/// Checks a cluster id can be carried by a backup (and named in a node's identity file).
pub fn check_cluster_id(cluster_id: &str) -> Result<(), String> {
    if cluster_id.is_empty() {
        return Err("the cluster id is empty".into());
    }
    if cluster_id.len() > CLUSTER_ID_BYTES_MAX {
        return Err(format!(
            "the cluster id is {} bytes, more than {CLUSTER_ID_BYTES_MAX}",
            cluster_id.len()
        ));
    }
    Ok(())
}

/// Whether `file` starts with the backup magic (a backup rather than a bare snapshot file).
pub fn has_backup_magic(file: &dyn VfsFile) -> io::Result<bool> {
    if file.size_bytes()? < MAGIC.len() as u64 {
        return Ok(false);
    }
    let mut magic = [0u8; 8];
    file.read_exact_at(&mut magic, 0)?;
    Ok(&magic == MAGIC)
}

/// Reads and checks the envelope (magic, cluster id length, CRC, version, reserved bytes,
/// the file's exact length).
fn read_envelope(file: &dyn VfsFile) -> Result<BackupHeader, FormatError> {
    let io_at = |offset| move |source| FormatError::Io { offset, source };
    let len = file.size_bytes().map_err(io_at(0))?;
    if len < ENVELOPE_BYTES {
        return Err(corrupt(
            len,
            format!("file is {len} bytes, shorter than the {ENVELOPE_BYTES}-byte backup header"),
        ));
    }
    let mut b = [0u8; ENVELOPE_BYTES as usize];
    file.read_exact_at(&mut b, 0).map_err(io_at(0))?;
    if &b[0..8] != MAGIC {
        return Err(corrupt(0, "bad magic: not a raftkv backup file"));
    }
    let id_len = u32_at(&b, 12) as usize;
    if id_len == 0 || id_len > CLUSTER_ID_BYTES_MAX {
        return Err(corrupt(
            12,
            format!("cluster id length {id_len} is outside 1..={CLUSTER_ID_BYTES_MAX}"),
        ));
    }
    if len < ENVELOPE_BYTES + id_len as u64 {
        return Err(corrupt(len, "file ends inside the cluster id"));
    }
    let mut id = vec![0u8; id_len];
    file.read_exact_at(&mut id, ENVELOPE_BYTES)
        .map_err(io_at(ENVELOPE_BYTES))?;
    let stored = u32_at(&b, 60);
    let actual = envelope_crc(&b[0..60], &id);
    if stored != actual {
        return Err(corrupt(
            0,
            format!("backup header CRC mismatch (stored {stored:08x}, computed {actual:08x})"),
        ));
    }
    let version = u32_at(&b, 8);
    if version != FORMAT_VERSION {
        return Err(corrupt(
            8,
            format!("backup format version {version}, this build reads {FORMAT_VERSION}"),
        ));
    }
    if b[52..60] != [0u8; 8] {
        return Err(corrupt(52, "reserved bytes are not zero"));
    }
    let cluster_id = String::from_utf8(id)
        .map_err(|_| corrupt(ENVELOPE_BYTES, "the cluster id is not UTF-8"))?;
    let header = BackupHeader {
        cluster_id,
        index: u64_at(&b, 16),
        term: u64_at(&b, 24),
        snapshot_bytes: u64_at(&b, 32),
        saved_at_unix_ms: u64_at(&b, 40),
        snapshot_header_crc: u32_at(&b, 48),
    };
    let want = header.file_bytes();
    if len != want {
        return Err(corrupt(
            len.min(want),
            format!("file is {len} bytes, its backup header says {want}"),
        ));
    }
    Ok(header)
}

/// The embedded snapshot file as a read-only file of its own: offsets start at 0 where it
/// starts, and it ends where the backup says it does.
struct Window {
    inner: Box<dyn VfsFile>,
    base: u64,
    len: u64,
}

fn read_only() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "a backup's embedded snapshot is read-only",
    )
}

impl VfsFile for Window {
    fn size_bytes(&self) -> io::Result<u64> {
        Ok(self.len)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the embedded snapshot",
            ));
        }
        self.inner.read_exact_at(buf, self.base + offset)
    }

    fn write_all_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn sync_data(&self) -> io::Result<()> {
        Err(read_only())
    }

    fn allocate(&self, _len_bytes: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn set_len(&self, _len_bytes: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn map(&self) -> io::Result<FileBytes> {
        Err(read_only())
    }
}

/// Moves an error found inside the embedded snapshot to its offset in the backup file.
fn shifted(base: u64) -> impl Fn(FormatError) -> FormatError {
    move |e| match e {
        FormatError::Io { offset, source } => FormatError::Io {
            offset: offset.saturating_add(base),
            source,
        },
        FormatError::Corrupt { offset, what } => FormatError::Corrupt {
            offset: offset.saturating_add(base),
            what: format!("in the embedded snapshot: {what}"),
        },
    }
}

/// Reads a backup file as a stream of pairs, verifying each chunk as it arrives and the whole
/// file at the end. Every error's offset is a byte offset in the backup file. Holds one
/// chunk in memory.
pub struct BackupReader {
    header: BackupHeader,
    snapshot: SnapshotFileReader,
    base: u64,
}

impl BackupReader {
    /// Reads and checks the envelope, the embedded snapshot's header and its meta chunk.
    pub fn open(file: Box<dyn VfsFile>) -> Result<BackupReader, FormatError> {
        let header = read_envelope(file.as_ref())?;
        let base = header.snapshot_offset();
        let mut inner_head = [0u8; HEADER_BYTES as usize];
        if header.snapshot_bytes >= HEADER_BYTES {
            file.read_exact_at(&mut inner_head, base)
                .map_err(|source| FormatError::Io {
                    offset: base,
                    source,
                })?;
        }
        let window = Window {
            inner: file,
            base,
            len: header.snapshot_bytes,
        };
        let snapshot = SnapshotFileReader::open(Box::new(window)).map_err(shifted(base))?;
        let meta = snapshot.meta();
        if (meta.index, meta.term) != (header.index, header.term) {
            return Err(corrupt(
                base,
                format!(
                    "the embedded snapshot is at index {} term {}, the backup header says index {} term {}",
                    meta.index, meta.term, header.index, header.term
                ),
            ));
        }
        if u32_at(&inner_head, 60) != header.snapshot_header_crc {
            return Err(corrupt(
                base + 60,
                "the embedded snapshot's header is not the one the backup header names",
            ));
        }
        Ok(BackupReader {
            header,
            snapshot,
            base,
        })
    }

    /// The envelope.
    pub fn header(&self) -> &BackupHeader {
        &self.header
    }

    /// The embedded snapshot's header (counts checked only once the stream is finished).
    pub fn snapshot_header(&self) -> &SnapshotHeader {
        self.snapshot.header()
    }

    /// The snapshot's index, term and membership (of the cluster it was taken from).
    pub fn meta(&self) -> &SnapshotMeta {
        self.snapshot.meta()
    }

    /// The next pair, or `None` once the whole file has verified (see
    /// [`SnapshotFileReader::next_pair`]).
    pub fn next_pair(&mut self) -> Result<Option<PairRef<'_>>, FormatError> {
        let base = self.base;
        self.snapshot.next_pair().map_err(shifted(base))
    }

    /// Reads to the end, verifying everything; returns the number of pairs read by this call.
    pub fn verify_rest(&mut self) -> Result<u64, FormatError> {
        let base = self.base;
        self.snapshot.verify_rest().map_err(shifted(base))
    }
}

/// A backup failure.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("backup I/O on {path}: {cause}")]
    Io { path: PathBuf, cause: io::Error },
    /// The file (or the stream being saved) is damaged; the error says where.
    #[error("backup {path} is damaged: {damage}")]
    Damaged { path: PathBuf, damage: FormatError },
    #[error("invalid backup: {0}")]
    Invalid(String),
}

/// A backup file that was read to its end and verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedBackup {
    pub path: PathBuf,
    pub header: BackupHeader,
    pub snapshot: SnapshotHeader,
    pub meta: SnapshotMeta,
    /// User keys in the backup (the snapshot's `key_count` also counts session records).
    pub user_keys: u64,
}

impl VerifiedBackup {
    /// The backup file's length.
    pub fn file_bytes(&self) -> u64 {
        self.header.file_bytes()
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BackupError + '_ {
    move |cause| BackupError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

fn damaged(path: &Path) -> impl FnOnce(FormatError) -> BackupError + '_ {
    move |damage| BackupError::Damaged {
        path: path.to_path_buf(),
        damage,
    }
}

/// Opens a backup file for streaming; the envelope, snapshot header and meta chunk are checked.
pub fn open(vfs: &dyn Vfs, path: &Path) -> Result<BackupReader, BackupError> {
    let file = vfs.open_read(path).map_err(io_err(path))?;
    BackupReader::open(file).map_err(damaged(path))
}

/// Reads a whole backup file, verifying every byte; a damaged one is refused with the byte
/// offset (and chunk) of the first problem.
pub fn verify(vfs: &dyn Vfs, path: &Path) -> Result<VerifiedBackup, BackupError> {
    let mut reader = open(vfs, path)?;
    let version = reader.snapshot_header().version;
    let mut user_keys = 0u64;
    while let Some((key, _)) = reader.next_pair().map_err(damaged(path))? {
        if crate::sm::is_user_key(version, key) {
            user_keys += 1;
        }
    }
    Ok(VerifiedBackup {
        path: path.to_path_buf(),
        header: reader.header().clone(),
        snapshot: reader.snapshot_header().clone(),
        meta: reader.meta().clone(),
        user_keys,
    })
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes a backup from a snapshot file streamed in pieces (as `GET /snapshot` sends it):
/// into `FILE.part`, envelope last, then `sync_data`, a full verification read back from the
/// disk, a rename to `FILE` and a directory sync. Holds no more than the piece it is given.
/// Dropped before [`BackupWriter::finish`] succeeds, it removes `FILE.part`: no partial or
/// unverified `FILE` is ever visible.
pub struct BackupWriter {
    vfs: Arc<dyn Vfs>,
    path: PathBuf,
    part: PathBuf,
    file: Option<Box<dyn VfsFile>>,
    cluster_id: String,
    saved_at_unix_ms: u64,
    base: u64,
    written: u64,
    bytes_max: u64,
    /// The first bytes of the snapshot, until its header is complete.
    head: Vec<u8>,
    published: bool,
}

impl BackupWriter {
    /// Starts `path.part` (replacing one a crashed save left). At most `bytes_max` snapshot
    /// bytes are accepted.
    pub fn create(
        vfs: Arc<dyn Vfs>,
        path: &Path,
        cluster_id: &str,
        saved_at_unix_ms: u64,
        bytes_max: u64,
    ) -> Result<BackupWriter, BackupError> {
        check_cluster_id(cluster_id).map_err(BackupError::Invalid)?;
        let name = path
            .file_name()
            .ok_or_else(|| {
                BackupError::Invalid(format!("{} does not name a file", path.display()))
            })?
            .to_string_lossy();
        let part = parent_dir(path).join(format!("{name}{PART_SUFFIX}"));
        let file = vfs.open(&part, true).map_err(io_err(&part))?;
        let base = ENVELOPE_BYTES + cluster_id.len() as u64;
        let mut w = BackupWriter {
            vfs,
            path: path.to_path_buf(),
            part,
            file: None,
            cluster_id: cluster_id.to_string(),
            saved_at_unix_ms,
            base,
            written: 0,
            bytes_max,
            head: Vec::with_capacity(HEADER_BYTES as usize),
            published: false,
        };
        file.set_len(0).map_err(io_err(&w.part))?;
        file.write_all_at(&vec![0u8; base as usize], 0)
            .map_err(io_err(&w.part))?;
        w.file = Some(file);
        Ok(w)
    }

    /// The temporary file being written.
    pub fn part_path(&self) -> &Path {
        &self.part
    }

    /// Snapshot bytes written so far.
    pub fn written_bytes(&self) -> u64 {
        self.written
    }

    /// Appends the next piece of the snapshot file.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), BackupError> {
        let Some(file) = self.file.as_ref() else {
            return Err(BackupError::Invalid(
                "the backup writer failed earlier".into(),
            ));
        };
        let end = self.written.saturating_add(bytes.len() as u64);
        if end > self.bytes_max {
            return Err(BackupError::Damaged {
                path: self.part.clone(),
                damage: corrupt(
                    self.base.saturating_add(self.bytes_max),
                    format!(
                        "the snapshot stream is longer than the limit of {} bytes",
                        self.bytes_max
                    ),
                ),
            });
        }
        let want = (HEADER_BYTES as usize).saturating_sub(self.head.len());
        self.head.extend_from_slice(&bytes[..want.min(bytes.len())]);
        if let Err(e) = file.write_all_at(bytes, self.base + self.written) {
            self.file = None;
            return Err(io_err(&self.part)(e));
        }
        self.written = end;
        Ok(())
    }

    /// Writes the envelope, syncs, verifies the whole file as read back from the disk, then
    /// publishes it under its name (rename + directory sync).
    pub fn finish(mut self) -> Result<VerifiedBackup, BackupError> {
        let Some(file) = self.file.take() else {
            return Err(BackupError::Invalid(
                "the backup writer failed earlier".into(),
            ));
        };
        let head: [u8; HEADER_BYTES as usize] =
            self.head
                .as_slice()
                .try_into()
                .map_err(|_| BackupError::Damaged {
                    path: self.part.clone(),
                    damage: corrupt(
                        self.base + self.written,
                        format!(
                            "the snapshot stream ended after {} bytes, inside its header",
                            self.written
                        ),
                    ),
                })?;
        let inner = SnapshotHeader::decode(&head).map_err(|e| BackupError::Damaged {
            path: self.part.clone(),
            damage: shifted(self.base)(e),
        })?;
        let header = BackupHeader {
            cluster_id: self.cluster_id.clone(),
            index: inner.index,
            term: inner.term,
            snapshot_bytes: self.written,
            saved_at_unix_ms: self.saved_at_unix_ms,
            snapshot_header_crc: u32_at(&head, 60),
        };
        file.write_all_at(&header.encode(), 0)
            .map_err(io_err(&self.part))?;
        file.sync_data().map_err(io_err(&self.part))?;
        drop(file);
        let verified = verify(self.vfs.as_ref(), &self.part)?;
        assert_eq!(
            verified.header, header,
            "invariant: a verified backup reads back the header written"
        );
        self.vfs
            .rename(&self.part, &self.path)
            .map_err(io_err(&self.part))?;
        self.published = true;
        let dir = parent_dir(&self.path);
        self.vfs.sync_dir(dir).map_err(io_err(dir))?;
        Ok(VerifiedBackup {
            path: self.path.clone(),
            ..verified
        })
    }
}

impl Drop for BackupWriter {
    fn drop(&mut self) {
        if self.published {
            return;
        }
        self.file = None;
        if self.vfs.exists(&self.part) {
            if let Err(e) = self.vfs.remove_file(&self.part) {
                tracing::warn!(file = %self.part.display(), error = %e, "could not remove an unfinished backup");
            }
        }
    }
}

#[cfg(test)]
mod tests;
