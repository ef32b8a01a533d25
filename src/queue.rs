//! The snapshot queue (the local spool) of one share: reconcile the state
//! database with the snapshots on disk, take a new read-only snapshot, keep
//! the queue within its limit, ship every snapshot not shipped yet (oldest
//! first, each against the last shipped one), then delete local snapshots
//! beyond the number to keep.
//!
//! Taking a snapshot never needs the store: when the store is away the
//! snapshot waits in the queue, and the next run ships the whole backlog.
//! A snapshot is queued (a state transaction) right after it is taken and
//! marked shipped only after its record is durable in the store, so a crash
//! at any point leaves it queued.
//!
//! The spool limit (`max_queued_snapshots`): when snapshots are still
//! queued beyond it after a ship attempt, the newest queued snapshot before
//! the latest is deleted and its changes are carried by the latest one
//! (coalesced). The latest state and the oldest queued points in time are
//! kept; the dropped point in time is logged as a warning, counted in
//! `status`, and reported by the command that took the latest snapshot.

use crate::config::ShareConfig;
use crate::progress::Progress;
use crate::ship::{self, ShipReport};
use crate::state::State;
use anyhow::Result;
use btrship_snapshot::{PrivateArea, Share};
use btrship_upload::layers::Counters;
use btrship_upload::Repository;

