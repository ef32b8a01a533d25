//! Windows "Previous Versions" through a real smbd, as a normal user.
//!
//! [`SmbUserServer`] creates a throwaway Unix user ([`UnixUser`], removed on
//! drop), starts a private smbd ([`Samba::start_with_conf`]) with the share
//! section the test gives (for `btrship mount`: the lines `btrship
//! samba-conf` prints), adds the user to the instance's private passdb and
//! drives the share with smbclient logged in as that user. smbd then opens
//! every file with the user's uid: the kernel checks modes, owners and POSIX
//! ACLs, and `acl_xattr` checks `security.NTACL`, for the current files and
//! for their `@GMT-...` versions alike.
//!
//! What smbd 4.17 and smbclient do, measured (see also
//! [`shadow_copy2_lines`]):
//!
//! - `allinfo PATH` asks for the snapshot list (FSCTL_GET_SHADOW_COPY_DATA:
//!   every name in `shadow:snapdir` that parses with `shadow:format`, not a
//!   per-file list), prints each label on its own line, newest first, and
//!   queries `@GMT-…\PATH` for each: when that exists, the label line is
//!   followed by `create_time:`, `access_time:`, `write_time:`,
//!   `change_time:` and `size: N`; when it does not, only the label line is
//!   printed, and stderr gets `pathinfo(@GMT-…\PATH) failed:
//!   NT_STATUS_OBJECT_NAME_NOT_FOUND` (`…_PATH_NOT_FOUND` when a parent
//!   directory is missing too). Exit status 0 either way.
//!   [`SmbUserServer::allinfo`] returns every label,
//!   [`SmbUserServer::versions`] only those where the file exists.
//! - smbclient lists no label at all for a file it cannot open (e.g. mode
//!   0600 of another user), silently.
//! - smbclient asks for at most 65535 bytes of labels (50 bytes each): with
//!   more than 1310 snapshot directories smbd answers
//!   NT_STATUS_BUFFER_TOO_SMALL (its log says `FSCTL_GET_SHADOW_COPY_DATA:
//!   max_data_count(65535) too small (N) bytes needed!`) and smbclient
//!   prints no label, again silently. [`SmbUserServer::try_allinfo`] turns
//!   that into an error. (Windows asks for the size first; not verified.)
//! - An old version reads as `get "@GMT-2026.12.01-10.00.00\dir\file"
//!   LOCAL` (the token may also sit in the middle: `dir\@GMT-…\file`; `/`
//!   works too). A denied read prints `NT_STATUS_ACCESS_DENIED opening
//!   remote file \@GMT-…\file` and exits 1.
//! - smbd does not make `@GMT-…` paths read-only by itself: on a writable
//!   snapshot directory a `put` to `@GMT-…\file` overwrites the snapshot.
//!   On a read-only mount (EROFS) it fails with
//!   NT_STATUS_MEDIA_WRITE_PROTECTED ([`SmbUserServer::try_put`]).
//!
//! Users are named `btrtest_<pid>_<n>` (at most 20 characters, Samba's
//! limit for account names) with a group of the same name, no home and
//! `/usr/sbin/nologin`. A test process killed by SIGKILL leaves its users
//! behind (`userdel btrtest_…` removes them).
//!
//! Needs root, `useradd`/`userdel` (Debian package `passwd`), and what
//! tests/common/samba.rs needs.

use std::fmt;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::common::samba::Samba;

/// `shadow:format` for btrship's moments: `@GMT-YYYY.MM.DD-HH.MM.SS`, UTC
/// (also vfs_shadow_copy2's default).
pub const GMT_FORMAT: &str = "@GMT-%Y.%m.%d-%H.%M.%S";

/// smbclient's buffer for the label list holds this many labels (65535
/// bytes, 50 per label, 14 of overhead); with more it lists none.
pub const SMBCLIENT_MAX_LABELS: usize = 1310;

/// The label (and snapshot directory name) of moment `t`:
/// `@GMT-2026.12.01-10.00.00`, whole seconds, UTC.
pub fn gmt_label(t: &DateTime<Utc>) -> String {
    t.format(GMT_FORMAT).to_string()
}

