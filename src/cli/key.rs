//! `btrship key ...`: the repository's keys. `ship-key` derives the
//! ship-only key a file server ships with (FORMAT.md §12): it adds history
//! and cannot read any of it; `show` says what a key file holds; `passwd`
//! protects a key file with a passphrase; `add`, `list`, `remove` and
//! `recover` manage key slots in the repository: passphrases that each
//! open the master key (FORMAT.md §3a).

use super::{print_json, App, RepoArgs};
use anyhow::Result;
use btrship::exit::{self, UserError};
use btrship_crypto::RepoKey;
use btrship_upload::format::{from_cbor, to_cbor, KeySlot, KEY_SLOT_PREFIX};
use btrship_upload::layers;
use btrship_upload::{Repository, Store};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
  btrship key show /etc/btrship/office.key
  btrship key passwd /root/office.key
  btrship key add office --label 'safe in the office'
  btrship key recover --repo s3://bucket/office --out /root/office.key"
)]
pub struct Args {
    #[command(subcommand)]
    command: KeyCommand,
}

#[derive(clap::Subcommand)]
enum KeyCommand {
    ShipKey(ShipKeyArgs),
    Show(ShowArgs),
    Passwd(PasswdArgs),
    Add(AddArgs),
    List(ListArgs),
    Remove(RemoveArgs),
    Recover(RecoverArgs),
}

/// Protect a master key file with a passphrase, change it, or remove it.
#[derive(clap::Args)]
#[command(
    long_about = "Protect a master key file with a passphrase (Argon2id, 64 MiB), change its \
passphrase, or (--remove) store it in the clear again. The file is replaced atomically. Commands \
that read a protected key file ask for its passphrase on the terminal, or take it from \
BTRSHIP_PASSPHRASE_FILE or BTRSHIP_PASSPHRASE; the new passphrase comes from the terminal \
(twice) or BTRSHIP_NEW_PASSPHRASE_FILE / BTRSHIP_NEW_PASSPHRASE. Ship-only keys are not \
protected this way: the daemon must start unattended."
)]
struct PasswdArgs {
    /// The key file.
    file: PathBuf,
    /// Store the key in the clear again (mode 0600).
    #[arg(long)]
    remove: bool,
}

/// Add a key slot: a passphrase that opens the repository's master key.
#[derive(clap::Args)]
#[command(
    long_about = "Add a key slot to the repository: the master key wrapped under a new \
passphrase (Argon2id). With only the repository address and that passphrase, `btrship key \
recover` writes the master key file again on any machine. The store can try passphrases \
offline against a slot: choose a long one. Needs the master key."
)]
struct AddArgs {
    /// The share.
    name: String,
    /// A note shown by `key list` (who holds this passphrase).
    #[arg(long, default_value = "")]
    label: String,
    #[command(flatten)]
    repo: RepoArgs,
    #[arg(long)]
    json: bool,
}

/// List the repository's key slots.
#[derive(clap::Args)]
struct ListArgs {
    /// The share.
    name: String,
    #[command(flatten)]
    repo: RepoArgs,
    #[arg(long)]
    json: bool,
}

/// Remove a key slot (needs the master key).
#[derive(clap::Args)]
struct RemoveArgs {
    /// The share.
    name: String,
    /// The slot's id, as `key list` shows it.
    slot: String,
    #[command(flatten)]
    repo: RepoArgs,
}

/// Write the master key file from a key slot's passphrase.
#[derive(clap::Args)]
#[command(
    long_about = "Write the master key to a new key file (mode 0600) from the passphrase of \
one of the repository's key slots: on a fresh machine, with only the repository address and \
the passphrase. The key is checked against the repository's config before it is written.",
    after_help = "Examples:
  btrship key recover --repo s3://bucket/office --out /root/office.key
  BTRSHIP_PASSPHRASE_FILE=/run/pass btrship key recover --repo /mnt/usb/office --out office.key"
)]
struct RecoverArgs {
    /// Repository address (/dir, file:///dir, s3://bucket/prefix, azure://container/prefix or gs://bucket/prefix).
    #[arg(long, value_name = "URL")]
    repo: String,
    /// The new key file (never overwritten).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct SlotRow {
    slot: String,
    label: String,
    created: String,
    host: String,
    key_id: String,
    /// Why the slot cannot be read, when it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<String>,
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
        KeyCommand::Passwd(a) => passwd(a),
        KeyCommand::Add(a) => add(app, a),
        KeyCommand::List(a) => list(app, a),
        KeyCommand::Remove(a) => remove(app, a),
        KeyCommand::Recover(a) => recover(app, a),
    }
}

