//! Change detection between snapshots (`changed_inodes`, `inode_paths`,
//! `subvol_generations`) against a real loop-mounted btrfs.
//! Needs root and btrfs-progs; fails with a clear message otherwise.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use btrship_snapshot::{
    changed_inodes, inode_paths, subvol_generations, ChangedInode, PrivateArea, Share,
};
use common::{run, walk, Layout, LoopFs};

const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;

fn ino(p: &Path) -> u64 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .ino()
}

fn fs_sync(p: &Path) {
    run(
        "btrfs",
        &["filesystem", "sync", p.to_str().expect("utf-8 path")],
    );
}

fn file_name(d: usize, f: usize) -> String {
    format!("d{d:02}/f{f:03}")
}

/// `dirs` directories `dNN` with `per_dir` files `fNNN` of `size` bytes.
fn populate(root: &Path, dirs: usize, per_dir: usize, size: usize) {
    for d in 0..dirs {
        fs::create_dir(root.join(format!("d{d:02}"))).expect("mkdir");
        for f in 0..per_dir {
            let byte = ((d * per_dir + f) % 251) as u8;
            fs::write(root.join(file_name(d, f)), vec![byte; size]).expect("write");
        }
    }
}

fn overwrite_4k(p: &Path) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    f.seek(SeekFrom::Start(0)).expect("seek");
    f.write_all(&[0xAB; 4096]).expect("overwrite");
}

fn sorted(mut v: Vec<PathBuf>) -> Vec<PathBuf> {
    v.sort();
    v
}

fn paths_of(snapshot: &Path, ino: u64) -> Vec<PathBuf> {
    sorted(inode_paths(snapshot, ino).expect("inode_paths"))
}