/// Whether `s` is exactly a label of the form `@GMT-YYYY.MM.DD-HH.MM.SS`.
pub fn is_gmt_label(s: &str) -> bool {
    let b = s.as_bytes();
    const SHAPE: &[u8] = b"@GMT-dddd.dd.dd-dd.dd.dd";
    b.len() == SHAPE.len()
        && b.iter().zip(SHAPE).all(|(c, p)| match p {
            b'd' => c.is_ascii_digit(),
            p => c == p,
        })
}

/// The `vfs_shadow_copy2` share lines that were found to work (smbd 4.17)
/// for a share at `share` whose moments are the directories
/// `snapdir/@GMT-…`, each holding the whole share as it was (not inside the
/// share; its own filesystem or not). Add `read only = no` and the rest of
/// the share's settings.
///
/// - `shadow:snapdir` absolute: used as is. It and each parent need `x`
///   for the connected user, the snapdir also `r` (smbd lists it as that
///   user): without `r`, no label is listed, though `@GMT-…` paths still
///   open; without `x`, nothing works (NT_STATUS_OBJECT_NAME_NOT_FOUND). A
///   `@GMT-…` directory the user cannot enter is still listed, but its
///   versions are not found.
/// - `shadow:mountpoint = share`: where paths inside a snapshot start.
///   Without it smbd takes the nearest mount point above the share (same
///   `st_dev` walk): for a share that is a btrfs subvolume that is the share
///   itself, so `snapdir` alone would do; for a plain directory it is the
///   filesystem root, and every version is "not found". A mountpoint that
///   is not a parent of the share is ignored (logged). `shadow:basedir =
///   share` works as well; setting both is harmless.
/// - `shadow:format`, `shadow:localtime = no`, `shadow:sort = desc` are the
///   defaults, written out: with `localtime = yes` the labels shift by the
///   server's UTC offset.
/// - Not needed: `shadow:snapsharepath` (must be relative; `/` is ignored),
///   `shadow:fixinodes` (versions on another filesystem have another
///   `st_dev` than the current files anyway), `shadow:crossmountpoints` and
///   `shadow:snapdirseverywhere` (both ignored with an absolute snapdir,
///   with a warning in the log).
pub fn shadow_copy2_lines(share: &Path, snapdir: &Path) -> Vec<String> {
    assert!(snapdir.is_absolute(), "shadow:snapdir must be absolute");
    vec![
        "vfs objects = acl_xattr shadow_copy2".to_string(),
        "store dos attributes = yes".to_string(),
        format!("shadow:snapdir = {}", snapdir.display()),
        format!("shadow:mountpoint = {}", share.display()),
        format!("shadow:format = {GMT_FORMAT}"),
        "shadow:localtime = no".to_string(),
        "shadow:sort = desc".to_string(),
    ]
}

// ---------------------------------------------------------------------------
// UnixUser
// ---------------------------------------------------------------------------

static USER_SEQ: AtomicU64 = AtomicU64::new(0);
/// useradd/userdel of one process one at a time (they lock /etc/passwd and
/// give up at once when it is taken).
static USER_DB: Mutex<()> = Mutex::new(());

/// A throwaway Unix user with a group of the same name; `userdel` on drop.
pub struct UnixUser {
    name: String,
    uid: u32,
    gid: u32,
}

