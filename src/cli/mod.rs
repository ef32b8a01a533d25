//! The command line: the definitions (clap derive; the man pages and shell
//! completions are generated from the same ones), and the one place that
//! turns a share name or `--repo/--key-file` into an open repository and
//! its history. Each command is a module: its arguments, the library call,
//! its rendering (text, or `--json` whose shape is the module's report).

mod check;
mod daemon;
mod docs;
mod init;
mod key;
mod ls;
mod mount;
mod prune;
mod repair;
mod restore;
mod samba_conf;
mod snapshot;
mod snapshots;
mod status;
mod sync;
mod versions;

use anyhow::{Context, Result};
use btrship::config::ShareConfig;
use btrship::exit::{self, UserError};
use btrship::open::{share_host, Stores};
use btrship::{config, state, timespec};
use btrship_upload::{layers, Repository};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "btrship",
    version,
    about = "Ship a Samba share on btrfs to object storage, encrypted; restore any path at any time",
    long_about = "btrship captures every closed file of a Samba share on btrfs (a reflink clone \
in a private namespace, instant), takes read-only snapshots on a timer, finds what changed from \
btrfs itself, compresses and encrypts it locally and ships it to object storage (a local \
directory, or S3). `btrship restore --at TIME` brings back the share, a folder or a file as it \
was at any moment, also on a fresh machine with only the repository address and the key.",
    after_help = "Examples:
  btrship init /srv/samba/office --repo s3://backups/office
  systemctl enable --now btrship@office.service btrship-snapshot@office.timer
  btrship status office
  btrship restore office --at '2 h ago' --path Finance/budget.xlsx --to /tmp/r

Exit codes: 0 ok, 1 other failure, 2 usage, 3 not found, 4 key, 5 damaged or gaps,
6 not btrfs, 7 restore target, 8 store unreachable, 9 restore partial,
10 unhealthy (status). See btrship(1)."
)]
pub struct Cli {
    /// Where share configs and key files live.
    #[arg(
        long,
        global = true,
        env = "BTRSHIP_CONFIG_DIR",
        default_value = "/etc/btrship",
        value_name = "DIR"
    )]
    config_dir: PathBuf,
    /// Where state databases, catalogues and the default repository live.
    #[arg(
        long,
        global = true,
        env = "BTRSHIP_STATE_DIR",
        default_value = "/var/lib/btrship",
        value_name = "DIR"
    )]
    state_dir: PathBuf,
    /// Never draw progress bars (they are drawn only on a terminal anyway).
    #[arg(long, global = true)]
    no_progress: bool,
    /// Progress of long commands as JSON lines on stderr, one a second and
    /// one at the end: {"progress": {"label", "files", "bytes",
    /// "total_files", "total_bytes", "seconds", "bytes_per_second",
    /// "eta_seconds", "done"}}. An error is still the last line.
    #[arg(long, global = true)]
    progress_json: bool,
    /// Requests to the store in flight at most [default: the share's
    /// `max_connections`, else 8].
    #[arg(long, global = true, value_name = "N")]
    max_connections: Option<usize>,
    /// Bandwidth limit for store transfers, e.g. 10M (bytes per second; K,
    /// M, G) [default: the share's `bwlimit`, else none].
    #[arg(long, global = true, value_parser = parse_bwlimit, value_name = "RATE")]
    bwlimit: Option<u64>,
    /// Log records: `journald` (structured fields: SHARE, SNAPSHOT,
    /// OBJECT, ERROR_KIND), `json` (one object per line on stderr), `text`
    /// (stderr); `auto` is journald under systemd (JOURNAL_STREAM set),
    /// text otherwise. The level comes from BTRSHIP_LOG (default warn).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto, value_name = "FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Auto,
    Text,
    Json,
    Journald,
}

impl Cli {
    pub fn log_format(&self) -> LogFormat {
        self.log_format
    }
}

#[derive(Subcommand)]
enum Command {
    Init(init::Args),
    Snapshot(snapshot::Args),
    Daemon(daemon::Args),
    Sync(sync::Args),
    Status(status::Args),
    Snapshots(snapshots::Args),
    Ls(ls::Args),
    Versions(versions::Args),
    Mount(mount::Args),
    SambaConf(samba_conf::Args),
    Restore(restore::Args),
    Check(check::Args),
    Repair(repair::Args),
    Prune(prune::Args),
    Key(key::Args),
    Completions(docs::CompletionArgs),
    #[command(hide = true)]
    Manpages(docs::ManArgs),
    #[command(hide = true)]
    Units(docs::UnitArgs),
}

