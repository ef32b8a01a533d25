//! Phase 2 of a restore: file contents, read pack by pack.
//!
//! **Plan.** Every content extent of every file to restore is collected
//! first, by blob: a blob used by several files, or several times in one
//! file, is read once and written to every place that needs it. The
//! blobs are grouped by the pack the index places them in (the first copy
//! not known to be missing, as [`Repository::read_blob`] chooses), sorted
//! by offset, and neighbours are coalesced into ranges: one ranged GET
//! reads a range, and each blob cut from it is authenticated and its
//! content id checked ([`Repository::open_blob_in`]) before a byte of it
//! is written. A gap between two blobs (a blob no file needs: another
//! version's, or the pack's own padding) is read and thrown away when it
//! is at most [`RANGE_GAP`]; a range stops growing at [`RANGE_MAX`].
//!
//! **Work.** One job is one pack: its ranges are read in offset order by
//! one worker, so reads within a pack stay sequential, and [`workers`]
//! packs are in flight at once (the store's connection limit applies on
//! top). A worker writes each blob to its files with `pwrite` on a
//! descriptor opened below the staging directory (`openat2`, beneath, no
//! symlinks, as everywhere in restore); the first worker to write to a
//! file creates it (`O_CREAT | O_EXCL`, 0600, at its final size), and the
//! worker that writes its last extent applies the file's metadata on
//! that descriptor (owner, xattrs, mode, then mtime: after all its data).
//! Files without data are created and given their metadata in jobs of
//! their own.
//!
//! **Memory.** Each worker holds one range and one blob's plaintext at a
//! time: at most `workers × (max(RANGE_MAX, largest blob) + largest
//! blob)`, with defaults 8 × (8 + 4) MiB = 96 MiB, plus the plan (about
//! 100 bytes per extent).
//!
//! **Damage.** A range that cannot be read because its pack is missing or
//! shorter than the index says, and a blob cut from a range that fails its
//! checks, are read again one blob at a time with
//! [`Repository::read_blob`], which tries every listed copy: one bad blob
//! costs only the files that need it, exactly as with single-blob reads.
//! A store that fails now (not a damaged object) stops the restore.

use super::{apply_meta, at, damaged, is_damage, shown, Damage, FileJob};
use anyhow::{Context, Result};
use btrship_crypto::ContentId;
use btrship_upload::format::BlobKind;
use btrship_upload::{BlobLocation, Repository};
use rustix::fs::OFlags;
use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Largest gap between two needed blobs of a pack that is read through
/// rather than split into two requests.
///
/// Measured on the bench machine (2 cores, local store on ext4, caches
/// dropped, `bench/run --files 100000 --big-gib 1 --text-mib 200`
/// repository): a whole restore with one GET per blob made 102,211 GETs
/// and used 16.9 s of CPU, with ranges 1,503 GETs and 11.6 s, so a
/// request costs about 50 µs of CPU through the store layers. A restore
/// of every second directory (50,000 files; the gaps are the skipped
/// directories, about 0.85 MiB each) with a 1 MiB gap read 627 MB in
/// 1,661 GETs, without joining across gaps 343 MB in 2,268 GETs: the
/// same CPU (5.7 s), and 6.6 s against 7.8 s wall, because reading
/// through is sequential and the disk's readahead covers it. On object
/// storage a request costs 20–50 ms of latency (and is billed), the time
/// to transfer 2–5 MB at 100 MB/s, so 1 MiB read in vain costs less than
/// the request it saves there too.
pub(super) const RANGE_GAP: u64 = 1 << 20;

/// A range stops growing at this size; a blob larger than this is read in
/// a range of its own. Bounds memory (module doc).
pub(super) const RANGE_MAX: u64 = 8 << 20;

/// Packs read at once: enough to overlap one pack's I/O with another's
/// decryption and writes, also on 2 cores.
fn workers() -> usize {
    std::thread::available_parallelism().map_or(4, |n| (n.get() * 2).clamp(4, 8))
}

/// One place a blob goes: file (index into the files), offset, length.
#[derive(Debug, Clone, Copy)]
struct Place {
    file: usize,
    offset: u64,
    len: u64,
}

/// Neighbouring blobs of one pack, read in one ranged GET.
#[derive(Debug)]
struct Range {
    offset: u64,
    len: u64,
    blobs: Vec<(ContentId, BlobLocation)>,
}

#[derive(Debug)]
enum Job {
    /// The ranges of one pack, in offset order.
    Pack { pack: String, ranges: Vec<Range> },
    /// A blob the index does not list: read alone (it fails as missing).
    Blob(ContentId),
    /// Files without data (empty, or all holes): created and given their
    /// metadata.
    Empty(Vec<usize>),
}

