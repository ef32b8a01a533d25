//! `btrship mount`: every moment the retention policy keeps, as a
//! read-only FUSE filesystem in the layout Samba's `vfs_shadow_copy2`
//! reads (Windows "Previous Versions").
//!
//! The root holds one directory per moment, `@GMT-YYYY.MM.DD-HH.MM.SS`
//! (UTC; [`listing`] says which moments), each the whole share as `restore
//! --at` that moment gives it back: names, sizes, modes, owners, times,
//! symlinks, hard links (one inode number), special files and every
//! extended attribute (`security.NTACL`, `user.DOSATTRIB`, POSIX ACLs).
//!
//! **Who may read what.** The filesystem is mounted `allow_other`,
//! `default_permissions`, with POSIX ACLs on (`FUSE_POSIX_ACL`): the
//! kernel checks every access against the stored owner, mode and ACL of
//! each file and directory on the way, as the share itself does, so a
//! user (smbd runs as the connected user) reads an old version only when
//! that version's own permissions let them. The root is `0555 root`; a
//! moment directory carries the share root's own metadata. Nothing can be
//! written (`ro`), nothing executed or used as a device (`noexec`,
//! `nodev`, `nosuid`).
//!
//! **Where data comes from.** Trees and file contents are read lazily:
//! a directory's tree when it is first looked up (trees are kept in a
//! bounded cache shared by all moments, so a file's versions in 500
//! moments read each distinct tree once), a file's data blob by blob with
//! ranged reads, kept in a bounded cache and read ahead ([`blobs`]). On
//! the shipping machine, a file whose content is the same as in the
//! moment's base snapshot, while that snapshot is still on local disk,
//! is read from the snapshot instead (opened beneath it, never following
//! a link; used only when its size and mtime match the record).
//!
//! **New moments** appear without a remount: a background thread reads
//! the history again every `refresh` (default 30 s) and the root's
//! entries expire after a second. Inodes of a moment never change (their
//! attributes are cached for an hour).
//!
//! **Inode numbers** are derived from (moment, parent, name), or (moment,
//! inode) for hard links, by a 64-bit hash: stable for as long as the
//! mount runs, distinct across moments (Samba identifies files by device
//! and inode). A collision between two live inodes (odds about n²/2⁶⁵)
//! makes the second one fail with EIO rather than show the wrong file.

pub mod blobs;
pub mod listing;

use crate::history::ShareHistory;
use crate::restore;
use btrship_crypto::ContentId;
use btrship_upload::format::{Node, NodeKind, Tree};
use btrship_upload::Repository;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry,
    ReplyOpen, ReplyXattr, Request,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use listing::Listed;

const ROOT: u64 = 1;
/// How long the kernel may cache the root's entries (new moments).
const ROOT_TTL: Duration = Duration::from_secs(1);
/// How long it may cache anything inside a moment (it never changes).
const MOMENT_TTL: Duration = Duration::from_secs(3600);
/// Trees kept in memory, counted in entries (about 150 bytes each).
const TREE_CACHE_ENTRIES: usize = 1 << 20;
/// Read ahead this many bytes of blobs past a read.
const READ_AHEAD: u64 = 16 << 20;

/// What the mount shows right now: the history it was read from and the
/// labels chosen from it.
pub struct View {
    pub hist: Arc<ShareHistory>,
    pub listing: Vec<Listed>,
    /// How many labels the policy keeps before the cut to `max_moments`.
    pub kept: usize,
    /// Snapshot names still on local disk (shipping machine only).
    pub local: std::collections::HashSet<String>,
}

/// One moment, resolved: the share's root as of that moment.
pub struct MomentView {
    seq: u64,
    root: Node,
    /// The base snapshot's btrfs name and its root as recorded.
    base_name: String,
    base_root: Node,
}

struct Inode {
    moment: Arc<MomentView>,
    /// Share-relative path ('/'-separated; empty for the moment's root).
    path: Vec<u8>,
    node: Node,
    lookups: AtomicU64,
}

enum Handle {
    /// The root's listing as it was at `opendir`.
    Root(Arc<Vec<Listed>>),
    /// A file read from the repository.
    Repo(Arc<Inode>),
    /// A file read from a local snapshot.
    Local(File),
}

