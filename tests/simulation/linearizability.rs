//! A Wing–Gong linearizability checker with Lowe's memoization, partitioned per key.
//!
//! The model is a revisioned register per key: absent, or a value with its
//! `create_revision`, `mod_revision` and `version` (puts since creation), as the state machine
//! keeps them. An operation is a list of [`Action`]s on one key taking effect at one point:
//! compares that held or failed, reads of the whole record, puts (which set `mod_revision`
//! to the operation's revision and count a version) and deletes. A plain put, delete or read
//! is one action; a conditional put (`mod_revision == N` compare, put on success, get on
//! failure) is two; a multi-key transaction is projected onto each key it touches (its
//! compares on that key, then its operations on it, all at the transaction's revision).
//!
//! Keys are independent, so checking each key's sub-history alone is equivalent to checking
//! the whole history (linearizability is compositional) for single-key operations, and far
//! cheaper. For multi-key transactions the per-key projection is a necessary condition (any
//! linearization of the whole history projects onto each key). The revisions make it
//! stronger: every operation that knows its revision (the Raft index it applied at) must be
//! linearized on each key after every operation with a lower one, so all keys agree with
//! the log's one order, and a transaction's effects on its keys sit at the same revision.
//!
//! Operations whose outcome is unknown (the client gave up waiting) may take effect at any
//! point after their invocation or never (`must_happen` false); operations whose effect the
//! simulator found in the committed log but whose answer the client never got must take
//! effect, at any point after their invocation (`must_happen` true). Both have their return
//! placed after every known event (or at their `effect_deadline`).
//!
//! Times are a strictly increasing logical clock, so no two events tie.

use std::collections::{BTreeMap, HashSet};

/// A key's record in the model.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rec {
    pub value: String,
    pub create_revision: u64,
    pub mod_revision: u64,
    pub version: u64,
}

/// What a compare looks at, with the operand.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Value(String),
    Version(u64),
    CreateRevision(u64),
    ModRevision(u64),
}

/// A compare's operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Gt,
}

impl Cmp {
    fn holds<T: Ord + ?Sized>(self, current: &T, given: &T) -> bool {
        match self {
            Cmp::Eq => current == given,
            Cmp::Ne => current != given,
            Cmp::Lt => current < given,
            Cmp::Gt => current > given,
        }
    }
}

/// One step of an operation on its key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// A compare on the key that evaluated to `holds`.
    Check {
        target: Target,
        cmp: Cmp,
        holds: bool,
    },
    /// A read that saw this record (`None`: absent).
    Read(Option<Rec>),
    /// A put; `result` is the (create_revision, version) it reported, if known.
    Put {
        value: String,
        result: Option<(u64, u64)>,
    },
    /// A delete; `existed` is what it reported, if known.
    Delete { existed: Option<bool> },
}

/// One client operation's effect on one key.
#[derive(Clone, Debug)]
pub struct Op {
    pub client: u64,
    pub key: String,
    /// What the client asked for, for failure reports.
    pub what: String,
    pub actions: Vec<Action>,
    /// The revision (log index) the operation took effect at, if known. Required for puts.
    pub rev: Option<u64>,
    /// Invocation time (first attempt).
    pub call: u64,
    /// Response time; `None` if the client never got an answer.
    pub ret: Option<u64>,
    /// For an op without response: it certainly took effect (found in the committed log).
    pub must_happen: bool,
    /// For an op without response: the time after which it can no longer take effect, if
    /// known.
    pub effect_deadline: Option<u64>,
}

impl Op {
    /// Whether the search must linearize this op (it cannot be left out as never applied).
    fn required(&self) -> bool {
        self.ret.is_some() || self.must_happen
    }
}

/// The model's state: the record, and the highest revision linearized on the key so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct State {
    rec: Option<Rec>,
    rev: u64,
}

fn compare(rec: &Option<Rec>, target: &Target, cmp: Cmp) -> bool {
    match (rec, target) {
        // A value compare on an absent key is false whatever the operator.
        (None, Target::Value(_)) => false,
        (Some(r), Target::Value(v)) => cmp.holds(r.value.as_bytes(), v.as_bytes()),
        (r, Target::Version(n)) => cmp.holds(&r.as_ref().map_or(0, |r| r.version), n),
        (r, Target::CreateRevision(n)) => {
            cmp.holds(&r.as_ref().map_or(0, |r| r.create_revision), n)
        }
        (r, Target::ModRevision(n)) => cmp.holds(&r.as_ref().map_or(0, |r| r.mod_revision), n),
    }
}

