//! Raw kernel interface: btrfs ioctls, `fstatfs` and the new mount API.
//!
//! This module holds every `unsafe` block of the project. Each wrapper takes
//! safe Rust types, builds a `repr(C)` argument struct whose size is checked
//! at compile time against `linux/btrfs.h`, makes one system call and turns
//! the result into an [`std::io::Result`].

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `BTRFS_SUPER_MAGIC` from `linux/magic.h`.
pub const BTRFS_SUPER_MAGIC: u32 = 0x9123_683E;
/// Inode number of the root directory of every subvolume (`BTRFS_FIRST_FREE_OBJECTID`).
pub const BTRFS_FIRST_FREE_OBJECTID: u64 = 256;
/// Id of the top-level subvolume (`BTRFS_FS_TREE_OBJECTID`).
pub const BTRFS_FS_TREE_OBJECTID: u64 = 5;
/// `BTRFS_SUBVOL_RDONLY`: subvolume flag and snapshot-creation flag.
pub const BTRFS_SUBVOL_RDONLY: u64 = 1 << 1;

const BTRFS_IOCTL_MAGIC: u32 = 0x94;
const BTRFS_PATH_NAME_MAX: usize = 4087;
const BTRFS_SUBVOL_NAME_MAX: usize = 4039;
const BTRFS_INO_LOOKUP_PATH_MAX: usize = 4080;
const BTRFS_FSID_SIZE: usize = 16;

// Encoding of ioctl request numbers (`_IOC` in asm-generic/ioctl.h and the
// few architectures that differ from it).
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
mod ioc {
    pub const WRITE: u32 = 4;
    pub const READ: u32 = 2;
    pub const SIZEBITS: u32 = 13;
}
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
mod ioc {
    pub const WRITE: u32 = 1;
    pub const READ: u32 = 2;
    pub const SIZEBITS: u32 = 14;
}

const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    assert!(size < (1 << ioc::SIZEBITS));
    (dir << 30) | ((size as u32) << 16) | (BTRFS_IOCTL_MAGIC << 8) | nr
}
const fn iow(nr: u32, size: usize) -> u32 {
    ioc(ioc::WRITE, nr, size)
}
const fn ior(nr: u32, size: usize) -> u32 {
    ioc(ioc::READ, nr, size)
}
const fn iowr(nr: u32, size: usize) -> u32 {
    ioc(ioc::READ | ioc::WRITE, nr, size)
}

/// `struct btrfs_ioctl_vol_args`.
#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; BTRFS_PATH_NAME_MAX + 1],
}

/// `struct btrfs_ioctl_vol_args_v2` (the `size`/`qgroup_inherit` union is
/// `unused[4]`'s first member; we never pass an inherit struct).
#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; BTRFS_SUBVOL_NAME_MAX + 1],
}

/// `struct btrfs_ioctl_ino_lookup_args`.
#[repr(C)]
struct InoLookupArgs {
    treeid: u64,
    objectid: u64,
    name: [u8; BTRFS_INO_LOOKUP_PATH_MAX],
}

/// `struct btrfs_ioctl_fs_info_args`.
#[repr(C)]
struct FsInfoArgs {
    max_id: u64,
    num_devices: u64,
    fsid: [u8; BTRFS_FSID_SIZE],
    nodesize: u32,
    sectorsize: u32,
    clone_alignment: u32,
    csum_type: u16,
    csum_size: u16,
    flags: u64,
    generation: u64,
    metadata_uuid: [u8; BTRFS_FSID_SIZE],
    reserved: [u8; 944],
}

// Sizes as in linux/btrfs.h (checked with a C program on this machine).
const _: () = assert!(std::mem::size_of::<VolArgs>() == 4096);
const _: () = assert!(std::mem::size_of::<VolArgsV2>() == 4096);
const _: () = assert!(std::mem::offset_of!(VolArgsV2, name) == 56);
const _: () = assert!(std::mem::size_of::<InoLookupArgs>() == 4096);
const _: () = assert!(std::mem::size_of::<FsInfoArgs>() == 1024);
const _: () = assert!(std::mem::offset_of!(FsInfoArgs, fsid) == 16);

