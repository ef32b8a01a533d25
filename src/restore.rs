//! Finding a snapshot by time, resolving paths in it, listing, and restoring.
//!
//! Restore never writes outside its target and never leaves a target that
//! looks complete but is not: it builds everything in a hidden sibling
//! directory (`.NAME.btrship-partial-XXXX`), syncs the filesystem, and only
//! then renames it into place. Every name from a tree is checked to be one
//! plain path component.
//!
//! **Against local users.** Restore runs as root, often into a directory
//! other users can write to (a share, a home). It never works by path
//! below the target's parent: the parent is opened once, the staging
//! directory is created there 0700 and opened without following links
//! (and checked to be root's and private: a user who swapped the name in
//! between gets a refusal), and every later call is relative to a
//! directory descriptor: `openat2` with `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS`, `mkdirat`, `symlinkat`, `mknodat`, `linkat`,
//! metadata on the entry's own descriptor (`fchown`, `fsetxattr`,
//! `fchmod`, `futimens`) or, for symlinks and special files, the
//! no-follow `*at` calls on their parent's descriptor (see `mod at`).
//! Directories stay 0700 and root's until their contents are final; the
//! staging directory gets its final owner and mode last. The final step is
//! `renameat2(RENAME_NOREPLACE)` relative to the parent's descriptor,
//! followed by a check that the target is the directory restore built: a
//! user who renames or replaces names in the parent meanwhile can make the
//! restore fail (exit 7), never make it write elsewhere. Once restore has
//! finished, whoever can write the parent can of course rename the result.
//!
//! **Devices and setuid.** Device nodes and setuid/setgid bits of
//! non-directories give privileges on the machine restoring them, and a
//! Samba share does not need them: they are restored only with
//! `--special-files` ([`RestoreOptions`]); otherwise devices are not
//! created and the bits are cleared, and both are listed in the report
//! ([`RestoreReport::skipped`]). FIFOs, sockets, the sticky bit and setgid
//! on directories are always restored.
//!
//! **Reading data.** File contents are read pack by pack ([`fill`]): the
//! blobs a restore needs are grouped by pack, and neighbours (gaps up to
//! 1 MiB, ranges up to 8 MiB) come in one ranged GET; every blob cut from
//! a range is authenticated and its content id checked, as single reads
//! are. Up to 8 packs are read at once, each sequentially, so the data in
//! flight stays below 8 × (8 MiB + one blob), about 100 MiB (on top of the
//! index and the plan). Writeback runs meanwhile (a `syncfs` every
//! 128 MiB written, so the disk works while the CPU decrypts); the final
//! `syncfs`, as before, makes everything durable before the rename into
//! place.
//!
//! **Degraded restore.** A data or tree blob that is missing or damaged in
//! the store (missing pack, bytes that fail authentication, content not
//! matching its id) affects only the paths that need it: a file needing it
//! is omitted (every name of it; nothing partial is left), a directory
//! whose tree cannot be read is created empty with its own metadata, and
//! both are listed with the pack and blob ([`RestoreReport::unrestored`]);
//! everything else is restored exactly and renamed into place. The CLI
//! then exits 9. What stops a restore instead: an unreadable root tree (or
//! no selected path reachable), a store that fails now (retry later), and
//! authentic objects that contradict each other (unsafe or duplicate
//! names, a tree id naming a data blob, extents beyond the file size, a
//! blob of another length than the tree says): those mean a hostile or
//! broken writer, not storage damage.

use crate::exit::{UserError, DAMAGED, NOT_FOUND, TARGET};
use crate::history::ShareHistory;
use crate::progress::Progress;
use anyhow::{Context, Result};
use btrship_crypto::ContentId;
use btrship_upload::format::{
    unsafe_name_reason, BlobId, BlobKind, Node, NodeKind, SnapshotRecord, Tree,
};
use btrship_upload::{RepoError, Repository, StoreError};
use chrono::{DateTime, Utc};
use rustix::fs::{self, AtFlags, Gid, Mode, OFlags, RenameFlags, Uid, XattrFlags};
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

mod fill;

/// Repository content that cannot be right: damaged or hostile.
fn damaged(message: String) -> anyhow::Error {
    UserError::new(DAMAGED, message).into()
}

pub fn record_time(r: &SnapshotRecord) -> Result<DateTime<Utc>> {
    Ok(DateTime::parse_from_rfc3339(&r.time)
        .with_context(|| format!("snapshot record time {:?} is not RFC 3339", r.time))?
        .with_timezone(&Utc))
}

/// The newest snapshot of the history taken at or before `at`.
pub fn find_snapshot(hist: &ShareHistory, at: DateTime<Utc>) -> Result<(String, SnapshotRecord)> {
    let share = &hist.share;
    let (best, first) = hist.snapshot_at(at)?;
    if let Some((_, rec)) = &best {
        record_time(rec)?;
    }
    best.ok_or_else(|| {
        let msg = match &first {
            None => format!("share {share:?} on host {} has no snapshots", hist.host),
            Some((_, first)) => format!(
                "no snapshot of share {share:?} at or before {}; the first is at {}",
                at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                first.time
            ),
        };
        UserError::new(NOT_FOUND, msg).into()
    })
}

