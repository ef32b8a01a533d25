//! Shared helpers for btrship's integration tests.
//!
//! - [`LoopBtrfs`]: a throwaway btrfs on a loop device (needs root and
//!   btrfs-progs; tests FAIL, never skip, without them).
//! - [`Btrship`]: runs the real binary with private `--config-dir` and
//!   `--state-dir`, and checks the error contract (exit code, one
//!   `btrship: error: ` line on stderr, never a panic).
//! - [`snapshot_tree`] / [`assert_same_tree`]: an exact description of a
//!   directory tree (metadata, contents, holes, xattrs, hard links) and a
//!   readable diff of two of them.
//! - [`reference_snapshot`]: an exact, instant reference copy of a share (a
//!   read-only btrfs snapshot).
//! - [`Mutator`]: a seeded, deterministic random tree generator and mutator.

#![allow(dead_code)]

pub mod cloudenv;
pub mod faultproxy;
pub mod s3env;
pub mod samba;
pub mod smbuser;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{CString, OsStr, OsString};
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tempfile::TempDir;

/// Builds a `Vec<OsString>` from mixed `&str`, `String`, `&Path`, `PathBuf`
/// arguments: `osargs!["restore", NAME, "--to", &dir]`.
#[allow(unused_macros)]
macro_rules! osargs {
    ($($x:expr),* $(,)?) => {
        vec![$(std::ffi::OsString::from($x)),*] as Vec<std::ffi::OsString>
    };
}

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