fn precise(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// Reconciles the queue with the disk, takes a snapshot and queues it.
/// Touches no store. Returns the new snapshot's name.
pub fn take(state: &mut State, share: &Share, area: &PrivateArea) -> Result<String> {
    // A crash may sit between taking a snapshot and queueing it, or between
    // dropping one from the queue and deleting it.
    let on_disk = area.list_snapshots()?;
    let known = state.snapshots()?;
    for s in &on_disk {
        if !known.iter().any(|k| k.name == s.name) {
            state.add_taken(&s.name, &precise(s.time))?;
        }
    }
    for k in known.iter().filter(|k| !k.shipped) {
        if !on_disk.iter().any(|s| s.name == k.name) {
            let msg = format!(
                "snapshot {} vanished before it was shipped: its point in time is lost \
                 (later snapshots carry its changes)",
                k.name
            );
            tracing::error!(snapshot = %k.name, error_kind = "vanished", "{msg}");
            state.forget(&k.name, "error", "vanished", &msg)?;
        }
    }

    // The snapshot's moment, to the nanosecond (its name has whole
    // seconds): taken just before the ioctl, so every change after it is
    // either in the snapshot or captured by the daemon later than it.
    let moment = chrono::Utc::now();
    let new = area.create_snapshot(share)?;
    state.add_taken(&new.name, &precise(moment))?;
    Ok(new.name)
}

/// Keeps the queue within `max_queued_snapshots` (call it after a ship
/// attempt): while it is longer, the newest queued snapshot before the
/// latest one is dropped from the queue (logged, in one transaction) and
/// deleted. Returns the names dropped.
pub fn enforce_spool_limit(
    state: &mut State,
    area: &PrivateArea,
    cfg: &ShareConfig,
) -> Result<Vec<String>> {
    let limit = cfg.max_queued_snapshots.max(1);
    let mut coalesced = Vec::new();
    let mut queued = state.queued()?;
    while queued.len() > limit {
        let victim = queued.remove(queued.len() - 2);
        let latest = &queued[queued.len() - 1].name;
        let msg = format!(
            "spool full ({limit} snapshots queued, the store has not taken them): \
             snapshot {} coalesced into {latest}; its point in time is not kept",
            victim.name
        );
        tracing::info!("{msg}");
        state.forget(&victim.name, "warn", "coalesced", &msg)?;
        area.delete_snapshot(&victim.name)?;
        coalesced.push(victim.name);
    }
    Ok(coalesced)
}

/// Ships every queued snapshot, oldest first, and stops at the first
/// failure: that snapshot and every later one stay queued. Each ship's
/// store traffic (from `counters`) goes into its report and the event log.
#[allow(clippy::too_many_arguments)]
pub fn ship_queued(
    repo: &Repository,
    state: &mut State,
    area: &PrivateArea,
    cfg: &ShareConfig,
    host: &str,
    counters: &Counters,
    show_progress: crate::progress::Show,
    mut on_shipped: impl FnMut(&ShipReport),
) -> Result<Vec<ShipReport>> {
    let mut reports = Vec::new();
    // Packs the store lost: the first ship re-reads what referenced them.
    let mut heal = crate::repair::prepare_ship(repo, state)?;
    let known_missing = repo.missing_packs().len();
    for pending in state.queued()? {
        let info = area.get(&pending.name)?;
        let parent = state.last_shipped()?.and_then(|s| {
            let tree = <[u8; 32]>::try_from(s.tree?.as_slice()).ok()?;
            Some(ship::Parent {
                path: area.get(&s.name).ok().map(|i| i.path),
                name: s.name,
                tree: btrship_crypto::ContentId(tree),
            })
        });
        let mut progress = Progress::new("shipping", show_progress);
        let input = ship::ShipInput {
            share: &cfg.name,
            host,
            snapshot_name: &info.name,
            time: chrono::DateTime::parse_from_rfc3339(&pending.taken_at)
                .map(|t| t.with_timezone(&chrono::Utc))
                .unwrap_or(info.time),
            root: &info.path,
            parent,
        };
        let before = counters.values();
        let (mut report, tree) =
            ship_retrying(repo, state, &input, &mut progress, heal.as_deref())?;
        report.store = counters.values().since(&before);
        let message = format!(
            "shipped {}: {} files, {} new bytes; store: {}",
            info.name, report.files, report.new_bytes, report.store
        );
        tracing::info!(snapshot = %info.name, object = %report.record, "{message}");
        state.mark_shipped(
            &info.name,
            &report.record,
            tree.as_bytes(),
            &serde_json::to_string(&report)?,
            &message,
        )?;
        if heal.take().is_some() || repo.missing_packs().len() > known_missing {
            crate::repair::settle(repo, state)?;
        }
        on_shipped(&report);
        reports.push(report);
    }
    Ok(reports)
}

/// Is the record `name` a moment retention forgot (per this machine's
/// catalogue)?
fn forgotten(repo: &Repository, name: &str) -> bool {
    repo.object_cache()
        .and_then(|c| c.as_any().downcast::<crate::catalog::Catalog>().ok())
        .is_some_and(|c| c.is_forgotten(name).unwrap_or(false))
}

/// Ships one snapshot; when a prune marked data the ship used (FORMAT.md
/// §5c, the writers' rule) it is shipped again, a few times at most (each
/// attempt avoids every pack marked before it started).
fn ship_retrying(
    repo: &Repository,
    state: &State,
    input: &ship::ShipInput<'_>,
    progress: &mut Progress,
    heal: Option<&str>,
) -> Result<(ship::ShipReport, btrship_crypto::ContentId)> {
    let mut attempt = 1;
    loop {
        match ship::ship_with(repo, state, input, progress, heal) {
            Err(e)
                if attempt < 4
                    && e.downcast_ref::<crate::history::GarbageConflict>()
                        .is_some() =>
            {
                tracing::info!("{e:#}; shipping {} again", input.snapshot_name);
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Keeps the newest `keep_local_snapshots` shipped snapshots on disk (the
/// newest is the parent of the next ship); deletes older shipped ones, but
/// only those whose record the store still holds (one HEAD each): a local
/// snapshot is never deleted while it may be the last copy of its point in
/// time (a store that lost or withheld its record). Queued snapshots are
/// never deleted here.
pub fn prune_local(
    state: &State,
    area: &PrivateArea,
    cfg: &ShareConfig,
    repo: &Repository,
) -> Result<()> {
    let on_disk = area.list_snapshots()?;
    // Only snapshots still on disk can be deleted: one HEAD each, not one
    // per snapshot ever shipped (that grew with the history).
    let shipped: Vec<_> = state
        .snapshots()?
        .into_iter()
        .filter(|s| s.shipped && on_disk.iter().any(|d| d.name == s.name))
        .filter(|s| match &s.record {
            Some(r) => match repo.exists(r) {
                Ok(true) => true,
                // Retention forgot it (FORMAT.md §5c): not a loss.
                Ok(false) if forgotten(repo, r) => true,
                Ok(false) => {
                    tracing::info!(
                        "keeping local snapshot {}: its record {r} is missing from the store",
                        s.name
                    );
                    false
                }
                Err(_) => false,
            },
            None => false,
        })
        .map(|s| s.name)
        .collect();
    let keep = cfg.keep_local_snapshots.max(1);
    let shipped_on_disk: Vec<_> = on_disk
        .iter()
        .filter(|s| shipped.contains(&s.name))
        .collect();
    for old in shipped_on_disk
        .iter()
        .take(shipped_on_disk.len().saturating_sub(keep))
    {
        area.delete_snapshot(&old.name)?;
    }
    Ok(())
}
