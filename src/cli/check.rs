//! `btrship check NAME`: verify the repository.

use super::{print_json, App, RepoArgs};
use anyhow::Result;
use btrship::exit::{self, UserError};
use btrship::open::share_host;
use btrship::{check, state};

/// Verify the repository: every object authenticates, nothing referenced
/// is missing.
#[derive(clap::Args)]
#[command(
    long_about = "Verify the repository: every index, history object, tree and version batch \
authenticates under the key, the history chains are whole, nothing referenced is missing, and on \
the shipping machine the store still holds everything this machine shipped (no rollback, nothing \
withheld). With --read-data every pack is read and every blob verified. Problems are listed one \
per line (exit 5); lost packs are remembered so the next ship uploads their blobs again.",
    after_help = "Examples:
  btrship check office
  btrship check office --read-data --json
  btrship check office --repo s3://backups/office --key-file office.key"
)]
pub struct Args {
    /// The share.
    name: String,
    /// Also read and verify every byte of every pack.
    #[arg(long)]
    read_data: bool,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    repo: RepoArgs,
}

pub fn run(app: &App, a: Args) -> Result<u8> {
    let Args {
        name,
        read_data,
        json,
        repo: args,
    } = a;
    let _span = tracing::info_span!("check", share = %name).entered();
    let (repo, cfg) = app.open_repo(&name, &args, true)?;
    // What this machine shipped into this repository (rollback and
    // withholding detection).
    let local = match app.local_view(&name, &args)? {
        Some((cfg, st)) => Some(check::LocalHistory {
            share: name.to_string(),
            host: share_host(&cfg),
            shipped_records: st
                .snapshots()?
                .into_iter()
                .filter_map(|s| s.record)
                .collect(),
            head: st.history_head()?,
        }),
        None => None,
    };
    let mut progress = btrship::progress::Progress::new("checking packs", app.show_progress(json));
    let report = check::check(&repo, read_data, local.as_ref(), &mut progress);
    // Remember lost packs: the next ship uploads their blobs again.
    if let Some(cfg) = cfg.as_ref().filter(|_| app.state_path(&name).exists()) {
        let mut st = state::State::open(&app.state_path(&name))?;
        if !report.missing_packs.is_empty() {
            st.add_missing_packs(&report.missing_packs)?;
        }
        if report.problems.is_empty() {
            let what = if read_data {
                "check --read-data"
            } else {
                "check"
            };
            st.log_event("info", "checked", &format!("{what}: no problems"))?;
        }
        app.write_metrics(cfg);
    }
    if json {
        print_json(
            &serde_json::json!({ "version": 1, "ok": report.problems.is_empty(), "report": report }),
        )?;
    } else {
        for w in &report.warnings {
            println!("warning: {w}");
        }
        for p in &report.problems {
            println!("problem: {p}");
        }
        println!(
            "checked {}: {} snapshots, {} version batches ({} versions), {} trees, {} packs ({} read), {} data blobs referenced: {} problems, {} warnings",
            repo.location(),
            report.snapshots,
            report.version_batches,
            report.version_entries,
            report.trees,
            report.packs,
            report.packs_read,
            report.blobs_referenced,
            report.problems.len(),
            report.warnings.len()
        );
    }
    if report.problems.is_empty() {
        Ok(exit::OK)
    } else {
        Err(UserError::new(
            exit::DAMAGED,
            format!(
                "repository {} is damaged: {} problems; first: {}",
                repo.location(),
                report.problems.len(),
                report.problems[0]
            ),
        )
        .into())
    }
}
