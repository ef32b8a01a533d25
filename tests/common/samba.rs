//! A private, throwaway Samba server for integration tests.
//!
//! [`Samba::start`] runs a real `smbd` (as root, in the foreground, in its
//! own process group) on `127.0.0.1` and a free port, serving one directory
//! as a guest share. Files are written as root, with `vfs objects =
//! acl_xattr` and `store dos attributes = yes`, so everything created through
//! the share carries `security.NTACL` and `user.DOSATTRIB` like on a
//! production share. Everything smbd writes (smb.conf, pid, lock, state,
//! cache, private and ncalrpc directories, log) lives in a private temporary
//! directory: the system Samba configuration and any system smbd are never
//! touched, and several instances can run at once.
//!
//! [`Samba::client`] and the wrappers ([`Samba::put`], [`Samba::rename`],
//! ...) drive the share with `smbclient`; each call is one smbclient process,
//! that is one SMB session (one per-connection smbd child). Remote paths use
//! `/` and may contain spaces, but not `"`, `;` or newlines (smbclient's `-c`
//! cannot express them).
//!
//! Dropping a [`Samba`] stops smbd by its pid (SIGTERM, then SIGKILL after
//! 5 s), then kills any leftover process of this instance, found by pid: the
//! master's descendants (per-connection children, `smbd-notifyd`,
//! `cleanupd`) and every process whose command line names this instance's
//! private smb.conf (including an smbclient a test started with it).
//! Nothing is ever killed by name. If the test
//! process dies without dropping it (even by SIGKILL), smbd still exits: its
//! stdin is a pipe held by the test process, and `smbd --foreground` quits
//! on EOF there (only the private directory is then left in `$TMPDIR`).
//!
//! [`Samba::start_with_conf`] is the variant for tests that need real
//! permission checks: the caller gives the whole share section, and smbclient
//! logs in as an existing Unix user, added to a private passdb
//! (`passdb backend = tdbsam` in the private directory, `map to guest =
//! Never`); smbd then opens files with that user's uid, so the kernel checks
//! modes, owners and POSIX ACLs, and `acl_xattr` checks `security.NTACL`.
//! tests/common/smbuser.rs builds on it.
//!
//! Needs root and the Debian packages `samba`, `samba-vfs-modules` (provides
//! `acl_xattr`; only a Recommends of `samba`) and `smbclient`.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long [`Samba::start`] waits for the share to answer.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long smbd gets to exit after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound for one smbclient run (a hung server fails the test instead
/// of hanging it).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
/// Upper bound for one readiness probe (smbclient `ls`).
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Fresh ports tried when the picked one was taken before smbd bound it.
const PORT_ATTEMPTS: usize = 5;

/// A running private smbd serving one directory; stopped on drop.
pub struct Samba {
    dir: TempDir,
    conf: PathBuf,
    log: PathBuf,
    share: String,
    port: u16,
    child: Option<Child>,
    smbclient: PathBuf,
    scratch_seq: AtomicU64,
    /// `Some`: smbclient logs in as this passdb user (see
    /// [`Samba::start_with_conf`]); `None`: a guest session (`-N`).
    login: Option<Login>,
}

/// A user of the private passdb that smbclient logs in as.
struct Login {
    user: String,
    password: String,
    /// Found when the user is added, so that Drop never has to search.
    smbpasswd: PathBuf,
}

/// The share section of the private smb.conf, after its `path = ...` line.
enum ShareSection<'a> {
    /// The guest share's defaults, then these extra lines.
    Defaults(&'a [&'a str]),
    /// Exactly these lines (nothing added).
    Custom(&'a [&'a str]),
}

