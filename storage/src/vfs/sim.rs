//! [`SimFs`]: an in-memory disk that fails on command and loses unsynced data on a crash.
//!
//! Each file keeps its durable image and the list of operations since its last successful
//! `sync_data`; the namespace keeps a durable copy per directory, refreshed by `sync_dir`.
//! [`SimFs::crash`] reverts everything to the durable state; [`SimFs::crash_torn`] also keeps
//! a seeded-random prefix of each file's unsynced writes, the last of them cut at a random
//! byte — the torn tail a power cut leaves. Handles opened before a crash fail afterwards.
//!
//! Faults are armed with [`SimFs::fail_after`]: the Nth matching operation from now fails.

use super::{FileBytes, Vfs, VfsFile};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// A fault to inject into the next matching operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `write_all_at` fails and writes nothing.
    WriteError,
    /// `write_all_at` writes the first half of its buffer, then fails.
    ShortWrite,
    /// `sync_data` fails; the unsynced writes are dropped, as a kernel may do.
    SyncError,
}

#[derive(Clone, Debug)]
enum PendingOp {
    Write { offset: u64, bytes: Vec<u8> },
    SetLen(u64),
}

#[derive(Clone, Debug, Default)]
struct Inode {
    data: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<PendingOp>,
}

#[derive(Debug, Default)]
struct State {
    inodes: BTreeMap<u64, Inode>,
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    next_inode: u64,
    generation: u64,
    armed: Vec<(Fault, u64)>,
    /// A power cut armed for the n-th sync from now: (countdown, torn-write seed).
    power_cut: Option<(u64, u64)>,
    /// How many armed power cuts have happened.
    power_cuts: u64,
    /// Open handles per inode: as on POSIX, a removed file stays readable through a handle
    /// opened before (a snapshot streamed while a newer one replaces it).
    open: BTreeMap<u64, usize>,
    syncs: u64,
    writes: u64,
}

/// An in-memory, crash-able, fault-injecting file system. Clones share one disk.
#[derive(Clone, Debug, Default)]
pub struct SimFs {
    state: Arc<Mutex<State>>,
}