/// Applies `op` to `state`; returns the new state if the op's known results are consistent.
fn step(state: &State, op: &Op) -> Option<State> {
    if op.rev.is_some_and(|r| r <= state.rev) {
        return None;
    }
    let mut rec = state.rec.clone();
    for action in &op.actions {
        match action {
            Action::Check { target, cmp, holds } => {
                if compare(&rec, target, *cmp) != *holds {
                    return None;
                }
            }
            Action::Read(seen) => {
                if seen != &rec {
                    return None;
                }
            }
            Action::Put { value, result } => {
                let rev = op.rev.expect("a put knows its revision");
                let (create_revision, version) = match &rec {
                    Some(r) => (r.create_revision, r.version + 1),
                    None => (rev, 1),
                };
                if result.is_some_and(|got| got != (create_revision, version)) {
                    return None;
                }
                rec = Some(Rec {
                    value: value.clone(),
                    create_revision,
                    mod_revision: rev,
                    version,
                });
            }
            Action::Delete { existed } => {
                if existed.is_some_and(|e| e != rec.is_some()) {
                    return None;
                }
                rec = None;
            }
        }
    }
    Some(State {
        rec,
        rev: op.rev.unwrap_or(state.rev),
    })
}

/// Search steps allowed per key before giving up (deterministic, unlike a time limit).
const MAX_STEPS_PER_KEY: u64 = 50_000_000;

