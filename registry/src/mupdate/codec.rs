//! The MUPDATE wire codec, as Cyrus 3.6 speaks it: bytes in, values out, no IO.
//!
//! Server side: [`RequestDecoder`] is a push tokenizer. Feed it whatever bytes
//! arrived; it consumes them from the front of the buffer and returns the next
//! [`Frame`] (a command, a request to send `+ go ahead`, or a `BAD` answer) or
//! `None` when it needs more input. It keeps only the command being decoded,
//! bounded by [`Limits`], and throws away over-long lines and literals as they
//! arrive, so that a hostile peer cannot make it hold more than about
//! `max_line + max_literal` bytes. The `write_*` functions encode the server's
//! answers.
//!
//! Client side: [`write_request`] encodes a command the way Cyrus's own client
//! does (every argument a `{n+}` literal) and [`ResponseDecoder`] reads the
//! server's lines.
//!
//! Error texts and their precedence follow Cyrus's `mupdate.c`: `* BAD "Need
//! command"`, `BAD "Null command"`, `BAD "Unrecognized command"`, `BAD
//! "Missing arguments"`, `BAD "Extra arguments"`, `BAD "Badly formed
//! arguments"`. After an error the rest of the line is skipped like Cyrus's
//! `eatline`: non-synchronizing literals on it are skipped by count, so their
//! payload is never mistaken for a command.

use std::fmt;

use base64::Engine;
use bytes::{Buf, BytesMut};
use thiserror::Error;

/// `* BAD`: the line did not start with a tag and a space.
pub const NEED_COMMAND: &str = "Need command";
/// `* BAD`: the tag is empty, `*`, `+` or holds bytes that cannot be echoed.
pub const INVALID_TAG: &str = "Invalid tag";
/// No command word after the tag.
pub const NULL_COMMAND: &str = "Null command";
/// The command word is not a MUPDATE command.
pub const UNRECOGNIZED_COMMAND: &str = "Unrecognized command";
/// Fewer arguments than the command needs (or a malformed one before the last).
pub const MISSING_ARGUMENTS: &str = "Missing arguments";
/// More arguments than the command takes, an atom, or junk before the line end.
pub const EXTRA_ARGUMENTS: &str = "Extra arguments";
/// UPDATE with an empty or malformed server name.
pub const BADLY_FORMED_ARGUMENTS: &str = "Badly formed arguments";
/// More arguments than [`Limits::max_args`].
pub const TOO_MANY_ARGUMENTS: &str = "Too many arguments";
/// The command line (without literal payloads) exceeds [`Limits::max_line`].
pub const LINE_TOO_LONG: &str = "Line too long";
/// The command's literals exceed [`Limits::max_literal`].
pub const LITERAL_TOO_LARGE: &str = "Literal too large";
/// A name, location, ACL, mechanism or server is not UTF-8.
pub const INVALID_UTF8: &str = "Invalid UTF-8";
/// A string holds a NUL byte (Cyrus refuses those too).
pub const INVALID_NUL: &str = "Invalid NUL byte in string";

/// Cyrus accepts at most 30 servers in one UPDATE.
const MAX_UPDATE_SERVERS: usize = 30;
/// Cyrus reads literal sizes as 32-bit numbers.
const MAX_LITERAL_SIZE: u64 = u32::MAX as u64;
/// A literal announced at more than this many times [`Limits::max_literal`]
/// is not skipped but ends the connection ([`Frame::Fatal`]): reading it
/// through would let a stranger keep the server busy for gigabytes.
pub const FAR_OVER_LITERAL_FACTOR: u64 = 16;

/// Bounds on what a decoder holds for one command or line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest command line in bytes, line ends included, literal payloads
    /// excluded (for the raw SASL line mode: the longest line).
    pub max_line: usize,
    /// Largest total of literal payload bytes in one command.
    pub max_literal: usize,
    /// Most arguments in one command.
    pub max_args: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line: 8192,
            max_literal: 65536,
            max_args: 32,
        }
    }
}

/// A MUPDATE command as a client sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `AUTHENTICATE mech [initial-response]`.
    Authenticate {
        /// SASL mechanism name.
        mechanism: String,
        /// Initial response as sent: base64 text, not decoded (`=` means empty).
        initial_response: Option<Vec<u8>>,
    },
    /// `STARTTLS`.
    Starttls,
    /// `COMPRESS mech`.
    Compress {
        /// Compression mechanism (`DEFLATE`).
        mechanism: String,
    },
    /// `RESERVE name location`.
    Reserve {
        /// Mailbox name.
        name: String,
        /// `server!partition`.
        location: String,
    },
    /// `ACTIVATE name location acl`.
    Activate {
        /// Mailbox name.
        name: String,
        /// `server!partition`.
        location: String,
        /// ACL as Cyrus sends it (`id TAB rights TAB`…).
        acl: String,
    },
    /// `DEACTIVATE name location`.
    Deactivate {
        /// Mailbox name.
        name: String,
        /// `server!partition`.
        location: String,
    },
    /// `DELETE name`.
    Delete {
        /// Mailbox name.
        name: String,
    },
    /// `FIND name`.
    Find {
        /// Mailbox name.
        name: String,
    },
    /// `LIST [prefix]`.
    List {
        /// Location prefix to match, if any.
        prefix: Option<String>,
    },
    /// `UPDATE [server…]`: empty for a full update, else a partial one.
    Update {
        /// Server parts of locations to follow.
        servers: Vec<String>,
    },
    /// `NOOP`.
    Noop,
    /// `LOGOUT`.
    Logout,
}

impl Command {
    /// Every command word, indexed by [`Command::ordinal`].
    pub const NAMES: [&'static str; 12] = [
        "AUTHENTICATE",
        "STARTTLS",
        "COMPRESS",
        "RESERVE",
        "ACTIVATE",
        "DEACTIVATE",
        "DELETE",
        "FIND",
        "LIST",
        "UPDATE",
        "NOOP",
        "LOGOUT",
    ];

    /// Place of `AUTHENTICATE` in [`Command::NAMES`].
    pub const AUTHENTICATE: usize = 0;
    /// Place of `STARTTLS` in [`Command::NAMES`].
    pub const STARTTLS: usize = 1;
    /// Place of `COMPRESS` in [`Command::NAMES`].
    pub const COMPRESS: usize = 2;
    /// Place of `RESERVE` in [`Command::NAMES`].
    pub const RESERVE: usize = 3;
    /// Place of `ACTIVATE` in [`Command::NAMES`].
    pub const ACTIVATE: usize = 4;
    /// Place of `DEACTIVATE` in [`Command::NAMES`].
    pub const DEACTIVATE: usize = 5;
    /// Place of `DELETE` in [`Command::NAMES`].
    pub const DELETE: usize = 6;
    /// Place of `FIND` in [`Command::NAMES`].
    pub const FIND: usize = 7;
    /// Place of `LIST` in [`Command::NAMES`].
    pub const LIST: usize = 8;
    /// Place of `UPDATE` in [`Command::NAMES`].
    pub const UPDATE: usize = 9;
    /// Place of `NOOP` in [`Command::NAMES`].
    pub const NOOP: usize = 10;
    /// Place of `LOGOUT` in [`Command::NAMES`].
    pub const LOGOUT: usize = 11;

    /// This command's place in [`Command::NAMES`] (so that per-command
    /// state, such as metric handles, can live in an array).
    pub fn ordinal(&self) -> usize {
        match self {
            Command::Authenticate { .. } => Command::AUTHENTICATE,
            Command::Starttls => Command::STARTTLS,
            Command::Compress { .. } => Command::COMPRESS,
            Command::Reserve { .. } => Command::RESERVE,
            Command::Activate { .. } => Command::ACTIVATE,
            Command::Deactivate { .. } => Command::DEACTIVATE,
            Command::Delete { .. } => Command::DELETE,
            Command::Find { .. } => Command::FIND,
            Command::List { .. } => Command::LIST,
            Command::Update { .. } => Command::UPDATE,
            Command::Noop => Command::NOOP,
            Command::Logout => Command::LOGOUT,
        }
    }

    /// The command word, upper case (for metrics labels and logs).
    pub fn name(&self) -> &'static str {
        Command::NAMES[self.ordinal()]
    }
}

/// A tagged command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The client's tag, echoed in the answer.
    pub tag: String,
    /// The command.
    pub command: Command,
}

/// What [`RequestDecoder::decode`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete, well-formed command.
    Request(Request),
    /// The peer sent a synchronizing literal `{n}` within limits and waits:
    /// write `+ go ahead` ([`write_go_ahead`]) and flush now.
    GoAhead,
    /// A malformed or over-long command: answer `tag BAD "reason"`
    /// (`* BAD` when `tag` is `None`).
    Bad {
        /// The tag, when one was read before the error.
        tag: Option<String>,
        /// The text to send.
        reason: String,
    },
    /// A literal announced far over the limit (more than
    /// [`FAR_OVER_LITERAL_FACTOR`] times [`Limits::max_literal`]): answer
    /// `tag BAD "reason"`, then close the connection without reading on.
    Fatal {
        /// The tag, when one was read before the error.
        tag: Option<String>,
        /// The text to send.
        reason: String,
    },
}

/// A raw SASL line was longer than [`Limits::max_line`]; it was discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("line too long")]
pub struct LineTooLong;

/// The verbs the decoder knows, with their argument counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Authenticate,
    Starttls,
    Compress,
    Reserve,
    Activate,
    Deactivate,
    Delete,
    Find,
    List,
    Update,
    Noop,
    Logout,
}

impl Verb {
    fn parse(word: &[u8]) -> Option<Verb> {
        const VERBS: [(&[u8], Verb); 12] = [
            (b"AUTHENTICATE", Verb::Authenticate),
            (b"STARTTLS", Verb::Starttls),
            (b"COMPRESS", Verb::Compress),
            (b"RESERVE", Verb::Reserve),
            (b"ACTIVATE", Verb::Activate),
            (b"DEACTIVATE", Verb::Deactivate),
            (b"DELETE", Verb::Delete),
            (b"FIND", Verb::Find),
            (b"LIST", Verb::List),
            (b"UPDATE", Verb::Update),
            (b"NOOP", Verb::Noop),
            (b"LOGOUT", Verb::Logout),
        ];
        VERBS
            .iter()
            .find(|(w, _)| w.eq_ignore_ascii_case(word))
            .map(|&(_, v)| v)
    }

    /// (required, most) arguments.
    fn arity(self) -> (usize, usize) {
        match self {
            Verb::Authenticate => (1, 2),
            Verb::Starttls | Verb::Noop | Verb::Logout => (0, 0),
            Verb::Compress | Verb::Delete | Verb::Find => (1, 1),
            Verb::Reserve | Verb::Deactivate => (2, 2),
            Verb::Activate => (3, 3),
            Verb::List => (0, 1),
            Verb::Update => (0, MAX_UPDATE_SERVERS),
        }
    }
}

/// Where the request decoder is within a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the tag.
    Tag,
    /// Reading the command word.
    Word,
    /// After a token: expecting SP, CR or LF.
    After,
    /// CR seen where the line may end: expecting LF.
    AfterCr,
    /// After SP: expecting `"` or `{`.
    ArgStart,
    /// Inside a quoted string.
    Quoted,
    /// After a backslash in a quoted string.
    QuotedEscape,
    /// After `{`: literal size digits.
    LitSize { size: u64, digits: bool },
    /// After `{n+`: expecting `}`.
    LitPlus { size: u64 },
    /// After `{n}` or `{n+}`: expecting CR or LF.
    LitClose { size: u64, sync: bool },
    /// After `{n}CR`: expecting LF.
    LitCr { size: u64, sync: bool },
    /// Reading literal payload.
    LitData { remaining: usize },
    /// Discarding the rest of a bad line, then answering `BAD`.
    Skip(Skip),
}

/// Cyrus's `eatline`: to the next LF, skipping `{n+}` literal payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Skip {
    Line,
    Size { size: u64 },
    Plus { size: u64 },
    Close { size: u64 },
    Cr { size: u64 },
    Data { remaining: u64 },
}

