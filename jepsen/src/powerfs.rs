//! A disk that forgets what was never fsynced: a small FUSE passthrough
//! filesystem for the power-loss fault.
//!
//! `kill -9` on a shared host keeps the page cache, so a missing fsync is
//! never exposed. Each node's data directory is instead a FUSE mount of
//! this filesystem over a backing directory (the "platter"). Every write
//! goes straight through to the backing file, but the filesystem
//! remembers, for each file written since its last `fsync`/`fdatasync`,
//! how long it was before the first such write. A power cut
//! ([`PowerDisk::power_cut`], with the node already killed) unmounts the
//! filesystem and truncates each of those files back to that length: what
//! was never synced is gone, as after a real power loss.
//!
//! The model is exact for files written only by appending, which is how
//! RocksDB writes its WAL, SST and MANIFEST files (and the registry its
//! snapshot, through a temporary file fsynced before its rename). An
//! overwrite in place below the synced length is kept, not rolled back;
//! metadata (create, rename, unlink, truncate) is durable at once. Both
//! make this disk *more* durable than a real one: it can miss a bug, never
//! invent one. The backing directory itself is never fsynced: it stands
//! for the platter, and the host's own durability is not under test.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};

/// How long the kernel may cache attributes and names.
const TTL: Duration = Duration::from_secs(1);

/// Files written since their last fsync (relative path) and their length
/// before the first unsynced write.
type Unsynced = Arc<Mutex<HashMap<PathBuf, u64>>>;

/// One node's disk: the FUSE mount at `mountpoint` over `backing`.
pub struct PowerDisk {
    backing: PathBuf,
    mountpoint: PathBuf,
    unsynced: Unsynced,
    session: Option<fuser::BackgroundSession>,
}

impl PowerDisk {
    /// Mounts a disk at `mountpoint` (created if needed) backed by
    /// `backing` (created if needed).
    pub fn mount(backing: &Path, mountpoint: &Path) -> anyhow::Result<PowerDisk> {
        std::fs::create_dir_all(backing)?;
        std::fs::create_dir_all(mountpoint)?;
        let mut disk = PowerDisk {
            backing: backing.canonicalize()?,
            mountpoint: mountpoint.to_owned(),
            unsynced: Arc::default(),
            session: None,
        };
        disk.attach()?;
        Ok(disk)
    }

    fn attach(&mut self) -> anyhow::Result<()> {
        let fs = PowerFs::new(self.backing.clone(), self.unsynced.clone());
        let session = fuser::spawn_mount2(
            fs,
            &self.mountpoint,
            &[
                MountOption::FSName("corvid-powerfs".into()),
                MountOption::RW,
            ],
        )
        .with_context(|| {
            format!(
                "mounting the power-loss disk at {}",
                self.mountpoint.display()
            )
        })?;
        self.session = Some(session);
        Ok(())
    }

    /// Unmounts, waiting (bounded) for the filesystem's thread to end.
    fn detach(&mut self) {
        if let Some(session) = self.session.take() {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let joined = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    session.join();
                }));
                let _ = tx.send(joined.is_ok());
            });
            if rx.recv_timeout(Duration::from_secs(10)).is_err() {
                tracing::warn!("power-loss disk: the FUSE session did not end within 10 s");
            }
        }
    }

    /// The power cut: with the node's process already dead, drops every
    /// write not fsynced and mounts the disk again. Returns how many files
    /// lost data and how many bytes.
    pub fn power_cut(&mut self) -> anyhow::Result<(usize, u64)> {
        self.detach();
        let lost: Vec<(PathBuf, u64)> = self
            .unsynced
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .drain()
            .collect();
        let (mut files, mut bytes) = (0, 0);
        for (rel, len) in lost {
            let path = self.backing.join(&rel);
            let Ok(m) = std::fs::metadata(&path) else {
                continue;
            };
            if m.len() > len {
                OpenOptions::new()
                    .write(true)
                    .open(&path)?
                    .set_len(len)
                    .with_context(|| format!("truncating {}", path.display()))?;
                files += 1;
                bytes += m.len() - len;
            }
        }
        self.attach()?;
        Ok((files, bytes))
    }
}

impl Drop for PowerDisk {
    fn drop(&mut self) {
        self.detach();
    }
}