impl UnixUser {
    /// Creates `btrtest_<pid>_<n>` (no home, `/usr/sbin/nologin`).
    pub fn create() -> UnixUser {
        // SAFETY: geteuid has no preconditions and cannot fail.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "creating Unix users for SMB tests needs root"
        );
        let useradd = find_program("useradd");
        let deadline = Instant::now() + Duration::from_secs(30);
        let _db = USER_DB.lock().unwrap_or_else(|e| e.into_inner());
        let name = loop {
            let name = format!(
                "btrtest_{}_{}",
                std::process::id(),
                USER_SEQ.fetch_add(1, Ordering::Relaxed)
            );
            assert!(name.len() <= 20, "user name {name} too long for Samba");
            let out = Command::new(&useradd)
                .args([
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--user-group",
                    "--comment",
                    "btrship test user (tests/common/smbuser.rs)",
                ])
                .arg(&name)
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("cannot run useradd: {e}"));
            match out.status.code() {
                Some(0) => break name,
                // 9: name taken (a leftover of a killed run): next name.
                Some(9) => continue,
                // 1, 10: /etc/passwd or /etc/group locked by someone else.
                Some(1 | 10) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                _ => panic!(
                    "useradd {name} failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ),
            }
        };
        let id = |flag: &str| -> u32 {
            let out = Command::new("id")
                .arg(flag)
                .arg(&name)
                .output()
                .expect("run id");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("id {flag} {name}: {out:?}"))
        };
        let (uid, gid) = (id("-u"), id("-g"));
        UnixUser { name, uid, gid }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }

    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// `chown user:group path` (not following a symlink).
    pub fn chown(&self, path: &Path) {
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))
            .unwrap_or_else(|e| panic!("chown {} {}: {e}", self.name, path.display()));
    }
}

impl Drop for UnixUser {
    fn drop(&mut self) {
        // Never panic: this also runs while a failed test unwinds.
        let Some(userdel) = try_find_program("userdel") else {
            eprintln!(
                "smbuser harness: userdel not found; user {} left",
                self.name
            );
            return;
        };
        let _db = USER_DB.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new(&userdel)
                .arg(&self.name)
                .stdin(Stdio::null())
                .output();
            let code = out.as_ref().ok().and_then(|o| o.status.code());
            match code {
                // 6: already gone.
                Some(0 | 6) => return,
                // 1, 10: a database is locked; 8: a process still runs as
                // the user (an smbd child that has not exited yet).
                Some(1 | 8 | 10) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                _ => {
                    eprintln!(
                        "smbuser harness: userdel {} failed: {:?}",
                        self.name,
                        out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    );
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// SmbUserServer
// ---------------------------------------------------------------------------

/// A refused smbclient command.
#[derive(Debug)]
pub struct SmbFailure {
    /// The first `NT_STATUS_…` smbclient printed, e.g.
    /// `NT_STATUS_ACCESS_DENIED` (None when it printed none).
    pub status: Option<String>,
    /// Everything smbclient printed.
    pub report: String,
}

impl SmbFailure {
    fn from_report(report: String) -> SmbFailure {
        let status = report.find("NT_STATUS_").map(|i| {
            report[i..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        });
        SmbFailure { status, report }
    }

    /// Whether smbclient reported `status` (e.g. "NT_STATUS_ACCESS_DENIED").
    pub fn is(&self, status: &str) -> bool {
        self.status.as_deref() == Some(status)
    }
}

impl fmt::Display for SmbFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.report)
    }
}

/// One label `allinfo` listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    /// `@GMT-YYYY.MM.DD-HH.MM.SS`.
    pub label: String,
    /// The version's size; None when the file is not in that snapshot.
    pub size: Option<u64>,
    /// smbclient's `write_time:` text, e.g. `Thu Dec  3 18:42:25 2026 UTC`.
    pub write_time: Option<String>,
}

/// A private smbd with a share section of the test's choosing, driven by
/// smbclient as a throwaway Unix user. Dropping it stops smbd, removes the
/// passdb entry and then the Unix user.
pub struct SmbUserServer {
    // Field order is drop order: smbd must be gone before userdel.
    samba: Samba,
    user: UnixUser,
    scratch_seq: AtomicU64,
}

impl SmbUserServer {
    /// Creates a Unix user and starts the server as with
    /// [`SmbUserServer::start_as`].
    pub fn start<S: AsRef<str>>(
        share_path: &Path,
        share_name: &str,
        share_lines: &[S],
    ) -> SmbUserServer {
        SmbUserServer::start_as(UnixUser::create(), share_path, share_name, share_lines)
    }

