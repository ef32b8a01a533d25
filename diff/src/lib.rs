//! What changed, and what a file is made of: reading entries of a (read-only
//! snapshot) tree — metadata, extended attributes, symlink targets — and
//! splitting file data into content-defined chunks, region by region, so
//! holes stay holes.
//!
//! Reading a whole file is the fallback. When the previous version of a file
//! is in an older snapshot, [`extent_map`] of both versions and
//! [`changed_ranges`] name the bytes that may differ without reading data,
//! and [`rechunk`] reads only the chunks around those bytes, reusing the old
//! chunk list elsewhere, with exactly the boundaries [`chunk_file`] would
//! give.
//!
//! Modules: `extents` (the FIEMAP ioctl), `changed` (comparing two maps),
//! `rechunk` (incremental chunking); their items are re-exported here.

use bytes::Bytes;
use std::cell::Cell;
use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod changed;
mod extents;
mod rechunk;

pub use changed::changed_ranges;
pub use extents::{
    extent_map, FileExtent, FIEMAP_EXTENT_DATA_ENCRYPTED, FIEMAP_EXTENT_DATA_INLINE,
    FIEMAP_EXTENT_DATA_TAIL, FIEMAP_EXTENT_DELALLOC, FIEMAP_EXTENT_ENCODED, FIEMAP_EXTENT_LAST,
    FIEMAP_EXTENT_MERGED, FIEMAP_EXTENT_NOT_ALIGNED, FIEMAP_EXTENT_SHARED, FIEMAP_EXTENT_UNKNOWN,
    FIEMAP_EXTENT_UNWRITTEN,
};
pub use rechunk::{rechunk, OldChunk, Piece, RechunkStats};

#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Chunk sizes outside what the chunker supports (min 64 B..1 MiB,
    /// avg 256 B..4 MiB, max 1 KiB..16 MiB).
    #[error("unsupported chunk sizes: min {min}, avg {avg}, max {max}")]
    ChunkSizes { min: u32, avg: u32, max: u32 },
}

impl DiffError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DiffError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, DiffError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl FileKind {
    /// The kind of a file type as `stat` reports it.
    pub fn of(ft: std::fs::FileType) -> FileKind {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_file() {
            FileKind::File
        } else if ft.is_dir() {
            FileKind::Dir
        } else if ft.is_symlink() {
            FileKind::Symlink
        } else if ft.is_fifo() {
            FileKind::Fifo
        } else if ft.is_socket() {
            FileKind::Socket
        } else if ft.is_char_device() {
            FileKind::CharDev
        } else {
            FileKind::BlockDev
        }
    }
}

/// Everything about one directory entry except file data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsMeta {
    pub kind: FileKind,
    /// Permission bits including setuid/setgid/sticky; no type bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub size: u64,
    pub ino: u64,
    pub nlink: u64,
    pub rdev: u64,
    /// All extended attributes (every namespace the caller may read), sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Symlink target, as stored (never followed).
    pub target: Option<Vec<u8>>,
}

/// Reads an entry's metadata without following symlinks.
pub fn read_meta(path: &Path) -> Result<FsMeta> {
    let md = std::fs::symlink_metadata(path).map_err(|e| DiffError::io(path, e))?;
    let kind = FileKind::of(md.file_type());
    let target = if kind == FileKind::Symlink {
        let t = std::fs::read_link(path).map_err(|e| DiffError::io(path, e))?;
        Some(t.as_os_str().as_bytes().to_vec())
    } else {
        None
    };
    Ok(FsMeta::from_metadata(&md, read_xattrs(path)?, target))
}

impl FsMeta {
    /// An entry's metadata from its `stat` (not following links), its
    /// xattrs and, for a symlink, its target.
    pub fn from_metadata(
        md: &std::fs::Metadata,
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
        target: Option<Vec<u8>>,
    ) -> FsMeta {
        let kind = FileKind::of(md.file_type());
        FsMeta {
            kind,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
            ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
            size: if kind == FileKind::File { md.size() } else { 0 },
            ino: md.ino(),
            nlink: md.nlink(),
            rdev: md.rdev(),
            xattrs,
            target,
        }
    }
}

