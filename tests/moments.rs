//! Property test of "the share at a moment" (FORMAT.md §5) with the daemon
//! running: seeded random operation sequences on a small namespace (writes,
//! appends, truncation to a shorter length and to 0, hard links and writes
//! through them, renames over existing files, file↔directory swaps,
//! deletes, mkdir, chmod), `btrship snapshot` interleaved, store outages on
//! and off (the daemon queues; the snapshot waits in the spool), `btrship
//! sync` between. Each acknowledged moment — just after a `sync` returned,
//! or just after a `btrship snapshot` returned (also during an outage) — is
//! recorded with an instant read-only btrfs snapshot of the share as its
//! reference. At the end, with the store back and everything drained, a
//! fresh machine restores every acknowledged moment and a random instant
//! of each quiet period after one (nothing changed in between, so the same
//! reference holds) and compares exactly: content, holes, modes, mtimes,
//! xattrs, hard-link groups.
//!
//! Exceptions: none. Every operation here gives the share an event
//! (changes are made through an fd opened for writing, which closes; or
//! by create/delete/rename/link/attribute calls). Changes that give no
//! event (`truncate(2)` by path, writes through a shared mapping after
//! the close) are not made; FORMAT.md §5 names them.
//!
//! `BTRSHIP_MOMENTS_SEED` (default: random, printed) and
//! `BTRSHIP_MOMENTS_ITERATIONS` (rounds, default 25: about 20 s) steer it.

#[macro_use]
mod common;

use common::{diff_trees, reference_snapshot, snapshot_tree, Btrship, LoopBtrfs};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

fn text(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// Names the operations pick from: few, so that they collide.
const DIRS: [&str; 3] = ["d0", "d1", "d0/e"];
const NAMES: [&str; 5] = ["f0", "f1", "f2.txt", "g", "h"];

fn pick_path(rng: &mut StdRng) -> PathBuf {
    let name = NAMES[rng.gen_range(0..NAMES.len())];
    match rng.gen_range(0..4) {
        0 => PathBuf::from(name),
        i => PathBuf::from(DIRS[i - 1]).join(name),
    }
}

fn data(rng: &mut StdRng) -> Vec<u8> {
    let len = match rng.gen_range(0..10) {
        0 => 0,
        1..=5 => rng.gen_range(1..3000),
        6..=8 => rng.gen_range(3000..70_000),
        _ => rng.gen_range(200_000..600_000),
    };
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

fn is_file(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.is_file())
}

fn is_dir(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
}

fn remove_any(p: &Path) {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).unwrap(),
        Ok(_) => fs::remove_file(p).unwrap(),
        Err(_) => {}
    }
}

