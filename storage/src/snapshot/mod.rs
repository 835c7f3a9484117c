//! Snapshot files: a full, consistent image of the state machine at one applied index, for a
//! follower that fell behind the purged log and for backups.
//!
//! Files live in `<data-dir>/snap/` as `<term:016x>-<index:016x>.snap` in the format of
//! [`format`]. All file I/O goes through [`Vfs`] so the simulated disk can crash it.
//!
//! Creating one ([`SnapshotStore::create`]):
//! 1. open a [`SnapshotView`](crate::sm::SnapshotView) at applied index `S` (applies pause for
//!    the few microseconds this takes, then continue: see `sm::cow`);
//! 2. stream its pairs into `<name>.tmp` chunk by chunk, header last: the walk over sled runs
//!    on its own thread and hands blocks of pairs (at most 8 × 1 MiB in flight) to the writer,
//!    which frames, checksums, writes and `sync_data`s every 16 MiB, so the walk and the disk
//!    overlap;
//! 3. `sync_data` the temp file, rename it to `<name>`, `sync_dir` the directory;
//! 4. delete all but the `keep` newest snapshot files (default 2), `sync_dir`.
//!
//! A crash before step 3's directory sync leaves at most a `.tmp` file (removed on open) or
//! an older set of snapshots; never a half-written `.snap`.
//!
//! Reading verifies every chunk as it streams and the whole file at the end; installing
//! ([`SnapshotStore::install`]) builds a fresh sled tree while it reads and swaps it in only
//! once the whole file has verified. A file that fails verification during recovery is renamed
//! `<name>.broken` and the next older one is tried ([`SnapshotStore::restore_newest`]).

pub mod backup;
pub mod format;
pub mod transfer;

use crate::sm::{SmError, StateMachine};
use crate::types::SnapshotMeta;
use crate::vfs::Vfs;
use format::{FormatError, SnapshotFileReader, SnapshotFileWriter, SnapshotHeader};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The directory under a data dir that holds snapshot files.
pub const SNAP_DIR_NAME: &str = "snap";
/// Pairs handed from the snapshot walk to the file writer at a time (bytes of keys + values).
const WALK_BLOCK_BYTES: usize = 1 << 20;
/// Blocks in flight between the walk and the writer.
const WALK_BLOCKS_IN_FLIGHT: usize = 8;

type PairBlock = Vec<(Vec<u8>, sled::IVec)>;

/// How many snapshot files are kept by default.
pub const KEEP_DEFAULT: usize = 2;

/// Tuning of snapshot files.
#[derive(Clone, Debug)]
pub struct SnapshotOptions {
    /// How many of the newest snapshot files to keep (at least 1).
    pub keep: usize,
    /// The size at which a pairs chunk is closed.
    pub chunk_target_bytes: usize,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        SnapshotOptions {
            keep: KEEP_DEFAULT,
            chunk_target_bytes: format::CHUNK_TARGET_BYTES_DEFAULT,
        }
    }
}

/// A snapshot-file failure.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot {path}: {source}")]
    Format {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    #[error(transparent)]
    Sm(#[from] SmError),
}

/// A snapshot file found in the directory (from its name; not yet read).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotFile {
    pub name: String,
    pub path: PathBuf,
    pub index: u64,
    pub term: u64,
}

/// A snapshot file whose contents were read and verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedSnapshot {
    pub file: SnapshotFile,
    pub meta: SnapshotMeta,
    pub header: SnapshotHeader,
}

/// What creating a snapshot did and how long its parts took.
#[derive(Clone, Debug)]
pub struct CreatedSnapshot {
    pub file: SnapshotFile,
    pub meta: SnapshotMeta,
    pub header: SnapshotHeader,
    /// How long opening the consistent view held applies off (the apply stall).
    pub view_open: Duration,
    /// Streaming the pairs into the temp file.
    pub copy: Duration,
    /// `sync_data`, rename and directory sync.
    pub sync: Duration,
    /// Keys that applies changed during the copy and saved in the side table.
    pub saved_keys: usize,
}

/// The `snap/` directory of one node.
#[derive(Debug)]
pub struct SnapshotStore {
    vfs: Arc<dyn Vfs>,
    dir: PathBuf,
    opts: SnapshotOptions,
    /// Held while a file is created: two creations at the same applied index (two followers
    /// and a backup at once) would otherwise write the same temp file.
    creating: std::sync::Mutex<()>,
}

/// The file name of the snapshot at (`index`, `term`).
pub fn file_name(index: u64, term: u64) -> String {
    format!("{term:016x}-{index:016x}.snap")
}

