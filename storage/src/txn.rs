//! Transactions: a list of compares, then one of two lists of operations, as one log entry.
//!
//! The shapes follow etcd's `Txn`: if every compare holds, the `success` branch runs, else the
//! `failure` branch; either way the whole entry applies atomically at one revision (the
//! entry's Raft index). Conditional writes (`PUT ?if_mod_revision=N`) are transactions too:
//! one `mod_revision == N` compare, the write on success and a `get` of the key on failure (the
//! "current" a 412 shows) — one mechanism, one set of tests.
//!
//! Semantics (evaluated by the state machine, see `sm::exec`):
//! - A compare on an absent key sees `version`, `create_revision` and `mod_revision` as 0, so
//!   `mod_revision == 0` means "absent". A `value` compare on an absent key is false whatever
//!   the operator (there is no value to compare).
//! - `<` and `>` compare integers numerically and values bytewise.
//! - Operations run in order and each sees the effects of the ones before it in the same
//!   branch (a `get` after a `put` of the same key returns the new value). Every write gets the
//!   transaction's revision as its `mod_revision`; each put adds one to the key's `version`.
//!
//! Like [`crate::command`], the borrowed forms ([`TxnRef`] ...) are the on-disk layout (append
//! variants at the end only) and the owned forms mirror them for tests, tools and clients.
//! [`TxnLimits`] bound a transaction before it is proposed; they are not rechecked on apply.

use crate::command::{byte_str, CommandError, CommandLimits};
use serde::{Deserialize, Serialize};

/// The most compares a transaction may carry by default.
pub const TXN_COMPARES_MAX_DEFAULT: usize = 128;
/// The most operations one branch may carry by default (etcd's `--max-txn-ops`).
pub const TXN_OPS_MAX_DEFAULT: usize = 128;
/// The most bytes of keys and values a whole transaction may carry by default.
pub const TXN_BYTES_MAX_DEFAULT: usize = 4 * 1024 * 1024;

/// How a compare relates the key's current field to the given value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Less,
    Greater,
}

impl CompareOp {
    /// Parses `==`, `!=`, `<` or `>`.
    pub fn parse(s: &str) -> Option<CompareOp> {
        match s {
            "==" | "=" => Some(CompareOp::Equal),
            "!=" => Some(CompareOp::NotEqual),
            "<" => Some(CompareOp::Less),
            ">" => Some(CompareOp::Greater),
            _ => None,
        }
    }

    /// Whether `current op given` holds.
    pub fn holds<T: Ord + ?Sized>(self, current: &T, given: &T) -> bool {
        match self {
            CompareOp::Equal => current == given,
            CompareOp::NotEqual => current != given,
            CompareOp::Less => current < given,
            CompareOp::Greater => current > given,
        }
    }
}

/// What a compare looks at, with the value it is compared to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetRef<'a> {
    Value(#[serde(serialize_with = "byte_str")] &'a [u8]),
    Version(u64),
    CreateRevision(u64),
    ModRevision(u64),
}

/// One compare: `key`'s `target` field `op` the target's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompareRef<'a> {
    #[serde(serialize_with = "byte_str")]
    pub key: &'a [u8],
    pub op: CompareOp,
    #[serde(borrow)]
    pub target: TargetRef<'a>,
}

/// One operation of a branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpRef<'a> {
    /// Sets `key`; `lease` 0 means none (leases come with issue 12's commands).
    Put {
        #[serde(serialize_with = "byte_str")]
        key: &'a [u8],
        #[serde(serialize_with = "byte_str")]
        value: &'a [u8],
        lease: u64,
    },
    Delete {
        #[serde(serialize_with = "byte_str")]
        key: &'a [u8],
    },
    DeletePrefix {
        #[serde(serialize_with = "byte_str")]
        prefix: &'a [u8],
    },
    Get {
        #[serde(serialize_with = "byte_str")]
        key: &'a [u8],
    },
}

/// A transaction borrowing its keys and values from the payload (or the request).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRef<'a> {
    #[serde(borrow)]
    pub compares: Vec<CompareRef<'a>>,
    #[serde(borrow)]
    pub success: Vec<OpRef<'a>>,
    #[serde(borrow)]
    pub failure: Vec<OpRef<'a>>,
}

