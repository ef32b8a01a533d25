//! Live change events for a share: fanotify in FID mode with one
//! filesystem mark on the btrfs top level.
//!
//! [`Watcher`] reports what happens in a share as it happens: files closed
//! after writing (the moment to clone them), entries created, deleted and
//! renamed, and attribute/xattr changes. The daemon reacts to these between
//! snapshots; periodic snapshot diffs remain the authority (events are
//! merged by the kernel, and an overflow or restart loses them).
//!
//! Why this shape (measured on kernel 6.18, see the btrfs spike notes):
//!
//! * **FID mode** (`FAN_REPORT_DFID_NAME_TARGET`) is the only fanotify mode
//!   that reports directory-entry events (create, delete, rename); fd mode
//!   rejects them. Events carry file handles of the parent directory and the
//!   object instead of open fds, so reading events opens nothing.
//! * A FID group can only mark objects of one fsid, and every btrfs
//!   subvolume has its own statfs fsid: a filesystem or mount mark placed
//!   through the share (a subvolume) fails with `EXDEV`. A **filesystem
//!   mark on the top level** (subvolid=5), placed through the private
//!   area's detached mount, is accepted and sees every subvolume. One mark
//!   covers the whole share with no per-directory cost and no race with new
//!   directories, unlike inotify or inode marks.
//! * btrfs file handles (type `0x4d`) hold `(objectid, root_objectid,
//!   generation)`. The root id tells which subvolume an event belongs to;
//!   events outside the share's subvolume are dropped, which also drops the
//!   daemon's own writes to snapshots, clones and staging files as long as
//!   they live in other subvolumes. Nested subvolumes inside the share are
//!   separate subvolumes too: their contents are not reported (their
//!   creation is), just as a snapshot of the share does not include them.
//! * `FAN_UNLIMITED_QUEUE` (root only) removes the 16384-event queue limit;
//!   a [`WatchEvent`] with `kind.overflow` still reports a lost queue if the
//!   kernel ever signals one.
//!
//! Paths are resolved when events are *read*, not when they happened: the
//! directory of an event is found from its handle (`open_by_handle_at` on
//! the top-level root, then the `/proc/self/fd` link), so a directory
//! renamed since is reported under its new path, and one deleted since
//! resolves to `None`. The handles in [`WatchEvent`] identify the inodes
//! exactly, whatever their names.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{io_err, ioctl_err, open_dir, sys, PrivateArea, Result, Share, SnapshotError};

/// Flags of the fanotify group.
const INIT_FLAGS: libc::c_uint = libc::FAN_CLASS_NOTIF
    | libc::FAN_REPORT_DFID_NAME_TARGET
    | libc::FAN_UNLIMITED_QUEUE
    | libc::FAN_NONBLOCK
    | libc::FAN_CLOEXEC;

/// Events asked for. `FAN_MODIFY` is left out: `FAN_CLOSE_WRITE` is the
/// point where a file is worth looking at.
pub const WATCH_MASK: u64 = libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_MOVED_FROM
    | libc::FAN_MOVED_TO
    | libc::FAN_RENAME
    | libc::FAN_CLOSE_WRITE
    | libc::FAN_ATTRIB
    | libc::FAN_DELETE_SELF
    | libc::FAN_ONDIR;

/// `FILEID_BTRFS_WITHOUT_PARENT`: `u64 objectid, u64 root_objectid, u32 gen`.
pub const FILEID_BTRFS_WITHOUT_PARENT: i32 = 0x4d;
/// `FILEID_BTRFS_WITH_PARENT`: the above plus the parent's objectid and gen.
const FILEID_BTRFS_WITH_PARENT: i32 = 0x4e;
/// `FILEID_BTRFS_WITH_PARENT_ROOT`: the above plus the parent's root id.
const FILEID_BTRFS_WITH_PARENT_ROOT: i32 = 0x4f;
/// Bytes of the common prefix of all btrfs handles (`struct btrfs_fid` up
/// to and including `gen`).
const BTRFS_FID_LEN: usize = 20;

/// Largest file handle the kernel produces (`MAX_HANDLE_SZ`).
const MAX_HANDLE_SZ: usize = 128;
/// `sizeof(struct fanotify_event_metadata)`.
const METADATA_LEN: usize = 24;
/// `sizeof(struct fanotify_event_info_header)`.
const INFO_HEADER_LEN: usize = 4;
/// Info header, `__kernel_fsid_t` and the `struct file_handle` header.
const FID_RECORD_MIN: usize = INFO_HEADER_LEN + 8 + 8;
/// One `read(2)` of the fanotify fd.
const READ_BUF_LEN: usize = 256 * 1024;
/// [`Watcher::read`] stops reading after this many bytes of events (about
/// 50 000 events) so that a busy share cannot keep it reading forever; the
/// rest stays queued for the next call.
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// A file handle as the kernel reported it (`struct file_handle`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RawHandle {
    /// `handle_type`; [`FILEID_BTRFS_WITHOUT_PARENT`] on btrfs.
    pub handle_type: i32,
    /// `f_handle[0..handle_bytes]`.
    pub bytes: Vec<u8>,
}

/// A btrfs inode, decoded from a file handle: enough to reopen it with
/// [`Watcher::open_object`] and to recognise it across events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle {
    /// Subvolume (tree) id.
    pub root: u64,
    /// Inode number within the subvolume.
    pub ino: u64,
    /// Inode generation: tells a reused inode number from the original.
    pub gen: u32,
}

