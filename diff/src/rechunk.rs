//! Re-chunking only what changed, resynchronising with the old chunk list.
//!
//! [`chunk_file`](crate::chunk_file) runs FastCDC (`StreamCDC`) over each data
//! region from its start. The chunker keeps no state from one chunk to the
//! next: a chunk starting at `b` in a region ending at `r` is a function of
//! the window `bytes[b .. b + n]` with `n = min(max, r - b)` (its buffer), and
//! of `n`. More precisely, a chunk cut by the rolling hash at `b + c`
//! (`c < n`) examined only `bytes[b ..= b + c]`, one byte past its end; a chunk
//! of length `n` (no cut found, or `n <= min`) depends on the whole window.
//!
//! So, walking each new data region from its start, whenever the new
//! chunking has a boundary at `b` where an old chunk `[b, b + c)` starts, that
//! old chunk is exactly what the chunker would produce again if
//! 1. the window length is the same in both versions (`min(max, r - b)`
//!    with the old and new region ends), and
//! 2. no changed byte lies in `[b, b + c]` (or in `[b, b + c)` when `c == n`).
//!
//! [`rechunk`] reuses such chunks without reading them. At the first old
//! chunk that fails the test (the first one a change touches), it starts a
//! `StreamCDC` there, over a reader limited to the region end, and after
//! every new chunk checks the test again at the new boundary; as soon as it
//! holds (a new boundary coincides with an old one past the change, with
//! enough clean bytes after it) it drops the chunker and goes back to reusing.
//! Regions that appeared, moved or changed length are handled by the same
//! test: an old chunk is only reused where its window is unchanged, so in the
//! worst case a region is re-read whole. The result is the chunk list
//! `chunk_file` gives on the new version, byte for byte.
//!
//! Preconditions for that guarantee (not checkable without reading): `old`
//! came from `chunk_file` on the old version with the same [`ChunkSizes`],
//! and every byte of the new file whose content differs from the old file
//! (holes read as zeros) lies in a `changed` range. Bytes outside the old
//! data regions need not be listed (no old chunk covers them). An `old` list
//! that is not sorted and disjoint is ignored (everything is re-read).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::{chunker_error, data_regions, ChunkSizes, DiffError};

/// A chunk of the previous version of a file: where it was, and an opaque
/// id the caller uses to refer to its stored copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldChunk<Id> {
    pub offset: u64,
    pub length: u64,
    pub id: Id,
}

impl<Id> OldChunk<Id> {
    fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// One chunk of the new version, handed to [`rechunk`]'s callback in offset
/// order.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a, Id> {
    /// The new version has this old chunk, at the same offset with the same
    /// bytes; it was not read.
    Reused(&'a OldChunk<Id>),
    /// A chunk read from the new version.
    New { offset: u64, data: Vec<u8> },
}

/// What [`rechunk`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RechunkStats {
    /// Bytes read from the file (including the chunker's read-ahead, at most
    /// `max` bytes past the last new chunk of each re-chunked stretch).
    pub read_bytes: u64,
    pub reused_chunks: u64,
    pub reused_bytes: u64,
    pub new_chunks: u64,
    pub new_bytes: u64,
}

/// Chunks the file at `path` as [`chunk_file`](crate::chunk_file) would,
/// reading only around the `changed` ranges and reusing chunks of `old`
/// elsewhere (see the module documentation for how, and for the
/// preconditions under which the result equals `chunk_file`'s exactly).
///
/// `old` is the previous version's chunk list (sorted, disjoint); `changed`
/// lists byte ranges `[start, end)` of the new file that may differ from the
/// old one, in any order (e.g. from [`changed_ranges`](crate::changed_ranges)).
/// `f` gets every chunk of the new version in offset order, either
/// [`Piece::Reused`] (the old chunk, not read) or [`Piece::New`] (its bytes);
/// an error from `f` stops the walk and is returned.
pub fn rechunk<'a, Id, E>(
    path: &Path,
    sizes: ChunkSizes,
    old: &'a [OldChunk<Id>],
    changed: &[(u64, u64)],
    mut f: impl FnMut(Piece<'a, Id>) -> Result<(), E>,
) -> Result<RechunkStats, E>
where
    E: From<DiffError>,
{
    sizes.check()?;
    let mut file = File::open(path).map_err(|e| DiffError::io(path, e))?;
    let size = file.metadata().map_err(|e| DiffError::io(path, e))?.len();
    let regions = data_regions(&file, path, size)?;
    let old: &'a [OldChunk<Id>] = if well_formed(old) { old } else { &[] };
    let plan = Plan {
        old,
        run_end: run_ends(old),
        changed: normalize(changed),
        max: u64::from(sizes.max),
    };

    let mut stats = RechunkStats::default();
    for (start, len) in regions {
        let end = start.saturating_add(len);
        let mut pos = start;
        while pos < end {
            if let Some(i) = plan.reusable(pos, end) {
                let c = &old[i];
                f(Piece::Reused(c))?;
                stats.reused_chunks += 1;
                stats.reused_bytes += c.length;
                pos = c.end();
                continue;
            }
            let from = pos;
            file.seek(SeekFrom::Start(from))
                .map_err(|e| DiffError::io(path, e))?;
            let mut read = 0u64;
            let reader = Counting {
                inner: (&mut file).take(end - from),
                count: &mut read,
            };
            let chunker = fastcdc::v2020::StreamCDC::new(reader, sizes.min, sizes.avg, sizes.max);
            for chunk in chunker {
                let chunk = chunk.map_err(|e| chunker_error(path, e))?;
                let offset = from + chunk.offset;
                let length = chunk.length as u64;
                pos = offset + length;
                f(Piece::New {
                    offset,
                    data: chunk.data,
                })?;
                stats.new_chunks += 1;
                stats.new_bytes += length;
                if pos < end && plan.reusable(pos, end).is_some() {
                    break;
                }
            }
            stats.read_bytes += read;
            if pos == from {
                // The file ended before its data region did (it shrank
                // while being read): nothing more to chunk here.
                break;
            }
        }
    }
    Ok(stats)
}

