//! The WAL's record framing: our own fixed byte layout, independent of any codec.
//!
//! ```text
//! offset  size  field
//!      0     4  payload length in bytes, u32 little-endian
//!      4     1  record type (1..=6; 0 never occurs, so zeroed space reads as "no record")
//!      5     3  reserved, must be zero
//!      8     4  CRC-32 (IEEE, crc32fast) of: segment seq (u64 LE) ‖ bytes 0..8 ‖ payload
//!     12     n  payload
//! ```
//!
//! Binding the CRC to the segment's sequence number means bytes left over from another segment
//! (a reused or preallocated file) can never validate in this one. Payload layouts (all
//! integers little-endian):
//!
//! | type | record          | payload |
//! |------|-----------------|---------|
//! | 1    | segment header  | magic `RKVWAL01` (8) ‖ version u32 ‖ seq u64 ‖ first_index u64 ‖ prev_term u64 |
//! | 2    | entry           | index u64 ‖ term u64 ‖ kind u8 ‖ command bytes |
//! | 3    | hard state      | term u64 ‖ vote u64 (0 = none) ‖ commit u64 |
//! | 4    | snapshot marker | index u64 ‖ term u64 ‖ voters: count u32, ids u64… ‖ learners: count u32, ids u64… |
//! | 5    | truncate        | from_index u64 ‖ prev_term u64 |
//! | 6    | reset           | next_index u64 ‖ prev_term u64 |

use crate::types::{Bytes, Entry, EntryKind, HardState, Membership, SnapshotMeta};

/// Bytes of a record header.
pub const HEADER_BYTES: usize = 12;
/// The segment header's magic bytes.
pub const MAGIC: &[u8; 8] = b"RKVWAL01";
/// The on-disk format version.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes an entry record adds to its command bytes (header plus fixed entry fields).
pub const ENTRY_OVERHEAD_BYTES: usize = HEADER_BYTES + 17;

/// The type byte of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordType {
    SegmentHeader = 1,
    Entry = 2,
    HardState = 3,
    SnapshotMarker = 4,
    Truncate = 5,
    Reset = 6,
}

impl RecordType {
    fn from_u8(byte: u8) -> Option<RecordType> {
        match byte {
            1 => Some(RecordType::SegmentHeader),
            2 => Some(RecordType::Entry),
            3 => Some(RecordType::HardState),
            4 => Some(RecordType::SnapshotMarker),
            5 => Some(RecordType::Truncate),
            6 => Some(RecordType::Reset),
            _ => None,
        }
    }
}

/// The first record of every segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub seq: u64,
    /// The index the segment's first entry will have: the log's last index + 1 at rotation.
    pub first_index: u64,
    /// The term of entry `first_index - 1` (0 if none).
    pub prev_term: u64,
}

/// A decoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    SegmentHeader(SegmentHeader),
    Entry(Entry),
    HardState(HardState),
    SnapshotMarker(SnapshotMeta),
    /// Drop every entry at or after `from_index`; entry `from_index - 1` has `prev_term`.
    Truncate {
        from_index: u64,
        prev_term: u64,
    },
    /// The log restarts empty at `next_index` after an installed snapshot at
    /// (`next_index - 1`, `prev_term`), which the preceding snapshot marker records.
    Reset {
        next_index: u64,
        prev_term: u64,
    },
}

/// Why bytes at some offset are not a valid record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// All-zero header: nothing was ever written here.
    Zero,
    /// Fewer bytes remain than the header or the declared payload needs.
    Short {
        needed: u64,
        available: u64,
    },
    /// The declared length exceeds the record limit.
    TooLong {
        len_bytes: u64,
        bytes_max: u64,
    },
    BadType(u8),
    BadReserved,
    BadCrc {
        stored: u32,
        computed: u32,
    },
    /// The CRC matched but the payload does not parse as its type.
    BadPayload(&'static str),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Zero => write!(f, "zeroed bytes where a record was expected"),
            FrameError::Short { needed, available } => {
                write!(f, "short record: needs {needed} bytes, {available} remain")
            }
            FrameError::TooLong {
                len_bytes,
                bytes_max,
            } => {
                write!(f, "record length {len_bytes} exceeds the limit {bytes_max}")
            }
            FrameError::BadType(t) => write!(f, "unknown record type {t}"),
            FrameError::BadReserved => write!(f, "reserved header bytes are not zero"),
            FrameError::BadCrc { stored, computed } => {
                write!(
                    f,
                    "CRC mismatch: stored {stored:08x}, computed {computed:08x}"
                )
            }
            FrameError::BadPayload(what) => write!(f, "malformed payload: {what}"),
        }
    }
}