/// Where `old` is after renaming `from` (itself or a directory above it)
/// to `to`. (`to.join("")` would add a trailing slash: not a file any more.)
fn moved_path(old: &Path, from: &Path, to: &Path) -> PathBuf {
    match old.strip_prefix(from) {
        Ok(rest) if rest.as_os_str().is_empty() => to.to_owned(),
        Ok(rest) => to.join(rest),
        Err(_) => old.to_owned(),
    }
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn attr(ino: u64, m: &std::fs::Metadata) -> FileAttr {
    let t = |s: i64, ns: i64| UNIX_EPOCH + Duration::new(s.max(0) as u64, ns.max(0) as u32);
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        FileType::Directory
    } else if ft.is_symlink() {
        FileType::Symlink
    } else {
        FileType::RegularFile
    };
    FileAttr {
        ino,
        size: m.len(),
        blocks: m.blocks(),
        atime: t(m.atime(), m.atime_nsec()),
        mtime: t(m.mtime(), m.mtime_nsec()),
        ctime: t(m.ctime(), m.ctime_nsec()),
        crtime: t(m.mtime(), m.mtime_nsec()),
        kind,
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: 4096,
        flags: 0,
    }
}

/// The filesystem: inode numbers of its own over relative paths of the
/// backing directory, open files by handle.
struct PowerFs {
    root: PathBuf,
    paths: HashMap<u64, PathBuf>,
    inodes: HashMap<PathBuf, u64>,
    next_ino: u64,
    files: HashMap<u64, (File, u64)>,
    next_fh: u64,
    unsynced: Unsynced,
}

impl PowerFs {
    fn new(root: PathBuf, unsynced: Unsynced) -> PowerFs {
        let mut fs = PowerFs {
            root,
            paths: HashMap::new(),
            inodes: HashMap::new(),
            next_ino: 2,
            files: HashMap::new(),
            next_fh: 1,
            unsynced,
        };
        fs.paths.insert(fuser::FUSE_ROOT_ID, PathBuf::new());
        fs.inodes.insert(PathBuf::new(), fuser::FUSE_ROOT_ID);
        fs
    }

    fn rel(&self, ino: u64) -> Option<PathBuf> {
        self.paths.get(&ino).cloned()
    }

    fn child(&self, parent: u64, name: &OsStr) -> Option<PathBuf> {
        self.rel(parent).map(|p| p.join(name))
    }

