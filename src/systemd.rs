//! The systemd units `btrship init` writes: `btrship@.service` (the
//! daemon, `Type=notify`, restarted on failure), `btrship-snapshot@.service`
//! (one `btrship snapshot NAME` run) and `btrship-snapshot@.timer` (runs it
//! every `--snapshot-every`). Template units: the instance is the share
//! name. The timer is also what makes a snapshot backlog ship by itself
//! once the store is back.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What the units run and how often.
pub struct Units {
    /// The btrship binary.
    pub exe: PathBuf,
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Seconds between snapshots.
    pub every_secs: u64,
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

impl Units {
    pub fn daemon_service(&self) -> String {
        format!(
            "# Written by `btrship init`. Enable per share: systemctl enable --now btrship@NAME.service\n\
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
             \n\
             [Install]\n\
             WantedBy=multi-user.target\n",
            quote(&self.exe),
            quote(&self.config_dir),
            quote(&self.state_dir),
            crate::exit::PERMANENT
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        )
    }

    pub fn snapshot_service(&self) -> String {
        format!(
            "# Written by `btrship init`. One snapshot of share %i, shipped with any backlog.\n\
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
             IOSchedulingPriority=7\n",
            quote(&self.exe),
            quote(&self.config_dir),
            quote(&self.state_dir)
        )
    }

    pub fn snapshot_timer(&self) -> String {
        format!(
            "# Written by `btrship init`. Enable per share: systemctl enable --now btrship-snapshot@NAME.timer\n\
             [Unit]\n\
             Description=btrship: snapshot share %i every {}s\n\
             \n\
             [Timer]\n\
             OnActiveSec=1min\n\
             OnUnitActiveSec={}s\n\
             AccuracySec=1s\n\
             \n\
             [Install]\n\
             WantedBy=timers.target\n",
            self.every_secs, self.every_secs
        )
    }

    /// Writes the units into `dir` (each atomically: temp file, fsync,
    /// rename). Returns the paths written.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut written = Vec::new();
        for (name, text) in [
            ("btrship@.service", self.daemon_service()),
            ("btrship-snapshot@.service", self.snapshot_service()),
            ("btrship-snapshot@.timer", self.snapshot_timer()),
        ] {
            let path = dir.join(name);
            let tmp = dir.join(format!(".{name}.tmp"));
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            written.push(path);
        }
        std::fs::File::open(dir)?.sync_all()?;
        Ok(written)
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
}
