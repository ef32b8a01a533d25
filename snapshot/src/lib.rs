//! btrfs for btrship: subvolume checks, read-only snapshots in a private
//! area, listing and deletion.
//!
//! A *share* is a btrfs subvolume (never the top-level subvolume 5).
//! [`Share::open`] validates it and finds the filesystem's device in
//! `/proc/self/mountinfo`.
//!
//! Snapshots live in a *private area* that Samba clients cannot see: the
//! directory `.btrship/<share-name>/snapshots/` at the btrfs top level,
//! reached through a detached mount of subvolid=5 made with the new mount API
//! (`fsopen`/`fsconfig`/`fsmount`). The detached mount has no mount point and
//! does not appear in the mount table; it lives as long as the
//! [`PrivateArea`] holds its file descriptor. Paths into it have the form
//! `/proc/self/fd/<mount_fd>/.btrship/<name>/snapshots/<snapshot>` and work
//! with ordinary `std::fs` calls from this process.
//!
//! Snapshots are read-only and named `@GMT-YYYY.MM.DD-HH.MM.SS` (UTC, see
//! [`snapshot_name`]), which sorts by time and is the format Samba's
//! `vfs_shadow_copy2` understands.
//!
//! [`changed_inodes`] lists the inodes changed between two snapshots by
//! visiting only the btree blocks written in between (see the `changes`
//! module notes); [`inode_paths`] turns an inode number into its paths and
//! [`subvol_generations`] gives the transaction ids to compare.
//!
//! [`watch::Watcher`] reports live changes in a share (fanotify in FID mode
//! with a filesystem mark on the top level), and [`watch::clone_file`] makes
//! reflink copies of the files it reports.
//!
//! This crate is the only place in btrship that issues btrfs ioctls or
//! contains `unsafe` code; all of it is in the private `sys` module.
//! Creating the private area, creating or deleting snapshots and the
//! change search need root (`CAP_SYS_ADMIN`).

pub mod beneath;
mod changes;
mod mountinfo;
mod sys;
pub mod watch;

pub use changes::{
    changed_inodes, inode_paths, subvol_generations, ChangedInode, SubvolGenerations,
};

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Timelike, Utc};

