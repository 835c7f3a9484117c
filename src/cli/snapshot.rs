//! `raftkv snapshot save` and `raftkv snapshot restore`: backups.
//!
//! `save FILE` streams the leader's snapshot (`GET /snapshot`) into `FILE.part`, verifies it
//! as read back from the disk, syncs it and renames it to `FILE`: a `FILE` that exists is
//! always a complete, verified backup. Exit codes as the other client commands: 0 saved;
//! 1 the stream or the file failed (damage is named with its byte offset); 2 usage; 3 the
//! cluster was unavailable (safe to retry).
//!
//! `restore FILE --data-dir DIR --id N --peers ... --cluster-id NEW` builds one new member's
//! data dir (`raftkv::node::restore`); `raftkv serve` with the same `--id`, `--peers` and
//! `--cluster-id` starts from it. Exit codes: 0 restored; 1 a damaged file, a non-empty DIR
//! or an I/O error; 2 usage.

use super::kv::{client, failure, runtime, EndpointArgs};
use super::UsageError;
use anyhow::Context;
use raftkv::client::Client;
use raftkv::node::rejoin::SNAPSHOT_BYTES_MAX;
use raftkv::node::restore::{restore as restore_backup, RestoreError, RestoreRequest};
use raftkv_storage::snapshot::backup::BackupWriter;
use raftkv_storage::vfs::StdFs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Debug, clap::Args)]
pub struct SaveArgs {
    /// The backup file to write (replaced atomically if it exists).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    #[command(flatten)]
    pub endpoints: EndpointArgs,
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The backup file (from `raftkv snapshot save`).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// The new member's data dir: must not exist, or be empty.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// The new member's id (its `serve --id`).
    #[arg(long)]
    pub id: u64,
    /// The new cluster's other members, as in `serve --peers` (only their ids are recorded).
    #[arg(long, value_name = "ID=HOST:PORT,...")]
    pub peers: String,
    /// The new cluster's id (its `serve --cluster-id`); must differ from the backup's.
    #[arg(long, value_name = "NEW")]
    pub cluster_id: String,
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub fn save(args: &SaveArgs) -> anyhow::Result<ExitCode> {
    let c = client(&args.endpoints)?;
    runtime()?.block_on(save_from(&c, &args.file))
}

async fn save_from(c: &Client, file: &Path) -> anyhow::Result<ExitCode> {
    let mut download = match c.snapshot().await {
        Ok(d) => d,
        Err(e) => return Ok(failure(e)),
    };
    let mut writer = BackupWriter::create(
        Arc::new(StdFs),
        file,
        &download.cluster_id,
        now_unix_ms(),
        SNAPSHOT_BYTES_MAX,
    )?;
    loop {
        match download.chunk().await {
            Ok(Some(piece)) => writer.write(&piece)?,
            Ok(None) => break,
            // Dropping the writer removes FILE.part.
            Err(e) => return Ok(failure(e)),
        }
    }
    let saved = writer
        .finish()
        .with_context(|| format!("the snapshot from {} was not saved", download.endpoint))?;
    println!(
        "saved {}: cluster {:?}, index {}, term {}, {} keys, {} bytes (from {})",
        file.display(),
        saved.header.cluster_id,
        saved.header.index,
        saved.header.term,
        saved.user_keys,
        saved.file_bytes(),
        download.endpoint
    );
    Ok(ExitCode::SUCCESS)
}

pub fn restore(args: &RestoreArgs) -> anyhow::Result<ExitCode> {
    let usage = |e: String| anyhow::Error::new(UsageError(e));
    let peers = super::serve::parse_peers(&args.peers).map_err(|e| usage(format!("{e:#}")))?;
    let req = RestoreRequest {
        backup: args.file.clone(),
        data_dir: args.data_dir.clone(),
        id: args.id,
        peers: peers.keys().copied().collect(),
        cluster_id: args.cluster_id.clone(),
    };
    let restored = match restore_backup(&req) {
        Ok(r) => r,
        Err(RestoreError::Config(e)) => return Err(usage(e)),
        Err(e) => return Err(e.into()),
    };
    let s = &restored.storage;
    let age_s = now_unix_ms().saturating_sub(s.backup.saved_at_unix_ms) / 1000;
    println!(
        "restored {} into {}: node {} of cluster {:?}, voters {:?}, index {}, term {}, {} keys \
         (a backup of cluster {:?} saved {age_s} s ago)",
        args.file.display(),
        args.data_dir.display(),
        args.id,
        args.cluster_id,
        s.meta.membership.voters,
        s.meta.index,
        s.meta.term,
        s.key_count,
        s.backup.cluster_id,
    );
    Ok(ExitCode::SUCCESS)
}