/// Splits a share-relative path into components; `""`, `.` and `/` mean the
/// root. Paths are bytes: file names need not be UTF-8.
fn components(path: &[u8]) -> Result<Vec<&[u8]>> {
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(UserError::new(
                    crate::exit::USAGE,
                    format!(
                        "path {:?} may not contain '..'",
                        String::from_utf8_lossy(path)
                    ),
                )
                .into())
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Reads a tree and checks its names (FORMAT.md §2): safe, unique.
pub fn read_checked_tree(repo: &Repository, node: &Node) -> Result<Tree> {
    let Some(id) = node.subtree else {
        return Err(damaged(format!(
            "directory {:?} in the repository has no tree",
            String::from_utf8_lossy(&node.name)
        )));
    };
    let tree = repo.read_tree(&id.0)?;
    check_names(&id, &tree)?;
    Ok(tree)
}

/// Every name of a tree must be safe and unique (FORMAT.md §2).
fn check_names(id: &BlobId, tree: &Tree) -> Result<()> {
    let mut seen = HashSet::new();
    for e in &tree.entries {
        if let Some(reason) = unsafe_name_reason(&e.name) {
            return Err(damaged(format!("tree {id:?} holds an unsafe name {:?} ({reason}): the repository is damaged or hostile", String::from_utf8_lossy(&e.name))));
        }
        if !seen.insert(e.name.as_slice()) {
            return Err(damaged(format!(
                "tree {id:?} holds the name {:?} twice: the repository is damaged or hostile",
                String::from_utf8_lossy(&e.name)
            )));
        }
    }
    Ok(())
}

/// The chain of nodes from the root to `path` (root first).
pub fn resolve(repo: &Repository, root: &Node, path: &[u8]) -> Result<Vec<Node>> {
    let shown = String::from_utf8_lossy(path);
    let mut chain = vec![root.clone()];
    for c in components(path)? {
        let cur = chain.last().cloned().unwrap_or_else(|| root.clone());
        if cur.kind != NodeKind::Dir {
            return Err(UserError::new(
                NOT_FOUND,
                format!(
                    "{shown}: {:?} is not a directory in this snapshot",
                    String::from_utf8_lossy(&cur.name)
                ),
            )
            .into());
        }
        let tree = read_checked_tree(repo, &cur)?;
        let next = tree
            .entries
            .into_iter()
            .find(|e| e.name == c)
            .ok_or_else(|| {
                UserError::new(NOT_FOUND, format!("{shown}: not found in this snapshot"))
            })?;
        chain.push(next);
    }
    Ok(chain)
}

/// One entry of a listing.
#[derive(Debug, serde::Serialize)]
pub struct ListEntry {
    pub path: String,
    pub kind: NodeKind,
    pub mode: String,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: String,
}

/// Every entry at and below `path`, depth first, sorted.
pub fn list(repo: &Repository, root: &Node, path: &[u8]) -> Result<Vec<ListEntry>> {
    let chain = resolve(repo, root, path)?;
    let start = components(path)?.join(&b'/');
    let mut out = Vec::new();
    let node = chain.last().cloned().unwrap_or_else(|| root.clone());
    list_into(
        repo,
        &node,
        String::from_utf8_lossy(&start).into_owned(),
        &mut out,
    )?;
    Ok(out)
}

fn list_into(repo: &Repository, node: &Node, path: String, out: &mut Vec<ListEntry>) -> Result<()> {
    let secs = node.mtime_ns.div_euclid(1_000_000_000);
    let nanos = node.mtime_ns.rem_euclid(1_000_000_000) as u32;
    out.push(ListEntry {
        path: if path.is_empty() {
            "/".into()
        } else {
            path.clone()
        },
        kind: node.kind,
        mode: format!("{:04o}", node.mode),
        uid: node.uid,
        gid: node.gid,
        size: node.size,
        mtime: DateTime::from_timestamp(secs, nanos)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true))
            .unwrap_or_default(),
    });
    if node.kind == NodeKind::Dir {
        for child in read_checked_tree(repo, node)?.entries {
            let name = String::from_utf8_lossy(&child.name).into_owned();
            let p = if path.is_empty() {
                name
            } else {
                format!("{path}/{name}")
            };
            list_into(repo, &child, p, out)?;
        }
    }
    Ok(())
}

/// What restore does with entries that give privileges on this machine.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreOptions {
    /// Restore device nodes and the setuid/setgid bits of non-directories
    /// as they were (`--special-files`). Without it device nodes are not
    /// created and setuid/setgid bits are cleared; both are listed in
    /// [`RestoreReport::skipped`].
    pub special_files: bool,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct RestoreReport {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    pub seconds: f64,
    /// Entries changed by the device/setuid policy ([`RestoreOptions`]).
    pub skipped: Vec<Skipped>,
    /// Paths that could not be restored because the repository data they
    /// need is damaged or missing. Empty when the restore is complete.
    pub unrestored: Vec<Unrestored>,
}

/// An entry the device/setuid policy changed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Skipped {
    /// Path in the share (`/`-separated, lossy UTF-8).
    pub path: String,
    /// `device`: a device node, not created; `setuid`: setuid/setgid bits
    /// cleared.
    pub reason: &'static str,
}

/// A path restore could not restore, and the object it needed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Unrestored {
    /// Path in the share (`/`-separated, lossy UTF-8).
    pub path: String,
    /// `file`: omitted (no partial file is left); `directory`: created
    /// (with its own metadata) but empty, its tree is unreadable; `path`: a
    /// `--path` that could not be reached.
    pub kind: &'static str,
    /// The pack object the index places the blob in (absent when the
    /// index does not list the blob).
    pub pack: Option<String>,
    /// The blob's content id (hex).
    pub blob: String,
    /// What was wrong with it.
    pub error: String,
}

/// A blob that is missing or damaged in the store: what degrades a restore
/// instead of stopping it.
#[derive(Debug, Clone)]
struct Damage {
    blob: ContentId,
    pack: Option<String>,
    error: String,
}

impl Damage {
    /// `Ok(damage)` when `e` means the blob's bytes are missing or damaged
    /// in the store; `Err` (abort the restore) when the store failed now
    /// (worth retrying later) or the error is not about the blob.
    fn of(repo: &Repository, id: &ContentId, e: RepoError) -> Result<Damage> {
        if !is_damage(&e) {
            return Err(e.into());
        }
        Ok(Damage {
            blob: *id,
            pack: repo.locate(id).ok().map(|l| l.pack),
            error: e.to_string(),
        })
    }

    fn unrestored(&self, path: &[u8], kind: &'static str) -> Unrestored {
        Unrestored {
            path: shown(path),
            kind,
            pack: self.pack.clone(),
            blob: self.blob.to_hex(),
            error: self.error.clone(),
        }
    }
}