/// Runs a command; panics with its output when it cannot run or fails.
pub fn run<S: AsRef<OsStr>>(cmd: &str, args: &[S]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e} (is it installed and in PATH?)"));
    if !out.status.success() {
        panic!(
            "{cmd} {} failed ({}):\n{}{}",
            show_args(args),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn show_args<S: AsRef<OsStr>>(args: &[S]) -> String {
    args.iter()
        .map(|a| {
            let s = a.as_ref().to_string_lossy();
            if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c == '\'') {
                format!("{s:?}")
            } else {
                s.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn require_root_and_btrfs() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "btrship's integration tests need root (loop devices, mount, btrfs snapshots, chown); \
         run them as root"
    );
    let ok = Command::new("mkfs.btrfs")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "mkfs.btrfs not found: install btrfs-progs (apt-get install btrfs-progs) to run these tests"
    );
}

/// The filesystem type of `path` as `stat -f -c %T` prints it.
pub fn fs_type(path: &Path) -> String {
    run(
        "stat",
        &[
            OsStr::new("-f"),
            OsStr::new("-c"),
            OsStr::new("%T"),
            path.as_os_str(),
        ],
    )
    .trim()
    .to_string()
}

// ---------------------------------------------------------------------------
// LoopBtrfs
// ---------------------------------------------------------------------------

/// A fresh btrfs on a loop device, top level mounted at [`LoopBtrfs::mnt`].
/// Everything lives in a tempdir; `Drop` unmounts (retrying, then lazily)
/// and detaches its own loop device only.
pub struct LoopBtrfs {
    /// Mount point of the filesystem's top level.
    pub mnt: PathBuf,
    /// Our loop device, e.g. `/dev/loop3`.
    pub dev: Option<PathBuf>,
    mounted: bool,
    tmp: TempDir,
}

impl LoopBtrfs {
    pub fn new(size_mb: u64) -> LoopBtrfs {
        require_root_and_btrfs();
        let tmp = tempfile::Builder::new()
            .prefix("btrship-it-")
            .tempdir_in("/tmp")
            .expect("create tempdir");
        let mnt = tmp.path().join("mnt");
        // Build the value first so Drop cleans up whatever step fails.
        let mut me = LoopBtrfs {
            mnt,
            dev: None,
            mounted: false,
            tmp,
        };
        let img = me.tmp.path().join("disk.img");
        run(
            "truncate",
            &[
                OsStr::new("-s"),
                OsStr::new(&format!("{size_mb}M")),
                img.as_os_str(),
            ],
        );
        let dev = run(
            "losetup",
            &[OsStr::new("-f"), OsStr::new("--show"), img.as_os_str()],
        )
        .trim()
        .to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        me.dev = Some(PathBuf::from(&dev));
        run("mkfs.btrfs", &["-q", "-f", &dev]);
        fs::create_dir(&me.mnt).expect("mkdir mnt");
        run("mount", &[OsStr::new(&dev), me.mnt.as_os_str()]);
        me.mounted = true;
        me
    }

    /// Creates a subvolume `mnt/name` and returns its path.
    pub fn subvolume(&self, name: &str) -> PathBuf {
        let p = self.mnt.join(name);
        run(
            "btrfs",
            &[OsStr::new("subvolume"), OsStr::new("create"), p.as_os_str()],
        );
        p
    }

    /// Creates (if needed) a plain directory `mnt/name` on this btrfs and
    /// returns it: a place for reference snapshots and restores, outside any
    /// share.
    pub fn dir(&self, name: &str) -> PathBuf {
        let p = self.mnt.join(name);
        fs::create_dir_all(&p).expect("mkdir on loop btrfs");
        p
    }

    /// The tempdir holding the image and the mount point (on the root fs).
    pub fn tmp_path(&self) -> &Path {
        self.tmp.path()
    }
}

impl Drop for LoopBtrfs {
    fn drop(&mut self) {
        // Never panic here: this also runs while a failed test unwinds.
        if self.mounted {
            // Another test thread forking at the same moment can hold our
            // files briefly (the fd table is copied until exec), so retry
            // before falling back to a lazy unmount.
            let mut ok = false;
            for _ in 0..40 {
                ok = Command::new("umount")
                    .arg(&self.mnt)
                    .stdin(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if ok {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !ok {
                eprintln!(
                    "umount {} failed; trying a lazy unmount",
                    self.mnt.display()
                );
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
            self.mounted = false;
        }
        if let Some(dev) = self.dev.take() {
            // If a lazily detached mount still holds the filesystem, the
            // kernel detaches the device when it goes away (autoclear).
            let ok = Command::new("losetup")
                .arg("-d")
                .arg(&dev)
                .stdin(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                eprintln!("losetup -d {} failed", dev.display());
            }
        }
    }
}

/// An exact reference copy of `share` at `dst`: a read-only btrfs snapshot
/// (`dst` must not exist, its parent must be on the same btrfs).
pub fn reference_snapshot(share: &Path, dst: &Path) {
    run(
        "btrfs",
        &[
            OsStr::new("subvolume"),
            OsStr::new("snapshot"),
            OsStr::new("-r"),
            share.as_os_str(),
            dst.as_os_str(),
        ],
    );
}

/// A reference copy with `cp` (for copies that cannot be snapshots): keeps
/// modes, owners, timestamps, hard links, xattrs (incl. security.* and ACLs)
/// and holes. Directory mtimes are kept because cp sets them after filling
/// each directory.
pub fn copy_reference(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).expect("mkdir copy target");
    let mut s = src.as_os_str().to_owned();
    s.push("/.");
    let mut d = dst.as_os_str().to_owned();
    d.push("/");
    run(
        "cp",
        &[
            OsStr::new("-a"),
            OsStr::new("--preserve=all"),
            OsStr::new("--reflink=auto"),
            OsStr::new("--sparse=always"),
            &s,
            &d,
        ],
    );
}

/// Sum of the sizes of all files under `dir` (the repository's size),
/// skipping the local store's `.tmp` directory.
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for (rel, md) in walk(dir) {
        if rel
            .first()
            .map(|c| c.as_bytes() == b".tmp")
            .unwrap_or(false)
        {
            continue;
        }
        if md.is_file() {
            total += md.len();
        }
    }
    total
}

/// Every regular file under `repo` as (relative path with '/', absolute
/// path), sorted, skipping `.tmp/`.
pub fn repo_objects(repo: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for (rel, md) in walk(repo) {
        if !md.is_file() {
            continue;
        }
        let parts: Vec<String> = rel
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        if parts.first().map(|s| s == ".tmp").unwrap_or(false) {
            continue;
        }
        let mut abs = repo.to_path_buf();
        for c in &rel {
            abs.push(c);
        }
        out.push((parts.join("/"), abs));
    }
    out.sort();
    out
}

/// All entries under `root` (not following symlinks, `root` excluded) as
/// (relative components, metadata), sorted by path bytes.
pub fn walk(root: &Path) -> Vec<(Vec<OsString>, fs::Metadata)> {
    let mut out = Vec::new();
    walk_into(root, &mut Vec::new(), &mut out);
    out.sort_by_cached_key(|a| join_rel(&a.0));
    out
}

fn walk_into(dir: &Path, rel: &mut Vec<OsString>, out: &mut Vec<(Vec<OsString>, fs::Metadata)>) {
    let rd = fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
    let mut names: Vec<OsString> = rd
        .map(|e| {
            e.unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
                .file_name()
        })
        .collect();
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in names {
        let p = dir.join(&name);
        let md = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
        rel.push(name);
        out.push((rel.clone(), md.clone()));
        if md.is_dir() {
            walk_into(&p, rel, out);
        }
        rel.pop();
    }
}

/// Relative components joined with '/' as bytes ("" for the root).
fn join_rel(rel: &[OsString]) -> Vec<u8> {
    let mut v = Vec::new();
    for (i, c) in rel.iter().enumerate() {
        if i > 0 {
            v.push(b'/');
        }
        v.extend_from_slice(c.as_bytes());
    }
    v
}

// ---------------------------------------------------------------------------
// Btrship: the binary under test
// ---------------------------------------------------------------------------

/// How long one btrship invocation may take before the test fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// The btrship binary with its own config and state directories ("a
/// machine"). `new()` makes them (empty, mode 0700) in a fresh tempdir.
pub struct Btrship {
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    tmp: Option<TempDir>,
}

impl Btrship {
    /// A brand-new machine: empty config and state dirs in a fresh tempdir.
    pub fn new() -> Btrship {
        let tmp = tempfile::Builder::new()
            .prefix("btrship-machine-")
            .tempdir_in("/tmp")
            .expect("create tempdir");
        let mut b = Btrship::in_dir(tmp.path());
        b.tmp = Some(tmp);
        b
    }

    /// A machine whose config and state dirs are `base/config` and
    /// `base/state` (created empty if missing).
    pub fn in_dir(base: &Path) -> Btrship {
        let config_dir = base.join("config");
        let state_dir = base.join("state");
        for d in [&config_dir, &state_dir] {
            fs::create_dir_all(d).expect("mkdir");
            fs::set_permissions(d, fs::Permissions::from_mode(0o700)).expect("chmod 0700");
        }
        Btrship {
            config_dir,
            state_dir,
            tmp: None,
        }
    }

    /// The default repository, `<state-dir>/repo`.
    pub fn repo(&self) -> PathBuf {
        self.state_dir.join("repo")
    }

    /// Where `init` writes systemd units on this machine (never the real
    /// /etc/systemd/system).
    pub fn systemd_dir(&self) -> PathBuf {
        self.config_dir.with_file_name("systemd")
    }

    /// The default key file of share `name`, `<config-dir>/<name>.key`.
    pub fn key_file(&self, name: &str) -> PathBuf {
        self.config_dir.join(format!("{name}.key"))
    }

    pub fn full_args<I, S>(&self, args: I) -> Vec<OsString>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut v: Vec<OsString> = vec![
            "--config-dir".into(),
            self.config_dir.clone().into(),
            "--state-dir".into(),
            self.state_dir.clone().into(),
        ];
        v.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        v
    }

    /// Runs `btrship --config-dir .. --state-dir .. ARGS` (stdin closed,
    /// output captured, killed after a generous timeout).
    pub fn cmd<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cmd_env(args, &[])
    }

    /// `cmd` with these environment variables set.
    pub fn cmd_env<I, S>(&self, args: I, env: &[(&str, &str)]) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let full = self.full_args(args);
        run_with_timeout(
            Command::new(env!("CARGO_BIN_EXE_btrship"))
                .args(&full)
                .envs(env.iter().copied())
                .env_remove("RUST_LOG")
                .env_remove("RUST_BACKTRACE")
                .env_remove("BTRSHIP_LOG")
                .env_remove("BTRSHIP_CONFIG_DIR")
                .env_remove("BTRSHIP_STATE_DIR")
                .env("BTRSHIP_SYSTEMD_DIR", self.systemd_dir())
                .stdin(Stdio::null()),
            &describe(&full),
        )
    }

    /// Runs with `BTRSHIP_STATS=1`, asserts success, and returns the store
    /// counters btrship printed (`{"btrship_stats":{"store":{...}}}`).
    pub fn stats<I, S>(&self, args: I) -> serde_json::Value
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let full = self.full_args(args);
        let out = run_with_timeout(
            Command::new(env!("CARGO_BIN_EXE_btrship"))
                .args(&full)
                .env_remove("BTRSHIP_LOG")
                .env("BTRSHIP_STATS", "1")
                .env("BTRSHIP_SYSTEMD_DIR", self.systemd_dir())
                .stdin(Stdio::null()),
            &describe(&full),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "`btrship {}` failed:\n{stderr}",
            describe(&full)
        );
        let line = stderr
            .lines()
            .rev()
            .find(|l| l.contains("btrship_stats"))
            .unwrap_or_else(|| panic!("no stats line in:\n{stderr}"));
        serde_json::from_str::<serde_json::Value>(line).unwrap()["btrship_stats"]["store"].clone()
    }

    /// A fresh machine's `check share --read-data` of the repository at
    /// `repo` with `key` (asserts success).
    pub fn check_repo(&self, repo: impl AsRef<OsStr>, key: impl AsRef<OsStr>) {
        self.ok([
            OsStr::new("check"),
            OsStr::new("share"),
            OsStr::new("--read-data"),
            OsStr::new("--repo"),
            repo.as_ref(),
            OsStr::new("--key-file"),
            key.as_ref(),
        ]);
    }

    /// A fresh machine's `restore share --special-files --at AT --to TO`
    /// from the repository at `repo` with `key` (asserts success).
    pub fn restore_repo(
        &self,
        repo: impl AsRef<OsStr>,
        key: impl AsRef<OsStr>,
        at: &str,
        to: &Path,
    ) {
        self.ok([
            OsStr::new("restore"),
            OsStr::new("share"),
            OsStr::new("--special-files"),
            OsStr::new("--at"),
            OsStr::new(at),
            OsStr::new("--to"),
            to.as_os_str(),
            OsStr::new("--repo"),
            repo.as_ref(),
            OsStr::new("--key-file"),
            key.as_ref(),
        ]);
    }

    /// Runs and asserts success; returns stdout. Shows stderr on failure.
    pub fn ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let full = self.full_args(args);
        let out = self.cmd(full[4..].iter());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "`btrship {}` failed with {}:\n--- stderr ---\n{}\n--- stdout ---\n{}",
            describe(&full),
            out.status,
            stderr,
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            !stderr.contains("panicked"),
            "`btrship {}` panicked:\n{stderr}",
            describe(&full)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs and asserts the error contract with exit code `code`; returns
    /// stderr.
    pub fn fails<I, S>(&self, args: I, code: i32) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.fails_with(args, &[code]).1
    }

    /// Runs and asserts the error contract with an exit code in `codes`:
    /// non-zero exit, exactly one non-empty line on stderr starting with
    /// "btrship: error: ", no panic. Returns (code, stderr, stdout).
    pub fn fails_with<I, S>(&self, args: I, codes: &[i32]) -> (i32, String, String)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let full = self.full_args(args);
        let out = self.cmd(full[4..].iter());
        let what = format!("btrship {}", describe(&full));
        let code = check_error_contract(&out, &what);
        assert!(
            codes.contains(&code),
            "`{what}` exited with {code}, expected {codes:?}:\n--- stderr ---\n{}\n--- stdout ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        (
            code,
            String::from_utf8_lossy(&out.stderr).into_owned(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// `snapshots NAME --json`, parsed: (record, snapshot name, time) sorted
    /// by time.
    pub fn snapshot_list(&self, name: &str) -> Vec<SnapshotInfo> {
        let out = self.ok(["snapshots", name, "--json"]);
        parse_snapshot_list(&out)
    }
}

/// One entry of `snapshots --json`.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub record: String,
    pub snapshot: String,
    /// The "time" field exactly as printed.
    pub time: String,
    pub parsed: chrono::DateTime<chrono::Utc>,
}

