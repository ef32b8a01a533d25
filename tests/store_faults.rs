//! The store misbehaving, end to end through the binary and a real S3
//! server (moto on 127.0.0.1) behind a seeded fault-injecting proxy
//! (`common/faultproxy.rs`):
//!
//! - an outage while snapshots are taken: they queue locally, `status`
//!   shows the backlog, its age and the last error, the spool limit
//!   coalesces loudly, and the next run ships the whole backlog; every
//!   kept point in time restores exactly on a fresh machine;
//! - 20% of requests faulted (503, 500, resets before and after the server
//!   applied the request, truncated requests and responses, stalls,
//!   latency): shipping 2,000 small files and a 1 GiB file completes,
//!   `check --read-data` is clean, a restore through the same faults is
//!   exact.
//!
//! Seeds: `BTRSHIP_FAULT_SEED` (default 1) picks the fault schedule.

#[macro_use]
mod common;

use common::faultproxy::{FaultConfig, FaultProxy};
use common::s3env::{aws_test_env, create_bucket, skipped, Moto};
use common::{assert_same_tree, reference_snapshot, Btrship, LoopBtrfs, Mutator};
use rand::Rng;
use std::path::Path;

fn fault_seed() -> u64 {
    std::env::var("BTRSHIP_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

fn status(bs: &Btrship) -> serde_json::Value {
    bs.status_json("share").1
}

/// The time of the newest snapshot (as `snapshots --json` prints it).
fn newest_time(bs: &Btrship) -> String {
    bs.snapshot_list("share").last().unwrap().time.clone()
}

fn wait_for_next_second() {
    // Snapshot names have one-second resolution.
    std::thread::sleep(std::time::Duration::from_millis(1100));
}

#[test]
fn outage_queues_locally_and_the_backlog_ships_when_the_store_returns() {
    if skipped("the store outage test") {
        return;
    }
    let moto = Moto::start();
    aws_test_env();
    let proxy = FaultProxy::start(moto.addr(), FaultConfig::none()).unwrap();
    let bucket = format!("btrship-outage-{}", std::process::id());
    create_bucket(&moto.endpoint, &bucket);
    let url = format!(
        "s3://{bucket}/office?endpoint={}&region=us-east-1",
        proxy.endpoint()
    );

    let fs = LoopBtrfs::new(1024);
    let share = fs.subvolume("share");
    let refs = fs.dir("refs");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--repo", &url]);
    bs.set_config("share", "max_queued_snapshots", "3");
    let mut m = Mutator::new(11);
    m.budget = 8 << 20;
    m.populate(&share, 40);
    reference_snapshot(&share, &refs.join("r0"));
    bs.ok(["snapshot", "share"]);
    let st = status(&bs);
    assert_eq!(st["health"], "ok", "{st:#}");
    assert_eq!(st["store"]["reachable"], true, "{st:#}");
    assert!(st["last_shipped"]["store"]["puts"].as_u64().unwrap() > 0);

    // The store goes away. Four snapshots are taken: each queues, the
    // fourth exceeds the limit of 3 and coalesces the third into itself.
    proxy.set_down(true);
    let mut queued_names = Vec::new();
    for round in 1..=4 {
        wait_for_next_second();
        m.mutate(&share, 10);
        reference_snapshot(&share, &refs.join(format!("r{round}")));
        let (code, err, out) = bs.fails_with(["snapshot", "share", "--json"], &[8]);
        assert!(err.contains("stay queued"), "exit {code}: {err}");
        let out: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(out["shipped"].as_array().unwrap().is_empty(), "{out:#}");
        assert!(out["error"].is_string(), "{out:#}");
        let coalesced = out["coalesced"].as_array().unwrap().len();
        assert_eq!(coalesced, usize::from(round == 4), "{out:#}");
        queued_names.push(out["snapshot"].as_str().unwrap().to_string());

        let st = status(&bs);
        assert_eq!(st["store"]["reachable"], false, "{st:#}");
        assert!(st["store"]["error"].is_string(), "{st:#}");
        assert_eq!(
            st["queue"]["snapshots"].as_u64().unwrap(),
            round.min(3) as u64,
            "{st:#}"
        );
        assert!(st["queue"]["oldest_age_seconds"].as_i64().is_some());
        assert_eq!(st["last_error"]["current"], true, "{st:#}");
        // Unhealthy (exit 10) either way; a full spool is the worse news.
        let expected = if round >= 3 {
            "spool_full"
        } else {
            "store_unreachable"
        };
        assert_eq!(st["health"], expected, "{st:#}");
        assert_eq!(st["healthy"], false, "{st:#}");
        assert_eq!(
            st["coalesced_total"].as_u64().unwrap(),
            u64::from(round == 4)
        );
    }
    // Human-readable status says the same.
    let (_, _, text) = bs.fails_with(["status", "share"], &[10]);
    assert!(text.contains("NOT reachable"), "{text}");
    assert!(text.contains("3 snapshots waiting"), "{text}");
    let oldest_age = status(&bs)["queue"]["oldest_age_seconds"].as_i64().unwrap();
    assert!(oldest_age >= 3, "oldest queued age {oldest_age}");

    // The store returns; the next run ships the backlog (3 queued + new).
    proxy.set_down(false);
    wait_for_next_second();
    m.mutate(&share, 10);
    reference_snapshot(&share, &refs.join("r5"));
    let out: serde_json::Value =
        serde_json::from_str(&bs.ok(["snapshot", "share", "--json"])).unwrap();
    assert_eq!(out["shipped"].as_array().unwrap().len(), 4, "{out:#}");
    let st = status(&bs);
    assert_eq!(st["health"], "ok", "{st:#}");
    assert_eq!(st["queue"]["snapshots"], 0, "{st:#}");
    assert_eq!(st["last_error"]["current"], false, "{st:#}");

    // Every kept point restores exactly on a fresh machine; the coalesced
    // one (round 3) resolves to the point before it (round 2).
    let list = bs.snapshot_list("share");
    assert_eq!(list.len(), 5, "{list:?}");
    assert!(!list.iter().any(|s| s.snapshot == queued_names[2]));
    let fresh = Btrship::new();
    let key = bs.key_file("share");
    let restore = |at: &str, to: &Path| {
        fresh.restore_repo(&url, &key, at, to);
    };
    for (snap, r) in list.iter().zip([0, 1, 2, 4, 5]) {
        let to = fs.dir("restored").join(format!("r{r}"));
        restore(&snap.time, &to);
        assert_same_tree(&refs.join(format!("r{r}")), &to);
    }
    fresh.check_repo(&url, &key);
    assert!(proxy.stats().faulted > 0, "the outage injected nothing");
}

#[test]
fn twenty_percent_of_requests_faulted_still_ships_and_restores_exactly() {
    if skipped("the 20% fault test") {
        return;
    }
    let moto = Moto::start();
    aws_test_env();
    let seed = fault_seed();
    let proxy = FaultProxy::start(moto.addr(), FaultConfig::none()).unwrap();
    let bucket = format!("btrship-faults-{}", std::process::id());
    create_bucket(&moto.endpoint, &bucket);
    let url = format!(
        "s3://{bucket}/office?endpoint={}&region=us-east-1",
        proxy.endpoint()
    );

    let fs = LoopBtrfs::new(3072);
    let share = fs.subvolume("share");
    let refs = fs.dir("refs");
    // 2,000 small files in 20 directories, and one 1 GiB file.
    let mut m = Mutator::new(seed);
    for d in 0..20 {
        let dir = share.join(format!("d{d:02}"));
        std::fs::create_dir(&dir).unwrap();
        for f in 0..100 {
            let len = m.rng().gen_range(200..8200);
            std::fs::write(dir.join(format!("f{f:03}.txt")), m.bytes(len)).unwrap();
        }
    }
    common::write_random_file(&share.join("big.bin"), 1 << 30, seed);
    reference_snapshot(&share, &refs.join("r0"));

    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--repo", &url]);
    proxy.set_config(FaultConfig::uniform(seed, 0.2));
    let out: serde_json::Value =
        serde_json::from_str(&bs.ok(["snapshot", "share", "--json"])).unwrap();
    let report = &out["shipped"][0];
    assert_eq!(report["files"], 2001, "{report:#}");
    let puts = report["store"]["puts"].as_u64().unwrap();
    let retries = report["store"]["retries"].as_u64().unwrap();
    eprintln!("ship under 20% faults: {puts} puts, {retries} retries");
    assert!(retries > 0, "no request was retried: {report:#}");
    // 1 GiB + 10 MiB in 16 MiB packs: 65 packs and a few indexes/records.
    assert!(puts <= 80, "{puts} puts for 1 GiB");
    let stats = proxy.stats();
    eprintln!("proxy: {stats:?}");
    assert!(
        stats.faulted * 10 >= stats.requests,
        "fewer than 10% faulted: {stats:?}"
    );

    // Reading back through the same faults: check and a fresh restore.
    let fresh = Btrship::new();
    let key = bs.key_file("share");
    fresh.check_repo(&url, &key);
    let to = fs.dir("restored");
    let t = newest_time(&bs);
    fresh.restore_repo(&url, &key, &t, &to);
    assert_same_tree(&refs.join("r0"), &to);
}
