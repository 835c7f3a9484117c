use super::*;
use crate::node::NodeConfig;
use raftkv_storage::node_storage::NodeStorage;
use raftkv_storage::snapshot::backup::BackupWriter;
use raftkv_storage::snapshot::format::SnapshotFileWriter;
use raftkv_storage::{HardState, SnapshotMeta};
use std::sync::Arc;

const OLD: &str = "old";
const NEW: &str = "new";

fn pairs() -> Vec<(String, String)> {
    (0..500)
        .map(|i| (format!("user/{i:04}"), format!("value-{i}")))
        .collect()
}

/// A backup of cluster `OLD` at index 700, term 4, voters {1, 2, 3}, holding `pairs()`.
fn backup_in(dir: &Path) -> PathBuf {
    let snap = dir.join("snap.bin");
    let meta = SnapshotMeta {
        index: 700,
        term: 4,
        membership: Membership::with_voters([1, 2, 3]),
    };
    let mut w = SnapshotFileWriter::new(StdFs.open(&snap, true).unwrap(), meta, 4096).unwrap();
    for (k, v) in pairs() {
        let (key, record) = raftkv_storage::sm::snapshot_pair(k.as_bytes(), v.as_bytes(), 700);
        w.push(&key, &record).unwrap();
    }
    w.finish().unwrap();
    let path = dir.join("backup.rkv");
    let mut b = BackupWriter::create(Arc::new(StdFs), &path, OLD, 1, 1 << 30).unwrap();
    b.write(&std::fs::read(&snap).unwrap()).unwrap();
    b.finish().unwrap();
    path
}

fn request(backup: &Path, data_dir: &Path, id: NodeId) -> RestoreRequest {
    RestoreRequest {
        backup: backup.to_path_buf(),
        data_dir: data_dir.to_path_buf(),
        id,
        peers: [4, 5, 6].into_iter().filter(|p| *p != id).collect(),
        cluster_id: NEW.into(),
    }
}

fn node_config(data_dir: &Path, id: NodeId) -> NodeConfig {
    NodeConfig {
        id,
        cluster_id: NEW.into(),
        data_dir: data_dir.to_path_buf(),
        peers: [4, 5, 6]
            .into_iter()
            .filter(|p| *p != id)
            .map(|p| (p, format!("127.0.0.1:{}", 9000 + p)))
            .collect(),
        heartbeat_ms: 50,
        election_timeout_ms: 300,
        ..NodeConfig::default()
    }
}

#[test]
fn a_restored_dir_restarts_as_a_member_of_the_new_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let backup = backup_in(tmp.path());
    for id in [4, 5, 6] {
        let dir = tmp.path().join(format!("node{id}"));
        let restored = restore(&request(&backup, &dir, id)).unwrap();
        assert_eq!(restored.backup.header.cluster_id, OLD);
        assert_eq!(restored.storage.key_count, 500);
        assert!(!tmp.path().join(format!(".node{id}.restoring")).exists());
        let who = identity::read(&dir).unwrap().unwrap();
        assert_eq!((who.cluster_id.as_str(), who.node_id), (NEW, id));

        let storage = NodeStorage::open(&dir, NodeStorageOptions::default()).unwrap();
        let wal = storage.wal();
        let marker = wal.snapshot().unwrap();
        assert_eq!((marker.index, marker.term), (700, 4));
        assert_eq!(marker.membership, Membership::with_voters([4, 5, 6]));
        let hard_state = HardState {
            term: 4,
            vote: None,
            commit: 700,
        };
        assert_eq!(wal.hard_state(), hard_state);
        assert_eq!((wal.first_index(), wal.last_index()), (701, 700));
        assert_eq!(storage.sm().applied(), marker.clone());
        assert_eq!(storage.recovery().replayed_entries, 0);
        for (k, v) in pairs().iter().step_by(37) {
            let got = storage.sm().get(k.as_bytes()).unwrap().value;
            assert_eq!(got.as_deref(), Some(v.as_bytes()), "{k}");
        }
        // What `raftkv serve` does next: not a fresh bootstrap, a restart from the marker.
        let config = node_config(&dir, id);
        let raft = crate::node::consensus::open_core(
            config.raft_config(),
            crate::node::consensus::Start::Bootstrap(config.membership()),
            &storage,
            1,
        )
        .unwrap();
        assert_eq!((raft.term(), raft.commit_index()), (4, 700));
        assert_eq!(raft.membership(), &Membership::with_voters([4, 5, 6]));
        identity::check_or_write(
            &dir,
            &Identity {
                cluster_id: NEW.into(),
                node_id: id,
                joined: false,
            },
        )
        .unwrap();
    }
}

#[test]
fn a_non_empty_dir_is_refused_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let backup = backup_in(tmp.path());
    let dir = tmp.path().join("node4");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("keep-me"), b"x").unwrap();
    let err = restore(&request(&backup, &dir, 4)).unwrap_err();
    assert!(matches!(err, RestoreError::NotEmpty { .. }), "{err}");
    assert!(err.to_string().contains("keep-me"), "{err}");
    assert_eq!(std::fs::read(dir.join("keep-me")).unwrap(), b"x");
    assert!(!dir.join("raftkv.id").exists());
    // An empty one is fine: it is replaced.
    let empty = tmp.path().join("node5");
    std::fs::create_dir_all(&empty).unwrap();
    restore(&request(&backup, &empty, 5)).unwrap();
    assert!(empty.join("raftkv.id").exists());
}

#[test]
fn a_damaged_backup_is_refused_with_its_location_and_builds_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let backup = backup_in(tmp.path());
    let mut bytes = std::fs::read(&backup).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x40;
    std::fs::write(&backup, &bytes).unwrap();
    let dir = tmp.path().join("node4");
    let err = restore(&request(&backup, &dir, 4)).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, RestoreError::Backup(_)), "{text}");
    assert!(
        text.contains("corrupt at byte") && text.contains("chunk"),
        "{text}"
    );
    assert!(!dir.exists());
    assert!(!tmp.path().join(".node4.restoring").exists());
}

#[test]
fn settings_and_the_old_cluster_id_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let backup = backup_in(tmp.path());
    let dir = tmp.path().join("node4");
    let mut same = request(&backup, &dir, 4);
    same.cluster_id = OLD.into();
    assert!(matches!(
        restore(&same),
        Err(RestoreError::SameClusterId(_))
    ));
    let mut zero = request(&backup, &dir, 4);
    zero.id = 0;
    assert!(matches!(restore(&zero), Err(RestoreError::Config(_))));
    let mut own = request(&backup, &dir, 4);
    own.peers.insert(4);
    assert!(matches!(restore(&own), Err(RestoreError::Config(_))));
    assert!(!dir.exists());
}

#[test]
fn the_staging_dir_of_an_interrupted_restore_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let backup = backup_in(tmp.path());
    let staging = tmp.path().join(".node4.restoring");
    std::fs::create_dir_all(staging.join("wal")).unwrap();
    std::fs::write(staging.join("wal").join("junk"), b"x").unwrap();
    let dir = tmp.path().join("node4");
    restore(&request(&backup, &dir, 4)).unwrap();
    assert!(!staging.exists());
    assert!(!dir.join("wal").join("junk").exists());
    NodeStorage::open(&dir, NodeStorageOptions::default()).unwrap();
}
