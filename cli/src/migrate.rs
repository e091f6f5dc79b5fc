//! Moving a live Cyrus murder onto Corvid: `dump`, `load`, `import`,
//! `check` and `migrate shadow|status|finish`.
//!
//! Reads of the registry go over MUPDATE (LIST); writes go in batches of
//! [`RegistryCommand::Conditional`] through the peer port ([`write_bulk`],
//! the one bulk write path), so that no write overwrites a change someone
//! else made between the read and the write.
//!
//! The shadow follows a Cyrus master as its slaves do (UPDATE, then the
//! pushed changes, NOOP as a synchronisation point) and mirrors each change
//! of a name as "from what Cyrus held before to what it holds now". A name
//! written on Corvid directly (by a backend already cut over) no longer
//! reads what Cyrus held before, so the shadow leaves it alone and reports
//! it as diverged: a direct write always wins.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use corvid_registry::model::{
    ClientSession, MailboxEntry, Outcome, Placement, Refusal, RegistryCommand,
};
use corvid_registry::mupdate::client::{line_entry, Client};
use corvid_registry::mupdate::codec::{Command, ServerLine, Status};
use corvid_registry::peer::{PeerClient, PeerRequest, PeerResponse};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::cluster::PeerTlsArgs;
use crate::conn::ConnectArgs;
use crate::mboxlist::{self, Format};

/// A mailbox list: name -> placement.
pub type List = BTreeMap<String, Placement>;

/// Commands in one batch (one Raft log entry).
const BATCH: usize = 1000;

/// How long one batch may keep failing (every node tried in turn) before
/// the write gives up.
const WRITE_DEADLINE: Duration = Duration::from_secs(60);

/// Exit status when differences or conflicts remain.
pub const EXIT_DIFFERENCES: i32 = 3;

/// How to reach the Corvid registry.
#[derive(Debug, Clone, Args)]
pub struct RegistryArgs {
    /// MUPDATE addresses of registry nodes, comma-separated (for reads:
    /// LIST; tried in turn).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:3905")]
    registry: Vec<String>,
    /// TOML file with the registry admin's `user` and `password`.
    #[arg(long, default_value = "./data/admin-credential.txt")]
    credential_file: PathBuf,
    /// Peer addresses of the registry nodes, comma-separated (for writes;
    /// tried in turn, so a write survives a node's failure).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:3906")]
    peer: Vec<String>,
    #[command(flatten)]
    tls: PeerTlsArgs,
}

/// How to reach the Cyrus MUPDATE master being migrated from.
#[derive(Debug, Clone, Args)]
pub struct CyrusArgs {
    /// The Cyrus master, HOST:PORT.
    #[arg(long = "from-mupdate")]
    from_mupdate: String,
    /// Its administrator (as in the backends' `mupdate_authname`).
    #[arg(long)]
    user: String,
    /// File whose first line is the password.
    #[arg(long)]
    password_file: PathBuf,
}

impl CyrusArgs {
    async fn connect(&self) -> anyhow::Result<Client> {
        let text = std::fs::read_to_string(&self.password_file)
            .with_context(|| format!("reading {}", self.password_file.display()))?;
        let password = text.lines().next().unwrap_or("").to_owned();
        let mut c = Client::connect(&self.from_mupdate)
            .await
            .with_context(|| format!("connecting to {}", self.from_mupdate))?;
        c.authenticate_plain(&self.user, &password)
            .await
            .with_context(|| format!("authenticating to {} as {}", self.from_mupdate, self.user))?;
        Ok(c)
    }
}

impl RegistryArgs {
    fn mupdate(&self, server: &str) -> ConnectArgs {
        ConnectArgs {
            server: server.to_owned(),
            user: None,
            password: None,
            credential_file: self.credential_file.clone(),
            mechanism: "PLAIN".into(),
            no_auth: false,
            starttls: false,
            ca: None,
            tls_name: None,
        }
    }

    /// The registry's whole list (LIST), from the first node that answers.
    pub async fn read(&self) -> anyhow::Result<List> {
        let mut last = anyhow::anyhow!("no --registry address");
        for server in &self.registry {
            let attempt = async {
                let mut c = self.mupdate(server).connect().await?;
                let list = c.list(None).await.context("LIST on the registry")?;
                c.logout().await.ok();
                anyhow::Ok(to_list(list))
            };
            match attempt.await {
                Ok(list) => return Ok(list),
                Err(e) => last = e.context(format!("reading the registry at {server}")),
            }
        }
        Err(last)
    }
}

fn to_list(entries: impl IntoIterator<Item = MailboxEntry>) -> List {
    entries
        .into_iter()
        .map(|e| (e.name.clone(), Placement::of(&e)))
        .collect()
}

