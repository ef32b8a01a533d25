//! S3 Object Lock (FORMAT.md §12b) on real btrfs with S3 (moto, which
//! enforces locked versions against deletion but not retention changes:
//! the lock dates are checked on every object version instead):
//!
//! - `init_refuses_a_bucket_without_object_lock`: one line naming the
//!   bucket, exit 2, nothing written.
//! - `a_locked_repository_survives_the_server`: a server with only the
//!   ship-only key ships into a repository made with `--object-lock`:
//!   every object version is locked (COMPLIANCE, until at least its write
//!   plus the duration). A prune with the master key forgets, marks and sweeps, but
//!   deletes no locked object (it says how many wait) and extends the lock
//!   of what stays once half the duration has passed. After the attacker
//!   overwrites every object and hides it behind delete markers, the
//!   master key restores the newest moment exactly through the versions
//!   and `check --read-data` is clean.
//! - `every_moment_restores_after_an_attack_on_a_locked_repository`: the
//!   server's credentials cannot delete any locked version; after every
//!   object is overwritten or hidden, what the bucket shows no longer
//!   restores, and through `--recover-versions` (FORMAT.md §12a) every
//!   acknowledged moment restores exactly from a fresh machine with the
//!   master key and `check --read-data` is clean.

#[macro_use]
mod common;

use common::s3env::{
    aws_test_env, bucket_store, create_bucket, create_locked_bucket, overwrite_or_hide_all,
    skipped, Moto,
};
use common::{assert_same_tree, reference_snapshot, Btrship, LoopBtrfs};
use std::collections::HashMap;
use std::fs;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Every version under `prefix`: key -> [(version id, mode, retain-until
/// seconds)].
fn locks(
    store: &btrship_upload::s3::S3Store,
    bucket: &str,
    prefix: &str,
) -> HashMap<String, Vec<(String, String, i64)>> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut out: HashMap<String, Vec<(String, String, i64)>> = HashMap::new();
        for v in store.list_versions(prefix).await.unwrap() {
            if v.delete_marker {
                continue;
            }
            let head = store
                .client()
                .head_object()
                .bucket(bucket)
                .key(&v.key)
                .version_id(&v.version_id)
                .send()
                .await
                .unwrap();
            let mode = head
                .object_lock_mode()
                .map(|m| m.as_str().to_string())
                .unwrap_or_default();
            let until = head.object_lock_retain_until_date().map_or(0, |d| d.secs());
            out.entry(v.key.clone())
                .or_default()
                .push((v.version_id.clone(), mode, until));
        }
        out
    })
}

#[test]
fn init_refuses_a_bucket_without_object_lock() {
    if skipped("the Object Lock init test") {
        return;
    }
    let moto = Moto::start();
    aws_test_env();
    let bucket = format!("btrship-nolock-{}", std::process::id());
    create_bucket(&moto.endpoint, &bucket);
    let url = format!(
        "s3://{bucket}/office?endpoint={}&region=us-east-1",
        moto.endpoint
    );
    let fs_ = LoopBtrfs::new(256);
    let share = fs_.subvolume("share");
    let bs = Btrship::new();
    let err = bs.fails(
        osargs![
            "init",
            &share,
            "--repo",
            &url,
            "--no-systemd",
            "--object-lock",
            "30d"
        ],
        2,
    );
    assert!(
        err.contains(&bucket) && err.contains("Object Lock"),
        "{err}"
    );
    let store = bucket_store(&moto.endpoint, &bucket);
    let listed = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(btrship_upload::Store::list(&store, ""))
        .unwrap();
    assert!(listed.is_empty(), "{listed:?}");
}

/// A ship-only server shipping into a repository made with
/// `--object-lock LOCK s` on a bucket with Object Lock: a snapshot, two
/// rounds of per-close versions, a snapshot 1.5 s later. Every moment is
/// acknowledged with a reference copy.
struct LockedServer {
    moto: Moto,
    bucket: String,
    admin: btrship_upload::s3::S3Store,
    url: String,
    fs_: LoopBtrfs,
    bs: Btrship,
    key: std::path::PathBuf,
    safe: std::path::PathBuf,
    acked: Vec<(String, std::path::PathBuf)>,
    started: Instant,
}

