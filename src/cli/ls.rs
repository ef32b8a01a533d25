//! `btrship ls NAME [PATH] --at TIME`: files as they were at a time.

use super::{path_bytes, print_json, App, RepoArgs};
use anyhow::Result;
use btrship::{exit, restore};
use std::path::PathBuf;

/// List files as they were at a time.
#[derive(clap::Args)]
#[command(
    long_about = "List the files under PATH (default: the whole share) as they were at a time: \
the newest snapshot at or before it, with every later close the daemon shipped up to that time \
applied.",
    after_help = "Examples:
  btrship ls office Finance
  btrship ls office --at '2026-11-30 17:00'
  btrship ls office docs --at '3 d ago' --json"
)]
pub struct Args {
    /// The share.
    name: String,
    /// Path inside the share [default: everything].
    path: Option<PathBuf>,
    /// Time: RFC 3339, 'YYYY-MM-DD HH:MM[:SS]' (local), 'now', or 'N[smhdw] ago'.
    #[arg(long, default_value = "now", value_name = "TIME")]
    at: String,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    repo: RepoArgs,
}

pub fn run(app: &App, args: Args) -> Result<u8> {
    let at = app.at(&args.at)?;
    let (repo, _) = app.open_repo(&args.name, &args.repo, false)?;
    let hist = app.history(&repo, &args.name, &args.repo)?;
    let moment = btrship::moment::at(&repo, &hist, at)?;
    if let Some(note) = &moment.forgotten_note {
        super::warn(note.clone());
    }
    let rec = moment.record;
    let mut root = rec.root.clone();
    root.subtree = Some(rec.tree);
    let path = args.path.as_deref().map(path_bytes).unwrap_or_default();
    let entries = restore::list(&repo, &root, &path)?;
    if args.json {
        print_json(
            &serde_json::json!({ "version": 1, "snapshot": rec.snapshot, "time": rec.time, "versions_applied": moment.versions_applied, "entries": entries }),
        )?;
    } else {
        for e in &entries {
            let kind = serde_json::to_value(e.kind)?
                .as_str()
                .unwrap_or("?")
                .to_string();
            println!(
                "{:<8} {} {:>5} {:>5} {:>12} {}  {}",
                kind, e.mode, e.uid, e.gid, e.size, e.mtime, e.path
            );
        }
    }
    Ok(exit::OK)
}