/// Does `e` mean that an object's bytes are missing or damaged in the
/// store (as opposed to a store failing now, worth retrying later)?
fn is_damage(e: &RepoError) -> bool {
    match e {
        RepoError::Store(s) => s.is_not_found() || matches!(s, StoreError::OutOfRange { .. }),
        RepoError::MissingBlob { .. }
        | RepoError::BlobMismatch { .. }
        | RepoError::Crypto { .. }
        | RepoError::Pack { .. }
        | RepoError::Format { .. } => true,
        _ => false,
    }
}

/// A share-relative path for messages and reports; the root is `/`.
fn shown(rel: &[u8]) -> String {
    if rel.is_empty() {
        "/".into()
    } else {
        String::from_utf8_lossy(rel).into_owned()
    }
}

fn join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    if rel.is_empty() {
        name.to_vec()
    } else {
        [rel, b"/", name].concat()
    }
}

/// Reads the tree of directory `node` for a restore. `Ok(Err(damage))`
/// when its blob is missing or damaged in the store (the caller lists it
/// and goes on); `Err` for what cannot be right in authentic objects (a
/// tree id naming a data blob, unsafe or duplicate names): those stop the
/// restore.
fn read_tree_or_damage(
    repo: &Repository,
    node: &Node,
) -> Result<std::result::Result<Tree, Damage>> {
    let Some(id) = node.subtree else {
        return Err(damaged(format!(
            "directory {:?} in the repository has no tree",
            String::from_utf8_lossy(&node.name)
        )));
    };
    if let Ok(loc) = repo.locate(&id.0) {
        if loc.kind != BlobKind::Tree {
            return Err(damaged(format!(
                "{}: blob {} is a {:?} blob, expected Tree: the repository is damaged or hostile",
                loc.pack, id.0, loc.kind
            )));
        }
    }
    match repo.read_tree(&id.0) {
        Ok(tree) => {
            check_names(&id, &tree)?;
            Ok(Ok(tree))
        }
        Err(e) => Ok(Err(Damage::of(repo, &id.0, e)?)),
    }
}

/// Restores `paths` (all when empty) of a snapshot into `to`.
///
/// Returns the report also when some paths could not be restored
/// ([`RestoreReport::unrestored`]); fails, leaving nothing, when nothing
/// could be.
pub fn restore(
    repo: &Repository,
    record: &SnapshotRecord,
    paths: &[Vec<u8>],
    to: &Path,
    opts: RestoreOptions,
    progress: &mut Progress,
) -> Result<RestoreReport> {
    let started = std::time::Instant::now();
    let parent = to
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base = to.file_name().ok_or_else(|| {
        UserError::new(
            TARGET,
            format!("restore target {} has no name", to.display()),
        )
    })?;
    let base = base.as_bytes();
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    // The parent is named by the administrator and opened once; everything
    // after works relative to this descriptor.
    let parent_fd = fs::open(
        parent,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        UserError::new(
            TARGET,
            format!("cannot open {}: {}", parent.display(), io(e)),
        )
    })?;
    let target = check_target(parent_fd.as_fd(), base, to)?;
    let staging_name = [
        b".",
        base,
        b".btrship-partial-",
        &btrship_crypto::RepoKey::random_id().to_hex().as_bytes()[..8],
    ]
    .concat();
    let staging_shown = parent.join(OsStr::from_bytes(&staging_name));
    let staging = make_staging(parent_fd.as_fd(), &staging_name, &staging_shown, parent)?;
    let mut r = Restorer {
        repo,
        opts,
        staging: staging.as_fd(),
        hardlinks: HashMap::new(),
        dirs: Vec::new(),
        files: Vec::new(),
        report: RestoreReport::default(),
        progress,
    };
    let result = r.run(record, paths, target.as_ref()).and_then(|()| {
        let syncing = std::time::Instant::now();
        fs::syncfs(staging.as_fd()).map_err(io).context("syncfs")?;
        tracing::debug!("restore: syncfs {:.2} s", syncing.elapsed().as_secs_f64());
        move_into_place(
            parent_fd.as_fd(),
            &staging_name,
            base,
            staging.as_fd(),
            target.is_some(),
            to,
        )
    });
    r.progress.finish();
    if let Err(e) = result {
        remove_staging(parent_fd.as_fd(), &staging_name, staging.as_fd());
        let full = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .and_then(|io| io.raw_os_error())
                .is_some_and(|n| n == libc::ENOSPC || n == libc::EDQUOT)
        });
        if full {
            return Err(UserError::new(
                TARGET,
                format!(
                    "disk full while restoring to {}; nothing was left there: {e:#}",
                    to.display()
                ),
            )
            .into());
        }
        return Err(e.context(format!(
            "restore to {} failed; nothing was left there",
            to.display()
        )));
    }
    let mut report = r.report;
    report.unrestored.sort_by(|a, b| a.path.cmp(&b.path));
    report.skipped.sort_by(|a, b| a.path.cmp(&b.path));
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The target must not exist or be an empty directory. Returns its
/// status when it exists (its mode is kept for partial restores).
fn check_target(parent: BorrowedFd<'_>, base: &[u8], to: &Path) -> Result<Option<fs::Stat>> {
    let terr = |e: rustix::io::Errno| -> anyhow::Error {
        UserError::new(
            TARGET,
            format!("restore target {}: {}", to.display(), io(e)),
        )
        .into()
    };
    let st = match fs::statat(parent, at::os(base), AtFlags::SYMLINK_NOFOLLOW) {
        Err(e) if e == rustix::io::Errno::NOENT => return Ok(None),
        Err(e) => return Err(terr(e)),
        Ok(st) => st,
    };
    if fs::FileType::from_raw_mode(st.st_mode) != fs::FileType::Directory {
        return Err(UserError::new(
            TARGET,
            format!(
                "restore target {} exists and is not a directory; choose a new or empty directory",
                to.display()
            ),
        )
        .into());
    }
    let dir = at::open_dir(parent, base)
        .map_err(|e| UserError::new(TARGET, format!("restore target {}: {e}", to.display())))?;
    if !at::is_empty(dir.as_fd()).map_err(terr)? {
        return Err(UserError::new(
            TARGET,
            format!(
                "restore target {} is not empty; choose a new or empty directory",
                to.display()
            ),
        )
        .into());
    }
    Ok(Some(st))
}

