//! Finding a snapshot by time, resolving paths in it, listing, and restoring.
//!
//! Restore never writes outside its target and never leaves a target that
//! looks complete but is not: it builds everything in a hidden sibling
//! directory (`.NAME.btrship-partial-XXXX`), syncs the filesystem, and only
//! then renames it into place. Every name from a tree is checked to be one
//! plain path component; files are created with `O_EXCL | O_NOFOLLOW` inside
//! directories restore itself made.

use crate::exit::{UserError, DAMAGED, NOT_FOUND, TARGET};
use crate::history::ShareHistory;
use crate::progress::Progress;
use anyhow::{Context, Result};
use btrship_upload::format::{
    unsafe_name_reason, BlobKind, Extent, Node, NodeKind, SnapshotRecord, Tree,
};
use btrship_upload::Repository;
use chrono::{DateTime, Utc};
use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr};
use std::fs::OpenOptions;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

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
    let mut best = None;
    for (name, rec) in &hist.snapshots {
        if record_time(rec)? <= at {
            best = Some((name.clone(), rec.clone()));
        }
    }
    best.ok_or_else(|| {
        let msg = match hist.snapshots.first() {
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
    Ok(tree)
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

#[derive(Debug, Default, serde::Serialize)]
pub struct RestoreReport {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    pub seconds: f64,
}

/// Restores `paths` (all when empty) of a snapshot into `to`.
pub fn restore(
    repo: &Repository,
    record: &SnapshotRecord,
    paths: &[Vec<u8>],
    to: &Path,
    progress: &mut Progress,
) -> Result<RestoreReport> {
    let started = std::time::Instant::now();
    let target_meta = check_target(to)?;
    let parent = to
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let base = to.file_name().ok_or_else(|| {
        UserError::new(
            TARGET,
            format!("restore target {} has no name", to.display()),
        )
    })?;
    let staging = parent.join(format!(
        ".{}.btrship-partial-{}",
        base.to_string_lossy(),
        &btrship_crypto::MasterKey::random_id().to_hex()[..8]
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(|e| UserError::new(TARGET, format!("cannot create {}: {e}", staging.display())))?;
    let mut r = Restorer {
        repo,
        hardlinks: HashMap::new(),
        dirs: Vec::new(),
        files: Vec::new(),
        report: RestoreReport::default(),
        progress,
    };
    let result = r
        .run(record, paths, &staging, target_meta.as_ref())
        .and_then(|()| {
            sync_fs(&staging)?;
            std::fs::rename(&staging, to)
                .with_context(|| format!("cannot move the restored tree to {}", to.display()))?;
            std::fs::File::open(parent)?.sync_all()?;
            Ok(())
        });
    r.progress.finish();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staging);
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
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The target must not exist or be an empty directory. Returns its
/// metadata when it exists (kept for partial restores).
fn check_target(to: &Path) -> Result<Option<std::fs::Metadata>> {
    match std::fs::symlink_metadata(to) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => {
            Err(UserError::new(TARGET, format!("restore target {}: {e}", to.display())).into())
        }
        Ok(m) if !m.is_dir() => Err(UserError::new(
            TARGET,
            format!(
                "restore target {} exists and is not a directory; choose a new or empty directory",
                to.display()
            ),
        )
        .into()),
        Ok(m) => {
            let mut entries = std::fs::read_dir(to).map_err(|e| {
                UserError::new(TARGET, format!("restore target {}: {e}", to.display()))
            })?;
            if entries.next().is_some() {
                return Err(UserError::new(
                    TARGET,
                    format!(
                        "restore target {} is not empty; choose a new or empty directory",
                        to.display()
                    ),
                )
                .into());
            }
            Ok(Some(m))
        }
    }
}

/// `syncfs` of the filesystem holding `path`: everything written there is
/// durable when it returns.
pub(crate) fn sync_fs(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path)?;
    // SAFETY: syncfs on a valid fd owned by `f`.
    if unsafe { libc::syncfs(std::os::unix::io::AsRawFd::as_raw_fd(&f)) } != 0 {
        return Err(std::io::Error::last_os_error()).context("syncfs");
    }
    Ok(())
}

/// Restore runs in three phases: create the whole namespace (directories,
/// empty files at their final size, links, special files), fill file
/// contents on several threads (blobs are read, authenticated and written
/// in parallel, in pieces of a few chunks, so one huge file and many small
/// ones both use every core), then apply file metadata and finally
/// directory metadata, deepest first (so mtimes stick).
struct Restorer<'r, 'p> {
    repo: &'r Repository,
    /// Inode number in the snapshot → first restored path (hard links).
    hardlinks: HashMap<u64, PathBuf>,
    /// Directories made, in creation order; metadata applied in reverse.
    dirs: Vec<(PathBuf, Node)>,
    /// Files created empty, to be filled and then given their metadata.
    files: Vec<(PathBuf, Node)>,
    report: RestoreReport,
    progress: &'p mut Progress,
}

/// Extents per unit of parallel work.
const EXTENTS_PER_PIECE: usize = 16;

impl Restorer<'_, '_> {
    fn run(
        &mut self,
        record: &SnapshotRecord,
        paths: &[Vec<u8>],
        staging: &Path,
        target: Option<&std::fs::Metadata>,
    ) -> Result<()> {
        let mut root = record.root.clone();
        root.subtree = Some(record.tree);
        let all = paths.is_empty()
            || paths
                .iter()
                .any(|p| components(p).map(|c| c.is_empty()).unwrap_or(false));
        if all {
            self.dirs.push((staging.to_path_buf(), root.clone()));
            self.children(&root, staging)?;
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
            for comps in kept {
                let chain = resolve(self.repo, &root, &comps.join(&b'/'))?;
                let mut dst = staging.to_path_buf();
                for (i, node) in chain.iter().enumerate().skip(1) {
                    dst.push(OsStr::from_bytes(&node.name));
                    if i + 1 == chain.len() {
                        self.node(node, &dst)?;
                    } else if !dst.exists() {
                        self.mkdir(&dst, node)?;
                    }
                }
            }
            let mode = target
                .map(|m| m.permissions().mode() & 0o7777)
                .unwrap_or(0o755);
            std::fs::set_permissions(staging, std::fs::Permissions::from_mode(mode))?;
        }
        self.fill_files()?;
        for (path, node) in &self.files {
            apply_meta(path, node).with_context(|| format!("{}", path.display()))?;
        }
        for (path, node) in self.dirs.iter().rev() {
            apply_meta(path, node).with_context(|| format!("{}", path.display()))?;
        }
        Ok(())
    }

    /// Phase 2: writes every file's data regions, in parallel.
    fn fill_files(&mut self) -> Result<()> {
        let mut pieces: Vec<(usize, usize, usize)> = Vec::new();
        for (i, (_, node)) in self.files.iter().enumerate() {
            let n = node.content.len();
            let mut start = 0;
            while start < n {
                let end = (start + EXTENTS_PER_PIECE).min(n);
                pieces.push((i, start, end));
                start = end;
            }
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let failed = std::sync::atomic::AtomicBool::new(false);
        let written = std::sync::atomic::AtomicU64::new(0);
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
        let (files, repo) = (&self.files, self.repo);
        let errors: Vec<anyhow::Error> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(|| -> Result<()> {
                        use std::sync::atomic::Ordering::Relaxed;
                        while !failed.load(Relaxed) {
                            let Some(&(i, start, end)) = pieces.get(next.fetch_add(1, Relaxed))
                            else {
                                return Ok(());
                            };
                            let (path, node) = &files[i];
                            let r = write_piece(repo, path, node, &node.content[start..end])
                                .with_context(|| format!("{}", path.display()));
                            match r {
                                Ok(bytes) => {
                                    written.fetch_add(bytes, Relaxed);
                                }
                                Err(e) => {
                                    failed.store(true, Relaxed);
                                    return Err(e);
                                }
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| match h.join() {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e),
                    Err(_) => Some(anyhow::anyhow!("a restore thread panicked")),
                })
                .collect()
        });
        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
        self.report.bytes += written.into_inner();
        for (_, node) in &self.files {
            self.progress.file(node.size);
        }
        Ok(())
    }

    fn mkdir(&mut self, path: &Path, node: &Node) -> Result<()> {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(path)
            .with_context(|| format!("cannot create directory {}", path.display()))?;
        self.dirs.push((path.to_path_buf(), node.clone()));
        self.report.dirs += 1;
        Ok(())
    }

    fn children(&mut self, dir: &Node, path: &Path) -> Result<()> {
        for child in read_checked_tree(self.repo, dir)?.entries {
            self.node(&child, &path.join(OsStr::from_bytes(&child.name)))?;
        }
        Ok(())
    }

    fn node(&mut self, node: &Node, path: &Path) -> Result<()> {
        let ctx = || format!("{}", path.display());
        match node.kind {
            NodeKind::Dir => {
                self.mkdir(path, node)?;
                return self.children(node, path);
            }
            _ if node.nlink > 1 && self.hardlinks.contains_key(&node.ino) => {
                // Another name of an inode restored already (files, and
                // also symlinks or special files that have hard links).
                let first = &self.hardlinks[&node.ino];
                std::fs::hard_link(first, path).with_context(ctx)?;
                return Ok(());
            }
            NodeKind::File => {
                self.file(node, path).with_context(ctx)?;
                if node.nlink > 1 {
                    self.hardlinks.insert(node.ino, path.to_path_buf());
                }
                return Ok(()); // contents and metadata in later phases
            }
            NodeKind::Symlink => {
                let target = node.target.as_deref().unwrap_or_default();
                std::os::unix::fs::symlink(OsStr::from_bytes(target), path).with_context(ctx)?;
            }
            NodeKind::Fifo | NodeKind::Socket | NodeKind::Chardev | NodeKind::Blockdev => {
                let kind = match node.kind {
                    NodeKind::Fifo => libc::S_IFIFO,
                    NodeKind::Socket => libc::S_IFSOCK,
                    NodeKind::Chardev => libc::S_IFCHR,
                    _ => libc::S_IFBLK,
                };
                let c = CString::new(path.as_os_str().as_bytes())?;
                // SAFETY: c is a valid NUL-terminated path.
                if unsafe { libc::mknod(c.as_ptr(), kind | 0o600, node.rdev as libc::dev_t) } != 0 {
                    return Err(std::io::Error::last_os_error()).with_context(ctx);
                }
            }
        }
        if node.nlink > 1 {
            self.hardlinks.insert(node.ino, path.to_path_buf());
        }
        apply_meta(path, node).with_context(ctx)
    }

    /// Phase 1 for a file: create it empty at its final size (holes stay
    /// holes); contents and metadata come later.
    fn file(&mut self, node: &Node, path: &Path) -> Result<()> {
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        f.set_len(node.size)?;
        for ext in &node.content {
            let (offset, len) = (ext.0, ext.2);
            if offset.checked_add(len).is_none_or(|end| end > node.size) {
                return Err(damaged(format!("extent {offset}+{len} lies beyond the file size {}: the repository is damaged or hostile", node.size)));
            }
        }
        self.report.files += 1;
        self.files.push((path.to_path_buf(), node.clone()));
        Ok(())
    }
}

/// Reads, authenticates and writes some extents of one restored file.
/// Returns the bytes written.
fn write_piece(repo: &Repository, path: &Path, node: &Node, extents: &[Extent]) -> Result<u64> {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let mut written = 0;
    for ext in extents {
        let (offset, id, len) = (ext.0, ext.1 .0, ext.2);
        let data = repo.read_blob(&id, BlobKind::Data)?;
        if data.len() as u64 != len {
            return Err(damaged(format!(
                "blob {id} is {} bytes, the tree says {len}",
                data.len()
            )));
        }
        debug_assert!(offset + len <= node.size);
        f.write_all_at(&data, offset)?;
        written += len;
    }
    Ok(written)
}

/// Owner, xattrs, mode, mtime — in that order (chown clears setuid bits;
/// ACL xattrs and the mode agree as they did in the snapshot).
fn apply_meta(path: &Path, node: &Node) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(node.uid), Some(node.gid)).context("chown")?;
    for x in &node.xattrs {
        xattr::set(path, OsStr::from_bytes(&x.0), &x.1)
            .with_context(|| format!("setting xattr {}", String::from_utf8_lossy(&x.0)))?;
    }
    if node.kind != NodeKind::Symlink {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(node.mode & 0o7777))
            .context("chmod")?;
    }
    let ts = libc::timespec {
        tv_sec: node.mtime_ns.div_euclid(1_000_000_000) as libc::time_t,
        tv_nsec: node.mtime_ns.rem_euclid(1_000_000_000) as libc::c_long,
    };
    let times = [ts, ts];
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: valid path and a two-element timespec array.
    if unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error()).context("utimensat");
    }
    Ok(())
}
