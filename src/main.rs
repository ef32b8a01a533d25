//! The `btrship` command line: parses arguments, builds the tokio runtime,
//! calls the library (`src/lib.rs`), prints, and maps errors to exit codes.

use anyhow::{Context, Result};
use btrship::{check, config, exit, progress, queue, restore, ship, state, timespec};
use btrship_crypto::MasterKey;
use btrship_snapshot::{PrivateArea, Share};
use btrship_upload::layers;
use btrship_upload::local::LocalStore;
use btrship_upload::s3::{S3Config, S3Store};
use btrship_upload::{Repository, Store};
use clap::{Parser, Subcommand};
use config::{RepoAddress, ShareConfig};
use exit::UserError;
use progress::Progress;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "btrship",
    version,
    about = "Ship a Samba share on btrfs to object storage, encrypted; restore any path at any time"
)]
struct Cli {
    /// Where share configs and key files live.
    #[arg(
        long,
        global = true,
        env = "BTRSHIP_CONFIG_DIR",
        default_value = "/etc/btrship"
    )]
    config_dir: PathBuf,
    /// Where state databases and the default repository live.
    #[arg(
        long,
        global = true,
        env = "BTRSHIP_STATE_DIR",
        default_value = "/var/lib/btrship"
    )]
    state_dir: PathBuf,
    /// Never draw progress lines (they are drawn only on a terminal anyway).
    #[arg(long, global = true)]
    no_progress: bool,
    /// Requests to the store in flight at most.
    #[arg(long, global = true, default_value_t = 8)]
    max_connections: usize,
    /// Bandwidth limit for store transfers, e.g. 10M (bytes per second; K, M, G).
    #[arg(long, global = true, value_parser = parse_bwlimit)]
    bwlimit: Option<u64>,
    #[command(subcommand)]
    command: Command,
}

