//! Leases: keys that live only while their owner keeps a heartbeat.
//!
//! The state machine holds what every replica must agree on — which leases exist, their
//! TTL, and which keys are attached — and nothing about time: *when* a lease expires is the
//! leader's decision (`node::lessor`), applied through the log as a `LeaseRevoke` entry, so
//! every replica deletes the same keys at the same revision and watchers see the deletes.
//!
//! ```text
//! l ‖ id u64          → ttl_ms u64 ‖ granted revision u64
//! k ‖ id u64 ‖ key    → (empty): key is attached to lease id
//! ```
//!
//! A lease's id is the revision of the entry that granted it: unique, and the same on every
//! replica without coordination. A key's record names its lease (`KeyMeta::lease`); every
//! write of a user key moves the `k` attachment with it ([`Exec::write`]), so a put without a
//! lease detaches a key and a delete drops it. Bounds: `leases_max` leases (set by the
//! proposing leader's `--leases-max`, checked at apply) and [`LEASE_KEYS_MAX`] keys per lease
//! (its revoke is one sled batch).

use super::exec::{data_key, Exec, Stage, DATA_PREFIX};
use super::record;
use super::SmError;
use crate::command::{CommandOutcome, Refusal, LEASE_KEYS_MAX};
use sled::IVec;
use std::collections::BTreeMap;

/// The prefix byte of lease records.
pub const LEASE_PREFIX: u8 = b'l';
/// The prefix byte of key attachments.
pub const ATTACH_PREFIX: u8 = b'k';
/// The default bound on live leases (`--leases-max`).
pub const LEASES_MAX_DEFAULT: u64 = 100_000;

/// One live lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    pub id: u64,
    pub ttl_ms: u64,
    /// The revision that granted it (its id).
    pub granted_revision: u64,
    /// Keys attached now.
    pub keys: u64,
}

/// The live leases, in memory (loaded from the tree on open and after an install; kept in
/// step by every apply).
#[derive(Clone, Debug, Default)]
pub struct LeaseIndex {
    leases: BTreeMap<u64, LeaseInfo>,
    /// Where the table last moved: the revision of the last grant or revoke, or the applied
    /// index the table was loaded at, whichever is later. The lessor re-reads the table when
    /// the epoch differs from the one it synced at; a counter restarting at 0 on every load
    /// could come back to a value it had seen after a reload and as many changes, and new
    /// leases would never be timed. Revisions only grow and every change runs at a revision
    /// above the load point, so each change gives an epoch above every earlier one, across
    /// restarts and installs alike, and the same on every replica. A reload at the index of
    /// the last change gives that change's epoch back, with the same table.
    epoch: u64,
}

