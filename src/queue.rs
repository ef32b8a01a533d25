//! The snapshot queue of one share: reconcile the state database with the
//! snapshots on disk, take a new read-only snapshot, ship every snapshot not
//! shipped yet (oldest first, each against the last shipped one), then
//! delete local snapshots beyond the number to keep.
//!
//! A snapshot is queued (a state transaction) right after it is taken and
//! marked shipped only after its record is durable in the store, so a crash
//! at any point leaves it queued, and the next run ships it.

use crate::config::ShareConfig;
use crate::progress::Progress;
use crate::ship::{self, ShipReport};
use crate::state::State;
use anyhow::Result;
use btrship_snapshot::{PrivateArea, Share};
use btrship_upload::Repository;

#[allow(clippy::too_many_arguments)]
pub fn take_and_ship(
    repo: &Repository,
    state: &mut State,
    share: &Share,
    area: &PrivateArea,
    cfg: &ShareConfig,
    host: &str,
    show_progress: bool,
    mut on_shipped: impl FnMut(&ShipReport),
) -> Result<Vec<ShipReport>> {
    // Reconcile the queue with the snapshots on disk (a crash may sit between the two).
    let on_disk = area.list_snapshots()?;
    let known = state.snapshots()?;
    for s in &on_disk {
        if !known.iter().any(|k| k.name == s.name) {
            state.add_taken(&s.name, &s.time.to_rfc3339())?;
        }
    }
    for k in known.iter().filter(|k| !k.shipped) {
        if !on_disk.iter().any(|s| s.name == k.name) {
            let msg = format!("snapshot {} vanished before it was shipped", k.name);
            tracing::error!("{msg}");
            state.log_event("error", &msg)?;
            state.forget(&k.name)?;
        }
    }

    let new = area.create_snapshot(share)?;
    state.add_taken(&new.name, &new.time.to_rfc3339())?;

    let mut reports = Vec::new();
    for pending in state.snapshots()?.into_iter().filter(|s| !s.shipped) {
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
            time: info.time,
            root: &info.path,
            parent,
        };
        let (report, tree) = match ship::ship(repo, state, &input, &mut progress) {
            Ok(r) => r,
            Err(e) => {
                let _ = state.log_event("error", &format!("shipping {}: {e:#}", info.name));
                return Err(e.context(format!("shipping snapshot {} (it stays queued)", info.name)));
            }
        };
        state.mark_shipped(
            &info.name,
            &report.record,
            tree.as_bytes(),
            &serde_json::to_string(&report)?,
        )?;
        on_shipped(&report);
        reports.push(report);
    }

    // Keep the newest shipped snapshots on disk; delete older ones.
    let shipped: Vec<_> = state
        .snapshots()?
        .into_iter()
        .filter(|s| s.shipped)
        .map(|s| s.name)
        .collect();
    let on_disk = area.list_snapshots()?;
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
    Ok(reports)
}
