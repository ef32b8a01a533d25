//! `extent_map` on the temporary directory's filesystem (ext4 or btrfs
//! here; FIEMAP works on both). Skips, with a note, where FIEMAP is not
//! supported (tmpfs).

use std::fs::File;
use std::io::Write;
use std::path::Path;

use btrship_diff::{
    changed_ranges, extent_map, FileExtent, FIEMAP_EXTENT_DELALLOC, FIEMAP_EXTENT_LAST,
    FIEMAP_EXTENT_UNKNOWN,
};
use rand::{RngCore, SeedableRng};

/// The map, or None when the filesystem has no FIEMAP.
fn map(path: &Path) -> Option<Vec<FileExtent>> {
    let f = File::open(path).unwrap();
    match extent_map(&f, path) {
        Ok(m) => Some(m),
        Err(btrship_diff::DiffError::Io { source, .. })
            if source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
        {
            eprintln!("FIEMAP not supported here; skipped");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn write_synced(path: &Path, data: &[u8]) {
    let mut f = File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// Logical bytes in `[0, size)` covered by the map's extents.
fn covered(m: &[FileExtent], size: u64) -> u64 {
    let mut v: Vec<(u64, u64)> = m
        .iter()
        .map(|e| (e.logical.min(size), (e.logical + e.length).min(size)))
        .collect();
    v.sort();
    let (mut total, mut end) = (0, 0);
    for (a, b) in v {
        let a = a.max(end);
        if b > a {
            total += b - a;
            end = b;
        }
    }
    total
}

#[test]
fn a_written_file_is_mapped_and_an_empty_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("one-mib");
    let mut data = vec![0u8; 1 << 20];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut data);
    write_synced(&p, &data);
    let Some(m) = map(&p) else { return };
    assert!(!m.is_empty());
    assert_eq!(covered(&m, 1 << 20), 1 << 20, "{m:?}");
    assert!(m.windows(2).all(|w| w[0].logical < w[1].logical));
    assert!(m.last().unwrap().flags & FIEMAP_EXTENT_LAST != 0, "{m:?}");
    for e in &m {
        assert_eq!(
            e.flags & (FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_UNKNOWN),
            0
        );
        assert!(e.physical > 0 && e.length > 0);
    }
    // The same file mapped twice diffs to nothing.
    let again = map(&p).unwrap();
    assert_eq!(changed_ranges(&m, 1 << 20, &again, 1 << 20), vec![]);

    let e = dir.path().join("empty");
    write_synced(&e, b"");
    assert_eq!(map(&e).unwrap(), vec![]);
}

#[test]
fn delalloc_is_synced_before_mapping() {
    // Written without fsync: FIEMAP_FLAG_SYNC flushes it, so no extent is
    // left delayed.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("dirty");
    std::fs::write(&p, vec![0xabu8; 300_000]).unwrap();
    let Some(m) = map(&p) else { return };
    assert_eq!(covered(&m, 300_000), 300_000, "{m:?}");
    for e in &m {
        assert_eq!(e.flags & FIEMAP_EXTENT_DELALLOC, 0, "{m:?}");
    }
}

#[test]
fn holes_are_absent_and_many_extents_are_all_reported() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("sparse");
    // 3000 separate 4 KiB blocks with holes between: more than one ioctl's
    // worth of extents (1024).
    let f = File::create(&p).unwrap();
    use std::os::unix::fs::FileExt;
    let block = [1u8; 4096];
    for i in 0..3000u64 {
        f.write_all_at(&block, i * 3 * 4096).unwrap();
    }
    f.sync_all().unwrap();
    let size = f.metadata().unwrap().len();
    let Some(m) = map(&p) else { return };
    assert_eq!(covered(&m, size), 3000 * 4096, "{} extents", m.len());
    assert!(m.len() >= 3000, "{} extents", m.len());
    assert!(m
        .windows(2)
        .all(|w| w[0].logical + w[0].length <= w[1].logical));
    // Holes in both versions: unchanged.
    assert_eq!(changed_ranges(&m, size, &m, size), vec![]);
}
