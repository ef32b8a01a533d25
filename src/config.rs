//! Share configuration (`<config-dir>/<name>.toml`) and repository addresses.

use crate::retention::RetentionPolicy;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Local snapshots kept after shipping (the newest is the parent of the next ship).
pub const DEFAULT_KEEP_LOCAL: usize = 8;

/// Snapshots waiting to be shipped at most (the local spool). Two days of
/// the default hourly timer: an outage of the store that long loses no
/// point in time.
pub const DEFAULT_MAX_QUEUED: usize = 48;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ShareConfig {
    pub name: String,
    pub path: PathBuf,
    pub repo: String,
    pub key_file: PathBuf,
    #[serde(default = "default_keep_local")]
    pub keep_local_snapshots: usize,
    /// The spool limit: snapshots taken but not shipped yet, at most. When a
    /// new snapshot would exceed it, the newest queued one is coalesced into
    /// the new one (see README, "When the store is away").
    #[serde(default = "default_max_queued")]
    pub max_queued_snapshots: usize,
    /// Daemon: a captured close ships once its path has been quiet this
    /// long (bursts of closes of one file ship once). `sync` does not wait.
    #[serde(default = "default_settle_ms")]
    pub settle_ms: u64,
    /// Daemon: paths never captured; globs (`*`, `?`) matched against the
    /// file name, or against the share-relative path when they hold a '/'.
    #[serde(default = "default_excludes")]
    pub exclude: Vec<String>,
    /// The host name this share's history is shipped under (set by `init`
    /// to the machine's host name; history is selected by share and host,
    /// so keep it when the machine is renamed). Absent: the current host
    /// name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Requests to the store in flight at most (`--max-connections`
    /// overrides; absent: `DEFAULT_MAX_CONNECTIONS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Bandwidth limit for store transfers, e.g. `"10M"` (bytes per
    /// second; K, M, G; `--bwlimit` overrides; absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bwlimit: Option<String>,
    /// Daemon: serve Prometheus metrics on this address (`GET /metrics`),
    /// e.g. `"127.0.0.1:9898"`. Absent: no listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// `snapshot` and `check`: write the metrics to this file (atomically,
    /// node_exporter's textfile format), e.g.
    /// `"/var/lib/prometheus/node-exporter/btrship-office.prom"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_textfile: Option<PathBuf>,
    /// `prune`: which moments of the share's history to keep (the
    /// `[retention]` table; absent: the default tiers). Last: in the file
    /// the table follows every plain key.
    #[serde(default, skip_serializing_if = "RetentionPolicy::is_default")]
    pub retention: RetentionPolicy,
}

/// Requests to the store in flight at most, unless configured.
pub const DEFAULT_MAX_CONNECTIONS: usize = 8;

/// Office lock and temp files, Windows and macOS folder litter.
pub const DEFAULT_EXCLUDES: &[&str] = &["~$*", "*.tmp", "Thumbs.db", ".DS_Store"];

fn default_settle_ms() -> u64 {
    2000
}

fn default_excludes() -> Vec<String> {
    DEFAULT_EXCLUDES.iter().map(|s| s.to_string()).collect()
}

