//! `btrship daemon NAME`: continuous versions of a share between snapshots.
//!
//! Two threads and a durable queue between them:
//!
//! - **capture** (the calling thread) reads fanotify events (one
//!   filesystem mark on the btrfs top level, FID mode; see
//!   `btrship_snapshot::watch`), turns them into the set of paths they
//!   touched, and records each path's state *now*: a regular file is
//!   reflink-cloned into the private staging subvolume under a read lease
//!   (granted only when no writer has it open, so the clone is exactly a
//!   closed version, never a torn mix), a directory or other entry by its
//!   metadata, a path that is gone as a tombstone. The batch's clones are
//!   made durable with one `syncfs`, then its captures are committed in one
//!   SQLite transaction before anything else happens to them. A close seen while a writer has reopened the
//!   file is recorded as `busy`: that writer's own close supersedes it.
//!   Paths are opened from the share root's directory fd without following
//!   any symlink or leaving the share (`openat2` with `RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV`, see
//!   `btrship_snapshot::beneath`), and the metadata, xattrs, symlink target,
//!   lease and clone are all taken on that fd: a path below a directory
//!   that a user swapped for a symlink is "nothing there" (a tombstone),
//!   never a file from elsewhere. A file renamed or replaced between the
//!   clone and the check that its path still names it is looked at again.
//!   Version entries carry the inode's real `ino` and `nlink`, so restore
//!   keeps hard links (FORMAT.md §5); a change to an inode with several
//!   names, or one whose event lost its path (its directory was removed
//!   before the event was read), is captured under every name the inode
//!   has (`BTRFS_IOC_INO_PATHS`).
//! - **ship** waits until a capture has settled (no newer capture of its
//!   path for `settle_ms`; newer ones supersede older ones inside that
//!   window) or a `sync` covers it, then ships a batch: changed ranges
//!   against the path's previous clone (FIEMAP), chunks, packs, one index
//!   and one `versions/` object for the whole batch; only then are the
//!   captures marked shipped and older clones dropped.
//!
//! Gaps are closed with snapshots: at start (downtime, a crash) and on a
//! fanotify queue overflow the shipper takes a snapshot and ships it with
//! btrfs-native change detection, exactly like `btrship snapshot`.
//!
//! `sync`: a request row in the state database; the capture thread answers
//! it after a read that found the event queue empty (every close before the
//! request was then read and captured) with the newest capture's sequence
//! number; `btrship sync` waits until nothing up to it is pending.

use crate::config::ShareConfig;
use crate::ship;
use crate::state::{Capture, NewCapture, ShippedBatch, State};
use crate::{queue, state};
use anyhow::{Context, Result};
use btrship_diff::{ChunkSizes, FileKind, FsMeta};
use btrship_snapshot::beneath;
use btrship_snapshot::watch::{clone_closed_file, WatchEvent, Watcher};
use btrship_snapshot::{PrivateArea, Share};
use btrship_upload::format::{
    from_cbor, to_cbor, Extent, Node, VersionBatch, VersionEntry, VersionKind,
};
use btrship_upload::history::{HistoryBody, HistoryKind};
use btrship_upload::layers::Counters;
use btrship_upload::Repository;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Captures per shipped batch at most.
const BATCH_LIMIT: usize = 20_000;
/// A path whose metadata keeps changing under us is retried this often.
const CAPTURE_ATTEMPTS: usize = 3;

/// Everything the daemon needs, made by the CLI.
pub struct Daemon {
    pub cfg: ShareConfig,
    pub share: Share,
    pub area: Arc<PrivateArea>,
    pub state_path: PathBuf,
    pub state_dir: PathBuf,
    pub host: String,
    /// Opens the repository (may fail while the store is away).
    pub open_repo: Box<dyn Fn() -> Result<Repository> + Send>,
    pub counters: Arc<Counters>,
    /// Set by SIGTERM/SIGINT.
    pub stop: Arc<AtomicBool>,
}

/// The current time as stored in captures: RFC 3339 UTC with 9 fraction
/// digits, so text order is time order.
pub fn now_text() -> String {
    time_text(chrono::Utc::now())
}

fn time_text(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// Tells systemd (`Type=notify`) about readiness and status; a no-op
/// outside systemd.
pub fn sd_notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_bytes();
    let sent = if let Some(abs) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abs)
            .and_then(|a| sock.send_to_addr(msg.as_bytes(), &a))
    } else {
        sock.send_to(msg.as_bytes(), Path::new(&path))
    };
    if let Err(e) = sent {
        tracing::debug!("sd_notify: {e}");
    }
}

