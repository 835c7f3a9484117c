//! The simulator's clients and the exactly-once checker (issue 11).
//!
//! Why a module of its own: what clients ask for, how they retry, and how their history is
//! judged is separate from the node runtime's shell in `sim.rs`.
//!
//! Clients issue, through any node and following leader hints, a seeded mix of plain reads,
//! puts and deletes, conditional puts (a transaction: `mod_revision == N` on the key's last
//! known mod_revision, the put on success, a get on failure — what the HTTP layer sends for
//! `PUT ?if_mod_revision=N`), small transactions over 2–3 keys (compares on value, version or
//! mod_revision; puts, deletes and gets) and prefix deletes. Most writes ride a client
//! session, whose first write (seq 1) registers it with a put of its own key `r/<id>` (the
//! Raft thesis' RegisterClient). A session has at most one request in flight; a sessioned
//! write whose outcome is unknown (no answer in time, a 504) is retried with the same
//! (client id, seq), possibly through another node, until a definite answer. A refusal
//! `SessionExpired` (the session was evicted or expired meanwhile) leaves that write's
//! outcome unknown and the client starts a new session. A plain (sessionless) write is a put
//! of a unique value; one with an unknown outcome is not retried. Now and then the sim proposes an `ExpireSessions` entry at the leader
//! (its clock: the simulated time), with a TTL far above any retry horizon, and in a quarter
//! of the seeds a table bound of a few sessions, so sessions get evicted. Clients also grant
//! leases, put keys under them, keep them alive and revoke them (see `leases.rs`); those
//! operations are judged by the lease and watch checks, not the linearizability check.
//!
//! Checked at the end, against the committed log as a reference state machine applied it
//! (every committed entry, once, in order, through the production `StateMachine`):
//! - exactly-once: no (client, seq) took effect (a result neither duplicate nor refused) at
//!   two revisions — but a registration (seq 1) retried after its session was evicted, which
//!   a server cannot tell from a new session; every duplicate in the log repeats the
//!   original's revision and outcome; every answer a client got for (client, seq), from any
//!   attempt, has the revision and outcome of that one effect; no plain put took effect twice;
//! - every node's final records and session table equal the reference's;
//! - linearizability (`linearizability.rs`) of the whole history, with each write's outcome
//!   resolved from the log when the client never got it: found → it happened, with that
//!   result, at some point after its invocation; not found → it never happened.

use super::leases::{self, LeaseLedger, WaitingKeepalive};
use super::linearizability::{self, Action, Cmp, Rec};
use super::{payload_hash, Event, NetMsg, Sim, KEYS};
use raftkv::node::messages::{Input, Request as NodeRequest};
use raftkv::raft::ReadLevel;
use raftkv::storage::command::{
    Command, CommandOutcome, CommandRef, CommandResult, KeyRecord, OpResult, Refusal, Session,
};
use raftkv::storage::sm::history::ChangeEvent;
use raftkv::storage::sm::{EntryOutcome, StateMachine, StateMachineOptions};
use raftkv::storage::txn::{Compare, CompareOp, Target, Txn, TxnOp};
use raftkv::storage::{Entry, EntryKind};
use std::collections::{BTreeSet, HashMap};
use tokio::sync::oneshot;

/// Session TTL the sim's `ExpireSessions` entries carry: far above any retry horizon (a
/// client retries every 0.6 s at most; faults last seconds), so only abandoned sessions
/// expire by age.
pub const SESSION_TTL_MS: u64 = 20_000;

/// A client waits up to this long between two operations: sessioned writes no longer end
/// in an abandoned 600 ms timeout, so clients would otherwise do half as much again as
/// before sessions, and the seeds' CPU budget is fixed (see `DEFAULT_SEEDS`).
const CLIENT_THINK_MS_MAX: u64 = 40;

/// What a write is, for the statistics and failure reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteKind {
    /// A session's first write.
    Register,
    Put,
    Delete,
    Cas,
    Txn,
    DeletePrefix,
    /// Lease writes (`leases.rs`): kept out of the linearizability check.
    LeaseGrant,
    PutLeased,
    LeaseRevoke,
}

#[derive(Clone, Debug)]
pub enum Request {
    Write {
        kind: WriteKind,
        cmd: Command,
        /// (client id, seq) of a sessioned write.
        session: Option<(String, u64)>,
    },
    Read {
        key: String,
    },
    /// A lease keepalive (retried anywhere until answered, like a read).
    Keepalive {
        lease: u64,
    },
}

impl Request {
    /// Lease operations: checked by the lease and watch checks, not by linearizability.
    fn is_lease(&self) -> bool {
        match self {
            Request::Keepalive { .. } => true,
            Request::Write { kind, .. } => matches!(
                kind,
                WriteKind::LeaseGrant | WriteKind::PutLeased | WriteKind::LeaseRevoke
            ),
            Request::Read { .. } => false,
        }
    }
}

#[derive(Clone, Debug)]
pub enum Response {
    Written {
        session: Option<(String, u64)>,
        result: CommandResult,
    },
    Read(Option<KeyRecord>),
    Redirect(Option<u64>),
    Retry,
    /// The write may or may not have happened (504).
    Unknown,
    /// The keepalive renewed the lease.
    KeptAlive {
        remaining_ms: u64,
    },
    /// The keepalive found no such lease (404: revoked, expired or its revoke in flight).
    LeaseGone,
}

/// A client's definite answer.
#[derive(Clone, Debug)]
pub enum Answer {
    Write(CommandResult),
    Read(Option<KeyRecord>),
    /// A keepalive was answered (renewed, or the lease is gone).
    Keepalive,
}