pub fn parse_snapshot_list(json: &str) -> Vec<SnapshotInfo> {
    let v: serde_json::Value = serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("snapshots --json is not JSON ({e}):\n{json}"));
    assert_eq!(v["version"], 1, "snapshots --json: version field:\n{json}");
    let arr = v["snapshots"]
        .as_array()
        .unwrap_or_else(|| panic!("snapshots --json: no \"snapshots\" array:\n{json}"));
    let mut out: Vec<SnapshotInfo> = arr
        .iter()
        .map(|s| {
            let time = s["time"]
                .as_str()
                .unwrap_or_else(|| panic!("snapshot without \"time\" string: {s}"))
                .to_string();
            let parsed = chrono::DateTime::parse_from_rfc3339(&time)
                .unwrap_or_else(|e| panic!("snapshot time {time:?} is not RFC 3339: {e}"))
                .with_timezone(&chrono::Utc);
            SnapshotInfo {
                record: s["record"].as_str().unwrap_or_default().to_string(),
                snapshot: s["snapshot"]
                    .as_str()
                    .unwrap_or_else(|| panic!("snapshot without \"snapshot\" string: {s}"))
                    .to_string(),
                time,
                parsed,
            }
        })
        .collect();
    out.sort_by_key(|s| s.parsed);
    out
}

fn describe(args: &[OsString]) -> String {
    show_args(args)
}

/// Asserts the error contract on a finished command and returns its exit
/// code: non-zero, exactly one non-empty stderr line starting with
/// "btrship: error: ", no "panicked".
pub fn check_error_contract(out: &Output, what: &str) -> i32 {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stderr.contains("panicked") && !stdout.contains("panicked"),
        "`{what}` panicked:\n{stderr}"
    );
    let code = out.status.code().unwrap_or_else(|| {
        panic!(
            "`{what}` was killed by a signal ({}):\n{stderr}",
            out.status
        )
    });
    assert_ne!(
        code, 0,
        "`{what}` succeeded, expected a failure:\n--- stdout ---\n{stdout}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("btrship: error: ") && lines[0].len() > 16,
        "`{what}` (exit {code}): stderr must be exactly one line starting with \
         \"btrship: error: \", got {} line(s):\n{stderr}",
        lines.len()
    );
    code
}

/// Runs `cmd` capturing stdout/stderr; kills it after COMMAND_TIMEOUT.
pub fn run_with_timeout(cmd: &mut Command, what: &str) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run btrship ({what}): {e}"));
    let mut so = child.stdout.take().expect("stdout pipe");
    let mut se = child.stderr.take().expect("stderr pipe");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {
                if start.elapsed() > COMMAND_TIMEOUT {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("`btrship {what}` did not finish within {COMMAND_TIMEOUT:?}; killed it");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("wait for btrship: {e}"),
        }
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

// ---------------------------------------------------------------------------
// Tree descriptions
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

fn kind_of(ft: fs::FileType) -> Kind {
    if ft.is_file() {
        Kind::File
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_socket() {
        Kind::Socket
    } else if ft.is_char_device() {
        Kind::CharDev
    } else {
        Kind::BlockDev
    }
}

/// Everything compared about one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// st_mode & 0o7777
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// (seconds, nanoseconds)
    pub mtime: (i64, i64),
    /// Files: logical size.
    pub size: Option<u64>,
    /// Files: hash of the content.
    pub hash: Option<u64>,
    /// Files: data regions (offset, length) from SEEK_DATA/SEEK_HOLE.
    pub regions: Option<Vec<(u64, u64)>>,
    /// Symlinks: target bytes (never followed).
    pub target: Option<Vec<u8>>,
    /// Device nodes: st_rdev.
    pub rdev: Option<u64>,
    /// All xattrs, every namespace.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// A full description of a tree: entries by relative path bytes (the root
/// is ""), and hard-link groups (sets of relative paths sharing an inode,
/// only groups of two or more paths inside the tree).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    pub entries: BTreeMap<Vec<u8>, Entry>,
    pub links: BTreeSet<BTreeSet<Vec<u8>>>,
}

/// Describes the tree at `src` (a directory, or a single non-directory).
pub fn snapshot_tree(src: &Path) -> Tree {
    let mut entries = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), BTreeSet<Vec<u8>>> = HashMap::new();
    let root_md =
        fs::symlink_metadata(src).unwrap_or_else(|e| panic!("lstat {}: {e}", src.display()));
    let mut all = vec![(Vec::new(), root_md.clone())];
    if root_md.is_dir() {
        all.extend(walk(src));
    }
    for (rel, md) in all {
        let key = join_rel(&rel);
        let mut path = src.to_path_buf();
        for c in &rel {
            path.push(c);
        }
        let e = describe_entry(&path, &md);
        if e.kind != Kind::Dir && md.nlink() > 1 {
            inodes
                .entry((md.dev(), md.ino()))
                .or_default()
                .insert(key.clone());
        }
        entries.insert(key, e);
    }
    let links = inodes.into_values().filter(|g| g.len() > 1).collect();
    Tree { entries, links }
}

