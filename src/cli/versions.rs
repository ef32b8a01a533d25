//! `btrship versions NAME PATH`: every shipped version of one path.

use super::{path_bytes, print_json, App, RepoArgs};
use anyhow::Result;
use btrship::exit;
use std::path::PathBuf;

/// List every shipped version of one path: snapshots it changed in,
/// closes, deletes.
#[derive(clap::Args)]
#[command(
    long_about = "List every shipped version of one path inside the share, oldest first: each \
snapshot in which it changed, each close the daemon captured, and its deletion. Each line's \
time can be given to `restore --at` to get that version back.",
    after_help = "Examples:
  btrship versions office Finance/budget.xlsx
  btrship versions office Finance/budget.xlsx --json | jq -r '.versions[-2].time'
  btrship versions office docs/a.txt --repo s3://backups/office --key-file office.key"
)]
pub struct Args {
    /// The share.
    name: String,
    /// Path inside the share.
    path: PathBuf,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    repo: RepoArgs,
}

pub fn run(app: &App, args: Args) -> Result<u8> {
    let Args {
        name,
        path,
        json,
        repo: repo_args,
    } = args;
    let (repo, _) = app.open_repo(&name, &repo_args, false)?;
    let hist = app.history(&repo, &name, &repo_args)?;
    let list = btrship::moment::versions_of(&repo, &hist, &path_bytes(&path))?;
    if json {
        print_json(&serde_json::json!({"version": 1, "path": path, "versions": list}))?;
    } else if list.is_empty() {
        println!("no versions of {} in share {name}", path.display());
    } else {
        for v in &list {
            println!(
                "{}  {:<8} {:>12}  {}",
                v.time,
                v.kind,
                v.size.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                v.source
            );
        }
    }
    Ok(exit::OK)
}