    fn intern(&mut self, rel: &Path) -> u64 {
        if let Some(i) = self.inodes.get(rel) {
            return *i;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.paths.insert(ino, rel.to_owned());
        self.inodes.insert(rel.to_owned(), ino);
        ino
    }

    fn forget_path(&mut self, rel: &Path) {
        if let Some(ino) = self.inodes.remove(rel) {
            self.paths.remove(&ino);
        }
        if let Ok(mut u) = self.unsynced.lock() {
            u.remove(rel);
        }
    }

    fn entry(&mut self, rel: &Path, reply: ReplyEntry) {
        match std::fs::symlink_metadata(self.root.join(rel)) {
            Ok(m) => {
                let ino = self.intern(rel);
                reply.entry(&TTL, &attr(ino, &m), 0);
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open_options(flags: i32) -> OpenOptions {
        let mut o = OpenOptions::new();
        match flags & libc::O_ACCMODE {
            libc::O_RDONLY => o.read(true),
            libc::O_WRONLY => o.write(true),
            _ => o.read(true).write(true),
        };
        o
    }

    /// A truncation to `len` is durable: nothing beyond it can come back.
    fn truncated(&self, rel: &Path, len: u64) {
        if let Ok(mut u) = self.unsynced.lock() {
            if let Some(v) = u.get_mut(rel) {
                *v = (*v).min(len);
            }
        }
    }
}

impl Filesystem for PowerFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        match self.child(parent, name) {
            Some(rel) => self.entry(&rel, reply),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, fh: Option<u64>, reply: ReplyAttr) {
        let m = match fh.and_then(|fh| self.files.get(&fh)) {
            Some((f, _)) => f.metadata(),
            None => match self.rel(ino) {
                Some(rel) => std::fs::symlink_metadata(self.root.join(rel)),
                None => return reply.error(libc::ENOENT),
            },
        };
        match m {
            Ok(m) => reply.attr(&TTL, &attr(ino, &m)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let Some(rel) = self.rel(ino) else {
            return reply.error(libc::ENOENT);
        };
        let path = self.root.join(&rel);
        if let Some(len) = size {
            let res = match fh.and_then(|fh| self.files.get(&fh)) {
                Some((f, _)) => f.set_len(len),
                None => OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(len)),
            };
            if let Err(e) = res {
                return reply.error(errno(&e));
            }
            self.truncated(&rel, len);
        }
        if let Some(mode) = mode {
            use std::os::unix::fs::PermissionsExt;
            let perm = std::fs::Permissions::from_mode(mode & 0o7777);
            if let Err(e) = std::fs::set_permissions(&path, perm) {
                return reply.error(errno(&e));
            }
        }
        match std::fs::symlink_metadata(&path) {
            Ok(m) => reply.attr(&TTL, &attr(ino, &m)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mkdir(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let Some(rel) = self.child(parent, name) else {
            return reply.error(libc::ENOENT);
        };
        match std::fs::DirBuilder::new()
            .mode(mode & !umask)
            .create(self.root.join(&rel))
        {
            Ok(()) => self.entry(&rel, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let Some(rel) = self.child(parent, name) else {
            return reply.error(libc::ENOENT);
        };
        match std::fs::remove_file(self.root.join(&rel)) {
            Ok(()) => {
                self.forget_path(&rel);
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let Some(rel) = self.child(parent, name) else {
            return reply.error(libc::ENOENT);
        };
        match std::fs::remove_dir(self.root.join(&rel)) {
            Ok(()) => {
                self.forget_path(&rel);
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        if flags != 0 {
            return reply.error(libc::EINVAL);
        }
        let (Some(from), Some(to)) = (self.child(parent, name), self.child(newparent, newname))
        else {
            return reply.error(libc::ENOENT);
        };
        if let Err(e) = std::fs::rename(self.root.join(&from), self.root.join(&to)) {
            return reply.error(errno(&e));
        }
        // The target, if any, is replaced; the source (and, for a
        // directory, everything under it) moves.
        self.forget_path(&to);
        let moved: Vec<(PathBuf, u64)> = self
            .inodes
            .iter()
            .filter(|(p, _)| p.starts_with(&from))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (old, ino) in moved {
            let new = moved_path(&old, &from, &to);
            self.inodes.remove(&old);
            self.inodes.insert(new.clone(), ino);
            self.paths.insert(ino, new);
        }
        if let Ok(mut u) = self.unsynced.lock() {
            let moved: Vec<(PathBuf, u64)> = u
                .iter()
                .filter(|(p, _)| p.starts_with(&from))
                .map(|(p, l)| (p.clone(), *l))
                .collect();
            for (old, len) in moved {
                u.remove(&old);
                u.insert(moved_path(&old, &from, &to), len);
            }
        }
        reply.ok()
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let Some(rel) = self.rel(ino) else {
            return reply.error(libc::ENOENT);
        };
        let mut o = Self::open_options(flags);
        let trunc = flags & libc::O_TRUNC != 0;
        o.truncate(trunc);
        match o.open(self.root.join(&rel)) {
            Ok(f) => {
                if trunc {
                    self.truncated(&rel, 0);
                }
                let fh = self.next_fh;
                self.next_fh += 1;
                self.files.insert(fh, (f, ino));
                reply.opened(fh, 0)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let Some(rel) = self.child(parent, name) else {
            return reply.error(libc::ENOENT);
        };
        let mut o = Self::open_options(flags);
        let trunc = flags & libc::O_TRUNC != 0;
        o.create(true).truncate(trunc).mode(mode & !umask);
        if flags & libc::O_EXCL != 0 {
            o.create_new(true);
        }
        let path = self.root.join(&rel);
        let opened = o.open(&path).and_then(|f| f.metadata().map(|m| (f, m)));
        match opened {
            Ok((f, m)) => {
                if trunc {
                    self.truncated(&rel, 0);
                }
                let ino = self.intern(&rel);
                let fh = self.next_fh;
                self.next_fh += 1;
                self.files.insert(fh, (f, ino));
                reply.created(&TTL, &attr(ino, &m), 0, fh, 0)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Some((f, _)) = self.files.get(&fh) else {
            return reply.error(libc::EBADF);
        };
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match f.read_at(&mut buf[got..], offset as u64 + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return reply.error(errno(&e)),
            }
        }
        reply.data(&buf[..got])
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let Some((f, _)) = self.files.get(&fh) else {
            return reply.error(libc::EBADF);
        };
        // The first write since the last fsync: what the file held before
        // it is what a power cut leaves.
        if let Some(rel) = self.paths.get(&ino) {
            if let Ok(mut u) = self.unsynced.lock() {
                if !u.contains_key(rel) {
                    let len = f.metadata().map_or(0, |m| m.len());
                    u.insert(rel.clone(), len);
                }
            }
        }
        match f.write_all_at(data, offset as u64) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lo: u64, reply: ReplyEmpty) {
        // close(2), not fsync(2): nothing becomes durable.
        reply.ok()
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.files.remove(&fh);
        reply.ok()
    }

    fn fsync(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _ds: bool, reply: ReplyEmpty) {
        if let Some(rel) = self.paths.get(&ino) {
            if let Ok(mut u) = self.unsynced.lock() {
                u.remove(rel);
            }
        }
        reply.ok()
    }

    fn fsyncdir(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _ds: bool, reply: ReplyEmpty) {
        reply.ok()
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let Some(rel) = self.rel(ino) else {
            return reply.error(libc::ENOENT);
        };
        let read = match std::fs::read_dir(self.root.join(&rel)) {
            Ok(r) => r,
            Err(e) => return reply.error(errno(&e)),
        };
        let mut entries = vec![
            (ino, FileType::Directory, ".".into()),
            (fuser::FUSE_ROOT_ID, FileType::Directory, "..".into()),
        ];
        let mut names: Vec<(std::ffi::OsString, FileType)> = read
            .filter_map(Result::ok)
            .map(|d| {
                let kind = match d.file_type() {
                    Ok(t) if t.is_dir() => FileType::Directory,
                    Ok(t) if t.is_symlink() => FileType::Symlink,
                    _ => FileType::RegularFile,
                };
                (d.file_name(), kind)
            })
            .collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, kind) in names {
            let child = self.intern(&rel.join(&name));
            entries.push((child, kind, name));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, (i + 1) as i64, kind, &name) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        reply.statfs(1 << 24, 1 << 23, 1 << 23, 1 << 20, 1 << 19, 4096, 255, 4096);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Needs root and /dev/fuse; skipped elsewhere.
    #[test]
    fn a_power_cut_drops_exactly_the_unsynced_tail() {
        if !Path::new("/dev/fuse").exists() || unsafe_euid() != 0 {
            eprintln!("skipped: needs root and /dev/fuse");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (backing, mnt) = (dir.path().join("platter"), dir.path().join("mnt"));
        let mut disk = PowerDisk::mount(&backing, &mnt).unwrap();
        let mut f = File::create(mnt.join("wal")).unwrap();
        f.write_all(b"synced ").unwrap();
        f.sync_data().unwrap();
        f.write_all(b"lost").unwrap();
        drop(f);
        std::fs::create_dir(mnt.join("sub")).unwrap();
        std::fs::write(mnt.join("sub/never-synced"), b"gone").unwrap();
        let mut g = File::create(mnt.join("tmp")).unwrap();
        g.write_all(b"renamed").unwrap();
        g.sync_all().unwrap();
        std::fs::rename(mnt.join("tmp"), mnt.join("sub/kept")).unwrap();
        // Still open under its old name: the unsynced tail follows it.
        g.write_all(b"+tail").unwrap();
        drop(g);
        assert_eq!(
            std::fs::read(mnt.join("sub/kept")).unwrap(),
            b"renamed+tail"
        );
        assert_eq!(std::fs::read(mnt.join("wal")).unwrap(), b"synced lost");
        let (files, bytes) = disk.power_cut().unwrap();
        assert_eq!((files, bytes), (3, 13));
        assert_eq!(std::fs::read(mnt.join("wal")).unwrap(), b"synced ");
        assert_eq!(std::fs::read(mnt.join("sub/never-synced")).unwrap(), b"");
        assert_eq!(std::fs::read(mnt.join("sub/kept")).unwrap(), b"renamed");
        drop(disk);
    }

    fn unsafe_euid() -> u32 {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() }
    }
}
