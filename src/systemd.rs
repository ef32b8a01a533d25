//! The systemd units of btrship: `btrship@.service` (the daemon,
//! `Type=notify`, restarted on failure), `btrship-snapshot@.service` (one
//! `btrship snapshot NAME` run) and `btrship-snapshot@.timer` (runs it every
//! hour), `btrship-prune@.service` (one `btrship prune NAME` run: the
//! share's retention policy, then garbage collection in the repository) and
//! `btrship-prune@.timer` (runs it once a day), `btrship-mount@.service`
//! (`btrship mount NAME`: the share's moments as a read-only FUSE
//! filesystem at `/run/btrship/NAME` for Samba's Previous Versions,
//! `Type=notify`, optional). Template units: the instance is the share
//! name. The snapshot timer is also what makes a snapshot backlog ship by
//! itself once the store is back.
//!
//! One renderer for both ways they reach a machine: the Debian package
//! ships them in `/lib/systemd/system` (rendered at build time by the hidden
//! `btrship units --out DIR`, for `/usr/bin/btrship` and the default
//! directories), and `btrship init` writes them into the systemd directory
//! when the installed ones do not run this binary with these directories
//! (built from source, other directories). What is per share, the snapshot
//! interval, is always a drop-in:
//! `<systemd-dir>/btrship-snapshot@NAME.timer.d/btrship.conf`. The prune
//! timer has no per-share setting: daily for every share.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Where the Debian package installs the template units (`init` looks
/// there, env `BTRSHIP_SYSTEM_UNIT_DIR`).
pub const PACKAGE_UNIT_DIR: &str = "/lib/systemd/system";

/// The timer's interval in the template (and `init`'s default), seconds.
pub const DEFAULT_EVERY_SECS: u64 = 3600;

/// The template units' file names.
pub const TEMPLATES: [&str; 6] = [
    "btrship@.service",
    "btrship-snapshot@.service",
    "btrship-snapshot@.timer",
    "btrship-prune@.service",
    "btrship-prune@.timer",
    "btrship-mount@.service",
];

/// Where `btrship-mount@NAME.service` mounts share NAME's moments (the
/// default directory of `btrship mount`).
pub const MOUNT_DIR: &str = "/run/btrship";

/// The per-share drop-in's file name (in `btrship-snapshot@NAME.timer.d/`).
pub const DROPIN_FILE: &str = "btrship.conf";

/// What the units run.
pub struct Units {
    /// The btrship binary.
    pub exe: PathBuf,
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
}

/// Parses an interval such as `1h`, `30m`, `15min`, `90s`, `1d` (at least
/// one minute).
pub fn parse_interval(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..split].parse().ok()?;
    let unit = match s[split..].trim() {
        "s" | "sec" => 1,
        "m" | "min" => 60,
        "h" | "hour" | "hours" => 3600,
        "d" | "day" | "days" => 86400,
        _ => return None,
    };
    let secs = n.checked_mul(unit)?;
    (secs >= 60).then_some(secs)
}

/// The sandbox of each service: one file per unit, the options that
/// `vm-tests/systemd` runs the units under (it applies the same files as
/// drop-ins and checks the daemon captures and ships with them, and that
/// systemd and the kernel report them applied); the files say why each
/// option that is not there is not. The prune service runs under the
/// snapshot service's file: it deletes local snapshots too (CAP_SYS_ADMIN),
/// reads the share's tree, writes the state directory and talks to the
/// store. The mount service's file has no option that gives it a mount
/// namespace of its own: its FUSE mount must be in the host's, where smbd
/// finds it.
const HARDENING_DAEMON: &str = include_str!("../packaging/hardening-daemon.conf");
const HARDENING_SNAPSHOT: &str = include_str!("../packaging/hardening-snapshot.conf");
const HARDENING_MOUNT: &str = include_str!("../packaging/hardening-mount.conf");

