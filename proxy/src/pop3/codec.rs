//! POP3's pure side: bounded command lines in, commands out; the proxy's
//! own responses as bytes; the PLAIN response decoded; a backend's status
//! line classified. No sockets here, so every input can be tested.

use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};

/// Longest command line the proxy reads before login, CRLF included.
///
/// RFC 2449 bounds a command at 255 octets, but `AUTH PLAIN <initial
/// response>` with long names and passwords (up to 255 each, as `saslauthd`
/// allows) is about 1 KiB of base64, and so is its continuation line.
pub const MAX_LINE: usize = 2048;

/// One line from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line, without its CRLF (or bare LF).
    Text(Bytes),
    /// A line longer than the bound ended; its bytes were dropped.
    TooLong,
}

/// Splits a byte stream into bounded lines. An over-long line is dropped as
/// it arrives (memory stays bounded however long it is) and reported once
/// its end is seen, so answers stay in the order of the lines.
#[derive(Debug)]
pub struct LineReader {
    max: usize,
    discarding: bool,
}

impl LineReader {
    /// A reader for lines of at most `max` bytes (CRLF included).
    pub fn new(max: usize) -> LineReader {
        LineReader {
            max,
            discarding: false,
        }
    }

    /// The next line in `buf` (consumed from it), or `None` until more
    /// bytes arrive.
    pub fn next(&mut self, buf: &mut BytesMut) -> Option<Line> {
        let newline = buf.iter().position(|b| *b == b'\n');
        match newline {
            Some(at) if self.discarding => {
                buf.advance(at + 1);
                self.discarding = false;
                Some(Line::TooLong)
            }
            None if self.discarding => {
                buf.clear();
                None
            }
            Some(at) if at < self.max => {
                let mut line = buf.split_to(at + 1).freeze();
                line.truncate(at);
                if line.last() == Some(&b'\r') {
                    line.truncate(at - 1);
                }
                Some(Line::Text(line))
            }
            Some(at) => {
                buf.advance(at + 1);
                Some(Line::TooLong)
            }
            None if buf.len() >= self.max => {
                buf.clear();
                self.discarding = true;
                None
            }
            None => None,
        }
    }

    /// Forgets a long line being dropped (the buffer was cleared under it,
    /// as at STLS).
    pub fn reset(&mut self) {
        self.discarding = false;
    }
}

/// A command in the AUTHORIZATION state (the only state the proxy itself
/// serves; after login every byte goes to the backend).
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// `CAPA` (RFC 2449).
    Capa,
    /// `USER name`.
    User(String),
    /// `PASS password` (the rest of the line: passwords may hold spaces).
    Pass(String),
    /// `AUTH [mechanism [initial-response]]` (RFC 5034); no mechanism asks
    /// for the list of mechanisms.
    Auth {
        /// Upper-cased mechanism name, if given.
        mechanism: Option<String>,
        /// The initial response as sent (base64, or `=` for empty).
        initial: Option<String>,
    },
    /// `STLS` (RFC 2595).
    Stls,
    /// `QUIT`.
    Quit,
    /// `NOOP` and the other TRANSACTION-state commands: not before login.
    NeedsLogin(String),
    /// `APOP`: needs a timestamp in the greeting, which the proxy does not
    /// give (it never sees the plaintext password otherwise).
    Apop,
}

/// Why a line is not a command.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// An empty line.
    #[error("Empty command")]
    Empty,
    /// Not a known keyword (or not ASCII).
    #[error("Unrecognized command")]
    Unknown,
    /// A known keyword with missing or extra arguments.
    #[error("Syntax error in {0} arguments")]
    Syntax(&'static str),
}

