//! LMTP's pure parts: command lines, addresses and their parameters,
//! recipient forms, and the DATA terminator. Bytes in, values out; no I/O.

use thiserror::Error;

/// Longest command line accepted (RFC 5321 allows 512 octets; extensions
/// add parameters, so a little more).
pub const MAX_COMMAND_LINE: usize = 4096;

/// One LMTP command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `LHLO host`.
    Lhlo(String),
    /// `MAIL FROM:<path> params`.
    Mail {
        /// The reverse path, without angle brackets (empty: `<>`).
        from: String,
        /// `SIZE=` if given.
        size: Option<u64>,
        /// `AUTH=` as given (xtext), if any.
        auth: Option<String>,
        /// `BODY=` as given, if any.
        body: Option<String>,
    },
    /// `RCPT TO:<path> params`.
    Rcpt {
        /// The forward path, without angle brackets.
        to: String,
        /// Cyrus's `IGNOREQUOTA`.
        ignore_quota: bool,
    },
    /// `DATA`.
    Data,
    /// `RSET`.
    Rset,
    /// `NOOP`.
    Noop,
    /// `QUIT`.
    Quit,
    /// `VRFY` (answered without disclosing anything).
    Vrfy,
}

/// Why a command line is refused; `reply()` is the LMTP answer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CommandError {
    /// Not a command this server knows.
    #[error("500 5.5.2 Unrecognized command")]
    Unknown,
    /// A known command with bad arguments.
    #[error("501 5.5.4 {0}")]
    Syntax(&'static str),
    /// A parameter this server does not support.
    #[error("555 5.5.4 Unsupported parameter {0}")]
    Parameter(String),
}

impl CommandError {
    /// The reply line (without CRLF).
    pub fn reply(&self) -> String {
        self.to_string()
    }
}

/// Parses one command line (CRLF or LF already removed or present).
pub fn parse_command(line: &[u8]) -> Result<Command, CommandError> {
    let line = trim_eol(line);
    let text =
        std::str::from_utf8(line).map_err(|_| CommandError::Syntax("Command is not UTF-8"))?;
    let (verb, rest) = match text.find(' ') {
        Some(i) => (&text[..i], &text[i + 1..]),
        None => (text, ""),
    };
    match verb.to_ascii_uppercase().as_str() {
        "LHLO" => {
            let host = rest.trim();
            if host.is_empty() {
                return Err(CommandError::Syntax("LHLO needs a host name"));
            }
            Ok(Command::Lhlo(host.to_string()))
        }
        "MAIL" => {
            let rest = strip_prefix_ci(rest, "FROM:")
                .ok_or(CommandError::Syntax("Syntax: MAIL FROM:<address>"))?;
            let (from, params) = path_and_params(rest)?;
            let mut size = None;
            let mut auth = None;
            let mut body = None;
            for p in params {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                match k.to_ascii_uppercase().as_str() {
                    "SIZE" => {
                        size = Some(
                            v.parse()
                                .map_err(|_| CommandError::Syntax("SIZE must be a number"))?,
                        )
                    }
                    "AUTH" => auth = Some(v.to_string()),
                    "BODY" => {
                        let b = v.to_ascii_uppercase();
                        if b != "7BIT" && b != "8BITMIME" {
                            return Err(CommandError::Parameter(p.to_string()));
                        }
                        body = Some(b);
                    }
                    _ => return Err(CommandError::Parameter(p.to_string())),
                }
            }
            Ok(Command::Mail {
                from,
                size,
                auth,
                body,
            })
        }
        "RCPT" => {
            let rest = strip_prefix_ci(rest, "TO:")
                .ok_or(CommandError::Syntax("Syntax: RCPT TO:<address>"))?;
            let (to, params) = path_and_params(rest)?;
            if to.is_empty() {
                return Err(CommandError::Syntax("Empty recipient"));
            }
            let mut ignore_quota = false;
            for p in params {
                if p.eq_ignore_ascii_case("IGNOREQUOTA") {
                    ignore_quota = true;
                } else {
                    return Err(CommandError::Parameter(p.to_string()));
                }
            }
            Ok(Command::Rcpt { to, ignore_quota })
        }
        "DATA" if rest.trim().is_empty() => Ok(Command::Data),
        "RSET" => Ok(Command::Rset),
        "NOOP" => Ok(Command::Noop),
        "QUIT" => Ok(Command::Quit),
        "VRFY" => Ok(Command::Vrfy),
        "DATA" => Err(CommandError::Syntax("DATA takes no argument")),
        _ => Err(CommandError::Unknown),
    }
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let s = s.trim_start();
    if s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix) {
        Some(s[prefix.len()..].trim_start())
    } else {
        None
    }
}