/// Applies `commands` through the registry's peer port, in batches of
/// [`BATCH`], and returns one outcome per command. A batch that fails is
/// sent again, with the same client tag, to the next node (the registry
/// answers a repeat from its session table, so nothing is applied twice).
/// This is the one bulk write path of the migration tools.
pub async fn write_bulk(
    reg: &RegistryArgs,
    commands: Vec<RegistryCommand>,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<Outcome>> {
    if reg.peer.is_empty() {
        bail!("no --peer address");
    }
    let tls = reg.tls.client()?;
    let mut clients: Vec<PeerClient> = reg
        .peer
        .iter()
        .map(|p| PeerClient::with_tls(p.as_str(), tls.clone()))
        .collect();
    let mut session = ClientSession::new();
    let mut outcomes = Vec::with_capacity(commands.len());
    let mut next = 0usize;
    let mut chunks = commands.into_iter().peekable();
    while chunks.peek().is_some() {
        let chunk: Vec<_> = chunks.by_ref().take(BATCH).collect();
        let n = chunk.len();
        let request = PeerRequest::ClientWrite {
            client: session.next_request(),
            command: RegistryCommand::Batch(chunk),
        };
        let deadline = Instant::now() + WRITE_DEADLINE;
        let count = clients.len();
        let answer = loop {
            let c = &mut clients[next % count];
            let last_error = match c.call(&request, Duration::from_secs(30)).await {
                Ok(PeerResponse::Write(Outcome::Batch(o))) if o.len() == n => break o,
                Ok(other) => format!("unexpected answer {other:?}"),
                Err(e) => e.to_string(),
            };
            next += 1;
            if Instant::now() > deadline {
                bail!("registry write failed: {last_error}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        outcomes.extend(answer);
        progress.inc(n as u64);
    }
    Ok(outcomes)
}

/// What a load did (or would do).
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Entries the registry did not have.
    pub created: Vec<String>,
    /// Entries at the same location whose ACL or state changed.
    pub updated: Vec<String>,
    /// Entries the registry already had exactly.
    pub unchanged: usize,
    /// Names the registry holds at another location (left alone).
    pub conflicting: Vec<(String, String, String)>,
}

impl LoadReport {
    fn print(&self, dry_run: bool) {
        println!(
            "{}created {}, updated {}, unchanged {}, conflicting {}",
            if dry_run { "(dry run) " } else { "" },
            self.created.len(),
            self.updated.len(),
            self.unchanged,
            self.conflicting.len()
        );
        for (name, theirs, ours) in self.conflicting.iter().take(50) {
            println!("conflict\t{name}\tregistry {theirs}\tinput {ours}");
        }
        if self.conflicting.len() > 50 {
            println!("conflict\t… {} more", self.conflicting.len() - 50);
        }
    }
}

/// Loads `entries` idempotently: absent names are created, names at the
/// same location are updated to the input's ACL and state, names held at
/// another location are reported and left alone.
pub async fn load_entries(
    reg: &RegistryArgs,
    entries: Vec<MailboxEntry>,
    dry_run: bool,
    quiet: bool,
) -> anyhow::Result<LoadReport> {
    let current = reg.read().await?;
    let mut report = LoadReport::default();
    let mut writes = Vec::new();
    for e in entries {
        let want = Placement::of(&e);
        match current.get(&e.name) {
            Some(now) if *now == want => report.unchanged += 1,
            Some(now) if now.location != want.location => {
                report
                    .conflicting
                    .push((e.name, now.location.clone(), want.location))
            }
            now => writes.push((now.is_some(), e.name, now.cloned(), want)),
        }
    }
    if dry_run {
        for (exists, name, ..) in writes {
            if exists {
                report.updated.push(name)
            } else {
                report.created.push(name)
            }
        }
        return Ok(report);
    }
    let progress = bar(writes.len() as u64, quiet, "writing");
    let commands = writes
        .iter()
        .map(|(_, name, expected, new)| RegistryCommand::Conditional {
            name: name.clone(),
            expected: expected.clone(),
            new: Some(new.clone()),
        })
        .collect();
    let outcomes = write_bulk(reg, commands, &progress).await?;
    progress.finish_and_clear();
    let mut raced = Vec::new();
    for ((exists, name, _, new), outcome) in writes.into_iter().zip(outcomes) {
        match outcome {
            Outcome::Done if exists => report.updated.push(name),
            Outcome::Done => report.created.push(name),
            // Changed between our read and our write: read it again.
            Outcome::Refused(Refusal::Changed) => raced.push((name, new)),
            other => bail!("{name}: {other:?}"),
        }
    }
    if !raced.is_empty() {
        let now = reg.read().await?;
        for (name, new) in raced {
            let there = now
                .get(&name)
                .map_or("(deleted)".into(), |p| p.location.clone());
            report.conflicting.push((name, there, new.location));
        }
    }
    Ok(report)
}

fn bar(len: u64, quiet: bool, what: &'static str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let p = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} ({per_sec})") {
        p.set_style(style);
    }
    p.set_message(what);
    p
}

fn read_input(path: &Path) -> anyhow::Result<String> {
    let mut text = String::new();
    if path == Path::new("-") {
        std::io::stdin().read_to_string(&mut text)?;
    } else {
        text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(text)
}

/// Reads a Cyrus master's whole list by UPDATE (its dump part), with a
/// progress count; the connection is left streaming.
async fn update_dump(c: &mut Client, quiet: bool) -> anyhow::Result<List> {
    let tag = c.send(&Command::Update { servers: vec![] });
    c.flush().await?;
    let spinner = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    spinner.set_message("reading the Cyrus master's list");
    let mut list = List::new();
    loop {
        match c.next_push().await? {
            ServerLine::Status {
                tag: t,
                status,
                text,
            } if t == tag => {
                if status != Status::Ok {
                    bail!("UPDATE refused: {status:?} {text}");
                }
                break;
            }
            line => {
                if let Some(e) = line_entry(&line) {
                    list.insert(e.name.clone(), Placement::of(&e));
                    spinner.inc(1);
                }
            }
        }
    }
    spinner.finish_and_clear();
    Ok(list)
}

/// `corvidctl dump`.
#[derive(Debug, Args)]
pub struct DumpArgs {
    #[command(flatten)]
    reg: RegistryArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "jsonl")]
    format: Format,
    /// Write here instead of standard output.
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
}

/// `corvidctl load`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    #[command(flatten)]
    reg: RegistryArgs,
    /// Input file (`-` for standard input).
    input: PathBuf,
    /// Input format (default: guessed from the first bytes).
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// The backend a `ctl_mboxlist -d` dump taken on a backend comes from
    /// (its entries name no server).
    #[arg(long)]
    backend: Option<String>,
    /// Report what would change; write nothing.
    #[arg(long)]
    dry_run: bool,
}