/// Parses one command line (without its CRLF).
pub fn parse(line: &[u8]) -> Result<Command, ParseError> {
    let text = std::str::from_utf8(line).map_err(|_| ParseError::Unknown)?;
    if text.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
        return Err(ParseError::Unknown);
    }
    if text.trim().is_empty() {
        return Err(ParseError::Empty);
    }
    let (keyword, rest) = match text.split_once(' ') {
        Some((k, r)) => (k, Some(r)),
        None => (text, None),
    };
    let keyword = keyword.to_ascii_uppercase();
    let no_args = |name: &'static str, cmd: Command| match rest {
        None => Ok(cmd),
        Some(r) if r.trim().is_empty() => Ok(cmd),
        Some(_) => Err(ParseError::Syntax(name)),
    };
    match keyword.as_str() {
        "CAPA" => no_args("CAPA", Command::Capa),
        "STLS" => no_args("STLS", Command::Stls),
        "QUIT" => no_args("QUIT", Command::Quit),
        "USER" => {
            let name = rest.map(str::trim).unwrap_or("");
            if name.is_empty() || name.contains(' ') {
                return Err(ParseError::Syntax("USER"));
            }
            Ok(Command::User(name.to_string()))
        }
        "PASS" => match rest {
            Some(p) if !p.is_empty() => Ok(Command::Pass(p.to_string())),
            _ => Err(ParseError::Syntax("PASS")),
        },
        "AUTH" => {
            let mut words = rest.unwrap_or("").split(' ').filter(|w| !w.is_empty());
            let mechanism = words.next().map(str::to_ascii_uppercase);
            let initial = words.next().map(str::to_string);
            if words.next().is_some() {
                return Err(ParseError::Syntax("AUTH"));
            }
            Ok(Command::Auth { mechanism, initial })
        }
        "APOP" => Ok(Command::Apop),
        "STAT" | "LIST" | "RETR" | "DELE" | "NOOP" | "RSET" | "TOP" | "UIDL" | "LAST" => {
            Ok(Command::NeedsLogin(keyword))
        }
        _ => Err(ParseError::Unknown),
    }
}

/// Why a SASL PLAIN response is unusable.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlainError {
    /// Not base64.
    #[error("Invalid base64 string")]
    Base64,
    /// Not `authzid NUL authcid NUL password`.
    #[error("Malformed PLAIN response")]
    Malformed,
}

/// A decoded SASL PLAIN response (RFC 4616).
#[derive(PartialEq, Eq)]
pub struct Plain {
    /// Authorization identity (empty: the same as `authcid`).
    pub authzid: String,
    /// Authentication identity: the user.
    pub authcid: String,
    /// The password.
    pub password: String,
}

impl std::fmt::Debug for Plain {
    // The password never reaches a log line, even through a Debug print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plain")
            .field("authzid", &self.authzid)
            .field("authcid", &self.authcid)
            .finish_non_exhaustive()
    }
}

/// Decodes a PLAIN response as sent (`=` is the empty response).
pub fn decode_plain(response: &str) -> Result<Plain, PlainError> {
    let decoded = if response == "=" {
        Vec::new()
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(response.trim())
            .map_err(|_| PlainError::Base64)?
    };
    let mut parts = decoded.split(|b| *b == 0);
    let (Some(authz), Some(authn), Some(pass), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(PlainError::Malformed);
    };
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| PlainError::Malformed);
    Ok(Plain {
        authzid: text(authz)?,
        authcid: text(authn)?,
        password: text(pass)?,
    })
}

/// The base64 PLAIN response the proxy sends a backend: `authzid` is the
/// user, `authcid`/`password` the proxy's own login.
pub fn encode_plain(authzid: &str, authcid: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{authzid}\0{authcid}\0{password}"))
}

/// `+OK text` CRLF.
pub fn ok(text: &str) -> Vec<u8> {
    format!("+OK {text}\r\n").into_bytes()
}

/// `-ERR [code] text` CRLF (RFC 2449 response codes).
pub fn err(code: Option<&str>, text: &str) -> Vec<u8> {
    match code {
        Some(c) => format!("-ERR [{c}] {text}\r\n").into_bytes(),
        None => format!("-ERR {text}\r\n").into_bytes(),
    }
}

/// What the proxy offers before login.
#[derive(Debug, Clone, Copy)]
pub struct Offer {
    /// STLS: TLS is configured and not active yet.
    pub stls: bool,
    /// USER/PASS and SASL PLAIN: TLS is active, the client is on
    /// loopback, or plaintext logins are allowed.
    pub login: bool,
}

