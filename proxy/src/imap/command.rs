//! IMAP commands and responses above the framing: arguments, tagged and
//! untagged responses, and the encoding of strings the proxy sends.
//!
//! The parser is generic: it knows strings, lists, atoms and `NIL`, not the
//! grammar of each command. Brackets inside an atom (`BODY[HEADER.FIELDS (A
//! B)]<0.10>`) are kept in the atom, spaces and parentheses included, so a
//! FETCH item stays one argument. Everything is bounded by the
//! [`CommandBuffer`]'s byte limit and [`MAX_DEPTH`].

use bytes::Bytes;
use thiserror::Error;

use super::codec::{split_literal_header, LiteralHeader};

/// Deepest nesting of parenthesised lists (and brackets in an atom); keeps a
/// hostile `((((…` from building deep structures.
pub const MAX_DEPTH: usize = 32;

/// A command argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    /// A bare word (also flags, sequence sets and `BODY[…]<…>` items).
    Atom(String),
    /// A quoted string, escapes removed.
    Quoted(Vec<u8>),
    /// A literal's data.
    Literal(Vec<u8>),
    /// A parenthesised list.
    List(Vec<Arg>),
    /// The atom `NIL` (any case).
    Nil,
}

impl Arg {
    /// The string value of an atom, quoted string or literal. `NIL` gives
    /// `b"NIL"`: where an astring is expected (`LOGIN nil pw`) that is what
    /// the client meant; callers that care about NIL match [`Arg::Nil`] first.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Arg::Atom(s) => Some(s.as_bytes()),
            Arg::Quoted(b) | Arg::Literal(b) => Some(b),
            Arg::Nil => Some(b"NIL"),
            Arg::List(_) => None,
        }
    }

    /// [`Arg::as_bytes`] if it is UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        self.as_bytes().and_then(|b| std::str::from_utf8(b).ok())
    }
}

/// Why a command or response could not be parsed; `reason` is short and
/// fit for `tag BAD <reason>`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{reason}")]
pub struct ParseError {
    /// Human-readable reason.
    pub reason: &'static str,
}

fn err<T>(reason: &'static str) -> Result<T, ParseError> {
    Err(ParseError { reason })
}

/// What has arrived of a command so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The client's tag.
    pub tag: String,
    /// Command name, upper case; `UID` commands are two words (`UID FETCH`).
    pub name: String,
    /// The arguments complete so far. Lists still open before a pending
    /// literal appear with the elements read so far.
    pub args: Vec<Arg>,
    /// The literal announced last, if its data has not all arrived.
    pub pending: Option<LiteralHeader>,
}

/// A complete command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The client's tag.
    pub tag: String,
    /// Command name, upper case; `UID` commands are two words (`UID FETCH`).
    pub name: String,
    /// The arguments.
    pub args: Vec<Arg>,
}

/// One piece of a buffered command, as the framer delivered it.
#[derive(Debug, Clone)]
enum Seg {
    Text(Vec<u8>),
    Literal(Vec<u8>),
}

/// A command gathered piece by piece, with small literals buffered (bounded
/// by `max_bytes` in total).
#[derive(Debug, Clone)]
pub struct CommandBuffer {
    max_bytes: usize,
    segs: Vec<Seg>,
    len: usize,
    /// Literal data still due for the header that ended the last Text.
    due: u64,
    /// The last Text ended a line without a literal header.
    complete: bool,
}

impl CommandBuffer {
    /// An empty buffer holding at most `max_bytes` of text and literal data.
    pub fn new(max_bytes: usize) -> CommandBuffer {
        CommandBuffer {
            max_bytes,
            segs: Vec::new(),
            len: 0,
            due: 0,
            complete: false,
        }
    }

    /// Adds a [`Frame::Text`](super::codec::Frame::Text)'s bytes.
    pub fn push_text(&mut self, text: &[u8]) -> Result<(), ParseError> {
        if self.complete {
            return err("command already complete");
        }
        if self.due > 0 {
            return err("literal data missing");
        }
        self.reserve(text.len())?;
        // Text that does not end a line (not from the framer) continues the
        // previous piece, so texts and literals keep alternating.
        match self.segs.last_mut() {
            Some(Seg::Text(prev)) if !prev.ends_with(b"\n") => prev.extend_from_slice(text),
            _ => self.segs.push(Seg::Text(text.to_vec())),
        }
        let Some(Seg::Text(last)) = self.segs.last() else {
            unreachable!("a text was just pushed");
        };
        if let Some((_, header)) = split_literal_header(last) {
            self.due = header.len;
            self.segs.push(Seg::Literal(Vec::new()));
        } else if last.ends_with(b"\n") {
            self.complete = true;
        }
        Ok(())
    }