fn describe_entry(path: &Path, md: &fs::Metadata) -> Entry {
    let kind = kind_of(md.file_type());
    let mut e = Entry {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: (md.mtime(), md.mtime_nsec()),
        size: None,
        hash: None,
        regions: None,
        target: None,
        rdev: None,
        xattrs: read_xattrs(path),
    };
    match kind {
        Kind::File => {
            let mut f = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            let mut data = Vec::new();
            f.read_to_end(&mut data)
                .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            e.size = Some(md.len());
            e.hash = Some(hash_bytes(&data));
            e.regions = Some(data_regions(&f, md.len(), path));
        }
        Kind::Symlink => {
            e.target = Some(
                fs::read_link(path)
                    .unwrap_or_else(|e| panic!("readlink {}: {e}", path.display()))
                    .into_os_string()
                    .into_vec(),
            );
        }
        Kind::CharDev | Kind::BlockDev => e.rdev = Some(md.rdev()),
        _ => {}
    }
    e
}

pub fn hash_bytes(data: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
}

/// Data regions of an open file via SEEK_DATA/SEEK_HOLE.
pub fn data_regions(f: &fs::File, size: u64, path: &Path) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        // SAFETY: lseek on an fd we own; no memory is involved.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            panic!("SEEK_DATA {}: {err}", path.display());
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            panic!(
                "SEEK_HOLE {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        out.push((data as u64, (hole - data) as u64));
        pos = hole;
    }
    out
}

fn cpath(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL")
}

/// All xattrs of `path` (not following symlinks), every namespace.
pub fn read_xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let c = cpath(path);
    let mut out = BTreeMap::new();
    let names = loop {
        // SAFETY: a NULL buffer with size 0 asks for the needed size.
        let n = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENOTSUP) {
                return out;
            }
            panic!("llistxattr {}: {err}", path.display());
        }
        let mut buf = vec![0u8; n as usize];
        if buf.is_empty() {
            break buf;
        }
        // SAFETY: buf is valid for buf.len() bytes.
        let m = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if m < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            panic!("llistxattr {}: {err}", path.display());
        }
        buf.truncate(m as usize);
        break buf;
    };
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).expect("xattr name");
        if let Some(v) = get_xattr(&c, &cname, path) {
            out.insert(name.to_vec(), v);
        }
    }
    out
}

fn get_xattr(c: &CString, name: &CString, path: &Path) -> Option<Vec<u8>> {
    loop {
        // SAFETY: NULL/0 asks for the size.
        let n = unsafe { libc::lgetxattr(c.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENODATA) {
                return None; // removed meanwhile
            }
            panic!("lgetxattr {} {:?}: {err}", path.display(), name);
        }
        let mut buf = vec![0u8; n as usize];
        if buf.is_empty() {
            return Some(buf);
        }
        // SAFETY: buf is valid for buf.len() bytes.
        let m = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if m < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            panic!("lgetxattr {} {:?}: {err}", path.display(), name);
        }
        buf.truncate(m as usize);
        return Some(buf);
    }
}

/// Sets an xattr without following symlinks.
pub fn set_xattr(path: &Path, name: &[u8], value: &[u8]) -> std::io::Result<()> {
    let c = cpath(path);
    let n = CString::new(name).expect("xattr name");
    // SAFETY: valid C strings and a buffer of value.len() bytes.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Removes an xattr without following symlinks.
pub fn remove_xattr(path: &Path, name: &[u8]) -> std::io::Result<()> {
    let c = cpath(path);
    let n = CString::new(name).expect("xattr name");
    // SAFETY: valid C strings.
    let r = unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Sets mtime (and atime) with nanoseconds, not following symlinks.
pub fn set_mtime(path: &Path, sec: i64, nsec: i64) {
    let c = cpath(path);
    let ts = [
        libc::timespec {
            tv_sec: sec as libc::time_t,
            tv_nsec: nsec as _,
        },
        libc::timespec {
            tv_sec: sec as libc::time_t,
            tv_nsec: nsec as _,
        },
    ];
    // SAFETY: valid C string and a 2-element timespec array.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert!(
        r == 0,
        "utimensat {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn show_bytes(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => format!("{s:?}"),
        Err(_) => format!("b\"{}\"", b.escape_ascii()),
    }
}

fn show_value(b: &[u8]) -> String {
    let hex: String = b.iter().take(24).map(|x| format!("{x:02x}")).collect();
    format!(
        "[{} bytes: {hex}{}]",
        b.len(),
        if b.len() > 24 { "…" } else { "" }
    )
}

fn show_regions(r: &Option<Vec<(u64, u64)>>) -> String {
    match r {
        None => "-".into(),
        Some(v) => {
            let mut s: Vec<String> = v.iter().take(6).map(|(o, l)| format!("{o}+{l}")).collect();
            if v.len() > 6 {
                s.push(format!("… ({} regions)", v.len()));
            }
            format!("[{}]", s.join(", "))
        }
    }
}

/// Readable differences between two descriptions (all of them).
pub fn diff_trees(a: &Tree, b: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    let keys: BTreeSet<&Vec<u8>> = a.entries.keys().chain(b.entries.keys()).collect();
    for k in keys {
        let p = if k.is_empty() {
            "<root>".to_string()
        } else {
            show_bytes(k)
        };
        match (a.entries.get(k), b.entries.get(k)) {
            (Some(x), None) => out.push(format!("{p}: only in A ({:?})", x.kind)),
            (None, Some(y)) => out.push(format!("{p}: only in B ({:?})", y.kind)),
            (Some(x), Some(y)) => {
                if x.kind != y.kind {
                    out.push(format!("{p}: kind {:?} vs {:?}", x.kind, y.kind));
                    continue;
                }
                if x.mode != y.mode {
                    out.push(format!("{p}: mode {:o} vs {:o}", x.mode, y.mode));
                }
                if (x.uid, x.gid) != (y.uid, y.gid) {
                    out.push(format!(
                        "{p}: owner {}:{} vs {}:{}",
                        x.uid, x.gid, y.uid, y.gid
                    ));
                }
                if x.mtime != y.mtime {
                    out.push(format!(
                        "{p}: mtime {}.{:09} vs {}.{:09}",
                        x.mtime.0, x.mtime.1, y.mtime.0, y.mtime.1
                    ));
                }
                if x.size != y.size {
                    out.push(format!("{p}: size {:?} vs {:?}", x.size, y.size));
                }
                if x.hash != y.hash {
                    out.push(format!("{p}: content differs"));
                }
                if x.regions != y.regions {
                    out.push(format!(
                        "{p}: data regions {} vs {}",
                        show_regions(&x.regions),
                        show_regions(&y.regions)
                    ));
                }
                if x.target != y.target {
                    out.push(format!(
                        "{p}: symlink target {} vs {}",
                        x.target.as_deref().map(show_bytes).unwrap_or_default(),
                        y.target.as_deref().map(show_bytes).unwrap_or_default()
                    ));
                }
                if x.rdev != y.rdev {
                    out.push(format!("{p}: rdev {:?} vs {:?}", x.rdev, y.rdev));
                }
                if x.xattrs != y.xattrs {
                    let names: BTreeSet<&Vec<u8>> =
                        x.xattrs.keys().chain(y.xattrs.keys()).collect();
                    for n in names {
                        let (xv, yv) = (x.xattrs.get(n), y.xattrs.get(n));
                        if xv != yv {
                            out.push(format!(
                                "{p}: xattr {} {} vs {}",
                                show_bytes(n),
                                xv.map(|v| show_value(v)).unwrap_or("absent".into()),
                                yv.map(|v| show_value(v)).unwrap_or("absent".into())
                            ));
                        }
                    }
                }
            }
            (None, None) => unreachable!(),
        }
    }
    let show_group = |g: &BTreeSet<Vec<u8>>| {
        g.iter()
            .map(|p| show_bytes(p))
            .collect::<Vec<_>>()
            .join(" = ")
    };
    for g in a.links.difference(&b.links) {
        out.push(format!("hard-link group only in A: {}", show_group(g)));
    }
    for g in b.links.difference(&a.links) {
        out.push(format!("hard-link group only in B: {}", show_group(g)));
    }
    out
}

/// Panics listing the first differences when `a` and `b` (directories, or
/// single entries) are not identical trees.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let (ta, tb) = (snapshot_tree(a), snapshot_tree(b));
    let d = diff_trees(&ta, &tb);
    if !d.is_empty() {
        let mut msg = format!(
            "trees differ: A = {}, B = {} ({} entries vs {}); {} difference(s):\n",
            a.display(),
            b.display(),
            ta.entries.len(),
            tb.entries.len(),
            d.len()
        );
        for line in d.iter().take(20) {
            let _ = writeln!(msg, "  {line}");
        }
        if d.len() > 20 {
            let _ = writeln!(msg, "  … and {} more", d.len() - 20);
        }
        panic!("{msg}");
    }
}

