//! `rechunk` must give exactly what `chunk_file` gives on the new version,
//! while reading little: random files and random in-place edits (overwrites,
//! identical rewrites, truncation, extension with data or a hole, punched
//! holes), with changed ranges from a byte comparison (exact or widened).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use btrship_diff::{chunk_file, rechunk, ChunkSizes, DiffError, OldChunk, Piece, RechunkStats};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const SIZES: ChunkSizes = ChunkSizes {
    min: 4096,
    avg: 16384,
    max: 65536,
};

/// Small sizes so that small files have many chunks.
const TINY: ChunkSizes = ChunkSizes {
    min: 64,
    avg: 256,
    max: 1024,
};

fn chunks(path: &Path, sizes: ChunkSizes) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    chunk_file::<DiffError>(path, sizes, |off, data| {
        out.push((off, data.to_vec()));
        Ok(())
    })
    .unwrap();
    out
}

/// The file's content as a model (holes read as zeros).
fn content(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// Byte ranges where `new` differs from `old`, plus everything past the old
/// end; compared by 4 KiB blocks, refined to bytes.
fn byte_diff(old: &[u8], new: &[u8]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut push = |a: u64, b: u64| match out.last_mut() {
        Some(l) if l.1 == a => l.1 = b,
        _ => out.push((a, b)),
    };
    let common = old.len().min(new.len());
    let mut i = 0;
    while i < common {
        let j = (i + 4096).min(common);
        if old[i..j] != new[i..j] {
            for x in i..j {
                if old[x] != new[x] {
                    push(x as u64, x as u64 + 1);
                }
            }
        }
        i = j;
    }
    if new.len() > common {
        push(common as u64, new.len() as u64);
    }
    out
}

fn punch_hole(path: &Path, offset: u64, len: u64) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    // SAFETY: fallocate on a valid fd; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

/// Content mixing random bytes, zero runs (which hit the max-size cut) and
/// repeated text.
fn make_content(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut i = 0;
    while i < len {
        let run = rng.gen_range(1..=(len - i).min(300_000));
        match rng.gen_range(0..8) {
            0 => {} // zeros
            1 => {
                for (k, b) in v[i..i + run].iter_mut().enumerate() {
                    *b = b"the quick brown fox "[k % 20];
                }
            }
            _ => rng.fill_bytes(&mut v[i..i + run]),
        }
        i += run;
    }
    v
}

/// Writes `data` to `path`, then punches `holes` (offset, len) into it.
fn write_file(path: &Path, data: &[u8], holes: &[(u64, u64)]) {
    std::fs::write(path, data).unwrap();
    for &(o, l) in holes {
        punch_hole(path, o, l);
    }
}

#[derive(Debug, Clone)]
enum Edit {
    /// Overwrite at `at` with `len` random bytes (may extend the file).
    Write {
        at: u64,
        len: u64,
        seed: u64,
    },
    /// Rewrite `len` bytes at `at` with what is already there.
    Same {
        at: u64,
        len: u64,
    },
    /// Change one byte at an old chunk boundary (`k`-th chunk end + delta).
    Boundary {
        k: usize,
        delta: i8,
    },
    Truncate {
        to: u64,
    },
    /// Extend with a hole.
    SetLen {
        to: u64,
    },
    Punch {
        at: u64,
        len: u64,
    },
}

fn apply(path: &Path, edit: &Edit, old_chunks: &[OldChunk<usize>]) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let size = f.metadata().unwrap().len();
    match *edit {
        Edit::Write { at, len, seed } => {
            let mut buf = vec![0u8; len as usize];
            StdRng::seed_from_u64(seed).fill_bytes(&mut buf);
            f.write_all_at(&buf, at).unwrap();
        }
        Edit::Same { at, len } => {
            let at = at.min(size);
            let len = len.min(size - at);
            let mut buf = vec![0u8; len as usize];
            f.read_exact_at(&mut buf, at).unwrap();
            f.write_all_at(&buf, at).unwrap();
        }
        Edit::Boundary { k, delta } => {
            if old_chunks.is_empty() {
                return;
            }
            let c = &old_chunks[k % old_chunks.len()];
            let x = (c.offset + c.length).saturating_add_signed(delta as i64);
            if x < size {
                let mut b = [0u8];
                f.read_exact_at(&mut b, x).unwrap();
                f.write_all_at(&[b[0] ^ 0x5a], x).unwrap();
            }
        }
        Edit::Truncate { to } => f.set_len(to.min(size)).unwrap(),
        Edit::SetLen { to } => f.set_len(to.max(size)).unwrap(),
        Edit::Punch { at, len } => {
            drop(f);
            punch_hole(path, at, len);
        }
    }
}

