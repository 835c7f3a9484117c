//! [`StdFs`]: the real file system, through `std::fs` plus `fallocate` and `mmap`.

use super::{FileBytes, Vfs, VfsFile};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The operating system's file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdFs;

struct StdFile {
    file: File,
}

impl VfsFile for StdFile {
    fn size_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        start_writeback(&self.file, offset, len)
    }

    fn allocate(&self, len_bytes: u64) -> io::Result<()> {
        allocate(&self.file, len_bytes)
    }

    fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        self.file.set_len(len_bytes)
    }

    fn map(&self) -> io::Result<FileBytes> {
        if self.size_bytes()? == 0 {
            return Ok(FileBytes::Owned(Vec::new()));
        }
        // SAFETY: raftkv maps only files it no longer writes (sealed WAL segments, snapshot
        // files, or files opened by read-only tools). Another process truncating the file
        // under us would fault; the data directory is owned by one node process.
        let map = unsafe { memmap2::Mmap::map(&self.file)? };
        Ok(FileBytes::Mapped(map))
    }
}

#[cfg(target_os = "linux")]
fn allocate(file: &File, len_bytes: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(len_bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "allocation too large"))?;
    // SAFETY: plain syscall on a valid, owned descriptor.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        // File systems without fallocate: fall back to a sparse extension.
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => extend(file, len_bytes),
        _ => Err(err),
    }
}

#[cfg(not(target_os = "linux"))]
fn allocate(file: &File, len_bytes: u64) -> io::Result<()> {
    extend(file, len_bytes)
}

#[cfg(target_os = "linux")]
fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (
        libc::off64_t::try_from(offset),
        libc::off64_t::try_from(len),
    ) else {
        return Ok(()); // only a hint
    };
    // SAFETY: plain syscall on a valid, owned descriptor; it only starts writeback.
    let rc = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _offset: u64, _len: u64) -> io::Result<()> {
    Ok(())
}

fn extend(file: &File, len_bytes: u64) -> io::Result<()> {
    if file.metadata()?.len() < len_bytes {
        file.set_len(len_bytes)?;
    }
    Ok(())
}

impl Vfs for StdFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                if let Some(name) = entry.file_name().to_str() {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn VfsFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)?;
        Ok(Box::new(StdFile { file }))
    }

    fn open_read(&self, path: &Path) -> io::Result<Box<dyn VfsFile>> {
        let file = File::open(path)?;
        Ok(Box::new(StdFile { file }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Releasing a mapping's pages is only advice: the bytes read back the same, written
    /// data included.
    #[test]
    fn released_pages_read_back_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segment");
        let file = StdFs.open(&path, true).unwrap();
        let data: Vec<u8> = (0..3 * 4096 + 17).map(|i| (i * 31 % 251) as u8).collect();
        file.write_all_at(&data, 0).unwrap();
        file.sync_data().unwrap();
        let map = file.map().unwrap();
        assert!(matches!(map, FileBytes::Mapped(_)));
        assert_eq!(&map[..], &data[..]);
        map.release_pages();
        assert_eq!(&map[..], &data[..], "read back after the release");
        map.release_pages();
        assert_eq!(map[4096 + 5], data[4096 + 5]);
    }
}
