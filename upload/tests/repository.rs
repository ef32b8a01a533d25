//! The repository layer over a local store: blobs round-trip through packs
//! and the index, dedup holds within and across writers, a reopened
//! repository (a fresh machine) sees everything, and damage is named.

use btrship_crypto::{ObjectKind, RepoKey};
use btrship_upload::format::ChainLink;
use btrship_upload::format::{BlobKind, SnapshotStats};
use btrship_upload::history::{history_name, HistoryBody, HistoryKind};
use btrship_upload::local::LocalStore;
use btrship_upload::{PutOutcome, RepoError, Repository};
use std::sync::Arc;

fn setup() -> (tempfile::TempDir, tokio::runtime::Runtime, Arc<RepoKey>) {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    (dir, rt, Arc::new(RepoKey::generate()))
}

#[test]
fn blobs_round_trip_dedup_and_survive_reopen() {
    let (dir, rt, key) = setup();
    let store = Arc::new(LocalStore::create(dir.path().join("repo")).unwrap());
    let (repo, created) =
        Repository::open_or_create(store.clone(), key.clone(), rt.handle().clone(), "h").unwrap();
    assert!(created);
    let blobs: Vec<Vec<u8>> = (0..300u32)
        .map(|i| (0..(i * 977 % 70_000)).map(|j| (j ^ i) as u8).collect())
        .collect();
    let w = repo.writer();
    let ids: Vec<_> = blobs
        .iter()
        .map(|b| w.add(BlobKind::Data, b).unwrap())
        .collect();
    // The same content again in the same writer is not stored twice.
    assert_eq!(w.add(BlobKind::Data, &blobs[7]).unwrap(), ids[7]);
    let stats = w.finish().unwrap();
    assert_eq!(stats.new_blobs as usize, {
        let mut u = ids.clone();
        u.sort();
        u.dedup();
        u.len()
    });
    // A second writer with the same content writes nothing.
    let w = repo.writer();
    for b in &blobs {
        w.add(BlobKind::Data, b).unwrap();
    }
    let again = w.finish().unwrap();
    assert_eq!(again.new_blobs, 0);
    assert_eq!(again.objects_written, 0);

    // Reopen as a fresh machine would: everything readable and verified.
    let (repo2, created) =
        Repository::open_or_create(store, key, rt.handle().clone(), "h").unwrap();
    assert!(!created);
    for (b, id) in blobs.iter().zip(&ids) {
        assert_eq!(&repo2.read_blob(id, BlobKind::Data).unwrap(), b);
        // Asking for the wrong kind is refused.
        assert!(repo2.read_blob(id, BlobKind::Tree).is_err());
    }
    for pack in repo2.packs_in_index().keys() {
        repo2.verify_pack(pack).unwrap();
    }
}

#[test]
fn wrong_key_and_damage_are_distinct_and_named() {
    let (dir, rt, key) = setup();
    let root = dir.path().join("repo");
    let store = Arc::new(LocalStore::create(&root).unwrap());
    let (repo, _) =
        Repository::open_or_create(store.clone(), key.clone(), rt.handle().clone(), "h").unwrap();
    let w = repo.writer();
    let id = w.add(BlobKind::Data, b"some data worth keeping").unwrap();
    w.finish().unwrap();
    let rec = repo
        .put_record(ObjectKind::Snapshot, "snapshots", &SnapshotStats::default())
        .unwrap();

    let other = Arc::new(RepoKey::generate());
    let err = Repository::open(store.clone(), other, rt.handle().clone()).unwrap_err();
    assert!(err.is_wrong_key(), "{err}");

    // Flip one byte of the record: reported as damage naming the object.
    let path = root.join(&rec);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let err = repo.snapshot(&rec).unwrap_err();
    assert!(matches!(err, RepoError::Crypto { .. }), "{err:?}");
    assert!(err.to_string().contains(&rec), "{err}");

    // Flip one byte inside the pack holding the blob.
    let loc = repo.locate(&id).unwrap();
    let path = root.join(&loc.pack);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(loc.offset + loc.length / 2) as usize] ^= 0x80;
    std::fs::write(&path, &bytes).unwrap();
    let fresh = Repository::open(store, key, rt.handle().clone()).unwrap();
    let err = fresh.read_blob(&id, BlobKind::Data).unwrap_err();
    assert!(err.to_string().contains(&loc.pack), "{err}");
    assert!(fresh.verify_pack(&loc.pack).is_err());
}