fn crc(seq: u64, header8: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(header8);
    hasher.update(payload);
    hasher.finalize()
}

/// Appends one framed record to `out`; `write_payload` writes the payload bytes.
fn frame(out: &mut Vec<u8>, seq: u64, rtype: RecordType, write_payload: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_BYTES]);
    write_payload(out);
    let len = (out.len() - start - HEADER_BYTES) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4] = rtype as u8;
    let sum = crc(seq, &out[start..start + 8], &out[start + HEADER_BYTES..]);
    out[start + 8..start + 12].copy_from_slice(&sum.to_le_bytes());
}

/// Frames a segment header record.
pub fn encode_segment_header(out: &mut Vec<u8>, h: &SegmentHeader) {
    frame(out, h.seq, RecordType::SegmentHeader, |p| {
        p.extend_from_slice(MAGIC);
        p.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        p.extend_from_slice(&h.seq.to_le_bytes());
        p.extend_from_slice(&h.first_index.to_le_bytes());
        p.extend_from_slice(&h.prev_term.to_le_bytes());
    });
}

/// Frames an entry record.
pub fn encode_entry(out: &mut Vec<u8>, seq: u64, e: &Entry) {
    frame(out, seq, RecordType::Entry, |p| {
        p.extend_from_slice(&e.index.to_le_bytes());
        p.extend_from_slice(&e.term.to_le_bytes());
        p.push(e.kind as u8);
        p.extend_from_slice(&e.payload);
    });
}

/// Frames a hard state record.
pub fn encode_hard_state(out: &mut Vec<u8>, seq: u64, hs: &HardState) {
    frame(out, seq, RecordType::HardState, |p| {
        p.extend_from_slice(&hs.term.to_le_bytes());
        p.extend_from_slice(&hs.vote.unwrap_or(0).to_le_bytes());
        p.extend_from_slice(&hs.commit.to_le_bytes());
    });
}

/// Frames a snapshot marker record.
pub fn encode_snapshot_marker(out: &mut Vec<u8>, seq: u64, m: &SnapshotMeta) {
    frame(out, seq, RecordType::SnapshotMarker, |p| {
        p.extend_from_slice(&m.index.to_le_bytes());
        p.extend_from_slice(&m.term.to_le_bytes());
        for set in [&m.membership.voters, &m.membership.learners] {
            p.extend_from_slice(&(set.len() as u32).to_le_bytes());
            for id in set.iter() {
                p.extend_from_slice(&id.to_le_bytes());
            }
        }
        m.membership.encode_tail(p);
    });
}

/// Frames a truncate record.
pub fn encode_truncate(out: &mut Vec<u8>, seq: u64, from_index: u64, prev_term: u64) {
    encode_two(out, seq, RecordType::Truncate, from_index, prev_term);
}

/// Frames a reset record.
pub fn encode_reset(out: &mut Vec<u8>, seq: u64, next_index: u64, prev_term: u64) {
    encode_two(out, seq, RecordType::Reset, next_index, prev_term);
}

fn encode_two(out: &mut Vec<u8>, seq: u64, rtype: RecordType, a: u64, b: u64) {
    frame(out, seq, rtype, |p| {
        p.extend_from_slice(&a.to_le_bytes());
        p.extend_from_slice(&b.to_le_bytes());
    });
}

/// Bytes the framed entry record for `e` takes.
pub fn entry_record_bytes(e: &Entry) -> usize {
    ENTRY_OVERHEAD_BYTES + e.payload.len()
}

/// Reads little-endian integers off a payload, failing cleanly at its end.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FrameError> {
        if self.bytes.len() < n {
            return Err(FrameError::BadPayload(what));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, FrameError> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, FrameError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn finish(&self, what: &'static str) -> Result<(), FrameError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(FrameError::BadPayload(what))
        }
    }
}

