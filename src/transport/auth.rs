//! Peer authentication by a shared cluster secret, proven by challenge and response.
//!
//! Why: the cluster id and the member ids are not secret, so knowing them must not be enough
//! to speak for a member. Each side of a handshake proves that it holds the secret with an
//! HMAC-SHA256 over a transcript of the handshake — both sides' fresh random nonces, the
//! protocol version, the cluster id and both node ids — under a label of its own role. Fresh
//! nonces stop a proof from being replayed on another connection, the distinct labels stop
//! an acceptor's proof from being reflected back as a dialer's, and the ids and cluster id
//! bind it to one pair of members of one cluster. Proofs are checked in constant time.
//!
//! What it does not do: frames after the handshake carry no MAC, so an attacker on the path
//! (who can relay and then hijack the TCP stream) is stopped only by TLS, not by the secret.

use hmac::{Hmac, Mac};
use raftkv_types::NodeId;
use sha2::Sha256;
use std::path::{Path, PathBuf};

/// Bytes of a handshake nonce.
pub const NONCE_BYTES: usize = 32;
/// Bytes of a proof (an HMAC-SHA256 tag).
pub const PROOF_BYTES: usize = 32;
/// The shortest secret accepted.
pub const SECRET_BYTES_MIN: usize = 16;
/// The largest secret file read.
pub const SECRET_FILE_BYTES_MAX: u64 = 4096;

const DIALER_LABEL: &[u8] = b"raftkv peer handshake: dialer proof\0";
const ACCEPTOR_LABEL: &[u8] = b"raftkv peer handshake: acceptor proof\0";

/// A handshake nonce.
pub type Nonce = [u8; NONCE_BYTES];
/// A proof of the secret.
pub type Proof = [u8; PROOF_BYTES];

/// Why the secret could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the peer secret file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the peer secret file {path} holds more than {max} bytes", max = SECRET_FILE_BYTES_MAX)]
    TooLarge { path: PathBuf },
    #[error(
        "the peer secret in {path} has {len} bytes; at least {min} are required \
         (e.g. `head -c 32 /dev/urandom | base64 > FILE`)",
        min = SECRET_BYTES_MIN
    )]
    TooShort { path: PathBuf, len: usize },
}

/// Which side of a handshake a proof is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Dialer,
    Acceptor,
}

/// The shared cluster secret. Its `Debug` output never shows the bytes.
#[derive(Clone)]
pub struct PeerSecret(Vec<u8>);

impl std::fmt::Debug for PeerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerSecret({} bytes, redacted)", self.0.len())
    }
}

impl PeerSecret {
    /// A secret from bytes; `None` if shorter than [`SECRET_BYTES_MIN`].
    pub fn from_bytes(bytes: Vec<u8>) -> Option<PeerSecret> {
        (bytes.len() >= SECRET_BYTES_MIN).then_some(PeerSecret(bytes))
    }

    /// Reads the secret from `path`, trimming trailing whitespace (a newline an editor
    /// added). Warns when the file is readable by group or others.
    pub fn load(path: &Path) -> Result<PeerSecret, SecretError> {
        let read_err = |source| SecretError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(read_err)?;
        warn_if_readable_by_others(path, &mode);
        let mut bytes =
            crate::small_file::read_capped(path, SECRET_FILE_BYTES_MAX).map_err(|e| match e {
                crate::small_file::SmallFileError::Io(source) => read_err(source),
                crate::small_file::SmallFileError::TooLarge(_) => SecretError::TooLarge {
                    path: path.to_path_buf(),
                },
            })?;
        let trimmed = bytes.trim_ascii_end().len();
        bytes.truncate(trimmed);
        let len = bytes.len();
        PeerSecret::from_bytes(bytes).ok_or_else(|| SecretError::TooShort {
            path: path.to_path_buf(),
            len,
        })
    }

    /// This side's proof for `transcript`.
    pub(crate) fn prove(&self, role: Role, transcript: &Transcript<'_>) -> Proof {
        self.mac(role, transcript).finalize().into_bytes().into()
    }

    /// Checks the other side's proof, in constant time.
    pub(crate) fn verify(&self, role: Role, transcript: &Transcript<'_>, proof: &[u8]) -> bool {
        self.mac(role, transcript).verify_slice(proof).is_ok()
    }

