//! IMAP framing: splits a byte stream into lines and literals, no IO.
//!
//! The same [`Framer`] reads client commands and backend responses: both are
//! lines ending in CRLF, and a line that ends in a literal header (`{n}`,
//! `{n+}`, `~{n}`) is followed by exactly `n` bytes of literal data and then
//! the rest of the line. The framer does not parse anything else, so that the
//! proxy can forward what it does not understand byte for byte.
//!
//! Memory is bounded: a line is never held beyond [`Limits::max_line`] bytes
//! and a literal is handed out in chunks of at most [`LITERAL_CHUNK`] bytes,
//! never buffered whole.

use bytes::{Bytes, BytesMut};
use thiserror::Error;

/// Largest [`Frame::Literal`] chunk: big enough for few wakeups, small enough
/// that a huge APPEND never sits in memory.
pub const LITERAL_CHUNK: usize = 64 * 1024;

/// Bounds on what the framer accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest line in bytes, line end (and a literal header) included.
    pub max_line: usize,
    /// Largest literal announced in a header.
    pub max_literal: u64,
}

/// A literal header at the end of a line: `{n}`, `{n+}` or `~{n}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiteralHeader {
    /// Announced length in bytes.
    pub len: u64,
    /// `{n+}` (RFC 7888): the sender does not wait for `+` before the data.
    pub non_sync: bool,
    /// `~{n}` (RFC 3516): the data may hold NUL and bare CR/LF.
    pub binary: bool,
}

impl LiteralHeader {
    /// Appends the header and its CRLF (`~{n+}\r\n`) as written; the proxy
    /// uses it to re-announce a synchronising literal as non-synchronising.
    pub fn encode(&self, out: &mut Vec<u8>) {
        if self.binary {
            out.push(b'~');
        }
        out.push(b'{');
        out.extend_from_slice(self.len.to_string().as_bytes());
        if self.non_sync {
            out.push(b'+');
        }
        out.extend_from_slice(b"}\r\n");
    }
}

/// One piece of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A piece of a line: from the start of a line (or just after a literal)
    /// up to and including CRLF, or up to and including a literal header
    /// `{n}`/`{n+}`/`~{n}` and its CRLF (then `literal` is Some). The bytes
    /// are exactly as received.
    Text {
        /// The raw bytes, line end included.
        bytes: Bytes,
        /// The literal announced at the end, if any.
        literal: Option<LiteralHeader>,
    },
    /// Bytes of the literal announced by the previous Text (chunked: at most
    /// [`LITERAL_CHUNK`] each, never the whole literal buffered).
    Literal(Bytes),
}

/// Why the framer refused input.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// More than [`Limits::max_line`] bytes without a line end. Nothing was
    /// consumed; call [`Framer::discard_line`] to skip the rest of the line.
    #[error("line too long")]
    LineTooLong,
    /// A literal header over [`Limits::max_literal`]. The header line was
    /// consumed and the framer is at the start of a new line.
    #[error("literal too large")]
    LiteralTooLarge {
        /// The offending header (a non-synchronising one means its data follows).
        header: LiteralHeader,
    },
    /// A literal header whose length does not fit in a u64. The line was
    /// consumed and the framer is at the start of a new line.
    #[error("bad literal header")]
    BadLiteralHeader,
}

/// Splits a byte stream into [`Frame`]s.
#[derive(Debug, Clone)]
pub struct Framer {
    limits: Limits,
    /// Literal bytes still to hand out as [`Frame::Literal`].
    literal_remaining: u64,
    /// While discarding (after [`FrameError::LineTooLong`]): the last bytes of
    /// the discarded line, enough to recognise a literal header at its end.
    discard_tail: Vec<u8>,
    /// While discarding: non-synchronising literal bytes still to skip.
    discard_skip: u64,
}

/// Longest possible literal header with its line end: `~{` + 20 digits +
/// `+}\r\n`. Only used to bound the tail kept while discarding.
const MAX_HEADER: usize = 2 + 20 + 4;

