//! Self-test of the integration-test harness (tests/common): the loop
//! btrfs, the random tree mutator, reference copies and the tree
//! comparison, including that it notices deliberate differences. Does not
//! run btrship.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn expect_difference(a: &Path, b: &Path, what: &str, needle: &str) {
    let d = diff_trees(&snapshot_tree(a), &snapshot_tree(b));
    assert!(
        d.iter().any(|l| l.contains(needle)),
        "{what}: expected a difference mentioning {needle:?}, got {d:#?}"
    );
}

#[test]
fn harness_detects_every_kind_of_difference() {
    let fs_ = LoopBtrfs::new(1024);
    let share = fs_.subvolume("share");
    let mut m = Mutator::new(42);
    m.budget = 20 * MIB;
    m.populate(&share, 200);
    m.mutate(&share, 150);

    // The generated tree covers what the round-trip tests rely on.
    let t = snapshot_tree(&share);
    let has = |f: &dyn Fn(&Entry) -> bool| t.entries.values().any(f);
    assert!(has(&|e| e.kind == Kind::Symlink), "no symlink");
    assert!(has(&|e| e.kind == Kind::Fifo), "no fifo");
    assert!(has(&|e| e.kind == Kind::Dir), "no dir");
    assert!(has(&|e| e.size == Some(0)), "no empty file");
    assert!(
        has(
            &|e| matches!((&e.regions, e.size), (Some(r), Some(s)) if r.iter().map(|x| x.1).sum::<u64>() < s)
        ),
        "no sparse file"
    );
    assert!(has(&|e| e.mode & 0o7000 != 0), "no setuid/setgid/sticky");
    assert!(has(&|e| e.uid >= 1000), "no chown");
    assert!(has(&|e| e.mtime.1 != 0), "no mtime");
    for x in [
        &b"user.DOSATTRIB"[..],
        b"security.NTACL",
        b"system.posix_acl_access",
        b"system.posix_acl_default",
    ] {
        assert!(
            has(&|e| e.xattrs.contains_key(x)),
            "no {}",
            String::from_utf8_lossy(x)
        );
    }
    assert!(!t.links.is_empty(), "no hard links");
    assert!(
        t.entries.keys().any(|k| std::str::from_utf8(k).is_err()),
        "no non-UTF-8 name"
    );
    let total = dir_bytes(&share);
    eprintln!(
        "generated {} entries, {} link groups, {} apparent bytes; last ops: {:#?}",
        t.entries.len(),
        t.links.len(),
        total,
        &m.log[m.log.len().saturating_sub(5)..]
    );

    // Reference copies are exact.
    let refs = fs_.dir("refs");
    reference_snapshot(&share, &refs.join("snap"));
    assert_same_tree(&share, &refs.join("snap"));
    let copy = fs_.dir("copy");
    copy_reference(&share, &copy);
    assert_same_tree(&share, &copy);
    assert_same_tree(&refs.join("snap"), &copy);

    // Single entries compare too.
    let some_file = t
        .entries
        .iter()
        .find(|(k, e)| {
            e.kind == Kind::File && std::str::from_utf8(k).is_ok() && !k.contains(&b'\n')
        })
        .map(|(k, _)| String::from_utf8(k.clone()).unwrap())
        .expect("a file");
    assert_same_tree(&share.join(&some_file), &copy.join(&some_file));

    // Deliberate differences are found.
    let c = copy.join(&some_file);
    set_mtime(&c, 12345, 678);
    expect_difference(&share, &copy, "mtime", "mtime");

    copy_reference(&share, &fs_.dir("copy2"));
    let copy2 = fs_.mnt.join("copy2");
    let c = copy2.join(&some_file);
    set_xattr(&c, b"user.extra", b"v").unwrap();
    expect_difference(&share, &copy2, "xattr", "user.extra");
    remove_xattr(&c, b"user.extra").unwrap();

    fs::set_permissions(&c, fs::Permissions::from_mode(0o4711)).unwrap();
    expect_difference(&share, &copy2, "mode", "mode");

    let copy3 = fs_.dir("copy3");
    copy_reference(&share, &copy3);
    // Same bytes, but a hole becomes data: regions differ, content does not.
    let sparse = snapshot_tree(&copy3)
        .entries
        .into_iter()
        .find(|(k, e)| {
            std::str::from_utf8(k).is_ok()
                && matches!((&e.regions, e.size), (Some(r), Some(s)) if s > 0 && r.iter().map(|x| x.1).sum::<u64>() < s)
        })
        .map(|(k, _)| String::from_utf8(k).unwrap())
        .expect("a sparse file with a UTF-8 name");
    let sp = copy3.join(&sparse);
    let md = fs::metadata(&sp).unwrap();
    let data = fs::read(&sp).unwrap();
    let tmp = copy3.join("densified.tmp");
    fs::write(&tmp, &data).unwrap();
    fs::rename(&tmp, &sp).unwrap();
    fs::set_permissions(&sp, md.permissions()).unwrap();
    let d = diff_trees(&snapshot_tree(&share), &snapshot_tree(&copy3));
    assert!(
        d.iter().any(|l| l.contains("data regions"))
            && !d.iter().any(|l| l.contains("content differs")),
        "densified sparse file: {d:#?}"
    );

    let copy4 = fs_.dir("copy4");
    copy_reference(&share, &copy4);
    fs::hard_link(copy4.join(&some_file), copy4.join("new-link")).unwrap();
    expect_difference(&share, &copy4, "hard link", "hard-link group only in B");
    expect_difference(&share, &copy4, "extra entry", "only in B");

    let copy5 = fs_.dir("copy5");
    copy_reference(&share, &copy5);
    let mut bytes = fs::read(copy5.join(&some_file)).unwrap();
    if bytes.is_empty() {
        bytes.push(1);
    } else {
        bytes[0] ^= 1;
    }
    let md = fs::metadata(copy5.join(&some_file)).unwrap();
    fs::write(copy5.join(&some_file), &bytes).unwrap();
    let mt = filetime(&md);
    set_mtime(&copy5.join(&some_file), mt.0, mt.1);
    let d = diff_trees(&snapshot_tree(&share), &snapshot_tree(&copy5));
    assert!(
        d.iter()
            .any(|l| l.contains("content differs") || l.contains("size")),
        "content change: {d:#?}"
    );
}

fn filetime(md: &fs::Metadata) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    (md.mtime(), md.mtime_nsec())
}

#[test]
fn mutator_is_deterministic() {
    let fs_ = LoopBtrfs::new(512);
    let names = |seed: u64, sub: &str| {
        let share = fs_.subvolume(sub);
        let mut m = Mutator::new(seed);
        m.budget = 8 * MIB;
        m.populate(&share, 80);
        m.mutate(&share, 60);
        let t = snapshot_tree(&share);
        type Shape = BTreeSet<(Vec<u8>, String, Option<u64>, Option<u64>, u32)>;
        let shape: Shape = t
            .entries
            .iter()
            .map(|(k, e)| (k.clone(), format!("{:?}", e.kind), e.size, e.hash, e.mode))
            .collect();
        (shape, t.links)
    };
    let a = names(7, "a");
    let b = names(7, "b");
    let c = names(8, "c");
    assert!(a == b, "same seed, different trees");
    assert!(a != c, "different seeds, same tree");
}