/// Bytes written between two writebacks ([`State::writeback`]).
const WRITEBACK_EVERY: u64 = 128 << 20;

/// Files without data per [`Job::Empty`].
const EMPTY_PER_JOB: usize = 256;

/// Groups `blobs` (all in `pack`) into ranges: sorted by offset,
/// neighbours closer than `gap` joined while the range stays within `max`.
fn coalesce(mut blobs: Vec<(ContentId, BlobLocation)>, gap: u64, max: u64) -> Vec<Range> {
    blobs.sort_by_key(|(_, l)| (l.offset, l.length));
    let mut out: Vec<Range> = Vec::new();
    for (id, loc) in blobs {
        let end = loc.offset.saturating_add(loc.length);
        if let Some(r) = out.last_mut() {
            let r_end = r.offset + r.len;
            let joined = end.max(r_end) - r.offset;
            if loc.offset.saturating_sub(r_end) <= gap && joined <= max {
                r.len = joined;
                r.blobs.push((id, loc));
                continue;
            }
        }
        out.push(Range {
            offset: loc.offset,
            len: loc.length,
            blobs: vec![(id, loc)],
        });
    }
    out
}

/// What [`fill`] found: the files that need a missing or damaged blob,
/// and which files got their metadata (all their extents written).
pub(super) struct Filled {
    pub failed: HashMap<usize, Damage>,
    pub finished: Vec<bool>,
}

/// Writes the contents of `files` (created empty at their final size in
/// phase 1) below `staging`, and applies each file's metadata once all its
/// extents are written; `modes[i]` is the mode to give file `i`. Files
/// without extents are left for the caller.
pub(super) fn fill(
    repo: &Repository,
    staging: BorrowedFd<'_>,
    files: &[FileJob],
    modes: &[u32],
) -> Result<Filled> {
    // The plan: where each blob goes, and which pack holds it.
    let mut places: HashMap<ContentId, Vec<Place>> = HashMap::new();
    let mut first_use: Vec<ContentId> = Vec::new();
    let mut empty: Vec<usize> = Vec::new();
    for (i, job) in files.iter().enumerate() {
        if job.node.content.is_empty() {
            empty.push(i);
        }
        for ext in &job.node.content {
            let id = ext.1 .0;
            let list = places.entry(id).or_default();
            if list.is_empty() {
                first_use.push(id);
            }
            list.push(Place {
                file: i,
                offset: ext.0,
                len: ext.2,
            });
        }
    }
    let missing = repo.missing_packs();
    let mut by_pack: HashMap<String, (usize, Vec<(ContentId, BlobLocation)>)> = HashMap::new();
    let mut jobs: Vec<(usize, Job)> = Vec::new();
    for (order, id) in first_use.into_iter().enumerate() {
        let mut locations = repo.blob_locations(&id);
        locations.sort_by_key(|l| missing.contains(&l.pack));
        match locations.into_iter().next() {
            Some(loc) => by_pack
                .entry(loc.pack.clone())
                .or_insert_with(|| (order, Vec::new()))
                .1
                .push((id, loc)),
            None => jobs.push((order, Job::Blob(id))),
        }
    }
    for (pack, (order, blobs)) in by_pack {
        let ranges = coalesce(blobs, RANGE_GAP, RANGE_MAX);
        jobs.push((order, Job::Pack { pack, ranges }));
    }
    for chunk in empty.chunks(EMPTY_PER_JOB) {
        jobs.push((0, Job::Empty(chunk.to_vec())));
    }
    // Packs in the order files first need them: files complete roughly in
    // the order phase 1 noted them (tree order).
    jobs.sort_by_key(|(order, _)| *order);
    let jobs: Vec<Job> = jobs.into_iter().map(|(_, j)| j).collect();
    tracing::debug!(
        "restore plan: {} blobs in {} jobs, {} ranged reads",
        places.len(),
        jobs.len(),
        jobs.iter()
            .map(|j| match j {
                Job::Pack { ranges, .. } => ranges.len(),
                Job::Blob(_) => 1,
                Job::Empty(_) => 0,
            })
            .sum::<usize>()
    );

    let state = State {
        repo,
        staging,
        files,
        modes,
        places: &places,
        remaining: files
            .iter()
            .map(|f| AtomicUsize::new(f.node.content.len()))
            .collect(),
        failed: Mutex::new(HashMap::new()),
        created: files.iter().map(|_| Mutex::new(false)).collect(),
        unsynced_bytes: AtomicU64::new(0),
        syncing: AtomicBool::new(false),
    };
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let errors: Vec<anyhow::Error> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers().min(jobs.len().max(1)))
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    while !stop.load(Ordering::Relaxed) {
                        let Some(job) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                            return Ok(());
                        };
                        if let Err(e) = state.job(job, &stop) {
                            stop.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| match h.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some(anyhow::anyhow!("a restore thread panicked")),
            })
            .collect()
    });
    if let Some(e) = errors.into_iter().next() {
        return Err(e);
    }
    let failed = state.failed.into_inner().unwrap_or_else(|p| p.into_inner());
    let finished = state
        .remaining
        .iter()
        .zip(state.created)
        .enumerate()
        .map(|(i, (left, created))| {
            left.load(Ordering::Acquire) == 0
                && created.into_inner().unwrap_or_else(|p| p.into_inner())
                && !failed.contains_key(&i)
        })
        .collect();
    Ok(Filled { failed, finished })
}