impl Framer {
    /// A framer at the start of a line.
    pub fn new(limits: Limits) -> Framer {
        Framer {
            limits,
            literal_remaining: 0,
            discard_tail: Vec::new(),
            discard_skip: 0,
        }
    }

    /// The limits this framer enforces.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// True while inside a literal (more Literal frames due).
    pub fn in_literal(&self) -> bool {
        self.literal_remaining > 0
    }

    /// Bytes of the current literal still to come.
    pub fn literal_remaining(&self) -> u64 {
        self.literal_remaining
    }

    /// Back to the start of a line, forgetting any literal in progress; for
    /// when the caller throws its buffered input away (STARTTLS).
    pub fn reset(&mut self) {
        self.literal_remaining = 0;
        self.discard_tail.clear();
        self.discard_skip = 0;
    }

    /// Takes the next frame out of `buf` (consuming those bytes), or
    /// `Ok(None)` if more input is needed.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if self.literal_remaining > 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            let n = self.literal_remaining.min(buf.len() as u64) as usize;
            let n = n.min(LITERAL_CHUNK);
            self.literal_remaining -= n as u64;
            return Ok(Some(Frame::Literal(buf.split_to(n).freeze())));
        }
        if buf.is_empty() {
            return Ok(None);
        }
        // Only the first max_line bytes can hold this line's end; scanning
        // no further keeps the work per call bounded too.
        let window = &buf[..buf.len().min(self.limits.max_line)];
        let Some(lf) = window.iter().position(|&b| b == b'\n') else {
            if buf.len() >= self.limits.max_line {
                return Err(FrameError::LineTooLong);
            }
            return Ok(None);
        };
        let header = literal_header(&buf[..=lf]);
        match header {
            HeaderScan::None => Ok(Some(Frame::Text {
                bytes: buf.split_to(lf + 1).freeze(),
                literal: None,
            })),
            HeaderScan::Overflow => {
                let _ = buf.split_to(lf + 1);
                Err(FrameError::BadLiteralHeader)
            }
            HeaderScan::Header { header, .. } => {
                if header.len > self.limits.max_literal {
                    let _ = buf.split_to(lf + 1);
                    return Err(FrameError::LiteralTooLarge { header });
                }
                self.literal_remaining = header.len;
                Ok(Some(Frame::Text {
                    bytes: buf.split_to(lf + 1).freeze(),
                    literal: Some(header),
                }))
            }
        }
    }

    /// After [`FrameError::LineTooLong`]: drops input through the end of the
    /// command, like Cyrus's `eatline`. Returns true once the end was found
    /// (the framer is then at the start of a line); the caller keeps calling
    /// with new input until then. Non-synchronising literals announced at a
    /// discarded line's end are skipped by count, so their data is never
    /// taken for a command; a synchronising one ends the command, as the
    /// sender waits for a `+` that never comes.
    pub fn discard_line(&mut self, buf: &mut BytesMut) -> bool {
        self.literal_remaining = 0;
        loop {
            if self.discard_skip > 0 {
                let n = self.discard_skip.min(buf.len() as u64) as usize;
                let _ = buf.split_to(n);
                self.discard_skip -= n as u64;
                if self.discard_skip > 0 {
                    return false;
                }
                continue;
            }
            match buf.iter().position(|&b| b == b'\n') {
                None => {
                    self.remember_tail(&buf[..]);
                    buf.clear();
                    return false;
                }
                Some(lf) => {
                    self.remember_tail(&buf[..=lf]);
                    let _ = buf.split_to(lf + 1);
                    let scan = literal_header(&self.discard_tail);
                    self.discard_tail.clear();
                    match scan {
                        HeaderScan::Header { header, .. } if header.non_sync && header.len > 0 => {
                            self.discard_skip = header.len;
                        }
                        HeaderScan::Header { header, .. } if header.non_sync => {}
                        _ => return true,
                    }
                }
            }
        }
    }

    /// Keeps the last [`MAX_HEADER`] bytes seen of the line being discarded.
    fn remember_tail(&mut self, bytes: &[u8]) {
        let take = bytes.len().min(MAX_HEADER);
        self.discard_tail
            .extend_from_slice(&bytes[bytes.len() - take..]);
        let excess = self.discard_tail.len().saturating_sub(MAX_HEADER);
        self.discard_tail.drain(..excess);
    }
}

