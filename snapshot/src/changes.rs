//! What changed between two read-only snapshots, at a cost that follows the
//! change rather than the size of the share.
//!
//! btrfs stamps every inode item with the transaction that last wrote it
//! (`transid`) and every btree block with the transaction that wrote the
//! block. A snapshot shares all blocks of its source; a later snapshot shares
//! every block that was not rewritten in between. [`changed_inodes`] runs
//! `BTRFS_IOC_TREE_SEARCH_V2` on the newer snapshot with `min_transid`, so the
//! kernel descends only into blocks written since then, and keeps the inode
//! items whose own `transid` is recent enough. Unchanged files are neither
//! read nor stat'ed.
//!
//! Semantics, as measured on a real filesystem (see `tests/changes.rs`):
//! - Everything in a snapshot with `otransid = T` was written in a
//!   transaction `<= T`, and every later change gets a transid `> T`: the
//!   exact set of inodes changed after that snapshot is
//!   `changed_inodes(newer, T + 1)`. `changed_inodes(newer, T)` additionally
//!   reports inodes last written in the snapshot's own transaction (just
//!   before it was taken): harmless false positives.
//! - Any change to an inode rewrites its inode item: data writes, truncate,
//!   chmod/chown, xattrs, timestamps, link count, and a rename (ctime). New
//!   inodes (including reflink copies) are new items. Directories show up
//!   when entries are added, removed or renamed in them.
//! - Not reported: deleted inodes (they are absent from the newer snapshot;
//!   their parent directories are reported), and descendants of a renamed
//!   directory (their paths changed, their inodes did not).
//! - atime updates on the share (relatime) rewrite inode items too, so
//!   reading a file can make it "changed"; mount shares with `noatime`.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::{ioctl_err, open_btrfs_dir, sys, Result, SnapshotError};

/// Generation facts of a subvolume (`BTRFS_IOC_GET_SUBVOL_INFO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubvolGenerations {
    /// Subvolume (tree) id.
    pub id: u64,
    /// Transaction that last wrote the subvolume's root node. Grows with
    /// every committed change of a writable subvolume; fixed for a read-only
    /// snapshot.
    pub generation: u64,
    /// Transaction in which the subvolume was created (for a snapshot: taken).
    pub otransid: u64,
    /// Transaction of the last change to the subvolume's contents. A snapshot
    /// inherits its source's value.
    pub ctransid: u64,
}

/// One inode whose inode item was written at or after a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangedInode {
    /// Inode number (btrfs objectid), unique within the subvolume.
    pub ino: u64,
    /// Transaction that created the inode.
    pub generation: u64,
    /// Transaction that last wrote the inode item.
    pub transid: u64,
    /// `st_mode`: file type and permission bits.
    pub mode: u32,
    /// Link count (0 for an unlinked file still open when the snapshot was taken).
    pub nlink: u32,
    /// Size in bytes.
    pub size: u64,
}

/// Most items one `BTRFS_IOC_TREE_SEARCH_V2` call may return.
const SEARCH_NR_ITEMS: u32 = 4096;
/// Size of `struct btrfs_inode_item` on disk (packed).
const INODE_ITEM_SIZE: usize = 160;

const OP_SEARCH: &str = "BTRFS_IOC_TREE_SEARCH_V2";
const OP_INO_PATHS: &str = "BTRFS_IOC_INO_PATHS";

fn malformed(op: &'static str, path: &Path, reason: String) -> SnapshotError {
    SnapshotError::Malformed {
        op,
        path: path.to_path_buf(),
        reason,
    }
}

/// Opens `path`, which must be the root directory of a btrfs subvolume.
fn open_subvol_root(path: &Path) -> Result<File> {
    let (file, meta) = open_btrfs_dir(path)?;
    if meta.ino() != sys::BTRFS_FIRST_FREE_OBJECTID {
        return Err(SnapshotError::NotSubvolume {
            path: path.to_path_buf(),
        });
    }
    Ok(file)
}

/// Generation numbers of the subvolume whose root is `path`.
pub fn subvol_generations(path: &Path) -> Result<SubvolGenerations> {
    let file = open_subvol_root(path)?;
    let info =
        sys::subvol_info(file.as_fd()).map_err(ioctl_err("BTRFS_IOC_GET_SUBVOL_INFO", path))?;
    Ok(SubvolGenerations {
        id: info.treeid,
        generation: info.generation,
        otransid: info.otransid,
        ctransid: info.ctransid,
    })
}