impl Daemon {
    /// Runs until `stop` is set. Returns after in-flight work finished;
    /// what is not shipped stays queued for the next start.
    pub fn run(self) -> Result<()> {
        // Every record of this daemon carries its share (journald: SHARE=).
        let span = tracing::info_span!("daemon", share = %self.cfg.name);
        let _entered = span.enter();
        let staging = self.area.staging_dir()?;
        let mut state = State::open(&self.state_path)?;
        remove_orphan_clones(&state, &staging)?;
        let mut watcher = Watcher::new(&self.area, &self.share)?;
        // The start-up snapshot is the first reconcile: `sync` is answered
        // only once it shipped (the versions it acknowledges need a
        // snapshot below them).
        let reconcile = Arc::new(Reconcile::default());
        reconcile.request();
        let (wake_tx, wake_rx) = mpsc::channel::<()>();

        let shipper = Shipper {
            cfg: self.cfg.clone(),
            share: Share::open(&self.cfg.path)?,
            area: self.area.clone(),
            staging: staging.clone(),
            state: State::open(&self.state_path)?,
            state_dir: self.state_dir.clone(),
            host: self.host.clone(),
            counters: self.counters.clone(),
            stop: self.stop.clone(),
            reconcile: reconcile.clone(),
            wake: wake_rx,
        };
        let open_repo = self.open_repo;
        let ship_stop = self.stop.clone();
        let ship_span = span.clone();
        let ship_thread = std::thread::Builder::new()
            .name("ship".into())
            .spawn(move || {
                let _entered = ship_span.enter();
                let result = shipper.run(open_repo);
                // Capture stops with the shipper (a permanent error).
                ship_stop.store(true, SeqCst);
                result
            })
            .context("cannot start the shipping thread")?;

        let msg = format!("daemon started: watching {}", self.cfg.path.display());
        tracing::info!("{msg}");
        state.log_event("info", crate::status::DAEMON_STARTED, &msg)?;
        sd_notify(&format!(
            "READY=1\nSTATUS=watching {}",
            self.cfg.path.display()
        ));
        let root_dir = File::options()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.cfg.path)
            .with_context(|| format!("cannot open the share {}", self.cfg.path.display()))?;
        let root_dev = root_dir.metadata()?.dev();
        let capture = Capturer {
            cfg: &self.cfg,
            root: self.cfg.path.clone(),
            root_dir,
            root_dev,
            staging,
            heartbeat: Heartbeat {
                path: daemon_lock_path(&self.state_dir, &self.cfg.name),
                last: Instant::now(),
                requests: self.counters.values().requests(),
                counters: self.counters.clone(),
            },
            counter: 0,
            // Busy captures left by an earlier run: look at them again.
            busy: state.busy_paths()?.into_iter().collect(),
            unsynced: false,
        };
        let result = capture.run(&mut watcher, &mut state, &self.stop, &reconcile, &wake_tx);
        // Stop the shipper too (also when capture failed).
        self.stop.store(true, SeqCst);
        let _ = wake_tx.send(());
        sd_notify("STOPPING=1\nSTATUS=stopping: finishing the batch in flight");
        let shipped = ship_thread
            .join()
            .map_err(|_| anyhow::anyhow!("the shipping thread panicked"))?;
        result.and(shipped)?;
        state.log_event("info", crate::status::DAEMON_STOPPED, "daemon stopped")?;
        Ok(())
    }
}

/// A capture that carries no clone and no metadata (busy, delete), now.
fn without_content(path: &[u8], kind: &'static str) -> NewCapture {
    NewCapture {
        time: now_text(),
        path: path.to_vec(),
        kind,
        clone: None,
        node: None,
        size: 0,
    }
}

