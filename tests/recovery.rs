//! Recovery after an attack on a versioned bucket (FORMAT.md §12a), on
//! real btrfs with S3 (moto, a bucket with versioning on):
//!
//! - `the_master_key_reads_through_overwrites_and_delete_markers`: the
//!   server ships snapshots and per-close versions; then an attacker with
//!   its credentials overwrites half of the repository's objects with
//!   garbage and hides the other half behind delete markers. A fresh
//!   machine cannot restore from what the bucket shows now; with
//!   `--recover-versions` it restores every acknowledged moment exactly
//!   and `check --read-data` is clean.

#[macro_use]
mod common;

use common::s3env::{aws_test_env, create_locked_bucket, overwrite_or_hide_all, skipped, Moto};
use common::{assert_same_tree, reference_snapshot, Btrship, LoopBtrfs};
use std::fs;

fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

#[test]
fn the_master_key_reads_through_overwrites_and_delete_markers() {
    if skipped("the versioned-bucket recovery test") {
        return;
    }
    let moto = Moto::start();
    aws_test_env();
    let bucket = format!("btrship-recover-{}", std::process::id());
    let admin = create_locked_bucket(&moto.endpoint, &bucket);
    let url = format!(
        "s3://{bucket}/office?endpoint={}&region=us-east-1",
        moto.endpoint
    );
    let fs_ = LoopBtrfs::new(1024);
    let share = fs_.subvolume("share");
    let refs = fs_.dir("refs");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--repo", &url, "--no-systemd"]);

    let mut acked = Vec::new();
    let mut ack = |label: &str| {
        let t = now_text();
        let r = refs.join(label);
        reference_snapshot(&share, &r);
        acked.push((t, r));
    };
    fs::create_dir(share.join("docs")).unwrap();
    for i in 0..10 {
        fs::write(
            share.join(format!("docs/f{i}.txt")),
            format!("file {i}\n").repeat(100 * (i + 1)),
        )
        .unwrap();
    }
    fs::write(share.join("big.bin"), vec![0x5a; 2 << 20]).unwrap();
    bs.ok(["snapshot", "share"]);
    ack("s1");
    let daemon = bs.start_daemon("share");
    for round in 0..3 {
        fs::write(
            share.join(format!("docs/f{round}.txt")),
            format!("round {round}\n"),
        )
        .unwrap();
        bs.sync("share");
        ack(&format!("d{round}"));
    }
    drop(daemon);
    fs::write(share.join("docs/last.txt"), b"the last snapshot\n").unwrap();
    bs.ok(["snapshot", "share"]);
    ack("s2");

    // The attack, with the server's (write) credentials.
    let objects = overwrite_or_hide_all(&admin, &bucket, "office/");
    assert!(objects > 10, "{objects} objects");

    let fresh = Btrship::new();
    let key = bs.key_file("share");
    let (t, _) = &acked[0];
    let to = fs_.dir("out").join("plain");
    let (code, _, _) = fresh.fails_with(
        osargs![
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
        ],
        &[3, 4, 5, 9],
    );
    assert_ne!(code, 0);

    let recover = osargs!["--repo", &url, "--key-file", &key, "--recover-versions"];
    for (i, (t, reference)) in acked.iter().enumerate() {
        let to = fs_.dir("out").join(format!("m{i}"));
        let mut args = osargs!["restore", "share", "--at", t, "--to", &to];
        args.extend(recover.iter().cloned());
        fresh.ok(args);
        assert_same_tree(reference, &to);
    }
    let mut check = osargs!["check", "share", "--read-data"];
    check.extend(recover.iter().cloned());
    fresh.ok(check);
}
