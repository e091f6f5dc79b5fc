//! RocksDB storage behind openraft's traits: the Raft log, the vote and the
//! registry state machine, in one database with a column family each.
//!
//! Durability: a log append is signalled to openraft only after the WAL is
//! fsynced, and the vote is fsynced before `save_vote` returns. State machine
//! writes go through the same WAL without their own fsync: they are derived
//! from the durable log, and the WAL replays writes in order, so after a crash
//! the state machine is a prefix of the log that openraft re-applies from.
//!
//! The replicated state lives in one column family: mailboxes keyed by name
//! mapped so that byte order is Cyrus's mailbox order
//! ([`crate::model::cyrus_order_key`]; below 0xFF), then the registry clock
//! (`0xFF 'c'`), the location index (`0xFF 'l' location 0x00 name-key`,
//! holding a copy of the entry so that LIST is one range read; written
//! with every mailbox change in the same batch, never in snapshots: a
//! follower derives it), the client sessions
//! (`0xFF 's' id`) and the MUPDATE users (`0xFF 'u' name`). There are two such families; `state` says
//! which one is live. A replica stages a master's snapshot in the other one
//! and swaps it in with one write, so readers never see a half-written state.
//!
//! A Raft snapshot is never the state's bytes: it is a RocksDB point-in-time
//! view of the live family ([`SnapshotData::View`]), read in chunks while it
//! is sent, so building one costs nothing and serves any registry size. A
//! follower writes the chunks it receives into the staging family and swaps
//! it in with one write at the end ([`SnapshotData::Staged`]), exactly as a
//! replica does with the log stream's snapshot: a transfer cut short leaves
//! the old state whole. Into an empty staging family, the chunks are
//! written as SST files and ingested just before the swap (see [`sst`]).

use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use futures::{Stream, TryStreamExt};
use openraft::alias::{EntryOf, LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf, VoteOf};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, IOFlushed, LogState, RaftLogStorage, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftLogReader, RaftSnapshotBuilder};
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::model::{
    apply_proposal, cyrus_order_key, Change, MailboxEntry, MailboxLookup, Outcome, Proposal,
    RegistryState, SessionRecord, StoredUser, UserLookup,
};
use crate::raft::TypeConfig;

mod sst;

const CF_LOGS: &str = "logs";
const CF_RAFT: &str = "raft";
/// The two state families; `KEY_ACTIVE` says which one is live.
const CF_STATE_FAMILIES: [&str; 2] = ["mailboxes", "mailboxes_alt"];
const CF_STATE: &str = "state";

const KEY_VOTE: &[u8] = b"vote";
const KEY_PURGED: &[u8] = b"last_purged";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_APPLIED: &[u8] = b"applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";
/// The last index of the last snapshot installed from a leader. Log entries
/// at or below it may predate the snapshot and never have committed (the
/// log is kept behind a snapshot), so the log stream never serves them.
const KEY_INSTALLED_SNAPSHOT: &[u8] = b"installed_snapshot";
/// Which of [`CF_STATE_FAMILIES`] is live (absent: the first).
const KEY_ACTIVE: &[u8] = b"active_state";
/// Directory (under the store's) of the SST files of a snapshot being staged.
const STAGING_DIR: &str = "staging-sst";

/// Upper bound of every mailbox key: names are UTF-8, which never holds 0xFF.
const MAILBOX_KEY_END: &[u8] = &[0xFF];
/// Prefix of the location index keys (see the module notes).
const LOCATION_PREFIX: &[u8] = &[0xFF, b'l'];
/// Above every location index key.
const LOCATION_END: &[u8] = &[0xFF, b'l' + 1];
/// Marks a state whose mailbox keys are in Cyrus's order and indexed by
/// location (absent: an older store, re-keyed at open).
const KEY_STATE_FORMAT: &[u8] = b"state_format";
const STATE_FORMAT: u32 = 2;
/// Prefix of the client session keys (followed by the id, big-endian).
const SESSION_PREFIX: &[u8] = &[0xFF, b's'];
/// Key of the registry clock.
const KEY_CLOCK: &[u8] = &[0xFF, b'c'];
/// Prefix of the user keys (followed by the name).
const USER_PREFIX: &[u8] = &[0xFF, b'u'];
/// Above every user key (names are ASCII).
const USER_KEY_END: &[u8] = &[0xFF, b'u', 0xFF];
/// Above every key of a state family.
const STATE_KEY_END: &[u8] = &[0xFF, 0xFF];
/// Expired sessions are swept when the registry clock enters a new period
/// of this length (a deterministic point: every node sweeps at the same
/// entry).
const SESSION_SWEEP_MS: u64 = 60 * 1000;

/// Log records a replica keeps, most recent first, so that an UPDATE
/// subscriber that falls behind can catch up instead of resyncing whole.
pub const REPLICA_RECENT_RECORDS: u64 = 100_000;

/// Encoded log entries sent in one AppendEntries stop once they reach
/// this (one entry may exceed it alone; it is then sent by itself).
pub const MAX_APPEND_BYTES: usize = 1 << 20;
const _: () = assert!(64 * MAX_APPEND_BYTES <= crate::peer::MAX_FRAME_BYTES);

/// Most state items in one snapshot chunk (Raft and log stream alike).
pub const SNAPSHOT_CHUNK_ITEMS: usize = 2048;
/// A snapshot chunk is closed once its items' encoded size reaches this, so
/// that a chunk's frame stays far below [`crate::peer::MAX_FRAME_BYTES`]
/// whatever the items (one item is bounded by the MUPDATE literal limits).
/// Snapshots have no total size limit: any registry size can be sent.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
const _: () = assert!(64 * SNAPSHOT_CHUNK_BYTES <= crate::peer::MAX_FRAME_BYTES);

/// Changes committed at one log index, as UPDATE streams and replicas see them.
#[derive(Debug, Clone)]
pub struct CommittedChanges {
    /// Log index of the entry that made the changes.
    pub index: u64,
    /// The changes, in order.
    pub changes: Vec<Change>,
}

/// One committed log entry as the log stream carries it: its id and, for a
/// registry command, the proposal (blank and membership entries carry none).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogRecord {
    /// The entry's log id.
    pub log_id: LogIdOf<TypeConfig>,
    /// The registry command with its client tag and stamp, if any.
    pub proposal: Option<Proposal>,
}

/// A mailbox name and its entry (`None`: it does not exist).
pub type NamedEntry = (String, Option<MailboxEntry>);

/// One item of the replicated state, as snapshots carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateItem {
    /// A mailbox.
    Mailbox(MailboxEntry),
    /// A client session's last request (see [`crate::model::ClientTag`]).
    Session(u64, SessionRecord),
    /// The registry clock.
    Clock(u64),
    /// A MUPDATE user, or the mark of a deleted one.
    User(String, StoredUser),
}

impl StateItem {
    fn key(&self) -> Vec<u8> {
        match self {
            StateItem::Mailbox(e) => cyrus_order_key(&e.name),
            StateItem::Session(id, _) => session_key(*id).to_vec(),
            StateItem::Clock(_) => KEY_CLOCK.to_vec(),
            StateItem::User(name, _) => user_key(name),
        }
    }

    fn value(&self) -> io::Result<Vec<u8>> {
        match self {
            StateItem::Mailbox(e) => encode(e),
            StateItem::Session(_, r) => encode(r),
            StateItem::Clock(c) => encode(c),
            StateItem::User(_, u) => encode(u),
        }
    }

    fn decode(key: &[u8], value: &[u8]) -> io::Result<StateItem> {
        if key == KEY_CLOCK {
            return Ok(StateItem::Clock(decode(value)?));
        }
        if let Some(id) = key.strip_prefix(SESSION_PREFIX) {
            let id = u64::from_be_bytes(id.try_into().map_err(codec_err)?);
            return Ok(StateItem::Session(id, decode(value)?));
        }
        if let Some(name) = key.strip_prefix(USER_PREFIX) {
            let name = String::from_utf8(name.to_vec()).map_err(codec_err)?;
            return Ok(StateItem::User(name, decode(value)?));
        }
        Ok(StateItem::Mailbox(decode(value)?))
    }
}

fn user_key(name: &str) -> Vec<u8> {
    [USER_PREFIX, name.as_bytes()].concat()
}

/// The location index key of mailbox `name` at `location`.
fn location_key(location: &str, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(LOCATION_PREFIX.len() + location.len() + 1 + name.len());
    k.extend_from_slice(LOCATION_PREFIX);
    k.extend_from_slice(location.as_bytes());
    k.push(0);
    k.extend(cyrus_order_key(name));
    k
}

fn session_key(id: u64) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[..2].copy_from_slice(SESSION_PREFIX);
    k[2..].copy_from_slice(&id.to_be_bytes());
    k
}

/// Events for followers of the committed state.
#[derive(Debug, Clone)]
pub enum StateEvent {
    /// New changes were applied.
    Changes(Arc<CommittedChanges>),
    /// The whole state was replaced by a snapshot: followers must resync.
    Reset,
}

fn superseded() -> io::Error {
    io::Error::other("a newer snapshot transfer took over the staging family")
}

fn codec_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

fn db_err(e: rocksdb::Error) -> io::Error {
    io::Error::other(e.to_string())
}

