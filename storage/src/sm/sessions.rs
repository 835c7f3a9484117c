//! The session table: what makes a client's writes exactly-once (Raft thesis §6.3).
//!
//! A write may carry a session — the client's id, its sequence number, the proposing
//! leader's clock. For each client the table remembers the latest sequence number applied
//! and that write's result (revision and outcome), in sled (`s ‖ client id`) and therefore in
//! snapshots. Applying a sessioned entry:
//! - a sequence number above the remembered one: the command runs and its result is kept;
//! - the remembered one: a retry. The kept result is answered again (same revision, same
//!   outcome, `duplicate` set) and nothing runs, however many times the retry reached the log.
//!   A result too large to keep ([`SESSION_RECORD_BYTES_MAX`], a transaction's gets or a
//!   failed condition's current value) is kept as [`Refusal::ResultNotKept`]: the retry
//!   learns the write applied, and at which revision, but not its result;
//! - one below: refused ([`Refusal::SessionStale`]);
//! - an unknown client with a sequence number above 1: refused ([`Refusal::SessionExpired`]).
//!   Its session expired (or never existed), so whether an earlier write of it applied can
//!   no longer be told; the client starts a new session. A new client starts at 1.
//!
//! Time and expiry are decided by the log, so every replica keeps the same table: the session
//! clock is the highest `now_ms` carried by an applied `ExpireSessions` entry or a sessioned
//! write that ran (both carry the proposing leader's wall clock; a retry answered from the
//! table and a refused write do not move it), a session's `active_ms` is the
//! clock when it last wrote, and an `ExpireSessions { now_ms, ttl_ms, sessions_max }` entry
//! removes the sessions idle for `ttl_ms`, then the least recently active ones beyond
//! `sessions_max`. A new session that finds the table full evicts the least recently active
//! one first, so the table never holds more than `sessions_max` sessions. The parameters an
//! `ExpireSessions` entry carries stay in force (`c/sessions`) until the next one.
//!
//! In memory, [`SessionIndex`] orders sessions by the revision of their latest write — the
//! same order as `active_ms`, since the clock never goes back — so expiry and eviction take
//! the oldest first without a scan. It is rebuilt from the tree on open and on install.

use super::exec::Exec;
use super::record::{self, SessionParams, SessionRecord};
use super::SmError;
use crate::command::{CommandOutcome, CommandRef, CommandResult, Refusal, SessionRef};
use sled::IVec;
use std::collections::BTreeMap;

/// The prefix byte of session records in the state tree.
pub const SESSION_PREFIX: u8 = b's';
/// The largest session record kept: the table holds at most `sessions_max` of these.
pub const SESSION_RECORD_BYTES_MAX: usize = 64 * 1024;
/// The key of the session table's parameters.
pub const PARAMS_KEY: &[u8] = b"c/sessions";

/// `s ‖ client id`.
pub fn session_key(client: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(client.len() + 1);
    k.push(SESSION_PREFIX);
    k.extend_from_slice(client);
    k
}

/// The sessions in order of their latest write, and the table's parameters.
#[derive(Debug, Default)]
pub struct SessionIndex {
    pub params: SessionParams,
    /// revision of the latest write → (client id, active_ms).
    by_age: BTreeMap<u64, (Vec<u8>, u64)>,
    /// client id → revision of its latest write.
    revision_of: BTreeMap<Vec<u8>, u64>,
    /// The parameters changed in the batch being built.
    params_dirty: bool,
}

impl SessionIndex {
    /// Reads every session and the parameters from `tree`, whose state is at `applied_index`
    /// (no session can have written after it).
    pub fn load(tree: &sled::Tree, applied_index: u64) -> Result<SessionIndex, String> {
        let mut index = SessionIndex::default();
        if let Some(raw) = tree.get(PARAMS_KEY).map_err(|e| e.to_string())? {
            index.params = record::decode_params(&raw)?;
        }
        for item in tree.scan_prefix([SESSION_PREFIX]) {
            let (k, v) = item.map_err(|e| e.to_string())?;
            let rec = record::decode_session(&v)?;
            if rec.revision > applied_index {
                return Err(format!(
                    "a session record wrote at revision {}, after the applied index {applied_index}",
                    rec.revision
                ));
            }
            if index.by_age.contains_key(&rec.revision) {
                return Err(format!(
                    "two session records name revision {} as their latest write",
                    rec.revision
                ));
            }
            index.touch(&k[1..], rec.revision, rec.active_ms);
        }
        assert_eq!(index.by_age.len(), index.revision_of.len());
        Ok(index)
    }

    /// Sessions in the table.
    pub fn len(&self) -> usize {
        self.revision_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.revision_of.is_empty()
    }

    /// The `active_ms` of the least recently active session.
    pub fn oldest_active_ms(&self) -> Option<u64> {
        self.by_age.first_key_value().map(|(_, (_, ms))| *ms)
    }

