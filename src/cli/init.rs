//! `btrship init PATH`: set up a share (config, key, repository, state,
//! systemd units). When the template units installed by the Debian package
//! run this binary with these directories, `init` uses them and writes only
//! the share's timer drop-in; otherwise it writes the templates too.

use super::App;
use anyhow::{Context, Result};
use btrship::config::{self, ShareConfig};
use btrship::exit::{self, UserError};
use btrship::open::host_name;
use btrship::state;
use btrship_crypto::RepoKey;
use btrship_snapshot::{PrivateArea, Share};
use btrship_upload::format::ObjectLockConfig;
use btrship_upload::{layers, Repository};
use std::path::PathBuf;

/// Set up a share: check it is a btrfs subvolume, make or reuse the key,
/// the repository and the state.
#[derive(clap::Args)]
#[command(
    long_about = "Set up a share for shipping. PATH must be a btrfs subvolume (the Samba share). \
init writes <config-dir>/NAME.toml, creates the key file unless it exists (copy it off the \
machine: without it nothing can be restored), creates the repository unless it exists, the \
private snapshot area inside the share's filesystem and the state database, and writes the \
systemd units: the share's snapshot interval as a drop-in \
(btrship-snapshot@NAME.timer.d/btrship.conf), and the template units (the daemon, the snapshot \
service and timer, the daily prune service and timer, the optional mount service for Windows \
Previous Versions) unless the ones installed by the btrship package (/lib/systemd/system) run \
this binary with these directories. Running it again with the same settings changes nothing.",
    after_help = "Examples:
  btrship init /srv/samba/office
  btrship init /srv/samba/office --repo s3://backups/office --snapshot-every 30m
  btrship init /srv/samba/scans --name scans --key-file /etc/btrship/office.key"
)]
pub struct Args {
    /// The share: a btrfs subvolume.
    path: PathBuf,
    /// Share name [default: the basename of PATH].
    #[arg(long)]
    name: Option<String>,
    /// Repository address: /dir, file:///dir, s3://bucket/prefix, azure://container/prefix or gs://bucket/prefix
    /// [default: <state-dir>/repo].
    #[arg(long, value_name = "URL")]
    repo: Option<String>,
    /// Key file; created if it does not exist [default:
    /// <config-dir>/NAME.key, or the key of another share here that ships
    /// to the same repository].
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Target size of pack objects in a new repository, 4M to 256M (fewer,
    /// larger objects mean fewer requests; an existing repository keeps its size).
    #[arg(long, default_value = "16M", value_parser = parse_pack_size, value_name = "SIZE")]
    pack_size: u64,
    /// S3 Object Lock for a new repository: every object is written
    /// locked for this long (30d, 90d, ...), and prune extends the lock of
    /// what kept moments still need. The bucket must have Object Lock
    /// enabled (chosen when the bucket is created).
    #[arg(long, value_parser = parse_lock, value_name = "DURATION")]
    object_lock: Option<u64>,
    /// Object Lock mode: compliance (nobody can shorten or remove a lock,
    /// the account's root user included) or governance (users with
    /// s3:BypassGovernanceRetention can).
    #[arg(long, default_value = "compliance", value_parser = ["compliance", "governance"], requires = "object_lock")]
    object_lock_mode: String,
    /// How often the snapshot timer runs: 1h, 30m, 1d ... (at least 1m).
    #[arg(long, default_value = "1h", value_parser = parse_interval, value_name = "INTERVAL")]
    snapshot_every: u64,
    /// Do not write systemd units.
    #[arg(long)]
    no_systemd: bool,
    /// Where systemd units and the share's drop-in go.
    #[arg(
        long,
        env = "BTRSHIP_SYSTEMD_DIR",
        default_value = "/etc/systemd/system",
        value_name = "DIR"
    )]
    systemd_dir: PathBuf,
    /// Where the btrship package installed the template units.
    #[arg(
        long,
        hide = true,
        env = "BTRSHIP_SYSTEM_UNIT_DIR",
        default_value = btrship::systemd::PACKAGE_UNIT_DIR,
        value_name = "DIR"
    )]
    system_unit_dir: PathBuf,
}