/// `corvidctl import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    reg: RegistryArgs,
    #[command(flatten)]
    cyrus: CyrusArgs,
    /// Report what would change; write nothing.
    #[arg(long)]
    dry_run: bool,
}

/// `corvidctl check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    reg: RegistryArgs,
    /// The backend's name (the server part of its locations).
    #[arg(long)]
    backend: String,
    /// The backend's `ctl_mboxlist -d` output (`-` for standard input, the
    /// default without --imap).
    #[arg(long, conflicts_with = "imap")]
    input: Option<PathBuf>,
    /// Instead of a dump, an admin's IMAP LIST on the backend, HOST:PORT
    /// (names only: partitions and ACLs are not compared, and names only
    /// the backend holds are reported but not created).
    #[arg(long, requires_all = ["imap_user", "imap_password_file"])]
    imap: Option<String>,
    /// The backend's IMAP administrator.
    #[arg(long)]
    imap_user: Option<String>,
    /// File whose first line is that administrator's password.
    #[arg(long)]
    imap_password_file: Option<PathBuf>,
    /// Repair what is unambiguous: create what only the backend holds,
    /// delete active entries the backend lacks, set ACL and partition to
    /// the backend's. Names held by two backends and reservations the
    /// backend lacks (a creation may be under way) are only reported.
    #[arg(long)]
    fix: bool,
}

/// `corvidctl migrate`.
#[derive(Debug, Subcommand)]
pub enum MigrateCmd {
    /// Follow a Cyrus master (UPDATE) and mirror its changes into Corvid
    /// until `migrate finish`. Runs in the foreground.
    Shadow(ShadowArgs),
    /// The shadow's lag and state, and (with --from-mupdate) the
    /// differences between the Cyrus master's list and the registry's.
    Status(StatusArgs),
    /// Stop the shadow after a last synchronisation.
    Finish {
        /// The shadow's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// How long to wait for the shadow to stop.
        #[arg(long, default_value_t = 60)]
        timeout_seconds: u64,
    },
}

/// `corvidctl migrate shadow`.
#[derive(Debug, Args)]
pub struct ShadowArgs {
    #[command(flatten)]
    reg: RegistryArgs,
    #[command(flatten)]
    cyrus: CyrusArgs,
    /// Where the shadow keeps the Cyrus list it last mirrored and its
    /// status (survives a restart of the shadow).
    #[arg(long)]
    state_dir: PathBuf,
    /// How often to ask the Cyrus master for its pending changes (NOOP).
    #[arg(long, default_value_t = 1000)]
    sync_interval_ms: u64,
    /// Wait this long before reconnecting after an error (a Cyrus slave
    /// waits mupdate_retry_delay).
    #[arg(long, default_value_t = 2000)]
    retry_delay_ms: u64,
}

