//! RocksDB storage behind openraft's traits: the Raft log, the vote and the
//! registry state machine, in one database with a column family each.
//!
//! Durability: a log append is signalled to openraft only after the WAL is
//! fsynced, and the vote is fsynced before `save_vote` returns. State machine
//! writes go through the same WAL without their own fsync: they are derived
//! from the durable log, and the WAL replays writes in order, so after a crash
//! the state machine is a prefix of the log that openraft re-applies from.
//!
//! Snapshots are built from a RocksDB point-in-time view of the mailboxes and
//! kept as one file, `snapshot.bin`, replaced atomically.

use std::fmt::Debug;
use std::io::{self, Cursor};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
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
use tokio::sync::{broadcast, watch};

use crate::model::{apply, Change, MailboxEntry, MailboxLookup, Outcome, RegistryCommand};
use crate::raft::TypeConfig;

const CF_LOGS: &str = "logs";
const CF_RAFT: &str = "raft";
const CF_MAILBOXES: &str = "mailboxes";
const CF_STATE: &str = "state";

const KEY_VOTE: &[u8] = b"vote";
const KEY_PURGED: &[u8] = b"last_purged";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_APPLIED: &[u8] = b"applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";
/// Present on a replica while a snapshot from a master is half written.
const KEY_SYNCING: &[u8] = b"syncing";

/// Upper bound of every mailbox key: names are UTF-8, which never holds 0xFF.
const MAILBOX_KEY_END: &[u8] = &[0xFF];

/// Largest snapshot this node accepts from a leader.
pub const MAX_SNAPSHOT_BYTES: usize = 2 << 30;

/// Changes committed at one log index, as UPDATE streams and replicas see them.
#[derive(Debug, Clone)]
pub struct CommittedChanges {
    /// Log index of the entry that made the changes.
    pub index: u64,
    /// The changes, in order.
    pub changes: Vec<Change>,
}

/// One committed log entry as the log stream carries it: its id and, for a
/// registry command, the command (blank and membership entries carry none).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogRecord {
    /// The entry's log id.
    pub log_id: LogIdOf<TypeConfig>,
    /// The registry command, if the entry holds one.
    pub command: Option<RegistryCommand>,
}

/// A mailbox name and its entry (`None`: it does not exist).
pub type NamedEntry = (String, Option<MailboxEntry>);