#[test]
fn changed_inodes_between_snapshots() {
    let lfs = LoopFs::new(Layout::ShareOnly);
    let share = Share::open(&lfs.share).expect("open share");
    let area = PrivateArea::open(&share, "share").expect("area");
    let root = share.path.clone();

    populate(&root, 20, 100, 8192);
    fs::hard_link(root.join("d00/f001"), root.join("d01/hardlink")).expect("link");
    fs_sync(&root);
    // Written right before the snapshot, normally in the snapshot's own
    // transaction.
    fs::write(root.join("d02/f001"), b"last minute").expect("last-minute write");
    let s1 = area.create_snapshot(&share).expect("snapshot 1");
    let g1 = subvol_generations(&s1.path).expect("generations s1");
    assert_eq!(g1.id, s1.subvol_id);
    println!("S1 {g1:?}");

    // Nothing in a snapshot is newer than its creation.
    assert!(changed_inodes(&s1.path, g1.otransid + 1)
        .expect("changed in s1")
        .is_empty());
    let last_minute_ino = ino(&s1.path.join("d02/f001"));
    let all_s1 = changed_inodes(&s1.path, 0).expect("all of s1");
    // Root, 20 directories, 2000 files (the hard link is no new inode).
    assert_eq!(all_s1.len(), 1 + 20 + 2000, "full listing of s1");
    assert!(all_s1.windows(2).all(|w| w[0].ino < w[1].ino), "sorted");
    let by_ino = |list: &[ChangedInode], n: u64| list.iter().find(|c| c.ino == n).copied();
    let linked = by_ino(&all_s1, ino(&s1.path.join("d00/f001"))).expect("linked file listed");
    assert_eq!(linked.nlink, 2);
    assert_eq!(linked.size, 8192);
    assert_eq!(linked.mode & S_IFMT, S_IFREG);
    let last_minute = by_ino(&all_s1, last_minute_ino).expect("last-minute file listed");
    println!(
        "last-minute file: transid {} (S1 otransid {})",
        last_minute.transid, g1.otransid
    );
    assert!(last_minute.transid <= g1.otransid);

    // Changes after S1.
    let modified = ["d03/f000", "d04/f001", "d13/f002"];
    for m in modified {
        overwrite_4k(&root.join(m));
    }
    fs::write(root.join("d05/new_a"), b"new a").expect("create a");
    fs::write(root.join("d05/new_b"), vec![7u8; 10_000]).expect("create b");
    fs::remove_file(root.join("d06/f010")).expect("delete");
    fs::rename(root.join("d07/f020"), root.join("d08/renamed")).expect("rename");
    fs::set_permissions(root.join("d09/f030"), fs::Permissions::from_mode(0o600)).expect("chmod");
    run(
        "setfattr",
        &[
            "-n",
            "user.btrship-test",
            "-v",
            "hello",
            root.join("d10/f040").to_str().expect("utf-8"),
        ],
    );
    run(
        "cp",
        &[
            "--reflink=always",
            root.join("d11/f050").to_str().expect("utf-8"),
            root.join("d11/clone").to_str().expect("utf-8"),
        ],
    );
    fs::OpenOptions::new()
        .write(true)
        .open(root.join("d12/f060"))
        .and_then(|f| f.set_len(100))
        .expect("truncate");
    let s2 = area.create_snapshot(&share).expect("snapshot 2");
    let g2 = subvol_generations(&s2.path).expect("generations s2");
    println!("S2 {g2:?}");
    assert!(g2.otransid > g1.otransid);
    assert_eq!(g2.id, s2.subvol_id);

    let t = Instant::now();
    let changed = changed_inodes(&s2.path, g1.otransid).expect("changed_inodes");
    println!(
        "changed_inodes(S2, S1.otransid): {} inodes in {:?}",
        changed.len(),
        t.elapsed()
    );
    for c in &changed {
        println!("  {c:?} {:?}", inode_paths(&s2.path, c.ino).expect("paths"));
    }
    let changed_set: BTreeSet<u64> = changed.iter().map(|c| c.ino).collect();
    assert!(changed.len() < 60, "{} entries: not small", changed.len());
    assert!(changed.iter().all(|c| c.transid >= g1.otransid));

    let s2p = |p: &str| s2.path.join(p);
    let mut expected: Vec<(&str, u64)> = Vec::new();
    for p in [
        "d03/f000",
        "d04/f001",
        "d13/f002",
        "d05/new_a",
        "d05/new_b",
        "d08/renamed",
        "d09/f030",
        "d10/f040",
        "d11/clone",
        "d12/f060",
        // Directories whose entries changed.
        "d05",
        "d06",
        "d07",
        "d08",
        "d11",
    ] {
        expected.push((p, ino(&s2p(p))));
    }
    for (p, n) in &expected {
        assert!(changed_set.contains(n), "{p} (ino {n}) not reported");
    }

    // The exact set: transid > S1.otransid. Only the last-minute write (and
    // its directory) can differ from the ">=" set.
    let exact = changed_inodes(&s2.path, g1.otransid + 1).expect("exact");
    let exact_set: BTreeSet<u64> = exact.iter().map(|c| c.ino).collect();
    for (p, n) in &expected {
        assert!(exact_set.contains(n), "{p} (ino {n}) not in the exact set");
    }
    assert!(!exact_set.contains(&last_minute_ino));
    let extra: Vec<&ChangedInode> = changed
        .iter()
        .filter(|c| !exact_set.contains(&c.ino))
        .collect();
    println!("reported with >= but not with >: {extra:?}");
    assert!(extra.iter().all(|c| c.transid == g1.otransid));
    assert_eq!(
        changed_set.contains(&last_minute_ino),
        last_minute.transid == g1.otransid
    );
    let expected_set: BTreeSet<u64> = expected.iter().map(|(_, n)| *n).collect();
    let unexpected: Vec<_> = exact_set.difference(&expected_set).collect();
    assert!(
        unexpected.is_empty(),
        "exact set has unexpected inodes {unexpected:?}"
    );

    // 100 untouched files (none of the changed ones has index % 20 == 7).
    let untouched: Vec<(String, u64)> = (0..2000)
        .filter(|i| i % 20 == 7)
        .map(|i| {
            let name = file_name(i / 100, i % 100);
            let n = ino(&s2p(&name));
            (name, n)
        })
        .collect();
    assert_eq!(untouched.len(), 100);
    for (name, n) in &untouched {
        assert!(!changed_set.contains(n), "untouched {name} reported");
        assert_eq!(ino(&s1.path.join(name)), *n);
    }

    // Fields of the reported inodes.
    let get = |p: &str| by_ino(&changed, ino(&s2p(p))).expect("reported");
    assert_eq!(get("d12/f060").size, 100);
    assert_eq!(get("d09/f030").mode & 0o7777, 0o600);
    assert_eq!(get("d09/f030").mode & S_IFMT, S_IFREG);
    assert_eq!(get("d11/clone").size, 8192);
    assert_eq!(get("d05/new_b").size, 10_000);
    assert!(get("d05/new_a").generation > g1.otransid);
    assert!(get("d03/f000").generation < g1.otransid);
    assert_eq!(get("d05").mode & S_IFMT, S_IFDIR);
    assert_eq!(get("d08/renamed").nlink, 1);

    // inode_paths, through the /proc/self/fd/N paths of the private area.
    let renamed = ino(&s2p("d08/renamed"));
    assert_eq!(
        paths_of(&s2.path, renamed),
        vec![PathBuf::from("d08/renamed")]
    );
    assert_eq!(paths_of(&s1.path, renamed), vec![PathBuf::from("d07/f020")]);
    let linked_ino = ino(&s1.path.join("d00/f001"));
    assert_eq!(
        paths_of(&s1.path, linked_ino),
        vec![PathBuf::from("d00/f001"), PathBuf::from("d01/hardlink")]
    );
    let deleted = ino(&s1.path.join("d06/f010"));
    assert!(paths_of(&s2.path, deleted).is_empty());
    assert_eq!(paths_of(&s1.path, deleted), vec![PathBuf::from("d06/f010")]);
    assert_eq!(
        paths_of(&s2.path, ino(&s2p("d05"))),
        vec![PathBuf::from("d05")]
    );
    assert_eq!(paths_of(&s2.path, 256), vec![PathBuf::new()]);
    assert!(paths_of(&s2.path, 1 << 40).is_empty());
    // The share itself (a normal mount) works the same way.
    assert_eq!(paths_of(&root, renamed), vec![PathBuf::from("d08/renamed")]);
    // A subdirectory is not a subvolume root.
    assert!(changed_inodes(&s2p("d05"), 0).is_err());
    assert!(inode_paths(&s2p("d05"), renamed).is_err());

    // The share's generation grows with a committed write; snapshots' not.
    let before = subvol_generations(&root).expect("share generations");
    fs::write(root.join("after.txt"), b"later").expect("write");
    fs_sync(&root);
    let after = subvol_generations(&root).expect("share generations");
    println!("share before {before:?} after {after:?}");
    assert!(after.generation > before.generation);
    assert_eq!(after.id, share.subvol_id);
    assert_eq!(subvol_generations(&s2.path).expect("s2 again"), g2);
}

