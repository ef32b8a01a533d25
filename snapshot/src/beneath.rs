//! Opening a share's entries by share-relative path without ever leaving
//! the share: resolution starts at the share root's directory fd and is
//! done by the kernel with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_XDEV)`, so no component may be a symlink (not even one
//! pointing inside the share), `..` may not climb above the root, and no
//! mount point is crossed. The daemon runs as root; a share user who swaps
//! a directory for a symlink at the right moment must not make it read a
//! file from elsewhere on the filesystem.
//!
//! [`open_entry`] returns an `O_PATH` fd on the entry itself, whatever its
//! type (a trailing symlink is returned as the symlink, never followed).
//! Everything else is done on that fd: `fstat`, [`reopen`] for reading (the
//! same inode, through `/proc/self/fd`), [`read_link`], and xattrs through
//! [`proc_path`].

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use crate::sys;

/// `RESOLVE_*` flags of every lookup (`linux/openat2.h`).
const RESOLVE: u64 = libc::RESOLVE_BENEATH
    | libc::RESOLVE_NO_SYMLINKS
    | libc::RESOLVE_NO_MAGICLINKS
    | libc::RESOLVE_NO_XDEV;

/// Lookups interrupted by a concurrent rename (`EAGAIN`) are retried this
/// often.
const ATTEMPTS: usize = 8;

/// Why [`open_entry`] found nothing.
pub fn is_absent(e: &io::Error) -> bool {
    // ELOOP: a directory on the way is a symlink now, so no entry of the
    // share's own tree has this path.
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
    )
}

/// Opens the entry at `rel` (share-relative, `/`-separated; empty = the
/// root itself) below the directory `root`, as an `O_PATH | O_NOFOLLOW` fd.
/// Errors: [`is_absent`] when there is no such entry in the share's tree;
/// `EXDEV` when the path crosses a mount point; `EINVAL` for a path with a
/// NUL byte.
pub fn open_entry(root: BorrowedFd<'_>, rel: &[u8]) -> io::Result<File> {
    let rel: &[u8] = if rel.is_empty() { b"." } else { rel };
    let mut attempt = 0;
    loop {
        match sys::openat2(root, rel, libc::O_PATH | libc::O_NOFOLLOW, RESOLVE) {
            Ok(fd) => return Ok(File::from(fd)),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && attempt + 1 < ATTEMPTS => {
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// `/proc/self/fd/N` for an open fd: opening it (or calling a
/// path-following xattr function on it) reaches exactly that inode, even
/// for an `O_PATH` fd on a symlink; no name in the share is looked up.
pub fn proc_path(f: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

/// Opens the inode of `entry` (from [`open_entry`]) again with `flags`
/// (`O_RDONLY`, `O_DIRECTORY`, `O_NONBLOCK` ...): the same inode, whatever
/// its name is now.
pub fn reopen(entry: &File, flags: libc::c_int) -> io::Result<File> {
    File::options()
        .read(true)
        .custom_flags(flags | libc::O_CLOEXEC)
        .open(proc_path(entry))
}

/// The target of the symlink `entry` (from [`open_entry`]).
pub fn read_link(entry: &impl AsFd) -> io::Result<Vec<u8>> {
    sys::readlink_fd(entry.as_fd())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn never_leaves_the_root_nor_follows_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let share = tmp.path().join("share");
        let other = tmp.path().join("other");
        std::fs::create_dir_all(share.join("d")).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(share.join("d/f"), b"mine").unwrap();
        std::fs::write(other.join("f"), b"secret").unwrap();
        std::os::unix::fs::symlink(&other, share.join("evil")).unwrap();
        std::os::unix::fs::symlink("d", share.join("inside")).unwrap();
        std::os::unix::fs::symlink("d/f", share.join("flink")).unwrap();
        let root = File::open(&share).unwrap();

        let f = open_entry(root.as_fd(), b"d/f").unwrap();
        let data = std::fs::read(proc_path(&reopen(&f, libc::O_RDONLY).unwrap())).unwrap();
        assert_eq!(data, b"mine");
        for bad in [
            &b"evil/f"[..],
            b"inside/f",
            b"../other/f",
            b"d/../../other/f",
        ] {
            let e = open_entry(root.as_fd(), bad).unwrap_err();
            assert!(
                matches!(e.raw_os_error(), Some(libc::ELOOP | libc::EXDEV)),
                "{}: {e}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(is_absent(&open_entry(root.as_fd(), b"evil/f").unwrap_err()));
        assert!(is_absent(&open_entry(root.as_fd(), b"nope").unwrap_err()));
        // A trailing symlink is the symlink itself.
        let l = open_entry(root.as_fd(), b"flink").unwrap();
        assert!(l.metadata().unwrap().file_type().is_symlink());
        assert_eq!(read_link(&l).unwrap(), b"d/f");
        // Following the fd link stops at the symlink (xattrs are read so).
        assert!(std::fs::metadata(proc_path(&l)).is_ok_and(|m| m.file_type().is_symlink()));
        // The root itself.
        let r = open_entry(root.as_fd(), b"").unwrap();
        assert_eq!(r.metadata().unwrap().ino(), root.metadata().unwrap().ino());
    }
}