fn encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).map_err(codec_err)
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> io::Result<T> {
    bincode::serde::decode_from_slice(b, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(codec_err)
}

/// Block cache shared by the two state families (index and filter blocks
/// included, so their memory stays bounded whatever the registry's size).
const STATE_BLOCK_CACHE_BYTES: usize = 64 << 20;
/// The block cache in 4 shards of 16 MiB, each far above the largest
/// filter or index block of a table file.
const STATE_BLOCK_CACHE_SHARD_BITS: i32 = 2;

/// Options of the state families, tuned for point lookups (FIND, and the
/// mailbox and session lookups of every apply): a Bloom filter on every
/// SST file and on the memtable, so a lookup of a name that is not there
/// (every new mailbox, every new client session) skips the skip-list and
/// the files; and a block cache for the rest.
fn state_family_options() -> Options {
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    let mut cache = rocksdb::LruCacheOptions::default();
    cache.set_capacity(STATE_BLOCK_CACHE_BYTES);
    // A block larger than its cache shard is never kept. With the default
    // 64 shards (1 MiB each), the full filter block of a 64 MiB table file
    // (about 1.3 MiB) was read and checksummed again for every lookup: at
    // 2M mailboxes, 86% of a leader's CPU during a bulk load.
    cache.set_num_shard_bits(STATE_BLOCK_CACHE_SHARD_BITS);
    table.set_block_cache(&rocksdb::Cache::new_lru_cache_opts(&cache));
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    let mut opts = Options::default();
    opts.set_block_based_table_factory(&table);
    opts.set_memtable_whole_key_filtering(true);
    opts.set_memtable_prefix_bloom_ratio(0.05);
    opts
}

/// The registry's RocksDB database and its change broadcaster.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
    dir: PathBuf,
    events: broadcast::Sender<StateEvent>,
    applied: Arc<watch::Sender<u64>>,
    /// Which state family is live (mirrors `KEY_ACTIVE`).
    active: Arc<AtomicBool>,
    /// The transfer that owns the staging family (Raft snapshots): a newer
    /// one takes it over, and an older one still open finds out at its
    /// next chunk.
    staging: Arc<tokio::sync::Mutex<u64>>,
    /// The SST files of the snapshot being staged, when the staging family
    /// was empty at its start (see [`sst`]).
    stager: Arc<std::sync::Mutex<Option<sst::Stager>>>,
}

impl Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).finish()
    }
}

impl Store {
    /// Opens (or creates) the store under `dir`.
    pub fn open(dir: &Path) -> io::Result<Store> {
        std::fs::create_dir_all(dir)?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let state_opts = state_family_options();
        let cfs = [CF_LOGS, CF_RAFT, CF_STATE]
            .into_iter()
            .map(|n| ColumnFamilyDescriptor::new(n, Options::default()))
            .chain(
                CF_STATE_FAMILIES
                    .into_iter()
                    .map(|n| ColumnFamilyDescriptor::new(n, state_opts.clone())),
            );
        let db = DB::open_cf_descriptors(&opts, dir.join("db"), cfs).map_err(db_err)?;
        // Earlier builds kept a serialised snapshot here; the live state is
        // the snapshot now (see the module notes).
        let _ = std::fs::remove_file(dir.join("snapshot.bin"));
        // Files of a transfer cut short by a crash (never ingested).
        sst::clear_dir(&dir.join(STAGING_DIR))?;
        let (events, _) = broadcast::channel(4096);
        let store = Store {
            db: Arc::new(db),
            dir: dir.to_owned(),
            events,
            applied: Arc::new(watch::channel(0).0),
            active: Arc::default(),
            staging: Arc::default(),
            stager: Arc::default(),
        };
        let active: Option<bool> = store.get(CF_STATE, KEY_ACTIVE)?;
        store
            .active
            .store(active.unwrap_or(false), Ordering::Release);
        store.migrate_state_format()?;
        store.applied.send_replace(store.applied_index()?);
        Ok(store)
    }

    /// Re-keys a state written by an older build (mailboxes keyed by their
    /// name's bytes, no location index): staged and swapped in whole like a
    /// snapshot, so a crash half-way leaves the old state to start over from.
    fn migrate_state_format(&self) -> io::Result<()> {
        if self.get::<u32>(CF_STATE, KEY_STATE_FORMAT)? == Some(STATE_FORMAT) {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        let has_mailboxes = self
            .db
            .iterator_cf(self.state_cf(), IteratorMode::Start)
            .next()
            .transpose()
            .map_err(db_err)?
            .is_some_and(|(k, _)| k.as_ref() < MAILBOX_KEY_END);
        if has_mailboxes {
            tracing::info!("re-keying the registry state in Cyrus's order with a location index");
            self.begin_reset()?;
            let mut res = Ok(());
            self.scan_chunks(false, |part| match part {
                Ok(_) => true,
                Err(items) => {
                    res = self.put_entries(&items);
                    res.is_ok()
                }
            })?;
            res?;
            self.ingest_staged()?;
            let staged = !self.active.load(Ordering::Acquire);
            batch.put_cf(self.cf(CF_STATE), KEY_ACTIVE, encode(&staged)?);
            self.active.store(staged, Ordering::Release);
        }
        batch.put_cf(self.cf(CF_STATE), KEY_STATE_FORMAT, encode(&STATE_FORMAT)?);
        self.db.write(batch).map_err(db_err)?;
        self.sync_wal()
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        // The column families are created in `open`.
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    /// The live state family.
    fn state_cf(&self) -> &rocksdb::ColumnFamily {
        self.cf(CF_STATE_FAMILIES[self.active.load(Ordering::Acquire) as usize])
    }

    /// The live state family as of the point-in-time view `snap` (read from
    /// the view itself, so a swap cannot come between).
    fn live_family_in(&self, snap: &rocksdb::Snapshot<'_>) -> io::Result<&rocksdb::ColumnFamily> {
        let active: bool = match snap.get_cf(self.cf(CF_STATE), KEY_ACTIVE).map_err(db_err)? {
            Some(b) => decode(&b)?,
            None => false,
        };
        Ok(self.cf(CF_STATE_FAMILIES[active as usize]))
    }

    /// The family a replica stages a snapshot in.
    fn staging_cf(&self) -> &rocksdb::ColumnFamily {
        self.cf(CF_STATE_FAMILIES[!self.active.load(Ordering::Acquire) as usize])
    }

    fn get_state<T: DeserializeOwned>(&self, key: &[u8]) -> io::Result<Option<T>> {
        // Pinned: decoded straight from RocksDB's buffer, not copied first.
        match self
            .db
            .get_pinned_cf(self.state_cf(), key)
            .map_err(db_err)?
        {
            Some(b) => decode(&b).map(Some),
            None => Ok(None),
        }
    }

    fn get<T: DeserializeOwned>(&self, cf: &str, key: &[u8]) -> io::Result<Option<T>> {
        match self.db.get_cf(self.cf(cf), key).map_err(db_err)? {
            Some(b) => decode(&b).map(Some),
            None => Ok(None),
        }
    }

    fn put<T: Serialize>(&self, cf: &str, key: &[u8], v: &T) -> io::Result<()> {
        self.db.put_cf(self.cf(cf), key, encode(v)?).map_err(db_err)
    }

    /// Makes every write so far durable.
    fn sync_wal(&self) -> io::Result<()> {
        self.db.flush_wal(true).map_err(db_err)
    }

    /// Subscribes to applied changes. Subscribe before reading a dump so that
    /// no change falls between the two.
    pub fn subscribe(&self) -> broadcast::Receiver<StateEvent> {
        self.events.subscribe()
    }

    /// Number of current subscribers (UPDATE streams).
    pub fn subscriber_count(&self) -> usize {
        self.events.receiver_count()
    }

    /// Watches the applied index (the log stream waits on it).
    pub fn watch_applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// The mailbox named `name`.
    pub fn mailbox(&self, name: &str) -> io::Result<Option<MailboxEntry>> {
        let key = cyrus_order_key(name);
        if key.as_slice() >= MAILBOX_KEY_END {
            return Ok(None);
        }
        self.get_state(&key)
    }

    /// Whether the local state has applied log index `index` (so a read now
    /// sees every change up to it).
    pub fn applied_at_least(&self, index: u64) -> bool {
        *self.applied.borrow() >= index
    }

    /// What the registry holds under the user name `name`.
    pub fn user(&self, name: &str) -> io::Result<Option<StoredUser>> {
        self.get_state(&user_key(name))
    }

    /// Every user name the registry holds, deleted ones included, in name
    /// order. Users are few (backends, frontends, administrators).
    pub fn users(&self) -> io::Result<Vec<(String, StoredUser)>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.state_cf(),
            IteratorMode::From(USER_PREFIX, Direction::Forward),
        ) {
            let (k, v) = item.map_err(db_err)?;
            if k.as_ref() >= USER_KEY_END {
                break;
            }
            if let StateItem::User(name, user) = StateItem::decode(&k, &v)? {
                out.push((name, user));
            }
        }
        Ok(out)
    }

    /// Whether this store holds a state at all: anything applied, or a
    /// snapshot installed. A replica that never finished its first sync
    /// holds none and must not answer from it.
    pub fn has_state(&self) -> bool {
        *self.applied.borrow() > 0
    }

    /// Index of the last applied log entry (0 when none).
    pub fn applied_index(&self) -> io::Result<u64> {
        let applied: Option<Option<LogIdOf<TypeConfig>>> = self.get(CF_STATE, KEY_APPLIED)?;
        Ok(applied.flatten().map_or(0, |l| l.index()))
    }

    /// Every mailbox accepted by `keep`, in Cyrus's mailbox order, with the applied index
    /// of the same point-in-time view.
    pub fn scan(
        &self,
        mut keep: impl FnMut(&MailboxEntry) -> bool,
    ) -> io::Result<(u64, Vec<MailboxEntry>)> {
        let mut applied = 0;
        let mut out = Vec::new();
        self.scan_chunks(true, |part| {
            match part {
                Ok(meta) => applied = meta.last_log_id.map_or(0, |l| l.index()),
                Err(items) => out.extend(items.into_iter().filter_map(|i| match i {
                    StateItem::Mailbox(e) if keep(&e) => Some(e),
                    _ => None,
                })),
            }
            true
        })?;
        Ok((applied, out))
    }

    /// The mailboxes whose location starts with `prefix` (MUPDATE's LIST),
    /// in Cyrus's mailbox order: read through the location index, so the
    /// cost follows the answer, not the registry.
    pub fn list_location(&self, prefix: &str) -> io::Result<Vec<MailboxEntry>> {
        if prefix.is_empty() {
            return Ok(self.scan(|_| true)?.1);
        }
        let snap = self.db.snapshot();
        let family = self.live_family_in(&snap)?;
        let mut start = LOCATION_PREFIX.to_vec();
        start.extend_from_slice(prefix.as_bytes());
        let mut found = Vec::new();
        for item in snap.iterator_cf(family, IteratorMode::From(&start, Direction::Forward)) {
            let (k, v) = item.map_err(db_err)?;
            if !k.starts_with(&start) {
                break;
            }
            let at = k[start.len()..]
                .iter()
                .position(|&b| b == 0)
                .ok_or_else(|| codec_err("bad location index key"))?;
            found.push((k[start.len() + at + 1..].to_vec(), decode(&v)?));
        }
        // Several locations may match: their names merge in key order.
        found.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(found.into_iter().map(|(_, e)| e).collect())
    }

