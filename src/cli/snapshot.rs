//! `btrship snapshot NAME`: take a read-only snapshot now and ship the
//! queue (this one and any earlier unshipped ones).

use super::{mib, print_json, App};
use anyhow::Result;
use btrship::config::ShareConfig;
use btrship::exit;
use btrship::open::share_host;
use btrship::{queue, ship, state};
use btrship_snapshot::{PrivateArea, Share};

/// Take a read-only snapshot now and ship it (and any earlier unshipped one).
#[derive(clap::Args)]
#[command(
    long_about = "Take a read-only btrfs snapshot of the share now and ship it, with any \
earlier snapshot still queued. The snapshot is taken (and queued locally) before the store is \
contacted: when the store is away it stays queued and ships on the next run, up to \
max_queued_snapshots (then the newest queued ones are coalesced). What changed is found from \
btrfs itself against the previous shipped snapshot. The systemd timer btrship-snapshot@NAME \
runs this.",
    after_help = "Examples:
  btrship snapshot office
  btrship snapshot office --json | jq '.shipped[].files'"
)]
pub struct Args {
    /// The share.
    name: String,
    /// One JSON object on stdout: the snapshot taken, what shipped, what
    /// stays queued, the error if any.
    #[arg(long)]
    json: bool,
}

pub fn run(app: &App, args: Args) -> Result<u8> {
    let Args { name, json } = args;
    let _span = tracing::info_span!("snapshot", share = %name).entered();
    let cfg = app.load_config(&name)?;
    let _lock = state::lock_share(&app.state_dir, &name)?;
    let share = Share::open(&cfg.path)?;
    let area = PrivateArea::open(&share, &name)?;
    let mut state = state::State::open(&app.state_path(&name))?;

    // Taking the snapshot needs no store: it queues locally first.
    let taken = queue::take(&mut state, &share, &area)?;
    let (reports, failure) = match ship_queue(app, &cfg, &mut state, &area, json) {
        Ok(reports) => (reports, None),
        Err((reports, e)) => (reports, Some(e)),
    };
    let coalesced = queue::enforce_spool_limit(&mut state, &area, &cfg)?;
    if !json {
        for c in &coalesced {
            eprintln!(
                "btrship: warning: spool full ({} queued): snapshot {c} coalesced into {taken}",
                cfg.max_queued_snapshots
            );
        }
    }
    let queued = state.queued()?;
    app.write_metrics(&cfg);
    if json {
        print_json(&serde_json::json!({
            "version": 1,
            "snapshot": taken,
            "shipped": reports,
            "queued": queued.iter().map(|s| &s.name).collect::<Vec<_>>(),
            "coalesced": coalesced,
            "error": failure.as_ref().map(|e| format!("{e:#}")),
        }))?;
    }
    match failure {
        None => Ok(exit::OK),
        Some(e) => {
            let oldest = queued.first().map(|s| s.taken_at.as_str()).unwrap_or("-");
            let msg = format!("{e:#}");
            state.log_event("error", "ship_failed", &msg)?;
            Err(e.context(format!(
                "{} snapshots stay queued locally (oldest taken {oldest}, limit {}); \
                 they ship on the next run (btrship status {name})",
                queued.len(),
                cfg.max_queued_snapshots
            )))
        }
    }
}

/// Opens the repository and ships the queue; on failure returns what
/// did ship and the error.
#[allow(clippy::type_complexity)]
fn ship_queue(
    app: &App,
    cfg: &ShareConfig,
    state: &mut state::State,
    area: &PrivateArea,
    json: bool,
) -> std::result::Result<Vec<ship::ShipReport>, (Vec<ship::ShipReport>, anyhow::Error)> {
    let host = share_host(cfg);
    let repo = (|| {
        let head = state
            .history_head()?
            .filter(|h| h.host == host)
            .map_or(0, |h| h.seq);
        app.stores(Some(cfg)).open_repository(
            &cfg.repo,
            &cfg.key_file,
            &app.state_dir,
            Some((&cfg.name, &host, head)),
        )
    })()
    .map_err(|e: anyhow::Error| (Vec::new(), e.context(format!("repository {}", cfg.repo))))?;
    let mut reports = Vec::new();
    let result = queue::ship_queued(
        &repo,
        state,
        area,
        cfg,
        &host,
        &app.counters,
        app.show_progress(json),
        |report| {
            if !json {
                print_ship(report)
            }
            reports.push(report.clone());
        },
    );
    // Local snapshots are pruned only against a reachable store that
    // still holds their records.
    let pruned = queue::prune_local(state, area, cfg, &repo);
    match (result, pruned) {
        (Ok(_), Ok(())) => Ok(reports),
        (Err(e), _) | (Ok(_), Err(e)) => Err((reports, e)),
    }
}

fn print_ship(report: &ship::ShipReport) {
    let how = match &report.change_detection {
        ship::ChangeDetection::Btrfs { changed_inodes, .. } => {
            format!("{changed_inodes} inodes changed since the parent")
        }
        ship::ChangeDetection::FullWalk { reason } => format!("full walk: {reason}"),
    };
    println!(
        "shipped {} ({}; {how}): {} files, {}; read {}, new {}, uploaded {} in {} objects, {:.2} s",
        report.snapshot,
        report.record,
        report.files,
        mib(report.bytes),
        mib(report.read_bytes),
        mib(report.new_bytes),
        mib(report.uploaded_bytes),
        report.objects_written,
        report.seconds
    );
    println!("  store: {}", report.store);
}