/// Does the glob `pat` (`*` any run, `?` one character) match `s` whole?
pub fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while i < s.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p] == s[i]) {
            p += 1;
            i += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some(p);
            mark = i;
            p += 1;
        } else if let Some(sp) = star {
            p = sp + 1;
            mark += 1;
            i = mark;
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

impl ShareConfig {
    /// Is the share-relative `path` excluded from capture?
    pub fn excluded(&self, path: &[u8]) -> bool {
        let name = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
        self.exclude.iter().any(|g| {
            let g = g.as_bytes();
            if g.contains(&b'/') {
                glob_match(g, path)
            } else {
                glob_match(g, name)
            }
        })
    }
}

fn default_keep_local() -> usize {
    DEFAULT_KEEP_LOCAL
}

fn default_max_queued() -> usize {
    DEFAULT_MAX_QUEUED
}

pub fn config_path(config_dir: &Path, name: &str) -> PathBuf {
    config_dir.join(format!("{name}.toml"))
}

impl ShareConfig {
    /// A config with every optional setting at its default and the
    /// required ones empty (`init` fills them).
    pub fn defaults() -> ShareConfig {
        ShareConfig {
            name: String::new(),
            path: PathBuf::new(),
            repo: String::new(),
            key_file: PathBuf::new(),
            keep_local_snapshots: DEFAULT_KEEP_LOCAL,
            max_queued_snapshots: DEFAULT_MAX_QUEUED,
            settle_ms: default_settle_ms(),
            exclude: default_excludes(),
            host: None,
            max_connections: None,
            bwlimit: None,
            metrics_listen: None,
            metrics_textfile: None,
            retention: RetentionPolicy::default(),
        }
    }

    /// `bwlimit` in bytes per second (validated by `load`).
    pub fn bwlimit_bytes(&self) -> Option<u64> {
        self.bwlimit
            .as_deref()
            .and_then(btrship_upload::layers::parse_bwlimit)
    }

    pub fn load(config_dir: &Path, name: &str) -> Result<ShareConfig> {
        validate_name(name)?;
        let path = config_path(config_dir, name);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(crate::exit::UserError::new(
                    crate::exit::NOT_FOUND,
                    format!(
                        "share {name:?} is not set up here (no {}); run btrship init, \
                         or pass --repo and --key-file",
                        path.display()
                    ),
                )
                .into())
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let cfg: ShareConfig =
            toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))?;
        let problems = cfg.problems();
        if !problems.is_empty() {
            return Err(crate::exit::UserError::new(
                crate::exit::USAGE,
                format!("invalid config {}: {}", path.display(), problems.join("; ")),
            )
            .into());
        }
        if cfg.name != name {
            bail!(
                "{} names share {:?}, expected {name:?}",
                path.display(),
                cfg.name
            );
        }
        Ok(cfg)
    }

    /// What is wrong with the settings TOML cannot check itself, every one
    /// (so one edit fixes them all).
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(b) = &self.bwlimit {
            if btrship_upload::layers::parse_bwlimit(b).is_none() {
                problems.push(format!(
                    "bwlimit = {b:?} is not a bandwidth like \"10M\", \"500K\" or \"1G\""
                ));
            }
        }
        if let Some(a) = &self.metrics_listen {
            if a.parse::<std::net::SocketAddr>().is_err() {
                problems.push(format!(
                    "metrics_listen = {a:?} is not an address like \"127.0.0.1:9898\""
                ));
            }
        }
        if self.max_connections == Some(0) {
            problems.push("max_connections must be at least 1".to_string());
        }
        if let Err(e) = self.retention.windows() {
            problems.push(e);
        }
        problems
    }

    /// Writes the config atomically (temp file, fsync, rename, fsync dir).
    pub fn save(&self, config_dir: &Path) -> Result<()> {
        std::fs::create_dir_all(config_dir)
            .with_context(|| format!("cannot create {}", config_dir.display()))?;
        let path = config_path(config_dir, &self.name);
        let tmp = config_dir.join(format!(".{}.toml.tmp", self.name));
        let text = format!(
            "# btrship share configuration, written by `btrship init`\n{}",
            toml::to_string(self)?
        );
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        std::fs::File::open(config_dir)?.sync_all()?;
        Ok(())
    }
}

/// Share names: what a systemd instance name and a file name can both hold.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !ok {
        return Err(crate::exit::UserError::new(
            crate::exit::USAGE,
            format!(
                "invalid share name {name:?}: use letters, digits, '.', '_' and '-' (at most 64)"
            ),
        )
        .into());
    }
    Ok(())
}

/// A repository address: `file:///dir`, an absolute path, `s3://...`,
/// `azure://...` or `gs://...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoAddress {
    Local(PathBuf),
    /// `s3://bucket[/prefix][?endpoint=...&region=...&path_style=true]`,
    /// credentials from the standard AWS chain (never from the URL).
    S3(String),
    /// `azure://container[/prefix][?endpoint=...]` or
    /// `gs://bucket[/prefix][?endpoint=...]`, credentials from the
    /// environment (`btrship_upload::cloud`).
    Cloud(String),
}