/// What [`literal_header`] found at the end of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeaderScan {
    /// No literal header: an ordinary line.
    None,
    /// A header whose digits overflow a u64.
    Overflow,
    /// A header starting at byte `start` (its `~` or `{`).
    Header { header: LiteralHeader, start: usize },
}

/// Looks for `~{n}`, `{n+}` etc. just before the line end of `line` (which
/// ends in LF). Like Cyrus, the `{` need not follow a space: whatever the
/// backend will take for a literal must be one here too, or the two would
/// disagree on where the next command starts.
fn literal_header(line: &[u8]) -> HeaderScan {
    let mut end = line.len();
    if end > 0 && line[end - 1] == b'\n' {
        end -= 1;
    }
    if end > 0 && line[end - 1] == b'\r' {
        end -= 1;
    }
    if end == 0 || line[end - 1] != b'}' {
        return HeaderScan::None;
    }
    let mut i = end - 1;
    let non_sync = i > 0 && line[i - 1] == b'+';
    if non_sync {
        i -= 1;
    }
    let digits_end = i;
    while i > 0 && line[i - 1].is_ascii_digit() {
        i -= 1;
    }
    let digits_start = i;
    if digits_start == digits_end || i == 0 || line[i - 1] != b'{' {
        return HeaderScan::None;
    }
    let mut start = i - 1;
    let binary = start > 0 && line[start - 1] == b'~';
    if binary {
        start -= 1;
    }
    let mut len: u64 = 0;
    for &d in &line[digits_start..digits_end] {
        match len
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(d - b'0')))
        {
            Some(v) => len = v,
            None => return HeaderScan::Overflow,
        }
    }
    HeaderScan::Header {
        header: LiteralHeader {
            len,
            non_sync,
            binary,
        },
        start,
    }
}