fn ne_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn ne_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Key of a btree item: (objectid, type, offset), ordered like btrfs keys.
type Key = (u64, u32, u64);

/// One item of a tree-search result.
#[derive(Debug, Clone, Copy)]
struct SearchItem<'a> {
    key: Key,
    data: &'a [u8],
}

/// Splits a tree-search buffer into its `count` items. Errors (never
/// panics) if the buffer is too short for what its headers claim.
fn parse_search_items(buf: &[u8], count: u32) -> std::result::Result<Vec<SearchItem<'_>>, String> {
    let mut items = Vec::new();
    let mut at = 0usize;
    for i in 0..count {
        let header = at
            .checked_add(sys::SEARCH_HEADER_SIZE)
            .and_then(|end| buf.get(at..end))
            .ok_or_else(|| format!("item {i} of {count}: header beyond the buffer"))?;
        let short = || format!("item {i} of {count}: short header");
        let objectid = ne_u64(header, 8).ok_or_else(short)?;
        let offset = ne_u64(header, 16).ok_or_else(short)?;
        let item_type = ne_u32(header, 24).ok_or_else(short)?;
        let len = ne_u32(header, 28).ok_or_else(short)?;
        let start = at + sys::SEARCH_HEADER_SIZE;
        let data = usize::try_from(len)
            .ok()
            .and_then(|len| start.checked_add(len))
            .and_then(|end| buf.get(start..end))
            .ok_or_else(|| format!("item {i} of {count}: {len} data bytes beyond the buffer"))?;
        items.push(SearchItem {
            key: (objectid, item_type, offset),
            data,
        });
        at = start + data.len();
    }
    Ok(items)
}

/// The smallest key strictly after `key`, carrying offset into type into
/// objectid; `None` after the largest key.
fn key_successor((objectid, item_type, offset): Key) -> Option<Key> {
    if let Some(offset) = offset.checked_add(1) {
        Some((objectid, item_type, offset))
    } else if item_type < u32::from(u8::MAX) {
        Some((objectid, item_type + 1, 0))
    } else {
        objectid.checked_add(1).map(|objectid| (objectid, 0, 0))
    }
}