/// Deletes staging files the state no longer refers to (a crash between
/// clone and commit leaves them).
fn remove_orphan_clones(state: &State, staging: &Path) -> Result<()> {
    let live = state.live_clones()?;
    for entry in std::fs::read_dir(staging).with_context(|| format!("{}", staging.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        if !live.contains(name.to_string_lossy().as_ref()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

fn remove_clones(staging: &Path, names: &[String]) {
    for n in names {
        if let Err(e) = std::fs::remove_file(staging.join(n)) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot remove clone {n}: {e}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// capture
// ---------------------------------------------------------------------------

struct Capturer<'a> {
    cfg: &'a ShareConfig,
    /// The share's path (for messages only: nothing is opened by it).
    root: PathBuf,
    /// The share root directory: every capture is opened beneath it.
    root_dir: File,
    /// Its device: entries on another (nested subvolumes) are not captured.
    root_dev: u64,
    staging: PathBuf,
    heartbeat: Heartbeat,
    counter: u64,
    /// Paths last captured as busy (a writer had them open).
    busy: std::collections::BTreeSet<Vec<u8>>,
    /// Clones made since the last filesystem sync.
    unsynced: bool,
}

/// A path an event touched; `subtree` when a directory arrived by rename
/// (everything below it is new at this path).
struct Dirty {
    path: Vec<u8>,
    subtree: bool,
}

fn rel_bytes(p: &Path) -> Vec<u8> {
    let b = p.as_os_str().as_bytes();
    let b = b.strip_prefix(b"/").unwrap_or(b);
    b.to_vec()
}

/// The paths a batch of events touched, in first-seen order, each followed
/// by its parent directory (whose mtime the change moved; "" is the share
/// root).
///
/// `orphans` gets the inode numbers of files closed after writing or
/// changed in metadata whose event has no path any more (the directory it
/// happened in was removed or renamed away before the event was read): the
/// inode may still have other names (hard links), which changed with it.
fn dirty_paths(
    events: &[WatchEvent],
    overflow: &mut bool,
    orphans: &mut std::collections::BTreeSet<u64>,
) -> Vec<Dirty> {
    let mut seen = std::collections::HashMap::<Vec<u8>, usize>::new();
    let mut out: Vec<Dirty> = Vec::new();
    let mut add_one = |path: Vec<u8>, subtree: bool, out: &mut Vec<Dirty>| match seen.get(&path) {
        Some(&i) => out[i].subtree |= subtree,
        None => {
            seen.insert(path.clone(), out.len());
            out.push(Dirty { path, subtree });
        }
    };
    let mut add = |p: Option<PathBuf>, subtree: bool, out: &mut Vec<Dirty>| {
        let Some(p) = p else { return };
        let path = rel_bytes(&p);
        if !path.is_empty() {
            let parent = match path.iter().rposition(|&b| b == b'/') {
                Some(i) => path[..i].to_vec(),
                None => Vec::new(),
            };
            add_one(path, subtree, out);
            add_one(parent, false, out);
        } else {
            add_one(path, false, out);
        }
    };
    for e in events {
        let k = e.kind;
        if k.overflow {
            *overflow = true;
            continue;
        }
        if k.rename {
            add(e.old_path(), false, &mut out);
            add(e.new_path(), k.is_dir, &mut out);
            continue;
        }
        let path = e.path();
        if path.is_none() && !k.is_dir && (k.close_write || k.attrib) {
            if let Some(o) = e.object {
                orphans.insert(o.ino);
            }
        }
        add(path, k.is_dir && k.moved_to, &mut out);
    }
    out
}

impl Capturer<'_> {
    fn run(
        mut self,
        watcher: &mut Watcher,
        state: &mut State,
        stop: &AtomicBool,
        reconcile: &Reconcile,
        wake: &mpsc::Sender<()>,
    ) -> Result<()> {
        let settle = Duration::from_millis(self.cfg.settle_ms);
        while !stop.load(SeqCst) {
            self.heartbeat.tick();
            let open_sync = if reconcile.caught_up() {
                state.open_sync_request()?
            } else {
                None
            };
            let started = now_text();
            let timeout = if open_sync.is_some() {
                Duration::ZERO
            } else if !self.busy.is_empty() {
                Duration::from_millis(20)
            } else {
                Duration::from_millis(200)
            };
            let events = watcher.read(timeout)?;
            let mut overflow = false;
            let mut linked = std::collections::BTreeSet::new();
            let retrying = events.is_empty();
            let dirty = if events.is_empty() {
                // The queue was empty: every close before `started` has
                // been read and its capture committed.
                if open_sync.is_some() {
                    state.answer_sync_requests(&started, state.last_capture_seq()?)?;
                    let _ = wake.send(());
                }
                if self.busy.is_empty() {
                    continue;
                }
                // Files a writer held open when we last looked: look again
                // (their writer's close usually brings an event, but the
                // kernel merges queued events, so do not rely on it).
                self.busy
                    .iter()
                    .map(|p| Dirty {
                        path: p.clone(),
                        subtree: false,
                    })
                    .collect()
            } else {
                dirty_paths(&events, &mut overflow, &mut linked)
            };
            if overflow {
                let msg = "fanotify queue overflow: events were lost; reconciling with a snapshot";
                tracing::warn!("{msg}");
                state.log_event("warn", "overflow", msg)?;
                reconcile.request();
            }
            let mut caps = Vec::new();
            for d in dirty {
                if self.cfg.excluded(&d.path) {
                    continue;
                }
                if let Err(e) = self.capture(&d.path, d.subtree, &mut caps) {
                    let msg = format!(
                        "cannot capture {}: {e:#}; a snapshot carries it (sync waits for it)",
                        String::from_utf8_lossy(&d.path)
                    );
                    tracing::warn!("{msg}");
                    state.log_event("warn", "capture", &msg)?;
                    reconcile.request();
                }
            }
            // An inode with several names changed through one of them: all
            // its names hold the new state (and the new link count).
            for c in &caps {
                if let Some(n) = c
                    .node
                    .as_deref()
                    .and_then(|raw| from_cbor::<Node>(raw).ok())
                {
                    if n.nlink > 1 && n.kind != btrship_upload::format::NodeKind::Dir {
                        linked.insert(n.ino);
                    }
                }
            }
            if !linked.is_empty() {
                let seen: std::collections::HashSet<Vec<u8>> =
                    caps.iter().map(|c| c.path.clone()).collect();
                for ino in linked {
                    let names = match btrship_snapshot::inode_paths(&self.root, ino) {
                        Ok(names) => names,
                        Err(e) => {
                            tracing::warn!("cannot list the names of inode {ino}: {e}");
                            continue;
                        }
                    };
                    for name in names {
                        let p = rel_bytes(&name);
                        if p.is_empty() || seen.contains(&p) || self.cfg.excluded(&p) {
                            continue;
                        }
                        if let Err(e) = self.capture(&p, false, &mut caps) {
                            tracing::warn!("cannot capture {}: {e:#}", String::from_utf8_lossy(&p));
                        }
                    }
                }
            }
            if retrying {
                // Still open: its busy row is already queued.
                caps.retain(|c| c.kind != "busy");
            }
            for c in &caps {
                if c.kind == "busy" {
                    self.busy.insert(c.path.clone());
                } else {
                    self.busy.remove(&c.path);
                }
            }
            if caps.is_empty() {
                continue;
            }
            if std::mem::take(&mut self.unsynced) {
                // One filesystem sync makes every clone of the batch
                // durable before its capture is committed.
                crate::restore::sync_fs(&self.staging).context("cannot sync the staging clones")?;
            }
            let settle_after = time_text(chrono::Utc::now() - settle);
            let freed = state.add_captures(&caps, &settle_after)?;
            remove_clones(&self.staging, &freed);
            let _ = wake.send(());
        }
        Ok(())
    }

    fn new_clone_file(&mut self) -> Result<(String, File)> {
        self.counter += 1;
        let name = format!(
            "{}-{:08x}-{}",
            std::process::id(),
            self.counter,
            &btrship_crypto::RepoKey::random_id().to_hex()[..8]
        );
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(self.staging.join(&name))
            .with_context(|| format!("cannot create a clone in {}", self.staging.display()))?;
        Ok((name, f))
    }

    /// Records the current state of `path` (and, for a directory that
    /// arrived by rename, of everything below it). The entry is opened from
    /// the share root's fd, one component at a time, never following a
    /// symlink (`btrship_snapshot::beneath`); everything is read from that
    /// fd.
    fn capture(&mut self, path: &[u8], subtree: bool, out: &mut Vec<NewCapture>) -> Result<()> {
        let name = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
        let Some(entry) = self.open_entry(path)? else {
            out.push(without_content(path, "delete"));
            return Ok(());
        };
        let meta = fd_meta(&entry).with_context(|| self.shown(path))?;
        if entry.metadata()?.dev() != self.root_dev {
            // A nested subvolume (or a mount): not part of the share's
            // snapshots either.
            return Ok(());
        }
        match meta.kind {
            FileKind::File => self.capture_file(path, &entry, out),
            FileKind::Dir => {
                let node = ship::node_from(name, &meta);
                out.push(NewCapture {
                    time: now_text(),
                    path: path.to_vec(),
                    kind: "mkdir",
                    clone: None,
                    node: Some(to_cbor(&node)),
                    size: 0,
                });
                if subtree {
                    // Listed through the fd: this very directory.
                    let listed = beneath::proc_path(&entry);
                    for child in btrship_diff::read_dir_sorted(&listed)? {
                        let mut p = path.to_vec();
                        if !p.is_empty() {
                            p.push(b'/');
                        }
                        p.extend_from_slice(child.as_bytes());
                        if !self.cfg.excluded(&p) {
                            self.capture(&p, true, out)?;
                        }
                    }
                }
                Ok(())
            }
            _ => {
                let node = ship::node_from(name, &meta);
                out.push(NewCapture {
                    time: now_text(),
                    path: path.to_vec(),
                    kind: "node",
                    clone: None,
                    node: Some(to_cbor(&node)),
                    size: 0,
                });
                Ok(())
            }
        }
    }

    fn shown(&self, path: &[u8]) -> String {
        self.root
            .join(OsStr::from_bytes(path))
            .display()
            .to_string()
    }

    /// The entry at `path` (`O_PATH`, not followed), or `None` when the
    /// share's tree has nothing there (also when a directory on the way is
    /// a symlink now).
    fn open_entry(&self, path: &[u8]) -> Result<Option<File>> {
        match beneath::open_entry(self.root_dir.as_fd(), path) {
            Ok(f) => Ok(Some(f)),
            Err(e) if beneath::is_absent(&e) => Ok(None),
            Err(e) => Err(e).with_context(|| self.shown(path)),
        }
    }

    /// Clones the regular file `entry` (opened at `path`) as its last
    /// writer closed it, with the metadata that goes with exactly that
    /// content.
    fn capture_file(&mut self, path: &[u8], entry: &File, out: &mut Vec<NewCapture>) -> Result<()> {
        let name = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
        for _ in 0..CAPTURE_ATTEMPTS {
            // The same inode, opened for reading (the lease needs it).
            let src = beneath::reopen(entry, libc::O_RDONLY | libc::O_NONBLOCK)
                .with_context(|| self.shown(path))?;
            let before = fd_meta(&src).with_context(|| self.shown(path))?;
            let (clone_name, dst) = self.new_clone_file()?;
            let cloned = clone_closed_file(&src, &dst)?;
            if !cloned {
                drop(dst);
                let _ = std::fs::remove_file(self.staging.join(&clone_name));
                out.push(without_content(path, "busy"));
                return Ok(());
            }
            let time = now_text();
            let after = fd_meta(&src).with_context(|| self.shown(path))?;
            let len = dst.metadata()?.len();
            // The path still names this inode: the state is the path's.
            let still = match self.open_entry(path)? {
                Some(now) => {
                    let (a, b) = (now.metadata()?, src.metadata()?);
                    a.ino() == b.ino() && a.dev() == b.dev()
                }
                None => false,
            };
            let consistent = before.ino == after.ino
                && before.size == after.size
                && before.mtime_ns == after.mtime_ns
                && before.ctime_ns == after.ctime_ns
                && len == before.size;
            if !consistent || !still {
                drop(dst);
                let _ = std::fs::remove_file(self.staging.join(&clone_name));
                if !still {
                    // Renamed or replaced meanwhile: look at the path again.
                    out.push(without_content(path, "busy"));
                    return Ok(());
                }
                continue;
            }
            self.unsynced = true;
            let node = ship::node_from(name, &before);
            out.push(NewCapture {
                time,
                path: path.to_vec(),
                kind: "close",
                clone: Some(clone_name),
                node: Some(to_cbor(&node)),
                size: before.size,
            });
            return Ok(());
        }
        // Changing faster than we can read it: a later event captures it.
        out.push(without_content(path, "busy"));
        Ok(())
    }
}

/// An entry's metadata read from its fd (`O_PATH` or open): `fstat`, the
/// symlink target with `readlinkat(fd, "")`, xattrs through the fd's
/// `/proc/self/fd` link (which reaches the inode itself, also a symlink's).
fn fd_meta(f: &File) -> std::io::Result<FsMeta> {
    let md = f.metadata()?;
    let kind = FileKind::of(md.file_type());
    let target = if kind == FileKind::Symlink {
        Some(beneath::read_link(f)?)
    } else {
        None
    };
    let link = beneath::proc_path(f);
    let mut xattrs = Vec::new();
    match xattr::list_deref(&link) {
        Ok(names) => {
            for n in names {
                // An attribute removed between list and get is simply gone.
                if let Some(v) = xattr::get_deref(&link, &n)? {
                    xattrs.push((n.as_bytes().to_vec(), v));
                }
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {}
        Err(e) => return Err(e),
    }
    xattrs.sort();
    Ok(FsMeta::from_metadata(&md, xattrs, target))
}

// ---------------------------------------------------------------------------
// ship
// ---------------------------------------------------------------------------

struct Shipper {
    cfg: ShareConfig,
    share: Share,
    area: Arc<PrivateArea>,
    staging: PathBuf,
    state: State,
    state_dir: PathBuf,
    host: String,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    reconcile: Arc<Reconcile>,
    wake: mpsc::Receiver<()>,
}

/// The daemon's sign of life: the capture thread touches the lock file's
/// mtime (what `status` reads) and pings the systemd watchdog every
/// `status::HEARTBEAT_EVERY`, as long as the shipping side moved within
/// `SHIP_QUIET_LIMIT` (a loop turned, a file was read, or a store request
/// was answered). A capture thread that hangs beats no more either.
struct Heartbeat {
    path: PathBuf,
    last: Instant,
    requests: u64,
    counters: Arc<Counters>,
}

/// The shipping side may be quiet this long (one large pack on a slow
/// link) before the daemon stops beating: `status` then says stalled after
/// `status::STALLED_AFTER` more, and systemd's `WatchdogSec=` restarts it.
const SHIP_QUIET_LIMIT: Duration = Duration::from_secs(240);

impl Heartbeat {
    fn tick(&mut self) {
        if self.last.elapsed() < crate::status::HEARTBEAT_EVERY {
            return;
        }
        self.last = Instant::now();
        let requests = self.counters.values().requests();
        if requests != self.requests {
            self.requests = requests;
            crate::progress::beat();
        }
        if crate::progress::since_beat() > SHIP_QUIET_LIMIT {
            tracing::warn!(
                "the shipping thread made no progress for {} s",
                crate::progress::since_beat().as_secs()
            );
            return;
        }
        let touched = File::options()
            .write(true)
            .open(&self.path)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()));
        if let Err(e) = touched {
            tracing::debug!("heartbeat {}: {e}", self.path.display());
        }
        sd_notify("WATCHDOG=1");
    }
}

/// Reconciling snapshots, asked for by the capture thread (start-up, a
/// fanotify overflow, a capture that failed) and taken by the shipper.
/// Requests are numbered: a snapshot taken after request N was made covers
/// every change before it, so `sync` is answered only when the shipped
/// snapshots have caught up with every request made so far.
#[derive(Default)]
struct Reconcile {
    requested: std::sync::atomic::AtomicU64,
    shipped: std::sync::atomic::AtomicU64,
}

impl Reconcile {
    fn request(&self) {
        self.requested.fetch_add(1, SeqCst);
    }
    /// The newest request, when a snapshot is due for it (read before the
    /// snapshot is taken).
    fn wanted(&self) -> Option<u64> {
        let n = self.requested.load(SeqCst);
        (n > self.shipped.load(SeqCst)).then_some(n)
    }
    /// A snapshot taken after request `n` shipped.
    fn done(&self, n: u64) {
        self.shipped.fetch_max(n, SeqCst);
    }
    fn caught_up(&self) -> bool {
        self.shipped.load(SeqCst) >= self.requested.load(SeqCst)
    }
}

/// Waits between attempts while the store fails: 1 s doubling to 30 s.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            next: Duration::from_secs(1),
        }
    }
    fn fail(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(30));
        d
    }
    fn ok(&mut self) {
        self.next = Duration::from_secs(1);
    }
}

