//! Peer protocol and log stream frame decoders (4-byte length + bincode).
//!
//! Input: `[kind, stream…]`; `kind` picks PeerRequest, PeerResponse or
//! StreamFrame. Frames are decoded until one is incomplete or bad; each
//! decoded value must encode again (`write_frame`) to bytes that decode and
//! re-encode to themselves, and decoding byte by byte must agree with
//! decoding in one piece.
#![no_main]

use bytes::BytesMut;
use corvid_registry::peer::{
    decode_frame, write_frame, PeerRequest, PeerResponse, MAX_FRAME_BYTES,
};
use corvid_registry::stream::StreamFrame;
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Decoded frames (as re-encoded bytes) and the final error, if any.
fn run<T: DeserializeOwned + Serialize>(
    pieces: &[&[u8]],
    max: usize,
) -> (Vec<Vec<u8>>, Option<String>) {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match decode_frame::<T>(&mut buf, max) {
                Ok(Some(value)) => {
                    let mut wire = Vec::new();
                    write_frame(&mut wire, &value).expect("a decoded frame encodes");
                    let mut again = BytesMut::from(&wire[..]);
                    let value2 = decode_frame::<T>(&mut again, MAX_FRAME_BYTES)
                        .expect("an encoded frame decodes")
                        .expect("an encoded frame is whole");
                    assert!(again.is_empty(), "bytes left after a re-encoded frame");
                    let mut wire2 = Vec::new();
                    write_frame(&mut wire2, &value2).expect("a decoded frame encodes");
                    assert_eq!(wire, wire2, "encoding is not stable");
                    frames.push(wire);
                }
                Ok(None) => break,
                Err(e) => return (frames, Some(e)),
            }
        }
    }
    (frames, None)
}

fn check<T: DeserializeOwned + Serialize>(stream: &[u8], max: usize) {
    let whole = run::<T>(&[stream], max);
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    let chunked = run::<T>(&bytes, max);
    assert_eq!(whole, chunked, "one-shot and byte-by-byte decoding differ");
}

fuzz_target!(|data: &[u8]| {
    let [kind, stream @ ..] = data else { return };
    // Low bits: the type; bit 7: a small frame limit as well.
    let max = if kind & 0x80 != 0 {
        64
    } else {
        MAX_FRAME_BYTES
    };
    match kind % 3 {
        0 => check::<PeerRequest>(stream, max),
        1 => check::<PeerResponse>(stream, max),
        _ => check::<StreamFrame>(stream, max),
    }
});
