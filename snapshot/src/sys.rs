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
const BTRFS_VOL_NAME_MAX: usize = 255;
const BTRFS_UUID_SIZE: usize = 16;

/// `BTRFS_LAST_FREE_OBJECTID`: highest objectid of an ordinary inode.
pub const BTRFS_LAST_FREE_OBJECTID: u64 = -256i64 as u64;
/// `BTRFS_INODE_ITEM_KEY`.
pub const BTRFS_INODE_ITEM_KEY: u32 = 1;
/// `BTRFS_INODE_REF_KEY`.
pub const BTRFS_INODE_REF_KEY: u32 = 12;
/// `BTRFS_INODE_EXTREF_KEY`.
pub const BTRFS_INODE_EXTREF_KEY: u32 = 13;
/// Bytes of the result buffer of one `BTRFS_IOC_TREE_SEARCH_V2` call.
pub const SEARCH_BUF_SIZE: usize = 1 << 20;
/// Size of `struct btrfs_ioctl_search_header`, which precedes every item in
/// the search buffer.
pub const SEARCH_HEADER_SIZE: usize = 32;
/// The kernel caps the `BTRFS_IOC_INO_PATHS` result at 4096 bytes
/// (`min_t(u32, ipa->size, 4096)` in `btrfs_ioctl_ino_to_path`).
pub const INO_PATHS_BUF_SIZE: usize = 4096;

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

/// `struct btrfs_ioctl_search_key`. All `unused*` fields must be zero.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SearchKey {
    /// 0: the subvolume tree of the fd the ioctl is called on.
    pub tree_id: u64,
    pub min_objectid: u64,
    pub max_objectid: u64,
    pub min_offset: u64,
    pub max_offset: u64,
    /// Filters by the generation of the btree *block* holding an item, not
    /// by anything stored in the item.
    pub min_transid: u64,
    pub max_transid: u64,
    pub min_type: u32,
    pub max_type: u32,
    /// In: most items wanted. Out: items returned.
    pub nr_items: u32,
    pub unused: u32,
    pub unused1: u64,
    pub unused2: u64,
    pub unused3: u64,
    pub unused4: u64,
}

/// `struct btrfs_ioctl_search_args_v2` with its flexible `buf[]` given a
/// fixed size. The request number encodes only the size of the fixed part.
#[repr(C)]
struct SearchArgsV2 {
    key: SearchKey,
    buf_size: u64,
    buf: [u8; SEARCH_BUF_SIZE],
}

/// `struct btrfs_ioctl_timespec`.
#[repr(C)]
struct IoctlTimespec {
    sec: u64,
    nsec: u32,
}

/// `struct btrfs_ioctl_get_subvol_info_args`.
#[repr(C)]
struct GetSubvolInfoArgs {
    treeid: u64,
    name: [u8; BTRFS_VOL_NAME_MAX + 1],
    parent_id: u64,
    dirid: u64,
    generation: u64,
    flags: u64,
    uuid: [u8; BTRFS_UUID_SIZE],
    parent_uuid: [u8; BTRFS_UUID_SIZE],
    received_uuid: [u8; BTRFS_UUID_SIZE],
    ctransid: u64,
    otransid: u64,
    stransid: u64,
    rtransid: u64,
    ctime: IoctlTimespec,
    otime: IoctlTimespec,
    stime: IoctlTimespec,
    rtime: IoctlTimespec,
    reserved: [u64; 8],
}

/// `struct btrfs_ioctl_ino_path_args`; `fspath` is a user pointer to a
/// `struct btrfs_data_container` of `size` bytes.
#[repr(C)]
struct InoPathArgs {
    inum: u64,
    size: u64,
    reserved: [u64; 4],
    fspath: u64,
}

