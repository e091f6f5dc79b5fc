//! `corvidctl imap-bench`: an IMAP load generator for corvid-proxy, a Cyrus
//! frontend or a Cyrus backend.
//!
//! The client is deliberately plain: one command in flight per connection
//! (send a tagged command, read until its tagged answer, skip literals by
//! their `{n}` size), no pipelining, every run bounded by `--count` and
//! `--duration`. With `--watch-pid` (the server under test) and
//! `--watch-backend-pid` it samples the CPU time (utime+stime, plus the
//! reaped children's cutime+cstime) and memory of each process tree from
//! /proc before and after, so a forking server (Cyrus) is measured with its
//! children.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::bench::{Percentiles, ReportArgs};
use crate::probe;

mod mail;

/// What each connection does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Connect, LOGIN, SELECT, FETCH 1:10 (FLAGS), LOGOUT: one operation
    /// per session.
    Sessions,
    /// Logged in with the mailbox selected: FETCH 1:* BODY.PEEK[] again and
    /// again (bytes: the literals received).
    FetchBodies,
    /// Logged in: APPEND a message of --size bytes again and again.
    Append,
    /// Open --connections sessions (see --idle-mode), hold them --hold
    /// seconds, then check each still answers.
    Idle,
    /// LMTP deliveries of --size bytes to the --rcpt recipients: LHLO once
    /// per connection, then MAIL, RCPTs, DATA again and again; one
    /// operation is one delivery (one transaction per target).
    Lmtp,
    /// POP3 sessions: connect, USER/PASS, STAT, RETR 1, QUIT; connection i
    /// logs in as user i (Cyrus locks the maildrop).
    Pop3,
}

/// How far an idle session goes before it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdleMode {
    /// LOGIN only (a proxy needs no backend connection yet).
    Login,
    /// LOGIN and SELECT (a proxy holds a backend connection).
    Select,
    /// LOGIN, SELECT and IDLE (until the hold ends, then DONE).
    Idle,
}

/// Options of `corvidctl imap-bench`.
#[derive(Debug, Args)]
pub struct ImapBenchArgs {
    /// Server host:port (lmtp: also unix:PATH).
    #[arg(long, short = 's')]
    server: String,
    /// User (when neither --user-prefix nor --users-file is given).
    #[arg(long, short = 'u')]
    user: Option<String>,
    /// Password of every user (unless --users-file gives one per user).
    #[arg(long, short = 'w')]
    password: Option<String>,
    /// Users are PREFIX0 .. PREFIX{--users - 1}; connection (or session) k
    /// logs in as PREFIX{k mod --users}.
    #[arg(long, conflicts_with = "users_file")]
    user_prefix: Option<String>,
    /// How many --user-prefix users there are.
    #[arg(long, default_value_t = 1)]
    users: usize,
    /// File with one "user [password]" per line, used round robin.
    #[arg(long)]
    users_file: Option<PathBuf>,
    /// The operation to repeat.
    #[arg(long, value_enum, default_value = "sessions")]
    workload: Workload,
    /// Concurrent connections (for idle: sessions to hold).
    #[arg(long, short = 'C', default_value_t = 8)]
    connections: usize,
    /// Operations in all (default: until --duration).
    #[arg(long, short = 'n')]
    count: Option<u64>,
    /// Stop after this many seconds (for idle: the time allowed to open
    /// the sessions).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Mailbox to SELECT (sessions, fetch-bodies, idle) or APPEND to.
    #[arg(long, default_value = "INBOX")]
    mailbox: String,
    /// Message size for append, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    size: usize,
    /// idle: how far each session goes before it waits.
    #[arg(long, value_enum, default_value = "select")]
    idle_mode: IdleMode,
    /// idle: seconds to hold the open sessions.
    #[arg(long, default_value_t = 30)]
    hold: u64,
    /// idle: sessions being opened at the same time.
    #[arg(long, default_value_t = 64)]
    ramp: usize,
    /// Seconds any one command may take.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// lmtp: a recipient of every delivery, ADDR (sent to --server) or
    /// TARGET=ADDR (TARGET is host:port or unix:PATH); "{}" in ADDR becomes
    /// the connection's user number (connection i: i mod --users). One
    /// transaction per target, the targets in parallel.
    #[arg(long)]
    rcpt: Vec<String>,
    /// lmtp: AUTH PLAIN as USER:PASSWORD (empty authorization id) after
    /// LHLO, as a frontend does to a backend's TCP lmtpd.
    #[arg(long)]
    lmtp_auth: Option<String>,
    /// Metrics address (host:port) of a Corvid master: the sum of its
    /// corvid_mupdate_commands_total is read before and after the run
    /// (repeat for every master).
    #[arg(long)]
    master_metrics: Vec<String>,
    /// Process (tree) of the server under test: CPU and memory from /proc
    /// (repeat to sum several trees).
    #[arg(long)]
    watch_pid: Vec<i32>,
    /// Process (tree) of the backend behind it, also sampled (repeat to sum
    /// several).
    #[arg(long)]
    watch_backend_pid: Vec<i32>,
    #[command(flatten)]
    report: ReportArgs,
}