/// `<path> param param…` → (path without brackets, params).
fn path_and_params(rest: &str) -> Result<(String, Vec<&str>), CommandError> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('<')
        .ok_or(CommandError::Syntax("Address must be in <>"))?;
    // A quoted local part may hold '>'.
    let mut in_quote = false;
    let mut escaped = false;
    let mut end = None;
    for (i, c) in inner.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if in_quote => escaped = true,
            '"' => in_quote = !in_quote,
            '>' if !in_quote => {
                end = Some(i);
                break;
            }
            _ => {}
        }
    }
    let end = end.ok_or(CommandError::Syntax("Unterminated address"))?;
    let path = &inner[..end];
    // A source route (`@a,@b:user@c`) is obsolete; keep the mailbox.
    let path = path
        .rsplit_once(':')
        .filter(|_| path.starts_with('@'))
        .map_or(path, |(_, p)| p);
    let params = inner[end + 1..].split_whitespace().collect();
    Ok((path.to_string(), params))
}

/// Where a recipient address delivers, as Cyrus's lmtpd reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipient {
    /// A user's INBOX (`user@domain`), or a folder of it (`user+detail`);
    /// both are routed by the INBOX.
    User {
        /// The user (with `@domain` when virtual domains are on).
        user: String,
        /// The `+detail`, if any.
        detail: Option<String>,
    },
    /// A shared folder (`+shared.folder` or `postuser+shared.folder`).
    Shared {
        /// The folder name, as the sender wrote it.
        folder: String,
    },
}

/// Reads a recipient. `postuser` is Cyrus's `postuser` (the local part that
/// addresses shared folders; empty: only `+folder`); with `virtdomains` the
/// domain is part of the user name.
pub fn parse_recipient(address: &str, postuser: &str, virtdomains: bool) -> Option<Recipient> {
    let (local, domain) = match address.rsplit_once('@') {
        Some((l, d)) => (l, Some(d)),
        None => (address, None),
    };
    let local = match local.strip_prefix('"').and_then(|l| l.strip_suffix('"')) {
        Some(q) => q.replace("\\\"", "\"").replace("\\\\", "\\"),
        None => local.to_string(),
    };
    if local.is_empty() || local.bytes().any(|b| b.is_ascii_control()) {
        return None;
    }
    let (user, detail) = match local.split_once('+') {
        Some((u, d)) => (u.to_string(), Some(d.to_string())),
        None => (local.clone(), None),
    };
    if user.is_empty() || (!postuser.is_empty() && user == postuser) {
        let folder = detail.filter(|d| !d.is_empty())?;
        return Some(Recipient::Shared { folder });
    }
    let user = match (virtdomains, domain) {
        (true, Some(d)) if !d.is_empty() => format!("{user}@{}", d.to_ascii_lowercase()),
        _ => user,
    };
    Some(Recipient::User {
        user,
        detail: detail.filter(|d| !d.is_empty()),
    })
}

/// Finds the end of DATA (CRLF `.` CRLF) in the bytes as they arrive,
/// carrying its state across chunks. The spool keeps the data exactly as
/// sent, dot-stuffing and terminator included: that is what each backend
/// is sent after its own DATA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataScanner {
    /// How much of "\r\n.\r\n" has been matched (0–4); starts at 2, as if
    /// a CRLF came just before the data (an empty message is ".\r\n").
    matched: usize,
}

impl Default for DataScanner {
    fn default() -> Self {
        DataScanner { matched: 2 }
    }
}

/// What one call of [`DataScanner::scan`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scanned {
    /// Bytes of the chunk that belong to DATA (the terminator included).
    pub consumed: usize,
    /// The terminator was seen; DATA is over.
    pub done: bool,
}

impl DataScanner {
    /// Scans the next chunk.
    pub fn scan(&mut self, chunk: &[u8]) -> Scanned {
        const END: &[u8] = b"\r\n.\r\n";
        for (i, &b) in chunk.iter().enumerate() {
            if b == END[self.matched] {
                self.matched += 1;
                if self.matched == END.len() {
                    self.matched = 2;
                    return Scanned {
                        consumed: i + 1,
                        done: true,
                    };
                }
            } else {
                self.matched = if b == b'\r' { 1 } else { 0 };
            }
        }
        Scanned {
            consumed: chunk.len(),
            done: false,
        }
    }
}

/// The first digit class of a backend's reply line (2, 4 or 5), if it is
/// one.
pub fn reply_class(line: &[u8]) -> Option<u8> {
    match line.first() {
        Some(c @ b'2'..=b'5') if line.len() >= 3 && line[..3].iter().all(u8::is_ascii_digit) => {
            Some(c - b'0')
        }
        _ => None,
    }
}