// ---------------------------------------------------------------------------
// Mutator
// ---------------------------------------------------------------------------

/// A seeded random tree generator and mutator. The same seed on the same
/// starting tree gives the same operations.
/// Directories deeper than this are not picked to create things in, so
/// paths stay well below PATH_MAX even with long names.
const MAX_PICK_DEPTH: usize = 5;
/// Logical (apparent) size cap for sparse growth.
const LOGICAL_CAP: u64 = 48 * MIB;

pub struct Mutator {
    rng: StdRng,
    counter: u64,
    /// Upper bound on allocated file data (st_blocks) in the tree.
    pub budget: u64,
    /// Log of operations, for failure messages.
    pub log: Vec<String>,
}

struct Listing {
    /// Non-root entries: (absolute path, relative components, metadata).
    all: Vec<(PathBuf, Vec<OsString>, fs::Metadata)>,
    /// Allocated bytes of regular files (hard links counted once).
    used: u64,
    /// Logical bytes of regular files (hard links counted once).
    logical: u64,
}

impl Listing {
    fn of(root: &Path) -> Listing {
        let mut all = Vec::new();
        let mut seen = BTreeSet::new();
        let mut used = 0;
        let mut logical = 0;
        for (rel, md) in walk(root) {
            let mut p = root.to_path_buf();
            for c in &rel {
                p.push(c);
            }
            if md.is_file() && seen.insert(md.ino()) {
                used += md.blocks() * 512;
                logical += md.len();
            }
            all.push((p, rel, md));
        }
        Listing { all, used, logical }
    }
    fn files(&self) -> Vec<&(PathBuf, Vec<OsString>, fs::Metadata)> {
        self.all.iter().filter(|e| e.2.is_file()).collect()
    }
    fn dirs(&self) -> Vec<&(PathBuf, Vec<OsString>, fs::Metadata)> {
        self.all.iter().filter(|e| e.2.is_dir()).collect()
    }
    fn non_dirs(&self) -> Vec<&(PathBuf, Vec<OsString>, fs::Metadata)> {
        self.all.iter().filter(|e| !e.2.is_dir()).collect()
    }
}

impl Mutator {
    pub fn new(seed: u64) -> Mutator {
        Mutator {
            rng: StdRng::seed_from_u64(seed),
            counter: 0,
            budget: 28 * MIB,
            log: Vec::new(),
        }
    }