    /// Starts a private smbd serving `share_path` as `share_name`, with
    /// `share_lines` as the share section (`btrship samba-conf`'s output
    /// as printed will do: blank and comment lines, a `[NAME]` header and a
    /// `path =` line naming `share_path` are dropped, the harness writes its
    /// own `path`; nothing else is added, so include `read only = no` to
    /// write), and `user` added to the private passdb.
    /// smbclient then always logs in as `user`.
    ///
    /// Panics first, with the directory to fix, when `user` could not reach
    /// `share_path` or list the `shadow:snapdir` of the lines (`x` on every
    /// parent, `r-x` on the share and the snapdir), e.g. a 0700 parent.
    pub fn start_as<S: AsRef<str>>(
        user: UnixUser,
        share_path: &Path,
        share_name: &str,
        share_lines: &[S],
    ) -> SmbUserServer {
        let share_canon = share_path
            .canonicalize()
            .unwrap_or_else(|e| panic!("canonicalize {}: {e}", share_path.display()));
        let mut lines = Vec::new();
        for line in share_lines {
            let line = line.as_ref().trim();
            let header = line.starts_with('[') && line.ends_with(']');
            if line.is_empty() || line.starts_with(['#', ';']) || header {
                continue;
            }
            if let Some(value) = conf_value(line, "path") {
                let given = Path::new(value).canonicalize().ok();
                assert_eq!(
                    given.as_deref(),
                    Some(share_canon.as_path()),
                    "the share lines name path {value:?}, not {}",
                    share_path.display()
                );
                continue;
            }
            lines.push(line.to_string());
        }
        check_access(&share_canon, &user, true).unwrap_or_else(|e| panic!("{e}"));
        if let Some(snapdir) = lines.iter().find_map(|l| conf_value(l, "shadow:snapdir")) {
            let snapdir = Path::new(snapdir);
            if snapdir.is_absolute() {
                check_access(snapdir, &user, true).unwrap_or_else(|e| {
                    panic!("{e} (smbd would list no Previous Versions at all)")
                });
            }
        }
        let n = USER_SEQ.fetch_add(1, Ordering::Relaxed);
        let password = format!("Btr-{}-{n}-pw", std::process::id());
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let samba = Samba::start_with_conf(
            share_path,
            share_name,
            &refs,
            Some((user.name(), password.as_str())),
        );
        SmbUserServer {
            samba,
            user,
            scratch_seq: AtomicU64::new(0),
        }
    }

    /// The underlying server: `client`, `try_client`, `client_output`,
    /// `mkdir`, `rename`, `log`, ... (all as this user).
    pub fn samba(&self) -> &Samba {
        &self.samba
    }

    /// The Unix (and SMB) user smbclient logs in as.
    pub fn user(&self) -> &UnixUser {
        &self.user
    }

    /// smbd's log so far.
    pub fn log(&self) -> String {
        self.samba.log()
    }

    /// Every label `allinfo PATH` lists (newest first with `shadow:sort =
    /// desc`), also those whose snapshot lacks the file. Panics when
    /// smbclient fails or cannot receive the list (more than
    /// [`SMBCLIENT_MAX_LABELS`] snapshots).
    pub fn allinfo(&self, path: &str) -> Vec<String> {
        self.allinfo_versions(path)
            .into_iter()
            .map(|v| v.label)
            .collect()
    }

    /// The labels of `allinfo PATH` where the file exists.
    pub fn versions(&self, path: &str) -> Vec<String> {
        self.allinfo_versions(path)
            .into_iter()
            .filter(|v| v.size.is_some())
            .map(|v| v.label)
            .collect()
    }