    /// Adds a [`Frame::Literal`](super::codec::Frame::Literal)'s bytes.
    pub fn push_literal(&mut self, chunk: &[u8]) -> Result<(), ParseError> {
        if (chunk.len() as u64) > self.due {
            return err("unexpected literal data");
        }
        self.reserve(chunk.len())?;
        let Some(Seg::Literal(data)) = self.segs.last_mut() else {
            return err("unexpected literal data");
        };
        data.extend_from_slice(chunk);
        self.due -= chunk.len() as u64;
        Ok(())
    }

    fn reserve(&mut self, n: usize) -> Result<(), ParseError> {
        match self.len.checked_add(n) {
            Some(total) if total <= self.max_bytes => {
                self.len = total;
                Ok(())
            }
            _ => err("command too long"),
        }
    }

    /// Empties the buffer for the next command.
    pub fn clear(&mut self) {
        self.segs.clear();
        self.len = 0;
        self.due = 0;
        self.complete = false;
    }

    /// Parses what has arrived so far: tag, command name, the complete args,
    /// and whether the buffer ends in a literal header still to be filled
    /// (`pending`).
    pub fn head(&self) -> Result<Head, ParseError> {
        let parsed = parse_segs(&self.segs)?;
        Ok(Head {
            tag: parsed.tag,
            name: parsed.name,
            args: parsed.args,
            pending: parsed.pending,
        })
    }

    /// The whole command, once the last Text ended with CRLF and no literal
    /// is pending.
    pub fn command(&self) -> Result<Command, ParseError> {
        if !self.is_complete() {
            return err("incomplete command");
        }
        let parsed = parse_segs(&self.segs)?;
        Ok(Command {
            tag: parsed.tag,
            name: parsed.name,
            args: parsed.args,
        })
    }

    /// True once the last Text ended a line without announcing a literal.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Bytes held (texts and literal data).
    pub fn raw_len(&self) -> usize {
        self.len
    }

    /// Bytes that may still be added before `max_bytes` is reached; lets a
    /// session decide before answering `+` whether a literal fits.
    pub fn remaining_capacity(&self) -> usize {
        self.max_bytes - self.len
    }
}

/// The parts [`parse_segs`] found.
struct Parsed {
    tag: String,
    name: String,
    args: Vec<Arg>,
    pending: Option<LiteralHeader>,
}

/// Any byte allowed in a tag: ASTRING-CHAR but `+` (RFC 9051).
fn is_tag_char(b: u8) -> bool {
    is_astring_char(b) && b != b'+'
}

/// ATOM-CHAR or `]` (RFC 9051 ASTRING-CHAR).
fn is_astring_char(b: u8) -> bool {
    matches!(b, 0x21..=0x7e) && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\')
}

/// Bytes the lenient argument parser takes into an atom: ATOM-CHAR plus
/// list wildcards, `\` (flags), `]` and 8-bit (UTF-8 mailbox names).
fn is_arg_atom_char(b: u8) -> bool {
    b > 0x20 && b != 0x7f && !matches!(b, b'(' | b')' | b'{' | b'"' | b'[')
}

/// The line content of a Text segment: without the line end and without a
/// literal header, which is returned separately.
fn body(text: &[u8]) -> (&[u8], Option<LiteralHeader>) {
    if let Some((before, header)) = split_literal_header(text) {
        return (before, Some(header));
    }
    let mut end = text.len();
    if end > 0 && text[end - 1] == b'\n' {
        end -= 1;
        if end > 0 && text[end - 1] == b'\r' {
            end -= 1;
        }
    }
    (&text[..end], None)
}

/// Reads `tag SP name [SP subname]` from the start of a line's content;
/// returns the tag, the upper-cased name and where the arguments start.
fn parse_tag_name(line: &[u8]) -> Result<(String, String, usize), ParseError> {
    let tag_end = line
        .iter()
        .position(|&b| !is_tag_char(b))
        .unwrap_or(line.len());
    if tag_end == 0 {
        return if line.is_empty() {
            err("missing tag")
        } else {
            err("invalid tag")
        };
    }
    let tag = String::from_utf8_lossy(&line[..tag_end]).into_owned();
    let mut pos = tag_end;
    let (name, next) = word_after_space(line, pos).ok_or_else(|| {
        if pos < line.len() && line[pos] != b' ' {
            ParseError {
                reason: "invalid tag",
            }
        } else {
            ParseError {
                reason: "missing command",
            }
        }
    })?;
    let mut name = name.to_ascii_uppercase();
    pos = next;
    if name == "UID" {
        let (sub, next) = word_after_space(line, pos).ok_or(ParseError {
            reason: "missing UID command",
        })?;
        name.push(' ');
        name.push_str(&sub.to_ascii_uppercase());
        pos = next;
    }
    Ok((tag, name, pos))
}