impl Handle {
    /// Decodes a btrfs handle (types `0x4d`–`0x4f`); `None` for anything
    /// else or when it is too short.
    pub fn from_raw(raw: &RawHandle) -> Option<Handle> {
        if !matches!(
            raw.handle_type,
            FILEID_BTRFS_WITHOUT_PARENT | FILEID_BTRFS_WITH_PARENT | FILEID_BTRFS_WITH_PARENT_ROOT
        ) {
            return None;
        }
        // btrfs stores the fields in CPU byte order (`struct btrfs_fid`).
        Some(Handle {
            ino: u64::from_ne_bytes(raw.bytes.get(0..8)?.try_into().ok()?),
            root: u64::from_ne_bytes(raw.bytes.get(8..16)?.try_into().ok()?),
            gen: u32::from_ne_bytes(raw.bytes.get(16..20)?.try_into().ok()?),
        })
    }

    /// The equivalent `FILEID_BTRFS_WITHOUT_PARENT` handle.
    pub fn to_raw(&self) -> RawHandle {
        let mut bytes = Vec::with_capacity(BTRFS_FID_LEN);
        bytes.extend_from_slice(&self.ino.to_ne_bytes());
        bytes.extend_from_slice(&self.root.to_ne_bytes());
        bytes.extend_from_slice(&self.gen.to_ne_bytes());
        RawHandle {
            handle_type: FILEID_BTRFS_WITHOUT_PARENT,
            bytes,
        }
    }
}

/// What happened, decoded from the event mask. The kernel merges queued
/// events with the same directory, name and object, so several flags can be
/// set and their order is lost: `create | close_write` for a file written
/// right after creation, `create | delete` for one that came and went before
/// the events were read. Check the filesystem for the current state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventKind {
    /// `FAN_CLOSE_WRITE`: a file opened for writing was closed.
    pub close_write: bool,
    /// `FAN_CREATE`: `name` was created in `dir`.
    pub create: bool,
    /// `FAN_DELETE`: `name` was removed from `dir`.
    pub delete: bool,
    /// `FAN_MOVED_FROM`: `name` was renamed away from `dir`.
    pub moved_from: bool,
    /// `FAN_MOVED_TO`: `name` in `dir` is the target of a rename. If the
    /// name existed, the old inode was replaced (no `delete` is reported
    /// for it).
    pub moved_to: bool,
    /// `FAN_RENAME`: one event with both ends, in `old_*` and `new_*`.
    pub rename: bool,
    /// `FAN_ATTRIB`: metadata changed: mode, owner, timestamps, link count
    /// or xattrs (Samba's DOS attributes, ACLs and alternate data streams).
    pub attrib: bool,
    /// `FAN_DELETE_SELF`: the object itself is gone.
    pub delete_self: bool,
    /// `FAN_ONDIR`: the object is a directory.
    pub is_dir: bool,
    /// `FAN_Q_OVERFLOW`: events were lost; reconcile with a snapshot diff.
    pub overflow: bool,
}

impl EventKind {
    /// Decodes a fanotify event mask.
    pub fn from_mask(mask: u64) -> EventKind {
        let has = |bit: u64| mask & bit != 0;
        EventKind {
            close_write: has(libc::FAN_CLOSE_WRITE),
            create: has(libc::FAN_CREATE),
            delete: has(libc::FAN_DELETE),
            moved_from: has(libc::FAN_MOVED_FROM),
            moved_to: has(libc::FAN_MOVED_TO),
            rename: has(libc::FAN_RENAME),
            attrib: has(libc::FAN_ATTRIB),
            delete_self: has(libc::FAN_DELETE_SELF),
            is_dir: has(libc::FAN_ONDIR),
            overflow: has(libc::FAN_Q_OVERFLOW),
        }
    }
}

/// One event in the share. Directory paths are relative to the share root
/// (the root itself is the empty path) and are resolved when the event is
/// read; `None` when the directory no longer exists.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    /// Decoded flags.
    pub kind: EventKind,
    /// The raw fanotify mask.
    pub mask: u64,
    /// Directory the event happened in. For an event on a directory itself
    /// (its `attrib` or `delete_self`), the directory, with `name` `"."`.
    /// `None` if the directory no longer exists, or if the kernel reported
    /// no directory: `delete_self` and the final `attrib` of an unlinked
    /// file carry only `object`.
    pub dir: Option<PathBuf>,
    /// The directory's inode.
    pub dir_handle: Option<Handle>,
    /// Entry name within `dir`.
    pub name: Option<OsString>,
    /// `rename`: the directory the entry left.
    pub old_dir: Option<PathBuf>,
    /// `rename`: the entry's old name.
    pub old_name: Option<OsString>,
    /// `rename`: the directory the entry went to.
    pub new_dir: Option<PathBuf>,
    /// `rename`: the entry's new name.
    pub new_name: Option<OsString>,
    /// The inode the event is about (created, closed, renamed, deleted...).
    /// The replaced inode of a rename over an existing name gets its own
    /// `attrib | delete_self` event with only this set (if that was its last
    /// link).
    pub object: Option<Handle>,
    /// The object's handle exactly as reported.
    pub object_raw: Option<RawHandle>,
    /// Process that caused the event (for Samba, the per-connection smbd);
    /// 0 if it is outside our pid namespace.
    pub pid: i32,
}