impl Shipper {
    fn run(mut self, open_repo: Box<dyn Fn() -> Result<Repository> + Send>) -> Result<()> {
        let mut backoff = Backoff::new();
        let repo = loop {
            if self.stop.load(SeqCst) {
                return Ok(());
            }
            crate::progress::beat();
            match open_repo() {
                Ok(r) => {
                    // Packs the store lost: their blobs count as absent.
                    crate::repair::prepare_ship(&r, &self.state)?;
                    break r;
                }
                // Wrong key, no repository or bucket, a format this
                // version cannot write, access denied: stop, loudly.
                Err(e) if crate::exit::is_permanent(&e) => {
                    return Err(e.context(format!(
                        "cannot open the repository {} (permanent: fix it, then restart the daemon)",
                        self.cfg.repo
                    )));
                }
                Err(e) => {
                    self.failed(&format!("cannot open the repository: {e:#}"))?;
                    self.sleep(backoff.fail());
                }
            }
        };
        let sizes = {
            let c = repo.config().chunker;
            ChunkSizes {
                min: c.min,
                avg: c.avg,
                max: c.max,
            }
        };
        let settle = Duration::from_millis(self.cfg.settle_ms);
        let min_interval = Duration::from_millis(self.cfg.settle_ms / 2);
        let mut last_flush = Instant::now() - min_interval;
        while !self.stop.load(SeqCst) {
            crate::progress::beat();
            if let Some(wanted) = self.reconcile.wanted() {
                if let Err(e) = self.take_snapshot(&repo) {
                    if crate::exit::is_permanent_store(&e) {
                        return Err(e.context("reconciling snapshot failed (permanent: fix it, then restart the daemon)"));
                    }
                    self.failed(&format!("reconciling snapshot failed: {e:#}"))?;
                    self.sleep(backoff.fail());
                    continue;
                }
                self.reconcile.done(wanted);
            }
            let force = self.state.sync_force_upto()?;
            let settled_before = time_text(chrono::Utc::now() - settle);
            let ready = self
                .state
                .ready_captures(&settled_before, force, BATCH_LIMIT)?;
            let waited = last_flush.elapsed();
            if ready.is_empty() || (force == 0 && waited < min_interval) {
                let wait = if ready.is_empty() {
                    Duration::from_millis(100)
                } else {
                    min_interval - waited
                };
                let _ = self.wake.recv_timeout(wait);
                continue;
            }
            last_flush = Instant::now();
            match self.ship_batch(&repo, sizes, &ready) {
                Ok(()) => backoff.ok(),
                // A prune marked data this batch used (FORMAT.md §5c): not
                // a failure; the next attempt uploads it anew.
                Err(e)
                    if e.downcast_ref::<crate::history::GarbageConflict>()
                        .is_some() =>
                {
                    tracing::info!("{e:#}; shipping the batch again");
                }
                Err(e) if crate::exit::is_permanent_store(&e) => {
                    return Err(e.context(format!(
                        "shipping {} captures failed (they stay queued; permanent: fix it, then restart the daemon)",
                        ready.len()
                    )));
                }
                Err(e) => {
                    self.failed(&format!(
                        "shipping {} captures failed (they stay queued): {e:#}",
                        ready.len()
                    ))?;
                    self.sleep(backoff.fail());
                }
            }
        }
        Ok(())
    }