    /// `allinfo PATH` parsed: each label with the version's size and write
    /// time (None when the snapshot lacks the file).
    pub fn allinfo_versions(&self, path: &str) -> Vec<Version> {
        self.try_allinfo(path).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`SmbUserServer::allinfo_versions`], with failures as Err: the
    /// path does not exist, smbclient failed, or smbd refused to send the
    /// list because it did not fit smbclient's buffer.
    pub fn try_allinfo(&self, path: &str) -> Result<Vec<Version>, String> {
        const TOO_SMALL: &str = "FSCTL_GET_SHADOW_COPY_DATA: max_data_count";
        let before = self.samba.log().matches(TOO_SMALL).count();
        let cmd = format!("allinfo {}", remote_arg(path));
        let out = self.samba.client_output(&[&cmd])?;
        let report = || {
            format!(
                "smbclient -c {cmd:?} as {} ({}):\n--- stdout\n{}--- stderr\n{}",
                self.user.name, out.status, out.stdout, out.stderr
            )
        };
        if !out.status.success() || !out.stdout.contains("altname:") {
            return Err(format!("allinfo failed: {}", report()));
        }
        let mut versions: Vec<Version> = Vec::new();
        for line in out.stdout.lines() {
            let line = line.trim_end();
            if is_gmt_label(line) {
                versions.push(Version {
                    label: line.to_string(),
                    size: None,
                    write_time: None,
                });
            } else if let Some(v) = versions.last_mut() {
                if let Some(size) = line.strip_prefix("size:") {
                    v.size =
                        Some(size.trim().parse().map_err(|_| {
                            format!("allinfo: bad size line {line:?}: {}", report())
                        })?);
                } else if let Some(t) = line.strip_prefix("write_time:") {
                    v.write_time = Some(t.trim().to_string());
                }
            }
        }
        // A version whose pathinfo failed has no size line; any other
        // NT_STATUS on stderr is a real failure.
        for line in out.stderr.lines().filter(|l| l.contains("NT_STATUS_")) {
            let missing = line.starts_with("pathinfo(@GMT-")
                && (line.ends_with("NT_STATUS_OBJECT_NAME_NOT_FOUND")
                    || line.ends_with("NT_STATUS_OBJECT_PATH_NOT_FOUND"));
            if !missing {
                return Err(format!("allinfo: unexpected error: {}", report()));
            }
        }
        if versions.is_empty() && self.samba.log().matches(TOO_SMALL).count() > before {
            return Err(format!(
                "allinfo {path}: smbd refused to send the snapshot list: more than \
                 {SMBCLIENT_MAX_LABELS} snapshots do not fit smbclient's 64 KiB buffer \
                 (smbclient then lists none)"
            ));
        }
        Ok(versions)
    }

    /// Downloads the current `path` to `local` (panics on failure).
    pub fn get(&self, path: &str, local: &Path) {
        self.samba.get(path, local);
    }

    /// Downloads `path` as of snapshot `label` (`get "@GMT-…\path"`).
    pub fn get_version(&self, label: &str, path: &str, local: &Path) {
        self.samba.get(&version_path(label, path), local);
    }

    /// Uploads `local` over (or as) the current `path`.
    pub fn put(&self, local: &Path, path: &str) {
        self.samba.put(local, path);
    }

    /// `get`, with a refusal as Err (e.g. `NT_STATUS_ACCESS_DENIED`).
    pub fn try_get(&self, path: &str, local: &Path) -> Result<(), SmbFailure> {
        self.samba
            .try_client(&[&format!("get {} {}", remote_arg(path), local_arg(local))])
            .map(drop)
            .map_err(SmbFailure::from_report)
    }

    /// `get_version`, with a refusal as Err.
    pub fn try_get_version(&self, label: &str, path: &str, local: &Path) -> Result<(), SmbFailure> {
        self.try_get(&version_path(label, path), local)
    }

    /// `put`, with a refusal as Err: on a read-only snapshot mount a `put`
    /// to `@GMT-…/path` fails with `NT_STATUS_MEDIA_WRITE_PROTECTED`.
    pub fn try_put(&self, local: &Path, path: &str) -> Result<(), SmbFailure> {
        self.samba
            .try_client(&[&format!("put {} {}", local_arg(local), remote_arg(path))])
            .map(drop)
            .map_err(SmbFailure::from_report)
    }