/// Errors of this crate. Each message names the path involved and, where
/// there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: not on a btrfs filesystem; btrship needs the share on btrfs")]
    NotBtrfs { path: PathBuf },
    #[error("{path} is a plain directory, not a btrfs subvolume; convert it: mv {path} {path}.old && btrfs subvolume create {path} && cp -a --reflink=always {path}.old/. {path}/ && rm -rf {path}.old")]
    NotSubvolume { path: PathBuf },
    #[error("{path} is the top level of the btrfs filesystem; create a subvolume for the share: btrfs subvolume create {path}/share")]
    TopLevel { path: PathBuf },
    #[error("{path} is not a directory; the share must be a btrfs subvolume directory")]
    NotDirectory { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{op} failed on {path}: {source}")]
    Ioctl {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{op} on {path} returned malformed data: {reason}")]
    Malformed {
        op: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot find the btrfs device for {path} in /proc/self/mountinfo")]
    NoDevice { path: PathBuf },
    #[error("cannot mount the btrfs top level of {device} privately: {source}; btrship must run as root (CAP_SYS_ADMIN) and the device must be reachable")]
    Mount {
        device: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the filesystem on {device} is not the one holding the share {share}; check /proc/self/mountinfo for stacked or stale mounts")]
    DeviceMismatch { device: PathBuf, share: PathBuf },
    #[error("the share {path} is now subvolume {found}, not {expected} as when it was opened; restart btrship")]
    ShareChanged {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("invalid share name {name:?}: {reason}")]
    InvalidShareName { name: String, reason: &'static str },
    #[error("{name:?} is not a btrship snapshot name; expected @GMT-YYYY.MM.DD-HH.MM.SS")]
    InvalidSnapshotName { name: String },
    #[error("snapshot {name} not found")]
    NotFound { name: String },
    #[error("inode {ino} (generation {gen}) of subvolume {root} no longer exists")]
    ObjectGone { root: u64, ino: u64, gen: u32 },
    #[error("inode {ino} of subvolume {root} is not a regular file")]
    NotRegularFile { root: u64, ino: u64 },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, SnapshotError>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn ioctl_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Ioctl {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Opens a directory read-only (`O_RDONLY | O_DIRECTORY | O_CLOEXEC`).
fn open_dir(path: &Path) -> io::Result<File> {
    File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)
}

/// Opens `path` and checks it is a directory on btrfs; returns the open
/// directory and its metadata. The path is first opened with `O_PATH`, so
/// FIFOs and device nodes are never really opened.
fn open_btrfs_dir(path: &Path) -> Result<(File, std::fs::Metadata)> {
    let handle = File::options()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err(path))?;
    let fs_type = sys::statfs_type(handle.as_fd()).map_err(io_err(path))?;
    if fs_type != sys::BTRFS_SUPER_MAGIC {
        return Err(SnapshotError::NotBtrfs {
            path: path.to_path_buf(),
        });
    }
    let meta = handle.metadata().map_err(io_err(path))?;
    if !meta.is_dir() {
        return Err(SnapshotError::NotDirectory {
            path: path.to_path_buf(),
        });
    }
    // Reopen the very same inode for reading (ioctls need a non-O_PATH fd).
    let file = open_dir(Path::new(&format!("/proc/self/fd/{}", handle.as_raw_fd())))
        .map_err(io_err(path))?;
    Ok((file, meta))
}

/// A validated share: a btrfs subvolume other than the top level.
#[derive(Debug, Clone)]
pub struct Share {
    /// Canonical path of the subvolume root.
    pub path: PathBuf,
    /// btrfs subvolume id (>= 256).
    pub subvol_id: u64,
    /// Filesystem UUID (`fsid` of `BTRFS_IOC_FS_INFO`).
    pub fs_uuid: [u8; 16],
    /// Block device of the filesystem, from `/proc/self/mountinfo`.
    pub device: PathBuf,
}

impl Share {
    /// Validates `path` as a share: it exists, is on btrfs, is the root of a
    /// subvolume and is not the top level (id 5). Finds the device.
    pub fn open(path: &Path) -> Result<Share> {
        let canonical = path.canonicalize().map_err(io_err(path))?;
        let path = canonical.as_path();
        let (file, meta) = open_btrfs_dir(path)?;
        if meta.ino() != sys::BTRFS_FIRST_FREE_OBJECTID {
            return Err(SnapshotError::NotSubvolume {
                path: path.to_path_buf(),
            });
        }
        let subvol_id =
            sys::subvol_id(file.as_fd()).map_err(ioctl_err("BTRFS_IOC_INO_LOOKUP", path))?;
        if subvol_id == sys::BTRFS_FS_TREE_OBJECTID {
            return Err(SnapshotError::TopLevel {
                path: path.to_path_buf(),
            });
        }
        let fs_uuid = sys::fs_uuid(file.as_fd()).map_err(ioctl_err("BTRFS_IOC_FS_INFO", path))?;
        let device = find_device(path)?;
        Ok(Share {
            path: canonical,
            subvol_id,
            fs_uuid,
            device,
        })
    }
}

/// The btrfs device of the mount covering `path` (longest mount-point prefix).
fn find_device(path: &Path) -> Result<PathBuf> {
    let mi = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(mi).map_err(io_err(mi))?;
    let entries = mountinfo::parse(&text);
    match mountinfo::covering_mount(&entries, path) {
        Some(m) if m.fstype == "btrfs" && m.source.starts_with('/') => Ok(PathBuf::from(&m.source)),
        _ => Err(SnapshotError::NoDevice {
            path: path.to_path_buf(),
        }),
    }
}

/// A snapshot in the private area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// `@GMT-YYYY.MM.DD-HH.MM.SS`.
    pub name: String,
    /// The time encoded in the name (UTC, whole seconds).
    pub time: DateTime<Utc>,
    /// `/proc/self/fd/N/.btrship/<share>/snapshots/<name>`; valid while the
    /// [`PrivateArea`] is alive. Do not canonicalise it: the detached
    /// mount's fd link reads back as `/`.
    pub path: PathBuf,
    /// btrfs subvolume id of the snapshot.
    pub subvol_id: u64,
}

const SNAPSHOT_FORMAT: &str = "@GMT-%Y.%m.%d-%H.%M.%S";

/// The snapshot name for `t`: `@GMT-YYYY.MM.DD-HH.MM.SS` (UTC, sub-seconds dropped).
pub fn snapshot_name(t: DateTime<Utc>) -> String {
    t.format(SNAPSHOT_FORMAT).to_string()
}

/// Parses a name made by [`snapshot_name`]; `None` for anything else
/// (the format is checked strictly, including zero padding).
pub fn parse_snapshot_name(name: &str) -> Option<DateTime<Utc>> {
    if name.len() != "@GMT-YYYY.MM.DD-HH.MM.SS".len() {
        return None;
    }
    let t = NaiveDateTime::parse_from_str(name, SNAPSHOT_FORMAT)
        .ok()?
        .and_utc();
    (snapshot_name(t) == name).then_some(t)
}

/// Whether the subvolume at `path` is read-only (`BTRFS_IOC_SUBVOL_GETFLAGS`).
pub fn is_read_only(path: &Path) -> Result<bool> {
    let (file, meta) = open_btrfs_dir(path)?;
    if meta.ino() != sys::BTRFS_FIRST_FREE_OBJECTID {
        return Err(SnapshotError::NotSubvolume {
            path: path.to_path_buf(),
        });
    }
    let flags =
        sys::subvol_flags(file.as_fd()).map_err(ioctl_err("BTRFS_IOC_SUBVOL_GETFLAGS", path))?;
    Ok(flags & sys::BTRFS_SUBVOL_RDONLY != 0)
}

fn validate_share_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name == "." || name == ".." {
        Some("it must not be . or ..")
    } else if name.contains('/') {
        Some("it must not contain '/'")
    } else if name.contains('\0') {
        Some("it must not contain NUL")
    } else if name.len() > 255 {
        Some("it is longer than 255 bytes")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(SnapshotError::InvalidShareName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

fn validate_snapshot_name(name: &str) -> Result<DateTime<Utc>> {
    parse_snapshot_name(name).ok_or_else(|| SnapshotError::InvalidSnapshotName {
        name: name.to_string(),
    })
}

/// The private snapshot area of one share: `.btrship/<name>/snapshots/` at
/// the btrfs top level, reached through a detached mount.
#[derive(Debug)]
pub struct PrivateArea {
    mount_fd: OwnedFd,
    name: String,
    fs_uuid: [u8; 16],
    device: PathBuf,
    dir: PathBuf,
}

impl PrivateArea {
    /// Mounts the top level of the share's filesystem privately and creates
    /// `.btrship/<name>/snapshots` (mode 0700) there if needed.
    pub fn open(share: &Share, name: &str) -> Result<PrivateArea> {
        validate_share_name(name)?;
        let mount_fd = sys::mount_top_level_detached(&share.device).map_err(|source| {
            SnapshotError::Mount {
                device: share.device.clone(),
                source,
            }
        })?;
        let root = PathBuf::from(format!("/proc/self/fd/{}", mount_fd.as_raw_fd()));
        let root_dir = open_dir(&root).map_err(io_err(&root))?;
        let fsid = sys::fs_uuid(root_dir.as_fd()).map_err(ioctl_err("BTRFS_IOC_FS_INFO", &root))?;
        if fsid != share.fs_uuid {
            return Err(SnapshotError::DeviceMismatch {
                device: share.device.clone(),
                share: share.path.clone(),
            });
        }
        let base = root.join(".btrship");
        let dir = base.join(name).join("snapshots");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir))?;
        // DirBuilder::recursive leaves existing directories alone; make sure
        // the private directories stay private.
        for d in [&base, &base.join(name), &dir] {
            let meta = std::fs::symlink_metadata(d).map_err(io_err(d))?;
            if !meta.is_dir() {
                return Err(SnapshotError::NotDirectory { path: d.clone() });
            }
            if meta.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
                    .map_err(io_err(d))?;
            }
        }
        tracing::debug!(device = %share.device.display(), dir = %dir.display(), "private area open");
        Ok(PrivateArea {
            mount_fd,
            name: name.to_string(),
            fs_uuid: fsid,
            device: share.device.clone(),
            dir,
        })
    }

    /// The staging subvolume `.btrship/<name>/staging` (created on first
    /// use, mode 0700): where the daemon keeps reflink clones of closed
    /// files. A subvolume of its own, so its writes carry its own subvolume
    /// id and the watcher drops them.
    pub fn staging_dir(&self) -> Result<PathBuf> {
        let parent = self.dir.parent().unwrap_or(&self.dir).to_path_buf();
        let staging = parent.join("staging");
        match std::fs::symlink_metadata(&staging) {
            Ok(m) if m.is_dir() => return Ok(staging),
            Ok(_) => return Err(SnapshotError::NotDirectory { path: staging }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&staging)(e)),
        }
        let dir = open_dir(&parent).map_err(io_err(&parent))?;
        match sys::subvol_create(dir.as_fd(), "staging") {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(ioctl_err("BTRFS_IOC_SUBVOL_CREATE_V2", &staging)(e)),
        }
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(&staging))?;
        Ok(staging)
    }

    /// `/proc/self/fd/N/.btrship/<name>/snapshots`.
    pub fn snapshots_dir(&self) -> &Path {
        &self.dir
    }

    /// The detached top-level mount (an `O_PATH`-like fd of the subvolid=5
    /// root). Usable e.g. as the anchor of a fanotify filesystem mark
    /// (`fanotify_mark(.., fd, ".")`) or for `openat`.
    pub fn top_level_fd(&self) -> BorrowedFd<'_> {
        self.mount_fd.as_fd()
    }

    /// The share name this area belongs to.
    pub fn share_name(&self) -> &str {
        &self.name
    }

    fn info(&self, name: &str, time: DateTime<Utc>) -> Result<SnapshotInfo> {
        let path = self.dir.join(name);
        let (file, meta) = open_btrfs_dir(&path).map_err(|e| match e {
            SnapshotError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                SnapshotError::NotFound {
                    name: name.to_string(),
                }
            }
            other => other,
        })?;
        if meta.ino() != sys::BTRFS_FIRST_FREE_OBJECTID {
            return Err(SnapshotError::NotSubvolume { path });
        }
        let subvol_id =
            sys::subvol_id(file.as_fd()).map_err(ioctl_err("BTRFS_IOC_INO_LOOKUP", &path))?;
        Ok(SnapshotInfo {
            name: name.to_string(),
            time,
            path,
            subvol_id,
        })
    }

    /// Creates a read-only snapshot of `share` named after the current UTC
    /// second. If that name is taken, waits for the next second; an existing
    /// snapshot is never overwritten.
    pub fn create_snapshot(&self, share: &Share) -> Result<SnapshotInfo> {
        if share.fs_uuid != self.fs_uuid {
            return Err(SnapshotError::DeviceMismatch {
                device: self.device.clone(),
                share: share.path.clone(),
            });
        }
        let (src, meta) = open_btrfs_dir(&share.path)?;
        let found = if meta.ino() == sys::BTRFS_FIRST_FREE_OBJECTID {
            sys::subvol_id(src.as_fd()).map_err(ioctl_err("BTRFS_IOC_INO_LOOKUP", &share.path))?
        } else {
            0
        };
        if found != share.subvol_id {
            return Err(SnapshotError::ShareChanged {
                path: share.path.clone(),
                expected: share.subvol_id,
                found,
            });
        }
        let dest = open_dir(&self.dir).map_err(io_err(&self.dir))?;
        loop {
            let now = Utc::now();
            let time = now.with_nanosecond(0).unwrap_or(now);
            let name = snapshot_name(time);
            let path = self.dir.join(&name);
            let taken = match std::fs::symlink_metadata(&path) {
                Ok(_) => true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => return Err(io_err(&path)(e)),
            };
            if !taken {
                match sys::snap_create_ro(dest.as_fd(), src.as_fd(), &name) {
                    Ok(()) => {
                        let info = self.info(&name, time)?;
                        tracing::info!(
                            share_path = %share.path.display(),
                            snapshot = %name,
                            subvol_id = info.subvol_id,
                            "created read-only snapshot"
                        );
                        return Ok(info);
                    }
                    // Someone else created this name between the check and
                    // the ioctl: try the next second.
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(e) => return Err(ioctl_err("BTRFS_IOC_SNAP_CREATE_V2", &path)(e)),
                }
            }
            let nanos = Utc::now().nanosecond().min(999_999_999);
            std::thread::sleep(Duration::from_nanos(u64::from(1_000_000_000 - nanos)));
        }
    }

    /// All snapshots in the area, oldest first. Entries whose names are not
    /// snapshot names are ignored, as are non-subvolume entries.
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str() else {
                continue;
            };
            let Some(time) = parse_snapshot_name(name) else {
                continue;
            };
            match self.info(name, time) {
                Ok(info) => out.push(info),
                // Deleted while we were listing.
                Err(SnapshotError::NotFound { .. }) => {}
                Err(
                    SnapshotError::NotSubvolume { path } | SnapshotError::NotDirectory { path },
                ) => {
                    tracing::warn!(path = %path.display(), "ignoring non-snapshot entry in the snapshot area");
                }
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.time.cmp(&b.time).then_with(|| a.name.cmp(&b.name)));
        Ok(out)
    }

    /// The snapshot called `name`.
    pub fn get(&self, name: &str) -> Result<SnapshotInfo> {
        let time = validate_snapshot_name(name)?;
        self.info(name, time)
    }

    /// Deletes the snapshot called `name` (`BTRFS_IOC_SNAP_DESTROY`). The
    /// space is reclaimed asynchronously by the kernel.
    pub fn delete_snapshot(&self, name: &str) -> Result<()> {
        validate_snapshot_name(name)?;
        let dir = open_dir(&self.dir).map_err(io_err(&self.dir))?;
        match sys::snap_destroy(dir.as_fd(), name) {
            Ok(()) => {
                tracing::info!(snapshot = %name, area = %self.name, "deleted snapshot");
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Err(SnapshotError::NotFound {
                name: name.to_string(),
            }),
            Err(e) => Err(ioctl_err("BTRFS_IOC_SNAP_DESTROY", &self.dir.join(name))(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn name_round_trip() {
        let t = Utc.with_ymd_and_hms(2024, 1, 2, 3, 4, 5).single();
        let Some(t) = t else {
            panic!("bad test time");
        };
        let n = snapshot_name(t);
        assert_eq!(n, "@GMT-2024.01.02-03.04.05");
        assert_eq!(parse_snapshot_name(&n), Some(t));
    }

    #[test]
    fn name_drops_subseconds() {
        let t = Utc.with_ymd_and_hms(2024, 12, 31, 23, 59, 59).single();
        let Some(t) = t else {
            panic!("bad test time");
        };
        let t2 = t + chrono::Duration::milliseconds(750);
        assert_eq!(snapshot_name(t2), "@GMT-2024.12.31-23.59.59");
    }

    #[test]
    fn rejects_bad_names() {
        for bad in [
            "",
            "@GMT-2024.1.02-03.04.05",
            "@GMT-2024.01.02-03.04.5",
            "@GMT-2024.01.02-03.04.05 ",
            "@GMT-2024.13.02-03.04.05",
            "@GMT-2024.02.30-03.04.05",
            "@GMT-2024.01.02-24.04.05",
            "GMT-2024.01.02-03.04.05x",
            "@GMT-2024-01-02-03.04.05",
            "@GMT-+024.01.02-03.04.05",
            "@GMT-2024.01.02-03.04.0\u{e9}",
            "../../etc/passwd",
            "snapshots",
        ] {
            assert_eq!(parse_snapshot_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn names_sort_by_time() {
        let times: Vec<DateTime<Utc>> = [
            (1999, 12, 31, 23, 59, 59),
            (2000, 1, 1, 0, 0, 0),
            (2000, 1, 1, 0, 0, 1),
            (2000, 1, 1, 0, 1, 0),
            (2000, 1, 1, 10, 0, 0),
            (2000, 2, 1, 0, 0, 0),
            (2000, 10, 1, 0, 0, 0),
            (2024, 6, 15, 9, 8, 7),
        ]
        .iter()
        .filter_map(|&(y, mo, d, h, mi, s)| Utc.with_ymd_and_hms(y, mo, d, h, mi, s).single())
        .collect();
        assert_eq!(times.len(), 8);
        let mut names: Vec<String> = times.iter().rev().map(|t| snapshot_name(*t)).collect();
        names.sort();
        let expected: Vec<String> = times.iter().map(|t| snapshot_name(*t)).collect();
        assert_eq!(names, expected);
    }

    #[test]
    fn share_name_validation() {
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(validate_share_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_share_name(&"x".repeat(256)).is_err());
        for good in ["share", ".hidden", "a b", "Ünïcode"] {
            assert!(validate_share_name(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn tmp_is_not_checked_as_btrfs_by_accident() {
        // is_read_only on a non-btrfs or non-subvolume path errors, never panics.
        let r = is_read_only(Path::new("/proc"));
        assert!(r.is_err());
        let r = is_read_only(Path::new("/nonexistent/definitely/not"));
        assert!(matches!(r, Err(SnapshotError::Io { .. })));
    }
}