const BTRFS_IOC_SNAP_DESTROY: u32 = iow(15, std::mem::size_of::<VolArgs>());
const BTRFS_IOC_INO_LOOKUP: u32 = iowr(18, std::mem::size_of::<InoLookupArgs>());
const BTRFS_IOC_SNAP_CREATE_V2: u32 = iow(23, std::mem::size_of::<VolArgsV2>());
const BTRFS_IOC_SUBVOL_GETFLAGS: u32 = ior(25, std::mem::size_of::<u64>());
const BTRFS_IOC_FS_INFO: u32 = ior(31, std::mem::size_of::<FsInfoArgs>());

// Values printed by `linux/btrfs.h` on x86_64.
#[cfg(target_arch = "x86_64")]
const _: () = {
    assert!(BTRFS_IOC_SNAP_DESTROY == 0x5000_940f);
    assert!(BTRFS_IOC_INO_LOOKUP == 0xd000_9412);
    assert!(BTRFS_IOC_SNAP_CREATE_V2 == 0x5000_9417);
    assert!(BTRFS_IOC_SUBVOL_GETFLAGS == 0x8008_9419);
    assert!(BTRFS_IOC_FS_INFO == 0x8400_941f);
};

/// Copies `name` into a NUL-terminated fixed buffer; rejects names that do
/// not fit or contain NUL or `/`.
fn fill_name<const N: usize>(buf: &mut [u8; N], name: &str) -> io::Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= N || bytes.contains(&0) || bytes.contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid subvolume name {name:?}"),
        ));
    }
    buf[..bytes.len()].copy_from_slice(bytes);
    buf[bytes.len()] = 0;
    Ok(())
}

/// Turns a `-1` return of a libc call into the current `errno`.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `f_type` of `fstatfs(fd)`, truncated to 32 bits like the magic numbers.
pub fn statfs_type(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `st` is a valid, writable `struct statfs`; fd is open.
    check(unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatfs succeeded, so the kernel filled the struct (and it was
    // zero-initialised anyway, which is a valid `statfs`).
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as u32)
}

/// Subvolume (tree) id containing `fd` (`BTRFS_IOC_INO_LOOKUP`, treeid 0).
pub fn subvol_id(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut args = InoLookupArgs {
        treeid: 0,
        objectid: BTRFS_FIRST_FREE_OBJECTID,
        name: [0; BTRFS_INO_LOOKUP_PATH_MAX],
    };
    // SAFETY: the request number encodes `size_of::<InoLookupArgs>()`, and
    // `args` is a live, writable struct of exactly that layout.
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            BTRFS_IOC_INO_LOOKUP as libc::Ioctl,
            &mut args as *mut InoLookupArgs,
        )
    })?;
    Ok(args.treeid)
}

/// Filesystem UUID (`fsid`) from `BTRFS_IOC_FS_INFO`.
pub fn fs_uuid(fd: BorrowedFd<'_>) -> io::Result<[u8; 16]> {
    let mut args = FsInfoArgs {
        max_id: 0,
        num_devices: 0,
        fsid: [0; BTRFS_FSID_SIZE],
        nodesize: 0,
        sectorsize: 0,
        clone_alignment: 0,
        csum_type: 0,
        csum_size: 0,
        flags: 0,
        generation: 0,
        metadata_uuid: [0; BTRFS_FSID_SIZE],
        reserved: [0; 944],
    };
    // SAFETY: the request number encodes `size_of::<FsInfoArgs>()` (1024),
    // and `args` is a live, writable struct of exactly that layout.
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            BTRFS_IOC_FS_INFO as libc::Ioctl,
            &mut args as *mut FsInfoArgs,
        )
    })?;
    Ok(args.fsid)
}

