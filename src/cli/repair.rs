//! `btrship repair NAME`: after the store lost packs or history, upload
//! what local copies still hold and report what is lost for good.

use super::{print_json, App, RepoArgs};
use anyhow::Result;
use btrship::exit::{self, UserError};
use btrship::open::share_host;
use btrship::state;
use btrship_snapshot::{PrivateArea, Share};

/// After the store lost packs: upload their blobs again from local
/// snapshots and staging clones, and report what is lost for good.
#[derive(clap::Args)]
#[command(
    long_about = "Repair a repository whose store lost objects. On the shipping machine, the \
blobs of lost packs are read back from local snapshots and staging clones and uploaded again; \
when the newest history objects are lost, the history continues after the newest intact one and \
the local snapshots whose records are gone are queued to ship again. What exists nowhere any \
more is listed with the paths and times that need it (exit 5).",
    after_help = "Examples:
  btrship check office && echo clean
  btrship repair office
  btrship repair office --json | jq '.report.lost'"
)]
pub struct Args {
    /// The share.
    name: String,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    repo: RepoArgs,
}

pub fn run(app: &App, a: Args) -> Result<u8> {
    let Args {
        name,
        json,
        repo: args,
    } = a;
    let (repo, cfg) = app.open_repo(&name, &args, true)?;
    let mut history_lost: Option<(u64, u64, Vec<String>)> = None;
    let report = match &cfg {
        // On the shipping machine: read lost data back from local copies.
        Some(cfg) if app.state_path(&name).exists() => {
            let _lock = state::lock_share(&app.state_dir, &name)?;
            let share = Share::open(&cfg.path)?;
            let area = PrivateArea::open(&share, &name)?;
            let mut state = state::State::open(&app.state_path(&name))?;
            let report = btrship::repair::repair(
                &repo,
                Some(btrship::repair::Local {
                    state: &mut state,
                    area: &area,
                    share: &cfg.name,
                    host: &share_host(cfg),
                }),
            )?;
            // The store lost the newest history objects: continue the
            // chain after the newest intact one, and ship again every
            // local snapshot whose record is gone.
            let lost =
                btrship::history::resume_after_loss(&repo, &state, &cfg.name, &share_host(cfg))?;
            let mut requeued = Vec::new();
            if let Some((from, to)) = lost {
                for s in state.snapshots()? {
                    let Some(rec) = &s.record else { continue };
                    if s.shipped && !repo.exists(rec)? && area.get(&s.name).is_ok() {
                        state.requeue(
                            &s.name,
                            &format!(
                                "repair: the store lost record {rec}; {} ships again",
                                s.name
                            ),
                        )?;
                        requeued.push(s.name.clone());
                    }
                }
                let msg = format!(
                    "repair: history places {from} to {to} of share {} are lost in the store; the history continues after them; {} local snapshots queued to ship again",
                    cfg.name,
                    requeued.len()
                );
                state.log_event("error", "history_lost", &msg)?;
            }
            history_lost = lost.map(|(from, to)| (from, to, requeued));
            state.log_event(
                if report.lost_blobs == 0 {
                    "info"
                } else {
                    "error"
                },
                "repair",
                &format!(
                    "repair: {} packs missing, {} blobs recovered, {} lost for good",
                    report.missing_packs.len(),
                    report.recovered_blobs,
                    report.lost_blobs
                ),
            )?;
            report
        }
        _ => btrship::repair::repair(&repo, None)?,
    };
    if json {
        print_json(&serde_json::json!({
            "version": 1,
            "ok": report.lost_blobs == 0 && history_lost.is_none(),
            "report": report,
            "history_lost": history_lost.as_ref().map(|(from, to, requeued)| serde_json::json!({
                "from": from, "to": to, "requeued_snapshots": requeued,
            })),
        }))?;
    } else {
        for p in &report.missing_packs {
            println!("missing pack: {p}");
        }
        for s in &report.sources {
            println!("read back from: {s}");
        }
        for l in &report.lost {
            println!(
                "lost: {} {} {:?} ({}; {} blobs) in {}",
                l.time,
                l.kind,
                l.path,
                if l.kind == "file" { "content" } else { "tree" },
                l.lost_blobs,
                l.object
            );
        }
        println!(
            "repaired {}: {} packs missing of {} indexed, {} blobs had no copy, {} uploaded again ({} bytes), {} lost for good",
            repo.location(),
            report.missing_packs.len(),
            report.packs_in_index,
            report.lost_blobs_before,
            report.recovered_blobs,
            report.uploaded_bytes,
            report.lost_blobs
        );
    }
    if let Some((from, to, requeued)) = &history_lost {
        if !json {
            println!(
                "history: places {from} to {to} were lost by the store; the history continues after them; {} local snapshots queued to ship again ({})",
                requeued.len(),
                requeued.join(", ")
            );
        }
        return Err(UserError::new(
            exit::DAMAGED,
            format!(
                "the store lost places {from} to {to} of this share's history; {} local snapshots ship again with the next `btrship snapshot {name}`; versions only in the lost places are gone",
                requeued.len()
            ),
        )
        .into());
    }
    if report.lost_blobs == 0 {
        Ok(exit::OK)
    } else {
        Err(UserError::new(
            exit::DAMAGED,
            format!(
                "{} blobs exist nowhere any more ({} paths in snapshots and versions reference them); the rest is repaired",
                report.lost_blobs,
                report.lost.len()
            ),
        )
        .into())
    }
}