/// `corvidctl migrate status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The shadow's state directory.
    #[arg(long)]
    state_dir: PathBuf,
    #[command(flatten)]
    reg: RegistryArgs,
    /// Compare with this Cyrus master's list (with --user, --password-file).
    #[arg(long = "from-mupdate", requires_all = ["user", "password_file"])]
    from_mupdate: Option<String>,
    /// The Cyrus master's administrator.
    #[arg(long)]
    user: Option<String>,
    /// File whose first line is its password.
    #[arg(long)]
    password_file: Option<PathBuf>,
}

/// Runs `corvidctl dump`.
pub async fn dump(args: DumpArgs) -> anyhow::Result<()> {
    let mut entries: Vec<MailboxEntry> = args
        .reg
        .read()
        .await?
        .into_iter()
        .map(|(n, p)| p.entry(&n))
        .collect();
    entries.sort_by(|a, b| corvid_registry::model::cyrus_mailbox_cmp(&a.name, &b.name));
    let mut out: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(std::fs::File::create(p).with_context(|| format!("{}", p.display()))?),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut buf = std::io::BufWriter::new(&mut out);
    match args.format {
        Format::Jsonl => mboxlist::write_jsonl(&mut buf, &entries)?,
        Format::Cyrus => mboxlist::write_cyrus(&mut buf, &entries)?,
    }
    buf.flush()?;
    eprintln!("dumped {} mailboxes", entries.len());
    Ok(())
}

/// Runs `corvidctl load`; returns the exit status.
pub async fn load(args: LoadArgs) -> anyhow::Result<i32> {
    let text = read_input(&args.input)?;
    let format = args.format.unwrap_or_else(|| mboxlist::detect(&text));
    let entries = mboxlist::parse(&text, format, args.backend.as_deref())?;
    let report = load_entries(&args.reg, entries, args.dry_run, false).await?;
    report.print(args.dry_run);
    Ok(exit_for(report.conflicting.is_empty()))
}

fn exit_for(clean: bool) -> i32 {
    if clean {
        0
    } else {
        EXIT_DIFFERENCES
    }
}

/// Runs `corvidctl import`; returns the exit status.
pub async fn import(args: ImportArgs) -> anyhow::Result<i32> {
    let mut c = args.cyrus.connect().await?;
    let list = update_dump(&mut c, false).await?;
    drop(c);
    eprintln!(
        "read {} mailboxes from {}",
        list.len(),
        args.cyrus.from_mupdate
    );
    let entries = list.iter().map(|(n, p)| p.entry(n)).collect();
    let report = load_entries(&args.reg, entries, args.dry_run, false).await?;
    report.print(args.dry_run);
    Ok(exit_for(report.conflicting.is_empty()))
}

/// Differences between two lists, `a` and `b`.
#[derive(Debug, Default)]
pub struct Diff {
    /// Names only `a` has.
    pub only_a: Vec<String>,
    /// Names only `b` has.
    pub only_b: Vec<String>,
    /// Names both have, placed differently.
    pub differ: Vec<String>,
}

impl Diff {
    /// Whether the lists are equal.
    pub fn is_empty(&self) -> bool {
        self.only_a.is_empty() && self.only_b.is_empty() && self.differ.is_empty()
    }
}

/// Compares two lists.
pub fn compare(a: &List, b: &List) -> Diff {
    let mut d = Diff::default();
    for (n, pa) in a {
        match b.get(n) {
            None => d.only_a.push(n.clone()),
            Some(pb) if pb != pa => d.differ.push(n.clone()),
            Some(_) => {}
        }
    }
    d.only_b = b.keys().filter(|n| !a.contains_key(*n)).cloned().collect();
    d
}

/// What a backend holds, as its dump (`Full`) or an IMAP LIST (`Names`)
/// tells it.
enum Held {
    Full(List),
    Names(BTreeSet<String>),
}

impl Held {
    fn contains(&self, name: &str) -> bool {
        match self {
            Held::Full(l) => l.contains_key(name),
            Held::Names(n) => n.contains(name),
        }
    }

    fn names(&self) -> Vec<&String> {
        match self {
            Held::Full(l) => l.keys().collect(),
            Held::Names(n) => n.iter().collect(),
        }
    }
}

async fn imap_list(args: &CheckArgs) -> anyhow::Result<BTreeSet<String>> {
    let (Some(addr), Some(user), Some(pw)) =
        (&args.imap, &args.imap_user, &args.imap_password_file)
    else {
        bail!("--imap needs --imap-user and --imap-password-file");
    };
    let password = read_input(pw)?.lines().next().unwrap_or("").to_owned();
    let mut c = crate::imap_bench::Imap::connect(addr, 64 << 10, Duration::from_secs(60)).await?;
    c.login(user, &password).await?;
    let names = c.list("*").await?;
    c.logout().await.ok();
    Ok(names.into_iter().collect())
}