// Sizes as in linux/btrfs.h (checked with a C program on this machine).
const _: () = assert!(std::mem::size_of::<VolArgs>() == 4096);
const _: () = assert!(std::mem::size_of::<VolArgsV2>() == 4096);
const _: () = assert!(std::mem::offset_of!(VolArgsV2, name) == 56);
const _: () = assert!(std::mem::size_of::<InoLookupArgs>() == 4096);
const _: () = assert!(std::mem::size_of::<FsInfoArgs>() == 1024);
const _: () = assert!(std::mem::offset_of!(FsInfoArgs, fsid) == 16);
const _: () = assert!(std::mem::size_of::<SearchKey>() == 104);
const _: () = assert!(std::mem::offset_of!(SearchKey, min_type) == 56);
const _: () = assert!(std::mem::offset_of!(SearchKey, nr_items) == 64);
const _: () = assert!(std::mem::offset_of!(SearchArgsV2, buf) == 112);
const _: () = assert!(std::mem::size_of::<IoctlTimespec>() == 16);
const _: () = assert!(std::mem::size_of::<GetSubvolInfoArgs>() == 504);
const _: () = assert!(std::mem::offset_of!(GetSubvolInfoArgs, generation) == 280);
const _: () = assert!(std::mem::offset_of!(GetSubvolInfoArgs, ctransid) == 344);
const _: () = assert!(std::mem::offset_of!(GetSubvolInfoArgs, otransid) == 352);
const _: () = assert!(std::mem::offset_of!(GetSubvolInfoArgs, ctime) == 376);
const _: () = assert!(std::mem::size_of::<InoPathArgs>() == 56);

const BTRFS_IOC_SNAP_DESTROY: u32 = iow(15, std::mem::size_of::<VolArgs>());
const BTRFS_IOC_INO_LOOKUP: u32 = iowr(18, std::mem::size_of::<InoLookupArgs>());
const BTRFS_IOC_SNAP_CREATE_V2: u32 = iow(23, std::mem::size_of::<VolArgsV2>());
const BTRFS_IOC_SUBVOL_CREATE_V2: u32 = iow(24, std::mem::size_of::<VolArgsV2>());
const BTRFS_IOC_SUBVOL_GETFLAGS: u32 = ior(25, std::mem::size_of::<u64>());
const BTRFS_IOC_FS_INFO: u32 = ior(31, std::mem::size_of::<FsInfoArgs>());
const BTRFS_IOC_TREE_SEARCH_V2: u32 = iowr(
    17,
    std::mem::size_of::<SearchKey>() + std::mem::size_of::<u64>(),
);
const BTRFS_IOC_INO_PATHS: u32 = iowr(35, std::mem::size_of::<InoPathArgs>());
const BTRFS_IOC_GET_SUBVOL_INFO: u32 = ior(60, std::mem::size_of::<GetSubvolInfoArgs>());

// Values printed by `linux/btrfs.h` on x86_64.
#[cfg(target_arch = "x86_64")]
const _: () = {
    assert!(BTRFS_IOC_SNAP_DESTROY == 0x5000_940f);
    assert!(BTRFS_IOC_INO_LOOKUP == 0xd000_9412);
    assert!(BTRFS_IOC_SNAP_CREATE_V2 == 0x5000_9417);
    assert!(BTRFS_IOC_SUBVOL_GETFLAGS == 0x8008_9419);
    assert!(BTRFS_IOC_FS_INFO == 0x8400_941f);
    assert!(BTRFS_IOC_TREE_SEARCH_V2 == 0xc070_9411);
    assert!(BTRFS_IOC_INO_PATHS == 0xc038_9423);
    assert!(BTRFS_IOC_GET_SUBVOL_INFO == 0x81f8_943c);
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

/// Creates an empty subvolume `dir/name` (`BTRFS_IOC_SUBVOL_CREATE_V2`).
pub fn subvol_create(dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let mut args = VolArgsV2 {
        fd: 0,
        transid: 0,
        flags: 0,
        unused: [0; 4],
        name: [0; BTRFS_SUBVOL_NAME_MAX + 1],
    };
    fill_name(&mut args.name, name)?;
    // SAFETY: as in snap_create_ro: the request number encodes the size of
    // `VolArgsV2`, and `args` is a live struct of that layout.
    check(unsafe {
        libc::ioctl(
            dir.as_raw_fd(),
            BTRFS_IOC_SUBVOL_CREATE_V2 as libc::Ioctl,
            &mut args as *mut VolArgsV2,
        )
    })?;
    Ok(())
}

/// Takes a read lease on `fd` (`F_SETLEASE F_RDLCK`). Fails with EAGAIN
/// when any process has the file open for writing; while held, an open
/// for writing waits until it is released.
pub fn read_lease(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl with F_SETLEASE takes an int argument; fd is open.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) })?;
    Ok(())
}