/// Runs tree searches over `key`'s range until it is exhausted, calling
/// `each` for every item. `next_start` gives the key to continue from after
/// the last item of a batch (`None`: done). The search range is a linear
/// slice of the 136-bit key space, so items of other types inside it are
/// returned too.
fn search_all(
    fd: std::os::fd::BorrowedFd<'_>,
    path: &Path,
    mut key: sys::SearchKey,
    next_start: impl Fn(Key) -> Option<Key>,
    mut each: impl FnMut(&SearchItem<'_>) -> Result<()>,
) -> Result<()> {
    let mut search = sys::TreeSearch::new();
    loop {
        key.nr_items = SEARCH_NR_ITEMS;
        let (count, buf) = search
            .search(fd, &key)
            .map_err(ioctl_err(OP_SEARCH, path))?;
        if count == 0 {
            return Ok(());
        }
        let items = parse_search_items(buf, count).map_err(|r| malformed(OP_SEARCH, path, r))?;
        let start = (key.min_objectid, key.min_type, key.min_offset);
        for item in &items {
            each(item)?;
        }
        let Some(last) = items.last().map(|i| i.key) else {
            return Ok(());
        };
        // Guard against looping forever on a kernel that ignores the start.
        if last < start {
            return Err(malformed(
                OP_SEARCH,
                path,
                format!("item key {last:?} before the search start {start:?}"),
            ));
        }
        match next_start(last) {
            Some(next) if next <= (key.max_objectid, key.max_type, key.max_offset) => {
                (key.min_objectid, key.min_type, key.min_offset) = next;
            }
            _ => return Ok(()),
        }
    }
}

/// Every inode of the subvolume whose root is `path` (normally a read-only
/// snapshot) whose inode item has `transid >= since`, in inode-number order.
///
/// Only btree blocks written in transaction `since` or later are visited, so
/// the cost follows the amount of change, not the size of the subvolume. To
/// get the inodes changed after a snapshot with `otransid = T`, pass `T + 1`
/// (exact); `T` also reports inodes written in `T` itself, before the
/// snapshot. `since = 0` lists every inode. Needs `CAP_SYS_ADMIN`.
pub fn changed_inodes(path: &Path, since: u64) -> Result<Vec<ChangedInode>> {
    let file = open_subvol_root(path)?;
    let key = sys::SearchKey {
        tree_id: 0,
        min_objectid: sys::BTRFS_FIRST_FREE_OBJECTID,
        max_objectid: sys::BTRFS_LAST_FREE_OBJECTID,
        min_type: sys::BTRFS_INODE_ITEM_KEY,
        max_type: sys::BTRFS_INODE_ITEM_KEY,
        min_offset: 0,
        max_offset: u64::MAX,
        // Block generation: blocks shared with older snapshots are skipped.
        min_transid: since,
        max_transid: u64::MAX,
        ..sys::SearchKey::default()
    };
    // Inode items are (ino, INODE_ITEM, 0): after any key of inode `o`, the
    // next one of interest is (o, INODE_ITEM, 0) if still ahead, else that
    // of `o + 1`. This skips the rest of `o`'s items (refs, extents, ...).
    let next_inode_item = |(objectid, item_type, offset): Key| -> Option<Key> {
        if (item_type, offset) < (sys::BTRFS_INODE_ITEM_KEY, 0) {
            Some((objectid, sys::BTRFS_INODE_ITEM_KEY, 0))
        } else {
            objectid
                .checked_add(1)
                .map(|o| (o, sys::BTRFS_INODE_ITEM_KEY, 0))
        }
    };
    let mut out = Vec::new();
    search_all(file.as_fd(), path, key, next_inode_item, |item| {
        let (ino, item_type, _) = item.key;
        if item_type != sys::BTRFS_INODE_ITEM_KEY
            || !(sys::BTRFS_FIRST_FREE_OBJECTID..=sys::BTRFS_LAST_FREE_OBJECTID).contains(&ino)
        {
            return Ok(());
        }
        let d = item.data;
        if d.len() < INODE_ITEM_SIZE {
            return Err(malformed(
                OP_SEARCH,
                path,
                format!(
                    "inode item of {ino} has {} bytes, expected {INODE_ITEM_SIZE}",
                    d.len()
                ),
            ));
        }
        // Length checked above; the fallback only keeps this panic-free.
        let u64_at = |at| le_u64(d, at).unwrap_or(0);
        let u32_at = |at| le_u32(d, at).unwrap_or(0);
        let inode = ChangedInode {
            ino,
            generation: u64_at(0),
            transid: u64_at(8),
            size: u64_at(16),
            nlink: u32_at(40),
            mode: u32_at(52),
        };
        if inode.transid >= since {
            out.push(inode);
        }
        Ok(())
    })?;
    Ok(out)
}

/// Every path of inode `ino` (all hard links), relative to the root of the
/// subvolume at `subvol_path`. Empty if the inode does not exist there. The
/// root directory itself (inode 256) has the single path `""`.
/// Needs `CAP_DAC_READ_SEARCH` (`BTRFS_IOC_INO_PATHS`), and `CAP_SYS_ADMIN`
/// for files whose paths do not fit in the kernel's 4 KiB answer.
pub fn inode_paths(subvol_path: &Path, ino: u64) -> Result<Vec<PathBuf>> {
    let file = open_subvol_root(subvol_path)?;
    // The kernel answers ".." for the root (its back reference to itself).
    if ino == sys::BTRFS_FIRST_FREE_OBJECTID {
        return Ok(vec![PathBuf::new()]);
    }
    let raw = match sys::ino_paths(file.as_fd(), ino) {
        Ok(raw) => raw,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(Vec::new()),
        Err(e) => return Err(ioctl_err(OP_INO_PATHS, subvol_path)(e)),
    };
    let (paths, missed) =
        parse_data_container(&raw).map_err(|r| malformed(OP_INO_PATHS, subvol_path, r))?;
    if missed == 0 {
        return Ok(paths);
    }
    // The kernel caps the answer at 4096 bytes, so a bigger buffer cannot
    // help: read the inode's back references and resolve their directories.
    tracing::debug!(
        ino,
        missed,
        "INO_PATHS answer truncated; reading inode refs"
    );
    paths_from_refs(file.as_fd(), subvol_path, ino)
}

/// Parses a `struct btrfs_data_container` of paths (native byte order;
/// `val[i]` are offsets from `&val[0]` of NUL-terminated strings). Returns
/// the paths and `elem_missed`.
fn parse_data_container(raw: &[u8]) -> std::result::Result<(Vec<PathBuf>, u32), String> {
    const VAL: usize = 16;
    let short = || "container header beyond the buffer".to_string();
    let elem_cnt = ne_u32(raw, 8).ok_or_else(short)?;
    let elem_missed = ne_u32(raw, 12).ok_or_else(short)?;
    let vals = raw.get(VAL..).ok_or_else(short)?;
    let mut paths = Vec::new();
    for i in 0..elem_cnt as usize {
        let off = i
            .checked_mul(8)
            .and_then(|at| ne_u64(vals, at))
            .ok_or_else(|| format!("offset {i} of {elem_cnt} beyond the buffer"))?;
        let s = usize::try_from(off)
            .ok()
            .and_then(|off| vals.get(off..))
            .ok_or_else(|| format!("path {i} at {off} beyond the buffer"))?;
        let len = s
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| format!("path {i} at {off} is not NUL-terminated"))?;
        paths.push(PathBuf::from(OsStr::from_bytes(&s[..len])));
    }
    Ok((paths, elem_missed))
}