#[test]
fn inode_paths_of_a_file_with_many_links() {
    let lfs = LoopFs::new(Layout::TopLevel);
    let share = Share::open(&lfs.share).expect("open share");
    let area = PrivateArea::open(&share, "links").expect("area");
    let root = share.path.clone();
    fs::create_dir_all(root.join("a/b")).expect("mkdir");
    fs::create_dir(root.join("c")).expect("mkdir");
    let target = root.join("a/b/target");
    fs::write(&target, b"many names").expect("write");
    let mut expected = vec![PathBuf::from("a/b/target")];
    // ~27 KB of names in one directory: far beyond INO_PATHS' 4 KiB answer,
    // and beyond one INODE_REF item, so INODE_EXTREF items appear too.
    for i in 0..400 {
        let name = format!("c/a_rather_long_name_for_a_hard_link_to_the_target_{i:04}");
        fs::hard_link(&target, root.join(&name)).expect("link");
        expected.push(PathBuf::from(name));
    }
    fs::hard_link(&target, root.join("a/short")).expect("link");
    expected.push(PathBuf::from("a/short"));
    expected.sort();
    let n = ino(&target);
    assert_eq!(paths_of(&root, n), expected);
    let snap = area.create_snapshot(&share).expect("snapshot");
    assert_eq!(paths_of(&snap.path, n), expected);
    let c = changed_inodes(&snap.path, 0).expect("all");
    let t = c.iter().find(|c| c.ino == n).expect("target listed");
    assert_eq!(t.nlink, 402);
}

#[test]
fn cost_follows_the_change_on_20000_files() {
    let lfs = LoopFs::new(Layout::ShareOnly);
    let share = Share::open(&lfs.share).expect("open share");
    let area = PrivateArea::open(&share, "big").expect("area");
    let root = share.path.clone();
    let t = Instant::now();
    populate(&root, 100, 200, 100);
    fs_sync(&root);
    println!("created 20 000 files in {:?}", t.elapsed());
    let s1 = area.create_snapshot(&share).expect("snapshot 1");
    let g1 = subvol_generations(&s1.path).expect("generations");
    for i in 0..10 {
        let p = root.join(file_name(i * 10, i * 17));
        fs::write(&p, format!("changed {i}")).expect("rewrite");
    }
    let s2 = area.create_snapshot(&share).expect("snapshot 2");

    let t = Instant::now();
    let changed = changed_inodes(&s2.path, g1.otransid).expect("changed");
    let t_changed = t.elapsed();
    let t = Instant::now();
    let all = changed_inodes(&s2.path, 0).expect("all");
    let t_all = t.elapsed();
    let t = Instant::now();
    let walked = walk(&s2.path);
    for p in &walked {
        fs::symlink_metadata(p).expect("stat");
    }
    let t_walk = t.elapsed();
    println!(
        "changed_inodes since S1: {} inodes in {t_changed:?}; all inodes: {} in {t_all:?}; \
         walk+stat: {} paths in {t_walk:?}",
        changed.len(),
        all.len(),
        walked.len()
    );
    assert!(changed.len() < 50, "{} entries", changed.len());
    assert_eq!(all.len(), 1 + 100 + 20_000);
    let set: BTreeSet<u64> = changed.iter().map(|c| c.ino).collect();
    for i in 0..10 {
        let name = file_name(i * 10, i * 17);
        assert!(
            set.contains(&ino(&s2.path.join(&name))),
            "{name} not reported"
        );
    }
}
