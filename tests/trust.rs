//! Trust: several hosts never mix, and a store that withholds, deletes or
//! rolls back history is noticed (FORMAT.md §2 and §5, history chain).
//! Real loop-mounted btrfs, the real binary, two UTS namespaces for two
//! hosts.

#[macro_use]
mod common;

use common::*;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Runs btrship for machine `bs` inside a new UTS namespace whose host name
/// is `host` (a second machine, as far as host names go).
fn on_host(bs: &Btrship, host: &str, args: &[OsString]) -> String {
    let mut full: Vec<OsString> = vec![
        "--uts".into(),
        "--".into(),
        "sh".into(),
        "-c".into(),
        "hostname \"$1\" && shift && exec \"$@\"".into(),
        "sh".into(),
        host.into(),
        env!("CARGO_BIN_EXE_btrship").into(),
        "--config-dir".into(),
        bs.config_dir.clone().into(),
        "--state-dir".into(),
        bs.state_dir.clone().into(),
        "--no-progress".into(),
    ];
    full.extend(args.iter().cloned());
    let out = Command::new("unshare")
        .args(&full)
        .stdin(Stdio::null())
        .output()
        .expect("run unshare (util-linux)");
    assert!(
        out.status.success(),
        "btrship {args:?} on host {host} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn write(path: &Path, text: &str) {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p).unwrap();
    }
    fs::write(path, text).unwrap();
}

fn fresh_args(bs: &Btrship, name: &str) -> Vec<OsString> {
    osargs!["--repo", bs.repo(), "--key-file", bs.key_file(name)]
}

#[test]
fn two_hosts_with_one_share_name_never_mix() {
    // Two machines: two filesystems (the private snapshot area is per
    // filesystem and share name).
    let lb = LoopBtrfs::new(256);
    let lb_b = LoopBtrfs::new(256);
    let share_a = lb.subvolume("office");
    let share_b = lb_b.subvolume("office");
    write(&share_a.join("who.txt"), "host A's file\n");
    write(&share_b.join("who.txt"), "host B's file, longer\n");
    write(&share_b.join("only-b/x"), "b\n");
    let a = Btrship::new();
    let b = Btrship::new();
    on_host(
        &a,
        "files-a",
        &osargs!["init", &share_a, "--name", "office", "--no-systemd"],
    );
    let mut init_b = osargs!["init", &share_b, "--name", "office", "--no-systemd"];
    init_b.extend(osargs![
        "--repo",
        a.repo(),
        "--key-file",
        a.key_file("office")
    ]);
    on_host(&b, "files-b", &init_b);
    on_host(&a, "files-a", &osargs!["snapshot", "office"]);
    on_host(&b, "files-b", &osargs!["snapshot", "office"]);
    // B ships a second snapshot after A's: newest in the repository.
    write(&share_b.join("who.txt"), "host B's file, changed\n");
    on_host(&b, "files-b", &osargs!["snapshot", "office"]);

    // On A: only A's history, by default, with the host shown.
    let list = json(&a.ok(["snapshots", "office", "--json"]));
    assert_eq!(list["host"], "files-a", "{list}");
    let snaps = list["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 1, "{list}");
    assert!(snaps.iter().all(|s| s["host"] == "files-a"), "{list}");
    let to_a = lb.dir("restore-a");
    a.ok(osargs!["restore", "office", "--at", "now", "--to", &to_a]);
    assert_same_tree(&share_a, &to_a);

    // A fresh machine must choose: one line naming both hosts.
    let fresh = Btrship::new();
    let mut args = osargs!["restore", "office", "--at", "now", "--to", lb.dir("x")];
    args.extend(fresh_args(&a, "office"));
    let err = fresh.fails(&args, 2);
    assert!(
        err.contains("files-a") && err.contains("files-b") && err.contains("--host"),
        "{err}"
    );
    let to_b = lb.dir("restore-b");
    let mut args = osargs!["restore", "office", "--at", "now", "--to", &to_b, "--host", "files-b"];
    args.extend(fresh_args(&a, "office"));
    fresh.ok(&args);
    assert_same_tree(&share_b, &to_b);
    let mut args = osargs!["snapshots", "office", "--json", "--host", "files-b"];
    args.extend(fresh_args(&a, "office"));
    let list = json(&fresh.ok(&args));
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 2, "{list}");
    assert!(list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["host"] == "files-b"));
    // An unknown host is named as such.
    let mut args = osargs!["snapshots", "office", "--host", "files-c"];
    args.extend(fresh_args(&a, "office"));
    let err = fresh.fails(&args, 3);
    assert!(err.contains("files-c"), "{err}");
    // Both chains are intact.
    let mut args = osargs!["check", "office", "--json"];
    args.extend(fresh_args(&a, "office"));
    let report = json(&fresh.ok(&args));
    assert_eq!(report["report"]["histories"], 2, "{report}");
}