/// Where to read a repository from, when not from the share's config.
#[derive(clap::Args, Clone)]
pub struct RepoArgs {
    /// Repository address (/dir, file:///dir, s3://bucket/prefix, azure://container/prefix or gs://bucket/prefix); with
    /// --key-file, no config or state is needed (a fresh machine).
    #[arg(long, value_name = "URL")]
    repo: Option<String>,
    /// Key file [default: the share's, else <config-dir>/NAME.key].
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Whose history: the host that shipped the share [default: this
    /// machine's own on the shipping machine; on a fresh machine the only
    /// host that shipped it].
    #[arg(long)]
    host: Option<String>,
    /// Go on when the history has gaps or the store is behind this machine
    /// (each problem becomes a warning) instead of refusing with exit 5.
    #[arg(long)]
    allow_gaps: bool,
    /// Read an S3 repository through its bucket's object versions: for
    /// each object, the newest version that authenticates (after an
    /// attacker overwrote objects or hid them behind delete markers).
    /// Lists every version once; needs s3:ListBucketVersions and
    /// s3:GetObjectVersion.
    #[arg(long)]
    recover_versions: bool,
}

/// What every command gets: the directories, the runtime, the store
/// builder and this run's request counters.
pub struct App {
    config_dir: PathBuf,
    state_dir: PathBuf,
    progress: bool,
    progress_json: bool,
    max_connections: Option<usize>,
    bwlimit: Option<u64>,
    counters: Arc<layers::Counters>,
    rt: tokio::runtime::Runtime,
}

/// Parses the command line: `Ok(None)` when clap printed help or the
/// version (exit 0), an error line (exit 2) when the arguments are wrong.
pub fn parse() -> std::result::Result<Cli, (u8, Option<String>)> {
    match Cli::try_parse() {
        Ok(cli) => Ok(cli),
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return Err((exit::OK, None));
            }
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = e.print();
                return Err((exit::USAGE, None));
            }
            // One line, like every other error; the full usage is in --help.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            Err((exit::USAGE, Some(format!("{first} (see btrship --help)"))))
        }
    }
}

/// Runs one command; its exit code, or the error to print as one line.
pub fn run(cli: Cli) -> Result<u8> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let stats = std::env::var_os("BTRSHIP_STATS").is_some_and(|v| v == "1");
    let app = App {
        config_dir: cli.config_dir,
        state_dir: cli.state_dir,
        progress: !cli.no_progress,
        progress_json: cli.progress_json,
        max_connections: cli.max_connections,
        bwlimit: cli.bwlimit,
        counters: Arc::new(layers::Counters::default()),
        rt,
    };
    let result = match cli.command {
        Command::Init(a) => init::run(&app, a),
        Command::Snapshot(a) => snapshot::run(&app, a),
        Command::Daemon(a) => daemon::run(&app, a),
        Command::Sync(a) => sync::run(&app, a),
        Command::Status(a) => status::run(&app, a),
        Command::Snapshots(a) => snapshots::run(&app, a),
        Command::Ls(a) => ls::run(&app, a),
        Command::Versions(a) => versions::run(&app, a),
        Command::Mount(a) => mount::run(&app, a),
        Command::SambaConf(a) => samba_conf::run(&app, a),
        Command::Restore(a) => restore::run(&app, a),
        Command::Check(a) => check::run(&app, a),
        Command::Repair(a) => repair::run(&app, a),
        Command::Prune(a) => prune::run(&app, a),
        Command::Key(a) => key::run(&app, a),
        Command::Completions(a) => docs::completions(a),
        Command::Manpages(a) => docs::manpages(a),
        Command::Units(a) => docs::units(&app, a),
    };
    if stats {
        print_stats(&app.counters.values());
    }
    result
}

/// Warnings of this run: printed after a success, folded into the one error
/// line after a failure (every error is one line on stderr).
pub static WARNINGS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

pub fn warn(message: impl Into<String>) {
    WARNINGS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(message.into().replace('\n', " "));
}

