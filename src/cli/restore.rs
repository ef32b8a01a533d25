//! `btrship restore NAME --at TIME --to DIR`: the share, or paths of it,
//! as it was at a time.

use super::{mib, path_bytes, print_json, App, RepoArgs};
use anyhow::Result;
use btrship::exit::{self, UserError};
use btrship::progress::Progress;
use btrship::restore;
use std::path::PathBuf;

/// Restore the share, or some paths of it, as it was at a time.
#[derive(clap::Args)]
#[command(
    long_about = "Restore the share, or the given paths of it, as it was at a time, into a new \
or empty directory: names, contents, modes, owners, times, hard links, symlinks, xattrs and ACLs. \
The state restored is the newest snapshot at or before TIME with every later close shipped up to \
TIME applied. Works on a fresh machine with --repo and --key-file. Paths whose data the \
repository lost are listed and skipped (exit 9); everything else is restored exactly.",
    after_help = "Examples:
  btrship restore office --at now --to /srv/restore/office
  btrship restore office --at '2 h ago' --path Finance/budget.xlsx --to /tmp/r
  btrship restore office --at 2026-11-30T17:00:00Z --repo s3://backups/office \\
      --key-file office.key --to /mnt/new/office"
)]
pub struct Args {
    /// The share.
    name: String,
    /// RFC 3339, 'YYYY-MM-DD HH:MM[:SS]' (local), 'now', or 'N[smhdw] ago'.
    #[arg(long, value_name = "TIME")]
    at: String,
    /// Path inside the share to restore (repeatable) [default: everything].
    #[arg(long = "path", value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// Target directory: must not exist or be empty.
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
    /// Also restore device nodes and setuid/setgid bits (by default
    /// devices are skipped and those bits cleared; both are listed).
    #[arg(long)]
    special_files: bool,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    repo: RepoArgs,
}

pub fn run(app: &App, args: Args) -> Result<u8> {
    let at = app.at(&args.at)?;
    let before = app.counters.values();
    let (repo, _) = app.open_repo(&args.name, &args.repo, false)?;
    let hist = app.history(&repo, &args.name, &args.repo)?;
    let moment = btrship::moment::at(&repo, &hist, at)?;
    if let Some(note) = &moment.forgotten_note {
        super::warn(note.clone());
    }
    let rec = moment.record;
    let mut progress = Progress::new("restoring", app.show_progress(args.json));
    let paths: Vec<Vec<u8>> = args.paths.iter().map(|p| path_bytes(p)).collect();
    let opts = restore::RestoreOptions {
        special_files: args.special_files,
    };
    let to = &args.to;
    let report = restore::restore(&repo, &rec, &paths, to, opts, &mut progress)?;
    if args.json {
        print_json(
            &serde_json::json!({ "version": 1, "snapshot": rec.snapshot, "time": rec.time, "at": at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true), "versions_applied": moment.versions_applied, "to": to, "restored": report, "store": app.counters.values().since(&before) }),
        )?;
    } else {
        let versions = match moment.versions_applied {
            0 => String::new(),
            n => format!(" + {n} later file versions"),
        };
        println!(
            "restored {} ({}{versions}) to {}: {} files, {} directories, {} in {:.2} s",
            rec.snapshot,
            rec.time,
            to.display(),
            report.files,
            report.dirs,
            mib(report.bytes),
            report.seconds
        );
        restore::print_report_lists(&report);
    }
    if !report.unrestored.is_empty() {
        return Err(UserError::new(
            exit::PARTIAL,
            format!(
                "restore to {} is incomplete: {} paths could not be restored, the repository data they need is damaged or missing (listed in the output; btrship check names every bad object); everything else is restored",
                to.display(),
                report.unrestored.len()
            ),
        )
        .into());
    }
    Ok(exit::OK)
}