/// One run's figures (one JSON line).
#[derive(Debug, Serialize)]
pub struct ImapBenchResult {
    pub label: String,
    pub server: String,
    pub workload: String,
    pub connections: usize,
    pub ops: u64,
    pub errors: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Message bytes moved (literals received by FETCH, sent by APPEND).
    pub bytes: u64,
    pub mb_per_sec: f64,
    /// CPU seconds of the watched server tree during the run (for idle:
    /// while opening the sessions).
    pub server_cpu_s: Option<f64>,
    pub server_cpu_ms_per_op: Option<f64>,
    pub backend_cpu_s: Option<f64>,
    pub backend_cpu_ms_per_op: Option<f64>,
    /// Processes in the watched server tree at the end.
    pub server_procs: Option<usize>,
    pub idle: Option<IdleFigures>,
    /// lmtp: recipients per delivery, targets (transactions) per delivery,
    /// message size, and recipient replies that were not 2xx.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipients: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transactions_per_op: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rcpt_errors: Option<u64>,
    /// MUPDATE commands the --master-metrics masters counted during the
    /// run, in all and per operation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master_commands: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master_commands_per_op: Option<f64>,
}

/// What the idle workload measures.
#[derive(Debug, Serialize)]
pub struct IdleFigures {
    pub mode: IdleMode,
    pub requested: usize,
    pub open: u64,
    pub alive_after_hold: u64,
    pub open_seconds: f64,
    pub hold_seconds: f64,
    /// The server tree's resident memory (sum of VmRSS) and proportional
    /// set size (sum of Pss, shared pages split) before and after opening.
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    pub pss_before_kib: Option<u64>,
    pub pss_after_kib: Option<u64>,
    pub rss_per_session_kib: Option<f64>,
    pub pss_per_session_kib: Option<f64>,
    /// CPU of the server tree during the hold, in % of one core.
    pub hold_cpu_percent: Option<f64>,
    pub backend_hold_cpu_percent: Option<f64>,
    pub backend_pss_per_session_kib: Option<f64>,
}

// ---------------------------------------------------------------- client

/// A bounded IMAP client: one command in flight (also `corvidctl check
/// --imap`'s admin LIST).
pub(crate) struct Imap {
    io: BufReader<TcpStream>,
    next_tag: u32,
    line: Vec<u8>,
    timeout: Duration,
}

/// A tagged answer and the message bytes received before it.
struct Answer {
    ok: bool,
    text: String,
    literal_bytes: u64,
}

/// Longest response line segment accepted (literals excluded).
const MAX_LINE: usize = 1 << 20;
/// Largest literal accepted.
const MAX_LITERAL: u64 = 1 << 30;
/// Largest literal kept (a mailbox name in a LIST response).
const MAX_KEPT: u64 = 64 << 10;
/// Most LIST responses accepted for one command.
const MAX_LISTED: usize = 10_000_000;