    /// The mailboxes whose name starts with `prefix`, in Cyrus's order: a
    /// name prefix is a key prefix, so the cost follows the answer.
    pub fn list_names(&self, prefix: &str) -> io::Result<Vec<MailboxEntry>> {
        let start = cyrus_order_key(prefix);
        let snap = self.db.snapshot();
        let family = self.live_family_in(&snap)?;
        let mut out = Vec::new();
        for item in snap.iterator_cf(family, IteratorMode::From(&start, Direction::Forward)) {
            let (k, v) = item.map_err(db_err)?;
            if !k.starts_with(&start) || k.as_ref() >= MAILBOX_KEY_END {
                break;
            }
            out.push(decode(&v)?);
        }
        Ok(out)
    }

    /// Walks the state of one point-in-time view in chunks of at most
    /// [`SNAPSHOT_CHUNK_ITEMS`] items and about [`SNAPSHOT_CHUNK_BYTES`], in
    /// key order (only the mailboxes with `mailboxes_only`, else sessions
    /// and the clock too): `each` gets the view's applied log id and
    /// membership first (`Ok(meta)`), then the chunks (`Err(items)`), and
    /// stops the walk by returning `false`. Memory stays bounded by one
    /// chunk.
    pub fn scan_chunks(
        &self,
        mailboxes_only: bool,
        mut each: impl FnMut(Result<SnapshotMetaOf<TypeConfig>, Vec<StateItem>>) -> bool,
    ) -> io::Result<()> {
        let snap = self.db.snapshot();
        let family = self.live_family_in(&snap)?;
        let end = if mailboxes_only {
            MAILBOX_KEY_END
        } else {
            STATE_KEY_END
        };
        let read = |key: &[u8]| snap.get_cf(self.cf(CF_STATE), key).map_err(db_err);
        let meta = SnapshotMetaOf::<TypeConfig> {
            last_log_id: match read(KEY_APPLIED)? {
                Some(b) => decode(&b)?,
                None => None,
            },
            last_membership: match read(KEY_MEMBERSHIP)? {
                Some(b) => decode(&b)?,
                None => Default::default(),
            },
        };
        if !each(Ok(meta)) {
            return Ok(());
        }
        let mut out = Vec::with_capacity(SNAPSHOT_CHUNK_ITEMS);
        let mut bytes = 0;
        let mut it = snap.raw_iterator_cf(family);
        it.seek_to_first();
        loop {
            let Some((k, v)) = it.item() else {
                it.status().map_err(db_err)?;
                break;
            };
            if k >= end {
                break;
            }
            // The index is derived, never sent: jump over it.
            if k.starts_with(LOCATION_PREFIX) {
                it.seek(LOCATION_END);
                continue;
            }
            out.push(StateItem::decode(k, v)?);
            bytes += k.len() + v.len();
            it.next();
            if out.len() >= SNAPSHOT_CHUNK_ITEMS || bytes >= SNAPSHOT_CHUNK_BYTES {
                bytes = 0;
                let full = std::mem::replace(&mut out, Vec::with_capacity(SNAPSHOT_CHUNK_ITEMS));
                if !each(Err(full)) {
                    return Ok(());
                }
            }
        }
        if !out.is_empty() {
            each(Err(out));
        }
        Ok(())
    }

