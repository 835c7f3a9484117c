//! The snapshot file format: our own framing, written and read as a stream of bounded chunks.
//!
//! All integers are little-endian. A file is a fixed 64-byte header, then chunks.
//!
//! ```text
//! header (64 bytes, offset 0)
//! offset  size  field
//!      0     8  magic "RKVSNAP1"
//!      8     4  format version u32 (2; 1 is still read)
//!     12     4  chunk count u32 (every chunk after the header, the end chunk included)
//!     16     8  snapshot index u64
//!     24     8  snapshot term u64
//!     32     8  key count u64
//!     40     8  kv bytes u64 (sum of every key's and value's length)
//!     48     8  file bytes u64 (the whole file's length)
//!     56     4  body CRC-32 (crc32fast) of bytes 64..file bytes
//!     60     4  header CRC-32 of bytes 0..60
//!
//! chunk (16-byte header + payload)
//!      0     1  kind: 1 meta, 2 pairs, 3 end
//!      1     3  reserved, zero
//!      4     4  payload length u32 (at most CHUNK_PAYLOAD_BYTES_MAX and the bytes left)
//!      8     4  sequence number u32: 0 for the first chunk, then +1 each
//!     12     4  CRC-32 of chunk bytes 0..12 ‖ payload
//!     16     n  payload
//!
//! payloads
//!   meta  (exactly one, first): index u64 ‖ term u64 ‖ voter count u32 ‖ voters u64… ‖
//!                               learner count u32 ‖ learners u64…
//!   pairs (zero or more):       pair count u32 ‖ pair count × (key len u32 ‖ value len u32 ‖
//!                               key ‖ value), keys strictly increasing across the file
//!   end   (exactly one, last):  key count u64 ‖ kv bytes u64 ‖ chunk count u32
//! ```
//!
//! Version 2 pairs are the state machine's internal keys and records as they are (`d ‖ key` →
//! revisions ‖ value, `s ‖ client` → session, `c/sessions`; see `sm::record`), so a snapshot
//! carries revisions and the session table; "key count" counts these pairs. Version 1 pairs
//! (round 1) are user keys and raw values; installing one gives every key the snapshot's
//! index as its revisions.
//!
//! The header is written last (a zeroed placeholder first), so a file whose writer died has no
//! valid header. The sequence number inside each chunk's CRC means chunks cannot be reordered,
//! dropped or duplicated undetected; the body CRC and the end chunk catch anything else. The
//! writer holds one chunk (≈ `chunk_target_bytes` plus one pair) in memory; so does the reader.

use crate::types::{Membership, SnapshotMeta};
use crate::vfs::VfsFile;

/// The header's magic bytes.
pub const MAGIC: &[u8; 8] = b"RKVSNAP1";
/// The file format version this build writes.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this build reads.
pub const FORMAT_VERSION_MIN: u32 = 1;
/// Bytes of the file header.
pub const HEADER_BYTES: u64 = 64;
/// Bytes of a chunk header.
pub const CHUNK_HEADER_BYTES: usize = 16;
/// The largest chunk payload a reader accepts (a pair chunk holds at least one pair, and a
/// pair is bounded by the command limits: 8 KiB key + 1 MiB value by default).
pub const CHUNK_PAYLOAD_BYTES_MAX: u32 = 64 * 1024 * 1024;
/// The default size at which the writer closes a pairs chunk.
pub const CHUNK_TARGET_BYTES_DEFAULT: usize = 1024 * 1024;

const KIND_META: u8 = 1;
const KIND_PAIRS: u8 = 2;
const KIND_END: u8 = 3;
/// The most members a meta chunk may list (guards allocation while decoding).
const MEMBERS_MAX: u32 = 1 << 16;

/// What the header says about a snapshot file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// The format version (pairs are internal keys from 2 on, user keys in 1).
    pub version: u32,
    pub index: u64,
    pub term: u64,
    pub chunk_count: u32,
    pub key_count: u64,
    pub kv_bytes: u64,
    pub file_bytes: u64,
    pub body_crc: u32,
}

/// A defect found while reading a snapshot file, with the byte offset it was found at.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("I/O at byte {offset}: {source}")]
    Io {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt at byte {offset}: {what}")]
    Corrupt { offset: u64, what: String },
}

pub(super) fn corrupt(offset: u64, what: impl Into<String>) -> FormatError {
    FormatError::Corrupt {
        offset,
        what: what.into(),
    }
}

pub(super) fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