    /// The bytes of the current `path`.
    pub fn read(&self, path: &str) -> Vec<u8> {
        self.try_read(path).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The bytes of `path` as of snapshot `label`.
    pub fn read_version(&self, label: &str, path: &str) -> Vec<u8> {
        self.try_read(&version_path(label, path))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `read`, with a refusal as Err.
    pub fn try_read(&self, path: &str) -> Result<Vec<u8>, SmbFailure> {
        let local = self.scratch_file();
        let got = self.try_get(path, &local);
        let bytes = got
            .map(|()| fs::read(&local).unwrap_or_else(|e| panic!("read {}: {e}", local.display())));
        let _ = fs::remove_file(&local);
        bytes
    }

    /// `read_version`, with a refusal as Err.
    pub fn try_read_version(&self, label: &str, path: &str) -> Result<Vec<u8>, SmbFailure> {
        self.try_read(&version_path(label, path))
    }

    /// What a user does with "Restore" in Previous Versions, by hand:
    /// downloads `path` as of `label` and uploads it over the current file
    /// (which keeps its inode, owner and mode: smbd truncates and rewrites).
    pub fn restore_version(&self, label: &str, path: &str) {
        let local = self.scratch_file();
        self.get_version(label, path, &local);
        self.put(&local, path);
        let _ = fs::remove_file(&local);
    }

    fn scratch_file(&self) -> PathBuf {
        let n = self.scratch_seq.fetch_add(1, Ordering::Relaxed);
        self.samba
            .private_dir()
            .join("scratch")
            .join(format!("smbuser-{n}"))
    }
}

// -- helpers -----------------------------------------------------------------

/// `label/path` (`label` checked).
fn version_path(label: &str, path: &str) -> String {
    assert!(
        is_gmt_label(label),
        "{label:?} is not a label like @GMT-2026.12.01-10.00.00"
    );
    format!("{label}/{}", path.trim_start_matches('/'))
}

/// The value of `key = value` in an smb.conf line (key compared without
/// case and spaces, as smbd does), if `line` sets `key`.
fn conf_value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let (k, v) = line.split_once('=')?;
    let norm = |s: &str| {
        s.chars()
            .filter(|c| !c.is_whitespace())
            .collect::<String>()
            .to_ascii_lowercase()
    };
    (norm(k) == norm(key)).then(|| v.trim())
}

/// Whether `user` (its uid and its one group; no ACLs considered) can
/// search every parent of `path`, and search (and with `read`, list)
/// `path` itself.
pub fn check_access(path: &Path, user: &UnixUser, read: bool) -> Result<(), String> {
    let may = |md: &fs::Metadata, bits: u32| -> bool {
        let mode = md.mode();
        let class = if md.uid() == user.uid {
            mode >> 6
        } else if md.gid() == user.gid {
            mode >> 3
        } else {
            mode
        };
        class & bits == bits
    };
    let path = path
        .canonicalize()
        .map_err(|e| format!("canonicalize {}: {e}", path.display()))?;
    for dir in path.ancestors() {
        let md = fs::metadata(dir).map_err(|e| format!("stat {}: {e}", dir.display()))?;
        let bits = if dir == path && read { 0o5 } else { 0o1 };
        if !may(&md, bits) {
            return Err(format!(
                "user {} (uid {}) cannot {} {} (mode {:o}, owner {}:{}); \
                 e.g. chmod o+{} it",
                user.name,
                user.uid,
                if bits == 0o5 { "list" } else { "enter" },
                dir.display(),
                md.mode() & 0o7777,
                md.uid(),
                md.gid(),
                if bits == 0o5 { "rx" } else { "x" },
            ));
        }
    }
    Ok(())
}

/// Quotes an argument for smbclient's command parser (as samba.rs does).
fn quoted(s: &str, what: &str) -> String {
    assert!(
        !s.contains(['"', ';', '\n', '\r']),
        "{what} {s:?}: smbclient -c cannot express '\"', ';' or newlines"
    );
    format!("\"{s}\"")
}

fn remote_arg(remote: &str) -> String {
    quoted(&remote.replace('/', "\\"), "remote path")
}

fn local_arg(local: &Path) -> String {
    quoted(
        local.to_str().expect("local path must be UTF-8"),
        "local path",
    )
}

fn try_find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn find_program(program: &str) -> PathBuf {
    try_find_program(program)
        .unwrap_or_else(|| panic!("{program} not found (Debian package passwd)"))
}
