//! Share configuration (`<config-dir>/<name>.toml`) and repository addresses.

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
        if cfg.name != name {
            bail!(
                "{} names share {:?}, expected {name:?}",
                path.display(),
                cfg.name
            );
        }
        Ok(cfg)
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

/// A repository address: `file:///dir`, an absolute path, or `s3://...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoAddress {
    Local(PathBuf),
    /// `s3://bucket[/prefix][?endpoint=...&region=...&path_style=true]`,
    /// credentials from the standard AWS chain (never from the URL).
    S3(String),
}

impl RepoAddress {
    pub fn parse(s: &str) -> Result<RepoAddress> {
        let usage = |msg: String| -> anyhow::Error {
            crate::exit::UserError::new(crate::exit::USAGE, msg).into()
        };
        if s.starts_with("s3://") {
            return Ok(RepoAddress::S3(s.to_string()));
        }
        let path = match s.strip_prefix("file://") {
            Some(p) => p,
            None if s.contains("://") => {
                return Err(usage(format!(
                    "repository {s}: unknown scheme; use file:///path or an absolute path"
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
    fn config_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ShareConfig {
            name: "share".into(),
            path: "/srv/share".into(),
            repo: "/var/lib/btrship/repo".into(),
            key_file: "/etc/btrship/share.key".into(),
            keep_local_snapshots: 3,
            max_queued_snapshots: 5,
        };
        cfg.save(dir.path()).unwrap();
        assert_eq!(ShareConfig::load(dir.path(), "share").unwrap(), cfg);
        assert!(ShareConfig::load(dir.path(), "other").is_err());
    }
}