fn decode_ids(r: &mut Reader<'_>) -> Result<std::collections::BTreeSet<u64>, FrameError> {
    let count = r.u32("membership count")? as usize;
    if count > r.bytes.len() / 8 {
        return Err(FrameError::BadPayload("membership count exceeds payload"));
    }
    (0..count).map(|_| r.u64("member id")).collect()
}

fn decode_payload(rtype: RecordType, payload: &[u8]) -> Result<Record, FrameError> {
    let mut r = Reader { bytes: payload };
    let record = match rtype {
        RecordType::SegmentHeader => {
            if r.take(8, "magic")? != MAGIC {
                return Err(FrameError::BadPayload("bad segment magic"));
            }
            if r.u32("version")? != FORMAT_VERSION {
                return Err(FrameError::BadPayload("unsupported format version"));
            }
            Record::SegmentHeader(SegmentHeader {
                seq: r.u64("seq")?,
                first_index: r.u64("first_index")?,
                prev_term: r.u64("prev_term")?,
            })
        }
        RecordType::Entry => {
            let index = r.u64("entry index")?;
            let term = r.u64("entry term")?;
            let kind_byte = r.take(1, "entry kind")?[0];
            let kind = EntryKind::from_u8(kind_byte).ok_or(FrameError::BadPayload("entry kind"))?;
            // The one copy out of the segment's buffer; clones of the entry share it.
            let payload = Bytes::copy_from_slice(std::mem::take(&mut r.bytes));
            Record::Entry(Entry {
                index,
                term,
                kind,
                payload,
            })
        }
        RecordType::HardState => {
            let term = r.u64("term")?;
            let vote = r.u64("vote")?;
            let commit = r.u64("commit")?;
            Record::HardState(HardState {
                term,
                vote: (vote != 0).then_some(vote),
                commit,
            })
        }
        RecordType::SnapshotMarker => {
            let index = r.u64("snapshot index")?;
            let term = r.u64("snapshot term")?;
            let voters = decode_ids(&mut r)?;
            let learners = decode_ids(&mut r)?;
            let mut membership = Membership {
                voters,
                learners,
                ..Membership::default()
            };
            // The joint half and addresses (absent in the older form of the record).
            membership
                .decode_tail(std::mem::take(&mut r.bytes))
                .map_err(|_| FrameError::BadPayload("snapshot marker membership"))?;
            Record::SnapshotMarker(SnapshotMeta {
                index,
                term,
                membership,
            })
        }
        RecordType::Truncate => Record::Truncate {
            from_index: r.u64("from_index")?,
            prev_term: r.u64("prev_term")?,
        },
        RecordType::Reset => Record::Reset {
            next_index: r.u64("next_index")?,
            prev_term: r.u64("prev_term")?,
        },
    };
    r.finish("trailing payload bytes")?;
    Ok(record)
}

/// A record found at some offset, with its type and extent, payload not yet decoded.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    pub rtype: RecordType,
    pub payload: &'a [u8],
    /// Total bytes (header plus payload).
    pub len: usize,
}

impl<'a> Frame<'a> {
    /// Decodes the payload.
    pub fn decode(&self) -> Result<Record, FrameError> {
        decode_payload(self.rtype, self.payload)
    }

    /// For an entry frame: (index, term) without copying the command.
    pub fn entry_index_term(&self) -> Result<(u64, u64), FrameError> {
        let mut r = Reader {
            bytes: self.payload,
        };
        let index = r.u64("entry index")?;
        let term = r.u64("entry term")?;
        let kind = r.take(1, "entry kind")?[0];
        EntryKind::from_u8(kind).ok_or(FrameError::BadPayload("entry kind"))?;
        Ok((index, term))
    }
}