    /// Opens a point-in-time view of the whole state as a Raft snapshot:
    /// its metadata now, its chunks as [`StateView::next_chunk`] asks for
    /// them. A blocking thread holds the view and stays at most one chunk
    /// ahead of the reader; dropping the [`StateView`] ends it.
    pub async fn open_view(&self) -> io::Result<(SnapshotMetaOf<TypeConfig>, StateView)> {
        let (meta_tx, meta_rx) = oneshot::channel();
        let (tx, rx) = mpsc::channel(1);
        let s = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut meta_tx = Some(meta_tx);
            let res = s.scan_chunks(false, |part| match part {
                Ok(meta) => meta_tx.take().is_some_and(|t| t.send(Ok(meta)).is_ok()),
                Err(items) => tx.blocking_send(Ok(items)).is_ok(),
            });
            if let Err(e) = res {
                match meta_tx.take() {
                    Some(t) => drop(t.send(Err(e))),
                    None => drop(tx.blocking_send(Err(e))),
                }
            }
        });
        let meta = meta_rx
            .await
            .map_err(|_| io::Error::other("the snapshot view ended early"))??;
        Ok((meta, StateView { chunks: rx }))
    }

    /// Committed log entries from index `from` up to `to` (inclusive), at
    /// most `max` of them; `None` when `from` has been compacted away (the
    /// reader then needs a snapshot). Only call with `to` at or below the
    /// applied index: those entries are committed and never change.
    pub fn committed_records(
        &self,
        from: u64,
        to: u64,
        max: usize,
    ) -> io::Result<Option<Vec<LogRecord>>> {
        let installed: u64 = self.get(CF_STATE, KEY_INSTALLED_SNAPSHOT)?.unwrap_or(0);
        if from <= installed {
            return Ok(None);
        }
        let mut out = Vec::new();
        let key = index_key(from);
        for item in self.db.iterator_cf(
            self.cf(CF_LOGS),
            IteratorMode::From(&key, Direction::Forward),
        ) {
            let (k, v) = item.map_err(db_err)?;
            let idx = u64::from_be_bytes(k.as_ref().try_into().map_err(codec_err)?);
            if idx > to || out.len() >= max {
                break;
            }
            // A gap means a purge ran under us: the rest must come by snapshot.
            if idx != from + out.len() as u64 {
                return Ok(None);
            }
            let e: EntryOf<TypeConfig> = decode(&v)?;
            let proposal = match e.payload {
                EntryPayload::Normal(p) => Some(p),
                _ => None,
            };
            out.push(LogRecord {
                log_id: e.log_id,
                proposal,
            });
        }
        Ok(if out.is_empty() { None } else { Some(out) })
    }

    /// The current entry (or `None`: deleted) of every mailbox that the
    /// committed log entries `from..=to` touched, for an UPDATE subscriber
    /// that missed them; `None` when part of that range was compacted away.
    pub fn entries_touched(&self, from: u64, to: u64) -> io::Result<Option<Vec<NamedEntry>>> {
        let mut names = std::collections::BTreeSet::new();
        let mut next = from;
        while next <= to {
            let Some(records) = self.committed_records(next, to, 4096)? else {
                return Ok(None);
            };
            for r in &records {
                if let Some(p) = &r.proposal {
                    p.command.for_each_mailbox(&mut |n| {
                        names.insert(n.to_owned());
                    });
                }
            }
            next = records.last().map_or(to + 1, |r| r.log_id.index() + 1);
        }
        names
            .into_iter()
            .map(|n| {
                let e = self.mailbox(&n)?;
                Ok((n, e))
            })
            .collect::<io::Result<Vec<_>>>()
            .map(Some)
    }

    /// Starts staging a master's snapshot (replicas): empties the staging
    /// family. Readers keep seeing the live state until
    /// [`Store::finish_reset`] swaps the staged one in; a replica that stops
    /// half-way keeps its old state and simply asks again.
    ///
    /// The staging family is emptied with a range deletion, which spares
    /// the point-in-time views still reading it (a snapshot being sent from
    /// the state before the last swap), then compacted so that the keys no
    /// view holds are gone. An empty family takes the snapshot as SST files,
    /// ingested at the swap ([`sst`]); one that a view still holds takes it
    /// through the memtable.
    pub fn begin_reset(&self) -> io::Result<()> {
        let mut stager = self.lock_stager();
        // An older transfer's files go with it.
        *stager = None;
        let cf = self.staging_cf();
        if !self.family_is_empty(cf)? {
            self.db
                .delete_range_cf(cf, b"".as_slice(), STATE_KEY_END)
                .map_err(db_err)?;
            let mut opts = rocksdb::CompactOptions::default();
            // Down to and through the bottom level, where ingested files sit.
            opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
            self.db
                .compact_range_cf_opt(cf, None::<&[u8]>, None::<&[u8]>, &opts);
        }
        if self.family_is_empty(cf)? {
            *stager = Some(sst::Stager::new(&self.dir.join(STAGING_DIR))?);
        }
        Ok(())
    }

    /// True when `cf` holds nothing at all: no key, no file, no memtable
    /// entry (a range deletion included), so that files ingested into it
    /// land in its bottom level.
    fn family_is_empty(&self, cf: &rocksdb::ColumnFamily) -> io::Result<bool> {
        let property = |name: &rocksdb::properties::PropName| {
            self.db
                .property_int_value_cf(cf, name)
                .map_err(db_err)
                .map(|v| v.unwrap_or(0))
        };
        let no_key = self
            .db
            .iterator_cf(cf, IteratorMode::Start)
            .next()
            .transpose()
            .map_err(db_err)?
            .is_none();
        Ok(no_key
            && property(rocksdb::properties::TOTAL_SST_FILES_SIZE)? == 0
            && property(rocksdb::properties::NUM_ENTRIES_ACTIVE_MEM_TABLE)? == 0
            && property(rocksdb::properties::NUM_ENTRIES_IMM_MEM_TABLES)? == 0)
    }

    fn lock_stager(&self) -> std::sync::MutexGuard<'_, Option<sst::Stager>> {
        // A panic mid-chunk leaves at worst a file that the next transfer
        // drops: the guarded value is still usable.
        self.stager
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes one chunk of a snapshot begun with [`Store::begin_reset`].
    /// Items out of key order (never sent by a sound master) still land,
    /// through the memtable.
    pub fn put_entries(&self, items: &[StateItem]) -> io::Result<()> {
        let mut stager = self.lock_stager();
        let mut batch = WriteBatch::default();
        let cf = self.staging_cf();
        for i in items {
            let value = i.value()?;
            let key = i.key();
            if let StateItem::Mailbox(e) = i {
                let index_key = location_key(&e.location, &e.name);
                let staged = match stager.as_mut() {
                    Some(s) => s.put_index(e.location.as_bytes(), &index_key, &value)?,
                    None => false,
                };
                if !staged {
                    batch.put_cf(cf, index_key, &value);
                }
                if let Some(s) = stager.as_mut() {
                    if s.put_key(&key, &value)? {
                        continue;
                    }
                }
            }
            batch.put_cf(cf, key, value);
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.db.write(batch).map_err(db_err)
    }

    /// Ingests the staged SST files, if any, into the staging family: the
    /// step before the swap. Durable on return (ingestion syncs the files
    /// and the manifest); still invisible until the swap.
    fn ingest_staged(&self) -> io::Result<()> {
        let Some(stager) = self.lock_stager().take() else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        stager.ingest(&self.db, self.staging_cf())?;
        metrics::histogram!("corvid_snapshot_ingest_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Starts receiving a Raft snapshot into the staging family, taking it
    /// over from any older transfer; returns this transfer's generation.
    pub async fn begin_staging(&self) -> io::Result<u64> {
        let mut owner = self.staging.clone().lock_owned().await;
        *owner += 1;
        let generation = *owner;
        let s = self.clone();
        tokio::task::spawn_blocking(move || {
            let _owner = owner;
            s.begin_reset()
        })
        .await
        .map_err(io::Error::other)??;
        Ok(generation)
    }

    /// Writes one chunk of the Raft snapshot transfer `generation`; an
    /// error once a newer transfer took the staging family over.
    pub async fn stage_chunk(&self, generation: u64, items: Vec<StateItem>) -> io::Result<()> {
        let owner = self.staging.clone().lock_owned().await;
        if *owner != generation {
            return Err(superseded());
        }
        let s = self.clone();
        tokio::task::spawn_blocking(move || {
            let _owner = owner;
            s.put_entries(&items)
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Completes a snapshot: in one write, the staged state becomes the live
    /// one, as of the master's `log_id`, and the recent records kept before
    /// it are dropped. Subscribers get [`StateEvent::Reset`].
    pub fn finish_reset(&self, log_id: Option<LogIdOf<TypeConfig>>) -> io::Result<()> {
        self.swap_in_staged(log_id, |batch| {
            batch.delete_range_cf(self.cf(CF_LOGS), index_key(0), index_key(u64::MAX));
            Ok(())
        })
    }

    /// Completes a Raft snapshot received from a leader (see
    /// [`SnapshotData::Staged`]): the staged state becomes the live one, in
    /// one write with the snapshot's membership. The Raft log is openraft's
    /// to purge or keep.
    fn install_staged(&self, meta: &SnapshotMetaOf<TypeConfig>) -> io::Result<()> {
        self.swap_in_staged(meta.last_log_id, |batch| {
            batch.put_cf(
                self.cf(CF_STATE),
                KEY_MEMBERSHIP,
                encode(&meta.last_membership)?,
            );
            Ok(())
        })
    }

    /// The one atomic swap of the staged family into the live one, as of
    /// `log_id`, with whatever `more` adds to the same write; fsynced.
    fn swap_in_staged(
        &self,
        log_id: Option<LogIdOf<TypeConfig>>,
        more: impl FnOnce(&mut WriteBatch) -> io::Result<()>,
    ) -> io::Result<()> {
        self.ingest_staged()?;
        let staged = !self.active.load(Ordering::Acquire);
        let index = log_id.as_ref().map_or(0, |l| l.index());
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_STATE), KEY_APPLIED, encode(&log_id)?);
        batch.put_cf(self.cf(CF_STATE), KEY_ACTIVE, encode(&staged)?);
        batch.put_cf(self.cf(CF_STATE), KEY_INSTALLED_SNAPSHOT, encode(&index)?);
        more(&mut batch)?;
        self.db.write(batch).map_err(db_err)?;
        self.sync_wal()?;
        self.active.store(staged, Ordering::Release);
        self.applied.send_replace(index);
        let _ = self.events.send(StateEvent::Reset);
        Ok(())
    }

    /// Keeps `records` (received on a log stream) as the replica's recent
    /// log, dropping what is older than the last [`REPLICA_RECENT_RECORDS`].
    pub fn keep_records(&self, records: &[LogRecord]) -> io::Result<()> {
        let Some(last) = records.last().map(|r| r.log_id.index()) else {
            return Ok(());
        };
        let mut batch = WriteBatch::default();
        let cf = self.cf(CF_LOGS);
        for r in records {
            let entry = match &r.proposal {
                Some(p) => EntryOf::<TypeConfig>::new_normal(r.log_id, p.clone()),
                None => EntryOf::<TypeConfig>::new_blank(r.log_id),
            };
            batch.put_cf(cf, index_key(r.log_id.index()), encode(&entry)?);
        }
        if last > REPLICA_RECENT_RECORDS {
            batch.delete_range_cf(cf, index_key(0), index_key(last - REPLICA_RECENT_RECORDS));
        }
        self.db.write(batch).map_err(db_err)
    }

    /// Size of the live data on disk, for metrics.
    pub fn disk_bytes(&self) -> u64 {
        self.db
            .property_int_value(rocksdb::properties::TOTAL_SST_FILES_SIZE)
            .ok()
            .flatten()
            .unwrap_or(0)
    }
}

impl MailboxLookup for Store {
    type Error = io::Error;
    fn mailbox(&self, name: &str) -> io::Result<Option<MailboxEntry>> {
        Store::mailbox(self, name)
    }
}

impl UserLookup for Store {
    fn user(&self, name: &str) -> io::Result<Option<StoredUser>> {
        Store::user(self, name)
    }
}

impl RegistryState for Store {
    fn session(&self, id: u64) -> io::Result<Option<SessionRecord>> {
        self.get_state(&session_key(id))
    }

    fn clock_ms(&self) -> io::Result<u64> {
        Ok(self.get_state(KEY_CLOCK)?.unwrap_or(0))
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// The Raft log in RocksDB.
#[derive(Debug, Clone)]
pub struct LogStore {
    store: Store,
    /// Makes appends durable, one fsync at a time (group commit).
    syncer: Arc<WalSyncer>,
    /// TEST ONLY (see [`crate::raft::RaftSettings::unsafe_test_ack_before_fsync`]).
    unsafe_ack_before_fsync: bool,
}

impl LogStore {
    /// The log of `store`.
    pub fn new(store: Store) -> Self {
        LogStore {
            syncer: Arc::new(WalSyncer::start(store.clone())),
            store,
            unsafe_ack_before_fsync: false,
        }
    }

    /// WAL fsyncs this log has done for its appends so far.
    pub fn wal_fsyncs(&self) -> u64 {
        self.syncer.syncs.load(Ordering::Relaxed)
    }

    /// TEST ONLY, BREAKS DURABILITY: appends are reported durable to
    /// openraft as soon as they are written, and the WAL is not fsynced
    /// for them at all, so a power loss loses acknowledged entries.
    pub fn with_unsafe_ack_before_fsync(mut self, on: bool) -> Self {
        self.unsafe_ack_before_fsync = on;
        self
    }
}

/// An append written to the WAL and waiting for its fsync.
struct PendingSync {
    entries: u64,
    callback: IOFlushed<TypeConfig>,
}

/// Group commit: a thread that keeps one WAL fsync in flight at a time.
/// An append writes its entries without syncing and queues its callback;
/// the thread takes everything queued, syncs once (which covers every
/// write made before the sync started, so all of the taken appends), then
/// completes the callbacks in append order. While one sync runs, the next
/// appends queue up behind it and share the next one, so concurrent writes
/// cost one fsync per round instead of one each, and fsyncs never overlap.
struct WalSyncer {
    queue: Option<std::sync::mpsc::Sender<PendingSync>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Fsyncs done so far (the metric is global; tests read this one).
    syncs: Arc<AtomicU64>,
}

impl Debug for WalSyncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalSyncer").finish_non_exhaustive()
    }
}

impl WalSyncer {
    fn start(store: Store) -> WalSyncer {
        let (tx, rx) = std::sync::mpsc::channel::<PendingSync>();
        let syncs = Arc::new(AtomicU64::new(0));
        let counted = syncs.clone();
        let thread = std::thread::Builder::new()
            .name("corvid-wal-sync".into())
            .spawn(move || {
                let mut round = Vec::new();
                // Ends when the last LogStore is dropped, after syncing
                // what was queued before.
                while let Ok(first) = rx.recv() {
                    round.push(first);
                    round.extend(rx.try_iter());
                    let started = std::time::Instant::now();
                    let res = store.sync_wal();
                    counted.fetch_add(1, Ordering::Relaxed);
                    metrics::histogram!("corvid_disk_wal_fsync_duration_seconds")
                        .record(started.elapsed().as_secs_f64());
                    let entries: u64 = round.iter().map(|p| p.entries).sum();
                    metrics::counter!("corvid_raft_log_entries_appended_total").increment(entries);
                    for p in round.drain(..) {
                        let r = match &res {
                            Ok(()) => Ok(()),
                            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                        };
                        p.callback.io_completed(r);
                    }
                }
            })
            .expect("spawning the WAL sync thread");
        WalSyncer {
            queue: Some(tx),
            thread: Some(thread),
            syncs,
        }
    }

    /// Queues `callback` for the next fsync; the append's entries must
    /// already be written.
    fn push(&self, entries: u64, callback: IOFlushed<TypeConfig>) -> io::Result<()> {
        let queue = self.queue.as_ref().expect("set until drop");
        queue
            .send(PendingSync { entries, callback })
            .map_err(|_| io::Error::other("the WAL sync thread is gone"))
    }
}

impl Drop for WalSyncer {
    fn drop(&mut self) {
        // Closing the queue stops the thread once it has synced what was
        // queued; waiting for it means the database is closed once the
        // last handle is gone, so it can be reopened at once.
        self.queue.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl LogStore {
    /// The stored entries in `range`, in order, up to the first one that
    /// brings their encoded size to `max_bytes` (always at least one).
    fn read_entries<RB: RangeBounds<u64>>(
        &self,
        range: RB,
        max_bytes: usize,
    ) -> io::Result<Vec<EntryOf<TypeConfig>>> {
        let start = match range.start_bound() {
            std::ops::Bound::Included(x) => *x,
            std::ops::Bound::Excluded(x) => x.saturating_add(1),
            std::ops::Bound::Unbounded => 0,
        };
        let s = &self.store;
        let mut out = Vec::new();
        let mut bytes = 0;
        let key = index_key(start);
        for item in
            s.db.iterator_cf(s.cf(CF_LOGS), IteratorMode::From(&key, Direction::Forward))
        {
            let (k, v) = item.map_err(db_err)?;
            let idx = u64::from_be_bytes(k.as_ref().try_into().map_err(codec_err)?);
            if !range.contains(&idx) || bytes >= max_bytes {
                break;
            }
            bytes += v.len();
            out.push(decode(&v)?);
        }
        Ok(out)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<EntryOf<TypeConfig>>> {
        self.read_entries(range, usize::MAX)
    }

    /// What openraft sends in one AppendEntries: bounded by bytes as well
    /// as by its count of entries, since one entry may carry many commands
    /// (a bulk load's hundreds): a payload of tens of megabytes would hold
    /// up the heartbeats behind it until the follower's election timer ran
    /// out.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> io::Result<Vec<EntryOf<TypeConfig>>> {
        self.read_entries(start..end, MAX_APPEND_BYTES)
    }

    async fn read_vote(&mut self) -> io::Result<Option<VoteOf<TypeConfig>>> {
        self.store.get(CF_RAFT, KEY_VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let s = &self.store;
        let last = match s.db.iterator_cf(s.cf(CF_LOGS), IteratorMode::End).next() {
            Some(item) => {
                let (_, v) = item.map_err(db_err)?;
                let e: EntryOf<TypeConfig> = decode(&v)?;
                Some(e.log_id())
            }
            None => None,
        };
        let last_purged_log_id: Option<LogIdOf<TypeConfig>> = s.get(CF_RAFT, KEY_PURGED)?;
        Ok(LogState {
            last_log_id: last.or(last_purged_log_id),
            last_purged_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<TypeConfig>) -> io::Result<()> {
        self.store.put(CF_RAFT, KEY_VOTE, vote)?;
        let s = self.store.clone();
        tokio::task::spawn_blocking(move || s.sync_wal())
            .await
            .map_err(io::Error::other)?
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<TypeConfig>>) -> io::Result<()> {
        // Not fsynced: if lost, openraft waits for the next commit (see
        // `wait_for_recovery` at start-up) before reads are served.
        self.store.put(CF_RAFT, KEY_COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogIdOf<TypeConfig>>> {
        Ok(self
            .store
            .get::<Option<LogIdOf<TypeConfig>>>(CF_RAFT, KEY_COMMITTED)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = EntryOf<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let s = &self.store;
        let mut batch = WriteBatch::default();
        let mut count = 0u64;
        for e in entries {
            batch.put_cf(s.cf(CF_LOGS), index_key(e.index()), encode(&e)?);
            count += 1;
        }
        s.db.write(batch).map_err(db_err)?;
        if self.unsafe_ack_before_fsync {
            // TEST ONLY: the entries are in the page cache, nowhere safer.
            metrics::counter!("corvid_raft_log_entries_appended_total").increment(count);
            callback.io_completed(Ok(()));
            return Ok(());
        }
        self.syncer.push(count, callback)
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<TypeConfig>>) -> io::Result<()> {
        let from = last_log_id.map_or(0, |l| l.index() + 1);
        let s = &self.store;
        s.db.delete_range_cf(s.cf(CF_LOGS), index_key(from), index_key(u64::MAX))
            .map_err(db_err)?;
        // Truncated entries are uncommitted; make the cut durable anyway so a
        // restart never resurrects them beside newer appends.
        s.sync_wal()
    }

    async fn purge(&mut self, log_id: LogIdOf<TypeConfig>) -> io::Result<()> {
        let s = &self.store;
        // Record the purge point first: entries at or below it are ignored.
        s.put(CF_RAFT, KEY_PURGED, &log_id)?;
        s.db.delete_range_cf(s.cf(CF_LOGS), index_key(0), index_key(log_id.index() + 1))
            .map_err(db_err)
    }
}

/// The registry state machine in RocksDB.
#[derive(Debug, Clone)]
pub struct StateMachine {
    store: Store,
}

impl StateMachine {
    /// The state machine of `store`.
    pub fn new(store: Store) -> Self {
        StateMachine { store }
    }

    fn stored_membership(&self) -> io::Result<StoredMembershipOf<TypeConfig>> {
        Ok(self
            .store
            .get(CF_STATE, KEY_MEMBERSHIP)?
            .unwrap_or_default())
    }
}

/// Committed entries being applied in log order with the one
/// [`crate::model::apply_proposal`]: each command sees the changes of the
/// ones before it, and [`ApplyBatch::commit`] writes them all, with the
/// applied log id, in one atomic RocksDB write. The Raft state machine and
/// replicas both apply through it, so they cannot disagree on what a command
/// does, nor on which requests were duplicates.
pub struct ApplyBatch<'a> {
    store: &'a Store,
    overlay: std::collections::HashMap<String, Option<MailboxEntry>>,
    users: std::collections::HashMap<String, StoredUser>,
    sessions: std::collections::HashMap<u64, SessionRecord>,
    /// The registry clock when the batch started, and now.
    clock_at_start: u64,
    clock: u64,
    batch: WriteBatch,
    committed: Vec<CommittedChanges>,
    last: Option<LogIdOf<TypeConfig>>,
    membership: Option<StoredMembershipOf<TypeConfig>>,
}

impl MailboxLookup for ApplyBatch<'_> {
    type Error = io::Error;
    fn mailbox(&self, name: &str) -> io::Result<Option<MailboxEntry>> {
        match self.overlay.get(name) {
            Some(e) => Ok(e.clone()),
            None => self.store.mailbox(name),
        }
    }
}

impl UserLookup for ApplyBatch<'_> {
    fn user(&self, name: &str) -> io::Result<Option<StoredUser>> {
        match self.users.get(name) {
            Some(u) => Ok(Some(u.clone())),
            None => self.store.user(name),
        }
    }
}

impl RegistryState for ApplyBatch<'_> {
    fn session(&self, id: u64) -> io::Result<Option<SessionRecord>> {
        match self.sessions.get(&id) {
            Some(r) => Ok(Some(r.clone())),
            None => self.store.session(id),
        }
    }

    fn clock_ms(&self) -> io::Result<u64> {
        Ok(self.clock)
    }
}

impl<'a> ApplyBatch<'a> {
    /// An empty batch on `store`.
    pub fn new(store: &'a Store) -> io::Result<Self> {
        let clock = store.clock_ms()?;
        Ok(ApplyBatch {
            store,
            overlay: Default::default(),
            users: Default::default(),
            sessions: Default::default(),
            clock_at_start: clock,
            clock,
            batch: WriteBatch::default(),
            committed: Vec::new(),
            last: None,
            membership: None,
        })
    }

    /// Applies the entry `log_id`; `proposal` is `None` for entries that
    /// carry no registry command.
    pub fn entry(
        &mut self,
        log_id: LogIdOf<TypeConfig>,
        proposal: Option<&Proposal>,
    ) -> io::Result<Outcome> {
        let index = log_id.index();
        self.last = Some(log_id);
        let Some(proposal) = proposal else {
            return Ok(Outcome::Done);
        };
        let result = apply_proposal(&*self, index, proposal)?;
        if result.duplicate {
            metrics::counter!("corvid_registry_duplicate_requests_total").increment(1);
        }
        self.clock = result.clock_ms;
        if let Some((id, record)) = result.session {
            self.sessions.insert(id, record);
        }
        let applied = result.applied;
        let store = self.store;
        let cf = store.state_cf();
        for change in &applied.changes {
            match change {
                Change::Put {
                    entry: e,
                    previous_location,
                } => {
                    let value = encode(e)?;
                    if let Some(old) = previous_location.as_ref().filter(|l| **l != e.location) {
                        self.batch.delete_cf(cf, location_key(old, &e.name));
                    }
                    self.batch
                        .put_cf(cf, location_key(&e.location, &e.name), &value);
                    self.batch.put_cf(cf, cyrus_order_key(&e.name), value);
                    self.overlay.insert(e.name.clone(), Some(e.clone()));
                }
                Change::Removed {
                    name,
                    previous_location,
                    ..
                } => {
                    self.batch.delete_cf(cf, cyrus_order_key(name));
                    self.batch
                        .delete_cf(cf, location_key(previous_location, name));
                    self.overlay.insert(name.clone(), None);
                }
            }
        }
        for (name, user) in &applied.users {
            self.batch.put_cf(cf, user_key(name), encode(user)?);
            self.users.insert(name.clone(), user.clone());
        }
        if !applied.changes.is_empty() {
            self.committed.push(CommittedChanges {
                index,
                changes: applied.changes,
            });
        }
        Ok(applied.outcome)
    }

    /// Records a membership change applied at its entry.
    fn membership(&mut self, m: StoredMembershipOf<TypeConfig>) {
        self.membership = Some(m);
    }

    /// Deletes the sessions that expired by the registry clock. Runs when
    /// the clock enters a new sweep period, which every node reaches at the
    /// same entry; an expired session is ignored by lookups anyway, so the
    /// sweep only reclaims space.
    fn sweep_sessions(&mut self) -> io::Result<()> {
        if self.clock / SESSION_SWEEP_MS == self.clock_at_start / SESSION_SWEEP_MS {
            return Ok(());
        }
        let cf = self.store.state_cf();
        let mut end = SESSION_PREFIX.to_vec();
        end.push(0xFF);
        let mut swept = 0u64;
        for item in self
            .store
            .db
            .iterator_cf(cf, IteratorMode::From(SESSION_PREFIX, Direction::Forward))
        {
            let (k, v) = item.map_err(db_err)?;
            if !k.starts_with(SESSION_PREFIX) {
                break;
            }
            let StateItem::Session(id, record) = StateItem::decode(&k, &v)? else {
                continue;
            };
            if record.expired(self.clock) && !self.sessions.contains_key(&id) {
                self.batch.delete_cf(cf, &k);
                swept += 1;
            }
        }
        metrics::counter!("corvid_registry_sessions_expired_total").increment(swept);
        Ok(())
    }

    /// Writes everything applied so far (not fsynced: the log it came from
    /// is durable, see the module notes), then tells subscribers. Returns
    /// the last applied log id, `None` when the batch was empty.
    pub fn commit(mut self) -> io::Result<Option<LogIdOf<TypeConfig>>> {
        if self.last.is_none() {
            return Ok(None);
        }
        self.sweep_sessions()?;
        let ApplyBatch {
            store,
            mut batch,
            committed,
            last,
            membership,
            sessions,
            clock,
            clock_at_start,
            ..
        } = self;
        let cf = store.state_cf();
        for (id, record) in &sessions {
            batch.put_cf(cf, session_key(*id), encode(record)?);
        }
        if clock != clock_at_start {
            batch.put_cf(cf, KEY_CLOCK, encode(&clock)?);
        }
        batch.put_cf(store.cf(CF_STATE), KEY_APPLIED, encode(&last)?);
        if let Some(m) = &membership {
            batch.put_cf(store.cf(CF_STATE), KEY_MEMBERSHIP, encode(m)?);
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(false);
        store.db.write_opt(batch, &wo).map_err(db_err)?;
        let last = last.expect("checked above");
        // Only once the changes are readable, so a client's next FIND sees
        // its own write; and before the applied index moves, so whoever
        // waits for that index (a NOOP on an UPDATE stream) finds the
        // changes already queued.
        for c in committed {
            let _ = store.events.send(StateEvent::Changes(Arc::new(c)));
        }
        store.applied.send_replace(last.index());
        Ok(Some(last))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> io::Result<(Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>)> {
        let applied = self
            .store
            .get::<Option<LogIdOf<TypeConfig>>>(CF_STATE, KEY_APPLIED)?
            .flatten();
        Ok((applied, self.stored_membership()?))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        let store = self.store.clone();
        let mut batch = ApplyBatch::new(&store)?;
        let mut replies = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            let command = match &entry.payload {
                EntryPayload::Normal(cmd) => Some(cmd),
                EntryPayload::Membership(m) => {
                    batch.membership(StoredMembershipOf::<TypeConfig>::new(
                        Some(entry.log_id()),
                        m.clone(),
                    ));
                    None
                }
                EntryPayload::Blank => None,
            };
            let outcome = batch.entry(entry.log_id(), command)?;
            if let Some(r) = responder {
                replies.push((r, outcome));
            }
        }
        if let Some(last) = batch.commit()? {
            metrics::gauge!("corvid_raft_applied_index").set(last.index() as f64);
        }
        for (r, outcome) in replies {
            r.send(outcome);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: Self::SnapshotData,
    ) -> io::Result<()> {
        let generation = match snapshot {
            SnapshotData::Staged(generation) => generation,
            // The state itself is the snapshot (see `get_current_snapshot`):
            // a view of it is installed already, and nothing else can be.
            SnapshotData::View(_) => {
                let applied = self
                    .store
                    .get::<Option<LogIdOf<TypeConfig>>>(CF_STATE, KEY_APPLIED)?
                    .flatten();
                return if applied == meta.last_log_id {
                    Ok(())
                } else {
                    Err(codec_err("a snapshot view cannot be installed elsewhere"))
                };
            }
        };
        let owner = self.store.staging.clone().lock_owned().await;
        if *owner != generation {
            return Err(superseded());
        }
        let s = self.store.clone();
        let meta2 = meta.clone();
        tokio::task::spawn_blocking(move || {
            let _owner = owner;
            s.install_staged(&meta2)
        })
        .await
        .map_err(io::Error::other)??;
        metrics::counter!("corvid_snapshot_installs_total").increment(1);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> io::Result<Option<SnapshotOf<TypeConfig, Self::SnapshotData>>> {
        // The live state is always the current snapshot: a fresh view of it
        // covers everything applied, so every compacted entry too.
        let (meta, view) = self.store.open_view().await?;
        if meta.last_log_id.is_none() {
            return Ok(None);
        }
        Ok(Some(SnapshotOf::<TypeConfig, _> {
            meta,
            snapshot: SnapshotData::View(view),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;

    /// Opens a view: nothing is serialised or copied.
    async fn build_snapshot(&mut self) -> io::Result<SnapshotOf<TypeConfig, Self::SnapshotData>> {
        let started = std::time::Instant::now();
        let (meta, view) = self
            .store
            .open_view()
            .await
            .inspect_err(|_| crate::metrics::snapshot_failed("build"))?;
        metrics::counter!("corvid_snapshot_builds_total").increment(1);
        metrics::histogram!("corvid_snapshot_build_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(SnapshotOf::<TypeConfig, _> {
            meta,
            snapshot: SnapshotData::View(view),
        })
    }
}

/// A Raft snapshot as a node holds it: never the state's bytes in memory.
#[derive(Debug)]
pub enum SnapshotData {
    /// A point-in-time view of this node's state, read chunk by chunk as it
    /// is sent to a follower.
    View(StateView),
    /// Received from a leader into the staging family by the transfer of
    /// this generation (see [`Store::begin_staging`]); installing it swaps
    /// it in.
    Staged(u64),
}

/// A point-in-time view of the state being read (see [`Store::open_view`]).
#[derive(Debug)]
pub struct StateView {
    chunks: mpsc::Receiver<io::Result<Vec<StateItem>>>,
}

impl StateView {
    /// The next chunk, `None` at the end.
    pub async fn next_chunk(&mut self) -> io::Result<Option<Vec<StateItem>>> {
        self.chunks.recv().await.transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ClientTag, MailboxState, Refusal, RegistryCommand};
    use openraft::vote::RaftLeaderIdExt;

    fn log_id(index: u64) -> LogIdOf<TypeConfig> {
        let leader =
            <openraft::alias::LeaderIdOf<TypeConfig> as RaftLeaderIdExt>::new_committed(1, 1);
        LogIdOf::<TypeConfig>::new(leader, index)
    }

    fn proposal(seq: u64, command: RegistryCommand) -> Proposal {
        Proposal {
            client: Some(ClientTag { session: 42, seq }),
            stamp_ms: 1_000,
            command,
        }
    }

    fn reserve(name: &str) -> RegistryCommand {
        RegistryCommand::Reserve {
            name: name.into(),
            location: "be1!default".into(),
        }
    }

    fn activate(name: &str) -> RegistryCommand {
        RegistryCommand::Activate {
            name: name.into(),
            location: "be1!default".into(),
            acl: "alice\tlrs\t".into(),
        }
    }

    /// A new store in `dir` with `from`'s Raft snapshot installed.
    async fn snapshot_into(from: &Store, dir: &Path) -> Store {
        let to = Store::open(dir).unwrap();
        transfer(from, &to).await;
        to
    }

    fn apply_one(store: &Store, index: u64, p: &Proposal) -> Outcome {
        let mut batch = ApplyBatch::new(store).unwrap();
        let outcome = batch.entry(log_id(index), Some(p)).unwrap();
        batch.commit().unwrap();
        outcome
    }

    /// Sends `from`'s state to `to` as a Raft snapshot transfer does, chunk
    /// by chunk into staging, then installs it; returns the chunk count.
    async fn transfer(from: &Store, to: &Store) -> usize {
        let mut snapshot = StateMachine::new(from.clone())
            .build_snapshot()
            .await
            .unwrap();
        let SnapshotData::View(view) = &mut snapshot.snapshot else {
            panic!("a built snapshot is a view");
        };
        let generation = to.begin_staging().await.unwrap();
        let mut chunks = 0;
        while let Some(items) = view.next_chunk().await.unwrap() {
            to.stage_chunk(generation, items).await.unwrap();
            chunks += 1;
        }
        StateMachine::new(to.clone())
            .install_snapshot(&snapshot.meta, SnapshotData::Staged(generation))
            .await
            .unwrap();
        chunks
    }

    #[tokio::test]
    async fn a_duplicate_is_recognised_after_a_snapshot_install() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(&dir.path().join("a")).unwrap();
        assert_eq!(
            apply_one(&a, 1, &proposal(1, reserve("user.x"))),
            Outcome::Done
        );
        assert_eq!(
            apply_one(&a, 2, &proposal(2, activate("user.x"))),
            Outcome::Done
        );
        let b = Store::open(&dir.path().join("b")).unwrap();
        transfer(&a, &b).await;
        // The RESERVE retried after the snapshot: answered, not applied.
        assert_eq!(
            apply_one(&b, 3, &proposal(1, reserve("user.x"))),
            Outcome::Refused(Refusal::Superseded)
        );
        assert_eq!(
            apply_one(&b, 4, &proposal(2, activate("user.x"))),
            Outcome::Done
        );
        assert_eq!(
            b.mailbox("user.x").unwrap().unwrap().state,
            MailboxState::Active
        );
        // The snapshot carried the clock and the session too.
        assert_eq!(b.clock_ms().unwrap(), 1_000);
        assert_eq!(b.session(42).unwrap().unwrap().seq, 2);
        // Only mailboxes are listed, never the sessions beside them.
        assert_eq!(b.scan(|_| true).unwrap().1.len(), 1);
    }

    fn credential(key: u8) -> crate::model::UserCredential {
        crate::model::UserCredential {
            admin: key.is_multiple_of(2),
            salt: vec![key; 16],
            iterations: 4096,
            stored_key: [key; 32],
            server_key: [key; 32],
        }
    }

    #[tokio::test]
    async fn users_are_stored_apart_from_mailboxes_and_carried_by_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(&dir.path().join("a")).unwrap();
        let add = |name: &str, key| RegistryCommand::AddUser {
            name: name.into(),
            credential: credential(key),
        };
        assert_eq!(apply_one(&a, 1, &proposal(1, add("be1", 1))), Outcome::Done);
        assert_eq!(apply_one(&a, 2, &proposal(2, add("zed", 2))), Outcome::Done);
        let del = RegistryCommand::DeleteUser { name: "zed".into() };
        assert_eq!(apply_one(&a, 3, &proposal(3, del)), Outcome::Done);
        assert_eq!(
            apply_one(&a, 4, &proposal(4, activate("user.x"))),
            Outcome::Done
        );
        let expected = vec![
            ("be1".to_string(), StoredUser::Active(credential(1))),
            ("zed".to_string(), StoredUser::Deleted),
        ];
        assert_eq!(a.users().unwrap(), expected);
        // Mailbox scans and UPDATE never see users.
        assert_eq!(a.scan(|_| true).unwrap().1.len(), 1);

        // The Raft snapshot carries them.
        let b = snapshot_into(&a, &dir.path().join("b")).await;
        assert_eq!(b.users().unwrap(), expected);

        // So does the replica stream's chunked snapshot (the same walk).
        let mut items = Vec::new();
        a.scan_chunks(false, |part| {
            if let Err(chunk) = part {
                items.extend(chunk);
            }
            true
        })
        .unwrap();
        let c = Store::open(&dir.path().join("c")).unwrap();
        c.begin_reset().unwrap();
        c.put_entries(&items).unwrap();
        c.finish_reset(Some(log_id(4))).unwrap();
        assert_eq!(c.users().unwrap(), expected);
        assert_eq!(
            c.user("be1").unwrap(),
            Some(StoredUser::Active(credential(1)))
        );
        assert_eq!(c.user("nobody").unwrap(), None);
    }

    #[test]
    fn a_staged_snapshot_is_invisible_until_it_is_swapped_in() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert!(!s.has_state());
        assert_eq!(
            apply_one(&s, 1, &proposal(1, activate("user.old"))),
            Outcome::Done
        );
        assert!(s.has_state());

        s.begin_reset().unwrap();
        let new = |n: &str| {
            StateItem::Mailbox(MailboxEntry {
                name: n.into(),
                location: "be2!default".into(),
                acl: String::new(),
                state: MailboxState::Active,
                last_change: 9,
            })
        };
        s.put_entries(&[new("user.a"), new("user.b")]).unwrap();
        // Half-way: the old state, whole.
        assert!(s.mailbox("user.old").unwrap().is_some());
        assert!(s.mailbox("user.a").unwrap().is_none());
        assert_eq!(s.scan(|_| true).unwrap().1.len(), 1);

        // Stopped half-way and reopened: still the old state, and the
        // replica resumes from its live index.
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert!(s.mailbox("user.old").unwrap().is_some());
        assert_eq!(s.applied_index().unwrap(), 1);

        s.begin_reset().unwrap();
        s.put_entries(&[new("user.a"), new("user.b"), StateItem::Clock(5)])
            .unwrap();
        s.finish_reset(Some(log_id(9))).unwrap();
        assert!(s.mailbox("user.old").unwrap().is_none());
        assert_eq!(s.scan(|_| true).unwrap().1.len(), 2);
        assert_eq!(s.applied_index().unwrap(), 9);
        assert_eq!(s.clock_ms().unwrap(), 5);
        // The swap survives a restart, and applying goes on in the new state.
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.scan(|_| true).unwrap().1.len(), 2);
        assert_eq!(
            apply_one(&s, 10, &proposal(1, activate("user.c"))),
            Outcome::Done
        );
        assert_eq!(s.scan(|_| true).unwrap().1.len(), 3);
    }

    fn record(index: u64, p: Proposal) -> LogRecord {
        LogRecord {
            log_id: log_id(index),
            proposal: Some(p),
        }
    }

    #[test]
    fn a_replica_keeps_recent_records_for_update_catch_up() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let records = vec![
            record(1, proposal(1, reserve("user.a"))),
            record(2, proposal(2, activate("user.b"))),
            record(
                3,
                proposal(
                    3,
                    RegistryCommand::Delete {
                        name: "user.a".into(),
                    },
                ),
            ),
        ];
        s.keep_records(&records).unwrap();
        let mut batch = ApplyBatch::new(&s).unwrap();
        for r in &records {
            batch.entry(r.log_id, r.proposal.as_ref()).unwrap();
        }
        batch.commit().unwrap();
        // A lagging UPDATE subscriber gets the current entry of each name.
        let touched = s.entries_touched(1, 3).unwrap().expect("records kept");
        let names: Vec<_> = touched
            .iter()
            .map(|(n, e)| (n.as_str(), e.is_some()))
            .collect();
        assert_eq!(names, [("user.a", false), ("user.b", true)]);
        // After a snapshot replaced the state, the old records are gone and
        // anything at or below the snapshot needs a resync.
        s.begin_reset().unwrap();
        s.finish_reset(Some(log_id(10))).unwrap();
        assert!(s.entries_touched(1, 3).unwrap().is_none());
        assert!(s.committed_records(10, 10, 10).unwrap().is_none());
    }

    #[tokio::test]
    async fn log_entries_at_or_below_an_installed_snapshot_are_never_streamed() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(&dir.path().join("a")).unwrap();
        assert_eq!(
            apply_one(&a, 1, &proposal(1, reserve("user.x"))),
            Outcome::Done
        );
        // A follower whose log holds entries (perhaps never committed) at
        // and after the snapshot's index when the snapshot is installed.
        let b = Store::open(&dir.path().join("b")).unwrap();
        b.keep_records(&[
            record(1, proposal(9, reserve("user.stale"))),
            record(2, proposal(10, reserve("user.stale2"))),
        ])
        .unwrap();
        assert!(b.committed_records(1, 2, 10).unwrap().is_some());
        transfer(&a, &b).await;
        assert!(
            b.committed_records(1, 2, 10).unwrap().is_none(),
            "the stream must send a snapshot instead"
        );
        assert!(b.committed_records(2, 2, 10).unwrap().is_some());
    }

    /// One AppendEntries carries at most about [`MAX_APPEND_BYTES`] of
    /// entries, whatever their count, and never nothing.
    #[tokio::test]
    async fn an_append_entries_payload_is_bounded_by_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let acl = |bytes: usize| format!("{}\tlrs\t", "u".repeat(bytes));
        let big = |index: u64, bytes: usize| {
            let command = RegistryCommand::Activate {
                name: format!("user.m{index}"),
                location: "be1!default".into(),
                acl: acl(bytes),
            };
            record(index, proposal(index, command))
        };
        let mut records: Vec<_> = (1..=20).map(|i| big(i, 200 << 10)).collect();
        records.push(big(21, 3 * MAX_APPEND_BYTES));
        s.keep_records(&records).unwrap();
        let mut log = LogStore::new(s);
        let sent = log.limited_get_log_entries(1, 22).await.unwrap();
        // 200 KiB each: the sixth takes them past 1 MiB and is the last.
        assert_eq!(sent.len(), MAX_APPEND_BYTES / (200 << 10) + 1);
        assert_eq!(sent[0].log_id.index(), 1);
        let rest = log.limited_get_log_entries(19, 22).await.unwrap();
        assert_eq!(rest.len(), 3, "under the bound until the big one");
        let alone = log.limited_get_log_entries(21, 22).await.unwrap();
        assert_eq!(alone.len(), 1, "an entry over the bound goes alone");
        // Without a bound, the whole range.
        assert_eq!(log.try_get_log_entries(1..22).await.unwrap().len(), 21);
    }

    /// Appends from many writers at once share fsyncs (group commit), and
    /// every one is told durable only after the fsync that covers it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_share_fsyncs() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let log = LogStore::new(s.clone());
        const WRITERS: u64 = 32;
        const ROUNDS: u64 = 8;
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let mut log = log.clone();
            tasks.push(tokio::spawn(async move {
                for r in 0..ROUNDS {
                    let index = 1 + r * WRITERS + w;
                    let entry = EntryOf::<TypeConfig>::new_normal(
                        log_id(index),
                        proposal(index, reserve(&format!("user.u{index}"))),
                    );
                    let (tx, rx) = <TypeConfig as openraft::type_config::TypeConfigExt>::oneshot();
                    log.append([entry], IOFlushed::signal(tx)).await.unwrap();
                    rx.await.unwrap().unwrap();
                }
            }));
        }
        for t in tasks {
            tokio::time::timeout(std::time::Duration::from_secs(60), t)
                .await
                .expect("appends completed in time")
                .unwrap();
        }
        let syncs = log.wal_fsyncs();
        let appends = WRITERS * ROUNDS;
        assert!(syncs >= 1);
        assert!(
            syncs * 2 <= appends,
            "{appends} concurrent appends took {syncs} fsyncs: not grouped"
        );
        let read = LogStore::new(s).try_get_log_entries(1..=appends).await;
        assert_eq!(read.unwrap().len() as u64, appends);
        // The last handle waits for the sync thread: the database reopens.
        drop(log);
        Store::open(dir.path()).expect("reopens once every handle is gone");
    }

    /// A snapshot staged as SST files and ingested, then cut short before
    /// the swap (a crash between the two), leaves the old state whole; the
    /// next transfer, which finds the staging family no longer empty,
    /// clears it and installs exactly its own state, location index too.
    #[test]
    fn an_ingested_snapshot_cut_short_before_the_swap_leaves_the_old_state() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        apply_one(&s, 1, &proposal(1, activate("user.old")));
        let at = |n: &str, location: &str| {
            StateItem::Mailbox(MailboxEntry {
                name: n.into(),
                location: location.into(),
                acl: String::new(),
                state: MailboxState::Active,
                last_change: 9,
            })
        };
        s.begin_reset().unwrap();
        let items: Vec<_> = (0..2500)
            .map(|i| at(&format!("user.a{i:05}"), ["be2!x", "be3!x"][i % 2]))
            .collect();
        s.put_entries(&items).unwrap();
        // Written as SST files (rolled over), not through the memtable.
        assert!(s.lock_stager().as_ref().unwrap().files() >= 3);
        s.ingest_staged().unwrap();
        assert!(s.mailbox("user.a00001").unwrap().is_none());
        assert_eq!(s.list_location("be2!").unwrap().len(), 0);
        drop(s);

        let s = Store::open(dir.path()).unwrap();
        assert!(s.mailbox("user.old").unwrap().is_some());
        assert!(s.mailbox("user.a00001").unwrap().is_none());
        assert_eq!(s.applied_index().unwrap(), 1);
        assert!(!dir.path().join(STAGING_DIR).exists());

        s.begin_reset().unwrap();
        // The cut-short state is deleted and compacted away: SST files again.
        assert!(s.lock_stager().is_some());
        s.put_entries(&[at("user.b", "be3!x"), StateItem::Clock(5)])
            .unwrap();
        s.finish_reset(Some(log_id(9))).unwrap();
        let names: Vec<_> = s.scan(|_| true).unwrap().1;
        assert_eq!(names.len(), 1);
        assert_eq!(names[0].name, "user.b");
        assert_eq!(s.list_location("be2!").unwrap().len(), 0);
        assert_eq!(s.list_location("be3!").unwrap().len(), 1);
        assert_eq!(s.applied_index().unwrap(), 9);
    }

    /// Emptying the staging family spares a point-in-time view that still
    /// reads it (a snapshot being sent from the state before the last
    /// swap): the view reads its whole state, and the new transfer goes
    /// through the memtable instead of files that would land above it.
    #[tokio::test]
    async fn emptying_the_staging_family_spares_a_view_still_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let mut batch = ApplyBatch::new(&s).unwrap();
        for i in 0..5000u64 {
            let p = proposal(i + 1, activate(&format!("user.m{i:05}")));
            batch.entry(log_id(i + 1), Some(&p)).unwrap();
        }
        batch.commit().unwrap();
        let (_, mut view) = s.open_view().await.unwrap();
        // A first snapshot swaps in; the view's family is the staging one now.
        let item = |n: &str| {
            StateItem::Mailbox(MailboxEntry {
                name: n.into(),
                location: "be2!x".into(),
                acl: String::new(),
                state: MailboxState::Active,
                last_change: 9,
            })
        };
        s.begin_reset().unwrap();
        s.put_entries(&[item("user.a")]).unwrap();
        s.finish_reset(Some(log_id(9000))).unwrap();
        s.begin_reset().unwrap();
        assert!(s.lock_stager().is_none(), "the view still holds the family");
        s.put_entries(&[item("user.b")]).unwrap();
        let mut items = 0;
        while let Some(c) = view.next_chunk().await.unwrap() {
            items += c.len();
        }
        // 5000 mailboxes, the session and the clock.
        assert_eq!(items, 5002);
        drop(view);
        s.finish_reset(Some(log_id(9001))).unwrap();
        let names: Vec<_> = s.scan(|_| true).unwrap().1;
        assert_eq!(names.len(), 1);
        assert_eq!(names[0].name, "user.b");
        // With no view left, the next transfer finds the family emptied.
        s.begin_reset().unwrap();
        assert!(s.lock_stager().is_some());
    }

    /// Items out of key order (which a sound master never sends) and more
    /// locations than the staged runs take still land, through the
    /// memtable, beside the SST files.
    #[test]
    fn a_snapshot_out_of_order_or_over_many_locations_still_installs_whole() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        apply_one(&s, 1, &proposal(1, activate("user.old")));
        let at = |n: String, location: String| {
            StateItem::Mailbox(MailboxEntry {
                name: n,
                location,
                acl: String::new(),
                state: MailboxState::Active,
                last_change: 9,
            })
        };
        let locations = sst::MAX_OPEN_RUNS + 10;
        let mut items: Vec<_> = (0..locations)
            .map(|i| at(format!("user.m{i:05}"), format!("be{i:05}!x")))
            .collect();
        // Going back: into the memtable.
        items.push(at("user.a".into(), "be00000!x".into()));
        items.push(at("user.m00003".into(), "be00003!x".into()));
        s.begin_reset().unwrap();
        assert!(s.lock_stager().is_some());
        for chunk in items.chunks(100) {
            s.put_entries(chunk).unwrap();
        }
        s.finish_reset(Some(log_id(9))).unwrap();
        let (_, names) = s.scan(|_| true).unwrap();
        assert_eq!(names.len(), locations + 1);
        assert!(s.mailbox("user.a").unwrap().is_some());
        assert!(s.mailbox("user.old").unwrap().is_none());
        assert_eq!(s.list_location("be00000!").unwrap().len(), 2);
        assert_eq!(s.list_location("be01030!").unwrap().len(), 1);
        assert_eq!(s.list_location("be0").unwrap().len(), locations + 1);
    }

    /// A Raft snapshot is read from a point-in-time view in bounded chunks
    /// (by count and by bytes, so every frame stays far below the frame
    /// limit whatever the registry's size), staged and swapped in whole; a
    /// newer transfer takes the staging family over from an older one.
    #[tokio::test]
    async fn a_snapshot_travels_in_bounded_chunks_and_installs_whole() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(&dir.path().join("a")).unwrap();
        let mut batch = ApplyBatch::new(&a).unwrap();
        // Small entries (chunks closed by count), then entries with the
        // largest ACL a MUPDATE literal carries by default (closed by bytes).
        let big_acl = format!("{}\tlrs\t", "u".repeat(64 * 1024 - 8));
        for i in 0..5000u64 {
            let acl = if i >= 4900 {
                big_acl.clone()
            } else {
                "anyone\tlrs\t".into()
            };
            let p = proposal(
                i + 1,
                RegistryCommand::Activate {
                    name: format!("user.m{i:05}"),
                    location: "be1!default".into(),
                    acl,
                },
            );
            assert_eq!(batch.entry(log_id(i + 1), Some(&p)).unwrap(), Outcome::Done);
        }
        batch.commit().unwrap();

        let (meta, mut view) = a.open_view().await.unwrap();
        assert_eq!(meta.last_log_id, Some(log_id(5000)));
        // Writes after the view was opened are not in it.
        apply_one(&a, 5001, &proposal(5001, activate("user.later")));
        let mut chunks = 0;
        let mut items = 0;
        while let Some(c) = view.next_chunk().await.unwrap() {
            let mut frame = Vec::new();
            crate::peer::write_frame(
                &mut frame,
                &crate::stream::StreamFrame::SnapshotChunk(c.clone()),
            )
            .unwrap();
            assert!(
                frame.len() <= SNAPSHOT_CHUNK_BYTES + 3 * 64 * 1024,
                "a chunk of {} bytes",
                frame.len()
            );
            assert!(c.len() <= SNAPSHOT_CHUNK_ITEMS);
            items += c.len();
            chunks += 1;
        }
        // 5000 mailboxes, one session and the clock.
        assert_eq!(items, 5002);
        assert!(chunks >= 5, "only {chunks} chunks");

        let b = Store::open(&dir.path().join("b")).unwrap();
        apply_one(&b, 1, &proposal(1, activate("user.old")));
        // An older transfer, taken over by a newer one, can no longer write.
        let old = b.begin_staging().await.unwrap();
        b.stage_chunk(old, vec![StateItem::Clock(7)]).await.unwrap();
        assert!(transfer(&a, &b).await >= 5);
        assert!(b.stage_chunk(old, vec![StateItem::Clock(7)]).await.is_err());
        assert!(StateMachine::new(b.clone())
            .install_snapshot(&meta, SnapshotData::Staged(old))
            .await
            .is_err());
        let (applied, names) = b.scan(|_| true).unwrap();
        assert_eq!(applied, 5001);
        assert_eq!(names.len(), 5001);
        assert!(b.mailbox("user.old").unwrap().is_none());
        assert_eq!(b.mailbox("user.m04999").unwrap().unwrap().acl, big_acl);
    }

    /// LIST by location reads the location index, which the apply batch
    /// keeps in step with every change (moves and deletes included) and a
    /// follower derives from a snapshot's mailboxes.
    #[tokio::test]
    async fn list_by_location_reads_an_index_kept_in_step() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(&dir.path().join("a")).unwrap();
        let at = |seq: u64, name: &str, location: &str| {
            proposal(
                seq,
                RegistryCommand::Activate {
                    name: name.into(),
                    location: location.into(),
                    acl: String::new(),
                },
            )
        };
        let mut batch = ApplyBatch::new(&a).unwrap();
        let ops = [
            at(1, "user.b", "be1!default"),
            at(2, "user.a-b", "be1!default"),
            at(3, "user.a.b", "be1!other"),
            at(4, "user.c", "be2!default"),
            at(5, "user.d", "be1!default"),
            // A move from be1 to be2, and a delete.
            at(6, "user.b", "be2!default"),
            proposal(
                7,
                RegistryCommand::Delete {
                    name: "user.d".into(),
                },
            ),
        ];
        for (i, p) in ops.iter().enumerate() {
            assert_eq!(
                batch.entry(log_id(i as u64 + 1), Some(p)).unwrap(),
                Outcome::Done
            );
        }
        batch.commit().unwrap();
        let names = |s: &Store, prefix: &str| -> Vec<String> {
            s.list_location(prefix)
                .unwrap()
                .into_iter()
                .map(|e| format!("{}@{}", e.name, e.location))
                .collect()
        };
        // Two partitions of be1 merge in Cyrus's order ('.' first).
        let be1 = ["user.a.b@be1!other", "user.a-b@be1!default"];
        let be2 = ["user.b@be2!default", "user.c@be2!default"];
        assert_eq!(names(&a, "be1!"), be1);
        assert_eq!(names(&a, "be2!default"), be2);
        assert_eq!(names(&a, "be3!"), Vec::<String>::new());
        assert_eq!(names(&a, "").len(), 4);
        // The moved and the deleted names left no index key behind.
        let cf = a.state_cf();
        for (location, name) in [("be1!default", "user.b"), ("be1!default", "user.d")] {
            assert!(a
                .db
                .get_cf(cf, location_key(location, name))
                .unwrap()
                .is_none());
        }
        // A follower derives the same index from a snapshot.
        let b = Store::open(&dir.path().join("b")).unwrap();
        transfer(&a, &b).await;
        assert_eq!(names(&b, "be1!"), be1);
        assert_eq!(names(&b, "be2!"), be2);
        // LIST by name prefix is a key range in the same order.
        let by_name: Vec<String> = b
            .list_names("user.a")
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(by_name, ["user.a.b", "user.a-b"]);
    }
}
