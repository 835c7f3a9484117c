//! The `peer_handshake` target: bytes from an unauthenticated dialer into the acceptor's side
//! of the real peer handshake (`transport::handshake::accept`), the only code a stranger on the
//! peer port reaches.
//!
//! Input: a mode byte (bit 0: the acceptor holds a cluster secret), then the dialer's bytes.
//! What must hold: no panic, an answer within [`HANDSHAKE_MS_MAX`], and — with a secret — never
//! an authenticated dialer: random bytes cannot carry an HMAC of a fresh nonce.

use crate::transport::handshake::accept;
use crate::transport::{PeerSecret, TransportConfig};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// How long one handshake may take (the transport's own timeout is 2 s).
pub const HANDSHAKE_MS_MAX: u64 = 2_000;
/// The cluster and members the acceptor is configured with (seeds use the same).
pub const CLUSTER_ID: &str = "fuzz";
pub const ACCEPTOR_ID: u64 = 1;
pub const DIALER_ID: u64 = 2;

/// Fuzz body.
pub fn peer_handshake(data: &[u8]) {
    let Some((with_secret, bytes)) = super::split_mode(data) else {
        return;
    };
    let mut config = TransportConfig::new(
        CLUSTER_ID,
        ACCEPTOR_ID,
        BTreeMap::from([(DIALER_ID, "127.0.0.1:9".to_string())]),
    );
    if with_secret {
        config.auth.secret = PeerSecret::from_bytes(b"fuzz-cluster-secret-0123456789".to_vec());
        assert!(config.auth.secret.is_some());
    }
    let result = super::block_on(async {
        let (mut dialer, mut acceptor) = tokio::io::duplex(64 << 10);
        let write = async {
            let _ = dialer.write_all(bytes).await;
            let _ = dialer.shutdown().await;
            dialer
        };
        let answer = tokio::time::timeout(
            Duration::from_millis(HANDSHAKE_MS_MAX),
            accept(&mut acceptor, &config, |id| config.peers.contains_key(&id)),
        );
        let (_dialer, answer) = tokio::join!(write, answer);
        answer
    });
    let Ok(result) = result else {
        panic!("the handshake did not finish within {HANDSHAKE_MS_MAX} ms");
    };
    if with_secret {
        assert!(
            result.is_err(),
            "forged bytes authenticated as node {result:?}"
        );
    }
    if let Ok(id) = result {
        assert_eq!(id, DIALER_ID, "only a configured member is accepted");
    }
}