/// One client operation as its client saw it.
#[derive(Clone, Debug)]
pub struct ClientOp {
    pub client: u64,
    pub req: Request,
    /// Invocation time (first attempt).
    pub call: u64,
    /// When and what the client was answered; `None`: no definite answer.
    pub ret: Option<(u64, Answer)>,
}

pub struct Client {
    pub id: u64,
    pub target: u64,
    pub attempt: u64,
    /// (history index, request) of the op in progress.
    pub current: Option<(usize, Request)>,
    /// The session's id, and the last seq it used (0: not registered yet).
    pub session: String,
    pub session_seq: u64,
    sessions_started: u64,
    /// Plain writes issued (their values are unique).
    plain: u64,
    /// The key records as this client last saw them.
    known: HashMap<String, Option<KeyRecord>>,
    /// When the current attempt was sent.
    sent_ms: u64,
    /// The leases this client holds (as far as it knows).
    leases: Vec<HeldLease>,
}

/// A lease a client was granted.
#[derive(Clone, Copy, Debug)]
struct HeldLease {
    id: u64,
    ttl_ms: u64,
    /// Keep it alive (else let it lapse).
    keep_alive: bool,
    /// When the next keepalive is due.
    keepalive_at_ms: u64,
}

impl Client {
    pub fn new(id: u64, target: u64) -> Client {
        Client {
            id,
            target,
            attempt: 0,
            current: None,
            session: format!("c{id}s0"),
            session_seq: 0,
            sessions_started: 0,
            plain: 0,
            known: HashMap::new(),
            sent_ms: 0,
            leases: Vec::new(),
        }
    }

    fn forget_lease(&mut self, id: u64) {
        self.leases.retain(|l| l.id != id);
    }

    fn new_session(&mut self) {
        self.sessions_started += 1;
        self.session = format!("c{}s{}", self.id, self.sessions_started);
        self.session_seq = 0;
    }

    /// Learns the key records a definite write answer shows.
    fn learn(&mut self, cmd: &Command, result: &CommandResult) {
        let put = |key: &[u8], value: &[u8], create_revision, version| {
            Some(KeyRecord {
                key: key.to_vec(),
                value: value.to_vec(),
                create_revision,
                mod_revision: result.revision,
                version,
                lease: 0,
            })
        };
        match (cmd, &result.outcome) {
            (
                Command::Put { key, value },
                CommandOutcome::Put {
                    create_revision,
                    version,
                },
            ) => {
                let rec = put(key, value, *create_revision, *version);
                self.known.insert(text(key), rec);
            }
            (Command::Delete { key }, _) => {
                self.known.insert(text(key), None);
            }
            (Command::DeletePrefix { prefix }, _) => {
                for (k, v) in self.known.iter_mut() {
                    if k.as_bytes().starts_with(prefix) {
                        *v = None;
                    }
                }
            }
            (Command::Txn(txn), CommandOutcome::Txn { succeeded, results }) => {
                let branch = if *succeeded {
                    &txn.success
                } else {
                    &txn.failure
                };
                for (op, res) in branch.iter().zip(results) {
                    let rec = match (op, res) {
                        (
                            TxnOp::Put { key, value, .. },
                            OpResult::Put {
                                create_revision,
                                version,
                            },
                        ) => put(key, value, *create_revision, *version),
                        (TxnOp::Get { .. }, OpResult::Get(rec)) => rec.clone(),
                        _ => None,
                    };
                    let key = match op {
                        TxnOp::Put { key, .. } | TxnOp::Delete { key } | TxnOp::Get { key } => key,
                        TxnOp::DeletePrefix { .. } => continue,
                    };
                    self.known.insert(text(key), rec);
                }
            }
            _ => {}
        }
    }
}

