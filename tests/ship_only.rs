//! Ship-only keys (FORMAT.md §12) on real btrfs with S3 (moto) behind a
//! proxy that enforces the file server's store policy:
//!
//! - `a_ship_only_server_ships_and_cannot_read`: the server holds only the
//!   ship-only key and its store access refuses every DELETE and every GET
//!   of a history, index or data object (only `config` and `gc/` records
//!   may be read; PUT, HEAD and LIST pass). It ships snapshots (the second
//!   one btrfs-incremental, from the parent tree its catalogue kept) and
//!   per-close versions through the daemon, without a single refused
//!   request. On the server every reading command (restore, ls, versions,
//!   snapshots, check, prune, mount) fails with the key error (exit 4) and
//!   one line naming the ship-only key. A fresh machine with the master
//!   key restores every acknowledged moment exactly and `check
//!   --read-data` is clean.

#[macro_use]
mod common;

use common::faultproxy::{DenyRule, FaultConfig, FaultProxy};
use common::s3env::{aws_test_env, bucket_store, create_bucket, skipped, Moto};
use common::{assert_same_tree, reference_snapshot, Btrship, LoopBtrfs};
use rand::{Rng, SeedableRng};
use std::fs;
use std::sync::Arc;
use std::time::Duration;

fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn random(len: usize, rng: &mut rand::rngs::StdRng) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

/// The file server's policy: no DELETE anywhere; GET only of `config`
/// and garbage records (and LIST, which is a GET of the bucket).
fn server_policy(bucket: &str, prefix: &str) -> DenyRule {
    let bucket = format!("/{bucket}");
    let prefix = format!("/{prefix}/");
    Arc::new(move |method: &str, target: &str| {
        if method.eq_ignore_ascii_case("DELETE") {
            return true;
        }
        if !method.eq_ignore_ascii_case("GET") {
            return false;
        }
        let path = target.split('?').next().unwrap_or("");
        let path = path.strip_prefix(bucket.as_str()).unwrap_or(path);
        match path.strip_prefix(prefix.as_str()) {
            Some(object) => !(object == "config" || object.starts_with("gc/")),
            None => false,
        }
    })
}

