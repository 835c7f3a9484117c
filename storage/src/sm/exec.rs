//! Executing commands against the state tree inside one apply batch.
//!
//! An apply turns a run of committed entries into one sled batch. [`Exec`] is that batch in
//! the making: every write goes to the sled batch *and* to an overlay, and every read looks at
//! the overlay before the tree, so an entry sees the effects of the entries before it in the
//! same batch (a conditional write right after a put of the same key compares against the
//! put). Before a key is first changed while a snapshot is being copied, its value at the
//! snapshot point is saved in the copy-on-write table (see `cow`).
//!
//! A transaction runs its branch in a [`Stage`] of its own and commits it to the batch only
//! when the branch completed: a branch that hits a bound (a prefix delete over
//! [`DELETE_PREFIX_KEYS_MAX`] keys, `get` results over [`TXN_RESULT_BYTES_MAX`]) changes
//! nothing, on every replica alike.
//!
//! Revisions: every write made by the entry at index `i` gets `mod_revision = i`; a put of an
//! absent key gets `create_revision = i` and `version = 1`, a put of a present key keeps its
//! `create_revision` and adds one to its `version`.

use super::cow::CowTable;
use super::history::ChangeEvent;
use super::leases::LeaseIndex;
use super::record::{self, KeyMeta};
use super::SmError;
use crate::command::{
    CommandOutcome, CommandRef, KeyRecord, OpResult, Refusal, DELETE_PREFIX_KEYS_MAX,
    TXN_RESULT_BYTES_MAX,
};
use crate::txn::{CompareRef, OpRef, TargetRef, TxnRef};
use sled::IVec;
use std::collections::{BTreeMap, BTreeSet};

/// The prefix byte of user keys in the state tree.
pub const DATA_PREFIX: u8 = b'd';

/// `d ‖ user key`.
pub fn data_key(user_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(user_key.len() + 1);
    k.push(DATA_PREFIX);
    k.extend_from_slice(user_key);
    k
}

/// Writes of a transaction branch not yet committed to the batch: internal key → new raw
/// value (`None`: deleted).
pub type Stage = BTreeMap<Vec<u8>, Option<IVec>>;

/// One apply batch in the making. See the module doc.
pub struct Exec<'t> {
    tree: &'t sled::Tree,
    pub(super) batch: sled::Batch,
    overlay: BTreeMap<Vec<u8>, Option<IVec>>,
    cow: Option<&'t mut CowTable>,
    /// The revision (entry index) being executed.
    revision: u64,
    /// Changes to user keys so far, in order: the watch events of this batch.
    events: Vec<ChangeEvent>,
    pub(super) leases: &'t mut LeaseIndex,
}

fn corrupt(what: String) -> SmError {
    SmError::Record(what)
}