impl WatchEvent {
    /// `dir/name` (just `dir` when `name` is `"."`), when both are known.
    pub fn path(&self) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        let name = self.name.as_ref()?;
        if name == "." {
            return Some(dir.clone());
        }
        Some(dir.join(name))
    }

    /// `old_dir/old_name` of a rename, when both are known.
    pub fn old_path(&self) -> Option<PathBuf> {
        Some(self.old_dir.as_ref()?.join(self.old_name.as_ref()?))
    }

    /// `new_dir/new_name` of a rename, when both are known.
    pub fn new_path(&self) -> Option<PathBuf> {
        Some(self.new_dir.as_ref()?.join(self.new_name.as_ref()?))
    }

    fn overflow(mask: u64, pid: i32) -> WatchEvent {
        WatchEvent {
            kind: EventKind::from_mask(mask),
            mask,
            dir: None,
            dir_handle: None,
            name: None,
            old_dir: None,
            old_name: None,
            new_dir: None,
            new_name: None,
            object: None,
            object_raw: None,
            pid,
        }
    }
}

/// A directory handle with an entry name (`DFID_NAME`, `OLD_DFID_NAME`,
/// `NEW_DFID_NAME`) or without (`DFID`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct DirRecord {
    handle: RawHandle,
    name: Option<OsString>,
}

/// One event as read from the kernel, before filtering and path resolution.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct RawEvent {
    mask: u64,
    fd: i32,
    pid: i32,
    dir: Option<DirRecord>,
    old: Option<DirRecord>,
    new: Option<DirRecord>,
    object: Option<RawHandle>,
}

fn read_u16(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

fn read_i32(buf: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

fn read_u64(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

/// Parses one `struct fanotify_event_info_fid` record (`rec` spans exactly
/// the record, header included): the handle, then for the `*_NAME` types a
/// NUL-terminated name.
fn parse_fid_record(
    rec: &[u8],
    with_name: bool,
) -> std::result::Result<(RawHandle, Option<OsString>), &'static str> {
    if rec.len() < FID_RECORD_MIN {
        return Err("FID record shorter than its headers");
    }
    let handle_bytes = read_u32(rec, INFO_HEADER_LEN + 8).ok_or("short handle header")? as usize;
    let handle_type = read_i32(rec, INFO_HEADER_LEN + 12).ok_or("short handle header")?;
    if handle_bytes > MAX_HANDLE_SZ {
        return Err("file handle longer than MAX_HANDLE_SZ");
    }
    let bytes = rec
        .get(FID_RECORD_MIN..FID_RECORD_MIN + handle_bytes)
        .ok_or("file handle runs past the record")?
        .to_vec();
    let handle = RawHandle { handle_type, bytes };
    if !with_name {
        return Ok((handle, None));
    }
    let rest = &rec[FID_RECORD_MIN + handle_bytes..];
    let nul = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or("name is not NUL-terminated")?;
    if nul == 0 {
        return Err("empty name");
    }
    Ok((handle, Some(OsStr::from_bytes(&rest[..nul]).to_os_string())))
}

/// Parses the events in `buf` (the result of one `read(2)`) into `out`.
/// Never panics: malformed events or records are skipped with a warning.
fn parse_events(buf: &[u8], out: &mut Vec<RawEvent>) {
    let mut pos = 0;
    while pos < buf.len() {
        let ev_buf = &buf[pos..];
        let (Some(event_len), Some(vers), Some(metadata_len)) = (
            read_u32(ev_buf, 0),
            ev_buf.get(4).copied(),
            read_u16(ev_buf, 6),
        ) else {
            tracing::warn!(
                bytes = ev_buf.len(),
                "fanotify: truncated event metadata; ignoring the rest of the buffer"
            );
            return;
        };
        let event_len = event_len as usize;
        if event_len < METADATA_LEN || event_len > ev_buf.len() {
            tracing::warn!(
                event_len,
                available = ev_buf.len(),
                "fanotify: bad event length; ignoring the rest of the buffer"
            );
            return;
        }
        pos += event_len;
        let ev_buf = &ev_buf[..event_len];
        if vers != libc::FANOTIFY_METADATA_VERSION {
            tracing::warn!(
                vers,
                "fanotify: unknown event metadata version; skipping event"
            );
            continue;
        }
        let metadata_len = usize::from(metadata_len);
        let (Some(mask), Some(fd), Some(pid)) = (
            read_u64(ev_buf, 8),
            read_i32(ev_buf, 16),
            read_i32(ev_buf, 20),
        ) else {
            // Unreachable: event_len >= METADATA_LEN was checked.
            continue;
        };
        let mut ev = RawEvent {
            mask,
            fd,
            pid,
            ..RawEvent::default()
        };
        if metadata_len < METADATA_LEN || metadata_len > event_len {
            tracing::warn!(
                metadata_len,
                event_len,
                mask,
                "fanotify: bad metadata length; skipping event"
            );
            // Still hand it on, without records, so that an fd in it is closed.
            ev.mask = 0;
            out.push(ev);
            continue;
        }
        let mut rpos = metadata_len;
        let mut ok = true;
        while rpos < event_len {
            let rbuf = &ev_buf[rpos..];
            let (Some(info_type), Some(len)) = (rbuf.first().copied(), read_u16(rbuf, 2)) else {
                tracing::warn!(
                    mask,
                    "fanotify: truncated info record header; skipping event"
                );
                ok = false;
                break;
            };
            let len = usize::from(len);
            if len < INFO_HEADER_LEN || len > rbuf.len() {
                tracing::warn!(
                    mask,
                    info_type,
                    len,
                    "fanotify: bad info record length; skipping event"
                );
                ok = false;
                break;
            }
            rpos += len;
            let rec = &rbuf[..len];
            let with_name = matches!(
                info_type,
                libc::FAN_EVENT_INFO_TYPE_DFID_NAME
                    | libc::FAN_EVENT_INFO_TYPE_OLD_DFID_NAME
                    | libc::FAN_EVENT_INFO_TYPE_NEW_DFID_NAME
            );
            match info_type {
                libc::FAN_EVENT_INFO_TYPE_FID
                | libc::FAN_EVENT_INFO_TYPE_DFID
                | libc::FAN_EVENT_INFO_TYPE_DFID_NAME
                | libc::FAN_EVENT_INFO_TYPE_OLD_DFID_NAME
                | libc::FAN_EVENT_INFO_TYPE_NEW_DFID_NAME => {}
                other => {
                    tracing::debug!(mask, info_type = other, "fanotify: ignoring info record");
                    continue;
                }
            }
            let (handle, name) = match parse_fid_record(rec, with_name) {
                Ok(parsed) => parsed,
                Err(reason) => {
                    tracing::warn!(
                        mask,
                        info_type,
                        reason,
                        "fanotify: skipping malformed record"
                    );
                    continue;
                }
            };
            match info_type {
                libc::FAN_EVENT_INFO_TYPE_FID => ev.object = Some(handle),
                libc::FAN_EVENT_INFO_TYPE_OLD_DFID_NAME => {
                    ev.old = Some(DirRecord { handle, name })
                }
                libc::FAN_EVENT_INFO_TYPE_NEW_DFID_NAME => {
                    ev.new = Some(DirRecord { handle, name })
                }
                _ => ev.dir = Some(DirRecord { handle, name }),
            }
        }
        if !ok {
            ev = RawEvent {
                mask: 0,
                fd,
                pid,
                ..RawEvent::default()
            };
        }
        out.push(ev);
    }
}

/// The subvolume an event belongs to: that of its directory handles, else
/// that of its object. `None` if no btrfs handle was reported.
fn event_root(ev: &RawEvent) -> Option<u64> {
    [&ev.dir, &ev.old, &ev.new]
        .into_iter()
        .flatten()
        .map(|d| &d.handle)
        .chain(ev.object.as_ref())
        .find_map(|h| Handle::from_raw(h).map(|h| h.root))
}

/// Watches one share; see the module documentation.
#[derive(Debug)]
pub struct Watcher {
    fan: File,
    /// The top-level root directory, opened for reading (`open_by_handle_at`
    /// refuses `O_PATH` fds). Keeps the detached mount alive.
    root_dir: File,
    share_path: PathBuf,
    share_id: u64,
    share_handle: RawHandle,
    /// The share's path within the top level, e.g. `/share`.
    share_prefix: PathBuf,
    buf: Vec<u8>,
}

impl AsFd for Watcher {
    /// The fanotify fd: readable when events are queued (for an event loop;
    /// then call [`Watcher::read`] with a zero timeout).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fan.as_fd()
    }
}

/// Outcome of resolving a directory handle.
enum Resolved {
    /// Path within the top level.
    Path(PathBuf),
    /// The inode no longer exists.
    Gone,
}

fn is_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ESTALE | libc::ENOENT))
}

