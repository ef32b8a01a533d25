//! End to end through a real S3 server (moto on 127.0.0.1, started by
//! `scripts/s3-test-server`): init with an `s3://` repository, ship two
//! snapshots, then restore each on a "fresh machine" (empty config and
//! state, only `--repo` and `--key-file`) and compare with reference
//! snapshots; `check --read-data` is clean.
//!
//! moto checks neither signatures nor checksums; the conformance suite in
//! `upload/tests/s3_store.rs` covers the store itself.

#[macro_use]
mod common;

use common::s3env::{aws_test_env, create_bucket, skipped, Moto};
use common::{assert_same_tree, reference_snapshot, Btrship, LoopBtrfs, Mutator};

#[test]
fn ship_to_s3_and_restore_on_a_fresh_machine() {
    if skipped("the S3 end-to-end test") {
        return;
    }
    let moto = Moto::start();
    aws_test_env();
    let bucket = format!("btrship-e2e-{}", std::process::id());
    let url = format!(
        "s3://{bucket}/office?endpoint={}&region=us-east-1",
        moto.endpoint
    );
    create_bucket(&moto.endpoint, &bucket);

    let fs = LoopBtrfs::new(1024);
    let share = fs.subvolume("share");
    let refs = fs.dir("refs");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--repo", &url]);
    let mut m = Mutator::new(7);
    m.budget = 12 << 20;
    m.populate(&share, 40);
    let mut times = Vec::new();
    for round in 0..2 {
        if round > 0 {
            m.mutate(&share, 15);
        }
        reference_snapshot(&share, &refs.join(format!("r{round}")));
        bs.ok(["snapshot", "share"]);
        times.push(bs.snapshot_list("share").last().unwrap().time.clone());
    }

    let fresh = Btrship::new();
    let key = bs.key_file("share");
    fresh.check_repo(&url, &key);
    for (round, t) in times.iter().enumerate() {
        let to = fs.dir("restored").join(format!("r{round}"));
        fresh.restore_repo(&url, &key, t, &to);
        assert_same_tree(&refs.join(format!("r{round}")), &to);
    }
    // A missing bucket is a clear error, not a hang.
    let missing = format!(
        "s3://no-such-bucket-{}?endpoint={}",
        std::process::id(),
        moto.endpoint
    );
    let (code, err, _) = fresh.fails_with(
        osargs!["snapshots", "share", "--repo", &missing, "--key-file", &key],
        &[3, 8],
    );
    assert!(err.contains("no-such-bucket"), "exit {code}: {err}");
}