    fn sleep(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stop.load(SeqCst) && Instant::now() < until {
            crate::progress::beat();
            std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
        }
    }

    fn failed(&self, msg: &str) -> Result<()> {
        tracing::error!(error_kind = "temporary", "{msg}");
        sd_notify(&format!("STATUS=store failing: {msg}"));
        self.state.log_event("error", "ship_failed", msg)
    }

    /// A snapshot and its ship, as `btrship snapshot` does it; skipped
    /// (retried later) while a `btrship snapshot` run holds the share.
    fn take_snapshot(&mut self, repo: &Repository) -> Result<()> {
        let _lock = match state::lock_share(&self.state_dir, &self.cfg.name) {
            Ok(l) => l,
            Err(_) => {
                // A `btrship snapshot` is running: it does the same.
                return Ok(());
            }
        };
        let taken = queue::take(&mut self.state, &self.share, &self.area)?;
        let reports = queue::ship_queued(
            repo,
            &mut self.state,
            &self.area,
            &self.cfg,
            &self.host,
            &self.counters,
            crate::progress::Show::Nothing,
            |_| {},
        );
        queue::enforce_spool_limit(&mut self.state, &self.area, &self.cfg)?;
        let reports = reports?;
        queue::prune_local(&self.state, &self.area, &self.cfg, repo)?;
        release_free_memory();
        let msg = format!(
            "reconciled with snapshot {taken} ({} shipped)",
            reports.len()
        );
        tracing::info!("{msg}");
        self.state.log_event("info", "reconcile", &msg)?;
        Ok(())
    }