/// The local snapshot area of the shipping machine.
pub struct LocalSnapshots {
    pub area: btrship_snapshot::PrivateArea,
}

impl LocalSnapshots {
    fn open(&self, snapshot: &str, rel: &[u8]) -> std::io::Result<File> {
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(self.area.snapshots_dir().join(snapshot))?;
        let entry = btrship_snapshot::beneath::open_entry(dir.as_fd(), rel)?;
        // Only a regular file is reopened (never a link or a FIFO).
        if !entry.metadata()?.is_file() {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        btrship_snapshot::beneath::reopen(&entry, libc::O_RDONLY | libc::O_NONBLOCK)
    }
}

/// Trees by id, bounded by their total entry count.
struct Trees {
    lru: lru::LruCache<ContentId, Arc<Tree>>,
    entries: usize,
}

/// Resolved moments by place.
type Moments = HashMap<u64, Arc<OnceLock<Result<Arc<MomentView>, Errno>>>>;

/// Replaces the view of a mounted [`MomentFs`] (the refresh thread's).
#[derive(Clone)]
pub struct Refresher {
    view: Arc<RwLock<Arc<View>>>,
    moments: Arc<Mutex<Moments>>,
    blobs: Arc<blobs::Blobs>,
}

impl Refresher {
    /// Replaces the view; moments no longer listed are dropped once
    /// nothing uses them.
    pub fn set_view(&self, view: View) {
        let listed: std::collections::HashSet<u64> = view.listing.iter().map(|l| l.seq).collect();
        lock(&self.moments).retain(|seq, _| listed.contains(seq));
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(view);
    }

    /// Stops the read-ahead threads.
    pub fn stop(&self) {
        self.blobs.stop();
    }
}

/// The filesystem.
pub struct MomentFs {
    repo: Arc<Repository>,
    view: Arc<RwLock<Arc<View>>>,
    moments: Arc<Mutex<Moments>>,
    inodes: Mutex<HashMap<u64, Arc<Inode>>>,
    trees: Mutex<Trees>,
    blobs: Arc<blobs::Blobs>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_handle: AtomicU64,
    local: Option<Arc<LocalSnapshots>>,
    started: SystemTime,
}

fn ns_time(ns: i64) -> SystemTime {
    let d = Duration::from_nanos(ns.unsigned_abs());
    if ns >= 0 {
        UNIX_EPOCH + d
    } else {
        UNIX_EPOCH.checked_sub(d).unwrap_or(UNIX_EPOCH)
    }
}

fn file_type(k: NodeKind) -> FileType {
    match k {
        NodeKind::File => FileType::RegularFile,
        NodeKind::Dir => FileType::Directory,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::Fifo => FileType::NamedPipe,
        NodeKind::Socket => FileType::Socket,
        NodeKind::Chardev => FileType::CharDevice,
        NodeKind::Blockdev => FileType::BlockDevice,
    }
}

fn attr(ino: u64, n: &Node) -> FileAttr {
    let size = match n.kind {
        NodeKind::File => n.size,
        NodeKind::Symlink => n.target.as_ref().map_or(0, |t| t.len() as u64),
        _ => 0,
    };
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: ns_time(n.mtime_ns),
        mtime: ns_time(n.mtime_ns),
        ctime: ns_time(n.ctime_ns),
        crtime: ns_time(n.mtime_ns),
        kind: file_type(n.kind),
        perm: (n.mode & 0o7777) as u16,
        nlink: n.nlink.clamp(1, u64::from(u32::MAX)) as u32,
        uid: n.uid,
        gid: n.gid,
        rdev: n.rdev as u32,
        blksize: 4096,
        flags: 0,
    }
}

fn hashed(parts: impl Hash) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    match h.finish() {
        n if n <= ROOT => n + 2,
        n => n,
    }
}

fn moment_ino(seq: u64) -> u64 {
    hashed(("moment", seq))
}

fn child_ino(seq: u64, parent: u64, n: &Node) -> u64 {
    if n.kind != NodeKind::Dir && n.nlink > 1 && n.ino != 0 {
        hashed(("link", seq, n.ino))
    } else {
        hashed(("entry", seq, parent, &n.name))
    }
}