impl RepoAddress {
    pub fn parse(s: &str) -> Result<RepoAddress> {
        let usage = |msg: String| -> anyhow::Error {
            crate::exit::UserError::new(crate::exit::USAGE, msg).into()
        };
        if s.starts_with("s3://") {
            return Ok(RepoAddress::S3(s.to_string()));
        }
        if s.starts_with("azure://") || s.starts_with("gs://") {
            return Ok(RepoAddress::Cloud(s.to_string()));
        }
        let path = match s.strip_prefix("file://") {
            Some(p) => p,
            None if s.contains("://") => {
                return Err(usage(format!(
                    "repository {s}: unknown scheme; use /path, file:///path, s3://bucket/prefix, azure://container/prefix or gs://bucket/prefix"
                )))
            }
            None => s,
        };
        if !path.starts_with('/') {
            return Err(usage(format!(
                "repository {s}: the path must be absolute (file:///path or /path)"
            )));
        }
        Ok(RepoAddress::Local(PathBuf::from(path)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_addresses() {
        assert_eq!(
            RepoAddress::parse("file:///srv/repo").unwrap(),
            RepoAddress::Local("/srv/repo".into())
        );
        assert_eq!(
            RepoAddress::parse("/srv/repo").unwrap(),
            RepoAddress::Local("/srv/repo".into())
        );
        assert_eq!(
            RepoAddress::parse("s3://bucket/prefix").unwrap(),
            RepoAddress::S3("s3://bucket/prefix".into())
        );
        assert_eq!(
            RepoAddress::parse("gs://bucket/prefix").unwrap(),
            RepoAddress::Cloud("gs://bucket/prefix".into())
        );
        assert_eq!(
            RepoAddress::parse("azure://container").unwrap(),
            RepoAddress::Cloud("azure://container".into())
        );
        for bad in ["repo", "file://relative", "ftp://x/y"] {
            assert!(RepoAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        for good in ["share", "office-1", "a.b_c"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "-x", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn globs_and_excludes() {
        for (p, s, m) in [
            ("~$*", "~$budget.xlsx", true),
            ("~$*", "budget.xlsx", false),
            ("*.tmp", "a.tmp", true),
            ("*.tmp", "a.tmpx", false),
            ("Thumbs.db", "Thumbs.db", true),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*", "", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
        ] {
            assert_eq!(glob_match(p.as_bytes(), s.as_bytes()), m, "{p} {s}");
        }
        let mut cfg = ShareConfig {
            name: "s".into(),
            path: "/s".into(),
            repo: "/r".into(),
            key_file: "/k".into(),
            keep_local_snapshots: 1,
            max_queued_snapshots: 1,
            settle_ms: 1,
            exclude: default_excludes(),
            host: None,
            max_connections: None,
            bwlimit: None,
            metrics_listen: None,
            metrics_textfile: None,
            retention: Default::default(),
        };
        assert!(cfg.excluded(b"docs/~$report.docx"));
        assert!(cfg.excluded(b"Thumbs.db"));
        assert!(!cfg.excluded(b"docs/report.docx"));
        cfg.exclude.push("scratch/*".into());
        assert!(cfg.excluded(b"scratch/x"));
        assert!(!cfg.excluded(b"docs/scratch"));
    }

    #[test]
    fn config_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ShareConfig {
            name: "share".into(),
            path: "/srv/share".into(),
            repo: "/var/lib/btrship/repo".into(),
            key_file: "/etc/btrship/share.key".into(),
            keep_local_snapshots: 3,
            max_queued_snapshots: 5,
            settle_ms: 500,
            exclude: vec!["*.bak".into()],
            host: Some("files1".into()),
            max_connections: Some(4),
            bwlimit: Some("2M".into()),
            metrics_listen: Some("127.0.0.1:9898".into()),
            metrics_textfile: Some("/var/lib/prometheus/node-exporter/btrship-share.prom".into()),
            retention: Default::default(),
        };
        cfg.save(dir.path()).unwrap();
        let back = ShareConfig::load(dir.path(), "share").unwrap();
        assert_eq!(back, cfg);
        assert_eq!(back.bwlimit_bytes(), Some(2 << 20));
        assert!(ShareConfig::load(dir.path(), "other").is_err());
        // A bandwidth that does not parse is refused when loaded, naming it.
        let bad = ShareConfig {
            bwlimit: Some("fast".into()),
            ..cfg
        };
        bad.save(dir.path()).unwrap();
        let e = ShareConfig::load(dir.path(), "share").unwrap_err();
        assert!(format!("{e:#}").contains("bwlimit"), "{e:#}");
    }

    #[test]
    fn retention_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = ShareConfig {
            name: "share".into(),
            path: "/srv/share".into(),
            repo: "/var/lib/btrship/repo".into(),
            key_file: "/etc/btrship/share.key".into(),
            ..ShareConfig::defaults()
        };
        // The default policy is left out of the file.
        cfg.save(dir.path()).unwrap();
        let text = std::fs::read_to_string(config_path(dir.path(), "share")).unwrap();
        assert!(!text.contains("retention"), "{text}");
        assert_eq!(ShareConfig::load(dir.path(), "share").unwrap(), cfg);

        // A [retention] table written by hand: absent keys are the defaults,
        // the values stay as written.
        let text = format!(
            "{text}\n[retention]\nkeep_all_within = \"2d\"\nkeep_daily_within = \"1d12h\"\n\
             keep_yearly_within = \"0s\"\n"
        );
        std::fs::write(config_path(dir.path(), "share"), &text).unwrap();
        let back = ShareConfig::load(dir.path(), "share").unwrap();
        cfg.retention = RetentionPolicy {
            keep_all_within: "2d".into(),
            keep_daily_within: "1d12h".into(),
            keep_yearly_within: "0s".into(),
            ..RetentionPolicy::default()
        };
        assert_eq!(back, cfg);
        cfg.save(dir.path()).unwrap();
        assert_eq!(ShareConfig::load(dir.path(), "share").unwrap(), cfg);

        // A bad window, an unknown key: refused when loaded, naming them;
        // several problems come in one message.
        let bad = ShareConfig {
            retention: RetentionPolicy {
                keep_daily_within: "9x".into(),
                ..RetentionPolicy::default()
            },
            bwlimit: Some("fast".into()),
            ..cfg.clone()
        };
        bad.save(dir.path()).unwrap();
        let e = format!("{:#}", ShareConfig::load(dir.path(), "share").unwrap_err());
        assert!(e.contains("retention.keep_daily_within = \"9x\""), "{e}");
        assert!(e.contains("bwlimit"), "{e}");
        std::fs::write(
            config_path(dir.path(), "share"),
            format!("{text}keep_forever = \"yes\"\n"),
        )
        .unwrap();
        let e = format!("{:#}", ShareConfig::load(dir.path(), "share").unwrap_err());
        assert!(e.contains("keep_forever"), "{e}");
    }
}