/// One random operation; returns what it did (for the failure message),
/// or `None` when it did not apply.
fn op(share: &Path, rng: &mut StdRng) -> Option<String> {
    let rel = pick_path(rng);
    let p = share.join(&rel);
    let parent_ok = p.parent().is_some_and(is_dir);
    let r = rng.gen_range(0..100);
    let shown = rel.display();
    match r {
        // write (create or overwrite through O_TRUNC)
        0..=24 if parent_ok && !is_dir(&p) => {
            fs::write(&p, data(rng)).unwrap();
            Some(format!("write {shown}"))
        }
        // append
        25..=31 if is_file(&p) => {
            let mut f = fs::OpenOptions::new().append(true).open(&p).unwrap();
            f.write_all(&data(rng)).unwrap();
            Some(format!("append {shown}"))
        }
        // truncate, through an fd opened for writing (so it closes)
        32..=41 if is_file(&p) => {
            let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
            let len = f.metadata().unwrap().len();
            let to = if rng.gen_bool(0.6) {
                0
            } else {
                rng.gen_range(0..=len)
            };
            f.set_len(to).unwrap();
            Some(format!("truncate {shown} to {to}"))
        }
        // hard link to a free name
        42..=51 if is_file(&p) => {
            let q = share.join(pick_path(rng));
            if q.parent().is_some_and(is_dir) && fs::symlink_metadata(&q).is_err() {
                fs::hard_link(&p, &q).unwrap();
                Some(format!("link {shown} -> {}", q.display()))
            } else {
                None
            }
        }
        // rename a file over another file or to a free name
        52..=61 if is_file(&p) => {
            let q = share.join(pick_path(rng));
            if q != p && q.parent().is_some_and(is_dir) && !is_dir(&q) {
                fs::rename(&p, &q).unwrap();
                Some(format!("rename {shown} over {}", q.display()))
            } else {
                None
            }
        }
        // file -> directory (with a file in it)
        62..=66 if is_file(&p) => {
            fs::remove_file(&p).unwrap();
            fs::create_dir(&p).unwrap();
            fs::write(p.join("inner"), data(rng)).unwrap();
            Some(format!("file {shown} becomes a directory"))
        }
        // directory -> file
        67..=70 => {
            let d = share.join(DIRS[rng.gen_range(0..DIRS.len())]);
            if is_dir(&d) {
                fs::remove_dir_all(&d).unwrap();
                fs::write(&d, data(rng)).unwrap();
                Some(format!("directory {} becomes a file", d.display()))
            } else {
                None
            }
        }
        // delete
        71..=78 if fs::symlink_metadata(&p).is_ok() => {
            remove_any(&p);
            Some(format!("delete {shown}"))
        }
        // mkdir (the fixed directories, or a name)
        79..=88 => {
            let d = share.join(DIRS[rng.gen_range(0..DIRS.len())]);
            if d.parent().is_some_and(is_dir) && fs::symlink_metadata(&d).is_err() {
                fs::create_dir(&d).unwrap();
                Some(format!("mkdir {}", d.display()))
            } else if let Some(parent) = d.parent().filter(|p| !is_dir(p)) {
                remove_any(parent);
                fs::create_dir_all(&d).unwrap();
                Some(format!("mkdir -p {}", d.display()))
            } else {
                None
            }
        }
        // chmod
        89..=94 if fs::symlink_metadata(&p).is_ok() => {
            let mode = [0o600, 0o644, 0o640, 0o755][rng.gen_range(0..4)];
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            Some(format!("chmod {mode:o} {shown}"))
        }
        // rename a directory over an empty one or to a free name
        95..=99 => {
            let a = share.join(DIRS[rng.gen_range(0..DIRS.len())]);
            let b = share.join(DIRS[rng.gen_range(0..DIRS.len())]);
            if is_dir(&a) && !b.starts_with(&a) && b.parent().is_some_and(is_dir) && !is_file(&b) {
                match fs::rename(&a, &b) {
                    Ok(()) => Some(format!("rename dir {} to {}", a.display(), b.display())),
                    Err(_) => None, // b not empty
                }
            } else {
                None
            }
        }
        _ => None,
    }
}

/// The store is away while its directory is renamed.
struct Store {
    repo: PathBuf,
    away: PathBuf,
    out: bool,
}

impl Store {
    fn set_out(&mut self, out: bool) {
        if out != self.out {
            if out {
                fs::rename(&self.repo, &self.away).unwrap();
            } else {
                fs::rename(&self.away, &self.repo).unwrap();
            }
            self.out = out;
        }
    }
}

struct Moment {
    what: String,
    at: String,
    reference: PathBuf,
}