/// The warnings collected so far, emptied (a long-running command logs
/// them as they come).
fn take_warnings() -> Vec<String> {
    std::mem::take(&mut *WARNINGS.lock().unwrap_or_else(|p| p.into_inner()))
}

/// `BTRSHIP_STATS=1`: every request this run sent to the store, as one
/// JSON line on stderr at exit (also after a failure), for benchmarks.
fn print_stats(v: &layers::CounterValues) {
    let mut store = serde_json::to_value(v).unwrap_or_default();
    store["requests"] = v.requests().into();
    eprintln!(
        "{}",
        serde_json::json!({ "btrship_stats": { "store": store } })
    );
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

fn parse_duration(s: &str) -> std::result::Result<std::time::Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n: u64 = t[..split]
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 5m or 1h"))?;
    let unit = match &t[split..] {
        "ms" => return Ok(std::time::Duration::from_millis(n)),
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        _ => return Err(format!("{s:?} is not a duration like 30s, 5m or 1h")),
    };
    Ok(std::time::Duration::from_secs(n.saturating_mul(unit)))
}

fn parse_bwlimit(s: &str) -> std::result::Result<u64, String> {
    layers::parse_bwlimit(s).ok_or_else(|| format!("{s:?} is not a bandwidth like 10M, 500K or 1G"))
}

impl App {
    /// The store builder for a share: the command line's limits win over
    /// the share config's, which win over the defaults.
    fn stores(&self, cfg: Option<&ShareConfig>) -> Stores {
        Stores {
            versions_of: None,
            max_connections: self
                .max_connections
                .or(cfg.and_then(|c| c.max_connections))
                .unwrap_or(config::DEFAULT_MAX_CONNECTIONS)
                .max(1),
            bwlimit: self.bwlimit.or(cfg.and_then(|c| c.bwlimit_bytes())),
            counters: self.counters.clone(),
            rt: self.rt.handle().clone(),
        }
    }

    /// How a long command shows progress: JSON lines when asked, else a
    /// bar unless `--no-progress` or `--json`.
    fn show_progress(&self, json: bool) -> btrship::progress::Show {
        use btrship::progress::Show;
        if self.progress_json {
            Show::Json
        } else if self.progress && !json {
            Show::Terminal
        } else {
            Show::Nothing
        }
    }

    fn default_key_file(&self, name: &str) -> PathBuf {
        self.config_dir.join(format!("{name}.key"))
    }

    fn state_path(&self, name: &str) -> PathBuf {
        self.state_dir.join(format!("{name}.db"))
    }

    fn load_config(&self, name: &str) -> Result<ShareConfig> {
        ShareConfig::load(&self.config_dir, name)
    }

    /// One-shot commands: the share's metrics to `metrics_textfile`, when
    /// set (a failure to write them is a warning, not the command's error).
    fn write_metrics(&self, cfg: &ShareConfig) {
        let Some(path) = &cfg.metrics_textfile else {
            return;
        };
        let written = state::State::open(&self.state_path(&cfg.name)).and_then(|st| {
            let text = btrship::metrics::render(
                &cfg.name,
                btrship::metrics::backend_of(&cfg.repo),
                &st,
                &self.counters.values(),
                false,
            )?;
            btrship::metrics::write_textfile(path, &text)
        });
        if let Err(e) = written {
            warn(format!("metrics not written: {e:#}"));
        }
    }

    fn at(&self, at: &str) -> Result<chrono::DateTime<chrono::Utc>> {
        timespec::parse(at, chrono::Utc::now()).map_err(|m| UserError::new(exit::USAGE, m).into())
    }