pub(super) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl SnapshotHeader {
    fn encode(&self) -> [u8; HEADER_BYTES as usize] {
        let mut b = [0u8; HEADER_BYTES as usize];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.chunk_count.to_le_bytes());
        b[16..24].copy_from_slice(&self.index.to_le_bytes());
        b[24..32].copy_from_slice(&self.term.to_le_bytes());
        b[32..40].copy_from_slice(&self.key_count.to_le_bytes());
        b[40..48].copy_from_slice(&self.kv_bytes.to_le_bytes());
        b[48..56].copy_from_slice(&self.file_bytes.to_le_bytes());
        b[56..60].copy_from_slice(&self.body_crc.to_le_bytes());
        let crc = crc32fast::hash(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a header (magic, version, CRC).
    pub fn decode(b: &[u8; HEADER_BYTES as usize]) -> Result<SnapshotHeader, FormatError> {
        if &b[0..8] != MAGIC {
            return Err(corrupt(0, "bad magic: not a raftkv snapshot file"));
        }
        let stored = u32_at(b, 60);
        let actual = crc32fast::hash(&b[0..60]);
        if stored != actual {
            return Err(corrupt(
                0,
                format!("header CRC mismatch (stored {stored:08x}, computed {actual:08x})"),
            ));
        }
        let version = u32_at(b, 8);
        if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&version) {
            return Err(corrupt(
                8,
                format!(
                    "format version {version}, this build reads {FORMAT_VERSION_MIN} to {FORMAT_VERSION}"
                ),
            ));
        }
        Ok(SnapshotHeader {
            version,
            chunk_count: u32_at(b, 12),
            index: u64_at(b, 16),
            term: u64_at(b, 24),
            key_count: u64_at(b, 32),
            kv_bytes: u64_at(b, 40),
            file_bytes: u64_at(b, 48),
            body_crc: u32_at(b, 56),
        })
    }
}

fn encode_meta(meta: &SnapshotMeta) -> Vec<u8> {
    let m = &meta.membership;
    let mut p = Vec::with_capacity(24 + 8 * (m.voters.len() + m.learners.len()));
    p.extend_from_slice(&meta.index.to_le_bytes());
    p.extend_from_slice(&meta.term.to_le_bytes());
    for set in [&m.voters, &m.learners] {
        p.extend_from_slice(&(set.len() as u32).to_le_bytes());
        for id in set {
            p.extend_from_slice(&id.to_le_bytes());
        }
    }
    m.encode_tail(&mut p);
    p
}

fn decode_meta(p: &[u8], offset: u64) -> Result<SnapshotMeta, FormatError> {
    let short = || corrupt(offset, "meta chunk is truncated");
    if p.len() < 16 {
        return Err(short());
    }
    let mut at = 16;
    let mut sets = [Vec::new(), Vec::new()];
    for set in &mut sets {
        if p.len() < at + 4 {
            return Err(short());
        }
        let n = u32_at(p, at);
        at += 4;
        if n > MEMBERS_MAX || p.len() < at + 8 * n as usize {
            return Err(short());
        }
        for _ in 0..n {
            set.push(u64_at(p, at));
            at += 8;
        }
    }
    let [voters, learners] = sets;
    let mut membership = Membership {
        voters: voters.into_iter().collect(),
        learners: learners.into_iter().collect(),
        ..Membership::default()
    };
    // The joint half and addresses follow (absent in the older form of the chunk).
    membership
        .decode_tail(&p[at..])
        .map_err(|e| corrupt(offset, format!("meta chunk membership: {e}")))?;
    Ok(SnapshotMeta {
        index: u64_at(p, 0),
        term: u64_at(p, 8),
        membership,
    })
}

/// Streams a snapshot into a file: header placeholder, meta chunk, pairs chunks, end chunk,
/// then the real header and one `sync_data`. Holds one chunk in memory.
pub struct SnapshotFileWriter {
    file: Box<dyn VfsFile>,
    meta: SnapshotMeta,
    offset: u64,
    seq: u32,
    body_crc: crc32fast::Hasher,
    pairs: Vec<u8>,
    pairs_in_chunk: u32,
    chunk_target_bytes: usize,
    key_count: u64,
    kv_bytes: u64,
    last_key: Option<Vec<u8>>,
    writeback_from: u64,
}

/// While writing, start writeback of every this many bytes (without waiting for it), so the
/// disk works while the walk goes on and the final `sync_data` has little left. A blocking
/// `sync_data` here instead held the writer ~35 ms per 16 MiB: 0.6 s of a 1.45 s snapshot.
const WRITEBACK_EVERY_BYTES: u64 = 8 << 20;