impl Watcher {
    /// Starts watching `share` through the top-level mount of `area` (needs
    /// `CAP_SYS_ADMIN` for the group and `CAP_DAC_READ_SEARCH` to resolve
    /// handles). Events that happen from now on are queued until
    /// [`Watcher::read`]; the queue has no size limit.
    pub fn new(area: &PrivateArea, share: &Share) -> Result<Watcher> {
        if share.fs_uuid != area.fs_uuid {
            return Err(SnapshotError::DeviceMismatch {
                device: area.device.clone(),
                share: share.path.clone(),
            });
        }
        let top = area.top_level_fd();
        let top_path = PathBuf::from(format!("/proc/self/fd/{}", top.as_raw_fd()));
        // openat(top, ".", O_RDONLY | O_DIRECTORY) through the fd link.
        let root_dir = open_dir(&top_path).map_err(io_err(&top_path))?;

        let fan: File = sys::fanotify_init(
            INIT_FLAGS,
            (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_LARGEFILE) as libc::c_uint,
        )
        .map_err(ioctl_err("fanotify_init", &share.path))?
        .into();
        sys::fanotify_mark(
            fan.as_fd(),
            libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
            WATCH_MASK,
            top,
            c".",
        )
        .map_err(ioctl_err("fanotify_mark(FAN_MARK_FILESYSTEM)", &share.path))?;

        let (handle_type, bytes) = sys::name_to_handle(&share.path)
            .map_err(ioctl_err("name_to_handle_at", &share.path))?;
        let share_handle = RawHandle { handle_type, bytes };
        let found = Handle::from_raw(&share_handle).ok_or_else(|| SnapshotError::Malformed {
            op: "name_to_handle_at",
            path: share.path.clone(),
            reason: format!(
                "not a btrfs file handle (type {handle_type:#x}, {} bytes)",
                share_handle.bytes.len()
            ),
        })?;
        if found.root != share.subvol_id || found.ino != sys::BTRFS_FIRST_FREE_OBJECTID {
            return Err(SnapshotError::ShareChanged {
                path: share.path.clone(),
                expected: share.subvol_id,
                found: found.root,
            });
        }
        let mut watcher = Watcher {
            fan,
            root_dir,
            share_path: share.path.clone(),
            share_id: share.subvol_id,
            share_handle,
            share_prefix: PathBuf::new(),
            buf: vec![0; READ_BUF_LEN],
        };
        watcher.share_prefix = watcher.locate_share()?;
        tracing::debug!(
            share_path = %share.path.display(),
            subvol_id = share.subvol_id,
            within_top_level = %watcher.share_prefix.display(),
            "watching share"
        );
        Ok(watcher)
    }