/// A command word: one space, then letters (and other ATOM-CHARs).
fn word_after_space(line: &[u8], pos: usize) -> Option<(String, usize)> {
    if line.get(pos) != Some(&b' ') {
        return None;
    }
    let start = pos + 1;
    let len = line[start..]
        .iter()
        .position(|&b| !is_astring_char(b) || b == b']')
        .unwrap_or(line.len() - start);
    if len == 0 {
        return None;
    }
    let word = std::str::from_utf8(&line[start..start + len]).ok()?;
    Some((word.to_string(), start + len))
}

/// A cheap look at a line's first Text: tag and command name only, for
/// pass-through where the rest is forwarded raw.
pub fn tag_and_name(text: &[u8]) -> Option<(String, String)> {
    let (line, _) = body(text);
    let (tag, name, _) = parse_tag_name(line).ok()?;
    Some((tag, name))
}

/// Parses the segments of a (possibly partial) command.
fn parse_segs(segs: &[Seg]) -> Result<Parsed, ParseError> {
    let Some(Seg::Text(first)) = segs.first() else {
        return err("missing tag");
    };
    let (line, _) = body(first);
    let (tag, name, mut pos) = parse_tag_name(line)?;
    // Open lists; the bottom one is the argument list itself.
    let mut stack: Vec<Vec<Arg>> = vec![Vec::new()];
    let mut seg = 0;
    let mut need_sep = true;
    let mut pending = None;
    // Stops early when a literal arrived but the rest of its line has not.
    while let Some(Seg::Text(text)) = segs.get(seg) {
        let (line, header) = body(text);
        while pos < line.len() {
            let b = line[pos];
            match b {
                b' ' => {
                    pos += 1;
                    need_sep = false;
                }
                b'(' => {
                    if need_sep {
                        return err("missing space");
                    }
                    if stack.len() > MAX_DEPTH {
                        return err("too deeply nested");
                    }
                    stack.push(Vec::new());
                    pos += 1;
                }
                b')' => {
                    if stack.len() < 2 {
                        return err("unbalanced parenthesis");
                    }
                    let list = stack.pop().unwrap_or_default();
                    push_arg(&mut stack, Arg::List(list));
                    pos += 1;
                    need_sep = true;
                }
                b'"' => {
                    if need_sep {
                        return err("missing space");
                    }
                    let (value, next) = quoted(line, pos)?;
                    push_arg(&mut stack, Arg::Quoted(value));
                    pos = next;
                    need_sep = true;
                }
                b'{' => return err("invalid literal"),
                _ => {
                    if need_sep {
                        return err("missing space");
                    }
                    let next = atom_end(line, pos)?;
                    if next == pos {
                        return err("invalid character");
                    }
                    let Ok(word) = std::str::from_utf8(&line[pos..next]) else {
                        return err("invalid UTF-8");
                    };
                    let arg = if word.eq_ignore_ascii_case("NIL") {
                        Arg::Nil
                    } else {
                        Arg::Atom(word.to_string())
                    };
                    push_arg(&mut stack, arg);
                    pos = next;
                    need_sep = true;
                }
            }
        }
        let Some(header) = header else {
            // The end of the command line.
            if stack.len() > 1 {
                return err("unbalanced parenthesis");
            }
            break;
        };
        if need_sep {
            return err("missing space");
        }
        match segs.get(seg + 1) {
            Some(Seg::Literal(data)) if data.len() as u64 == header.len => {
                push_arg(&mut stack, Arg::Literal(data.clone()));
                need_sep = true;
                seg += 2;
                pos = 0;
            }
            _ => {
                pending = Some(header);
                break;
            }
        }
    }
    // Lists left open before a pending literal close here, as read so far.
    while stack.len() > 1 {
        let list = stack.pop().unwrap_or_default();
        push_arg(&mut stack, Arg::List(list));
    }
    Ok(Parsed {
        tag,
        name,
        args: stack.pop().unwrap_or_default(),
        pending,
    })
}

fn push_arg(stack: &mut [Vec<Arg>], arg: Arg) {
    if let Some(top) = stack.last_mut() {
        top.push(arg);
    }
}