/// Checks a whole history; on failure names the key whose sub-history is not linearizable.
pub fn check(history: &[Op]) -> Result<(), String> {
    let mut by_key: BTreeMap<&str, Vec<Op>> = BTreeMap::new();
    for op in history {
        by_key.entry(op.key.as_str()).or_default().push(op.clone());
    }
    for (key, ops) in by_key {
        match check_key(&ops) {
            Some(true) => {}
            verdict => {
                let mut desc = String::new();
                for op in &ops {
                    let ret = match (op.ret, op.must_happen) {
                        (Some(t), _) => format!("returned at {t}"),
                        (None, true) => "unanswered, found in the log".to_string(),
                        (None, false) => {
                            format!("unknown outcome (deadline {:?})", op.effect_deadline)
                        }
                    };
                    desc.push_str(&format!(
                        "\n  client {} {} called at {} {ret}: rev {:?} {:?}",
                        op.client, op.what, op.call, op.rev, op.actions
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

/// The event list of a WGL search: a doubly linked list over event slots 1..=2n (slot 0 is
/// the head sentinel), with each op's call and return slots.
struct Events {
    events: Vec<(u64, usize, bool)>,
    next: Vec<usize>,
    prev: Vec<usize>,
    call_slot: Vec<usize>,
    ret_slot: Vec<usize>,
}

impl Events {
    fn new(ops: &[Op]) -> Events {
        let n = ops.len();
        // Events: (time, op, is_return). Returns of unanswered ops go after everything.
        let mut events: Vec<(u64, usize, bool)> = Vec::with_capacity(2 * n);
        for (i, op) in ops.iter().enumerate() {
            events.push((op.call, i, false));
            let ret = match op.ret {
                Some(t) => t,
                None => op.effect_deadline.unwrap_or(u64::MAX),
            };
            events.push((ret, i, true));
        }
        events.sort_by_key(|&(t, i, is_ret)| (t, is_ret, i));
        let len = events.len() + 1;
        let next = (0..len)
            .map(|k| if k + 1 < len { k + 1 } else { NONE })
            .collect();
        let prev = (0..len)
            .map(|k| if k == 0 { NONE } else { k - 1 })
            .collect();
        let (mut call_slot, mut ret_slot) = (vec![0; n], vec![0; n]);
        for (k, &(_, i, is_ret)) in events.iter().enumerate() {
            if is_ret {
                ret_slot[i] = k + 1;
            } else {
                call_slot[i] = k + 1;
            }
        }
        Events {
            events,
            next,
            prev,
            call_slot,
            ret_slot,
        }
    }

    fn unlink_slot(&mut self, slot: usize) {
        let (p, nx) = (self.prev[slot], self.next[slot]);
        self.next[p] = nx;
        if nx != NONE {
            self.prev[nx] = p;
        }
    }

    fn relink_slot(&mut self, slot: usize) {
        let (p, nx) = (self.prev[slot], self.next[slot]);
        self.next[p] = slot;
        if nx != NONE {
            self.prev[nx] = slot;
        }
    }

    /// Takes op `i`'s call and return out of the list.
    fn lift(&mut self, i: usize) {
        self.unlink_slot(self.call_slot[i]);
        self.unlink_slot(self.ret_slot[i]);
    }

    /// Puts op `i` back; returns the slot after its call.
    fn unlift(&mut self, i: usize) -> usize {
        self.relink_slot(self.ret_slot[i]);
        self.relink_slot(self.call_slot[i]);
        self.next[self.call_slot[i]]
    }
}

/// WGL search over one key's operations: `Some(verdict)`, or `None` if the step budget ran out.
pub fn check_key(ops: &[Op]) -> Option<bool> {
    let n = ops.len();
    let mut ev = Events::new(ops);
    let mut linearized = vec![0u64; n.div_ceil(64)];
    let mut cache: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut state = State::default();
    // (op, state before it, whether it was left out as never applied)
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut required_left = ops.iter().filter(|o| o.required()).count();
    let mut cur = ev.next[0];
    let mut steps = 0u64;
    while cur != NONE {
        steps += 1;
        if steps > MAX_STEPS_PER_KEY {
            return None;
        }
        let (_, i, is_ret) = ev.events[cur - 1];
        if !is_ret {
            let mut lifted = false;
            if let Some(new_state) = step(&state, &ops[i]) {
                linearized[i / 64] |= 1 << (i % 64);
                if cache.insert((linearized.clone(), new_state.clone())) {
                    stack.push((i, std::mem::replace(&mut state, new_state)));
                    ev.lift(i);
                    required_left -= usize::from(ops[i].required());
                    lifted = true;
                } else {
                    linearized[i / 64] &= !(1 << (i % 64));
                }
            }
            cur = if lifted { ev.next[0] } else { ev.next[cur] };
            continue;
        }
        if !ops[i].required() {
            if required_left == 0 {
                // Only ops that may never take effect remain.
                return Some(true);
            }
            // Past its deadline (or the end) without taking effect: in this branch it never
            // does.
            linearized[i / 64] |= 1 << (i % 64);
            if cache.insert((linearized.clone(), state.clone())) {
                stack.push((i, state.clone()));
                ev.lift(i);
                cur = ev.next[0];
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
        required_left += usize::from(ops[j].required());
        cur = ev.unlift(j);
    }
    Some(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: u64, actions: Vec<Action>, rev: Option<u64>, call: u64, ret: Option<u64>) -> Op {
        Op {
            client,
            key: "k".into(),
            what: format!("{actions:?}"),
            actions,
            rev,
            call,
            ret,
            must_happen: false,
            effect_deadline: None,
        }
    }
    fn put(v: &str) -> Vec<Action> {
        vec![Action::Put {
            value: v.into(),
            result: None,
        }]
    }
    fn put_as(v: &str, create: u64, version: u64) -> Vec<Action> {
        vec![Action::Put {
            value: v.into(),
            result: Some((create, version)),
        }]
    }
    fn del(existed: Option<bool>) -> Vec<Action> {
        vec![Action::Delete { existed }]
    }
    fn rec(v: &str, create: u64, modr: u64, version: u64) -> Option<Rec> {
        Some(Rec {
            value: v.into(),
            create_revision: create,
            mod_revision: modr,
            version,
        })
    }
    fn get(seen: Option<Rec>) -> Vec<Action> {
        vec![Action::Read(seen)]
    }
    /// A conditional put as the HTTP layer sends it: `mod_revision == expect`, put on
    /// success, get on failure.
    fn cas(expect: u64, v: &str, outcome: Result<(), Option<Rec>>) -> Vec<Action> {
        let check = |holds| Action::Check {
            target: Target::ModRevision(expect),
            cmp: Cmp::Eq,
            holds,
        };
        match outcome {
            Ok(()) => vec![check(true), put(v).remove(0)],
            Err(current) => vec![check(false), Action::Read(current)],
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![
            op(1, put_as("a", 2, 1), Some(2), 1, Some(2)),
            op(1, get(rec("a", 2, 2, 1)), None, 3, Some(4)),
            op(1, put_as("b", 2, 2), Some(5), 5, Some(6)),
            op(1, del(Some(true)), Some(7), 7, Some(8)),
            op(1, get(None), None, 9, Some(10)),
            op(1, del(Some(false)), Some(11), 11, Some(12)),
        ];
        assert!(check(&h).is_ok());
    }

    #[test]
    fn concurrent_ops_may_reorder_but_revisions_fix_the_order() {
        // put(a) and put(b) overlap; a read after both sees the one with the higher revision.
        let h = vec![
            op(1, put("a"), Some(4), 1, Some(5)),
            op(2, put("b"), Some(3), 2, Some(4)),
            op(3, get(rec("a", 3, 4, 2)), None, 6, Some(7)),
        ];
        assert!(check(&h).is_ok());
        let bad = vec![
            op(1, put("a"), Some(4), 1, Some(5)),
            op(2, put("b"), Some(3), 2, Some(4)),
            op(3, get(rec("b", 3, 3, 1)), None, 6, Some(7)),
        ];
        assert!(check(&bad).is_err());
    }

    #[test]
    fn revisions_must_follow_real_time() {
        // The second put started after the first returned, yet applied at a lower revision.
        let h = vec![
            op(1, put("a"), Some(5), 1, Some(2)),
            op(2, put("b"), Some(4), 3, Some(4)),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn stale_read_is_not_linearizable() {
        let h = vec![
            op(1, put("a"), Some(2), 1, Some(2)),
            op(1, put("b"), Some(3), 3, Some(4)),
            op(2, get(rec("a", 2, 2, 1)), None, 5, Some(6)),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn lost_acknowledged_write_is_not_linearizable() {
        let h = vec![
            op(1, put("a"), Some(2), 1, Some(2)),
            op(2, get(None), None, 3, Some(4)),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn a_write_applied_twice_shows_in_its_version() {
        // The same put applied twice would leave version 2: a read saying so is refused.
        let h = vec![
            op(1, put_as("a", 2, 1), Some(2), 1, Some(2)),
            op(2, get(rec("a", 2, 3, 2)), None, 3, Some(4)),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn delete_result_must_match_state() {
        let h = vec![
            op(1, put("a"), Some(2), 1, Some(2)),
            op(2, del(Some(false)), Some(3), 3, Some(4)),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn compare_and_swap_follows_the_register() {
        // put a@2; CAS(2 → b) succeeds at 4; CAS(2 → c) then fails and sees b@4.
        let h = vec![
            op(1, put("a"), Some(2), 1, Some(2)),
            op(1, cas(2, "b", Ok(())), Some(4), 3, Some(4)),
            op(2, cas(2, "c", Err(rec("b", 2, 4, 2))), Some(6), 5, Some(6)),
        ];
        assert!(check(&h).is_ok());
        // Two concurrent CAS on the same revision cannot both succeed.
        let h = vec![
            op(1, put("a"), Some(2), 1, Some(2)),
            op(1, cas(2, "b", Ok(())), Some(4), 3, Some(8)),
            op(2, cas(2, "c", Ok(())), Some(5), 3, Some(8)),
        ];
        assert!(check(&h).unwrap_err().contains("not linearizable"));
        // A failed CAS must report the current record.
        let h = vec![
            op(1, put("a"), Some(2), 1, Some(2)),
            op(2, cas(1, "c", Err(None)), Some(3), 3, Some(4)),
        ];
        assert!(check(&h).is_err());
        // A failed CAS whose condition held is a lie.
        let h = vec![
            op(1, put("a"), Some(2), 1, Some(2)),
            op(2, cas(2, "c", Err(rec("a", 2, 2, 1))), Some(3), 3, Some(4)),
        ];
        assert!(check(&h).is_err());
        // "Only if absent" (mod_revision == 0).
        let h = vec![op(2, cas(0, "c", Ok(())), Some(3), 3, Some(4))];
        assert!(check(&h).is_ok());
    }

    #[test]
    fn unknown_outcome_may_apply_late_or_never() {
        // A put with unknown outcome, then reads that first miss it and then see it: fine.
        let h = vec![
            op(1, del(None), None, 1, None),
            op(2, put("a"), Some(2), 1, Some(2)),
            op(2, get(rec("a", 2, 2, 1)), None, 3, Some(4)),
            op(2, get(None), None, 5, Some(6)),
        ];
        assert!(check(&h).is_ok());
        // Never taking effect is fine too.
        let h = vec![
            op(1, del(None), None, 1, None),
            op(2, put("a"), Some(2), 1, Some(2)),
            op(2, get(rec("a", 2, 2, 1)), None, 3, Some(4)),
        ];
        assert!(check(&h).is_ok());
        // But it cannot take effect before it was invoked.
        let h = vec![
            op(2, put("a"), Some(2), 1, Some(2)),
            op(2, get(None), None, 3, Some(4)),
            op(1, del(None), None, 5, None),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn effects_found_in_the_log_must_happen() {
        // A put the client never heard back about, but the log holds: it must be linearized.
        let mut found = op(1, put("a"), Some(3), 1, None);
        found.must_happen = true;
        let h = vec![found.clone(), op(2, get(None), None, 2, Some(3))];
        assert!(check(&h).is_ok());
        // Seen after the read: fine.
        let h = vec![
            found.clone(),
            op(2, get(None), None, 2, Some(3)),
            op(2, get(rec("a", 3, 3, 1)), None, 4, Some(5)),
        ];
        assert!(check(&h).is_ok());
        // But it cannot take effect before a later-revision write that a read saw last.
        let h = vec![
            found,
            op(2, put("b"), Some(5), 4, Some(5)),
            op(2, get(rec("b", 5, 5, 1)), None, 6, Some(7)),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn unknown_outcome_cannot_apply_after_its_deadline() {
        let mut late = op(1, del(None), None, 1, None);
        late.effect_deadline = Some(5);
        let base = op(2, put("a"), Some(2), 1, Some(2));
        // Missed after the deadline, then seen: not possible.
        let h = vec![
            base.clone(),
            late.clone(),
            op(2, get(rec("a", 2, 2, 1)), None, 6, Some(7)),
            op(2, get(None), None, 8, Some(9)),
        ];
        assert!(check(&h).is_err());
        // Never taking effect stays possible.
        let h = vec![base, late, op(2, get(rec("a", 2, 2, 1)), None, 6, Some(7))];
        assert!(check(&h).is_ok());
    }

    #[test]
    fn many_unknown_writes_do_not_explode() {
        // 40 abandoned deletes, each bounded by a deadline, then an impossible read: the
        // search must give a verdict quickly.
        let mut h = vec![op(2, put("a"), Some(2), 0, Some(1))];
        for k in 0..40u64 {
            let mut d = op(1, del(None), None, 10 * k + 2, None);
            d.effect_deadline = Some(10 * k + 15);
            h.push(d);
        }
        h.push(op(2, get(rec("zzz", 1, 1, 1)), None, 1000, Some(1001)));
        assert!(check(&h).unwrap_err().contains("not linearizable"));
    }

    #[test]
    fn keys_are_checked_independently() {
        let mut h = vec![
            op(1, put("a"), Some(2), 1, Some(2)),
            op(2, get(rec("a", 2, 2, 1)), None, 3, Some(4)),
        ];
        let mut other = op(3, get(rec("a", 2, 2, 1)), None, 5, Some(6));
        other.key = "other".into();
        h.push(other);
        let err = check(&h).unwrap_err();
        assert!(err.contains("\"other\""), "{err}");
    }

    #[test]
    fn many_concurrent_writers_check_quickly() {
        // 12 overlapping puts then a read of the last by revision: linearizable; the search
        // must not explode thanks to memoization.
        let mut h: Vec<Op> = (0..12)
            .map(|c| op(c, put(&format!("v{c}")), Some(10 + c), c, Some(100 + c)))
            .collect();
        h.push(op(99, get(rec("v11", 10, 21, 12)), None, 200, Some(201)));
        assert!(check(&h).is_ok());
        h.push(op(99, get(rec("v3", 10, 13, 4)), None, 202, Some(203)));
        assert!(check(&h).is_err());
    }
}
