//! [`CrashPointFs`]: a [`Vfs`] wrapper that lets exactly N mutating operations through and
//! then fails every operation, as if the process died right there.
//!
//! Crash tests run an operation once to count its mutating steps, then for every N from 0
//! to that count run it again on a fresh [`SimFs`](crate::vfs::SimFs) through a
//! `CrashPointFs` with budget N, [`crash`](crate::vfs::SimFs::crash) the disk, and check that
//! reopening gives a correct state. Mutating steps are file creation, writes, length changes,
//! `sync_data`, renames, removals and directory syncs; reads and listings are free.

use crate::vfs::{FileBytes, Vfs, VfsFile};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug)]
struct Budget {
    left: AtomicU64,
    used: AtomicU64,
}

impl Budget {
    fn spend(&self, what: &str) -> io::Result<()> {
        let taken = self
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        match taken {
            Ok(_) => {
                self.used.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            Err(_) => Err(io::Error::other(format!(
                "crash point reached before {what}"
            ))),
        }
    }
}

/// A file system that dies after a budget of mutating operations. See the module doc.
#[derive(Debug, Clone)]
pub struct CrashPointFs {
    inner: Arc<dyn Vfs>,
    budget: Arc<Budget>,
}

impl CrashPointFs {
    /// Wraps `inner`, allowing `mutations` mutating operations (`u64::MAX`: unlimited).
    pub fn new(inner: Arc<dyn Vfs>, mutations: u64) -> CrashPointFs {
        CrashPointFs {
            inner,
            budget: Arc::new(Budget {
                left: AtomicU64::new(mutations),
                used: AtomicU64::new(0),
            }),
        }
    }

    /// Mutating operations that went through so far.
    pub fn mutations_used(&self) -> u64 {
        self.budget.used.load(Ordering::SeqCst)
    }
}

struct CrashPointFile {
    inner: Box<dyn VfsFile>,
    budget: Arc<Budget>,
}

impl VfsFile for CrashPointFile {
    fn size_bytes(&self) -> io::Result<u64> {
        self.inner.size_bytes()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.budget.spend("write")?;
        self.inner.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.budget.spend("sync_data")?;
        self.inner.sync_data()
    }
    fn allocate(&self, len_bytes: u64) -> io::Result<()> {
        self.budget.spend("allocate")?;
        self.inner.allocate(len_bytes)
    }
    fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        self.budget.spend("set_len")?;
        self.inner.set_len(len_bytes)
    }
    fn map(&self) -> io::Result<FileBytes> {
        self.inner.map()
    }
}

impl Vfs for CrashPointFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.create_dir_all(dir)
    }
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.inner.list_dir(dir)
    }
    fn exists(&self, path: &Path) -> bool {
        self.inner.exists(path)
    }
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn VfsFile>> {
        if create && !self.inner.exists(path) {
            self.budget.spend("create")?;
        }
        Ok(Box::new(CrashPointFile {
            inner: self.inner.open(path, create)?,
            budget: self.budget.clone(),
        }))
    }
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn VfsFile>> {
        Ok(Box::new(CrashPointFile {
            inner: self.inner.open_read(path)?,
            budget: self.budget.clone(),
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.budget.spend("rename")?;
        self.inner.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.budget.spend("remove")?;
        self.inner.remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.budget.spend("sync_dir")?;
        self.inner.sync_dir(dir)
    }
}