/// The option lines of a hardening file's `[Service]` section.
fn sandbox(conf: &str) -> String {
    conf.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The exit codes a service is not restarted after (`exit::PERMANENT`),
/// for `RestartPreventExitStatus=`.
fn permanent_codes() -> String {
    crate::exit::PERMANENT
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// systemd wants command lines with special characters quoted.
fn quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c))
    {
        s
    } else {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// Writes `text` to `dir/name` atomically: temp file, fsync, rename, fsync
/// of the directory.
fn write_atomic(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))?;
    Ok(path)
}

/// The drop-in that sets share `name`'s snapshot interval (`init` always
/// writes it, also for the default: the interval is visible per share and
/// running `init` again replaces it).
pub fn timer_dropin(name: &str, every_secs: u64) -> String {
    format!(
        "# Written by `btrship init`: how often share {name} is snapshotted.\n\
         [Unit]\n\
         Description=btrship: snapshot share %i every {every_secs}s\n\
         \n\
         [Timer]\n\
         # An empty value clears every timer of the template: set both again.\n\
         OnUnitActiveSec=\n\
         OnActiveSec=1min\n\
         OnUnitActiveSec={every_secs}s\n"
    )
}

/// The drop-in directory of share `name`'s timer in `systemd_dir`.
pub fn dropin_dir(systemd_dir: &Path, name: &str) -> PathBuf {
    systemd_dir.join(format!("btrship-snapshot@{name}.timer.d"))
}