    fn ship_batch(&mut self, repo: &Repository, sizes: ChunkSizes, caps: &[Capture]) -> Result<()> {
        let before = self.counters.values();
        let writer = repo.writer();
        let mut entries = Vec::with_capacity(caps.len());
        let mut baselines = Vec::new();
        let mut deleted = Vec::new();
        let mut seqs = Vec::with_capacity(caps.len());
        let mut bytes = 0;
        for c in caps {
            seqs.push(c.seq);
            let node = |raw: &Option<Vec<u8>>| -> Result<Node> {
                let raw = raw.as_deref().context("capture without metadata")?;
                from_cbor(raw).map_err(|e| anyhow::anyhow!("capture metadata: {e}"))
            };
            let entry = match c.kind.as_str() {
                "close" => {
                    let mut n = node(&c.node)?;
                    let clone = c.clone.clone().context("close capture without clone")?;
                    let clone_path = self.staging.join(&clone);
                    let base = self.state.baseline(&c.path)?.and_then(|b| {
                        let content: Vec<Extent> = from_cbor(&b.content).ok()?;
                        let path = self.staging.join(&b.clone);
                        let usable =
                            path.exists() && content.iter().all(|e| repo.has_blob(&e.1 .0));
                        usable.then_some((path, content, b.size))
                    });
                    let old = base
                        .as_ref()
                        .map(|(p, content, size)| (p.as_path(), content.as_slice(), *size));
                    let (content, _read) =
                        match ship::file_content(&writer, sizes, &clone_path, n.size, old) {
                            Ok(done) => done,
                            // A sync ships captures before they settle, so
                            // the capture thread may supersede one of this
                            // batch (and delete its clone) while it is read:
                            // the newer capture stands in for it.
                            Err(_) if !self.state.capture_pending(c.seq)? => {
                                seqs.pop();
                                continue;
                            }
                            Err(e) => {
                                return Err(e.context(format!(
                                    "reading the clone of {}",
                                    String::from_utf8_lossy(&c.path)
                                )))
                            }
                        };
                    bytes += n.size;
                    baselines.push((c.path.clone(), clone, n.size, to_cbor(&content)));
                    n.content = content;
                    VersionEntry {
                        time: c.time.clone(),
                        path: c.path.clone(),
                        kind: VersionKind::Close,
                        node: Some(n),
                    }
                }
                "mkdir" | "node" => {
                    let n = node(&c.node)?;
                    VersionEntry {
                        time: c.time.clone(),
                        path: c.path.clone(),
                        kind: if c.kind == "mkdir" {
                            VersionKind::Mkdir
                        } else {
                            VersionKind::Node
                        },
                        node: Some(n),
                    }
                }
                "delete" => {
                    deleted.push(c.path.clone());
                    VersionEntry {
                        time: c.time.clone(),
                        path: c.path.clone(),
                        kind: VersionKind::Delete,
                        node: None,
                    }
                }
                other => anyhow::bail!("capture {} has unknown kind {other:?}", c.seq),
            };
            entries.push(entry);
        }
        writer.finish()?;
        if entries.is_empty() {
            return Ok(());
        }
        let batch = VersionBatch {
            share: self.cfg.name.clone(),
            host: self.host.clone(),
            entries,
            chain: None,
            indexes: None,
        };
        let same_entries = |found: &HistoryBody| {
            let key = |e: &VersionEntry| (e.time.clone(), e.path.clone(), e.kind);
            matches!(found, HistoryBody::Versions(b)
                if b.entries.iter().map(key).eq(batch.entries.iter().map(key)))
        };
        let name = crate::history::append(
            repo,
            &self.state,
            &self.cfg.name,
            &self.host,
            HistoryKind::Versions,
            |link| {
                HistoryBody::Versions(VersionBatch {
                    chain: Some(link),
                    ..batch.clone()
                })
            },
            same_entries,
        )
        .context("cannot write the version batch")?
        .name;
        let freed = self.state.finish_batch(ShippedBatch {
            batch: &name,
            seqs: &seqs,
            baselines,
            deleted,
        })?;
        remove_clones(&self.staging, &freed);
        let traffic = self.counters.values().since(&before);
        let msg = format!(
            "shipped {} versions ({} bytes of files) as {name}; store: {traffic}",
            caps.len(),
            bytes
        );
        tracing::info!(object = %name, "{msg}");
        self.state.log_event("info", "versions", &msg)?;
        let (pending, _, _) = self.state.capture_backlog()?;
        sd_notify(&format!("STATUS=watching; {pending} changes queued"));
        Ok(())
    }
}