/// Widens each range by up to `w` bytes on each side (in random amounts).
fn widen(rng: &mut StdRng, ranges: &[(u64, u64)], w: u64) -> Vec<(u64, u64)> {
    ranges
        .iter()
        .map(|&(a, b)| {
            (
                a.saturating_sub(rng.gen_range(0..=w)),
                b + rng.gen_range(0..=w),
            )
        })
        .collect()
}

/// Runs `rechunk` on `path` against the old chunks (ids index `old_bytes`)
/// and checks the result is `chunk_file`'s exactly.
fn check(
    path: &Path,
    sizes: ChunkSizes,
    old: &[OldChunk<usize>],
    old_bytes: &[Vec<u8>],
    changed: &[(u64, u64)],
) -> RechunkStats {
    let mut got: Vec<(u64, Vec<u8>)> = Vec::new();
    let stats = rechunk::<usize, DiffError>(path, sizes, old, changed, |p| {
        match p {
            Piece::Reused(c) => {
                assert_eq!(old_bytes[c.id].len() as u64, c.length);
                got.push((c.offset, old_bytes[c.id].clone()));
            }
            Piece::New { offset, data } => got.push((offset, data)),
        }
        Ok(())
    })
    .unwrap();
    let want = chunks(path, sizes);
    assert_eq!(got.len(), want.len(), "chunk count");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.0, w.0, "offset of chunk {i}");
        assert!(g.1 == w.1, "bytes of chunk {i} at {}", w.0);
    }
    assert_eq!(
        stats.reused_chunks + stats.new_chunks,
        want.len() as u64,
        "stats"
    );
    stats
}

fn old_list(path: &Path, sizes: ChunkSizes) -> (Vec<OldChunk<usize>>, Vec<Vec<u8>>) {
    let cs = chunks(path, sizes);
    let list = cs
        .iter()
        .enumerate()
        .map(|(i, (o, d))| OldChunk {
            offset: *o,
            length: d.len() as u64,
            id: i,
        })
        .collect();
    (list, cs.into_iter().map(|(_, d)| d).collect())
}

#[test]
fn small_overwrite_in_16_mib_reads_little() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    let mut rng = StdRng::seed_from_u64(1);
    let mut data = vec![0u8; 16 << 20];
    rng.fill_bytes(&mut data);
    std::fs::write(&p, &data).unwrap();
    let (old, old_bytes) = old_list(&p, SIZES);
    for (at, len) in [
        (8 << 20, 4096u64),
        (0, 4096),
        ((16 << 20) - 4096, 4096),
        (5_000_001, 1),
    ] {
        let before = content(&p);
        let mut buf = vec![0u8; len as usize];
        rng.fill_bytes(&mut buf);
        File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .write_all_at(&buf, at)
            .unwrap();
        let changed = byte_diff(&before, &content(&p));
        let (old2, old_bytes2) = old_list(&p, SIZES);
        let stats = check(&p, SIZES, &old, &old_bytes, &changed);
        assert!(
            stats.read_bytes < 1 << 20,
            "read {} bytes for a {len}-byte edit at {at}",
            stats.read_bytes
        );
        assert!(stats.new_chunks <= 8, "{stats:?}");
        // Nothing changed since: nothing is read at all.
        let stats = check(&p, SIZES, &old2, &old_bytes2, &[]);
        assert_eq!(stats.read_bytes, 0);
        assert_eq!(stats.new_chunks, 0);
        // Restore, for the next edit to start from the same old list.
        std::fs::write(&p, &data).unwrap();
    }
}