/// The multi-line CAPA answer. TOP and UIDL are the backend's (Cyrus pop3d
/// has both) and listed now because clients decide on them before login;
/// PIPELINING holds because commands are answered strictly in order here
/// and bytes pipelined behind the login go to the backend untouched.
pub fn capa(offer: Offer) -> Vec<u8> {
    let mut out = String::from("+OK List of capabilities follows\r\n");
    out.push_str("TOP\r\nUIDL\r\nPIPELINING\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n");
    if offer.login {
        out.push_str("USER\r\nSASL PLAIN\r\n");
    }
    if offer.stls {
        out.push_str("STLS\r\n");
    }
    out.push_str("IMPLEMENTATION corvid-proxy\r\n.\r\n");
    out.into_bytes()
}

/// A backend's answer line, classified.
#[derive(Debug, PartialEq, Eq)]
pub enum Status {
    /// `+OK …`
    Ok,
    /// `-ERR …`, with its response code if any (e.g. `IN-USE`).
    Err(Option<String>),
    /// `+ …`: a SASL continuation.
    Continue,
    /// Anything else.
    Other,
}

/// Classifies a backend line (without CRLF).
pub fn status(line: &[u8]) -> Status {
    if line == b"+OK" || line.starts_with(b"+OK ") {
        Status::Ok
    } else if line == b"+" || line.starts_with(b"+ ") {
        Status::Continue
    } else if line == b"-ERR" || line.starts_with(b"-ERR ") {
        let rest = &line[4..];
        let rest = rest.strip_prefix(b" ").unwrap_or(rest);
        let code = rest.strip_prefix(b"[").and_then(|r| {
            let end = r.iter().position(|b| *b == b']')?;
            std::str::from_utf8(&r[..end]).ok().map(str::to_string)
        });
        Status::Err(code)
    } else {
        Status::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(reader: &mut LineReader, buf: &mut BytesMut) -> Vec<Line> {
        std::iter::from_fn(|| reader.next(buf)).collect()
    }

    #[test]
    fn lines_split_on_crlf_and_bare_lf() {
        let mut r = LineReader::new(16);
        let mut buf = BytesMut::from(&b"CAPA\r\nQUIT\nUS"[..]);
        assert_eq!(
            lines(&mut r, &mut buf),
            [
                Line::Text(Bytes::from_static(b"CAPA")),
                Line::Text(Bytes::from_static(b"QUIT"))
            ]
        );
        assert_eq!(&buf[..], b"US");
        buf.extend_from_slice(b"ER a\r\n");
        assert_eq!(
            lines(&mut r, &mut buf),
            [Line::Text(Bytes::from_static(b"USER a"))]
        );
    }

    #[test]
    fn long_lines_are_dropped_as_they_come_and_reported_at_their_end() {
        let mut r = LineReader::new(8);
        let mut buf = BytesMut::from(&b"0123456789"[..]);
        assert_eq!(lines(&mut r, &mut buf), []);
        assert!(buf.is_empty(), "memory stays bounded");
        buf.extend_from_slice(b"abcdef");
        assert_eq!(lines(&mut r, &mut buf), []);
        buf.extend_from_slice(b"gh\r\nQUIT\r\n");
        assert_eq!(
            lines(&mut r, &mut buf),
            [Line::TooLong, Line::Text(Bytes::from_static(b"QUIT"))]
        );
        // A long line complete in one read.
        let mut buf = BytesMut::from(&b"0123456789\r\nCAPA\r\n"[..]);
        assert_eq!(
            lines(&mut r, &mut buf),
            [Line::TooLong, Line::Text(Bytes::from_static(b"CAPA"))]
        );
        // Exactly at the bound: 6 bytes + CRLF fit in 8.
        let mut buf = BytesMut::from(&b"ABCDEF\r\n"[..]);
        assert_eq!(
            lines(&mut r, &mut buf),
            [Line::Text(Bytes::from_static(b"ABCDEF"))]
        );
    }

    #[test]
    fn commands_parse_case_insensitively() {
        assert_eq!(parse(b"capa"), Ok(Command::Capa));
        assert_eq!(parse(b"User alice"), Ok(Command::User("alice".into())));
        assert_eq!(
            parse(b"PASS two words "),
            Ok(Command::Pass("two words ".into()))
        );
        assert_eq!(
            parse(b"AUTH plain AGFsaWNlAHg="),
            Ok(Command::Auth {
                mechanism: Some("PLAIN".into()),
                initial: Some("AGFsaWNlAHg=".into())
            })
        );
        assert_eq!(
            parse(b"AUTH"),
            Ok(Command::Auth {
                mechanism: None,
                initial: None
            })
        );
        assert_eq!(parse(b"stls"), Ok(Command::Stls));
        assert_eq!(parse(b"QUIT"), Ok(Command::Quit));
        assert_eq!(parse(b"STAT"), Ok(Command::NeedsLogin("STAT".into())));
        assert_eq!(parse(b"APOP a b"), Ok(Command::Apop));
    }

    #[test]
    fn bad_commands_are_errors_not_panics() {
        assert_eq!(parse(b""), Err(ParseError::Empty));
        assert_eq!(parse(b"   "), Err(ParseError::Empty));
        assert_eq!(parse(b"\xff\xfe"), Err(ParseError::Unknown));
        assert_eq!(parse(b"USER a\0b"), Err(ParseError::Unknown));
        assert_eq!(parse(b"XYZZY"), Err(ParseError::Unknown));
        assert_eq!(parse(b"USER"), Err(ParseError::Syntax("USER")));
        assert_eq!(parse(b"USER a b"), Err(ParseError::Syntax("USER")));
        assert_eq!(parse(b"PASS"), Err(ParseError::Syntax("PASS")));
        assert_eq!(parse(b"CAPA x"), Err(ParseError::Syntax("CAPA")));
        assert_eq!(parse(b"AUTH PLAIN a b"), Err(ParseError::Syntax("AUTH")));
    }

    #[test]
    fn plain_responses_decode_and_encode() {
        let token = encode_plain("alice", "proxy", "secret");
        let p = decode_plain(&token).unwrap();
        assert_eq!(
            (p.authzid.as_str(), p.authcid.as_str(), p.password.as_str()),
            ("alice", "proxy", "secret")
        );
        assert!(!format!("{p:?}").contains("secret"));
        assert_eq!(decode_plain("!!!"), Err(PlainError::Base64));
        assert_eq!(decode_plain("="), Err(PlainError::Malformed));
        let two_fields = base64::engine::general_purpose::STANDARD.encode("a\0b");
        assert_eq!(decode_plain(&two_fields), Err(PlainError::Malformed));
        let four = base64::engine::general_purpose::STANDARD.encode("a\0b\0c\0d");
        assert_eq!(decode_plain(&four), Err(PlainError::Malformed));
    }

    #[test]
    fn capa_follows_the_offer() {
        let all = String::from_utf8(capa(Offer {
            stls: true,
            login: true,
        }))
        .unwrap();
        assert!(all.starts_with("+OK "));
        assert!(all.ends_with("\r\n.\r\n"));
        for cap in ["USER", "SASL PLAIN", "STLS", "RESP-CODES", "AUTH-RESP-CODE"] {
            assert!(all.contains(&format!("\r\n{cap}\r\n")), "{cap} in {all}");
        }
        let none = String::from_utf8(capa(Offer {
            stls: false,
            login: false,
        }))
        .unwrap();
        assert!(!none.contains("USER") && !none.contains("SASL") && !none.contains("STLS"));
    }

    #[test]
    fn backend_lines_classify() {
        assert_eq!(status(b"+OK Mailbox locked and ready"), Status::Ok);
        assert_eq!(status(b"+OK"), Status::Ok);
        assert_eq!(status(b"+ "), Status::Continue);
        assert_eq!(
            status(b"-ERR [IN-USE] Unable to lock maildrop"),
            Status::Err(Some("IN-USE".into()))
        );
        assert_eq!(status(b"-ERR [AUTH nope"), Status::Err(None));
        assert_eq!(status(b"-ERR no"), Status::Err(None));
        assert_eq!(status(b"* OK imap"), Status::Other);
        assert_eq!(err(Some("SYS/TEMP"), "x"), b"-ERR [SYS/TEMP] x\r\n");
        assert_eq!(ok("y"), b"+OK y\r\n");
    }
}