/// Where to read a repository from, when not from the share's config.
#[derive(clap::Args, Clone)]
struct RepoArgs {
    /// Repository address (file:///dir or /dir); with --key-file, no config or state is needed.
    #[arg(long)]
    repo: Option<String>,
    /// Key file (default: <config-dir>/NAME.key).
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Whose history: the host that shipped the share (default: this
    /// machine's own on the shipping machine; on a fresh machine the only
    /// host that shipped it).
    #[arg(long)]
    host: Option<String>,
    /// Go on when the history has gaps or the store is behind this machine
    /// (each problem becomes a warning) instead of refusing with exit 5.
    #[arg(long)]
    allow_gaps: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Set up a share: check it is a btrfs subvolume, make or reuse the key, the repository and the state.
    Init {
        path: PathBuf,
        /// Share name (default: the basename of PATH).
        #[arg(long)]
        name: Option<String>,
        /// Repository address (default: <state-dir>/repo).
        #[arg(long)]
        repo: Option<String>,
        /// Key file; created if it does not exist (default: <config-dir>/NAME.key).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Target size of pack objects in a new repository, 4M to 256M (fewer,
        /// larger objects mean fewer requests; an existing repository keeps its size).
        #[arg(long, default_value = "16M", value_parser = parse_pack_size)]
        pack_size: u64,
        /// How often the snapshot timer runs: 1h, 30m, 1d ... (at least 1m).
        #[arg(long, default_value = "1h", value_parser = parse_interval)]
        snapshot_every: u64,
        /// Do not write systemd units.
        #[arg(long)]
        no_systemd: bool,
        /// Where systemd units go.
        #[arg(
            long,
            env = "BTRSHIP_SYSTEMD_DIR",
            default_value = "/etc/systemd/system"
        )]
        systemd_dir: PathBuf,
    },
    /// Take a read-only snapshot now and ship it (and any earlier unshipped one).
    Snapshot {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Watch the share and ship every closed file version continuously (foreground; systemd Type=notify).
    Daemon { name: String },
    /// Wait until every file closed before this call is durable in the store (needs the daemon).
    Sync {
        name: String,
        /// Give up after this long: 30s, 5m, 1h ...
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: std::time::Duration,
        #[arg(long)]
        json: bool,
    },
    /// List every shipped version of one path: snapshots it changed in, closes, deletes.
    Versions {
        name: String,
        path: PathBuf,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Show the queue (snapshots waiting for the store), the last ship, the last error and whether the store is reachable.
    Status {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// List the shipped snapshots of a share.
    Snapshots {
        name: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// List files as they were at a time.
    Ls {
        name: String,
        /// Path inside the share (default: everything).
        path: Option<PathBuf>,
        /// Time (default: now).
        #[arg(long, default_value = "now")]
        at: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Restore the share, or some paths of it, as it was at a time.
    Restore {
        name: String,
        /// RFC 3339, 'YYYY-MM-DD HH:MM[:SS]' (local), 'now', or 'N[smhdw] ago'.
        #[arg(long)]
        at: String,
        /// Path inside the share to restore (repeatable; default: everything).
        #[arg(long = "path")]
        paths: Vec<PathBuf>,
        /// Target directory: must not exist or be empty.
        #[arg(long)]
        to: PathBuf,
        /// Also restore device nodes and setuid/setgid bits (by default
        /// devices are skipped and those bits cleared; both are listed).
        #[arg(long)]
        special_files: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Verify the repository: every object authenticates, nothing referenced is missing.
    Check {
        name: String,
        /// Also read and verify every byte of every pack.
        #[arg(long)]
        read_data: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// After the store lost packs: upload their blobs again from local snapshots and staging clones, and report what is lost for good.
    Repair {
        name: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        repo: RepoArgs,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BTRSHIP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .without_time()
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                std::process::exit(0);
            }
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = e.print();
                std::process::exit(i32::from(exit::USAGE));
            }
            // One line, like every other error; the full usage is in --help.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("btrship: error: {first} (see btrship --help)");
            std::process::exit(i32::from(exit::USAGE));
        }
    };
    let result = run(cli);
    let warnings = std::mem::take(&mut *WARNINGS.lock().unwrap_or_else(|p| p.into_inner()));
    let code = match result {
        Ok(code) => {
            for w in &warnings {
                eprintln!("btrship: warning: {w}");
            }
            code
        }
        Err(e) => {
            // Still one line: the warnings that came before ride along.
            let also = match warnings.as_slice() {
                [] => String::new(),
                ws => format!(" (warnings before it: {})", ws.join("; ")),
            };
            eprintln!("btrship: error: {}{also}", one_line(&e));
            exit::code_of(&e)
        }
    };
    let _ = std::io::stdout().flush();
    std::process::exit(i32::from(code));
}

/// Warnings of this run: printed after a success, folded into the one error
/// line after a failure (every error is one line on stderr).
static WARNINGS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn warn(message: impl Into<String>) {
    WARNINGS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(message.into().replace('\n', " "));
}

/// The error chain on one line, skipping causes whose text the line
/// already holds (many errors print their source themselves).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line.replace('\n', " ")
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

fn parse_interval(s: &str) -> std::result::Result<u64, String> {
    btrship::systemd::parse_interval(s)
        .ok_or_else(|| format!("{s:?} is not an interval like 1h, 30m or 1d (at least 1m)"))
}

/// `init`'s options beyond the path.
struct InitOptions {
    name: Option<String>,
    repo: Option<String>,
    key_file: Option<PathBuf>,
    pack_size: u64,
    snapshot_every: u64,
    /// Where to write systemd units (None: --no-systemd).
    systemd_dir: Option<PathBuf>,
}

fn parse_pack_size(s: &str) -> std::result::Result<u64, String> {
    let range = btrship_upload::repo::PACK_TARGET_RANGE;
    match layers::parse_bwlimit(s) {
        Some(n) if range.contains(&n) => Ok(n),
        _ => Err(format!(
            "{s:?} is not a pack size from {}M to {}M",
            range.start() >> 20,
            range.end() >> 20
        )),
    }
}

fn parse_bwlimit(s: &str) -> std::result::Result<u64, String> {
    layers::parse_bwlimit(s).ok_or_else(|| format!("{s:?} is not a bandwidth like 10M, 500K or 1G"))
}

/// Builds stores: every backend gets the same retries, limits and
/// counters. Cloneable into the daemon's shipping thread.
#[derive(Clone)]
struct Stores {
    max_connections: usize,
    bwlimit: Option<u64>,
    counters: Arc<layers::Counters>,
    rt: tokio::runtime::Handle,
}

impl Stores {
    fn store(
        &self,
        address: &str,
        create: bool,
        retry: layers::RetryPolicy,
    ) -> Result<Arc<dyn Store>> {
        let backend: Arc<dyn Store> = match RepoAddress::parse(address)? {
            RepoAddress::Local(path) => {
                if !create && !path.is_dir() {
                    return Err(UserError::new(
                        exit::NOT_FOUND,
                        format!(
                            "no btrship repository at {} (directory does not exist); check --repo",
                            path.display()
                        ),
                    )
                    .into());
                }
                if create {
                    Arc::new(LocalStore::create(&path)?)
                } else {
                    Arc::new(LocalStore::open(&path)?)
                }
            }
            RepoAddress::S3(url) => {
                let cfg = S3Config::parse_url(&url)?;
                Arc::new(self.rt.block_on(S3Store::connect(cfg))?)
            }
        };
        Ok(layers::layered(
            backend,
            layers::LayerOptions {
                retry,
                max_connections: Some(self.max_connections),
                bwlimit_bytes_per_sec: self.bwlimit,
            },
            self.counters.clone(),
        ))
    }

    /// Opens an existing repository with its key file (the daemon's).
    fn open_repository(
        &self,
        address: &str,
        key_file: &Path,
        state_dir: &Path,
        own: (&str, &str),
    ) -> Result<Repository> {
        let key = Arc::new(btrship_crypto::read_key_file(key_file)?);
        let store = self.store(address, false, layers::RetryPolicy::default())?;
        let repo = btrship::catalog::open_repository(
            store,
            key,
            self.rt.clone(),
            state_dir,
            Some((own.0, own.1, 0)),
        )?;
        Ok(repo)
    }
}

struct App {
    config_dir: PathBuf,
    state_dir: PathBuf,
    progress: bool,
    counters: Arc<layers::Counters>,
    stores: Stores,
    rt: tokio::runtime::Runtime,
}

fn run(cli: Cli) -> Result<u8> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let counters = Arc::new(layers::Counters::default());
    let stats = std::env::var_os("BTRSHIP_STATS").is_some_and(|v| v == "1");
    let totals = counters.clone();
    let app = App {
        config_dir: cli.config_dir,
        state_dir: cli.state_dir,
        progress: !cli.no_progress,
        counters: counters.clone(),
        stores: Stores {
            max_connections: cli.max_connections,
            bwlimit: cli.bwlimit,
            counters,
            rt: rt.handle().clone(),
        },
        rt,
    };
    let result = match cli.command {
        Command::Init {
            path,
            name,
            repo,
            key_file,
            pack_size,
            snapshot_every,
            no_systemd,
            systemd_dir,
        } => app.init(
            &path,
            InitOptions {
                name,
                repo,
                key_file,
                pack_size,
                snapshot_every,
                systemd_dir: (!no_systemd).then_some(systemd_dir),
            },
        ),
        Command::Snapshot { name, json } => app.snapshot(&name, json),
        Command::Status { name, json } => app.status(&name, json),
        Command::Daemon { name } => app.daemon(&name),
        Command::Sync {
            name,
            timeout,
            json,
        } => app.sync(&name, timeout, json),
        Command::Versions {
            name,
            path,
            json,
            repo,
        } => app.versions(&name, &path, json, &repo),
        Command::Snapshots { name, json, repo } => app.snapshots(&name, json, &repo),
        Command::Ls {
            name,
            path,
            at,
            json,
            repo,
        } => app.ls(&name, path.as_deref(), &at, json, &repo),
        Command::Restore {
            name,
            at,
            paths,
            to,
            special_files,
            json,
            repo,
        } => app.restore(&name, &at, &paths, &to, special_files, json, &repo),
        Command::Check {
            name,
            read_data,
            json,
            repo,
        } => app.check(&name, read_data, json, &repo),
        Command::Repair { name, json, repo } => app.repair(&name, json, &repo),
    };
    if stats {
        print_stats(&totals.values());
    }
    result
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

fn print_json(value: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its length.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if ok && end > 0 {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "localhost".into()
    }
}

/// The host name a share's history is shipped under.
fn share_host(cfg: &ShareConfig) -> String {
    cfg.host.clone().unwrap_or_else(host_name)
}

fn print_ship(report: &ship::ShipReport) {
    let how = match &report.change_detection {
        ship::ChangeDetection::Btrfs { changed_inodes, .. } => {
            format!("{changed_inodes} inodes changed since the parent")
        }
        ship::ChangeDetection::FullWalk { reason } => format!("full walk: {reason}"),
    };
    println!(
        "shipped {} ({}; {how}): {} files, {}; read {}, new {}, uploaded {} in {} objects, {:.2} s",
        report.snapshot,
        report.record,
        report.files,
        mib(report.bytes),
        mib(report.read_bytes),
        mib(report.new_bytes),
        mib(report.uploaded_bytes),
        report.objects_written,
        report.seconds
    );
    println!("  store: {}", report.store);
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

impl App {
    fn default_key_file(&self, name: &str) -> PathBuf {
        self.config_dir.join(format!("{name}.key"))
    }

    fn default_repo(&self) -> String {
        self.state_dir.join("repo").display().to_string()
    }

    fn state_path(&self, name: &str) -> PathBuf {
        self.state_dir.join(format!("{name}.db"))
    }

    fn read_key(&self, path: &Path) -> Result<Arc<MasterKey>> {
        let key = btrship_crypto::read_key_file(path).map_err(|e| {
            let io_missing = matches!(&e, btrship_crypto::KeyFileError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound);
            if io_missing {
                anyhow::Error::new(UserError::new(exit::KEY, format!("key file {} does not exist; pass --key-file", path.display())))
            } else {
                anyhow::Error::new(e)
            }
        })?;
        Ok(Arc::new(key))
    }

    fn store(&self, address: &str, create: bool) -> Result<Arc<dyn Store>> {
        self.store_with(address, create, layers::RetryPolicy::default())
    }

    fn store_with(
        &self,
        address: &str,
        create: bool,
        retry: layers::RetryPolicy,
    ) -> Result<Arc<dyn Store>> {
        self.stores.store(address, create, retry)
    }

    /// The repository and key for a read command: from --repo/--key-file
    /// when given, else from the share's config.
    fn open_repo(
        &self,
        name: &str,
        args: &RepoArgs,
        for_check: bool,
    ) -> Result<(Repository, Option<ShareConfig>)> {
        config::validate_name(name)?;
        let cfg = match &args.repo {
            Some(_) => None,
            None => Some(ShareConfig::load(&self.config_dir, name)?),
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
        let key = self.read_key(&key_file)?;
        let store = self.store(&address, false)?;
        let handle = self.rt.handle().clone();
        let repo = if for_check {
            Repository::open_for_check(store, key, handle)?
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
            btrship::catalog::open_repository(
                store,
                key,
                handle,
                &self.state_dir,
                own.as_ref().map(|(h, seq)| (name, h.as_str(), *seq)),
            )?
        };
        Ok((repo, cfg))
    }

    /// The shipping machine's view of share `name` in the repository the
    /// command reads (None on a fresh machine, or when `--repo` names
    /// another repository than the share's own).
    fn local_view(
        &self,
        name: &str,
        args: &RepoArgs,
    ) -> Result<Option<(ShareConfig, state::State)>> {
        let Ok(cfg) = ShareConfig::load(&self.config_dir, name) else {
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

    /// The key file `init` uses when none is given: the share's own when it
    /// exists, else the one of another share here that ships into the same
    /// repository (one repository, one key), else the share's own (new).
    fn default_key_for(&self, name: &str, repo: &str) -> Result<PathBuf> {
        let own = self.default_key_file(name);
        if own.exists() {
            return Ok(own);
        }
        let Ok(dir) = std::fs::read_dir(&self.config_dir) else {
            return Ok(own);
        };
        let mut others: Vec<ShareConfig> = dir
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let file = e.file_name();
                let stem = file.to_str()?.strip_suffix(".toml")?.to_string();
                (stem != name).then_some(stem)
            })
            .filter_map(|stem| ShareConfig::load(&self.config_dir, &stem).ok())
            .filter(|c| c.repo == repo && c.key_file.exists())
            .collect();
        others.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(others.into_iter().next().map_or(own, |c| c.key_file))
    }

    /// Does a repository (its config object) exist at this address? Any
    /// failure to tell counts as no: `init` then reports the real error.
    fn repository_exists(&self, address: &str) -> bool {
        let once = layers::RetryPolicy {
            attempts: 1,
            ..Default::default()
        };
        match self.store_with(address, false, once) {
            Ok(store) => self.rt.block_on(store.head("config")).is_ok(),
            Err(_) => false,
        }
    }

    fn init(&self, path: &Path, opts: InitOptions) -> Result<u8> {
        let InitOptions {
            name,
            repo,
            key_file,
            pack_size,
            snapshot_every,
            systemd_dir,
        } = opts;
        let share = Share::open(path)?;
        let name = match name {
            Some(n) => n,
            None => share
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| {
                    UserError::new(
                        exit::USAGE,
                        "cannot derive a share name from the path; pass --name",
                    )
                })?,
        };
        config::validate_name(&name)?;
        let repo = repo.unwrap_or_else(|| self.default_repo());
        let key_file = match key_file {
            Some(k) => k,
            None => self.default_key_for(&name, &repo)?,
        };
        let cfg = ShareConfig {
            name: name.clone(),
            path: share.path.clone(),
            repo,
            key_file,
            keep_local_snapshots: config::DEFAULT_KEEP_LOCAL,
            max_queued_snapshots: config::DEFAULT_MAX_QUEUED,
            settle_ms: 2000,
            exclude: config::DEFAULT_EXCLUDES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            host: Some(host_name()),
        };
        if config::config_path(&self.config_dir, &name).exists() {
            let old = ShareConfig::load(&self.config_dir, &name)?;
            if old.path != cfg.path || old.repo != cfg.repo || old.key_file != cfg.key_file {
                return Err(UserError::new(
                    exit::USAGE,
                    format!(
                        "share {name:?} is already set up with another path, repository or key (see {}); choose another --name",
                        config::config_path(&self.config_dir, &name).display()
                    ),
                )
                .into());
            }
        }
        let key_created = !cfg.key_file.exists();
        if key_created && self.repository_exists(&cfg.repo) {
            return Err(UserError::new(
                exit::KEY,
                format!(
                    "repository {} already exists and no share here uses it; pass --key-file with the key it was made with",
                    cfg.repo
                ),
            )
            .into());
        }
        if key_created {
            btrship_crypto::write_key_file(&cfg.key_file, &MasterKey::generate())?;
        }
        let key = self.read_key(&cfg.key_file)?;
        let store = self.store(&cfg.repo, true)?;
        let (_, repo_created) = Repository::open_or_create_with(
            store,
            key,
            self.rt.handle().clone(),
            &host_name(),
            pack_size,
        )
        .with_context(|| format!("repository {}", cfg.repo))?;
        PrivateArea::open(&share, &name)?;
        state::State::open(&self.state_path(&name))?;
        cfg.save(&self.config_dir)?;
        println!(
            "share {name}: {} (btrfs subvolume {})",
            cfg.path.display(),
            share.subvol_id
        );
        println!(
            "repository: {} ({})",
            cfg.repo,
            if repo_created { "created" } else { "existing" }
        );
        if key_created {
            println!("key file: {} (created; copy it somewhere safe off this machine: without it nothing can be restored)", cfg.key_file.display());
        } else {
            println!("key file: {} (existing)", cfg.key_file.display());
        }
        match systemd_dir {
            Some(dir) => {
                let units = btrship::systemd::Units {
                    exe: std::env::current_exe().context("cannot find the btrship binary")?,
                    config_dir: std::path::absolute(&self.config_dir)?,
                    state_dir: std::path::absolute(&self.state_dir)?,
                    every_secs: snapshot_every,
                };
                for p in units.write(&dir)? {
                    println!("systemd unit: {}", p.display());
                }
                println!("next: systemctl daemon-reload && systemctl enable --now btrship@{name}.service btrship-snapshot@{name}.timer");
                println!("      (the daemon ships every closed file; the timer takes a snapshot every {snapshot_every} s)");
            }
            None => println!("next: btrship snapshot {name}"),
        }
        Ok(exit::OK)
    }

    fn snapshot(&self, name: &str, json: bool) -> Result<u8> {
        let cfg = ShareConfig::load(&self.config_dir, name)?;
        let _lock = state::lock_share(&self.state_dir, name)?;
        let share = Share::open(&cfg.path)?;
        let area = PrivateArea::open(&share, name)?;
        let mut state = state::State::open(&self.state_path(name))?;

        // Taking the snapshot needs no store: it queues locally first.
        let taken = queue::take(&mut state, &share, &area)?;
        let (reports, failure) = match self.ship_queue(&cfg, &mut state, &area, json) {
            Ok(reports) => (reports, None),
            Err((reports, e)) => (reports, Some(e)),
        };
        let coalesced = queue::enforce_spool_limit(&mut state, &area, &cfg)?;
        if !json {
            for c in &coalesced {
                eprintln!(
                    "btrship: warning: spool full ({} queued): snapshot {c} coalesced into {taken}",
                    cfg.max_queued_snapshots
                );
            }
        }
        let queued = state.queued()?;
        if json {
            print_json(&serde_json::json!({
                "version": 1,
                "snapshot": taken,
                "shipped": reports,
                "queued": queued.iter().map(|s| &s.name).collect::<Vec<_>>(),
                "coalesced": coalesced,
                "error": failure.as_ref().map(|e| format!("{e:#}")),
            }))?;
        }
        match failure {
            None => Ok(exit::OK),
            Some(e) => {
                let oldest = queued.first().map(|s| s.taken_at.as_str()).unwrap_or("-");
                let msg = format!("{e:#}");
                state.log_event("error", "ship_failed", &msg)?;
                Err(e.context(format!(
                    "{} snapshots stay queued locally (oldest taken {oldest}, limit {}); \
                     they ship on the next run (btrship status {name})",
                    queued.len(),
                    cfg.max_queued_snapshots
                )))
            }
        }
    }

    /// Opens the repository and ships the queue; on failure returns what
    /// did ship and the error.
    #[allow(clippy::type_complexity)]
    fn ship_queue(
        &self,
        cfg: &ShareConfig,
        state: &mut state::State,
        area: &PrivateArea,
        json: bool,
    ) -> std::result::Result<Vec<ship::ShipReport>, (Vec<ship::ShipReport>, anyhow::Error)> {
        let repo = (|| {
            let key = self.read_key(&cfg.key_file)?;
            let store = self.store(&cfg.repo, false)?;
            let host = share_host(cfg);
            let head = state
                .history_head()?
                .filter(|h| h.host == host)
                .map_or(0, |h| h.seq);
            btrship::catalog::open_repository(
                store,
                key,
                self.rt.handle().clone(),
                &self.state_dir,
                Some((&cfg.name, &host, head)),
            )
        })()
        .map_err(|e: anyhow::Error| (Vec::new(), e.context(format!("repository {}", cfg.repo))))?;
        let mut reports = Vec::new();
        let result = queue::ship_queued(
            &repo,
            state,
            area,
            cfg,
            &share_host(cfg),
            &self.counters,
            self.progress && !json,
            |report| {
                if !json {
                    print_ship(report)
                }
                reports.push(report.clone());
            },
        );
        // Local snapshots are pruned only against a reachable store that
        // still holds their records.
        let pruned = queue::prune_local(state, area, cfg, &repo);
        match (result, pruned) {
            (Ok(_), Ok(())) => Ok(reports),
            (Err(e), _) | (Ok(_), Err(e)) => Err((reports, e)),
        }
    }

    fn daemon(&self, name: &str) -> Result<u8> {
        let cfg = ShareConfig::load(&self.config_dir, name)?;
        let _lock = btrship::daemon::lock_daemon(&self.state_dir, name)?;
        let share = Share::open(&cfg.path)?;
        let area = Arc::new(PrivateArea::open(&share, name)?);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let stop = stop.clone();
            self.rt.spawn(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
            });
        }
        let key_file = cfg.key_file.clone();
        let repo_address = cfg.repo.clone();
        let stores = self.stores.clone();
        let daemon = btrship::daemon::Daemon {
            cfg: cfg.clone(),
            share,
            area,
            state_path: self.state_path(name),
            state_dir: self.state_dir.clone(),
            host: share_host(&cfg),
            open_repo: {
                let (state_dir, share_name, host) =
                    (self.state_dir.clone(), name.to_string(), share_host(&cfg));
                Box::new(move || {
                    stores.open_repository(
                        &repo_address,
                        &key_file,
                        &state_dir,
                        (&share_name, &host),
                    )
                })
            },
            counters: self.counters.clone(),
            stop,
        };
        daemon.run()?;
        Ok(exit::OK)
    }

    fn sync(&self, name: &str, timeout: std::time::Duration, json: bool) -> Result<u8> {
        let _cfg = ShareConfig::load(&self.config_dir, name)?;
        if !btrship::daemon::daemon_running(&self.state_dir, name) {
            return Err(UserError::new(
                exit::FAILURE,
                format!("no btrship daemon is running for share {name}; start it (systemctl start btrship@{name}, or btrship daemon {name})"),
            )
            .into());
        }
        let state = state::State::open(&self.state_path(name))?;
        let requested = btrship::daemon::now_text();
        let id = state.request_sync(&requested)?;
        let started = std::time::Instant::now();
        let mut pending = Vec::new();
        let mut checked = std::time::Instant::now();
        while started.elapsed() < timeout {
            if checked.elapsed() > std::time::Duration::from_secs(1) {
                checked = std::time::Instant::now();
                if !btrship::daemon::daemon_running(&self.state_dir, name) {
                    state.forget_sync_request(id)?;
                    return Err(UserError::new(
                        exit::FAILURE,
                        format!("the btrship daemon for share {name} stopped while syncing; start it again and retry"),
                    )
                    .into());
                }
            }
            if let Some(target) = state.sync_target(id)? {
                pending = state.pending_upto(target)?;
                if pending.is_empty() {
                    state.forget_sync_request(id)?;
                    if json {
                        print_json(
                            &serde_json::json!({"version": 1, "synced": true, "requested_at": requested, "seconds": started.elapsed().as_secs_f64()}),
                        )?;
                    } else {
                        println!("synced: every file closed before {requested} is durable in the store ({:.2} s)", started.elapsed().as_secs_f64());
                    }
                    return Ok(exit::OK);
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        state.forget_sync_request(id)?;
        let error = state
            .last_event("ship_failed")?
            .map(|e| format!("; last store error at {}: {}", e.time, e.message))
            .unwrap_or_default();
        let first = pending
            .first()
            .map(|(p, k)| format!(" (first: {} {k})", String::from_utf8_lossy(p)))
            .unwrap_or_else(|| " (the daemon has not answered)".into());
        Err(UserError::new(
            exit::STORE,
            format!(
                "sync timed out after {} s: {} changes are not durable yet{first}{error}",
                timeout.as_secs(),
                pending.len()
            ),
        )
        .into())
    }

    fn versions(&self, name: &str, path: &Path, json: bool, args: &RepoArgs) -> Result<u8> {
        let (repo, _) = self.open_repo(name, args, false)?;
        let hist = self.history(&repo, name, args)?;
        let list = btrship::moment::versions_of(&repo, &hist, path.as_os_str().as_bytes())?;
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

    fn status(&self, name: &str, json: bool) -> Result<u8> {
        let cfg = ShareConfig::load(&self.config_dir, name)?;
        let state = state::State::open(&self.state_path(name))?;
        let snapshots = state.snapshots()?;
        let queued: Vec<_> = snapshots.iter().filter(|s| !s.shipped).collect();
        let last_shipped = snapshots.iter().rev().find(|s| s.shipped);
        let last_taken = snapshots.last();
        let now = chrono::Utc::now();
        let age = |t: &str| {
            chrono::DateTime::parse_from_rfc3339(t)
                .ok()
                .map(|t| (now - t.with_timezone(&chrono::Utc)).num_seconds().max(0))
        };
        let last_error = state.last_event("ship_failed")?;
        let last_ok = state.last_event("shipped")?;
        // Errors newer than the last success are current.
        let failing = match (&last_error, &last_ok) {
            (Some(e), Some(ok)) => e.time > ok.time,
            (Some(_), None) => true,
            _ => false,
        };
        let spool_full = queued.len() >= cfg.max_queued_snapshots.max(1);
        let health = if queued.is_empty() {
            "ok"
        } else if spool_full {
            "spool_full"
        } else if failing {
            "store_failing"
        } else {
            "backlog"
        };
        let probe = self.probe_store(&cfg.repo);
        let daemon_running = btrship::daemon::daemon_running(&self.state_dir, name);
        let (captures, capture_bytes, oldest_capture) = state.capture_backlog()?;
        let last_versions = state.last_event("versions")?;
        let last_ship_store = last_shipped
            .and_then(|s| s.stats.as_deref())
            .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
            .and_then(|v| v.get("store").cloned());
        let status = serde_json::json!({
            "version": 1,
            "share": cfg.name,
            "path": cfg.path,
            "repository": cfg.repo,
            "health": health,
            "queue": {
                "snapshots": queued.len(),
                "names": queued.iter().map(|s| &s.name).collect::<Vec<_>>(),
                "oldest_taken_at": queued.first().map(|s| &s.taken_at),
                "oldest_age_seconds": queued.first().and_then(|s| age(&s.taken_at)),
                "limit": cfg.max_queued_snapshots,
                "full": spool_full,
            },
            "coalesced_total": state.count_events("coalesced")?,
            "daemon": {
                "running": daemon_running,
                "queue_depth": captures,
                "bytes_pending": capture_bytes,
                "oldest_pending": oldest_capture,
                "oldest_pending_age_seconds": oldest_capture.as_deref().and_then(age),
                "last_versions": last_versions.as_ref().map(|e| serde_json::json!({"time": e.time, "message": e.message})),
            },
            "last_snapshot": last_taken.map(|s| serde_json::json!({"name": s.name, "taken_at": s.taken_at})),
            "last_shipped": last_shipped.map(|s| serde_json::json!({
                "name": s.name,
                "taken_at": s.taken_at,
                "shipped_at": s.shipped_at,
                "record": s.record,
                "store": last_ship_store,
            })),
            "last_error": last_error.as_ref().map(|e| serde_json::json!({"time": e.time, "message": e.message, "current": failing})),
            "store": {
                "reachable": probe.is_ok(),
                "error": probe.as_ref().err().map(|e| format!("{e:#}")),
                "latency_ms": probe.as_ref().ok(),
            },
        });
        if json {
            print_json(&status)?;
            return Ok(exit::OK);
        }
        println!("share {}: {} -> {}", cfg.name, cfg.path.display(), cfg.repo);
        println!("health: {health}");
        match queued.first() {
            None => println!("queue: empty"),
            Some(oldest) => println!(
                "queue: {} snapshots waiting (limit {}), oldest taken {} ({} s ago)",
                queued.len(),
                cfg.max_queued_snapshots,
                oldest.taken_at,
                age(&oldest.taken_at).unwrap_or(0)
            ),
        }
        if daemon_running {
            match &oldest_capture {
                None => println!("daemon: running, every captured change shipped"),
                Some(t) => println!(
                    "daemon: running, {captures} changes ({capture_bytes} bytes) waiting, oldest captured {t}"
                ),
            }
        } else if captures > 0 {
            println!(
                "daemon: NOT running, {captures} captured changes ({capture_bytes} bytes) waiting"
            );
        } else {
            println!("daemon: not running");
        }
        if let Some(e) = &last_versions {
            println!("last versions: {} at {}", e.message, e.time);
        }
        if let Some(s) = last_taken {
            println!("last snapshot: {} (taken {})", s.name, s.taken_at);
        }
        match last_shipped {
            Some(s) => println!(
                "last shipped: {} (shipped {})",
                s.name,
                s.shipped_at.as_deref().unwrap_or("-")
            ),
            None => println!("last shipped: none yet"),
        }
        if let Some(ok) = &last_ok {
            println!("last ship: {}", ok.message);
        }
        let coalesced = state.count_events("coalesced")?;
        if coalesced > 0 {
            println!("coalesced snapshots (spool full): {coalesced}");
        }
        if let Some(e) = &last_error {
            println!(
                "last error{}: {} at {}",
                if failing { "" } else { " (since resolved)" },
                e.message,
                e.time
            );
        }
        match &probe {
            Ok(ms) => println!("store: reachable ({ms} ms)"),
            Err(e) => println!("store: NOT reachable: {e:#}"),
        }
        Ok(exit::OK)
    }

    /// Can the store be reached now? One request (the config object's
    /// metadata), no retries, at most 10 s. Returns its latency.
    fn probe_store(&self, address: &str) -> Result<u64> {
        let once = layers::RetryPolicy {
            attempts: 1,
            ..Default::default()
        };
        let store = self.store_with(address, false, once)?;
        let started = std::time::Instant::now();
        self.rt
            .block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(10), store.head("config")).await
            })
            .map_err(|_| anyhow::anyhow!("no answer within 10 s"))??;
        Ok(started.elapsed().as_millis() as u64)
    }

    fn snapshots(&self, name: &str, json: bool, args: &RepoArgs) -> Result<u8> {
        let (repo, _) = self.open_repo(name, args, false)?;
        let hist = self.history(&repo, name, args)?;
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

    fn at(&self, at: &str) -> Result<chrono::DateTime<chrono::Utc>> {
        timespec::parse(at, chrono::Utc::now()).map_err(|m| UserError::new(exit::USAGE, m).into())
    }

    fn ls(
        &self,
        name: &str,
        path: Option<&Path>,
        at: &str,
        json: bool,
        args: &RepoArgs,
    ) -> Result<u8> {
        let at = self.at(at)?;
        let (repo, _) = self.open_repo(name, args, false)?;
        let hist = self.history(&repo, name, args)?;
        let moment = btrship::moment::at(&repo, &hist, at)?;
        let rec = moment.record;
        let mut root = rec.root.clone();
        root.subtree = Some(rec.tree);
        let path = path
            .map(|p| p.as_os_str().as_bytes().to_vec())
            .unwrap_or_default();
        let entries = restore::list(&repo, &root, &path)?;
        if json {
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

    #[allow(clippy::too_many_arguments)] // the command's flags, one each
    fn restore(
        &self,
        name: &str,
        at: &str,
        paths: &[PathBuf],
        to: &Path,
        special_files: bool,
        json: bool,
        args: &RepoArgs,
    ) -> Result<u8> {
        let at = self.at(at)?;
        let before = self.counters.values();
        let (repo, _) = self.open_repo(name, args, false)?;
        let hist = self.history(&repo, name, args)?;
        let moment = btrship::moment::at(&repo, &hist, at)?;
        let rec = moment.record;
        let mut progress = Progress::new("restoring", self.progress && !json);
        let paths: Vec<Vec<u8>> = paths
            .iter()
            .map(|p| p.as_os_str().as_bytes().to_vec())
            .collect();
        let opts = restore::RestoreOptions { special_files };
        let report = restore::restore(&repo, &rec, &paths, to, opts, &mut progress)?;
        if json {
            print_json(
                &serde_json::json!({ "version": 1, "snapshot": rec.snapshot, "time": rec.time, "at": at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true), "versions_applied": moment.versions_applied, "to": to, "restored": report, "store": self.counters.values().since(&before) }),
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

    fn repair(&self, name: &str, json: bool, args: &RepoArgs) -> Result<u8> {
        let (repo, cfg) = self.open_repo(name, args, true)?;
        let mut history_lost: Option<(u64, u64, Vec<String>)> = None;
        let report = match &cfg {
            // On the shipping machine: read lost data back from local copies.
            Some(cfg) if self.state_path(name).exists() => {
                let _lock = state::lock_share(&self.state_dir, name)?;
                let share = Share::open(&cfg.path)?;
                let area = PrivateArea::open(&share, name)?;
                let mut state = state::State::open(&self.state_path(name))?;
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
                let lost = btrship::history::resume_after_loss(
                    &repo,
                    &state,
                    &cfg.name,
                    &share_host(cfg),
                )?;
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

    fn check(&self, name: &str, read_data: bool, json: bool, args: &RepoArgs) -> Result<u8> {
        let (repo, cfg) = self.open_repo(name, args, true)?;
        let _ = cfg;
        // What this machine shipped into this repository (rollback and
        // withholding detection).
        let local = match self.local_view(name, args)? {
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
        let report = check::check(&repo, read_data, local.as_ref());
        // Remember lost packs: the next ship uploads their blobs again.
        if cfg.is_some() && !report.missing_packs.is_empty() && self.state_path(name).exists() {
            state::State::open(&self.state_path(name))?.add_missing_packs(&report.missing_packs)?;
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
}