/// Paths of `ino` from its `INODE_REF` and `INODE_EXTREF` items: each names
/// a parent directory and an entry name; the directory's path comes from
/// `BTRFS_IOC_INO_LOOKUP`.
fn paths_from_refs(fd: std::os::fd::BorrowedFd<'_>, path: &Path, ino: u64) -> Result<Vec<PathBuf>> {
    let key = sys::SearchKey {
        tree_id: 0,
        min_objectid: ino,
        max_objectid: ino,
        min_type: sys::BTRFS_INODE_REF_KEY,
        max_type: sys::BTRFS_INODE_EXTREF_KEY,
        min_offset: 0,
        max_offset: u64::MAX,
        min_transid: 0,
        max_transid: u64::MAX,
        ..sys::SearchKey::default()
    };
    let mut links: Vec<(u64, Vec<u8>)> = Vec::new();
    search_all(fd, path, key, key_successor, |item| {
        let (objectid, item_type, offset) = item.key;
        if objectid != ino {
            return Ok(());
        }
        let parsed = match item_type {
            sys::BTRFS_INODE_REF_KEY => parse_inode_refs(item.data, offset),
            sys::BTRFS_INODE_EXTREF_KEY => parse_inode_extrefs(item.data),
            _ => return Ok(()),
        };
        links.extend(parsed.map_err(|r| malformed(OP_SEARCH, path, format!("inode {ino}: {r}")))?);
        Ok(())
    })?;
    let mut out = Vec::with_capacity(links.len());
    for (parent, name) in links {
        let mut full =
            sys::ino_lookup_path(fd, parent).map_err(ioctl_err("BTRFS_IOC_INO_LOOKUP", path))?;
        full.extend_from_slice(&name);
        out.push(PathBuf::from(OsStr::from_bytes(&full)));
    }
    Ok(out)
}

/// `struct btrfs_inode_ref {le64 index; le16 name_len; name}` repeated; the
/// parent directory is the key offset.
fn parse_inode_refs(data: &[u8], parent: u64) -> std::result::Result<Vec<(u64, Vec<u8>)>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        let name_len = le_u16(data, at + 8).ok_or("short inode ref")?;
        let start = at + 10;
        let name = data
            .get(start..start + usize::from(name_len))
            .ok_or("inode ref name beyond the item")?;
        out.push((parent, name.to_vec()));
        at = start + name.len();
    }
    Ok(out)
}

