//! The file-system layer under the WAL and snapshot files.
//!
//! Everything durable goes through the [`Vfs`] and [`VfsFile`] traits rather than `std::fs`, for
//! one reason: tests must be able to make the disk misbehave. [`StdFs`] is the real thing;
//! [`SimFs`] is an in-memory disk that can fail a write, tear it short, fail an fsync, and
//! *crash* — dropping every byte and every directory change that was not made durable by
//! `sync_data`/`sync_dir`, optionally keeping a torn prefix of the unsynced writes. The crash
//! tests of the WAL, the state machine and the Raft simulator all stand on it.
//!
//! The contract mirrors POSIX as raftkv relies on it:
//! - `write_at` is not durable until `sync_data` on that file returns `Ok`.
//! - creating, renaming and removing a file is not durable until `sync_dir` on its directory.
//! - after a failed `sync_data`, the file's unsynced contents are unknown (the kernel may have
//!   dropped the dirty pages): callers must treat the file as lost, never retry the sync.

mod sim;
mod std_fs;

pub use sim::{Fault, SimFs};
pub use std_fs::StdFs;

use std::io;
use std::ops::Deref;
use std::path::{Path, PathBuf};

/// The whole contents of a file, memory-mapped where the file system allows it.
pub enum FileBytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(map) => map,
            FileBytes::Owned(bytes) => bytes,
        }
    }
}

impl FileBytes {
    /// Lets go of the pages of a mapped file that this process touched (reading it whole, as
    /// the WAL's open-time scan does), so they stop counting in its resident memory. They stay
    /// in the kernel's page cache; a later read faults them back in. Errors are ignored: this
    /// is only advice.
    pub fn release_pages(&self) {
        if let FileBytes::Mapped(map) = self {
            // SAFETY: the mapping is read-only and shared (`Mmap::map` of a file opened for
            // reading): MADV_DONTNEED only drops this process's page-table entries, and the
            // next access reads the same bytes back from the page cache or the file. No
            // private or written page is discarded.
            let _ = unsafe { map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
    }
}

impl std::fmt::Debug for FileBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileBytes({} bytes)", self.len())
    }
}

/// An open file: positioned reads and writes only, so no hidden cursor state.
pub trait VfsFile: Send + Sync {
    /// The file's current length in bytes.
    fn size_bytes(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`; a read past the end is an `UnexpectedEof` error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// A hint, not a durability point: start writing `len` bytes from `offset` back to disk
    /// now, without waiting (Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)`), so a later
    /// `sync_data` of a large file has little left to do. The default does nothing.
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Reserves `len_bytes` of zeroed space (fallocate), so later appends need no block
    /// allocation; never shrinks the file.
    fn allocate(&self, len_bytes: u64) -> io::Result<()>;
    /// Sets the file's length (truncates or zero-extends).
    fn set_len(&self, len_bytes: u64) -> io::Result<()>;
    /// The whole file as bytes: an mmap for real files. Later writes may or may not show
    /// through, so callers map only files they no longer write.
    fn map(&self) -> io::Result<FileBytes>;
}

/// A file system: the operations the WAL and snapshots need, and no more.
pub trait Vfs: Send + Sync + std::fmt::Debug {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// The names of the regular files in `dir`, sorted.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    fn exists(&self, path: &Path) -> bool;
    /// Opens for reading and writing; `create` makes it if it does not exist.
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn VfsFile>>;
    /// Opens read-only.
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn VfsFile>>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Makes creations, renames and removals in `dir` durable (fsync of the directory).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// `dir/name` as a path.
pub fn join(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Writes `bytes` to `dir/name` atomically and durably: temp file, fsync, rename, dir fsync.
pub fn write_file_atomic(vfs: &dyn Vfs, dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let file = vfs.open(&tmp, true)?;
    file.set_len(0)?;
    file.write_all_at(bytes, 0)?;
    file.sync_data()?;
    drop(file);
    vfs.rename(&tmp, &dir.join(name))?;
    vfs.sync_dir(dir)
}
