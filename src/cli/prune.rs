//! `btrship prune NAME`: apply the share's retention policy, collect the
//! repository's garbage, and shrink this machine's local state.

use super::{mib, print_json, App};
use anyhow::Result;
use btrship::exit::{self, UserError};
use btrship::open::share_host;
use btrship::prune::{self, Options, PruneReport, Target};
use btrship::state;
use std::time::Duration;

/// Forget what the retention policy no longer keeps and delete what no
/// kept moment needs.
#[derive(clap::Args)]
#[command(
    long_about = "Apply the share's retention policy ([retention] in its config) to its history, \
then collect garbage for the whole repository: a pack is deleted only when no kept moment of any \
share or host references it, in two phases (marked by one run, deleted by a later run once the \
mark is older than --grace). Takes no lock: the daemon and snapshots go on shipping meanwhile. \
Refuses when the local clock is more than 5 minutes off the store's, or when any history in the \
repository is damaged (run btrship check). Also deletes local snapshots whose moments were \
forgotten and shrinks the state database. The timer btrship-prune@NAME runs this daily.",
    after_help = "Examples:
  btrship prune office --dry-run
  btrship prune office
  btrship prune office --json | jq '.packs_deleted'"
)]
pub struct Args {
    /// The share whose policy is applied.
    name: String,
    /// Change nothing; list every moment with whether it would be kept and why.
    #[arg(long)]
    dry_run: bool,
    /// One JSON object on stdout (the report).
    #[arg(long)]
    json: bool,
    /// How old an unused pack must be before it is marked, and a mark
    /// before its pack is deleted (at least 60 s), e.g. 24h, 30m, 0s.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_grace)]
    grace: Duration,
    /// Repack a used pack when more than this share of it is unused, in
    /// percent (its used blobs move into new packs; the old pack goes).
    #[arg(long, value_name = "PERCENT", default_value_t = 20, value_parser = clap::value_parser!(u8).range(1..=100))]
    repack_unused: u8,
    /// Bytes of blobs repacked per run at most, e.g. 1G, 500M; 0: none.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    max_repack: u64,
    /// Prune the share's history shipped under this host name [default:
    /// the share config's host].
    #[arg(long)]
    host: Option<String>,
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    btrship_upload::layers::parse_bwlimit(s)
        .ok_or_else(|| format!("{s:?} is not a size like 1G, 500M or 0"))
}

fn parse_grace(s: &str) -> std::result::Result<Duration, String> {
    match btrship::retention::parse_duration(s) {
        Some(Some(ns)) if ns >= 0 => Ok(Duration::from_nanos(ns as u64)),
        _ => Err(format!("{s:?} is not a duration like 24h, 30m or 0s")),
    }
}

pub fn run(app: &App, a: Args) -> Result<u8> {
    let Args {
        name,
        dry_run,
        json,
        grace,
        repack_unused,
        max_repack,
        host,
    } = a;
    let _span = tracing::info_span!("prune", share = %name).entered();
    let cfg = app.load_config(&name)?;
    let windows = cfg
        .retention
        .windows()
        .map_err(|m| UserError::new(exit::USAGE, m))?;
    let own_host = share_host(&cfg);
    let host = host.unwrap_or_else(|| own_host.clone());
    let local = host == own_host && app.state_path(&name).exists();
    // One prune per share on this machine at a time.
    let _lock = prune_lock(app, &name)?;
    let own_head = if local {
        state::State::open(&app.state_path(&name))?
            .history_head()?
            .filter(|h| h.host == host)
            .map_or(0, |h| h.seq)
    } else {
        0
    };
    let key = super::require_master(&cfg.key_file, "reads the history and signs what it writes")?;
    let stores = app.stores(Some(&cfg));
    let repo = stores.open_repository_with(
        &cfg.repo,
        key,
        &app.state_dir,
        (own_head > 0).then_some((name.as_str(), host.as_str(), own_head)),
    )?;
    let target = Target {
        share: &name,
        host: &host,
        windows: &windows,
        own_head,
    };
    let opts = Options {
        dry_run,
        grace,
        repack_unused: f64::from(repack_unused) / 100.0,
        max_repack,
    };
    let mut report = prune::prune(&repo, &target, &opts)?;
    if local && !dry_run {
        report.local =
            btrship::prune::clean_local(app.state_path(&name).as_path(), &cfg, &host, &repo)?;
        let st = state::State::open(&app.state_path(&name))?;
        st.log_event("info", "pruned", &summary(&report))?;
        app.write_metrics(&cfg);
    }
    if json {
        print_json(&report)?;
    } else {
        print_text(&report);
    }
    for w in &report.warnings {
        super::warn(w.clone());
    }
    Ok(exit::OK)
}

/// `<state dir>/NAME.prune.lock`, held for the run.
fn prune_lock(app: &App, name: &str) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = app.state_dir.join(format!("{name}.prune.lock"));
    std::fs::create_dir_all(&app.state_dir)?;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)?;
    if f.try_lock().is_err() {
        return Err(UserError::new(
            exit::FAILURE,
            format!("another btrship prune {name} is running on this machine; wait for it"),
        )
        .into());
    }
    Ok(f)
}

fn summary(r: &PruneReport) -> String {
    format!(
        "pruned: {} moments kept, {} forgotten; {} packs deleted ({}), {} marked, {} recovered; {} indexes and {} history objects deleted",
        r.moments_kept,
        r.moments_forgotten,
        r.packs_deleted,
        mib(r.bytes_deleted),
        r.packs_marked,
        r.packs_recovered,
        r.indexes_deleted,
        r.history_objects_deleted
    )
}

fn print_text(r: &PruneReport) {
    if r.dry_run {
        for v in &r.verdicts {
            if v.keep {
                println!(
                    "keep   {:>6} {:<9} {}  ({})",
                    v.place,
                    v.kind,
                    v.time,
                    v.reasons.join(", ")
                );
            } else {
                println!("forget {:>6} {:<9} {}", v.place, v.kind, v.time);
            }
        }
        println!(
            "dry run, nothing changed: share {} on host {}: {} moments, {} would be kept, {} forgotten; {} packs would be marked, {} deleted ({}), {} recovered",
            r.share,
            r.host,
            r.moments,
            r.moments_kept,
            r.moments_forgotten,
            r.packs_marked,
            r.packs_deleted,
            mib(r.bytes_deleted),
            r.packs_recovered
        );
        return;
    }
    println!(
        "pruned share {} on host {}: {} moments, {} kept, {} forgotten",
        r.share, r.host, r.moments, r.moments_kept, r.moments_forgotten
    );
    println!(
        "  packs: {} deleted ({}), {} marked now, {} repacked ({} moved), {} recovered, {} waiting for the grace period ({}); {} indexes and {} history objects deleted",
        r.packs_deleted,
        mib(r.bytes_deleted),
        r.packs_marked,
        r.packs_repacked,
        mib(r.bytes_repacked),
        r.packs_recovered,
        r.packs_waiting,
        mib(r.bytes_waiting),
        r.indexes_deleted,
        r.history_objects_deleted
    );
    if r.objects_locked > 0 || r.locks_extended > 0 {
        println!(
            "  object lock: {} objects ({}) stay until their lock ends (a later prune deletes them), {} locks extended",
            r.objects_locked,
            mib(r.bytes_locked),
            r.locks_extended
        );
    }
    println!(
        "  local: {} snapshots deleted, {} captures and {} events removed",
        r.local.snapshots_deleted.len(),
        r.local.captures_deleted,
        r.local.events_deleted
    );
}
