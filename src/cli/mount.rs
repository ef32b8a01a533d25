//! `btrship mount NAME [DIR]`: every kept moment as `@GMT-` directories
//! (read-only FUSE, in the foreground), for Samba's Previous Versions.

use super::{App, RepoArgs};
use anyhow::Result;
use btrship::exit::{self, UserError};
use btrship::mount::{self, listing, LocalSnapshots, MomentFs, View};
use btrship::open::share_host;
use btrship::retention::{RetentionPolicy, Windows};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Serve every moment the retention policy keeps as a read-only
/// filesystem of `@GMT-` directories (Windows Previous Versions).
#[derive(clap::Args)]
#[command(
    long_about = "Mount a read-only filesystem at DIR (default /run/btrship/NAME) whose root holds \
one directory per moment the share's retention policy keeps, named @GMT-YYYY.MM.DD-HH.MM.SS \
(UTC), each the whole share as `restore --at` that moment gives it back: contents, owners, modes, \
times, links and extended attributes (NT ACLs, DOS attributes, POSIX ACLs). Every access is \
checked against each file's own stored permissions. Data is read from the repository on demand \
(or from a local snapshot that still holds it); new moments appear within --refresh. Runs in \
the foreground until SIGTERM or Ctrl-C, then unmounts. Point Samba's shadow_copy2 at DIR \
(`btrship samba-conf NAME`) to show the moments in Explorer's Previous Versions tab. Works on a \
fresh machine with --repo and --key-file.",
    after_help = "Examples:
  btrship mount office
  systemctl enable --now btrship-mount@office.service
  btrship mount office /mnt/office-history --repo s3://backups/office --key-file office.key"
)]
pub struct Args {
    /// The share.
    name: String,
    /// Where to mount [default: /run/btrship/NAME].
    dir: Option<PathBuf>,
    /// Most moments listed; when the policy keeps more, the coarser tiers
    /// win (newest, yearly, monthly, weekly, daily, hourly, then all).
    #[arg(long, default_value_t = 500, value_name = "N")]
    max_moments: usize,
    /// Memory for file data read from the repository (K, M, G).
    #[arg(long, default_value = "256M", value_parser = parse_size, value_name = "SIZE")]
    cache: u64,
    /// How often to look for new moments.
    #[arg(long, default_value = "30s", value_parser = super::parse_duration, value_name = "DURATION")]
    refresh: Duration,
    #[command(flatten)]
    repo: RepoArgs,
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    btrship_upload::layers::parse_bwlimit(s)
        .filter(|&n| n >= 1 << 20)
        .ok_or_else(|| format!("{s:?} is not a size of at least 1M like 256M or 1G"))
}

/// Builds the view: the history as it is now, and the labels it gives.
fn view(
    app: &App,
    name: &str,
    args: &RepoArgs,
    repo: &btrship_upload::Repository,
    windows: &Windows,
    max: usize,
    local: Option<&LocalSnapshots>,
) -> Result<View> {
    let hist = app.history(repo, name, args)?;
    let rows = hist.moments()?;
    let (listing, kept) = listing::choose(windows, &rows, max);
    let local = match local {
        Some(l) => l
            .area
            .list_snapshots()
            .map(|v| v.into_iter().map(|s| s.name).collect())
            .unwrap_or_else(|e| {
                tracing::warn!("local snapshots cannot be listed: {e}");
                Default::default()
            }),
        None => Default::default(),
    };
    Ok(View {
        hist: Arc::new(hist),
        listing,
        kept,
        local,
    })
}

pub fn run(app: &App, args: Args) -> Result<u8> {
    let Args {
        name,
        dir,
        max_moments,
        cache,
        refresh,
        repo: repo_args,
    } = args;
    if max_moments == 0 {
        return Err(UserError::new(exit::USAGE, "--max-moments must be at least 1").into());
    }
    let dir = dir.unwrap_or_else(|| PathBuf::from("/run/btrship").join(&name));
    let (repo, cfg) = app.open_repo(&name, &repo_args, false)?;
    let repo = Arc::new(repo);
    let local_cfg = app.local_view(&name, &repo_args)?.map(|(c, _)| c);
    let policy = cfg
        .as_ref()
        .or(local_cfg.as_ref())
        .map(|c| c.retention.clone())
        .unwrap_or_else(RetentionPolicy::default);
    let windows = policy
        .windows()
        .map_err(|e| UserError::new(exit::USAGE, format!("share {name}: {e}")))?;
    // Local snapshots serve data on the shipping machine, for its own host.
    let local = match &local_cfg {
        Some(c) if repo_args.host.as_deref().is_none_or(|h| h == share_host(c)) => {
            match btrship_snapshot::Share::open(&c.path)
                .and_then(|s| btrship_snapshot::PrivateArea::open(&s, &c.name))
            {
                Ok(area) => Some(Arc::new(LocalSnapshots { area })),
                Err(e) => {
                    tracing::warn!("local snapshots not used: {e}");
                    None
                }
            }
        }
        _ => None,
    };
    let first = view(
        app,
        &name,
        &repo_args,
        &repo,
        &windows,
        max_moments,
        local.as_deref(),
    )?;
    mount::prepare_dir(&dir)?;
    for d in mount::untraversable(&dir) {
        super::warn(format!(
            "{} is not searchable by other users (mode o-x): smbd, which lists the moments as the connected user, cannot reach {}",
            d.display(),
            dir.display()
        ));
    }
    let (count, kept, newest) = (
        first.listing.len(),
        first.kept,
        first.listing.last().map(|l| l.label.clone()),
    );
    let fs = MomentFs::new(repo.clone(), first, cache, local.clone());
    let reload = || {
        let v = view(
            app,
            &name,
            &repo_args,
            &repo,
            &windows,
            max_moments,
            local.as_deref(),
        );
        for w in super::take_warnings() {
            tracing::warn!("{w}");
        }
        match v {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!("moments not refreshed: {e:#}");
                None
            }
        }
    };
    let message = format!(
        "mounted share {name} at {}: {count} moments{}{}",
        dir.display(),
        if kept > count {
            format!(" (of {kept} the policy keeps; --max-moments)")
        } else {
            String::new()
        },
        newest.map(|n| format!(", newest {n}")).unwrap_or_default()
    );
    mount::serve(fs, &dir, &name, refresh, &reload, app.rt.handle(), || {
        eprintln!("btrship: {message}");
        tracing::info!("{message}");
        btrship::daemon::sd_notify(&format!("READY=1\nSTATUS={message}"));
    })?;
    Ok(exit::OK)
}
