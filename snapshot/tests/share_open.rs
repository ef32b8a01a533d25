//! `Share::open` and `is_read_only` against a real loop-mounted btrfs.
//! Needs root and btrfs-progs; fails with a clear message otherwise.

mod common;

use std::fs;
use std::path::Path;

use btrship_snapshot::{is_read_only, PrivateArea, Share, SnapshotError};
use common::{run, Layout, LoopFs};

fn uuid_hex(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[test]
fn subvolume_under_top_level_mount() {
    let fs = LoopFs::new(Layout::TopLevel);
    let share = Share::open(&fs.share).expect("open share");
    assert!(share.subvol_id >= 256, "subvol_id {}", share.subvol_id);
    assert_eq!(share.path, fs.share.canonicalize().expect("canonicalize"));
    assert_eq!(Some(&share.device), fs.dev.as_ref());
    let blkid = run("blkid", &["-s", "UUID", "-o", "value", &fs.dev_str()]);
    assert_eq!(uuid_hex(&share.fs_uuid), blkid.trim());
    assert!(!is_read_only(&share.path).expect("is_read_only"));

    // A path with a trailing component `.` and through a symlink canonicalises.
    let link = fs.tmp_path().join("link");
    std::os::unix::fs::symlink(&fs.share, &link).expect("symlink");
    let via_link = Share::open(&link).expect("open via symlink");
    assert_eq!(via_link.path, share.path);
    assert_eq!(via_link.subvol_id, share.subvol_id);
}

#[test]
fn subvolume_mounted_by_itself() {
    let fs = LoopFs::new(Layout::ShareOnly);
    let share = Share::open(&fs.share).expect("open share");
    assert!(share.subvol_id >= 256);
    assert_eq!(Some(&share.device), fs.dev.as_ref());
}

#[test]
fn plain_directory_is_rejected() {
    let fs = LoopFs::new(Layout::TopLevel);
    let plain = fs.share.join("plain");
    fs::create_dir(&plain).expect("mkdir");
    let err = Share::open(&plain).expect_err("plain dir must be rejected");
    assert!(
        matches!(err, SnapshotError::NotSubvolume { .. }),
        "got {err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("btrfs subvolume create"), "{msg}");
    assert!(msg.contains("plain"), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");

    // A plain directory in the top level is not a subvolume either.
    let plain_top = fs.mnt.join("plain-top");
    fs::create_dir(&plain_top).expect("mkdir");
    let err = Share::open(&plain_top).expect_err("plain dir must be rejected");
    assert!(
        matches!(err, SnapshotError::NotSubvolume { .. }),
        "got {err:?}"
    );

    let err = is_read_only(&plain).expect_err("not a subvolume");
    assert!(
        matches!(err, SnapshotError::NotSubvolume { .. }),
        "got {err:?}"
    );
}

#[test]
fn top_level_is_rejected() {
    let fs = LoopFs::new(Layout::TopLevel);
    let err = Share::open(&fs.mnt).expect_err("top level must be rejected");
    assert!(matches!(err, SnapshotError::TopLevel { .. }), "got {err:?}");
    assert!(err.to_string().contains("btrfs subvolume create"), "{err}");
}

#[test]
fn files_and_missing_paths_are_rejected() {
    let fs = LoopFs::new(Layout::TopLevel);
    let file = fs.share.join("file");
    fs::write(&file, b"x").expect("write");
    let err = Share::open(&file).expect_err("file must be rejected");
    assert!(
        matches!(err, SnapshotError::NotDirectory { .. }),
        "got {err:?}"
    );
    let err = Share::open(&fs.share.join("missing")).expect_err("missing");
    assert!(matches!(err, SnapshotError::Io { .. }), "got {err:?}");
}

#[test]
fn non_btrfs_is_rejected() {
    // /tmp is ext4 on this machine; fall back to /dev (devtmpfs) if it is btrfs.
    let stat = run("stat", &["-f", "-c", "%T", "/tmp"]);
    let path = if stat.trim() == "btrfs" {
        Path::new("/dev")
    } else {
        Path::new("/tmp")
    };
    let err = Share::open(path).expect_err("non-btrfs must be rejected");
    assert!(matches!(err, SnapshotError::NotBtrfs { .. }), "got {err:?}");
    assert!(err.to_string().contains("btrfs"), "{err}");
    let err = is_read_only(path).expect_err("non-btrfs");
    assert!(matches!(err, SnapshotError::NotBtrfs { .. }), "got {err:?}");
}

#[test]
fn private_area_rejects_bad_share_names() {
    let fs = LoopFs::new(Layout::ShareOnly);
    let share = Share::open(&fs.share).expect("open share");
    for bad in ["", ".", "..", "a/b", "../x", "a\0b"] {
        let err = PrivateArea::open(&share, bad).expect_err(bad);
        assert!(
            matches!(err, SnapshotError::InvalidShareName { .. }),
            "{bad:?}: {err:?}"
        );
    }
}