/// Splits a Text frame's bytes that end in a literal header into the part
/// before the header (`~` or `{`) and the header; None if there is none.
/// Lets the proxy rewrite `{n}` as `{n+}` when forwarding.
pub fn split_literal_header(text: &[u8]) -> Option<(&[u8], LiteralHeader)> {
    match literal_header(text) {
        HeaderScan::Header { header, start } => Some((&text[..start], header)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn limits() -> Limits {
        Limits {
            max_line: 64,
            max_literal: 1000,
        }
    }

    /// Feeds `input` in the given chunk sizes (cycled), collecting frames and
    /// errors; after LineTooLong it discards like a session would.
    fn run(input: &[u8], limits: Limits, chunks: &[usize]) -> Vec<Result<Frame, FrameError>> {
        let mut framer = Framer::new(limits);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut discarding = false;
        let mut pos = 0;
        let mut k = 0;
        while pos < input.len() {
            let n = chunks[k % chunks.len()].max(1).min(input.len() - pos);
            k += 1;
            buf.extend_from_slice(&input[pos..pos + n]);
            pos += n;
            loop {
                if discarding {
                    if !framer.discard_line(&mut buf) {
                        break;
                    }
                    discarding = false;
                }
                match framer.next(&mut buf) {
                    Ok(Some(f)) => {
                        if let Frame::Literal(b) = &f {
                            assert!(b.len() <= LITERAL_CHUNK && !b.is_empty());
                        }
                        out.push(Ok(f));
                    }
                    Ok(None) => break,
                    Err(e) => {
                        if e == FrameError::LineTooLong {
                            discarding = true;
                        }
                        out.push(Err(e));
                    }
                }
            }
            assert!(buf.len() < limits.max_line || framer.in_literal() || discarding);
        }
        out
    }

    fn text(s: &str, literal: Option<LiteralHeader>) -> Result<Frame, FrameError> {
        Ok(Frame::Text {
            bytes: Bytes::copy_from_slice(s.as_bytes()),
            literal,
        })
    }

    fn lit(s: &str) -> Result<Frame, FrameError> {
        Ok(Frame::Literal(Bytes::copy_from_slice(s.as_bytes())))
    }

    fn hdr(len: u64, non_sync: bool, binary: bool) -> Option<LiteralHeader> {
        Some(LiteralHeader {
            len,
            non_sync,
            binary,
        })
    }

    #[test]
    fn lines_and_literals() {
        let input = b"a LOGIN {5}\r\nalice {3+}\r\npwd\r\nb NOOP\r\n";
        for chunk in [1, 2, 3, 7, 100] {
            assert_eq!(
                run(input, limits(), &[chunk])
                    .into_iter()
                    .filter(|f| !matches!(f, Ok(Frame::Literal(_))))
                    .collect::<Vec<_>>(),
                vec![
                    text("a LOGIN {5}\r\n", hdr(5, false, false)),
                    text(" {3+}\r\n", hdr(3, true, false)),
                    text("\r\n", None),
                    text("b NOOP\r\n", None),
                ],
                "chunk {chunk}"
            );
        }
        assert_eq!(
            run(input, limits(), &[100]),
            vec![
                text("a LOGIN {5}\r\n", hdr(5, false, false)),
                lit("alice"),
                text(" {3+}\r\n", hdr(3, true, false)),
                lit("pwd"),
                text("\r\n", None),
                text("b NOOP\r\n", None),
            ]
        );
    }

    #[test]
    fn binary_zero_and_bare_lf() {
        let input = b"a APPEND x ~{0}\r\n\nb X {}\r\n* OK {a}\n";
        assert_eq!(
            run(input, limits(), &[100]),
            vec![
                text("a APPEND x ~{0}\r\n", hdr(0, false, true)),
                text("\n", None),
                text("b X {}\r\n", None),
                text("* OK {a}\n", None),
            ]
        );
        // A header glued to a word still counts, as it does for Cyrus.
        assert_eq!(
            run(b"a X y{2}\r\nzz\r\n", limits(), &[100])[0],
            text("a X y{2}\r\n", hdr(2, false, false))
        );
    }

    #[test]
    fn literal_is_chunked() {
        let limits = Limits {
            max_line: 64,
            max_literal: 1 << 20,
        };
        let mut input = b"a APPEND x {200000}\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 200_000));
        input.extend_from_slice(b")\r\n");
        let frames = run(&input, limits, &[300_000]);
        let sizes: Vec<usize> = frames
            .iter()
            .filter_map(|f| match f {
                Ok(Frame::Literal(b)) => Some(b.len()),
                _ => None,
            })
            .collect();
        assert_eq!(sizes, vec![65536, 65536, 65536, 3392]);
        assert_eq!(frames.last().unwrap(), &text(")\r\n", None));
    }

    #[test]
    fn long_line_is_refused_early_and_skipped() {
        let mut framer = Framer::new(limits());
        let mut buf = BytesMut::from(&[b'a'; 64][..]);
        assert_eq!(framer.next(&mut buf), Err(FrameError::LineTooLong));
        assert!(!framer.discard_line(&mut buf));
        assert!(buf.is_empty());
        buf.extend_from_slice(b"aaa\r\nb NOOP\r\n");
        assert!(framer.discard_line(&mut buf));
        assert_eq!(
            framer.next(&mut buf),
            Ok(Some(Frame::Text {
                bytes: Bytes::from_static(b"b NOOP\r\n"),
                literal: None
            }))
        );
        // A line of exactly max_line bytes with its CRLF is fine.
        let mut line = vec![b'x'; 62];
        line.extend_from_slice(b"\r\n");
        assert!(matches!(
            framer.next(&mut BytesMut::from(&line[..])),
            Ok(Some(Frame::Text { .. }))
        ));
    }

    #[test]
    fn discarding_skips_non_sync_literals() {
        let mut input = vec![b'a'; 80];
        input.extend_from_slice(b" {16+}\r\nc DELETE INBOX\r\n more {3}\r\nd NOOP\r\n");
        let frames = run(&input, limits(), &[1]);
        assert_eq!(
            frames,
            vec![Err(FrameError::LineTooLong), text("d NOOP\r\n", None)]
        );
        let frames = run(&input, limits(), &[200]);
        assert_eq!(
            frames,
            vec![Err(FrameError::LineTooLong), text("d NOOP\r\n", None)]
        );
    }

    #[test]
    fn literal_limits() {
        let input = b"a APPEND x {1001}\r\nb NOOP\r\nc X {99999999999999999999999}\r\n";
        assert_eq!(
            run(input, limits(), &[5]),
            vec![
                Err(FrameError::LiteralTooLarge {
                    header: hdr(1001, false, false).unwrap()
                }),
                text("b NOOP\r\n", None),
                Err(FrameError::BadLiteralHeader),
            ]
        );
        // u64::MAX parses; one more overflows.
        assert_eq!(
            split_literal_header(b"x {18446744073709551615+}\r\n"),
            Some((&b"x "[..], hdr(u64::MAX, true, false).unwrap()))
        );
        assert_eq!(
            literal_header(b"x {18446744073709551616}\r\n"),
            HeaderScan::Overflow
        );
    }

    #[test]
    fn header_encoding_round_trips() {
        for h in [
            hdr(0, false, false),
            hdr(5, true, false),
            hdr(77, false, true),
            hdr(u64::MAX, true, true),
        ] {
            let h = h.unwrap();
            let mut out = b"a ".to_vec();
            h.encode(&mut out);
            assert_eq!(split_literal_header(&out), Some((&b"a "[..], h)));
        }
    }

    /// Random bytes (biased towards IMAP punctuation) in random chunk sizes:
    /// never a panic, memory stays bounded (checked in `run`), and the bytes
    /// handed out plus those discarded account for the input.
    #[test]
    fn random_input_never_panics() {
        let mut rng = StdRng::seed_from_u64(0x1a2b);
        let alphabet = b"{}+~0123456789 \r\n\r\nabc(\")\\*";
        for _ in 0..2000 {
            let len = rng.gen_range(0..400);
            let input: Vec<u8> = (0..len)
                .map(|_| {
                    if rng.gen_bool(0.8) {
                        alphabet[rng.gen_range(0..alphabet.len())]
                    } else {
                        rng.gen()
                    }
                })
                .collect();
            let chunks: Vec<usize> = (0..5).map(|_| rng.gen_range(1..40)).collect();
            let limits = Limits {
                max_line: rng.gen_range(1..80),
                max_literal: rng.gen_range(0..100),
            };
            let frames = run(&input, limits, &chunks);
            let clean = !frames.iter().any(|f| f.is_err());
            let total: usize = frames
                .iter()
                .map(|f| match f {
                    Ok(Frame::Text { bytes, .. }) | Ok(Frame::Literal(bytes)) => bytes.len(),
                    Err(_) => 0,
                })
                .sum();
            assert!(total <= input.len());
            if clean {
                // Without errors nothing is dropped: everything but a
                // trailing partial line comes out.
                let mut joined = Vec::new();
                for f in &frames {
                    if let Ok(Frame::Text { bytes, .. } | Frame::Literal(bytes)) = f {
                        joined.extend_from_slice(bytes);
                    }
                }
                assert_eq!(&input[..joined.len()], &joined[..]);
            }
        }
    }
}