/// Runs `corvidctl check`; returns the exit status.
pub async fn check(args: CheckArgs) -> anyhow::Result<i32> {
    let held = if args.imap.is_some() {
        Held::Names(imap_list(&args).await?)
    } else {
        let input = args.input.clone().unwrap_or_else(|| PathBuf::from("-"));
        let text = read_input(&input)?;
        let entries = mboxlist::parse(&text, mboxlist::detect(&text), Some(&args.backend))?;
        // A master's dump may list other backends too: keep this one's.
        Held::Full(to_list(
            entries.into_iter().filter(|e| e.server() == args.backend),
        ))
    };
    let registry = args.reg.read().await?;
    let here: List = registry
        .iter()
        .filter(|(_, p)| p.server() == args.backend)
        .map(|(n, p)| (n.clone(), p.clone()))
        .collect();
    let mut fixes = Vec::new();
    let mut differences = 0usize;
    // Differences --fix leaves alone.
    let mut remaining = 0usize;
    for name in held.names() {
        if here.contains_key(name) {
            continue;
        }
        differences += 1;
        match (registry.get(name), &held) {
            (Some(other), _) => {
                remaining += 1;
                println!("two-backends\t{name}\tregistry {}", other.location);
            }
            (None, Held::Full(list)) => {
                println!("backend-only\t{name}\t{}", list[name].location);
                fixes.push(RegistryCommand::Conditional {
                    name: name.clone(),
                    expected: None,
                    new: Some(list[name].clone()),
                });
            }
            (None, Held::Names(_)) => {
                remaining += 1;
                println!("backend-only\t{name}\t(location unknown from LIST)");
            }
        }
    }
    for (name, now) in &here {
        if !held.contains(name) {
            differences += 1;
            println!("registry-only\t{name}\t{}\t{:?}", now.location, now.state);
            if now.state == corvid_registry::model::MailboxState::Active {
                fixes.push(RegistryCommand::Conditional {
                    name: name.clone(),
                    expected: Some(now.clone()),
                    new: None,
                });
            } else {
                remaining += 1;
            }
        } else if let Held::Full(list) = &held {
            let want = &list[name];
            if want != now {
                differences += 1;
                println!(
                    "differs\t{name}\tregistry {} {:?}\tbackend {} {:?}",
                    now.location, now.state, want.location, want.state
                );
                fixes.push(RegistryCommand::Conditional {
                    name: name.clone(),
                    expected: Some(now.clone()),
                    new: Some(want.clone()),
                });
            }
        }
    }
    println!(
        "backend {}: {} mailboxes, registry {} at it; {differences} differences",
        args.backend,
        held.names().len(),
        here.len(),
    );
    if !args.fix {
        return Ok(exit_for(differences == 0));
    }
    let names: Vec<String> = fixes
        .iter()
        .filter_map(|c| c.mailbox().map(str::to_owned))
        .collect();
    let outcomes = write_bulk(&args.reg, fixes, &ProgressBar::hidden()).await?;
    let mut fixed = 0;
    for (name, o) in names.iter().zip(outcomes) {
        if o == Outcome::Done {
            fixed += 1;
        } else {
            remaining += 1;
            println!("not fixed\t{name}\t{o:?}");
        }
    }
    println!("fixed {fixed}, left {remaining}");
    Ok(exit_for(remaining == 0))
}

// ---------------------------------------------------------------- shadow

/// What the shadow reports in its state directory.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ShadowStatus {
    /// Process id of the shadow.
    pub pid: u32,
    /// The Cyrus master followed.
    pub source: String,
    /// Whether the UPDATE stream is up.
    pub connected: bool,
    /// Every change Cyrus committed before this time (ms since the epoch)
    /// has been mirrored: the start of the last completed NOOP round.
    pub synced_at_ms: u64,
    /// Entries in the Cyrus master's list.
    pub cyrus_entries: usize,
    /// Changes mirrored into the registry.
    pub mirrored: u64,
    /// Names the shadow left alone because Corvid no longer held what
    /// Cyrus held before (written directly on Corvid, or conflicting).
    pub diverged: BTreeSet<String>,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// Set when the shadow stopped after `migrate finish`.
    pub finished: bool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The state directory: `base.jsonl` (the Cyrus list as last mirrored),
/// `journal.jsonl` (changes mirrored since), `status.json`, and `finish`
/// (the stop request).
struct StateDir(PathBuf);