/// What the workers share.
struct State<'a> {
    repo: &'a Repository,
    staging: BorrowedFd<'a>,
    files: &'a [FileJob],
    modes: &'a [u32],
    places: &'a HashMap<ContentId, Vec<Place>>,
    /// Extents of each file not written yet; the worker that writes the
    /// last one applies the file's metadata.
    remaining: Vec<AtomicUsize>,
    failed: Mutex<HashMap<usize, Damage>>,
    /// Whether each file exists yet: the first worker to write to it
    /// creates it.
    created: Vec<Mutex<bool>>,
    /// Bytes written since the last writeback ([`State::writeback`]).
    unsynced_bytes: AtomicU64,
    syncing: AtomicBool,
}

/// The last file a worker wrote to, kept open for the next blob of it.
type OpenFile = Option<(usize, std::fs::File)>;

impl State<'_> {
    fn job(&self, job: &Job, stop: &AtomicBool) -> Result<()> {
        let mut open: OpenFile = None;
        match job {
            Job::Blob(id) => self.deliver(id, self.repo.read_blob(id, BlobKind::Data), &mut open),
            Job::Empty(files) => {
                for &i in files {
                    let job = &self.files[i];
                    let f = self.open_file(i)?;
                    apply_meta(f.as_fd(), &job.node, self.modes[i])
                        .with_context(|| shown(&job.path))?;
                }
                Ok(())
            }
            Job::Pack { pack, ranges } => {
                for r in ranges {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    self.range(pack, r, &mut open)?;
                }
                Ok(())
            }
        }
    }

    /// Reads one range and writes its blobs; falls back to single-blob
    /// reads for what the range cannot give.
    fn range(&self, pack: &str, r: &Range, open: &mut OpenFile) -> Result<()> {
        if r.blobs.iter().all(|(id, _)| !self.wanted(id)) {
            return Ok(());
        }
        let bytes = match self.repo.read_pack_range(pack, r.offset, r.len) {
            Ok(bytes) => bytes,
            Err(e) if is_damage(&e) => {
                tracing::debug!(
                    "{pack}: range {}+{}: {e}; reading its blobs one by one",
                    r.offset,
                    r.len
                );
                for (id, _) in &r.blobs {
                    if self.wanted(id) {
                        self.deliver(id, self.repo.read_blob(id, BlobKind::Data), open)?;
                    }
                }
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        for (id, loc) in &r.blobs {
            if !self.wanted(id) {
                continue;
            }
            let got = self
                .repo
                .open_blob_in(id, BlobKind::Data, loc, r.offset, &bytes)
                .or_else(|e| {
                    tracing::debug!("blob {id} in a range of {pack}: {e}; reading it alone");
                    self.repo.read_blob(id, BlobKind::Data)
                });
            self.deliver(id, got, open)?;
        }
        Ok(())
    }

    /// Does a file that has not failed need blob `id`?
    fn wanted(&self, id: &ContentId) -> bool {
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        self.places[id]
            .iter()
            .any(|p| !failed.contains_key(&p.file))
    }

    /// Writes blob `id` (or its damage) to every place that needs it.
    fn deliver(
        &self,
        id: &ContentId,
        got: btrship_upload::repo::Result<Vec<u8>>,
        open: &mut OpenFile,
    ) -> Result<()> {
        let places = &self.places[id];
        let data = match got {
            Ok(data) => data,
            Err(e) => {
                let damage = Damage::of(self.repo, id, e)?;
                let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
                for p in places {
                    failed.entry(p.file).or_insert_with(|| damage.clone());
                }
                return Ok(());
            }
        };
        for p in places {
            let job = &self.files[p.file];
            if data.len() as u64 != p.len {
                return Err(damaged(format!(
                    "blob {id} is {} bytes, the tree says {}",
                    data.len(),
                    p.len
                )))
                .with_context(|| shown(&job.path));
            }
            if self
                .failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&p.file)
            {
                continue;
            }
            if open.as_ref().is_none_or(|(i, _)| *i != p.file) {
                *open = Some((p.file, self.open_file(p.file)?));
            }
            let Some((_, f)) = open.as_ref() else {
                unreachable!("opened above")
            };
            debug_assert!(p.offset + p.len <= job.node.size);
            f.write_all_at(&data, p.offset)
                .with_context(|| shown(&job.path))?;
            self.writeback(p.len)?;
            if self.remaining[p.file].fetch_sub(1, Ordering::AcqRel) == 1 {
                // Every extent of the file is written: its metadata, mtime
                // last, on the descriptor that wrote it.
                apply_meta(f.as_fd(), &job.node, self.modes[p.file])
                    .with_context(|| shown(&job.path))?;
            }
        }
        Ok(())
    }
}

