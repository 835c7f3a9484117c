//! Snapshot transfer between nodes: a leader streams a snapshot file out in chunks, a follower
//! writes them into `snap/` and publishes the file only once all of it arrived in order.
//!
//! Both halves go through [`Vfs`](crate::vfs::Vfs) like every other snapshot file operation,
//! so the simulated disk crashes them too; neither owns a thread, a socket or a clock (the
//! node's shell moves chunks between them and the transport).
//!
//! Invariants:
//! - [`ChunkSource`] hands out chunks with consecutive offsets, each at most its chunk size,
//!   the last one ending exactly at `total_bytes`.
//! - [`ChunkSink`] writes a chunk only at the offset it expects next; anything else
//!   abandons the transfer (the temp file is removed) and is reported, never written.
//! - A received file is visible under its final name only after `sync_data`, rename and a
//!   directory sync: a crash leaves a `.tmp` (removed on open) or the whole file.

use super::{file_name, SnapshotError, SnapshotFile, SnapshotStore};
use crate::types::{NodeId, SnapshotMeta};
use crate::vfs::VfsFile;
use serde::{Deserialize, Serialize};

/// Bytes of snapshot data per chunk on the wire (the most a receiver accepts in one).
pub const CHUNK_BYTES_MAX: usize = 1 << 20;

/// A piece of a snapshot file on its way to a follower.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotChunk {
    /// The leader's term when it started the transfer.
    pub term: u64,
    pub meta: SnapshotMeta,
    /// The file's name in `snap/` (index and term).
    pub file_name: String,
    pub offset: u64,
    pub total_bytes: u64,
    pub data: Vec<u8>,
}

impl SnapshotChunk {
    /// Whether this chunk ends the file. `offset` comes off the wire: the sum saturates
    /// rather than wrap (a chunk that far out never matches the receiver's next offset).
    pub fn is_last(&self) -> bool {
        self.offset.saturating_add(self.data.len() as u64) >= self.total_bytes
    }
}

/// Reads one snapshot file as a sequence of chunks.
pub struct ChunkSource {
    handle: Box<dyn VfsFile>,
    file: SnapshotFile,
    meta: SnapshotMeta,
    term: u64,
    total_bytes: u64,
    offset: u64,
    chunk_bytes: usize,
    done: bool,
}

impl std::fmt::Debug for ChunkSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkSource")
            .field("file", &self.file.name)
            .field("offset", &self.offset)
            .field("total_bytes", &self.total_bytes)
            .finish()
    }
}

impl ChunkSource {
    /// The file's size.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Bytes handed out so far.
    pub fn sent_bytes(&self) -> u64 {
        self.offset
    }

    /// The next chunk, or `None` once the last one was handed out.
    pub fn next_chunk(&mut self) -> Result<Option<SnapshotChunk>, SnapshotError> {
        if self.done {
            return Ok(None);
        }
        let left = self.total_bytes - self.offset;
        let len = usize::try_from(left)
            .unwrap_or(usize::MAX)
            .min(self.chunk_bytes);
        let mut data = vec![0u8; len];
        self.handle
            .read_exact_at(&mut data, self.offset)
            .map_err(SnapshotStore::io_err(&self.file.path))?;
        let chunk = SnapshotChunk {
            term: self.term,
            meta: self.meta.clone(),
            file_name: self.file.name.clone(),
            offset: self.offset,
            total_bytes: self.total_bytes,
            data,
        };
        self.offset += len as u64;
        debug_assert!(self.offset <= self.total_bytes, "chunks never pass the end");
        self.done = chunk.is_last();
        debug_assert_eq!(self.done, self.offset == self.total_bytes);
        Ok(Some(chunk))
    }
}

/// What [`ChunkSink::receive`] made of a chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    /// Written; more to come.
    Partial,
    /// The last chunk: the file is synced and published under its name.
    Complete {
        term: u64,
        meta: SnapshotMeta,
        bytes: u64,
    },
    /// Not written: the transfer is abandoned (or never started) for this reason.
    Dropped(String),
}

struct Incoming {
    file_name: String,
    tmp_name: String,
    handle: Box<dyn VfsFile>,
    next_offset: u64,
    /// The size the first chunk announced; every later chunk must announce the same.
    total_bytes: u64,
}

/// Receives one snapshot file at a time from chunks.
#[derive(Default)]
pub struct ChunkSink {
    incoming: Option<Incoming>,
}

impl std::fmt::Debug for ChunkSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkSink")
            .field("file", &self.incoming.as_ref().map(|i| &i.file_name))
            .field(
                "next_offset",
                &self.incoming.as_ref().map(|i| i.next_offset),
            )
            .finish()
    }
}

