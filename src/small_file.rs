//! Reading the small files an operator points a node at — the cluster secret, the bearer token,
//! certificates and keys — with a bound on how much is read.
//!
//! Why one helper: a flag can name any path, `/dev/zero` or a multi-gigabyte log included; a
//! plain `fs::read` would try to hold all of it before any size check. Every such file is read
//! through [`read_capped`], which never buffers more than the cap plus one byte.

use std::io::Read;
use std::path::Path;

/// Why a small file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SmallFileError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("larger than {0} bytes")]
    TooLarge(u64),
}

/// The whole of `path` if it holds at most `bytes_max` bytes.
pub fn read_capped(path: &Path, bytes_max: u64) -> Result<Vec<u8>, SmallFileError> {
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(bytes_max.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > bytes_max {
        return Err(SmallFileError::TooLarge(bytes_max));
    }
    debug_assert!(bytes.len() as u64 <= bytes_max);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_up_to_the_cap_and_refuses_beyond_without_reading_it_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"12345").unwrap();
        assert_eq!(read_capped(&path, 5).unwrap(), b"12345");
        assert!(matches!(
            read_capped(&path, 4),
            Err(SmallFileError::TooLarge(4))
        ));
        // An endless file is refused after cap + 1 bytes.
        let zero = Path::new("/dev/zero");
        assert!(matches!(
            read_capped(zero, 1024),
            Err(SmallFileError::TooLarge(1024))
        ));
        assert!(matches!(
            read_capped(&dir.path().join("missing"), 10),
            Err(SmallFileError::Io(_))
        ));
    }
}