/// What a finished smbclient run printed (see [`Samba::client_output`]).
#[derive(Debug)]
pub struct ClientOutput {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

enum StartError {
    /// smbd could not bind its port (someone took it after we picked it).
    PortInUse,
    /// Anything else; the message says what.
    Fatal(String),
}

impl Samba {
    /// Starts smbd serving `path` as share `share_name` (see the module
    /// documentation) and waits until smbclient can list the share.
    ///
    /// Panics, with smbd's log, when smbd cannot be started or the share
    /// does not answer within 20 s.
    pub fn start(path: &Path, share_name: &str) -> Samba {
        Samba::start_with_options(path, share_name, &[])
    }

    /// Like [`Samba::start`], with extra `key = value` lines appended to the
    /// share section (they override the defaults), for example
    /// `&["vfs objects = acl_xattr streams_xattr"]`.
    pub fn start_with_options(path: &Path, share_name: &str, share_options: &[&str]) -> Samba {
        Samba::start_inner(
            path,
            share_name,
            ShareSection::Defaults(share_options),
            None,
        )
    }

    /// Starts smbd serving `path` as share `share_name` with exactly the
    /// share section lines `share_lines` (after a `path = PATH` line the
    /// harness writes; no `read only`, `vfs objects`, ... defaults are
    /// added), for example the lines `btrship samba-conf` prints.
    ///
    /// With `login = Some((user, password))`, `user` (an existing Unix user
    /// whose name is also a valid Samba name) is added to the private passdb
    /// with `password` before smbd starts, the global section has `map to
    /// guest = Never` and no guest account, and every smbclient run of this
    /// instance logs in as `user` (`-U`). The passdb entry is removed on
    /// drop (`smbpasswd -x`), before the private directory goes. With
    /// `None`, the guest global settings of [`Samba::start`] apply; the
    /// share section then needs `guest ok = yes` itself.
    ///
    /// `user` needs `x` on every parent directory of `path` and read access
    /// to `path` itself, or the readiness probe fails after 20 s.
    pub fn start_with_conf(
        path: &Path,
        share_name: &str,
        share_lines: &[&str],
        login: Option<(&str, &str)>,
    ) -> Samba {
        Samba::start_inner(path, share_name, ShareSection::Custom(share_lines), login)
    }

    fn start_inner(
        path: &Path,
        share_name: &str,
        section: ShareSection<'_>,
        login: Option<(&str, &str)>,
    ) -> Samba {
        let share_options = match section {
            ShareSection::Defaults(lines) | ShareSection::Custom(lines) => lines,
        };
        if let Some((user, password)) = login {
            assert!(
                !user.is_empty()
                    && user
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
                "SMB user {user:?}: use ASCII letters, digits, '-', '_', '.'"
            );
            assert!(
                !password.is_empty() && !password.contains(['\n', '\r', '%']),
                "SMB password must be one non-empty line without '%'"
            );
        }
        assert!(
            !share_name.is_empty()
                && share_name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.$".contains(c)),
            "share name {share_name:?}: use ASCII letters, digits, '-', '_', '.', '$'"
        );
        assert!(path.is_dir(), "{} is not a directory", path.display());
        let path = path
            .canonicalize()
            .unwrap_or_else(|e| panic!("canonicalize {}: {e}", path.display()));
        let path_str = path.to_str().expect("share path must be UTF-8");
        assert!(
            !path_str.contains(['\n', '\r']),
            "share path must not contain newlines"
        );
        for opt in share_options {
            assert!(
                !opt.contains(['\n', '\r']),
                "share option {opt:?} must be one line"
            );
        }
        let smbd = find_program("smbd");
        let smbclient = find_program("smbclient");

        let dir = tempfile::Builder::new()
            .prefix("btrship-smbd-")
            .tempdir()
            .expect("create the private smbd directory");
        for sub in [
            "pid", "lock", "state", "cache", "private", "ncalrpc", "log", "scratch",
        ] {
            fs::create_dir(dir.path().join(sub)).expect("create a private smbd directory");
        }
        let conf = dir.path().join("smb.conf");
        let log = dir.path().join("log").join("smbd.stdout");
        let mut samba = Samba {
            dir,
            conf,
            log,
            share: share_name.to_string(),
            port: 0,
            child: None,
            smbclient,
            scratch_seq: AtomicU64::new(0),
            login: login.map(|(user, password)| Login {
                user: user.to_string(),
                password: password.to_string(),
                smbpasswd: find_program("smbpasswd"),
            }),
        };
        for attempt in 1..=PORT_ATTEMPTS {
            samba.port = free_port();
            samba.write_conf(path_str, &section);
            if attempt == 1 {
                // The passdb lives in the private directory: one entry for
                // all attempts.
                samba.add_passdb_user();
            }
            samba.spawn(&smbd);
            match samba.wait_ready() {
                Ok(()) => return samba,
                Err(StartError::PortInUse) if attempt < PORT_ATTEMPTS => samba.stop(),
                Err(StartError::PortInUse) => panic!(
                    "smbd could not bind a free port in {PORT_ATTEMPTS} attempts; log:\n{}",
                    samba.log()
                ),
                // `samba` is dropped while unwinding: smbd is stopped.
                Err(StartError::Fatal(why)) => panic!(
                    "cannot start smbd for {}: {why}\n--- smb.conf\n{}--- smbd log\n{}",
                    path.display(),
                    fs::read_to_string(&samba.conf).unwrap_or_default(),
                    samba.log()
                ),
            }
        }
        unreachable!()
    }

