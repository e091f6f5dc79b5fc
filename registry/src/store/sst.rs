//! Staging a snapshot as SST files instead of memtable writes.
//!
//! A snapshot arrives in key order, so its entries can be written straight
//! into sorted table files and ingested into the (empty) staging family at
//! the end: no WAL, no memtable, no flush and no compaction of the
//! millions of keys, which is what made a transfer grow faster than the
//! registry. The location index arrives in a different order (by name, not
//! by location), but the names of one location still arrive in order, so
//! each location gets its own run of files: no two files overlap, and every
//! one of them lands in the bottom level as it is.
//!
//! Nothing is visible before the ingestion, which happens under the staging
//! family, itself invisible until the swap: a transfer cut short leaves
//! only files in the staging directory, removed when the next one begins.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use rocksdb::{IngestExternalFileOptions, Options, SstFileWriter, DB};

/// Entries per file before a run starts its next one: bounds the memory of
/// a writer (its index, and the Bloom filter of the family's own keys,
/// about 8 bytes a key until the file is finished).
/// (Small under test, so that tests roll files over.)
const FILE_ENTRIES: u64 = if cfg!(test) { 1000 } else { 1 << 20 };

/// Most location runs open at once; the entries of further locations are
/// written through the memtable as before (a registry with that many
/// backends and partitions is not one this path is tuned for).
pub(super) const MAX_OPEN_RUNS: usize = 1024;

/// Descriptors a transfer leaves free for everything else when it sizes
/// its runs (see [`run_cap`]).
const SPARE_DESCRIPTORS: u64 = 64;

/// How many location runs a transfer may keep open, each one a file
/// descriptor: at most [`MAX_OPEN_RUNS`], and at most half of what the
/// open-file limit `limit` leaves free beyond the `open` descriptors in use
/// and [`SPARE_DESCRIPTORS`], so that connections arriving during the
/// transfer still find descriptors (the connection caps, checked at start,
/// reserve only a few for files). `None`: no limit known.
pub(super) fn run_cap(limit: Option<u64>, open: u64) -> usize {
    let Some(limit) = limit else {
        return MAX_OPEN_RUNS;
    };
    let free = limit.saturating_sub(open).saturating_sub(SPARE_DESCRIPTORS) / 2;
    usize::try_from(free).map_or(MAX_OPEN_RUNS, |f| f.min(MAX_OPEN_RUNS))
}

/// Descriptors this process has open now (Linux), or 0 when unknown.
fn open_descriptors() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

/// Table options of the family's own keys: those of the state families, so
/// that point lookups use the files' Bloom filters.
static KEY_FILE_OPTIONS: LazyLock<Options> = LazyLock::new(super::state_family_options);

/// Table options of the location index: range reads only, no filter to
/// build and hold.
static INDEX_FILE_OPTIONS: LazyLock<Options> = LazyLock::new(Options::default);

/// One sorted run: a file being written and the last key put in it.
struct Run {
    writer: SstFileWriter<'static>,
    path: PathBuf,
    entries: u64,
    last: Vec<u8>,
}

/// The SST files of one snapshot transfer, ingested by [`Stager::ingest`].
pub(super) struct Stager {
    dir: PathBuf,
    next_file: u64,
    /// The family's own keys (mailboxes, in Cyrus's order).
    keys: Option<Run>,
    /// The location index, a run per location.
    index: HashMap<Vec<u8>, Option<Run>>,
    /// Most runs of `index` (see [`run_cap`]).
    max_runs: usize,
    /// Finished files, in no particular order (no two overlap).
    done: Vec<PathBuf>,
}

impl Stager {
    /// Starts a transfer's files in `dir`, emptied first (an older
    /// transfer's files are dropped with it).
    pub(super) fn new(dir: &Path) -> io::Result<Stager> {
        clear_dir(dir)?;
        std::fs::create_dir_all(dir)?;
        Ok(Stager {
            dir: dir.to_owned(),
            next_file: 0,
            keys: None,
            index: HashMap::new(),
            max_runs: run_cap(crate::net::open_file_limit(), open_descriptors()),
            done: Vec::new(),
        })
    }