impl ChunkSink {
    /// Writes `chunk` (from `from`) if it continues the transfer in progress or starts a new
    /// one (offset 0); publishes the file after its last chunk. I/O errors are returned (the
    /// disk failed); anything wrong with the chunk itself is [`Received::Dropped`].
    pub fn receive(
        &mut self,
        store: &SnapshotStore,
        from: NodeId,
        chunk: SnapshotChunk,
    ) -> Result<Received, SnapshotError> {
        let expected = file_name(chunk.meta.index, chunk.meta.term);
        if chunk.file_name != expected {
            return Ok(Received::Dropped(format!(
                "chunk from node {from} names file {:?}, its metadata says {expected:?}",
                chunk.file_name
            )));
        }
        if chunk.offset == 0 {
            self.abandon(store);
            self.incoming = Some(Self::start(store, expected.clone(), chunk.total_bytes)?);
        }
        let Some(inc) = self.incoming.as_mut() else {
            return Ok(Received::Dropped(format!(
                "chunk at offset {} from node {from} without a start",
                chunk.offset
            )));
        };
        if inc.file_name != expected
            || inc.next_offset != chunk.offset
            || inc.total_bytes != chunk.total_bytes
        {
            let why = format!(
                "chunk at offset {} of {} bytes of {expected} from node {from}, expected offset {} of {} bytes of {}",
                chunk.offset, chunk.total_bytes, inc.next_offset, inc.total_bytes, inc.file_name
            );
            self.abandon(store);
            return Ok(Received::Dropped(why));
        }
        let tmp = store.dir().join(&inc.tmp_name);
        inc.handle
            .write_all_at(&chunk.data, inc.next_offset)
            .map_err(SnapshotStore::io_err(&tmp))?;
        inc.next_offset += chunk.data.len() as u64;
        if !chunk.is_last() {
            return Ok(Received::Partial);
        }
        let done = self.incoming.take().expect("checked above");
        debug_assert_eq!(
            done.next_offset, done.total_bytes,
            "the last chunk ends the file"
        );
        done.handle
            .sync_data()
            .map_err(SnapshotStore::io_err(&tmp))?;
        store.publish(&done.tmp_name, &done.file_name)?;
        Ok(Received::Complete {
            term: chunk.term,
            meta: chunk.meta,
            bytes: done.next_offset,
        })
    }

    fn start(
        store: &SnapshotStore,
        file_name: String,
        total_bytes: u64,
    ) -> Result<Incoming, SnapshotError> {
        let tmp_name = format!("{file_name}.recv.tmp");
        let tmp = store.dir().join(&tmp_name);
        let handle = store
            .vfs
            .open(&tmp, true)
            .map_err(SnapshotStore::io_err(&tmp))?;
        handle.set_len(0).map_err(SnapshotStore::io_err(&tmp))?;
        Ok(Incoming {
            file_name,
            tmp_name,
            handle,
            next_offset: 0,
            total_bytes,
        })
    }

    /// Drops the transfer in progress, if any, and its temp file (best effort: a leftover
    /// `.tmp` is removed on the next open anyway).
    pub fn abandon(&mut self, store: &SnapshotStore) {
        if let Some(inc) = self.incoming.take() {
            drop(inc.handle);
            let _ = store.vfs.remove_file(&store.dir().join(&inc.tmp_name));
        }
    }
}

impl SnapshotStore {
    /// Opens `file` to be streamed in chunks of at most `chunk_bytes` for a leader at `term`.
    pub fn chunk_source(
        &self,
        file: &SnapshotFile,
        meta: &SnapshotMeta,
        term: u64,
        chunk_bytes: usize,
    ) -> Result<ChunkSource, SnapshotError> {
        assert!(
            (1..=CHUNK_BYTES_MAX).contains(&chunk_bytes),
            "chunk size {chunk_bytes} out of range"
        );
        assert_eq!(
            (meta.index, meta.term),
            (file.index, file.term),
            "the metadata describes the file"
        );
        let handle = self
            .vfs
            .open_read(&file.path)
            .map_err(Self::io_err(&file.path))?;
        let total_bytes = handle.size_bytes().map_err(Self::io_err(&file.path))?;
        Ok(ChunkSource {
            handle,
            file: file.clone(),
            meta: meta.clone(),
            term,
            total_bytes,
            offset: 0,
            chunk_bytes,
            done: false,
        })
    }

