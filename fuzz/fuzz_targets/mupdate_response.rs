//! MUPDATE response decoder (client side), fed in one piece and in
//! fuzzer-chosen pieces: both must give the same lines (and the same final
//! error), and the bytes it leaves buffered must stay within its Limits.
//!
//! Input: `[limits, k, size_1..size_k, stream…]` as for `mupdate_request`.
#![no_main]

mod split;

use bytes::BytesMut;
use corvid_registry::mupdate::codec::{DecodeError, Limits, ResponseDecoder, ServerLine};
use libfuzzer_sys::fuzz_target;

fn run(limits: Limits, pieces: &[&[u8]]) -> (Vec<ServerLine>, Option<DecodeError>) {
    let mut dec = ResponseDecoder::new(limits);
    let mut buf = BytesMut::new();
    let mut lines = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(line)) => lines.push(line),
                Ok(None) => break,
                // Errors are final: the client drops the connection.
                Err(e) => return (lines, Some(e)),
            }
        }
        // An incomplete line: its text within max_line, its literals
        // within max_literal.
        assert!(
            buf.len() <= limits.max_line + limits.max_literal,
            "{} bytes buffered over {limits:?}",
            buf.len()
        );
    }
    (lines, None)
}

fuzz_target!(|data: &[u8]| {
    let [sel, k, rest @ ..] = data else { return };
    let k = usize::from(*k % 16).min(rest.len());
    let (sizes, stream) = rest.split_at(k);
    let limits = split::limits(*sel);
    let whole = run(limits, &[stream]);
    let chunked = run(limits, &split::pieces(sizes, stream));
    assert_eq!(whole, chunked, "one-shot and chunked decoding differ");
});