fn cmd_is_lease(cmd: &Command) -> bool {
    matches!(
        cmd,
        Command::LeaseGrant { .. } | Command::PutLeased { .. } | Command::LeaseRevoke { .. }
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8(b.to_vec()).expect("keys and values are UTF-8")
}

fn key_name(k: u64) -> String {
    format!("k{k}")
}

/// The mix of a client's next operation (the plain reads, puts and deletes of before, and
/// issue 11's conditional puts, transactions and prefix deletes).
impl Sim {
    /// Picks the client's next operation. A new session registers first.
    fn next_request(&mut self, c: u64) -> Request {
        let cl = &self.clients[c as usize];
        if cl.session_seq == 0 {
            let cmd = Command::Put {
                key: format!("r/{}", cl.session).into_bytes(),
                value: b"open".to_vec(),
            };
            return self.session_write(c, WriteKind::Register, cmd);
        }
        if let Some(req) = self.lease_request(c) {
            return req;
        }
        let key = key_name(self.rng.range(0, KEYS));
        let pick = self.rng.range(0, 20);
        if pick <= 9 {
            return Request::Read { key };
        }
        // Plain writes are puts only (each is unique, so the log tells whether one with an
        // unknown outcome took effect: the checker never has to guess); most are sessioned.
        let sessioned = pick >= 13 || self.rng.range(0, 5) != 0;
        let cl = &mut self.clients[c as usize];
        let tag = if sessioned {
            format!("{}-{}", cl.session, cl.session_seq + 1)
        } else {
            cl.plain += 1;
            format!("c{c}-p{}", cl.plain)
        };
        let (kind, cmd) = match pick {
            10..=12 => {
                let cmd = Command::Put {
                    key: key.into_bytes(),
                    value: tag.into_bytes(),
                };
                (WriteKind::Put, cmd)
            }
            13 => (
                WriteKind::Delete,
                Command::Delete {
                    key: key.into_bytes(),
                },
            ),
            14..=16 => (WriteKind::Cas, self.cas(c, &key, &tag)),
            17 | 18 => (WriteKind::Txn, self.multi_txn(c, &tag)),
            _ => {
                // Mostly one key's "prefix"; a quarter of them wipe every key.
                let prefix = match self.rng.range(0, 4) {
                    0 => "k".to_string(),
                    _ => key,
                };
                let cmd = Command::DeletePrefix {
                    prefix: prefix.into_bytes(),
                };
                (WriteKind::DeletePrefix, cmd)
            }
        };
        if sessioned {
            return self.session_write(c, kind, cmd);
        }
        Request::Write {
            kind,
            cmd,
            session: None,
        }
    }

    /// A lease operation now and then (see `leases.rs`): a keepalive when one is due, else
    /// sometimes a grant, a leased put, a revoke, or letting a lease lapse.
    fn lease_request(&mut self, c: u64) -> Option<Request> {
        let now_ms = self.now;
        let cl = &mut self.clients[c as usize];
        if let Some(l) = cl
            .leases
            .iter_mut()
            .find(|l| l.keep_alive && l.keepalive_at_ms <= now_ms)
        {
            l.keepalive_at_ms = now_ms + l.ttl_ms / 3;
            return Some(Request::Keepalive { lease: l.id });
        }
        if self.rng.range(0, 8) != 0 {
            return None;
        }
        let held = self.clients[c as usize].leases.len() as u64;
        if held < 2 && self.rng.range(0, 3) != 0 {
            let cmd = Command::LeaseGrant {
                ttl_ms: self.rng.range(leases::TTL_MS_MIN, leases::TTL_MS_MAX + 1),
                leases_max: leases::leases_max(self.params.seed),
            };
            return Some(self.session_write(c, WriteKind::LeaseGrant, cmd));
        }
        if held == 0 {
            return None;
        }
        let l = self.clients[c as usize].leases[self.rng.range(0, held) as usize];
        let pick = self.rng.range(0, 10);
        if pick == 9 {
            // Stop keeping it alive: it lapses.
            self.clients[c as usize].forget_lease(l.id);
            return None;
        }
        let (kind, cmd) = if pick == 8 {
            (WriteKind::LeaseRevoke, Command::LeaseRevoke { id: l.id })
        } else {
            let cl = &self.clients[c as usize];
            let cmd = Command::PutLeased {
                key: format!("{}c{c}/{}", leases::LEASED_PREFIX, self.rng.range(0, 4)).into_bytes(),
                value: format!("{}-{}", cl.session, cl.session_seq + 1).into_bytes(),
                lease: l.id,
            };
            (WriteKind::PutLeased, cmd)
        };
        Some(self.session_write(c, kind, cmd))
    }

    /// `cmd` as the client session's next write.
    fn session_write(&mut self, c: u64, kind: WriteKind, cmd: Command) -> Request {
        let cl = &mut self.clients[c as usize];
        cl.session_seq += 1;
        self.stats.writes_sessioned += 1;
        Request::Write {
            kind,
            cmd,
            session: Some((cl.session.clone(), cl.session_seq)),
        }
    }

    /// A conditional put as the HTTP layer sends `PUT ?if_mod_revision=N`, with N the key's
    /// last known mod_revision (0 if absent or unknown).
    fn cas(&mut self, c: u64, key: &str, value: &str) -> Command {
        let known = self.clients[c as usize].known.get(key);
        let expect = known.and_then(|r| r.as_ref()).map_or(0, |r| r.mod_revision);
        let k = key.as_bytes().to_vec();
        Command::Txn(Txn {
            compares: vec![Compare {
                key: k.clone(),
                op: CompareOp::Equal,
                target: Target::ModRevision(expect),
            }],
            success: vec![TxnOp::Put {
                key: k.clone(),
                value: value.as_bytes().to_vec(),
                lease: 0,
            }],
            failure: vec![TxnOp::Get { key: k }],
        })
    }

    /// A small transaction over 2–3 keys: one or two compares on value, version or
    /// mod_revision; puts, deletes and gets.
    fn multi_txn(&mut self, c: u64, tag: &str) -> Command {
        let n = self.rng.range(2, 4);
        let mut keys: Vec<String> = Vec::new();
        while (keys.len() as u64) < n {
            let k = key_name(self.rng.range(0, KEYS));
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        let compares = (0..self.rng.range(1, 3))
            .map(|i| self.txn_compare(c, &keys[i as usize]))
            .collect();
        let b = |k: &String| k.as_bytes().to_vec();
        let put = |k: &String, branch: &str| TxnOp::Put {
            key: b(k),
            value: format!("{tag}-{branch}-{k}").into_bytes(),
            lease: 0,
        };
        let mut success = vec![put(&keys[0], "s")];
        success.push(match self.rng.range(0, 2) {
            0 => TxnOp::Delete { key: b(&keys[1]) },
            _ => put(&keys[1], "s"),
        });
        let mut failure = vec![TxnOp::Get { key: b(&keys[0]) }];
        failure.push(match self.rng.range(0, 2) {
            0 => TxnOp::Get { key: b(&keys[1]) },
            _ => put(&keys[1], "f"),
        });
        if let Some(third) = keys.get(2) {
            success.push(TxnOp::Get { key: b(third) });
            failure.push(put(third, "f"));
        }
        Command::Txn(Txn {
            compares,
            success,
            failure,
        })
    }

    fn txn_compare(&mut self, c: u64, key: &str) -> Compare {
        let known = self.clients[c as usize].known.get(key).cloned().flatten();
        let op = [
            CompareOp::Equal,
            CompareOp::NotEqual,
            CompareOp::Less,
            CompareOp::Greater,
        ][self.rng.range(0, 4) as usize];
        let target = match (self.rng.range(0, 3), known) {
            (0, Some(r)) => Target::Value(r.value),
            (0, None) => Target::Value(b"c0s0-1".to_vec()),
            (1, r) => Target::Version(r.map_or(0, |r| r.version)),
            (_, r) => Target::ModRevision(r.map_or(0, |r| r.mod_revision)),
        };
        Compare {
            key: key.as_bytes().to_vec(),
            op: if self.rng.range(0, 2) == 0 {
                CompareOp::Equal
            } else {
                op
            },
            target,
        }
    }

    /// A request arrives at `node`: the node's service encodes it (a sessioned write carries
    /// the node's clock, the simulated time) and hands it to the consensus step.
    pub(super) fn handle_request(
        &mut self,
        client: u64,
        attempt: u64,
        node: u64,
        req: Request,
    ) -> Result<(), String> {
        let now_ms = self.now;
        let Some(live) = self.live(node) else {
            return Ok(());
        };
        let request = match req {
            Request::Write { cmd, session, .. } => {
                let s = session.as_ref().map(|(client, seq)| Session {
                    client: client.clone().into_bytes(),
                    seq: *seq,
                    now_ms,
                });
                let payload = cmd.encode_with(s.as_ref()).map_err(|e| e.to_string())?;
                let hash = payload_hash(EntryKind::Normal, &payload);
                let (reply, rx) = oneshot::channel();
                live.writes.push(super::WaitingWrite {
                    client,
                    attempt,
                    hash,
                    session,
                    rx,
                });
                NodeRequest::Propose { payload, reply }
            }
            Request::Read { key } => {
                let (reply, rx) = oneshot::channel();
                live.reads.push(super::WaitingRead {
                    client,
                    attempt,
                    key,
                    rx,
                });
                // On lease-read seeds, even clients ask for lease reads and odd ones for
                // linearizable reads (both checked as linearizable, under clock drift and
                // pauses of the leader).
                let level = if self.params.lease_reads && client.is_multiple_of(2) {
                    ReadLevel::Lease
                } else {
                    ReadLevel::Linearizable
                };
                NodeRequest::Read { level, reply }
            }
            Request::Keepalive { lease } => {
                // `confirm_leader`: the clock before the ReadIndex round, then the round.
                let (reply, rx) = oneshot::channel();
                live.keepalives.push(WaitingKeepalive {
                    client,
                    attempt,
                    lease,
                    before_ms: now_ms,
                    rx,
                });
                NodeRequest::Read {
                    level: ReadLevel::Linearizable,
                    reply,
                }
            }
        };
        self.step(node, Input::Request(request))
    }

    pub(super) fn client_next(&mut self, c: u64) {
        if self.healed || self.clients[c as usize].current.is_some() {
            return;
        }
        let req = self.next_request(c);
        if let Request::Write {
            kind: WriteKind::LeaseGrant,
            session: Some(s),
            ..
        } = &req
        {
            self.leases.grant_sent_ms.insert(s.clone(), self.now);
        }
        self.history.push(ClientOp {
            client: c,
            req: req.clone(),
            call: self.clock,
            ret: None,
        });
        let idx = self.history.len() - 1;
        if self.params.lease_reads && c.is_multiple_of(2) && matches!(req, Request::Read { .. }) {
            // A lease reader asks any node, not the one that answered last: so some reads
            // reach a frozen leader after others wrote through its successor, and are served
            // when it wakes, before it hears of the new term (a lease's hardest case).
            self.clients[c as usize].target = self.random_node();
        }
        self.clients[c as usize].current = Some((idx, req));
        self.client_send(c);
    }

    pub(super) fn client_send(&mut self, c: u64) {
        let target = self.clients[c as usize].target;
        if !self.nodes[&target].in_service() {
            // A hint may name a node that has left since: ask another.
            self.clients[c as usize].target = self.random_node();
        }
        let cl = &mut self.clients[c as usize];
        cl.attempt += 1;
        cl.sent_ms = self.now;
        let (attempt, node) = (cl.attempt, cl.target);
        let Some((_, req)) = cl.current.clone() else {
            return;
        };
        self.send_client_msg(NetMsg::Request {
            client: c,
            attempt,
            node,
            req,
        });
        self.schedule(
            super::CLIENT_TIMEOUT_MS,
            Event::ClientTimeout { client: c, attempt },
        );
    }

    /// Whether the client's current request is a sessioned write (retried until definite).
    fn current_is_sessioned(&self, c: u64) -> bool {
        matches!(
            self.clients[c as usize].current,
            Some((
                _,
                Request::Write {
                    session: Some(_),
                    ..
                }
            ))
        )
    }

    /// No answer in time. A read or a sessioned write is retried anywhere; a plain write may
    /// have entered a log and a retry could apply it twice: its outcome stays unknown.
    pub(super) fn client_timeout(&mut self, client: u64, attempt: u64) {
        let cl = &self.clients[client as usize];
        if cl.attempt != attempt || cl.current.is_none() {
            return;
        }
        if matches!(cl.current, Some((_, Request::Write { .. }))) {
            if !self.current_is_sessioned(client) {
                self.give_up(client);
                return;
            }
            self.stats.sessioned_retries += 1;
        }
        let target = self.random_node();
        self.clients[client as usize].target = target;
        self.client_send(client);
    }

    fn give_up(&mut self, client: u64) {
        self.clients[client as usize].current = None;
        self.stats.ops_unknown += 1;
        let delay = self.rng.range(0, CLIENT_THINK_MS_MAX);
        self.schedule(delay, Event::ClientNext(client));
    }

    pub(super) fn client_response(
        &mut self,
        c: u64,
        attempt: u64,
        resp: Response,
    ) -> Result<(), String> {
        if let Response::Written {
            session: Some((id, seq)),
            result,
        } = &resp
        {
            // Every answer to a sessioned write, from any attempt, is checked at the end.
            self.effects
                .answers
                .push((id.clone(), *seq, result.clone()));
        }
        let cl = &self.clients[c as usize];
        if cl.attempt != attempt || cl.current.is_none() {
            return Ok(());
        }
        match resp {
            Response::Written { result, .. } => self.written(c, result)?,
            Response::Read(rec) => self.done(c, Answer::Read(rec)),
            Response::KeptAlive { .. } | Response::LeaseGone => self.keepalive_answered(c, resp)?,
            Response::Unknown if self.current_is_sessioned(c) => {
                // Outcome unknown: retry the same (client, seq), anywhere, after a pause.
                self.stats.sessioned_retries += 1;
                self.retry_elsewhere(c, attempt, 1, 30);
            }
            Response::Unknown => self.give_up(c),
            Response::Redirect(Some(leader)) => {
                // Follow the hint after a short pause.
                self.clients[c as usize].target = leader;
                let delay = self.rng.range(1, 10);
                self.schedule(delay, Event::ClientRetry { client: c, attempt });
            }
            Response::Redirect(None) | Response::Retry => {
                // Certainly not applied: back off, then try a random node.
                self.retry_elsewhere(c, attempt, 20, 60);
            }
        }
        Ok(())
    }

    /// A keepalive's answer: renewed (its attempt's send time is when the lease was last
    /// known alive), or the lease is gone (the client forgets it).
    fn keepalive_answered(&mut self, c: u64, resp: Response) -> Result<(), String> {
        let Some((_, Request::Keepalive { lease })) = self.clients[c as usize].current.clone()
        else {
            return Err(format!(
                "client {c} got a keepalive's answer to another request"
            ));
        };
        let renewed = matches!(resp, Response::KeptAlive { .. });
        if let Response::KeptAlive { remaining_ms } = resp {
            let ttl_ms = self.effects.ledger.ttl_ms(lease);
            if ttl_ms.is_none_or(|ttl| remaining_ms > ttl) {
                return Err(format!(
                    "client {c}: lease {lease} (TTL {ttl_ms:?} ms in the log) renewed with \
                     {remaining_ms} ms left"
                ));
            }
        }
        let cl = &mut self.clients[c as usize];
        if renewed {
            self.stats.keepalive_acks += 1;
            let at = self.leases.kept_alive_ms.entry(lease).or_insert(0);
            *at = (*at).max(cl.sent_ms);
        } else {
            cl.forget_lease(lease);
        }
        self.done(c, Answer::Keepalive);
        Ok(())
    }

    fn retry_elsewhere(&mut self, c: u64, attempt: u64, lo_ms: u64, hi_ms: u64) {
        let delay = self.rng.range(lo_ms, hi_ms);
        let target = self.random_node();
        self.clients[c as usize].target = target;
        self.schedule(delay, Event::ClientRetry { client: c, attempt });
    }

    /// A definite answer to the client's write.
    fn written(&mut self, c: u64, result: CommandResult) -> Result<(), String> {
        let Some((_, Request::Write { kind, cmd, session })) =
            self.clients[c as usize].current.clone()
        else {
            return Err(format!("client {c} got a write's answer to a read"));
        };
        match &result.outcome {
            CommandOutcome::Refused(Refusal::SessionExpired { .. }) if session.is_some() => {
                // Evicted or expired meanwhile: whether an earlier attempt applied cannot be
                // told from the answer (the log says, at the end). Start a new session.
                self.stats.session_expired += 1;
                self.clients[c as usize].new_session();
                self.give_up(c);
                return Ok(());
            }
            CommandOutcome::Refused(
                r @ (Refusal::LeaseNotFound { .. } | Refusal::LeasesFull { .. }),
            ) if cmd_is_lease(&cmd) => {
                // The lease expired or was revoked meanwhile, or the lease bound is reached.
                self.stats.lease_refusals += 1;
                if let Refusal::LeaseNotFound { id } = r {
                    self.clients[c as usize].forget_lease(*id);
                }
            }
            CommandOutcome::Refused(r) => {
                return Err(format!(
                    "client {c}: {kind:?} {session:?} refused: {r:?} (a session has one \
                     request in flight, and the sim sends no oversized commands)"
                ));
            }
            CommandOutcome::Txn { succeeded, .. } => {
                let s = &mut self.stats;
                match (kind, succeeded) {
                    (WriteKind::Cas, true) => s.cas_ok += 1,
                    (WriteKind::Cas, false) => s.cas_failed += 1,
                    (_, true) => s.txns_ok += 1,
                    (_, false) => s.txns_failed += 1,
                }
            }
            CommandOutcome::DeletePrefix { .. } => self.stats.prefix_deletes += 1,
            CommandOutcome::LeaseGranted { id, ttl_ms } => {
                let keep_alive = self.rng.range(0, 3) != 0;
                self.clients[c as usize].leases.push(HeldLease {
                    id: *id,
                    ttl_ms: *ttl_ms,
                    keep_alive,
                    keepalive_at_ms: self.now + ttl_ms / 3,
                });
            }
            CommandOutcome::LeaseRevoked { .. } => {
                if let Command::LeaseRevoke { id } = &cmd {
                    self.clients[c as usize].forget_lease(*id);
                }
            }
            _ => {}
        }
        if result.duplicate {
            self.stats.duplicates += 1;
        }
        let cl = &mut self.clients[c as usize];
        cl.learn(&cmd, &result);
        // Now and then a client starts a new session (a process restart): old ones pile up
        // for expiry and eviction.
        if session.is_some() && self.rng.range(0, 40) == 0 {
            self.clients[c as usize].new_session();
        }
        self.done(c, Answer::Write(result));
        Ok(())
    }

    fn done(&mut self, c: u64, answer: Answer) {
        let cl = &mut self.clients[c as usize];
        if let Answer::Read(Some(rec)) = &answer {
            cl.known.insert(text(&rec.key), Some(rec.clone()));
        }
        let (idx, _) = cl.current.take().expect("checked");
        self.history[idx].ret = Some((self.clock, answer));
        self.stats.ops_ok += 1;
        let delay = self.rng.range(0, CLIENT_THINK_MS_MAX);
        self.schedule(delay, Event::ClientNext(c));
    }

    /// Proposes an `ExpireSessions` entry at the leader (as its session upkeep would), with
    /// the simulated time as its clock; nobody waits for the answer.
    pub(super) fn expire_sessions(&mut self) -> Result<(), String> {
        if self.healed {
            return Ok(());
        }
        let next = self.rng.range(1000, 4000);
        self.schedule(next, Event::ExpireSessions);
        let Some(leader) = self.current_leader() else {
            return Ok(());
        };
        let cmd = Command::ExpireSessions {
            now_ms: self.now,
            ttl_ms: SESSION_TTL_MS,
            sessions_max: self.params.sessions_max,
        };
        let payload = cmd.encode().map_err(|e| e.to_string())?;
        let (reply, _) = oneshot::channel();
        self.step(
            leader,
            Input::Request(NodeRequest::Propose { payload, reply }),
        )
    }
}

/// The committed log as a reference state machine applied it, and what clients were told.
pub struct Effects {
    /// Every committed entry, applied once in order.
    reference: StateMachine,
    /// (client id, seq) → the (index, result) of each entry where it took effect.
    fresh: HashMap<(String, u64), Vec<(u64, CommandResult)>>,
    /// Plain (sessionless) entries by payload hash → (index, result).
    plain: HashMap<u64, Vec<(u64, CommandResult)>>,
    /// Indexes at which sessions were evicted or expired.
    evicted_at: BTreeSet<u64>,
    /// (client id, seq, result) of every answer a client got to a sessioned write.
    pub answers: Vec<(String, u64, CommandResult)>,
    /// Duplicates answered from the session table, in the log.
    pub duplicates_in_log: u64,
    pub evictions: u64,
    /// Every change to a user key the committed log made, in revision order (what watchers
    /// must see).
    pub events: Vec<ChangeEvent>,
    /// The log's leases.
    pub ledger: LeaseLedger,
}

impl Effects {
    pub fn new() -> Effects {
        let opts = StateMachineOptions {
            flush_every_ms: None,
            cache_bytes: 1 << 20,
            ..StateMachineOptions::default()
        };
        Effects {
            reference: StateMachine::open_temporary(opts).expect("a temporary state machine"),
            fresh: HashMap::new(),
            plain: HashMap::new(),
            evicted_at: BTreeSet::new(),
            answers: Vec::new(),
            duplicates_in_log: 0,
            evictions: 0,
            events: Vec::new(),
            ledger: LeaseLedger::default(),
        }
    }

    pub fn reference(&self) -> &StateMachine {
        &self.reference
    }

    /// Applies the next committed entries (the first time any node applies them).
    pub fn apply(&mut self, entries: &[Entry]) -> Result<(), String> {
        let at = self.reference.applied_index();
        let (first, last) = (entries[0].index, entries[entries.len() - 1].index);
        if first != at + 1 {
            return Err(format!(
                "the reference state machine is at {at}; entry {first} is applied next"
            ));
        }
        let before = self.reference.sessions_summary().count;
        let batch = self.reference.apply_with_events(entries).map_err(|err| {
            format!("the reference state machine refuses {first}..={last}: {err}")
        })?;
        let mut expected = before;
        let mut rest = batch.events.as_slice();
        for (e, a) in entries.iter().zip(&batch.entries) {
            assert_eq!(e.index, a.index, "the reference applies every entry given");
            let here = rest.iter().take_while(|c| c.revision == e.index).count();
            let (changes, after) = rest.split_at(here);
            rest = after;
            match &a.outcome {
                EntryOutcome::Command(result) => {
                    expected = self.record(e, result, expected, changes)?;
                }
                _ if !changes.is_empty() => {
                    return Err(format!("entry {} is no command but changed keys", e.index));
                }
                _ => {}
            }
        }
        if !rest.is_empty() {
            return Err(format!(
                "changes of revisions {first}..={last} out of order: {rest:?}"
            ));
        }
        self.events.extend(batch.events);
        let after = self.reference.sessions_summary().count;
        if after < expected {
            // New sessions evicted old ones in this batch.
            self.evicted_at.extend(first..=last);
            self.evictions += expected - after;
        }
        Ok(())
    }

    /// Records what entry `e` did; returns the session count expected after it without
    /// evictions by new sessions.
    fn record(
        &mut self,
        e: &Entry,
        result: &CommandResult,
        expected: u64,
        changes: &[ChangeEvent],
    ) -> Result<u64, String> {
        let proposal = CommandRef::decode_proposal(&e.payload).map_err(|err| err.to_string())?;
        self.ledger.observe(e, &proposal, result, changes)?;
        match (proposal.session, &result.outcome) {
            (_, CommandOutcome::SessionsExpired { expired }) => {
                self.evictions += expired;
                if *expired > 0 {
                    self.evicted_at.insert(e.index);
                }
                return Ok(expected - expired);
            }
            (None, _) => {
                let hash = payload_hash(EntryKind::Normal, &e.payload);
                self.plain
                    .entry(hash)
                    .or_default()
                    .push((e.index, result.clone()));
            }
            (Some(_), CommandOutcome::Refused(_)) => {}
            (Some(s), _) if result.duplicate => {
                self.duplicates_in_log += 1;
                let id = (text(s.client), s.seq);
                let original = self.fresh.get(&id).and_then(|v| v.last());
                if original.is_none_or(|(i, r)| {
                    (*i, &r.outcome) != (result.revision, &result.outcome) || r.duplicate
                }) {
                    return Err(format!(
                        "exactly-once: the duplicate of {id:?} at {} answers {result:?}, but \
                         its effect was {original:?}",
                        e.index
                    ));
                }
            }
            (Some(s), _) => {
                let id = (text(s.client), s.seq);
                self.fresh
                    .entry(id)
                    .or_default()
                    .push((e.index, result.clone()));
                return Ok(expected + u64::from(s.seq == 1));
            }
        }
        Ok(expected)
    }

    /// Exactly-once over the whole run (see the module doc).
    pub fn check(&self) -> Result<(), String> {
        for ((client, seq), effects) in &self.fresh {
            for pair in effects.windows(2) {
                let (a, b) = (pair[0].0, pair[1].0);
                let evicted_between = self.evicted_at.range(a..b).next().is_some();
                if *seq != 1 || !evicted_between {
                    return Err(format!(
                        "exactly-once: ({client}, {seq}) took effect at {a} and again at {b}: \
                         {effects:?}"
                    ));
                }
            }
        }
        for (hash, effects) in &self.plain {
            let puts = effects
                .iter()
                .filter(|(_, r)| matches!(r.outcome, CommandOutcome::Put { .. }));
            if puts.count() > 1 {
                return Err(format!(
                    "a plain put (payload {hash:x}) took effect twice: {effects:?}"
                ));
            }
        }
        for (client, seq, result) in &self.answers {
            if matches!(result.outcome, CommandOutcome::Refused(_)) {
                continue;
            }
            let effects = self.fresh.get(&(client.clone(), *seq));
            let matches = effects.is_some_and(|v| {
                v.iter()
                    .any(|(i, r)| (*i, &r.outcome) == (result.revision, &result.outcome))
            });
            if !matches {
                return Err(format!(
                    "exactly-once: ({client}, {seq}) was answered {result:?}, but it took \
                     effect as {effects:?}"
                ));
            }
        }
        Ok(())
    }

    /// The effect a write the client got no definite answer to had, per the log: `None` if
    /// it never took effect. A plain delete cannot be told apart from another: `Err(())`.
    fn resolve(&self, req: &Request) -> Result<Option<&CommandResult>, ()> {
        match req {
            Request::Write {
                session: Some((client, seq)),
                ..
            } => Ok(self
                .fresh
                .get(&(client.clone(), *seq))
                .and_then(|v| v.first())
                .map(|(_, r)| r)),
            Request::Write {
                cmd: cmd @ Command::Put { .. },
                session: None,
                ..
            } => {
                let payload = cmd.encode().expect("encodes");
                let hash = payload_hash(EntryKind::Normal, &payload);
                Ok(self
                    .plain
                    .get(&hash)
                    .and_then(|v| v.first())
                    .map(|(_, r)| r))
            }
            _ => Err(()),
        }
    }

    /// The linearizability checker's history: each client op projected onto the keys it
    /// touched, with unanswered writes resolved from the log.
    pub fn history(&self, ops: &[ClientOp]) -> Result<Vec<linearizability::Op>, String> {
        let mut out = Vec::new();
        for op in ops.iter().filter(|op| !op.req.is_lease()) {
            let base = linearizability::Op {
                client: op.client,
                key: String::new(),
                what: describe(&op.req),
                actions: Vec::new(),
                rev: None,
                call: op.call,
                ret: op.ret.as_ref().map(|(t, _)| *t),
                must_happen: false,
                effect_deadline: None,
            };
            match (&op.req, &op.ret) {
                (Request::Read { key }, Some((_, Answer::Read(rec)))) => {
                    out.push(linearizability::Op {
                        key: key.clone(),
                        actions: vec![Action::Read(rec.as_ref().map(model_rec))],
                        ..base
                    });
                }
                (Request::Read { .. }, None) | (Request::Keepalive { .. }, _) => {}
                (Request::Write { cmd, .. }, Some((_, Answer::Write(result)))) => {
                    out.extend(project(cmd, result, &base)?);
                }
                (Request::Write { cmd, .. }, None) => match self.resolve(&op.req) {
                    Ok(Some(result)) => {
                        let base = linearizability::Op {
                            must_happen: true,
                            ..base
                        };
                        out.extend(project(cmd, result, &base)?);
                    }
                    Ok(None) => {}
                    Err(()) => {
                        let Command::Delete { key } = cmd else {
                            unreachable!("only plain puts and deletes are sessionless")
                        };
                        out.push(linearizability::Op {
                            key: text(key),
                            actions: vec![Action::Delete { existed: None }],
                            ..base
                        });
                    }
                },
                (req, Some((_, answer))) => {
                    return Err(format!("{req:?} was answered {answer:?}"));
                }
            }
        }
        // Registrations write keys of their own: nothing to check there.
        out.retain(|op| !op.key.starts_with("r/"));
        Ok(out)
    }
}

fn describe(req: &Request) -> String {
    match req {
        Request::Read { key } => format!("get {key}"),
        Request::Write { kind, cmd, session } => format!("{kind:?} {session:?} {cmd:?}"),
        Request::Keepalive { lease } => format!("keepalive {lease}"),
    }
}

fn model_rec(r: &KeyRecord) -> Rec {
    Rec {
        value: text(&r.value),
        create_revision: r.create_revision,
        mod_revision: r.mod_revision,
        version: r.version,
    }
}

fn model_cmp(op: CompareOp) -> Cmp {
    match op {
        CompareOp::Equal => Cmp::Eq,
        CompareOp::NotEqual => Cmp::Ne,
        CompareOp::Less => Cmp::Lt,
        CompareOp::Greater => Cmp::Gt,
    }
}

fn model_target(t: &Target) -> linearizability::Target {
    match t {
        Target::Value(v) => linearizability::Target::Value(text(v)),
        Target::Version(n) => linearizability::Target::Version(*n),
        Target::CreateRevision(n) => linearizability::Target::CreateRevision(*n),
        Target::ModRevision(n) => linearizability::Target::ModRevision(*n),
    }
}

/// A write's effect on each key it touched, at its revision.
fn project(
    cmd: &Command,
    result: &CommandResult,
    base: &linearizability::Op,
) -> Result<Vec<linearizability::Op>, String> {
    let mismatch = || format!("{cmd:?} has the outcome {result:?}");
    let on = |key: &[u8], actions: Vec<Action>| linearizability::Op {
        key: text(key),
        actions,
        rev: Some(result.revision),
        ..base.clone()
    };
    let ops = match (cmd, &result.outcome) {
        (
            Command::Put { key, value },
            CommandOutcome::Put {
                create_revision,
                version,
            },
        ) => vec![on(
            key,
            vec![Action::Put {
                value: text(value),
                result: Some((*create_revision, *version)),
            }],
        )],
        (Command::Delete { key }, CommandOutcome::Delete { existed }) => vec![on(
            key,
            vec![Action::Delete {
                existed: Some(*existed),
            }],
        )],
        (Command::DeletePrefix { prefix }, CommandOutcome::DeletePrefix { deleted }) => {
            let keys: Vec<String> = (0..KEYS)
                .map(key_name)
                .filter(|k| k.as_bytes().starts_with(prefix))
                .collect();
            // Which keys existed is known when none or all did.
            let existed = match *deleted {
                0 => Some(false),
                n if n == keys.len() as u64 => Some(true),
                _ => None,
            };
            keys.iter()
                .map(|k| on(k.as_bytes(), vec![Action::Delete { existed }]))
                .collect()
        }
        (Command::Txn(txn), CommandOutcome::Txn { succeeded, results }) => {
            project_txn(txn, *succeeded, results, &on).ok_or_else(mismatch)?
        }
        _ => return Err(mismatch()),
    };
    Ok(ops)
}

/// A transaction's projection: per key, its compares (when their verdict is known: all held,
/// or the only one failed), then the executed branch's operations on it.
fn project_txn(
    txn: &Txn,
    succeeded: bool,
    results: &[OpResult],
    on: &dyn Fn(&[u8], Vec<Action>) -> linearizability::Op,
) -> Option<Vec<linearizability::Op>> {
    let branch = if succeeded {
        &txn.success
    } else {
        &txn.failure
    };
    if branch.len() != results.len() {
        return None;
    }
    let mut per_key: Vec<(Vec<u8>, Vec<Action>)> = Vec::new();
    fn slot(per_key: &mut Vec<(Vec<u8>, Vec<Action>)>, key: &[u8]) -> usize {
        match per_key.iter().position(|(k, _)| k == key) {
            Some(i) => i,
            None => {
                per_key.push((key.to_vec(), Vec::new()));
                per_key.len() - 1
            }
        }
    }
    let verdict_known = succeeded || txn.compares.len() == 1;
    for c in &txn.compares {
        let i = slot(&mut per_key, &c.key);
        if verdict_known {
            per_key[i].1.push(Action::Check {
                target: model_target(&c.target),
                cmp: model_cmp(c.op),
                holds: succeeded,
            });
        }
    }
    for (op, res) in branch.iter().zip(results) {
        let action = match (op, res) {
            (
                TxnOp::Put { value, .. },
                OpResult::Put {
                    create_revision,
                    version,
                },
            ) => Action::Put {
                value: text(value),
                result: Some((*create_revision, *version)),
            },
            (TxnOp::Delete { .. }, OpResult::Delete { existed }) => Action::Delete {
                existed: Some(*existed),
            },
            (TxnOp::Get { .. }, OpResult::Get(rec)) => Action::Read(rec.as_ref().map(model_rec)),
            _ => return None,
        };
        let key = match op {
            TxnOp::Put { key, .. } | TxnOp::Delete { key } | TxnOp::Get { key } => key,
            TxnOp::DeletePrefix { .. } => return None,
        };
        let i = slot(&mut per_key, key);
        per_key[i].1.push(action);
    }
    Some(per_key.into_iter().map(|(k, a)| on(&k, a)).collect())
}