    /// The share's subvolume id; only its events are reported.
    pub fn share_subvol_id(&self) -> u64 {
        self.share_id
    }

    /// The share's path within the btrfs top level (e.g. `/share`).
    pub fn share_path_in_top_level(&self) -> &Path {
        &self.share_prefix
    }

    /// Path of the share root within the top level, from its handle.
    fn locate_share(&self) -> Result<PathBuf> {
        match self.resolve(&self.share_handle) {
            Ok(Resolved::Path(p)) => Ok(p),
            Ok(Resolved::Gone) => Err(SnapshotError::Io {
                path: self.share_path.clone(),
                source: io::Error::from_raw_os_error(libc::ESTALE),
            }),
            Err(e) => Err(ioctl_err("open_by_handle_at", &self.share_path)(e)),
        }
    }

    /// Opens `raw` (`O_PATH`) on the top-level root and reads back its path.
    fn resolve(&self, raw: &RawHandle) -> io::Result<Resolved> {
        let fd = match sys::open_by_handle(
            self.root_dir.as_fd(),
            raw.handle_type,
            &raw.bytes,
            libc::O_PATH,
        ) {
            Ok(fd) => fd,
            Err(e) if is_gone(&e) => return Ok(Resolved::Gone),
            Err(e) => return Err(e),
        };
        let file = File::from(fd);
        let meta = file.metadata()?;
        if meta.nlink() == 0 {
            return Ok(Resolved::Gone);
        }
        let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
        if link.as_os_str().as_bytes().ends_with(b" (deleted)") {
            // Either the kernel's mark of an unlinked dentry or a real name:
            // only a real name leads back to the same inode.
            let literal = PathBuf::from(format!("/proc/self/fd/{}", self.root_dir.as_raw_fd()))
                .join(link.strip_prefix("/").unwrap_or(&link));
            match std::fs::symlink_metadata(literal) {
                Ok(m) if m.ino() == meta.ino() && m.dev() == meta.dev() => {}
                _ => return Ok(Resolved::Gone),
            }
        }
        Ok(Resolved::Path(link))
    }

    /// Directory of `raw` relative to the share root, through `cache`.
    fn share_relative(
        &mut self,
        raw: &RawHandle,
        cache: &mut HashMap<RawHandle, Option<PathBuf>>,
    ) -> Option<PathBuf> {
        if let Some(hit) = cache.get(raw) {
            return hit.clone();
        }
        let rel = match self.resolve(raw) {
            Ok(Resolved::Gone) => None,
            Ok(Resolved::Path(p)) => {
                let rel = p.strip_prefix(&self.share_prefix).map(Path::to_path_buf);
                match rel {
                    Ok(rel) => Some(rel),
                    Err(_) => {
                        // The share subvolume itself may have been moved
                        // within the top level: find it again, once.
                        match self.locate_share() {
                            Ok(prefix) if prefix != self.share_prefix => {
                                tracing::info!(
                                    old = %self.share_prefix.display(),
                                    new = %prefix.display(),
                                    "share moved within the btrfs top level"
                                );
                                self.share_prefix = prefix;
                                cache.clear();
                            }
                            Ok(_) => {}
                            Err(e) => tracing::warn!(error = %e, "cannot locate the share root"),
                        }
                        let rel = p.strip_prefix(&self.share_prefix).map(Path::to_path_buf);
                        if rel.is_err() {
                            tracing::warn!(
                                path = %p.display(),
                                share_path = %self.share_prefix.display(),
                                "event directory is outside the share"
                            );
                        }
                        rel.ok()
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, handle = ?Handle::from_raw(raw), "cannot resolve a directory handle");
                None
            }
        };
        cache.insert(raw.clone(), rel.clone());
        rel
    }

    /// Waits up to `timeout` for events, then reads all that are queued (up
    /// to about 8 MiB of them; the rest stays for the next call) and returns
    /// those in the share, oldest first. Returns an empty list on timeout or
    /// when a signal interrupts the wait.
    pub fn read(&mut self, timeout: Duration) -> Result<Vec<WatchEvent>> {
        let ms = timeout.as_millis();
        let ms = if ms == 0 && !timeout.is_zero() {
            1
        } else {
            libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
        };
        let ready = sys::poll_readable(self.fan.as_fd(), ms)
            .map_err(ioctl_err("poll(fanotify)", &self.share_path))?;
        if !ready {
            return Ok(Vec::new());
        }
        let mut raw = Vec::new();
        let mut total = 0;
        while total < MAX_BATCH_BYTES {
            match (&self.fan).read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => {
                    total += n;
                    parse_events(&self.buf[..n], &mut raw);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ioctl_err("read(fanotify)", &self.share_path)(e)),
            }
        }
        let mut cache = HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        for ev in raw {
            if ev.fd >= 0 {
                // FID groups never pass fds, but never leak one either.
                tracing::warn!(fd = ev.fd, "fanotify: event carries an fd; closing it");
                sys::close_event_fd(ev.fd);
            }
            if ev.mask == 0 {
                continue;
            }
            if ev.mask & libc::FAN_Q_OVERFLOW != 0 {
                tracing::warn!(share_path = %self.share_path.display(), "fanotify queue overflow: events were lost");
                out.push(WatchEvent::overflow(ev.mask, ev.pid));
                continue;
            }
            match event_root(&ev) {
                Some(root) if root == self.share_id => {}
                Some(_) => continue,
                None => {
                    tracing::warn!(
                        mask = ev.mask,
                        "fanotify: event without a btrfs file handle; dropped"
                    );
                    continue;
                }
            }
            out.push(self.finish(ev, &mut cache));
        }
        Ok(out)
    }