/// All extended attributes of `path` (not following symlinks), sorted by name.
pub fn read_xattrs(path: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(DiffError::io(path, e)),
    };
    let mut out = Vec::new();
    for name in names {
        // An attribute removed between list and get is simply gone.
        if let Some(value) = xattr::get(path, &name).map_err(|e| DiffError::io(path, e))? {
            out.push((name.as_bytes().to_vec(), value));
        }
    }
    out.sort();
    Ok(out)
}

/// Names in a directory, sorted bytewise (the tree order of FORMAT.md §7).
pub fn read_dir_sorted(path: &Path) -> Result<Vec<OsString>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| DiffError::io(path, e))? {
        names.push(entry.map_err(|e| DiffError::io(path, e))?.file_name());
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

/// Content-defined chunk sizes, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSizes {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl ChunkSizes {
    /// Checks the sizes against the chunker's limits (it panics outside
    /// them, so every chunking entry point checks first).
    pub fn check(&self) -> Result<()> {
        use fastcdc::v2020::{
            AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
        };
        if (MINIMUM_MIN..=MINIMUM_MAX).contains(&self.min)
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&self.avg)
            && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&self.max)
        {
            Ok(())
        } else {
            Err(DiffError::ChunkSizes {
                min: self.min,
                avg: self.avg,
                max: self.max,
            })
        }
    }
}

/// A chunker error as a [`DiffError`] about `path`.
pub(crate) fn chunker_error(path: &Path, e: fastcdc::v2020::Error) -> DiffError {
    DiffError::io(
        path,
        match e {
            fastcdc::v2020::Error::IoError(io) => io,
            other => std::io::Error::other(other.to_string()),
        },
    )
}

/// The data regions of an open file (holes skipped), as (offset, length),
/// found with `SEEK_DATA`/`SEEK_HOLE`.
pub fn data_regions(file: &File, path: &Path, size: u64) -> Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut regions = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        // SAFETY: lseek on a valid fd owned by `file`; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole up to the end
            }
            return Err(DiffError::io(path, err));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(DiffError::io(path, std::io::Error::last_os_error()));
        }
        let (start, end) = (data as u64, (hole as u64).min(size));
        if end <= start {
            break;
        }
        regions.push((start, end - start));
        pos = end;
    }
    Ok(regions)
}

/// Data regions up to this size are read whole and chunked in memory.
const IN_MEMORY_REGION: u64 = 8 << 20;

/// What [`chunk_file`] did: bytes read, and the wall time spent in the
/// reads (waiting for the disk included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkStats {
    pub bytes: u64,
    pub read: Duration,
}

/// A reader that adds the time of each read to `spent`.
struct TimedRead<'a, R> {
    inner: R,
    spent: &'a Cell<Duration>,
}

impl<R: Read> Read for TimedRead<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let start = Instant::now();
        let n = self.inner.read(buf);
        self.spent.set(self.spent.get() + start.elapsed());
        n
    }
}