impl<'t> Exec<'t> {
    pub fn new(
        tree: &'t sled::Tree,
        cow: Option<&'t mut CowTable>,
        leases: &'t mut LeaseIndex,
    ) -> Exec<'t> {
        Exec {
            tree,
            batch: sled::Batch::default(),
            overlay: BTreeMap::new(),
            cow,
            revision: 0,
            events: Vec::new(),
            leases,
        }
    }

    pub fn tree(&self) -> &sled::Tree {
        self.tree
    }

    /// Starts the entry at `revision`: its writes are that revision's events.
    pub fn begin_entry(&mut self, revision: u64) {
        assert!(revision > self.revision, "entries run in index order");
        self.revision = revision;
    }

    /// This batch's changes to user keys, in order.
    pub fn take_events(&mut self) -> Vec<ChangeEvent> {
        std::mem::take(&mut self.events)
    }

    /// The raw value of internal key `key` as this batch (and `stage`) left it.
    pub fn read(&self, stage: Option<&Stage>, key: &[u8]) -> Result<Option<IVec>, SmError> {
        if let Some(v) = stage.and_then(|s| s.get(key)) {
            return Ok(v.clone());
        }
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        Ok(self.tree.get(key)?)
    }

    /// A user key's revisions and value, if present.
    pub fn read_key(
        &self,
        stage: Option<&Stage>,
        user_key: &[u8],
    ) -> Result<Option<(KeyMeta, IVec)>, SmError> {
        let Some(raw) = self.read(stage, &data_key(user_key))? else {
            return Ok(None);
        };
        let (meta, _) = record::decode_key(&raw).map_err(corrupt)?;
        Ok(Some((meta, raw)))
    }

    /// Writes internal key `key` into the batch (saving its snapshot-point value first). A
    /// user key's write is also a watch event and keeps its lease's key set in step.
    pub fn write(&mut self, key: Vec<u8>, value: Option<IVec>) -> Result<(), SmError> {
        if key.first() == Some(&DATA_PREFIX) {
            self.track_data_write(&key, value.as_ref())?;
        }
        self.write_raw(key, value)
    }

    fn track_data_write(&mut self, key: &[u8], value: Option<&IVec>) -> Result<(), SmError> {
        // A key can be attached to a lease only while some lease exists.
        if !self.leases.is_empty() {
            let lease_of = |raw: Option<&IVec>| -> Result<u64, SmError> {
                raw.map_or(Ok(0), |r| {
                    record::decode_key(r).map(|(m, _)| m.lease).map_err(corrupt)
                })
            };
            let new_lease = lease_of(value)?;
            let old_lease = lease_of(self.read(None, key)?.as_ref())?;
            if old_lease != new_lease {
                self.move_attachment(&key[1..], old_lease, new_lease)?;
            }
        }
        self.events.push(ChangeEvent {
            revision: self.revision,
            key: key[1..].to_vec(),
            record: value.cloned(),
        });
        Ok(())
    }

    fn write_raw(&mut self, key: Vec<u8>, value: Option<IVec>) -> Result<(), SmError> {
        if let Some(table) = self.cow.as_deref_mut() {
            if !table.contains(&key) {
                // The tree still holds the value from before this batch: the batch is not
                // applied yet, and an earlier batch's change would already be in the table.
                table.save(&key, self.tree.get(&key)?);
            }
        }
        match &value {
            Some(v) => self.batch.insert(key.as_slice(), v.clone()),
            None => self.batch.remove(key.as_slice()),
        }
        self.overlay.insert(key, value);
        Ok(())
    }

    /// User keys under `prefix` that exist as this batch and `stage` left them, in order;
    /// `Err(Refusal)` once there are more than `keys_max`.
    pub fn keys_under(
        &self,
        stage: Option<&Stage>,
        prefix: &[u8],
        keys_max: u64,
    ) -> Result<Result<Vec<Vec<u8>>, Refusal>, SmError> {
        Ok(self
            .internal_keys_under(stage, &data_key(prefix), keys_max)?
            .map(|keys| keys.into_iter().map(|k| k[1..].to_vec()).collect()))
    }

    /// Internal keys starting with `internal` that exist as this batch and `stage` left them,
    /// in order; `Err(Refusal)` once there are more than `keys_max`.
    pub fn internal_keys_under(
        &self,
        stage: Option<&Stage>,
        internal: &[u8],
        keys_max: u64,
    ) -> Result<Result<Vec<Vec<u8>>, Refusal>, SmError> {
        Ok(self
            .live_keys_under(stage, internal, Some(keys_max))?
            .ok_or(Refusal::RangeTooLarge { keys_max }))
    }

    /// Every internal key starting with `internal` that exists as this batch left it, in
    /// order, however many: for work that was committed and must apply (a lease revoke).
    pub fn all_internal_keys_under(&self, internal: &[u8]) -> Result<Vec<Vec<u8>>, SmError> {
        Ok(self
            .live_keys_under(None, internal, None)?
            .expect("invariant: a scan without a bound is never over it"))
    }

    /// The live keys under `internal` (`None`: more than `keys_max`, when given).
    fn live_keys_under(
        &self,
        stage: Option<&Stage>,
        internal: &[u8],
        keys_max: Option<u64>,
    ) -> Result<Option<Vec<Vec<u8>>>, SmError> {
        let internal = internal.to_vec();
        let mut keys = BTreeSet::new();
        let live = |k: &[u8]| -> Option<bool> {
            if let Some(v) = stage.and_then(|s| s.get(k)) {
                return Some(v.is_some());
            }
            self.overlay.get(k).map(Option::is_some)
        };
        let over = |n: usize| keys_max.is_some_and(|max| n as u64 > max);
        for item in self.tree.scan_prefix(&internal) {
            let (k, _) = item?;
            if live(&k) != Some(false) {
                keys.insert(k.to_vec());
                if over(keys.len()) {
                    return Ok(None);
                }
            }
        }
        // Each source is cut at the end of the prefix on its own: cutting the chain would
        // stop at the first overlay key past the prefix and never reach the stage.
        let under = |(k, _): &(&Vec<u8>, &Option<IVec>)| k.starts_with(&internal);
        let written = self
            .overlay
            .range(internal.clone()..)
            .take_while(under)
            .chain(
                stage
                    .into_iter()
                    .flat_map(|s| s.range(internal.clone()..).take_while(under)),
            );
        for (k, _) in written {
            if live(k) == Some(true) {
                keys.insert(k.clone());
                if over(keys.len()) {
                    return Ok(None);
                }
            }
        }
        Ok(Some(keys.into_iter().collect()))
    }

    /// Executes a command that is not session bookkeeping (the caller handles sessions and
    /// `ExpireSessions`) at `revision`.
    pub fn run(&mut self, revision: u64, cmd: &CommandRef<'_>) -> Result<CommandOutcome, SmError> {
        match cmd {
            CommandRef::Put { key, value } => {
                let (meta, raw) = self.next_record(None, revision, key, value, 0)?;
                self.write(data_key(key), Some(raw))?;
                Ok(CommandOutcome::Put {
                    create_revision: meta.create_revision,
                    version: meta.version,
                })
            }
            CommandRef::Delete { key } => {
                let existed = self.read_key(None, key)?.is_some();
                if existed {
                    self.write(data_key(key), None)?;
                }
                Ok(CommandOutcome::Delete { existed })
            }
            CommandRef::DeletePrefix { prefix } => {
                match self.keys_under(None, prefix, DELETE_PREFIX_KEYS_MAX)? {
                    Err(refusal) => Ok(CommandOutcome::Refused(refusal)),
                    Ok(keys) => {
                        let deleted = keys.len() as u64;
                        for k in keys {
                            self.write(data_key(&k), None)?;
                        }
                        Ok(CommandOutcome::DeletePrefix { deleted })
                    }
                }
            }
            CommandRef::Txn(txn) => self.run_txn(revision, txn),
            CommandRef::PutLeased { key, value, lease } => {
                if let Some(refusal) = self.attach_refusal(None, key, *lease)? {
                    return Ok(CommandOutcome::Refused(refusal));
                }
                let (meta, raw) = self.next_record(None, revision, key, value, *lease)?;
                self.write(data_key(key), Some(raw))?;
                Ok(CommandOutcome::Put {
                    create_revision: meta.create_revision,
                    version: meta.version,
                })
            }
            CommandRef::LeaseGrant { ttl_ms, leases_max } => {
                self.lease_grant(revision, *ttl_ms, *leases_max)
            }
            CommandRef::LeaseRevoke { id } => self.lease_revoke(revision, *id),
            CommandRef::ExpireSessions { .. } => {
                unreachable!("ExpireSessions is executed by the session table")
            }
        }
    }

    /// The record a put of `key` at `revision` writes (as this batch and `stage` left the
    /// key), and its revisions.
    fn next_record(
        &self,
        stage: Option<&Stage>,
        revision: u64,
        key: &[u8],
        value: &[u8],
        lease: u64,
    ) -> Result<(KeyMeta, IVec), SmError> {
        let meta = match self.read_key(stage, key)? {
            Some((old, _)) => {
                // Read from sled: a record from the future is damage, not a bug to panic on.
                if old.mod_revision > revision {
                    return Err(corrupt(format!(
                        "a key record last written at revision {} meets entry {revision}",
                        old.mod_revision
                    )));
                }
                KeyMeta {
                    create_revision: old.create_revision,
                    mod_revision: revision,
                    version: old.version.saturating_add(1),
                    lease,
                }
            }
            None => KeyMeta {
                create_revision: revision,
                mod_revision: revision,
                version: 1,
                lease,
            },
        };
        Ok((meta, IVec::from(record::encode_key(&meta, value))))
    }

    fn commit(&mut self, stage: Stage) -> Result<(), SmError> {
        for (k, v) in stage {
            self.write(k, v)?;
        }
        Ok(())
    }

    fn compare(&self, c: &CompareRef<'_>) -> Result<bool, SmError> {
        let current = self.read_key(None, c.key)?;
        let meta = current.as_ref().map(|(m, _)| *m).unwrap_or_default();
        Ok(match c.target {
            TargetRef::Value(given) => match &current {
                None => false,
                Some((_, raw)) => c.op.holds(&raw[record::KEY_HEADER_BYTES..], given),
            },
            TargetRef::Version(n) => c.op.holds(&meta.version, &n),
            TargetRef::CreateRevision(n) => c.op.holds(&meta.create_revision, &n),
            TargetRef::ModRevision(n) => c.op.holds(&meta.mod_revision, &n),
        })
    }

    fn run_txn(&mut self, revision: u64, txn: &TxnRef<'_>) -> Result<CommandOutcome, SmError> {
        let mut succeeded = true;
        for c in &txn.compares {
            if !self.compare(c)? {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        let mut stage = Stage::new();
        let mut results = Vec::with_capacity(ops.len());
        let mut result_bytes = 0u64;
        for op in ops {
            let result = match *op {
                OpRef::Put { key, value, lease } => {
                    if let Some(refusal) = self.attach_refusal(Some(&stage), key, lease)? {
                        return Ok(CommandOutcome::Refused(refusal));
                    }
                    let (meta, raw) =
                        self.next_record(Some(&stage), revision, key, value, lease)?;
                    stage.insert(data_key(key), Some(raw));
                    OpResult::Put {
                        create_revision: meta.create_revision,
                        version: meta.version,
                    }
                }
                OpRef::Delete { key } => {
                    let existed = self.read_key(Some(&stage), key)?.is_some();
                    if existed {
                        stage.insert(data_key(key), None);
                    }
                    OpResult::Delete { existed }
                }
                OpRef::DeletePrefix { prefix } => {
                    match self.keys_under(Some(&stage), prefix, DELETE_PREFIX_KEYS_MAX)? {
                        Err(refusal) => return Ok(CommandOutcome::Refused(refusal)),
                        Ok(keys) => {
                            let deleted = keys.len() as u64;
                            for k in keys {
                                stage.insert(data_key(&k), None);
                            }
                            OpResult::DeletePrefix { deleted }
                        }
                    }
                }
                OpRef::Get { key } => {
                    let found = self.get_record(&stage, key)?;
                    result_bytes = result_bytes.saturating_add(
                        found
                            .as_ref()
                            .map_or(0, |r| (r.key.len() + r.value.len()) as u64),
                    );
                    if result_bytes > TXN_RESULT_BYTES_MAX {
                        return Ok(CommandOutcome::Refused(Refusal::ResultTooLarge {
                            bytes_max: TXN_RESULT_BYTES_MAX,
                        }));
                    }
                    OpResult::Get(found)
                }
            };
            results.push(result);
        }
        debug_assert_eq!(results.len(), ops.len());
        self.commit(stage)?;
        Ok(CommandOutcome::Txn { succeeded, results })
    }

    fn get_record(&self, stage: &Stage, key: &[u8]) -> Result<Option<KeyRecord>, SmError> {
        match self.read(Some(stage), &data_key(key))? {
            None => Ok(None),
            Some(raw) => Ok(Some(record::key_record(key, &raw).map_err(corrupt)?)),
        }
    }
}