fn locked_server(lock: i64, label: &str) -> LockedServer {
    let moto = Moto::start();
    aws_test_env();
    let bucket = format!("btrship-{label}-{}", std::process::id());
    let admin = create_locked_bucket(&moto.endpoint, &bucket);
    let url = format!(
        "s3://{bucket}/office?endpoint={}&region=us-east-1",
        moto.endpoint
    );
    let fs_ = LoopBtrfs::new(1024);
    let share = fs_.subvolume("share");
    let refs = fs_.dir("refs");
    let bs = Btrship::new();
    let started = Instant::now();
    let out = bs.ok(osargs![
        "init",
        &share,
        "--repo",
        &url,
        "--no-systemd",
        "--object-lock",
        format!("{lock}s")
    ]);
    assert!(out.contains("object lock"), "{out}");

    // The server keeps only the ship-only key.
    let key = bs.key_file("share");
    let safe = fs_.dir("safe").join("office.key");
    let ship = fs_.dir("safe").join("ship.key");
    bs.ok(osargs!["key", "ship-key", "share", "--out", &ship]);
    fs::copy(&key, &safe).unwrap();
    fs::copy(&ship, &key).unwrap();

    let mut acked = Vec::new();
    let mut ack = |label: &str| {
        let t = now_text();
        let r = refs.join(label);
        reference_snapshot(&share, &r);
        acked.push((t, r));
    };
    fs::create_dir(share.join("docs")).unwrap();
    for i in 0..8 {
        fs::write(share.join(format!("docs/f{i}")), vec![i as u8; 100_000]).unwrap();
    }
    fs::write(share.join("big.bin"), vec![0x11; 2 << 20]).unwrap();
    bs.ok(["snapshot", "share"]);
    ack("s1");
    let daemon = bs.start_daemon("share");
    for round in 0..2u8 {
        fs::write(share.join("big.bin"), vec![0x20 + round; 2 << 20]).unwrap();
        bs.sync("share");
        ack(&format!("d{round}"));
    }
    drop(daemon);
    std::thread::sleep(Duration::from_millis(1500));
    fs::write(share.join("docs/new"), b"newest\n").unwrap();
    bs.ok(["snapshot", "share"]);
    ack("s2");
    LockedServer {
        moto,
        bucket,
        admin,
        url,
        fs_,
        bs,
        key,
        safe,
        acked,
        started,
    }
}

/// Tries to delete every version under `office/` with the server's
/// credentials; returns how many were deleted.
fn delete_every_version(admin: &btrship_upload::s3::S3Store, bucket: &str) -> usize {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut deleted = 0;
    for v in rt.block_on(admin.list_versions("office/")).unwrap() {
        if v.delete_marker {
            continue;
        }
        let r = rt.block_on(
            admin
                .client()
                .delete_object()
                .bucket(bucket)
                .key(&v.key)
                .version_id(&v.version_id)
                .send(),
        );
        if r.is_ok() {
            deleted += 1;
        }
    }
    deleted
}

#[test]
fn every_moment_restores_after_an_attack_on_a_locked_repository() {
    if skipped("the Object Lock attack test") {
        return;
    }
    let srv = locked_server(3600, "lockattack");
    assert_eq!(
        delete_every_version(&srv.admin, &srv.bucket),
        0,
        "a locked version was deleted"
    );
    assert!(overwrite_or_hide_all(&srv.admin, &srv.bucket, "office/") > 10);
    let fresh = Btrship::new();
    // What the bucket shows now does not restore.
    let (t, _) = &srv.acked[0];
    let to = srv.fs_.dir("out").join("plain");
    fresh.fails_with(
        osargs![
            "restore",
            "share",
            "--at",
            t,
            "--to",
            &to,
            "--repo",
            &srv.url,
            "--key-file",
            &srv.safe
        ],
        &[3, 4, 5, 9],
    );
    let recover = osargs![
        "--repo",
        &srv.url,
        "--key-file",
        &srv.safe,
        "--recover-versions"
    ];
    for (i, (t, reference)) in srv.acked.iter().enumerate() {
        let to = srv.fs_.dir("out").join(format!("m{i}"));
        let mut args = osargs!["restore", "share", "--at", t, "--to", &to];
        args.extend(recover.iter().cloned());
        fresh.ok(args);
        assert_same_tree(reference, &to);
    }
    let mut check = osargs!["check", "share", "--read-data"];
    check.extend(recover.iter().cloned());
    fresh.ok(check);
    drop(srv.moto);
}