#[test]
fn a_snapshot_shipped_again_after_a_crash_keeps_one_record() {
    use btrship_upload::format::{BlobId, Node, NodeKind, SnapshotRecord, Tree};
    let (dir, rt, key) = setup();
    let store = Arc::new(LocalStore::create(dir.path().join("repo")).unwrap());
    let (repo, _) = Repository::open_or_create(store, key, rt.handle().clone(), "h").unwrap();
    let w = repo.writer();
    let tree = w
        .add(
            BlobKind::Tree,
            &btrship_upload::format::to_cbor(&Tree { entries: vec![] }),
        )
        .unwrap();
    w.finish().unwrap();
    let root = Node {
        name: vec![],
        kind: NodeKind::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
        ctime_ns: 0,
        size: 0,
        ino: 256,
        nlink: 1,
        xattrs: vec![],
        target: None,
        rdev: 0,
        content: vec![],
        subtree: Some(BlobId(tree)),
    };
    let record = SnapshotRecord {
        share: "office".into(),
        host: "h".into(),
        time: "2026-11-25T10:00:00.123456789Z".into(),
        snapshot: "@GMT-2026.11.25-10.00.00".into(),
        tree: BlobId(tree),
        root,
        parent: None,
        stats: SnapshotStats::default(),
        chain: Some(ChainLink {
            seq: 1,
            prev: None,
            lost_from: None,
        }),
        indexes: None,
    };
    // Place 1 of office@h has one name: a ship repeated after a crash
    // finds the first upload instead of adding a second record.
    let name = history_name(repo.key(), HistoryKind::Snapshot, "office", "h", 1);
    let body = HistoryBody::Snapshot(record.clone());
    let (first, hash) = repo.put_history(&name, &body).unwrap();
    assert_eq!(first, PutOutcome::Created);
    let (again, _) = repo.put_history(&name, &body).unwrap();
    assert_eq!(again, PutOutcome::AlreadyExists);
    assert_eq!(repo.history_objects().unwrap().0.len(), 1);
    let back = repo.read_history(&name).unwrap();
    assert_eq!(
        back.hash, hash,
        "the link hash is the hash of the stored bytes"
    );
    assert_eq!(back.body, body);
    // Another place gets another name; names reveal nothing.
    let other = history_name(repo.key(), HistoryKind::Snapshot, "office", "h", 2);
    assert_ne!(other, name);
    assert!(!other.contains("office") && !other.contains("GMT"));
    let other_host = history_name(repo.key(), HistoryKind::Snapshot, "office", "h2", 1);
    assert_ne!(other_host, name);
}

/// A writer with more blobs than one index object lists
/// (`INDEX_BLOBS_MAX`) writes several index objects, none over the limit
/// and no pack over its blob limit (tiny blobs: the size target alone would
/// put them all in one pack), and a fresh machine finds every blob.
#[test]
fn a_large_ship_writes_several_bounded_indexes() {
    use btrship_upload::format::{from_cbor, Index};
    use btrship_upload::repo::{INDEX_BLOBS_MAX, PACK_BLOBS_MAX};
    use btrship_upload::Store;
    let (dir, rt, key) = setup();
    let store = Arc::new(LocalStore::create(dir.path().join("repo")).unwrap());
    let (repo, _) =
        Repository::open_or_create(store.clone(), key.clone(), rt.handle().clone(), "h").unwrap();
    let n = INDEX_BLOBS_MAX * 2 + 1000;
    let blob = |i: usize| format!("blob number {i}").into_bytes();
    let w = repo.writer();
    let ids: Vec<_> = (0..n)
        .map(|i| w.add(BlobKind::Data, &blob(i)).unwrap())
        .collect();
    let stats = w.finish().unwrap();
    assert_eq!(stats.new_blobs as usize, n);
    let names = repo.unnamed_written_indexes();
    assert_eq!(names.len(), 3, "{names:?}");
    let mut listed = 0;
    for name in &names {
        let sealed = rt.block_on(store.get(name)).unwrap();
        let body = key
            .open(ObjectKind::Index, name.as_bytes(), &sealed)
            .unwrap();
        let index: Index = from_cbor(&body).unwrap();
        for p in &index.packs {
            assert!(
                p.blobs.len() <= PACK_BLOBS_MAX,
                "{}: {}",
                p.pack,
                p.blobs.len()
            );
        }
        let blobs: usize = index.packs.iter().map(|p| p.blobs.len()).sum();
        assert!(blobs <= INDEX_BLOBS_MAX, "{name}: {blobs} blobs");
        listed += blobs;
    }
    assert_eq!(listed, n);
    let (fresh, _) = Repository::open_or_create(store, key, rt.handle().clone(), "h").unwrap();
    for i in (0..n).step_by(997).chain([n - 1]) {
        assert_eq!(fresh.read_blob(&ids[i], BlobKind::Data).unwrap(), blob(i));
    }
}
