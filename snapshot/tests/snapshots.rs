//! Snapshots in the private area against a real loop-mounted btrfs.
//! Needs root and btrfs-progs; fails with a clear message otherwise.

mod common;

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;

use btrship_snapshot::{
    is_read_only, parse_snapshot_name, snapshot_name, PrivateArea, Share, SnapshotError,
};
use common::{walk, Layout, LoopFs};

#[test]
fn snapshot_lifecycle() {
    let mut lfs = LoopFs::new(Layout::ShareOnly);
    let share = Share::open(&lfs.share).expect("open share");
    fs::write(share.path.join("a.txt"), b"one").expect("write a");
    fs::create_dir(share.path.join("dir")).expect("mkdir");
    fs::write(share.path.join("dir/c.txt"), b"c1").expect("write c");

    let mounts_before = lfs.mountinfo_lines();
    let area = PrivateArea::open(&share, "share").expect("open private area");
    assert_eq!(
        lfs.mountinfo_lines(),
        mounts_before,
        "the private mount must not appear in the mount table"
    );
    let dir = area.snapshots_dir().to_path_buf();
    assert!(dir.starts_with("/proc/self/fd/"), "{}", dir.display());
    assert!(
        dir.ends_with(".btrship/share/snapshots"),
        "{}",
        dir.display()
    );
    let mode = fs::metadata(&dir).expect("stat dir").permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);

    assert!(area.list_snapshots().expect("list").is_empty());

    let s1 = area.create_snapshot(&share).expect("snapshot 1");
    // Change the share right away; the second snapshot is normally taken in
    // the same second and must wait for the next one.
    fs::write(share.path.join("a.txt"), b"two").expect("rewrite a");
    fs::write(share.path.join("b.txt"), b"new").expect("write b");
    fs::remove_file(share.path.join("dir/c.txt")).expect("rm c");
    let s2 = area.create_snapshot(&share).expect("snapshot 2");

    assert_ne!(s1.name, s2.name);
    assert!(s2.time > s1.time, "{} !> {}", s2.time, s1.time);
    assert_eq!(parse_snapshot_name(&s1.name), Some(s1.time));
    assert_eq!(snapshot_name(s2.time), s2.name);
    assert!(s1.subvol_id > share.subvol_id);
    assert_ne!(s1.subvol_id, s2.subvol_id);
    assert_eq!(s1.path, dir.join(&s1.name));

    let list = area.list_snapshots().expect("list");
    assert_eq!(list, vec![s1.clone(), s2.clone()]);

    for s in [&s1, &s2] {
        assert!(is_read_only(&s.path).expect("is_read_only"), "{}", s.name);
        // Paths through /proc/self/fd/N must not be canonicalised: the
        // detached mount's fd reads back as "/".
        assert_eq!(
            fs::read_link(dir.ancestors().nth(3).expect("mount fd path")).expect("readlink"),
            std::path::PathBuf::from("/")
        );
    }
    assert!(!is_read_only(&share.path).expect("share flags"));

    // Contents equal the share at snapshot time; std::fs works through the
    // /proc/self/fd/N paths.
    assert_eq!(fs::read(s1.path.join("a.txt")).expect("read"), b"one");
    assert!(!s1.path.join("b.txt").exists());
    assert_eq!(fs::read(s1.path.join("dir/c.txt")).expect("read"), b"c1");
    assert_eq!(fs::read(s2.path.join("a.txt")).expect("read"), b"two");
    assert_eq!(fs::read(s2.path.join("b.txt")).expect("read"), b"new");
    assert!(!s2.path.join("dir/c.txt").exists());
    assert_eq!(fs::read(share.path.join("a.txt")).expect("read"), b"two");

    // Read-only: writes into a snapshot fail with EROFS.
    let err = fs::write(s1.path.join("x"), b"x").expect_err("snapshot must be read-only");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");

    // Nothing of the private area is visible through the share's mount.
    for p in walk(&lfs.mnt) {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        assert!(
            !name.starts_with("@GMT-") && name != ".btrship",
            "private area leaked into the share: {}",
            p.display()
        );
    }
    assert_eq!(lfs.mountinfo_lines(), mounts_before);

    // The area is at the btrfs top level: an admin mount of subvolid=5 sees it.
    let top = lfs.mount_top_level_elsewhere();
    let seen = top.join(".btrship/share/snapshots").join(&s2.name);
    assert_eq!(fs::read(seen.join("a.txt")).expect("read via top"), b"two");
    let top_mode = fs::metadata(top.join(".btrship"))
        .expect("stat")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(top_mode, 0o700);
    lfs.umount_last();

    // get
    assert_eq!(area.get(&s1.name).expect("get"), s1);
    assert!(matches!(
        area.get("@GMT-2000.01.01-00.00.00"),
        Err(SnapshotError::NotFound { .. })
    ));
    for bad in [
        "..",
        "../../etc",
        "snapshots",
        "",
        "@GMT-2000.1.01-00.00.00",
    ] {
        assert!(
            matches!(
                area.get(bad),
                Err(SnapshotError::InvalidSnapshotName { .. })
            ),
            "{bad:?}"
        );
        assert!(
            matches!(
                area.delete_snapshot(bad),
                Err(SnapshotError::InvalidSnapshotName { .. })
            ),
            "{bad:?}"
        );
    }

    // delete
    area.delete_snapshot(&s1.name).expect("delete s1");
    assert!(!s1.path.exists());
    assert_eq!(area.list_snapshots().expect("list"), vec![s2.clone()]);
    assert!(matches!(
        area.delete_snapshot(&s1.name),
        Err(SnapshotError::NotFound { .. })
    ));
    assert!(matches!(
        area.get(&s1.name),
        Err(SnapshotError::NotFound { .. })
    ));
    // The share itself is untouched.
    assert_eq!(fs::read(share.path.join("a.txt")).expect("read"), b"two");

    // Reopening the area sees the remaining snapshot.
    drop(area);
    let area = PrivateArea::open(&share, "share").expect("reopen");
    // Paths hold the new mount's fd number, which another test thread may
    // have changed: compare what identifies a snapshot.
    let names: Vec<_> = area
        .list_snapshots()
        .expect("list")
        .into_iter()
        .map(|s| (s.name, s.subvol_id, s.time))
        .collect();
    assert_eq!(names, vec![(s2.name.clone(), s2.subvol_id, s2.time)]);
    area.delete_snapshot(&s2.name).expect("delete s2");
    assert!(area.list_snapshots().expect("list").is_empty());
}

