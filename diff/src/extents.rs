//! Extent maps: a thin layer over the `FS_IOC_FIEMAP` ioctl.
//!
//! [`extent_map`] asks the kernel where each logical byte range of a file
//! lives on disk, 1024 extents per ioctl with `FIEMAP_FLAG_SYNC` (so delayed
//! allocations are written back and mapped first). The `fiemap` crate asks
//! for only 8 extents per call, which costs about 60% more time on files with
//! many extents; hence this hand-written loop.
//!
//! The map is raw kernel output: holes are simply absent, the last extent may
//! extend past the file size (block rounding, preallocation), and btrfs
//! reports compressed extents with `ENCODED` and a physical address that is
//! the start of the whole compressed extent, not offset-adjusted. Interpreting
//! two maps is [`changed_ranges`](crate::changed_ranges)'s job.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::{DiffError, Result};

/// Last extent in the file.
pub const FIEMAP_EXTENT_LAST: u32 = 0x0000_0001;
/// Data location unknown.
pub const FIEMAP_EXTENT_UNKNOWN: u32 = 0x0000_0002;
/// Location still pending (delayed allocation); sets `UNKNOWN`.
pub const FIEMAP_EXTENT_DELALLOC: u32 = 0x0000_0004;
/// Data is encoded (compressed); `physical` is the encoded extent's start.
pub const FIEMAP_EXTENT_ENCODED: u32 = 0x0000_0008;
/// Data is encrypted by the filesystem.
pub const FIEMAP_EXTENT_DATA_ENCRYPTED: u32 = 0x0000_0080;
/// Extent offsets may not be block aligned.
pub const FIEMAP_EXTENT_NOT_ALIGNED: u32 = 0x0000_0100;
/// Data is stored with metadata (inline); sets `NOT_ALIGNED`.
pub const FIEMAP_EXTENT_DATA_INLINE: u32 = 0x0000_0200;
/// Several files share the block (tail packing); sets `NOT_ALIGNED`.
pub const FIEMAP_EXTENT_DATA_TAIL: u32 = 0x0000_0400;
/// Space allocated but not written: reads as zeros.
pub const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x0000_0800;
/// The filesystem has no native extents; blocks were merged for the report.
pub const FIEMAP_EXTENT_MERGED: u32 = 0x0000_1000;
/// Space shared with other files (reflinks, snapshots).
pub const FIEMAP_EXTENT_SHARED: u32 = 0x0000_2000;

/// One extent of a file as FIEMAP reports it, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileExtent {
    /// Offset in the file.
    pub logical: u64,
    /// Offset on the device (for `ENCODED` extents: the encoded extent's start).
    pub physical: u64,
    /// Length in the file.
    pub length: u64,
    /// `FIEMAP_EXTENT_*` flags.
    pub flags: u32,
}

impl FileExtent {
    /// End of the extent in the file (saturating).
    pub fn end(&self) -> u64 {
        self.logical.saturating_add(self.length)
    }
}

const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_FLAG_SYNC: u32 = 0x0000_0001;
/// Extents asked for per ioctl.
const BATCH: usize = 1024;

/// `struct fiemap_extent` of `<linux/fiemap.h>`.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

/// `struct fiemap` of `<linux/fiemap.h>` with room for [`BATCH`] extents.
#[repr(C)]
struct Request {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
    fm_extents: [RawExtent; BATCH],
}

const _: () = assert!(std::mem::size_of::<RawExtent>() == 56);
const _: () = assert!(std::mem::offset_of!(RawExtent, fe_flags) == 40);
const _: () = assert!(std::mem::offset_of!(Request, fm_extents) == 32);
const _: () = assert!(std::mem::size_of::<Request>() == 32 + 56 * BATCH);
// _IOWR('f', 11, struct fiemap): direction 3, size 32, type 'f', number 11.
const _: () =
    assert!(FS_IOC_FIEMAP == (3 << 30) | (32 << 16) | ((b'f' as libc::c_ulong) << 8) | 11);

/// The extent map of an open file, in logical order: FIEMAP with
/// `FIEMAP_FLAG_SYNC`, 1024 extents per ioctl, repeated until the kernel
/// reports the last extent or nothing more. Holes are absent from the map; an
/// empty file has no extents. `path` is only used in errors.
///
/// Fails (with the kernel's error, typically `EOPNOTSUPP`) on filesystems
/// without FIEMAP.
pub fn extent_map(file: &File, path: &Path) -> Result<Vec<FileExtent>> {
    let fd = file.as_raw_fd();
    let mut req: Box<Request> = zeroed_request();
    let mut out: Vec<FileExtent> = Vec::new();
    // Everything below `covered` has been reported already.
    let mut covered: u64 = 0;
    loop {
        req.fm_start = covered;
        req.fm_length = u64::MAX;
        req.fm_flags = FIEMAP_FLAG_SYNC;
        req.fm_mapped_extents = 0;
        req.fm_extent_count = BATCH as u32;
        req.fm_reserved = 0;
        let rc = loop {
            // SAFETY: `req` is a valid, exclusively borrowed `struct fiemap`
            // followed by room for `fm_extent_count` extents, as the ioctl
            // expects; the kernel writes at most that many.
            let rc = unsafe { libc::ioctl(fd, FS_IOC_FIEMAP as _, &mut *req as *mut Request) };
            if rc < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break rc;
        };
        if rc < 0 {
            return Err(DiffError::io(path, std::io::Error::last_os_error()));
        }
        let mapped = (req.fm_mapped_extents as usize).min(BATCH);
        if mapped == 0 {
            break;
        }
        let before = covered;
        let mut last = false;
        for raw in &req.fm_extents[..mapped] {
            let e = FileExtent {
                logical: raw.fe_logical,
                physical: raw.fe_physical,
                length: raw.fe_length,
                flags: raw.fe_flags,
            };
            last |= e.flags & FIEMAP_EXTENT_LAST != 0;
            // The extent containing `fm_start` may come back again when the
            // previous batch ended inside it; keep it once.
            if out.last() == Some(&e) {
                continue;
            }
            covered = covered.max(e.end());
            out.push(e);
        }
        // Stop at the last extent, and whenever a batch made no progress
        // (rather than loop forever on a confused filesystem).
        if last || covered <= before || covered == u64::MAX {
            break;
        }
    }
    Ok(out)
}

fn zeroed_request() -> Box<Request> {
    let b = Box::<Request>::new_zeroed();
    // SAFETY: `Request` is plain integers and arrays of integers, for which
    // all-zero bytes are a valid value.
    unsafe { b.assume_init() }
}