/// Creates the staging directory `name` in `parent` (0700) and opens it,
/// checking that what it opened is a directory only root can enter: a
/// local user who can write to `parent` may rename or replace the name at
/// any moment, but can never make restore work in a directory of theirs.
fn make_staging(
    parent: BorrowedFd<'_>,
    name: &[u8],
    shown: &Path,
    parent_path: &Path,
) -> Result<OwnedFd> {
    fs::mkdirat(parent, at::os(name), Mode::from_raw_mode(0o700)).map_err(|e| {
        UserError::new(
            TARGET,
            format!("cannot create {}: {}", shown.display(), io(e)),
        )
    })?;
    let replaced = || -> anyhow::Error {
        UserError::new(
            TARGET,
            format!(
                "{} was replaced right after restore created it: someone else writes to {}; nothing was restored",
                shown.display(),
                parent_path.display()
            ),
        )
        .into()
    };
    let fd = at::open_dir(parent, name).map_err(|_| replaced())?;
    let st = fs::fstat(&fd).map_err(io)?;
    if st.st_uid != rustix::process::geteuid().as_raw() || st.st_mode & 0o077 != 0 {
        return Err(replaced());
    }
    Ok(fd)
}

/// The last step: the staging directory becomes `to`, by its name in the
/// parent directory opened at the start, never replacing anything
/// (`RENAME_NOREPLACE`); then checks that `to` is the directory restore
/// built (a user who can write to the parent may have swapped the names).
fn move_into_place(
    parent: BorrowedFd<'_>,
    staging_name: &[u8],
    base: &[u8],
    staging: BorrowedFd<'_>,
    target_existed: bool,
    to: &Path,
) -> Result<()> {
    if target_existed {
        // The empty directory that was there: RENAME_NOREPLACE needs the
        // name free. Whatever appears there meanwhile makes the rename fail.
        match fs::unlinkat(parent, at::os(base), AtFlags::REMOVEDIR) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::NOENT => {}
            Err(e) => {
                return Err(UserError::new(
                    TARGET,
                    format!(
                        "cannot replace the empty directory {}: {}",
                        to.display(),
                        io(e)
                    ),
                )
                .into())
            }
        }
    }
    fs::renameat_with(
        parent,
        at::os(staging_name),
        parent,
        at::os(base),
        RenameFlags::NOREPLACE,
    )
    .map_err(|e| -> anyhow::Error {
        if e == rustix::io::Errno::EXIST {
            UserError::new(
                TARGET,
                format!(
                    "{} appeared while restore ran; choose a new or empty directory",
                    to.display()
                ),
            )
            .into()
        } else {
            UserError::new(
                TARGET,
                format!(
                    "cannot move the restored tree to {}: {} (was the directory next to it renamed while restore ran?)",
                    to.display(),
                    io(e)
                ),
            )
            .into()
        }
    })?;
    let placed = fs::statat(parent, at::os(base), AtFlags::SYMLINK_NOFOLLOW).map_err(io)?;
    let built = fs::fstat(staging).map_err(io)?;
    if (placed.st_dev, placed.st_ino) != (built.st_dev, built.st_ino) {
        return Err(UserError::new(
            TARGET,
            format!(
                "{} is not the restored tree: someone else renamed entries next to it while restore ran; restore into a directory only root can write",
                to.display()
            ),
        )
        .into());
    }
    fs::fsync(parent).map_err(io)?;
    Ok(())
}

/// After a failure: empties the staging directory through its descriptor
/// and removes its name when the name still is that directory. Best effort.
fn remove_staging(parent: BorrowedFd<'_>, name: &[u8], staging: BorrowedFd<'_>) {
    if let Err(e) = at::remove_contents(staging) {
        tracing::warn!("cannot remove the partial restore: {e}");
    }
    let same = match (
        fs::statat(parent, at::os(name), AtFlags::SYMLINK_NOFOLLOW),
        fs::fstat(staging),
    ) {
        (Ok(a), Ok(b)) => (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino),
        _ => false,
    };
    if same {
        let _ = fs::unlinkat(parent, at::os(name), AtFlags::REMOVEDIR);
    }
}

fn io(e: rustix::io::Errno) -> std::io::Error {
    std::io::Error::from(e)
}

/// `syncfs` of the filesystem holding `path`: everything written there is
/// durable when it returns.
pub(crate) fn sync_fs(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path)?;
    fs::syncfs(&f).map_err(io).context("syncfs")
}

/// Filesystem calls relative to directory descriptors, for restore.
///
/// Every path restore resolves below the staging directory goes through
/// `openat2(2)` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` (and
/// `O_NOFOLLOW`): a symlink anywhere on the way, or a `..`, fails the call
/// instead of redirecting it. Entries are created with the `*at` calls
/// relative to the descriptor of the directory that holds them, and
/// metadata is set on the entry's own descriptor (`fchown`, `fsetxattr`,
/// `fchmod`, `futimens`), or, for symlinks and special files, which cannot
/// be opened safely, with the `AT_SYMLINK_NOFOLLOW` calls relative to
/// their parent's descriptor.
///
/// The calls come from `rustix`: safe, typed wrappers of the raw syscalls
/// (`openat2` included, which libc has no wrapper for), already in our
/// dependency tree (tempfile uses it), so this needs no `unsafe`.
/// `cap-std` would give the same guarantee with its own `Dir` type, but
/// hides `RENAME_NOREPLACE`, `mknodat` and xattrs, which restore needs.
mod at {
    use rustix::fs::{self, AtFlags, Mode, OFlags, ResolveFlags, XattrFlags};
    use std::ffi::OsStr;
    use std::io;
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;