/// Events for followers of the committed state.
#[derive(Debug, Clone)]
pub enum StateEvent {
    /// New changes were applied.
    Changes(Arc<CommittedChanges>),
    /// The whole state was replaced by a snapshot: followers must resync.
    Reset,
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

/// The registry's RocksDB database and its change broadcaster.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
    dir: PathBuf,
    events: broadcast::Sender<StateEvent>,
    applied: Arc<watch::Sender<u64>>,
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
        let cfs = [CF_LOGS, CF_RAFT, CF_MAILBOXES, CF_STATE]
            .into_iter()
            .map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, dir.join("db"), cfs).map_err(db_err)?;
        let (events, _) = broadcast::channel(4096);
        let store = Store {
            db: Arc::new(db),
            dir: dir.to_owned(),
            events,
            applied: Arc::new(watch::channel(0).0),
        };
        store.applied.send_replace(store.applied_index()?);
        Ok(store)
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        // The column families are created in `open`.
        self.db
            .cf_handle(name)
            .expect("column family created at open")
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
        self.get(CF_MAILBOXES, name.as_bytes())
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
        self.scan_chunks(4096, |part| {
            match part {
                Ok(log_id) => applied = log_id.map_or(0, |l| l.index()),
                Err(entries) => out.extend(entries.into_iter().filter(|e| keep(e))),
            }
            true
        })?;
        // Stored in byte order; peers expect Cyrus's mailbox order.
        out.sort_by(|a, b| crate::model::cyrus_mailbox_cmp(&a.name, &b.name));
        Ok((applied, out))
    }

    /// Walks every mailbox of one point-in-time view in chunks of `chunk`,
    /// in key order: `each` gets the applied log id of the view first
    /// (`Ok(id)`), then the chunks (`Err(entries)`), and stops the walk by
    /// returning `false`. Memory stays bounded by one chunk.
    pub fn scan_chunks(
        &self,
        chunk: usize,
        mut each: impl FnMut(Result<Option<LogIdOf<TypeConfig>>, Vec<MailboxEntry>>) -> bool,
    ) -> io::Result<()> {
        let snap = self.db.snapshot();
        let applied: Option<LogIdOf<TypeConfig>> = match snap
            .get_cf(self.cf(CF_STATE), KEY_APPLIED)
            .map_err(db_err)?
        {
            Some(b) => decode(&b)?,
            None => None,
        };
        if !each(Ok(applied)) {
            return Ok(());
        }
        let mut out = Vec::with_capacity(chunk);
        for item in snap.iterator_cf(self.cf(CF_MAILBOXES), IteratorMode::Start) {
            let (_, v) = item.map_err(db_err)?;
            out.push(decode(&v)?);
            if out.len() >= chunk
                && !each(Err(std::mem::replace(&mut out, Vec::with_capacity(chunk))))
            {
                return Ok(());
            }
        }
        if !out.is_empty() {
            each(Err(out));
        }
        Ok(())
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
            let command = match e.payload {
                EntryPayload::Normal(c) => Some(c),
                _ => None,
            };
            out.push(LogRecord {
                log_id: e.log_id,
                command,
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
                if let Some(c) = &r.command {
                    c.for_each_mailbox(&mut |n| {
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

    /// Where a replica resumes: its applied index, or 0 when a snapshot was
    /// being written when it stopped (the state is then mixed and must be
    /// replaced whole).
    pub fn resume_index(&self) -> io::Result<u64> {
        if self
            .db
            .get_cf(self.cf(CF_STATE), KEY_SYNCING)
            .map_err(db_err)?
            .is_some()
        {
            return Ok(0);
        }
        self.applied_index()
    }

    /// Starts replacing the whole state with a master's snapshot (replicas):
    /// drops every mailbox and marks the state as incomplete until
    /// [`Store::finish_reset`].
    pub fn begin_reset(&self) -> io::Result<()> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_STATE), KEY_SYNCING, b"1");
        batch.delete_range_cf(self.cf(CF_MAILBOXES), b"".as_slice(), MAILBOX_KEY_END);
        self.db.write(batch).map_err(db_err)
    }

    /// Writes one chunk of a snapshot begun with [`Store::begin_reset`].
    pub fn put_entries(&self, entries: &[MailboxEntry]) -> io::Result<()> {
        let mut batch = WriteBatch::default();
        for e in entries {
            batch.put_cf(self.cf(CF_MAILBOXES), e.name.as_bytes(), encode(e)?);
        }
        self.db.write(batch).map_err(db_err)
    }

    /// Completes a snapshot: the state is now the master's at `log_id`.
    /// Subscribers get [`StateEvent::Reset`].
    pub fn finish_reset(&self, log_id: Option<LogIdOf<TypeConfig>>) -> io::Result<()> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_STATE), KEY_APPLIED, encode(&log_id)?);
        batch.delete_cf(self.cf(CF_STATE), KEY_SYNCING);
        self.db.write(batch).map_err(db_err)?;
        self.sync_wal()?;
        self.applied.send_replace(log_id.map_or(0, |l| l.index()));
        let _ = self.events.send(StateEvent::Reset);
        Ok(())
    }

    /// Size of the live data on disk, for metrics.
    pub fn disk_bytes(&self) -> u64 {
        self.db
            .property_int_value(rocksdb::properties::TOTAL_SST_FILES_SIZE)
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    fn snapshot_path(&self) -> PathBuf {
        self.dir.join("snapshot.bin")
    }

    /// Writes `data` as the current snapshot, atomically.
    fn save_snapshot_file(&self, meta: &SnapshotMetaOf<TypeConfig>, data: &[u8]) -> io::Result<()> {
        let meta = encode(meta)?;
        let tmp = self.dir.join("snapshot.bin.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&(meta.len() as u64).to_be_bytes())?;
            f.write_all(&meta)?;
            f.write_all(data)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.snapshot_path())?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    fn load_snapshot_file(&self) -> io::Result<Option<(SnapshotMetaOf<TypeConfig>, Vec<u8>)>> {
        let bytes = match std::fs::read(self.snapshot_path()) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let len = bytes
            .get(..8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()) as usize)
            .ok_or_else(|| codec_err("snapshot file too short"))?;
        let meta_end = 8usize
            .checked_add(len)
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| codec_err("bad snapshot header"))?;
        let meta = decode(&bytes[8..meta_end])?;
        Ok(Some((meta, bytes[meta_end..].to_vec())))
    }
}

