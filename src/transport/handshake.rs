//! The peer handshake: who is calling, and proof that it holds the cluster secret.
//!
//! ```text
//! dialer                                         acceptor
//!   Hello { version, cluster_id, from, to, nonce_d } ─▶  checks version, cluster, ids
//!   ◀─ Challenge::Proceed { nonce_a, proof_a }          (or Challenge::Refused { reason })
//!   verifies proof_a (when it has a secret)
//!   Response { proof_d } ───────────────────────────▶   verifies proof_d (when it has one)
//!   ◀─ Verdict::Accepted                                 (or Verdict::Refused { reason })
//! ```
//!
//! Why this shape: every frame here is read with the small `handshake_bytes_max` limit, so a
//! stranger can make the acceptor buffer a few KiB at most, and nothing but these four tiny
//! types is decoded before the dialer proved itself. Proofs are HMACs over both nonces and
//! the identities ([`auth`](super::auth)); with a secret configured a side that cannot prove
//! it is refused, and a side without one is refused by a side with one (no downgrade). No
//! client URL travels here: URLs come from configuration, so a forged handshake cannot
//! redirect anyone's clients.

use super::auth::{self, Nonce, Proof, Role, Transcript};
use super::frame::{read_frame, write_frame, FrameError};
use super::{TransportConfig, PROTOCOL_VERSION};
use raftkv_types::NodeId;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Hello {
    pub version: u32,
    pub cluster_id: String,
    pub from: NodeId,
    pub to: NodeId,
    pub nonce: Nonce,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Challenge {
    /// `proof` is `None` when the acceptor has no secret.
    Proceed {
        nonce: Nonce,
        proof: Option<Proof>,
    },
    Refused {
        reason: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Response {
    /// `None` when the dialer has no secret.
    pub proof: Option<Proof>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Verdict {
    Accepted,
    Refused { reason: String },
}

/// Why a handshake failed, from this side's view; logged by the caller.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("handshake i/o: {0}")]
    Frame(#[from] FrameError),
    #[error("refused: {0}")]
    Refused(String),
    #[error("cannot draw a nonce: {0}")]
    Random(getrandom::Error),
}

/// The dialer's side: introduces this node to `peer` and checks the peer's proof.
pub(crate) async fn dial<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    config: &TransportConfig,
    peer: NodeId,
) -> Result<(), HandshakeError> {
    let limit = config.handshake_bytes_max;
    let nonce_d = auth::nonce().map_err(HandshakeError::Random)?;
    let hello = Hello {
        version: PROTOCOL_VERSION,
        cluster_id: config.cluster_id.clone(),
        from: config.node_id,
        to: peer,
        nonce: nonce_d,
    };
    write_frame(io, &hello, limit).await?;
    let (nonce_a, proof_a) = match read_frame::<_, Challenge>(io, limit).await? {
        Challenge::Proceed { nonce, proof } => (nonce, proof),
        Challenge::Refused { reason } => {
            return Err(HandshakeError::Refused(format!("by the peer: {reason}")))
        }
    };
    let transcript = Transcript {
        version: PROTOCOL_VERSION,
        cluster_id: &config.cluster_id,
        dialer: config.node_id,
        acceptor: peer,
        dialer_nonce: &nonce_d,
        acceptor_nonce: &nonce_a,
    };
    let proof_d = match &config.auth.secret {
        Some(secret) => {
            let proven = proof_a.is_some_and(|p| secret.verify(Role::Acceptor, &transcript, &p));
            if !proven {
                return Err(HandshakeError::Refused(
                    "the peer did not prove the cluster secret".into(),
                ));
            }
            Some(secret.prove(Role::Dialer, &transcript))
        }
        None => None,
    };
    write_frame(io, &Response { proof: proof_d }, limit).await?;
    match read_frame::<_, Verdict>(io, limit).await? {
        Verdict::Accepted => Ok(()),
        Verdict::Refused { reason } => {
            Err(HandshakeError::Refused(format!("by the peer: {reason}")))
        }
    }
}

/// The acceptor's side: returns the authenticated dialer's id. `is_member` says whether an
/// id is a current peer (the set changes at run time, so it is not `config.peers`). A refusal
/// is sent to the dialer (best effort) before the error is returned.
pub(crate) async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    config: &TransportConfig,
    is_member: impl Fn(NodeId) -> bool,
) -> Result<NodeId, HandshakeError> {
    let limit = config.handshake_bytes_max;
    let hello: Hello = read_frame(io, limit).await?;
    if let Err(reason) = check_hello(config, &hello, is_member(hello.from)) {
        let refusal = Challenge::Refused {
            reason: reason.clone(),
        };
        let _ = write_frame(io, &refusal, limit).await;
        return Err(HandshakeError::Refused(format!(
            "node {}: {reason}",
            hello.from
        )));
    }
    let nonce_a = auth::nonce().map_err(HandshakeError::Random)?;
    let transcript = Transcript {
        version: PROTOCOL_VERSION,
        cluster_id: &config.cluster_id,
        dialer: hello.from,
        acceptor: config.node_id,
        dialer_nonce: &hello.nonce,
        acceptor_nonce: &nonce_a,
    };
    let proof_a = config
        .auth
        .secret
        .as_ref()
        .map(|s| s.prove(Role::Acceptor, &transcript));
    let challenge = Challenge::Proceed {
        nonce: nonce_a,
        proof: proof_a,
    };
    write_frame(io, &challenge, limit).await?;
    let response: Response = read_frame(io, limit).await?;
    if let Some(secret) = &config.auth.secret {
        let refusal = match response.proof {
            None => Some("no proof of the cluster secret (is --peer-secret-file set?)"),
            Some(p) if !secret.verify(Role::Dialer, &transcript, &p) => {
                Some("wrong proof of the cluster secret")
            }
            Some(_) => None,
        };
        if let Some(reason) = refusal {
            let verdict = Verdict::Refused {
                reason: reason.into(),
            };
            let _ = write_frame(io, &verdict, limit).await;
            return Err(HandshakeError::Refused(format!(
                "node {}: {reason}",
                hello.from
            )));
        }
    }
    write_frame(io, &Verdict::Accepted, limit).await?;
    Ok(hello.from)
}

/// Checks a dialer's introduction (`is_member`: whether `hello.from` is a current peer);
/// `Err` is the reason it is refused.
fn check_hello(config: &TransportConfig, hello: &Hello, is_member: bool) -> Result<(), String> {
    if hello.version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {} is not {PROTOCOL_VERSION}",
            hello.version
        ));
    }
    if hello.cluster_id != config.cluster_id {
        return Err(format!(
            "cluster id {:?} is not {:?}",
            hello.cluster_id, config.cluster_id
        ));
    }
    if hello.to != config.node_id {
        return Err(format!(
            "addressed to node {}, this is node {}",
            hello.to, config.node_id
        ));
    }
    if !is_member || hello.from == config.node_id {
        return Err(format!("node {} is not a member", hello.from));
    }
    Ok(())
}