impl SnapshotFileWriter {
    /// Starts a snapshot of `meta` in `file` (which must be empty).
    pub fn new(
        file: Box<dyn VfsFile>,
        meta: SnapshotMeta,
        chunk_target_bytes: usize,
    ) -> std::io::Result<SnapshotFileWriter> {
        file.set_len(0)?;
        file.write_all_at(&[0u8; HEADER_BYTES as usize], 0)?;
        let mut w = SnapshotFileWriter {
            file,
            meta,
            offset: HEADER_BYTES,
            seq: 0,
            body_crc: crc32fast::Hasher::new(),
            pairs: Vec::with_capacity(chunk_target_bytes.min(CHUNK_PAYLOAD_BYTES_MAX as usize)),
            pairs_in_chunk: 0,
            chunk_target_bytes: chunk_target_bytes.max(1),
            key_count: 0,
            kv_bytes: 0,
            last_key: None,
            writeback_from: 0,
        };
        let payload = encode_meta(&w.meta);
        w.write_chunk(KIND_META, &payload)?;
        w.pairs.extend_from_slice(&0u32.to_le_bytes());
        Ok(w)
    }

    fn write_chunk(&mut self, kind: u8, payload: &[u8]) -> std::io::Result<()> {
        let mut head = [0u8; CHUNK_HEADER_BYTES];
        head[0] = kind;
        head[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        head[8..12].copy_from_slice(&self.seq.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head[0..12]);
        crc.update(payload);
        head[12..16].copy_from_slice(&crc.finalize().to_le_bytes());
        self.body_crc.update(&head);
        self.body_crc.update(payload);
        self.file.write_all_at(&head, self.offset)?;
        self.file
            .write_all_at(payload, self.offset + CHUNK_HEADER_BYTES as u64)?;
        self.offset += (CHUNK_HEADER_BYTES + payload.len()) as u64;
        self.seq += 1;
        if self.offset - self.writeback_from >= WRITEBACK_EVERY_BYTES {
            self.file
                .start_writeback(self.writeback_from, self.offset - self.writeback_from)?;
            self.writeback_from = self.offset;
        }
        Ok(())
    }

    fn flush_pairs(&mut self) -> std::io::Result<()> {
        if self.pairs_in_chunk == 0 {
            return Ok(());
        }
        let count = self.pairs_in_chunk.to_le_bytes();
        self.pairs[0..4].copy_from_slice(&count);
        let payload = std::mem::take(&mut self.pairs);
        let result = self.write_chunk(KIND_PAIRS, &payload);
        self.pairs = payload;
        self.pairs.clear();
        self.pairs.extend_from_slice(&0u32.to_le_bytes());
        self.pairs_in_chunk = 0;
        result
    }

    /// Appends one pair. Keys must come in strictly increasing order.
    pub fn push(&mut self, key: &[u8], value: &[u8]) -> std::io::Result<()> {
        let pair_bytes = 8 + key.len() + value.len();
        if 4 + pair_bytes > CHUNK_PAYLOAD_BYTES_MAX as usize {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a pair of {pair_bytes} bytes does not fit in a snapshot chunk"),
            ));
        }
        let in_order = match self.last_key.as_deref() {
            Some(last) => last < key,
            None => true,
        };
        assert!(
            in_order,
            "invariant: snapshot keys are written in strictly increasing order"
        );
        if self.pairs_in_chunk > 0 && self.pairs.len() + pair_bytes > self.chunk_target_bytes {
            self.flush_pairs()?;
        }
        self.pairs
            .extend_from_slice(&(key.len() as u32).to_le_bytes());
        self.pairs
            .extend_from_slice(&(value.len() as u32).to_le_bytes());
        self.pairs.extend_from_slice(key);
        self.pairs.extend_from_slice(value);
        self.pairs_in_chunk += 1;
        self.key_count += 1;
        self.kv_bytes += (key.len() + value.len()) as u64;
        match &mut self.last_key {
            Some(last) => {
                last.clear();
                last.extend_from_slice(key);
            }
            None => self.last_key = Some(key.to_vec()),
        }
        Ok(())
    }

    /// Writes the end chunk and the header, then `sync_data`. The file is complete and durable
    /// (its name is not: the caller renames it and syncs the directory).
    pub fn finish(mut self) -> std::io::Result<SnapshotHeader> {
        self.flush_pairs()?;
        let mut end = Vec::with_capacity(20);
        end.extend_from_slice(&self.key_count.to_le_bytes());
        end.extend_from_slice(&self.kv_bytes.to_le_bytes());
        end.extend_from_slice(&(self.seq + 1).to_le_bytes());
        self.write_chunk(KIND_END, &end)?;
        let header = SnapshotHeader {
            version: FORMAT_VERSION,
            index: self.meta.index,
            term: self.meta.term,
            chunk_count: self.seq,
            key_count: self.key_count,
            kv_bytes: self.kv_bytes,
            file_bytes: self.offset,
            body_crc: self.body_crc.clone().finalize(),
        };
        self.file.write_all_at(&header.encode(), 0)?;
        self.file.sync_data()?;
        Ok(header)
    }
}

