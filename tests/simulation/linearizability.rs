//! A Wing–Gong linearizability checker with Lowe's memoization, partitioned per key.
//!
//! The model is a register per key (`Option<String>`) with put, delete (returns whether the
//! key existed) and get. Keys are independent, so checking each key's sub-history alone is
//! equivalent to checking the whole history (linearizability is compositional), and far
//! cheaper. Operations whose outcome is unknown (the client gave up waiting) may take effect
//! at any point after their invocation or never: their return is placed after every known
//! event, and the search succeeds once every known operation is linearized.
//!
//! Times are a strictly increasing logical clock, so no two events tie.

use std::collections::{BTreeMap, HashSet};

/// What an operation asked for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    Put(String),
    Delete,
    Get,
}

/// What an operation returned.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum OpResult {
    Put,
    Delete { existed: bool },
    Get(Option<String>),
}

/// One client operation in a history.
#[derive(Clone, Debug)]
pub struct Op {
    pub client: u64,
    pub key: String,
    pub kind: OpKind,
    /// Invocation time (first attempt).
    pub call: u64,
    /// Response time and result; `None` if the outcome is unknown.
    pub ret: Option<(u64, OpResult)>,
    /// For an op with unknown outcome: the time after which it can no longer take effect, if
    /// known (e.g. the client's next write completed: the session then rejects this one).
    pub effect_deadline: Option<u64>,
}

/// Applies `op` to `state`; returns the new state if the op's known result is consistent.
fn step(state: &Option<String>, op: &Op) -> Option<Option<String>> {
    let result = op.ret.as_ref().map(|(_, r)| r);
    match (&op.kind, result) {
        (OpKind::Put(v), None | Some(OpResult::Put)) => Some(Some(v.clone())),
        (OpKind::Delete, None) => Some(None),
        (OpKind::Delete, Some(OpResult::Delete { existed })) => {
            (*existed == state.is_some()).then_some(None)
        }
        (OpKind::Get, None) => Some(state.clone()),
        (OpKind::Get, Some(OpResult::Get(v))) => (v == state).then(|| state.clone()),
        _ => None,
    }
}

/// Search steps allowed per key before giving up (deterministic, unlike a time limit).
const MAX_STEPS_PER_KEY: u64 = 50_000_000;

/// Checks a whole history; on failure names the key whose sub-history is not linearizable.
pub fn check(history: &[Op]) -> Result<(), String> {
    let mut by_key: BTreeMap<&str, Vec<Op>> = BTreeMap::new();
    for op in history {
        // A read with unknown outcome has no effect: leave it out.
        if op.kind == OpKind::Get && op.ret.is_none() {
            continue;
        }
        by_key.entry(op.key.as_str()).or_default().push(op.clone());
    }
    for (key, ops) in by_key {
        match check_key(&ops) {
            Some(true) => {}
            verdict => {
                let mut desc = String::new();
                for op in &ops {
                    let ret = match &op.ret {
                        Some((t, r)) => format!("returned at {t}: {r:?}"),
                        None => format!("unknown outcome (deadline {:?})", op.effect_deadline),
                    };
                    desc.push_str(&format!(
                        "\n  client {} {:?} called at {} {ret}",
                        op.client, op.kind, op.call
                    ));
                }
                let what = if verdict.is_none() {
                    "could not be checked within the step budget"
                } else {
                    "is not linearizable"
                };
                return Err(format!("history of key {key:?} {what}:{desc}"));
            }
        }
    }
    Ok(())
}

const NONE: usize = usize::MAX;