/// A quoted string starting at `line[pos] == '"'`: its value and the index
/// after the closing quote.
fn quoted(line: &[u8], pos: usize) -> Result<(Vec<u8>, usize), ParseError> {
    let mut value = Vec::new();
    let mut i = pos + 1;
    while i < line.len() {
        match line[i] {
            b'"' => return Ok((value, i + 1)),
            b'\\' => match line.get(i + 1) {
                Some(&c @ (b'"' | b'\\')) => {
                    value.push(c);
                    i += 2;
                }
                Some(_) => return err("invalid escape in quoted string"),
                None => break,
            },
            b'\r' | b'\n' | 0 => return err("invalid character in quoted string"),
            c => {
                value.push(c);
                i += 1;
            }
        }
    }
    err("unterminated quoted string")
}

/// End of an atom starting at `pos`; a `[` opens a section that runs to its
/// matching `]`, spaces, parentheses and quoted strings included.
fn atom_end(line: &[u8], mut pos: usize) -> Result<usize, ParseError> {
    let mut depth = 0usize;
    while pos < line.len() {
        let b = line[pos];
        if depth == 0 {
            if b == b'[' {
                depth = 1;
            } else if !is_arg_atom_char(b) {
                break;
            }
            pos += 1;
            continue;
        }
        match b {
            b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return err("too deeply nested");
                }
            }
            b']' => depth -= 1,
            b'"' => {
                let (_, next) = quoted(line, pos)?;
                pos = next;
                continue;
            }
            b'\r' | b'\n' | 0 => return err("unbalanced bracket"),
            _ => {}
        }
        pos += 1;
    }
    if depth > 0 {
        return err("unbalanced bracket");
    }
    Ok(pos)
}

// ----- responses ----------------------------------------------------------

/// A response's status word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `OK`.
    Ok,
    /// `NO`.
    No,
    /// `BAD`.
    Bad,
    /// `PREAUTH` (greeting).
    Preauth,
    /// `BYE`.
    Bye,
}

impl Status {
    /// The word as sent on the wire.
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::No => "NO",
            Status::Bad => "BAD",
            Status::Preauth => "PREAUTH",
            Status::Bye => "BYE",
        }
    }

    fn parse(word: &[u8]) -> Option<Status> {
        let status = match word.to_ascii_uppercase().as_slice() {
            b"OK" => Status::Ok,
            b"NO" => Status::No,
            b"BAD" => Status::Bad,
            b"PREAUTH" => Status::Preauth,
            b"BYE" => Status::Bye,
            _ => return None,
        };
        Some(status)
    }
}

/// One response line (a backend's [`Frame::Text`](super::codec::Frame::Text)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `tag STATUS [code] text`.
    Tagged {
        /// The tag of the command answered.
        tag: String,
        /// Its status.
        status: Status,
        /// The response code inside `[ ]`, brackets removed.
        code: Option<String>,
        /// The human-readable text.
        text: String,
    },
    /// `* ...`, raw with its line end (and a literal header, if any); the
    /// caller inspects and relays it.
    Untagged {
        /// The raw line.
        line: Bytes,
    },
    /// `+ text`.
    Continuation {
        /// The text after `+ ` (base64 data during AUTHENTICATE).
        text: String,
    },
}

/// The line without its CRLF or LF.
fn strip_eol(text: &[u8]) -> &[u8] {
    let text = text.strip_suffix(b"\n").unwrap_or(text);
    text.strip_suffix(b"\r").unwrap_or(text)
}

/// `STATUS [code] text` after the tag: status, code, text.
/// Status, response code and text of a status response.
pub type StatusParts = (Status, Option<String>, String);

fn status_rest(rest: &[u8]) -> Option<Result<StatusParts, ParseError>> {
    let word_end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
    let status = Status::parse(&rest[..word_end])?;
    let mut rest = rest.get(word_end + 1..).unwrap_or(&[]);
    let mut code = None;
    if rest.first() == Some(&b'[') {
        let Some(close) = rest.iter().position(|&b| b == b']') else {
            return Some(err("unterminated response code"));
        };
        code = Some(String::from_utf8_lossy(&rest[1..close]).into_owned());
        rest = &rest[close + 1..];
        rest = rest.strip_prefix(b" ").unwrap_or(rest);
    }
    Some(Ok((
        status,
        code,
        String::from_utf8_lossy(rest).into_owned(),
    )))
}

/// Parses one Text frame of a backend.
pub fn parse_response(text: &[u8]) -> Result<Response, ParseError> {
    let line = strip_eol(text);
    if let Some(rest) = line.strip_prefix(b"+") {
        let rest = rest.strip_prefix(b" ").unwrap_or(rest);
        return Ok(Response::Continuation {
            text: String::from_utf8_lossy(rest).into_owned(),
        });
    }
    if line == b"*" || line.starts_with(b"* ") {
        return Ok(Response::Untagged {
            line: Bytes::copy_from_slice(text),
        });
    }
    let tag_end = line
        .iter()
        .position(|&b| !is_tag_char(b))
        .unwrap_or(line.len());
    if tag_end == 0 {
        return err("missing tag");
    }
    if line.get(tag_end) != Some(&b' ') {
        return err("missing status");
    }
    let tag = String::from_utf8_lossy(&line[..tag_end]).into_owned();
    match status_rest(&line[tag_end + 1..]) {
        None => err("unknown status"),
        Some(Err(e)) => Err(e),
        Some(Ok((status, code, text))) => Ok(Response::Tagged {
            tag,
            status,
            code,
            text,
        }),
    }
}

