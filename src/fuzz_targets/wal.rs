//! The `wal_record` target: one WAL segment's bytes through the record decoder
//! (`storage::wal::record`) and the segment scanner (`storage::wal::scan::scan_dir`) that
//! recovery runs on every start.
//!
//! Input: a mode byte (bit 0: repair every record's CRC, so payload parsing and replay rules
//! are reached), then the segment file's bytes. The file is named after the segment header
//! it starts with (when it has one), so the scanner gets past the name check.

use crate::storage::vfs::{SimFs, Vfs};
use crate::storage::wal::record::{self, Record, HEADER_BYTES};
use crate::storage::wal::scan::{self, ScanOptions};
use std::path::Path;

/// The record limit the target scans with (the WAL's own default is larger; a smaller one
/// lets the fuzzer reach the "too long" path with short inputs).
const RECORD_BYTES_MAX: u64 = 1 << 20;

/// Fuzz body: decode every record, re-encode what decodes, then scan the segment.
pub fn wal_record(data: &[u8]) {
    let Some((repair, bytes)) = super::split_mode(data) else {
        return;
    };
    let mut segment = bytes.to_vec();
    let (seq, first_index) = header_fields(&segment).unwrap_or((1, 1));
    if repair {
        repair_crcs(&mut segment, seq);
    }
    check_records(&segment, seq);
    check_scan(segment, seq, first_index);
}

/// (seq, first_index) of a segment header record at the start of `segment`, checksum unread.
fn header_fields(segment: &[u8]) -> Option<(u64, u64)> {
    let payload = segment.get(HEADER_BYTES..HEADER_BYTES + 36)?;
    if segment[4] != 1 {
        return None;
    }
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&payload[at..at + 8]);
        u64::from_le_bytes(b)
    };
    Some((u64_at(12), u64_at(20)))
}

/// Rewrites the CRC of every record whose length fits, walking records from the start.
fn repair_crcs(segment: &mut [u8], seq: u64) {
    let mut at = 0usize;
    while segment.len() - at >= HEADER_BYTES {
        let mut len_bytes = [0u8; 4];
        len_bytes.copy_from_slice(&segment[at..at + 4]);
        let len = u32::from_le_bytes(len_bytes) as usize;
        if len > segment.len() - at - HEADER_BYTES {
            return;
        }
        let payload_end = at + HEADER_BYTES + len;
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&seq.to_le_bytes());
        hasher.update(&segment[at..at + 8]);
        hasher.update(&segment[at + HEADER_BYTES..payload_end]);
        let sum = hasher.finalize().to_le_bytes();
        segment[at + 8..at + HEADER_BYTES].copy_from_slice(&sum);
        at = payload_end;
    }
}

/// Frames and decodes records until the first that does not; each decoded record must
/// survive its encoder.
fn check_records(segment: &[u8], seq: u64) {
    let mut at = 0usize;
    while let Ok(frame) = record::read_frame(&segment[at..], seq, RECORD_BYTES_MAX) {
        assert!(
            frame.len >= HEADER_BYTES && frame.len <= segment.len() - at,
            "a frame stays inside the bytes it was read from"
        );
        let decoded = frame.decode();
        if frame.rtype == record::RecordType::Entry {
            let fast = frame.entry_index_term();
            match (&decoded, &fast) {
                (Ok(Record::Entry(e)), Ok((index, term))) => {
                    assert_eq!(
                        (e.index, e.term),
                        (*index, *term),
                        "the two entry decoders agree"
                    )
                }
                (Err(_), Err(_)) => {}
                other => panic!("the two entry decoders disagree: {other:?}"),
            }
        }
        if let Ok(rec) = decoded {
            assert_round_trip(&rec, seq);
        }
        at += frame.len;
    }
}

