//! The simulated KV state machine: a `BTreeMap` with per-client sessions for exactly-once
//! application of retried writes.
//!
//! Clients retry a write whose answer they did not get with the same sequence number; the
//! session remembers each client's last applied sequence number and result, so a retry that
//! commits twice is applied once and answered with the first result.

use super::linearizability::OpResult;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A write command, the payload of a Normal log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub client: u64,
    pub seq: u64,
    pub key: String,
    /// `Some(value)` for put, `None` for delete.
    pub value: Option<String>,
}

/// The replicated state: data plus client sessions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kv {
    pub data: BTreeMap<String, String>,
    /// client → (last applied seq, its result).
    pub sessions: BTreeMap<u64, (u64, OpResult)>,
}

impl Kv {
    /// Applies a command; returns its result (the first result for a duplicate, `None` for a
    /// command older than the client's last).
    pub fn apply(&mut self, cmd: &Command) -> Option<OpResult> {
        if let Some((seq, result)) = self.sessions.get(&cmd.client) {
            if *seq == cmd.seq {
                return Some(result.clone());
            }
            if *seq > cmd.seq {
                return None;
            }
        }
        let result = match &cmd.value {
            Some(v) => {
                self.data.insert(cmd.key.clone(), v.clone());
                OpResult::Put
            }
            None => OpResult::Delete {
                existed: self.data.remove(&cmd.key).is_some(),
            },
        };
        self.sessions.insert(cmd.client, (cmd.seq, result.clone()));
        Some(result)
    }

    pub fn get(&self, key: &str) -> Option<String> {
        self.data.get(key).cloned()
    }
}