/// Owned [`TargetRef`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Value(Vec<u8>),
    Version(u64),
    CreateRevision(u64),
    ModRevision(u64),
}

/// Owned [`CompareRef`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    pub key: Vec<u8>,
    pub op: CompareOp,
    pub target: Target,
}

/// Owned [`OpRef`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOp {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: u64,
    },
    Delete {
        key: Vec<u8>,
    },
    DeletePrefix {
        prefix: Vec<u8>,
    },
    Get {
        key: Vec<u8>,
    },
}

/// Owned [`TxnRef`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<TxnOp>,
    pub failure: Vec<TxnOp>,
}

/// Bounds on a transaction, checked before it is proposed (413 when over).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnLimits {
    pub compares_max: usize,
    pub ops_max: usize,
    pub bytes_max: usize,
}

impl Default for TxnLimits {
    fn default() -> Self {
        TxnLimits {
            compares_max: TXN_COMPARES_MAX_DEFAULT,
            ops_max: TXN_OPS_MAX_DEFAULT,
            bytes_max: TXN_BYTES_MAX_DEFAULT,
        }
    }
}

impl<'a> OpRef<'a> {
    /// The key (or prefix) the operation addresses.
    pub fn key(&self) -> &'a [u8] {
        match *self {
            OpRef::Put { key, .. } | OpRef::Delete { key } | OpRef::Get { key } => key,
            OpRef::DeletePrefix { prefix } => prefix,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            OpRef::Put { key, value, .. } => key.len().saturating_add(value.len()),
            other => other.key().len(),
        }
    }

    fn to_owned_op(self) -> TxnOp {
        match self {
            OpRef::Put { key, value, lease } => TxnOp::Put {
                key: key.to_vec(),
                value: value.to_vec(),
                lease,
            },
            OpRef::Delete { key } => TxnOp::Delete { key: key.to_vec() },
            OpRef::DeletePrefix { prefix } => TxnOp::DeletePrefix {
                prefix: prefix.to_vec(),
            },
            OpRef::Get { key } => TxnOp::Get { key: key.to_vec() },
        }
    }
}

impl TxnRef<'_> {
    /// Checks counts, sizes and every key and value against the limits. A `delete_prefix`
    /// prefix must be non-empty (deleting everything takes an explicit, separate decision).
    pub fn validate(
        &self,
        limits: &TxnLimits,
        command: &CommandLimits,
    ) -> Result<(), CommandError> {
        if self.compares.len() > limits.compares_max {
            return Err(CommandError::TxnTooLarge(format!(
                "{} compares exceed the limit of {}",
                self.compares.len(),
                limits.compares_max
            )));
        }
        for (name, ops) in [("success", &self.success), ("failure", &self.failure)] {
            if ops.len() > limits.ops_max {
                return Err(CommandError::TxnTooLarge(format!(
                    "{} {name} operations exceed the limit of {}",
                    ops.len(),
                    limits.ops_max
                )));
            }
        }
        let mut bytes = 0usize;
        for c in &self.compares {
            command.check_key(c.key)?;
            if let TargetRef::Value(v) = c.target {
                command.check_value(v)?;
                bytes = bytes.saturating_add(v.len());
            }
            bytes = bytes.saturating_add(c.key.len());
        }
        for op in self.success.iter().chain(&self.failure) {
            command.check_key(op.key())?;
            if let OpRef::Put { value, .. } = op {
                command.check_value(value)?;
            }
            bytes = bytes.saturating_add(op.bytes());
        }
        if bytes > limits.bytes_max {
            return Err(CommandError::TxnTooLarge(format!(
                "{bytes} bytes of keys and values exceed the limit of {}",
                limits.bytes_max
            )));
        }
        Ok(())
    }

    /// An owned copy.
    pub fn to_txn(&self) -> Txn {
        Txn {
            compares: self
                .compares
                .iter()
                .map(|c| Compare {
                    key: c.key.to_vec(),
                    op: c.op,
                    target: match c.target {
                        TargetRef::Value(v) => Target::Value(v.to_vec()),
                        TargetRef::Version(n) => Target::Version(n),
                        TargetRef::CreateRevision(n) => Target::CreateRevision(n),
                        TargetRef::ModRevision(n) => Target::ModRevision(n),
                    },
                })
                .collect(),
            success: self.success.iter().map(|o| o.to_owned_op()).collect(),
            failure: self.failure.iter().map(|o| o.to_owned_op()).collect(),
        }
    }
}