fn apply(data: &mut Vec<u8>, op: &PendingOp) {
    match op {
        PendingOp::Write { offset, bytes } => {
            let start = *offset as usize;
            let end = start + bytes.len();
            if data.len() < end {
                data.resize(end, 0);
            }
            data[start..end].copy_from_slice(bytes);
        }
        PendingOp::SetLen(len) => data.resize(*len as usize, 0),
    }
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SimFs {
    /// A new, empty disk.
    pub fn new() -> SimFs {
        SimFs::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock only happens in a failing test; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Arms `fault` to fire on the `nth` (1-based) matching operation from now.
    pub fn fail_after(&self, fault: Fault, nth: u64) {
        assert!(nth >= 1, "fail_after counts from 1");
        self.lock().armed.push((fault, nth));
    }

    /// Arms a power cut at the `nth` (1-based) `sync_data` or `sync_dir` from now: that call
    /// does not happen; the disk becomes what [`crash_torn`](Self::crash_torn) with `seed`
    /// leaves (a random prefix of the unsynced writes survives), the call fails, and every
    /// handle opened before goes stale. This is a crash inside the unsynced window of
    /// whatever was being made durable.
    pub fn cut_power_at_sync(&self, nth: u64, seed: u64) {
        assert!(nth >= 1, "cut_power_at_sync counts from 1");
        self.lock().power_cut = Some((nth, seed));
    }

    /// Disarms a power cut that has not happened yet.
    pub fn cancel_power_cut(&self) {
        self.lock().power_cut = None;
    }

    /// How many armed power cuts have happened so far.
    pub fn power_cuts(&self) -> u64 {
        self.lock().power_cuts
    }

    /// Counts one sync against an armed power cut; performs the cut when it is due.
    fn sync_point(&self) -> io::Result<()> {
        let seed = {
            let mut st = self.lock();
            let Some((countdown, seed)) = st.power_cut else {
                return Ok(());
            };
            if countdown > 1 {
                st.power_cut = Some((countdown - 1, seed));
                return Ok(());
            }
            st.power_cut = None;
            st.power_cuts += 1;
            seed
        };
        self.crash_inner(Some(seed));
        Err(io::Error::other("simfs: power cut"))
    }

    /// Disarms every pending fault.
    pub fn clear_faults(&self) {
        self.lock().armed.clear();
    }

    /// How many `sync_data` calls have succeeded so far.
    pub fn sync_count(&self) -> u64 {
        self.lock().syncs
    }

    /// How many `write_all_at` calls have succeeded so far.
    pub fn write_count(&self) -> u64 {
        self.lock().writes
    }

    /// Power cut: every unsynced write and every unsynced directory change is lost.
    pub fn crash(&self) {
        self.crash_inner(None);
    }

    /// Power cut that keeps a random prefix of each file's unsynced writes, the last one
    /// torn at a random byte. The same seed on the same history gives the same disk.
    pub fn crash_torn(&self, seed: u64) {
        self.crash_inner(Some(seed));
    }

    fn crash_inner(&self, seed: Option<u64>) {
        let mut st = self.lock();
        let mut rng = seed.unwrap_or(0);
        st.generation += 1;
        // Every handle is stale now (the process that held them is gone).
        st.open.clear();
        st.names = st.durable_names.clone();
        let live: Vec<u64> = st.names.values().copied().collect();
        st.inodes.retain(|ino, _| live.contains(ino));
        for inode in st.inodes.values_mut() {
            let mut data = inode.durable.clone();
            if seed.is_some() && !inode.pending.is_empty() {
                let keep = (splitmix(&mut rng) % (inode.pending.len() as u64 + 1)) as usize;
                for (i, op) in inode.pending.iter().take(keep).enumerate() {
                    match op {
                        PendingOp::Write { offset, bytes } if i + 1 == keep => {
                            let cut = (splitmix(&mut rng) % (bytes.len() as u64 + 1)) as usize;
                            apply(
                                &mut data,
                                &PendingOp::Write {
                                    offset: *offset,
                                    bytes: bytes[..cut].to_vec(),
                                },
                            );
                        }
                        op => apply(&mut data, op),
                    }
                }
            }
            inode.data = data.clone();
            inode.durable = data;
            inode.pending.clear();
        }
    }

    /// Reads a file's current contents (for tests that corrupt or inspect files).
    pub fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let st = self.lock();
        let ino = st.names.get(path).ok_or_else(not_found)?;
        Ok(st.inodes[ino].data.clone())
    }

    /// Overwrites a file's contents durably, bypassing the write path (for corruption tests).
    pub fn overwrite(&self, path: &Path, bytes: Vec<u8>) -> io::Result<()> {
        let mut st = self.lock();
        let ino = *st.names.get(path).ok_or_else(not_found)?;
        let inode = st.inodes.get_mut(&ino).ok_or_else(not_found)?;
        inode.data = bytes.clone();
        inode.durable = bytes;
        inode.pending.clear();
        Ok(())
    }

    fn take_fault(st: &mut State, matches: impl Fn(Fault) -> bool) -> Option<Fault> {
        let mut fired = None;
        for (fault, countdown) in st.armed.iter_mut() {
            if matches(*fault) && fired.is_none() {
                *countdown -= 1;
                if *countdown == 0 {
                    fired = Some(*fault);
                }
            }
        }
        st.armed.retain(|(_, c)| *c > 0);
        fired
    }
}

fn not_found() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "simfs: no such file")
}

fn injected(what: &str) -> io::Error {
    io::Error::other(format!("simfs: injected {what} failure"))
}

struct SimFile {
    fs: SimFs,
    inode: u64,
    generation: u64,
    writable: bool,
}

impl Drop for SimFile {
    fn drop(&mut self) {
        let mut st = self.fs.lock();
        if st.generation != self.generation {
            return;
        }
        if let Some(count) = st.open.get_mut(&self.inode) {
            *count -= 1;
            if *count == 0 {
                st.open.remove(&self.inode);
            }
        }
    }
}

impl SimFile {
    fn with<T>(&self, f: impl FnOnce(&mut State, u64) -> io::Result<T>) -> io::Result<T> {
        let mut st = self.fs.lock();
        if st.generation != self.generation || !st.inodes.contains_key(&self.inode) {
            return Err(io::Error::other("simfs: stale handle (crashed or removed)"));
        }
        f(&mut st, self.inode)
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "simfs: read-only handle",
            ))
        }
    }
}

