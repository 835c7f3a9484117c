//! The data dir's identity file, `<data-dir>/raftkv.id`: which cluster and node it belongs to.
//!
//! A node started with flags naming another node id or cluster than its data dir refuses to
//! start: serving another member's log under a new name could make it vote twice in a term.
//! The file is written once, atomically, when the node first bootstraps — or first joins a
//! running cluster (`serve --join`), which it records: a joined node whose data dir is still
//! empty must join again, never bootstrap a cluster of its own (its first log entry would
//! then differ from the cluster's at the same index and term).

use serde::{Deserialize, Serialize};
use std::path::Path;

/// The identity file's name inside a data dir.
pub const IDENTITY_FILE: &str = "raftkv.id";

/// Who a data dir belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub cluster_id: String,
    pub node_id: u64,
    /// Created by `serve --join` rather than by bootstrapping.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub joined: bool,
}

/// Why the identity check failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a valid identity file: {why}")]
    Invalid { path: String, why: String },
    #[error("{dir} holds node data ({found}) but no {IDENTITY_FILE}: it may belong to another node or cluster, so it is not adopted. Restore {IDENTITY_FILE} (JSON: {{\"cluster_id\": ..., \"node_id\": ...}}) if you know whose data this is, or start with an empty data dir")]
    Missing { dir: String, found: String },
    #[error("the data dir {dir} belongs to node {found_node} of cluster {found_cluster:?}, not node {node} of cluster {cluster:?}")]
    Mismatch {
        dir: String,
        found_node: u64,
        found_cluster: String,
        node: u64,
        cluster: String,
    },
}

/// Reads the identity of `data_dir`, if it has one.
pub fn read(data_dir: &Path) -> Result<Option<Identity>, IdentityError> {
    let path = data_dir.join(IDENTITY_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(IdentityError::Io {
                path: path.display().to_string(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| IdentityError::Invalid {
            path: path.display().to_string(),
            why: e.to_string(),
        })
}

/// Checks `data_dir` belongs to `want` (same cluster and node), writing the identity if the
/// dir has none yet. Returns the identity the dir holds (`joined` as first written).
pub fn check_or_write(data_dir: &Path, want: &Identity) -> Result<Identity, IdentityError> {
    match read(data_dir)? {
        Some(found) if found.cluster_id == want.cluster_id && found.node_id == want.node_id => {
            Ok(found)
        }
        Some(found) => Err(IdentityError::Mismatch {
            dir: data_dir.display().to_string(),
            found_node: found.node_id,
            found_cluster: found.cluster_id,
            node: want.node_id,
            cluster: want.cluster_id.clone(),
        }),
        None => {
            if let Some(found) = existing_node_data(data_dir) {
                return Err(IdentityError::Missing {
                    dir: data_dir.display().to_string(),
                    found,
                });
            }
            let io = |source| IdentityError::Io {
                path: data_dir.join(IDENTITY_FILE).display().to_string(),
                source,
            };
            std::fs::create_dir_all(data_dir).map_err(io)?;
            let bytes = serde_json::to_vec_pretty(want).map_err(|e| IdentityError::Invalid {
                path: IDENTITY_FILE.into(),
                why: e.to_string(),
            })?;
            raftkv_storage::vfs::write_file_atomic(
                &raftkv_storage::vfs::StdFs,
                data_dir,
                IDENTITY_FILE,
                &bytes,
            )
            .map_err(io)?;
            Ok(want.clone())
        }
    }
}

/// What node data `data_dir` already holds (WAL, state machine or snapshot dirs that are not
/// empty), if any: such data without an identity file is never adopted silently.
fn existing_node_data(data_dir: &Path) -> Option<String> {
    use raftkv_storage::node_storage::{SM_DIR_NAME, WAL_DIR_NAME};
    use raftkv_storage::snapshot::SNAP_DIR_NAME;
    let found: Vec<&str> = [WAL_DIR_NAME, SM_DIR_NAME, SNAP_DIR_NAME]
        .into_iter()
        .filter(|name| {
            std::fs::read_dir(data_dir.join(name))
                .map(|mut entries| entries.next().is_some())
                .unwrap_or(false)
        })
        .collect();
    (!found.is_empty()).then(|| format!("{}/ not empty", found.join("/, ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_once_then_checked() {
        let dir = tempfile::tempdir().unwrap();
        let me = Identity {
            cluster_id: "c".into(),
            node_id: 2,
            joined: true,
        };
        check_or_write(dir.path(), &me).unwrap();
        // `joined` is what was first written, whatever the later start says.
        let again = Identity {
            joined: false,
            ..me.clone()
        };
        assert!(check_or_write(dir.path(), &again).unwrap().joined);
        let other = Identity {
            node_id: 3,
            ..me.clone()
        };
        let err = check_or_write(dir.path(), &other).unwrap_err();
        assert!(err.to_string().contains("belongs to node 2"), "{err}");
        std::fs::write(dir.path().join(IDENTITY_FILE), b"{not json").unwrap();
        assert!(matches!(
            read(dir.path()),
            Err(IdentityError::Invalid { .. })
        ));
    }

    #[test]
    fn data_without_an_identity_file_is_not_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let me = Identity {
            cluster_id: "c".into(),
            node_id: 2,
            joined: false,
        };
        // Empty subdirectories are not data: a fresh start that made them may be retried.
        std::fs::create_dir_all(dir.path().join("wal")).unwrap();
        check_or_write(dir.path(), &me).unwrap();
        std::fs::remove_file(dir.path().join(IDENTITY_FILE)).unwrap();
        std::fs::write(dir.path().join("wal").join("0000.wal"), b"x").unwrap();
        let err = check_or_write(dir.path(), &me).unwrap_err();
        assert!(matches!(err, IdentityError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("wal/ not empty"), "{err}");
        assert!(
            !dir.path().join(IDENTITY_FILE).exists(),
            "no identity may be written for data of unknown origin"
        );
    }
}
