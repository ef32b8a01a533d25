//! Damage to the store that shipping must heal: a pack object deleted from
//! the repository. Through the real binary on a real btrfs (loop device;
//! needs root and btrfs-progs), local repository.
//!
//! - `check` names the lost pack; the next `snapshot` of the unchanged
//!   share uploads its blobs again; a fresh machine then restores the newest
//!   moment exactly and `check --read-data` finds no problem (the lost pack
//!   is a "healed" warning);
//! - `repair` reads lost chunks back from the local snapshot, and reports
//!   what no local copy holds any more (exit code 5).
//!
//! Run: `cargo test --test repair -- --test-threads=1` (as root).

#[macro_use]
mod common;

use common::*;
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const SHARE: &str = "share";

fn setup() -> (LoopBtrfs, PathBuf, Btrship) {
    let fs_ = LoopBtrfs::new(1024);
    let share = fs_.subvolume(SHARE);
    let b = Btrship::new();
    b.ok(osargs!["init", &share, "--name", SHARE, "--no-systemd"]);
    (fs_, share, b)
}

/// Pack objects in the repository, as (name, path).
fn packs(repo: &Path) -> BTreeSet<(String, PathBuf)> {
    repo_objects(repo)
        .into_iter()
        .filter(|(name, _)| name.starts_with("packs/"))
        .collect()
}

fn snapshot(b: &Btrship) -> SnapshotInfo {
    let before = b.snapshot_list(SHARE).len();
    b.ok(osargs!["snapshot", SHARE]);
    let list = b.snapshot_list(SHARE);
    assert_eq!(list.len(), before + 1, "one snapshot more");
    list.last().expect("a snapshot").clone()
}

/// A machine with only the repository and a copy of the key.
fn fresh_restore(b: &Btrship, to: &Path) {
    let fresh = Btrship::new();
    let key = fresh.config_dir.with_file_name("saved.key");
    fs::copy(b.key_file(SHARE), &key).expect("copy key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod key");
    let repo = b.repo();
    fresh.ok(osargs![
        "restore",
        SHARE,
        "--at",
        "now",
        "--repo",
        &repo,
        "--key-file",
        &key,
        "--special-files",
        "--to",
        to
    ]);
    let out = fresh.ok(osargs![
        "check",
        SHARE,
        "--read-data",
        "--repo",
        &repo,
        "--key-file",
        &key
    ]);
    assert!(
        out.contains("0 problems"),
        "check --read-data on a fresh machine:\n{out}"
    );
}