/// Checks the record framed at the start of `bytes` (a segment with sequence `seq`).
///
/// The length is checked against `record_bytes_max` and against what remains **before**
/// anything is read or allocated for the payload.
pub fn read_frame(bytes: &[u8], seq: u64, record_bytes_max: u64) -> Result<Frame<'_>, FrameError> {
    if bytes.len() < HEADER_BYTES {
        if bytes.iter().all(|b| *b == 0) {
            return Err(FrameError::Zero);
        }
        return Err(FrameError::Short {
            needed: HEADER_BYTES as u64,
            available: bytes.len() as u64,
        });
    }
    let header = &bytes[..HEADER_BYTES];
    if header.iter().all(|b| *b == 0) {
        return Err(FrameError::Zero);
    }
    let len = u64::from(u32::from_le_bytes([
        header[0], header[1], header[2], header[3],
    ]));
    let rtype = RecordType::from_u8(header[4]).ok_or(FrameError::BadType(header[4]))?;
    if header[5..8] != [0, 0, 0] {
        return Err(FrameError::BadReserved);
    }
    if len > record_bytes_max {
        return Err(FrameError::TooLong {
            len_bytes: len,
            bytes_max: record_bytes_max,
        });
    }
    let available = (bytes.len() - HEADER_BYTES) as u64;
    if len > available {
        return Err(FrameError::Short {
            needed: HEADER_BYTES as u64 + len,
            available: bytes.len() as u64,
        });
    }
    let payload = &bytes[HEADER_BYTES..HEADER_BYTES + len as usize];
    let stored = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    let computed = crc(seq, &header[..8], payload);
    if stored != computed {
        return Err(FrameError::BadCrc { stored, computed });
    }
    Ok(Frame {
        rtype,
        payload,
        len: HEADER_BYTES + len as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_record_type_round_trips() {
        let records = vec![
            Record::SegmentHeader(SegmentHeader {
                seq: 9,
                first_index: 100,
                prev_term: 4,
            }),
            Record::Entry(Entry {
                index: 100,
                term: 5,
                kind: EntryKind::Normal,
                payload: b"cmd".to_vec().into(),
            }),
            Record::HardState(HardState {
                term: 5,
                vote: Some(2),
                commit: 99,
            }),
            Record::SnapshotMarker(SnapshotMeta {
                index: 50,
                term: 3,
                membership: Membership::with_voters([1, 2, 3]),
            }),
            Record::Truncate {
                from_index: 98,
                prev_term: 4,
            },
            Record::Reset {
                next_index: 200,
                prev_term: 6,
            },
        ];
        let mut buf = Vec::new();
        for r in &records {
            match r {
                Record::SegmentHeader(h) => encode_segment_header(&mut buf, h),
                Record::Entry(e) => encode_entry(&mut buf, 9, e),
                Record::HardState(h) => encode_hard_state(&mut buf, 9, h),
                Record::SnapshotMarker(m) => encode_snapshot_marker(&mut buf, 9, m),
                Record::Truncate {
                    from_index,
                    prev_term,
                } => encode_truncate(&mut buf, 9, *from_index, *prev_term),
                Record::Reset {
                    next_index,
                    prev_term,
                } => encode_reset(&mut buf, 9, *next_index, *prev_term),
            }
        }
        let mut at = 0;
        for want in &records {
            let frame = read_frame(&buf[at..], 9, 1 << 20).unwrap();
            assert_eq!(&frame.decode().unwrap(), want);
            at += frame.len;
        }
        assert_eq!(at, buf.len());
    }

    #[test]
    fn crc_is_bound_to_the_segment_seq() {
        let mut buf = Vec::new();
        encode_hard_state(&mut buf, 1, &HardState::default());
        assert!(read_frame(&buf, 1, 1024).is_ok());
        assert!(matches!(
            read_frame(&buf, 2, 1024),
            Err(FrameError::BadCrc { .. })
        ));
    }

    #[test]
    fn lengths_are_checked_before_reading() {
        let mut buf = Vec::new();
        encode_entry(
            &mut buf,
            0,
            &Entry {
                index: 1,
                term: 1,
                kind: EntryKind::Normal,
                payload: vec![7; 100].into(),
            },
        );
        assert!(matches!(
            read_frame(&buf, 0, 50),
            Err(FrameError::TooLong { .. })
        ));
        assert!(matches!(
            read_frame(&buf[..60], 0, 1024),
            Err(FrameError::Short { .. })
        ));
        assert_eq!(
            read_frame(&[0u8; 40], 0, 1024).unwrap_err(),
            FrameError::Zero
        );
    }
}