#[test]
fn every_acknowledged_moment_restores_exactly() {
    let seed: u64 = std::env::var("BTRSHIP_MOMENTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    let rounds: usize = std::env::var("BTRSHIP_MOMENTS_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25);
    eprintln!("BTRSHIP_MOMENTS_SEED={seed} BTRSHIP_MOMENTS_ITERATIONS={rounds}");
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let fs_ = LoopBtrfs::new(1024);
    let share = fs_.subvolume("share");
    let refs = fs_.dir("refs");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--no-systemd"]);
    bs.set_config("share", "settle_ms", "300");
    fs::create_dir(share.join("d0")).unwrap();
    fs::write(share.join("f0"), b"first").unwrap();
    fs::write(share.join("d0/f1"), vec![1u8; 100_000]).unwrap();
    fs::hard_link(share.join("d0/f1"), share.join("g")).unwrap();
    let daemon = bs.start_daemon("share");
    let mut store = Store {
        repo: bs.repo(),
        away: bs.repo().with_file_name("repo-away"),
        out: false,
    };

    let mut moments: Vec<Moment> = Vec::new();
    let mut log: Vec<String> = Vec::new();
    // The last acknowledged moment whose quiet period is still open.
    let mut quiet: Option<(chrono::DateTime<chrono::Utc>, usize)> = None;
    let close_quiet = |quiet: &mut Option<(chrono::DateTime<chrono::Utc>, usize)>,
                       rng: &mut StdRng,
                       moments: &mut Vec<Moment>| {
        if let Some((from, i)) = quiet.take() {
            let until = now();
            let span = (until - from).num_nanoseconds().unwrap_or(0).max(1);
            let at = from + chrono::Duration::nanoseconds(rng.gen_range(0..span));
            let m = Moment {
                what: format!("{} (quiet instant)", moments[i].what),
                at: text(at),
                reference: moments[i].reference.clone(),
            };
            moments.push(m);
        }
    };
    for round in 0..rounds {
        if rng.gen_bool(0.35) {
            let out = !store.out;
            close_quiet(&mut quiet, &mut rng, &mut moments);
            store.set_out(out);
            log.push(format!("store {}", if out { "away" } else { "back" }));
        }
        let n_ops = rng.gen_range(4..14);
        close_quiet(&mut quiet, &mut rng, &mut moments);
        for _ in 0..n_ops {
            if let Some(what) = op(&share, &mut rng) {
                log.push(what);
            }
        }
        let snapshot = rng.gen_bool(0.4);
        if snapshot {
            let out = bs.cmd(["snapshot", "share"]);
            assert!(
                out.status.success() || store.out,
                "snapshot failed with the store present: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let at = text(now());
            let r = refs.join(format!("r{round}-snapshot"));
            reference_snapshot(&share, &r);
            log.push(format!(
                "snapshot (store {})",
                if store.out { "away" } else { "present" }
            ));
            moments.push(Moment {
                what: format!("round {round}: just after a snapshot; ops: {:?}", log),
                at,
                reference: r,
            });
        }
        if !store.out {
            bs.sync("share");
            let t = now();
            let r = refs.join(format!("r{round}"));
            reference_snapshot(&share, &r);
            log.push("sync".into());
            moments.push(Moment {
                what: format!("round {round}: after sync; ops: {:?}", log),
                at: text(t),
                reference: r,
            });
            quiet = Some((t, moments.len() - 1));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
    }
    close_quiet(&mut quiet, &mut rng, &mut moments);
    // Everything drains: the store back, the spool shipped, the daemon's
    // queue empty.
    store.set_out(false);
    bs.ok(["snapshot", "share"]);
    bs.ok(["sync", "share", "--timeout", "120s"]);
    assert!(daemon.terminate().success());
    eprintln!(
        "{} moments after {rounds} rounds in {:.1} s",
        moments.len(),
        started.elapsed().as_secs_f64()
    );

    let fresh = Btrship::new();
    let mut failures = Vec::new();
    for (i, m) in moments.iter().enumerate() {
        let to = fs_.dir("restored").join(format!("m{i}"));
        fresh.ok(osargs![
            "restore",
            "share",
            "--at",
            &m.at,
            "--to",
            &to,
            "--repo",
            bs.repo(),
            "--key-file",
            bs.key_file("share")
        ]);
        let d = diff_trees(&snapshot_tree(&m.reference), &snapshot_tree(&to));
        if !d.is_empty() {
            failures.push(format!(
                "moment {i} at {} ({}):\n    {}",
                m.at,
                m.what,
                d.join("\n    ")
            ));
        }
        fs::remove_dir_all(&to).unwrap();
    }
    eprintln!(
        "{} moments restored and compared, {:.1} s in all",
        moments.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "seed {seed}: {} of {} moments differ (A = the share, B = restored):\n{}",
        failures.len(),
        moments.len(),
        failures.join("\n")
    );
}