#[test]
fn a_ship_only_server_ships_and_cannot_read() {
    if skipped("the ship-only key test") {
        return;
    }
    let moto = Moto::start();
    aws_test_env();
    let proxy = FaultProxy::start(moto.addr(), FaultConfig::none()).unwrap();
    let bucket = format!("btrship-shiponly-{}", std::process::id());
    create_bucket(&moto.endpoint, &bucket);
    let url = format!(
        "s3://{bucket}/office?endpoint={}&region=us-east-1",
        proxy.endpoint()
    );
    let fs_ = LoopBtrfs::new(1024);
    let share = fs_.subvolume("share");
    let refs = fs_.dir("refs");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--repo", &url, "--no-systemd"]);

    // The master key leaves the server; the ship-only key takes its place.
    let key = bs.key_file("share");
    let safe = fs_.dir("safe").join("office.key");
    let ship = fs_.dir("safe").join("office.ship.key");
    let out = bs.ok(osargs![
        "key", "ship-key", "share", "--out", &ship, "--json"
    ]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["kind"], "ship-only", "{out}");
    // (Another filesystem: copy, which keeps the 0600 mode, then remove.)
    fs::copy(&key, &safe).unwrap();
    fs::copy(&ship, &key).unwrap();
    fs::remove_file(&ship).unwrap();
    let shown = bs.ok(osargs!["key", "show", &key]);
    assert!(shown.contains("ship-only key"), "{shown}");
    proxy.set_deny(Some(server_policy(&bucket, "office")));
    let before = proxy.request_lines().len();

    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
    let mut acked = Vec::new();
    let ack = |label: &str, acked: &mut Vec<(String, std::path::PathBuf)>| {
        let t = now_text();
        let r = refs.join(label);
        reference_snapshot(&share, &r);
        acked.push((t, r));
        std::thread::sleep(Duration::from_millis(50));
    };
    fs::create_dir(share.join("docs")).unwrap();
    for i in 0..20 {
        fs::write(
            share.join(format!("docs/f{i}.txt")),
            format!("document {i}\n").repeat(50 + i),
        )
        .unwrap();
    }
    fs::write(share.join("big.bin"), random(3 << 20, &mut rng)).unwrap();
    let first: serde_json::Value =
        serde_json::from_str(&bs.ok(["snapshot", "share", "--json"])).unwrap();
    ack("s1", &mut acked);

    // Per-close versions through the daemon.
    let daemon = bs.start_daemon("share");
    for round in 0..4 {
        fs::write(share.join("big.bin"), random(1 << 20, &mut rng)).unwrap();
        fs::write(
            share.join(format!("docs/f{round}.txt")),
            format!("edited in round {round}\n"),
        )
        .unwrap();
        bs.sync("share");
        ack(&format!("d{round}"), &mut acked);
    }
    fs::remove_file(share.join("docs/f7.txt")).unwrap();
    bs.sync("share");
    ack("d-delete", &mut acked);
    drop(daemon);

    // A second snapshot: btrfs-incremental from the parent tree the
    // catalogue kept (the store would refuse to give it back).
    // (1.5 s later: a prune keeping 1 s of history forgets the rest.)
    std::thread::sleep(Duration::from_millis(1500));
    fs::write(share.join("docs/new.txt"), b"after the daemon\n").unwrap();
    let out = bs.ok(["snapshot", "share", "--json"]);
    ack("s2", &mut acked);
    let second: serde_json::Value = serde_json::from_str(&out).unwrap();
    let shipped = |v: &serde_json::Value| v["shipped"][0].clone();
    assert_eq!(
        shipped(&second)["change_detection"]["mode"],
        "btrfs",
        "{out}"
    );
    assert!(
        shipped(&second)["reused_files"].as_u64().unwrap() >= 15,
        "{out}"
    );
    assert!(shipped(&first)["new_blobs"].as_u64().unwrap() > 0);

    // Not one request was refused: the ship path needs no DELETE and no
    // GET of history, indexes or data.
    let lines = proxy.request_lines().split_off(before);
    let policy = server_policy(&bucket, "office");
    let refused: Vec<&String> = lines
        .iter()
        .filter(|l| {
            let mut p = l.split_ascii_whitespace();
            policy(p.next().unwrap_or(""), p.next().unwrap_or(""))
        })
        .collect();
    assert!(refused.is_empty(), "refused requests: {refused:#?}");
    assert!(lines.iter().any(|l| l.starts_with("PUT ")), "{lines:#?}");

    // On the server, nothing reads the history.
    let at = acked[1].0.clone();
    let to = fs_.dir("out").join("denied");
    for args in [
        osargs!["restore", "share", "--at", &at, "--to", &to],
        osargs!["ls", "share", "--at", &at],
        osargs!["versions", "share", "docs/f0.txt"],
        osargs!["snapshots", "share"],
        osargs!["check", "share"],
        osargs!["prune", "share", "--dry-run"],
        osargs!["mount", "share", fs_.dir("mnt")],
    ] {
        let err = bs.fails(args.clone(), 4);
        assert!(
            err.contains("ship-only key") && err.lines().count() == 1,
            "{args:?}: {err}"
        );
    }
    assert!(!to.exists());

    // A fresh machine with the master key restores every moment exactly
    // (the restore policy reads freely).
    proxy.set_deny(None);
    let fresh = Btrship::new();
    let remote = osargs!["--repo", &url, "--key-file", &safe];
    let mut check = osargs!["check", "share", "--read-data"];
    check.extend(remote.iter().cloned());
    fresh.ok(check);
    for (i, (t, reference)) in acked.iter().enumerate() {
        let to = fs_.dir("out").join(format!("m{i}"));
        let mut args = osargs!["restore", "share", "--at", t, "--to", &to];
        args.extend(remote.iter().cloned());
        fresh.ok(args);
        assert_same_tree(reference, &to);
    }

    // Everything the server wrote is sealed to the master (envelope 2).
    let versions = envelope_versions(&moto.endpoint, &bucket, "office/");
    for prefix in ["snapshots/", "versions/", "index/", "chains/"] {
        let of: Vec<_> = versions
            .iter()
            .filter(|(n, _)| n.starts_with(&format!("office/{prefix}")))
            .collect();
        assert!(!of.is_empty(), "no {prefix} objects: {versions:?}");
        assert!(of.iter().all(|(_, v)| *v == 2), "{of:?}");
    }

    // A prune on another machine with the master key forgets and marks;
    // its garbage record is signed, so the ship-only server reads it,
    // keeps the writers' rule and ships on.
    let admin = Btrship::new();
    let text = fs::read_to_string(bs.config_dir.join("share.toml")).unwrap();
    let text = text.replace(&*key.to_string_lossy(), &safe.to_string_lossy());
    assert!(text.contains(&*safe.to_string_lossy()), "{text}");
    fs::create_dir_all(&admin.config_dir).unwrap();
    fs::write(
        admin.config_dir.join("share.toml"),
        format!("{text}\n[retention]\nkeep_all_within = \"1s\"\nkeep_hourly_within = \"0s\"\nkeep_daily_within = \"0s\"\nkeep_weekly_within = \"0s\"\nkeep_monthly_within = \"0s\"\nkeep_yearly_within = \"0s\"\n"),
    )
    .unwrap();
    let env = [("BTRSHIP_TEST_MIN_MARK_AGE", "0")];
    let pruned = admin.cmd_env(["prune", "share", "--grace", "0s", "--json"], &env);
    assert!(
        pruned.status.success(),
        "{}",
        String::from_utf8_lossy(&pruned.stderr)
    );
    let gc = envelope_versions(&moto.endpoint, &bucket, "office/gc/");
    assert!(!gc.is_empty() && gc.iter().all(|(_, v)| *v == 3), "{gc:?}");

    // The ship-only key is rotated (generation 2): the server ships on
    // from its catalogue, re-reading and re-uploading nothing unchanged.
    let ship2 = fs_.dir("safe").join("office.ship2.key");
    bs.ok(osargs![
        "key",
        "ship-key",
        "share",
        "--generation",
        "2",
        "--out",
        &ship2,
        "--key-file",
        &safe
    ]);
    fs::copy(&ship2, &key).unwrap();
    let shown = bs.ok(osargs!["key", "show", &key]);
    assert!(shown.contains("generation 2"), "{shown}");

    proxy.set_deny(Some(server_policy(&bucket, "office")));
    let before = proxy.request_lines().len();
    fs::write(share.join("big.bin"), random(1 << 20, &mut rng)).unwrap();
    let out = bs.ok(["snapshot", "share", "--json"]);
    let third: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        shipped(&third)["change_detection"]["mode"],
        "btrfs",
        "{out}"
    );
    assert!(
        shipped(&third)["read_bytes"].as_u64().unwrap() <= 1 << 20,
        "{out}"
    );
    assert!(
        shipped(&third)["new_bytes"].as_u64().unwrap() < (1 << 20) + (64 << 10),
        "{out}"
    );
    let t = now_text();
    let r = refs.join("after-prune");
    reference_snapshot(&share, &r);
    let lines = proxy.request_lines().split_off(before);
    assert!(lines.iter().any(|l| l.contains("/gc/")), "{lines:#?}");
    proxy.set_deny(None);
    let to = fs_.dir("out").join("after-prune");
    let mut args = osargs!["restore", "share", "--at", &t, "--to", &to];
    args.extend(remote.iter().cloned());
    fresh.ok(args);
    assert_same_tree(&r, &to);
    let mut check = osargs!["check", "share", "--read-data"];
    check.extend(remote.iter().cloned());
    fresh.ok(check);
}

/// Every object under `prefix` with its envelope version byte.
fn envelope_versions(endpoint: &str, bucket: &str, prefix: &str) -> Vec<(String, u8)> {
    let store = bucket_store(endpoint, bucket);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut out = Vec::new();
        let listed = btrship_upload::Store::list(&store, prefix).await.unwrap();
        for meta in listed {
            let bytes = btrship_upload::Store::get(&store, &meta.key).await.unwrap();
            out.push((meta.key, bytes.get(4).copied().unwrap_or(0)));
        }
        out
    })
}
