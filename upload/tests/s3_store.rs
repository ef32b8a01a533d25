//! The S3 backend against a real S3 server: the store conformance suite plus
//! S3-specific checks (multipart, ranges, error classes, endpoints).
//!
//! The server is `BTRSHIP_S3_ENDPOINT` if set (credentials from the
//! environment, default `test`/`btrship-test-secret`; set
//! `BTRSHIP_S3_ATOMIC_CREATE=0` for servers whose `If-None-Match` is not
//! atomic, like s3s-fs), else a moto server started with
//! `scripts/s3-test-server` for this test binary and stopped when it exits.
//! If no server can be had the tests FAIL; `BTRSHIP_SKIP_S3=1` skips them,
//! loudly.
//!
//! The machine's AWS configuration is kept out: config and credentials files
//! point at /dev/null, profile and region variables are removed, and the EC2
//! metadata service is disabled (no traffic off this machine).

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use btrship_upload::conformance::{self, Capabilities};
use btrship_upload::s3::{S3Config, S3Store, S3Timeouts, MULTIPART_THRESHOLD};
use btrship_upload::{PutOutcome, Store, StoreError};
use bytes::Bytes;
use rand::RngCore;

/// Secret handed to servers that ignore it (moto); distinctive, so the tests
/// can check it never shows up in messages.
const SECRET: &str = "btrship-test-secret";

/// The server the tests talk to.
struct Env {
    endpoint: String,
    atomic_create: bool,
}

/// A moto server started by this process; stopped on drop.
struct MotoServer {
    dir: PathBuf,
}

