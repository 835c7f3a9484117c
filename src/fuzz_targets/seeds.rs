//! Valid inputs for every fuzz target, built with the real encoders: the fuzzers start from
//! them (`cargo run --release --example fuzz_seeds -- fuzz/corpus`) and the replay test runs
//! them on every `cargo test`, so a format change that breaks a seed shows at once.

use crate::node::peer::{PeerMessage, SnapshotChunk};
use crate::raft::{Message, MessageBody};
use crate::storage::command::Command;
use crate::storage::snapshot::format::SnapshotFileWriter;
use crate::storage::vfs::{SimFs, Vfs};
use crate::storage::wal::record::{self, SegmentHeader};
use crate::storage::{Entry, EntryKind, HardState, Membership, SnapshotMeta};
use crate::transport::frame::encode_frame;
use std::path::Path;

/// The seeds of target `name` (empty for an unknown name).
pub fn seeds(name: &str) -> Vec<Vec<u8>> {
    match name {
        "wal_record" => wal_seeds(),
        "command" => commands().iter().map(encode_command).collect(),
        "snapshot_file" => snapshot_seeds(),
        "peer_frame" => peer_seeds(),
        "peer_handshake" => handshake_seeds(),
        "http_request" => http_seeds(),
        _ => Vec::new(),
    }
}

fn commands() -> Vec<Command> {
    vec![
        Command::Put {
            key: b"user/1".to_vec(),
            value: b"{\"name\":\"ada\"}".to_vec(),
        },
        Command::Put {
            key: "clé".as_bytes().to_vec(),
            value: Vec::new(),
        },
        Command::Delete {
            key: b"user/1".to_vec(),
        },
    ]
}

fn encode_command(c: &Command) -> Vec<u8> {
    c.encode().unwrap_or_default()
}

fn entry(index: u64, term: u64, kind: EntryKind, payload: Vec<u8>) -> Entry {
    Entry {
        index,
        term,
        kind,
        payload: payload.into(),
    }
}

/// Segments with every record type: valid, with a torn tail, and with a stale CRC that the
/// repair mode fixes. Each is prefixed with its mode byte.
fn wal_seeds() -> Vec<Vec<u8>> {
    let seq = 3;
    let mut seg = Vec::new();
    record::encode_segment_header(
        &mut seg,
        &SegmentHeader {
            seq,
            first_index: 10,
            prev_term: 1,
        },
    );
    let header_only = seg.clone();
    for (i, c) in commands().iter().enumerate() {
        let e = entry(10 + i as u64, 2, EntryKind::Normal, encode_command(c));
        record::encode_entry(&mut seg, seq, &e);
    }
    record::encode_entry(&mut seg, seq, &entry(13, 3, EntryKind::Noop, Vec::new()));
    let hs = HardState {
        term: 3,
        vote: Some(2),
        commit: 12,
    };
    record::encode_hard_state(&mut seg, seq, &hs);
    record::encode_truncate(&mut seg, seq, 13, 2);
    let meta = snapshot_meta(20, 4);
    record::encode_snapshot_marker(&mut seg, seq, &meta);
    record::encode_reset(&mut seg, seq, 21, 4);
    record::encode_entry(&mut seg, seq, &entry(21, 4, EntryKind::Noop, Vec::new()));
    let mut torn = seg.clone();
    torn.extend_from_slice(&[0x20, 0, 0, 0, 2, 0, 0, 0, 1, 2]);
    torn.resize(torn.len() + 64, 0);
    // The last record (an empty noop entry) with a stale CRC: a torn tail until repaired.
    let mut stale = seg.clone();
    let last_crc = stale.len() - record::ENTRY_OVERHEAD_BYTES + 8;
    stale[last_crc] ^= 0x40;
    vec![
        [&[0u8][..], &header_only].concat(),
        [&[0u8][..], &seg].concat(),
        [&[0u8][..], &torn].concat(),
        [&[1u8][..], &stale].concat(),
    ]
}

fn snapshot_meta(index: u64, term: u64) -> SnapshotMeta {
    SnapshotMeta {
        index,
        term,
        membership: Membership {
            voters: [1, 2, 3].into_iter().collect(),
            learners: [4].into_iter().collect(),
            ..Membership::default()
        },
    }
}

/// Snapshot files: empty, one chunk of pairs, several small chunks (mode byte first).
fn snapshot_seeds() -> Vec<Vec<u8>> {
    let pairs: Vec<(String, String)> = (0..5)
        .map(|i| (format!("key/{i:02}"), "v".repeat(i * 3)))
        .collect();
    [(0usize, 1024usize, 0u8), (5, 1024, 0), (5, 24, 1)]
        .iter()
        .filter_map(|&(n, chunk_target_bytes, mode)| {
            let vfs = SimFs::new();
            let path = Path::new("/snap/seed.snap");
            let file = vfs.open(path, true).ok()?;
            let mut w =
                SnapshotFileWriter::new(file, snapshot_meta(42, 7), chunk_target_bytes).ok()?;
            for (k, v) in &pairs[..n] {
                w.push(k.as_bytes(), v.as_bytes()).ok()?;
            }
            w.finish().ok()?;
            let bytes = vfs.read(path).ok()?;
            Some([&[mode][..], &bytes].concat())
        })
        .collect()
}

fn raft(body: MessageBody) -> PeerMessage {
    PeerMessage::Raft(Message {
        from: 1,
        to: 2,
        term: 5,
        body,
    })
}

