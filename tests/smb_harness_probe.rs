//! Demonstrates tests/common/smbuser.rs against a stand-in for `btrship
//! mount`: a plain directory (0555 root:root, outside the share) of
//! `@GMT-…` directories, each a full copy of the share with other contents,
//! served by a real smbd with `vfs_shadow_copy2` to a normal (non-root,
//! non-guest) SMB user. No btrfs needed: with `shadow:mountpoint` set to
//! the share, shadow_copy2 works on any filesystem.
//!
//! Checks: (a) `allinfo` lists the labels, newest first; (b) an old version
//! reads through its `@GMT-…` path, with that version's bytes; (c) it can
//! be copied back over the current file; (d) a file 0600 of another user
//! is refused, current and old; (e) a file missing from a snapshot is
//! listed there without a version; (f) smbclient lists at most 1310 labels.

mod common;

use chrono::{TimeZone, Utc};
use common::smbuser::{
    gmt_label, shadow_copy2_lines, SmbUserServer, UnixUser, SMBCLIENT_MAX_LABELS,
};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Instant;

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

fn file(path: &Path, data: &str, mode: u32, owner: &UnixUser) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    chmod(path, mode);
    owner.chown(path);
}

/// The share tree as of `tag`: directories 0755 root:root, files of `user`
/// (0644), `secret.txt` 0600 and `other.txt` 0644 of `other`; `later.txt`
/// only `with_later`.
fn tree(root: &Path, tag: &str, with_later: bool, user: &UnixUser, other: &UnixUser) {
    fs::create_dir_all(root.join("dir")).unwrap();
    fs::create_dir_all(root.join("Sub Dir")).unwrap();
    for d in [root.to_path_buf(), root.join("dir"), root.join("Sub Dir")] {
        chmod(&d, 0o755);
    }
    let body = |name: &str| format!("{name} as of {tag}");
    file(&root.join("a.txt"), &body("a.txt"), 0o644, user);
    file(&root.join("dir/b.txt"), &body("b.txt"), 0o644, user);
    file(
        &root.join("Sub Dir/space file.txt"),
        &body("space file.txt"),
        0o644,
        user,
    );
    file(&root.join("secret.txt"), &body("secret.txt"), 0o600, other);
    file(&root.join("other.txt"), &body("other.txt"), 0o644, other);
    if with_later {
        file(&root.join("later.txt"), &body("later.txt"), 0o644, user);
    }
}

/// A tempdir the SMB users can enter (0711 whatever the umask).
fn open_tempdir(prefix: &str) -> tempfile::TempDir {
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("create tempdir");
    chmod(tmp.path(), 0o711);
    tmp
}