/// Ignores SIGIO, which the kernel sends a lease holder when a writer
/// breaks its lease (default action: terminate the process). btrship's
/// leases last a clone's length and are released without being told.
pub fn ignore_sigio() {
    // SAFETY: installs the SIG_IGN disposition; no handler code runs.
    unsafe {
        libc::signal(libc::SIGIO, libc::SIG_IGN);
    }
}

/// Releases a lease taken with [`read_lease`].
pub fn release_lease(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: as in read_lease.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) })?;
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

/// Generation numbers of a subvolume, from `BTRFS_IOC_GET_SUBVOL_INFO`.
#[derive(Debug, Clone, Copy)]
pub struct SubvolInfo {
    pub treeid: u64,
    pub generation: u64,
    pub ctransid: u64,
    pub otransid: u64,
}

/// `BTRFS_IOC_GET_SUBVOL_INFO` for the subvolume containing `fd` (any inode
/// of it; no privilege needed).
pub fn subvol_info(fd: BorrowedFd<'_>) -> io::Result<SubvolInfo> {
    let zero_time = || IoctlTimespec { sec: 0, nsec: 0 };
    let mut args = GetSubvolInfoArgs {
        treeid: 0,
        name: [0; BTRFS_VOL_NAME_MAX + 1],
        parent_id: 0,
        dirid: 0,
        generation: 0,
        flags: 0,
        uuid: [0; BTRFS_UUID_SIZE],
        parent_uuid: [0; BTRFS_UUID_SIZE],
        received_uuid: [0; BTRFS_UUID_SIZE],
        ctransid: 0,
        otransid: 0,
        stransid: 0,
        rtransid: 0,
        ctime: zero_time(),
        otime: zero_time(),
        stime: zero_time(),
        rtime: zero_time(),
        reserved: [0; 8],
    };
    // SAFETY: the request number encodes `size_of::<GetSubvolInfoArgs>()`
    // (504), and `args` is a live, writable struct of exactly that layout.
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            BTRFS_IOC_GET_SUBVOL_INFO as libc::Ioctl,
            &mut args as *mut GetSubvolInfoArgs,
        )
    })?;
    Ok(SubvolInfo {
        treeid: args.treeid,
        generation: args.generation,
        ctransid: args.ctransid,
        otransid: args.otransid,
    })
}

/// A reusable `BTRFS_IOC_TREE_SEARCH_V2` argument with a
/// [`SEARCH_BUF_SIZE`] result buffer on the heap.
pub struct TreeSearch {
    args: Box<SearchArgsV2>,
}

impl TreeSearch {
    pub fn new() -> TreeSearch {
        // SAFETY: `SearchArgsV2` holds only integers and byte arrays, for
        // which all-zero bytes are a valid value.
        let args = unsafe { Box::<SearchArgsV2>::new_zeroed().assume_init() };
        TreeSearch { args }
    }

    /// One search for `key` (needs `CAP_SYS_ADMIN`). Returns the number of
    /// items found and the result buffer: that many
    /// `struct btrfs_ioctl_search_header` (native byte order), each followed
    /// by its item (on-disk, little-endian), packed from the start.
    pub fn search(&mut self, fd: BorrowedFd<'_>, key: &SearchKey) -> io::Result<(u32, &[u8])> {
        self.args.key = *key;
        self.args.buf_size = SEARCH_BUF_SIZE as u64;
        // SAFETY: the request number encodes the size of the fixed part (key
        // and buf_size, 112 bytes); `buf` of `buf_size` bytes follows it in
        // the same live, writable allocation, and the kernel writes at most
        // `buf_size` bytes there.
        check(unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                BTRFS_IOC_TREE_SEARCH_V2 as libc::Ioctl,
                &mut *self.args as *mut SearchArgsV2,
            )
        })?;
        Ok((self.args.key.nr_items, &self.args.buf[..]))
    }
}