fn parse_interval(s: &str) -> std::result::Result<u64, String> {
    btrship::systemd::parse_interval(s)
        .ok_or_else(|| format!("{s:?} is not an interval like 1h, 30m or 1d (at least 1m)"))
}

fn parse_lock(s: &str) -> std::result::Result<u64, String> {
    match btrship::retention::parse_duration(s) {
        Some(Some(ns)) if ns >= 1_000_000_000 => Ok((ns / 1_000_000_000) as u64),
        _ => Err(format!(
            "{s:?} is not a duration like 30d, 12w or 1y (at least 1s)"
        )),
    }
}

fn parse_pack_size(s: &str) -> std::result::Result<u64, String> {
    let range = btrship_upload::repo::PACK_TARGET_RANGE;
    match layers::parse_bwlimit(s) {
        Some(n) if range.contains(&n) => Ok(n),
        _ => Err(format!(
            "{s:?} is not a pack size from {}M to {}M",
            range.start() >> 20,
            range.end() >> 20
        )),
    }
}

/// The key file `init` uses when none is given: the share's own when it
/// exists, else the one of another share here that ships into the same
/// repository (one repository, one key), else the share's own (new).
fn default_key_for(app: &App, name: &str, repo: &str) -> Result<PathBuf> {
    let own = app.default_key_file(name);
    if own.exists() {
        return Ok(own);
    }
    let Ok(dir) = std::fs::read_dir(&app.config_dir) else {
        return Ok(own);
    };
    let mut others: Vec<ShareConfig> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let file = e.file_name();
            let stem = file.to_str()?.strip_suffix(".toml")?.to_string();
            (stem != name).then_some(stem)
        })
        .filter_map(|stem| app.load_config(&stem).ok())
        .filter(|c| c.repo == repo && c.key_file.exists())
        .collect();
    others.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(others.into_iter().next().map_or(own, |c| c.key_file))
}

