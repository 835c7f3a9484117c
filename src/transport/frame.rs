//! Length-prefixed, checksummed frames on a peer TCP stream.
//!
//! ```text
//! offset  size  field
//!      0     4  payload length n, u32 little-endian (<= frame_bytes_max)
//!      4     4  CRC-32 of the payload, u32 little-endian
//!      8     n  payload: one value encoded with `raftkv_types::codec`
//! ```
//!
//! TCP already checksums, but weakly; the CRC costs little and turns a bug or a bit flip in a
//! middlebox into a dropped connection instead of a wrong Raft message. The length is checked
//! before the payload buffer is allocated, so a peer cannot make us allocate more than
//! `frame_bytes_max`.

use raftkv_types::codec;
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes of a frame header.
pub const FRAME_HEADER_BYTES: usize = 8;

/// A frame that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {len_bytes} bytes exceeds the limit of {bytes_max} bytes")]
    TooLarge { len_bytes: u64, bytes_max: u64 },
    #[error("frame checksum mismatch")]
    BadCrc,
    #[error("undecodable frame: {0}")]
    Decode(#[from] codec::CodecError),
}

/// Encodes `value` as one frame appended to `out`. The value is serialized straight into
/// `out` after a header placeholder (no intermediate buffer); on an error `out` is left as it
/// was.
pub fn encode_frame<T: Serialize>(
    out: &mut Vec<u8>,
    value: &T,
    frame_bytes_max: u32,
) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    if let Err(e) = codec::encode_into(out, value) {
        out.truncate(start);
        return Err(e.into());
    }
    let payload_start = start + FRAME_HEADER_BYTES;
    let len_bytes = (out.len() - payload_start) as u64;
    if len_bytes > u64::from(frame_bytes_max) {
        out.truncate(start);
        return Err(FrameError::TooLarge {
            len_bytes,
            bytes_max: u64::from(frame_bytes_max),
        });
    }
    let crc = crc32fast::hash(&out[payload_start..]);
    // Fits: `len_bytes <= frame_bytes_max`, a u32.
    out[start..start + 4].copy_from_slice(&(len_bytes as u32).to_le_bytes());
    out[start + 4..payload_start].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Writes one frame and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    value: &T,
    frame_bytes_max: u32,
) -> Result<(), FrameError> {
    let mut buf = Vec::new();
    encode_frame(&mut buf, value, frame_bytes_max)?;
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame; `Closed` on a clean end of stream before a header.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    frame_bytes_max: u32,
) -> Result<T, FrameError> {
    Ok(read_frame_sized(r, frame_bytes_max).await?.0)
}

/// Reads one frame like [`read_frame`]; also returns its size on the wire (header included).
pub async fn read_frame_sized<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    frame_bytes_max: u32,
) -> Result<(T, usize), FrameError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > frame_bytes_max {
        return Err(FrameError::TooLarge {
            len_bytes: u64::from(len),
            bytes_max: u64::from(frame_bytes_max),
        });
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await?;
    if crc32fast::hash(&payload) != crc {
        return Err(FrameError::BadCrc);
    }
    let value = codec::decode(&payload)?;
    Ok((value, FRAME_HEADER_BYTES + payload.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_rejections() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, &("hello".to_string(), 7u64), 1024).unwrap();
        let got: (String, u64) = read_frame(&mut buf.as_slice(), 1024).await.unwrap();
        assert_eq!(got, ("hello".to_string(), 7));

        // Too large for the reader: rejected before allocating.
        let err = read_frame::<_, (String, u64)>(&mut buf.as_slice(), 4)
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");

        let mut flipped = buf.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let err = read_frame::<_, (String, u64)>(&mut flipped.as_slice(), 1024)
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::BadCrc), "{err}");

        let err = read_frame::<_, (String, u64)>(&mut &buf[..5], 1024)
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::Closed), "{err}");
        let err = read_frame::<_, (String, u64)>(&mut &buf[..12], 1024)
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::Io(_)), "{err}");

        // A valid frame around a payload of the wrong shape is a decode error, not a panic.
        let mut wrong = Vec::new();
        encode_frame(&mut wrong, &1u8, 1024).unwrap();
        let err = read_frame::<_, (String, u64)>(&mut wrong.as_slice(), 1024)
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::Decode(_)), "{err}");
    }

    #[test]
    fn frames_append_in_the_documented_layout_and_a_refused_one_leaves_no_trace() {
        let value = ("abc".to_string(), 5u64);
        let payload = codec::encode(&value).unwrap();
        let mut out = b"earlier frames".to_vec();
        encode_frame(&mut out, &value, 1024).unwrap();
        let (before, frame) = out.split_at(14);
        assert_eq!(before, b"earlier frames");
        assert_eq!(&frame[0..4], &(payload.len() as u32).to_le_bytes());
        assert_eq!(&frame[4..8], &crc32fast::hash(&payload).to_le_bytes());
        assert_eq!(&frame[8..], payload.as_slice());

        let err = encode_frame(&mut out, &value, 4).unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { bytes_max: 4, .. }),
            "{err}"
        );
        assert_eq!(out.len(), 14 + FRAME_HEADER_BYTES + payload.len());
    }
}