#[test]
fn lost_pack_is_uploaded_again_by_the_next_snapshot() {
    let (fs_, share, b) = setup();
    let mut m = Mutator::new(31);
    m.budget = 6 * MIB;
    m.populate(&share, 60);
    snapshot(&b);
    let first = packs(&b.repo());
    assert!(!first.is_empty(), "the first ship wrote no pack");
    // The store loses one pack (the largest: it holds data).
    let (lost, lost_path) = first
        .iter()
        .max_by_key(|(_, p)| fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .cloned()
        .expect("a pack");
    fs::remove_file(&lost_path).expect("delete the pack");

    let out = b.fails(osargs!["check", SHARE], 5);
    assert!(
        out.contains(&lost),
        "check does not name the lost pack {lost}:\n{out}"
    );

    // The share did not change; the next snapshot uploads what was lost.
    let refs = fs_.dir("refs");
    reference_snapshot(&share, &refs.join("1"));
    snapshot(&b);
    let second = packs(&b.repo());
    let new: Vec<_> = second.difference(&first).collect();
    assert!(
        !new.is_empty(),
        "the snapshot after the loss of {lost} uploaded no pack: its data is gone for good"
    );
    let out = b.ok(osargs!["check", SHARE, "--read-data"]);
    assert!(
        out.contains("0 problems") && out.contains("healed"),
        "check after the heal:\n{out}"
    );

    let to = fs_.dir("restores").join("fresh");
    fresh_restore(&b, &to);
    assert_same_tree(&refs.join("1"), &to);

    // A later change ships incrementally again (no full walk forever).
    fs::write(share.join("after-heal.txt"), b"later").expect("write");
    let out = b.ok(osargs!["snapshot", SHARE, "--json"]);
    assert!(
        out.contains("\"mode\": \"btrfs\""),
        "the ship after the heal did not use btrfs change detection:\n{out}"
    );
}

#[test]
fn repair_reads_back_local_data_and_reports_what_is_lost() {
    let (fs_, share, b) = setup();
    b.set_config(SHARE, "keep_local_snapshots", "1");
    write_random_file(&share.join("kept.bin"), 700 * KIB, 1);
    write_random_file(&share.join("gone.bin"), 300 * KIB, 2);
    let s0 = snapshot(&b);
    let first = packs(&b.repo());
    // gone.bin changes: its first version lives only in the first packs
    // and in the first snapshot, which is pruned locally (keep 1).
    write_random_file(&share.join("gone.bin"), 200 * KIB, 3);
    let refs = fs_.dir("refs");
    reference_snapshot(&share, &refs.join("1"));
    let s1 = snapshot(&b);
    for (_, p) in &first {
        fs::remove_file(p).expect("delete a pack");
    }

    let (code, _err, out) = b.fails_with(osargs!["repair", SHARE, "--json"], &[5]);
    assert_eq!(code, 5);
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("repair --json is not JSON ({e}):\n{out}"));
    let r = &v["report"];
    assert_eq!(v["ok"], false, "{out}");
    let missing: BTreeSet<String> = r["missing_packs"]
        .as_array()
        .expect("missing_packs")
        .iter()
        .filter_map(|p| p.as_str().map(String::from))
        .collect();
    let expected: BTreeSet<String> = first.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(missing, expected, "{out}");
    assert!(
        r["recovered_blobs"].as_u64().unwrap_or(0) >= 1,
        "kept.bin is in the local snapshot and was not read back:\n{out}"
    );
    assert!(r["lost_blobs"].as_u64().unwrap_or(0) >= 1, "{out}");
    let lost = r["lost"].as_array().expect("lost");
    assert!(
        lost.iter().any(|l| l["object"] == s0.record.as_str()),
        "the first snapshot's record is not reported lost:\n{out}"
    );
    assert!(
        lost.iter().all(|l| l["object"] != s1.record.as_str()),
        "the second snapshot is whole again, yet reported lost:\n{out}"
    );

    // The newest moment restores on a fresh machine.
    let fresh = Btrship::new();
    let key = fresh.config_dir.with_file_name("saved.key");
    fs::copy(b.key_file(SHARE), &key).expect("copy key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod key");
    let to = fs_.dir("restores").join("fresh");
    fresh.ok(osargs![
        "restore",
        SHARE,
        "--at",
        &s1.time,
        "--repo",
        &b.repo(),
        "--key-file",
        &key,
        "--special-files",
        "--to",
        &to
    ]);
    assert_same_tree(&refs.join("1"), &to);
    // The old moment is damaged for good: check still says so.
    b.fails(osargs!["check", SHARE], 5);
}

#[test]
fn repair_reads_back_a_daemon_version_from_its_staging_clone() {
    let (fs_, share, b) = setup();
    let daemon = b.start_daemon(SHARE);
    b.sync(SHARE);
    let before = packs(&b.repo());
    write_random_file(&share.join("saved.bin"), 100 * KIB, 7);
    b.sync(SHARE);
    daemon.terminate();
    let refs = fs_.dir("refs");
    reference_snapshot(&share, &refs.join("now"));
    // The pack of that version batch is lost; only the staging clone
    // (the daemon's baseline of saved.bin) still holds its data.
    let new: Vec<_> = packs(&b.repo()).difference(&before).cloned().collect();
    assert!(!new.is_empty(), "the daemon shipped no pack");
    for (_, p) in &new {
        fs::remove_file(p).expect("delete a pack");
    }
    let out = b.ok(osargs!["repair", SHARE, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("repair --json");
    assert_eq!(v["ok"], true, "{out}");
    assert!(
        out.contains("staging clones"),
        "repair did not read the staging clone:\n{out}"
    );
    let to = fs_.dir("restores").join("fresh");
    fresh_restore(&b, &to);
    assert_same_tree(&refs.join("now"), &to);
}