/// Hands memory freed after a big ship back to the system (glibc keeps it
/// otherwise): the daemon idles for hours after a ship of a whole share.
fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A daemon that ends with `e`: a permanent error is remembered as the
/// reason it stopped (`status` says "failed") and told to systemd; any
/// other leaves the run unfinished ("dead" until systemd restarts it).
/// Nothing is recorded for a share that has no state database.
pub fn record_failure(state_path: &Path, e: &anyhow::Error) {
    if !crate::exit::is_permanent(e) || !state_path.exists() {
        return;
    }
    let msg = format!("{e:#}");
    sd_notify(&format!("STATUS=failed: {msg}"));
    let logged = State::open(state_path)
        .and_then(|st| st.log_event("error", crate::status::DAEMON_FAILED, &msg));
    if let Err(le) = logged {
        tracing::warn!("cannot record the daemon's failure: {le:#}");
    }
}

/// Used by `status`: is a daemon running for this share? (It holds the
/// daemon lock.)
pub fn daemon_running(state_dir: &Path, name: &str) -> bool {
    let path = daemon_lock_path(state_dir, name);
    match File::options().read(true).write(true).open(&path) {
        Ok(f) => {
            matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock))
        }
        Err(_) => false,
    }
}

/// How long ago the running daemon last showed it makes progress (the
/// mtime of its lock file, see `status`); None when it never beat.
pub fn heartbeat_age(state_dir: &Path, name: &str) -> Option<Duration> {
    let m = std::fs::metadata(daemon_lock_path(state_dir, name)).ok()?;
    Some(m.modified().ok()?.elapsed().unwrap_or_default())
}

