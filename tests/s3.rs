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

use common::{assert_same_tree, reference_snapshot, Btrship, LoopBtrfs, Mutator};
use std::path::{Path, PathBuf};
use std::process::Command;

struct Moto {
    dir: tempfile::TempDir,
    endpoint: String,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/s3-test-server")
}

impl Moto {
    fn start() -> Moto {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(script())
            .arg("start")
            .arg(dir.path())
            .output()
            .expect("run scripts/s3-test-server");
        assert!(
            out.status.success(),
            "cannot start the S3 test server: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let endpoint = std::fs::read_to_string(dir.path().join("endpoint"))
            .unwrap()
            .trim()
            .to_string();
        Moto { dir, endpoint }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn ship_to_s3_and_restore_on_a_fresh_machine() {
    if std::env::var_os("BTRSHIP_SKIP_S3").is_some() {
        eprintln!(
            "\n*** SKIPPED: BTRSHIP_SKIP_S3 is set; the S3 end-to-end test did not run ***\n"
        );
        return;
    }
    let moto = Moto::start();
    for v in [
        "AWS_PROFILE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_SESSION_TOKEN",
    ] {
        std::env::remove_var(v);
    }
    std::env::set_var("AWS_CONFIG_FILE", "/dev/null");
    std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test-secret");

    // The bucket, made with the SDK client the store uses.
    let bucket = format!("btrship-e2e-{}", std::process::id());
    let url = format!(
        "s3://{bucket}/office?endpoint={}&region=us-east-1",
        moto.endpoint
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let cfg = btrship_upload::s3::S3Config::parse_url(&url).unwrap();
        let store = btrship_upload::s3::S3Store::connect(cfg).await.unwrap();
        store
            .client()
            .create_bucket()
            .bucket(&bucket)
            .send()
            .await
            .unwrap();
    });

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
    fresh.ok(osargs![
        "check",
        "share",
        "--read-data",
        "--repo",
        &url,
        "--key-file",
        &key
    ]);
    for (round, t) in times.iter().enumerate() {
        let to = fs.dir("restored").join(format!("r{round}"));
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