impl MailboxLookup for Store {
    type Error = io::Error;
    fn mailbox(&self, name: &str) -> io::Result<Option<MailboxEntry>> {
        Store::mailbox(self, name)
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// The Raft log in RocksDB.
#[derive(Debug, Clone)]
pub struct LogStore {
    store: Store,
}

impl LogStore {
    /// The log of `store`.
    pub fn new(store: Store) -> Self {
        LogStore { store }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<EntryOf<TypeConfig>>> {
        let start = match range.start_bound() {
            std::ops::Bound::Included(x) => *x,
            std::ops::Bound::Excluded(x) => x.saturating_add(1),
            std::ops::Bound::Unbounded => 0,
        };
        let s = &self.store;
        let mut out = Vec::new();
        let key = index_key(start);
        for item in
            s.db.iterator_cf(s.cf(CF_LOGS), IteratorMode::From(&key, Direction::Forward))
        {
            let (k, v) = item.map_err(db_err)?;
            let idx = u64::from_be_bytes(k.as_ref().try_into().map_err(codec_err)?);
            if !range.contains(&idx) {
                break;
            }
            out.push(decode(&v)?);
        }
        Ok(out)
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
        // Group commit: one fsync covers every entry openraft batched into
        // this append; it runs off the Raft task so the next batch can form.
        let s = s.clone();
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let res = s.sync_wal();
            metrics::histogram!("corvid_disk_wal_fsync_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            metrics::counter!("corvid_raft_log_entries_appended_total").increment(count);
            callback.io_completed(res);
        });
        Ok(())
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
/// [`crate::model::apply`]: each command sees the changes of the ones before
/// it, and [`ApplyBatch::commit`] writes them all, with the applied log id,
/// in one atomic RocksDB write. The Raft state machine and replicas both
/// apply through it, so they cannot disagree on what a command does.
pub struct ApplyBatch<'a> {
    store: &'a Store,
    overlay: std::collections::HashMap<String, Option<MailboxEntry>>,
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

impl<'a> ApplyBatch<'a> {
    /// An empty batch on `store`.
    pub fn new(store: &'a Store) -> Self {
        ApplyBatch {
            store,
            overlay: Default::default(),
            batch: WriteBatch::default(),
            committed: Vec::new(),
            last: None,
            membership: None,
        }
    }

    /// Applies the entry `log_id`; `command` is `None` for entries that
    /// carry no registry command.
    pub fn entry(
        &mut self,
        log_id: LogIdOf<TypeConfig>,
        command: Option<&RegistryCommand>,
    ) -> io::Result<Outcome> {
        let index = log_id.index();
        self.last = Some(log_id);
        let Some(cmd) = command else {
            return Ok(Outcome::Done);
        };
        let applied = apply(&*self, index, cmd)?;
        let store = self.store;
        let cf = store.cf(CF_MAILBOXES);
        for change in &applied.changes {
            match change {
                Change::Put { entry: e, .. } => {
                    self.batch.put_cf(cf, e.name.as_bytes(), encode(e)?);
                    self.overlay.insert(e.name.clone(), Some(e.clone()));
                }
                Change::Removed { name, .. } => {
                    self.batch.delete_cf(cf, name.as_bytes());
                    self.overlay.insert(name.clone(), None);
                }
            }
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

    /// Writes everything applied so far (not fsynced: the log it came from
    /// is durable, see the module notes), then tells subscribers. Returns
    /// the last applied log id, `None` when the batch was empty.
    pub fn commit(self) -> io::Result<Option<LogIdOf<TypeConfig>>> {
        let ApplyBatch {
            store,
            mut batch,
            committed,
            last,
            membership,
            ..
        } = self;
        let Some(last) = last else { return Ok(None) };
        batch.put_cf(store.cf(CF_STATE), KEY_APPLIED, encode(&Some(last))?);
        if let Some(m) = &membership {
            batch.put_cf(store.cf(CF_STATE), KEY_MEMBERSHIP, encode(m)?);
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(false);
        store.db.write_opt(batch, &wo).map_err(db_err)?;
        store.applied.send_replace(last.index());
        // Only once the changes are readable, so a client's next FIND sees
        // its own write.
        for c in committed {
            let _ = store.events.send(StateEvent::Changes(Arc::new(c)));
        }
        Ok(Some(last))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = Cursor<Vec<u8>>;
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
        let mut batch = ApplyBatch::new(&store);
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
        let data = snapshot.into_inner();
        if data.len() > MAX_SNAPSHOT_BYTES {
            return Err(codec_err("snapshot larger than the configured maximum"));
        }
        let entries: Vec<MailboxEntry> = decode(&data)?;
        let s = self.store.clone();
        let meta2 = meta.clone();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(s.cf(CF_MAILBOXES), b"".as_slice(), MAILBOX_KEY_END);
            for e in &entries {
                batch.put_cf(s.cf(CF_MAILBOXES), e.name.as_bytes(), encode(e)?);
            }
            batch.put_cf(s.cf(CF_STATE), KEY_APPLIED, encode(&meta2.last_log_id)?);
            batch.put_cf(
                s.cf(CF_STATE),
                KEY_MEMBERSHIP,
                encode(&meta2.last_membership)?,
            );
            s.db.write(batch).map_err(db_err)?;
            s.sync_wal()?;
            s.save_snapshot_file(&meta2, &data)
        })
        .await
        .map_err(io::Error::other)??;
        metrics::counter!("corvid_snapshot_installs_total").increment(1);
        self.store
            .applied
            .send_replace(meta.last_log_id.as_ref().map_or(0, |l| l.index()));
        let _ = self.store.events.send(StateEvent::Reset);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> io::Result<Option<SnapshotOf<TypeConfig, Self::SnapshotData>>> {
        Ok(self
            .store
            .load_snapshot_file()?
            .map(|(meta, data)| SnapshotOf::<TypeConfig, _> {
                meta,
                snapshot: Cursor::new(data),
            }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn build_snapshot(&mut self) -> io::Result<SnapshotOf<TypeConfig, Self::SnapshotData>> {
        let s = self.store.clone();
        let started = std::time::Instant::now();
        let (meta, data) = tokio::task::spawn_blocking(move || -> io::Result<_> {
            // One point-in-time view for the entries and the applied id.
            let snap = s.db.snapshot();
            let read = |key: &[u8]| -> io::Result<Option<Vec<u8>>> {
                snap.get_cf(s.cf(CF_STATE), key).map_err(db_err)
            };
            let last_log_id: Option<LogIdOf<TypeConfig>> = match read(KEY_APPLIED)? {
                Some(b) => decode(&b)?,
                None => None,
            };
            let last_membership: StoredMembershipOf<TypeConfig> = match read(KEY_MEMBERSHIP)? {
                Some(b) => decode(&b)?,
                None => Default::default(),
            };
            let mut entries = Vec::new();
            for item in snap.iterator_cf(s.cf(CF_MAILBOXES), IteratorMode::Start) {
                let (_, v) = item.map_err(db_err)?;
                entries.push(decode::<MailboxEntry>(&v)?);
            }
            let data = encode(&entries)?;
            let meta = SnapshotMetaOf::<TypeConfig> {
                last_log_id,
                last_membership,
            };
            s.save_snapshot_file(&meta, &data)?;
            Ok((meta, data))
        })
        .await
        .map_err(io::Error::other)??;
        metrics::counter!("corvid_snapshot_builds_total").increment(1);
        metrics::histogram!("corvid_snapshot_build_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(SnapshotOf::<TypeConfig, _> {
            meta,
            snapshot: Cursor::new(data),
        })
    }
}