impl MomentFs {
    pub fn new(
        repo: Arc<Repository>,
        view: View,
        cache_bytes: u64,
        local: Option<Arc<LocalSnapshots>>,
    ) -> MomentFs {
        MomentFs {
            blobs: blobs::Blobs::new(repo.clone(), cache_bytes),
            repo,
            view: Arc::new(RwLock::new(Arc::new(view))),
            moments: Arc::new(Mutex::new(HashMap::new())),
            inodes: Mutex::new(HashMap::new()),
            trees: Mutex::new(Trees {
                lru: lru::LruCache::unbounded(),
                entries: 0,
            }),
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            local,
            started: SystemTime::now(),
        }
    }

    /// The current view.
    pub fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// What replaces the view while the filesystem is mounted.
    pub fn refresher(&self) -> Refresher {
        Refresher {
            view: self.view.clone(),
            moments: self.moments.clone(),
            blobs: self.blobs.clone(),
        }
    }

    /// The moment behind a label, resolved once.
    fn moment(&self, label: &[u8]) -> Result<Arc<MomentView>, Errno> {
        let view = self.view();
        let listed = view
            .listing
            .iter()
            .find(|l| l.label.as_bytes() == label)
            .ok_or(Errno::ENOENT)?
            .clone();
        let cell = lock(&self.moments)
            .entry(listed.seq)
            .or_insert_with(|| Arc::new(OnceLock::new()))
            .clone();
        cell.get_or_init(|| self.resolve(&view.hist, &listed))
            .clone()
    }

    fn resolve(&self, hist: &ShareHistory, l: &Listed) -> Result<Arc<MomentView>, Errno> {
        let at = chrono::DateTime::from_timestamp_nanos(l.time_ns);
        let resolved = crate::moment::at(&self.repo, hist, at)
            .and_then(|m| Ok((m, restore::find_snapshot(hist, at)?)));
        match resolved {
            Ok((m, (_, base))) => {
                let mut root = m.record.root.clone();
                root.subtree = Some(m.record.tree);
                root.name.clear();
                let mut base_root = base.root.clone();
                base_root.subtree = Some(base.tree);
                Ok(Arc::new(MomentView {
                    seq: l.seq,
                    root,
                    base_name: base.snapshot,
                    base_root,
                }))
            }
            Err(e) => {
                tracing::warn!("moment {} cannot be shown: {e:#}", l.label);
                Err(Errno::EIO)
            }
        }
    }

    fn tree(&self, dir: &Node) -> Result<Arc<Tree>, Errno> {
        let id = dir.subtree.ok_or(Errno::EIO)?.0;
        if let Some(t) = lock(&self.trees).lru.get(&id) {
            return Ok(t.clone());
        }
        let tree = restore::read_checked_tree(&self.repo, dir).map_err(|e| {
            tracing::warn!(
                "directory {:?}: tree cannot be read: {e:#}",
                String::from_utf8_lossy(&dir.name)
            );
            Errno::EIO
        })?;
        let tree = Arc::new(tree);
        let mut trees = lock(&self.trees);
        trees.entries += tree.entries.len();
        if let Some(old) = trees.lru.put(id, tree.clone()) {
            trees.entries -= old.entries.len();
        }
        while trees.entries > TREE_CACHE_ENTRIES {
            match trees.lru.pop_lru() {
                Some((_, old)) => trees.entries -= old.entries.len(),
                None => break,
            }
        }
        Ok(tree)
    }

    fn inode(&self, ino: u64) -> Result<Arc<Inode>, Errno> {
        lock(&self.inodes).get(&ino).cloned().ok_or(Errno::ENOENT)
    }

    /// Registers one more lookup of `ino` (the kernel's reference).
    fn remember(&self, ino: u64, make: impl FnOnce() -> Inode) -> Result<Arc<Inode>, Errno> {
        let mut inodes = lock(&self.inodes);
        let inode = inodes.entry(ino).or_insert_with(|| Arc::new(make()));
        inode.lookups.fetch_add(1, Ordering::Relaxed);
        Ok(inode.clone())
    }