    const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS);

    /// A relative path as a syscall argument; empty means the directory
    /// itself.
    pub fn os(rel: &[u8]) -> &OsStr {
        OsStr::from_bytes(if rel.is_empty() { b"." } else { rel })
    }

    /// Opens `rel` below `dir`, refusing symlinks and `..` on the way.
    pub fn open(dir: BorrowedFd<'_>, rel: &[u8], flags: OFlags) -> io::Result<OwnedFd> {
        Ok(fs::openat2(
            dir,
            os(rel),
            flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            RESOLVE,
        )?)
    }

    pub fn open_dir(dir: BorrowedFd<'_>, rel: &[u8]) -> io::Result<OwnedFd> {
        open(dir, rel, OFlags::RDONLY | OFlags::DIRECTORY)
    }

    /// Creates the regular file `rel` below `dir` (0600, must not exist).
    pub fn create_file(dir: BorrowedFd<'_>, rel: &[u8]) -> io::Result<OwnedFd> {
        Ok(fs::openat2(
            dir,
            os(rel),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
            RESOLVE,
        )?)
    }

    /// Creates directory `name` in `dir` (0700) and opens it.
    pub fn mkdir(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
        fs::mkdirat(dir, os(name), Mode::from_raw_mode(0o700))?;
        open_dir(dir, name)
    }

    /// `a/b/c` → (`a/b`, `c`).
    pub fn split(rel: &[u8]) -> (&[u8], &[u8]) {
        match rel.iter().rposition(|&b| b == b'/') {
            Some(i) => (&rel[..i], &rel[i + 1..]),
            None => (b"", rel),
        }
    }

    /// Sets an xattr on `name` in `dir` without following it (symlinks,
    /// special files). There is no `lsetxattrat` before Linux 6.13: the
    /// path goes through `/proc/self/fd/N`, the directory restore holds
    /// open, so only the last component is looked up by name.
    pub fn set_xattr_at(
        dir: BorrowedFd<'_>,
        name: &[u8],
        key: &[u8],
        value: &[u8],
    ) -> io::Result<()> {
        let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
        path.extend_from_slice(name);
        Ok(fs::lsetxattr(
            OsStr::from_bytes(&path),
            OsStr::from_bytes(key),
            value,
            XattrFlags::empty(),
        )?)
    }

    fn names(dir: BorrowedFd<'_>) -> rustix::io::Result<Vec<(Vec<u8>, fs::FileType)>> {
        let mut out = Vec::new();
        for e in fs::Dir::read_from(dir)? {
            let e = e?;
            let n = e.file_name().to_bytes();
            if n != b"." && n != b".." {
                out.push((n.to_vec(), e.file_type()));
            }
        }
        Ok(out)
    }

    pub fn is_empty(dir: BorrowedFd<'_>) -> rustix::io::Result<bool> {
        Ok(names(dir)?.is_empty())
    }

    /// Removes everything in `dir`, never following a link.
    pub fn remove_contents(dir: BorrowedFd<'_>) -> io::Result<()> {
        for (name, kind) in names(dir)? {
            let kind = match kind {
                fs::FileType::Unknown => fs::FileType::from_raw_mode(
                    fs::statat(dir, os(&name), AtFlags::SYMLINK_NOFOLLOW)?.st_mode,
                ),
                k => k,
            };
            if kind == fs::FileType::Directory {
                let sub = open_dir(dir, &name)?;
                remove_contents(sub.as_fd())?;
                fs::unlinkat(dir, os(&name), AtFlags::REMOVEDIR)?;
            } else {
                fs::unlinkat(dir, os(&name), AtFlags::empty())?;
            }
        }
        Ok(())
    }
}

/// Restore runs in three phases: create the namespace (directories,
/// symlinks, special files) and note the regular files; create and fill
/// the files on several threads, pack by pack, neighbouring blobs read in
/// one ranged request ([`fill`]), each file getting its metadata as soon
/// as its last extent is written; then remove the files whose data turned
/// out damaged, make the further names of hard-linked files, and finally
/// apply directory metadata, deepest first (so mtimes stick), the staging
/// directory's own last.
///
/// Every directory stays 0700 and owned by root until its metadata is
/// applied, when everything below it is final.
struct Restorer<'r, 'p, 'f> {
    repo: &'r Repository,
    opts: RestoreOptions,
    /// The staging directory; every path below is relative to it.
    staging: BorrowedFd<'f>,
    /// Inode number in the snapshot → how its first name was restored.
    hardlinks: HashMap<u64, First>,
    /// Directories made (relative paths), in creation order; metadata
    /// applied in reverse.
    dirs: Vec<(Vec<u8>, Node)>,
    /// Files created empty, to be filled and then given their metadata.
    files: Vec<FileJob>,
    report: RestoreReport,
    progress: &'p mut Progress,
}

/// A regular file: noted in phase 1, created and filled in phase 2.
struct FileJob {
    path: Vec<u8>,
    node: Node,
    /// Further names of the same inode (hard links).
    links: Vec<Vec<u8>>,
}

/// The first name restored of an inode with hard links.
#[derive(Clone)]
enum First {
    Restored {
        path: Vec<u8>,
        file: Option<usize>,
    },
    /// A device node the policy skipped: its other names are skipped too.
    Skipped,
}