#[test]
fn appending_reads_only_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("log");
    let mut rng = StdRng::seed_from_u64(2);
    let mut data = vec![0u8; 8 << 20];
    rng.fill_bytes(&mut data);
    std::fs::write(&p, &data).unwrap();
    let (old, old_bytes) = old_list(&p, SIZES);
    let mut more = vec![0u8; 100_000];
    rng.fill_bytes(&mut more);
    let f = File::options().append(true).open(&p).unwrap();
    f.write_all_at(&more, data.len() as u64).unwrap();
    let changed = [(data.len() as u64, data.len() as u64 + more.len() as u64)];
    let stats = check(&p, SIZES, &old, &old_bytes, &changed);
    assert!(stats.read_bytes < 400_000, "{stats:?}");
    // Truncation likewise re-reads only around the new end.
    f.set_len(3 << 20).unwrap();
    let stats = check(&p, SIZES, &old, &old_bytes, &[]);
    assert!(stats.read_bytes < 200_000, "{stats:?}");
}

#[test]
fn random_big_files_and_edits() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    let mut rng = StdRng::seed_from_u64(3);
    for case in 0..6 {
        let len = rng.gen_range(2usize << 20..=20 << 20);
        let data = make_content(&mut rng, len);
        let holes: Vec<(u64, u64)> = (0..rng.gen_range(0..3))
            .map(|_| {
                (
                    rng.gen_range(0..len as u64) & !4095,
                    rng.gen_range(1..64u64) * 4096,
                )
            })
            .collect();
        write_file(&p, &data, &holes);
        let before = content(&p);
        let (old, old_bytes) = old_list(&p, SIZES);
        let n_edits = rng.gen_range(1..6);
        for _ in 0..n_edits {
            let e = match rng.gen_range(0..10) {
                0..=3 => Edit::Write {
                    at: rng.gen_range(0..len as u64 + 10_000),
                    len: rng.gen_range(1..50_000),
                    seed: rng.gen(),
                },
                4 => Edit::Same {
                    at: rng.gen_range(0..len as u64),
                    len: rng.gen_range(1..200_000),
                },
                5 => Edit::Boundary {
                    k: rng.gen(),
                    delta: rng.gen_range(-1..=1),
                },
                6 => Edit::Truncate {
                    to: rng.gen_range(0..len as u64),
                },
                7 => Edit::SetLen {
                    to: len as u64 + rng.gen_range(0..300_000),
                },
                _ => Edit::Punch {
                    at: rng.gen_range(0..len as u64) & !4095,
                    len: rng.gen_range(1..40u64) * 4096,
                },
            };
            apply(&p, &e, &old);
        }
        let after = content(&p);
        let exact = byte_diff(&before, &after);
        let s1 = check(&p, SIZES, &old, &old_bytes, &exact);
        let wide = widen(&mut rng, &exact, 100_000);
        let s2 = check(&p, SIZES, &old, &old_bytes, &wide);
        let changed_bytes: u64 = exact.iter().map(|(a, b)| b - a).sum();
        eprintln!(
            "case {case}: {len} bytes, changed {changed_bytes} in {} ranges; exact {s1:?}; widened {s2:?}",
            exact.len()
        );
        // Everything changed: still exact.
        check(&p, SIZES, &old, &old_bytes, &[(0, u64::MAX)]);
    }
}