    fn lookup_in(&self, parent: u64, name: &[u8]) -> Result<(u64, Node, Duration), Errno> {
        if parent == ROOT {
            let m = self.moment(name)?;
            let ino = moment_ino(m.seq);
            let node = m.root.clone();
            let inode = self.remember(ino, || Inode {
                moment: m.clone(),
                path: Vec::new(),
                node: node.clone(),
                lookups: AtomicU64::new(0),
            })?;
            if inode.moment.seq != m.seq {
                return Err(self.collision(ino));
            }
            return Ok((ino, node, ROOT_TTL));
        }
        let dir = self.inode(parent)?;
        if dir.node.kind != NodeKind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let tree = self.tree(&dir.node)?;
        let i = tree
            .entries
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .map_err(|_| Errno::ENOENT)?;
        let node = tree.entries[i].clone();
        let ino = child_ino(dir.moment.seq, parent, &node);
        let mut path = dir.path.clone();
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(name);
        let inode = self.remember(ino, || Inode {
            moment: dir.moment.clone(),
            path,
            node: node.clone(),
            lookups: AtomicU64::new(0),
        })?;
        let same = inode.moment.seq == dir.moment.seq
            && (inode.node == node
                || (node.nlink > 1 && inode.node.ino == node.ino && inode.node.kind == node.kind));
        if !same {
            return Err(self.collision(ino));
        }
        Ok((ino, node, MOMENT_TTL))
    }

    fn collision(&self, ino: u64) -> Errno {
        tracing::error!("inode number {ino:#x} is taken by another file (a hash collision); that file cannot be shown");
        Errno::EIO
    }