    /// Random bytes from the mutator's generator.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.rng.fill(&mut v[..]);
        v
    }

    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    /// Creates about `n_entries` entries under `root` (files of all sizes,
    /// nested dirs, links, special files) and decorates some with metadata.
    pub fn populate(&mut self, root: &Path, n_entries: usize) {
        let mut made = 0;
        while made < n_entries {
            let l = Listing::of(root);
            let r = self.rng.gen_range(0..100);
            made += match r {
                0..=49 => self.op_create_file(root, &l),
                50..=64 => self.op_mkdir(root, &l),
                65..=71 => self.op_symlink(root, &l),
                72..=77 => self.op_hardlink(root, &l),
                78..=82 => self.op_sparse(root, &l),
                83..=84 => self.op_fifo(root, &l),
                85 => self.op_mknod(root, &l),
                _ => {
                    self.metadata_op(root, &l);
                    0
                }
            };
        }
        let l = Listing::of(root);
        for _ in 0..n_entries / 3 {
            self.metadata_op(root, &l);
        }
    }

    /// Applies `n_ops` random operations to the tree under `root`.
    pub fn mutate(&mut self, root: &Path, n_ops: usize) {
        for _ in 0..n_ops {
            let l = Listing::of(root);
            let r = self.rng.gen_range(0..100);
            match r {
                0..=13 => {
                    self.op_create_file(root, &l);
                }
                14..=21 => self.op_overwrite(&l),
                22..=26 => self.op_append(&l),
                27..=31 => self.op_truncate(&l),
                32..=35 => {
                    self.op_sparse(root, &l);
                }
                36..=40 => {
                    self.op_mkdir(root, &l);
                }
                41..=48 => self.op_rename(root, &l),
                49..=53 => self.op_delete_file(&l),
                54..=55 => self.op_delete_tree(&l),
                56..=59 => {
                    self.op_hardlink(root, &l);
                }
                60..=64 => {
                    self.op_symlink(root, &l);
                }
                65 => {
                    self.op_fifo(root, &l);
                }
                66 => {
                    self.op_mknod(root, &l);
                }
                _ => self.metadata_op(root, &l),
            }
        }
    }

    fn metadata_op(&mut self, _root: &Path, l: &Listing) {
        match self.rng.gen_range(0..100) {
            0..=19 => self.op_chmod(l),
            20..=34 => self.op_chown(l),
            35..=59 => self.op_mtime(l),
            60..=89 => self.op_xattr(l),
            _ => self.op_acl(l),
        }
    }

    // --- helpers -----------------------------------------------------------

    fn next(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    /// A fresh, unique file or directory name in one of many awkward styles.
    fn name(&mut self, is_dir: bool) -> OsString {
        let n = self.next();
        let ext = if is_dir {
            ""
        } else {
            [".txt", ".docx", ".bin", "", ".pdf"][self.rng.gen_range(0..5)]
        };
        let bytes: Vec<u8> = match self.rng.gen_range(0..20) {
            0..=5 => format!("file{n}{ext}").into_bytes(),
            6 => format!("Document {n}{ext}").into_bytes(),
            7 => format!("~$x{n}.docx").into_bytes(),
            8 => format!("-{n}{ext}").into_bytes(),
            9 => format!("--rf{n}").into_bytes(),
            10 => format!("ñandú café {n}{ext}").into_bytes(),
            11 => format!("日本語の名前{n}{ext}").into_bytes(),
            12 => format!("emoji 🎉 {n}{ext}").into_bytes(),
            13 => {
                let mut v = b"bad\xff\xfe name ".to_vec();
                v.extend(format!("{n}").bytes());
                v
            }
            14 => {
                let mut v = b"caf\xe9".to_vec(); // latin-1, not UTF-8
                v.extend(format!("{n}{ext}").bytes());
                v
            }
            15 => format!(" lead space {n}").into_bytes(),
            16 => format!("trail {n} ").into_bytes(),
            17 => {
                let mut s = "L".repeat(230);
                s.push_str(&format!("{n}"));
                s.into_bytes()
            }
            18 => format!(".hidden{n}{ext}").into_bytes(),
            _ => format!("new\nline {n}").into_bytes(),
        };
        OsString::from_vec(bytes)
    }

    /// A directory to create something in: the root or any existing dir.
    fn pick_dir(&mut self, root: &Path, l: &Listing) -> PathBuf {
        let dirs: Vec<_> = l
            .dirs()
            .into_iter()
            .filter(|d| d.1.len() <= MAX_PICK_DEPTH)
            .collect();
        if dirs.is_empty() || self.rng.gen_range(0..5) == 0 {
            root.to_path_buf()
        } else {
            dirs[self.rng.gen_range(0..dirs.len())].0.clone()
        }
    }

    fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        if v.is_empty() {
            None
        } else {
            Some(&v[self.rng.gen_range(0..v.len())])
        }
    }

    /// Random content of `len` bytes: random, repetitive, text-like or
    /// explicit zeros.
    fn content(&mut self, len: usize) -> Vec<u8> {
        match self.rng.gen_range(0..10) {
            0..=4 => self.bytes(len),
            5..=6 => {
                let plen = self.rng.gen_range(1..64);
                let pat = self.bytes(plen);
                pat.iter().cycle().take(len).copied().collect()
            }
            7..=8 => {
                let words = [
                    "lorem ", "ipsum ", "share ", "samba ", "btrfs ", "\n", "42 ",
                ];
                let mut v = Vec::with_capacity(len);
                while v.len() < len {
                    v.extend_from_slice(words[self.rng.gen_range(0..words.len())].as_bytes());
                }
                v.truncate(len);
                v
            }
            _ => vec![0u8; len],
        }
    }

    fn file_size(&mut self, l: &Listing) -> usize {
        let r = self.rng.gen_range(0..100);
        let big_ok = l.used + 6 * MIB < self.budget;
        let mid_ok = l.used + 200 * KIB < self.budget;
        match r {
            0..=9 => 0,
            10..=34 => self.rng.gen_range(1..100),
            35..=44 => self.rng.gen_range(100..4096),
            45..=94 if mid_ok => self.rng.gen_range(1024..100 * 1024),
            95..=99 if big_ok => self.rng.gen_range(MIB as usize..5 * MIB as usize),
            _ => self.rng.gen_range(1..2000),
        }
    }

    fn write_at(path: &Path, offset: u64, data: &[u8]) {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        f.seek(SeekFrom::Start(offset)).expect("seek");
        f.write_all(data).expect("write");
    }

    // --- operations ----------------------------------------------------------

    fn op_create_file(&mut self, root: &Path, l: &Listing) -> usize {
        let dir = self.pick_dir(root, l);
        let p = dir.join(self.name(false));
        let len = self.file_size(l);
        let data = self.content(len);
        fs::write(&p, &data).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        self.log
            .push(format!("create {} ({len} bytes)", p.display()));
        1
    }

    fn op_overwrite(&mut self, l: &Listing) {
        let files: Vec<_> = l.files().into_iter().filter(|e| e.2.len() > 0).collect();
        let Some(f) = self.pick(&files) else { return };
        let (p, size) = (f.0.clone(), f.2.len());
        let off = self.rng.gen_range(0..size);
        let len = self.rng.gen_range(1..=64 * 1024usize);
        let data = self.content(len);
        Self::write_at(&p, off, &data);
        self.log
            .push(format!("overwrite {} at {off} len {len}", p.display()));
    }

    fn op_append(&mut self, l: &Listing) {
        let files = l.files();
        let Some(f) = self.pick(&files) else { return };
        let p = f.0.clone();
        let len = self.rng.gen_range(1..=32 * 1024usize);
        let data = self.content(len);
        let mut fh = fs::OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
            .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
        fh.write_all(&data).expect("append");
        self.log.push(format!("append {} len {len}", p.display()));
    }

    fn op_truncate(&mut self, l: &Listing) {
        let files = l.files();
        let Some(f) = self.pick(&files) else { return };
        let (p, size) = (f.0.clone(), f.2.len());
        let new = if size > 0 && self.rng.gen_bool(0.5) {
            self.rng.gen_range(0..size)
        } else {
            size + self.rng.gen_range(
                1..if l.logical < LOGICAL_CAP {
                    MIB
                } else {
                    4 * KIB
                },
            )
        };
        let fh = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
            .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
        fh.set_len(new).expect("set_len");
        self.log
            .push(format!("truncate {} {size} -> {new}", p.display()));
    }

    /// A new sparse file: data islands at random offsets (holes between),
    /// sometimes a hole at the end, sometimes nothing but a hole.
    fn op_sparse(&mut self, root: &Path, l: &Listing) -> usize {
        let dir = self.pick_dir(root, l);
        let p = dir.join(self.name(false));
        let fh = fs::File::create(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        drop(fh);
        let islands = self.rng.gen_range(0..4);
        let spread = if l.logical < LOGICAL_CAP {
            2 * MIB
        } else {
            256 * KIB
        };
        let mut end = 0u64;
        for _ in 0..islands {
            let off = end + self.rng.gen_range(64 * KIB..spread);
            let len = self.rng.gen_range(1..64 * 1024usize);
            let data = self.content(len);
            Self::write_at(&p, off, &data);
            end = off + len as u64;
        }
        if islands == 0 || self.rng.gen_bool(0.4) {
            let fh = fs::OpenOptions::new().write(true).open(&p).expect("open");
            fh.set_len(end + self.rng.gen_range(4 * KIB..spread))
                .expect("set_len");
        }
        self.log
            .push(format!("sparse {} ({islands} islands)", p.display()));
        1
    }

    fn op_mkdir(&mut self, root: &Path, l: &Listing) -> usize {
        let mut dir = self.pick_dir(root, l);
        let depth = self.rng.gen_range(1..=2);
        for _ in 0..depth {
            dir = dir.join(self.name(true));
            fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        }
        self.log.push(format!("mkdir {}", dir.display()));
        depth
    }

    fn op_rename(&mut self, root: &Path, l: &Listing) {
        let Some(src) = self.pick(&l.all) else { return };
        let (src, src_is_dir, src_depth) = (src.0.clone(), src.2.is_dir(), src.1.len());
        // How deep the moved subtree reaches below `src`.
        let below = l
            .all
            .iter()
            .filter(|e| e.0.starts_with(&src))
            .map(|e| e.1.len() - src_depth)
            .max()
            .unwrap_or(0);
        let parent = src.parent().expect("parent").to_path_buf();
        let dest_dir = if self.rng.gen_bool(0.4) {
            parent
        } else {
            let candidates: Vec<PathBuf> = std::iter::once(root.to_path_buf())
                .chain(
                    l.dirs()
                        .into_iter()
                        .filter(|d| d.1.len() + 1 + below <= MAX_PICK_DEPTH + 3)
                        .map(|d| d.0.clone()),
                )
                .filter(|d| !d.starts_with(&src))
                .collect();
            candidates[self.rng.gen_range(0..candidates.len())].clone()
        };
        // Sometimes replace an existing non-directory in the destination.
        let victims: Vec<PathBuf> = if src_is_dir {
            Vec::new()
        } else {
            l.non_dirs()
                .into_iter()
                .filter(|e| e.0.parent() == Some(dest_dir.as_path()) && e.0 != src)
                .map(|e| e.0.clone())
                .collect()
        };
        let dst = if !victims.is_empty() && self.rng.gen_bool(0.3) {
            victims[self.rng.gen_range(0..victims.len())].clone()
        } else {
            dest_dir.join(self.name(src_is_dir))
        };
        fs::rename(&src, &dst)
            .unwrap_or_else(|e| panic!("rename {} -> {}: {e}", src.display(), dst.display()));
        self.log
            .push(format!("rename {} -> {}", src.display(), dst.display()));
    }

    fn op_delete_file(&mut self, l: &Listing) {
        let nd = l.non_dirs();
        let Some(e) = self.pick(&nd) else { return };
        let p = e.0.clone();
        fs::remove_file(&p).unwrap_or_else(|e| panic!("unlink {}: {e}", p.display()));
        self.log.push(format!("delete {}", p.display()));
    }

    fn op_delete_tree(&mut self, l: &Listing) {
        let dirs = l.dirs();
        let Some(e) = self.pick(&dirs) else { return };
        let p = e.0.clone();
        fs::remove_dir_all(&p).unwrap_or_else(|e| panic!("rm -r {}: {e}", p.display()));
        self.log.push(format!("delete tree {}", p.display()));
    }

    fn op_hardlink(&mut self, root: &Path, l: &Listing) -> usize {
        let files = l.files();
        let Some(f) = self.pick(&files) else { return 0 };
        let src = f.0.clone();
        let dir = self.pick_dir(root, l);
        let dst = dir.join(self.name(false));
        fs::hard_link(&src, &dst)
            .unwrap_or_else(|e| panic!("link {} -> {}: {e}", src.display(), dst.display()));
        self.log
            .push(format!("hardlink {} = {}", dst.display(), src.display()));
        1
    }

    fn op_symlink(&mut self, root: &Path, l: &Listing) -> usize {
        let dir = self.pick_dir(root, l);
        let depth = dir
            .strip_prefix(root)
            .expect("under root")
            .components()
            .count();
        let target: OsString = match self.rng.gen_range(0..7) {
            // relative, to any entry (file or dir) of the tree
            0..=2 if !l.all.is_empty() => {
                let e = &l.all[self.rng.gen_range(0..l.all.len())];
                let mut t = "../".repeat(depth).into_bytes();
                t.extend(join_rel(&e.1));
                OsString::from_vec(t)
            }
            3 => ["/etc/passwd", "/srv/samba/share/elsewhere", "/", "/tmp"]
                [self.rng.gen_range(0..4)]
            .into(),
            4 => format!("does/not/exist{}", self.next()).into(),
            5 => {
                let mut t = b"dangling \xff ".to_vec();
                t.extend("x/".repeat(self.rng.gen_range(1..400)).bytes());
                OsString::from_vec(t)
            }
            _ => ["..", ".", "../..", "./sibling"][self.rng.gen_range(0..4)].into(),
        };
        let p = dir.join(self.name(false));
        std::os::unix::fs::symlink(&target, &p)
            .unwrap_or_else(|e| panic!("symlink {}: {e}", p.display()));
        self.log
            .push(format!("symlink {} -> {:?}", p.display(), target));
        1
    }

    fn op_fifo(&mut self, root: &Path, l: &Listing) -> usize {
        let dir = self.pick_dir(root, l);
        let p = dir.join(self.name(false));
        let c = cpath(&p);
        // SAFETY: valid C string.
        let r = unsafe { libc::mkfifo(c.as_ptr(), 0o644) };
        assert!(
            r == 0,
            "mkfifo {}: {}",
            p.display(),
            std::io::Error::last_os_error()
        );
        self.log.push(format!("mkfifo {}", p.display()));
        1
    }

    /// A device node with an unused (experimental-range) major number, so
    /// nothing can ever talk to a driver through it.
    fn op_mknod(&mut self, root: &Path, l: &Listing) -> usize {
        let dir = self.pick_dir(root, l);
        let p = dir.join(self.name(false));
        let c = cpath(&p);
        let major = self.rng.gen_range(240..=254);
        let minor = self.rng.gen_range(0..1000);
        let kind = if self.rng.gen_bool(0.7) {
            libc::S_IFCHR
        } else {
            libc::S_IFBLK
        };
        let dev = libc::makedev(major, minor);
        // SAFETY: valid C string.
        let r = unsafe { libc::mknod(c.as_ptr(), kind | 0o600, dev) };
        assert!(
            r == 0,
            "mknod {}: {}",
            p.display(),
            std::io::Error::last_os_error()
        );
        self.log
            .push(format!("mknod {} {major}:{minor}", p.display()));
        1
    }

    fn op_chmod(&mut self, l: &Listing) {
        let cands: Vec<_> = l
            .all
            .iter()
            .filter(|e| !e.2.file_type().is_symlink())
            .collect();
        let Some(e) = self.pick(&cands) else { return };
        let p = e.0.clone();
        let modes = [
            0o644, 0o600, 0o755, 0o700, 0o4755, 0o2755, 0o1777, 0o6750, 0o000, 0o444, 0o777,
            0o1755, 0o640, 0o2770,
        ];
        let m = modes[self.rng.gen_range(0..modes.len())];
        fs::set_permissions(&p, fs::Permissions::from_mode(m))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
        self.log.push(format!("chmod {:o} {}", m, p.display()));
    }

    fn op_chown(&mut self, l: &Listing) {
        let Some(e) = self.pick(&l.all) else { return };
        let p = e.0.clone();
        let uid = if self.rng.gen_bool(0.1) {
            0
        } else {
            self.rng.gen_range(1000..=1005)
        };
        let gid = if self.rng.gen_bool(0.1) {
            0
        } else {
            self.rng.gen_range(1000..=1005)
        };
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("lchown {}: {e}", p.display()));
        self.log.push(format!("chown {uid}:{gid} {}", p.display()));
    }

    fn op_mtime(&mut self, l: &Listing) {
        let Some(e) = self.pick(&l.all) else { return };
        let p = e.0.clone();
        let sec = self.rng.gen_range(0..2_000_000_000i64);
        let nsec = self.rng.gen_range(0..1_000_000_000i64);
        set_mtime(&p, sec, nsec);
        self.log
            .push(format!("mtime {sec}.{nsec:09} {}", p.display()));
    }

    fn op_xattr(&mut self, l: &Listing) {
        let cands: Vec<_> = l
            .all
            .iter()
            .filter(|e| e.2.is_file() || e.2.is_dir())
            .collect();
        let Some(e) = self.pick(&cands) else { return };
        let p = e.0.clone();
        let r = self.rng.gen_range(0..100);
        if r < 12 {
            let existing: Vec<Vec<u8>> = read_xattrs(&p)
                .into_keys()
                .filter(|n| n.starts_with(b"user.") || n.starts_with(b"security.NTACL"))
                .collect();
            if let Some(n) = self.pick(&existing).cloned() {
                remove_xattr(&p, &n).unwrap_or_else(|e| panic!("removexattr {}: {e}", p.display()));
                self.log
                    .push(format!("rmxattr {} {}", show_bytes(&n), p.display()));
                return;
            }
        }
        let (name, value): (Vec<u8>, Vec<u8>) = match r {
            0..=39 => {
                let names: [&[u8]; 6] = [
                    b"user.a",
                    b"user.meta",
                    b"user.com.apple.FinderInfo",
                    b"user.empty",
                    b"user.k\xc3\xa9y",
                    b"user.big",
                ];
                let n = names[self.rng.gen_range(0..names.len())].to_vec();
                let len = match n.as_slice() {
                    b"user.empty" => 0,
                    b"user.big" => self.rng.gen_range(1000..3000),
                    _ => self.rng.gen_range(0..200),
                };
                let v = self.bytes(len);
                (n, v)
            }
            40..=69 => {
                // Shaped like Samba's DOSATTRIB: version, flags, attrib, times.
                let mut v = vec![
                    0x00, 0x00, 0x04, 0x00, 0x04, 0x00, 0x00, 0x00, 0x51, 0x00, 0x00, 0x00,
                ];
                v.push(self.rng.gen_range(0..0x40));
                v.extend([0u8; 3]);
                let tail = self.bytes(40);
                v.extend(tail);
                (b"user.DOSATTRIB".to_vec(), v)
            }
            _ => {
                let len = self.rng.gen_range(100..=300);
                let v = self.bytes(len);
                (b"security.NTACL".to_vec(), v)
            }
        };
        set_xattr(&p, &name, &value)
            .unwrap_or_else(|e| panic!("setxattr {} {}: {e}", show_bytes(&name), p.display()));
        self.log
            .push(format!("xattr {} {}", show_bytes(&name), p.display()));
    }

    fn op_acl(&mut self, l: &Listing) {
        let cands: Vec<_> = l
            .all
            .iter()
            .filter(|e| e.2.is_file() || e.2.is_dir())
            .collect();
        let Some(e) = self.pick(&cands) else { return };
        let (p, is_dir) = (e.0.clone(), e.2.is_dir());
        let uid = self.rng.gen_range(1000..=1005);
        let gid = self.rng.gen_range(1000..=1005);
        let args: Vec<OsString> = if is_dir && self.rng.gen_bool(0.6) {
            vec!["-d".into(), "-m".into(), format!("g:{gid}:rx").into()]
        } else {
            vec!["-m".into(), format!("u:{uid}:rw").into()]
        };
        let mut all = args.clone();
        all.push("--".into());
        all.push(p.clone().into());
        run("setfacl", &all);
        self.log
            .push(format!("setfacl {} {}", show_args(&args), p.display()));
    }
}