impl VfsFile for SimFile {
    fn size_bytes(&self) -> io::Result<u64> {
        self.with(|st, ino| Ok(st.inodes[&ino].data.len() as u64))
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.with(|st, ino| {
            let data = &st.inodes[&ino].data;
            let start = offset as usize;
            let end = start.saturating_add(buf.len());
            if end > data.len() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "simfs: read past end",
                ));
            }
            buf.copy_from_slice(&data[start..end]);
            Ok(())
        })
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        self.with(|st, ino| {
            let fault = SimFs::take_fault(st, |f| f != Fault::SyncError);
            let bytes = match fault {
                Some(Fault::WriteError) => return Err(injected("write")),
                Some(Fault::ShortWrite) => buf[..buf.len() / 2].to_vec(),
                _ => buf.to_vec(),
            };
            let op = PendingOp::Write { offset, bytes };
            let inode = st.inodes.get_mut(&ino).ok_or_else(not_found)?;
            apply(&mut inode.data, &op);
            inode.pending.push(op);
            if fault.is_some() {
                return Err(injected("short write"));
            }
            st.writes += 1;
            Ok(())
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.with(|_, _| Ok(()))?;
        self.fs.sync_point()?;
        self.with(|st, ino| {
            let fault = SimFs::take_fault(st, |f| f == Fault::SyncError);
            let inode = st.inodes.get_mut(&ino).ok_or_else(not_found)?;
            if fault.is_some() {
                // The kernel may drop dirty pages on a failed fsync: so do we.
                inode.data = inode.durable.clone();
                inode.pending.clear();
                return Err(injected("fsync"));
            }
            inode.durable = inode.data.clone();
            inode.pending.clear();
            st.syncs += 1;
            Ok(())
        })
    }

    fn allocate(&self, len_bytes: u64) -> io::Result<()> {
        self.check_writable()?;
        self.with(|st, ino| {
            let inode = st.inodes.get_mut(&ino).ok_or_else(not_found)?;
            if (inode.data.len() as u64) < len_bytes {
                let op = PendingOp::SetLen(len_bytes);
                apply(&mut inode.data, &op);
                inode.pending.push(op);
            }
            Ok(())
        })
    }

    fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        self.check_writable()?;
        self.with(|st, ino| {
            let inode = st.inodes.get_mut(&ino).ok_or_else(not_found)?;
            let op = PendingOp::SetLen(len_bytes);
            apply(&mut inode.data, &op);
            inode.pending.push(op);
            Ok(())
        })
    }

    fn map(&self) -> io::Result<FileBytes> {
        self.with(|st, ino| Ok(FileBytes::Owned(st.inodes[&ino].data.clone())))
    }
}