/// Parses a snapshot file name into (index, term).
pub fn parse_file_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".snap")?;
    let (term, index) = stem.split_once('-')?;
    let hex = |s: &str| {
        if s.len() == 16
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            u64::from_str_radix(s, 16).ok()
        } else {
            None
        }
    };
    Some((hex(index)?, hex(term)?))
}

impl SnapshotStore {
    /// Opens `<data_dir>/snap/`, creating it, removes temp files a crash left behind and any
    /// snapshot beyond the `keep` newest (a crash can land between publish and retain).
    pub fn open(
        vfs: Arc<dyn Vfs>,
        data_dir: &Path,
        opts: SnapshotOptions,
    ) -> Result<SnapshotStore, SnapshotError> {
        let dir = data_dir.join(SNAP_DIR_NAME);
        let io = |source| SnapshotError::Io {
            path: dir.clone(),
            source,
        };
        vfs.create_dir_all(&dir).map_err(io)?;
        let mut removed = false;
        for name in vfs.list_dir(&dir).map_err(io)? {
            if name.ends_with(".snap.tmp") {
                tracing::info!(file = %name, "removing a snapshot temp file left by a crash");
                vfs.remove_file(&dir.join(&name)).map_err(io)?;
                removed = true;
            }
        }
        if removed {
            vfs.sync_dir(&dir).map_err(io)?;
        }
        let store = SnapshotStore {
            vfs,
            dir,
            opts: SnapshotOptions {
                keep: opts.keep.max(1),
                ..opts
            },
            creating: std::sync::Mutex::new(()),
        };
        // A crash between publishing a new file and deleting the oldest leaves `keep + 1`
        // complete files; finish that step now so the set is bounded after every restart.
        store.retain()?;
        store.set_aside_corrupt()?;
        Ok(store)
    }

    /// Verifies every snapshot file and renames each damaged one `.broken`, loudly: a corrupt
    /// file is reported when the node starts, not when it is first needed, and is never
    /// restored or served. Returns the names set aside.
    pub fn set_aside_corrupt(&self) -> Result<Vec<String>, SnapshotError> {
        let mut set_aside = Vec::new();
        for file in self.list()? {
            match self.verify(&file) {
                Ok(verified) => {
                    debug_assert_eq!(verified.meta.index, file.index);
                }
                Err(SnapshotError::Format { path, source }) => {
                    tracing::error!(file = %path.display(), error = %source, "snapshot file is corrupt; renamed .broken, it will never be restored or sent");
                    self.mark_broken(&file)?;
                    set_aside.push(file.name);
                }
                Err(other) => return Err(other),
            }
        }
        Ok(set_aside)
    }

    /// The `snap/` directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
        move |source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Snapshot files, oldest first (by index, then term).
    pub fn list(&self) -> Result<Vec<SnapshotFile>, SnapshotError> {
        let mut files: Vec<SnapshotFile> = self
            .vfs
            .list_dir(&self.dir)
            .map_err(Self::io_err(&self.dir))?
            .into_iter()
            .filter_map(|name| {
                let (index, term) = parse_file_name(&name)?;
                Some(SnapshotFile {
                    path: self.dir.join(&name),
                    name,
                    index,
                    term,
                })
            })
            .collect();
        files.sort_by_key(|f| (f.index, f.term));
        Ok(files)
    }

    /// Opens a file's reader with its header and meta chunk checked, not its name.
    fn open_reader_unchecked(
        &self,
        file: &SnapshotFile,
    ) -> Result<SnapshotFileReader, SnapshotError> {
        let handle = self
            .vfs
            .open_read(&file.path)
            .map_err(Self::io_err(&file.path))?;
        SnapshotFileReader::open(handle).map_err(|source| SnapshotError::Format {
            path: file.path.clone(),
            source,
        })
    }

    /// Opens a snapshot file for streaming; the header and meta chunk are checked.
    pub fn open_reader(&self, file: &SnapshotFile) -> Result<SnapshotFileReader, SnapshotError> {
        let reader = self.open_reader_unchecked(file)?;
        if (reader.meta().index, reader.meta().term) != (file.index, file.term) {
            return Err(SnapshotError::Format {
                path: file.path.clone(),
                source: FormatError::Corrupt {
                    offset: 0,
                    what: format!(
                        "contents are at index {} term {}, the name says index {} term {}",
                        reader.meta().index,
                        reader.meta().term,
                        file.index,
                        file.term
                    ),
                },
            });
        }
        Ok(reader)
    }

    /// Reads the whole file, verifying every chunk and the whole.
    pub fn verify(&self, file: &SnapshotFile) -> Result<VerifiedSnapshot, SnapshotError> {
        let mut reader = self.open_reader(file)?;
        reader
            .verify_rest()
            .map_err(|source| SnapshotError::Format {
                path: file.path.clone(),
                source,
            })?;
        Ok(VerifiedSnapshot {
            file: file.clone(),
            meta: reader.meta().clone(),
            header: reader.header().clone(),
        })
    }