/// Subvolume flags (`BTRFS_IOC_SUBVOL_GETFLAGS`); `fd` must be a subvolume root.
pub fn subvol_flags(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut flags: u64 = 0;
    // SAFETY: the request is `_IOR(.., u64)` and `flags` is a writable u64.
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            BTRFS_IOC_SUBVOL_GETFLAGS as libc::Ioctl,
            &mut flags as *mut u64,
        )
    })?;
    Ok(flags)
}

/// Creates a read-only snapshot of the subvolume `src` as `dest_dir/name`.
pub fn snap_create_ro(dest_dir: BorrowedFd<'_>, src: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let mut args = VolArgsV2 {
        fd: i64::from(src.as_raw_fd()),
        transid: 0,
        flags: BTRFS_SUBVOL_RDONLY,
        unused: [0; 4],
        name: [0; BTRFS_SUBVOL_NAME_MAX + 1],
    };
    fill_name(&mut args.name, name)?;
    // SAFETY: the request number encodes `size_of::<VolArgsV2>()` (4096);
    // `args` is a live struct of exactly that layout with a NUL-terminated name.
    check(unsafe {
        libc::ioctl(
            dest_dir.as_raw_fd(),
            BTRFS_IOC_SNAP_CREATE_V2 as libc::Ioctl,
            &mut args as *mut VolArgsV2,
        )
    })?;
    Ok(())
}

/// Deletes the subvolume `parent_dir/name` (`BTRFS_IOC_SNAP_DESTROY`).
pub fn snap_destroy(parent_dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let mut args = VolArgs {
        fd: 0,
        name: [0; BTRFS_PATH_NAME_MAX + 1],
    };
    fill_name(&mut args.name, name)?;
    // SAFETY: the request number encodes `size_of::<VolArgs>()` (4096);
    // `args` is a live struct of exactly that layout with a NUL-terminated name.
    check(unsafe {
        libc::ioctl(
            parent_dir.as_raw_fd(),
            BTRFS_IOC_SNAP_DESTROY as libc::Ioctl,
            &mut args as *mut VolArgs,
        )
    })?;
    Ok(())
}

// New mount API (linux/mount.h); defined here because libc's wrappers vary
// between versions. Syscall numbers come from libc.
const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;

/// Turns a raw syscall result that is a new file descriptor into an `OwnedFd`.
fn syscall_fd(ret: libc::c_long) -> io::Result<OwnedFd> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(ret).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fsconfig_string(fs: BorrowedFd<'_>, key: &str, value: &[u8]) -> io::Result<()> {
    let key = CString::new(key).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let value = CString::new(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: fsconfig(fd, FSCONFIG_SET_STRING, key, value, 0) reads two
    // NUL-terminated strings that live until the call returns.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_SET_STRING,
            key.as_ptr(),
            value.as_ptr(),
            0 as libc::c_int,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mounts the top-level subvolume (subvolid=5) of the btrfs on `device` as a
/// detached mount (no mount point, not in the mount table). Returns the
/// `O_PATH`-like mount fd.
pub fn mount_top_level_detached(device: &Path) -> io::Result<OwnedFd> {
    let fstype = c"btrfs";
    // SAFETY: fsopen reads a NUL-terminated string; returns a new fd or -1.
    let fs =
        syscall_fd(unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) })?;
    fsconfig_string(fs.as_fd(), "source", device.as_os_str().as_bytes())?;
    fsconfig_string(fs.as_fd(), "subvolid", b"5")?;
    // SAFETY: FSCONFIG_CMD_CREATE takes no key/value pointers (NULL, 0).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0 as libc::c_int,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fsmount(fs_fd, flags, attr_flags) takes plain integers and
    // returns a new fd or -1. No MOUNT_ATTR_RDONLY: we create snapshots there.
    syscall_fd(unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            fs.as_raw_fd(),
            FSMOUNT_CLOEXEC,
            0 as libc::c_uint,
        )
    })
}