#[test]
fn previous_versions_as_a_normal_user() {
    let tmp = open_tempdir("btrship-smbprobe-");
    let share = tmp.path().join("share");
    let snapdir = tmp.path().join("versions");
    let user = UnixUser::create();
    let other = UnixUser::create();

    tree(&share, "now", true, &user, &other);
    let labels: Vec<String> = (1..=3)
        .map(|day| gmt_label(&Utc.with_ymd_and_hms(2025, 6, day, 10, 0, 0).unwrap()))
        .collect();
    assert_eq!(labels[0], "@GMT-2025.06.01-10.00.00");
    fs::create_dir(&snapdir).unwrap();
    for (i, label) in labels.iter().enumerate() {
        // The oldest lacks later.txt.
        tree(&snapdir.join(label), label, i > 0, &user, &other);
    }
    chmod(&snapdir, 0o555);

    let mut lines = vec!["read only = no".to_string()];
    lines.extend(shadow_copy2_lines(&share, &snapdir));
    let smb = SmbUserServer::start_as(user, &share, "office", &lines);
    let newest_first: Vec<String> = labels.iter().rev().cloned().collect();

    // (a) every label, newest first, each with a version of the file.
    assert_eq!(smb.allinfo("dir/b.txt"), newest_first);
    assert_eq!(smb.versions("dir/b.txt"), newest_first);
    let v = smb.allinfo_versions("Sub Dir/space file.txt");
    assert_eq!(v.len(), 3, "{v:?}");
    for (version, label) in v.iter().zip(&newest_first) {
        let want = format!("space file.txt as of {label}").len() as u64;
        assert_eq!(version.size, Some(want), "{version:?}");
        assert!(version.write_time.is_some(), "{version:?}");
    }

    // (e) the list is the snapdir's, not the file's: a file missing from
    // the oldest snapshot is listed there without a version.
    assert_eq!(smb.allinfo("later.txt"), newest_first);
    assert_eq!(smb.versions("later.txt"), newest_first[..2].to_vec());
    assert!(smb.try_allinfo("no-such-file.txt").is_err());

    // (b) each version reads with its own bytes, also with spaces in names.
    for label in &labels {
        assert_eq!(
            smb.read_version(label, "dir/b.txt"),
            format!("b.txt as of {label}").into_bytes()
        );
        assert_eq!(
            smb.read_version(label, "Sub Dir/space file.txt"),
            format!("space file.txt as of {label}").into_bytes()
        );
    }
    assert_eq!(smb.read("dir/b.txt"), b"b.txt as of now");
    let missing = smb.try_read_version(&labels[0], "later.txt").unwrap_err();
    assert!(missing.is("NT_STATUS_OBJECT_NAME_NOT_FOUND"), "{missing}");

    // (c) copy an old version back over the current file: get, then put.
    let local = tmp.path().join("restored-a.txt");
    smb.get_version(&labels[0], "a.txt", &local);
    assert_eq!(
        fs::read(&local).unwrap(),
        format!("a.txt as of {}", labels[0]).as_bytes()
    );
    smb.put(&local, "a.txt");
    let current = share.join("a.txt");
    assert_eq!(
        fs::read(&current).unwrap(),
        format!("a.txt as of {}", labels[0]).as_bytes()
    );
    let md = fs::metadata(&current).unwrap();
    assert_eq!((md.uid(), md.mode() & 0o7777), (smb.user().uid(), 0o644));
    smb.restore_version(&labels[1], "dir/b.txt");
    assert_eq!(
        fs::read(share.join("dir/b.txt")).unwrap(),
        format!("b.txt as of {}", labels[1]).as_bytes()
    );

    // (d) 0600 of another user: refused now and in every version, while
    // that user's 0644 file reads in both.
    let denied = smb.try_read("secret.txt").unwrap_err();
    assert!(denied.is("NT_STATUS_ACCESS_DENIED"), "{denied}");
    for label in &labels {
        let denied = smb.try_read_version(label, "secret.txt").unwrap_err();
        assert!(denied.is("NT_STATUS_ACCESS_DENIED"), "{denied}");
        assert_eq!(
            smb.read_version(label, "other.txt"),
            format!("other.txt as of {label}").into_bytes()
        );
    }
    let denied = smb
        .try_get("secret.txt", &tmp.path().join("nope"))
        .unwrap_err();
    assert!(denied.is("NT_STATUS_ACCESS_DENIED"), "{denied}");
    assert!(!tmp.path().join("nope").exists());
    // smbclient cannot open it, so it asks for no snapshot list at all.
    assert_eq!(smb.allinfo("secret.txt"), Vec::<String>::new());
    assert_eq!(smb.allinfo("other.txt"), newest_first);

    drop(smb);
    drop(other);
}

#[test]
fn smbclient_lists_at_most_1310_labels() {
    let tmp = open_tempdir("btrship-smbprobe-");
    let share = tmp.path().join("share");
    let snapdir = tmp.path().join("versions");
    fs::create_dir(&share).unwrap();
    chmod(&share, 0o755);
    fs::write(share.join("f.txt"), "now").unwrap();
    chmod(&share.join("f.txt"), 0o644);
    fs::create_dir(&snapdir).unwrap();
    let start = Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap();
    let add = |i: i64| {
        let d = snapdir.join(gmt_label(&(start + chrono::Duration::hours(i))));
        fs::create_dir(&d).unwrap();
        chmod(&d, 0o755);
        fs::write(d.join("f.txt"), format!("hour {i}")).unwrap();
        chmod(&d.join("f.txt"), 0o644);
    };
    for i in 0..1000 {
        add(i);
    }
    let mut lines = vec!["read only = no".to_string()];
    lines.extend(shadow_copy2_lines(&share, &snapdir));
    let smb = SmbUserServer::start(&share, "office", &lines);

    let t = Instant::now();
    let v = smb.versions("f.txt");
    eprintln!("allinfo with 1000 snapshots: {:?}", t.elapsed());
    assert_eq!(v.len(), 1000);
    assert_eq!(v[0], gmt_label(&(start + chrono::Duration::hours(999))));

    for i in 1000..SMBCLIENT_MAX_LABELS as i64 {
        add(i);
    }
    assert_eq!(smb.allinfo("f.txt").len(), SMBCLIENT_MAX_LABELS);
    add(SMBCLIENT_MAX_LABELS as i64);
    let err = smb.try_allinfo("f.txt").unwrap_err();
    assert!(err.contains("do not fit"), "{err}");
}