impl Imap {
    /// Connects and reads the greeting, each step within `timeout`.
    pub(crate) async fn connect(
        server: &str,
        buffer: usize,
        timeout: Duration,
    ) -> anyhow::Result<Imap> {
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(server))
            .await
            .context("connect timed out")?
            .with_context(|| format!("connecting to {server}"))?;
        tcp.set_nodelay(true).ok();
        let mut c = Imap {
            io: BufReader::with_capacity(buffer, tcp),
            next_tag: 0,
            line: Vec::new(),
            timeout,
        };
        let (first, _) = tokio::time::timeout(timeout, c.read_response(None))
            .await
            .context("no greeting in time")??;
        if !first.starts_with(b"* OK") {
            bail!("greeting: {}", String::from_utf8_lossy(&first).trim_end());
        }
        Ok(c)
    }

    /// Reads one response (a line and the literals it announces); returns
    /// its first line segment and the literal bytes skipped, or kept in
    /// `keep` (up to [`MAX_KEPT`] bytes) when given.
    async fn read_response(
        &mut self,
        mut keep: Option<&mut Vec<u8>>,
    ) -> anyhow::Result<(Vec<u8>, u64)> {
        let mut first: Option<Vec<u8>> = None;
        let mut literal_bytes = 0;
        loop {
            self.line.clear();
            let n = (&mut self.io)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut self.line)
                .await?;
            if n == 0 {
                bail!("server closed the connection");
            }
            if !self.line.ends_with(b"\n") {
                bail!("response line longer than {MAX_LINE} bytes");
            }
            let literal = literal_size(&self.line);
            if first.is_none() {
                first = Some(self.line.clone());
            }
            let Some(size) = literal else { break };
            if size > MAX_LITERAL {
                bail!("literal of {size} bytes");
            }
            let copied = match keep.as_deref_mut() {
                Some(kept) if kept.len() as u64 + size <= MAX_KEPT => {
                    (&mut self.io).take(size).read_to_end(kept).await? as u64
                }
                Some(_) => bail!("literal of {size} bytes where a mailbox name was expected"),
                None => {
                    tokio::io::copy(&mut (&mut self.io).take(size), &mut tokio::io::sink()).await?
                }
            };
            if copied != size {
                bail!("server closed the connection inside a literal");
            }
            literal_bytes += size;
        }
        Ok((first.unwrap_or_default(), literal_bytes))
    }

    fn tag(&mut self) -> String {
        self.next_tag += 1;
        format!("B{}", self.next_tag)
    }

    /// Reads responses until the one tagged `tag` (or, with `continuation`,
    /// a "+" continuation request, answered as Ok).
    async fn until_tagged(&mut self, tag: &str, continuation: bool) -> anyhow::Result<Answer> {
        let deadline = self.timeout;
        tokio::time::timeout(deadline, async {
            let mut literal_bytes = 0;
            loop {
                let (first, lits) = self.read_response(None).await?;
                literal_bytes += lits;
                if continuation && first.starts_with(b"+") {
                    return Ok(Answer {
                        ok: true,
                        text: String::from_utf8_lossy(&first).trim_end().to_owned(),
                        literal_bytes,
                    });
                }
                if first.len() > tag.len()
                    && first.starts_with(tag.as_bytes())
                    && first[tag.len()] == b' '
                {
                    let rest = &first[tag.len() + 1..];
                    return Ok(Answer {
                        ok: rest.starts_with(b"OK"),
                        text: String::from_utf8_lossy(&first).trim_end().to_owned(),
                        literal_bytes,
                    });
                }
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("no answer to {tag} within {deadline:?}"))?
    }

    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.io.get_mut().write_all(bytes).await?;
        Ok(())
    }

    /// Sends `command` with a fresh tag and reads up to its answer.
    async fn command(&mut self, command: &str) -> anyhow::Result<Answer> {
        let tag = self.tag();
        self.send(format!("{tag} {command}\r\n").as_bytes()).await?;
        self.until_tagged(&tag, false).await
    }

    /// `command`, which must be answered OK.
    async fn ok(&mut self, command: &str) -> anyhow::Result<Answer> {
        let a = self.command(command).await?;
        if !a.ok {
            let verb = command.split(' ').next().unwrap_or(command);
            bail!("{verb}: {}", a.text);
        }
        Ok(a)
    }

    /// LIST "" `pattern`: the mailbox names, as the server sends them.
    pub(crate) async fn list(&mut self, pattern: &str) -> anyhow::Result<Vec<String>> {
        let tag = self.tag();
        self.send(format!("{tag} LIST \"\" {}\r\n", quote(pattern)).as_bytes())
            .await?;
        let mut names = Vec::new();
        let mut literal = Vec::new();
        loop {
            literal.clear();
            let (first, _) =
                tokio::time::timeout(self.timeout, self.read_response(Some(&mut literal)))
                    .await
                    .context("LIST timed out")??;
            if first.starts_with(format!("{tag} ").as_bytes()) {
                if !first[tag.len() + 1..].starts_with(b"OK") {
                    bail!("LIST: {}", String::from_utf8_lossy(&first).trim_end());
                }
                return Ok(names);
            }
            if let Some(name) = list_name(&first, &literal) {
                if names.len() >= MAX_LISTED {
                    bail!("LIST: more than {MAX_LISTED} mailboxes");
                }
                names.push(name);
            }
        }
    }

    pub(crate) async fn login(&mut self, user: &str, password: &str) -> anyhow::Result<()> {
        self.ok(&format!("LOGIN {} {}", quote(user), quote(password)))
            .await
            .map(drop)
    }

    /// APPEND with a synchronizing literal.
    async fn append(&mut self, mailbox: &str, message: &[u8]) -> anyhow::Result<()> {
        let tag = self.tag();
        self.send(
            format!(
                "{tag} APPEND {} () {{{}}}\r\n",
                quote(mailbox),
                message.len()
            )
            .as_bytes(),
        )
        .await?;
        let a = self.until_tagged(&tag, true).await?;
        if !a.text.starts_with('+') {
            bail!("APPEND: {}", a.text);
        }
        self.send(message).await?;
        self.send(b"\r\n").await?;
        let a = self.until_tagged(&tag, false).await?;
        if !a.ok {
            bail!("APPEND: {}", a.text);
        }
        Ok(())
    }

    pub(crate) async fn logout(&mut self) -> anyhow::Result<()> {
        self.ok("LOGOUT").await.map(drop)
    }
}

