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
    let messages = super::block_on(async {
        let mut reader = stream.as_slice();
        let mut messages = Vec::new();
        while let Ok(m) = read_frame::<_, PeerMessage>(&mut reader, FRAME_BYTES_MAX).await {
            messages.push(m);
        }
        messages
    });
    for message in &messages {
        check_message(message);
    }
}

fn check_message(message: &PeerMessage) {
    if let PeerMessage::SnapshotChunk(chunk) = message {
        let _ = chunk.is_last();
    }
    let mut buf = Vec::new();
    if let Err(e) = encode_frame(&mut buf, message, FRAME_BYTES_MAX) {
        panic!("a decoded {message:?} does not encode: {e}");
    }
    let again = super::block_on(read_frame::<_, PeerMessage>(
        &mut buf.as_slice(),
        FRAME_BYTES_MAX,
    ));
    match again {
        Ok(again) => assert_eq!(&again, message, "a peer message survives its encoder"),
        Err(e) => panic!("a re-encoded {message:?} does not decode: {e}"),
    }
}