    /// The TCP port smbd listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The pid of the smbd master process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Pids of all live processes of this instance: the smbd master, its
    /// helpers (`smbd-notifyd`, `cleanupd`), per-connection children, and
    /// any running smbclient of this instance.
    pub fn processes(&self) -> Vec<u32> {
        let procs = all_processes();
        self.ours(&procs, self.pid())
            .into_iter()
            .map(|p| p.pid)
            .collect()
    }

    /// The private directory: smb.conf, smbd's state, `log/smbd.stdout`.
    /// Removed on drop.
    pub fn private_dir(&self) -> &Path {
        self.dir.path()
    }

    /// smbd's log so far (its `--debug-stdout` output, log level 1).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Runs `smbclient //127.0.0.1/SHARE -p PORT -N -m SMB3 -c CMDS` (with
    /// `--configfile` pointing at the private smb.conf, and the commands
    /// joined with `"; "`) and returns its stdout.
    ///
    /// Panics with stdout and stderr when smbclient exits non-zero, prints
    /// `NT_STATUS_` (it often exits 0 after a failed command) or reports an
    /// unknown command.
    pub fn client(&self, cmds: &[&str]) -> String {
        self.try_client(cmds).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Samba::client`], but returns the failure report instead of
    /// panicking.
    pub fn try_client(&self, cmds: &[&str]) -> Result<String, String> {
        self.run_client(cmds, CLIENT_TIMEOUT)
    }

    /// Runs smbclient like [`Samba::client`] but judges nothing: returns
    /// its exit status, stdout and stderr, also when they report
    /// `NT_STATUS_` errors (smbclient's `allinfo` prints one on stderr for
    /// each snapshot that lacks the file, and still exits 0). Err only when
    /// smbclient cannot run or times out.
    pub fn client_output(&self, cmds: &[&str]) -> Result<ClientOutput, String> {
        let script = cmds.join("; ");
        let out = self.spawn_client(&script, CLIENT_TIMEOUT)?;
        Ok(ClientOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// The user smbclient logs in as ([`Samba::start_with_conf`]), or
    /// `None` for guest sessions.
    pub fn login_user(&self) -> Option<&str> {
        self.login.as_ref().map(|l| l.user.as_str())
    }

    fn spawn_client(&self, script: &str, timeout: Duration) -> Result<Output, String> {
        let mut cmd = Command::new(&self.smbclient);
        cmd.arg(format!("--configfile={}", self.conf.display()))
            .arg(format!("//127.0.0.1/{}", self.share))
            .arg("-p")
            .arg(self.port.to_string());
        match &self.login {
            None => {
                cmd.arg("-N");
            }
            Some(Login { user, password, .. }) => {
                cmd.arg("-U").arg(format!("{user}%{password}"));
            }
        }
        cmd.args(["-m", "SMB3", "-c"])
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        output_with_timeout(&mut cmd, timeout).map_err(|e| format!("smbclient -c {script:?}: {e}"))
    }

    fn run_client(&self, cmds: &[&str], timeout: Duration) -> Result<String, String> {
        let script = cmds.join("; ");
        let out = self.spawn_client(&script, timeout)?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let failed = !out.status.success()
            || stdout.contains("NT_STATUS_")
            || stderr.contains("NT_STATUS_")
            || stdout.contains(": command not found")
            || stderr.contains(": command not found");
        if failed {
            return Err(format!(
                "smbclient -c {script:?} on port {} failed ({}):\n--- stdout\n{stdout}--- stderr\n{stderr}",
                self.port, out.status
            ));
        }
        Ok(stdout)
    }

    /// Uploads `local` to `remote` (`put`; creates or truncates and rewrites,
    /// reusing the inode of an existing file).
    pub fn put(&self, local: &Path, remote: &str) {
        self.client(&[&format!("put {} {}", local_arg(local), remote_arg(remote))]);
    }

    /// Downloads `remote` to `local` (`get`).
    pub fn get(&self, remote: &str, local: &Path) {
        self.client(&[&format!("get {} {}", remote_arg(remote), local_arg(local))]);
    }

    /// Creates the directory `remote` (`mkdir`; the parent must exist).
    pub fn mkdir(&self, remote: &str) {
        self.client(&[&format!("mkdir {}", remote_arg(remote))]);
    }

    /// Removes the empty directory `remote` (`rmdir`).
    pub fn rmdir(&self, remote: &str) {
        self.client(&[&format!("rmdir {}", remote_arg(remote))]);
    }

    /// Deletes the file `remote` (`rm`; fails on a read-only file, like
    /// Windows: clear the attribute first with `setmode(remote, "-r")`).
    pub fn rm(&self, remote: &str) {
        self.client(&[&format!("rm {}", remote_arg(remote))]);
    }

    /// Renames `from` to `to`, replacing an existing file `to` (`rename FROM
    /// TO -f`, one SMB rename with ReplaceIfExists, as Office does after
    /// writing a temporary file). Also renames directories.
    pub fn rename(&self, from: &str, to: &str) {
        self.client(&[&format!(
            "rename {} {} -f",
            remote_arg(from),
            remote_arg(to)
        )]);
    }

    /// Appends the bytes of `local` to the existing file `remote`.
    ///
    /// smbclient cannot write at an offset (its `reput` is broken in 4.17:
    /// it writes the tail at offset 0), so this is two SMB sessions: `get`
    /// the file into the private directory, append locally, `put` it back.
    /// On the server the file keeps its inode but is truncated and
    /// rewritten in full, not extended in place.
    pub fn append(&self, local: &Path, remote: &str) {
        let extra = fs::read(local).unwrap_or_else(|e| panic!("read {}: {e}", local.display()));
        let tmp = self.scratch_file("append");
        self.get(remote, &tmp);
        fs::OpenOptions::new()
            .append(true)
            .open(&tmp)
            .and_then(|mut f| f.write_all(&extra))
            .unwrap_or_else(|e| panic!("append to {}: {e}", tmp.display()));
        self.put(&tmp, remote);
        let _ = fs::remove_file(&tmp);
    }

    /// Changes DOS attributes (`setmode REMOTE MODE`), `mode` like `"+r"`,
    /// `"-r"`, `"+h"`, `"+rsha"`; stored in `user.DOSATTRIB`.
    pub fn setmode(&self, remote: &str, mode: &str) {
        assert!(
            mode.len() >= 2
                && mode.starts_with(['+', '-'])
                && mode[1..].chars().all(|c| "rsha".contains(c)),
            "setmode {mode:?}: expected [+-][rsha]+"
        );
        self.client(&[&format!("setmode {} {mode}", remote_arg(remote))]);
    }

    // -- internals ---------------------------------------------------------

    fn scratch_file(&self, what: &str) -> PathBuf {
        let n = self.scratch_seq.fetch_add(1, Ordering::Relaxed);
        self.dir.path().join("scratch").join(format!("{what}-{n}"))
    }

    fn write_conf(&self, share_path: &str, section: &ShareSection<'_>) {
        match (section, &self.login) {
            (ShareSection::Defaults(share_options), None) => {
                self.write_default_conf(share_path, share_options)
            }
            (ShareSection::Defaults(_), Some(_)) => {
                unreachable!("a login comes with start_with_conf")
            }
            (ShareSection::Custom(lines), _) => self.write_custom_conf(share_path, lines),
        }
    }

    /// The global section of [`Samba::start_with_conf`] and its share
    /// section: `path`, then exactly `lines`.
    fn write_custom_conf(&self, share_path: &str, lines: &[&str]) {
        let d = self.dir.path().display();
        let auth = if self.login.is_some() {
            format!(
                "    map to guest = Never
    passdb backend = tdbsam:{d}/private/passdb.tdb
"
            )
        } else {
            "    map to guest = Bad User
    guest account = root
"
            .to_string()
        };
        let mut conf = format!(
            "# Private smbd for one btrship integration test (tests/common/samba.rs,
# start_with_conf).
[global]
    server role = standalone server
    smb ports = {port}
    interfaces = 127.0.0.1
    bind interfaces only = yes
    disable netbios = yes
    server min protocol = SMB2
    client min protocol = SMB2
    pid directory = {d}/pid
    lock directory = {d}/lock
    state directory = {d}/state
    cache directory = {d}/cache
    private dir = {d}/private
    ncalrpc dir = {d}/ncalrpc
    log file = {d}/log/log.%m
    log level = 1
    max log size = 0
{auth}    load printers = no
    printing = bsd
    printcap name = /dev/null
    disable spoolss = yes
    rpc start on demand helpers = no

[{share}]
    path = {share_path}
",
            port = self.port,
            share = self.share,
        );
        for line in lines {
            conf.push_str("    ");
            conf.push_str(line.trim());
            conf.push('\n');
        }
        fs::write(&self.conf, conf).expect("write the private smb.conf");
    }

    /// Adds the login user, if any, to the private passdb (`smbpasswd -a`).
    fn add_passdb_user(&self) {
        let Some(Login {
            user,
            password,
            smbpasswd,
        }) = &self.login
        else {
            return;
        };
        let mut child = Command::new(smbpasswd)
            .arg("-c")
            .arg(&self.conf)
            .args(["-a", "-s"])
            .arg(user)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run smbpasswd: {e}"));
        child
            .stdin
            .take()
            .expect("smbpasswd stdin")
            .write_all(format!("{password}\n{password}\n").as_bytes())
            .expect("write the password to smbpasswd");
        let out = child.wait_with_output().expect("wait for smbpasswd");
        assert!(
            out.status.success(),
            "smbpasswd -a {user} failed ({}); does the Unix user exist?\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Removes the login user's passdb entry (`smbpasswd -x`); never panics.
    fn remove_passdb_user(&self) {
        let Some(Login {
            user, smbpasswd, ..
        }) = &self.login
        else {
            return;
        };
        let ok = Command::new(smbpasswd)
            .arg("-c")
            .arg(&self.conf)
            .arg("-x")
            .arg(user)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("samba harness: smbpasswd -x {user} failed");
        }
    }

    fn write_default_conf(&self, share_path: &str, share_options: &[&str]) {
        let d = self.dir.path().display();
        let mut conf = format!(
            "# Private smbd for one btrship integration test (tests/common/samba.rs).
[global]
    server role = standalone server
    smb ports = {port}
    interfaces = 127.0.0.1
    bind interfaces only = yes
    disable netbios = yes
    server min protocol = SMB2
    client min protocol = SMB2
    pid directory = {d}/pid
    lock directory = {d}/lock
    state directory = {d}/state
    cache directory = {d}/cache
    private dir = {d}/private
    ncalrpc dir = {d}/ncalrpc
    log file = {d}/log/log.%m
    log level = 1
    max log size = 0
    map to guest = Bad User
    guest account = root
    load printers = no
    printing = bsd
    printcap name = /dev/null
    disable spoolss = yes
    # No samba-dcerpcd: it would daemonize out of smbd's process tree and
    # log under /var/log/samba. Shares work without it; RPC (share
    # enumeration with smbclient -L) returns an empty list.
    rpc start on demand helpers = no

[{share}]
    path = {share_path}
    read only = no
    guest ok = yes
    guest only = yes
    force user = root
    vfs objects = acl_xattr
    store dos attributes = yes
    ea support = yes
    kernel oplocks = no
",
            port = self.port,
            share = self.share,
        );
        for opt in share_options {
            conf.push_str("    ");
            conf.push_str(opt);
            conf.push('\n');
        }
        fs::write(&self.conf, conf).expect("write the private smb.conf");
    }

    fn spawn(&mut self, smbd: &Path) {
        let log = fs::File::create(&self.log).expect("create the smbd log");
        let log2 = log.try_clone().expect("dup the smbd log");
        let child = Command::new(smbd)
            .arg("--foreground")
            .arg("--no-process-group")
            .arg("--debug-stdout")
            .arg(format!("--configfile={}", self.conf.display()))
            .arg(format!(
                "--log-basename={}",
                self.dir.path().join("log").display()
            ))
            // A pipe nobody writes to: smbd --foreground exits on EOF on
            // stdin, so if the test process dies without running Drop (even
            // by SIGKILL), the kernel closes the write end and smbd quits.
            .stdin(Stdio::piped())
            .stdout(log)
            .stderr(log2)
            // Its own process group (pgid = its pid). Required: on a fatal
            // error (e.g. port taken) smbd panics and SIGTERMs its whole
            // process group, which would otherwise be the test binary's.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", smbd.display()));
        self.child = Some(child);
    }

    fn wait_ready(&mut self) -> Result<(), StartError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let mut last = String::from("nothing listens on the port yet");
        loop {
            let child = self.child.as_mut().expect("smbd was spawned");
            let exited = child.try_wait().expect("wait for smbd");
            // smbd panics (and exits) when it cannot bind: someone took the
            // port after free_port() picked it.
            if self.log().contains("No sockets available to bind to") {
                return Err(StartError::PortInUse);
            }
            if let Some(status) = exited {
                return Err(StartError::Fatal(format!("smbd exited: {status}")));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                // Short timeout: whatever answers may not be our smbd yet.
                match self.run_client(&["ls"], PROBE_TIMEOUT) {
                    Ok(_) => return Ok(()),
                    Err(e) => last = e,
                }
                if self.log().contains("vfs_init failed") {
                    return Err(StartError::Fatal(format!(
                        "smbd cannot load the share's VFS modules (is samba-vfs-modules \
                         installed?)\n{last}"
                    )));
                }
            }
            if Instant::now() >= deadline {
                return Err(StartError::Fatal(format!(
                    "the share did not answer within {START_TIMEOUT:?}; last attempt: {last}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Live (non-zombie) processes of this instance among `procs`:
    /// descendants of `master` (when given) and processes whose command line
    /// names the private smb.conf.
    fn ours(&self, procs: &[ProcInfo], master: Option<u32>) -> Vec<ProcInfo> {
        let needle = self.conf.as_os_str().as_bytes();
        let me = std::process::id();
        let mut pids: BTreeSet<u32> = procs
            .iter()
            .filter(|p| p.pid != me && cmdline_contains(p.pid, needle))
            .map(|p| p.pid)
            .collect();
        if let Some(master) = master {
            pids.insert(master);
            loop {
                let before = pids.len();
                for p in procs {
                    if pids.contains(&p.ppid) && p.pid != me {
                        pids.insert(p.pid);
                    }
                }
                if pids.len() == before {
                    break;
                }
            }
        }
        procs
            .iter()
            .filter(|p| pids.contains(&p.pid) && p.state != 'Z')
            .cloned()
            .collect()
    }

    /// Stops smbd (SIGTERM to its pid, SIGKILL after 5 s) and then kills,
    /// by pid, whatever of this instance is still alive.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let master = child.id();
        // Taken before the master exits: its children are then reparented
        // and can no longer be found through it.
        let snapshot = self.ours(&all_processes(), Some(master));
        if matches!(child.try_wait(), Ok(None)) {
            signal(master, "TERM");
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
        }
        let _ = child.wait();

        // smbd's children notice the master's exit and quit by themselves;
        // anything left gets SIGTERM, then SIGKILL after a second.
        let start = Instant::now();
        let mut termed = BTreeSet::new();
        loop {
            let procs = all_processes();
            let mut left = self.ours(&procs, None);
            for p in &snapshot {
                let same = procs
                    .iter()
                    .find(|q| q.pid == p.pid && q.start == p.start && q.state != 'Z');
                if let Some(q) = same {
                    if !left.iter().any(|l| l.pid == q.pid) {
                        left.push(q.clone());
                    }
                }
            }
            if left.is_empty() {
                return;
            }
            let waited = start.elapsed();
            if waited > STOP_TIMEOUT {
                eprintln!(
                    "samba harness: processes {:?} of smbd {master} survived SIGKILL",
                    left.iter().map(|p| p.pid).collect::<Vec<_>>()
                );
                return;
            }
            for p in &left {
                if waited > Duration::from_secs(1) {
                    signal(p.pid, "KILL");
                } else if termed.insert(p.pid) {
                    signal(p.pid, "TERM");
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Samba {
    fn drop(&mut self) {
        self.stop();
        self.remove_passdb_user();
        // The TempDir field then removes the private directory.
    }
}

// -- helpers -----------------------------------------------------------------

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// `program` from PATH or the sbin directories (smbd lives in /usr/sbin,
/// which a non-login PATH may lack).
fn find_program(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{program} not found: install the Debian packages samba, samba-vfs-modules \
                 and smbclient"
            )
        })
}

/// Quotes an argument for smbclient's command parser.
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

/// Sends `sig` ("TERM", "KILL") to `pid` with kill(1) (std has no kill(2)).
fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Runs `cmd` (stdout and stderr piped) and kills it after `timeout`.
fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let child = cmd.spawn().map_err(|e| format!("cannot run: {e}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.map_err(|e| format!("wait: {e}")),
        Err(_) => {
            // The waiting thread has not reaped it (short of a race of a few
            // microseconds), so the pid is still this smbclient's.
            signal(pid, "KILL");
            let out = rx.recv().ok().and_then(Result::ok);
            Err(format!(
                "timed out after {timeout:?} and was killed; output so far:\n{}{}",
                out.as_ref()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default(),
                out.as_ref()
                    .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    .unwrap_or_default()
            ))
        }
    }
}

#[derive(Clone, Debug)]
struct ProcInfo {
    pid: u32,
    ppid: u32,
    state: char,
    /// Start time in clock ticks since boot: tells a pid's reuse apart.
    start: u64,
}

/// All processes, from /proc/PID/stat.
fn all_processes() -> Vec<ProcInfo> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(proc_info)
        .collect()
}

fn proc_info(pid: u32) -> Option<ProcInfo> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid pgrp ...": comm may contain spaces and ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcInfo {
        pid,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

fn cmdline_contains(pid: u32, needle: &[u8]) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    cmdline.windows(needle.len()).any(|w| w == needle)
}