/// The mailbox name of a `* LIST (flags) delimiter name` response: its
/// first line segment and, when the name is a literal, the literal's bytes.
fn list_name(first: &[u8], literal: &[u8]) -> Option<String> {
    let line = std::str::from_utf8(first)
        .ok()?
        .trim_end_matches(['\r', '\n']);
    let rest = line.strip_prefix("* LIST ")?;
    let rest = &rest[rest.find(')')? + 1..];
    let rest = rest.strip_prefix(' ')?;
    // The delimiter: a quoted character or NIL.
    let rest = if let Some(r) = rest.strip_prefix("NIL ") {
        r
    } else {
        let r = rest.strip_prefix('"')?;
        let r = r.strip_prefix('\\').unwrap_or(r);
        let mut chars = r.chars();
        chars.next()?;
        chars.as_str().strip_prefix("\" ")?
    };
    if rest.starts_with('{') {
        return String::from_utf8(literal.to_vec()).ok();
    }
    if let Some(q) = rest.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = q.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.push(chars.next()?),
                '"' => return Some(out),
                c => out.push(c),
            }
        }
        return None;
    }
    Some(rest.to_owned())
}

/// The size of the literal a response line segment ends with, if any.
fn literal_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let line = line.strip_suffix(b"}")?;
    let line = line.strip_suffix(b"+").unwrap_or(line);
    let open = line.iter().rposition(|&b| b == b'{')?;
    let digits = &line[open + 1..];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// An IMAP quoted string.
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    q
}

/// An RFC 5322 message of exactly `size` bytes (at least its headers).
fn message(size: usize) -> Vec<u8> {
    let mut m = b"From: bench <bench@example.org>\r\nTo: bench <bench@example.org>\r\n\
Subject: corvidctl imap-bench\r\nMessage-ID: <imap-bench@example.org>\r\n\
Date: Mon, 30 Nov 2026 00:00:00 +0000\r\n\r\n"
        .to_vec();
    let line = [b'x'; 76];
    while m.len() + 78 <= size {
        m.extend_from_slice(&line);
        m.extend_from_slice(b"\r\n");
    }
    if m.len() + 2 < size {
        let rest = size - m.len() - 2;
        m.extend(std::iter::repeat_n(b'y', rest));
        m.extend_from_slice(b"\r\n");
    }
    m
}

// ---------------------------------------------------------------- /proc

/// CPU and memory of a process tree.
#[derive(Debug, Clone, Copy, Default)]
struct TreeSample {
    /// utime+stime+cutime+cstime of every process in the tree, in ticks.
    ticks: u64,
    rss_kib: u64,
    pss_kib: u64,
    procs: usize,
}

fn status_kib(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Samples `root` and all its descendants.
fn sample_tree(root: i32) -> TreeSample {
    let mut procs: HashMap<i32, (i32, u64)> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let Ok(pid) = name.parse::<i32>() else {
                continue;
            };
            if let Some(t) = probe::proc_times(name) {
                procs.insert(pid, (t.ppid, t.user_ticks + t.sys_ticks));
            }
        }
    }
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (&pid, &(ppid, _)) in &procs {
        children.entry(ppid).or_default().push(pid);
    }
    let mut s = TreeSample::default();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        let Some(&(_, ticks)) = procs.get(&pid) else {
            continue;
        };
        s.ticks += ticks;
        s.rss_kib += status_kib(&format!("/proc/{pid}/status"), "VmRSS:");
        s.pss_kib += status_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss:");
        s.procs += 1;
        if let Some(c) = children.get(&pid) {
            todo.extend(c);
        }
    }
    s
}

struct Watch {
    server: Vec<i32>,
    backend: Vec<i32>,
}

/// The sum of the trees of `roots` (None when there are none).
fn sample_trees(roots: &[i32]) -> Option<TreeSample> {
    if roots.is_empty() {
        return None;
    }
    Some(
        roots
            .iter()
            .map(|&r| sample_tree(r))
            .fold(TreeSample::default(), |a, b| TreeSample {
                ticks: a.ticks + b.ticks,
                rss_kib: a.rss_kib + b.rss_kib,
                pss_kib: a.pss_kib + b.pss_kib,
                procs: a.procs + b.procs,
            }),
    )
}

impl Watch {
    fn sample(&self) -> (Option<TreeSample>, Option<TreeSample>) {
        (sample_trees(&self.server), sample_trees(&self.backend))
    }
}