/// Whether a backend reply line continues (`250-…`).
pub fn reply_continues(line: &[u8]) -> bool {
    line.len() >= 4 && line[3] == b'-'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_with_their_parameters() {
        assert_eq!(
            parse_command(b"LHLO mx.example\r\n"),
            Ok(Command::Lhlo("mx.example".into()))
        );
        assert_eq!(
            parse_command(b"MAIL FROM:<a@b> SIZE=1234 AUTH=<> BODY=8BITMIME\r\n"),
            Ok(Command::Mail {
                from: "a@b".into(),
                size: Some(1234),
                auth: Some("<>".into()),
                body: Some("8BITMIME".into())
            })
        );
        assert_eq!(
            parse_command(b"mail from:<>\r\n"),
            Ok(Command::Mail {
                from: String::new(),
                size: None,
                auth: None,
                body: None
            })
        );
        assert_eq!(
            parse_command(b"RCPT TO:<bob+lists@example.org> IGNOREQUOTA\r\n"),
            Ok(Command::Rcpt {
                to: "bob+lists@example.org".into(),
                ignore_quota: true
            })
        );
        assert_eq!(
            parse_command(b"RCPT TO:<\"odd>name\"@x>\r\n"),
            Ok(Command::Rcpt {
                to: "\"odd>name\"@x".into(),
                ignore_quota: false
            })
        );
        assert_eq!(parse_command(b"DATA\r\n"), Ok(Command::Data));
        assert!(matches!(
            parse_command(b"RCPT TO:<a@b> NOTIFY=NEVER"),
            Err(CommandError::Parameter(_))
        ));
        assert!(matches!(
            parse_command(b"RCPT TO:a@b"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(
            parse_command(b"MAIL FROM:<a SIZE=1"),
            Err(CommandError::Syntax(_))
        ));
        assert!(matches!(
            parse_command(b"HELO x"),
            Err(CommandError::Unknown)
        ));
        assert!(matches!(
            parse_command(b"\xff\xfe"),
            Err(CommandError::Syntax(_))
        ));
        assert!(parse_command(b"").is_err());
    }

    #[test]
    fn recipients_follow_cyrus_lmtpd() {
        assert_eq!(
            parse_recipient("alice@example.org", "", false),
            Some(Recipient::User {
                user: "alice".into(),
                detail: None
            })
        );
        assert_eq!(
            parse_recipient("alice+lists@example.org", "", false),
            Some(Recipient::User {
                user: "alice".into(),
                detail: Some("lists".into())
            })
        );
        assert_eq!(
            parse_recipient("alice@Example.ORG", "", true),
            Some(Recipient::User {
                user: "alice@example.org".into(),
                detail: None
            })
        );
        assert_eq!(
            parse_recipient("+shared.team@example.org", "", false),
            Some(Recipient::Shared {
                folder: "shared.team".into()
            })
        );
        assert_eq!(
            parse_recipient("bb+shared.team@example.org", "bb", false),
            Some(Recipient::Shared {
                folder: "shared.team".into()
            })
        );
        assert_eq!(parse_recipient("+@example.org", "", false), None);
        assert_eq!(parse_recipient("@example.org", "", false), None);
    }

    #[test]
    fn the_data_terminator_is_found_across_chunks() {
        let msg = b"Subject: x\r\n\r\n..dot\r\n.x\r\nend\r\n.\r\nNEXT";
        let data_len = msg.len() - 4;
        for split in 0..msg.len() {
            let mut s = DataScanner::default();
            let a = s.scan(&msg[..split]);
            let consumed = if a.done {
                a.consumed
            } else {
                let b = s.scan(&msg[split..]);
                assert!(b.done, "split {split}");
                split + b.consumed
            };
            assert_eq!(consumed, data_len, "split {split}");
        }
        let mut s = DataScanner::default();
        assert_eq!(
            s.scan(b".\r\n"),
            Scanned {
                consumed: 3,
                done: true
            }
        );
        let mut s = DataScanner::default();
        assert_eq!(
            s.scan(b"a\r\n.x\r\n"),
            Scanned {
                consumed: 7,
                done: false
            }
        );
    }

    #[test]
    fn reply_lines_are_classified() {
        assert_eq!(reply_class(b"250 2.1.5 ok"), Some(2));
        assert_eq!(reply_class(b"451 4.3.0 later"), Some(4));
        assert_eq!(reply_class(b"550-5.1.1 a"), Some(5));
        assert!(reply_continues(b"250-PIPELINING"));
        assert_eq!(reply_class(b"hello"), None);
    }
}