/// What one step did with the byte it was shown.
enum Step {
    /// Consumed; keep going.
    Next,
    /// Not consumed (look at it again in the new state).
    Again,
    /// Consumed, and a frame is ready.
    Emit(Frame),
}

/// Is `b` a byte that ends a word (C `isspace`, parentheses, double quote)?
fn ends_word(b: u8) -> bool {
    matches!(
        b,
        b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b'(' | b')' | b'"'
    )
}

/// Incremental decoder of client commands (server side).
#[derive(Debug)]
pub struct RequestDecoder {
    limits: Limits,
    state: State,
    tag: Vec<u8>,
    /// The tag was read and is valid: errors carry it.
    tag_ok: bool,
    word: Vec<u8>,
    verb: Option<Verb>,
    args: Vec<Vec<u8>>,
    arg: Vec<u8>,
    /// Bytes of the command read so far, literal payloads excluded.
    line_len: usize,
    /// Literal payload bytes accepted so far in this command.
    literal_total: usize,
    /// The answer to give once the bad line has been skipped.
    pending: &'static str,
    /// The answer was given already (at an over-large literal's header):
    /// skip the rest of the line without a second one.
    quiet: bool,
    /// Partial line of the raw SASL line mode.
    raw: Vec<u8>,
    /// The raw line mode is discarding an over-long line.
    raw_skipping: bool,
}

impl RequestDecoder {
    /// A decoder bounded by `limits`.
    pub fn new(limits: Limits) -> Self {
        RequestDecoder {
            limits,
            state: State::Tag,
            tag: Vec::new(),
            tag_ok: false,
            word: Vec::new(),
            verb: None,
            args: Vec::new(),
            arg: Vec::new(),
            line_len: 0,
            literal_total: 0,
            pending: "",
            quiet: false,
            raw: Vec::new(),
            raw_skipping: false,
        }
    }

    /// Consume bytes from the front of `buf`, return the next frame or None if
    /// more input is needed. When it returns `None`, all of `buf` has been
    /// consumed (kept in the decoder or discarded).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Option<Frame> {
        let mut used = 0;
        let frame = self.run(&buf[..], &mut used);
        buf.advance(used);
        frame
    }

    /// Raw line mode for the SASL exchange (client responses are bare base64
    /// lines, or `*` to cancel): returns the line without CRLF/LF, or
    /// `Err(LineTooLong)` after discarding an over-long line up to its LF.
    pub fn decode_line(&mut self, buf: &mut BytesMut) -> Option<Result<Vec<u8>, LineTooLong>> {
        match buf.iter().position(|&b| b == b'\n') {
            Some(lf) => {
                let skipped = std::mem::replace(&mut self.raw_skipping, false);
                // A CR before the LF may have arrived in the previous piece.
                let cr = usize::from(
                    lf > 0 && buf[lf - 1] == b'\r' || lf == 0 && self.raw.last() == Some(&b'\r'),
                );
                let too_long = skipped || self.raw.len() + lf - cr > self.limits.max_line;
                if !too_long {
                    self.raw.extend_from_slice(&buf[..lf]);
                }
                buf.advance(lf + 1);
                let mut line = std::mem::take(&mut self.raw);
                if too_long {
                    return Some(Err(LineTooLong));
                }
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                Some(Ok(line))
            }
            None => {
                // One spare byte: a CR whose LF has not arrived yet.
                if !self.raw_skipping && self.raw.len() + buf.len() > self.limits.max_line + 1 {
                    self.raw_skipping = true;
                    self.raw = Vec::new();
                }
                if !self.raw_skipping {
                    self.raw.extend_from_slice(buf);
                }
                buf.clear();
                None
            }
        }
    }

    /// Bytes held for the command being decoded (tag, word, arguments).
    pub fn buffered_len(&self) -> usize {
        self.tag.len()
            + self.word.len()
            + self.arg.len()
            + self.args.iter().map(Vec::len).sum::<usize>()
            + self.raw.len()
    }

    fn run(&mut self, data: &[u8], used: &mut usize) -> Option<Frame> {
        while *used < data.len() {
            // Literal payloads move in bulk.
            match self.state {
                State::LitData { remaining } => {
                    let n = remaining.min(data.len() - *used);
                    self.arg.extend_from_slice(&data[*used..*used + n]);
                    *used += n;
                    if n == remaining {
                        self.finish_arg();
                    } else {
                        self.state = State::LitData {
                            remaining: remaining - n,
                        };
                    }
                    continue;
                }
                State::Skip(Skip::Data { remaining }) => {
                    let avail = (data.len() - *used) as u64;
                    let n = remaining.min(avail);
                    // n <= avail, which came from a usize.
                    *used += n as usize;
                    self.state = State::Skip(if n == remaining {
                        Skip::Line
                    } else {
                        Skip::Data {
                            remaining: remaining - n,
                        }
                    });
                    continue;
                }
                _ => {}
            }
            let b = data[*used];
            let step = match self.state {
                State::Skip(skip) => self.skip(skip, b),
                _ if self.line_len >= self.limits.max_line => self.too_long(),
                _ => {
                    let step = self.parse(b);
                    if !matches!(step, Step::Again) {
                        self.line_len += 1;
                    }
                    step
                }
            };
            match step {
                Step::Next => *used += 1,
                Step::Again => {}
                Step::Emit(frame) => {
                    *used += 1;
                    return Some(frame);
                }
            }
        }
        None
    }

    /// One byte of a command in a parse state.
    fn parse(&mut self, b: u8) -> Step {
        match self.state {
            State::Tag => {
                if !ends_word(b) {
                    self.tag.push(b);
                    Step::Next
                } else if b != b' ' {
                    self.fail(NEED_COMMAND)
                } else if self.tag.is_empty()
                    || self.tag == b"*"
                    || self.tag == b"+"
                    || !self.tag.iter().all(|&c| c.is_ascii_graphic())
                {
                    self.fail(INVALID_TAG);
                    Step::Next
                } else {
                    self.tag_ok = true;
                    self.state = State::Word;
                    Step::Next
                }
            }
            State::Word => {
                if !ends_word(b) {
                    self.word.push(b);
                    return Step::Next;
                }
                if self.word.is_empty() {
                    return self.fail(NULL_COMMAND);
                }
                match Verb::parse(&self.word) {
                    None => self.fail(UNRECOGNIZED_COMMAND),
                    Some(verb) => {
                        // The word's terminator is looked at as "after a token".
                        self.verb = Some(verb);
                        self.state = State::After;
                        self.after(b)
                    }
                }
            }
            State::After => self.after(b),
            State::AfterCr => {
                if b == b'\n' {
                    Step::Emit(self.complete())
                } else {
                    self.fail(EXTRA_ARGUMENTS)
                }
            }
            State::ArgStart => match b {
                b'"' => {
                    self.state = State::Quoted;
                    Step::Next
                }
                b'{' => {
                    self.state = State::LitSize {
                        size: 0,
                        digits: false,
                    };
                    Step::Next
                }
                _ => self.bad_string(),
            },
            State::Quoted => match b {
                b'\\' => {
                    self.state = State::QuotedEscape;
                    Step::Next
                }
                b'"' => {
                    self.finish_arg();
                    Step::Next
                }
                b'\r' | b'\n' => self.bad_string(),
                _ => {
                    self.arg.push(b);
                    Step::Next
                }
            },
            State::QuotedEscape => match b {
                // An escaped line end would let a string span lines.
                b'\r' | b'\n' => self.bad_string(),
                _ => {
                    self.arg.push(b);
                    self.state = State::Quoted;
                    Step::Next
                }
            },
            State::LitSize { size, digits } => match b {
                b'0'..=b'9' => {
                    let size = size * 10 + u64::from(b - b'0');
                    if size > self.far_over() {
                        // Known to be far too large before the header ends:
                        // answer now; the connection closes.
                        return Step::Emit(self.fatal_frame(LITERAL_TOO_LARGE));
                    }
                    self.state = State::LitSize { size, digits: true };
                    Step::Next
                }
                b'+' if digits => {
                    self.state = State::LitPlus { size };
                    Step::Next
                }
                b'}' if digits => {
                    self.state = State::LitClose { size, sync: true };
                    Step::Next
                }
                _ => self.bad_string(),
            },
            State::LitPlus { size } => match b {
                b'}' => {
                    self.state = State::LitClose { size, sync: false };
                    Step::Next
                }
                _ => self.bad_string(),
            },
            State::LitClose { size, sync } => match b {
                b'\r' => {
                    self.state = State::LitCr { size, sync };
                    Step::Next
                }
                b'\n' => self.literal_header(size, sync),
                _ => self.bad_string(),
            },
            State::LitCr { size, sync } => match b {
                b'\n' => self.literal_header(size, sync),
                _ => self.bad_string(),
            },
            // Handled by `run` and `skip`; consume rather than loop if ever reached.
            State::LitData { .. } | State::Skip(_) => Step::Next,
        }
    }

    /// A byte after the command word or an argument.
    fn after(&mut self, b: u8) -> Step {
        let (required, most) = self.arity();
        let n = self.args.len();
        match b {
            b' ' if n >= most => {
                self.fail(EXTRA_ARGUMENTS);
                Step::Next
            }
            b' ' if n >= self.limits.max_args => {
                self.fail(TOO_MANY_ARGUMENTS);
                Step::Next
            }
            b' ' => {
                self.state = State::ArgStart;
                Step::Next
            }
            _ if n < required => self.fail(MISSING_ARGUMENTS),
            b'\n' => Step::Emit(self.complete()),
            b'\r' => {
                self.state = State::AfterCr;
                Step::Next
            }
            _ => self.fail(EXTRA_ARGUMENTS),
        }
    }

    fn arity(&self) -> (usize, usize) {
        self.verb.map_or((0, 0), Verb::arity)
    }

    /// A string could not be read at the current byte. Cyrus's answer
    /// depends on what it expected next.
    fn bad_string(&mut self) -> Step {
        let (required, _) = self.arity();
        let reason = if self.verb == Some(Verb::Update) {
            BADLY_FORMED_ARGUMENTS
        } else if self.args.len() + 1 < required {
            MISSING_ARGUMENTS
        } else {
            EXTRA_ARGUMENTS
        };
        self.fail(reason)
    }

    /// A literal header `{n}`/`{n+}` and its line end were read.
    fn literal_header(&mut self, size: u64, sync: bool) -> Step {
        let total = usize::try_from(size)
            .ok()
            .and_then(|s| s.checked_add(self.literal_total))
            .filter(|&t| t <= self.limits.max_literal);
        match (total, sync) {
            // The client waits for "+ go ahead" and will not send the bytes.
            (None, true) => Step::Emit(self.bad_frame(LITERAL_TOO_LARGE)),
            // The bytes come anyway. Answer at once, without waiting for them;
            // then count them away, and the rest of the line, in silence.
            (None, false) => {
                let tag = self.bad_tag();
                self.reset();
                self.quiet = true;
                self.state = State::Skip(Skip::Data { remaining: size });
                Step::Emit(Frame::Bad {
                    tag,
                    reason: LITERAL_TOO_LARGE.to_owned(),
                })
            }
            (Some(total), _) => {
                let len = total - self.literal_total;
                self.literal_total = total;
                self.arg.reserve(len);
                if len == 0 {
                    self.finish_arg();
                } else {
                    self.state = State::LitData { remaining: len };
                }
                if sync {
                    Step::Emit(Frame::GoAhead)
                } else {
                    Step::Next
                }
            }
        }
    }

    /// A string argument is complete: check it and keep it.
    fn finish_arg(&mut self) {
        let arg = std::mem::take(&mut self.arg);
        let verb = self.verb;
        let raw_ok = verb == Some(Verb::Authenticate) && self.args.len() == 1;
        if arg.contains(&0) {
            self.fail(INVALID_NUL);
        } else if verb == Some(Verb::Update) && arg.is_empty() {
            self.fail(BADLY_FORMED_ARGUMENTS);
        } else if !raw_ok && std::str::from_utf8(&arg).is_err() {
            self.fail(INVALID_UTF8);
        } else {
            self.args.push(arg);
            self.state = State::After;
        }
    }

    /// Start skipping the rest of the line; the current byte is looked at
    /// again by the skipper (as Cyrus's `eatline(ch)` does).
    fn fail(&mut self, reason: &'static str) -> Step {
        self.pending = reason;
        self.state = State::Skip(Skip::Line);
        Step::Again
    }

    /// The line limit was hit. Inside a literal header, keep its place: the
    /// peer will send a non-synchronizing literal's bytes anyway.
    fn too_long(&mut self) -> Step {
        let skip = match self.state {
            State::LitSize { size, .. } => Skip::Size { size },
            State::LitPlus { size } => Skip::Plus { size },
            State::LitClose { size, sync: false } => Skip::Close { size },
            State::LitCr { size, sync: false } => Skip::Cr { size },
            _ => Skip::Line,
        };
        self.fail(LINE_TOO_LONG);
        self.state = State::Skip(skip);
        Step::Again
    }

    /// Literal sizes above this end the connection instead of being skipped.
    fn far_over(&self) -> u64 {
        let limit = (self.limits.max_literal as u64).saturating_mul(FAR_OVER_LITERAL_FACTOR);
        limit.min(MAX_LITERAL_SIZE)
    }

    /// One byte of a line being skipped.
    fn skip(&mut self, skip: Skip, b: u8) -> Step {
        let next = match (skip, b) {
            (Skip::Line, b'\n') if self.quiet => {
                self.reset();
                return Step::Next;
            }
            (Skip::Line, b'\n') => {
                let reason = self.pending;
                return Step::Emit(self.bad_frame(reason));
            }
            (Skip::Line, b'{') => Skip::Size { size: 0 },
            (Skip::Line, _) => Skip::Line,
            (Skip::Size { size }, b'0'..=b'9') => {
                let size = size * 10 + u64::from(b - b'0');
                if size > self.far_over() {
                    // Too much to read through, even to skip: give the
                    // line's answer (if not given yet) and close.
                    let reason = if self.quiet {
                        LITERAL_TOO_LARGE
                    } else {
                        self.pending
                    };
                    return Step::Emit(self.fatal_frame(reason));
                }
                Skip::Size { size }
            }
            (Skip::Size { size }, b'+') => Skip::Plus { size },
            (Skip::Plus { size }, b'}') => Skip::Close { size },
            (Skip::Close { size }, b'\r') => Skip::Cr { size },
            (Skip::Close { size }, b'\n') | (Skip::Cr { size }, b'\n') => {
                Skip::Data { remaining: size }
            }
            // Not a literal after all: look at the byte as plain line content.
            (Skip::Size { .. } | Skip::Plus { .. } | Skip::Close { .. } | Skip::Cr { .. }, _) => {
                self.state = State::Skip(Skip::Line);
                return Step::Again;
            }
            (Skip::Data { .. }, _) => Skip::Line, // handled in bulk by `run`
        };
        self.state = State::Skip(next);
        Step::Next
    }

    /// The tag to answer a bad command with, when one was read.
    fn bad_tag(&self) -> Option<String> {
        self.tag_ok
            .then(|| String::from_utf8_lossy(&self.tag).into_owned())
    }

    /// `BAD` for the current command, and reset for the next one.
    fn bad_frame(&mut self, reason: &str) -> Frame {
        let tag = self.bad_tag();
        self.reset();
        Frame::Bad {
            tag,
            reason: reason.to_owned(),
        }
    }

    /// `BAD` and close: the decoder stops here (whatever follows is not
    /// read; a caller that feeds it more anyway gets commands again).
    fn fatal_frame(&mut self, reason: &str) -> Frame {
        let tag = self.bad_tag();
        self.reset();
        Frame::Fatal {
            tag,
            reason: reason.to_owned(),
        }
    }

    /// The line ended well: build the request.
    fn complete(&mut self) -> Frame {
        let tag = String::from_utf8_lossy(&self.tag).into_owned();
        let verb = self.verb;
        let args = std::mem::take(&mut self.args);
        self.reset();
        let mut args = args.into_iter();
        let args = &mut args;
        let command = match verb {
            Some(Verb::Authenticate) => Command::Authenticate {
                mechanism: text(args),
                initial_response: args.next(),
            },
            Some(Verb::Starttls) => Command::Starttls,
            Some(Verb::Compress) => Command::Compress {
                mechanism: text(args),
            },
            Some(Verb::Reserve) => Command::Reserve {
                name: text(args),
                location: text(args),
            },
            Some(Verb::Activate) => Command::Activate {
                name: text(args),
                location: text(args),
                acl: text(args),
            },
            Some(Verb::Deactivate) => Command::Deactivate {
                name: text(args),
                location: text(args),
            },
            Some(Verb::Delete) => Command::Delete { name: text(args) },
            Some(Verb::Find) => Command::Find { name: text(args) },
            Some(Verb::List) => Command::List {
                prefix: args.next().map(into_text),
            },
            Some(Verb::Update) => Command::Update {
                servers: args.map(into_text).collect(),
            },
            Some(Verb::Noop) | None => Command::Noop,
            Some(Verb::Logout) => Command::Logout,
        };
        Frame::Request(Request { tag, command })
    }

    fn reset(&mut self) {
        self.state = State::Tag;
        self.tag.clear();
        self.tag_ok = false;
        self.word.clear();
        self.verb = None;
        self.args.clear();
        self.arg.clear();
        self.line_len = 0;
        self.literal_total = 0;
        self.pending = "";
        self.quiet = false;
        // Do not keep a big literal's allocation for the connection's life.
        if self.arg.capacity() > 4096 {
            self.arg = Vec::new();
        }
    }
}