fn cpu_s(a: Option<TreeSample>, b: Option<TreeSample>) -> Option<f64> {
    Some(b?.ticks.saturating_sub(a?.ticks) as f64 / probe::TICKS_PER_SEC)
}

// ---------------------------------------------------------------- runs

struct Users {
    list: Vec<(String, String)>,
}

impl Users {
    fn from_args(args: &ImapBenchArgs) -> anyhow::Result<Users> {
        let password = args.password.clone();
        let list = if let Some(path) = &args.users_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let mut list = Vec::new();
            for l in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let mut w = l.split_whitespace();
                let user = w.next().unwrap_or_default().to_owned();
                let pass = match w.next() {
                    Some(p) => p.to_owned(),
                    None => password
                        .clone()
                        .with_context(|| format!("no password for {user}: give --password"))?,
                };
                list.push((user, pass));
            }
            list
        } else if let Some(prefix) = &args.user_prefix {
            let p = password.context("give --password")?;
            (0..args.users.max(1))
                .map(|i| (format!("{prefix}{i}"), p.clone()))
                .collect()
        } else {
            let u = args
                .user
                .clone()
                .context("give --user, --user-prefix or --users-file")?;
            vec![(u, password.context("give --password")?)]
        };
        anyhow::ensure!(!list.is_empty(), "no users");
        Ok(Users { list })
    }

    fn get(&self, k: u64) -> (&str, &str) {
        let (u, p) = &self.list[(k % self.list.len() as u64) as usize];
        (u, p)
    }
}

struct Shared {
    args: ImapBenchArgs,
    users: Users,
    message: Vec<u8>,
    /// lmtp: the recipients by target.
    routes: Vec<mail::Route>,
    /// lmtp: part of every Message-ID, different in every run.
    nonce: String,
    next: AtomicU64,
    errors: AtomicU64,
    rcpt_errors: AtomicU64,
    bytes: AtomicU64,
    deadline: Instant,
    limit: u64,
}

impl Shared {
    fn claim(&self) -> Option<u64> {
        if Instant::now() >= self.deadline {
            return None;
        }
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        (k < self.limit).then_some(k)
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.args.timeout)
    }

    fn buffer(&self) -> usize {
        match self.args.workload {
            Workload::FetchBodies => 64 << 10,
            _ => 4 << 10,
        }
    }

    /// A logged-in connection (as user `k`), the mailbox selected if asked.
    async fn open(&self, k: u64, select: bool) -> anyhow::Result<Imap> {
        let mut c = Imap::connect(&self.args.server, self.buffer(), self.timeout()).await?;
        let (u, p) = self.users.get(k);
        c.login(u, p).await?;
        if select {
            c.ok(&format!("SELECT {}", quote(&self.args.mailbox)))
                .await?;
        }
        Ok(c)
    }
}