fn passwd(args: PasswdArgs) -> Result<u8> {
    let key = btrship::open::read_key(&args.file)?;
    if !key.is_master() {
        return Err(UserError::new(
            exit::KEY,
            format!(
                "{} is a ship-only key; only the master key is protected by a passphrase (the daemon must start unattended)",
                args.file.display()
            ),
        )
        .into());
    }
    if args.remove {
        btrship_crypto::replace_key_file(&args.file, &key, None)?;
        println!("{}: stored in the clear (mode 0600)", args.file.display());
        return Ok(exit::OK);
    }
    let pass = btrship::open::new_passphrase("New passphrase: ")?;
    btrship_crypto::replace_key_file(
        &args.file,
        &key,
        Some((pass.as_bytes(), btrship_crypto::KdfParams::default())),
    )?;
    println!("{}: protected by the new passphrase", args.file.display());
    Ok(exit::OK)
}

/// The store of share `name`'s repository (or `--repo`'s) and its key file.
fn store_of(app: &App, name: &str, repo: &RepoArgs) -> Result<(Arc<dyn Store>, PathBuf, String)> {
    let (address, key_file, cfg) = app.repo_address(name, repo)?;
    let store = app
        .stores(cfg.as_ref())
        .store(&address, false, layers::RetryPolicy::default())?;
    Ok((store, key_file, address))
}

/// A master key that opens this repository's config.
fn master_for(app: &App, store: &Arc<dyn Store>, key_file: &Path) -> Result<Arc<RepoKey>> {
    let key = super::require_master(key_file, "changes the repository's keys")?;
    Repository::open_lazy(store.clone(), key.clone(), app.rt.handle().clone())?;
    Ok(key)
}

fn add(app: &App, args: AddArgs) -> Result<u8> {
    let (store, key_file, address) = store_of(app, &args.name, &args.repo)?;
    let key = master_for(app, &store, &key_file)?;
    let pass = btrship::open::new_passphrase("Passphrase for the new key slot: ")?;
    let id = hex::encode(&RepoKey::random_id().0[..8]);
    let name = format!("{KEY_SLOT_PREFIX}{id}");
    let w = key.wrap(
        pass.as_bytes(),
        name.as_bytes(),
        btrship_crypto::KdfParams::default(),
    )?;
    let slot = KeySlot {
        version: 1,
        key_id: key.key_id().0.to_vec(),
        kdf: "argon2id".into(),
        m_kib: w.params.m_kib,
        t: w.params.t,
        p: w.params.p,
        salt: w.salt.to_vec(),
        nonce: w.nonce.to_vec(),
        sealed: w.sealed,
        created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        host: btrship::open::host_name(),
        label: args.label.clone(),
    };
    app.rt
        .block_on(store.put_if_absent(&name, bytes::Bytes::from(to_cbor(&slot))))?;
    if args.json {
        print_json(&serde_json::json!({ "slot": id, "label": args.label, "repo": address }))?;
    } else {
        println!("added key slot {id} to {address}: `btrship key recover --repo {address} --out FILE` with its passphrase writes the master key");
    }
    Ok(exit::OK)
}

/// Every key slot in the store: (id, slot or why not).
fn slots(app: &App, store: &Arc<dyn Store>) -> Result<Vec<(String, Result<KeySlot, String>)>> {
    let mut out = Vec::new();
    for meta in app.rt.block_on(store.list(KEY_SLOT_PREFIX))? {
        let id = meta.key.trim_start_matches(KEY_SLOT_PREFIX).to_string();
        let slot = match app.rt.block_on(store.get(&meta.key)) {
            Ok(bytes) => from_cbor::<KeySlot>(&bytes),
            Err(e) => Err(e.to_string()),
        };
        out.push((id, slot));
    }
    Ok(out)
}