/// Sorted by offset, disjoint, no empty chunk, no overflow.
fn well_formed<Id>(old: &[OldChunk<Id>]) -> bool {
    old.iter()
        .all(|c| c.length > 0 && c.offset.checked_add(c.length).is_some())
        && old.windows(2).all(|w| w[0].end() <= w[1].offset)
}

/// For each old chunk, the end of the run of contiguous chunks holding it:
/// the end of its old data region (`chunk_file` covers each region with
/// contiguous chunks, and regions are separated by holes).
fn run_ends<Id>(old: &[OldChunk<Id>]) -> Vec<u64> {
    let mut ends = vec![0; old.len()];
    for i in (0..old.len()).rev() {
        ends[i] = match old.get(i + 1) {
            Some(next) if next.offset == old[i].end() => ends[i + 1],
            _ => old[i].end(),
        };
    }
    ends
}

/// Sorted, disjoint, non-touching, non-empty ranges.
fn normalize(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges.iter().copied().filter(|(a, b)| a < b).collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

struct Plan<'a, Id> {
    old: &'a [OldChunk<Id>],
    run_end: Vec<u64>,
    changed: Vec<(u64, u64)>,
    max: u64,
}

impl<Id> Plan<'_, Id> {
    /// The index of the old chunk starting at `pos` if the chunker, started
    /// at `pos` in a new region ending at `end`, would produce it again.
    fn reusable(&self, pos: u64, end: u64) -> Option<usize> {
        let i = self.old.binary_search_by_key(&pos, |c| c.offset).ok()?;
        let c = &self.old[i];
        let old_window = self.max.min(self.run_end[i] - pos);
        let new_window = self.max.min(end - pos);
        if old_window != new_window || c.length > old_window {
            return None;
        }
        // A hash cut looked at one byte past the chunk.
        let examined_end = if c.length < old_window {
            c.end() + 1
        } else {
            c.end()
        };
        (!self.touches_change(pos, examined_end)).then_some(i)
    }

    /// Whether `[a, b)` overlaps a changed range.
    fn touches_change(&self, a: u64, b: u64) -> bool {
        let k = self.changed.partition_point(|&(_, e)| e <= a);
        self.changed.get(k).is_some_and(|&(s, _)| s < b)
    }
}

/// A reader that counts the bytes it returns.
struct Counting<'c, R> {
    inner: R,
    count: &'c mut u64,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        *self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oc(offset: u64, length: u64) -> OldChunk<()> {
        OldChunk {
            offset,
            length,
            id: (),
        }
    }

    #[test]
    fn runs_follow_contiguity() {
        let old = [oc(0, 10), oc(10, 5), oc(20, 5), oc(25, 1), oc(30, 2)];
        assert_eq!(run_ends(&old), vec![15, 15, 26, 26, 32]);
        assert!(well_formed(&old));
        assert!(!well_formed(&[oc(0, 10), oc(5, 10)]));
        assert!(!well_formed(&[oc(10, 1), oc(0, 1)]));
        assert!(!well_formed(&[oc(0, 0)]));
        assert!(!well_formed(&[oc(u64::MAX, 1)]));
    }

    #[test]
    fn normalize_sorts_and_merges() {
        assert_eq!(
            normalize(&[(10, 20), (5, 5), (0, 3), (3, 4), (15, 30), (40, 41)]),
            vec![(0, 4), (10, 30), (40, 41)]
        );
    }

    #[test]
    fn reuse_test_looks_one_byte_past_a_cut() {
        let old = [oc(0, 100), oc(100, 100), oc(200, 50)];
        let plan = |changed: Vec<(u64, u64)>| Plan {
            old: &old,
            run_end: run_ends(&old),
            changed,
            max: 1000,
        };
        // Same region: a chunk is reusable unless a change touches it or
        // the byte after it (which the hash looked at).
        assert_eq!(plan(vec![]).reusable(0, 250), Some(0));
        assert_eq!(plan(vec![(100, 101)]).reusable(0, 250), None);
        assert_eq!(plan(vec![(101, 102)]).reusable(0, 250), Some(0));
        // The last chunk ends its region (no cut): only its own bytes count.
        assert_eq!(plan(vec![(250, 251)]).reusable(200, 250), Some(2));
        assert_eq!(plan(vec![(249, 250)]).reusable(200, 250), None);
        // A different region end changes the window: not reusable.
        assert_eq!(plan(vec![]).reusable(0, 300), None);
        assert_eq!(plan(vec![]).reusable(200, 260), None);
        // Not an old boundary.
        assert_eq!(plan(vec![]).reusable(50, 250), None);
        // Windows clipped by max are equal whatever the region ends.
        let small = Plan {
            old: &old,
            run_end: run_ends(&old),
            changed: vec![],
            max: 100,
        };
        assert_eq!(small.reusable(0, 5000), Some(0));
        // ... but then the whole window counts (no cut was found).
        let small = Plan {
            changed: vec![(99, 100)],
            ..small
        };
        assert_eq!(small.reusable(0, 5000), None);
    }
}