impl Restorer<'_, '_, '_> {
    fn run(
        &mut self,
        record: &SnapshotRecord,
        paths: &[Vec<u8>],
        target: Option<&fs::Stat>,
    ) -> Result<()> {
        let started = std::time::Instant::now();
        let mut root = record.root.clone();
        root.subtree = Some(record.tree);
        let all = paths.is_empty()
            || paths
                .iter()
                .any(|p| components(p).map(|c| c.is_empty()).unwrap_or(false));
        if all {
            match read_tree_or_damage(self.repo, &root)? {
                Ok(tree) => self.entries(tree, self.staging, b"")?,
                Err(d) => {
                    return Err(damaged(format!(
                        "the snapshot's root directory cannot be read, nothing can be restored: {}",
                        d.error
                    )))
                }
            }
        } else {
            let mut selected: Vec<Vec<&[u8]>> =
                paths.iter().map(|p| components(p)).collect::<Result<_>>()?;
            selected.sort();
            selected.dedup();
            // Skip a path when an ancestor of it is selected too.
            let kept: Vec<&Vec<&[u8]>> = selected
                .iter()
                .filter(|p| {
                    !selected
                        .iter()
                        .any(|q| q.len() < p.len() && p.starts_with(q))
                })
                .collect();
            let mut reached = false;
            for comps in &kept {
                reached |= self.selected(&root, comps)?;
            }
            if !reached {
                let why = self
                    .report
                    .unrestored
                    .first()
                    .map(|u| u.error.clone())
                    .unwrap_or_default();
                return Err(damaged(format!(
                    "no selected path can be reached, nothing can be restored: {why}"
                )));
            }
        }
        let made = started.elapsed();
        self.progress.set_total(
            self.files.len() as u64,
            self.files.iter().map(|j| j.node.size).sum(),
        );
        let filled = self.fill_files()?;
        let filled_at = started.elapsed();
        tracing::debug!(
            "restore: namespace {:.2} s, contents {:.2} s",
            made.as_secs_f64(),
            (filled_at - made).as_secs_f64()
        );
        self.drop_files(&filled.failed)?;
        self.make_links(&filled.failed)?;
        let staging = self.staging;
        for (i, job) in self.files.iter().enumerate() {
            if filled.failed.contains_key(&i) {
                continue;
            }
            let mode = final_mode(self.opts, &job.node, &job.path, &mut self.report);
            if filled.finished[i] {
                continue; // its metadata came with its data (phase 2)
            }
            let fd = at::open(staging, &job.path, OFlags::RDONLY | OFlags::NONBLOCK)
                .with_context(|| shown(&job.path))?;
            apply_meta(fd.as_fd(), &job.node, mode).with_context(|| shown(&job.path))?;
        }
        for (path, node) in self.dirs.iter().rev() {
            let mode = final_mode(self.opts, node, path, &mut self.report);
            let fd = at::open_dir(staging, path).with_context(|| shown(path))?;
            apply_meta(fd.as_fd(), node, mode).with_context(|| shown(path))?;
        }
        // The staging directory itself, last: it stays 0700 until now.
        if all {
            let mode = final_mode(self.opts, &root, b"", &mut self.report);
            apply_meta(staging, &root, mode).context("the restored root directory")?;
        } else {
            let mode = target.map(|st| st.st_mode & 0o7777).unwrap_or(0o755);
            fs::fchmod(staging, Mode::from_raw_mode(mode))
                .map_err(io)
                .context("chmod")?;
        }
        tracing::debug!(
            "restore: metadata {:.2} s",
            (started.elapsed() - filled_at).as_secs_f64()
        );
        Ok(())
    }

    /// Restores one `--path` (its ancestors as directories, then the path
    /// itself). Returns whether it was reached; when a tree on the way is
    /// damaged it is listed as unrestored.
    fn selected(&mut self, root: &Node, comps: &[&[u8]]) -> Result<bool> {
        let path = comps.join(&b'/');
        let mut cur = root.clone();
        let mut held: Option<OwnedFd> = None;
        let mut rel = Vec::new();
        for (i, c) in comps.iter().enumerate() {
            if cur.kind != NodeKind::Dir {
                return Err(UserError::new(
                    NOT_FOUND,
                    format!(
                        "{}: {:?} is not a directory in this snapshot",
                        shown(&path),
                        String::from_utf8_lossy(&cur.name)
                    ),
                )
                .into());
            }
            let tree = match read_tree_or_damage(self.repo, &cur)? {
                Ok(t) => t,
                Err(d) => {
                    self.report.unrestored.push(d.unrestored(&path, "path"));
                    return Ok(false);
                }
            };
            let next = tree
                .entries
                .into_iter()
                .find(|e| e.name == *c)
                .ok_or_else(|| {
                    UserError::new(
                        NOT_FOUND,
                        format!("{}: not found in this snapshot", shown(&path)),
                    )
                })?;
            rel = join(&rel, c);
            let dir = held.as_ref().map_or(self.staging, |f| f.as_fd());
            if i + 1 == comps.len() {
                self.node(&next, dir, rel)?;
                return Ok(true);
            }
            // An ancestor: made once, shared by every path below it.
            let fd = match at::open_dir(dir, c) {
                Ok(fd) => fd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let fd = at::mkdir(dir, c)
                        .with_context(|| format!("cannot create directory {}", shown(&rel)))?;
                    self.dirs.push((rel.clone(), next.clone()));
                    self.report.dirs += 1;
                    fd
                }
                Err(e) => return Err(e).with_context(|| shown(&rel)),
            };
            held = Some(fd);
            cur = next;
        }
        Ok(true)
    }

    fn entries(&mut self, tree: Tree, dir: BorrowedFd<'_>, rel: &[u8]) -> Result<()> {
        for child in tree.entries {
            let path = join(rel, &child.name);
            self.node(&child, dir, path)?;
        }
        Ok(())
    }

    /// Phase 1 for one entry `node` at `rel`, in the directory `dir`.
    fn node(&mut self, node: &Node, dir: BorrowedFd<'_>, rel: Vec<u8>) -> Result<()> {
        let name = node.name.as_slice();
        let ctx = || shown(&rel);
        match node.kind {
            NodeKind::Dir => {
                let fd = at::mkdir(dir, name)
                    .with_context(|| format!("cannot create directory {}", shown(&rel)))?;
                self.dirs.push((rel.clone(), node.clone()));
                self.report.dirs += 1;
                match read_tree_or_damage(self.repo, node)? {
                    Ok(tree) => self.entries(tree, fd.as_fd(), &rel)?,
                    Err(d) => self.report.unrestored.push(d.unrestored(&rel, "directory")),
                }
                return Ok(());
            }
            _ if node.nlink > 1 && self.hardlinks.contains_key(&node.ino) => {
                return self.link(node, dir, rel);
            }
            NodeKind::File => {
                self.file(node, &rel).with_context(ctx)?;
                if node.nlink > 1 {
                    let first = First::Restored {
                        path: rel,
                        file: Some(self.files.len() - 1),
                    };
                    self.hardlinks.insert(node.ino, first);
                }
                return Ok(()); // contents and metadata in later phases
            }
            NodeKind::Symlink => {
                let target = node.target.as_deref().unwrap_or_default();
                fs::symlinkat(OsStr::from_bytes(target), dir, at::os(name))
                    .map_err(io)
                    .with_context(ctx)?;
            }
            NodeKind::Chardev | NodeKind::Blockdev if !self.opts.special_files => {
                self.report.skipped.push(Skipped {
                    path: shown(&rel),
                    reason: "device",
                });
                if node.nlink > 1 {
                    self.hardlinks.insert(node.ino, First::Skipped);
                }
                return Ok(());
            }
            NodeKind::Fifo | NodeKind::Socket | NodeKind::Chardev | NodeKind::Blockdev => {
                let kind = match node.kind {
                    NodeKind::Fifo => fs::FileType::Fifo,
                    NodeKind::Socket => fs::FileType::Socket,
                    NodeKind::Chardev => fs::FileType::CharacterDevice,
                    _ => fs::FileType::BlockDevice,
                };
                let rdev = if matches!(node.kind, NodeKind::Chardev | NodeKind::Blockdev) {
                    node.rdev
                } else {
                    0
                };
                fs::mknodat(dir, at::os(name), kind, Mode::from_raw_mode(0o600), rdev)
                    .map_err(io)
                    .with_context(ctx)?;
            }
        }
        let mode = (node.kind != NodeKind::Symlink)
            .then(|| final_mode(self.opts, node, &rel, &mut self.report));
        apply_meta_at(dir, name, node, mode).with_context(ctx)?;
        if node.nlink > 1 {
            let first = First::Restored {
                path: rel,
                file: None,
            };
            self.hardlinks.insert(node.ino, first);
        }
        Ok(())
    }

    /// Another name of an inode restored (or skipped) already.
    fn link(&mut self, node: &Node, dir: BorrowedFd<'_>, rel: Vec<u8>) -> Result<()> {
        let Some(first) = self.hardlinks.get(&node.ino).cloned() else {
            return Ok(());
        };
        match first {
            First::Skipped => self.report.skipped.push(Skipped {
                path: shown(&rel),
                reason: "device",
            }),
            // A regular file is created in phase 2: its other names come
            // after it ([`Restorer::make_links`]).
            First::Restored { file: Some(i), .. } => self.files[i].links.push(rel),
            First::Restored { path, file: None } => {
                let (first_dir, first_name) = at::split(&path);
                at::open(self.staging, first_dir, OFlags::PATH | OFlags::DIRECTORY)
                    .and_then(|from| {
                        Ok(fs::linkat(
                            from,
                            at::os(first_name),
                            dir,
                            at::os(&node.name),
                            AtFlags::empty(),
                        )?)
                    })
                    .with_context(|| shown(&rel))?;
            }
        }
        Ok(())
    }

    /// Phase 1 for a file: check its extents and note it; phase 2 creates
    /// it (at its final size: holes stay holes), fills it and applies its
    /// metadata.
    fn file(&mut self, node: &Node, rel: &[u8]) -> Result<()> {
        for ext in &node.content {
            let (offset, len) = (ext.0, ext.2);
            if offset.checked_add(len).is_none_or(|end| end > node.size) {
                return Err(damaged(format!("extent {offset}+{len} lies beyond the file size {}: the repository is damaged or hostile", node.size)));
            }
        }
        self.report.files += 1;
        self.files.push(FileJob {
            path: rel.to_vec(),
            node: node.clone(),
            links: Vec::new(),
        });
        Ok(())
    }

    /// Phase 2 ([`fill`]): writes every file's data and, once a file is
    /// complete, its metadata. Returns the files (indices into `files`)
    /// that need a damaged or missing blob, and those given their metadata.
    fn fill_files(&mut self) -> Result<fill::Filled> {
        let modes: Vec<u32> = self
            .files
            .iter()
            .map(|f| kept_mode(self.opts, &f.node))
            .collect();
        let filled = fill::fill(self.repo, self.staging, &self.files, &modes)?;
        for (i, job) in self.files.iter().enumerate() {
            if !filled.failed.contains_key(&i) {
                self.report.bytes += job.node.content.iter().map(|e| e.2).sum::<u64>();
            }
            self.progress.file(job.node.size);
        }
        Ok(filled)
    }

    /// Removes every name of the files that could not be filled (none is
    /// left looking complete) and lists them.
    /// (Its further names were never made: [`Restorer::make_links`].)
    fn drop_files(&mut self, failed: &HashMap<usize, Damage>) -> Result<()> {
        for (&i, damage) in failed {
            let job = &self.files[i];
            let (dir, name) = at::split(&job.path);
            at::open(self.staging, dir, OFlags::PATH | OFlags::DIRECTORY)
                .and_then(|d| match fs::unlinkat(d, at::os(name), AtFlags::empty()) {
                    // Not created: its first blob was the bad one.
                    Err(e) if e == rustix::io::Errno::NOENT => Ok(()),
                    r => Ok(r?),
                })
                .with_context(|| format!("cannot remove the incomplete {}", shown(&job.path)))?;
            for path in std::iter::once(&job.path).chain(&job.links) {
                self.report.unrestored.push(damage.unrestored(path, "file"));
            }
            self.report.files -= 1;
        }
        Ok(())
    }

    /// The further names (hard links) of the files phase 2 restored.
    fn make_links(&self, failed: &HashMap<usize, Damage>) -> Result<()> {
        for (i, job) in self.files.iter().enumerate() {
            if job.links.is_empty() || failed.contains_key(&i) {
                continue;
            }
            let (first_dir, first_name) = at::split(&job.path);
            let from = at::open(self.staging, first_dir, OFlags::PATH | OFlags::DIRECTORY)
                .with_context(|| shown(&job.path))?;
            for rel in &job.links {
                let (dir, name) = at::split(rel);
                at::open(self.staging, dir, OFlags::PATH | OFlags::DIRECTORY)
                    .and_then(|to| {
                        Ok(fs::linkat(
                            &from,
                            at::os(first_name),
                            to,
                            at::os(name),
                            AtFlags::empty(),
                        )?)
                    })
                    .with_context(|| shown(rel))?;
            }
        }
        Ok(())
    }
}