impl Vfs for SimFs {
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        // Directories are implicit in the simulated namespace.
        Ok(())
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let st = self.lock();
        let mut names: Vec<String> = st
            .names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    fn exists(&self, path: &Path) -> bool {
        self.lock().names.contains_key(path)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn VfsFile>> {
        let mut st = self.lock();
        let inode = match st.names.get(path) {
            Some(ino) => *ino,
            None if create => {
                st.next_inode += 1;
                let ino = st.next_inode;
                st.inodes.insert(ino, Inode::default());
                st.names.insert(path.to_path_buf(), ino);
                ino
            }
            None => return Err(not_found()),
        };
        *st.open.entry(inode).or_default() += 1;
        Ok(Box::new(SimFile {
            fs: self.clone(),
            inode,
            generation: st.generation,
            writable: true,
        }))
    }

    fn open_read(&self, path: &Path) -> io::Result<Box<dyn VfsFile>> {
        let mut st = self.lock();
        let inode = *st.names.get(path).ok_or_else(not_found)?;
        *st.open.entry(inode).or_default() += 1;
        Ok(Box::new(SimFile {
            fs: self.clone(),
            inode,
            generation: st.generation,
            writable: false,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.lock();
        let ino = st.names.remove(from).ok_or_else(not_found)?;
        st.names.insert(to.to_path_buf(), ino);
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut st = self.lock();
        st.names.remove(path).ok_or_else(not_found)?;
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.sync_point()?;
        let mut st = self.lock();
        st.durable_names.retain(|p, _| p.parent() != Some(dir));
        let live: Vec<(PathBuf, u64)> = st
            .names
            .iter()
            .filter(|(p, _)| p.parent() == Some(dir))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        st.durable_names.extend(live);
        // Drop inodes no name (live or durable) refers to any more.
        let referenced: Vec<u64> = st
            .names
            .values()
            .chain(st.durable_names.values())
            .copied()
            .collect();
        let open = std::mem::take(&mut st.open);
        st.inodes
            .retain(|ino, _| referenced.contains(ino) || open.contains_key(ino));
        st.open = open;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_power_cut_at_a_sync_keeps_only_what_was_durable_before_it_and_a_torn_prefix() {
        let fs = SimFs::new();
        let dir = Path::new("/d");
        let a = fs.open(&dir.join("a"), true).unwrap();
        a.write_all_at(b"one", 0).unwrap();
        a.sync_data().unwrap();
        fs.sync_dir(dir).unwrap();
        fs.cut_power_at_sync(2, 7);
        a.write_all_at(b"two", 3).unwrap();
        a.sync_data().unwrap(); // the first sync from now happens
        a.write_all_at(b"three", 6).unwrap();
        assert!(a.sync_data().is_err(), "the second one is the cut");
        assert_eq!(fs.power_cuts(), 1);
        assert!(
            a.size_bytes().is_err(),
            "handles from before the cut are stale"
        );
        let after = fs.read(&dir.join("a")).unwrap();
        assert!(after.starts_with(b"onetwo"), "{after:?}");
        assert!(
            b"onetwothree".starts_with(&after[..]),
            "a prefix survives: {after:?}"
        );
        // The disk works again (a restarted process opens it).
        let b = fs.open(&dir.join("a"), false).unwrap();
        b.sync_data().unwrap();
    }

    #[test]
    fn crash_drops_unsynced_writes_and_names() {
        let fs = SimFs::new();
        let dir = Path::new("/d");
        let a = fs.open(&dir.join("a"), true).unwrap();
        a.write_all_at(b"durable", 0).unwrap();
        a.sync_data().unwrap();
        fs.sync_dir(dir).unwrap();
        a.write_all_at(b"lost", 7).unwrap();
        let b = fs.open(&dir.join("b"), true).unwrap();
        b.write_all_at(b"x", 0).unwrap();
        b.sync_data().unwrap(); // data synced, but its name never was
        fs.crash();
        assert_eq!(fs.read(&dir.join("a")).unwrap(), b"durable");
        assert!(!fs.exists(&dir.join("b")));
        assert!(
            a.size_bytes().is_err(),
            "handles from before a crash are stale"
        );
    }

    #[test]
    fn faults_fire_once_on_the_nth_matching_op() {
        let fs = SimFs::new();
        let f = fs.open(Path::new("/d/f"), true).unwrap();
        fs.fail_after(Fault::WriteError, 2);
        f.write_all_at(b"1", 0).unwrap();
        assert!(f.write_all_at(b"2", 1).is_err());
        f.write_all_at(b"3", 1).unwrap();
        fs.fail_after(Fault::SyncError, 1);
        assert!(f.sync_data().is_err());
        assert_eq!(f.size_bytes().unwrap(), 0, "failed fsync drops dirty data");
    }

    #[test]
    fn torn_crash_is_deterministic() {
        let run = |seed| {
            let fs = SimFs::new();
            let f = fs.open(Path::new("/d/f"), true).unwrap();
            f.sync_data().unwrap();
            fs.sync_dir(Path::new("/d")).unwrap();
            for i in 0..10u8 {
                f.write_all_at(&[i + 1; 100], u64::from(i) * 100).unwrap();
            }
            fs.crash_torn(seed);
            fs.read(Path::new("/d/f")).unwrap()
        };
        assert_eq!(run(7), run(7));
        assert!(
            (0..20).any(|s| run(s).len() % 100 != 0),
            "some crash tears a write"
        );
    }
}
