//! `btrship status NAME`: is the share protected right now? Text or the
//! typed report (`btrship::status::StatusReport`) as JSON; exit 10 when
//! unhealthy.

use super::{print_json, App};
use anyhow::Result;
use btrship::exit::{self, UserError};
use btrship::state;
use btrship::status::{DaemonState, StatusReport};

/// Show whether the share is protected: the daemon, the snapshot queue,
/// the last ship, the last error and whether the store answers.
#[derive(clap::Args)]
#[command(
    long_about = "Show whether the share is protected right now: the daemon (running, stalled, \
dead or failed), the snapshots waiting to ship, the last snapshot and ship, the current error, \
and whether the store answers one request now. `health` is ok or backlog when all is well; \
daemon_failed, daemon_dead, daemon_stalled, spool_full, store_unreachable and store_failing are \
unhealthy and make the command exit 10, so a monitoring script needs only the exit code.",
    after_help = "Examples:
  btrship status office
  btrship status office --json | jq -r .health
  btrship status office >/dev/null || echo 'office is not protected'"
)]
pub struct Args {
    /// The share.
    name: String,
    /// The report as JSON (its fields: see btrship(1) and README).
    #[arg(long)]
    json: bool,
}

pub fn run(app: &App, args: Args) -> Result<u8> {
    let cfg = app.load_config(&args.name)?;
    let state = state::State::open(&app.state_path(&args.name))?;
    let probe = app
        .stores(Some(&cfg))
        .probe(&cfg.repo)
        .map_err(|e| format!("{e:#}"));
    // BTRSHIP_STALLED_AFTER (a duration): tests and impatient monitors.
    let stalled_after = std::env::var("BTRSHIP_STALLED_AFTER")
        .ok()
        .and_then(|v| super::parse_duration(&v).ok())
        .unwrap_or(btrship::status::STALLED_AFTER);
    let report = btrship::status::report(&cfg, &state, &app.state_dir, probe, stalled_after)?;
    if args.json {
        print_json(&report)?;
    } else {
        render(&report);
    }
    if report.healthy {
        return Ok(exit::OK);
    }
    let health = serde_json::to_value(report.health).unwrap_or_default();
    Err(UserError::new(
        exit::UNHEALTHY,
        format!(
            "share {} is not protected ({}): {}",
            report.share,
            health.as_str().unwrap_or("?"),
            report.problems.first().map_or("", String::as_str)
        ),
    )
    .into())
}

fn render(r: &StatusReport) {
    println!(
        "share {}: {} -> {}",
        r.share,
        r.path.display(),
        r.repository
    );
    let health = serde_json::to_value(r.health).unwrap_or_default();
    println!("health: {}", health.as_str().unwrap_or("?"));
    for p in &r.problems {
        println!("  problem: {p}");
    }
    let q = &r.queue;
    match &q.oldest_taken_at {
        None => println!("queue: empty"),
        Some(t) => println!(
            "queue: {} snapshots waiting (limit {}), oldest taken {t} ({} s ago)",
            q.snapshots,
            q.limit,
            q.oldest_age_seconds.unwrap_or(0)
        ),
    }
    let d = &r.daemon;
    let waiting = match &d.oldest_pending {
        None => "every captured change shipped".to_string(),
        Some(t) => format!(
            "{} changes ({} bytes) waiting, oldest captured {t}",
            d.queue_depth, d.bytes_pending
        ),
    };
    match d.state {
        DaemonState::Running => println!("daemon: running, {waiting}"),
        DaemonState::Stalled => println!(
            "daemon: STALLED (no progress for {} s), {waiting}",
            d.heartbeat_age_seconds.unwrap_or(0)
        ),
        DaemonState::Failed => println!("daemon: FAILED, {waiting}"),
        DaemonState::Dead => println!("daemon: NOT running, {waiting}"),
        DaemonState::Stopped => println!("daemon: stopped"),
        DaemonState::Never => println!("daemon: not running (never started for this share)"),
    }
    if let Some(e) = &d.last_versions {
        println!("last versions: {} at {}", e.message, e.time);
    }
    if let Some(s) = &r.last_snapshot {
        println!("last snapshot: {} (taken {})", s.name, s.taken_at);
    }
    match &r.last_shipped {
        Some(s) => println!(
            "last shipped: {} (shipped {})",
            s.name,
            s.shipped_at.as_deref().unwrap_or("-")
        ),
        None => println!("last shipped: none yet"),
    }
    if r.coalesced_total > 0 {
        println!("coalesced snapshots (spool full): {}", r.coalesced_total);
    }
    if let Some(e) = &r.last_error {
        println!(
            "last error{}: {} at {}",
            if e.current { "" } else { " (since resolved)" },
            e.message,
            e.time
        );
    }
    match (&r.store.latency_ms, &r.store.error) {
        (Some(ms), _) => println!("store: reachable ({ms} ms)"),
        (None, e) => println!("store: NOT reachable: {}", e.as_deref().unwrap_or("?")),
    }
}