/// Reads a file's data regions and calls `f(offset, chunk)` for each
/// content-defined chunk, in offset order. A region smaller than `min` is
/// one chunk. Chunks of a region read whole share its buffer (no copy).
/// Fails on chunk sizes the chunker does not support ([`ChunkSizes::check`]).
pub fn chunk_file<E>(
    path: &Path,
    sizes: ChunkSizes,
    mut f: impl FnMut(u64, Bytes) -> std::result::Result<(), E>,
) -> std::result::Result<ChunkStats, E>
where
    E: From<DiffError>,
{
    sizes.check()?;
    let read_time = Cell::new(Duration::ZERO);
    let mut file = File::open(path).map_err(|e| DiffError::io(path, e))?;
    let size = file.metadata().map_err(|e| DiffError::io(path, e))?.len();
    let mut read = 0;
    for (start, len) in data_regions(&file, path, size)? {
        if len <= IN_MEMORY_REGION {
            // Small regions (most files): one exact-size read and the slice
            // chunker, instead of the streaming chunker's max-size buffer
            // (allocated and zeroed per call).
            let mut data = vec![0u8; len as usize];
            let t = Instant::now();
            file.read_exact_at(&mut data, start)
                .map_err(|e| DiffError::io(path, e))?;
            read_time.set(read_time.get() + t.elapsed());
            read += len;
            let data = Bytes::from(data);
            if data.len() <= sizes.min as usize {
                // One chunk, whatever FastCDC would say: no cut below min.
                f(start, data)?;
                continue;
            }
            for c in fastcdc::v2020::FastCDC::new(&data, sizes.min, sizes.avg, sizes.max) {
                f(
                    start + c.offset as u64,
                    data.slice(c.offset..c.offset + c.length),
                )?;
            }
            continue;
        }
        file.seek(SeekFrom::Start(start))
            .map_err(|e| DiffError::io(path, e))?;
        let reader = TimedRead {
            inner: (&mut file).take(len),
            spent: &read_time,
        };
        let chunker = fastcdc::v2020::StreamCDC::new(reader, sizes.min, sizes.avg, sizes.max);
        for chunk in chunker {
            let chunk = chunk.map_err(|e| chunker_error(path, e))?;
            read += chunk.length as u64;
            f(start + chunk.offset, Bytes::from(chunk.data))?;
        }
    }
    Ok(ChunkStats {
        bytes: read,
        read: read_time.get(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const SIZES: ChunkSizes = ChunkSizes {
        min: 4096,
        avg: 16384,
        max: 65536,
    };

    fn chunks(path: &Path) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        chunk_file::<DiffError>(path, SIZES, |off, data| {
            out.push((off, data.to_vec()));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn chunks_cover_the_file_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(&p, &data).unwrap();
        let cs = chunks(&p);
        assert!(cs.len() > 3, "expected several chunks, got {}", cs.len());
        let mut joined = Vec::new();
        for (off, c) in &cs {
            assert_eq!(*off as usize, joined.len());
            assert!(c.len() <= SIZES.max as usize);
            joined.extend_from_slice(c);
        }
        assert_eq!(joined, data);
    }

    #[test]
    fn an_edit_changes_few_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut data: Vec<u8> = (0..1_000_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
            .collect();
        std::fs::write(&p, &data).unwrap();
        let before: std::collections::HashSet<Vec<u8>> =
            chunks(&p).into_iter().map(|(_, c)| c).collect();
        data.splice(500_000..500_000, b"inserted bytes".iter().copied());
        std::fs::write(&p, &data).unwrap();
        let after = chunks(&p);
        let changed = after.iter().filter(|(_, c)| !before.contains(c)).count();
        assert!(changed <= 3, "{changed} of {} chunks changed", after.len());
    }

    #[test]
    fn holes_are_skipped_and_offsets_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse");
        let mut f = File::create(&p).unwrap();
        f.write_all(&[1u8; 8192]).unwrap();
        f.seek(SeekFrom::Start(10 << 20)).unwrap();
        f.write_all(&[2u8; 4096]).unwrap();
        f.set_len(20 << 20).unwrap();
        drop(f);
        let cs = chunks(&p);
        let total: usize = cs.iter().map(|(_, c)| c.len()).sum();
        // Filesystems without SEEK_HOLE support report one big data region.
        if total < (20 << 20) {
            assert_eq!(total, 8192 + 4096);
            assert_eq!(cs.last().unwrap().0, 10 << 20);
        }
    }

    #[test]
    fn meta_of_symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let l = dir.path().join("l");
        std::os::unix::fs::symlink("/nonexistent/target", &l).unwrap();
        let m = read_meta(&l).unwrap();
        assert_eq!(m.kind, FileKind::Symlink);
        assert_eq!(m.target.as_deref(), Some(&b"/nonexistent/target"[..]));
    }

    #[test]
    fn dir_listing_is_sorted_bytewise() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["b", "a", "C", "~$x"] {
            std::fs::write(dir.path().join(n), b"").unwrap();
        }
        let names: Vec<_> = read_dir_sorted(dir.path()).unwrap();
        let names: Vec<&str> = names.iter().map(|n| n.to_str().unwrap()).collect();
        assert_eq!(names, ["C", "a", "b", "~$x"]);
    }
}
