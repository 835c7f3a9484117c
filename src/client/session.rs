//! The client's pool of exactly-once sessions.
//!
//! A session is a client id the client drew at random (128 bits, hex) and the sequence number
//! of its next write. The server remembers, per id, the highest sequence it applied and its
//! answer, so a write resent with the same id and sequence is answered from that memory
//! instead of being applied twice: that is what makes resending a write whose outcome is
//! unknown safe.
//!
//! A session carries one request at a time (the server requires it), so concurrent writes
//! each take their own session from the pool, creating one when none is free, and put it
//! back once they have a definite answer. A session whose last write has no definite
//! answer is dropped, never reused: its next sequence could race the unanswered one.

use std::sync::Mutex;

/// One session: its id and the sequence number its next write carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Session {
    pub(crate) client_id: String,
    /// Starts at 1 (what the server requires of a new id); advances after each answer.
    pub(crate) seq: u64,
}

impl Session {
    /// A new session: a random 128-bit id, sequence 1.
    pub(crate) fn fresh() -> Result<Session, getrandom::Error> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)?;
        let client_id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        debug_assert_eq!(client_id.len(), 32);
        Ok(Session { client_id, seq: 1 })
    }
}

/// The most idle sessions a client keeps.
pub(crate) const IDLE_SESSIONS_MAX: usize = 1024;

/// The idle sessions of one client.
#[derive(Debug, Default)]
pub(crate) struct SessionPool {
    idle: Mutex<Vec<Session>>,
}

impl SessionPool {
    /// An idle session, or a new one when none is idle.
    pub(crate) fn take(&self) -> Result<Session, getrandom::Error> {
        match super::lock(&self.idle).pop() {
            Some(s) => Ok(s),
            None => Session::fresh(),
        }
    }

    /// Returns a session whose last write has a definite answer. Beyond
    /// [`IDLE_SESSIONS_MAX`] idle ones it is dropped (the cluster forgets it after its TTL):
    /// a burst of concurrency does not leave the pool holding its peak for good.
    pub(crate) fn give_back(&self, session: Session) {
        assert!(session.seq >= 1, "sequence numbers start at 1");
        let mut idle = super::lock(&self.idle);
        if idle.len() < IDLE_SESSIONS_MAX {
            idle.push(session);
        }
    }

    /// How many sessions are idle.
    #[cfg(test)]
    pub(crate) fn idle(&self) -> usize {
        super::lock(&self.idle).len()
    }
}