fn list(app: &App, args: ListArgs) -> Result<u8> {
    let (store, _, address) = store_of(app, &args.name, &args.repo)?;
    let rows: Vec<SlotRow> = slots(app, &store)?
        .into_iter()
        .map(|(slot, s)| match s {
            Ok(s) => SlotRow {
                slot,
                label: s.label,
                created: s.created,
                host: s.host,
                key_id: hex::encode(&s.key_id),
                problem: None,
            },
            Err(e) => SlotRow {
                slot,
                label: String::new(),
                created: String::new(),
                host: String::new(),
                key_id: String::new(),
                problem: Some(e),
            },
        })
        .collect();
    if args.json {
        print_json(&rows)?;
    } else if rows.is_empty() {
        println!(
            "no key slots in {address} (add one with `btrship key add {}`)",
            args.name
        );
    } else {
        for r in &rows {
            match &r.problem {
                Some(p) => println!("{}  unreadable: {p}", r.slot),
                None => println!(
                    "{}  key {}  added {} on {}  {}",
                    r.slot, r.key_id, r.created, r.host, r.label
                ),
            }
        }
    }
    Ok(exit::OK)
}

fn remove(app: &App, args: RemoveArgs) -> Result<u8> {
    let (store, key_file, address) = store_of(app, &args.name, &args.repo)?;
    master_for(app, &store, &key_file)?;
    let valid = args.slot.len() == 16 && args.slot.bytes().all(|b| b.is_ascii_hexdigit());
    let name = format!("{KEY_SLOT_PREFIX}{}", args.slot);
    if !valid || app.rt.block_on(store.head(&name)).is_err() {
        return Err(UserError::new(
            exit::NOT_FOUND,
            format!(
                "no key slot {} in {address} (see `btrship key list {}`)",
                args.slot, args.name
            ),
        )
        .into());
    }
    app.rt.block_on(store.delete(&name))?;
    println!("removed key slot {} from {address}", args.slot);
    Ok(exit::OK)
}

fn recover(app: &App, args: RecoverArgs) -> Result<u8> {
    let store = app
        .stores(None)
        .store(&args.repo, false, layers::RetryPolicy::default())?;
    let candidates = slots(app, &store)?;
    if candidates.is_empty() {
        return Err(UserError::new(
            exit::NOT_FOUND,
            format!("{} has no key slots: only a key file opens it", args.repo),
        )
        .into());
    }
    let pass = btrship::open::passphrase("Passphrase: ")?;
    let mut foreign = Vec::new();
    for (id, slot) in candidates {
        let Ok(s) = slot else { continue };
        let (Ok(salt), Ok(nonce), Ok(key_id)) = (
            <[u8; 16]>::try_from(s.salt.as_slice()),
            <[u8; 24]>::try_from(s.nonce.as_slice()),
            <[u8; 8]>::try_from(s.key_id.as_slice()),
        ) else {
            continue;
        };
        let w = btrship_crypto::Wrapped {
            params: btrship_crypto::KdfParams {
                m_kib: s.m_kib,
                t: s.t,
                p: s.p,
            },
            salt,
            nonce,
            sealed: s.sealed,
        };
        let name = format!("{KEY_SLOT_PREFIX}{id}");
        let Ok(key) = RepoKey::unwrap(
            &w,
            pass.as_bytes(),
            name.as_bytes(),
            btrship_crypto::KeyId(key_id),
        ) else {
            continue;
        };
        // A slot planted by the store would give another key: the
        // repository's config must open with it.
        let key = Arc::new(key);
        match Repository::open_lazy(store.clone(), key.clone(), app.rt.handle().clone()) {
            Ok(_) => {}
            Err(e) if e.is_wrong_key() => {
                foreign.push(id);
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        btrship_crypto::write_key_file(&args.out, &key)?;
        if args.json {
            print_json(
                &serde_json::json!({ "slot": id, "file": args.out.display().to_string(), "key_id": key.key_id().to_string() }),
            )?;
        } else {
            println!(
                "wrote the master key {} (from key slot {id}) to {}",
                key.key_id(),
                args.out.display()
            );
        }
        return Ok(exit::OK);
    }
    let why = match foreign.is_empty() {
        true => format!("no key slot of {} opens with this passphrase", args.repo),
        false => format!(
            "key slot {} of {} opens with this passphrase, but the key in it does not open the repository (a slot planted in the store?); nothing written",
            foreign.join(", "),
            args.repo
        ),
    };
    Err(UserError::new(exit::KEY, why).into())
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