#[test]
fn list_ignores_foreign_entries_and_areas_are_separate() {
    let lfs = LoopFs::new(Layout::TopLevel);
    let share = Share::open(&lfs.share).expect("open share");
    let a = PrivateArea::open(&share, "alpha").expect("area alpha");
    let b = PrivateArea::open(&share, "beta").expect("area beta");
    assert_ne!(a.snapshots_dir(), b.snapshots_dir());

    // std::fs through the /proc/self/fd path: create, read, remove.
    let scratch = a.snapshots_dir().join("notes.txt");
    fs::write(&scratch, b"hello").expect("write via /proc/self/fd");
    assert_eq!(fs::read(&scratch).expect("read"), b"hello");

    // Foreign entries: a plain dir with a snapshot-like name and a junk dir.
    let fake = "@GMT-2000.01.01-00.00.00";
    fs::create_dir(a.snapshots_dir().join(fake)).expect("mkdir fake");
    fs::create_dir(a.snapshots_dir().join("junk")).expect("mkdir junk");

    let s = a.create_snapshot(&share).expect("snapshot");
    assert_eq!(a.list_snapshots().expect("list"), vec![s.clone()]);
    assert!(b.list_snapshots().expect("list beta").is_empty());
    assert!(matches!(
        a.get(fake),
        Err(SnapshotError::NotSubvolume { .. })
    ));
    // Deleting a plain directory through the snapshot API fails and leaves it.
    assert!(a.delete_snapshot(fake).is_err());
    assert!(a.snapshots_dir().join(fake).is_dir());

    // The share mounted through the top level: the snapshot is not inside the
    // share directory.
    for p in walk(&share.path) {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        assert!(!name.starts_with("@GMT-"), "leak: {}", p.display());
    }

    fs::remove_file(&scratch).expect("remove");
    assert!(!scratch.exists());
    a.delete_snapshot(&s.name).expect("delete");
    assert!(a.list_snapshots().expect("list").is_empty());
}

#[test]
fn snapshot_of_another_subvolume_in_the_same_area_fs() {
    // Two shares on one filesystem, each with its own area.
    let lfs = LoopFs::new(Layout::TopLevel);
    let other = lfs.mnt.join("other");
    common::run(
        "btrfs",
        &["subvolume", "create", other.to_str().unwrap_or("")],
    );
    let s1 = Share::open(&lfs.share).expect("share");
    let s2 = Share::open(&other).expect("other");
    assert_ne!(s1.subvol_id, s2.subvol_id);
    assert_eq!(s1.fs_uuid, s2.fs_uuid);
    fs::write(other.join("o.txt"), b"o").expect("write");
    let area = PrivateArea::open(&s2, "other").expect("area");
    let snap = area.create_snapshot(&s2).expect("snapshot");
    assert_eq!(fs::read(snap.path.join("o.txt")).expect("read"), b"o");
    assert!(is_read_only(&snap.path).expect("ro"));
    area.delete_snapshot(&snap.name).expect("delete");
    // Removing the private dirs through /proc/self/fd works like any dir.
    match fs::remove_dir(area.snapshots_dir()) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => panic!("area vanished"),
        Err(e) => panic!("rmdir: {e}"),
    }
}

#[test]
fn rapid_snapshots_get_distinct_increasing_names() {
    let lfs = LoopFs::new(Layout::ShareOnly);
    let share = Share::open(&lfs.share).expect("open share");
    let area = PrivateArea::open(&share, "rapid").expect("area");
    let start = std::time::Instant::now();
    let snaps: Vec<_> = (0..3)
        .map(|i| {
            fs::write(share.path.join("n"), format!("{i}")).expect("write");
            area.create_snapshot(&share).expect("snapshot")
        })
        .collect();
    // Three names need at least three distinct seconds: >= 2 s of waiting
    // minus the fraction of the first second already gone.
    assert!(start.elapsed() >= std::time::Duration::from_secs(1));
    for w in snaps.windows(2) {
        assert!(w[0].name < w[1].name, "{} !< {}", w[0].name, w[1].name);
        assert!(w[0].time < w[1].time);
    }
    assert_eq!(area.list_snapshots().expect("list"), snaps);
    for (i, s) in snaps.iter().enumerate() {
        assert_eq!(
            fs::read_to_string(s.path.join("n")).expect("read"),
            format!("{i}")
        );
        area.delete_snapshot(&s.name).expect("delete");
    }
}