#[test]
fn init_of_a_second_share_with_default_options_shares_the_key() {
    let lb = LoopBtrfs::new(256);
    let one = lb.subvolume("one");
    let two = lb.subvolume("two");
    write(&one.join("a"), "1");
    write(&two.join("b"), "2");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &one, "--no-systemd"]);
    let out = bs.ok(osargs!["init", &two, "--no-systemd"]);
    assert!(
        out.contains("one.key"),
        "the second share uses the first's key: {out}"
    );
    assert!(
        !bs.key_file("two").exists(),
        "no orphan key file for the second share"
    );
    bs.ok(["snapshot", "one"]);
    bs.ok(["snapshot", "two"]);
    let to = lb.dir("r2");
    bs.ok(osargs!["restore", "two", "--at", "now", "--to", &to]);
    assert_same_tree(&two, &to);

    // One damaged record of another share blocks nothing of this one
    // (reading one share's history reads no object of another's): check
    // names it.
    let two_records = bs.snapshot_list("two");
    let victim = bs.repo().join(&two_records[0].record);
    let mut bytes = fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    fs::write(&victim, bytes).unwrap();
    let to1 = lb.dir("r1");
    let out = bs.cmd(osargs!["restore", "one", "--at", "now", "--to", &to1]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_tree(&one, &to1);
    let err = bs.fails(["check", "one"], 5);
    assert!(err.contains(&two_records[0].record), "{err}");

    // A repository made with a key that no share here has: refused before
    // any key file is written.
    let other = Btrship::new();
    let three = lb.subvolume("three");
    let err = other.fails(
        osargs!["init", &three, "--no-systemd", "--repo", bs.repo()],
        4,
    );
    assert!(err.contains("--key-file"), "{err}");
    assert!(!other.key_file("three").exists(), "no orphan key file");
}

/// Object names of one history kind in a local repository, oldest file
/// first (the order they were written).
fn history_files(repo: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = repo_objects(repo)
        .into_iter()
        .filter(|(name, _)| name.starts_with(prefix))
        .map(|(_, p)| (fs::metadata(&p).unwrap().modified().unwrap(), p))
        .collect();
    files.sort();
    files.into_iter().map(|(_, p)| p).collect()
}