    fn mac(&self, role: Role, transcript: &Transcript<'_>) -> Hmac<Sha256> {
        // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.0) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        mac.update(match role {
            Role::Dialer => DIALER_LABEL,
            Role::Acceptor => ACCEPTOR_LABEL,
        });
        transcript.feed(&mut mac);
        mac
    }
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path, meta: &std::fs::Metadata) {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode();
    if mode & 0o044 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", mode & 0o777),
            "the peer secret file is readable by group or others; chmod 600 it"
        );
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path, _meta: &std::fs::Metadata) {}

/// What both proofs of one handshake cover.
#[derive(Debug)]
pub(crate) struct Transcript<'a> {
    pub version: u32,
    pub cluster_id: &'a str,
    pub dialer: NodeId,
    pub acceptor: NodeId,
    pub dialer_nonce: &'a Nonce,
    pub acceptor_nonce: &'a Nonce,
}

impl Transcript<'_> {
    /// Feeds the fields with fixed widths and a length prefix, so no two transcripts encode
    /// alike.
    fn feed(&self, mac: &mut Hmac<Sha256>) {
        mac.update(&self.version.to_le_bytes());
        mac.update(&(self.cluster_id.len() as u64).to_le_bytes());
        mac.update(self.cluster_id.as_bytes());
        mac.update(&self.dialer.to_le_bytes());
        mac.update(&self.acceptor.to_le_bytes());
        mac.update(self.dialer_nonce);
        mac.update(self.acceptor_nonce);
    }
}

/// A fresh random nonce from the operating system.
pub(crate) fn nonce() -> Result<Nonce, getrandom::Error> {
    let mut n = [0u8; NONCE_BYTES];
    getrandom::fill(&mut n)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript<'a>(d: &'a Nonce, a: &'a Nonce) -> Transcript<'a> {
        Transcript {
            version: 2,
            cluster_id: "c",
            dialer: 1,
            acceptor: 2,
            dialer_nonce: d,
            acceptor_nonce: a,
        }
    }

    #[test]
    fn proofs_bind_role_secret_and_every_transcript_field() {
        let s = PeerSecret::from_bytes(b"0123456789abcdef".to_vec()).unwrap();
        let (d, a) = ([1u8; NONCE_BYTES], [2u8; NONCE_BYTES]);
        let t = transcript(&d, &a);
        let p = s.prove(Role::Dialer, &t);
        assert!(s.verify(Role::Dialer, &t, &p));
        assert!(!s.verify(Role::Acceptor, &t, &p), "labels differ by role");
        assert!(!s.verify(Role::Dialer, &t, &p[..31]), "truncated proof");
        let other = PeerSecret::from_bytes(b"0123456789abcdeX".to_vec()).unwrap();
        assert!(!other.verify(Role::Dialer, &t, &p));
        let a2 = [3u8; NONCE_BYTES];
        let variants = [
            transcript(&a2, &a),
            transcript(&d, &a2),
            Transcript {
                version: 3,
                ..transcript(&d, &a)
            },
            Transcript {
                cluster_id: "d",
                ..transcript(&d, &a)
            },
            Transcript {
                dialer: 3,
                ..transcript(&d, &a)
            },
            Transcript {
                acceptor: 3,
                ..transcript(&d, &a)
            },
        ];
        for v in &variants {
            assert!(!s.verify(Role::Dialer, v, &p), "{v:?}");
        }
        assert_ne!(nonce().unwrap(), nonce().unwrap());
    }

    #[test]
    fn secret_files_are_trimmed_and_short_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "0123456789abcdef \n\n").unwrap();
        let s = PeerSecret::load(&path).unwrap();
        assert_eq!(s.0, b"0123456789abcdef");
        assert!(!format!("{s:?}").contains("0123"), "Debug redacts");
        std::fs::write(&path, "0123456789abcde\n").unwrap();
        let err = PeerSecret::load(&path).unwrap_err();
        assert!(
            matches!(err, SecretError::TooShort { len: 15, .. }),
            "{err}"
        );
        std::fs::write(&path, vec![b'x'; 5000]).unwrap();
        let err = PeerSecret::load(&path).unwrap_err();
        assert!(matches!(err, SecretError::TooLarge { .. }), "{err}");
        let err = PeerSecret::load(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