/// `l ‖ id`.
pub fn lease_key(id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(LEASE_PREFIX);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// `k ‖ id ‖ key` (`key` empty: the prefix of every key of the lease).
pub fn attach_key(id: u64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + key.len());
    k.push(ATTACH_PREFIX);
    k.extend_from_slice(&id.to_be_bytes());
    k.extend_from_slice(key);
    k
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

impl LeaseIndex {
    /// Reads every lease of a tree at `applied_index` and counts its keys.
    pub fn load(tree: &sled::Tree, applied_index: u64) -> Result<LeaseIndex, String> {
        let mut index = LeaseIndex {
            leases: BTreeMap::new(),
            epoch: applied_index,
        };
        for item in tree.scan_prefix([LEASE_PREFIX]) {
            let (k, v) = item.map_err(|e| e.to_string())?;
            if k.len() != 9 || v.len() != 16 {
                return Err(format!(
                    "a lease record of {} bytes under a key of {} bytes",
                    v.len(),
                    k.len()
                ));
            }
            let id = be_u64(&k[1..]);
            let info = LeaseInfo {
                id,
                ttl_ms: be_u64(&v),
                granted_revision: be_u64(&v[8..]),
                keys: 0,
            };
            if id == 0 || info.granted_revision != id {
                return Err(format!(
                    "lease {id} says it was granted at {}",
                    info.granted_revision
                ));
            }
            // A lease's id is the revision that granted it: one above the applied index is
            // damage, and a later grant at that revision would meet it.
            if id > applied_index {
                return Err(format!(
                    "lease {id} was granted after the applied index {applied_index}"
                ));
            }
            index.leases.insert(id, info);
        }
        for item in tree.scan_prefix([ATTACH_PREFIX]) {
            let (k, _) = item.map_err(|e| e.to_string())?;
            if k.len() <= 9 {
                return Err(format!("an attachment key of {} bytes", k.len()));
            }
            let id = be_u64(&k[1..]);
            let lease = index
                .leases
                .get_mut(&id)
                .ok_or_else(|| format!("a key attached to lease {id}, which does not exist"))?;
            lease.keys += 1;
        }
        Ok(index)
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn get(&self, id: u64) -> Option<LeaseInfo> {
        self.leases.get(&id).copied()
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Records that the table changed at `revision` (see `epoch`).
    fn moved_at(&mut self, revision: u64) {
        debug_assert!(
            revision > self.epoch,
            "a change runs above the load point and every earlier change"
        );
        self.epoch = revision;
    }

    /// Every lease, by id.
    pub fn all(&self) -> Vec<LeaseInfo> {
        self.leases.values().copied().collect()
    }
}

impl Exec<'_> {
    /// Why `key` cannot be attached to `lease` by a put now (`None`: it can; lease 0 is no
    /// lease). Attachments staged by the same transaction count: they reach the lease's key
    /// count only when the transaction commits, and a lease over [`LEASE_KEYS_MAX`] keys is
    /// one its revoke must still delete in one batch.
    pub fn attach_refusal(
        &self,
        stage: Option<&Stage>,
        key: &[u8],
        lease: u64,
    ) -> Result<Option<Refusal>, SmError> {
        if lease == 0 {
            return Ok(None);
        }
        let Some(info) = self.leases.get(lease) else {
            return Ok(Some(Refusal::LeaseNotFound { id: lease }));
        };
        let already = self
            .read_key(stage, key)?
            .is_some_and(|(meta, _)| meta.lease == lease);
        if already {
            return Ok(None);
        }
        let staged = match stage {
            Some(stage) => self.staged_attachments(stage, lease)?,
            None => 0,
        };
        if info.keys.saturating_add(staged) >= LEASE_KEYS_MAX {
            return Ok(Some(Refusal::LeaseKeysFull {
                keys_max: LEASE_KEYS_MAX,
            }));
        }
        Ok(None)
    }

    /// Keys `stage` attaches to `lease` that the batch has not attached yet. Detachments in
    /// the stage are not credited (that would read every staged delete's old record): at
    /// the bound a transaction that both frees and takes a slot is refused, on every replica.
    fn staged_attachments(&self, stage: &Stage, lease: u64) -> Result<u64, SmError> {
        let mut count = 0;
        for (k, v) in stage {
            let Some(raw) = v else { continue };
            if k.first() != Some(&DATA_PREFIX) {
                continue;
            }
            let (meta, _) = record::decode_key(raw).map_err(SmError::Record)?;
            if meta.lease != lease {
                continue;
            }
            if self
                .read_key(None, &k[1..])?
                .is_none_or(|(m, _)| m.lease != lease)
            {
                count += 1;
            }
        }
        Ok(count)
    }

    /// Moves user key `key`'s attachment from lease `from` to lease `to` (0: none).
    pub(super) fn move_attachment(
        &mut self,
        key: &[u8],
        from: u64,
        to: u64,
    ) -> Result<(), SmError> {
        assert_ne!(from, to, "an attachment moves between two different leases");
        if from != 0 {
            self.write(attach_key(from, key), None)?;
            if let Some(l) = self.leases.leases.get_mut(&from) {
                l.keys = l.keys.saturating_sub(1);
            }
        }
        if to != 0 {
            let lease = self.leases.leases.get_mut(&to).ok_or_else(|| {
                SmError::Record(format!(
                    "a key record names lease {to}, which does not exist"
                ))
            })?;
            lease.keys += 1;
            self.write(attach_key(to, key), Some(IVec::default()))?;
        }
        Ok(())
    }

    /// Grants lease `revision` of `ttl_ms`, unless `leases_max` leases exist.
    pub fn lease_grant(
        &mut self,
        revision: u64,
        ttl_ms: u64,
        leases_max: u64,
    ) -> Result<CommandOutcome, SmError> {
        if self.leases.len() as u64 >= leases_max {
            return Ok(CommandOutcome::Refused(Refusal::LeasesFull { leases_max }));
        }
        // `load` refuses a lease above the applied index, so only damage that slipped past
        // it gets here: an error stops this node, where a panic would stop it the same way
        // without saying why.
        if self.leases.get(revision).is_some() {
            return Err(SmError::Record(format!(
                "lease {revision} exists before the entry that grants it"
            )));
        }
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(&ttl_ms.to_be_bytes());
        v.extend_from_slice(&revision.to_be_bytes());
        self.write(lease_key(revision), Some(IVec::from(v)))?;
        let info = LeaseInfo {
            id: revision,
            ttl_ms,
            granted_revision: revision,
            keys: 0,
        };
        self.leases.leases.insert(revision, info);
        self.leases.moved_at(revision);
        Ok(CommandOutcome::LeaseGranted {
            id: revision,
            ttl_ms,
        })
    }

    /// Revokes lease `id` at `revision`: deletes its keys (each a watch event), then the lease. A revoke
    /// that was committed must apply on every replica, so it cannot fail on what it finds:
    /// every `k ‖ id ‖ *` row goes, however many there are, and a key is deleted only when
    /// its record names `id` (a row left by damage or an old bug, naming a key that is gone
    /// or belongs to another lease, is dropped alone).
    pub fn lease_revoke(&mut self, revision: u64, id: u64) -> Result<CommandOutcome, SmError> {
        if self.leases.get(id).is_none() {
            return Ok(CommandOutcome::Refused(Refusal::LeaseNotFound { id }));
        }
        let rows = self.all_internal_keys_under(&attach_key(id, &[]))?;
        let mut deleted = 0u64;
        for row in rows {
            let key = &row[9..];
            if self.key_names_lease(key, id)? {
                // Deleting the key detaches it, row included (see `Exec::write`).
                self.write(data_key(key), None)?;
                deleted += 1;
            } else {
                self.write(row, None)?;
            }
        }
        self.write(lease_key(id), None)?;
        self.leases.leases.remove(&id);
        self.leases.moved_at(revision);
        Ok(CommandOutcome::LeaseRevoked { deleted })
    }

    /// Whether user key `key` exists and its record names lease `id`. An undecodable record
    /// names no lease: the revoke leaves it for whoever reads it to report.
    fn key_names_lease(&self, key: &[u8], id: u64) -> Result<bool, SmError> {
        let Some(raw) = self.read(None, &data_key(key))? else {
            return Ok(false);
        };
        match record::decode_key(&raw) {
            Ok((meta, _)) => Ok(meta.lease == id),
            Err(why) => {
                tracing::warn!(lease = id, %why, "a revoke leaves a key whose record is damaged");
                Ok(false)
            }
        }
    }
}
