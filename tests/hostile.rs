//! A hostile repository can never make restore write outside its target.
//!
//! These repositories are crafted with the library and a valid key (the
//! strongest attacker: one who can write authentic objects), then restored
//! through the real binary. Restore must refuse with a one-line error, exit
//! 5, and leave nothing anywhere: not in the target, not beside it.

use btrship_crypto::{write_key_file, ObjectKind, RepoKey};
use btrship_upload::format::{
    to_cbor, BlobId, BlobKind, Extent, Node, NodeKind, SnapshotRecord, SnapshotStats, Tree,
};
use btrship_upload::local::LocalStore;
use btrship_upload::Repository;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

fn node(name: &[u8], kind: NodeKind) -> Node {
    Node {
        name: name.to_vec(),
        kind,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
        ctime_ns: 0,
        size: 0,
        ino: 0,
        nlink: 1,
        xattrs: vec![],
        target: None,
        rdev: 0,
        content: vec![],
        subtree: None,
    }
}

struct Crafted {
    _dir: tempfile::TempDir,
    root: PathBuf,
    repo: PathBuf,
    key: PathBuf,
}

/// Writes a repository whose only snapshot has `entries` at its root;
/// `extra` may add blobs (e.g. subtrees) first and rewrite the entries.
fn craft(build: impl FnOnce(&mut btrship_upload::PackWriter<'_>) -> Vec<Node>) -> Crafted {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let key_path = root.join("k.key");
    let key = RepoKey::generate();
    write_key_file(&key_path, &key).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = Arc::new(LocalStore::create(root.join("repo")).unwrap());
    let (repo, _) =
        Repository::open_or_create(store, Arc::new(key), rt.handle().clone(), "evil").unwrap();
    let mut w = repo.writer();
    let entries = build(&mut w);
    let tree = w.add(BlobKind::Tree, &to_cbor(&Tree { entries })).unwrap();
    w.finish().unwrap();
    let mut root_node = node(b"", NodeKind::Dir);
    root_node.subtree = Some(BlobId(tree));
    let rec = SnapshotRecord {
        share: "share".into(),
        host: "evil".into(),
        time: "2026-01-01T00:00:00Z".into(),
        snapshot: "@GMT-2026.01.01-00.00.00".into(),
        tree: BlobId(tree),
        root: root_node,
        parent: None,
        stats: SnapshotStats::default(),
        chain: None,
        indexes: None,
    };
    repo.put_record(ObjectKind::Snapshot, "snapshots", &rec)
        .unwrap();
    drop(repo);
    drop(rt);
    Crafted {
        repo: root.join("repo"),
        key: key_path,
        root,
        _dir: dir,
    }
}

fn listing(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = walk(dir);
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        out.push(e.path().display().to_string());
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        }
    }
    out
}

/// Restores the crafted repository into `<root>/out/target` and checks the
/// refusal and that nothing was created anywhere under `<root>`.
fn assert_refused(c: &Crafted, expect_in_message: &str) {
    let out_dir = c.root.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let before = listing(&c.root);
    let output = Command::new(env!("CARGO_BIN_EXE_btrship"))
        .args(["--config-dir", &c.root.join("etc").display().to_string()])
        .args(["--state-dir", &c.root.join("var").display().to_string()])
        .args(["restore", "share", "--at", "now", "--to"])
        .arg(out_dir.join("target"))
        .arg("--repo")
        .arg(&c.repo)
        .arg("--key-file")
        .arg(&c.key)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(5), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("btrship: error: "), "{stderr}");
    assert!(stderr.contains(expect_in_message), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // btrship's own state directory (its catalogue) aside.
    let state = c.root.join("var").display().to_string();
    let after: Vec<String> = listing(&c.root)
        .into_iter()
        .filter(|p| !p.starts_with(&state))
        .collect();
    assert_eq!(after, before, "restore left something behind");
    assert!(!Path::new("/tmp/btrship-escaped").exists());
}

#[test]
fn names_with_slashes_or_dots_are_refused() {
    for bad in [
        &b"../escaped"[..],
        b"..",
        b".",
        b"a/../../x",
        b"/tmp/btrship-escaped",
        b"",
        b"a\0b",
    ] {
        let c = craft(|_| {
            let mut f = node(bad, NodeKind::File);
            f.mode = 0o644;
            vec![f]
        });
        assert_refused(&c, "unsafe name");
    }
}

#[test]
fn duplicate_names_are_refused() {
    // A symlink "x" to the outside, then a directory "x" holding a file:
    // restoring the file through the link would escape.
    let c = craft(|w| {
        let inner = w
            .add(
                BlobKind::Tree,
                &to_cbor(&Tree {
                    entries: vec![node(b"f", NodeKind::File)],
                }),
            )
            .unwrap();
        let mut link = node(b"x", NodeKind::Symlink);
        link.target = Some(b"/tmp".to_vec());
        let mut dir = node(b"x", NodeKind::Dir);
        dir.subtree = Some(BlobId(inner));
        vec![link, dir]
    });
    assert_refused(&c, "twice");
}

#[test]
fn extents_beyond_the_file_size_are_refused() {
    let c = craft(|w| {
        let data = b"payload";
        let id = w.add(BlobKind::Data, data).unwrap();
        let mut f = node(b"f", NodeKind::File);
        f.size = 4;
        f.content = vec![Extent(u64::MAX - 2, BlobId(id), data.len() as u64)];
        vec![f]
    });
    assert_refused(&c, "beyond the file size");
}

#[test]
fn a_tree_id_pointing_at_a_data_blob_is_refused() {
    let c = craft(|w| {
        let id = w.add(BlobKind::Data, b"not a tree").unwrap();
        let mut d = node(b"d", NodeKind::Dir);
        d.subtree = Some(BlobId(id));
        vec![d]
    });
    assert_refused(&c, "expected Tree");
}