impl State<'_> {
    /// Counts `written` bytes; every [`WRITEBACK_EVERY`] bytes one worker
    /// syncs the filesystem while the others go on.
    ///
    /// The final `syncfs` before the rename is what makes the restore
    /// durable; these only keep the dirty data small meanwhile, so the
    /// disk writes while the workers decrypt, instead of all at the end
    /// (the kernel starts writeback by itself only at 10 % of memory
    /// dirty). On the bench machine the final `syncfs` of a 2 GiB restore
    /// took 2.7 s without them.
    fn writeback(&self, written: u64) -> Result<()> {
        let total = self.unsynced_bytes.fetch_add(written, Ordering::Relaxed) + written;
        if total < WRITEBACK_EVERY || self.syncing.swap(true, Ordering::Acquire) {
            return Ok(());
        }
        self.unsynced_bytes.store(0, Ordering::Relaxed);
        let r = rustix::fs::syncfs(self.staging);
        self.syncing.store(false, Ordering::Release);
        r.map_err(std::io::Error::from).context("syncfs")
    }

    /// Opens file `i` for writing; the first caller creates it (it must
    /// not exist) at its final size.
    fn open_file(&self, i: usize) -> Result<std::fs::File> {
        let job = &self.files[i];
        let mut created = self.created[i].lock().unwrap_or_else(|p| p.into_inner());
        let fd = if *created {
            drop(created);
            at::open(self.staging, &job.path, OFlags::WRONLY)
        } else {
            let fd = at::create_file(self.staging, &job.path).and_then(|fd| {
                // Writing the last extent sets the size when it ends the
                // file; otherwise (a hole at the end) truncate to it.
                let end = job.node.content.iter().map(|e| e.0 + e.2).max();
                if end.is_none_or(|end| end < job.node.size) {
                    rustix::fs::ftruncate(&fd, job.node.size)?;
                }
                Ok(fd)
            });
            *created = fd.is_ok();
            fd
        };
        Ok(std::fs::File::from(fd.with_context(|| shown(&job.path))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(offset: u64, length: u64) -> (ContentId, BlobLocation) {
        let mut id = [0u8; 32];
        id[..8].copy_from_slice(&offset.to_le_bytes());
        (
            ContentId(id),
            BlobLocation {
                pack: "data/p".into(),
                kind: BlobKind::Data,
                offset,
                length,
                raw_length: length,
            },
        )
    }

    fn shape(ranges: &[Range]) -> Vec<(u64, u64, usize)> {
        ranges
            .iter()
            .map(|r| (r.offset, r.len, r.blobs.len()))
            .collect()
    }

    #[test]
    fn neighbours_are_joined_gaps_and_size_split() {
        // Out of order on purpose: coalesce sorts by offset.
        let blobs = vec![loc(100, 50), loc(0, 100), loc(150, 10), loc(2000, 10)];
        assert_eq!(
            shape(&coalesce(blobs.clone(), 1000, 1 << 20)),
            vec![(0, 160, 3), (2000, 10, 1)]
        );
        assert_eq!(
            shape(&coalesce(blobs.clone(), 2000, 1 << 20)),
            vec![(0, 2010, 4)]
        );
        // A range stops at `max`; a blob larger than `max` gets its own.
        assert_eq!(
            shape(&coalesce(blobs, 2000, 120)),
            vec![(0, 100, 1), (100, 60, 2), (2000, 10, 1)]
        );
        let big = vec![loc(0, 10), loc(10, 500), loc(510, 10)];
        assert_eq!(
            shape(&coalesce(big, 0, 100)),
            vec![(0, 10, 1), (10, 500, 1), (510, 10, 1)]
        );
    }
}