/// `BTRFS_IOC_INO_PATHS` for inode `inum` of the subvolume containing `fd`
/// (needs `CAP_DAC_READ_SEARCH`). Returns the raw
/// `struct btrfs_data_container` of [`INO_PATHS_BUF_SIZE`] bytes in native
/// byte order; the kernel has turned `val[i]` into offsets from `&val[0]`.
pub fn ino_paths(fd: BorrowedFd<'_>, inum: u64) -> io::Result<Vec<u8>> {
    // u64 words: the container is 8-byte aligned like the kernel's.
    let mut container = vec![0u64; INO_PATHS_BUF_SIZE / 8];
    let mut args = InoPathArgs {
        inum,
        size: INO_PATHS_BUF_SIZE as u64,
        reserved: [0; 4],
        fspath: container.as_mut_ptr() as usize as u64,
    };
    // SAFETY: the request number encodes `size_of::<InoPathArgs>()` (56) and
    // `args` is a live struct of that layout; `fspath` points to a live,
    // writable buffer of `size` bytes that outlives the call, and the kernel
    // writes at most `size` bytes there.
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            BTRFS_IOC_INO_PATHS as libc::Ioctl,
            &mut args as *mut InoPathArgs,
        )
    })?;
    Ok(container.iter().flat_map(|w| w.to_ne_bytes()).collect())
}

/// Path of directory `dirid` relative to the root of the subvolume
/// containing `fd` (`BTRFS_IOC_INO_LOOKUP`, needs `CAP_SYS_ADMIN`): empty
/// for the root itself, otherwise ending in `/`.
pub fn ino_lookup_path(fd: BorrowedFd<'_>, dirid: u64) -> io::Result<Vec<u8>> {
    let mut args = InoLookupArgs {
        treeid: 0,
        objectid: dirid,
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
    let len = args.name.iter().position(|&b| b == 0).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "BTRFS_IOC_INO_LOOKUP path is not NUL-terminated",
        )
    })?;
    Ok(args.name[..len].to_vec())
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

// fanotify, file handles and FICLONE (used by the `watch` module).

/// `struct file_handle` header (`handle_bytes`, `handle_type`) followed by
/// room for the largest handle (`MAX_HANDLE_SZ` bytes), 4-byte aligned like
/// the kernel's.
#[repr(C)]
struct FileHandleBuf {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_SZ],
}

const MAX_HANDLE_SZ: usize = 128;
const _: () = assert!(MAX_HANDLE_SZ == libc::MAX_HANDLE_SZ as usize);
const _: () = assert!(std::mem::size_of::<libc::file_handle>() == 8);
const _: () = assert!(std::mem::offset_of!(FileHandleBuf, f_handle) == 8);