/// `* OK [CODE] text`, `* BYE ...` and the like: status, code, text; None
/// for other untagged lines (or a malformed code).
pub fn untagged_status(line: &[u8]) -> Option<StatusParts> {
    let rest = strip_eol(line).strip_prefix(b"* ")?;
    status_rest(rest)?.ok()
}

// ----- encoding -------------------------------------------------------------

/// Appends `value` as an IMAP astring: an atom when every byte is an
/// ASTRING-CHAR, else a quoted string when it is 7-bit without CR, LF or
/// NUL, else a non-synchronising literal (Cyrus backends have LITERAL+).
pub fn write_astring(out: &mut Vec<u8>, value: &[u8]) {
    if !value.is_empty() && value.iter().all(|&b| is_astring_char(b)) {
        out.extend_from_slice(value);
    } else {
        write_quoted_or_literal(out, value);
    }
}

/// Like [`write_astring`] but never an atom, for clients and servers that
/// want mailbox names quoted.
pub fn write_quoted_or_literal(out: &mut Vec<u8>, value: &[u8]) {
    if value
        .iter()
        .all(|&b| matches!(b, 0x01..=0x7f) && b != b'\r' && b != b'\n')
    {
        out.push(b'"');
        for &b in value {
            if b == b'"' || b == b'\\' {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'"');
    } else {
        LiteralHeader {
            len: value.len() as u64,
            non_sync: true,
            binary: false,
        }
        .encode(out);
        out.extend_from_slice(value);
    }
}

// ----- LIST patterns ---------------------------------------------------------

/// LIST pattern matching: `*` matches anything, `%` anything but `sep`;
/// case-sensitive except that a leading `INBOX` matches in any case.
pub fn list_match(pattern: &str, name: &str, sep: char) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    if glob(&p, &n, sep) {
        return true;
    }
    let p = upper_inbox_prefix(p, false, sep);
    let n = upper_inbox_prefix(n, true, sep);
    glob(&p, &n, sep)
}

/// Upper-cases a leading `inbox`: in a name only when it is the whole first
/// component, in a pattern whenever it starts with those five letters.
fn upper_inbox_prefix(mut s: Vec<char>, whole_component: bool, sep: char) -> Vec<char> {
    if s.len() >= 5
        && s[..5]
            .iter()
            .zip("INBOX".chars())
            .all(|(a, b)| a.to_ascii_uppercase() == b)
        && (!whole_component || s.len() == 5 || s[5] == sep)
    {
        for c in &mut s[..5] {
            *c = c.to_ascii_uppercase();
        }
    }
    s
}