    /// The repository for a read command: from --repo/--key-file when
    /// given, else from the share's config. `for_check` reads everything
    /// from the store (check, repair); otherwise through the catalogue.
    fn open_repo(
        &self,
        name: &str,
        args: &RepoArgs,
        for_check: bool,
    ) -> Result<(Repository, Option<ShareConfig>)> {
        let (address, key_file, cfg) = self.repo_address(name, args)?;
        // Read once: a protected key file asks for its passphrase once.
        let key = require_master(&key_file, "reads the history")?;
        let mut stores = self.stores(cfg.as_ref());
        if args.recover_versions {
            stores.versions_of = Some(key.clone());
        }
        let repo = if for_check {
            let store = stores.store(&address, false, layers::RetryPolicy::default())?;
            Repository::open_for_check(store, key, self.rt.handle().clone())?
        } else {
            let own = match self.local_view(name, args)? {
                Some((c, st)) => {
                    let host = share_host(&c);
                    st.history_head()?
                        .filter(|h| h.host == host)
                        .map(|h| (host, h.seq))
                }
                None => None,
            };
            stores.open_repository_with(
                &address,
                key,
                &self.state_dir,
                own.as_ref().map(|(h, seq)| (name, h.as_str(), *seq)),
            )?
        };
        Ok((repo, cfg))
    }

    /// The repository address, key file and (unless `--repo` is given)
    /// config of share `name` for a command reading a repository.
    fn repo_address(
        &self,
        name: &str,
        args: &RepoArgs,
    ) -> Result<(String, PathBuf, Option<ShareConfig>)> {
        config::validate_name(name)?;
        let cfg = match &args.repo {
            Some(_) => None,
            None => Some(self.load_config(name)?),
        };
        let address = args
            .repo
            .clone()
            .or_else(|| cfg.as_ref().map(|c| c.repo.clone()))
            .unwrap_or_default();
        let key_file = args
            .key_file
            .clone()
            .or_else(|| cfg.as_ref().map(|c| c.key_file.clone()))
            .unwrap_or_else(|| self.default_key_file(name));
        Ok((address, key_file, cfg))
    }

    /// The shipping machine's view of share `name` in the repository the
    /// command reads (None on a fresh machine, or when `--repo` names
    /// another repository than the share's own).
    fn local_view(
        &self,
        name: &str,
        args: &RepoArgs,
    ) -> Result<Option<(ShareConfig, state::State)>> {
        let Ok(cfg) = self.load_config(name) else {
            return Ok(None);
        };
        if args.repo.as_ref().is_some_and(|r| *r != cfg.repo) || !self.state_path(name).exists() {
            return Ok(None);
        }
        let state = state::State::open(&self.state_path(name))?;
        Ok(Some((cfg, state)))
    }

    /// The history of share `name` on the host the command asks for,
    /// refusing (exit 5) a history with gaps or a store behind this
    /// machine unless `--allow-gaps`.
    fn history(
        &self,
        repo: &Repository,
        name: &str,
        args: &RepoArgs,
    ) -> Result<btrship::history::ShareHistory> {
        let local = self.local_view(name, args)?;
        let local_host = local.as_ref().map(|(c, _)| share_host(c));
        let local_head = match &local {
            Some((_, st)) => st
                .history_head()?
                .filter(|h| Some(&h.host) == local_host.as_ref()),
            None => None,
        };
        let hist = btrship::history::load(
            repo,
            &btrship::history::Select {
                share: name,
                host: args.host.as_deref(),
                local_host: if args.host.is_some() {
                    None
                } else {
                    local_host.as_deref()
                },
                local_head: if args.host.is_none() || args.host == local_host {
                    local_head
                } else {
                    None
                },
            },
        )?;
        for w in hist.require_intact(args.allow_gaps)? {
            warn(w);
        }
        for (obj, e) in &hist.unreadable {
            warn(format!(
                "history object {obj} is unreadable and skipped: {e}"
            ));
        }
        for (obj, e) in repo.damaged_indexes() {
            warn(format!(
                "index {obj} is unreadable and skipped (data it lists cannot be restored): {e}"
            ));
        }
        Ok(hist)
    }
}

/// Paths given on the command line as the bytes they name.
fn path_bytes(p: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    p.as_os_str().as_bytes().to_vec()
}

/// The master key in `key_file`; the key error (exit 4) and one line when
/// it holds a ship-only key: the command (which `does` what) needs the
/// master key.
pub fn require_master(key_file: &Path, does: &str) -> Result<Arc<btrship_crypto::RepoKey>> {
    let key = btrship::open::read_key(key_file)?;
    if key.is_master() {
        return Ok(key);
    }
    Err(UserError::new(
        exit::KEY,
        format!(
            "{} is a ship-only key: it adds history but cannot read it, and this command {does}; run it with the master key (--key-file)",
            key_file.display()
        ),
    )
    .into())
}