/// WGL search over one key's operations: `Some(verdict)`, or `None` if the step budget ran out.
pub fn check_key(ops: &[Op]) -> Option<bool> {
    let n = ops.len();
    if n == 0 {
        return Some(true);
    }
    // Events: (time, op, is_return). Unknown returns go after everything.
    let mut events: Vec<(u64, usize, bool)> = Vec::with_capacity(2 * n);
    for (i, op) in ops.iter().enumerate() {
        events.push((op.call, i, false));
        let ret = match &op.ret {
            Some((t, _)) => *t,
            None => op.effect_deadline.unwrap_or(u64::MAX),
        };
        events.push((ret, i, true));
    }
    events.sort_by_key(|&(t, i, is_ret)| (t, is_ret, i));
    // Doubly linked list over event slots 1..=2n, slot 0 is the head sentinel.
    let len = events.len() + 1;
    let mut next = vec![NONE; len];
    let mut prev = vec![NONE; len];
    for k in 0..len {
        next[k] = if k + 1 < len { k + 1 } else { NONE };
        prev[k] = if k == 0 { NONE } else { k - 1 };
    }
    let mut call_slot = vec![0; n];
    let mut ret_slot = vec![0; n];
    for (k, &(_, i, is_ret)) in events.iter().enumerate() {
        if is_ret {
            ret_slot[i] = k + 1;
        } else {
            call_slot[i] = k + 1;
        }
    }
    let unlink = |slot: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (p, nx) = (prev[slot], next[slot]);
        next[p] = nx;
        if nx != NONE {
            prev[nx] = p;
        }
    };
    let relink = |slot: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (p, nx) = (prev[slot], next[slot]);
        next[p] = slot;
        if nx != NONE {
            prev[nx] = slot;
        }
    };
    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    let mut state: Option<String> = None;
    let mut stack: Vec<(usize, Option<String>)> = Vec::new();
    let mut cur = next[0];
    let mut steps = 0u64;
    while cur != NONE {
        steps += 1;
        if steps > MAX_STEPS_PER_KEY {
            return None;
        }
        let (_, i, is_ret) = events[cur - 1];
        if !is_ret {
            let mut lifted = false;
            if let Some(new_state) = step(&state, &ops[i]) {
                linearized[i / 64] |= 1 << (i % 64);
                if cache.insert((linearized.clone(), new_state.clone())) {
                    stack.push((i, std::mem::replace(&mut state, new_state)));
                    unlink(call_slot[i], &mut next, &mut prev);
                    unlink(ret_slot[i], &mut next, &mut prev);
                    lifted = true;
                } else {
                    linearized[i / 64] &= !(1 << (i % 64));
                }
            }
            cur = if lifted { next[0] } else { next[cur] };
        } else {
            if ops[i].ret.is_none() {
                if ops[i].effect_deadline.is_none() {
                    // Only unknown-outcome ops without deadline remain: they may never take
                    // effect.
                    return Some(true);
                }
                // Past its deadline without taking effect: in this branch it never does.
                linearized[i / 64] |= 1 << (i % 64);
                if cache.insert((linearized.clone(), state.clone())) {
                    stack.push((i, state.clone()));
                    unlink(call_slot[i], &mut next, &mut prev);
                    unlink(ret_slot[i], &mut next, &mut prev);
                    cur = next[0];
                    continue;
                }
                linearized[i / 64] &= !(1 << (i % 64));
            }
            // Op `i` returned without being linearized: backtrack.
            let Some((j, old_state)) = stack.pop() else {
                return Some(false);
            };
            state = old_state;
            linearized[j / 64] &= !(1 << (j % 64));
            relink(ret_slot[j], &mut next, &mut prev);
            relink(call_slot[j], &mut next, &mut prev);
            cur = next[call_slot[j]];
        }
    }
    Some(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: u64, kind: OpKind, call: u64, ret: Option<(u64, OpResult)>) -> Op {
        Op {
            client,
            key: "k".into(),
            kind,
            call,
            ret,
            effect_deadline: None,
        }
    }
    fn put(v: &str) -> OpKind {
        OpKind::Put(v.into())
    }
    fn got(v: Option<&str>) -> OpResult {
        OpResult::Get(v.map(String::from))
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![
            op(1, put("a"), 1, Some((2, OpResult::Put))),
            op(1, OpKind::Get, 3, Some((4, got(Some("a"))))),
            op(
                1,
                OpKind::Delete,
                5,
                Some((6, OpResult::Delete { existed: true })),
            ),
            op(1, OpKind::Get, 7, Some((8, got(None)))),
            op(
                1,
                OpKind::Delete,
                9,
                Some((10, OpResult::Delete { existed: false })),
            ),
        ];
        assert!(check(&h).is_ok());
    }

    #[test]
    fn concurrent_ops_may_reorder() {
        // put(a) and put(b) overlap; a read after both may see either, but two later reads
        // must agree with one order.
        let h = vec![
            op(1, put("a"), 1, Some((5, OpResult::Put))),
            op(2, put("b"), 2, Some((4, OpResult::Put))),
            op(3, OpKind::Get, 6, Some((7, got(Some("a"))))),
            op(3, OpKind::Get, 8, Some((9, got(Some("a"))))),
        ];
        assert!(check(&h).is_ok());
        let bad = vec![
            op(1, put("a"), 1, Some((5, OpResult::Put))),
            op(2, put("b"), 2, Some((4, OpResult::Put))),
            op(3, OpKind::Get, 6, Some((7, got(Some("a"))))),
            op(3, OpKind::Get, 8, Some((9, got(Some("b"))))),
        ];
        assert!(check(&bad).is_err());
    }

    #[test]
    fn stale_read_is_not_linearizable() {
        let h = vec![
            op(1, put("a"), 1, Some((2, OpResult::Put))),
            op(1, put("b"), 3, Some((4, OpResult::Put))),
            op(2, OpKind::Get, 5, Some((6, got(Some("a"))))),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn lost_acknowledged_write_is_not_linearizable() {
        let h = vec![
            op(1, put("a"), 1, Some((2, OpResult::Put))),
            op(2, OpKind::Get, 3, Some((4, got(None)))),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn read_of_never_written_value_is_not_linearizable() {
        let h = vec![op(2, OpKind::Get, 3, Some((4, got(Some("z")))))];
        assert!(check(&h).is_err());
    }

    #[test]
    fn delete_result_must_match_state() {
        let h = vec![
            op(1, put("a"), 1, Some((2, OpResult::Put))),
            op(
                2,
                OpKind::Delete,
                3,
                Some((4, OpResult::Delete { existed: false })),
            ),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn unknown_outcome_may_apply_late_or_never() {
        // A put with unknown outcome, then reads that first miss it and then see it: fine.
        let h = vec![
            op(1, put("a"), 1, None),
            op(2, OpKind::Get, 3, Some((4, got(None)))),
            op(2, OpKind::Get, 5, Some((6, got(Some("a"))))),
        ];
        assert!(check(&h).is_ok());
        // Never taking effect is fine too.
        let h = vec![
            op(1, put("a"), 1, None),
            op(2, OpKind::Get, 3, Some((4, got(None)))),
        ];
        assert!(check(&h).is_ok());
        // But it cannot take effect before it was invoked.
        let h = vec![
            op(2, OpKind::Get, 1, Some((2, got(Some("a"))))),
            op(1, put("a"), 3, None),
        ];
        assert!(check(&h).is_err());
        // And once seen it cannot be un-seen (no other writer).
        let h = vec![
            op(1, put("a"), 1, None),
            op(2, OpKind::Get, 3, Some((4, got(Some("a"))))),
            op(2, OpKind::Get, 5, Some((6, got(None)))),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn unknown_outcome_cannot_apply_after_its_deadline() {
        let mut late = op(1, put("a"), 1, None);
        late.effect_deadline = Some(4);
        // Seen before the deadline: fine.
        let h = vec![
            late.clone(),
            op(2, OpKind::Get, 2, Some((3, got(Some("a"))))),
        ];
        assert!(check(&h).is_ok());
        // Missed after the deadline, then seen: not possible (it either happened before the
        // deadline, so the first read must see it, or never).
        let h = vec![
            late.clone(),
            op(2, OpKind::Get, 5, Some((6, got(None)))),
            op(2, OpKind::Get, 7, Some((8, got(Some("a"))))),
        ];
        assert!(check(&h).is_err());
        // Never taking effect stays possible.
        let h = vec![late, op(2, OpKind::Get, 5, Some((6, got(None))))];
        assert!(check(&h).is_ok());
    }

    #[test]
    fn many_unknown_writes_do_not_explode() {
        // 40 abandoned writes, each bounded by its successor, then an impossible read: the
        // search must give a verdict quickly.
        let mut h = Vec::new();
        for k in 0..40u64 {
            let mut w = op(1, put(&format!("v{k}")), 10 * k, None);
            w.effect_deadline = Some(10 * k + 15);
            h.push(w);
        }
        h.push(op(2, OpKind::Get, 1000, Some((1001, got(Some("zzz"))))));
        assert!(check(&h).unwrap_err().contains("not linearizable"));
    }

    #[test]
    fn keys_are_checked_independently() {
        let mut h = vec![
            op(1, put("a"), 1, Some((2, OpResult::Put))),
            op(2, OpKind::Get, 3, Some((4, got(Some("a"))))),
        ];
        let mut other = op(3, OpKind::Get, 5, Some((6, got(Some("a")))));
        other.key = "other".into();
        h.push(other);
        let err = check(&h).unwrap_err();
        assert!(err.contains("\"other\""), "{err}");
    }

    #[test]
    fn many_concurrent_writers_check_quickly() {
        // 12 overlapping puts then a read of one of them: linearizable; the search must not
        // explode thanks to memoization.
        let mut h: Vec<Op> = (0..12)
            .map(|c| op(c, put(&format!("v{c}")), c, Some((100 + c, OpResult::Put))))
            .collect();
        h.push(op(99, OpKind::Get, 200, Some((201, got(Some("v7"))))));
        assert!(check(&h).is_ok());
        h.push(op(99, OpKind::Get, 202, Some((203, got(Some("v3"))))));
        assert!(check(&h).is_err());
    }
}