/// Encodes `rec` as segment `seq` would hold it, and checks it decodes back to itself.
fn assert_round_trip(rec: &Record, seq: u64) {
    let mut buf = Vec::new();
    let mut read_seq = seq;
    match rec {
        Record::SegmentHeader(h) => {
            record::encode_segment_header(&mut buf, h);
            read_seq = h.seq;
        }
        Record::Entry(e) => record::encode_entry(&mut buf, seq, e),
        Record::HardState(hs) => record::encode_hard_state(&mut buf, seq, hs),
        Record::SnapshotMarker(m) => record::encode_snapshot_marker(&mut buf, seq, m),
        Record::Truncate {
            from_index,
            prev_term,
        } => record::encode_truncate(&mut buf, seq, *from_index, *prev_term),
        Record::Reset {
            next_index,
            prev_term,
        } => record::encode_reset(&mut buf, seq, *next_index, *prev_term),
    }
    let frame = match record::read_frame(&buf, read_seq, u64::MAX) {
        Ok(frame) => frame,
        Err(e) => panic!("a re-encoded {rec:?} does not frame: {e}"),
    };
    assert_eq!(frame.len, buf.len(), "one record re-encodes as one frame");
    match frame.decode() {
        Ok(again) => assert_eq!(&again, rec, "a record survives its encoder"),
        Err(e) => panic!("a re-encoded {rec:?} does not decode: {e}"),
    }
}

/// Scans the segment as recovery would, and checks what the scan reports stays inside it.
fn check_scan(segment: Vec<u8>, seq: u64, first_index: u64) {
    let vfs = SimFs::new();
    let dir = Path::new("/wal");
    let path = dir.join(scan::segment_file_name(seq, first_index));
    let file_bytes = segment.len() as u64;
    let written = vfs
        .open(&path, true)
        .and_then(|file| file.write_all_at(&segment, 0));
    assert!(written.is_ok(), "the simulated disk has no faults set");
    let scanned = match scan::scan_dir(
        &vfs,
        dir,
        ScanOptions {
            record_bytes_max: RECORD_BYTES_MAX,
        },
    ) {
        Ok(scanned) => scanned,
        Err(e) => panic!("scanning a readable segment is not an I/O error: {e}"),
    };
    assert_eq!(scanned.segments.len(), 1, "the one segment is scanned");
    assert!(scanned.segments[0].used_bytes <= file_bytes);
    if let Some(tail) = &scanned.torn_tail {
        assert!(
            tail.offset + tail.bytes <= file_bytes,
            "a torn tail lies inside the file"
        );
    }
    let log = &scanned.log;
    for pair in log.locs.windows(2) {
        assert!(
            pair[0].term <= pair[1].term,
            "replayed terms never decrease"
        );
    }
    for loc in &log.locs {
        assert!(
            loc.offset + u64::from(loc.len) <= file_bytes,
            "an entry lies inside the file"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_of(segment: &[u8], seq: u64, first_index: u64) -> scan::Scan {
        let vfs = SimFs::new();
        let dir = Path::new("/wal");
        let path = dir.join(scan::segment_file_name(seq, first_index));
        vfs.open(&path, true)
            .and_then(|f| f.write_all_at(segment, 0))
            .unwrap();
        scan::scan_dir(
            &vfs,
            dir,
            ScanOptions {
                record_bytes_max: RECORD_BYTES_MAX,
            },
        )
        .unwrap()
    }

    #[test]
    fn repair_makes_a_damaged_record_valid_again() {
        let seeds = crate::fuzz_targets::seeds::seeds("wal_record");
        let stale = seeds.iter().find(|s| s[0] == 1).unwrap();
        let mut segment = stale[1..].to_vec();
        let (seq, first_index) = header_fields(&segment).unwrap();
        assert!(scan_of(&segment, seq, first_index).torn_tail.is_some());
        repair_crcs(&mut segment, seq);
        let repaired = scan_of(&segment, seq, first_index);
        assert!(repaired.torn_tail.is_none() && repaired.corruption.is_none());
        assert_eq!(repaired.log.last_index(), 21);
    }
}
