//! Retention and prune (FORMAT.md §5c) on real btrfs with the daemon:
//!
//! - `kept_moments_restore_exactly`: a history of per-close versions and
//!   snapshots, a policy of seconds; `--dry-run` changes nothing; prune
//!   forgets, marks, then sweeps. Every kept moment restores exactly on a
//!   fresh machine, every forgotten one restores as the newest kept moment
//!   before it (and says so), `check --read-data` is clean, the
//!   repository shrank by at least the forgotten versions' data, and the
//!   local snapshots of forgotten moments are gone.
//! - `prune_beside_the_daemon_loses_nothing`: prune with `--grace 0s` in
//!   a loop for 100 s (the real 60 s mark age, so sweeps happen)
//!   while the daemon ships a stream of closes acknowledged by `sync`:
//!   every acknowledged moment the policy keeps restores exactly.
//! - `killed_prune_leaves_a_clean_repository`: prune killed with SIGKILL
//!   at random points (`BTRSHIP_PRUNE_KILLS` iterations, default 8;
//!   20 for the figure), `check --read-data` clean after each.
//! - `repack_moves_what_is_used_and_frees_the_rest`: a pack mostly unused
//!   after forgetting is repacked; its old copy goes, the moved blobs serve
//!   restore and deduplication.
//!
//! `BTRSHIP_TEST_MIN_MARK_AGE=0` lets the first and third tests sweep at
//! once; nothing ships beside those prunes, which is what the 60 s
//! margin is for.

#[macro_use]
mod common;

use common::{assert_same_tree, dir_bytes, reference_snapshot, Btrship, LoopBtrfs};
use rand::{Rng, SeedableRng};
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIG: usize = 256 << 10;

fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn ns(t: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(t)
        .unwrap()
        .timestamp_nanos_opt()
        .unwrap()
}

fn random(len: usize, rng: &mut rand::rngs::StdRng) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

/// A btrfs share and a machine that ships it (`init`, no units).
fn setup() -> (LoopBtrfs, std::path::PathBuf, std::path::PathBuf, Btrship) {
    let fs_ = LoopBtrfs::new(1024);
    let share = fs_.subvolume("share");
    let refs = fs_.dir("refs");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--no-systemd"]);
    (fs_, share, refs, bs)
}

fn set_policy(bs: &Btrship, all_within: &str) {
    let path = bs.config_dir.join("share.toml");
    let mut text = fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        "\n[retention]\nkeep_all_within = \"{all_within}\"\nkeep_hourly_within = \"0s\"\nkeep_daily_within = \"0s\"\nkeep_weekly_within = \"0s\"\nkeep_monthly_within = \"0s\"\nkeep_yearly_within = \"0s\"\n"
    ));
    fs::write(&path, text).unwrap();
}