/// Runs the benchmark and prints its report.
pub async fn run(args: ImapBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.connections > 0, "--connections must be positive");
    let mail = matches!(args.workload, Workload::Lmtp | Workload::Pop3);
    let routes = mail::routes(&args.server, &args.rcpt);
    let users = if args.workload == Workload::Lmtp {
        anyhow::ensure!(!routes.is_empty(), "lmtp: give --rcpt");
        Users {
            list: vec![(String::new(), String::new())],
        }
    } else {
        Users::from_args(&args)?
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let shared = Arc::new(Shared {
        message: if matches!(args.workload, Workload::Append | Workload::Lmtp) {
            message(args.size)
        } else {
            Vec::new()
        },
        users,
        routes,
        nonce: format!("{}-{}", now.as_nanos(), std::process::id()),
        next: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        rcpt_errors: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        deadline: Instant::now() + Duration::from_secs(args.duration),
        limit: args.count.unwrap_or(u64::MAX),
        args,
    });
    // Check the credentials (and the mailbox) before starting the clock.
    if mail {
        mail::probe(&shared).await.context("first operation")?;
    } else {
        let mut c = shared
            .open(0, shared.args.workload != Workload::Append)
            .await
            .context("first session")?;
        c.logout().await.ok();
        drop(c);
    }
    let watch = Watch {
        server: shared.args.watch_pid.clone(),
        backend: shared.args.watch_backend_pid.clone(),
    };
    if shared.args.workload == Workload::Idle {
        return idle(shared, &watch).await;
    }
    let masters = &shared.args.master_metrics;
    let m0 = if masters.is_empty() {
        None
    } else {
        Some(mail::master_commands(masters).await?)
    };
    let (s0, b0) = watch.sample();
    // The deadline counts from here, not from before the first session.
    let shared = {
        let mut s = Arc::try_unwrap(shared).map_err(|_| anyhow::anyhow!("shared"))?;
        s.deadline = Instant::now() + Duration::from_secs(s.args.duration);
        Arc::new(s)
    };
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..shared.args.connections {
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            if mail {
                mail::worker(shared, i as u64).await
            } else {
                worker(shared, i as u64).await
            }
        }));
    }
    let mut latencies: Vec<u32> = Vec::new();
    for t in tasks {
        latencies.extend(t.await.context("worker panicked")?);
    }
    let seconds = started.elapsed().as_secs_f64();
    let (s1, b1) = watch.sample();
    let master_commands = match m0 {
        Some(m0) => Some(
            mail::master_commands(&shared.args.master_metrics)
                .await?
                .saturating_sub(m0),
        ),
        None => None,
    };
    let p = Percentiles::of(latencies);
    let bytes = shared.bytes.load(Ordering::Relaxed);
    let per_op = |cpu: Option<f64>| cpu.map(|c| c * 1000.0 / p.count.max(1) as f64);
    let server_cpu_s = cpu_s(s0, s1);
    let backend_cpu_s = cpu_s(b0, b1);
    let result = ImapBenchResult {
        label: label(&shared.args),
        server: shared.args.server.clone(),
        workload: workload_name(shared.args.workload),
        connections: shared.args.connections,
        ops: p.count,
        errors: shared.errors.load(Ordering::Relaxed),
        seconds,
        ops_per_sec: p.count as f64 / seconds,
        p50_ms: p.p50_ms,
        p99_ms: p.p99_ms,
        max_ms: p.max_ms,
        bytes,
        mb_per_sec: bytes as f64 / seconds / 1e6,
        server_cpu_s,
        server_cpu_ms_per_op: per_op(server_cpu_s),
        backend_cpu_s,
        backend_cpu_ms_per_op: per_op(backend_cpu_s),
        server_procs: s1.map(|s| s.procs),
        idle: None,
        recipients: (shared.args.workload == Workload::Lmtp)
            .then(|| shared.routes.iter().map(|r| r.rcpts.len()).sum()),
        transactions_per_op: (shared.args.workload == Workload::Lmtp)
            .then_some(shared.routes.len()),
        size: (shared.args.workload == Workload::Lmtp).then_some(shared.args.size),
        rcpt_errors: (shared.args.workload == Workload::Lmtp)
            .then(|| shared.rcpt_errors.load(Ordering::Relaxed)),
        master_commands,
        master_commands_per_op: master_commands.map(|m| m as f64 / p.count.max(1) as f64),
    };
    write_result(&result, shared.args.report.json.as_deref())
}

fn label(args: &ImapBenchArgs) -> String {
    args.report
        .label
        .clone()
        .unwrap_or_else(|| args.server.clone())
}

fn workload_name(w: Workload) -> String {
    w.to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_owned())
}