/// Writes share `name`'s timer drop-in into `systemd_dir` (atomically).
pub fn write_timer_dropin(systemd_dir: &Path, name: &str, every_secs: u64) -> Result<PathBuf> {
    let dir = dropin_dir(systemd_dir, name);
    let path = write_atomic(&dir, DROPIN_FILE, &timer_dropin(name, every_secs))?;
    std::fs::File::open(systemd_dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", systemd_dir.display()))?;
    Ok(path)
}

impl Units {
    pub fn daemon_service(&self) -> String {
        format!(
            "# btrship's daemon, one per share. Enable: systemctl enable --now btrship@NAME.service\n\
             [Unit]\n\
             Description=btrship: capture and ship every closed file of share %i\n\
             After=network-online.target local-fs.target smbd.service\n\
             Wants=network-online.target\n\
             \n\
             [Service]\n\
             Type=notify\n\
             NotifyAccess=main\n\
             ExecStart={} --config-dir {} --state-dir {} --no-progress daemon %i\n\
             Restart=on-failure\n\
             RestartSec=5s\n\
             # Permanent errors (usage, not found, key, not btrfs, unsupported\n\
             # format, access denied) are not retried: the unit shows failed.\n\
             RestartPreventExitStatus={}\n\
             # The daemon pings every 5 s while it makes progress.\n\
             WatchdogSec=5min\n\
             KillSignal=SIGTERM\n\
             TimeoutStopSec=120s\n\
             Environment=BTRSHIP_LOG=info\n\
             # Sandbox (packaging/hardening-daemon.conf, verified by vm-tests/systemd).\n\
             {}\
             \n\
             [Install]\n\
             WantedBy=multi-user.target\n",
            quote(&self.exe),
            quote(&self.config_dir),
            quote(&self.state_dir),
            permanent_codes(),
            sandbox(HARDENING_DAEMON)
        )
    }

    pub fn snapshot_service(&self) -> String {
        format!(
            "# btrship: one snapshot of share %i, shipped with any backlog (started by btrship-snapshot@NAME.timer).\n\
             [Unit]\n\
             Description=btrship: snapshot share %i and ship it\n\
             After=network-online.target local-fs.target\n\
             Wants=network-online.target\n\
             \n\
             [Service]\n\
             Type=oneshot\n\
             ExecStart={} --config-dir {} --state-dir {} --no-progress snapshot %i\n\
             Nice=10\n\
             IOSchedulingClass=best-effort\n\
             IOSchedulingPriority=7\n\
             # Sandbox (packaging/hardening-snapshot.conf, verified by vm-tests/systemd).\n\
             {}",
            quote(&self.exe),
            quote(&self.config_dir),
            quote(&self.state_dir),
            sandbox(HARDENING_SNAPSHOT)
        )
    }

    /// The timer template: every hour; a share's own interval is its
    /// drop-in (`timer_dropin`).
    pub fn snapshot_timer(&self) -> String {
        format!(
            "# btrship: snapshot share %i every hour (btrship init writes the share's own interval\n\
             # into btrship-snapshot@NAME.timer.d/). Enable: systemctl enable --now btrship-snapshot@NAME.timer\n\
             [Unit]\n\
             Description=btrship: snapshot share %i every {DEFAULT_EVERY_SECS}s\n\
             \n\
             [Timer]\n\
             OnActiveSec=1min\n\
             OnUnitActiveSec={DEFAULT_EVERY_SECS}s\n\
             AccuracySec=1s\n\
             \n\
             [Install]\n\
             WantedBy=timers.target\n"
        )
    }

    /// One `btrship prune NAME` run: the share's retention policy, then
    /// garbage collection in the repository. Oneshot, started by its timer:
    /// it never runs twice at once for a share.
    pub fn prune_service(&self) -> String {
        format!(
            "# btrship: prune share %i by its retention policy and collect garbage in its repository\n\
             # (started daily by btrship-prune@NAME.timer).\n\
             [Unit]\n\
             Description=btrship: prune share %i (retention policy, repository garbage collection)\n\
             After=network-online.target local-fs.target\n\
             Wants=network-online.target\n\
             \n\
             [Service]\n\
             Type=oneshot\n\
             ExecStart={} --config-dir {} --state-dir {} --no-progress prune %i\n\
             Nice=10\n\
             IOSchedulingClass=idle\n\
             # Sandbox (packaging/hardening-snapshot.conf, the snapshot service's: it\n\
             # deletes local snapshots too).\n\
             {}",
            quote(&self.exe),
            quote(&self.config_dir),
            quote(&self.state_dir),
            sandbox(HARDENING_SNAPSHOT)
        )
    }

    /// The prune timer: once a day, at a random time in the hour after
    /// midnight; a day missed while the machine was off runs after boot.
    pub fn prune_timer(&self) -> String {
        "# btrship: prune share %i once a day. Enable: systemctl enable --now btrship-prune@NAME.timer\n\
         [Unit]\n\
         Description=btrship: prune share %i daily\n\
         \n\
         [Timer]\n\
         OnCalendar=daily\n\
         RandomizedDelaySec=1h\n\
         Persistent=true\n\
         \n\
         [Install]\n\
         WantedBy=timers.target\n"
            .to_string()
    }

    /// `btrship mount NAME` at its default directory, `/run/btrship/NAME`:
    /// every moment of the share as `@GMT-...` directories for Samba's
    /// `vfs_shadow_copy2`. Started before smbd, restarted on failure; a
    /// mount that a killed server left dead is detached after it stops.
    /// Its sandbox has no mount namespace (packaging/hardening-mount.conf).
    pub fn mount_service(&self) -> String {
        format!(
            "# btrship: every moment of share %i as a read-only FUSE filesystem at {MOUNT_DIR}/%i,\n\
             # Windows Previous Versions through Samba (see btrship samba-conf NAME).\n\
             # Enable: systemctl enable --now btrship-mount@NAME.service\n\
             [Unit]\n\
             Description=btrship: mount the moments of share %i at {MOUNT_DIR}/%i\n\
             # Not After=btrship@%i.service: that one starts after smbd, and this one\n\
             # before it (Samba must find the directory), which would be a cycle.\n\
             After=network-online.target local-fs.target\n\
             Wants=network-online.target\n\
             Before=smbd.service\n\
             \n\
             [Service]\n\
             Type=notify\n\
             NotifyAccess=main\n\
             ExecStart={} --config-dir {} --state-dir {} --no-progress mount %i\n\
             # A killed FUSE server leaves a dead mount behind (\"Transport endpoint is\n\
             # not connected\"): detach it. Fails harmlessly when nothing is mounted.\n\
             ExecStopPost=-/bin/umount --lazy {MOUNT_DIR}/%i\n\
             Restart=on-failure\n\
             RestartSec=5s\n\
             # Permanent errors (usage, not found, key, not btrfs, unsupported\n\
             # format, access denied) are not retried: the unit shows failed.\n\
             RestartPreventExitStatus={}\n\
             Environment=BTRSHIP_LOG=info\n\
             # Sandbox (packaging/hardening-mount.conf, verified by vm-tests/systemd):\n\
             # no option that makes a mount namespace, or smbd would not see the mount.\n\
             {}\
             \n\
             [Install]\n\
             WantedBy=multi-user.target\n",
            quote(&self.exe),
            quote(&self.config_dir),
            quote(&self.state_dir),
            permanent_codes(),
            sandbox(HARDENING_MOUNT)
        )
    }

    fn templates(&self) -> [(&'static str, String); 6] {
        [
            (TEMPLATES[0], self.daemon_service()),
            (TEMPLATES[1], self.snapshot_service()),
            (TEMPLATES[2], self.snapshot_timer()),
            (TEMPLATES[3], self.prune_service()),
            (TEMPLATES[4], self.prune_timer()),
            (TEMPLATES[5], self.mount_service()),
        ]
    }

    /// Are the template units in `dir` exactly these (so they run this
    /// binary with these directories)? Then `init` uses them and writes
    /// only the per-share drop-in.
    pub fn installed_in(&self, dir: &Path) -> bool {
        self.templates()
            .iter()
            .all(|(name, text)| std::fs::read(dir.join(name)).is_ok_and(|t| t == text.as_bytes()))
    }

    /// Writes the template units into `dir` (each atomically: temp file,
    /// fsync, rename). Returns the paths written.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        self.templates()
            .iter()
            .map(|(name, text)| write_atomic(dir, name, text))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("1h"), Some(3600));
        assert_eq!(parse_interval("30m"), Some(1800));
        assert_eq!(parse_interval("15min"), Some(900));
        assert_eq!(parse_interval("1d"), Some(86400));
        assert_eq!(parse_interval("120s"), Some(120));
        for bad in ["", "h", "10", "5s", "1w", "-1h", "1.5h"] {
            assert_eq!(parse_interval(bad), None, "{bad}");
        }
    }

    #[test]
    fn paths_with_spaces_are_quoted() {
        assert_eq!(quote(Path::new("/usr/bin/btrship")), "/usr/bin/btrship");
        assert_eq!(quote(Path::new("/a b/c")), "\"/a b/c\"");
    }

    #[test]
    fn installed_units_are_recognised_only_when_identical() {
        let dir = tempfile::tempdir().unwrap();
        let units = Units {
            exe: "/usr/bin/btrship".into(),
            config_dir: "/etc/btrship".into(),
            state_dir: "/var/lib/btrship".into(),
        };
        assert!(!units.installed_in(dir.path()));
        units.write(dir.path()).unwrap();
        assert!(units.installed_in(dir.path()));
        let other = Units {
            exe: "/usr/local/bin/btrship".into(),
            ..units
        };
        assert!(!other.installed_in(dir.path()));
        std::fs::remove_file(dir.path().join(TEMPLATES[2])).unwrap();
        let units = Units {
            exe: "/usr/bin/btrship".into(),
            ..other
        };
        assert!(!units.installed_in(dir.path()));
        // An older install without the prune units is not these units.
        units.write(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join("btrship-prune@.timer")).unwrap();
        assert!(!units.installed_in(dir.path()));
        // Nor one without the mount unit.
        let written = units.write(dir.path()).unwrap();
        assert_eq!(written.len(), TEMPLATES.len());
        assert!(written.contains(&dir.path().join("btrship-mount@.service")));
        assert!(units.installed_in(dir.path()));
        std::fs::remove_file(dir.path().join("btrship-mount@.service")).unwrap();
        assert!(!units.installed_in(dir.path()));
    }

    #[test]
    fn prune_runs_under_the_snapshot_sandbox() {
        let units = Units {
            exe: "/usr/bin/btrship".into(),
            config_dir: "/etc/btrship".into(),
            state_dir: "/var/lib/btrship".into(),
        };
        let prune = units.prune_service();
        assert!(prune.contains(
            "\nExecStart=/usr/bin/btrship --config-dir /etc/btrship --state-dir /var/lib/btrship --no-progress prune %i\n"
        ));
        let sandbox = sandbox(HARDENING_SNAPSHOT);
        assert!(sandbox.contains("CapabilityBoundingSet=CAP_SYS_ADMIN CAP_DAC_READ_SEARCH\n"));
        assert!(prune.ends_with(&sandbox), "{prune}");
        assert!(units.snapshot_service().ends_with(&sandbox));
    }

    #[test]
    fn mount_service_runs_the_mount_in_the_host_mount_namespace() {
        let units = Units {
            exe: "/usr/bin/btrship".into(),
            config_dir: "/etc/btrship".into(),
            state_dir: "/var/lib/btrship".into(),
        };
        let mount = units.mount_service();
        for line in [
            "Type=notify",
            "NotifyAccess=main",
            "ExecStart=/usr/bin/btrship --config-dir /etc/btrship --state-dir /var/lib/btrship --no-progress mount %i",
            "ExecStopPost=-/bin/umount --lazy /run/btrship/%i",
            "Restart=on-failure",
            "RestartSec=5s",
            "RestartPreventExitStatus=2 3 4 6 11 12",
            "After=network-online.target local-fs.target",
            "Before=smbd.service",
            "WantedBy=multi-user.target",
        ] {
            assert!(mount.contains(&format!("\n{line}\n")), "{line}: {mount}");
        }
        // The daemon starts after smbd: ordering the mount after the daemon
        // and before smbd would be a cycle.
        assert!(units.daemon_service().contains("smbd.service"));
        assert!(
            !mount
                .lines()
                .any(|l| l.starts_with("After=") && l.contains("btrship@")),
            "{mount}"
        );
        let sandbox = sandbox(HARDENING_MOUNT);
        assert!(mount.contains(&sandbox), "{mount}");
        assert!(sandbox.contains(
            "CapabilityBoundingSet=CAP_SYS_ADMIN CAP_DAC_READ_SEARCH CAP_DAC_OVERRIDE CAP_FOWNER\n"
        ));
        assert!(sandbox.contains("DeviceAllow=/dev/fuse rw\n"));
        // systemd.exec(5): each of these gives the service a mount
        // namespace of its own, where the FUSE mount would be invisible to
        // smbd (and go away with the service).
        let namespaced = [
            "ProtectSystem",
            "ProtectHome",
            "PrivateTmp",
            "PrivateDevices",
            "PrivateMounts",
            "PrivateIPC",
            "PrivateNetwork",
            "ProtectKernelTunables",
            "ProtectKernelModules",
            "ProtectKernelLogs",
            "ProtectControlGroups",
            "ProtectProc",
            "ProcSubset",
            "ReadWritePaths",
            "ReadOnlyPaths",
            "InaccessiblePaths",
            "ExecPaths",
            "NoExecPaths",
            "BindPaths",
            "BindReadOnlyPaths",
            "TemporaryFileSystem",
            "MountFlags",
            "RootDirectory",
            "RootImage",
            "MountImages",
            "ExtensionImages",
            "ExtensionDirectories",
            "LogNamespace",
            "MountAPIVFS",
        ];
        for l in mount.lines() {
            let key = l.split('=').next().unwrap();
            assert!(!namespaced.contains(&key), "{l}: {mount}");
        }
    }
}
