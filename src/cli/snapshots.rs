//! `btrship snapshots NAME`: the shipped snapshots of a share.

use super::{mib, print_json, App, RepoArgs};
use anyhow::Result;
use btrship::exit;

/// List the shipped snapshots of a share.
#[derive(clap::Args)]
#[command(
    long_about = "List the snapshots of a share that are in the repository, oldest first, with \
their size and the data each added. Between snapshots, the daemon's per-close versions are also \
restorable (see `btrship versions`).",
    after_help = "Examples:
  btrship snapshots office
  btrship snapshots office --json | jq '.snapshots | length'"
)]
pub struct Args {
    /// The share.
    name: String,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    repo: RepoArgs,
}

pub fn run(app: &App, args: Args) -> Result<u8> {
    let Args {
        name,
        json,
        repo: repo_args,
    } = args;
    let (repo, _) = app.open_repo(&name, &repo_args, false)?;
    let hist = app.history(&repo, &name, &repo_args)?;
    let records = &hist.snapshots()?;
    if json {
        let list: Vec<_> = records
            .iter()
            .map(|(id, r)| {
                serde_json::json!({
                    "record": id, "snapshot": r.snapshot, "time": r.time, "host": r.host,
                    "files": r.stats.files, "dirs": r.stats.dirs, "bytes": r.stats.bytes, "new_bytes": r.stats.new_bytes,
                })
            })
            .collect();
        print_json(
            &serde_json::json!({ "version": 1, "share": name, "host": hist.host, "snapshots": list }),
        )?;
    } else {
        println!(
            "{:<32} {:<26} {:>9} {:>12} {:>12}  record",
            "time", "snapshot", "files", "size", "new"
        );
        for (id, r) in records {
            println!(
                "{:<32} {:<26} {:>9} {:>12} {:>12}  {}",
                r.time,
                r.snapshot,
                r.stats.files,
                mib(r.stats.bytes),
                mib(r.stats.new_bytes),
                id
            );
        }
        println!(
            "{} snapshots of {name} from host {} in {}",
            records.len(),
            hist.host,
            repo.location()
        );
    }
    Ok(exit::OK)
}