/// `fanotify_init(flags, event_f_flags)`.
pub fn fanotify_init(flags: libc::c_uint, event_f_flags: libc::c_uint) -> io::Result<OwnedFd> {
    // SAFETY: fanotify_init takes two integers and returns a new fd or -1.
    let fd = check(unsafe { libc::fanotify_init(flags, event_f_flags) })?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fanotify_mark(fan, flags, mask, dirfd, path)`.
pub fn fanotify_mark(
    fan: BorrowedFd<'_>,
    flags: libc::c_uint,
    mask: u64,
    dirfd: BorrowedFd<'_>,
    path: &std::ffi::CStr,
) -> io::Result<()> {
    // SAFETY: both fds are open; `path` is NUL-terminated and outlives the
    // call; the kernel only reads it.
    check(unsafe {
        libc::fanotify_mark(
            fan.as_raw_fd(),
            flags,
            mask,
            dirfd.as_raw_fd(),
            path.as_ptr(),
        )
    })?;
    Ok(())
}

/// `name_to_handle_at(AT_FDCWD, path, .., 0)`: the file handle of `path`
/// as `(handle_type, handle bytes)`.
pub fn name_to_handle(path: &Path) -> io::Result<(i32, Vec<u8>)> {
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut fh = FileHandleBuf {
        handle_bytes: MAX_HANDLE_SZ as u32,
        handle_type: 0,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `cpath` is NUL-terminated; `fh` is a live, writable
    // `struct file_handle` whose `handle_bytes` says how much room follows
    // the header (the kernel writes at most that much, else EOVERFLOW);
    // `mount_id` is a writable int.
    check(unsafe {
        libc::name_to_handle_at(
            libc::AT_FDCWD,
            cpath.as_ptr(),
            &mut fh as *mut FileHandleBuf as *mut libc::file_handle,
            &mut mount_id,
            0,
        )
    })?;
    let len = (fh.handle_bytes as usize).min(MAX_HANDLE_SZ);
    Ok((fh.handle_type, fh.f_handle[..len].to_vec()))
}

/// `open_by_handle_at(mount_fd, handle, flags)` (needs
/// `CAP_DAC_READ_SEARCH`). `O_CLOEXEC` is always added.
pub fn open_by_handle(
    mount_fd: BorrowedFd<'_>,
    handle_type: i32,
    handle: &[u8],
    flags: libc::c_int,
) -> io::Result<OwnedFd> {
    if handle.len() > MAX_HANDLE_SZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "file handle longer than MAX_HANDLE_SZ",
        ));
    }
    let mut fh = FileHandleBuf {
        handle_bytes: handle.len() as u32,
        handle_type,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    fh.f_handle[..handle.len()].copy_from_slice(handle);
    // SAFETY: `fh` is a live `struct file_handle` with `handle_bytes` valid
    // bytes following the header; the kernel only reads it. Returns a new
    // fd or -1.
    let fd = check(unsafe {
        libc::open_by_handle_at(
            mount_fd.as_raw_fd(),
            &mut fh as *mut FileHandleBuf as *mut libc::file_handle,
            flags | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits up to `timeout_ms` (-1: forever) for `fd` to become readable.
/// Returns `Ok(false)` on timeout or when a signal interrupted the wait.
pub fn poll_readable(fd: BorrowedFd<'_>, timeout_ms: libc::c_int) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one live, writable `struct pollfd`, and nfds is 1.
    let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(ret > 0)
}

/// Closes an fd the kernel put into a fanotify event (fd-mode events only;
/// FID-mode groups always report `FAN_NOFD`).
pub fn close_event_fd(fd: libc::c_int) {
    if fd >= 0 {
        // SAFETY: a well-formed fanotify event with fd >= 0 carries a new fd
        // that the kernel installed for the reader, which owns it; nothing
        // else in this process knows the number yet.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

/// `ioctl(dst, FICLONE, src)`: makes `dst` share all of `src`'s extents.
pub fn ficlone(dst: BorrowedFd<'_>, src: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: FICLONE takes the source fd as a plain int argument; both fds
    // are open.
    check(unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) })?;
    Ok(())
}

/// `struct open_how` from `linux/openat2.h` (extensible; this is version 0).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}
const _: () = assert!(std::mem::size_of::<OpenHow>() == 24);

/// `openat2(dir, path, { flags | O_CLOEXEC, 0, resolve })`. `path` must not
/// contain NUL.
pub fn openat2(
    dir: BorrowedFd<'_>,
    path: &[u8],
    flags: libc::c_int,
    resolve: u64,
) -> io::Result<OwnedFd> {
    let cpath = CString::new(path).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u32 as u64,
        mode: 0,
        resolve,
    };
    // SAFETY: `cpath` is NUL-terminated; `how` is a live `struct open_how`
    // whose size is passed along (the kernel only reads it). Returns a new
    // fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            cpath.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd)
        .map_err(|_| io::Error::other("openat2 returned an fd out of range"))?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `readlinkat(fd, "")`: the target of the symlink that `fd` (opened with
/// `O_PATH | O_NOFOLLOW`) refers to.
pub fn readlink_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: the path is the empty C string; `buf` is writable for
        // `buf.len()` bytes and the kernel writes at most that many.
        let n = unsafe {
            libc::readlinkat(
                fd.as_raw_fd(),
                c"".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n < buf.len() {
            buf.truncate(n);
            return Ok(buf);
        }
        if buf.len() >= 1 << 16 {
            return Err(io::Error::other("symlink target longer than 64 KiB"));
        }
        let len = buf.len() * 2;
        buf.resize(len, 0);
    }
}