#[derive(Serialize, Deserialize)]
struct JournalLine {
    name: String,
    placement: Option<Placement>,
}

impl StateDir {
    fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }

    /// The base (with the journal replayed), if the shadow ran before.
    fn load_base(&self) -> anyhow::Result<Option<List>> {
        let base = self.path("base.jsonl");
        if !base.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&base)?;
        let mut list = to_list(mboxlist::parse(&text, Format::Jsonl, None)?);
        if let Ok(journal) = std::fs::read_to_string(self.path("journal.jsonl")) {
            for line in journal.lines() {
                // A line cut short by a crash ends the journal.
                let Ok(j) = serde_json::from_str::<JournalLine>(line) else {
                    break;
                };
                match j.placement {
                    Some(p) => list.insert(j.name, p),
                    None => list.remove(&j.name),
                };
            }
        }
        Ok(Some(list))
    }

    /// Writes the base atomically and empties the journal.
    fn save_base(&self, list: &List) -> anyhow::Result<()> {
        let tmp = self.path("base.jsonl.tmp");
        let entries: Vec<_> = list.iter().map(|(n, p)| p.entry(n)).collect();
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        mboxlist::write_jsonl(&mut f, &entries)?;
        f.into_inner()?.sync_all()?;
        std::fs::rename(&tmp, self.path("base.jsonl"))?;
        std::fs::File::create(self.path("journal.jsonl"))?;
        Ok(())
    }

    fn journal(&self, changes: &[(String, Option<Placement>)]) -> anyhow::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.path("journal.jsonl"))?;
        let mut out = Vec::new();
        for (name, placement) in changes {
            serde_json::to_writer(
                &mut out,
                &JournalLine {
                    name: name.clone(),
                    placement: placement.clone(),
                },
            )?;
            out.push(b'\n');
        }
        f.write_all(&out)?;
        Ok(())
    }

    fn write_status(&self, s: &ShadowStatus) -> anyhow::Result<()> {
        let tmp = self.path("status.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(s)?)?;
        std::fs::rename(tmp, self.path("status.json"))?;
        Ok(())
    }

    fn read_status(&self) -> anyhow::Result<ShadowStatus> {
        let p = self.path("status.json");
        let text = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        Ok(serde_json::from_slice(&text)?)
    }

    fn finish_requested(&self) -> bool {
        self.path("finish").exists()
    }
}

/// Mirrors Cyrus's changes into the registry: each name of `changed` goes
/// from what `base` (the Cyrus list as last mirrored) holds to its new
/// placement (`None`: deleted), conditionally, so a name changed on Corvid
/// directly is left alone and recorded as diverged in `status`. `base` and
/// the journal then hold the new placements, applied or left alone.
async fn mirror(
    reg: &RegistryArgs,
    state: &StateDir,
    status: &mut ShadowStatus,
    base: &mut List,
    changed: Vec<(String, Option<Placement>)>,
) -> anyhow::Result<()> {
    let changed: Vec<_> = changed
        .into_iter()
        .filter(|(n, new)| base.get(n) != new.as_ref())
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    let commands = changed
        .iter()
        .map(|(name, new)| RegistryCommand::Conditional {
            name: name.clone(),
            expected: base.get(name).cloned(),
            new: new.clone(),
        })
        .collect();
    let outcomes = write_bulk(reg, commands, &ProgressBar::hidden()).await?;
    for ((name, new), outcome) in changed.iter().zip(outcomes) {
        match outcome {
            Outcome::Done => {
                status.mirrored += 1;
                status.diverged.remove(name);
            }
            Outcome::Refused(Refusal::Changed) => {
                eprintln!("shadow: {name}: changed on Corvid directly; Cyrus's change not applied");
                status.diverged.insert(name.clone());
            }
            other => {
                eprintln!("shadow: {name}: {other:?}");
                status.diverged.insert(name.clone());
            }
        }
        match new {
            Some(p) => base.insert(name.clone(), p.clone()),
            None => base.remove(name),
        };
    }
    state.journal(&changed)?;
    Ok(())
}