/// The mode to give `node` at `rel`: as in the snapshot, except that
/// setuid/setgid bits of non-directories are cleared (and listed) unless
/// `--special-files`. setgid on a directory only chooses the group of new
/// entries and is kept.
fn final_mode(opts: RestoreOptions, node: &Node, rel: &[u8], report: &mut RestoreReport) -> u32 {
    let mode = kept_mode(opts, node);
    if mode != node.mode & 0o7777 {
        report.skipped.push(Skipped {
            path: shown(rel),
            reason: "setuid",
        });
    }
    mode
}

/// The mode [`final_mode`] gives `node`, without listing anything.
fn kept_mode(opts: RestoreOptions, node: &Node) -> u32 {
    let mode = node.mode & 0o7777;
    if opts.special_files || node.kind == NodeKind::Dir || mode & 0o6000 == 0 {
        return mode;
    }
    mode & !0o6000
}

fn timestamps(node: &Node) -> fs::Timestamps {
    let ts = rustix::fs::Timespec {
        tv_sec: node.mtime_ns.div_euclid(1_000_000_000),
        tv_nsec: node.mtime_ns.rem_euclid(1_000_000_000),
    };
    fs::Timestamps {
        last_access: ts,
        last_modification: ts,
    }
}

/// Owner, xattrs, mode, mtime of a file or directory, on its descriptor —
/// in that order (chown clears setuid bits; ACL xattrs and the mode agree
/// as they did in the snapshot).
fn apply_meta(fd: BorrowedFd<'_>, node: &Node, mode: u32) -> Result<()> {
    fs::fchown(
        fd,
        Some(Uid::from_raw_unchecked(node.uid)),
        Some(Gid::from_raw_unchecked(node.gid)),
    )
    .map_err(io)
    .context("chown")?;
    for x in &node.xattrs {
        fs::fsetxattr(fd, OsStr::from_bytes(&x.0), &x.1, XattrFlags::empty())
            .map_err(io)
            .with_context(|| format!("setting xattr {}", String::from_utf8_lossy(&x.0)))?;
    }
    fs::fchmod(fd, Mode::from_raw_mode(mode))
        .map_err(io)
        .context("chmod")?;
    fs::futimens(fd, &timestamps(node))
        .map_err(io)
        .context("utimensat")?;
    Ok(())
}