/// A key and its value, borrowed from the reader's current chunk.
pub type PairRef<'a> = (&'a [u8], &'a [u8]);

/// Reads a snapshot file as a stream, verifying each chunk as it arrives and the whole file
/// at the end. Holds one chunk in memory.
pub struct SnapshotFileReader {
    file: Box<dyn VfsFile>,
    header: SnapshotHeader,
    meta: SnapshotMeta,
    offset: u64,
    seq: u32,
    body_crc: crc32fast::Hasher,
    chunk: Vec<u8>,
    chunk_offset: u64,
    at: usize,
    pairs_left: u32,
    key_count: u64,
    kv_bytes: u64,
    last_key: Option<Vec<u8>>,
    done: bool,
}

impl SnapshotFileReader {
    /// Reads and checks the header and the meta chunk.
    pub fn open(file: Box<dyn VfsFile>) -> Result<SnapshotFileReader, FormatError> {
        let len = file
            .size_bytes()
            .map_err(|source| FormatError::Io { offset: 0, source })?;
        if len < HEADER_BYTES {
            return Err(corrupt(
                len,
                format!("file is {len} bytes, shorter than the {HEADER_BYTES}-byte header"),
            ));
        }
        let mut hb = [0u8; HEADER_BYTES as usize];
        file.read_exact_at(&mut hb, 0)
            .map_err(|source| FormatError::Io { offset: 0, source })?;
        let header = SnapshotHeader::decode(&hb)?;
        if header.file_bytes != len {
            return Err(corrupt(
                len,
                format!(
                    "file is {len} bytes but its header says {}",
                    header.file_bytes
                ),
            ));
        }
        let mut r = SnapshotFileReader {
            file,
            header,
            meta: SnapshotMeta::default(),
            offset: HEADER_BYTES,
            seq: 0,
            body_crc: crc32fast::Hasher::new(),
            chunk: Vec::new(),
            chunk_offset: HEADER_BYTES,
            at: 0,
            pairs_left: 0,
            key_count: 0,
            kv_bytes: 0,
            last_key: None,
            done: false,
        };
        let kind = r.read_chunk()?;
        if kind != KIND_META {
            return Err(corrupt(HEADER_BYTES, "the first chunk is not a meta chunk"));
        }
        r.meta = decode_meta(&r.chunk, r.chunk_offset)?;
        if (r.meta.index, r.meta.term) != (r.header.index, r.header.term) {
            return Err(corrupt(
                r.chunk_offset,
                "meta chunk and header disagree on index/term",
            ));
        }
        Ok(r)
    }

    /// The header (as read, checked only by its own CRC until the stream is finished).
    pub fn header(&self) -> &SnapshotHeader {
        &self.header
    }