    /// Resolves the paths of a kept event.
    fn finish(
        &mut self,
        ev: RawEvent,
        cache: &mut HashMap<RawHandle, Option<PathBuf>>,
    ) -> WatchEvent {
        let mut out = WatchEvent::overflow(ev.mask, ev.pid);
        if let Some(d) = ev.dir {
            out.dir_handle = Handle::from_raw(&d.handle);
            out.dir = self.share_relative(&d.handle, cache);
            out.name = d.name;
        }
        if let Some(d) = ev.old {
            out.old_dir = self.share_relative(&d.handle, cache);
            out.old_name = d.name;
        }
        if let Some(d) = ev.new {
            out.new_dir = self.share_relative(&d.handle, cache);
            out.new_name = d.name;
        }
        if let Some(o) = ev.object {
            out.object = Handle::from_raw(&o);
            out.object_raw = Some(o);
        } else if out.name.as_deref() == Some(OsStr::new(".")) {
            // An event on a directory itself: the kernel reports the
            // directory as DFID_NAME with name "." and no separate FID.
            out.object = out.dir_handle;
            out.object_raw = out.object.map(|h| h.to_raw());
        }
        out
    }

    /// Opens the regular file `handle` read-only (`open_by_handle_at`), for
    /// example to clone exactly the inode that was closed. The file is first
    /// opened with `O_PATH` and checked, so FIFOs and devices are never
    /// really opened. [`SnapshotError::ObjectGone`] if the inode no longer
    /// exists (deleted, or its number reused: the generation differs).
    pub fn open_object(&self, handle: &Handle) -> Result<File> {
        let raw = handle.to_raw();
        let what = || {
            PathBuf::from(format!(
                "inode {} of subvolume {} (via {})",
                handle.ino,
                handle.root,
                self.share_path.display()
            ))
        };
        let fd: OwnedFd = match sys::open_by_handle(
            self.root_dir.as_fd(),
            raw.handle_type,
            &raw.bytes,
            libc::O_PATH,
        ) {
            Ok(fd) => fd,
            Err(e) if is_gone(&e) => {
                return Err(SnapshotError::ObjectGone {
                    root: handle.root,
                    ino: handle.ino,
                    gen: handle.gen,
                })
            }
            Err(e) => return Err(ioctl_err("open_by_handle_at", &what())(e)),
        };
        let pathfd = File::from(fd);
        let meta = pathfd.metadata().map_err(|e| io_err(&what())(e))?;
        if !meta.is_file() {
            return Err(SnapshotError::NotRegularFile {
                root: handle.root,
                ino: handle.ino,
            });
        }
        // Reopen the very same inode for reading.
        File::options()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(format!("/proc/self/fd/{}", pathfd.as_raw_fd()))
            .map_err(|e| io_err(&what())(e))
    }
}

/// Best-effort path of an open file, for error messages.
fn fd_path(f: &File) -> PathBuf {
    let link = format!("/proc/self/fd/{}", f.as_raw_fd());
    std::fs::read_link(&link).unwrap_or_else(|_| PathBuf::from(link))
}

/// Makes `dst` a reflink copy of `src` (`FICLONE`): `dst` gets all of
/// `src`'s extents, shared copy-on-write, and its size. Both must be on the
/// same btrfs filesystem; `dst` must be open for writing, `src` for reading.
/// The kernel flushes `src`'s dirty data first and locks both files for the
/// duration (about 11 µs per extent).
pub fn clone_file(src: &File, dst: &File) -> Result<()> {
    sys::ficlone(dst.as_fd(), src.as_fd()).map_err(|source| SnapshotError::Ioctl {
        op: "FICLONE",
        path: fd_path(dst),
        source,
    })
}

