//! Property test of change detection: random operation histories on a real
//! btrfs, a read-only snapshot after each round, every snapshot shipped
//! incrementally (btrfs-native changes + extent-map diff against the
//! previous one), then every snapshot restored and compared with the
//! snapshot itself, byte for byte and metadata included.
//!
//! A second property: shipping the same snapshot with a full walk gives the
//! very same root tree id, so the incremental path can never drift from
//! what a full read would ship.
//!
//! Seeds: `BTRSHIP_HISTORY_SEEDS` (default 200), rounds:
//! `BTRSHIP_HISTORY_ROUNDS` (default 10), first seed: `BTRSHIP_HISTORY_SEED0`.

mod common;

use btrship::progress::Progress;
use btrship::ship::{self, ChangeDetection, Parent, ShipInput};
use btrship::state::State;
use btrship_crypto::{ContentId, RepoKey};
use btrship_upload::local::LocalStore;
use btrship_upload::Repository;
use common::{assert_same_tree, reference_snapshot, run, LoopBtrfs, Mutator};
use rand::Rng;
use std::ffi::OsStr;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The histories hold device nodes and setuid files: restore them too.
const RESTORE_ALL: btrship::restore::RestoreOptions = btrship::restore::RestoreOptions {
    special_files: true,
};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The operations the generic mutator does not do: swaps, a directory
/// moved into the place of its former child, file↔directory replacement,
/// hole punching, extension leaving a hole, reflink copies of a fragmented
/// file.
fn hard_op(m: &mut Mutator, root: &Path, round: usize) {
    let pick = m.rng().gen_range(0..7);
    let n = m.rng().gen_range(0..1_000_000u32);
    let top: Vec<PathBuf> = fs::read_dir(root)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    let files: Vec<&PathBuf> = top
        .iter()
        .filter(|p| {
            fs::symlink_metadata(p)
                .map(|m| m.is_file())
                .unwrap_or(false)
        })
        .collect();
    match pick {
        // swap a <-> b
        0 if top.len() >= 2 => {
            let a = &top[n as usize % top.len()];
            let b = &top[(n as usize / 7 + 1) % top.len()];
            if a != b {
                let t = root.join(format!(".swap{n}"));
                fs::rename(a, &t).unwrap();
                fs::rename(b, a).unwrap();
                fs::rename(&t, b).unwrap();
            }
        }
        // d/c becomes d, and the old d goes inside it
        1 => {
            let d = root.join(format!("nest{n}"));
            fs::create_dir_all(d.join("c/deeper")).unwrap();
            fs::write(d.join("c/deeper/f"), format!("v{round}")).unwrap();
            fs::write(d.join("top"), b"parent file").unwrap();
            let t = root.join(format!(".nt{n}"));
            fs::rename(d.join("c"), &t).unwrap();
            fs::rename(&d, t.join("c")).unwrap();
            fs::rename(&t, &d).unwrap();
        }
        // replace a file by a directory (and a directory by a file)
        2 if !files.is_empty() => {
            let f = files[n as usize % files.len()].clone();
            fs::remove_file(&f).unwrap();
            fs::create_dir(&f).unwrap();
            fs::write(f.join("inside"), b"was a file").unwrap();
        }
        3 => {
            let dirs: Vec<&PathBuf> = top
                .iter()
                .filter(|p| fs::symlink_metadata(p).map(|m| m.is_dir()).unwrap_or(false))
                .collect();
            if let Some(d) = dirs.get(n as usize % dirs.len().max(1)) {
                fs::remove_dir_all(d).unwrap();
                fs::write(d, format!("was a directory {round}")).unwrap();
            }
        }
        // punch a hole / extend leaving a hole
        4 if !files.is_empty() => {
            let f = files[n as usize % files.len()];
            let file = fs::OpenOptions::new().write(true).open(f).unwrap();
            let len = file.metadata().unwrap().len();
            if len > 8192 {
                let off = (n as u64 % (len / 4096)) * 4096;
                // SAFETY: plain fallocate on an open fd.
                let rc = unsafe {
                    libc::fallocate(
                        file.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        off as libc::off_t,
                        4096,
                    )
                };
                assert_eq!(rc, 0, "punch hole");
            } else {
                file.set_len(len + 3 * 65536 + 17).unwrap();
                file.write_all_at(b"tail", len + 3 * 65536).unwrap();
            }
        }
        // a fragmented file, reflink-copied
        5 => {
            let src = root.join(format!("frag{n}"));
            let mut f = fs::File::create(&src).unwrap();
            let block = m.bytes(4096);
            for _ in 0..256 {
                f.write_all(&block).unwrap();
            }
            f.sync_all().unwrap();
            for i in 0..24u64 {
                let at = (i * 37 % 256) * 4096;
                f.seek(SeekFrom::Start(at)).unwrap();
                f.write_all(&m.bytes(4096)).unwrap();
                f.sync_all().unwrap();
            }
            drop(f);
            run(
                "cp",
                &[
                    OsStr::new("--reflink=always"),
                    src.as_os_str(),
                    root.join(format!("frag{n}.clone")).as_os_str(),
                ],
            );
        }
        // rewrite identical bytes (FIEMAP reports it changed; content is the same)
        _ if !files.is_empty() => {
            let f = files[n as usize % files.len()];
            let data = fs::read(f).unwrap();
            fs::write(f, &data).unwrap();
        }
        _ => {}
    }
}