/// The next argument as text (missing ones cannot happen: arity was checked).
fn text(args: &mut impl Iterator<Item = Vec<u8>>) -> String {
    args.next().map(into_text).unwrap_or_default()
}

/// Arguments were checked to be UTF-8 when read; never lossy in practice.
fn into_text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

// ---------------------------------------------------------------------------
// Encoders
// ---------------------------------------------------------------------------

/// The status of a tagged (or untagged) reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// `OK`.
    Ok,
    /// `NO`.
    No,
    /// `BAD`.
    Bad,
}

impl Status {
    /// The status word.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::No => "NO",
            Status::Bad => "BAD",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the server announces when a connection opens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Greeting {
    /// SASL mechanisms offered, in order of preference.
    pub mechanisms: Vec<String>,
    /// Offer STARTTLS (TLS configured and not active yet).
    pub starttls: bool,
    /// Offer partial UPDATE.
    pub partial_update: bool,
    /// This server's name.
    pub server_name: String,
    /// Implementation name.
    pub implementation: String,
    /// Implementation version.
    pub version: String,
    /// `(master)`, or `mupdate://host` on a slave.
    pub role: String,
}

/// Appends `"text"`, escaping `"` and `\`. CR, LF and NUL cannot appear in a
/// quoted string and become spaces.
fn write_quoted(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    for b in text.bytes() {
        match b {
            b'"' | b'\\' => out.extend_from_slice(&[b'\\', b]),
            b'\r' | b'\n' | 0 => out.push(b' '),
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

/// Appends `{n+}CRLF<bytes>`.
fn write_literal(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'{');
    out.extend_from_slice(bytes.len().to_string().as_bytes());
    out.extend_from_slice(b"+}\r\n");
    out.extend_from_slice(bytes);
}

/// `tag STATUS "text"` (`*` for no tag).
pub fn write_status(out: &mut Vec<u8>, tag: Option<&str>, status: Status, text: &str) {
    out.extend_from_slice(tag.unwrap_or("*").as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    write_quoted(out, text);
    out.extend_from_slice(b"\r\n");
}

/// `* BYE "text"`.
pub fn write_bye(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(b"* BYE ");
    write_quoted(out, text);
    out.extend_from_slice(b"\r\n");
}

/// `tag MAILBOX {n+}name {n+}location {n+}acl`: an active entry.
pub fn write_mailbox(out: &mut Vec<u8>, tag: &str, name: &str, location: &str, acl: &str) {
    write_data_line(out, tag, "MAILBOX", &[name, location, acl]);
}

/// `tag RESERVE {n+}name {n+}location`: a reserved entry.
pub fn write_reserve(out: &mut Vec<u8>, tag: &str, name: &str, location: &str) {
    write_data_line(out, tag, "RESERVE", &[name, location]);
}

/// `tag DELETE {n+}name`: an entry was removed (UPDATE stream).
pub fn write_delete(out: &mut Vec<u8>, tag: &str, name: &str) {
    write_data_line(out, tag, "DELETE", &[name]);
}

fn write_data_line(out: &mut Vec<u8>, tag: &str, word: &str, values: &[&str]) {
    out.extend_from_slice(tag.as_bytes());
    out.push(b' ');
    out.extend_from_slice(word.as_bytes());
    for value in values {
        out.push(b' ');
        write_literal(out, value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// `+ go ahead`: the answer to [`Frame::GoAhead`].
pub fn write_go_ahead(out: &mut Vec<u8>) {
    out.extend_from_slice(b"+ go ahead\r\n");
}

/// The greeting, in Cyrus's order: AUTH, STARTTLS, PARTIAL-UPDATE, then the
/// `* OK MUPDATE` line that ends it.
pub fn write_greeting(out: &mut Vec<u8>, greeting: &Greeting) {
    out.extend_from_slice(b"* AUTH");
    for mechanism in &greeting.mechanisms {
        out.push(b' ');
        write_quoted(out, mechanism);
    }
    out.extend_from_slice(b"\r\n");
    if greeting.starttls {
        out.extend_from_slice(b"* STARTTLS\r\n");
    }
    if greeting.partial_update {
        out.extend_from_slice(b"* PARTIAL-UPDATE\r\n");
    }
    out.extend_from_slice(b"* OK MUPDATE");
    for field in [
        &greeting.server_name,
        &greeting.implementation,
        &greeting.version,
        &greeting.role,
    ] {
        out.push(b' ');
        write_quoted(out, field);
    }
    out.extend_from_slice(b"\r\n");
}

/// A SASL challenge: a bare base64 line (an empty challenge is an empty line).
pub fn write_sasl_challenge(out: &mut Vec<u8>, challenge: &[u8]) {
    out.extend_from_slice(
        base64::engine::general_purpose::STANDARD
            .encode(challenge)
            .as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
}

/// A command as Cyrus's client writes it: every argument a `{n+}` literal;
/// AUTHENTICATE's mechanism quoted and its initial response a literal.
pub fn write_request(out: &mut Vec<u8>, tag: &str, command: &Command) {
    out.extend_from_slice(tag.as_bytes());
    out.push(b' ');
    out.extend_from_slice(command.name().as_bytes());
    fn arg(out: &mut Vec<u8>, value: &str) {
        out.push(b' ');
        write_literal(out, value.as_bytes());
    }
    match command {
        Command::Authenticate {
            mechanism,
            initial_response,
        } => {
            out.push(b' ');
            write_quoted(out, mechanism);
            if let Some(response) = initial_response {
                out.push(b' ');
                write_literal(out, response);
            }
        }
        Command::Starttls | Command::Noop | Command::Logout => {}
        Command::Compress { mechanism } => arg(out, mechanism),
        Command::Reserve { name, location } | Command::Deactivate { name, location } => {
            arg(out, name);
            arg(out, location);
        }
        Command::Activate {
            name,
            location,
            acl,
        } => {
            arg(out, name);
            arg(out, location);
            arg(out, acl);
        }
        Command::Delete { name } | Command::Find { name } => arg(out, name),
        Command::List { prefix } => {
            if let Some(prefix) = prefix {
                arg(out, prefix);
            }
        }
        Command::Update { servers } => {
            for server in servers {
                arg(out, server);
            }
        }
    }
    out.extend_from_slice(b"\r\n");
}

// ---------------------------------------------------------------------------
// Client side: server lines
// ---------------------------------------------------------------------------

/// A line the server sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerLine {
    /// A greeting capability: `* AUTH …`, `* STARTTLS`, `* PARTIAL-UPDATE`,
    /// `* COMPRESS …`.
    Capability {
        /// The capability word as sent.
        name: String,
        /// Its values.
        args: Vec<String>,
    },
    /// `* OK MUPDATE "server" "implementation" "version" "role"`: the end of
    /// the greeting; `args` are the values after `MUPDATE`.
    Greeting {
        /// The values after `OK MUPDATE`.
        args: Vec<String>,
    },
    /// `* BYE "text"`: the server closes the connection.
    Bye(String),
    /// `* BAD "text"`.
    UntaggedBad(String),
    /// `tag OK|NO|BAD "text"`.
    Status {
        /// The command's tag.
        tag: String,
        /// OK, NO or BAD.
        status: Status,
        /// The text.
        text: String,
    },
    /// `tag MAILBOX name location acl`: an active entry.
    Mailbox {
        /// The command's tag.
        tag: String,
        /// Mailbox name.
        name: String,
        /// `server!partition`.
        location: String,
        /// ACL.
        acl: String,
    },
    /// `tag RESERVE name location`: a reserved entry.
    Reserve {
        /// The command's tag.
        tag: String,
        /// Mailbox name.
        name: String,
        /// `server!partition`.
        location: String,
    },
    /// `tag DELETE name`: a removed entry (UPDATE stream).
    Delete {
        /// The command's tag.
        tag: String,
        /// Mailbox name.
        name: String,
    },
    /// `+ go ahead` (or any `+` continuation).
    GoAhead,
    /// Anything else, line end removed, e.g. a bare base64 SASL challenge.
    Other(Vec<u8>),
}

/// The server sent something the client cannot read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// A line (literal payloads excluded) is longer than [`Limits::max_line`].
    #[error("server line too long")]
    LineTooLong,
    /// A line's literals exceed [`Limits::max_literal`].
    #[error("server literal too large")]
    LiteralTooLarge,
    /// A line does not have the shape its keyword requires.
    #[error("malformed server line: {0}")]
    Malformed(&'static str),
}

/// Decoder of server lines (client side). It leaves a line in the buffer
/// until all of it (literals included) has arrived, remembering how far it
/// has looked so that each byte is scanned once.
#[derive(Debug)]
pub struct ResponseDecoder {
    limits: Limits,
    /// Where to resume looking for the line's end (may lie beyond the
    /// buffer while a literal's payload is still arriving).
    pos: usize,
    /// Start of the text after the last literal.
    segment: usize,
    /// Text bytes seen in this line.
    text_len: usize,
    /// Literal bytes announced in this line.
    literal_total: usize,
}

impl ResponseDecoder {
    /// A decoder bounded by `limits`.
    pub fn new(limits: Limits) -> Self {
        ResponseDecoder {
            limits,
            pos: 0,
            segment: 0,
            text_len: 0,
            literal_total: 0,
        }
    }

    /// The next complete server line from the front of `buf`, or `None` if
    /// more input is needed. Errors are final: the stream cannot be resynced.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<ServerLine>, DecodeError> {
        loop {
            if self.pos > buf.len() {
                return Ok(None);
            }
            let Some(k) = buf[self.pos..].iter().position(|&b| b == b'\n') else {
                self.text_len += buf.len() - self.pos;
                self.pos = buf.len();
                if self.text_len > self.limits.max_line {
                    return Err(DecodeError::LineTooLong);
                }
                return Ok(None);
            };
            let lf = self.pos + k;
            self.text_len += k + 1;
            if self.text_len > self.limits.max_line {
                return Err(DecodeError::LineTooLong);
            }
            match literal_marker(&buf[self.segment..lf]) {
                Some((size, _)) => {
                    let total = usize::try_from(size)
                        .ok()
                        .and_then(|s| s.checked_add(self.literal_total))
                        .filter(|&t| t <= self.limits.max_literal)
                        .ok_or(DecodeError::LiteralTooLarge)?;
                    let len = total - self.literal_total;
                    self.literal_total = total;
                    self.pos = lf + 1 + len;
                    self.segment = self.pos;
                }
                None => {
                    let line = buf.split_to(lf + 1);
                    *self = ResponseDecoder::new(self.limits);
                    return parse_server_line(&line).map(Some);
                }
            }
        }
    }
}

/// The size of a literal announced at the end of `text` (`{n}` or `{n+}`,
/// optionally followed by CR), and where its `{` is.
fn literal_marker(text: &[u8]) -> Option<(u64, usize)> {
    let text = text.strip_suffix(b"\r").unwrap_or(text);
    let text = text.strip_suffix(b"}")?;
    let text = text.strip_suffix(b"+").unwrap_or(text);
    let digits = text.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let (head, digits) = text.split_at(text.len() - digits);
    if head.last() != Some(&b'{') {
        return None;
    }
    // An absurd size saturates; the caller refuses it as too large.
    let size = digits.iter().fold(0u64, |n, &d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    });
    Some((size, head.len() - 1))
}

/// A cursor over one complete server line (literals included).
struct LineReader<'a> {
    line: &'a [u8],
    at: usize,
}

impl<'a> LineReader<'a> {
    fn at_end(&self) -> bool {
        matches!(&self.line[self.at..], b"" | b"\n" | b"\r\n")
    }

    /// A run of bytes up to SP or the line end.
    fn word(&mut self) -> &'a [u8] {
        let rest = &self.line[self.at..];
        let n = rest
            .iter()
            .position(|&b| matches!(b, b' ' | b'\r' | b'\n'))
            .unwrap_or(rest.len());
        self.at += n;
        &rest[..n]
    }

    /// Skips one SP if present; false at the line end.
    fn space(&mut self) -> bool {
        if self.line.get(self.at) == Some(&b' ') {
            self.at += 1;
        }
        !self.at_end()
    }

    /// A quoted string, a literal or an atom.
    fn value(&mut self) -> Result<String, DecodeError> {
        match self.line.get(self.at) {
            Some(b'"') => {
                self.at += 1;
                let mut out = Vec::new();
                loop {
                    match self.line.get(self.at) {
                        None | Some(b'\r') | Some(b'\n') => {
                            return Err(DecodeError::Malformed("unterminated quoted string"))
                        }
                        Some(b'"') => {
                            self.at += 1;
                            return Ok(String::from_utf8_lossy(&out).into_owned());
                        }
                        Some(b'\\') => {
                            let escaped = self
                                .line
                                .get(self.at + 1)
                                .ok_or(DecodeError::Malformed("unterminated quoted string"))?;
                            out.push(*escaped);
                            self.at += 2;
                        }
                        Some(&b) => {
                            out.push(b);
                            self.at += 1;
                        }
                    }
                }
            }
            Some(b'{') => {
                let rest = &self.line[self.at..];
                let lf = rest
                    .iter()
                    .position(|&b| b == b'\n')
                    .ok_or(DecodeError::Malformed("bad literal"))?;
                let size = match literal_marker(&rest[..lf]) {
                    Some((size, 0)) => size,
                    _ => return Err(DecodeError::Malformed("bad literal")),
                };
                let start = self.at + lf + 1;
                let end = usize::try_from(size)
                    .ok()
                    .and_then(|s| start.checked_add(s))
                    .filter(|&e| e <= self.line.len())
                    .ok_or(DecodeError::Malformed("short literal"))?;
                self.at = end;
                Ok(String::from_utf8_lossy(&self.line[start..end]).into_owned())
            }
            _ => Ok(String::from_utf8_lossy(self.word()).into_owned()),
        }
    }

    /// All remaining values.
    fn values(&mut self) -> Result<Vec<String>, DecodeError> {
        let mut values = Vec::new();
        while self.space() {
            let before = self.at;
            values.push(self.value()?);
            if self.at == before {
                return Err(DecodeError::Malformed("unexpected byte"));
            }
        }
        Ok(values)
    }

    /// A status text: a quoted string or literal, else the rest of the line.
    fn text(&mut self) -> Result<String, DecodeError> {
        if !self.space() {
            return Ok(String::new());
        }
        if matches!(self.line.get(self.at), Some(b'"') | Some(b'{')) {
            return self.value();
        }
        let rest = &self.line[self.at..];
        let rest = rest.strip_suffix(b"\n").unwrap_or(rest);
        let rest = rest.strip_suffix(b"\r").unwrap_or(rest);
        self.at = self.line.len();
        Ok(String::from_utf8_lossy(rest).into_owned())
    }
}

/// Classifies one complete line.
fn parse_server_line(line: &[u8]) -> Result<ServerLine, DecodeError> {
    let mut r = LineReader { line, at: 0 };
    let tag = r.word();
    if tag == b"+" {
        return Ok(ServerLine::GoAhead);
    }
    if r.at_end() {
        // No space at all: a SASL challenge (possibly empty) or junk.
        return Ok(ServerLine::Other(tag.to_vec()));
    }
    r.space();
    let keyword = r.word().to_ascii_uppercase();
    let tag = String::from_utf8_lossy(tag).into_owned();
    if tag == "*" {
        return match keyword.as_slice() {
            b"OK" => {
                let mut args = r.values()?;
                if args
                    .first()
                    .is_some_and(|a| a.eq_ignore_ascii_case("MUPDATE"))
                {
                    args.remove(0);
                }
                Ok(ServerLine::Greeting { args })
            }
            b"BYE" => Ok(ServerLine::Bye(r.text()?)),
            b"BAD" => Ok(ServerLine::UntaggedBad(r.text()?)),
            b"NO" => Ok(ServerLine::Other(strip_eol(line).to_vec())),
            _ => Ok(ServerLine::Capability {
                name: String::from_utf8_lossy(&keyword).into_owned(),
                args: r.values()?,
            }),
        };
    }
    let status = match keyword.as_slice() {
        b"OK" => Some(Status::Ok),
        b"NO" => Some(Status::No),
        b"BAD" => Some(Status::Bad),
        _ => None,
    };
    if let Some(status) = status {
        let text = r.text()?;
        return Ok(ServerLine::Status { tag, status, text });
    }
    let expected = match keyword.as_slice() {
        b"MAILBOX" => 3,
        b"RESERVE" => 2,
        b"DELETE" => 1,
        _ => return Ok(ServerLine::Other(strip_eol(line).to_vec())),
    };
    let mut values = r.values()?;
    if values.len() != expected {
        return Err(DecodeError::Malformed("wrong number of values"));
    }
    let mut take = || values.remove(0);
    Ok(match expected {
        3 => ServerLine::Mailbox {
            tag,
            name: take(),
            location: take(),
            acl: take(),
        },
        2 => ServerLine::Reserve {
            tag,
            name: take(),
            location: take(),
        },
        _ => ServerLine::Delete { tag, name: take() },
    })
}

fn strip_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    // ----- helpers ---------------------------------------------------------

    fn small() -> Limits {
        Limits {
            max_line: 64,
            max_literal: 32,
            max_args: 32,
        }
    }

    /// Feeds `input` `chunk` bytes at a time, draining frames after each
    /// chunk, and checks the decoder's bounds on the way.
    fn feed(input: &[u8], limits: Limits, chunk: usize) -> Vec<Frame> {
        let mut dec = RequestDecoder::new(limits);
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            while let Some(frame) = dec.decode(&mut buf) {
                if matches!(frame, Frame::Fatal { .. }) {
                    // The server closes the connection here.
                    frames.push(frame);
                    return frames;
                }
                frames.push(frame);
                assert!(dec.buffered_len() <= limits.max_line + limits.max_literal);
            }
            assert!(
                buf.is_empty(),
                "decoder left {} bytes unconsumed",
                buf.len()
            );
            assert!(
                dec.buffered_len() <= limits.max_line + limits.max_literal,
                "decoder holds {} bytes",
                dec.buffered_len()
            );
        }
        frames
    }

    /// Decodes `input` whole and in chunks of 1, 2, 3, 7 and 64 bytes; all
    /// feeds must give the same frames.
    fn decode_all(input: &[u8], limits: Limits) -> Vec<Frame> {
        let whole = feed(input, limits, input.len().max(1));
        for chunk in [1, 2, 3, 7, 64] {
            assert_eq!(
                feed(input, limits, chunk),
                whole,
                "chunks of {chunk} differ for {:?}",
                String::from_utf8_lossy(input)
            );
        }
        whole
    }

    fn req(tag: &str, command: Command) -> Frame {
        Frame::Request(Request {
            tag: tag.into(),
            command,
        })
    }

    fn bad(tag: Option<&str>, reason: &str) -> Frame {
        Frame::Bad {
            tag: tag.map(String::from),
            reason: reason.into(),
        }
    }

    fn fatal(tag: Option<&str>, reason: &str) -> Frame {
        Frame::Fatal {
            tag: tag.map(String::from),
            reason: reason.into(),
        }
    }

    fn s(v: &str) -> String {
        v.to_owned()
    }

    fn noop(tag: &str) -> Frame {
        req(tag, Command::Noop)
    }

    fn run_table(table: &[(&[u8], Vec<Frame>)], limits: Limits) {
        for (input, expected) in table {
            assert_eq!(
                &decode_all(input, limits),
                expected,
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    // ----- valid commands --------------------------------------------------

    #[test]
    fn valid_commands() {
        let table: Vec<(&[u8], Vec<Frame>)> = vec![
            (b"A1 NOOP\r\n", vec![noop("A1")]),
            (b"a1 noop\n", vec![noop("a1")]),
            (b"A1 nOoP\r\n", vec![noop("A1")]),
            (b"Q01 LOGOUT\r\n", vec![req("Q01", Command::Logout)]),
            (b"S1 STARTTLS\r\n", vec![req("S1", Command::Starttls)]),
            (
                b"C1 COMPRESS \"DEFLATE\"\r\n",
                vec![req("C1", Command::Compress { mechanism: s("DEFLATE") })],
            ),
            (
                b"A01 AUTHENTICATE \"PLAIN\"\r\n",
                vec![req(
                    "A01",
                    Command::Authenticate {
                        mechanism: s("PLAIN"),
                        initial_response: None,
                    },
                )],
            ),
            (
                b"A01 AUTHENTICATE \"PLAIN\" {20+}\r\nAGFkbWluAHNlY3JldA==\r\n",
                vec![req(
                    "A01",
                    Command::Authenticate {
                        mechanism: s("PLAIN"),
                        initial_response: Some(b"AGFkbWluAHNlY3JldA==".to_vec()),
                    },
                )],
            ),
            (
                b"A01 authenticate \"SCRAM-SHA-256\" \"=\"\n",
                vec![req(
                    "A01",
                    Command::Authenticate {
                        mechanism: s("SCRAM-SHA-256"),
                        initial_response: Some(b"=".to_vec()),
                    },
                )],
            ),
            (
                b"X0 RESERVE {8+}\r\nuser.bob {11+}\r\nbe1!default\r\n",
                vec![req(
                    "X0",
                    Command::Reserve {
                        name: s("user.bob"),
                        location: s("be1!default"),
                    },
                )],
            ),
            (
                b"X1 RESERVE \"user.bob\" \"be1!default\"\r\n",
                vec![req(
                    "X1",
                    Command::Reserve {
                        name: s("user.bob"),
                        location: s("be1!default"),
                    },
                )],
            ),
            (
                b"X2 ACTIVATE {8+}\r\nuser.bob {11+}\r\nbe1!default {40+}\r\nbob\tlrswipkxtecdan\tadmin\tlrswipkxtecdan\t\r\n",
                vec![req(
                    "X2",
                    Command::Activate {
                        name: s("user.bob"),
                        location: s("be1!default"),
                        acl: s("bob\tlrswipkxtecdan\tadmin\tlrswipkxtecdan\t"),
                    },
                )],
            ),
            (
                b"X3 Deactivate \"user.bob\" {22+}\r\nlocalhost:9143!default\r\n",
                vec![req(
                    "X3",
                    Command::Deactivate {
                        name: s("user.bob"),
                        location: s("localhost:9143!default"),
                    },
                )],
            ),
            (
                b"X4 DELETE {10+}\r\nuser.frank\r\n",
                vec![req("X4", Command::Delete { name: s("user.frank") })],
            ),
            (
                b"X5 FIND \"example.com!user.fred\"\r\n",
                vec![req(
                    "X5",
                    Command::Find {
                        name: s("example.com!user.fred"),
                    },
                )],
            ),
            (b"L1 LIST\r\n", vec![req("L1", Command::List { prefix: None })]),
            (
                b"L2 LIST \"be1!\"\r\n",
                vec![req("L2", Command::List { prefix: Some(s("be1!")) })],
            ),
            (b"U01 UPDATE\r\n", vec![req("U01", Command::Update { servers: vec![] })]),
            (
                b"U02 UPDATE \"be1\" {3+}\r\nbe2\r\n",
                vec![req(
                    "U02",
                    Command::Update {
                        servers: vec![s("be1"), s("be2")],
                    },
                )],
            ),
            // Escapes: backslash takes the next byte whatever it is.
            (
                b"E1 FIND \"a\\\"b\\\\c\\x\"\r\n",
                vec![req("E1", Command::Find { name: s("a\"b\\cx") })],
            ),
            // Empty strings are the server's business (UPDATE excepted).
            (b"E2 FIND \"\"\r\n", vec![req("E2", Command::Find { name: s("") })]),
            (b"E3 FIND {0+}\r\n\r\n", vec![req("E3", Command::Find { name: s("") })]),
            // Literal payload may hold anything but NUL, line ends included.
            (
                b"E4 FIND {12+}\r\na\r\nB1 NOOP\r\n\r\n",
                vec![req("E4", Command::Find { name: s("a\r\nB1 NOOP\r\n") })],
            ),
            // Bare LF after a literal header.
            (b"E5 FIND {3+}\nabc\n", vec![req("E5", Command::Find { name: s("abc") })]),
            // UTF-8 names.
            (
                "E6 FIND {10+}\r\nuser.jörg\r\n".as_bytes(),
                vec![req("E6", Command::Find { name: s("user.jörg") })],
            ),
            // Tags may hold any printable bytes but specials.
            (b"a.b-{1}* NOOP\r\n", vec![noop("a.b-{1}*")]),
            // Pipelined commands in one buffer.
            (
                b"X0 RESERVE {8+}\r\nuser.bob {11+}\r\nbe1!default\r\nX1 ACTIVATE {8+}\r\nuser.bob {11+}\r\nbe1!default {0+}\r\n\r\nQ01 LOGOUT\r\n",
                vec![
                    req(
                        "X0",
                        Command::Reserve {
                            name: s("user.bob"),
                            location: s("be1!default"),
                        },
                    ),
                    req(
                        "X1",
                        Command::Activate {
                            name: s("user.bob"),
                            location: s("be1!default"),
                            acl: s(""),
                        },
                    ),
                    req("Q01", Command::Logout),
                ],
            ),
        ];
        run_table(&table, Limits::default());
    }

    #[test]
    fn synchronizing_literals_ask_for_go_ahead() {
        let table: Vec<(&[u8], Vec<Frame>)> = vec![
            (
                b"F1 FIND {8}\r\nuser.bob\r\n",
                vec![
                    Frame::GoAhead,
                    req(
                        "F1",
                        Command::Find {
                            name: s("user.bob"),
                        },
                    ),
                ],
            ),
            (
                b"R1 RESERVE {8}\r\nuser.bob {11}\r\nbe1!default\r\nA2 NOOP\r\n",
                vec![
                    Frame::GoAhead,
                    Frame::GoAhead,
                    req(
                        "R1",
                        Command::Reserve {
                            name: s("user.bob"),
                            location: s("be1!default"),
                        },
                    ),
                    noop("A2"),
                ],
            ),
            // Zero-length: the client still waits for the go-ahead.
            (
                b"F2 FIND {0}\r\n\r\n",
                vec![Frame::GoAhead, req("F2", Command::Find { name: s("") })],
            ),
            (
                b"U1 UPDATE {0}\r\n\r\nA2 NOOP\r\n",
                vec![
                    Frame::GoAhead,
                    bad(Some("U1"), BADLY_FORMED_ARGUMENTS),
                    noop("A2"),
                ],
            ),
            // No go-ahead for a command that is refused already.
            (
                b"A1 FROB {5}\r\nA2 NOOP\r\n",
                vec![bad(Some("A1"), UNRECOGNIZED_COMMAND), noop("A2")],
            ),
            (
                b"A1 NOOP {5}\r\nA2 NOOP\r\n",
                vec![bad(Some("A1"), EXTRA_ARGUMENTS), noop("A2")],
            ),
        ];
        run_table(&table, Limits::default());
    }

    #[test]
    fn go_ahead_comes_before_the_payload_is_needed() {
        let mut dec = RequestDecoder::new(Limits::default());
        let mut buf = BytesMut::from(&b"F1 FIND {8}\r\n"[..]);
        assert_eq!(dec.decode(&mut buf), Some(Frame::GoAhead));
        assert_eq!(dec.decode(&mut buf), None);
        buf.extend_from_slice(b"user.bob\r\n");
        assert_eq!(
            dec.decode(&mut buf),
            Some(req(
                "F1",
                Command::Find {
                    name: s("user.bob")
                }
            ))
        );
        assert!(buf.is_empty());
    }

    // ----- generic errors, each followed by a command that must parse ------

    #[test]
    fn generic_errors() {
        let cases: Vec<(&[u8], Frame)> = vec![
            (b"\r\n", bad(None, NEED_COMMAND)),
            (b"\n", bad(None, NEED_COMMAND)),
            (b"A1\r\n", bad(None, NEED_COMMAND)),
            (b"A1\tNOOP\r\n", bad(None, NEED_COMMAND)),
            (b"A1(NOOP\r\n", bad(None, NEED_COMMAND)),
            (b"A1\"NOOP\"\r\n", bad(None, NEED_COMMAND)),
            (b" NOOP\r\n", bad(None, INVALID_TAG)),
            (b"* NOOP\r\n", bad(None, INVALID_TAG)),
            (b"+ NOOP\r\n", bad(None, INVALID_TAG)),
            (b"A\x01 NOOP\r\n", bad(None, INVALID_TAG)),
            (b"A\xff NOOP\r\n", bad(None, INVALID_TAG)),
            (b"A\0 NOOP\r\n", bad(None, INVALID_TAG)),
            (b"A1 \r\n", bad(Some("A1"), NULL_COMMAND)),
            (b"A1  NOOP\r\n", bad(Some("A1"), NULL_COMMAND)),
            (b"A1 \"NOOP\"\r\n", bad(Some("A1"), NULL_COMMAND)),
            (b"A1 FROB\r\n", bad(Some("A1"), UNRECOGNIZED_COMMAND)),
            (
                b"A1 FROB \"x\" {3+}\r\nabc\r\n",
                bad(Some("A1"), UNRECOGNIZED_COMMAND),
            ),
            (b"A1 NOOPX\r\n", bad(Some("A1"), UNRECOGNIZED_COMMAND)),
            (b"A1 FIND\r\n", bad(Some("A1"), MISSING_ARGUMENTS)),
            (b"A1 FIND\n", bad(Some("A1"), MISSING_ARGUMENTS)),
            (b"A1 FIND(\"x\")\r\n", bad(Some("A1"), MISSING_ARGUMENTS)),
            (b"A1 RESERVE \"a\"\r\n", bad(Some("A1"), MISSING_ARGUMENTS)),
            (
                b"A1 ACTIVATE \"a\" \"b\"\r\n",
                bad(Some("A1"), MISSING_ARGUMENTS),
            ),
            (
                b"A1 RESERVE atom \"b\"\r\n",
                bad(Some("A1"), MISSING_ARGUMENTS),
            ),
            (b"A1 AUTHENTICATE\r\n", bad(Some("A1"), MISSING_ARGUMENTS)),
            (b"A1 COMPRESS\r\n", bad(Some("A1"), MISSING_ARGUMENTS)),
            (b"A1 FIND atom\r\n", bad(Some("A1"), EXTRA_ARGUMENTS)),
            (
                b"A1 RESERVE \"a\" atom\r\n",
                bad(Some("A1"), EXTRA_ARGUMENTS),
            ),
            (
                b"A1 AUTHENTICATE PLAIN\r\n",
                bad(Some("A1"), EXTRA_ARGUMENTS),
            ),
            (
                b"A1 AUTHENTICATE \"PLAIN\" x\r\n",
                bad(Some("A1"), EXTRA_ARGUMENTS),
            ),
            (
                b"A1 AUTHENTICATE \"A\" \"B\" \"C\"\r\n",
                bad(Some("A1"), EXTRA_ARGUMENTS),
            ),
            (b"A1 FIND \"a\" \"b\"\r\n", bad(Some("A1"), EXTRA_ARGUMENTS)),
            (b"A1 FIND \"a\"x\r\n", bad(Some("A1"), EXTRA_ARGUMENTS)),
            (b"A1 FIND \"a\" \r\n", bad(Some("A1"), EXTRA_ARGUMENTS)),
            (b"A1 LIST atom\r\n", bad(Some("A1"), EXTRA_ARGUMENTS)),
            (b"A1 LIST \"a\" \"b\"\r\n", bad(Some("A1"), EXTRA_ARGUMENTS)),
            (b"A1 NOOP extra\r\n", bad(Some("A1"), EXTRA_ARGUMENTS)),
            (b"A1 NOOP \r\n", bad(Some("A1"), EXTRA_ARGUMENTS)),
            (b"A1 NOOP\rX\n", bad(Some("A1"), EXTRA_ARGUMENTS)),
            (b"A1 NOOP\r\r\n", bad(Some("A1"), EXTRA_ARGUMENTS)),
            (b"A1 LOGOUT(\r\n", bad(Some("A1"), EXTRA_ARGUMENTS)),
            (b"A1 FIND \"abc\r\n", bad(Some("A1"), EXTRA_ARGUMENTS)),
            (b"A1 FIND \"abc\\\r\n", bad(Some("A1"), EXTRA_ARGUMENTS)),
            (b"A1 RESERVE \"abc\r\n", bad(Some("A1"), MISSING_ARGUMENTS)),
            (b"A1 FIND {\r\n", bad(Some("A1"), EXTRA_ARGUMENTS)),
            (b"A1 FIND {}\r\n", bad(Some("A1"), EXTRA_ARGUMENTS)),
            (b"A1 FIND {+}\r\n", bad(Some("A1"), EXTRA_ARGUMENTS)),
            (b"A1 FIND {5\r\n", bad(Some("A1"), EXTRA_ARGUMENTS)),
            (b"A1 FIND {5+\r\n", bad(Some("A1"), EXTRA_ARGUMENTS)),
            (b"A1 FIND {5x}\r\n", bad(Some("A1"), EXTRA_ARGUMENTS)),
            (b"A1 FIND {5}x\r\n", bad(Some("A1"), EXTRA_ARGUMENTS)),
            (b"A1 FIND {5+}\rx\n", bad(Some("A1"), EXTRA_ARGUMENTS)),
            (b"A1 FIND {-5+}\r\n", bad(Some("A1"), EXTRA_ARGUMENTS)),
            (
                b"A1 UPDATE \"\"\r\n",
                bad(Some("A1"), BADLY_FORMED_ARGUMENTS),
            ),
            (
                b"A1 UPDATE \"be1\" {0+}\r\n\r\n",
                bad(Some("A1"), BADLY_FORMED_ARGUMENTS),
            ),
            (
                b"A1 UPDATE atom\r\n",
                bad(Some("A1"), BADLY_FORMED_ARGUMENTS),
            ),
            (
                b"A1 UPDATE \"be1\" \r\n",
                bad(Some("A1"), BADLY_FORMED_ARGUMENTS),
            ),
            (b"A1 UPDATE \"be1\"x\r\n", bad(Some("A1"), EXTRA_ARGUMENTS)),
            (
                b"A1 FIND {4+}\r\nu\xffer\r\n",
                bad(Some("A1"), INVALID_UTF8),
            ),
            (b"A1 FIND \"\xc3\"\r\n", bad(Some("A1"), INVALID_UTF8)),
            (
                b"A1 AUTHENTICATE \"\xff\"\r\n",
                bad(Some("A1"), INVALID_UTF8),
            ),
            (b"A1 FIND {4+}\r\nu\0er\r\n", bad(Some("A1"), INVALID_NUL)),
            (b"A1 FIND \"u\0er\"\r\n", bad(Some("A1"), INVALID_NUL)),
            (
                b"A1 AUTHENTICATE \"PLAIN\" {2+}\r\n\0a\r\n",
                bad(Some("A1"), INVALID_NUL),
            ),
        ];
        for (input, expected) in cases {
            let mut line = input.to_vec();
            line.extend_from_slice(b"A2 NOOP\r\n");
            assert_eq!(
                decode_all(&line, Limits::default()),
                vec![expected, noop("A2")],
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    /// The bytes a server writes for each generic error are Cyrus's.
    #[test]
    fn error_answers_on_the_wire() {
        let input = b"\r\nA1 \r\nA2 FROB\r\nA3 FIND\r\nA4 NOOP x\r\nA5 UPDATE \"\"\r\n";
        let mut out = Vec::new();
        for frame in decode_all(input, Limits::default()) {
            match frame {
                Frame::Bad { tag, reason } => {
                    write_status(&mut out, tag.as_deref(), Status::Bad, &reason)
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "* BAD \"Need command\"\r\n\
             A1 BAD \"Null command\"\r\n\
             A2 BAD \"Unrecognized command\"\r\n\
             A3 BAD \"Missing arguments\"\r\n\
             A4 BAD \"Extra arguments\"\r\n\
             A5 BAD \"Badly formed arguments\"\r\n"
        );
    }

    #[test]
    fn initial_response_is_kept_raw() {
        let input = b"A1 AUTHENTICATE \"X\" {3+}\r\n\xff\xfe=\r\n";
        assert_eq!(
            decode_all(input, Limits::default()),
            vec![req(
                "A1",
                Command::Authenticate {
                    mechanism: s("X"),
                    initial_response: Some(b"\xff\xfe=".to_vec()),
                },
            )]
        );
    }

    #[test]
    fn update_takes_at_most_thirty_servers() {
        let mut thirty = b"U1 UPDATE".to_vec();
        for i in 0..30 {
            thirty.extend_from_slice(format!(" \"be{i}\"").as_bytes());
        }
        let mut line = thirty.clone();
        line.extend_from_slice(b"\r\n");
        let servers = (0..30).map(|i| format!("be{i}")).collect();
        assert_eq!(
            decode_all(&line, Limits::default()),
            vec![req("U1", Command::Update { servers })]
        );
        let mut line = thirty;
        line.extend_from_slice(b" \"be30\"\r\nA2 NOOP\r\n");
        assert_eq!(
            decode_all(&line, Limits::default()),
            vec![bad(Some("U1"), EXTRA_ARGUMENTS), noop("A2")]
        );
    }

    #[test]
    fn max_args_is_enforced() {
        let limits = Limits {
            max_args: 2,
            ..Limits::default()
        };
        let table: Vec<(&[u8], Vec<Frame>)> = vec![
            (
                b"U1 UPDATE \"a\" \"b\"\r\n",
                vec![req(
                    "U1",
                    Command::Update {
                        servers: vec![s("a"), s("b")],
                    },
                )],
            ),
            (
                b"U1 UPDATE \"a\" \"b\" {3+}\r\n\nA\n\r\nA2 NOOP\r\n",
                vec![bad(Some("U1"), TOO_MANY_ARGUMENTS), noop("A2")],
            ),
        ];
        run_table(&table, limits);
    }

    // ----- bounds and resync ------------------------------------------------

    #[test]
    fn oversize_input_is_refused_and_resynced() {
        let long_quoted = format!("A1 FIND \"{}\"\r\nA2 NOOP\r\n", "x".repeat(200));
        let long_tag = format!("{}\r\nA2 NOOP\r\n", "t".repeat(1000));
        let long_word = format!("A1 {} \"x\"\r\nA2 NOOP\r\n", "W".repeat(100));
        let nonsync_big = format!(
            "A1 FIND {{100+}}\r\n{}\r\nA2 NOOP\r\n",
            "B1 NOOP\r\n".repeat(11) + "x"
        );
        let nonsync_big_then_more = format!(
            "A1 RESERVE {{40+}}\r\n{} {{3+}}\r\n\nX\n\r\nA2 NOOP\r\n",
            "\n".repeat(40)
        );
        let sum_too_big = format!(
            "A1 RESERVE {{20+}}\r\n{} {{20+}}\r\n{}\r\nA2 NOOP\r\n",
            "a".repeat(20),
            "B1 NOOP\r\n\r\n\r\n\r\n\r\n\r\nx"
        );
        let sum_too_big_sync = format!(
            "A1 RESERVE {{20+}}\r\n{} {{20}}\r\nA2 NOOP\r\n",
            "a".repeat(20)
        );
        let exactly_max_literal = format!("A1 FIND {{32+}}\r\n{}\r\nA2 NOOP\r\n", "n".repeat(32));
        let exactly_max_line = format!("A1 FIND \"{}\"\r\nA2 NOOP\r\n", "n".repeat(64 - 12));
        let one_over_max_line = format!("A1 FIND \"{}\"\r\nA2 NOOP\r\n", "n".repeat(64 - 11));
        let table: Vec<(&[u8], Vec<Frame>)> = vec![
            (long_quoted.as_bytes(), vec![bad(Some("A1"), LINE_TOO_LONG), noop("A2")]),
            (long_tag.as_bytes(), vec![bad(None, LINE_TOO_LONG), noop("A2")]),
            (long_word.as_bytes(), vec![bad(Some("A1"), LINE_TOO_LONG), noop("A2")]),
            // Synchronizing: refused at once, no go-ahead, the client sends no payload.
            (
                b"A1 FIND {100}\r\nA2 NOOP\r\n",
                vec![bad(Some("A1"), LITERAL_TOO_LARGE), noop("A2")],
            ),
            (
                b"A1 FIND {33}\nA2 NOOP\r\n",
                vec![bad(Some("A1"), LITERAL_TOO_LARGE), noop("A2")],
            ),
            // Non-synchronizing: the payload comes anyway and is counted away.
            (nonsync_big.as_bytes(), vec![bad(Some("A1"), LITERAL_TOO_LARGE), noop("A2")]),
            (
                nonsync_big_then_more.as_bytes(),
                vec![bad(Some("A1"), LITERAL_TOO_LARGE), noop("A2")],
            ),
            (sum_too_big.as_bytes(), vec![bad(Some("A1"), LITERAL_TOO_LARGE), noop("A2")]),
            (
                sum_too_big_sync.as_bytes(),
                vec![bad(Some("A1"), LITERAL_TOO_LARGE), noop("A2")],
            ),
            (
                exactly_max_literal.as_bytes(),
                vec![req("A1", Command::Find { name: "n".repeat(32) }), noop("A2")],
            ),
            (
                exactly_max_line.as_bytes(),
                vec![req("A1", Command::Find { name: "n".repeat(52) }), noop("A2")],
            ),
            (one_over_max_line.as_bytes(), vec![bad(Some("A1"), LINE_TOO_LONG), noop("A2")]),
            // Sizes far over the limit are not read through: the answer
            // comes as soon as the size is known, then the connection closes.
            (
                b"A1 FIND {99999999999999999999+}\r\nA2 NOOP\r\n",
                vec![fatal(Some("A1"), LITERAL_TOO_LARGE)],
            ),
            (
                b"A1 FIND {99999999999999999999}\r\nA2 NOOP\r\n",
                vec![fatal(Some("A1"), LITERAL_TOO_LARGE)],
            ),
            // On a line already refused, its own answer.
            (
                b"A1 FROB {99999999999999999999+}\r\nA2 NOOP\r\n",
                vec![fatal(Some("A1"), UNRECOGNIZED_COMMAND)],
            ),
            // Literal in a line being skipped, even across the length limit.
            (
                b"A1 FIND \"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\" {5+}\r\n\n\n\n\n\n\r\nA2 NOOP\r\n",
                vec![bad(Some("A1"), LINE_TOO_LONG), noop("A2")],
            ),
        ];
        run_table(&table, small());
    }

    #[test]
    fn line_limit_inside_a_literal_header_still_skips_the_literal() {
        // Put the limit at every position of a line that ends in {6+}.
        let line = b"A1 RESERVE \"abcdefgh\" {6+}\r\nB1 NO\r\nA2 NOOP\r\n";
        let header_end = 28; // after "{6+}\r\n"
                             // From 9 on, "A2 NOOP\r\n" itself fits.
        for max_line in 9..header_end {
            let limits = Limits {
                max_line,
                ..small()
            };
            let frames = decode_all(line, limits);
            assert_eq!(
                frames,
                vec![bad(Some("A1"), LINE_TOO_LONG), noop("A2")],
                "max_line {max_line}"
            );
        }
    }

    #[test]
    fn endless_line_is_discarded_as_it_arrives() {
        let limits = small();
        let mut dec = RequestDecoder::new(limits);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"A1 FIND \"");
        for _ in 0..10_000 {
            buf.extend_from_slice(b"xxxxxxxxxxxxxxxx");
            assert_eq!(dec.decode(&mut buf), None);
            assert!(buf.is_empty());
            assert!(dec.buffered_len() <= limits.max_line);
        }
        buf.extend_from_slice(b"\"\r\nA2 NOOP\r\n");
        assert_eq!(dec.decode(&mut buf), Some(bad(Some("A1"), LINE_TOO_LONG)));
        assert_eq!(dec.decode(&mut buf), Some(noop("A2")));
        assert_eq!(dec.decode(&mut buf), None);
    }

    #[test]
    fn oversize_nonsync_literal_is_answered_at_once_then_counted_not_kept() {
        let limits = small(); // 32-byte literals; 16 x 32 = 512 is skipped
        let mut dec = RequestDecoder::new(limits);
        // The answer comes with the header, before any payload byte.
        let mut buf = BytesMut::from(&b"A1 FIND {512+}\r\n"[..]);
        assert_eq!(
            dec.decode(&mut buf),
            Some(bad(Some("A1"), LITERAL_TOO_LARGE))
        );
        assert!(buf.is_empty());
        for _ in 0..64 {
            // Payload that looks like commands is not taken for them.
            buf.extend_from_slice(b"B1 NOOP\n");
            assert_eq!(dec.decode(&mut buf), None);
            assert!(buf.is_empty());
            assert_eq!(dec.buffered_len(), 0);
        }
        // The rest of the line is skipped without a second answer.
        buf.extend_from_slice(b" \"rest\"\r\nA2 NOOP\r\n");
        assert_eq!(dec.decode(&mut buf), Some(noop("A2")));
        assert_eq!(dec.decode(&mut buf), None);
    }

    #[test]
    fn literal_far_over_the_limit_is_fatal_before_its_header_ends() {
        let limits = small();
        for (header, expected) in [
            // 513 > 16 x 32: fatal as soon as the third digit is read.
            (&b"A1 FIND {513"[..], fatal(Some("A1"), LITERAL_TOO_LARGE)),
            (
                b"A1 FIND {1073741824+}",
                fatal(Some("A1"), LITERAL_TOO_LARGE),
            ),
            (
                b"A1 FIND {1073741824}",
                fatal(Some("A1"), LITERAL_TOO_LARGE),
            ),
            (
                b"A1 RESERVE {3+}\r\nabc {600+}",
                fatal(Some("A1"), LITERAL_TOO_LARGE),
            ),
            // Also inside a line that is being skipped for another reason.
            (b"A1 FROB {600+}", fatal(Some("A1"), UNRECOGNIZED_COMMAND)),
            // Synchronizing, within 16x: refused at once, connection kept.
            (b"A1 FIND {512}\r\n", bad(Some("A1"), LITERAL_TOO_LARGE)),
        ] {
            let mut dec = RequestDecoder::new(limits);
            let mut buf = BytesMut::from(header);
            assert_eq!(
                dec.decode(&mut buf),
                Some(expected),
                "{:?}",
                String::from_utf8_lossy(header)
            );
        }
        // With the default limit (64 KiB), 1 MiB is fatal, 1 MiB - 1 B not.
        let mut dec = RequestDecoder::new(Limits::default());
        let mut buf = BytesMut::from(&b"A1 FIND {1048577+}\r\n"[..]);
        assert!(matches!(dec.decode(&mut buf), Some(Frame::Fatal { .. })));
        let mut dec = RequestDecoder::new(Limits::default());
        let mut buf = BytesMut::from(&b"A1 FIND {1048576+}\r\n"[..]);
        assert!(matches!(dec.decode(&mut buf), Some(Frame::Bad { .. })));
    }

    // ----- raw SASL lines ----------------------------------------------------

    #[test]
    fn sasl_lines() {
        let limits = small();
        let input = format!(
            "dGVzdA==\r\n*\n\r\n{}\r\nYWJj\r\n{}\r\n",
            "L".repeat(200),
            "M".repeat(64)
        );
        let expected: Vec<Result<Vec<u8>, LineTooLong>> = vec![
            Ok(b"dGVzdA==".to_vec()),
            Ok(b"*".to_vec()),
            Ok(vec![]),
            Err(LineTooLong),
            Ok(b"YWJj".to_vec()),
            Ok(vec![b'M'; 64]),
        ];
        for chunk in [1, 2, 3, 7, 64, input.len()] {
            let mut dec = RequestDecoder::new(limits);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in input.as_bytes().chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(line) = dec.decode_line(&mut buf) {
                    got.push(line);
                }
                assert!(buf.is_empty());
                assert!(dec.buffered_len() <= limits.max_line + 1);
            }
            assert_eq!(got, expected, "chunk {chunk}");
        }
    }

    #[test]
    fn sasl_line_then_commands() {
        let mut dec = RequestDecoder::new(Limits::default());
        let mut buf =
            BytesMut::from(&b"A1 AUTHENTICATE \"SCRAM-SHA-256\"\r\nbiwsbj1h\r\nA2 NOOP\r\n"[..]);
        assert!(matches!(dec.decode(&mut buf), Some(Frame::Request(_))));
        assert_eq!(dec.decode_line(&mut buf), Some(Ok(b"biwsbj1h".to_vec())));
        assert_eq!(dec.decode(&mut buf), Some(noop("A2")));
    }

    // ----- encoders ---------------------------------------------------------

    #[test]
    fn server_encoders() {
        let mut out = Vec::new();
        write_status(&mut out, Some("X1"), Status::Ok, "done");
        write_status(&mut out, None, Status::Bad, "Need command");
        write_status(&mut out, Some("X2"), Status::No, "a \"q\" \\ b\r\nc");
        write_bye(&mut out, "idle for too long");
        write_go_ahead(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "X1 OK \"done\"\r\n* BAD \"Need command\"\r\nX2 NO \"a \\\"q\\\" \\\\ b  c\"\r\n* BYE \"idle for too long\"\r\n+ go ahead\r\n"
        );
    }

    #[test]
    fn data_lines_match_cyrus() {
        let mut out = Vec::new();
        write_mailbox(
            &mut out,
            "X14",
            "user.bob",
            "be1!default",
            "bob\tlrswipkxtecdan\tadmin\tlrswipkxtecdan\t",
        );
        write_reserve(&mut out, "X10", "user.bob", "be1!default");
        write_delete(&mut out, "U1", "user.frank");
        write_mailbox(&mut out, "X3", "", "", "");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "X14 MAILBOX {8+}\r\nuser.bob {11+}\r\nbe1!default {40+}\r\nbob\tlrswipkxtecdan\tadmin\tlrswipkxtecdan\t\r\n\
             X10 RESERVE {8+}\r\nuser.bob {11+}\r\nbe1!default\r\n\
             U1 DELETE {10+}\r\nuser.frank\r\n\
             X3 MAILBOX {0+}\r\n {0+}\r\n {0+}\r\n\r\n"
        );
    }

    #[test]
    fn greeting_in_cyrus_order() {
        let mut g = Greeting {
            mechanisms: vec![s("SCRAM-SHA-256"), s("PLAIN")],
            starttls: true,
            partial_update: true,
            server_name: s("mupdate.example"),
            implementation: s("Corvid"),
            version: s("0.1.0"),
            role: s("(master)"),
        };
        let mut out = Vec::new();
        write_greeting(&mut out, &g);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "* AUTH \"SCRAM-SHA-256\" \"PLAIN\"\r\n* STARTTLS\r\n* PARTIAL-UPDATE\r\n\
             * OK MUPDATE \"mupdate.example\" \"Corvid\" \"0.1.0\" \"(master)\"\r\n"
        );
        g.mechanisms.clear();
        g.starttls = false;
        g.partial_update = false;
        g.role = s("mupdate://master.example");
        let mut out = Vec::new();
        write_greeting(&mut out, &g);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "* AUTH\r\n* OK MUPDATE \"mupdate.example\" \"Corvid\" \"0.1.0\" \"mupdate://master.example\"\r\n"
        );
    }

    #[test]
    fn sasl_challenges_are_bare_base64() {
        let mut out = Vec::new();
        write_sasl_challenge(&mut out, b"");
        write_sasl_challenge(&mut out, b"test");
        write_sasl_challenge(&mut out, b"\x00\xff\x10");
        assert_eq!(out, b"\r\ndGVzdA==\r\nAP8Q\r\n");
    }

    #[test]
    fn requests_are_written_like_cyrus() {
        let mut out = Vec::new();
        write_request(
            &mut out,
            "X0",
            &Command::Reserve {
                name: s("user.bob"),
                location: s("be1!default"),
            },
        );
        write_request(
            &mut out,
            "A01",
            &Command::Authenticate {
                mechanism: s("PLAIN"),
                initial_response: Some(b"AGFkbWluAHNlY3JldA==".to_vec()),
            },
        );
        write_request(&mut out, "L1", &Command::List { prefix: None });
        write_request(&mut out, "Q01", &Command::Logout);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "X0 RESERVE {8+}\r\nuser.bob {11+}\r\nbe1!default\r\n\
             A01 AUTHENTICATE \"PLAIN\" {20+}\r\nAGFkbWluAHNlY3JldA==\r\n\
             L1 LIST\r\nQ01 LOGOUT\r\n"
        );
    }

    fn all_commands() -> Vec<Command> {
        let odd = s("we\"ird\\ {5+}\r\n\tnäme\n");
        vec![
            Command::Authenticate {
                mechanism: s("PLAIN"),
                initial_response: None,
            },
            Command::Authenticate {
                mechanism: s("SCRAM-SHA-256"),
                initial_response: Some(b"biwsbj1hZG1pbixyPXh5eg==".to_vec()),
            },
            Command::Authenticate {
                mechanism: s("we\"ird"),
                initial_response: Some(vec![]),
            },
            Command::Starttls,
            Command::Compress {
                mechanism: s("DEFLATE"),
            },
            Command::Reserve {
                name: s("user.kate.Sent"),
                location: s("be1!default"),
            },
            Command::Reserve {
                name: odd.clone(),
                location: s("be1!"),
            },
            Command::Activate {
                name: s("example.com!user.fred"),
                location: s("localhost:9143!default"),
                acl: s("fred\tlrswipkxtecdan\tanyone\tlrs\t"),
            },
            Command::Activate {
                name: s(""),
                location: s(""),
                acl: s(""),
            },
            Command::Deactivate {
                name: s("user^kate"),
                location: odd.clone(),
            },
            Command::Delete {
                name: s("DELETED.user.kate.Sent.6B02C567"),
            },
            Command::Find { name: odd.clone() },
            Command::List { prefix: None },
            Command::List {
                prefix: Some(s("be1!")),
            },
            Command::List {
                prefix: Some(s("")),
            },
            Command::Update { servers: vec![] },
            Command::Update {
                servers: vec![s("be1"), odd],
            },
            Command::Noop,
            Command::Logout,
        ]
    }

    #[test]
    fn request_round_trip() {
        let mut out = Vec::new();
        let mut expected = Vec::new();
        for (i, command) in all_commands().into_iter().enumerate() {
            let tag = format!("X{i}");
            write_request(&mut out, &tag, &command);
            expected.push(req(&tag, command));
        }
        assert_eq!(decode_all(&out, Limits::default()), expected);
    }

    #[test]
    fn command_names() {
        let names: Vec<_> = all_commands().iter().map(Command::name).collect();
        assert_eq!(names[0], "AUTHENTICATE");
        assert_eq!(names[5], "RESERVE");
        assert!(
            names.contains(&"UPDATE") && names.contains(&"LOGOUT") && names.contains(&"STARTTLS")
        );
        for command in all_commands() {
            let mut out = Vec::new();
            write_request(&mut out, "T", &command);
            assert!(out.starts_with(format!("T {}", command.name()).as_bytes()));
        }
        // Every command word has one place, so per-command arrays cover all.
        let ordinals: std::collections::BTreeSet<_> =
            all_commands().iter().map(Command::ordinal).collect();
        assert_eq!(
            ordinals.into_iter().collect::<Vec<_>>(),
            (0..Command::NAMES.len()).collect::<Vec<_>>()
        );
    }

    // ----- client side ------------------------------------------------------

    /// Lines decoded, and bytes left waiting for the rest of a line.
    fn feed_responses(
        input: &[u8],
        limits: Limits,
        chunk: usize,
    ) -> Result<(Vec<ServerLine>, usize), DecodeError> {
        let mut dec = ResponseDecoder::new(limits);
        let mut buf = BytesMut::new();
        let mut lines = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            while let Some(line) = dec.decode(&mut buf)? {
                lines.push(line);
            }
        }
        Ok((lines, buf.len()))
    }

    /// Decodes complete lines whole and in chunks; all feeds must agree.
    fn responses_all(input: &[u8], limits: Limits) -> Result<Vec<ServerLine>, DecodeError> {
        let whole = feed_responses(input, limits, input.len()).map(|(lines, left)| {
            assert_eq!(
                left,
                0,
                "incomplete line in {:?}",
                String::from_utf8_lossy(input)
            );
            lines
        });
        for chunk in [1, 2, 3, 7, 64] {
            let chunked = feed_responses(input, limits, chunk).map(|(lines, _)| lines);
            assert_eq!(chunked, whole, "chunks of {chunk}");
        }
        whole
    }

    #[test]
    fn server_output_round_trips() {
        let odd = "we\"ird\\ {5+}\r\n\tnäme\n";
        let mut out = Vec::new();
        write_greeting(
            &mut out,
            &Greeting {
                mechanisms: vec![s("SCRAM-SHA-256"), s("PLAIN")],
                starttls: true,
                partial_update: true,
                server_name: s("m1"),
                implementation: s("Corvid"),
                version: s("0.1.0"),
                role: s("(master)"),
            },
        );
        write_mailbox(&mut out, "X14", "user.bob", "be1!default", "bob\tlrs\t");
        write_mailbox(&mut out, "X15", odd, "", "");
        write_reserve(&mut out, "X10", "user.bob", odd);
        write_delete(&mut out, "U1", "user.frank");
        write_go_ahead(&mut out);
        write_status(&mut out, Some("X2"), Status::No, "a \"q\" \\ b");
        write_status(&mut out, Some("X3"), Status::Ok, "");
        write_status(&mut out, None, Status::Bad, "Need command");
        write_sasl_challenge(&mut out, b"r=abc,s=c2FsdA==,i=4096");
        write_sasl_challenge(&mut out, b"");
        write_bye(&mut out, "idle for too long");
        let expected = vec![
            ServerLine::Capability {
                name: s("AUTH"),
                args: vec![s("SCRAM-SHA-256"), s("PLAIN")],
            },
            ServerLine::Capability {
                name: s("STARTTLS"),
                args: vec![],
            },
            ServerLine::Capability {
                name: s("PARTIAL-UPDATE"),
                args: vec![],
            },
            ServerLine::Greeting {
                args: vec![s("m1"), s("Corvid"), s("0.1.0"), s("(master)")],
            },
            ServerLine::Mailbox {
                tag: s("X14"),
                name: s("user.bob"),
                location: s("be1!default"),
                acl: s("bob\tlrs\t"),
            },
            ServerLine::Mailbox {
                tag: s("X15"),
                name: s(odd),
                location: s(""),
                acl: s(""),
            },
            ServerLine::Reserve {
                tag: s("X10"),
                name: s("user.bob"),
                location: s(odd),
            },
            ServerLine::Delete {
                tag: s("U1"),
                name: s("user.frank"),
            },
            ServerLine::GoAhead,
            ServerLine::Status {
                tag: s("X2"),
                status: Status::No,
                text: s("a \"q\" \\ b"),
            },
            ServerLine::Status {
                tag: s("X3"),
                status: Status::Ok,
                text: s(""),
            },
            ServerLine::UntaggedBad(s("Need command")),
            ServerLine::Other(b"cj1hYmMscz1jMkZzZEE9PSxpPTQwOTY=".to_vec()),
            ServerLine::Other(vec![]),
            ServerLine::Bye(s("idle for too long")),
        ];
        assert_eq!(responses_all(&out, Limits::default()), Ok(expected));
    }

    #[test]
    fn cyrus_server_lines() {
        let input: &[u8] = b"* AUTH PLAIN\r\n\
            * COMPRESS \"DEFLATE\"\r\n\
            * OK MUPDATE \"cyrus\" \"Cyrus IMAP\" \"3.6.1\" \"(master)\"\r\n\
            S1 BAD Can't Starttls after authentication\r\n\
            C1 NO Unknown COMPRESS algorithm: X\n\
            x1 ok \"Search completed\"\r\n\
            X2 MAILBOX {3}\r\na b {1}\r\nc {0}\r\n\r\n\
            * NO something\r\n\
            X3 FROB 1 2\r\n\
            +\r\n";
        let expected = vec![
            ServerLine::Capability {
                name: s("AUTH"),
                args: vec![s("PLAIN")],
            },
            ServerLine::Capability {
                name: s("COMPRESS"),
                args: vec![s("DEFLATE")],
            },
            ServerLine::Greeting {
                args: vec![s("cyrus"), s("Cyrus IMAP"), s("3.6.1"), s("(master)")],
            },
            ServerLine::Status {
                tag: s("S1"),
                status: Status::Bad,
                text: s("Can't Starttls after authentication"),
            },
            ServerLine::Status {
                tag: s("C1"),
                status: Status::No,
                text: s("Unknown COMPRESS algorithm: X"),
            },
            ServerLine::Status {
                tag: s("x1"),
                status: Status::Ok,
                text: s("Search completed"),
            },
            ServerLine::Mailbox {
                tag: s("X2"),
                name: s("a b"),
                location: s("c"),
                acl: s(""),
            },
            ServerLine::Other(b"* NO something".to_vec()),
            ServerLine::Other(b"X3 FROB 1 2".to_vec()),
            ServerLine::GoAhead,
        ];
        assert_eq!(responses_all(input, Limits::default()), Ok(expected));
    }

    #[test]
    fn response_errors() {
        let limits = small();
        let long = format!("X1 OK \"{}\"\r\n", "x".repeat(100));
        assert_eq!(
            responses_all(long.as_bytes(), limits),
            Err(DecodeError::LineTooLong)
        );
        let endless = "x".repeat(100);
        assert_eq!(
            responses_all(endless.as_bytes(), limits),
            Err(DecodeError::LineTooLong)
        );
        assert_eq!(
            responses_all(b"X1 MAILBOX {33+}\r\n", limits),
            Err(DecodeError::LiteralTooLarge)
        );
        assert_eq!(
            responses_all(b"X1 MAILBOX {99999999999+}\r\n", limits),
            Err(DecodeError::LiteralTooLarge)
        );
        assert_eq!(
            responses_all(
                b"X1 MAILBOX {20+}\r\naaaaaaaaaaaaaaaaaaaa {20+}\r\n",
                limits
            ),
            Err(DecodeError::LiteralTooLarge)
        );
        assert!(matches!(
            responses_all(b"X1 MAILBOX \"a\" \"b\"\r\n", limits),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            responses_all(b"X1 DELETE \"a\r\n", limits),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            responses_all(b"* AUTH \"a\"\rb\r\n", limits),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn partial_literal_waits() {
        let mut dec = ResponseDecoder::new(Limits::default());
        let mut buf = BytesMut::from(&b"U1 DELETE {10+}\r\nuser."[..]);
        assert_eq!(dec.decode(&mut buf), Ok(None));
        assert_eq!(dec.decode(&mut buf), Ok(None));
        buf.extend_from_slice(b"frank\r\nU1 OK \"x\"\r\n");
        assert_eq!(
            dec.decode(&mut buf),
            Ok(Some(ServerLine::Delete {
                tag: s("U1"),
                name: s("user.frank"),
            }))
        );
        assert!(matches!(
            dec.decode(&mut buf),
            Ok(Some(ServerLine::Status { .. }))
        ));
        assert_eq!(dec.decode(&mut buf), Ok(None));
    }

    // ----- fuzz-ish ---------------------------------------------------------

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    const PIECES: &[&[u8]] = &[
        b"A1",
        b" ",
        b" ",
        b"NOOP",
        b"FIND",
        b"RESERVE",
        b"UPDATE",
        b"AUTHENTICATE",
        b"\r\n",
        b"\n",
        b"\r",
        b"\"",
        b"\\",
        b"{",
        b"}",
        b"+",
        b"{5+}\r\n",
        b"{3}\r\n",
        b"{40+}\r\n",
        b"{99999999999}",
        b"0",
        b"7",
        b"(",
        b")",
        b"\0",
        b"\xff",
        b"x",
        b"*",
        b"\t",
        b"\"be1\"",
    ];

    fn random_input(rng: &mut Rng) -> Vec<u8> {
        let mut input = Vec::new();
        for _ in 0..rng.below(40) {
            if rng.below(4) == 0 {
                input.push(rng.next() as u8);
            } else {
                input.extend_from_slice(PIECES[rng.below(PIECES.len())]);
            }
        }
        input
    }

    #[test]
    fn fuzz_requests() {
        let mut rng = Rng(0x5eed_c0de_1234_5678);
        let limits = Limits {
            max_line: 48,
            max_literal: 24,
            max_args: 4,
        };
        for _ in 0..20_000 {
            let input = random_input(&mut rng);
            let whole = feed(&input, limits, input.len().max(1));
            let chunk = 1 + rng.below(8);
            assert_eq!(
                feed(&input, limits, chunk),
                whole,
                "{:?}",
                String::from_utf8_lossy(&input)
            );
            for frame in &whole {
                if let Frame::Bad { reason, .. } = frame {
                    assert!(!reason.is_empty());
                }
            }
        }
    }

    #[test]
    fn fuzz_mutated_requests() {
        let mut rng = Rng(42);
        let mut valid = Vec::new();
        for (i, command) in all_commands().into_iter().enumerate() {
            write_request(&mut valid, &format!("X{i}"), &command);
        }
        let limits = Limits::default();
        for _ in 0..3_000 {
            let mut input = valid.clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(input.len());
                match rng.below(3) {
                    0 => input[at] = rng.next() as u8,
                    1 => {
                        input.remove(at);
                    }
                    _ => input.insert(at, PIECES[rng.below(PIECES.len())][0]),
                }
            }
            let whole = feed(&input, limits, input.len());
            assert_eq!(feed(&input, limits, 1 + rng.below(64)), whole);
        }
    }

    #[test]
    fn fuzz_responses() {
        let mut rng = Rng(7);
        let limits = small();
        for _ in 0..20_000 {
            let input = random_input(&mut rng);
            let whole = feed_responses(&input, limits, input.len().max(1));
            let chunk = 1 + rng.below(8);
            let chunked = feed_responses(&input, limits, chunk);
            // An error may surface earlier in small chunks, never a different result otherwise.
            if whole.is_ok() {
                assert_eq!(chunked, whole, "{:?}", String::from_utf8_lossy(&input));
            }
        }
    }
}
