//! `LocalStore` against the generic conformance suite, plus the properties
//! only a directory repository has (temp-file cleanup, permissions, errors
//! on the repository path, key/directory conflicts).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use btrship_upload::conformance::{self, Capabilities};
use btrship_upload::local::LocalStore;
use btrship_upload::store::{PutOutcome, Store, StoreError};
use bytes::Bytes;

fn store_in(dir: &tempfile::TempDir) -> LocalStore {
    LocalStore::create(dir.path().join("repo")).expect("create store")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_suite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store_in(&dir);
    let caps = Capabilities {
        exclusive_create: true,
        atomic_create: true,
    };
    if let Err(e) = conformance::run_all(&store, caps).await {
        panic!("{e}");
    }
    // The suite cleans up after itself.
    assert_eq!(store.list("").await.expect("list"), vec![]);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_temp_files_left_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store_in(&dir);
    for i in 0..5u8 {
        let key = format!("packs/{i:02x}/obj");
        let first = store.put_if_absent(&key, Bytes::from(vec![i; 100])).await;
        assert_eq!(first.expect("put"), PutOutcome::Created);
        let second = store.put_if_absent(&key, Bytes::from(vec![i; 7])).await;
        assert_eq!(second.expect("put again"), PutOutcome::AlreadyExists);
    }
    // A refused put (conflict with a directory) must clean up too.
    assert!(store.put_if_absent("packs", Bytes::new()).await.is_err());
    let tmp = store.root().join(".tmp");
    let leftovers: Vec<_> = std::fs::read_dir(&tmp).expect("read .tmp").collect();
    assert!(leftovers.is_empty(), "leftovers in .tmp: {leftovers:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn modes_are_private() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::create(dir.path().join("new/parent/repo")).expect("create");
    store
        .put_if_absent("a/b/obj", Bytes::from_static(b"data"))
        .await
        .expect("put");
    let root = store.root();
    assert_eq!(mode(&root.join("a/b/obj")), 0o600);
    for d in [
        dir.path().join("new"),
        dir.path().join("new/parent"),
        root.to_path_buf(),
        root.join(".tmp"),
        root.join("a"),
        root.join("a/b"),
    ] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn open_and_create() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("does-not-exist");
    let err = LocalStore::open(&missing).expect_err("open missing");
    let msg = err.to_string();
    assert!(msg.contains(&missing.display().to_string()), "{msg}");

    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").expect("write");
    let msg = LocalStore::open(&file).expect_err("open file").to_string();
    assert!(msg.contains(&file.display().to_string()), "{msg}");
    assert!(LocalStore::create(&file).is_err());

    // create is idempotent and open finds the same objects.
    let store = store_in(&dir);
    store
        .put_if_absent("k", Bytes::from_static(b"v"))
        .await
        .expect("put");
    let again = store_in(&dir);
    let opened = LocalStore::open(dir.path().join("repo")).expect("open");
    assert_eq!(again.get("k").await.expect("get"), "v");
    assert_eq!(opened.get("k").await.expect("get"), "v");
    assert!(
        opened.location().starts_with("file:///"),
        "{}",
        opened.location()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn local_restrictions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store_in(&dir);

    // `.tmp` is reserved and never listed.
    let reserved = store.put_if_absent(".tmp/x", Bytes::new()).await;
    assert!(matches!(reserved, Err(StoreError::InvalidKey { .. })));
    std::fs::create_dir_all(store.root().join(".tmp")).expect("mkdir");
    std::fs::write(store.root().join(".tmp/stray"), b"x").expect("write");
    assert!(store.list("").await.expect("list").is_empty());
    assert!(store.list(".tmp/").await.expect("list").is_empty());

    // A key cannot be both an object and a "directory" of objects.
    store
        .put_if_absent("a/b", Bytes::from_static(b"1"))
        .await
        .expect("put");
    let dir_conflict = store.put_if_absent("a", Bytes::new()).await;
    assert!(dir_conflict.is_err_and(|e| !e.is_retryable()));
    store
        .put_if_absent("f", Bytes::from_static(b"1"))
        .await
        .expect("put");
    for key in ["f/x", "f/x/y"] {
        let file_conflict = store.put_if_absent(key, Bytes::new()).await;
        assert!(file_conflict.is_err_and(|e| !e.is_retryable()), "{key}");
        assert!(store.get(key).await.is_err_and(|e| e.is_not_found()));
    }
    assert!(store.get("a").await.is_err_and(|e| e.is_not_found()));
    assert!(store.head("a").await.is_err_and(|e| e.is_not_found()));
    store
        .delete("a")
        .await
        .expect("delete of a directory is a no-op");
    assert_eq!(store.get("a/b").await.expect("get"), "1");
}