struct Shipped {
    snapshot: PathBuf,
    record: String,
}

fn ship_once(
    repo: &Repository,
    state: &State,
    share: &str,
    snap: &Path,
    round: usize,
    parent: Option<Parent>,
) -> (ship::ShipReport, ContentId) {
    let mut progress = Progress::new("test", btrship::progress::Show::Nothing);
    let input = ShipInput {
        share,
        host: "test",
        snapshot_name: &format!("@GMT-2026.01.01-00.00.{round:02}"),
        time: chrono::DateTime::from_timestamp(1_767_225_600 + round as i64, 0).unwrap(),
        root: snap,
        parent,
    };
    ship::ship(repo, state, &input, &mut progress).unwrap_or_else(|e| panic!("ship: {e:#}"))
}

fn one_history(
    fs_: &LoopBtrfs,
    repo: &Repository,
    seed: u64,
    rounds: usize,
    btrfs_mode: &AtomicU64,
) {
    let share = fs_.subvolume(&format!("share{seed}"));
    let snaps = fs_.dir(&format!("snaps{seed}"));
    let state_dir = fs_.tmp_path().join(format!("state{seed}"));
    let state = State::open(&state_dir.join("s.db")).unwrap();
    let full_state = State::open(&state_dir.join("full.db")).unwrap();
    let mut m = Mutator::new(seed);
    m.budget = 6 * 1024 * 1024;
    m.populate(&share, 20);
    let mut shipped: Vec<Shipped> = Vec::new();
    let mut parent: Option<(String, ContentId, PathBuf)> = None;
    for round in 0..rounds {
        if round > 0 {
            m.mutate(&share, 6);
            for _ in 0..2 {
                hard_op(&mut m, &share, round);
            }
        }
        let snap = snaps.join(format!("s{round}"));
        reference_snapshot(&share, &snap);
        let p = parent.as_ref().map(|(name, tree, path)| Parent {
            name: name.clone(),
            tree: *tree,
            path: Some(path.clone()),
        });
        let (report, tree) = ship_once(repo, &state, &format!("h{seed}"), &snap, round, p);
        if round > 0 {
            assert!(
                matches!(report.change_detection, ChangeDetection::Btrfs { .. }),
                "seed {seed} round {round}: expected btrfs-native detection, got {:?}",
                report.change_detection
            );
            btrfs_mode.fetch_add(1, Ordering::Relaxed);
        }
        // The same snapshot by a full walk must give the same tree.
        let (_, full_tree) = ship_once(repo, &full_state, &format!("f{seed}"), &snap, round, None);
        assert_eq!(
            tree, full_tree,
            "seed {seed} round {round}: incremental and full-walk trees differ; ops: {:?}",
            m.log
        );
        parent = Some((format!("s{round}"), tree, snap.clone()));
        shipped.push(Shipped {
            snapshot: snap,
            record: report.record,
        });
    }
    for (round, s) in shipped.iter().enumerate() {
        let rec = repo.snapshot(&s.record).unwrap();
        let to = fs_
            .dir(&format!("restored{seed}"))
            .join(format!("r{round}"));
        let mut progress = Progress::new("test", btrship::progress::Show::Nothing);
        btrship::restore::restore(repo, &rec, &[], &to, RESTORE_ALL, &mut progress)
            .unwrap_or_else(|e| panic!("seed {seed} round {round}: restore: {e:#}"));
        assert_same_tree(&s.snapshot, &to);
        fs::remove_dir_all(&to).unwrap();
    }
    for s in &shipped {
        run(
            "btrfs",
            &[
                OsStr::new("subvolume"),
                OsStr::new("delete"),
                s.snapshot.as_os_str(),
            ],
        );
    }
    run(
        "btrfs",
        &[
            OsStr::new("subvolume"),
            OsStr::new("delete"),
            share.as_os_str(),
        ],
    );
}

#[test]
fn random_histories_restore_exactly_and_match_a_full_walk() {
    let seeds = env_u64("BTRSHIP_HISTORY_SEEDS", 200);
    let rounds = env_u64("BTRSHIP_HISTORY_ROUNDS", 10) as usize;
    let seed0 = env_u64("BTRSHIP_HISTORY_SEED0", 1);
    let fs_ = LoopBtrfs::new(4096);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = Arc::new(LocalStore::create(fs_.tmp_path().join("repo")).unwrap());
    let (repo, _) = Repository::open_or_create(
        store,
        Arc::new(RepoKey::generate()),
        rt.handle().clone(),
        "test",
    )
    .unwrap();
    let next = AtomicU64::new(seed0);
    let btrfs_mode = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= seed0 + seeds {
                    break;
                }
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    one_history(&fs_, &repo, seed, rounds, &btrfs_mode)
                }));
                if let Err(e) = r {
                    eprintln!("history seed {seed} failed (rerun: BTRSHIP_HISTORY_SEED0={seed} BTRSHIP_HISTORY_SEEDS=1)");
                    std::panic::resume_unwind(e);
                }
            });
        }
    });
    let n = btrfs_mode.load(Ordering::Relaxed);
    assert_eq!(
        n,
        seeds * (rounds as u64 - 1),
        "every later round used btrfs-native detection"
    );
    eprintln!("{seeds} histories x {rounds} snapshots shipped, restored and compared");
}