impl TxnOp {
    /// The borrowed view.
    pub fn borrowed(&self) -> OpRef<'_> {
        match self {
            TxnOp::Put { key, value, lease } => OpRef::Put {
                key,
                value,
                lease: *lease,
            },
            TxnOp::Delete { key } => OpRef::Delete { key },
            TxnOp::DeletePrefix { prefix } => OpRef::DeletePrefix { prefix },
            TxnOp::Get { key } => OpRef::Get { key },
        }
    }
}

impl Txn {
    /// The borrowed view.
    pub fn borrowed(&self) -> TxnRef<'_> {
        TxnRef {
            compares: self
                .compares
                .iter()
                .map(|c| CompareRef {
                    key: &c.key,
                    op: c.op,
                    target: match &c.target {
                        Target::Value(v) => TargetRef::Value(v),
                        Target::Version(n) => TargetRef::Version(*n),
                        Target::CreateRevision(n) => TargetRef::CreateRevision(*n),
                        Target::ModRevision(n) => TargetRef::ModRevision(*n),
                    },
                })
                .collect(),
            success: self.success.iter().map(TxnOp::borrowed).collect(),
            failure: self.failure.iter().map(TxnOp::borrowed).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &[u8], value: &[u8]) -> TxnOp {
        TxnOp::Put {
            key: key.to_vec(),
            value: value.to_vec(),
            lease: 0,
        }
    }

    #[test]
    fn compare_ops_order_integers_and_bytes() {
        assert!(CompareOp::Equal.holds(&3u64, &3));
        assert!(CompareOp::NotEqual.holds(&3u64, &4));
        assert!(CompareOp::Less.holds(&3u64, &4) && !CompareOp::Less.holds(&4u64, &4));
        assert!(CompareOp::Greater.holds(&b"b"[..], &b"a"[..]));
        assert!(CompareOp::Less.holds(&b"a"[..], &b"ab"[..]));
        assert_eq!(CompareOp::parse("!="), Some(CompareOp::NotEqual));
        assert_eq!(CompareOp::parse("<="), None);
    }

    #[test]
    fn limits_bound_counts_sizes_and_keys() {
        let limits = TxnLimits {
            compares_max: 1,
            ops_max: 2,
            bytes_max: 10,
        };
        let cmd = CommandLimits::default();
        let mut txn = Txn {
            compares: vec![Compare {
                key: b"k".to_vec(),
                op: CompareOp::Equal,
                target: Target::ModRevision(0),
            }],
            success: vec![put(b"k", b"v")],
            failure: vec![TxnOp::Get { key: b"k".to_vec() }],
        };
        assert!(txn.borrowed().validate(&limits, &cmd).is_ok());
        txn.success.push(put(b"a", b"b"));
        txn.success.push(put(b"c", b"d"));
        let err = txn.borrowed().validate(&limits, &cmd).unwrap_err();
        assert!(matches!(err, CommandError::TxnTooLarge(_)), "{err}");
        txn.success.truncate(1);
        txn.failure = vec![put(b"k", b"0123456789")];
        let err = txn.borrowed().validate(&limits, &cmd).unwrap_err();
        assert!(err.to_string().contains("bytes"), "{err}");
        txn.failure = vec![TxnOp::Delete { key: Vec::new() }];
        assert!(matches!(
            txn.borrowed().validate(&limits, &cmd),
            Err(CommandError::EmptyKey)
        ));
    }

    #[test]
    fn owned_and_borrowed_forms_round_trip() {
        let txn = Txn {
            compares: vec![Compare {
                key: b"k".to_vec(),
                op: CompareOp::Greater,
                target: Target::Value(b"x".to_vec()),
            }],
            success: vec![
                put(b"k", b"v"),
                TxnOp::DeletePrefix {
                    prefix: b"p/".to_vec(),
                },
            ],
            failure: vec![TxnOp::Get { key: b"k".to_vec() }],
        };
        assert_eq!(txn.borrowed().to_txn(), txn);
    }
}
