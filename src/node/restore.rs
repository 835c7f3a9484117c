//! Restoring a backup into a new member's data dir (`raftkv snapshot restore`).
//!
//! Every member of the new cluster is restored from the same backup file, each with its own
//! id and the same peer ids and new cluster id; `raftkv serve` with the same `--id`, `--peers`
//! and `--cluster-id` then starts from it (see `raftkv_storage::node_storage::restore` for what
//! the data dir holds). The new cluster id, which must differ from the backup's, keeps the old
//! cluster's nodes, which may still be running, from ever exchanging a message with the new
//! ones (the peer handshake refuses another cluster's id).
//!
//! Crash-safe: the file is verified first (a damaged one is refused with its location before
//! anything is written); the data dir is built in `.<name>.restoring` beside it — identity file,
//! state machine, WAL, each synced — and renamed into place at the end, then the parent
//! directory is synced. A crash leaves either no data dir or the complete one; a leftover
//! `.restoring` directory is removed by the next restore.

use super::identity::{self, Identity, IdentityError};
use raftkv_storage::node_storage::restore::{build_from_backup, RestoredStorage};
use raftkv_storage::node_storage::{NodeStorageError, NodeStorageOptions};
use raftkv_storage::snapshot::backup::{self, BackupError, VerifiedBackup};
use raftkv_storage::vfs::{StdFs, Vfs};
use raftkv_storage::{Membership, NodeId};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// What to restore, and as whom.
#[derive(Clone, Debug)]
pub struct RestoreRequest {
    /// The backup file (`raftkv snapshot save`).
    pub backup: PathBuf,
    /// The new member's data dir: absent or empty.
    pub data_dir: PathBuf,
    /// The new member's id.
    pub id: NodeId,
    /// The other members' ids (as in `serve --peers`).
    pub peers: BTreeSet<NodeId>,
    /// The new cluster's id.
    pub cluster_id: String,
}

impl RestoreRequest {
    /// All voters of the new cluster: this member and its peers.
    pub fn membership(&self) -> Membership {
        Membership::with_voters(self.peers.iter().copied().chain([self.id]))
    }

    /// Checks the settings, naming the bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.id == 0 {
            return Err("--id must not be 0".into());
        }
        if self.peers.contains(&self.id) {
            return Err(format!("--peers lists this node's own id {}", self.id));
        }
        backup::check_cluster_id(&self.cluster_id).map_err(|e| format!("--cluster-id: {e}"))
    }
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("invalid restore settings: {0}")]
    Config(String),
    #[error("{dir} is not empty ({found}): a backup is restored only into a new data dir")]
    NotEmpty { dir: PathBuf, found: String },
    #[error("I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// The new cluster id is the backup's: the old cluster's nodes could then talk to the
    /// new ones, and two histories would mix.
    #[error("the backup was saved from cluster {0:?}: restore it under a new --cluster-id, so the old cluster's nodes can never talk to the new ones")]
    SameClusterId(String),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("building the data dir: {0}")]
    Storage(#[from] NodeStorageError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a restore produced.
#[derive(Clone, Debug)]
pub struct Restored {
    /// The backup as verified (its cluster id is the old cluster's).
    pub backup: VerifiedBackup,
    pub storage: RestoredStorage,
}

/// The first few names in `dir`, sorted, if it exists and holds anything.
fn occupied(dir: &Path) -> Result<Option<String>, RestoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut names: Vec<String> = entries
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .map_err(io_err(dir))?;
    if names.is_empty() {
        return Ok(None);
    }
    names.sort();
    let shown = names.len().min(5);
    let more = if names.len() > shown { ", ..." } else { "" };
    Ok(Some(format!("holds {}{more}", names[..shown].join(", "))))
}

/// The directory a restore builds in before renaming it to `data_dir`.
fn staging_dir(data_dir: &Path) -> Result<PathBuf, RestoreError> {
    let name = data_dir.file_name().ok_or_else(|| {
        RestoreError::Config(format!("--data-dir {} has no name", data_dir.display()))
    })?;
    let parent = match data_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok(parent.join(format!(".{}.restoring", name.to_string_lossy())))
}

/// Verifies the backup, then builds the new member's data dir (see the module doc).
pub fn restore(req: &RestoreRequest) -> Result<Restored, RestoreError> {
    req.validate().map_err(RestoreError::Config)?;
    if req.data_dir.exists() && !req.data_dir.is_dir() {
        return Err(RestoreError::Config(format!(
            "--data-dir {} is not a directory",
            req.data_dir.display()
        )));
    }
    if let Some(found) = occupied(&req.data_dir)? {
        return Err(RestoreError::NotEmpty {
            dir: req.data_dir.clone(),
            found,
        });
    }
    let verified = backup::verify(&StdFs, &req.backup)?;
    if verified.header.cluster_id == req.cluster_id {
        return Err(RestoreError::SameClusterId(req.cluster_id.clone()));
    }
    let staging = staging_dir(&req.data_dir)?;
    if staging.exists() {
        tracing::warn!(dir = %staging.display(), "removing the staging dir of an interrupted restore");
        std::fs::remove_dir_all(&staging).map_err(io_err(&staging))?;
    }
    let built = build(req, &staging);
    let storage = match built {
        Ok(storage) => storage,
        Err(e) => {
            if let Err(rm) = std::fs::remove_dir_all(&staging) {
                tracing::warn!(dir = %staging.display(), error = %rm, "could not remove the staging dir of a failed restore");
            }
            return Err(e);
        }
    };
    publish(&staging, &req.data_dir)?;
    Ok(Restored {
        backup: verified,
        storage,
    })
}

/// Identity file, state machine and WAL in `staging`, every directory synced.
fn build(req: &RestoreRequest, staging: &Path) -> Result<RestoredStorage, RestoreError> {
    std::fs::create_dir_all(staging).map_err(io_err(staging))?;
    identity::check_or_write(
        staging,
        &Identity {
            cluster_id: req.cluster_id.clone(),
            node_id: req.id,
            joined: false,
        },
    )?;
    let mut opts = NodeStorageOptions::default();
    // Deterministic file operations, and no second segment prepared for nothing.
    opts.wal.prepare_ahead = false;
    let storage = build_from_backup(&req.backup, staging, req.membership(), &opts)?;
    for dir in [
        staging.join(raftkv_storage::node_storage::SM_DIR_NAME),
        staging.join(raftkv_storage::node_storage::WAL_DIR_NAME),
        staging.to_path_buf(),
    ] {
        StdFs.sync_dir(&dir).map_err(io_err(&dir))?;
    }
    Ok(storage)
}

/// Renames the finished `staging` dir to `data_dir` (an empty one is replaced) and syncs the
/// parent directory.
fn publish(staging: &Path, data_dir: &Path) -> Result<(), RestoreError> {
    // rename(2) replaces an empty directory atomically, and fails if it is not empty (any
    // more): nothing in `data_dir` is ever overwritten.
    std::fs::rename(staging, data_dir).map_err(io_err(data_dir))?;
    let parent = staging.parent().unwrap_or(Path::new("."));
    StdFs.sync_dir(parent).map_err(io_err(parent))
}

#[cfg(test)]
mod tests;
