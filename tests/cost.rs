//! What shipping costs in requests: packs sized for object storage mean an
//! initial ship of 5 GiB takes at most 400 PUT requests (16 MiB packs:
//! about 320 packs plus indexes, trees and the snapshot record), and the
//! per-ship counters that `snapshot --json` and `status --json` report are
//! the requests the store really received (counted here independently by
//! the objects that appear in the local repository), with the time each
//! stage of the pipeline took.

#[macro_use]
mod common;

use common::{repo_objects, write_random_file, Btrship, LoopBtrfs};

#[test]
fn initial_ship_of_5_gib_takes_at_most_400_puts() {
    let fs = LoopBtrfs::new(6 << 10);
    let share = fs.subvolume("share");
    // 4 files of 1 GiB and 1,024 files of 1 MiB: 5 GiB of incompressible data.
    for i in 0..4u64 {
        write_random_file(&share.join(format!("big{i}.bin")), 1 << 30, i);
    }
    std::fs::create_dir(share.join("small")).unwrap();
    for i in 0..1024u64 {
        write_random_file(&share.join(format!("small/f{i:04}")), 1 << 20, 100 + i);
    }
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share]);
    let before = repo_objects(&bs.repo()).len() as u64;
    let out: serde_json::Value =
        serde_json::from_str(&bs.ok(["snapshot", "share", "--json"])).unwrap();
    let report = &out["shipped"][0];
    let puts = report["store"]["puts"].as_u64().unwrap();
    let uploaded = report["store"]["uploaded_bytes"].as_u64().unwrap();
    let created = repo_objects(&bs.repo()).len() as u64 - before;
    eprintln!(
        "initial ship of 5 GiB: {puts} PUT requests, {created} objects, {:.1} MiB uploaded",
        uploaded as f64 / 1048576.0
    );
    assert!(puts <= 400, "{puts} PUT requests for 5 GiB");
    // Where the time went: every stage of the pipeline ran and is reported.
    let stages = &report["stages"];
    for stage in ["stat", "read", "chunk", "hash", "seal", "pack", "upload"] {
        let secs = stages[stage].as_f64().unwrap_or(0.0);
        assert!(secs > 0.0, "stage {stage} not reported: {stages}");
    }
    assert!(uploaded >= 5 << 30, "uploaded {uploaded} bytes");
    // Every PUT made one object (no retries on a local store).
    assert_eq!(puts, created, "{report:#}");
    // status --json reports the same traffic for the last ship.
    let st: serde_json::Value =
        serde_json::from_str(&bs.ok(["status", "share", "--json"])).unwrap();
    assert_eq!(st["last_shipped"]["store"]["puts"], puts, "{st:#}");
}