#[test]
fn bad_inputs_do_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    let mut rng = StdRng::seed_from_u64(4);
    let data = make_content(&mut rng, 300_000);
    std::fs::write(&p, &data).unwrap();
    let (old, old_bytes) = old_list(&p, TINY);
    // Unsorted or overlapping old lists are ignored: full, correct re-read.
    let mut rev = old.clone();
    rev.reverse();
    let s = check(&p, TINY, &rev, &old_bytes, &[]);
    assert_eq!(s.reused_chunks, 0);
    let overlapping = vec![
        OldChunk {
            offset: 0,
            length: 100,
            id: 0,
        },
        OldChunk {
            offset: 50,
            length: 100,
            id: 0,
        },
    ];
    check(&p, TINY, &overlapping, &old_bytes, &[]);
    // Inverted, empty and huge changed ranges are fine.
    check(
        &p,
        TINY,
        &old,
        &old_bytes,
        &[(500, 10), (7, 7), (u64::MAX - 1, u64::MAX), (100, 200)],
    );
    // An old list from elsewhere (precondition broken): no panic, even
    // if the result cannot be chunk_file's.
    let garbage: Vec<OldChunk<usize>> = (0..1000)
        .map(|i| OldChunk {
            offset: i * 7000,
            length: 7000,
            id: 0,
        })
        .collect();
    let mut n = 0;
    rechunk::<usize, DiffError>(&p, TINY, &garbage, &[], |_| {
        n += 1;
        Ok(())
    })
    .unwrap();
    assert!(n > 0);
    // Unsupported sizes and missing files are errors.
    let bad = ChunkSizes {
        min: 1,
        avg: 2,
        max: 3,
    };
    assert!(rechunk::<usize, DiffError>(&p, bad, &old, &[], |_| Ok(())).is_err());
    assert!(chunk_file::<DiffError>(&p, bad, |_, _| Ok(())).is_err());
    assert!(
        rechunk::<usize, DiffError>(&dir.path().join("nope"), TINY, &old, &[], |_| Ok(())).is_err()
    );
    // The callback's error stops the walk and comes back.
    let r = rechunk::<usize, DiffError>(&p, TINY, &old, &[], |_| {
        Err(DiffError::ChunkSizes {
            min: 0,
            avg: 0,
            max: 0,
        })
    });
    assert!(matches!(r, Err(DiffError::ChunkSizes { .. })));
}

#[test]
fn empty_and_tiny_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    std::fs::write(&p, b"").unwrap();
    let (old, old_bytes) = old_list(&p, TINY);
    assert!(old.is_empty());
    std::fs::write(&p, b"hello").unwrap();
    check(&p, TINY, &old, &old_bytes, &[(0, 5)]);
    let (old, old_bytes) = old_list(&p, TINY);
    std::fs::write(&p, b"").unwrap();
    check(&p, TINY, &old, &old_bytes, &[]);
    // all hole
    File::create(&p).unwrap().set_len(1 << 20).unwrap();
    check(&p, TINY, &old, &old_bytes, &[(0, 1 << 20)]);
}

fn edit_strategy() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (0u64..70_000, 1u64..3000, any::<u64>()).prop_map(|(at, len, seed)| Edit::Write { at, len, seed }),
        1 => (0u64..70_000, 1u64..5000).prop_map(|(at, len)| Edit::Same { at, len }),
        3 => (any::<usize>(), -1i8..=1).prop_map(|(k, delta)| Edit::Boundary { k, delta }),
        1 => (0u64..70_000).prop_map(|to| Edit::Truncate { to }),
        1 => (0u64..90_000).prop_map(|to| Edit::SetLen { to }),
        1 => (0u64..16, 1u64..4).prop_map(|(at, len)| Edit::Punch { at: at * 4096, len: len * 4096 }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Small files, tiny chunk sizes (hundreds of chunks), any edits: the
    /// result is chunk_file's, with exact, widened or whole-file changed
    /// ranges.
    #[test]
    fn rechunk_equals_chunk_file(
        seed in any::<u64>(),
        len in 0usize..70_000,
        holes in prop::collection::vec((0u64..16, 1u64..4), 0..3),
        edits in prop::collection::vec(edit_strategy(), 1..6),
        widen_by in prop_oneof![Just(0u64), 1u64..2000],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut rng = StdRng::seed_from_u64(seed);
        let data = make_content(&mut rng, len);
        let holes: Vec<(u64, u64)> = holes.iter().map(|&(a, l)| (a * 4096, l * 4096)).collect();
        write_file(&p, &data, &holes);
        let before = content(&p);
        let (old, old_bytes) = old_list(&p, TINY);
        for e in &edits {
            apply(&p, e, &old);
        }
        let changed = byte_diff(&before, &content(&p));
        let changed = if widen_by > 0 { widen(&mut rng, &changed, widen_by) } else { changed };
        let stats = check(&p, TINY, &old, &old_bytes, &changed);
        prop_assert!(stats.reused_bytes + stats.new_bytes <= content(&p).len() as u64);
    }
}