pub fn run(app: &App, args: Args) -> Result<u8> {
    let share = Share::open(&args.path)?;
    let name = match args.name {
        Some(n) => n,
        None => share
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| {
                UserError::new(
                    exit::USAGE,
                    "cannot derive a share name from the path; pass --name",
                )
            })?,
    };
    config::validate_name(&name)?;
    let repo = args
        .repo
        .unwrap_or_else(|| app.state_dir.join("repo").display().to_string());
    let key_file = match args.key_file {
        Some(k) => k,
        None => default_key_for(app, &name, &repo)?,
    };
    let cfg = ShareConfig {
        name: name.clone(),
        path: share.path.clone(),
        repo,
        key_file,
        host: Some(host_name()),
        ..ShareConfig::defaults()
    };
    if config::config_path(&app.config_dir, &name).exists() {
        let old = app.load_config(&name)?;
        if old.path != cfg.path || old.repo != cfg.repo || old.key_file != cfg.key_file {
            return Err(UserError::new(
                exit::USAGE,
                format!(
                    "share {name:?} is already set up with another path, repository or key (see {}); choose another --name",
                    config::config_path(&app.config_dir, &name).display()
                ),
            )
            .into());
        }
    }
    let stores = app.stores(None);
    let key_created = !cfg.key_file.exists();
    if key_created && stores.repository_exists(&cfg.repo) {
        return Err(UserError::new(
            exit::KEY,
            format!(
                "repository {} already exists and no share here uses it; pass --key-file with the key it was made with",
                cfg.repo
            ),
        )
        .into());
    }
    if key_created {
        btrship_crypto::write_key_file(&cfg.key_file, &RepoKey::generate())?;
    }
    let key = btrship::open::read_key(&cfg.key_file)?;
    let store = stores.store(&cfg.repo, true, layers::RetryPolicy::default())?;
    let object_lock = match args.object_lock {
        None => None,
        Some(_) if !cfg.repo.starts_with("s3://") => {
            return Err(UserError::new(
                exit::USAGE,
                format!(
                    "--object-lock needs an S3 bucket with Object Lock; {} is not in S3 (Azure immutability policies and GCS object retention are not supported yet): init without --object-lock",
                    store.location()
                ),
            )
            .into());
        }
        Some(seconds) => {
            let enabled =
                cfg.repo.starts_with("s3://") && app.rt.block_on(store.object_lock_enabled())?;
            if !enabled {
                return Err(UserError::new(
                    exit::USAGE,
                    format!(
                        "{} has no Object Lock: it is an S3 feature turned on when the bucket is created (aws s3api create-bucket --object-lock-enabled-for-bucket); use such a bucket, or init without --object-lock",
                        store.location()
                    ),
                )
                .into());
            }
            Some(ObjectLockConfig {
                mode: args.object_lock_mode.to_ascii_uppercase(),
                seconds,
            })
        }
    };
    let (repo, repo_created) = Repository::open_or_create_with(
        store,
        key,
        app.rt.handle().clone(),
        &host_name(),
        args.pack_size,
        object_lock.clone(),
    )
    .with_context(|| format!("repository {}", cfg.repo))?;
    if object_lock.is_some() && repo.config().object_lock.is_none() {
        return Err(UserError::new(
            exit::USAGE,
            format!(
                "repository {} exists without Object Lock: Object Lock is chosen when a repository is created",
                cfg.repo
            ),
        )
        .into());
    }
    PrivateArea::open(&share, &name)?;
    state::State::open(&app.state_path(&name))?;
    cfg.save(&app.config_dir)?;
    println!(
        "share {name}: {} (btrfs subvolume {})",
        cfg.path.display(),
        share.subvol_id
    );
    println!(
        "repository: {} ({})",
        cfg.repo,
        if repo_created { "created" } else { "existing" }
    );
    if let Some(l) = &repo.config().object_lock {
        println!(
            "object lock: every object is written locked ({}) for {} s; prune extends what kept moments need",
            l.mode, l.seconds
        );
    }
    if key_created {
        println!("key file: {} (created; copy it somewhere safe off this machine: without it nothing can be restored)", cfg.key_file.display());
    } else {
        println!("key file: {} (existing)", cfg.key_file.display());
    }
    if args.no_systemd {
        println!("next: btrship snapshot {name}");
        return Ok(exit::OK);
    }
    let units = btrship::systemd::Units {
        exe: std::env::current_exe().context("cannot find the btrship binary")?,
        config_dir: std::path::absolute(&app.config_dir)?,
        state_dir: std::path::absolute(&app.state_dir)?,
    };
    if units.installed_in(&args.system_unit_dir) {
        println!(
            "systemd units: {} (installed with btrship)",
            args.system_unit_dir.display()
        );
        // An earlier init's templates in the systemd dir would win over them.
        for t in btrship::systemd::TEMPLATES {
            let shadow = args.systemd_dir.join(t);
            if shadow != args.system_unit_dir.join(t) && shadow.exists() {
                super::warn(format!(
                    "{} overrides the installed unit; remove it and run systemctl daemon-reload to use the installed one",
                    shadow.display()
                ));
            }
        }
    } else {
        for p in units.write(&args.systemd_dir)? {
            println!("systemd unit: {}", p.display());
        }
    }
    let every = args.snapshot_every;
    let dropin = btrship::systemd::write_timer_dropin(&args.systemd_dir, &name, every)?;
    println!("systemd drop-in: {}", dropin.display());
    println!("next: systemctl daemon-reload && systemctl enable --now btrship@{name}.service btrship-snapshot@{name}.timer btrship-prune@{name}.timer");
    println!(
        "      (the daemon ships every closed file; the snapshot timer takes a snapshot every {every} s; the prune timer applies the retention policy once a day)"
    );
    println!(
        "optional, for Windows Previous Versions: systemctl enable --now btrship-mount@{name}.service and see btrship samba-conf {name}"
    );
    Ok(exit::OK)
}