pub fn daemon_lock_path(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join(format!("{name}.daemon.lock"))
}

/// Takes the one-daemon-per-share lock, or says who holds it.
pub fn lock_daemon(state_dir: &Path, name: &str) -> Result<File> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    let path = daemon_lock_path(state_dir, name);
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // `status` and `sync` probe the lock for a moment: try for a while.
    let mut attempt = 0;
    let locked = loop {
        match f.try_lock() {
            Err(std::fs::TryLockError::WouldBlock) if attempt < 20 => {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => break other,
        }
    };
    match locked {
        Ok(()) => {
            f.set_len(0)?;
            use std::io::Write;
            (&f).write_all(format!("{}\n", std::process::id()).as_bytes())?;
            Ok(f)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            Err(crate::exit::UserError::new(
                crate::exit::FAILURE,
                format!(
                    "a btrship daemon for share {name} is already running (pid {}); stop it first (systemctl stop btrship@{name})",
                    pid.trim()
                ),
            )
            .into())
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use btrship_snapshot::watch::{EventKind, Handle};
    use std::collections::BTreeSet;

    fn event(mask: u64, dir: Option<&str>, name: &str, ino: u64) -> WatchEvent {
        WatchEvent {
            kind: EventKind::from_mask(mask),
            mask,
            dir: dir.map(PathBuf::from),
            dir_handle: None,
            name: Some(name.into()),
            old_dir: None,
            old_name: None,
            new_dir: None,
            new_name: None,
            object: Some(Handle {
                root: 256,
                ino,
                gen: 1,
            }),
            object_raw: None,
            pid: 0,
        }
    }

    #[test]
    fn an_event_whose_directory_is_gone_names_its_inode() {
        let events = [
            event(libc::FAN_CLOSE_WRITE, Some("/d"), "f", 300),
            // Its directory was removed before the event was read.
            event(libc::FAN_CLOSE_WRITE, None, "g", 301),
            event(libc::FAN_ATTRIB, None, "h", 302),
            // A directory's own event without a path names nothing.
            event(libc::FAN_ATTRIB | libc::FAN_ONDIR, None, "e", 303),
            event(libc::FAN_CREATE, None, "c", 304),
        ];
        let (mut overflow, mut orphans) = (false, BTreeSet::new());
        let dirty = dirty_paths(&events, &mut overflow, &mut orphans);
        let paths: Vec<&[u8]> = dirty.iter().map(|d| d.path.as_slice()).collect();
        assert_eq!(paths, [&b"d/f"[..], b"d"]);
        assert_eq!(orphans.into_iter().collect::<Vec<_>>(), [301, 302]);
        assert!(!overflow);
    }
}
