//! `btrship daemon NAME`: watch the share and ship every closed file
//! version (foreground, for systemd `Type=notify`).

use super::App;
use anyhow::Result;
use btrship::exit::{self, UserError};
use btrship::open::share_host;
use btrship_snapshot::{PrivateArea, Share};
use std::sync::Arc;

/// Watch the share and ship every closed file version continuously
/// (foreground; systemd Type=notify).
#[derive(clap::Args)]
#[command(
    long_about = "Watch the share with fanotify and capture every closed file as an instant \
reflink clone in a private area, then ship each settled version (one batch per burst) to the \
repository. Runs in the foreground; systemd runs it as btrship@NAME.service (Type=notify, \
watchdog). A temporary store failure is retried with backoff and shown by `btrship status`; a \
permanent one (wrong key, no repository, unsupported format, permission denied) stops the \
daemon with one error line and a non-zero exit, so systemd shows the unit failed.",
    after_help = "Examples:
  systemctl enable --now btrship@office.service
  btrship daemon office            # in the foreground, for a look
  BTRSHIP_LOG=debug btrship daemon office"
)]
pub struct Args {
    /// The share.
    name: String,
}

pub fn run(app: &App, args: Args) -> Result<u8> {
    let result = run_daemon(app, &args.name);
    if let Err(e) = &result {
        // Also what fails before the daemon proper runs (the share, the
        // private mount, the repository check): `status` says why.
        btrship::daemon::record_failure(&app.state_path(&args.name), e);
    }
    result
}

fn run_daemon(app: &App, name: &str) -> Result<u8> {
    let name = name.to_string();
    let cfg = app.load_config(&name)?;
    let _lock = btrship::daemon::lock_daemon(&app.state_dir, &name)?;
    let share = Share::open(&cfg.path)?;
    let area = Arc::new(PrivateArea::open(&share, &name)?);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = stop.clone();
        app.rt.spawn(async move {
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
    if let Some(addr) = &cfg.metrics_listen {
        let listener = app
            .rt
            .block_on(tokio::net::TcpListener::bind(addr.as_str()))
            .map_err(|e| {
                UserError::new(
                    exit::USAGE,
                    format!(
                        "cannot serve metrics on {addr} (metrics_listen in the share config): {e}"
                    ),
                )
            })?;
        let source = btrship::metrics::Source {
            share: name.clone(),
            backend: btrship::metrics::backend_of(&cfg.repo),
            state: std::sync::Mutex::new(btrship::state::State::open(&app.state_path(&name))?),
            counters: app.counters.clone(),
        };
        app.rt
            .spawn(btrship::metrics::serve(listener, Arc::new(source)));
        tracing::info!("serving metrics on http://{addr}/metrics");
    }
    let host = share_host(&cfg);
    let stores = app.stores(Some(&cfg));
    // A permanent error fails the start (before READY=1), not later.
    stores.check_openable(&cfg.repo, &cfg.key_file)?;
    let daemon = btrship::daemon::Daemon {
        cfg: cfg.clone(),
        share,
        area,
        state_path: app.state_path(&name),
        state_dir: app.state_dir.clone(),
        host: host.clone(),
        open_repo: {
            let (state_dir, cfg) = (app.state_dir.clone(), cfg.clone());
            Box::new(move || {
                stores.open_repository(
                    &cfg.repo,
                    &cfg.key_file,
                    &state_dir,
                    Some((&cfg.name, &host, 0)),
                )
            })
        },
        counters: app.counters.clone(),
        stop,
    };
    daemon.run()?;
    Ok(exit::OK)
}