    /// Renames `snap/<tmp_name>` to `snap/<name>` and makes it durable.
    fn publish(&self, tmp_name: &str, name: &str) -> Result<(), SnapshotError> {
        let (tmp, path) = (self.dir.join(tmp_name), self.dir.join(name));
        self.vfs.rename(&tmp, &path).map_err(Self::io_err(&path))?;
        self.vfs
            .sync_dir(&self.dir)
            .map_err(Self::io_err(&self.dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sm::{StateMachine, StateMachineOptions};
    use crate::snapshot::SnapshotOptions;
    use crate::types::{Entry, EntryKind, Membership};
    use crate::vfs::{SimFs, Vfs};
    use std::path::Path;
    use std::sync::Arc;

    fn filled_sm(dir: &Path, keys: u64) -> StateMachine {
        let sm = StateMachine::open(dir, StateMachineOptions::default()).expect("open sm");
        let mut entries = vec![Entry {
            index: 1,
            term: 1,
            kind: EntryKind::Config,
            payload: crate::codec::encode(&Membership::with_voters([1, 2, 3]))
                .expect("encode")
                .into(),
        }];
        for i in 0..keys {
            let cmd = crate::command::Command::Put {
                key: format!("key-{i:05}").into_bytes(),
                value: vec![b'v'; 100],
            };
            entries.push(Entry {
                index: i + 2,
                term: 1,
                kind: EntryKind::Normal,
                payload: cmd.encode().expect("encode").into(),
            });
        }
        sm.apply(&entries).expect("apply");
        sm
    }

    fn store(fs: &Arc<SimFs>, dir: &str) -> SnapshotStore {
        SnapshotStore::open(fs.clone(), Path::new(dir), SnapshotOptions::default()).expect("open")
    }

    /// A leader's snapshot of `keys` keys on a simulated disk, opened for streaming to a
    /// follower on the same disk.
    struct Transfer {
        _tmp: tempfile::TempDir,
        fs: Arc<SimFs>,
        follower: SnapshotStore,
        meta: SnapshotMeta,
        source: ChunkSource,
        sink: ChunkSink,
    }

    fn transfer(keys: u64, term: u64, chunk_bytes: usize) -> Transfer {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fs = Arc::new(SimFs::new());
        let sm = filled_sm(&tmp.path().join("sm"), keys);
        let (leader, follower) = (store(&fs, "/a"), store(&fs, "/b"));
        let created = leader.create(&sm).expect("create");
        let source = leader
            .chunk_source(&created.file, &created.meta, term, chunk_bytes)
            .expect("source");
        Transfer {
            _tmp: tmp,
            fs,
            follower,
            meta: created.meta,
            source,
            sink: ChunkSink::default(),
        }
    }

    impl Transfer {
        fn next(&mut self) -> SnapshotChunk {
            self.source.next_chunk().expect("read").expect("a chunk")
        }

        fn receive(&mut self, chunk: SnapshotChunk) -> Received {
            self.sink
                .receive(&self.follower, 1, chunk)
                .expect("no I/O error")
        }
    }

    #[test]
    fn a_file_streamed_in_small_chunks_arrives_whole_and_verifies() {
        let mut t = transfer(200, 7, 997);
        let mut chunks = 0;
        let mut last = None;
        while let Some(chunk) = t.source.next_chunk().expect("read") {
            assert!(chunk.data.len() <= 997);
            chunks += 1;
            last = Some(t.receive(chunk));
        }
        assert!(chunks > 10, "{chunks} chunks");
        let Some(Received::Complete { term, meta, bytes }) = last else {
            panic!("not complete: {last:?}");
        };
        assert_eq!((term, bytes), (7, t.source.total_bytes()));
        assert_eq!(meta, t.meta);
        let files = t.follower.list().expect("list");
        assert_eq!(files.len(), 1);
        assert_eq!(t.follower.verify(&files[0]).expect("verify").meta, t.meta);
    }

    #[test]
    fn a_gap_abandons_the_transfer_and_publishes_nothing() {
        let mut t = transfer(50, 3, 512);
        let first = t.next();
        assert_eq!(t.receive(first), Received::Partial);
        let _lost = t.next();
        let third = t.next();
        assert!(matches!(t.receive(third), Received::Dropped(_)));
        // Nothing published, and the temp file is gone.
        assert!(t.follower.list().expect("list").is_empty());
        assert!(t.fs.list_dir(Path::new("/b/snap")).expect("ls").is_empty());
        // A chunk without a start is dropped too.
        let more = t.next();
        assert!(matches!(t.receive(more), Received::Dropped(_)));
    }

    #[test]
    fn a_chunk_announcing_another_size_abandons_the_transfer() {
        let mut t = transfer(50, 3, 512);
        let first = t.next();
        assert_eq!(t.receive(first), Received::Partial);
        let mut second = t.next();
        second.total_bytes = second.offset + second.data.len() as u64;
        assert!(matches!(t.receive(second), Received::Dropped(_)));
        assert!(t.follower.list().expect("list").is_empty());
    }

    #[test]
    fn a_crash_before_the_last_chunk_leaves_no_snapshot() {
        let mut t = transfer(50, 3, 256);
        for _ in 0..3 {
            let chunk = t.next();
            assert_eq!(t.receive(chunk), Received::Partial);
        }
        t.fs.crash();
        let reopened = store(&t.fs, "/b");
        assert!(reopened.list().expect("list").is_empty());
    }
}