/// `struct btrfs_inode_extref {le64 parent_objectid; le64 index; le16
/// name_len; name}` repeated.
fn parse_inode_extrefs(data: &[u8]) -> std::result::Result<Vec<(u64, Vec<u8>)>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        let parent = le_u64(data, at).ok_or("short inode extref")?;
        let name_len = le_u16(data, at + 16).ok_or("short inode extref")?;
        let start = at + 18;
        let name = data
            .get(start..start + usize::from(name_len))
            .ok_or("inode extref name beyond the item")?;
        out.push((parent, name.to_vec()));
        at = start + name.len();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(objectid: u64, item_type: u32, offset: u64, len: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&7u64.to_ne_bytes());
        h.extend_from_slice(&objectid.to_ne_bytes());
        h.extend_from_slice(&offset.to_ne_bytes());
        h.extend_from_slice(&item_type.to_ne_bytes());
        h.extend_from_slice(&len.to_ne_bytes());
        h
    }

    #[test]
    fn search_items_parse_and_reject_short_buffers() {
        let mut buf = header(300, 1, 0, 3);
        buf.extend_from_slice(b"abc");
        buf.extend_from_slice(&header(300, 12, 256, 0));
        let items = parse_search_items(&buf, 2).expect("parse");
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].key, (300, 1, 0));
        assert_eq!(items[0].data, b"abc");
        assert_eq!(items[1].key, (300, 12, 256));
        assert!(items[1].data.is_empty());
        // More items claimed than present, truncated data, huge length.
        assert!(parse_search_items(&buf, 3).is_err());
        assert!(parse_search_items(&buf[..34], 1).is_err());
        assert!(parse_search_items(&buf[..10], 1).is_err());
        let huge = header(1, 1, 0, u32::MAX);
        assert!(parse_search_items(&huge, 1).is_err());
        assert!(parse_search_items(&[], 0).expect("empty").is_empty());
    }

    #[test]
    fn successor_carries() {
        assert_eq!(key_successor((5, 1, 0)), Some((5, 1, 1)));
        assert_eq!(key_successor((5, 1, u64::MAX)), Some((5, 2, 0)));
        assert_eq!(key_successor((5, 255, u64::MAX)), Some((6, 0, 0)));
        assert_eq!(key_successor((u64::MAX, 255, u64::MAX)), None);
    }

    #[test]
    fn data_container_parse() {
        let mut raw = Vec::new();
        raw.extend_from_slice(&0u32.to_ne_bytes()); // bytes_left
        raw.extend_from_slice(&0u32.to_ne_bytes()); // bytes_missing
        raw.extend_from_slice(&2u32.to_ne_bytes()); // elem_cnt
        raw.extend_from_slice(&1u32.to_ne_bytes()); // elem_missed
        raw.extend_from_slice(&16u64.to_ne_bytes());
        raw.extend_from_slice(&20u64.to_ne_bytes());
        raw.extend_from_slice(b"a/b\0c\0");
        let (paths, missed) = parse_data_container(&raw).expect("parse");
        assert_eq!(paths, vec![PathBuf::from("a/b"), PathBuf::from("c")]);
        assert_eq!(missed, 1);
        // Missing NUL, offset out of range, short header: errors, no panic.
        assert!(parse_data_container(&raw[..raw.len() - 1]).is_err());
        let mut bad = raw.clone();
        bad[16..24].copy_from_slice(&u64::MAX.to_ne_bytes());
        assert!(parse_data_container(&bad).is_err());
        assert!(parse_data_container(&raw[..10]).is_err());
        let mut many = raw.clone();
        many[8..12].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(parse_data_container(&many).is_err());
    }

    #[test]
    fn inode_refs_parse() {
        let mut d = Vec::new();
        d.extend_from_slice(&2u64.to_le_bytes());
        d.extend_from_slice(&3u16.to_le_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&3u64.to_le_bytes());
        d.extend_from_slice(&1u16.to_le_bytes());
        d.extend_from_slice(b"x");
        assert_eq!(
            parse_inode_refs(&d, 300).expect("refs"),
            vec![(300, b"abc".to_vec()), (300, b"x".to_vec())]
        );
        assert!(parse_inode_refs(&d[..d.len() - 1], 300).is_err());
        assert!(parse_inode_refs(&d[..5], 300).is_err());

        let mut e = Vec::new();
        e.extend_from_slice(&400u64.to_le_bytes());
        e.extend_from_slice(&9u64.to_le_bytes());
        e.extend_from_slice(&2u16.to_le_bytes());
        e.extend_from_slice(b"hi");
        assert_eq!(
            parse_inode_extrefs(&e).expect("extrefs"),
            vec![(400, b"hi".to_vec())]
        );
        assert!(parse_inode_extrefs(&e[..e.len() - 1]).is_err());
        assert!(parse_inode_extrefs(&e[..17]).is_err());
    }

    #[test]
    fn errors_on_non_btrfs_paths() {
        assert!(changed_inodes(Path::new("/proc"), 0).is_err());
        assert!(inode_paths(Path::new("/nonexistent/x"), 300).is_err());
        assert!(subvol_generations(Path::new("/proc")).is_err());
    }
}