/// Runs `corvidctl migrate ...`; returns the exit status.
pub async fn migrate(cmd: MigrateCmd) -> anyhow::Result<i32> {
    match cmd {
        MigrateCmd::Shadow(args) => shadow(args).await.map(|()| 0),
        MigrateCmd::Status(args) => status(args).await,
        MigrateCmd::Finish {
            state_dir,
            timeout_seconds,
        } => {
            let state = StateDir(state_dir);
            std::fs::write(state.path("finish"), b"")?;
            let deadline = Instant::now() + Duration::from_secs(timeout_seconds);
            loop {
                if let Ok(s) = state.read_status() {
                    if s.finished {
                        println!(
                            "shadow stopped: {} changes mirrored, {} diverged names",
                            s.mirrored,
                            s.diverged.len()
                        );
                        return Ok(0);
                    }
                }
                if Instant::now() > deadline {
                    bail!("the shadow did not stop within {timeout_seconds} s");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn shadow(args: ShadowArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.state_dir)?;
    let state = StateDir(args.state_dir.clone());
    // A finish request of an earlier run does not stop this one.
    std::fs::remove_file(state.path("finish")).ok();
    let mut status = ShadowStatus {
        pid: std::process::id(),
        source: args.cyrus.from_mupdate.clone(),
        ..ShadowStatus::default()
    };
    if let Ok(old) = state.read_status() {
        status.diverged = old.diverged;
        status.mirrored = old.mirrored;
    }
    state.write_status(&status)?;
    loop {
        match shadow_session(&args, &state, &mut status).await {
            Ok(()) => {
                status.finished = true;
                status.connected = false;
                state.write_status(&status)?;
                eprintln!("shadow: finished");
                return Ok(());
            }
            Err(e) => {
                eprintln!(
                    "shadow: {e:#}; resynchronising in {} ms",
                    args.retry_delay_ms
                );
                status.connected = false;
                status.last_error = Some(format!("{e:#}"));
                state.write_status(&status)?;
                tokio::time::sleep(Duration::from_millis(args.retry_delay_ms)).await;
            }
        }
    }
}

/// One connection to the Cyrus master: full resync, then streaming until
/// an error (`Err`) or a finish request (`Ok`).
async fn shadow_session(
    args: &ShadowArgs,
    state: &StateDir,
    status: &mut ShadowStatus,
) -> anyhow::Result<()> {
    let started = now_ms();
    let mut c = args.cyrus.connect().await?;
    let cyrus = update_dump(&mut c, true).await?;
    // First run: no base. Treat every name as new, which creates what
    // Corvid lacks and leaves alone (as diverged) what it holds otherwise.
    let mut base = state.load_base()?.unwrap_or_default();
    let mut changed: Vec<(String, Option<Placement>)> = base
        .keys()
        .filter(|n| !cyrus.contains_key(*n))
        .map(|n| (n.clone(), None))
        .collect();
    changed.extend(cyrus.iter().map(|(n, p)| (n.clone(), Some(p.clone()))));
    mirror(&args.reg, state, status, &mut base, changed).await?;
    state.save_base(&base)?;
    status.connected = true;
    status.last_error = None;
    status.synced_at_ms = started;
    status.cyrus_entries = base.len();
    state.write_status(status)?;
    eprintln!(
        "shadow: following {} ({} mailboxes)",
        args.cyrus.from_mupdate,
        base.len()
    );

    let interval = Duration::from_millis(args.sync_interval_ms.max(50));
    let mut pending: BTreeMap<String, Option<Placement>> = BTreeMap::new();
    // The outstanding NOOP: its tag and when it was sent.
    let mut noop: Option<(String, u64, Instant)> = None;
    let mut finishing = false;
    let mut tick = tokio::time::interval(interval);
    let mut since_save = 0usize;
    loop {
        tokio::select! {
            line = c.next_push() => {
                let line = line?;
                match line {
                    ServerLine::Status { tag, status: st, text } => {
                        let Some((t, sent_ms, _)) = &noop else {
                            bail!("unexpected status {tag} {st:?} {text}");
                        };
                        if tag != *t || st != Status::Ok {
                            bail!("NOOP answered {tag} {st:?} {text}");
                        }
                        // Cyrus sends its queued changes before the OK:
                        // everything committed before the NOOP is pending.
                        let sent_ms = *sent_ms;
                        noop = None;
                        since_save += pending.len();
                        mirror(&args.reg, state, status, &mut base, std::mem::take(&mut pending).into_iter().collect()).await?;
                        status.synced_at_ms = sent_ms;
                        status.cyrus_entries = base.len();
                        state.write_status(status)?;
                        if since_save > 10_000 {
                            state.save_base(&base)?;
                            since_save = 0;
                        }
                        if finishing {
                            state.save_base(&base)?;
                            c.logout().await.ok();
                            return Ok(());
                        }
                    }
                    ServerLine::Delete { name, .. } => {
                        pending.insert(name, None);
                    }
                    l @ (ServerLine::Mailbox { .. } | ServerLine::Reserve { .. }) => {
                        if let Some(e) = line_entry(&l) {
                            pending.insert(e.name.clone(), Some(Placement::of(&e)));
                        }
                    }
                    ServerLine::Bye(text) => bail!("Cyrus master closed the stream: {text}"),
                    other => bail!("unexpected line in the UPDATE stream: {other:?}"),
                }
            }
            _ = tick.tick() => {
                if let Some((_, _, sent)) = &noop {
                    // A Cyrus slave drops a master that leaves a NOOP unanswered.
                    if sent.elapsed() > interval * 10 + Duration::from_secs(10) {
                        bail!("the Cyrus master did not answer NOOP");
                    }
                    continue;
                }
                if state.finish_requested() {
                    finishing = true;
                }
                let sent_ms = now_ms();
                let tag = c.send(&Command::Noop);
                c.flush().await?;
                noop = Some((tag, sent_ms, Instant::now()));
            }
        }
    }
}

async fn status(args: StatusArgs) -> anyhow::Result<i32> {
    let state = StateDir(args.state_dir.clone());
    let s = state.read_status()?;
    let lag_ms = now_ms().saturating_sub(s.synced_at_ms);
    println!("source\t{}", s.source);
    println!(
        "shadow\t{}",
        if s.finished {
            "finished"
        } else if s.connected {
            "following"
        } else {
            "not connected"
        }
    );
    println!("lag_ms\t{lag_ms}");
    println!("synced_at_ms\t{}", s.synced_at_ms);
    println!("cyrus_entries\t{}", s.cyrus_entries);
    println!("mirrored\t{}", s.mirrored);
    println!("diverged\t{}", s.diverged.len());
    for n in s.diverged.iter().take(50) {
        println!("diverged\t{n}");
    }
    if let Some(e) = &s.last_error {
        println!("last_error\t{e}");
    }
    let (Some(from), Some(user), Some(password_file)) =
        (args.from_mupdate, args.user, args.password_file)
    else {
        return Ok(0);
    };
    let cyrus = CyrusArgs {
        from_mupdate: from,
        user,
        password_file,
    };
    let mut c = cyrus.connect().await?;
    let cyrus_list = to_list(c.list(None).await.context("LIST on the Cyrus master")?);
    c.logout().await.ok();
    let corvid = args.reg.read().await?;
    let d = compare(&cyrus_list, &corvid);
    println!(
        "difference\tonly in Cyrus {}, only in Corvid {}, placed differently {}",
        d.only_a.len(),
        d.only_b.len(),
        d.differ.len()
    );
    for n in d.only_a.iter().take(50) {
        println!("only-cyrus\t{n}");
    }
    for n in d.only_b.iter().take(50) {
        println!("only-corvid\t{n}");
    }
    for n in d.differ.iter().take(50) {
        println!(
            "differs\t{n}\tcyrus {}\tcorvid {}",
            cyrus_list[n].location, corvid[n].location
        );
    }
    Ok(exit_for(d.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use corvid_registry::model::MailboxState;

    fn p(location: &str) -> Placement {
        Placement {
            location: location.into(),
            acl: "anyone\tlrs\t".into(),
            state: MailboxState::Active,
        }
    }

    #[test]
    fn compare_finds_each_kind_of_difference() {
        let a: List = [("x", "be1!a"), ("y", "be1!a"), ("z", "be1!a")]
            .into_iter()
            .map(|(n, l)| (n.to_owned(), p(l)))
            .collect();
        let mut b = a.clone();
        b.remove("x");
        b.insert("y".into(), p("be2!a"));
        b.insert("w".into(), p("be1!a"));
        let d = compare(&a, &b);
        assert_eq!(d.only_a, vec!["x"]);
        assert_eq!(d.only_b, vec!["w"]);
        assert_eq!(d.differ, vec!["y"]);
        assert!(!d.is_empty());
        assert!(compare(&a, &a).is_empty());
    }

    #[test]
    fn the_shadow_base_survives_a_restart_with_its_journal() {
        let dir = std::env::temp_dir().join(format!("corvid-shadow-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let state = StateDir(dir.clone());
        assert!(state.load_base().unwrap().is_none(), "first start: no base");
        let mut base = List::new();
        base.insert("a".into(), p("be1!x"));
        base.insert("b".into(), p("be1!x"));
        state.save_base(&base).unwrap();
        state
            .journal(&[("a".into(), None), ("c".into(), Some(p("be2!y")))])
            .unwrap();
        // A line cut short by a crash ends the journal.
        std::fs::OpenOptions::new()
            .append(true)
            .open(state.path("journal.jsonl"))
            .unwrap()
            .write_all(b"{\"name\":\"b\",\"plac")
            .unwrap();
        let got = state.load_base().unwrap().unwrap();
        let want: List = [("b", p("be1!x")), ("c", p("be2!y"))]
            .into_iter()
            .map(|(n, p)| (n.to_owned(), p))
            .collect();
        assert_eq!(got, want);
        state.save_base(&got).unwrap();
        assert_eq!(std::fs::read(state.path("journal.jsonl")).unwrap(), b"");
        assert_eq!(state.load_base().unwrap().unwrap(), want);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