    /// Writes a snapshot of `sm` at its current applied index (see the module doc for the
    /// steps), then keeps only the newest `keep` files.
    pub fn create(&self, sm: &StateMachine) -> Result<CreatedSnapshot, SnapshotError> {
        // A panic while creating leaves nothing the next creation cannot overwrite.
        let _creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        let started = Instant::now();
        let view = sm.begin_snapshot()?;
        let view_open = started.elapsed();
        let meta = view.meta().clone();
        let name = file_name(meta.index, meta.term);
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let copy_started = Instant::now();
        let written = (|| -> Result<(SnapshotHeader, usize), SnapshotError> {
            let handle = self.vfs.open(&tmp, true).map_err(Self::io_err(&tmp))?;
            let mut writer =
                SnapshotFileWriter::new(handle, meta.clone(), self.opts.chunk_target_bytes)
                    .map_err(Self::io_err(&tmp))?;
            // The walk runs on its own thread, handing blocks of pairs to this one, which
            // frames, checksums and writes them: walking sled and writing the file overlap.
            // At most WALK_BLOCKS_IN_FLIGHT blocks of about WALK_BLOCK_BYTES are in memory.
            std::thread::scope(|scope| -> Result<(), SnapshotError> {
                let (tx, rx) = std::sync::mpsc::sync_channel::<Result<PairBlock, SmError>>(
                    WALK_BLOCKS_IN_FLIGHT,
                );
                let view = &view;
                scope.spawn(move || {
                    let mut block = PairBlock::new();
                    let mut block_bytes = 0usize;
                    for pair in view.pairs() {
                        match pair {
                            Ok((key, value)) => {
                                block_bytes += key.len() + value.len();
                                block.push((key, value));
                                if block_bytes >= WALK_BLOCK_BYTES {
                                    if tx.send(Ok(std::mem::take(&mut block))).is_err() {
                                        return;
                                    }
                                    block_bytes = 0;
                                }
                            }
                            Err(e) => {
                                // The receiver may be gone already; then nobody needs it.
                                let _ = tx.send(Err(e));
                                return;
                            }
                        }
                    }
                    if !block.is_empty() {
                        let _ = tx.send(Ok(block));
                    }
                });
                for block in rx {
                    for (key, value) in block? {
                        writer.push(&key, &value).map_err(Self::io_err(&tmp))?;
                    }
                }
                Ok(())
            })?;
            let saved_keys = view.saved_keys();
            drop(view);
            let header = writer.finish().map_err(Self::io_err(&tmp))?;
            Ok((header, saved_keys))
        })();
        let (header, saved_keys) = match written {
            Ok(w) => w,
            Err(e) => {
                if let Err(rm) = self.vfs.remove_file(&tmp) {
                    tracing::warn!(file = %tmp.display(), error = %rm, "could not remove a failed snapshot's temp file");
                }
                return Err(e);
            }
        };
        let copy = copy_started.elapsed();
        let sync_started = Instant::now();
        self.vfs.rename(&tmp, &path).map_err(Self::io_err(&tmp))?;
        self.vfs
            .sync_dir(&self.dir)
            .map_err(Self::io_err(&self.dir))?;
        let sync = sync_started.elapsed();
        let file = SnapshotFile {
            name,
            path,
            index: meta.index,
            term: meta.term,
        };
        tracing::info!(
            file = %file.name,
            keys = header.key_count,
            bytes = header.file_bytes,
            view_open_us = view_open.as_micros() as u64,
            copy_ms = copy.as_millis() as u64,
            saved_keys,
            "snapshot written"
        );
        self.retain()?;
        Ok(CreatedSnapshot {
            file,
            meta,
            header,
            view_open,
            copy,
            sync,
            saved_keys,
        })
    }

