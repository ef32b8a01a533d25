//! A real S3 server for integration tests: moto on 127.0.0.1, started and
//! stopped (by its pid) with `scripts/s3-test-server`, plus the AWS
//! environment the btrship binary and the SDK see (test credentials, no
//! profile files, no instance metadata).

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Moto {
    dir: tempfile::TempDir,
    pub endpoint: String,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/s3-test-server")
}

impl Moto {
    pub fn start() -> Moto {
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

    /// The server's socket address (for a proxy in front of it).
    pub fn addr(&self) -> std::net::SocketAddr {
        self.endpoint
            .trim_start_matches("http://")
            .parse()
            .expect("endpoint is http://IP:PORT")
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

/// True (after saying so loudly) when S3 tests are switched off.
pub fn skipped(test: &str) -> bool {
    if std::env::var_os("BTRSHIP_SKIP_S3").is_some() {
        eprintln!("\n*** SKIPPED: BTRSHIP_SKIP_S3 is set; {test} did not run ***\n");
        return true;
    }
    false
}

/// Test credentials and nothing else from the AWS environment, for this
/// process and the btrship processes it starts.
pub fn aws_test_env() {
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
}

/// Creates a bucket at `endpoint` with the SDK client the store uses.
pub fn create_bucket(endpoint: &str, bucket: &str) {
    let url = format!("s3://{bucket}?endpoint={endpoint}&region=us-east-1");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let cfg = btrship_upload::s3::S3Config::parse_url(&url).unwrap();
        let store = btrship_upload::s3::S3Store::connect(cfg).await.unwrap();
        store
            .client()
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .unwrap();
    });
}

/// The bucket's own store (no prefix), for what a test does beside
/// btrship: an administrator's or an attacker's requests.
#[allow(dead_code)]
pub fn bucket_store(endpoint: &str, bucket: &str) -> btrship_upload::s3::S3Store {
    let url = format!("s3://{bucket}?endpoint={endpoint}&region=us-east-1");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let cfg = btrship_upload::s3::S3Config::parse_url(&url).unwrap();
        btrship_upload::s3::S3Store::connect(cfg).await.unwrap()
    })
}

/// Creates a bucket with Object Lock enabled (which turns versioning on)
/// and returns its store.
#[allow(dead_code)]
pub fn create_locked_bucket(endpoint: &str, bucket: &str) -> btrship_upload::s3::S3Store {
    let store = bucket_store(endpoint, bucket);
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(
            store
                .client()
                .create_bucket()
                .bucket(bucket)
                .object_lock_enabled_for_bucket(true)
                .send(),
        )
        .unwrap();
    store
}

/// An attacker with write (not version-delete) rights: every current
/// object under `prefix` overwritten with garbage of its size, or hidden
/// behind a delete marker (alternately). Returns how many objects.
#[allow(dead_code)]
pub fn overwrite_or_hide_all(
    store: &btrship_upload::s3::S3Store,
    bucket: &str,
    prefix: &str,
) -> usize {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listed = rt
        .block_on(btrship_upload::Store::list(store, prefix))
        .unwrap();
    for (i, meta) in listed.iter().enumerate() {
        let client = store.client();
        if i % 2 == 0 {
            let garbage = vec![0xee; meta.size.max(1) as usize];
            rt.block_on(
                client
                    .put_object()
                    .bucket(bucket)
                    .key(&meta.key)
                    .body(garbage.into())
                    .send(),
            )
            .unwrap();
        } else {
            rt.block_on(client.delete_object().bucket(bucket).key(&meta.key).send())
                .unwrap();
        }
    }
    listed.len()
}