#[test]
fn withheld_snapshot_records_are_noticed() {
    let lb = LoopBtrfs::new(256);
    let share = lb.subvolume("office");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--no-systemd"]);
    for i in 0..3 {
        write(&share.join("doc.txt"), &format!("version {i}\n"));
        bs.ok(["snapshot", "office"]);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let list = bs.snapshot_list("office");
    assert_eq!(list.len(), 3);
    let record = |i: usize| bs.repo().join(&list[i].record);
    let fresh = Btrship::new();
    let mut fresh_check = osargs!["check", "office"];
    fresh_check.extend(fresh_args(&bs, "office"));

    // The middle record withheld: a gap anyone with the key sees.
    let middle = fs::read(record(1)).unwrap();
    fs::remove_file(record(1)).unwrap();
    let err = fresh.fails(&fresh_check, 5);
    assert!(
        err.contains(&list[1].record),
        "names the missing record: {err}"
    );
    let err = bs.fails(["check", "office"], 5);
    assert!(err.contains(&list[1].record), "{err}");
    let mut args = osargs!["restore", "office", "--at", "now", "--to", lb.dir("r0")];
    args.extend(fresh_args(&bs, "office"));
    let err = fresh.fails(&args, 5);
    assert!(err.contains("--allow-gaps"), "{err}");
    let to = lb.dir("r1");
    let mut args = osargs![
        "restore",
        "office",
        "--at",
        "now",
        "--to",
        &to,
        "--allow-gaps"
    ];
    args.extend(fresh_args(&bs, "office"));
    fresh.ok(&args);
    assert_eq!(
        fs::read_to_string(to.join("doc.txt")).unwrap(),
        "version 2\n"
    );
    fs::write(record(1), middle).unwrap();
    fresh.ok(&fresh_check);

    // The newest record withheld: a fresh machine cannot tell (FORMAT.md
    // §2), the shipping machine can, with or without --repo/--key-file.
    fs::remove_file(record(2)).unwrap();
    fresh.ok(&fresh_check);
    let err = bs.fails(["check", "office"], 5);
    assert!(
        err.contains("behind") || err.contains(&list[2].record),
        "{err}"
    );
    let mut args = osargs!["check", "office"];
    args.extend(fresh_args(&bs, "office"));
    bs.fails(&args, 5);
    let err = bs.fails(
        osargs!["restore", "office", "--at", "now", "--to", lb.dir("r2")],
        5,
    );
    assert!(
        err.contains(&list[2].record),
        "names what is missing: {err}"
    );
    let err = bs.fails(["snapshot", "office"], 5);
    assert!(err.contains("repair"), "{err}");
}

#[test]
fn a_withheld_version_batch_is_noticed() {
    let lb = LoopBtrfs::new(256);
    let share = lb.subvolume("office");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--no-systemd"]);
    bs.set_config("office", "settle_ms", "100");
    let daemon = bs.start_daemon("office");
    write(&share.join("gone.txt"), "will be deleted\n");
    bs.sync("office");
    write(&share.join("doc.txt"), "first\n");
    bs.sync("office");
    write(&share.join("doc.txt"), "second\n");
    fs::remove_file(share.join("gone.txt")).unwrap();
    bs.sync("office");
    assert!(daemon.terminate().success());
    let batches = history_files(&bs.repo(), "versions/");
    assert!(batches.len() >= 2, "{batches:?}");
    let newest = batches.last().unwrap().clone();
    let name = newest
        .strip_prefix(bs.repo())
        .unwrap()
        .display()
        .to_string();
    fs::remove_file(&newest).unwrap();
    // Before chains: check said 0 problems and restore silently gave the
    // older content with the deleted file back.
    let err = bs.fails(["check", "office"], 5);
    assert!(err.contains(&name), "{err}");
    let err = bs.fails(
        osargs!["restore", "office", "--at", "now", "--to", lb.dir("r")],
        5,
    );
    assert!(err.contains(&name), "{err}");
    let err = bs.fails(osargs!["ls", "office"], 5);
    assert!(err.contains(&name), "{err}");
}

fn local_snapshots(lb: &LoopBtrfs) -> Vec<String> {
    run(
        "btrfs",
        &[
            OsString::from("subvolume"),
            "list".into(),
            "-a".into(),
            lb.mnt.clone().into(),
        ],
    )
    .lines()
    .filter_map(|l| l.split("@GMT-").nth(1).map(|s| format!("@GMT-{s}")))
    .collect()
}

#[test]
fn a_rolled_back_repository_stops_shipping_and_keeps_the_last_copy() {
    let lb = LoopBtrfs::new(256);
    let share = lb.subvolume("office");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--no-systemd"]);
    bs.set_config("office", "keep_local_snapshots", "1");
    write(&share.join("doc.txt"), "one\n");
    bs.ok(["snapshot", "office"]);
    let old = lb.dir("old-repo");
    run(
        "cp",
        &[
            OsString::from("-a"),
            bs.repo().join(".").into(),
            old.clone().into(),
        ],
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    write(&share.join("doc.txt"), "two\n");
    bs.ok(["snapshot", "office"]);
    let before = local_snapshots(&lb);
    assert_eq!(before.len(), 1, "keep_local_snapshots = 1: {before:?}");
    // The store is replaced by its older copy.
    fs::remove_dir_all(bs.repo()).unwrap();
    fs::create_dir(bs.repo()).unwrap();
    run(
        "cp",
        &[OsString::from("-a"), old.join(".").into(), bs.repo().into()],
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    write(&share.join("doc.txt"), "three\n");
    let err = bs.fails(["snapshot", "office"], 5);
    assert!(err.contains("repair"), "{err}");
    let after = local_snapshots(&lb);
    assert!(
        before.iter().all(|s| after.contains(s)),
        "the local snapshot whose record the store lost is kept: before {before:?}, after {after:?}"
    );
    // repair declares the lost places, queues the kept snapshot again, and
    // the history goes on.
    let (code, err, out) = bs.fails_with(["repair", "office", "--json"], &[5]);
    assert_eq!(code, 5);
    let report = json(&out);
    assert!(!report["history_lost"].is_null(), "{report}\n{err}");
    bs.ok(["snapshot", "office"]);
    let to = lb.dir("after-repair");
    bs.ok(osargs!["restore", "office", "--at", "now", "--to", &to]);
    assert_same_tree(&share, &to);
    let report = json(&bs.ok(["check", "office", "--json"]));
    assert_eq!(report["ok"], true, "{report}");
    let warnings = report["report"]["warnings"].to_string();
    assert!(warnings.contains("declared lost"), "{warnings}");
    // Every point in time the machine still had is in the store again.
    let times: Vec<String> = bs
        .snapshot_list("office")
        .into_iter()
        .map(|s| s.snapshot)
        .collect();
    assert!(
        before.iter().all(|s| times.contains(s)),
        "{before:?} shipped again: {times:?}"
    );
}