/// One frame per message kind, and all of them as one stream (mode byte first).
fn peer_seeds() -> Vec<Vec<u8>> {
    let entries = vec![
        entry(8, 5, EntryKind::Normal, encode_command(&commands()[0])),
        entry(9, 5, EntryKind::Noop, Vec::new()),
    ];
    let messages = vec![
        raft(MessageBody::Append {
            prev_index: 7,
            prev_term: 4,
            entries,
            commit: 6,
        }),
        raft(MessageBody::AppendResponse {
            reject: true,
            index: 7,
            hint: Some((5, 3)),
        }),
        raft(MessageBody::Heartbeat {
            commit: 6,
            read_round: 11,
            lease_ms: 0,
        }),
        raft(MessageBody::HeartbeatResponse { read_round: 11 }),
        raft(MessageBody::Vote {
            pre: true,
            last_index: 9,
            last_term: 5,
            transfer: false,
        }),
        raft(MessageBody::VoteResponse {
            pre: true,
            granted: true,
        }),
        raft(MessageBody::InstallSnapshot {
            meta: snapshot_meta(20, 4),
        }),
        raft(MessageBody::TimeoutNow),
        PeerMessage::SnapshotChunk(SnapshotChunk {
            term: 5,
            meta: snapshot_meta(20, 4),
            file_name: "snap-20-4.snap".into(),
            offset: 0,
            total_bytes: 8,
            data: b"RKVSNAP1".to_vec(),
        }),
    ];
    let mut seeds = Vec::new();
    let mut stream = vec![0u8];
    for m in &messages {
        let mut frame = vec![0u8];
        if encode_frame(&mut frame, m, u32::MAX).is_ok() {
            stream.extend_from_slice(&frame[1..]);
            seeds.push(frame);
        }
    }
    seeds.push(stream);
    seeds
}

/// Requests for every route, well-formed and not, and a pipelined connection.
fn http_seeds() -> Vec<Vec<u8>> {
    let put = "PUT /kv/a%2Fb HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
               content-length: 15\r\n\r\n{\"value\":\"one\"}";
    let requests = [
        put.to_string(),
        "GET /kv/a%2Fb?consistency=stale HTTP/1.1\r\nhost: x\r\n\r\n".into(),
        "DELETE /kv/a HTTP/1.1\r\nhost: x\r\n\r\n".into(),
        "GET /kv?prefix=a&limit=2&consistency=lease HTTP/1.1\r\nhost: x\r\n\r\n".into(),
        "GET /cluster/status HTTP/1.1\r\nhost: x\r\n\r\n".into(),
        "POST /cluster/transfer-leader HTTP/1.1\r\nhost: x\r\ncontent-length: 8\r\n\r\n{\"to\":2}"
            .into(),
        "GET /cluster/members HTTP/1.1\r\nhost: x\r\n\r\n".into(),
        "POST /cluster/members HTTP/1.1\r\nhost: x\r\ncontent-length: 75\r\n\r\n\
         {\"id\":4,\"peer_addr\":\"n4:9004\",\"client_url\":\"http://n4:8004\",\"learner\":true}"
            .into(),
        "POST /cluster/members/4/promote?force=true HTTP/1.1\r\nhost: x\r\n\r\n".into(),
        "DELETE /cluster/members/4 HTTP/1.1\r\nhost: x\r\n\r\n".into(),
        "GET /health HTTP/1.1\r\nhost: x\r\n\r\n".into(),
        "GET /ready HTTP/1.1\r\nhost: x\r\n\r\n".into(),
        "HEAD /kv/a HTTP/1.1\r\nhost: x\r\n\r\n".into(),
        "PUT /kv/k HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
         5\r\n{\"val\r\na\r\nue\":\"xy\"}\r\n0\r\n\r\n"
            .into(),
        "PUT /kv/k HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n[]"
            .into(),
        "GET /nope HTTP/1.0\r\n\r\n".into(),
        "BREW /kv/%ZZ HTTP/1.1\r\n\r\n".into(),
        format!("{put}GET /kv/a%2Fb HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
    ];
    requests.into_iter().map(String::into_bytes).collect()
}

/// A well-formed `Hello` from the configured dialer (mode 0: no secret, so it is accepted and
/// the rest is up to the fuzzer; mode 1: the acceptor has a secret), one from a stranger, and
/// one with a wrong protocol version.
fn handshake_seeds() -> Vec<Vec<u8>> {
    use super::handshake::{ACCEPTOR_ID, CLUSTER_ID, DIALER_ID};
    use crate::transport::handshake::Hello;
    let hello = |version: u32, from: u64| Hello {
        version,
        cluster_id: CLUSTER_ID.into(),
        from,
        to: ACCEPTOR_ID,
        nonce: [7; crate::transport::auth::NONCE_BYTES],
    };
    let mut seeds = Vec::new();
    for (mode, h) in [
        (0u8, hello(crate::transport::PROTOCOL_VERSION, DIALER_ID)),
        (1, hello(crate::transport::PROTOCOL_VERSION, DIALER_ID)),
        (0, hello(crate::transport::PROTOCOL_VERSION, 9)),
        (0, hello(1, DIALER_ID)),
    ] {
        let mut bytes = vec![mode];
        if crate::transport::frame::encode_frame(&mut bytes, &h, 4096).is_ok() {
            seeds.push(bytes);
        }
    }
    seeds
}