#[test]
fn a_locked_repository_survives_the_server() {
    if skipped("the Object Lock test") {
        return;
    }
    const LOCK: i64 = 24;
    let srv = locked_server(LOCK, "lock");
    let (admin, bucket, bs, key, safe, url, fs_, started) = (
        &srv.admin,
        srv.bucket.as_str(),
        &srv.bs,
        &srv.key,
        &srv.safe,
        &srv.url,
        &srv.fs_,
        srv.started,
    );
    let (t, reference) = srv.acked.last().unwrap().clone();

    // Every version is locked, in compliance mode, for the duration.
    let before = locks(admin, bucket, "office/");
    assert!(before.len() > 10, "{before:?}");
    let now = now_secs();
    for (k, versions) in &before {
        for (_, mode, until) in versions {
            assert_eq!(mode, "COMPLIANCE", "{k}");
            assert!(
                *until > now && *until <= now + LOCK + 5,
                "{k}: {until} vs {now}"
            );
        }
    }

    // A prune with the master key, once half the lock has passed.
    let admin_machine = Btrship::new();
    let text = fs::read_to_string(bs.config_dir.join("share.toml")).unwrap();
    let text = text.replace(&*key.to_string_lossy(), &safe.to_string_lossy());
    fs::write(
        admin_machine.config_dir.join("share.toml"),
        format!("{text}\n[retention]\nkeep_all_within = \"1s\"\nkeep_hourly_within = \"0s\"\nkeep_daily_within = \"0s\"\nkeep_weekly_within = \"0s\"\nkeep_monthly_within = \"0s\"\nkeep_yearly_within = \"0s\"\n"),
    )
    .unwrap();
    let half = Duration::from_secs(LOCK as u64 / 2 + 1);
    if let Some(wait) = half.checked_sub(started.elapsed()) {
        std::thread::sleep(wait);
    }
    let env = [("BTRSHIP_TEST_MIN_MARK_AGE", "0")];
    let prune = |label: &str| -> serde_json::Value {
        let out = admin_machine.cmd_env(["prune", "share", "--grace", "0s", "--json"], &env);
        assert!(
            out.status.success(),
            "{label}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let first = prune("first prune");
    assert!(
        first["moments_forgotten"].as_u64().unwrap() > 0,
        "{first:#}"
    );
    assert!(first["packs_marked"].as_u64().unwrap() > 0, "{first:#}");
    assert!(first["locks_extended"].as_u64().unwrap() > 0, "{first:#}");
    let second = prune("second prune");
    assert!(second["objects_locked"].as_u64().unwrap() > 0, "{second:#}");
    // Extended: some version's lock now ends later than its first date.
    let after = locks(admin, bucket, "office/");
    let extended = after.iter().any(|(k, vs)| {
        vs.iter().any(|(id, _, until)| {
            before
                .get(k)
                .and_then(|b| b.iter().find(|(bid, _, _)| bid == id))
                .is_some_and(|(_, _, old)| until > old)
        })
    });
    assert!(extended, "no lock was extended");
    // Nothing locked was deleted: every version from before is there.
    for (k, versions) in &before {
        for (id, _, until) in versions {
            if *until > now_secs() {
                assert!(
                    after
                        .get(k)
                        .is_some_and(|a| a.iter().any(|(aid, _, _)| aid == id)),
                    "locked {k} {id} is gone"
                );
            }
        }
    }

    // The attack: every object overwritten or hidden behind a delete marker.
    overwrite_or_hide_all(admin, bucket, "office/");
    let fresh = Btrship::new();
    let to = fs_.dir("out").join("newest");
    fresh.ok(osargs![
        "restore",
        "share",
        "--at",
        &t,
        "--to",
        &to,
        "--repo",
        &url,
        "--key-file",
        &safe,
        "--recover-versions"
    ]);
    assert_same_tree(&reference, &to);
    fresh.ok(osargs![
        "check",
        "share",
        "--read-data",
        "--repo",
        &url,
        "--key-file",
        &safe,
        "--recover-versions"
    ]);
}