    /// Stores a whole snapshot file read from `source` (a backup, or a file fetched from the
    /// cluster): written to a temp file, synced, verified chunk by chunk and as a whole, and
    /// only then published under the name its contents give. At most `bytes_max` are read.
    /// A damaged or oversized stream leaves nothing behind.
    pub fn receive(
        &self,
        source: &mut dyn std::io::Read,
        bytes_max: u64,
    ) -> Result<VerifiedSnapshot, SnapshotError> {
        use std::io::Read as _;
        let tmp = self
            .dir
            .join(format!("receiving-{}.snap.tmp", std::process::id()));
        let result = (|| {
            let handle = self.vfs.open(&tmp, true).map_err(Self::io_err(&tmp))?;
            handle.set_len(0).map_err(Self::io_err(&tmp))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut offset = 0u64;
            let mut limited = source.take(bytes_max.saturating_add(1));
            loop {
                let n = limited.read(&mut buf).map_err(Self::io_err(&tmp))?;
                if n == 0 {
                    break;
                }
                handle
                    .write_all_at(&buf[..n], offset)
                    .map_err(Self::io_err(&tmp))?;
                offset = offset.saturating_add(n as u64);
            }
            if offset > bytes_max {
                return Err(SnapshotError::Format {
                    path: tmp.clone(),
                    source: FormatError::Corrupt {
                        offset: bytes_max,
                        what: format!("the stream is longer than the limit of {bytes_max} bytes"),
                    },
                });
            }
            handle.sync_data().map_err(Self::io_err(&tmp))?;
            let staged = SnapshotFile {
                path: tmp.clone(),
                name: String::new(),
                index: 0,
                term: 0,
            };
            let mut reader = self.open_reader_unchecked(&staged)?;
            reader
                .verify_rest()
                .map_err(|source| SnapshotError::Format {
                    path: tmp.clone(),
                    source,
                })?;
            let meta = reader.meta().clone();
            let header = reader.header().clone();
            let name = file_name(meta.index, meta.term);
            let path = self.dir.join(&name);
            self.vfs.rename(&tmp, &path).map_err(Self::io_err(&path))?;
            self.vfs
                .sync_dir(&self.dir)
                .map_err(Self::io_err(&self.dir))?;
            let file = SnapshotFile {
                path,
                name,
                index: meta.index,
                term: meta.term,
            };
            Ok(VerifiedSnapshot { file, meta, header })
        })();
        if result.is_err() && self.vfs.exists(&tmp) {
            let _ = self.vfs.remove_file(&tmp);
        }
        result
    }

    /// Deletes all but the newest `keep` snapshot files.
    pub fn retain(&self) -> Result<(), SnapshotError> {
        let files = self.list()?;
        if files.len() <= self.opts.keep {
            return Ok(());
        }
        for old in &files[..files.len() - self.opts.keep] {
            tracing::info!(file = %old.name, "removing an old snapshot");
            self.vfs
                .remove_file(&old.path)
                .map_err(Self::io_err(&old.path))?;
        }
        self.vfs
            .sync_dir(&self.dir)
            .map_err(Self::io_err(&self.dir))
    }

    /// Replaces the state of `sm` with the snapshot in `file`: a fresh tree is built while the
    /// file streams and is swapped in only after the whole file has verified.
    pub fn install(
        &self,
        file: &SnapshotFile,
        sm: &StateMachine,
    ) -> Result<SnapshotMeta, SnapshotError> {
        let started = Instant::now();
        let mut reader = self.open_reader(file)?;
        let mut builder = sm.begin_install()?;
        let format_err = |source| SnapshotError::Format {
            path: file.path.clone(),
            source,
        };
        let (version, index) = (reader.header().version, reader.meta().index);
        while let Some((key, value)) = reader.next_pair().map_err(format_err)? {
            builder.insert_snapshot_pair(version, index, key, value)?;
        }
        let meta = reader.meta().clone();
        builder.finish(&meta)?;
        tracing::info!(
            file = %file.name,
            keys = reader.header().key_count,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot installed"
        );
        Ok(meta)
    }

    /// Renames a snapshot that failed verification to `<name>.broken` so it is never tried
    /// again but stays for inspection.
    pub fn mark_broken(&self, file: &SnapshotFile) -> Result<(), SnapshotError> {
        let broken = self.dir.join(format!("{}.broken", file.name));
        self.vfs
            .rename(&file.path, &broken)
            .map_err(Self::io_err(&file.path))?;
        self.vfs
            .sync_dir(&self.dir)
            .map_err(Self::io_err(&self.dir))
    }

    /// Installs the newest snapshot above index `above` that verifies into `sm`; each newer
    /// one that does not is renamed `.broken` with a warning. `None` if no snapshot above
    /// `above` verifies (or there is none); files at or below it are left alone.
    pub fn restore_newest(
        &self,
        sm: &StateMachine,
        above: u64,
    ) -> Result<Option<SnapshotMeta>, SnapshotError> {
        for file in self.list()?.iter().rev().filter(|f| f.index > above) {
            match self.install(file, sm) {
                Ok(meta) => return Ok(Some(meta)),
                Err(SnapshotError::Format { path, source }) => {
                    tracing::warn!(file = %path.display(), error = %source, "snapshot fails verification; renaming it .broken and trying the next older one");
                    self.mark_broken(file)?;
                }
                Err(other) => return Err(other),
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests;