/// Owner, xattrs, mode (`None` for symlinks), mtime of entry `name` in
/// `dir`, never following it: for symlinks and special files, which are
/// not opened. `dir` is a directory only root can write until restore
/// applies its own metadata, so the name is the entry restore just made.
fn apply_meta_at(dir: BorrowedFd<'_>, name: &[u8], node: &Node, mode: Option<u32>) -> Result<()> {
    fs::chownat(
        dir,
        at::os(name),
        Some(Uid::from_raw_unchecked(node.uid)),
        Some(Gid::from_raw_unchecked(node.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(io)
    .context("chown")?;
    for x in &node.xattrs {
        at::set_xattr_at(dir, name, &x.0, &x.1)
            .with_context(|| format!("setting xattr {}", String::from_utf8_lossy(&x.0)))?;
    }
    if let Some(mode) = mode {
        // fchmodat has no working AT_SYMLINK_NOFOLLOW; the entry is not a
        // symlink (see above).
        fs::chmodat(
            dir,
            at::os(name),
            Mode::from_raw_mode(mode),
            AtFlags::empty(),
        )
        .map_err(io)
        .context("chmod")?;
    }
    fs::utimensat(
        dir,
        at::os(name),
        &timestamps(node),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(io)
    .context("utimensat")?;
    Ok(())
}

/// The text form of a report's lists (after the summary line): what the
/// device/setuid policy changed and what could not be restored.
pub fn print_report_lists(report: &RestoreReport) {
    if !report.skipped.is_empty() {
        let devices = report
            .skipped
            .iter()
            .filter(|s| s.reason == "device")
            .count();
        println!(
            "not restored as they were (--special-files restores them): {devices} device nodes skipped, {} setuid/setgid files cleared",
            report.skipped.len() - devices
        );
        for s in &report.skipped {
            println!("  {:<7} {}", s.reason, s.path);
        }
    }
    if !report.unrestored.is_empty() {
        println!(
            "could not restore {} paths (the repository data they need is damaged or missing):",
            report.unrestored.len()
        );
        for u in &report.unrestored {
            let object = match &u.pack {
                Some(pack) => format!("{pack} (blob {})", u.blob),
                None => format!("blob {}", u.blob),
            };
            println!("  {:<9} {}: {object}: {}", u.kind, u.path, u.error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(kind: NodeKind, mode: u32) -> Node {
        Node {
            kind,
            ..Node::empty_dir(b"x", mode)
        }
    }

    #[test]
    fn split_and_join_relative_paths() {
        assert_eq!(at::split(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(at::split(b"c"), (&b""[..], &b"c"[..]));
        assert_eq!(join(b"", b"c"), b"c");
        assert_eq!(join(b"a/b", b"c"), b"a/b/c");
        assert_eq!(shown(b""), "/");
    }

    #[test]
    fn setuid_and_setgid_are_cleared_on_files_only_without_special_files() {
        let plain = RestoreOptions::default();
        let special = RestoreOptions {
            special_files: true,
        };
        let mut report = RestoreReport::default();
        let file = node(NodeKind::File, 0o106755);
        assert_eq!(final_mode(plain, &file, b"f", &mut report), 0o755);
        assert_eq!(report.skipped.len(), 1);
        assert_eq!(report.skipped[0].reason, "setuid");
        assert_eq!(final_mode(special, &file, b"f", &mut report), 0o6755);
        let dir = node(NodeKind::Dir, 0o042775);
        assert_eq!(final_mode(plain, &dir, b"d", &mut report), 0o2775);
        let sticky = node(NodeKind::File, 0o1644);
        assert_eq!(final_mode(plain, &sticky, b"s", &mut report), 0o1644);
        assert_eq!(report.skipped.len(), 1, "only the setuid file is listed");
    }
}