fn prune_json(bs: &Btrship, extra: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let mut args = vec!["prune", "share", "--json"];
    args.extend(extra);
    let out = bs.cmd_env(args, env);
    assert!(
        out.status.success(),
        "prune failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("prune --json is JSON")
}

/// (moment time, kept) of every verdict of a prune report.
fn verdicts(report: &serde_json::Value) -> Vec<(i64, bool)> {
    report["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (ns(v["time"].as_str().unwrap()), v["keep"] == true))
        .collect()
}

/// Is the newest moment at or before `t` a kept one?
fn kept_at(verdicts: &[(i64, bool)], t: &str) -> bool {
    verdicts
        .iter()
        .filter(|v| v.0 <= ns(t))
        .max_by_key(|v| v.0)
        .is_some_and(|v| v.1)
}

/// Every object of a local repository with its size.
fn listing(repo: &Path) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = common::repo_objects(repo)
        .into_iter()
        .map(|(k, p)| (k, fs::metadata(p).unwrap().len()))
        .collect();
    out.sort();
    out
}

/// `restore share --at AT --to TO` from `bs`'s repository with only its
/// address and key (a fresh machine's command line).
fn restore_args(bs: &Btrship, at: &str, to: &Path) -> Vec<std::ffi::OsString> {
    osargs![
        "restore",
        "share",
        "--at",
        at,
        "--to",
        to,
        "--repo",
        bs.repo(),
        "--key-file",
        bs.key_file("share")
    ]
}

fn restore_at(fresh: &Btrship, bs: &Btrship, at: &str, to: &Path) -> std::process::Output {
    let out = fresh.cmd(restore_args(bs, at, to));
    assert!(
        out.status.success(),
        "restore --at {at}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// (acknowledged time, reference snapshot) of each moment made.
type Acked = Vec<(String, std::path::PathBuf)>;

/// Rounds of one close each (a fresh 256 KiB version of big.bin and a
/// small file), acknowledged by `sync`, a snapshot every third round.
fn make_history(bs: &Btrship, share: &Path, refs: &Path, rounds: usize, seed: u64) -> Acked {
    make_rounds(bs, share, refs, 0..rounds, seed)
}

fn make_rounds(
    bs: &Btrship,
    share: &Path,
    refs: &Path,
    rounds: std::ops::Range<usize>,
    seed: u64,
) -> Acked {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut acked = Vec::new();
    for i in rounds {
        fs::write(share.join("big.bin"), random(BIG, &mut rng)).unwrap();
        bs.sync("share");
        if i % 3 == 2 {
            bs.ok(["snapshot", "share"]);
        }
        let t = now_text();
        let r = refs.join(format!("r{i}"));
        reference_snapshot(share, &r);
        acked.push((t, r));
        std::thread::sleep(Duration::from_millis(250));
    }
    acked
}

#[test]
fn kept_moments_restore_exactly() {
    let (fs_, share, refs, bs) = setup();
    fs::write(share.join("keep.txt"), b"unchanged all along\n").unwrap();
    set_policy(&bs, "3s");
    let daemon = bs.start_daemon("share");
    let mut acked = make_rounds(&bs, &share, &refs, 0..5, 7);
    // A machine that read the history when it was short: its catalogue's
    // checked prefix ends inside the first block of 16 places, whose
    // objects prune deletes (a level-1 summary holds them).
    let reader = Btrship::new();
    let remote = osargs!["--repo", bs.repo(), "--key-file", bs.key_file("share")];
    let mut ls = osargs!["ls", "share"];
    ls.extend(remote.iter().cloned());
    reader.ok(ls.clone());
    // Past the 3 s window: the first rounds are forgotten however fast
    // the rest goes.
    std::thread::sleep(Duration::from_millis(3500));
    // Round 5 snapshots; a second pause puts it and everything before it
    // out of the window however fast the rest goes (otherwise round 6's
    // batch, in the window, keeps round 2's snapshot and what follows).
    acked.extend(make_rounds(&bs, &share, &refs, 5..6, 8));
    std::thread::sleep(Duration::from_millis(3500));
    acked.extend(make_rounds(&bs, &share, &refs, 6..14, 9));
    drop(daemon);

    // --dry-run changes nothing in the store.
    let before = listing(&bs.repo());
    let dry = prune_json(&bs, &["--dry-run"], &[]);
    assert_eq!(listing(&bs.repo()), before, "--dry-run wrote to the store");
    assert_eq!(dry["dry_run"], true);
    let forgotten = dry["moments_forgotten"].as_u64().unwrap();
    assert!(
        forgotten >= 5,
        "a 3 s policy forgets the first rounds: {forgotten} forgotten: {dry:#}"
    );
    for v in dry["verdicts"].as_array().unwrap() {
        if v["keep"] == true {
            assert!(!v["reasons"].as_array().unwrap().is_empty(), "{v}");
        }
    }

    // Forget and mark, then (marks aged) sweep.
    let size_before = dir_bytes(&bs.repo());
    let env = [("BTRSHIP_TEST_MIN_MARK_AGE", "0")];
    let first = prune_json(&bs, &["--grace", "0s"], &env);
    assert_eq!(
        first["moments_forgotten"], dry["moments_forgotten"],
        "{first:#}"
    );
    assert!(first["packs_marked"].as_u64().unwrap() > 0, "{first:#}");
    let second = prune_json(&bs, &["--grace", "0s"], &env);
    assert_eq!(second["moments_forgotten"], 0, "{second:#}");
    assert!(second["packs_deleted"].as_u64().unwrap() > 0, "{second:#}");
    let size_after = dir_bytes(&bs.repo());

    // The verdicts: moment times, kept or not.
    let verdicts = verdicts(&first);
    let kept_snapshot_times: Vec<i64> = first["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["keep"] == true && v["kind"] == "snapshot")
        .map(|v| ns(v["time"].as_str().unwrap()))
        .collect();
    let earliest_kept_snapshot = *kept_snapshot_times.iter().min().expect("a kept snapshot");
    // Versions of big.bin acknowledged before the earliest kept snapshot,
    // but the last of them (in that snapshot): no kept moment has them.
    let gone_versions = acked
        .iter()
        .filter(|(t, _)| ns(t) < earliest_kept_snapshot)
        .count()
        .saturating_sub(1);
    assert!(gone_versions >= 2, "history too short to test shrinking");
    let must_shrink = (gone_versions * BIG) as u64 * 9 / 10;
    assert!(
        size_before - size_after.min(size_before) >= must_shrink,
        "repository {size_before} -> {size_after} bytes; {gone_versions} forgotten versions of {BIG} bytes should have gone"
    );

    // Every acknowledged moment from a fresh machine.
    let fresh = Btrship::new();
    let out_dir = fs_.dir("out");
    for (i, (t, reference)) in acked.iter().enumerate() {
        let to = out_dir.join(format!("m{i}"));
        let kept_before = verdicts.iter().any(|v| v.1 && v.0 <= ns(t));
        if !kept_before {
            // Nothing kept at or before it: the not-found exit code.
            fresh.fails(restore_args(&bs, t, &to), 3);
            continue;
        }
        let out = restore_at(&fresh, &bs, t, &to);
        match kept_at(&verdicts, t) {
            true => assert_same_tree(reference, &to),
            false => {
                // Forgotten: the newest kept moment before it.
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(
                    stderr.contains("retention forgot"),
                    "restore of a forgotten moment says so: {stderr}"
                );
                let kept = verdicts
                    .iter()
                    .filter(|v| v.1 && v.0 <= ns(t))
                    .map(|v| v.0)
                    .max()
                    .expect("a kept moment before every acknowledged one");
                let kept_text = chrono::DateTime::<chrono::Utc>::from_timestamp_nanos(kept)
                    .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
                let to2 = out_dir.join(format!("k{i}"));
                restore_at(&fresh, &bs, &kept_text, &to2);
                assert_same_tree(&to2, &to);
            }
        }
    }
    bs.ok(["check", "share", "--read-data"]);
    fresh.ok(osargs![
        "check",
        "share",
        "--read-data",
        "--repo",
        bs.repo(),
        "--key-file",
        bs.key_file("share")
    ]);
    // The reader with the short prefix reads on from it.
    assert!(
        second["history_objects_deleted"].as_u64().unwrap()
            + first["history_objects_deleted"].as_u64().unwrap()
            > 0
    );
    reader.ok(ls);
    let (t, reference) = acked.last().unwrap();
    let to = out_dir.join("reader");
    restore_at(&reader, &bs, t, &to);
    assert_same_tree(reference, &to);
    // Local snapshots of forgotten moments went with them.
    let local: Vec<String> = first["local"]["snapshots_deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    assert!(!local.is_empty(), "{first:#}");
}

#[test]
fn prune_beside_the_daemon_loses_nothing() {
    let (fs_, share, refs, bs) = setup();
    set_policy(&bs, "10s");
    let daemon = bs.start_daemon("share");
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut acked = Vec::new();
    let started = Instant::now();
    let mut last_prune = Instant::now();
    let mut prunes = 0;
    let (mut deleted, mut marked, mut recovered) = (0, 0, 0);
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(100) {
        // Content repeats now and then, so ships deduplicate against
        // packs that prune marks.
        let data = if rng.gen_bool(0.3) && i > 4 {
            let mut r2 = rand::rngs::StdRng::seed_from_u64(rng.gen_range(0..4));
            random(BIG, &mut r2)
        } else {
            random(BIG, &mut rng)
        };
        fs::write(share.join(format!("f{}", i % 3)), data).unwrap();
        bs.sync("share");
        if i % 7 == 6 {
            bs.ok(["snapshot", "share"]);
        }
        let t = now_text();
        let r = refs.join(format!("r{i}"));
        reference_snapshot(&share, &r);
        acked.push((t, r));
        if last_prune.elapsed() > Duration::from_secs(4) {
            let p = prune_json(&bs, &["--grace", "0s"], &[]);
            deleted += p["packs_deleted"].as_u64().unwrap();
            marked += p["packs_marked"].as_u64().unwrap();
            recovered += p["packs_recovered"].as_u64().unwrap();
            prunes += 1;
            last_prune = Instant::now();
        }
        i += 1;
    }
    drop(daemon);
    assert!(prunes >= 10, "{prunes} prunes");
    eprintln!("{prunes} prunes beside the daemon: {marked} packs marked, {recovered} recovered, {deleted} deleted; {i} moments acknowledged");
    assert!(
        deleted > 0,
        "no pack was ever deleted in {prunes} prunes ({marked} marked)"
    );
    // The policy keeps 10 s back from the newest moment.
    let last = prune_json(&bs, &["--dry-run"], &[]);
    let verdicts = verdicts(&last);
    let fresh = Btrship::new();
    let out_dir = fs_.dir("out");
    let mut checked = 0;
    for (i, (t, reference)) in acked.iter().enumerate() {
        if kept_at(&verdicts, t) {
            let to = out_dir.join(format!("m{i}"));
            restore_at(&fresh, &bs, t, &to);
            assert_same_tree(reference, &to);
            checked += 1;
        }
    }
    assert!(checked >= 5, "{checked} kept moments checked");
    bs.ok(["check", "share", "--read-data"]);
}

#[test]
fn killed_prune_leaves_a_clean_repository() {
    let (fs_, share, refs, bs) = setup();
    set_policy(&bs, "2s");
    let daemon = bs.start_daemon("share");
    let acked = make_history(&bs, &share, &refs, 12, 3);
    drop(daemon);
    let kills: usize = std::env::var("BTRSHIP_PRUNE_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for k in 0..kills {
        let mut child = Command::new(env!("CARGO_BIN_EXE_btrship"))
            .args(bs.full_args(["--no-progress", "prune", "share", "--grace", "0s"]))
            .env("BTRSHIP_TEST_MIN_MARK_AGE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
        let _ = child.kill();
        let status = child.wait().unwrap();
        let out = bs.cmd(["check", "share", "--read-data"]);
        assert!(
            out.status.success(),
            "check after kill {k} (prune {status}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Finished runs after all that: clean, and the newest moment exact.
    let env = [("BTRSHIP_TEST_MIN_MARK_AGE", "0")];
    prune_json(&bs, &["--grace", "0s"], &env);
    prune_json(&bs, &["--grace", "0s"], &env);
    bs.ok(["check", "share", "--read-data"]);
    let fresh = Btrship::new();
    let (t, reference) = acked.last().unwrap();
    let to = fs_.dir("out").join("newest");
    restore_at(&fresh, &bs, t, &to);
    assert_same_tree(reference, &to);
}

#[test]
fn prune_on_s3() {
    use common::s3env::{aws_test_env, create_bucket, skipped, Moto};
    if skipped("the S3 prune test") {
        return;
    }
    let moto = Moto::start();
    aws_test_env();
    let bucket = format!("btrship-prune-{}", std::process::id());
    let url = format!(
        "s3://{bucket}/office?endpoint={}&region=us-east-1",
        moto.endpoint
    );
    create_bucket(&moto.endpoint, &bucket);
    let fs_ = LoopBtrfs::new(1024);
    let share = fs_.subvolume("share");
    let refs = fs_.dir("refs");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--repo", &url, "--no-systemd"]);
    set_policy(&bs, "2s");
    let daemon = bs.start_daemon("share");
    let acked = make_history(&bs, &share, &refs, 10, 9);
    drop(daemon);
    let env = [("BTRSHIP_TEST_MIN_MARK_AGE", "0")];
    let first = prune_json(&bs, &["--grace", "0s"], &env);
    assert!(
        first["moments_forgotten"].as_u64().unwrap() > 0,
        "{first:#}"
    );
    let second = prune_json(&bs, &["--grace", "0s"], &env);
    assert!(second["packs_deleted"].as_u64().unwrap() > 0, "{second:#}");
    let verdicts = verdicts(&first);
    let fresh = Btrship::new();
    let key = bs.key_file("share");
    fresh.ok(osargs![
        "check",
        "share",
        "--read-data",
        "--repo",
        &url,
        "--key-file",
        &key
    ]);
    let mut checked = 0;
    for (i, (t, reference)) in acked.iter().enumerate() {
        if kept_at(&verdicts, t) {
            let to = fs_.dir("out").join(format!("m{i}"));
            fresh.ok(osargs![
                "restore",
                "share",
                "--at",
                t,
                "--to",
                &to,
                "--repo",
                &url,
                "--key-file",
                &key
            ]);
            assert_same_tree(reference, &to);
            checked += 1;
        }
    }
    assert!(checked >= 2, "{checked} kept moments checked");
}

#[test]
fn repack_moves_what_is_used_and_frees_the_rest() {
    let (fs_, share, refs, bs) = setup();
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    // Ten files in the start-up snapshot's one pack; eight change later.
    for i in 0..10 {
        fs::write(share.join(format!("f{i}")), random(64 << 10, &mut rng)).unwrap();
    }
    set_policy(&bs, "2s");
    let daemon = bs.start_daemon("share");
    for i in 0..8 {
        fs::write(share.join(format!("f{i}")), random(64 << 10, &mut rng)).unwrap();
        bs.sync("share");
    }
    // Then quiet past the 2 s window, a snapshot, and a few closes of
    // another file: every moment before that snapshot is forgotten.
    std::thread::sleep(Duration::from_millis(2500));
    bs.ok(["snapshot", "share"]);
    let mut acked = Vec::new();
    for i in 0..3 {
        fs::write(share.join("g"), random(4 << 10, &mut rng)).unwrap();
        bs.sync("share");
        let r = refs.join(format!("r{i}"));
        let t = now_text();
        reference_snapshot(&share, &r);
        acked.push((t, r));
    }
    drop(daemon);
    let env = [("BTRSHIP_TEST_MIN_MARK_AGE", "0")];
    let first = prune_json(&bs, &["--grace", "0s"], &env);
    assert!(first["packs_repacked"].as_u64().unwrap() >= 1, "{first:#}");
    let moved = first["bytes_repacked"].as_u64().unwrap();
    assert!(
        moved >= 2 * (64 << 10),
        "the two unchanged files move: {first:#}"
    );
    assert!(moved < 6 * (64 << 10), "only what is used moves: {first:#}");
    let second = prune_json(&bs, &["--grace", "0s"], &env);
    assert!(second["packs_deleted"].as_u64().unwrap() >= 1, "{second:#}");
    assert_eq!(
        second["packs_repacked"], 0,
        "nothing left to repack: {second:#}"
    );
    bs.ok(["check", "share", "--read-data"]);
    // The newest moment needs the moved copies of f8 and f9.
    let fresh = Btrship::new();
    let (t, reference) = acked.last().unwrap();
    let to = fs_.dir("out").join("newest");
    restore_at(&fresh, &bs, t, &to);
    assert_same_tree(reference, &to);
    // And the shipping machine, which dedups against them, still ships.
    let daemon = bs.start_daemon("share");
    fs::write(share.join("f9b"), fs::read(share.join("f9")).unwrap()).unwrap();
    bs.sync("share");
    drop(daemon);
    bs.ok(["check", "share", "--read-data"]);
}
