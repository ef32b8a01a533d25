//! `btrship mount` (a read-only FUSE view of every kept moment) and
//! Windows Previous Versions through a real smbd, on real btrfs:
//!
//! - `every_moment_is_what_restore_gives_back` / `..._on_s3`: a history
//!   of snapshots and per-close versions (random trees: hard links,
//!   symlinks, FIFOs, devices, sparse files, xattrs); every `@GMT-`
//!   directory of the mount equals `restore --at` that moment, in
//!   content, data regions, metadata, links and xattrs. The S3 case runs
//!   on a fresh machine with only `--repo` and `--key-file`.
//! - `previous_versions_through_smbd`: a non-root SMB user lists a file's
//!   previous versions with `allinfo`, reads each through its `@GMT-`
//!   path (exactly that moment's bytes), copies one back over the current
//!   file, cannot write into a version, cannot read the versions of a
//!   file whose mode denies it (and can when a POSIX ACL allows it); with
//!   one local snapshot kept, versions only the repository holds are
//!   listed and read; a moment shipped after the mount started appears.

#[macro_use]
mod common;

use common::smbuser::{SmbUserServer, UnixUser};
use common::{assert_same_tree, Btrship, LoopBtrfs, Mutator};
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `btrship mount`; SIGTERM (then SIGKILL, then a lazy unmount)
/// on drop.
struct Mounted {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
}

fn is_mounted(dir: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let d = dir.to_string_lossy();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(&d))
}