    /// Adds a mailbox key; `false` when it does not come after the last one
    /// (the caller writes it through the memtable instead).
    pub(super) fn put_key(&mut self, key: &[u8], value: &[u8]) -> io::Result<bool> {
        let (dir, next) = (&self.dir, &mut self.next_file);
        put(
            &mut self.keys,
            &mut self.done,
            dir,
            next,
            &KEY_FILE_OPTIONS,
            key,
            value,
        )
    }

    /// Adds a location index key of location `location`; `false` when it
    /// does not come after that location's last one, or when too many
    /// locations are open already.
    pub(super) fn put_index(
        &mut self,
        location: &[u8],
        key: &[u8],
        value: &[u8],
    ) -> io::Result<bool> {
        if !self.index.contains_key(location) {
            if self.index.len() >= self.max_runs {
                return Ok(false);
            }
            self.index.insert(location.to_vec(), None);
        }
        let run = self.index.get_mut(location).expect("inserted above");
        let (dir, next) = (&self.dir, &mut self.next_file);
        put(
            run,
            &mut self.done,
            dir,
            next,
            &INDEX_FILE_OPTIONS,
            key,
            value,
        )
    }

    /// Finishes every file and ingests them all into `cf` (which must hold
    /// nothing the files' keys should not replace), then removes the
    /// directory.
    pub(super) fn ingest(mut self, db: &DB, cf: &rocksdb::ColumnFamily) -> io::Result<()> {
        let runs = (self.keys.take().into_iter()).chain(self.index.drain().filter_map(|(_, r)| r));
        for mut r in runs {
            r.writer.finish().map_err(super::db_err)?;
            self.done.push(r.path);
        }
        if !self.done.is_empty() {
            let mut opts = IngestExternalFileOptions::default();
            // Hard links into the database instead of copies.
            opts.set_move_files(true);
            db.ingest_external_file_cf_opts(cf, &opts, std::mem::take(&mut self.done))
                .map_err(super::db_err)?;
        }
        clear_dir(&self.dir)
    }

    /// Files written so far (finished or not), for tests.
    #[cfg(test)]
    pub(super) fn files(&self) -> usize {
        self.done.len() + self.keys.is_some() as usize + self.index.len()
    }
}

/// Puts `key` in `run`, opening it (or its next file) as needed.
fn put(
    run: &mut Option<Run>,
    done: &mut Vec<PathBuf>,
    dir: &Path,
    next_file: &mut u64,
    options: &'static Options,
    key: &[u8],
    value: &[u8],
) -> io::Result<bool> {
    if let Some(r) = run.as_ref() {
        if key <= r.last.as_slice() {
            return Ok(false);
        }
    }
    if run.as_ref().is_some_and(|r| r.entries >= FILE_ENTRIES) {
        let mut full = run.take().expect("checked above");
        full.writer.finish().map_err(super::db_err)?;
        done.push(full.path);
    }
    let r = match run {
        Some(r) => r,
        None => {
            let path = dir.join(format!("{:08}.sst", *next_file));
            *next_file += 1;
            let writer = SstFileWriter::create(options);
            writer.open(&path).map_err(super::db_err)?;
            run.insert(Run {
                writer,
                path,
                entries: 0,
                last: Vec::new(),
            })
        }
    };
    r.writer.put(key, value).map_err(super::db_err)?;
    r.entries += 1;
    r.last.clear();
    r.last.extend_from_slice(key);
    Ok(true)
}

/// Removes `dir` and what it holds, if it exists.
pub(super) fn clear_dir(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs fit in half the descriptors left free, never above the cap;
    /// with none left free, every location goes through the memtable.
    #[test]
    fn location_runs_fit_in_the_free_descriptors() {
        assert_eq!(run_cap(None, 500), MAX_OPEN_RUNS);
        assert_eq!(run_cap(Some(1 << 20), 100), MAX_OPEN_RUNS);
        assert_eq!(run_cap(Some(1024), 100), (1024 - 100 - 64) / 2);
        assert_eq!(run_cap(Some(1024), 1000), 0);
        assert_eq!(run_cap(Some(8192), 7000), (8192 - 7000 - 64) / 2);
    }
}