    /// The snapshot's index, term and membership.
    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }

    /// Reads the next chunk into `self.chunk` and returns its kind.
    fn read_chunk(&mut self) -> Result<u8, FormatError> {
        let at = self.offset;
        let end = self.header.file_bytes;
        if end - at < CHUNK_HEADER_BYTES as u64 {
            return Err(corrupt(at, "file ends inside a chunk header"));
        }
        let mut head = [0u8; CHUNK_HEADER_BYTES];
        self.file
            .read_exact_at(&mut head, at)
            .map_err(|source| FormatError::Io { offset: at, source })?;
        let kind = head[0];
        let len = u32_at(&head, 4);
        let seq = u32_at(&head, 8);
        let stored_crc = u32_at(&head, 12);
        if head[1..4] != [0, 0, 0] || !(KIND_META..=KIND_END).contains(&kind) {
            return Err(corrupt(at, format!("bad chunk header (kind {kind})")));
        }
        if len > CHUNK_PAYLOAD_BYTES_MAX || len as u64 > end - at - CHUNK_HEADER_BYTES as u64 {
            return Err(corrupt(
                at,
                format!("chunk length {len} runs past the end of the file or the limit"),
            ));
        }
        if seq != self.seq {
            return Err(corrupt(
                at,
                format!("chunk sequence {seq}, expected {}", self.seq),
            ));
        }
        self.chunk.resize(len as usize, 0);
        let payload_at = at + CHUNK_HEADER_BYTES as u64;
        self.file
            .read_exact_at(&mut self.chunk, payload_at)
            .map_err(|source| FormatError::Io {
                offset: payload_at,
                source,
            })?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head[0..12]);
        crc.update(&self.chunk);
        let actual = crc.finalize();
        if actual != stored_crc {
            return Err(corrupt(
                at,
                format!(
                    "chunk {seq} CRC mismatch (stored {stored_crc:08x}, computed {actual:08x})"
                ),
            ));
        }
        self.body_crc.update(&head);
        self.body_crc.update(&self.chunk);
        self.chunk_offset = at;
        self.offset = payload_at + len as u64;
        self.seq += 1;
        Ok(kind)
    }

    fn finish_end_chunk(&mut self) -> Result<(), FormatError> {
        let at = self.chunk_offset;
        if self.chunk.len() != 20 {
            return Err(corrupt(at, "end chunk is not 20 bytes"));
        }
        let keys = u64_at(&self.chunk, 0);
        let kv_bytes = u64_at(&self.chunk, 8);
        let chunks = u32_at(&self.chunk, 16);
        if keys != self.key_count || keys != self.header.key_count {
            return Err(corrupt(
                at,
                format!(
                    "read {} keys; end chunk says {keys}, header says {}",
                    self.key_count, self.header.key_count
                ),
            ));
        }
        if kv_bytes != self.kv_bytes || kv_bytes != self.header.kv_bytes {
            return Err(corrupt(at, "key/value byte count mismatch"));
        }
        if chunks != self.seq || chunks != self.header.chunk_count {
            return Err(corrupt(at, "chunk count mismatch"));
        }
        if self.offset != self.header.file_bytes {
            return Err(corrupt(self.offset, "bytes after the end chunk"));
        }
        let body = self.body_crc.clone().finalize();
        if body != self.header.body_crc {
            return Err(corrupt(
                HEADER_BYTES,
                format!(
                    "body CRC mismatch (header {:08x}, computed {body:08x})",
                    self.header.body_crc
                ),
            ));
        }
        self.done = true;
        Ok(())
    }

    /// The next pair, or `None` once the end chunk has been read and the whole file verified.
    /// A returned pair has passed its chunk's CRC; the file as a whole is verified only when
    /// this returns `Ok(None)`.
    pub fn next_pair(&mut self) -> Result<Option<PairRef<'_>>, FormatError> {
        if self.done {
            return Ok(None);
        }
        while self.pairs_left == 0 {
            match self.read_chunk()? {
                KIND_PAIRS => {
                    if self.chunk.len() < 4 {
                        return Err(corrupt(self.chunk_offset, "pairs chunk is truncated"));
                    }
                    self.pairs_left = u32_at(&self.chunk, 0);
                    self.at = 4;
                    if self.pairs_left == 0 {
                        return Err(corrupt(self.chunk_offset, "empty pairs chunk"));
                    }
                }
                KIND_END => {
                    self.finish_end_chunk()?;
                    return Ok(None);
                }
                _ => return Err(corrupt(self.chunk_offset, "a second meta chunk")),
            }
        }
        let bad = |what: &str| corrupt(self.chunk_offset, what.to_string());
        let at = self.at;
        if self.chunk.len() < at + 8 {
            return Err(bad("pairs chunk is truncated"));
        }
        let key_len = u32_at(&self.chunk, at) as usize;
        let value_len = u32_at(&self.chunk, at + 4) as usize;
        let key_start = at + 8;
        let value_start = key_start + key_len;
        let value_end = value_start + value_len;
        if self.chunk.len() < value_end {
            return Err(bad("a pair runs past its chunk"));
        }
        self.pairs_left -= 1;
        if self.pairs_left == 0 && value_end != self.chunk.len() {
            return Err(bad("pairs chunk has trailing bytes"));
        }
        let key = &self.chunk[key_start..value_start];
        if self.last_key.as_deref().is_some_and(|last| last >= key) {
            return Err(bad("keys are not in strictly increasing order"));
        }
        match &mut self.last_key {
            Some(last) => {
                last.clear();
                last.extend_from_slice(key);
            }
            None => self.last_key = Some(key.to_vec()),
        }
        self.at = value_end;
        self.key_count += 1;
        self.kv_bytes += (key_len + value_len) as u64;
        Ok(Some((
            &self.chunk[key_start..value_start],
            &self.chunk[value_start..value_end],
        )))
    }

    /// Reads to the end, verifying everything; returns the number of pairs read by this call.
    pub fn verify_rest(&mut self) -> Result<u64, FormatError> {
        let mut n = 0;
        while self.next_pair()?.is_some() {
            n += 1;
        }
        Ok(n)
    }
}