impl Mounted {
    fn start(bs: &Btrship, dir: &Path, extra: &[OsString]) -> Mounted {
        let log = dir.with_extension("log");
        let err = fs::File::create(&log).expect("mount log");
        let mut args = osargs!["--no-progress", "mount", "share", dir, "--refresh", "1s"];
        args.extend(extra.iter().cloned());
        let child = Command::new(env!("CARGO_BIN_EXE_btrship"))
            .args(bs.full_args(args))
            .env("BTRSHIP_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start btrship mount");
        let mut m = Mounted {
            child,
            dir: dir.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !is_mounted(dir) {
            if let Ok(Some(status)) = m.child.try_wait() {
                panic!("btrship mount exited ({status}): {}", m.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "not mounted after 60 s: {}",
                m.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        m
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn labels(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(&self.dir)
            .unwrap_or_else(|e| panic!("readdir {}: {e}", self.dir.display()))
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut exited = None;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                exited = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if is_mounted(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
            if !std::thread::panicking() {
                panic!(
                    "btrship mount left {} mounted after SIGTERM",
                    self.dir.display()
                );
            }
        }
        if !std::thread::panicking() {
            let s = exited.expect("btrship mount did not stop on SIGTERM within 20 s");
            assert!(s.success(), "btrship mount exited {s}: {}", self.log_text());
        }
    }
}

/// The end of a label's second, as `restore --at` takes it: the share as
/// of the latest moment in that second (the one the label shows).
fn label_end(label: &str) -> String {
    let t = chrono::NaiveDateTime::parse_from_str(label, "@GMT-%Y.%m.%d-%H.%M.%S")
        .unwrap_or_else(|e| panic!("label {label:?}: {e}"));
    format!("{}.999999999Z", t.format("%Y-%m-%dT%H:%M:%S"))
}

/// Snapshots and per-close versions of a random tree, each in its own
/// second.
fn make_history(bs: &Btrship, share: &Path, seed: u64, rounds: usize) {
    let mut m = Mutator::new(seed);
    m.populate(share, 40);
    bs.ok(["snapshot", "share"]);
    let daemon = bs.start_daemon("share");
    for round in 0..rounds {
        std::thread::sleep(Duration::from_millis(1100));
        m.mutate(share, 12);
        bs.sync("share");
        if round % 2 == 1 {
            std::thread::sleep(Duration::from_millis(1100));
            bs.ok(["snapshot", "share"]);
        }
    }
    drop(daemon);
}

/// Every label of the mount equals `restore --at` its moment.
fn check_every_moment(
    mounted: &Mounted,
    restorer: &Btrship,
    repo_args: &[OsString],
    out: &Path,
    at_least: usize,
) {
    let labels = mounted.labels();
    assert!(
        labels.len() >= at_least,
        "{} labels, expected at least {at_least}: {labels:?}",
        labels.len()
    );
    for label in &labels {
        let to = out.join(label);
        let mut args = osargs![
            "restore",
            "share",
            "--at",
            label_end(label),
            "--special-files",
            "--to",
            &to
        ];
        args.extend(repo_args.iter().cloned());
        restorer.ok(args);
        assert_same_tree(&to, &mounted.dir.join(label));
    }
}

#[test]
fn every_moment_is_what_restore_gives_back() {
    let fs_ = LoopBtrfs::new(1024);
    let share = fs_.subvolume("share");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--no-systemd"]);
    make_history(&bs, &share, 41, 6);
    let dir = fs_.dir("moments");
    let mounted = Mounted::start(&bs, &dir, &[]);
    check_every_moment(&mounted, &bs, &[], &fs_.dir("out"), 8);
    // The root is root's and read-only; nothing can be written anywhere.
    let root = fs::metadata(&dir).unwrap();
    assert_eq!(root.permissions().mode() & 0o7777, 0o555);
    let label = mounted.labels().pop().unwrap();
    let err = fs::write(dir.join(&label).join("new-file"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
}

#[test]
fn every_moment_is_what_restore_gives_back_on_s3() {
    use common::s3env::{aws_test_env, create_bucket, skipped, Moto};
    if skipped("the S3 mount test") {
        return;
    }
    let moto = Moto::start();
    aws_test_env();
    let bucket = format!("btrship-mount-{}", std::process::id());
    let url = format!(
        "s3://{bucket}/office?endpoint={}&region=us-east-1",
        moto.endpoint
    );
    create_bucket(&moto.endpoint, &bucket);
    let fs_ = LoopBtrfs::new(1024);
    let share = fs_.subvolume("share");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--repo", &url, "--no-systemd"]);
    make_history(&bs, &share, 43, 4);
    // A fresh machine: only the repository's address and the key.
    let fresh = Btrship::new();
    let repo_args = osargs!["--repo", &url, "--key-file", bs.key_file("share")];
    let dir = fs_.dir("moments");
    let mounted = Mounted::start(&fresh, &dir, &repo_args);
    check_every_moment(&mounted, &fresh, &repo_args, &fs_.dir("out"), 6);
}

fn write_as(path: &Path, data: &[u8], owner: Option<&UnixUser>, mode: u32) {
    fs::write(path, data).unwrap();
    if let Some(u) = owner {
        u.chown(path);
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn previous_versions_through_smbd() {
    let fs_ = LoopBtrfs::new(1024);
    // smbd reaches the share and the moments as the connected user.
    for d in [fs_.tmp_path(), &fs_.tmp_path().join("mnt")] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let share = fs_.subvolume("share");
    let user = UnixUser::create();
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--no-systemd"]);
    bs.set_config("share", "keep_local_snapshots", "1");
    let docs = share.join("docs");
    fs::create_dir(&docs).unwrap();
    user.chown(&docs);
    let report = docs.join("report.txt");
    let secret = docs.join("secret.txt");
    let shared = docs.join("shared.txt");
    let mut written = Vec::new();
    let mut version = |n: usize| {
        let text = format!("report version {n}\n").repeat(n * 100);
        write_as(&report, text.as_bytes(), Some(&user), 0o644);
        written.push(text.into_bytes());
    };
    version(1);
    write_as(&secret, b"root only 1", None, 0o600);
    write_as(&shared, b"shared by ACL 1", None, 0o600);
    common::run(
        "setfacl",
        &[
            "-m",
            &format!("u:{}:r", user.name()),
            shared.to_str().unwrap(),
        ],
    );
    bs.ok(["snapshot", "share"]);
    let daemon = bs.start_daemon("share");
    for n in 2..=4 {
        std::thread::sleep(Duration::from_millis(1100));
        version(n);
        fs::write(&secret, format!("root only {n}")).unwrap();
        fs::write(&shared, format!("shared by ACL {n}")).unwrap();
        bs.sync("share");
        if n == 3 {
            std::thread::sleep(Duration::from_millis(1100));
            bs.ok(["snapshot", "share"]);
        }
    }
    assert!(bs.snapshot_list("share").len() >= 2);

    let dir = fs_.dir("moments");
    let mounted = Mounted::start(&bs, &dir, &[]);
    let labels = mounted.labels();
    assert!(labels.len() >= 5, "{labels:?}");
    let conf = bs.ok(osargs!["samba-conf", "share", "--dir", &dir]);
    let mut lines: Vec<String> = conf.lines().map(String::from).collect();
    lines.push("read only = no".into());
    let server = SmbUserServer::start_as(user, &share, "share", &lines);

    // Every moment is listed for the file, newest first, and each reads
    // back as restore gives it.
    let listed = server.versions("docs/report.txt");
    let mut newest_first = labels.clone();
    newest_first.reverse();
    assert_eq!(listed, newest_first);
    let mut seen = BTreeSet::new();
    for label in &labels {
        let got = server.read_version(label, "docs/report.txt");
        let to = fs_.dir("out").join(label);
        bs.ok(osargs![
            "restore",
            "share",
            "--at",
            label_end(label),
            "--path",
            "docs",
            "--to",
            &to
        ]);
        assert_eq!(
            got,
            fs::read(to.join("docs/report.txt")).unwrap(),
            "{label}"
        );
        assert_eq!(
            server.read_version(label, "docs/shared.txt"),
            fs::read(to.join("docs/shared.txt")).unwrap(),
            "{label}: a POSIX ACL lets the user read the file"
        );
        let denied = server
            .try_read_version(label, "docs/secret.txt")
            .expect_err("a version of a file the user may not read");
        assert!(denied.is("NT_STATUS_ACCESS_DENIED"), "{label}: {denied:?}");
        seen.insert(got);
    }
    assert_eq!(
        seen,
        written.iter().cloned().collect(),
        "every version, once"
    );
    assert!(server.try_read("docs/secret.txt").is_err());

    // Versions only the repository holds were read above: one local
    // snapshot is left (the daemon's start-up one and the first are gone).
    let subvols = common::run("btrfs", &osargs!["subvolume", "list", &share]);
    let local = subvols
        .lines()
        .filter(|l| l.contains("/snapshots/@GMT-"))
        .count();
    assert_eq!(local, 1, "{subvols}");

    // Nothing can be written into a version.
    let scratch = fs_.dir("scratch").join("x");
    fs::write(&scratch, b"ransom").unwrap();
    let first = &labels[0];
    let refused = server
        .try_put(&scratch, &format!("{first}/docs/report.txt"))
        .expect_err("a write into a version");
    assert!(refused.status.is_some(), "{refused:?}");

    // "Restore": the first version copied back over the current file.
    server.restore_version(first, "docs/report.txt");
    assert_eq!(fs::read(&report).unwrap(), written[0]);
    assert_eq!(server.read("docs/report.txt"), written[0]);

    // A moment shipped now appears without a remount.
    std::thread::sleep(Duration::from_millis(1100));
    fs::write(&report, b"after the mount").unwrap();
    bs.sync("share");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = server.versions("docs/report.txt");
        let newest = &now[0];
        if !labels.contains(newest)
            && server.read_version(newest, "docs/report.txt") == b"after the mount"
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new label after 30 s: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(daemon);
    drop(server);
    drop(mounted);
}