    fn touch(&mut self, client: &[u8], revision: u64, active_ms: u64) {
        if let Some(old) = self.revision_of.insert(client.to_vec(), revision) {
            self.by_age.remove(&old);
        }
        let clash = self.by_age.insert(revision, (client.to_vec(), active_ms));
        assert!(clash.is_none(), "two sessions wrote at revision {revision}");
    }

    fn forget(&mut self, client: &[u8]) {
        if let Some(revision) = self.revision_of.remove(client) {
            self.by_age.remove(&revision);
        }
    }

    fn advance_clock(&mut self, now_ms: u64) {
        if now_ms > self.params.clock_ms {
            self.params.clock_ms = now_ms;
            self.params_dirty = true;
        }
    }

    /// Removes the oldest session from the index and the batch.
    fn evict_oldest(&mut self, exec: &mut Exec<'_>) -> Result<bool, SmError> {
        let Some((_, (client, _))) = self.by_age.first_key_value() else {
            return Ok(false);
        };
        let client = client.clone();
        self.forget(&client);
        exec.write(session_key(&client), None)?;
        Ok(true)
    }

    /// Applies one entry's command within its session (see the module doc).
    pub fn apply_sessioned(
        &mut self,
        exec: &mut Exec<'_>,
        revision: u64,
        session: &SessionRef<'_>,
        cmd: &CommandRef<'_>,
    ) -> Result<CommandResult, SmError> {
        let key = session_key(session.client);
        let known = match exec.read(None, &key)? {
            Some(raw) => Some(record::decode_session(&raw).map_err(SmError::Record)?),
            None => None,
        };
        let refused = |r| CommandResult {
            revision,
            outcome: CommandOutcome::Refused(r),
            duplicate: false,
        };
        match &known {
            Some(rec) if session.seq == rec.seq => {
                return Ok(CommandResult {
                    revision: rec.revision,
                    outcome: rec.outcome.clone(),
                    duplicate: true,
                })
            }
            Some(rec) if session.seq < rec.seq => {
                return Ok(refused(Refusal::SessionStale {
                    seq: session.seq,
                    last_seq: rec.seq,
                }))
            }
            None if session.seq != 1 => {
                return Ok(refused(Refusal::SessionExpired { seq: session.seq }))
            }
            _ => {}
        }
        self.advance_clock(session.now_ms);
        if known.is_none() {
            while self.len() as u64 >= self.params.sessions_max && self.evict_oldest(exec)? {}
        }
        let outcome = exec.run(revision, cmd)?;
        let mut rec = SessionRecord {
            seq: session.seq,
            revision,
            active_ms: self.params.clock_ms,
            outcome: outcome.clone(),
        };
        let mut raw = record::encode_session(&rec).map_err(SmError::Record)?;
        if raw.len() > SESSION_RECORD_BYTES_MAX {
            // A large result (a transaction's gets, a failed condition's current value) is
            // answered once; a retry learns that the write applied, and at which revision.
            rec.outcome = CommandOutcome::Refused(Refusal::ResultNotKept {
                result_bytes: raw.len() as u64,
                bytes_max: SESSION_RECORD_BYTES_MAX as u64,
            });
            raw = record::encode_session(&rec).map_err(SmError::Record)?;
        }
        assert!(raw.len() <= SESSION_RECORD_BYTES_MAX);
        exec.write(key, Some(IVec::from(raw)))?;
        self.touch(session.client, revision, rec.active_ms);
        Ok(CommandResult {
            revision,
            outcome,
            duplicate: false,
        })
    }

    /// Applies an `ExpireSessions` entry: the clock, the new parameters, then expiry.
    pub fn expire(
        &mut self,
        exec: &mut Exec<'_>,
        now_ms: u64,
        ttl_ms: u64,
        sessions_max: u64,
    ) -> Result<CommandOutcome, SmError> {
        self.advance_clock(now_ms);
        let (ttl_ms, sessions_max) = (ttl_ms.max(1), sessions_max.max(1));
        if (ttl_ms, sessions_max) != (self.params.ttl_ms, self.params.sessions_max) {
            self.params.ttl_ms = ttl_ms;
            self.params.sessions_max = sessions_max;
            self.params_dirty = true;
        }
        let mut expired = 0u64;
        while let Some(oldest) = self.oldest_active_ms() {
            if oldest.saturating_add(ttl_ms) > self.params.clock_ms {
                break;
            }
            self.evict_oldest(exec)?;
            expired += 1;
        }
        while self.len() as u64 > sessions_max && self.evict_oldest(exec)? {
            expired += 1;
        }
        assert!(self.len() as u64 <= sessions_max);
        Ok(CommandOutcome::SessionsExpired { expired })
    }

    /// Writes the parameters into the batch if this batch changed them.
    pub fn flush_params(&mut self, exec: &mut Exec<'_>) -> Result<(), SmError> {
        if self.params_dirty {
            let raw = record::encode_params(&self.params);
            exec.write(PARAMS_KEY.to_vec(), Some(IVec::from(&raw[..])))?;
            self.params_dirty = false;
        }
        Ok(())
    }
}
