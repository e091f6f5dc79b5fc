//! MUPDATE request decoder (server side), fed in one piece and in
//! fuzzer-chosen pieces: both must give the same frames, and what the decoder
//! holds must stay within its Limits.
//!
//! Input: `[limits, k, size_1..size_k, stream…]`. `limits` picks small or
//! default Limits; the k sizes (cycled; 0 means 1) cut the stream into
//! pieces. After an AUTHENTICATE the harness reads SASL lines with
//! `decode_line` as the server does.
#![no_main]

mod split;

use bytes::BytesMut;
use corvid_registry::mupdate::codec::{write_request, Command, Frame, Limits, RequestDecoder};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq)]
enum Out {
    Frame(Frame),
    Line(Result<Vec<u8>, ()>),
}

/// Runs the server's read loop over `pieces`; returns what it produced.
fn run(limits: Limits, pieces: &[&[u8]]) -> Vec<Out> {
    let mut dec = RequestDecoder::new(limits);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    // SASL lines still to read in raw line mode.
    let mut lines = 0usize;
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            if lines > 0 {
                match dec.decode_line(&mut buf) {
                    Some(line) => {
                        let cancel = matches!(&line, Ok(l) if l == b"*");
                        lines = if cancel || line.is_err() {
                            0
                        } else {
                            lines - 1
                        };
                        out.push(Out::Line(line.map_err(|_| ())));
                    }
                    None => {
                        assert!(buf.is_empty(), "decode_line left bytes unconsumed");
                        break;
                    }
                }
            } else {
                match dec.decode(&mut buf) {
                    Some(frame) => {
                        let fatal = matches!(frame, Frame::Fatal { .. });
                        if let Frame::Request(req) = &frame {
                            check_round_trip(limits, &req.tag, &req.command);
                            if let Command::Authenticate {
                                initial_response, ..
                            } = &req.command
                            {
                                // SCRAM: client-first (unless initial), client-final, empty.
                                lines = if initial_response.is_some() { 2 } else { 3 };
                            }
                        }
                        out.push(Out::Frame(frame));
                        if fatal {
                            // The server closes the connection here.
                            return out;
                        }
                    }
                    None => {
                        assert!(buf.is_empty(), "decode left bytes unconsumed");
                        break;
                    }
                }
            }
            // Held state: one command line plus its literals (or one raw line).
            let held = dec.buffered_len();
            assert!(
                held <= limits.max_line + limits.max_literal + 1,
                "decoder holds {held} bytes over {limits:?}"
            );
        }
        let held = dec.buffered_len();
        assert!(
            held <= limits.max_line + limits.max_literal + 1,
            "decoder holds {held} bytes over {limits:?}"
        );
    }
    out
}

/// A decoded request, encoded again, decodes to itself.
fn check_round_trip(limits: Limits, tag: &str, command: &Command) {
    // The mechanism is written quoted, where CR and LF cannot go (the
    // encoder turns them into spaces on purpose).
    if let Command::Authenticate { mechanism, .. } = command {
        if mechanism.contains(['\r', '\n']) {
            return;
        }
    }
    let mut wire = Vec::new();
    write_request(&mut wire, tag, command);
    // Room for whatever the first decoder accepted, however it was quoted.
    let roomy = Limits {
        max_line: wire.len() + 16,
        max_literal: wire.len() + 16,
        max_args: limits.max_args.max(64),
    };
    let mut dec = RequestDecoder::new(roomy);
    let mut buf = BytesMut::from(&wire[..]);
    let mut frame = dec.decode(&mut buf);
    // Literals wait for "+ go ahead": skip those markers.
    while frame == Some(Frame::GoAhead) {
        frame = dec.decode(&mut buf);
    }
    match frame {
        Some(Frame::Request(again)) => {
            assert_eq!(again.tag, tag, "tag changed in a round trip: {wire:?}");
            assert_eq!(
                &again.command, command,
                "command changed in a round trip: {wire:?}"
            );
        }
        other => panic!("re-encoded {command:?} as {wire:?}, decoded {other:?}"),
    }
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
