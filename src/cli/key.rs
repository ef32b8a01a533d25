//! `btrship key ...`: the repository's keys. `ship-key` derives the
//! ship-only key a file server ships with (FORMAT.md §12): it adds history
//! and cannot read any of it; `show` says what a key file holds.

use super::{print_json, App, RepoArgs};
use anyhow::Result;
use btrship::exit::{self, UserError};
use btrship_upload::format::to_cbor;
use btrship_upload::layers;
use btrship_upload::Repository;
use std::path::PathBuf;

/// Manage a repository's keys.
#[derive(clap::Args)]
#[command(
    long_about = "Manage a repository's keys. The master key (written by `btrship init`) can \
read and write everything. A ship-only key, derived from it with `btrship key ship-key`, lets a \
file server chunk, deduplicate, encrypt and ship new snapshots and per-close versions, but not \
decrypt anything in the repository, its own earlier shipments included: ransomware that owns \
the server cannot read the history. Restore, ls, versions, mount, check and prune need the \
master key; keep it off the server.",
    after_help = "Examples:
  btrship key ship-key office --out /root/office.ship.key
  btrship key show /etc/btrship/office.key"
)]
pub struct Args {
    #[command(subcommand)]
    command: KeyCommand,
}

#[derive(clap::Subcommand)]
enum KeyCommand {
    ShipKey(ShipKeyArgs),
    Show(ShowArgs),
}

/// Write the ship-only key of a share's repository (needs the master key).
#[derive(clap::Args)]
#[command(
    long_about = "Write the ship-only key of a share's repository to a new file (mode 0600). \
Install it on the file server as the share's `key_file`; the daemon and `snapshot` then ship with \
it, and keep what they need of their own history (parent trees, the blob index) in the local \
catalogue. Every ship session seals a fresh data key to the master's public key and forgets it \
within the hour. Needs the master key (the share's key_file, or --key-file) and the repository.",
    after_help = "Examples:
  btrship key ship-key office --out /root/office.ship.key
  btrship key ship-key office --repo s3://bucket/office --key-file /safe/office.key --out ship.key"
)]
struct ShipKeyArgs {
    /// The share.
    name: String,
    /// The new key file (never overwritten).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// The key's generation: issue a new one (2, 3, ...) to replace a
    /// ship-only key that leaked; nothing is uploaded again.
    #[arg(long, default_value_t = 1, value_name = "N")]
    generation: u32,
    #[command(flatten)]
    repo: RepoArgs,
    #[arg(long)]
    json: bool,
}

/// Say what a key file holds: master or ship-only, and its key id.
#[derive(clap::Args)]
struct ShowArgs {
    /// The key file.
    file: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct KeyReport {
    file: String,
    kind: &'static str,
    key_id: String,
    /// Ship-only keys: their generation.
    #[serde(skip_serializing_if = "Option::is_none")]
    generation: Option<u32>,
}

pub fn run(app: &App, args: Args) -> Result<u8> {
    match args.command {
        KeyCommand::ShipKey(a) => ship_key(app, a),
        KeyCommand::Show(a) => show(a),
    }
}

fn ship_key(app: &App, args: ShipKeyArgs) -> Result<u8> {
    let (address, key_file, cfg) = app.repo_address(&args.name, &args.repo)?;
    let key = btrship::open::read_key(&key_file)?;
    if !key.is_master() {
        return Err(UserError::new(
            exit::KEY,
            format!(
                "{} is a ship-only key already; `btrship key ship-key` needs the master key (--key-file)",
                key_file.display()
            ),
        )
        .into());
    }
    let store = app
        .stores(cfg.as_ref())
        .store(&address, false, layers::RetryPolicy::default())?;
    let repo = Repository::open_lazy(store, key.clone(), app.rt.handle().clone())?;
    let Some(ship) = key.ship_only(&to_cbor(repo.config()), args.generation) else {
        unreachable!("a master key derives a ship-only key")
    };
    btrship_crypto::write_key_file(&args.out, &ship)?;
    let report = KeyReport {
        file: args.out.display().to_string(),
        kind: "ship-only",
        key_id: key.key_id().to_string(),
        generation: Some(args.generation),
    };
    if args.json {
        print_json(&report)?;
    } else {
        println!(
            "wrote the ship-only key of {address} (key {}, generation {}) to {}",
            report.key_id, args.generation, report.file
        );
        println!(
            "install it on the file server as the share's key_file, and keep the master key {} off that machine",
            key_file.display()
        );
    }
    Ok(exit::OK)
}

fn show(args: ShowArgs) -> Result<u8> {
    let key = btrship::open::read_key(&args.file)?;
    let report = KeyReport {
        file: args.file.display().to_string(),
        kind: if key.is_master() {
            "master"
        } else {
            "ship-only"
        },
        key_id: key.key_id().to_string(),
        generation: key.generation(),
    };
    if args.json {
        print_json(&report)?;
    } else {
        match report.generation {
            Some(g) => println!(
                "{}: {} key {}, generation {g}",
                report.file, report.kind, report.key_id
            ),
            None => println!("{}: {} key {}", report.file, report.kind, report.key_id),
        }
    }
    Ok(exit::OK)
}
