//! The `peer_frame` target: bytes from the peer port through the frame reader
//! (`transport::frame::read_frame`) and the `PeerMessage` decoder, as a connection's read loop
//! runs them after the handshake.
//!
//! Input: a mode byte (bit 0: make the first frame's length and CRC match the rest of the
//! input, so the codec is reached), then the stream's bytes; frames are read until one fails.

use crate::node::peer::PeerMessage;
use crate::transport::frame::{encode_frame, read_frame, FRAME_HEADER_BYTES};

/// The frame limit the target reads with (the transport's default is 16 MiB; inputs are far
/// smaller, so this changes nothing but the error path's figures).
const FRAME_BYTES_MAX: u32 = 16 << 20;

/// Fuzz body: every decoded message must survive its encoder, and its helpers must not panic.
pub fn peer_frame(data: &[u8]) {
    let Some((repair, bytes)) = super::split_mode(data) else {
        return;
    };
    let mut stream = bytes.to_vec();
    if repair && stream.len() >= FRAME_HEADER_BYTES {
        let payload_len = (stream.len() - FRAME_HEADER_BYTES) as u32;
        let crc = crc32fast::hash(&stream[FRAME_HEADER_BYTES..]);
        stream[0..4].copy_from_slice(&payload_len.to_le_bytes());
        stream[4..8].copy_from_slice(&crc.to_le_bytes());
    }
    check_stream::<PeerMessage>(&stream, FRAME_BYTES_MAX, |message| {
        if let PeerMessage::SnapshotChunk(chunk) = message {
            let _ = chunk.is_last();
        }
    });
}

/// Reads frames of `T` off `stream` until one fails; `inspect` runs on each decoded value (the
/// helpers a receiver calls on it), and every value must survive its encoder. Generic so the
/// handshake's messages can be fuzzed the same way, with the handshake's own frame limit.
fn check_stream<T>(stream: &[u8], frame_bytes_max: u32, inspect: impl Fn(&T))
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let values = super::block_on(async {
        let mut reader = stream;
        let mut values = Vec::new();
        while let Ok(v) = read_frame::<_, T>(&mut reader, frame_bytes_max).await {
            values.push(v);
        }
        values
    });
    for value in &values {
        inspect(value);
        check_round_trip(value, frame_bytes_max);
    }
}

fn check_round_trip<T>(value: &T, frame_bytes_max: u32)
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let mut buf = Vec::new();
    if let Err(e) = encode_frame(&mut buf, value, frame_bytes_max) {
        panic!("a decoded {value:?} does not encode: {e}");
    }
    let again = super::block_on(read_frame::<_, T>(&mut buf.as_slice(), frame_bytes_max));
    match again {
        Ok(again) => assert_eq!(&again, value, "a decoded value survives its encoder"),
        Err(e) => panic!("a re-encoded {value:?} does not decode: {e}"),
    }
}