/// Clones `src` into `dst` only if nobody has `src` open for writing:
/// under a read lease (`F_SETLEASE`), which the kernel grants only when no
/// writer has the file open and which holds off new writers until
/// released. So the clone is exactly what the last writer closed, never a
/// mix with a write in progress. Returns `Ok(false)` (nothing cloned) when
/// a writer has it open: its own close will come. `src` must be opened
/// read-only.
pub fn clone_closed_file(src: &File, dst: &File) -> Result<bool> {
    // A writer opening the file breaks the lease and the kernel signals
    // SIGIO, whose default action would kill the process.
    static IGNORE_SIGIO: std::sync::Once = std::sync::Once::new();
    IGNORE_SIGIO.call_once(sys::ignore_sigio);
    match sys::read_lease(src.as_fd()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Ok(false),
        Err(source) => {
            return Err(SnapshotError::Ioctl {
                op: "F_SETLEASE",
                path: fd_path(src),
                source,
            })
        }
    }
    let cloned = clone_file(src, dst);
    let released = sys::release_lease(src.as_fd()).map_err(|source| SnapshotError::Ioctl {
        op: "F_SETLEASE(F_UNLCK)",
        path: fd_path(src),
        source,
    });
    cloned?;
    released?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FSID: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

    fn btrfs_handle(ino: u64, root: u64, gen: u32) -> RawHandle {
        Handle { root, ino, gen }.to_raw()
    }

    fn record(info_type: u8, handle: &RawHandle, name: Option<&[u8]>) -> Vec<u8> {
        let mut r = vec![info_type, 0, 0, 0];
        r.extend_from_slice(&FSID);
        r.extend_from_slice(&(handle.bytes.len() as u32).to_ne_bytes());
        r.extend_from_slice(&handle.handle_type.to_ne_bytes());
        r.extend_from_slice(&handle.bytes);
        if let Some(name) = name {
            r.extend_from_slice(name);
            r.push(0);
        }
        while r.len() % 4 != 0 {
            r.push(0);
        }
        let len = r.len() as u16;
        r[2..4].copy_from_slice(&len.to_ne_bytes());
        r
    }

    fn event(mask: u64, pid: i32, records: &[Vec<u8>]) -> Vec<u8> {
        let mut e = Vec::new();
        let len: usize = METADATA_LEN + records.iter().map(Vec::len).sum::<usize>();
        e.extend_from_slice(&(len as u32).to_ne_bytes());
        e.push(libc::FANOTIFY_METADATA_VERSION);
        e.push(0);
        e.extend_from_slice(&(METADATA_LEN as u16).to_ne_bytes());
        e.extend_from_slice(&mask.to_ne_bytes());
        e.extend_from_slice(&(-1i32).to_ne_bytes());
        e.extend_from_slice(&pid.to_ne_bytes());
        for r in records {
            e.extend_from_slice(r);
        }
        e
    }

    fn parse(buf: &[u8]) -> Vec<RawEvent> {
        let mut out = Vec::new();
        parse_events(buf, &mut out);
        out
    }

    #[test]
    fn handle_round_trip() {
        let h = Handle {
            root: 256,
            ino: 0x1234_5678_9abc,
            gen: 77,
        };
        let raw = h.to_raw();
        assert_eq!(raw.handle_type, 0x4d);
        assert_eq!(raw.bytes.len(), 20);
        assert_eq!(&raw.bytes[8..16], &256u64.to_ne_bytes());
        assert_eq!(Handle::from_raw(&raw), Some(h));
        let short = RawHandle {
            handle_type: 0x4d,
            bytes: raw.bytes[..19].to_vec(),
        };
        assert_eq!(Handle::from_raw(&short), None);
        let other = RawHandle {
            handle_type: 1,
            bytes: raw.bytes.clone(),
        };
        assert_eq!(Handle::from_raw(&other), None);
    }

    #[test]
    fn parses_create_and_rename() {
        let dir = btrfs_handle(256, 256, 1);
        let obj = btrfs_handle(300, 256, 9);
        let new_dir = btrfs_handle(257, 256, 2);
        let mut buf = event(
            libc::FAN_CREATE | libc::FAN_CLOSE_WRITE,
            42,
            &[
                record(libc::FAN_EVENT_INFO_TYPE_DFID_NAME, &dir, Some(b"file.txt")),
                record(libc::FAN_EVENT_INFO_TYPE_FID, &obj, None),
            ],
        );
        buf.extend(event(
            libc::FAN_RENAME,
            43,
            &[
                record(
                    libc::FAN_EVENT_INFO_TYPE_OLD_DFID_NAME,
                    &dir,
                    Some(b"file.txt"),
                ),
                record(
                    libc::FAN_EVENT_INFO_TYPE_NEW_DFID_NAME,
                    &new_dir,
                    Some(b"moved"),
                ),
                record(libc::FAN_EVENT_INFO_TYPE_FID, &obj, None),
            ],
        ));
        buf.extend(event(libc::FAN_Q_OVERFLOW, 0, &[]));
        let evs = parse(&buf);
        assert_eq!(evs.len(), 3);
        assert_eq!(evs[0].mask, libc::FAN_CREATE | libc::FAN_CLOSE_WRITE);
        assert_eq!(evs[0].pid, 42);
        assert_eq!(evs[0].fd, -1);
        let d = evs[0].dir.as_ref().expect("dir record");
        assert_eq!(d.handle, dir);
        assert_eq!(d.name.as_deref(), Some(OsStr::new("file.txt")));
        assert_eq!(evs[0].object.as_ref(), Some(&obj));
        assert_eq!(event_root(&evs[0]), Some(256));

        let old = evs[1].old.as_ref().expect("old");
        let new = evs[1].new.as_ref().expect("new");
        assert_eq!(old.name.as_deref(), Some(OsStr::new("file.txt")));
        assert_eq!(new.handle, new_dir);
        assert_eq!(new.name.as_deref(), Some(OsStr::new("moved")));
        assert!(evs[1].dir.is_none());

        assert_eq!(evs[2].mask, libc::FAN_Q_OVERFLOW);
        assert_eq!(event_root(&evs[2]), None);
        assert!(EventKind::from_mask(evs[2].mask).overflow);
    }

    #[test]
    fn root_id_comes_from_the_directory_first() {
        // A snapshot created in the share: the directory is in the share,
        // the new child is another subvolume.
        let ev = parse(&event(
            libc::FAN_CREATE | libc::FAN_ONDIR,
            1,
            &[
                record(
                    libc::FAN_EVENT_INFO_TYPE_DFID_NAME,
                    &btrfs_handle(256, 256, 1),
                    Some(b"snap"),
                ),
                record(
                    libc::FAN_EVENT_INFO_TYPE_FID,
                    &btrfs_handle(256, 258, 1),
                    None,
                ),
            ],
        ));
        assert_eq!(event_root(&ev[0]), Some(256));
        // Only an object (an unlinked inode): its root decides.
        let ev = parse(&event(
            libc::FAN_ATTRIB,
            1,
            &[record(
                libc::FAN_EVENT_INFO_TYPE_FID,
                &btrfs_handle(900, 259, 1),
                None,
            )],
        ));
        assert_eq!(event_root(&ev[0]), Some(259));
    }

    #[test]
    fn malformed_records_are_skipped() {
        let dir = btrfs_handle(256, 256, 1);
        // Name without NUL terminator: the record is dropped, the event kept.
        let mut bad_name = record(libc::FAN_EVENT_INFO_TYPE_DFID_NAME, &dir, None);
        bad_name.extend_from_slice(b"abcd");
        let len = bad_name.len() as u16;
        bad_name[2..4].copy_from_slice(&len.to_ne_bytes());
        let evs = parse(&event(libc::FAN_CREATE, 1, &[bad_name]));
        assert_eq!(evs.len(), 1);
        assert!(evs[0].dir.is_none());

        // Handle length beyond the record.
        let mut long = record(libc::FAN_EVENT_INFO_TYPE_FID, &dir, None);
        long[12..16].copy_from_slice(&100u32.to_ne_bytes());
        let evs = parse(&event(libc::FAN_ATTRIB, 1, &[long]));
        assert_eq!(evs.len(), 1);
        assert!(evs[0].object.is_none());

        // Record length 0: the rest of the event cannot be parsed.
        let mut zero = record(libc::FAN_EVENT_INFO_TYPE_FID, &dir, None);
        zero[2..4].copy_from_slice(&0u16.to_ne_bytes());
        let mut buf = event(libc::FAN_ATTRIB, 1, &[zero]);
        buf.extend(event(
            libc::FAN_DELETE,
            2,
            &[record(
                libc::FAN_EVENT_INFO_TYPE_DFID_NAME,
                &dir,
                Some(b"x"),
            )],
        ));
        let evs = parse(&buf);
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].mask, 0, "broken event is neutralised");
        assert_eq!(evs[1].mask, libc::FAN_DELETE, "next event still parsed");

        // Unknown record types are ignored.
        let mut unknown = record(libc::FAN_EVENT_INFO_TYPE_FID, &dir, None);
        unknown[0] = 99;
        let evs = parse(&event(libc::FAN_ATTRIB, 1, &[unknown]));
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].mask, libc::FAN_ATTRIB);
        assert!(evs[0].object.is_none());

        // Wrong metadata version: skipped.
        let mut v = event(libc::FAN_ATTRIB, 1, &[]);
        v[4] = 2;
        assert!(parse(&v).is_empty());
    }

    #[test]
    fn truncated_buffers_do_not_panic() {
        let dir = btrfs_handle(256, 256, 1);
        let full = event(
            libc::FAN_RENAME,
            5,
            &[
                record(libc::FAN_EVENT_INFO_TYPE_OLD_DFID_NAME, &dir, Some(b"a")),
                record(libc::FAN_EVENT_INFO_TYPE_NEW_DFID_NAME, &dir, Some(b"b")),
                record(libc::FAN_EVENT_INFO_TYPE_FID, &dir, None),
            ],
        );
        for cut in 0..full.len() {
            let evs = parse(&full[..cut]);
            assert!(evs.is_empty(), "cut at {cut}: {evs:?}");
        }
        // Lying lengths inside an otherwise complete buffer.
        for at in 0..full.len() {
            for val in [0u8, 1, 3, 4, 0x7f, 0xff] {
                let mut b = full.clone();
                b[at] = val;
                let _ = parse(&b);
            }
        }
    }

    #[test]
    fn pseudo_random_garbage_does_not_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..2000 {
            let len = (next() % 300) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 && b.len() >= METADATA_LEN {
                // Plausible header so that record parsing is exercised.
                let n = b.len() as u32;
                b[0..4].copy_from_slice(&n.to_ne_bytes());
                b[4] = libc::FANOTIFY_METADATA_VERSION;
                b[6..8].copy_from_slice(&(METADATA_LEN as u16).to_ne_bytes());
            }
            let _ = parse(&b);
        }
    }

    #[test]
    fn event_kind_from_mask() {
        let k = EventKind::from_mask(libc::FAN_MOVED_TO | libc::FAN_ONDIR);
        assert!(k.moved_to && k.is_dir);
        assert!(!k.moved_from && !k.create && !k.overflow);
        assert_eq!(EventKind::from_mask(0), EventKind::default());
    }
}