/// One connection's loop; returns the latencies of its successful operations.
async fn worker(shared: Arc<Shared>, i: u64) -> Vec<u32> {
    let mut latencies = Vec::new();
    let mut conn: Option<Imap> = None;
    let select = shared.args.workload == Workload::FetchBodies;
    while let Some(k) = shared.claim() {
        let started = Instant::now();
        let outcome: anyhow::Result<u64> = async {
            match shared.args.workload {
                Workload::Sessions => {
                    let mut c = shared.open(k, true).await?;
                    c.ok("FETCH 1:10 (FLAGS)").await?;
                    c.logout().await?;
                    Ok(0)
                }
                Workload::FetchBodies | Workload::Append => {
                    if conn.is_none() {
                        conn = Some(shared.open(i, select).await?);
                    }
                    let c = conn.as_mut().expect("just opened");
                    if select {
                        Ok(c.ok("FETCH 1:* BODY.PEEK[]").await?.literal_bytes)
                    } else {
                        c.append(&shared.args.mailbox, &shared.message).await?;
                        Ok(shared.message.len() as u64)
                    }
                }
                Workload::Idle | Workload::Lmtp | Workload::Pop3 => {
                    unreachable!("idle, lmtp and pop3 run apart")
                }
            }
        }
        .await;
        match outcome {
            Ok(bytes) => {
                shared.bytes.fetch_add(bytes, Ordering::Relaxed);
                latencies.push(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            }
            Err(e) => {
                if shared.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("imap-bench: {e:#}");
                }
                conn = None;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    if let Some(mut c) = conn {
        c.logout().await.ok();
    }
    latencies
}

/// The idle workload: open, sample, hold, sample, check, close.
async fn idle(shared: Arc<Shared>, watch: &Watch) -> anyhow::Result<()> {
    let args = &shared.args;
    let want = args.connections;
    let (s0, b0) = watch.sample();
    let started = Instant::now();
    let ramp = Arc::new(tokio::sync::Semaphore::new(args.ramp.max(1)));
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::channel::<bool>(want);
    let open_deadline = started + Duration::from_secs(args.duration);
    let mut tasks = Vec::with_capacity(want);
    for k in 0..want as u64 {
        let shared = shared.clone();
        let ramp = ramp.clone();
        let opened_tx = opened_tx.clone();
        let mut release = release_rx.clone();
        tasks.push(tokio::spawn(async move {
            let permit = ramp.acquire_owned().await;
            let mode = shared.args.idle_mode;
            let opening = async {
                let mut c = shared.open(k, mode != IdleMode::Login).await?;
                let mut tag = None;
                if mode == IdleMode::Idle {
                    let t = c.tag();
                    c.send(format!("{t} IDLE\r\n").as_bytes()).await?;
                    let a = c.until_tagged(&t, true).await?;
                    if !a.text.starts_with('+') {
                        bail!("IDLE: {}", a.text);
                    }
                    tag = Some(t);
                }
                anyhow::Ok((c, tag))
            };
            let opened = tokio::time::timeout_at(open_deadline.into(), opening).await;
            drop(permit);
            let (mut c, tag) = match opened {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => {
                    if shared.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("imap-bench: session {k}: {e:#}");
                    }
                    opened_tx.send(false).await.ok();
                    return false;
                }
                Err(_) => {
                    if shared.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!(
                            "imap-bench: session {k} not open after {} s (--duration)",
                            shared.args.duration
                        );
                    }
                    opened_tx.send(false).await.ok();
                    return false;
                }
            };
            opened_tx.send(true).await.ok();
            while !*release.borrow() {
                if release.changed().await.is_err() {
                    break;
                }
            }
            let alive = async {
                if let Some(t) = tag {
                    c.send(b"DONE\r\n").await?;
                    let a = c.until_tagged(&t, false).await?;
                    anyhow::ensure!(a.ok, "IDLE: {}", a.text);
                } else {
                    c.ok("NOOP").await?;
                }
                c.logout().await
            }
            .await;
            alive.is_ok()
        }));
    }
    drop(opened_tx);
    // Each session reports once, then waits (holding its sender) for the
    // release: count the reports rather than wait for the channel to close.
    let mut open = 0u64;
    for _ in 0..want {
        match opened_rx.recv().await {
            Some(ok) => open += u64::from(ok),
            None => break,
        }
    }
    let open_seconds = started.elapsed().as_secs_f64();
    println!(
        "imap-bench: {open} of {want} sessions open ({open_seconds:.1} s); holding {} s",
        args.hold
    );
    // Let the servers settle (freed opening buffers, forked children).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (s1, b1) = watch.sample();
    tokio::time::sleep(Duration::from_secs(args.hold)).await;
    let (s2, b2) = watch.sample();
    release_tx.send(true).ok();
    let mut alive = 0u64;
    for t in tasks {
        alive += u64::from(t.await.unwrap_or(false));
    }
    let hold_seconds = args.hold as f64;
    let per_session = |a: Option<u64>, b: Option<u64>| -> Option<f64> {
        Some((b? as f64 - a? as f64) / open.max(1) as f64)
    };
    let percent = |cpu: Option<f64>| cpu.map(|c| c * 100.0 / hold_seconds.max(1.0));
    let server_cpu_s = cpu_s(s0, s1);
    let backend_cpu_s = cpu_s(b0, b1);
    let per_op = |cpu: Option<f64>| cpu.map(|c| c * 1000.0 / open.max(1) as f64);
    let figures = IdleFigures {
        mode: args.idle_mode,
        requested: want,
        open,
        alive_after_hold: alive,
        open_seconds,
        hold_seconds,
        rss_before_kib: s0.map(|s| s.rss_kib),
        rss_after_kib: s1.map(|s| s.rss_kib),
        pss_before_kib: s0.map(|s| s.pss_kib),
        pss_after_kib: s1.map(|s| s.pss_kib),
        rss_per_session_kib: per_session(s0.map(|s| s.rss_kib), s1.map(|s| s.rss_kib)),
        pss_per_session_kib: per_session(s0.map(|s| s.pss_kib), s1.map(|s| s.pss_kib)),
        hold_cpu_percent: percent(cpu_s(s1, s2)),
        backend_hold_cpu_percent: percent(cpu_s(b1, b2)),
        backend_pss_per_session_kib: per_session(b0.map(|s| s.pss_kib), b1.map(|s| s.pss_kib)),
    };
    let result = ImapBenchResult {
        label: label(args),
        server: args.server.clone(),
        workload: workload_name(args.workload),
        connections: want,
        ops: open,
        errors: shared.errors.load(Ordering::Relaxed),
        seconds: open_seconds,
        ops_per_sec: open as f64 / open_seconds,
        p50_ms: 0.0,
        p99_ms: 0.0,
        max_ms: 0.0,
        bytes: 0,
        mb_per_sec: 0.0,
        server_cpu_s,
        server_cpu_ms_per_op: per_op(server_cpu_s),
        backend_cpu_s,
        backend_cpu_ms_per_op: per_op(backend_cpu_s),
        server_procs: s1.map(|s| s.procs),
        idle: Some(figures),
        recipients: None,
        transactions_per_op: None,
        size: None,
        rcpt_errors: None,
        master_commands: None,
        master_commands_per_op: None,
    };
    write_result(&result, args.report.json.as_deref())
}

/// Prints `result` as a table row and a JSON line, and appends the JSON
/// line to `json` if given.
fn write_result(r: &ImapBenchResult, json: Option<&std::path::Path>) -> anyhow::Result<()> {
    println!(
        "{:<22} {:<12} {:>5} {:>7} {:>6} {:>9} {:>8} {:>8} {:>8} {:>10}",
        "label",
        "workload",
        "conns",
        "ops",
        "errors",
        "ops/s",
        "MB/s",
        "p50 ms",
        "p99 ms",
        "cpu ms/op"
    );
    println!(
        "{:<22} {:<12} {:>5} {:>7} {:>6} {:>9.1} {:>8.1} {:>8.2} {:>8.2} {:>10}",
        r.label,
        r.workload,
        r.connections,
        r.ops,
        r.errors,
        r.ops_per_sec,
        r.mb_per_sec,
        r.p50_ms,
        r.p99_ms,
        r.server_cpu_ms_per_op
            .map_or_else(|| "-".to_owned(), |c| format!("{c:.3}"))
    );
    if let Some(i) = &r.idle {
        println!(
            "idle ({:?}): {} open, {} alive after {} s; per session {} KiB RSS / {} KiB PSS; hold CPU {}%",
            i.mode,
            i.open,
            i.alive_after_hold,
            i.hold_seconds,
            i.rss_per_session_kib
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.1}")),
            i.pss_per_session_kib
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.1}")),
            i.hold_cpu_percent
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.2}")),
        );
    }
    let line = serde_json::to_string(r)?;
    println!("{line}");
    if let Some(path) = json {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{line}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_sizes() {
        assert_eq!(literal_size(b"* 1 FETCH (BODY[] {342}\r\n"), Some(342));
        assert_eq!(literal_size(b"* 1 FETCH (BODY[] {7+}\r\n"), Some(7));
        assert_eq!(literal_size(b"* OK {x}\r\n"), None);
        assert_eq!(literal_size(b"* OK done\r\n"), None);
        assert_eq!(literal_size(b"* OK {}\r\n"), None);
    }

    #[test]
    fn list_names_in_every_form() {
        let cases: [(&[u8], &[u8], Option<&str>); 7] = [
            (
                b"* LIST (\\HasNoChildren) \".\" user.alice\r\n",
                b"",
                Some("user.alice"),
            ),
            (b"* LIST () \".\" \"a b\\\"c\"\r\n", b"", Some("a b\"c")),
            (b"* LIST () \".\" {5}\r\n", b"x\ty z", Some("x\ty z")),
            (b"* LIST () NIL shared\r\n", b"", Some("shared")),
            (b"* LIST () \"\\\\\" odd\r\n", b"", Some("odd")),
            (b"* LIST () \".\" \"unterminated\r\n", b"", None),
            (b"* OK [ALERT] not a list\r\n", b"", None),
        ];
        for (first, literal, want) in cases {
            assert_eq!(
                list_name(first, literal).as_deref(),
                want,
                "{}",
                String::from_utf8_lossy(first)
            );
        }
    }

    #[test]
    fn messages_have_the_size_asked() {
        for size in [300, 1000, 4096, 1 << 20] {
            assert_eq!(message(size).len(), size);
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
    }

    /// A scripted server: the client skips literals and finds its tag.
    #[tokio::test]
    async fn reads_literals_and_tags() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut s = BufReader::new(s);
            s.get_mut().write_all(b"* OK hi\r\n").await.unwrap();
            let mut line = String::new();
            s.read_line(&mut line).await.unwrap();
            assert_eq!(line, "B1 FETCH 1:* BODY.PEEK[]\r\n");
            s.get_mut()
                .write_all(b"* 1 FETCH (BODY[] {5}\r\nB1 OK)\r\n* 2 FETCH (BODY[] {3}\r\nabc)\r\nB1 OK done\r\n")
                .await
                .unwrap();
        });
        let mut c = Imap::connect(&addr, 4096, Duration::from_secs(5))
            .await
            .unwrap();
        let a = c.ok("FETCH 1:* BODY.PEEK[]").await.unwrap();
        assert_eq!(a.literal_bytes, 8);
        assert_eq!(a.text, "B1 OK done");
        server.await.unwrap();
    }
}