/// Writes `len` bytes of seeded, incompressible data to a new file
/// (streamed in 1 MiB pieces) and fsyncs it.
pub fn write_random_file(path: &Path, len: u64, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_f11e);
    let mut f = fs::File::create(path).expect("create random file");
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).expect("write random file");
        left -= n as u64;
    }
    f.sync_all().expect("fsync random file");
}

/// A running `btrship daemon NAME` (stopped by its own pid on drop).
pub struct DaemonProc {
    child: std::process::Child,
    pub log: PathBuf,
}

impl Btrship {
    /// Starts the daemon for `name`; its stderr goes to a log file next to
    /// the state directory. Returns once a `sync` succeeds (watching, and
    /// the start-up snapshot shipped).
    pub fn start_daemon(&self, name: &str) -> DaemonProc {
        let log = self.state_dir.with_file_name(format!("daemon-{name}.log"));
        let err = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("daemon log");
        let child = Command::new(env!("CARGO_BIN_EXE_btrship"))
            .args(self.full_args(["--no-progress", "daemon", name]))
            .env("BTRSHIP_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start btrship daemon");
        let mut d = DaemonProc { child, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("daemon exited at start ({status}):\n{}", d.log_text());
            }
            let out = self.cmd(["sync", name, "--timeout", "2s"]);
            if out.status.success() {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "daemon not ready after 60 s: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sets `key = value` in share `name`'s config file (replacing it).
    pub fn set_config(&self, name: &str, key: &str, value: &str) {
        let path = self.config_dir.join(format!("{name}.toml"));
        let text = fs::read_to_string(&path).expect("read share config");
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !l.starts_with(&format!("{key} =")))
            .map(String::from)
            .collect();
        lines.push(format!("{key} = {value}"));
        fs::write(&path, lines.join("\n") + "\n").expect("write share config");
    }

    /// `status NAME --json`: (exit code, report). A healthy share exits 0,
    /// an unhealthy one 10 with the one-line error contract; the report's
    /// `healthy` agrees with the exit code.
    pub fn status_json(&self, name: &str) -> (i32, serde_json::Value) {
        self.status_json_env(name, &[])
    }

    /// `status_json` with these environment variables set.
    pub fn status_json_env(&self, name: &str, env: &[(&str, &str)]) -> (i32, serde_json::Value) {
        let out = self.cmd_env(["status", name, "--json"], env);
        let code = out.status.code().unwrap_or(-1);
        if code != 0 {
            check_error_contract(&out, "btrship status --json");
        }
        assert!(
            code == 0 || code == 10,
            "status exited {code}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("status --json is JSON");
        assert_eq!(report["healthy"], code == 0, "{report:#}");
        (code, report)
    }

    /// `sync NAME`, asserting success.
    pub fn sync(&self, name: &str) {
        self.ok(["sync", name, "--timeout", "60s"]);
    }
}

impl DaemonProc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, and wait for it.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM; returns the exit status (fails the test after 30 s).
    pub fn terminate(mut self) -> std::process::ExitStatus {
        run("kill", &["-TERM", &self.child.id().to_string()]);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            assert!(Instant::now() < deadline, "daemon ignored SIGTERM for 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- daemon (pid {}, {:?}) log {} ---\n{}",
                self.child.id(),
                self.child.try_wait(),
                self.log.display(),
                self.log_text()
            );
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// XORs `mask` into the byte at `pos` of `path` and syncs it (damage for
/// tamper tests).
pub fn flip_byte(path: &Path, pos: u64, mask: u8) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, pos).unwrap();
    b[0] ^= mask;
    f.write_all_at(&b, pos).unwrap();
    f.sync_all().unwrap();
}

/// Files (path → blob ids) and directories (path → tree id) below a tree
/// of a repository, read through the library.
pub fn repo_tree_paths(
    repo: &btrship_upload::Repository,
    tree: &btrship_crypto::ContentId,
    prefix: &str,
    files: &mut BTreeMap<String, Vec<btrship_crypto::ContentId>>,
    dirs: &mut BTreeMap<String, btrship_crypto::ContentId>,
) {
    use btrship_upload::format::NodeKind;
    for e in repo.read_tree(tree).unwrap().entries {
        let path = format!("{prefix}{}", String::from_utf8(e.name.clone()).unwrap());
        match e.kind {
            NodeKind::Dir => {
                let id = e.subtree.unwrap().0;
                dirs.insert(path.clone(), id);
                repo_tree_paths(repo, &id, &format!("{path}/"), files, dirs);
            }
            NodeKind::File => {
                files.insert(path, e.content.iter().map(|x| x.1 .0).collect());
            }
            _ => {}
        }
    }
}