/// Wildcard matching by dynamic programming: time pattern × name, no
/// backtracking blow-up on patterns like `*a*a*a*b`.
fn glob(p: &[char], n: &[char], sep: char) -> bool {
    // reach[j]: the pattern so far matches the first j chars of the name.
    let mut reach = vec![false; n.len() + 1];
    reach[0] = true;
    let mut next = vec![false; n.len() + 1];
    for (i, &pc) in p.iter().enumerate() {
        if pc == '*' && i > 0 && p[i - 1] == '*' {
            continue;
        }
        match pc {
            '*' => {
                let mut any = false;
                for j in 0..=n.len() {
                    any |= reach[j];
                    next[j] = any;
                }
            }
            '%' => {
                let mut any = false;
                for j in 0..=n.len() {
                    if j > 0 && n[j - 1] == sep {
                        any = false;
                    }
                    any |= reach[j];
                    next[j] = any;
                }
            }
            c => {
                next[0] = false;
                for j in 1..=n.len() {
                    next[j] = reach[j - 1] && n[j - 1] == c;
                }
            }
        }
        std::mem::swap(&mut reach, &mut next);
        if !reach.iter().any(|&r| r) {
            return false;
        }
    }
    reach[n.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::codec::{Frame, Framer, Limits};
    use bytes::BytesMut;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Frames `input` and feeds one command into a buffer.
    fn buffer(input: &[u8]) -> CommandBuffer {
        let mut framer = Framer::new(Limits {
            max_line: 1000,
            max_literal: 1000,
        });
        let mut buf = BytesMut::from(input);
        let mut cmd = CommandBuffer::new(4096);
        while let Some(frame) = framer.next(&mut buf).unwrap() {
            match frame {
                Frame::Text { bytes, .. } => cmd.push_text(&bytes).unwrap(),
                Frame::Literal(bytes) => cmd.push_literal(&bytes).unwrap(),
            }
        }
        cmd
    }

    fn parse(input: &str) -> Result<Command, ParseError> {
        buffer(input.as_bytes()).command()
    }

    fn atom(s: &str) -> Arg {
        Arg::Atom(s.to_string())
    }

    fn q(s: &str) -> Arg {
        Arg::Quoted(s.as_bytes().to_vec())
    }

    #[test]
    fn simple_commands() {
        let c = parse("a1 login alice \"p\\\"w\\\\d\"\r\n").unwrap();
        assert_eq!(c.tag, "a1");
        assert_eq!(c.name, "LOGIN");
        assert_eq!(c.args, vec![atom("alice"), q("p\"w\\d")]);
        assert_eq!(c.args[1].as_str(), Some("p\"w\\d"));

        let c = parse("x uid fetch 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (From \"To\")]<0.100>)\n")
            .unwrap();
        assert_eq!(c.name, "UID FETCH");
        assert_eq!(
            c.args,
            vec![
                atom("1:*"),
                Arg::List(vec![
                    atom("FLAGS"),
                    atom("BODY.PEEK[HEADER.FIELDS (From \"To\")]<0.100>")
                ])
            ]
        );

        let c = parse("t LIST \"\" %\r\n").unwrap();
        assert_eq!(c.args, vec![q(""), atom("%")]);
        let c = parse("t ID nil\r\n").unwrap();
        assert_eq!(c.args, vec![Arg::Nil]);
        assert_eq!(c.args[0].as_bytes(), Some(&b"NIL"[..]));
        let c = parse("t STORE 1 +FLAGS (\\Seen \\Answered)\r\n").unwrap();
        assert_eq!(
            c.args,
            vec![
                atom("1"),
                atom("+FLAGS"),
                Arg::List(vec![atom("\\Seen"), atom("\\Answered")])
            ]
        );
        let c = parse("t SELECT Entwürfe\r\n").unwrap();
        assert_eq!(c.args, vec![atom("Entwürfe")]);
        let c = parse("t NOOP\r\n").unwrap();
        assert_eq!((c.name.as_str(), c.args.len()), ("NOOP", 0));
    }

    #[test]
    fn literals() {
        let cmd = buffer(b"a LOGIN {5}\r\nalice {3+}\r\np\x00d\r\n");
        let c = cmd.command().unwrap();
        assert_eq!(
            c.args,
            vec![
                Arg::Literal(b"alice".to_vec()),
                Arg::Literal(b"p\0d".to_vec())
            ]
        );
        // Nested in a list, and a zero-length one.
        let c = parse("a SETMETADATA INBOX (/private/comment {2}\r\nhi /x {0}\r\n)\r\n").unwrap();
        assert_eq!(
            c.args,
            vec![
                atom("INBOX"),
                Arg::List(vec![
                    atom("/private/comment"),
                    Arg::Literal(b"hi".to_vec()),
                    atom("/x"),
                    Arg::Literal(Vec::new())
                ])
            ]
        );
    }

    #[test]
    fn head_while_literal_pending() {
        let mut cmd = CommandBuffer::new(100);
        cmd.push_text(b"a APPEND INBOX (\\Seen) {10}\r\n").unwrap();
        let head = cmd.head().unwrap();
        assert_eq!(head.name, "APPEND");
        assert_eq!(
            head.args,
            vec![atom("INBOX"), Arg::List(vec![atom("\\Seen")])]
        );
        assert_eq!(head.pending.map(|h| h.len), Some(10));
        assert_eq!(cmd.command().unwrap_err().reason, "incomplete command");
        cmd.push_literal(b"12345").unwrap();
        assert!(cmd.head().unwrap().pending.is_some());
        assert!(cmd.push_text(b")\r\n").is_err());
        cmd.push_literal(b"67890").unwrap();
        let head = cmd.head().unwrap();
        assert_eq!(head.pending, None);
        assert_eq!(head.args.len(), 3);
        assert!(cmd.push_literal(b"x").is_err());
        cmd.push_text(b"\r\n").unwrap();
        assert_eq!(cmd.command().unwrap().args.len(), 3);
        assert!(cmd.push_text(b"b NOOP\r\n").is_err());
        cmd.clear();
        cmd.push_text(b"b NOOP\r\n").unwrap();
        assert_eq!(cmd.command().unwrap().tag, "b");

        // Pending inside an open list.
        let mut cmd = CommandBuffer::new(100);
        cmd.push_text(b"a SETMETADATA INBOX (/x {4}\r\n").unwrap();
        let head = cmd.head().unwrap();
        assert_eq!(head.args[1], Arg::List(vec![atom("/x")]));
    }

    #[test]
    fn limits() {
        let mut cmd = CommandBuffer::new(20);
        cmd.push_text(b"a LOGIN {10}\r\n").unwrap();
        assert_eq!(cmd.remaining_capacity(), 6);
        assert_eq!(
            cmd.push_literal(b"0123456789").unwrap_err().reason,
            "command too long"
        );
        let deep = format!("a X {}\r\n", "(".repeat(100));
        assert_eq!(parse(&deep).unwrap_err().reason, "too deeply nested");
        let deep = format!("a X {}{}\r\n", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert!(parse(&deep).is_ok());
    }

    #[test]
    fn errors() {
        for (input, reason) in [
            ("\r\n", "missing tag"),
            ("+ NOOP\r\n", "invalid tag"),
            ("* NOOP\r\n", "invalid tag"),
            ("a\r\n", "missing command"),
            ("a \r\n", "missing command"),
            ("a(b NOOP\r\n", "invalid tag"),
            ("a UID\r\n", "missing UID command"),
            ("a LOGIN \"alice\r\n", "unterminated quoted string"),
            ("a LOGIN \"a\\lice\"\r\n", "invalid escape in quoted string"),
            ("a X (a b\r\n", "unbalanced parenthesis"),
            ("a X a)\r\n", "unbalanced parenthesis"),
            ("a X BODY[1\r\n", "unbalanced bracket"),
            ("a X \"a\"b\r\n", "missing space"),
            ("a X a(b)\r\n", "missing space"),
            ("a X {3} b\r\n", "invalid literal"),
            ("a X y{0}\r\n\r\n", "missing space"),
        ] {
            assert_eq!(
                buffer(input.as_bytes()).command().map_err(|e| e.reason),
                Err(reason),
                "{input:?}"
            );
        }
        assert_eq!(
            buffer(b"a X \xff\r\n").command().unwrap_err().reason,
            "invalid UTF-8"
        );
    }

    #[test]
    fn tag_and_name_only() {
        assert_eq!(
            tag_and_name(b"A001 uid Move 1:3 \"x\" {5}\r\n"),
            Some(("A001".into(), "UID MOVE".into()))
        );
        assert_eq!(
            tag_and_name(b"t] idle\r\n"),
            Some(("t]".into(), "IDLE".into()))
        );
        assert_eq!(tag_and_name(b"A001\r\n"), None);
        assert_eq!(tag_and_name(b"+ x\r\n"), None);
    }

    #[test]
    fn responses() {
        assert_eq!(
            parse_response(b"PROXY1 OK [READ-WRITE] SELECT completed\r\n").unwrap(),
            Response::Tagged {
                tag: "PROXY1".into(),
                status: Status::Ok,
                code: Some("READ-WRITE".into()),
                text: "SELECT completed".into()
            }
        );
        assert_eq!(
            parse_response(b"a no Mailbox does not exist\r\n").unwrap(),
            Response::Tagged {
                tag: "a".into(),
                status: Status::No,
                code: None,
                text: "Mailbox does not exist".into()
            }
        );
        assert_eq!(
            parse_response(b"+ go ahead\r\n").unwrap(),
            Response::Continuation {
                text: "go ahead".into()
            }
        );
        assert_eq!(
            parse_response(b"+\r\n").unwrap(),
            Response::Continuation { text: "".into() }
        );
        assert_eq!(
            parse_response(b"* 3 EXISTS\r\n").unwrap(),
            Response::Untagged {
                line: Bytes::from_static(b"* 3 EXISTS\r\n")
            }
        );
        assert!(parse_response(b"a MAYBE x\r\n").is_err());
        assert!(parse_response(b"a\r\n").is_err());
        assert!(parse_response(b"\r\n").is_err());
        assert!(parse_response(b"a OK [ALERT x\r\n").is_err());

        assert_eq!(
            untagged_status(b"* OK [CAPABILITY IMAP4rev1 LITERAL+] hello\r\n"),
            Some((
                Status::Ok,
                Some("CAPABILITY IMAP4rev1 LITERAL+".into()),
                "hello".into()
            ))
        );
        assert_eq!(
            untagged_status(b"* BYE Fatal error\r\n"),
            Some((Status::Bye, None, "Fatal error".into()))
        );
        assert_eq!(
            untagged_status(b"* PREAUTH\r\n").unwrap().0,
            Status::Preauth
        );
        assert_eq!(untagged_status(b"* 1 FETCH (FLAGS ())\r\n"), None);
    }

    #[test]
    fn encoding() {
        let enc = |v: &[u8]| {
            let mut out = Vec::new();
            write_astring(&mut out, v);
            out
        };
        assert_eq!(enc(b"INBOX.Sent"), b"INBOX.Sent");
        assert_eq!(enc(b"a]b"), b"a]b");
        assert_eq!(enc(b""), b"\"\"");
        assert_eq!(enc(b"My Mail"), b"\"My Mail\"");
        assert_eq!(enc(b"a\"b\\c*"), b"\"a\\\"b\\\\c*\"");
        assert_eq!(enc("é".as_bytes()), b"{2+}\r\n\xc3\xa9");
        assert_eq!(enc(b"a\r\nb"), b"{4+}\r\na\r\nb");
        let mut out = Vec::new();
        write_quoted_or_literal(&mut out, b"INBOX");
        assert_eq!(out, b"\"INBOX\"");

        // What we write parses back to the same value.
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..500 {
            let len = rng.gen_range(0..12);
            let alphabet = b"ab ]\"\\*%(){\r\n\x00\xffz~+";
            let value: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect();
            let mut line = b"t X ".to_vec();
            write_astring(&mut line, &value);
            line.extend_from_slice(b"\r\n");
            let args = buffer(&line).command().unwrap().args;
            let got = match &args[0] {
                Arg::Nil => b"NIL".to_vec(),
                a => a.as_bytes().unwrap().to_vec(),
            };
            assert_eq!(got, value, "{:?}", String::from_utf8_lossy(&line));
        }
    }

    #[test]
    fn list_patterns() {
        let m = |p, n| list_match(p, n, '.');
        assert!(m("*", "user.bob.x"));
        assert!(m("%", "INBOX"));
        assert!(!m("%", "INBOX.Sent"));
        assert!(m("INBOX.%", "INBOX.Sent"));
        assert!(!m("INBOX.%", "INBOX.Sent.old"));
        assert!(m("INBOX.*", "INBOX.Sent.old"));
        assert!(m("inbox", "INBOX"));
        assert!(m("Inbox.%", "INBOX.Sent"));
        assert!(m("INBOX", "inbox"));
        assert!(!m("inbox.sent", "INBOX.Sent"));
        assert!(!m("sent", "Sent"));
        assert!(m("user.%.Sent", "user.bob.Sent"));
        assert!(m("*t", "Sent"));
        assert!(m("%%*%", "a.b"));
        assert!(!m("a", "ab"));
        assert!(m("", ""));
        assert!(!m("", "a"));
        assert!(list_match("INBOX/%", "INBOX/a.b", '/'));
        // No exponential backtracking.
        let name = "a".repeat(2000);
        assert!(!m(&"*a".repeat(200).replace("a*a*a", "a*a*b"), &name));
    }

    /// Random pieces fed into the buffer: never a panic, never over the limit.
    #[test]
    fn random_commands_never_panic() {
        let mut rng = StdRng::seed_from_u64(0xc0ffee);
        let alphabet = b"a1 \"\\()[]{}+~*%\r\nNIL";
        for _ in 0..3000 {
            let len = rng.gen_range(0..120);
            let input: Vec<u8> = (0..len)
                .map(|_| {
                    if rng.gen_bool(0.9) {
                        alphabet[rng.gen_range(0..alphabet.len())]
                    } else {
                        rng.gen()
                    }
                })
                .collect();
            let max_bytes = rng.gen_range(0..200);
            let mut framer = Framer::new(Limits {
                max_line: rng.gen_range(1..80),
                max_literal: rng.gen_range(0..50),
            });
            let mut cmd = CommandBuffer::new(max_bytes);
            let mut buf = BytesMut::new();
            for piece in input.chunks(rng.gen_range(1..30)) {
                buf.extend_from_slice(piece);
                loop {
                    let frame = match framer.next(&mut buf) {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(_) => {
                            framer.discard_line(&mut buf);
                            cmd.clear();
                            continue;
                        }
                    };
                    let pushed = match &frame {
                        Frame::Text { bytes, .. } => cmd.push_text(bytes),
                        Frame::Literal(bytes) => cmd.push_literal(bytes),
                    };
                    assert!(cmd.raw_len() <= max_bytes);
                    let _ = cmd.head();
                    if pushed.is_err() || cmd.is_complete() {
                        let _ = cmd.command();
                        cmd.clear();
                    }
                    if let Frame::Text { bytes, .. } = &frame {
                        let _ = tag_and_name(bytes);
                        let _ = parse_response(bytes);
                        let _ = untagged_status(bytes);
                    }
                }
            }
        }
    }
}