    fn root_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo(ROOT),
            size: 0,
            blocks: 0,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: FileType::Directory,
            perm: 0o555,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Reads `size` bytes at `offset` of a file from its blobs.
    fn read_repo(&self, inode: &Inode, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let n = &inode.node;
        let end = n.size.min(offset.saturating_add(u64::from(size)));
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut out = vec![0u8; (end - offset) as usize];
        let first = n
            .content
            .partition_point(|e| e.0.saturating_add(e.2) <= offset);
        let mut next = first;
        for e in &n.content[first..] {
            if e.0 >= end {
                break;
            }
            next += 1;
            let data = self.blobs.get(&e.1 .0).map_err(|err| {
                tracing::warn!(
                    "{}: blob {} cannot be read: {err}",
                    String::from_utf8_lossy(&inode.path),
                    e.1 .0
                );
                Errno::EIO
            })?;
            if data.len() as u64 != e.2 {
                tracing::warn!(
                    "{}: blob {} holds {} bytes, the tree says {}: the repository is damaged",
                    String::from_utf8_lossy(&inode.path),
                    e.1 .0,
                    data.len(),
                    e.2
                );
                return Err(Errno::EIO);
            }
            let from = offset.max(e.0);
            let to = end.min(e.0 + e.2);
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&data[(from - e.0) as usize..(to - e.0) as usize]);
        }
        let mut ahead = 0u64;
        let upcoming = n.content[next..].iter().take_while(|e| {
            ahead += e.2;
            ahead <= READ_AHEAD
        });
        self.blobs.read_ahead(upcoming.map(|e| e.1 .0));
        Ok(out)
    }

    /// The local snapshot's copy of a file, when it holds this version.
    fn local_copy(&self, inode: &Inode) -> Option<File> {
        let local = self.local.as_ref()?;
        let m = &inode.moment;
        if !self.view().local.contains(&m.base_name) {
            return None;
        }
        let view = self.view();
        let base = view
            .hist
            .node_at(&self.repo, &m.base_root, &inode.path)
            .ok()??;
        if base.content != inode.node.content || base.size != inode.node.size {
            return None;
        }
        let f = local.open(&m.base_name, &inode.path).ok()?;
        let meta = f.metadata().ok()?;
        let mtime = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
        (meta.is_file() && meta.len() == inode.node.size && mtime == inode.node.mtime_ns)
            .then_some(f)
    }

    fn new_handle(&self, h: Handle) -> u64 {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, h);
        fh
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Filesystem for MomentFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(e) = config.add_capabilities(fuser::InitFlags::FUSE_POSIX_ACL) {
            tracing::warn!("the kernel does not check POSIX ACLs of FUSE files ({e:?}); only modes are checked");
        }
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup_in(parent.0, name.as_bytes()) {
            Ok((ino, node, ttl)) => reply.entry(&ttl, &attr(ino, &node), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut inodes = lock(&self.inodes);
        if let Some(i) = inodes.get(&ino.0) {
            let before = i.lookups.fetch_sub(
                nlookup.min(i.lookups.load(Ordering::Relaxed)),
                Ordering::Relaxed,
            );
            if before <= nlookup {
                inodes.remove(&ino.0);
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino.0 == ROOT {
            return reply.attr(&ROOT_TTL, &self.root_attr());
        }
        match self.inode(ino.0) {
            Ok(i) => reply.attr(&MOMENT_TTL, &attr(ino.0, &i.node)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.inode(ino.0) {
            Ok(i) => match &i.node.target {
                Some(t) if i.node.kind == NodeKind::Symlink => reply.data(t),
                _ => reply.error(Errno::EINVAL),
            },
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let inode = match self.inode(ino.0) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        if inode.node.kind != NodeKind::File {
            return reply.error(Errno::EINVAL);
        }
        let h = match self.local_copy(&inode) {
            Some(f) => {
                tracing::debug!(
                    "{}: read from local snapshot {}",
                    String::from_utf8_lossy(&inode.path),
                    inode.moment.base_name
                );
                Handle::Local(f)
            }
            None => Handle::Repo(inode),
        };
        reply.opened(FileHandle(self.new_handle(h)), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let read = {
            let handles = lock(&self.handles);
            match handles.get(&fh.0) {
                Some(Handle::Local(f)) => match f.try_clone() {
                    Ok(f) => Ok(Err(f)),
                    Err(e) => Err(Errno::from(e)),
                },
                Some(Handle::Repo(i)) => Ok(Ok(i.clone())),
                _ => Err(Errno::EBADF),
            }
        };
        let data = match read {
            Ok(Ok(inode)) => self.read_repo(&inode, offset, size),
            Ok(Err(file)) => {
                let mut buf = vec![0u8; size as usize];
                let mut got = 0;
                loop {
                    match file.read_at(&mut buf[got..], offset + got as u64) {
                        Ok(0) => break,
                        Ok(n) => {
                            got += n;
                            if got == buf.len() {
                                break;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            got = usize::MAX;
                            tracing::warn!("reading a local snapshot file failed: {e}");
                            break;
                        }
                    }
                }
                if got == usize::MAX {
                    Err(Errno::EIO)
                } else {
                    buf.truncate(got);
                    Ok(buf)
                }
            }
            Err(e) => Err(e),
        };
        match data {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: fuser::ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        lock(&self.handles).remove(&fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 == ROOT {
            let listing = Arc::new(self.view().listing.clone());
            return reply.opened(
                FileHandle(self.new_handle(Handle::Root(listing))),
                FopenFlags::empty(),
            );
        }
        match self.inode(ino.0) {
            Ok(i) if i.node.kind == NodeKind::Dir => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 == ROOT {
            let listing = match lock(&self.handles).get(&fh.0) {
                Some(Handle::Root(l)) => l.clone(),
                _ => return reply.error(Errno::EBADF),
            };
            let dots = [(ROOT, "."), (ROOT, "..")];
            let mut i = offset as usize;
            while i < 2 + listing.len() {
                let (ino, name, kind) = if i < 2 {
                    (dots[i].0, dots[i].1.to_string(), FileType::Directory)
                } else {
                    let l = &listing[i - 2];
                    (moment_ino(l.seq), l.label.clone(), FileType::Directory)
                };
                if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                    break;
                }
                i += 1;
            }
            return reply.ok();
        }
        let dir = match self.inode(ino.0) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        let tree = match self.tree(&dir.node) {
            Ok(t) => t,
            Err(e) => return reply.error(e),
        };
        let mut i = offset as usize;
        while i < 2 + tree.entries.len() {
            let full = if i < 2 {
                let name = if i == 0 { "." } else { ".." };
                reply.add(ino, (i + 1) as u64, FileType::Directory, name)
            } else {
                let n = &tree.entries[i - 2];
                let child = child_ino(dir.moment.seq, ino.0, n);
                reply.add(
                    INodeNo(child),
                    (i + 1) as u64,
                    file_type(n.kind),
                    OsStr::from_bytes(&n.name),
                )
            };
            if full {
                break;
            }
            i += 1;
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: fuser::ReplyEmpty,
    ) {
        if fh.0 != 0 {
            lock(&self.handles).remove(&fh.0);
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if ino.0 == ROOT {
            return reply.error(Errno::NO_XATTR);
        }
        let inode = match self.inode(ino.0) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        let Some(x) = inode.node.xattrs.iter().find(|x| x.0 == name.as_bytes()) else {
            return reply.error(Errno::NO_XATTR);
        };
        xattr_reply(&x.1, size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let mut names = Vec::new();
        if ino.0 != ROOT {
            match self.inode(ino.0) {
                Ok(i) => {
                    for x in &i.node.xattrs {
                        names.extend_from_slice(&x.0);
                        names.push(0);
                    }
                }
                Err(e) => return reply.error(e),
            }
        }
        xattr_reply(&names, size, reply);
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        let inode = match self.inode(ino.0) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        match seek_data_hole(&inode.node, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: fuser::ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }
}

/// `SEEK_DATA` / `SEEK_HOLE` from a file's data regions (holes are the
/// gaps between them), as the file restores.
fn seek_data_hole(n: &Node, offset: i64, whence: i32) -> Result<i64, Errno> {
    let Ok(off) = u64::try_from(offset) else {
        return Err(Errno::EINVAL);
    };
    if off >= n.size {
        return Err(Errno::ENXIO);
    }
    let ends = |e: &btrship_upload::format::Extent| e.0.saturating_add(e.2);
    let from = n.content.partition_point(|e| ends(e) <= off);
    let pos = match whence {
        libc::SEEK_DATA => match n.content.get(from) {
            Some(e) => e.0.max(off),
            None => return Err(Errno::ENXIO),
        },
        libc::SEEK_HOLE => {
            let mut pos = off;
            for e in &n.content[from..] {
                if e.0 > pos {
                    break;
                }
                pos = pos.max(ends(e));
            }
            pos.min(n.size)
        }
        _ => return Err(Errno::EINVAL),
    };
    i64::try_from(pos).map_err(|_| Errno::EINVAL)
}

fn xattr_reply(value: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if (size as usize) < value.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

/// The FUSE superblock magic (`statfs` of a FUSE mount).
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// Makes `dir` ready to mount on: creates it (0755, parents 0755) when
/// missing, detaches a dead mount a killed `btrship mount` left there,
/// and refuses a live one, a symlink or a non-directory.
pub fn prepare_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::{bail, Context};
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            tracing::info!("{}: detaching a dead FUSE mount", dir.display());
            rustix::mount::unmount(dir, rustix::mount::UnmountFlags::DETACH).with_context(
                || format!("{} is a dead mount and cannot be detached", dir.display()),
            )?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .with_context(|| format!("cannot create the mount point {}", dir.display()))?;
        }
        Err(e) => return Err(e).with_context(|| format!("cannot use {}", dir.display())),
        Ok(m) if m.file_type().is_symlink() => bail!(
            "{} is a symbolic link: give the directory itself",
            dir.display()
        ),
        Ok(m) if !m.is_dir() => bail!("{} is not a directory", dir.display()),
        Ok(_) => {
            let fs = rustix::fs::statfs(dir)
                .with_context(|| format!("cannot statfs {}", dir.display()))?;
            if fs.f_type as i64 == FUSE_SUPER_MAGIC {
                bail!(
                    "{} is already a FUSE mount (another btrship mount?): stop it or unmount it first",
                    dir.display()
                );
            }
        }
    }
    Ok(())
}

/// Directories on the way to `dir` that other users cannot traverse (so
/// smbd, running as the connected user, could not list the moments).
pub fn untraversable(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    dir.ancestors()
        .filter(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 == 0))
        .map(|d| d.to_path_buf())
        .collect()
}

/// Mounts `fs` on `dir` and serves it until SIGTERM or SIGINT (then
/// unmounts) or until someone unmounts it. `reload` is called every
/// `every` from a background thread; a new view replaces the old one.
pub fn serve(
    owned: MomentFs,
    dir: &std::path::Path,
    name: &str,
    every: Duration,
    reload: &(dyn Fn() -> Option<View> + Sync),
    rt: &tokio::runtime::Handle,
    on_ready: impl FnOnce(),
) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::FSName(format!("btrship:{name}")),
        fuser::MountOption::Subtype("btrship".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoExec,
        fuser::MountOption::NoAtime,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(4);
    config.clone_fd = true;
    let fs_handle = owned.refresher();
    let fs = &fs_handle;
    let mut session = fuser::Session::new(owned, dir, &config).with_context(|| {
        format!(
            "cannot mount FUSE on {} (is /dev/fuse there?)",
            dir.display()
        )
    })?;
    let mut unmounter = session.unmount_callable();
    on_ready();
    let (ended_tx, ended_rx) = std::sync::mpsc::channel::<()>();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| -> anyhow::Result<()> {
        s.spawn(|| {
            let mut last = std::time::Instant::now();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                if last.elapsed() < every {
                    continue;
                }
                last = std::time::Instant::now();
                if let Some(v) = reload() {
                    fs.set_view(v);
                }
            }
        });
        let joined = s.spawn(move || {
            let r = session.run();
            let _ = ended_tx.send(());
            r
        });
        let signalled = rt.block_on(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            let mut int =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
            let ended = tokio::task::spawn_blocking(move || ended_rx.recv());
            tokio::select! {
                _ = term.recv() => Ok::<bool, std::io::Error>(true),
                _ = int.recv() => Ok(true),
                _ = ended => Ok(false),
            }
        })?;
        if signalled {
            tracing::info!("unmounting {}", dir.display());
            unmounter
                .unmount()
                .with_context(|| format!("cannot unmount {}", dir.display()))?;
        }
        stop.store(true, Ordering::Relaxed);
        fs.stop();
        match joined.join() {
            Ok(r) => r.context("the FUSE session failed")?,
            Err(_) => anyhow::bail!("the FUSE session thread panicked"),
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use btrship_upload::format::{BlobId, Extent};

    fn file(size: u64, regions: &[(u64, u64)]) -> Node {
        let mut n = Node::empty_dir(b"f", 0o644);
        n.kind = NodeKind::File;
        n.size = size;
        n.content = regions
            .iter()
            .map(|&(o, l)| Extent(o, BlobId(ContentId([o as u8; 32])), l))
            .collect();
        n
    }

    #[test]
    fn data_and_holes_follow_the_extents() {
        // data [0,10) [10,20) hole [20,50) data [50,60) hole [60,100)
        let n = file(100, &[(0, 10), (10, 10), (50, 10)]);
        let data = |o| seek_data_hole(&n, o, libc::SEEK_DATA);
        let hole = |o| seek_data_hole(&n, o, libc::SEEK_HOLE);
        assert_eq!(data(0), Ok(0));
        assert_eq!(data(15), Ok(15));
        assert_eq!(data(20), Ok(50));
        assert_eq!(data(60), Err(Errno::ENXIO));
        assert_eq!(hole(0), Ok(20));
        assert_eq!(hole(25), Ok(25));
        assert_eq!(hole(55), Ok(60));
        assert_eq!(hole(100), Err(Errno::ENXIO));
        assert_eq!(data(-1), Err(Errno::EINVAL));
        // A file that is all data ends in the implicit hole at EOF.
        let full = file(10, &[(0, 10)]);
        assert_eq!(seek_data_hole(&full, 3, libc::SEEK_HOLE), Ok(10));
        // An empty-content file is one hole.
        let sparse = file(10, &[]);
        assert_eq!(
            seek_data_hole(&sparse, 0, libc::SEEK_DATA),
            Err(Errno::ENXIO)
        );
        assert_eq!(seek_data_hole(&sparse, 0, libc::SEEK_HOLE), Ok(0));
    }

    #[test]
    fn inode_numbers_are_stable_distinct_and_shared_by_hard_links() {
        let mut a = file(1, &[]);
        a.name = b"a".to_vec();
        let mut b = a.clone();
        b.name = b"b".to_vec();
        assert_ne!(child_ino(1, 5, &a), child_ino(1, 5, &b));
        assert_eq!(child_ino(1, 5, &a), child_ino(1, 5, &a.clone()));
        assert_ne!(child_ino(1, 5, &a), child_ino(2, 5, &a), "another moment");
        (a.nlink, a.ino, b.nlink, b.ino) = (2, 77, 2, 77);
        assert_eq!(
            child_ino(1, 5, &a),
            child_ino(1, 9, &b),
            "one inode, two names"
        );
        assert!(child_ino(1, 5, &a) > ROOT && moment_ino(1) > ROOT);
    }
}