impl MotoServer {
    fn start() -> Result<(MotoServer, String), String> {
        let dir = std::env::temp_dir().join(format!(
            "btrship-s3-test-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let output = Command::new(script())
            .arg("start")
            .arg(&dir)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script().display()))?;
        let server = MotoServer { dir };
        if !output.status.success() {
            return Err(format!(
                "{} start failed ({}):\n{}{}",
                script().display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let endpoint = std::fs::read_to_string(server.dir.join("endpoint"))
            .map_err(|e| format!("no endpoint file from the test server: {e}"))?;
        Ok((server, endpoint.trim().to_owned()))
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        match Command::new(script()).arg("stop").arg(&self.dir).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "s3-test-server stop failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("cannot run s3-test-server stop: {e}"),
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/s3-test-server")
}

static SERVER: Mutex<Option<MotoServer>> = Mutex::new(None);

extern "C" fn stop_server() {
    if let Ok(mut server) = SERVER.lock() {
        server.take();
    }
}

/// Sets up the environment and the server once per test binary; `None` when
/// S3 tests are skipped. Every test calls this first, before anything reads
/// the environment.
fn env() -> Option<&'static Env> {
    // The outcome is kept, failure included: one attempt per test binary.
    static ENV: OnceLock<Result<Option<Env>, String>> = OnceLock::new();
    let env = ENV.get_or_init(|| {
        if std::env::var("BTRSHIP_SKIP_S3").as_deref() == Ok("1") {
            return Ok(None);
        }
        let external = std::env::var("BTRSHIP_S3_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty());
        for var in [
            "AWS_PROFILE",
            "AWS_DEFAULT_PROFILE",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL_S3",
            "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
            "AWS_ROLE_ARN",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        ] {
            std::env::remove_var(var);
        }
        std::env::set_var("AWS_CONFIG_FILE", "/dev/null");
        std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        // AWS_CA_BUNDLE (set machine-wide here) is deliberately left alone:
        // it must not matter for http endpoints.
        if external.is_none() || std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
            std::env::set_var("AWS_ACCESS_KEY_ID", "test");
            std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET);
            std::env::remove_var("AWS_SESSION_TOKEN");
        }
        let (endpoint, atomic_create) = match external {
            Some(endpoint) => {
                let atomic = std::env::var("BTRSHIP_S3_ATOMIC_CREATE").as_deref() != Ok("0");
                (endpoint, atomic)
            }
            None => {
                let started = Instant::now();
                let (server, endpoint) = MotoServer::start().map_err(|e| {
                    format!(
                        "no S3 server for the S3 tests: {e}\n\
                         Set BTRSHIP_S3_ENDPOINT to use a running server, or BTRSHIP_SKIP_S3=1 to skip."
                    )
                })?;
                *SERVER.lock().unwrap() = Some(server);
                // Statics are never dropped: stop the server when the process exits.
                // SAFETY: registering a plain extern "C" fn with atexit.
                unsafe { libc::atexit(stop_server) };
                loud(&format!(
                    "s3_store: moto at {endpoint} (started in {:.1} s)",
                    started.elapsed().as_secs_f64()
                ));
                (endpoint, true) // moto decides If-None-Match atomically
            }
        };
        std::env::set_var("AWS_ENDPOINT_URL", &endpoint);
        Ok(Some(Env {
            endpoint,
            atomic_create,
        }))
    });
    match env {
        Ok(env) => env.as_ref(),
        Err(e) => panic!("{e}"),
    }
}

/// Writes to the real stderr, past the test harness's output capture.
fn loud(message: &str) {
    let _ = writeln!(std::io::stderr(), "{message}");
}

/// `env()`, or a loud skip notice and `None`.
fn env_or_skip(test: &str) -> Option<&'static Env> {
    let env = env();
    if env.is_none() {
        loud(&format!(
            "\n*** S3 TEST {test} SKIPPED: BTRSHIP_SKIP_S3=1 (the S3 backend is NOT tested) ***\n"
        ));
    }
    env
}

fn url(env: &Env, bucket: &str, prefix: &str) -> String {
    let path = if prefix.is_empty() {
        bucket.to_owned()
    } else {
        format!("{bucket}/{prefix}")
    };
    format!("s3://{path}?endpoint={}&region=us-east-1", env.endpoint)
}

/// A store on a new, empty bucket.
async fn fresh_store(env: &Env, prefix: &str) -> S3Store {
    let bucket = format!("btrship-test-{:016x}", rand::random::<u64>());
    let cfg = S3Config::parse_url(&url(env, &bucket, prefix)).unwrap();
    let store = S3Store::connect(cfg).await.unwrap();
    store
        .client()
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .unwrap_or_else(|e| panic!("create bucket {bucket}: {e:?}"));
    store
}

fn random_bytes(len: usize) -> Bytes {
    let mut data = vec![0; len];
    rand::thread_rng().fill_bytes(&mut data);
    Bytes::from(data)
}

#[tokio::test]
async fn conformance() {
    let Some(env) = env_or_skip("conformance") else {
        return;
    };
    let caps = Capabilities {
        exclusive_create: true,
        atomic_create: env.atomic_create,
    };
    for prefix in ["", "repo/one"] {
        let store = fresh_store(env, prefix).await;
        let started = Instant::now();
        if let Err(e) = conformance::run_all(&store, caps).await {
            panic!("{e}");
        }
        loud(&format!(
            "s3_store: conformance ({caps:?}) on {} passed in {:.1} s",
            store.location(),
            started.elapsed().as_secs_f64()
        ));
    }
}

#[tokio::test]
async fn prefix_isolation() {
    let Some(env) = env_or_skip("prefix_isolation") else {
        return;
    };
    let root = fresh_store(env, "").await;
    let bucket = root.config().bucket.clone();
    let inner = S3Store::connect(S3Config::parse_url(&url(env, &bucket, "repo/one")).unwrap())
        .await
        .unwrap();
    for key in ["repo/one/a", "repo/one/b/c", "repo/onex/d", "repo/e", "f"] {
        root.put_if_absent(key, Bytes::from_static(b"x"))
            .await
            .unwrap();
    }
    let keys: Vec<String> = inner
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(keys, ["a", "b/c"]);
    assert_eq!(inner.get("b/c").await.unwrap(), &b"x"[..]);
    assert_eq!(
        inner.put_if_absent("a", Bytes::new()).await.unwrap(),
        PutOutcome::AlreadyExists
    );
    inner.put_if_absent("g", Bytes::new()).await.unwrap();
    root.head("repo/one/g").await.unwrap();
    assert!(inner.head("onex/d").await.unwrap_err().is_not_found());
}

#[tokio::test]
async fn multipart_round_trip() {
    let Some(env) = env_or_skip("multipart_round_trip") else {
        return;
    };
    let store = fresh_store(env, "mp").await;
    let data = random_bytes(40 << 20);
    assert!(data.len() > MULTIPART_THRESHOLD);
    let started = Instant::now();
    assert_eq!(
        store.put_if_absent("big", data.clone()).await.unwrap(),
        PutOutcome::Created
    );
    loud(&format!(
        "s3_store: 40 MiB multipart put in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    assert_eq!(store.head("big").await.unwrap().size, data.len() as u64);
    assert!(
        store.get("big").await.unwrap() == data,
        "40 MiB get differs"
    );
    // Across the first part boundary (8 MiB) and up to the very end.
    let boundary = (8 << 20) - 100;
    let got = store.get_range("big", boundary, 200).await.unwrap();
    assert_eq!(got, data.slice(boundary as usize..boundary as usize + 200));
    let tail = store
        .get_range("big", data.len() as u64 - 10, 10)
        .await
        .unwrap();
    assert_eq!(tail, data.slice(data.len() - 10..));
    assert_eq!(
        store
            .put_if_absent("big", random_bytes(20 << 20))
            .await
            .unwrap(),
        PutOutcome::AlreadyExists
    );
    assert!(store.get("big").await.unwrap() == data, "overwritten");

    // Nothing left open: a completed upload leaves no multipart uploads behind.
    let open = store
        .client()
        .list_multipart_uploads()
        .bucket(&store.config().bucket)
        .send()
        .await;
    match open {
        Ok(open) => assert!(
            open.uploads().is_empty(),
            "open uploads: {:?}",
            open.uploads()
        ),
        // s3s-fs 0.14 has no ListMultipartUploads.
        Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 501) => {
            loud("s3_store: the server cannot list multipart uploads; not checked")
        }
        Err(e) => panic!("list multipart uploads: {e:?}"),
    }
}

#[tokio::test]
async fn range_past_end() {
    let Some(env) = env_or_skip("range_past_end") else {
        return;
    };
    let store = fresh_store(env, "").await;
    let data = random_bytes(1000);
    store.put_if_absent("obj", data.clone()).await.unwrap();
    for (offset, len) in [(990, 11), (1000, 1), (1001, 0), (5000, 10), (0, 1001)] {
        match store.get_range("obj", offset, len).await {
            Err(StoreError::OutOfRange {
                key,
                offset: o,
                len: l,
                size,
            }) => {
                assert_eq!((key.as_str(), o, l, size), ("obj", offset, len, 1000));
            }
            other => panic!("{offset}+{len}: expected OutOfRange, got {other:?}"),
        }
    }
    assert_eq!(
        store.get_range("obj", 990, 10).await.unwrap(),
        data.slice(990..)
    );
}

#[tokio::test]
async fn location_has_no_secrets() {
    let Some(env) = env_or_skip("location_has_no_secrets") else {
        return;
    };
    let store = fresh_store(env, "some/prefix").await;
    let bucket = &store.config().bucket;
    assert_eq!(store.location(), format!("s3://{bucket}/some/prefix"));
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap();
    let debug = format!("{store:?}");
    let missing = store.get("missing").await.unwrap_err().to_string();
    let other =
        S3Store::connect(S3Config::parse_url(&url(env, "no-such-bucket-btrship", "")).unwrap())
            .await
            .unwrap();
    let no_bucket = other.get("x").await.unwrap_err().to_string();
    for text in [store.location(), debug, missing, no_bucket] {
        assert!(!text.contains(&secret), "secret in {text:?}");
    }
}

#[tokio::test]
async fn missing_bucket_is_a_clear_permanent_error() {
    let Some(env) = env_or_skip("missing_bucket_is_a_clear_permanent_error") else {
        return;
    };
    let bucket = format!("btrship-missing-{:016x}", rand::random::<u64>());
    let store = S3Store::connect(S3Config::parse_url(&url(env, &bucket, "p")).unwrap())
        .await
        .unwrap();
    let errors = [
        store.check_bucket().await.unwrap_err(),
        store
            .put_if_absent("k", Bytes::from_static(b"x"))
            .await
            .unwrap_err(),
        store.get("k").await.unwrap_err(),
        store.get_range("k", 0, 1).await.unwrap_err(),
        store.list("").await.unwrap_err(),
        store.delete("k").await.unwrap_err(),
    ];
    for e in errors {
        let text = e.to_string();
        assert!(!e.is_retryable(), "retryable: {text}");
        assert!(!e.is_not_found(), "not found: {text}");
        assert!(
            text.contains(&format!("bucket {bucket} does not exist")),
            "unclear: {text}"
        );
    }
}

/// Short timeouts, so that the tests below cannot take long.
fn short() -> S3Timeouts {
    S3Timeouts {
        connect: Duration::from_secs(1),
        attempt: Duration::from_secs(2),
    }
}

/// Every operation fails with a retryable error, quickly.
async fn all_fail_retryably(store: &S3Store, within: Duration) {
    let started = Instant::now();
    let errors = [
        store
            .put_if_absent("k", Bytes::from_static(b"x"))
            .await
            .unwrap_err(),
        store.get("k").await.unwrap_err(),
        store.get_range("k", 0, 1).await.unwrap_err(),
        store.head("k").await.unwrap_err(),
        store.list("").await.unwrap_err(),
        store.delete("k").await.unwrap_err(),
    ];
    for e in errors {
        assert!(e.is_retryable(), "not retryable: {e}");
        assert!(
            !e.is_not_found(),
            "an unreachable server must not look like a missing key: {e}"
        );
    }
    assert!(started.elapsed() < within, "took {:?}", started.elapsed());
}

#[tokio::test]
async fn closed_port_is_retryable_not_a_hang() {
    if env_or_skip("closed_port_is_retryable_not_a_hang").is_none() {
        return;
    }
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let cfg = S3Config::parse_url(&format!(
        "s3://bucket?endpoint=http://127.0.0.1:{port}&region=us-east-1"
    ))
    .unwrap();
    let store = S3Store::connect_with(cfg, short()).await.unwrap();
    let e = store.get("k").await.unwrap_err();
    assert!(
        e.to_string().contains(&format!("127.0.0.1:{port}")),
        "which server? {e}"
    );
    all_fail_retryably(&store, Duration::from_secs(20)).await;
}

#[tokio::test]
async fn silent_server_times_out() {
    if env_or_skip("silent_server_times_out").is_none() {
        return;
    }
    // Accepts connections (the kernel does, into the backlog) but never answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let cfg = S3Config::parse_url(&format!(
        "s3://bucket?endpoint=http://127.0.0.1:{port}&region=us-east-1"
    ))
    .unwrap();
    let store = S3Store::connect_with(cfg, short()).await.unwrap();
    // Six operations at 2 s each.
    all_fail_retryably(&store, Duration::from_secs(30)).await;
    drop(listener);
}

#[tokio::test]
async fn endpoint_from_environment() {
    let Some(env) = env_or_skip("endpoint_from_environment") else {
        return;
    };
    let root = fresh_store(env, "").await;
    let bucket = root.config().bucket.clone();
    // No endpoint and no region in the URL: AWS_ENDPOINT_URL (set by env())
    // and the us-east-1 fallback apply.
    let cfg = S3Config::parse_url(&format!("s3://{bucket}/viaenv?path_style=true")).unwrap();
    assert_eq!(cfg.endpoint, None);
    let store = S3Store::connect(cfg).await.unwrap();
    store
        .put_if_absent("k", Bytes::from_static(b"hello"))
        .await
        .unwrap();
    assert_eq!(root.get("viaenv/k").await.unwrap(), &b"hello"[..]);
    store.check_bucket().await.unwrap();
}
